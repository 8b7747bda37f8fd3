//! GPT I/O: reading both copies from a block device, and executing the crash-safe attribute
//! writes planned by the `no_std` core.
//!
//! The structures, the per-copy validation and the plan of which bytes a write changes and in
//! which order live in [`abupdate_core::gpt`] (re-exported here), so that the boot loader
//! validates and writes the table exactly as `abupdate boot` does. This module only reads
//! sectors, executes [`WritePlan`]s on a [`BlockDevice`] and wraps I/O errors with the byte
//! offset. The `gpt` crate is still used to create new disks (see [`crate::init`]).

use std::ops::Deref;

pub use abupdate_core::gpt::{
    check_entries, check_header, Copy, CopyHealth, CopyProblem, Entry, Header, NoValidCopy,
    PlanError, Table, Which, WritePlan, WriteStep, MAX_ENTRY_ARRAY_BYTES, MIN_DISK_SECTORS,
    MIN_ENTRY_SIZE, MIN_HEADER_SIZE, SIGNATURE,
};

use crate::blockdev::BlockDevice;

/// Errors of the GPT layer.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Neither copy is usable: nothing was (or will be) written.
    #[error(transparent)]
    NoValidCopy(#[from] NoValidCopy),
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
    /// The write cannot be planned (no room for a copy, no such entry); nothing was written.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Both copies as read from a disk ([`Table`], whose methods it derefs to), with the I/O that
/// reads them and executes writes.
#[derive(Debug, Clone)]
pub struct Gpt {
    table: Table,
}

impl Deref for Gpt {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.table
    }
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
    let header = check_header(lba, &sector, disk_sectors)?;
    let array_sectors = header.entry_array_sectors(sector_size);
    let entries = read_sectors(
        dev,
        header.entries_lba(),
        (array_sectors * u64::from(sector_size)) as usize,
    )?;
    check_entries(header, entries)
}

impl Gpt {
    /// Reads both copies. The primary header is at LBA 1; the backup is looked for where a
    /// valid primary says, and at the last LBA otherwise. Fails only when neither is valid.
    pub fn read<D: BlockDevice>(dev: &mut D) -> Result<Self, GptError> {
        let sector_size = dev.sector_size();
        let disk_sectors = dev.len() / u64::from(sector_size);
        if disk_sectors < MIN_DISK_SECTORS {
            return Err(GptError::DiskTooSmall {
                len: dev.len(),
                sector_size,
            });
        }
        let last_lba = disk_sectors - 1;
        let primary = read_copy(dev, 1, disk_sectors);
        let backup_lba = abupdate_core::gpt::backup_header_lba(&primary, disk_sectors);
        let mut backup = read_copy(dev, backup_lba, disk_sectors);
        if backup.is_err() && backup_lba != last_lba {
            backup = read_copy(dev, last_lba, disk_sectors);
        }
        let table = Table::new(sector_size, disk_sectors, primary, backup)?;
        Ok(Self { table })
    }

    /// Executes `plan` step by step, updating the table after each flush. Returns the bytes
    /// written.
    fn execute<D: BlockDevice>(&mut self, dev: &mut D, plan: WritePlan) -> Result<u64, GptError> {
        let sector = u64::from(self.table.sector_size());
        let mut written = 0u64;
        for step in plan.steps {
            match step {
                WriteStep::Sectors { lba, bytes } => {
                    let offset = lba * sector;
                    dev.write_at(&bytes, offset)
                        .map_err(|source| GptError::Io {
                            what: "writing GPT entry array",
                            offset,
                            source,
                        })?;
                    written += bytes.len() as u64;
                }
                WriteStep::Header { lba, bytes } => {
                    let offset = lba * sector;
                    let mut header_sector = vec![0u8; sector as usize];
                    // Keep the sector's bytes beyond header_size as they were (zero by spec).
                    let _ = dev.read_at(&mut header_sector, offset);
                    header_sector[..bytes.len()].copy_from_slice(&bytes);
                    dev.write_at(&header_sector, offset)
                        .map_err(|source| GptError::Io {
                            what: "writing GPT header",
                            offset,
                            source,
                        })?;
                    written += sector;
                }
                WriteStep::Flush { lba, which, copy } => {
                    dev.flush().map_err(|source| GptError::Io {
                        what: "flushing GPT write",
                        offset: lba * sector,
                        source,
                    })?;
                    self.table.set_copy(which, copy);
                }
            }
        }
        Ok(written)
    }

    /// Replaces the attribute field of the given entries and writes both copies crash-safely,
    /// in the order documented on [`Table::plan_attributes`]. Returns the number of bytes
    /// written: 0 when nothing changed and both copies are healthy; with no attribute change
    /// but a damaged or stale copy, that copy is repaired ([`Gpt::repair`]).
    pub fn write_attributes<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        changes: &[(usize, u64)],
    ) -> Result<u64, GptError> {
        let plan = self.table.plan_attributes(changes)?;
        self.execute(dev, plan)
    }

    /// Rewrites a damaged or stale copy from the copy in use ([`Table::plan_repair`]); writes
    /// nothing when both copies are valid and identical. Returns the bytes written.
    pub fn repair<D: BlockDevice>(&mut self, dev: &mut D) -> Result<u64, GptError> {
        let plan = self.table.plan_repair()?;
        self.execute(dev, plan)
    }

    /// Writes a new entry array to both copies in the order documented on
    /// [`Table::plan_attributes`], then updates `self` to the new state.
    pub fn write_entries<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        entries: Vec<u8>,
    ) -> Result<u64, GptError> {
        let plan = self.table.plan_entries(entries)?;
        self.execute(dev, plan)
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
            Err(GptError::NoValidCopy(_)) => {}
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
