//! The state of both GPT copies read from a disk, and the planner of crash-safe writes to them:
//! which sectors an attribute change or repair writes, in which order, and where to flush.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use uuid::Uuid;

use super::{
    check_entries, check_header, decode_entry, Copy, CopyHealth, CopyProblem, Entry, Header,
    NoValidCopy, PlanError, Which, ATTR_OFFSET,
};
use crate::layout::{Geometry, Reserved};

/// The state of both copies as read from a disk, and the planner of writes to them.
#[derive(Debug, Clone)]
pub struct Table {
    sector_size: u32,
    disk_sectors: u64,
    primary: Result<Copy, CopyProblem>,
    backup: Result<Copy, CopyProblem>,
}

/// Reads and validates the copy whose header is at `lba`, through `read`.
fn read_copy<F>(
    read: &mut F,
    sector_size: u32,
    lba: u64,
    disk_sectors: u64,
) -> Result<Copy, CopyProblem>
where
    F: FnMut(u64, &mut [u8]) -> Result<(), String>,
{
    let mut sectors = |lba: u64, bytes: u64| {
        let mut buf = vec![0u8; bytes as usize];
        read(lba, &mut buf).map_err(|error| CopyProblem::Unreadable { lba, error })?;
        Ok(buf)
    };
    let header = check_header(lba, &sectors(lba, u64::from(sector_size))?, disk_sectors)?;
    let array_bytes = header.entry_array_sectors(sector_size) * u64::from(sector_size);
    let entries = sectors(header.entries_lba(), array_bytes)?;
    check_entries(header, entries)
}

/// One step of a [`WritePlan`], executed in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStep {
    /// Write `bytes` (one whole sector of an entry array) at `lba`.
    Sectors {
        /// Where.
        lba: u64,
        /// What: exactly one sector.
        bytes: Vec<u8>,
    },
    /// Write a header into the sector at `lba`: the sector's bytes past the header are kept as
    /// they are on the disk (read them first; zero when unreadable).
    Header {
        /// Where.
        lba: u64,
        /// The header's `header_size` bytes.
        bytes: Vec<u8>,
    },
    /// Flush the device. Once it returns, copy `which` (header at `lba`) is valid and holds
    /// `copy`: tell the table with [`Table::set_copy`].
    Flush {
        /// The header LBA just written (for error context).
        lba: u64,
        /// The copy now valid.
        which: Which,
        /// What it holds.
        copy: Copy,
    },
}

/// The writes of an attribute change or repair, in their crash-safe order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritePlan {
    /// The steps, in the order they must reach the disk.
    pub steps: Vec<WriteStep>,
}

impl WritePlan {
    /// Bytes the plan writes (a header counts as its whole sector).
    pub fn bytes(&self, sector_size: u32) -> u64 {
        self.steps
            .iter()
            .map(|s| match s {
                WriteStep::Sectors { bytes, .. } => bytes.len() as u64,
                WriteStep::Header { .. } => u64::from(sector_size),
                WriteStep::Flush { .. } => 0,
            })
            .sum()
    }
}

/// A disk as the plan executor sees it: whole sectors by LBA, and a flush that makes every
/// write before it durable. `abupdate` implements it over Linux block devices and image
/// files, the UEFI loader over the firmware's Block I/O protocol.
pub trait SectorIo {
    /// The device's error.
    type Error;
    /// Fills `buf` (whole sectors) from LBA `lba`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes `data` (whole sectors) at LBA `lba`.
    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// The step of a [`WritePlan`] that failed, with the device's error. The steps before it have
/// reached the device; the table reflects the copies flushed so far.
#[derive(Debug)]
pub struct StepFailed<E> {
    /// What the step was doing.
    pub what: &'static str,
    /// The LBA it wrote (the header's, for a flush).
    pub lba: u64,
    /// The device's error.
    pub source: E,
}

impl<E: core::fmt::Display> core::fmt::Display for StepFailed<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} at LBA {}: {}", self.what, self.lba, self.source)
    }
}

impl Table {
    /// Reads both copies of a disk of `disk_sectors` (at least [`MIN_DISK_SECTORS`](super::MIN_DISK_SECTORS)) sectors of
    /// `sector_size` bytes through `read(lba, buf)`, which fills `buf` from LBA `lba` or says
    /// why it cannot. The primary header is at LBA 1; the backup is looked for where a valid
    /// primary says, and at the last LBA otherwise. Fails only when neither copy is valid.
    pub fn read<F>(sector_size: u32, disk_sectors: u64, mut read: F) -> Result<Self, NoValidCopy>
    where
        F: FnMut(u64, &mut [u8]) -> Result<(), String>,
    {
        let last_lba = disk_sectors.saturating_sub(1);
        let primary = read_copy(&mut read, sector_size, 1, disk_sectors);
        let backup_lba = match &primary {
            Ok(p) if p.header.alternate_lba() > 1 && p.header.alternate_lba() < disk_sectors => {
                p.header.alternate_lba()
            }
            _ => last_lba,
        };
        let mut backup = read_copy(&mut read, sector_size, backup_lba, disk_sectors);
        if backup.is_err() && backup_lba != last_lba {
            backup = read_copy(&mut read, sector_size, last_lba, disk_sectors);
        }
        Self::new(sector_size, disk_sectors, primary, backup)
    }

    /// The table of a disk of `disk_sectors` sectors of `sector_size` bytes, from what was read
    /// of both copies. Fails only when neither is valid.
    pub fn new(
        sector_size: u32,
        disk_sectors: u64,
        primary: Result<Copy, CopyProblem>,
        backup: Result<Copy, CopyProblem>,
    ) -> Result<Self, NoValidCopy> {
        if let (Err(p), Err(b)) = (&primary, &backup) {
            return Err(NoValidCopy {
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
            (Err(_), Err(_)) => unreachable!("Table::new refuses a table with no valid copy"),
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
    fn check_copy_location(&self, which: Which) -> Result<(), PlanError> {
        let current = &self.current().entries;
        let header = self.header_for(which, current);
        let array_sectors = header.entry_array_sectors(self.sector_size);
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
            Some(reason) => Err(PlanError::NoRoomForCopy {
                copy: which,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Sectors of the entry array.
    fn array_sectors(&self) -> u64 {
        self.current().header.entry_array_sectors(self.sector_size)
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
    pub fn geometry(&self) -> Geometry {
        let header = &self.current().header;
        let array_last = |first: u64| first.saturating_add(self.array_sectors().max(1) - 1);
        let (p_header, p_entries, _) = self.copy_lbas(Which::Primary);
        let (b_header, b_entries, _) = self.copy_lbas(Which::Backup);
        let region = |what, first, last| Reserved { what, first, last };
        Geometry {
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

    /// Records that copy `which` on disk is now valid and holds `copy` (after a
    /// [`WriteStep::Flush`]).
    pub fn set_copy(&mut self, which: Which, copy: Copy) {
        match which {
            Which::Primary => self.primary = Ok(copy),
            Which::Backup => self.backup = Ok(copy),
        }
    }

    /// Plans writing one copy: the entry-array sectors that differ from what that copy holds
    /// (all of them if it is not valid), then the header sector, then a flush. Updates `self`
    /// as if the steps had been executed.
    fn plan_copy(&mut self, plan: &mut WritePlan, which: Which, entries: &[u8]) {
        let header = self.header_for(which, entries);
        let sector = self.sector_size as usize;
        let old = self
            .copy(which)
            .filter(|c| c.header.entries_lba() == header.entries_lba());
        let mut padded = entries.to_vec();
        padded.resize(entries.len().div_ceil(sector) * sector, 0);
        for (i, chunk) in padded.chunks(sector).enumerate() {
            let unchanged = old.is_some_and(|c| {
                let start = i * sector;
                let end = (start + sector).min(c.entries.len());
                c.entries.get(start..end) == Some(&chunk[..end - start])
            });
            if !unchanged {
                plan.steps.push(WriteStep::Sectors {
                    lba: header.entries_lba() + i as u64,
                    bytes: chunk.to_vec(),
                });
            }
        }
        let lba = header.my_lba();
        plan.steps.push(WriteStep::Header {
            lba,
            bytes: header.raw.clone(),
        });
        let copy = Copy {
            header,
            entries: entries.to_vec(),
        };
        self.set_copy(which, copy.clone());
        plan.steps.push(WriteStep::Flush { lba, which, copy });
    }

    /// Plans replacing the attribute field of the given `(entry index, attributes)` and
    /// writing both copies crash-safely. The plan is empty when nothing changed and both
    /// copies are healthy; with no attribute change but a damaged or stale copy, it repairs
    /// that copy ([`Table::plan_repair`]).
    ///
    ///
    /// # Write order and why it is crash-safe
    ///
    /// Readers (Linux, sgdisk, cgptlib, and `abupdate`'s reader) use the primary copy when its header
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
    pub fn plan_attributes(&self, changes: &[(usize, u64)]) -> Result<WritePlan, PlanError> {
        let mut entries = self.current().entries.clone();
        let entry_size = self.current().header.entry_size() as usize;
        let count = entries.len() / entry_size;
        for &(index, attributes) in changes {
            if index >= count {
                return Err(PlanError::NoSuchEntry { index, count });
            }
            let at = index * entry_size + ATTR_OFFSET;
            entries[at..at + 8].copy_from_slice(&attributes.to_le_bytes());
        }
        if entries == self.current().entries {
            return self.plan_repair();
        }
        self.plan_entries(entries)
    }

    /// Plans rewriting a damaged or stale copy from the copy in use; plans nothing when both
    /// copies are valid and identical.
    ///
    /// Like cgptlib's `GptRepair` at every boot: a power cut between the two copies of an
    /// attribute write leaves a valid new primary and a stale backup, and the next boot must
    /// not leave it so until some later attribute change. Crash-safe: only the copy that is not
    /// in use is written, so a cut during the repair leaves the in-use copy as it was.
    pub fn plan_repair(&self) -> Result<WritePlan, PlanError> {
        let mut plan = WritePlan::default();
        if self.is_consistent() {
            return Ok(plan);
        }
        let entries = self.current().entries.clone();
        let damaged = match self.current_which() {
            Which::Primary => Which::Backup,
            Which::Backup => Which::Primary,
        };
        self.check_copy_location(damaged)?;
        self.clone().plan_copy(&mut plan, damaged, &entries);
        Ok(plan)
    }

    /// Plans writing a new entry array to both copies in the order documented on
    /// [`Table::plan_attributes`].
    pub fn plan_entries(&self, entries: Vec<u8>) -> Result<WritePlan, PlanError> {
        self.check_copy_location(Which::Primary)?;
        self.check_copy_location(Which::Backup)?;
        let mut plan = WritePlan::default();
        let mut next = self.clone();
        if next.primary.is_ok() && !next.backup_matches_current() {
            let old = next.current().entries.clone();
            next.plan_copy(&mut plan, Which::Backup, &old);
        }
        next.plan_copy(&mut plan, Which::Primary, &entries);
        next.plan_copy(&mut plan, Which::Backup, &entries);
        Ok(plan)
    }
}

impl Table {
    /// Executes `plan` on `io`, step by step and in order, updating the table after each flush
    /// (so after a failure it describes what is durable). Returns the bytes written.
    ///
    /// This is the only executor of write plans: `abupdate` and the UEFI loader both call it,
    /// so the crash-safe order documented on [`Table::plan_attributes`] is kept by one piece of
    /// code.
    pub fn execute<S: SectorIo>(
        &mut self,
        io: &mut S,
        plan: WritePlan,
    ) -> Result<u64, StepFailed<S::Error>> {
        let written = plan.bytes(self.sector_size);
        let failed = |what, lba| move |source| StepFailed { what, lba, source };
        for step in plan.steps {
            match step {
                WriteStep::Sectors { lba, bytes } => io
                    .write(lba, &bytes)
                    .map_err(failed("writing GPT entry array", lba))?,
                WriteStep::Header { lba, bytes } => {
                    let mut sector = vec![0u8; self.sector_size as usize];
                    // Keep the sector's bytes beyond header_size as they were (zero by spec);
                    // an unreadable sector is written with zeros there.
                    let _ = io.read(lba, &mut sector);
                    sector[..bytes.len()].copy_from_slice(&bytes);
                    io.write(lba, &sector)
                        .map_err(failed("writing GPT header", lba))?;
                }
                WriteStep::Flush { lba, which, copy } => {
                    io.flush().map_err(failed("flushing GPT write", lba))?;
                    self.set_copy(which, copy);
                }
            }
        }
        Ok(written)
    }
}
