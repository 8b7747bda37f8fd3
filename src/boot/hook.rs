//! The boot-time hook: choose the slot with cgptlib's rules, spend its try, persist it.
//!
//! Behind abupdate's UEFI loader the choice is already made and the try already spent: the
//! loader says so on the kernel command line (`abupdate.loader=1 abupdate.slot=LABEL`), and
//! the hook then reports that slot and writes nothing, so one boot never spends two tries. When
//! the initramfs could not mount that slot and marked it bad, it asks again without the
//! command line (`--kernel-cmdline /dev/null`), and the hook chooses as usual.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::attrs::SlotAttributes;
use crate::disk::blockdev::BlockDevice;
use crate::disk::record::{self, SlotRecord};
use crate::disk::slots::{partition_device_path, AbDisk, Slot, SlotError};
use crate::select;

/// Errors of the boot hook.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading or writing the slots failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// No slot has priority > 0 and (successful or tries > 0).
    #[error("no bootable slot on {disk}: {states}")]
    NoBootableSlot {
        /// The disk.
        disk: String,
        /// Each slot's state, e.g. `ROOT-A P0 T0 S0, ROOT-B P0 T0 S0`.
        states: String,
    },
}

/// What the hook decided, for the initramfs.
#[derive(Debug, Clone, Serialize)]
pub struct BootDecision {
    /// Slot label.
    pub slot: String,
    /// 1-based partition number.
    pub partition: u32,
    /// Partition device path (`/dev/vda2`); empty for a disk image file.
    pub device: PathBuf,
    /// Byte offset of the slot on the disk (for `mount -o offset=` on an image).
    pub offset: u64,
    /// Slot size in bytes.
    pub size: u64,
    /// Unique partition GUID.
    pub partuuid: String,
    /// Installed version, when the slot has a record.
    pub version: Option<String>,
    /// Attributes before this boot.
    pub before: String,
    /// Attributes after spending the try.
    pub after: String,
    /// Whether this boot is a trial of an unverified slot (not yet successful).
    pub trial: bool,
    /// Tries left after this boot.
    pub tries_left: u8,
    /// Bytes written to the GPT (0 for a successful slot, and behind the loader).
    pub bytes_written: u64,
    /// Who chose the slot and spent its try: `loader` or `abupdate-boot`.
    pub chosen_by: &'static str,
}

/// Runs the boot hook on `disk` (opened writable): chooses, spends a try, writes crash-safely.
/// `disk_is_block_device` decides whether a partition device path is printed (an image file
/// has none).
/// `kernel_cmdline` is this boot's kernel command line: when abupdate's loader chose a slot,
/// that choice stands and nothing is written (the loader spent the try).
pub fn boot<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    disk_path: &Path,
    disk_is_block_device: bool,
    kernel_cmdline: &str,
) -> Result<BootDecision, BootError> {
    let slots = disk.slots()?;
    let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
    // Not filtered by bootability: the loader may have spent the slot's last try, which
    // leaves it unbootable on disk while it is the slot running now.
    let by_loader = crate::disk::running::loader_choice(kernel_cmdline, &slots);
    let (choice, bytes_written, chosen_by) = match by_loader {
        Some(index) => (
            select::BootChoice {
                index,
                updated: attrs[index],
            },
            0,
            "loader",
        ),
        None => {
            let Some(choice) = select::boot_attempt(&attrs) else {
                return Err(BootError::NoBootableSlot {
                    disk: disk.name().to_string(),
                    states: describe(&slots),
                });
            };
            let mut new = attrs.clone();
            new[choice.index] = choice.updated;
            let written = disk.write_slot_attributes(&slots, &new)?;
            (choice, written, "abupdate-boot")
        }
    };
    let slot = &slots[choice.index];
    let sector_size = disk.gpt.sector_size();
    let record: Option<SlotRecord> = record::read_record(&mut disk.dev, slot, sector_size);
    Ok(BootDecision {
        slot: slot.name.clone(),
        partition: slot.partition(),
        device: if disk_is_block_device {
            partition_device_path(disk_path, slot.partition())
        } else {
            PathBuf::new()
        },
        offset: slot.offset_bytes(sector_size),
        size: slot.size_bytes(sector_size),
        partuuid: slot.partuuid().to_string(),
        version: record.map(|r| r.version),
        before: slot.attrs.to_string(),
        after: choice.updated.to_string(),
        trial: !slot.attrs.successful(),
        tries_left: choice.updated.tries(),
        bytes_written,
        chosen_by,
    })
}

/// `ROOT-A P2 T0 S1, ROOT-B P0 T0 S0`.
pub fn describe(slots: &[Slot]) -> String {
    slots
        .iter()
        .map(|s| format!("{} {}", s.name, s.attrs))
        .collect::<Vec<_>>()
        .join(", ")
}

impl BootDecision {
    /// Shell `KEY=value` lines for an initramfs to `eval`.
    pub fn to_env(&self) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        format!(
            "ABUPDATE_SLOT={}\nABUPDATE_PARTITION={}\nABUPDATE_DEVICE={}\nABUPDATE_OFFSET={}\nABUPDATE_SIZE={}\nABUPDATE_PARTUUID={}\nABUPDATE_VERSION={}\nABUPDATE_TRIAL={}\nABUPDATE_TRIES_LEFT={}\nABUPDATE_CHOSEN_BY={}\n",
            q(&self.slot),
            self.partition,
            q(&self.device.display().to_string()),
            self.offset,
            self.size,
            q(&self.partuuid),
            q(self.version.as_deref().unwrap_or("")),
            u8::from(self.trial),
            self.tries_left,
            self.chosen_by
        )
    }

    /// Kernel command-line fragment naming the root.
    pub fn to_cmdline(&self) -> String {
        format!(
            "root=PARTUUID={} abupdate.slot={}",
            self.partuuid, self.slot
        )
    }
}
