//! The A/B slots of a disk: found by partition label, read and written through [`crate::disk::gpt`].

use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use crate::attrs::{SlotAttributes, SlotFields};
use crate::disk::blockdev::{BlockDevice, FileDevice};
use crate::disk::gpt::{CopyHealth, Entry, Gpt, GptError};
use crate::layout::{self, SlotEntries, SlotLabels};
use crate::select;

pub use crate::layout::DEFAULT_LABELS;

/// A disk named by its path: what every command that opens one needs.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Disk image file or block device.
    pub path: PathBuf,
    /// Logical sector size of an image file (block devices report their own).
    pub sector_size: Option<u32>,
    /// The slot labels.
    pub labels: SlotLabels,
}

/// Errors opening a [`DiskSpec`]: the device, or its partition table.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    /// Opening or locking the device failed.
    #[error(transparent)]
    Device(#[from] crate::disk::blockdev::OpenError),
    /// The partition table or the slot labels are unusable.
    #[error(transparent)]
    Slots(#[from] SlotError),
}

impl OpenDiskError {
    /// The error inside (this type only says which step failed).
    pub fn inner(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            OpenDiskError::Device(e) => e,
            OpenDiskError::Slots(e) => e,
        }
    }
}

impl DiskSpec {
    /// Opens the disk, read-only unless `writable`, without the lock.
    pub fn open(&self, writable: bool) -> Result<AbDisk<FileDevice>, OpenDiskError> {
        let dev = FileDevice::open(&self.path, writable, self.sector_size)?;
        Ok(AbDisk::open(
            dev,
            &self.path.display().to_string(),
            &self.labels,
        )?)
    }

    /// Opens the disk writable and takes the abupdate lock.
    pub fn open_locked(&self) -> Result<AbDisk<FileDevice>, OpenDiskError> {
        let dev = FileDevice::open(&self.path, true, self.sector_size)?;
        dev.lock()?;
        Ok(AbDisk::open(
            dev,
            &self.path.display().to_string(),
            &self.labels,
        )?)
    }
}

/// Errors finding or changing slots.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The GPT layer failed.
    #[error(transparent)]
    Gpt(#[from] GptError),
    /// The partition table or the slot labels failed validation; nothing was written.
    #[error("refusing {disk}: {source}")]
    Layout {
        /// The disk.
        disk: String,
        /// What is wrong (boxed: it names two partitions, and errors travel by value).
        source: Box<crate::layout::LayoutError>,
    },
    /// A slot name that is not one of the configured labels.
    #[error("unknown slot {name} (slots are {known})")]
    Unknown {
        /// The name given.
        name: String,
        /// The configured labels.
        known: String,
    },
}

/// One slot: its label, partition entry and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The partition label (e.g. `ROOT-A`).
    pub name: String,
    /// The partition entry as read.
    pub entry: Entry,
    /// The attribute field.
    pub attrs: SlotAttributes,
    /// Its kernel partition (`KERN-x`), on a disk with the boot chain.
    pub kernel: Option<Entry>,
}

impl Slot {
    /// The 1-based partition number.
    pub fn partition(&self) -> u32 {
        self.entry.number()
    }

    /// The unique partition GUID (what `root=PARTUUID=` names).
    pub fn partuuid(&self) -> Uuid {
        self.entry.unique_guid
    }

    /// Partition size in bytes.
    pub fn size_bytes(&self, sector_size: u32) -> u64 {
        (self.entry.last_lba - self.entry.first_lba + 1) * u64::from(sector_size)
    }

    /// Byte offset of the partition on the disk.
    pub fn offset_bytes(&self, sector_size: u32) -> u64 {
        self.entry.first_lba * u64::from(sector_size)
    }
}

/// A disk with its GPT and A/B slots, ready for attribute changes.
#[derive(Debug)]
pub struct AbDisk<D> {
    /// The device.
    pub dev: D,
    /// The GPT as last read or written.
    pub gpt: Gpt,
    name: String,
    labels: SlotLabels,
    slots: SlotEntries,
}

/// The path of partition `number` of the disk at `disk` (`/dev/vda` → `/dev/vda2`,
/// `/dev/loop0` or `/dev/nvme0n1` → `…p2`), as udev and the kernel name them.
pub fn partition_device_path(disk: &Path, number: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{number}"))
    } else {
        PathBuf::from(format!("{s}{number}"))
    }
}

impl<D: BlockDevice> AbDisk<D> {
    /// Reads the GPT of `dev` and validates it ([`crate::layout::validate`]): sound layout,
    /// each label on exactly one partition, both slots of one type. This is the only way to
    /// get an `AbDisk`, so every command that writes goes through the check. `name` is used
    /// in messages.
    pub fn open(mut dev: D, name: &str, labels: &SlotLabels) -> Result<Self, SlotError> {
        let gpt = Gpt::read(&mut dev)?;
        let slots =
            layout::validate(&gpt.entries(), &gpt.geometry(), labels).map_err(|source| {
                SlotError::Layout {
                    disk: name.to_string(),
                    source: Box::new(source),
                }
            })?;
        Ok(Self {
            dev,
            gpt,
            name: name.to_string(),
            labels: labels.clone(),
            slots,
        })
    }

    /// The disk name given at open.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configured slot labels.
    pub fn labels(&self) -> &[String] {
        self.labels.as_slice()
    }

    /// The slots, in partition-table order (the order cgptlib breaks ties in), with their
    /// current attributes. Which entries they are was fixed by the validation at open; the
    /// writers change attribute fields only.
    pub fn slots(&self) -> Result<Vec<Slot>, SlotError> {
        let entries = self.gpt.entries();
        let mut slots: Vec<Slot> = self
            .slots
            .index
            .iter()
            .zip(self.labels.as_slice())
            .enumerate()
            .map(|(n, (&i, label))| Slot {
                name: label.clone(),
                entry: entries[i].clone(),
                attrs: SlotAttributes::from_raw(entries[i].attributes),
                kernel: self.slots.kernel.map(|k| entries[k[n]].clone()),
            })
            .collect();
        slots.sort_by_key(|s| s.entry.index);
        Ok(slots)
    }

    /// Finds a slot by label (case-sensitive) or by its letter (`A`, `B`).
    pub fn slot_index(&self, slots: &[Slot], name: &str) -> Result<usize, SlotError> {
        let wanted = self
            .labels
            .as_slice()
            .iter()
            .enumerate()
            .find(|(i, l)| l.as_str() == name || slot_letter(*i).eq_ignore_ascii_case(name))
            .map(|(_, l)| l.clone());
        wanted
            .and_then(|label| slots.iter().position(|s| s.name == label))
            .ok_or_else(|| SlotError::Unknown {
                name: name.to_string(),
                known: self.labels.as_slice().join(", "),
            })
    }

    /// Writes new attributes for the slots (same order as [`AbDisk::slots`]) crash-safely.
    /// Returns the bytes written; 0 when nothing changed.
    pub fn write_slot_attributes(
        &mut self,
        slots: &[Slot],
        new: &[SlotAttributes],
    ) -> Result<u64, SlotError> {
        let changes: Vec<(usize, u64)> = slots
            .iter()
            .zip(new)
            .filter(|(s, n)| s.attrs != **n)
            .map(|(s, n)| (s.entry.index, n.raw()))
            .collect();
        Ok(self.gpt.write_attributes(&mut self.dev, &changes)?)
    }

    /// A status report (without version or running-slot knowledge, which callers add).
    pub fn status(&self) -> Result<Status, SlotError> {
        let slots = self.slots()?;
        let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
        let next = select::next_slot(&attrs);
        let sector_size = self.dev.sector_size();
        Ok(Status {
            disk: self.name.clone(),
            sector_size,
            disk_guid: self.gpt.disk_guid().to_string(),
            slots: slots
                .iter()
                .enumerate()
                .map(|(i, s)| SlotStatus {
                    name: s.name.clone(),
                    partition: s.partition(),
                    partuuid: s.partuuid().to_string(),
                    fields: s.attrs.fields(),
                    bootable: s.attrs.is_bootable(),
                    next_boot: next == Some(i),
                    running: false,
                    size_bytes: s.size_bytes(sector_size),
                    version: None,
                    kernel_partition: s.kernel.as_ref().map(Entry::number),
                })
                .collect(),
            next_boot: next.map(|i| slots[i].name.clone()),
            running: None,
            running_source: None,
            gpt: self.gpt.health(),
        })
    }
}

/// `A` for the first configured label, `B` for the second, and so on.
pub fn slot_letter(index: usize) -> String {
    char::from(b'A' + (index % 26) as u8).to_string()
}

/// One slot in a status report.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// Label.
    pub name: String,
    /// 1-based partition number.
    pub partition: u32,
    /// Unique partition GUID.
    pub partuuid: String,
    /// Priority, tries, successful.
    #[serde(flatten)]
    pub fields: SlotFields,
    /// Whether cgptlib would consider it.
    pub bootable: bool,
    /// Whether it boots next.
    pub next_boot: bool,
    /// Whether it is the running slot (when known).
    pub running: bool,
    /// Partition size.
    pub size_bytes: u64,
    /// Installed image version, when recorded.
    pub version: Option<String>,
    /// The slot's kernel partition number (`KERN-x`), on a disk with the boot chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_partition: Option<u32>,
}

/// The full status report of a disk.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Disk path.
    pub disk: String,
    /// Logical sector size.
    pub sector_size: u32,
    /// Disk GUID.
    pub disk_guid: String,
    /// The slots in partition order.
    pub slots: Vec<SlotStatus>,
    /// Label of the slot that boots next, if any.
    pub next_boot: Option<String>,
    /// Label of the running slot, if known.
    pub running: Option<String>,
    /// How the running slot was found (`chosen-by-loader`: the UEFI loader chose and started
    /// it, and said so on the kernel command line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_source: Option<&'static str>,
    /// Health of both GPT copies.
    pub gpt: Vec<CopyHealth>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "disk {} ({}-byte sectors, GUID {})",
            self.disk, self.sector_size, self.disk_guid
        )?;
        for s in &self.slots {
            let mut marks = Vec::new();
            if s.next_boot {
                marks.push("next-boot");
            }
            if s.running {
                marks.push("running");
            }
            write!(
                f,
                "{:<8} partition {:<2} PARTUUID {} priority {:<2} tries {:<2} successful {} version {} {}",
                s.name,
                s.partition,
                s.partuuid,
                s.fields.priority,
                s.fields.tries,
                u8::from(s.fields.successful),
                s.version.as_deref().unwrap_or("-"),
                marks.join(",")
            )?;
            match s.kernel_partition {
                Some(k) => writeln!(f, " kernel partition {k}")?,
                None => writeln!(f)?,
            }
        }
        for g in &self.gpt {
            let state = match (&g.problem, g.valid) {
                (None, _) => "ok".to_string(),
                (Some(p), true) => format!("valid but {p}"),
                (Some(p), false) => format!("INVALID: {p}"),
            };
            writeln!(f, "gpt {:<7} (LBA {}) {}", g.copy.to_string(), g.lba, state)?;
        }
        if let (Some(r), Some(source)) = (&self.running, self.running_source) {
            let how = if source == "chosen-by-loader" {
                "chosen by the loader"
            } else {
                source
            };
            writeln!(f, "running: {r} ({how})")?;
        }
        match &self.next_boot {
            Some(n) => write!(f, "next boot: {n}"),
            None => write!(f, "next boot: none (no bootable slot)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths() {
        assert_eq!(
            partition_device_path(Path::new("/dev/vda"), 2),
            PathBuf::from("/dev/vda2")
        );
        assert_eq!(
            partition_device_path(Path::new("/dev/loop3"), 1),
            PathBuf::from("/dev/loop3p1")
        );
        assert_eq!(
            partition_device_path(Path::new("/dev/nvme0n1"), 1),
            PathBuf::from("/dev/nvme0n1p1")
        );
    }
}
