//! The slot choice on the firmware side: find the A/B disk, read and validate its GPT, choose
//! the slot and spend its try, all through `abupdate-core` (the code `abupdate boot` runs).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use abupdate_core::attrs::SlotAttributes;
use abupdate_core::gpt::{SectorIo, Table, MIN_DISK_SECTORS};
use abupdate_core::layout::{self, SlotEntries, SlotLabels};
use abupdate_core::select;

use crate::firmware::{self, Disk, DiskError};

/// The slot labels the loader looks for (abupdate's defaults).
const LABELS: [&str; 2] = ["ROOT-A", "ROOT-B"];

/// What the loader chose.
pub struct Choice {
    /// The slot's label.
    pub label: String,
    /// Its PARTUUID, for `root=PARTUUID=`.
    pub partuuid: String,
    /// Its attributes before and after the try.
    pub before: SlotAttributes,
    /// After.
    pub after: SlotAttributes,
    /// GPT bytes written (0 when nothing changed).
    pub bytes_written: u64,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chose {} (PARTUUID {}): {} -> {}, {} GPT bytes written",
            self.label, self.partuuid, self.before, self.after, self.bytes_written
        )
    }
}

/// The core's plan executor writes through this.
impl SectorIo for Disk {
    type Error = DiskError;

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        Disk::read(self, lba, buf)
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        Disk::write(self, lba, data)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Disk::flush(self)
    }
}

/// Finds the A/B disk, chooses the slot and persists the spent try.
pub fn choose_and_spend_try() -> Result<Choice, String> {
    let labels = SlotLabels::new(LABELS.iter().map(|l| l.to_string()).collect())
        .map_err(|e| format!("slot labels: {e}"))?;
    let mut refusals: Vec<String> = Vec::new();
    for (n, mut disk) in firmware::whole_disks().into_iter().enumerate() {
        if disk.blocks < MIN_DISK_SECTORS {
            continue;
        }
        let (block_size, blocks) = (disk.block_size, disk.blocks);
        let read = |lba, buf: &mut [u8]| Disk::read(&disk, lba, buf).map_err(|e| e.to_string());
        let table = match Table::read(block_size, blocks, read) {
            Ok(table) => table,
            // A disk without a GPT (the firmware's own virtual media): not ours.
            Err(e) => {
                refusals.push(format!("disk {n}: {e}"));
                continue;
            }
        };
        let entries = table.entries();
        if !LABELS
            .iter()
            .all(|l| entries.iter().any(|e| e.is_used() && e.name == *l))
        {
            continue;
        }
        // This disk names our slots: from here on every problem is fatal, never "try the
        // next disk", so a damaged table cannot make the loader boot something else.
        let slots = layout::validate(&entries, &table.geometry(), &labels)
            .map_err(|e| format!("disk {n}: partition table refused: {e}"))?;
        return spend_try(&mut disk, table, slots, n);
    }
    let mut why = format!(
        "no disk has partitions labelled {} and {}",
        LABELS[0], LABELS[1]
    );
    if !refusals.is_empty() {
        why = format!("{why} ({})", refusals.join("; "));
    }
    Err(why)
}

fn spend_try(
    disk: &mut Disk,
    mut table: Table,
    slots: SlotEntries,
    n: usize,
) -> Result<Choice, String> {
    let entries = table.entries();
    let attrs: Vec<SlotAttributes> = slots
        .index
        .iter()
        .map(|&i| SlotAttributes::from_raw(entries[i].attributes))
        .collect();
    let Some(choice) = select::boot_attempt(&attrs) else {
        let state: Vec<String> = LABELS
            .iter()
            .zip(&attrs)
            .map(|(l, a)| format!("{l} {a}"))
            .collect();
        return Err(format!("disk {n}: no bootable slot ({})", state.join(", ")));
    };
    let index = slots.index[choice.index];
    let changes = vec![(index, choice.updated.raw())];
    let plan = table
        .plan_attributes(&changes)
        .map_err(|e| format!("disk {n}: {e}"))?;
    let bytes_written = plan.bytes(table.sector_size());
    #[cfg(not(feature = "power-cut-test"))]
    let executed = table.execute(disk, plan);
    #[cfg(feature = "power-cut-test")]
    let executed = table.execute(&mut PausingIo(disk), plan);
    executed.map_err(|e| format!("disk {n}: {e}"))?;
    Ok(Choice {
        label: LABELS[choice.index].to_string(),
        partuuid: entries[index].unique_guid.hyphenated().to_string(),
        before: attrs[choice.index],
        after: choice.updated,
        bytes_written,
    })
}

/// The power-cut test's device: each write and flush is announced on the console and followed
/// by a pause in which the test kills the VM (see the `power-cut-test` feature).
#[cfg(feature = "power-cut-test")]
struct PausingIo<'a>(&'a mut Disk);

#[cfg(feature = "power-cut-test")]
impl SectorIo for PausingIo<'_> {
    type Error = DiskError;

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read(lba, buf)
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        self.0.write(lba, data)?;
        pause(format_args!("wrote LBA {lba}"));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.0.flush()?;
        pause(format_args!("flushed"));
        Ok(())
    }
}

#[cfg(feature = "power-cut-test")]
fn pause(what: fmt::Arguments<'_>) {
    log::info!("abupdate-loader: power-cut-test: {what}");
    uefi::boot::stall(1_500_000);
}
