//! GPT I/O: reading both copies from a block device, and executing the crash-safe attribute
//! writes planned by the `no_std` core.
//!
//! The structures, the per-copy validation and the plan of which bytes a write changes and in
//! which order live in [`abupdate_core::gpt`] (re-exported here), so that the boot loader
//! validates and writes the table exactly as `abupdate boot` does. This module only reads
//! sectors, executes [`WritePlan`]s on a [`BlockDevice`] and wraps I/O errors with the byte
//! offset. The `gpt` crate is still used to create new disks (see [`crate::disk::init`]).

use std::ops::Deref;

pub use abupdate_core::gpt::{
    Copy, CopyHealth, CopyProblem, Entry, Header, NoValidCopy, PlanError, SectorIo, StepFailed,
    Table, Which, WritePlan, WriteStep, MAX_ENTRY_ARRAY_BYTES, MIN_DISK_SECTORS, MIN_ENTRY_SIZE,
    MIN_HEADER_SIZE, SIGNATURE,
};

use crate::disk::blockdev::BlockDevice;

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

/// A [`BlockDevice`] addressed by LBA, for the core's plan executor.
struct Sectors<'a, D> {
    dev: &'a mut D,
    sector: u64,
}

impl<D: BlockDevice> SectorIo for Sectors<'_, D> {
    type Error = std::io::Error;

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.dev.read_at(buf, lba * self.sector)
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> std::io::Result<()> {
        self.dev.write_at(data, lba * self.sector)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.dev.flush()
    }
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
        let sector = u64::from(sector_size);
        let table = Table::read(sector_size, disk_sectors, |lba, buf| {
            let offset = lba.checked_mul(sector).ok_or("offset overflows")?;
            dev.read_at(buf, offset).map_err(|e| e.to_string())
        })?;
        Ok(Self { table })
    }

    /// Executes `plan` with the core's executor ([`Table::execute`]), wrapping a device error
    /// with the byte offset. Returns the bytes written.
    fn execute<D: BlockDevice>(&mut self, dev: &mut D, plan: WritePlan) -> Result<u64, GptError> {
        let sector = u64::from(self.table.sector_size());
        self.table
            .execute(&mut Sectors { dev, sector }, plan)
            .map_err(|failed| GptError::Io {
                what: failed.what,
                offset: failed.lba * sector,
                source: failed.source,
            })
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
