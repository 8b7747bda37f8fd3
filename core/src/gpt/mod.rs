//! GPT structures, per-copy validation, and the plan of a crash-safe in-place attribute write.
//!
//! Why not the `gpt` crate here: its `write_inplace` rebuilds both headers, compacts the entry
//! array (which can renumber partitions) and picks its own write order. The boot path must
//! change 8 bytes per entry, keep everything else byte-for-byte, say which copy is damaged, and
//! write in the order documented on [`Table::plan_attributes`]. So this module parses the raw
//! structures itself (with `crc32fast`) and keeps the original bytes of headers and entries.
//!
//! Everything here is I/O free: the caller reads the sectors ([`check_header`],
//! [`check_entries`]), builds a [`Table`] from both copies, asks it for a [`WritePlan`] and
//! executes the plan's steps in order on its block device (`abupdate::gpt` on Linux, the boot
//! loader through UEFI block I/O), telling the table after each flush which copy is now valid.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use uuid::Uuid;

mod table;
#[cfg(test)]
mod tests;

pub use table::{SectorIo, StepFailed, Table, WritePlan, WriteStep};

/// "EFI PART", the header signature.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Size of the header fields defined by UEFI 2.x.
pub const MIN_HEADER_SIZE: u32 = 92;
/// Largest entry array abupdate accepts (4 MiB); real disks use 16 KiB.
pub const MAX_ENTRY_ARRAY_BYTES: u64 = 4 << 20;
/// The on-disk size of one partition entry's defined fields.
pub const MIN_ENTRY_SIZE: u32 = 128;

/// Which of the two GPT copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
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

/// Neither GPT copy is usable: nothing was (or will be) written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no valid GPT on disk: primary: {primary}; backup: {backup}")]
pub struct NoValidCopy {
    /// Why the primary copy was rejected.
    pub primary: CopyProblem,
    /// Why the backup copy was rejected.
    pub backup: CopyProblem,
}

/// Why a write cannot be planned; nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
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
            let mut b = [0u8; core::mem::size_of::<$ty>()];
            b.copy_from_slice(&self.raw[$off..$off + core::mem::size_of::<$ty>()]);
            <$ty>::from_le_bytes(b)
        }
    };
    ($name:ident, $set:ident, $ty:ty, $off:expr, $doc:expr) => {
        le_field!($name, $ty, $off, $doc);
        fn $set(&mut self, value: $ty) {
            self.raw[$off..$off + core::mem::size_of::<$ty>()]
                .copy_from_slice(&value.to_le_bytes());
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

    /// Sectors of the entry array with `sector_size`-byte sectors.
    pub fn entry_array_sectors(&self, sector_size: u32) -> u64 {
        self.entry_array_bytes().div_ceil(u64::from(sector_size))
    }

    /// The raw header bytes (`header_size` of them).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Builds a header from raw bytes (at least 92). Used by tests and fuzzing.
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

/// Minimum sectors of a disk that can hold a GPT (MBR, two headers, two entry sectors, one
/// usable sector).
pub const MIN_DISK_SECTORS: u64 = 6;

/// One valid copy: its header and entry array bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The header.
    pub header: Header,
    /// The raw entry array (`num_entries * entry_size` bytes).
    pub entries: Vec<u8>,
}

/// Health of one copy, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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

/// Validates the header sector read at `lba` (all of it, `sector.len()` being the sector size)
/// of a disk of `disk_sectors` sectors: signature, size, CRC, self LBA, entry array geometry and
/// usable range. The caller then reads the entry array ([`Header::entry_array_sectors`]
/// sectors at [`Header::entries_lba`]) and checks it with [`check_entries`].
pub fn check_header(lba: u64, sector: &[u8], disk_sectors: u64) -> Result<Header, CopyProblem> {
    let sector_size = u32::try_from(sector.len()).unwrap_or(u32::MAX);
    if sector.len() < MIN_HEADER_SIZE as usize {
        return Err(CopyProblem::BadSignature { lba });
    }
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
    Ok(header)
}

/// Checks the entry array read for `header` (whole sectors; the padding past the array is
/// ignored) against the header's CRC, giving the valid copy.
pub fn check_entries(header: Header, mut entries: Vec<u8>) -> Result<Copy, CopyProblem> {
    let start = header.entries_lba();
    entries.truncate(header.entry_array_bytes() as usize);
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
