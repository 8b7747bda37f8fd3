//! `disk init`: a fresh file-backed A/B disk, the embedded default that demos and tests use.
//!
//! Creation uses the `gpt` crate (it writes both copies and the entry CRCs correctly, and
//! compaction does not matter on an empty table); the protective MBR comes from the same crate
//! because Linux ignores a GPT without one.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::str::FromStr;

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition_types::{OperatingSystem, Type};

use crate::attrs::SlotAttributes;

/// Linux root (x86-64) from the Discoverable Partitions Specification: the default slot type.
pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// ChromeOS kernel partition type (what cgptlib scans for on ChromeOS).
pub const CHROMEOS_KERNEL: &str = "FE3A2A5D-4F32-41A7-B725-ACCC3285A309";
/// Alignment of partition starts: 1 MiB, as partitioning tools do.
pub const ALIGN_BYTES: u64 = 1 << 20;
/// Spare room left after the slots for later partitions (state, data).
pub const DEFAULT_SPARE_BYTES: u64 = 16 << 20;

/// What to create.
#[derive(Debug, Clone)]
pub struct InitSpec {
    /// Size of each slot in bytes (rounded up to a sector).
    pub slot_size: u64,
    /// Total disk size; default: room for both slots, alignment, spare space and the backup GPT.
    pub disk_size: Option<u64>,
    /// Logical sector size of the image (512 or 4096).
    pub sector_size: u32,
    /// Slot labels (A first).
    pub labels: [String; 2],
    /// Partition type GUID of the slots.
    pub type_guid: String,
}

impl InitSpec {
    /// Default layout with the given slot size.
    pub fn new(slot_size: u64) -> Self {
        Self {
            slot_size,
            disk_size: None,
            sector_size: 512,
            labels: ["ROOT-A".into(), "ROOT-B".into()],
            type_guid: LINUX_ROOT_X86_64.into(),
        }
    }

    /// The disk size that will be used, rounded up to a whole sector; `None` when the sizes
    /// do not fit in 64 bits (a typo such as `--disk-size 18446744073709551615`).
    pub fn effective_disk_size(&self) -> Option<u64> {
        let size = match self.disk_size {
            Some(size) => size,
            None => self
                .slot_size
                .checked_next_multiple_of(ALIGN_BYTES)?
                .checked_mul(2)?
                .checked_add(2 * ALIGN_BYTES + DEFAULT_SPARE_BYTES)?,
        };
        size.checked_next_multiple_of(u64::from(self.sector_size.max(1)))
    }
}

/// Errors creating a disk.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The file could not be created or written.
    #[error("cannot create disk image {path}: {source}")]
    Io {
        /// The image path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists already (init never overwrites).
    #[error("{path} already exists; refusing to overwrite it")]
    Exists {
        /// The image path.
        path: String,
    },
    /// The requested sizes do not fit.
    #[error("disk of {disk_size} bytes cannot hold two {slot_size}-byte slots plus GPT")]
    TooSmall {
        /// Disk size.
        disk_size: u64,
        /// Slot size.
        slot_size: u64,
    },
    /// Bad parameters (sector size, GUID, zero size).
    #[error("invalid disk layout: {0}")]
    Invalid(String),
    /// The gpt crate refused the layout.
    #[error("writing GPT to {path}: {message}")]
    Gpt {
        /// The image path.
        path: String,
        /// The crate's message.
        message: String,
    },
}

/// Creates the image file at `path` with a protective MBR, a GPT and the two slots: A is
/// successful with priority 2 (like fastboot's ACTIVE), B is empty and unbootable (P0 T0 S0).
pub fn create_disk_image(path: &Path, spec: &InitSpec) -> Result<(), InitError> {
    let p = path.display().to_string();
    let io = |source| InitError::Io {
        path: p.clone(),
        source,
    };
    if spec.slot_size == 0 {
        return Err(InitError::Invalid(
            "slot size must be greater than zero".into(),
        ));
    }
    let block = match spec.sector_size {
        512 => LogicalBlockSize::Lb512,
        4096 => LogicalBlockSize::Lb4096,
        other => {
            return Err(InitError::Invalid(format!(
                "sector size {other} (use 512 or 4096)"
            )))
        }
    };
    let uuid = uuid::Uuid::from_str(&spec.type_guid)
        .map_err(|e| InitError::Invalid(format!("type GUID {}: {e}", spec.type_guid)))?;
    let ss = u64::from(spec.sector_size);
    let too_large = || {
        let disk = spec
            .disk_size
            .map_or_else(|| "the default".into(), |d| format!("{d} bytes"));
        InitError::Invalid(format!(
            "sizes too large to lay out (slot {} bytes, disk {disk})",
            spec.slot_size
        ))
    };
    let disk_size = spec.effective_disk_size().ok_or_else(too_large)?;
    let slot_sectors = spec.slot_size.div_ceil(ss);
    let align = ALIGN_BYTES / ss;
    // Both slots aligned, plus the backup array (32 sectors at 512 B, 4 at 4 KiB) and header.
    let needed = slot_sectors
        .checked_next_multiple_of(align)
        .and_then(|s| s.checked_mul(2))
        .and_then(|s| s.checked_add(align + 16384 / ss + 1))
        .ok_or_else(too_large)?;
    if disk_size / ss < needed {
        return Err(InitError::TooSmall {
            disk_size,
            slot_size: spec.slot_size,
        });
    }

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                InitError::Exists { path: p.clone() }
            } else {
                InitError::Io {
                    path: p.clone(),
                    source: e,
                }
            }
        })?;
    let result = (|| {
        file.set_len(disk_size).map_err(io)?;
        let gpt_err = |e: gpt::GptError| InitError::Gpt {
            path: p.clone(),
            message: e.to_string(),
        };
        let mbr =
            ProtectiveMBR::with_lb_size(u32::try_from(disk_size / ss - 1).unwrap_or(0xFFFF_FFFF));
        mbr.overwrite_lba0(&mut file).map_err(|e| InitError::Gpt {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let mut disk = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(block)
            .create_from_device(&mut file, None)
            .map_err(gpt_err)?;
        let part_type = Type {
            guid: uuid,
            os: OperatingSystem::Custom("abupdate".into()),
        };
        let a = SlotAttributes::new(2, 0, true).raw();
        let b = SlotAttributes::new(0, 0, false).raw();
        let b_start = align + slot_sectors.next_multiple_of(align);
        disk.add_partition_at(
            &spec.labels[0],
            1,
            align,
            slot_sectors,
            part_type.clone(),
            a,
        )
        .map_err(gpt_err)?;
        disk.add_partition_at(&spec.labels[1], 2, b_start, slot_sectors, part_type, b)
            .map_err(gpt_err)?;
        disk.write_inplace().map_err(gpt_err)?;
        drop(disk);
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.flush().map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::blockdev::FileDevice;
    use crate::disk::slots::AbDisk;

    #[test]
    fn init_creates_readable_ab_disk() {
        for ss in [512u32, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            let mut spec = InitSpec::new(8 << 20);
            spec.sector_size = ss;
            create_disk_image(&path, &spec).unwrap();
            let dev = FileDevice::open(&path, false, Some(ss)).unwrap();
            let labels = crate::layout::SlotLabels::default();
            let disk = AbDisk::open(dev, "disk.img", &labels).unwrap();
            assert!(disk.gpt.is_consistent());
            let slots = disk.slots().unwrap();
            assert_eq!(slots[0].attrs, SlotAttributes::new(2, 0, true));
            assert_eq!(slots[1].attrs, SlotAttributes::new(0, 0, false));
            assert!(slots[0].size_bytes(ss) >= 8 << 20);
            assert_eq!(slots[0].offset_bytes(ss), ALIGN_BYTES);
            // Refuses to overwrite.
            assert!(matches!(
                create_disk_image(&path, &spec),
                Err(InitError::Exists { .. })
            ));
        }
    }
}
