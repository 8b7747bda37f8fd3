//! `disk init`: a fresh file-backed A/B disk, the embedded default that demos and tests use.
//!
//! Creation uses the `gpt` crate (it writes both copies and the entry CRCs correctly, and
//! compaction does not matter on an empty table); the protective MBR comes from the same crate
//! because Linux ignores a GPT without one.
//!
//! With a boot chain ([`BootChain`]) the disk also gets what firmware needs to boot it through
//! abupdate's UEFI loader, ChromeOS style: an EFI system partition (FAT, made by `mkfs.vfat`
//! and `mcopy`, the loader at `\EFI\BOOT\BOOTX64.EFI`) and a raw kernel partition per
//! slot, paired by suffix (`KERN-A` with `ROOT-A`). The order is EFI-SYSTEM, KERN-A, ROOT-A,
//! KERN-B, ROOT-B. The slot attributes stay on the ROOT partitions; KERN partitions carry none.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::str::FromStr;

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition_types::{OperatingSystem, Type};

use crate::attrs::SlotAttributes;
use crate::layout::kernel_label;

/// Linux root (x86-64) from the Discoverable Partitions Specification: the default slot type.
pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// ChromeOS kernel partition type (what cgptlib scans for on ChromeOS).
pub const CHROMEOS_KERNEL: &str = "FE3A2A5D-4F32-41A7-B725-ACCC3285A309";
/// Alignment of partition starts: 1 MiB, as partitioning tools do.
pub const ALIGN_BYTES: u64 = 1 << 20;
/// Spare room left after the slots for later partitions (state, data).
pub const DEFAULT_SPARE_BYTES: u64 = 16 << 20;
/// EFI system partition type.
pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Label of the EFI system partition.
pub const ESP_LABEL: &str = "EFI-SYSTEM";
/// Default size of the EFI system partition: FAT16, room for the loader many times over.
pub const DEFAULT_ESP_BYTES: u64 = 32 << 20;

/// The boot-chain partitions of a disk the UEFI loader boots.
#[derive(Debug, Clone)]
pub struct BootChain {
    /// Size of the EFI system partition.
    pub esp_size: u64,
    /// Size of each kernel partition.
    pub kernel_size: u64,
    /// The loader to install as `\EFI\BOOT\BOOTX64.EFI` (the ESP is left empty without one).
    pub loader: Option<Vec<u8>>,
}

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
    /// The ESP and kernel partitions, for disks booted through the UEFI loader.
    pub boot_chain: Option<BootChain>,
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
            boot_chain: None,
        }
    }

    /// The partitions in table order: (label, type GUID, size in bytes, attribute bits).
    fn partitions(&self) -> Vec<(String, &str, u64, u64)> {
        let a = SlotAttributes::new(2, 0, true).raw();
        let b = SlotAttributes::new(0, 0, false).raw();
        let slot = |i: usize, attrs| {
            (
                self.labels[i].clone(),
                &*self.type_guid,
                self.slot_size,
                attrs,
            )
        };
        match &self.boot_chain {
            None => vec![slot(0, a), slot(1, b)],
            Some(chain) => {
                let kernel = |i: usize| {
                    (
                        kernel_label(&self.labels[i]),
                        CHROMEOS_KERNEL,
                        chain.kernel_size,
                        0,
                    )
                };
                vec![
                    (ESP_LABEL.into(), EFI_SYSTEM, chain.esp_size, 0),
                    kernel(0),
                    slot(0, a),
                    kernel(1),
                    slot(1, b),
                ]
            }
        }
    }

    /// The disk size that will be used, rounded up to a whole sector; `None` when the sizes
    /// do not fit in 64 bits (a typo such as `--disk-size 18446744073709551615`).
    pub fn effective_disk_size(&self) -> Option<u64> {
        let size = match self.disk_size {
            Some(size) => size,
            None => self.partitions().iter().try_fold(
                2 * ALIGN_BYTES + DEFAULT_SPARE_BYTES,
                |sum, (_, _, size, _)| sum.checked_add(size.checked_next_multiple_of(ALIGN_BYTES)?),
            )?,
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
    #[error(
        "disk of {disk_size} bytes cannot hold {what} plus GPT: it needs at least {needed} bytes"
    )]
    TooSmall {
        /// Disk size.
        disk_size: u64,
        /// The partitions asked for, e.g. `two 1048576-byte slots`.
        what: String,
        /// The smallest disk that holds them.
        needed: u64,
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
    let align = ALIGN_BYTES / ss;
    let partitions = spec.partitions();
    if partitions.iter().any(|(_, _, size, _)| *size == 0) {
        return Err(InitError::Invalid(
            "partition sizes must be greater than zero".into(),
        ));
    }
    // Every partition aligned, plus the backup array (32 sectors at 512 B, 4 at 4 KiB) and
    // header.
    let needed = partitions
        .iter()
        .try_fold(align + 16384 / ss + 1, |sum, (_, _, size, _)| {
            sum.checked_add(size.div_ceil(ss).checked_next_multiple_of(align)?)
        })
        .ok_or_else(too_large)?;
    if disk_size / ss < needed {
        let what = if partitions.len() > 2 {
            format!(
                "an EFI system partition, two kernel partitions and two {}-byte slots",
                spec.slot_size
            )
        } else {
            format!("two {}-byte slots", spec.slot_size)
        };
        return Err(InitError::TooSmall {
            disk_size,
            what,
            needed: needed * ss,
        });
    }
    let types = partitions
        .iter()
        .map(|(_, guid, _, _)| {
            uuid::Uuid::from_str(guid)
                .map_err(|e| InitError::Invalid(format!("type GUID {guid}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

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
        let mut start = align;
        let mut esp_offset = None;
        for (n, ((label, _, size, attrs), guid)) in partitions.iter().zip(&types).enumerate() {
            let sectors = size.div_ceil(ss);
            let part_type = Type {
                guid: *guid,
                os: OperatingSystem::Custom("abupdate".into()),
            };
            disk.add_partition_at(label, n as u32 + 1, start, sectors, part_type, *attrs)
                .map_err(gpt_err)?;
            if label == ESP_LABEL {
                esp_offset = Some(start * ss);
            }
            start += sectors.next_multiple_of(align);
        }
        disk.write_inplace().map_err(gpt_err)?;
        drop(disk);
        if let (Some(chain), Some(offset)) = (&spec.boot_chain, esp_offset) {
            let esp = format_esp(chain, spec.sector_size, path)?;
            file.seek(SeekFrom::Start(offset)).map_err(io)?;
            file.write_all(&esp).map_err(io)?;
        }
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

/// The EFI system partition's bytes: a FAT file system made by `mkfs.vfat` (Debian's
/// `dosfstools`; it picks FAT16 or FAT32 from the size) holding the loader, copied by `mcopy`
/// (`mtools`, no mount needed), at the removable-media path firmware boots without any boot
/// entry. Why the tools and not a crate: the `fatfs` crate (0.3) writes directory entries that
/// `fsck.vfat` rejects, and firmware must be able to trust this file system.
///
/// The partition is built in `work` (a file next to the disk image, removed afterwards).
fn format_esp(chain: &BootChain, sector_size: u32, work: &Path) -> Result<Vec<u8>, InitError> {
    let image = work.with_extension("esp.tmp");
    let loader_file = work.with_extension("efi.tmp");
    let result = build_esp(chain, sector_size, &image, &loader_file);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&loader_file);
    result
}

fn build_esp(
    chain: &BootChain,
    sector_size: u32,
    image: &Path,
    loader_file: &Path,
) -> Result<Vec<u8>, InitError> {
    let path = image.display().to_string();
    let io = |source| InitError::Io {
        path: path.clone(),
        source,
    };
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .and_then(|f| f.set_len(chain.esp_size))
        .map_err(io)?;
    let run = |program: &str, args: &[&str]| -> Result<(), InitError> {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .map_err(|e| {
                InitError::Invalid(format!(
                    "cannot run {program} to make the EFI system partition ({e}); install \
                     Debian's dosfstools and mtools"
                ))
            })?;
        if !out.status.success() {
            return Err(InitError::Invalid(format!(
                "{program} failed making the EFI system partition: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    let sector = sector_size.to_string();
    run("mkfs.vfat", &["-n", "EFI-SYSTEM", "-S", &sector, &path])?;
    if let Some(loader) = &chain.loader {
        std::fs::write(loader_file, loader).map_err(io)?;
        run("mmd", &["-i", &path, "::/EFI", "::/EFI/BOOT"])?;
        let file = loader_file.display().to_string();
        run("mcopy", &["-i", &path, &file, "::/EFI/BOOT/BOOTX64.EFI"])?;
    }
    std::fs::read(image).map_err(io)
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

    #[test]
    fn boot_chain_layout_is_the_chromeos_order_with_attributes_on_the_slots_only() {
        let mut spec = InitSpec::new(8 << 20);
        spec.boot_chain = Some(BootChain {
            esp_size: DEFAULT_ESP_BYTES,
            kernel_size: 2 << 20,
            loader: None,
        });
        let parts = spec.partitions();
        let labels: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            labels,
            ["EFI-SYSTEM", "KERN-A", "ROOT-A", "KERN-B", "ROOT-B"]
        );
        let attrs: Vec<u64> = parts.iter().map(|p| p.3).collect();
        assert_eq!(attrs[0] | attrs[1] | attrs[3], 0);
        assert_eq!(attrs[2], SlotAttributes::new(2, 0, true).raw());
        // Default size: every partition aligned, two alignments, the spare room.
        let aligned: u64 = parts
            .iter()
            .map(|p| p.2.next_multiple_of(ALIGN_BYTES))
            .sum();
        assert_eq!(
            spec.effective_disk_size(),
            Some(aligned + 2 * ALIGN_BYTES + DEFAULT_SPARE_BYTES)
        );
    }
}
