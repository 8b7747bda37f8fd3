//! GPT reading with per-copy validation, and the crash-safe in-place attribute writer.
//!
//! Why not the `gpt` crate here: its `write_inplace` rebuilds both headers, compacts the entry
//! array (which can renumber partitions) and picks its own write order. The boot path must
//! change 8 bytes per entry, keep everything else byte-for-byte, say which copy is damaged, and
//! write in the order documented on [`Gpt::write_entries`]. So this module parses the raw
//! structures itself (with `crc32fast`) and keeps the original bytes of headers and entries.
//! The `gpt` crate is still used to create new disks (see [`crate::init`]).

use std::fmt;

use uuid::Uuid;

use crate::blockdev::BlockDevice;

/// "EFI PART", the header signature.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Size of the header fields defined by UEFI 2.x.
pub const MIN_HEADER_SIZE: u32 = 92;
/// Largest entry array abupdate accepts (4 MiB); real disks use 16 KiB.
pub const MAX_ENTRY_ARRAY_BYTES: u64 = 4 << 20;
/// The on-disk size of one partition entry's defined fields.
pub const MIN_ENTRY_SIZE: u32 = 128;

/// Which of the two GPT copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// Header at LBA 1.
    Primary,
    /// Header at the disk's last LBA.
    Backup,
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Which::Primary => "primary",
            Which::Backup => "backup",
        })
    }
}

/// Why one GPT copy was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyProblem {
    /// The header sector does not start with "EFI PART".
    BadSignature {
        /// LBA of the header.
        lba: u64,
    },
    /// `header_size` outside 92..=sector size.
    BadHeaderSize {
        /// LBA of the header.
        lba: u64,
        /// The size found.
        size: u32,
    },
    /// Header CRC mismatch.
    HeaderCrc {
        /// LBA of the header.
        lba: u64,
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over it.
        computed: u32,
    },
    /// The header's own LBA field does not match where it was found.
    WrongSelfLba {
        /// Where the header was read.
        lba: u64,
        /// What it claims.
        claimed: u64,
    },
    /// The entry array geometry is invalid (size, location, overlap).
    BadEntryArray {
        /// LBA of the header.
        lba: u64,
        /// What is wrong.
        reason: String,
    },
    /// Entry array CRC mismatch.
    EntriesCrc {
        /// First LBA of the entry array.
        lba: u64,
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the array.
        computed: u32,
    },
    /// The sectors could not be read.
    Unreadable {
        /// LBA of the failed read.
        lba: u64,
        /// The OS error text.
        error: String,
    },
}

impl fmt::Display for CopyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyProblem::BadSignature { lba } => write!(f, "no GPT signature at LBA {lba}"),
            CopyProblem::BadHeaderSize { lba, size } => {
                write!(f, "header at LBA {lba} has invalid size {size}")
            }
            CopyProblem::HeaderCrc {
                lba,
                stored,
                computed,
            } => write!(
                f,
                "header at LBA {lba} has bad CRC32 (stored {stored:#010x}, computed {computed:#010x})"
            ),
            CopyProblem::WrongSelfLba { lba, claimed } => {
                write!(f, "header at LBA {lba} claims to be at LBA {claimed}")
            }
            CopyProblem::BadEntryArray { lba, reason } => {
                write!(f, "header at LBA {lba}: {reason}")
            }
            CopyProblem::EntriesCrc {
                lba,
                stored,
                computed,
            } => write!(
                f,
                "entry array at LBA {lba} has bad CRC32 (stored {stored:#010x}, computed {computed:#010x})"
            ),
            CopyProblem::Unreadable { lba, error } => write!(f, "cannot read LBA {lba}: {error}"),
        }
    }
}

/// Errors of the GPT layer.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Neither copy is usable: nothing was (or will be) written.
    #[error("no valid GPT on disk: primary: {primary}; backup: {backup}")]
    NoValidCopy {
        /// Why the primary copy was rejected.
        primary: CopyProblem,
        /// Why the backup copy was rejected.
        backup: CopyProblem,
    },
    /// The disk cannot even hold the GPT structures.
    #[error("disk of {len} bytes is too small for a GPT with {sector_size}-byte sectors")]
    DiskTooSmall {
        /// Disk size.
        len: u64,
        /// Sector size.
        sector_size: u32,
    },
    /// An I/O error while writing or flushing.
    #[error("{what} at byte offset {offset}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Byte offset.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// A copy cannot be written where the table says it lives; nothing was written.
    #[error("cannot write the {copy} GPT copy: {reason}; nothing written")]
    NoRoomForCopy {
        /// The copy.
        copy: Which,
        /// What is wrong.
        reason: String,
    },
    /// An entry index past the array.
    #[error("partition entry index {index} is outside the {count}-entry array")]
    NoSuchEntry {
        /// The index asked for.
        index: usize,
        /// Entries in the array.
        count: usize,
    },
}

/// A parsed GPT header, keeping its raw bytes so unknown fields survive a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    raw: Vec<u8>,
}

macro_rules! le_field {
    ($name:ident, $ty:ty, $off:expr, $doc:expr) => {
        #[doc = $doc]
        pub fn $name(&self) -> $ty {
            let mut b = [0u8; std::mem::size_of::<$ty>()];
            b.copy_from_slice(&self.raw[$off..$off + std::mem::size_of::<$ty>()]);
            <$ty>::from_le_bytes(b)
        }
    };
    ($name:ident, $set:ident, $ty:ty, $off:expr, $doc:expr) => {
        le_field!($name, $ty, $off, $doc);
        fn $set(&mut self, value: $ty) {
            self.raw[$off..$off + std::mem::size_of::<$ty>()].copy_from_slice(&value.to_le_bytes());
        }
    };
}

impl Header {
    le_field!(header_size, u32, 12, "Bytes covered by the header CRC.");
    le_field!(header_crc, set_header_crc, u32, 16, "Stored header CRC32.");
    le_field!(my_lba, set_my_lba, u64, 24, "LBA of this header.");
    le_field!(
        alternate_lba,
        set_alternate_lba,
        u64,
        32,
        "LBA of the other header."
    );
    le_field!(first_usable_lba, u64, 40, "First LBA usable by partitions.");
    le_field!(last_usable_lba, u64, 48, "Last LBA usable by partitions.");
    le_field!(
        entries_lba,
        set_entries_lba,
        u64,
        72,
        "First LBA of the entry array."
    );
    le_field!(num_entries, u32, 80, "Number of entries in the array.");
    le_field!(entry_size, u32, 84, "Size of one entry in bytes.");
    le_field!(
        entries_crc,
        set_entries_crc,
        u32,
        88,
        "Stored CRC32 of the entry array."
    );

    /// The disk GUID.
    pub fn disk_guid(&self) -> Uuid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.raw[56..72]);
        Uuid::from_bytes_le(b)
    }

    /// CRC32 of the header with its CRC field zeroed, as the spec defines it.
    pub fn compute_crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.raw[..16]);
        hasher.update(&[0; 4]);
        hasher.update(&self.raw[20..self.header_size() as usize]);
        hasher.finalize()
    }

    /// Bytes of the entry array.
    pub fn entry_array_bytes(&self) -> u64 {
        u64::from(self.num_entries()) * u64::from(self.entry_size())
    }

    /// The raw header bytes (`header_size` of them).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Builds a header from raw bytes (at least 92). Used by [`crate::init`] tests and fuzzing.
    pub fn from_raw(raw: Vec<u8>) -> Option<Self> {
        (raw.len() >= MIN_HEADER_SIZE as usize).then_some(Self { raw })
    }
}

/// One partition entry, decoded. `index` is 0-based; the partition number is `index + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 0-based position in the array.
    pub index: usize,
    /// Partition type GUID.
    pub type_guid: Uuid,
    /// Unique partition GUID (the PARTUUID).
    pub unique_guid: Uuid,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// The 64-bit attribute field.
    pub attributes: u64,
    /// Partition name (label).
    pub name: String,
}

impl Entry {
    /// The 1-based partition number (as in `/dev/sdaN`, `cgpt -i N`).
    pub fn number(&self) -> u32 {
        self.index as u32 + 1
    }

    /// Whether the slot is in use (non-zero type GUID).
    pub fn is_used(&self) -> bool {
        !self.type_guid.is_nil()
    }
}

/// Offset of the attribute field inside an entry.
const ATTR_OFFSET: usize = 48;

fn decode_entry(index: usize, raw: &[u8]) -> Entry {
    let guid = |r: &[u8]| {
        let mut b = [0u8; 16];
        b.copy_from_slice(r);
        Uuid::from_bytes_le(b)
    };
    let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
    let units: Vec<u16> = raw[56..128]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Entry {
        index,
        type_guid: guid(&raw[0..16]),
        unique_guid: guid(&raw[16..32]),
        first_lba: u64_at(32),
        last_lba: u64_at(40),
        attributes: u64_at(ATTR_OFFSET),
        name: String::from_utf16_lossy(&units),
    }
}

/// One valid copy: its header and entry array bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The header.
    pub header: Header,
    /// The raw entry array (`num_entries * entry_size` bytes).
    pub entries: Vec<u8>,
}

/// The state of both copies as read from a disk.
#[derive(Debug, Clone)]
pub struct Gpt {
    sector_size: u32,
    disk_sectors: u64,
    primary: Result<Copy, CopyProblem>,
    backup: Result<Copy, CopyProblem>,
}

/// Health of one copy, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyHealth {
    /// Which copy.
    pub copy: Which,
    /// Header LBA examined.
    pub lba: u64,
    /// Whether the copy's header and entry CRCs are valid.
    pub valid: bool,
    /// Whether this copy's content is what abupdate uses.
    pub in_use: bool,
    /// What is wrong, if anything (including "stale": valid but differs from the one in use).
    pub problem: Option<String>,
}

fn read_sectors<D: BlockDevice>(
    dev: &mut D,
    lba: u64,
    bytes: usize,
) -> Result<Vec<u8>, CopyProblem> {
    let sector = u64::from(dev.sector_size());
    let mut buf = vec![0u8; bytes];
    let offset = lba
        .checked_mul(sector)
        .ok_or_else(|| CopyProblem::Unreadable {
            lba,
            error: "offset overflows".into(),
        })?;
    dev.read_at(&mut buf, offset)
        .map_err(|e| CopyProblem::Unreadable {
            lba,
            error: e.to_string(),
        })?;
    Ok(buf)
}

/// Reads and validates the copy whose header is at `lba`.
fn read_copy<D: BlockDevice>(
    dev: &mut D,
    lba: u64,
    disk_sectors: u64,
) -> Result<Copy, CopyProblem> {
    let sector_size = dev.sector_size();
    let sector = read_sectors(dev, lba, sector_size as usize)?;
    if &sector[..8] != SIGNATURE {
        return Err(CopyProblem::BadSignature { lba });
    }
    let size = u32::from_le_bytes(sector[12..16].try_into().expect("4 bytes"));
    if size < MIN_HEADER_SIZE || size > sector_size {
        return Err(CopyProblem::BadHeaderSize { lba, size });
    }
    let header = Header {
        raw: sector[..size as usize].to_vec(),
    };
    let computed = header.compute_crc();
    if computed != header.header_crc() {
        return Err(CopyProblem::HeaderCrc {
            lba,
            stored: header.header_crc(),
            computed,
        });
    }
    if header.my_lba() != lba {
        return Err(CopyProblem::WrongSelfLba {
            lba,
            claimed: header.my_lba(),
        });
    }
    let bad = |reason: String| CopyProblem::BadEntryArray { lba, reason };
    let entry_size = header.entry_size();
    if entry_size < MIN_ENTRY_SIZE || entry_size % 8 != 0 || !entry_size.is_power_of_two() {
        return Err(bad(format!("invalid entry size {entry_size}")));
    }
    let array_bytes = header.entry_array_bytes();
    if header.num_entries() == 0 || array_bytes > MAX_ENTRY_ARRAY_BYTES {
        return Err(bad(format!(
            "entry array of {} x {entry_size} bytes is empty or larger than {MAX_ENTRY_ARRAY_BYTES}",
            header.num_entries()
        )));
    }
    let array_sectors = array_bytes.div_ceil(u64::from(sector_size));
    let start = header.entries_lba();
    let end = start
        .checked_add(array_sectors)
        .ok_or_else(|| bad("entry array LBA overflows".into()))?;
    if start < 2 || end > disk_sectors || (start..end).contains(&lba) {
        return Err(bad(format!(
            "entry array at LBA {start}..{end} lies outside the {disk_sectors}-sector disk or over its header"
        )));
    }
    let first = header.first_usable_lba();
    let last = header.last_usable_lba();
    if first > last || last >= disk_sectors {
        return Err(bad(format!(
            "usable range {first}..={last} does not fit the {disk_sectors}-sector disk"
        )));
    }
    let mut entries = read_sectors(
        dev,
        start,
        (array_sectors * u64::from(sector_size)) as usize,
    )?;
    entries.truncate(array_bytes as usize);
    let computed = crc32fast::hash(&entries);
    if computed != header.entries_crc() {
        return Err(CopyProblem::EntriesCrc {
            lba: start,
            stored: header.entries_crc(),
            computed,
        });
    }
    Ok(Copy { header, entries })
}

impl Gpt {
    /// Reads both copies. The primary header is at LBA 1; the backup is looked for where a
    /// valid primary says, and at the last LBA otherwise. Fails only when neither is valid.
    pub fn read<D: BlockDevice>(dev: &mut D) -> Result<Self, GptError> {
        let sector_size = dev.sector_size();
        let disk_sectors = dev.len() / u64::from(sector_size);
        if disk_sectors < 6 {
            return Err(GptError::DiskTooSmall {
                len: dev.len(),
                sector_size,
            });
        }
        let last_lba = disk_sectors - 1;
        let primary = read_copy(dev, 1, disk_sectors);
        let backup_lba = match &primary {
            Ok(p) if p.header.alternate_lba() > 1 && p.header.alternate_lba() < disk_sectors => {
                p.header.alternate_lba()
            }
            _ => last_lba,
        };
        let mut backup = read_copy(dev, backup_lba, disk_sectors);
        if backup.is_err() && backup_lba != last_lba {
            backup = read_copy(dev, last_lba, disk_sectors);
        }
        if let (Err(p), Err(b)) = (&primary, &backup) {
            return Err(GptError::NoValidCopy {
                primary: p.clone(),
                backup: b.clone(),
            });
        }
        Ok(Self {
            sector_size,
            disk_sectors,
            primary,
            backup,
        })
    }

    /// The copy in use: the primary when valid, else the backup. This is also what the Linux
    /// kernel, sgdisk and cgptlib do.
    pub fn current(&self) -> &Copy {
        match (&self.primary, &self.backup) {
            (Ok(p), _) => p,
            (Err(_), Ok(b)) => b,
            (Err(_), Err(_)) => unreachable!("Gpt::read refuses a disk with no valid copy"),
        }
    }

    /// Which copy is in use.
    pub fn current_which(&self) -> Which {
        if self.primary.is_ok() {
            Which::Primary
        } else {
            Which::Backup
        }
    }

    /// The logical sector size the table was read with.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The disk GUID.
    pub fn disk_guid(&self) -> Uuid {
        self.current().header.disk_guid()
    }

    /// The decoded entries of the copy in use (including unused ones).
    pub fn entries(&self) -> Vec<Entry> {
        let copy = self.current();
        let size = copy.header.entry_size() as usize;
        copy.entries
            .chunks_exact(size)
            .enumerate()
            .map(|(i, raw)| decode_entry(i, raw))
            .collect()
    }

    /// Whether the backup copy is valid and holds exactly the in-use entries.
    fn backup_matches_current(&self) -> bool {
        matches!((&self.primary, &self.backup), (Ok(p), Ok(b)) if p.entries == b.entries
            && p.header.disk_guid() == b.header.disk_guid())
    }

    /// Health of both copies.
    pub fn health(&self) -> Vec<CopyHealth> {
        let primary_lba = 1;
        let backup_lba = self.backup_header_lba();
        let stale_backup =
            self.primary.is_ok() && self.backup.is_ok() && !self.backup_matches_current();
        vec![
            CopyHealth {
                copy: Which::Primary,
                lba: primary_lba,
                valid: self.primary.is_ok(),
                in_use: self.primary.is_ok(),
                problem: self.primary.as_ref().err().map(|p| p.to_string()),
            },
            CopyHealth {
                copy: Which::Backup,
                lba: backup_lba,
                valid: self.backup.is_ok(),
                in_use: self.primary.is_err(),
                problem: match &self.backup {
                    Err(p) => Some(p.to_string()),
                    Ok(_) if stale_backup => Some("stale: differs from the primary copy".into()),
                    Ok(_) => None,
                },
            },
        ]
    }

    /// Whether both copies are valid and identical in content.
    pub fn is_consistent(&self) -> bool {
        self.backup_matches_current()
    }

    fn backup_header_lba(&self) -> u64 {
        match (&self.backup, &self.primary) {
            (Ok(b), _) => b.header.my_lba(),
            (Err(_), Ok(p)) if (2..self.disk_sectors).contains(&p.header.alternate_lba()) => {
                p.header.alternate_lba()
            }
            _ => self.disk_sectors - 1,
        }
    }

    /// Checks, before anything is written, that copy `which` can be written where its header
    /// would put it: inside the disk, clear of the partitions' usable range and of the other
    /// copy. A table whose geometry does not allow it (found by fuzzing: a valid primary whose
    /// backup location lies past a truncated disk) is refused instead of half-written.
    fn check_copy_location(&self, which: Which) -> Result<(), GptError> {
        let current = &self.current().entries;
        let header = self.header_for(which, current);
        let array_sectors = header
            .entry_array_bytes()
            .div_ceil(u64::from(self.sector_size));
        let start = header.entries_lba();
        let end = start.saturating_add(array_sectors);
        let my = header.my_lba();
        let usable = header.first_usable_lba()..=header.last_usable_lba();
        let overlaps_usable = |a: u64, b: u64| a <= *usable.end() && b > *usable.start();
        let reason = if my == 0 || my >= self.disk_sectors {
            Some(format!(
                "header LBA {my} is outside the {}-sector disk",
                self.disk_sectors
            ))
        } else if start < 2 || end > self.disk_sectors || (start..end).contains(&my) {
            Some(format!(
                "entry array LBA {start}..{end} does not fit the disk"
            ))
        } else if overlaps_usable(start, end) || usable.contains(&my) {
            Some(format!(
                "LBA {start}..{end} and {my} overlap the partitions' usable range {}..={}",
                usable.start(),
                usable.end()
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => Err(GptError::NoRoomForCopy {
                copy: which,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Sectors of the entry array.
    fn array_sectors(&self) -> u64 {
        self.current()
            .header
            .entry_array_bytes()
            .div_ceil(u64::from(self.sector_size))
    }

    /// Where copy `which` lives, or would be written: (header LBA, first LBA of its entry
    /// array, the other header's LBA).
    fn copy_lbas(&self, which: Which) -> (u64, u64, u64) {
        let backup_lba = self.backup_header_lba();
        match which {
            Which::Primary => {
                let entries_lba = match &self.primary {
                    Ok(p) => p.header.entries_lba(),
                    Err(_) => 2,
                };
                (1, entries_lba, backup_lba)
            }
            Which::Backup => {
                let entries_lba = match &self.backup {
                    Ok(b) => b.header.entries_lba(),
                    Err(_) => backup_lba.saturating_sub(self.array_sectors()),
                };
                (backup_lba, entries_lba, 1)
            }
        }
    }

    /// The geometry the partitions are checked against by [`crate::layout::validate`]: the
    /// in-use header's usable range, and the sectors of the protective MBR and of both copies
    /// where the attribute writer would write them.
    pub fn geometry(&self) -> crate::layout::Geometry {
        use crate::layout::Reserved;
        let header = &self.current().header;
        let array_last = |first: u64| first.saturating_add(self.array_sectors().max(1) - 1);
        let (p_header, p_entries, _) = self.copy_lbas(Which::Primary);
        let (b_header, b_entries, _) = self.copy_lbas(Which::Backup);
        let region = |what, first, last| Reserved { what, first, last };
        crate::layout::Geometry {
            disk_sectors: self.disk_sectors,
            first_usable: header.first_usable_lba(),
            last_usable: header.last_usable_lba(),
            reserved: vec![
                region("protective MBR", 0, 0),
                region("primary GPT header", p_header, p_header),
                region("primary GPT entry array", p_entries, array_last(p_entries)),
                region("backup GPT entry array", b_entries, array_last(b_entries)),
                region("backup GPT header", b_header, b_header),
            ],
        }
    }

    /// Builds the header for `which` copy describing `entries`, based on the in-use header.
    fn header_for(&self, which: Which, entries: &[u8]) -> Header {
        let (my_lba, entries_lba, alternate_lba) = self.copy_lbas(which);
        let mut h = self.current().header.clone();
        h.set_my_lba(my_lba);
        h.set_alternate_lba(alternate_lba);
        h.set_entries_lba(entries_lba);
        h.set_entries_crc(crc32fast::hash(entries));
        h.set_header_crc(0);
        let crc = h.compute_crc();
        h.set_header_crc(crc);
        h
    }

    /// What the disk holds now for `which`, if valid.
    fn copy(&self, which: Which) -> Option<&Copy> {
        match which {
            Which::Primary => self.primary.as_ref().ok(),
            Which::Backup => self.backup.as_ref().ok(),
        }
    }

    /// Writes one copy: the entry-array sectors that differ from what that copy holds (all of
    /// them if it is not valid), then the header sector, then a flush. Returns bytes written.
    fn write_copy<D: BlockDevice>(
        &self,
        dev: &mut D,
        which: Which,
        entries: &[u8],
    ) -> Result<u64, GptError> {
        let header = self.header_for(which, entries);
        let sector = self.sector_size as usize;
        let old = self
            .copy(which)
            .filter(|c| c.header.entries_lba() == header.entries_lba());
        let mut written = 0u64;
        let mut padded = entries.to_vec();
        padded.resize(entries.len().div_ceil(sector) * sector, 0);
        for (i, chunk) in padded.chunks(sector).enumerate() {
            let unchanged = old.is_some_and(|c| {
                let start = i * sector;
                let end = (start + sector).min(c.entries.len());
                c.entries.get(start..end) == Some(&chunk[..end - start])
            });
            if unchanged {
                continue;
            }
            let offset = (header.entries_lba() + i as u64) * sector as u64;
            dev.write_at(chunk, offset).map_err(|source| GptError::Io {
                what: "writing GPT entry array",
                offset,
                source,
            })?;
            written += sector as u64;
        }
        let mut header_sector = vec![0u8; sector];
        let offset = header.my_lba() * sector as u64;
        // Keep the sector's bytes beyond header_size as they were (zero by spec).
        let _ = dev.read_at(&mut header_sector, offset);
        header_sector[..header.raw.len()].copy_from_slice(&header.raw);
        dev.write_at(&header_sector, offset)
            .map_err(|source| GptError::Io {
                what: "writing GPT header",
                offset,
                source,
            })?;
        written += sector as u64;
        dev.flush().map_err(|source| GptError::Io {
            what: "flushing GPT write",
            offset,
            source,
        })?;
        Ok(written)
    }

    /// Replaces the attribute field of the given entries and writes both copies crash-safely.
    /// Returns the number of bytes written: 0 when nothing changed and both copies are healthy;
    /// with no attribute change but a damaged or stale copy, that copy is repaired
    /// ([`Gpt::repair`]).
    ///
    /// # Write order and why it is crash-safe
    ///
    /// Readers (Linux, sgdisk, cgptlib, and [`Gpt::read`]) use the primary copy when its header
    /// and entry CRCs are valid and fall back to the backup otherwise. So:
    ///
    /// 1. If the backup does not already hold the current (old) state validly, it is rewritten
    ///    from the in-use copy first, then flushed. From here on the backup is a valid old copy.
    /// 2. The primary's changed entry sectors are written, then its header (whose CRCs cover the
    ///    new entries), then a flush. A cut before the header lands leaves new entries under an
    ///    old header: the entry CRC fails, readers use the backup (old state). A torn header
    ///    fails its own CRC: same. Once the header lands, the primary is valid and new.
    /// 3. The backup's entries and header are written the same way, then flushed. A cut here
    ///    leaves a valid new primary; the torn or stale backup is repaired by step 1 of the next
    ///    write (and reported by `status` meanwhile).
    ///
    /// At every instant one copy is valid and holds either the complete old or the complete new
    /// state; never a mix. When the primary is the damaged copy, step 1 is skipped (the backup
    /// is the in-use old state) and step 2 rebuilds the whole primary.
    pub fn write_attributes<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        changes: &[(usize, u64)],
    ) -> Result<u64, GptError> {
        let mut entries = self.current().entries.clone();
        let entry_size = self.current().header.entry_size() as usize;
        let count = entries.len() / entry_size;
        for &(index, attributes) in changes {
            if index >= count {
                return Err(GptError::NoSuchEntry { index, count });
            }
            let at = index * entry_size + ATTR_OFFSET;
            entries[at..at + 8].copy_from_slice(&attributes.to_le_bytes());
        }
        if entries == self.current().entries {
            return self.repair(dev);
        }
        self.write_entries(dev, entries)
    }

    /// Rewrites a damaged or stale copy from the copy in use; writes nothing when both copies
    /// are valid and identical. Returns the bytes written.
    ///
    /// Like cgptlib's `GptRepair` at every boot: a power cut between the two copies of an
    /// attribute write leaves a valid new primary and a stale backup, and the next boot must
    /// not leave it so until some later attribute change. Crash-safe: only the copy that is not
    /// in use is written, so a cut during the repair leaves the in-use copy as it was.
    pub fn repair<D: BlockDevice>(&mut self, dev: &mut D) -> Result<u64, GptError> {
        if self.is_consistent() {
            return Ok(0);
        }
        let entries = self.current().entries.clone();
        let damaged = match self.current_which() {
            Which::Primary => Which::Backup,
            Which::Backup => Which::Primary,
        };
        self.check_copy_location(damaged)?;
        let written = self.write_copy(dev, damaged, &entries)?;
        let repaired = Copy {
            header: self.header_for(damaged, &entries),
            entries,
        };
        match damaged {
            Which::Primary => self.primary = Ok(repaired),
            Which::Backup => self.backup = Ok(repaired),
        }
        Ok(written)
    }

    /// Writes a new entry array to both copies in the order documented on
    /// [`Gpt::write_attributes`], then updates `self` to the new state.
    pub fn write_entries<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        entries: Vec<u8>,
    ) -> Result<u64, GptError> {
        self.check_copy_location(Which::Primary)?;
        self.check_copy_location(Which::Backup)?;
        let mut written = 0;
        let old = self.current().entries.clone();
        if self.primary.is_ok() && !self.backup_matches_current() {
            written += self.write_copy(dev, Which::Backup, &old)?;
            self.backup = Ok(Copy {
                header: self.header_for(Which::Backup, &old),
                entries: old,
            });
        }
        written += self.write_copy(dev, Which::Primary, &entries)?;
        let primary = Copy {
            header: self.header_for(Which::Primary, &entries),
            entries: entries.clone(),
        };
        let backup = Copy {
            header: self.header_for(Which::Backup, &entries),
            entries: entries.clone(),
        };
        self.primary = Ok(primary);
        written += self.write_copy(dev, Which::Backup, &entries)?;
        self.backup = Ok(backup);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::MemDevice;

    /// A minimal valid GPT on a memory disk, built by hand so the parser is tested against an
    /// independent writer (the integration tests use sgdisk and cgpt for that too).
    pub(crate) fn mem_disk(sector_size: u32, sectors: u64) -> MemDevice {
        let ss = sector_size as usize;
        let mut dev = MemDevice::new(ss * sectors as usize, sector_size);
        let array_bytes = 128 * 128;
        let array_sectors = (array_bytes as u64).div_ceil(sector_size as u64);
        let mut entries = vec![0u8; array_bytes];
        for (i, name) in ["ROOT-A", "ROOT-B"].iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&[1; 16]);
            e[16..32].copy_from_slice(&[i as u8 + 2; 16]);
            e[32..40].copy_from_slice(&(40 + 10 * i as u64).to_le_bytes());
            e[40..48].copy_from_slice(&(49 + 10 * i as u64).to_le_bytes());
            e[48..56].copy_from_slice(&(0x0001_0000_0000_0004u64 << i).to_le_bytes());
            for (j, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let last = sectors - 1;
        for (my, alt, elba) in [(1, last, 2), (last, 1, last - array_sectors)] {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + array_sectors).to_le_bytes());
            h[48..56].copy_from_slice(&(last - array_sectors - 1).to_le_bytes());
            h[72..80].copy_from_slice(&elba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            dev.write_at(&h, my * ss as u64).unwrap();
            dev.write_at(&entries, elba * ss as u64).unwrap();
        }
        dev
    }

    #[test]
    fn reads_both_copies_at_both_sector_sizes() {
        for ss in [512u32, 4096] {
            let mut dev = mem_disk(ss, 200);
            let gpt = Gpt::read(&mut dev).unwrap();
            assert!(gpt.is_consistent());
            let names: Vec<_> = gpt
                .entries()
                .into_iter()
                .filter(|e| e.is_used())
                .map(|e| e.name)
                .collect();
            assert_eq!(names, ["ROOT-A", "ROOT-B"]);
        }
    }

    /// Flipping any single bit of a header (within its CRC'd bytes) or of an entry array makes
    /// that copy invalid and the other copy is used, with the original content.
    #[test]
    fn every_bit_flip_selects_the_other_copy() {
        for ss in [512u32, 4096] {
            let pristine = mem_disk(ss, 200);
            let mut reference_dev = pristine.clone();
            let reference = Gpt::read(&mut reference_dev).unwrap().entries();
            let ssz = ss as usize;
            let last = 199usize;
            let array_sectors = (128 * 128usize).div_ceil(ssz);
            let regions = [
                (Which::Primary, ssz, 92),
                (Which::Backup, last * ssz, 92),
                (Which::Primary, 2 * ssz, 128 * 128),
                (Which::Backup, (last - array_sectors) * ssz, 128 * 128),
            ];
            let mut dev = pristine.clone();
            for (damaged, start, len) in regions {
                for bit in 0..len * 8 {
                    dev.data[start + bit / 8] ^= 1 << (bit % 8);
                    let gpt = Gpt::read(&mut dev).unwrap();
                    dev.data[start + bit / 8] ^= 1 << (bit % 8);
                    let expected_in_use = match damaged {
                        Which::Primary => Which::Backup,
                        Which::Backup => Which::Primary,
                    };
                    assert_eq!(gpt.current_which(), expected_in_use, "bit {bit} at {start}");
                    assert_eq!(gpt.entries(), reference);
                    let health = gpt.health();
                    let bad = health.iter().find(|h| h.copy == damaged).unwrap();
                    assert!(!bad.valid, "flip of bit {bit} at {start} went unnoticed");
                }
            }
        }
    }

    #[test]
    fn both_copies_broken_is_an_error() {
        let mut dev = mem_disk(512, 200);
        dev.data[512] ^= 1;
        dev.data[199 * 512] ^= 1;
        match Gpt::read(&mut dev) {
            Err(GptError::NoValidCopy { .. }) => {}
            other => panic!("expected NoValidCopy, got {other:?}"),
        }
    }

    #[test]
    fn attribute_write_changes_only_attribute_bytes_and_crcs() {
        let mut dev = mem_disk(512, 200);
        let before = dev.data.clone();
        let mut gpt = Gpt::read(&mut dev).unwrap();
        let written = gpt
            .write_attributes(&mut dev, &[(1, 0x0102_0000_0000_0000)])
            .unwrap();
        // One entry sector and one header sector per copy.
        assert_eq!(written, 4 * 512);
        let diffs: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != dev.data[i])
            .collect();
        for i in diffs {
            let in_primary_header =
                (512 + 16..512 + 20).contains(&i) || (512 + 88..512 + 92).contains(&i);
            let in_backup_header = (199 * 512 + 16..199 * 512 + 20).contains(&i)
                || (199 * 512 + 88..199 * 512 + 92).contains(&i);
            let entry_attr = |base: usize| (base + 128 + 48..base + 128 + 56).contains(&i);
            assert!(
                in_primary_header
                    || in_backup_header
                    || entry_attr(1024)
                    || entry_attr((199 - 32) * 512),
                "unexpected change at byte {i}"
            );
        }
        let reread = Gpt::read(&mut dev).unwrap();
        assert!(reread.is_consistent());
        assert_eq!(reread.entries()[1].attributes, 0x0102_0000_0000_0000);
        // Unchanged attributes write nothing.
        let mut gpt = reread;
        assert_eq!(
            gpt.write_attributes(&mut dev, &[(1, 0x0102_0000_0000_0000)])
                .unwrap(),
            0
        );
    }

    #[test]
    fn an_unchanged_write_still_repairs_then_writes_nothing() {
        for damaged_offset in [512usize, 199 * 512, 2 * 512 + 100, (199 - 32) * 512 + 100] {
            let mut dev = mem_disk(512, 200);
            let attrs = Gpt::read(&mut dev).unwrap().entries()[0].attributes;
            dev.data[damaged_offset] ^= 0x08;
            let mut gpt = Gpt::read(&mut dev).unwrap();
            assert!(!gpt.is_consistent());
            let written = gpt.write_attributes(&mut dev, &[(0, attrs)]).unwrap();
            assert!(written > 0, "damage at {damaged_offset} not repaired");
            let mut again = Gpt::read(&mut dev).unwrap();
            assert!(again.is_consistent());
            assert_eq!(again.write_attributes(&mut dev, &[(0, attrs)]).unwrap(), 0);
        }
    }

    #[test]
    fn write_repairs_a_damaged_copy() {
        for damaged_offset in [512usize, 199 * 512] {
            let mut dev = mem_disk(512, 200);
            dev.data[damaged_offset + 30] ^= 0xFF;
            let mut gpt = Gpt::read(&mut dev).unwrap();
            assert!(!gpt.is_consistent());
            gpt.write_attributes(&mut dev, &[(0, 1 << 56)]).unwrap();
            let reread = Gpt::read(&mut dev).unwrap();
            assert!(
                reread.is_consistent(),
                "damage at {damaged_offset} not repaired"
            );
            assert_eq!(reread.entries()[0].attributes, 1 << 56);
        }
    }
}
