//! Writing and reading back the target slot's bytes.
//!
//! On a block device the target partition's own device node is opened (`/dev/vda3`,
//! `/dev/loop0p2`) after checking in sysfs that it covers exactly the slot: the kernel then
//! bounds every write to that partition, so no bug here can touch the running slot. A disk
//! image file is opened as a whole, and [`SlotTarget`] bounds every access to the slot itself.
//! `O_DIRECT` is used where the file system or device takes it, so writes skip the page cache
//! and the read-back really reads the device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::{self, AlignedBuf};

/// Alignment used for direct I/O buffers and transfer sizes (covers 512 and 4096 sectors).
pub const DIRECT_ALIGN: usize = 4096;

/// An open slot: a file plus the byte range of the slot inside it.
#[derive(Debug)]
pub struct SlotTarget {
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    direct: bool,
}

/// Errors of slot I/O.
#[derive(Debug, thiserror::Error)]
pub enum SlotIoError {
    /// Opening the slot failed.
    #[error("cannot open slot {slot} at {path}: {source}")]
    Open {
        /// Slot label.
        slot: String,
        /// Path opened.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// A read or write failed.
    #[error("{what} slot {slot} at byte offset {offset} of {path}: {source}")]
    Io {
        /// Reading, writing, flushing.
        what: &'static str,
        /// Slot label.
        slot: String,
        /// Path.
        path: PathBuf,
        /// Byte offset within the slot.
        offset: u64,
        /// OS error.
        source: io::Error,
    },
    /// An access outside the slot (a bug guard: never expected).
    #[error("refusing access of {len} bytes at offset {offset}: outside slot {slot} of {slot_len} bytes")]
    OutOfBounds {
        /// Slot label.
        slot: String,
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: u64,
        /// Slot length.
        slot_len: u64,
    },
}

fn sysfs_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether block device node `node` is exactly the byte range `offset..offset+len` of its disk
/// (sysfs reports start and size in 512-byte units whatever the sector size).
fn partition_node_matches(node: &Path, offset: u64, len: u64) -> bool {
    let Ok(meta) = std::fs::metadata(node) else {
        return false;
    };
    if !meta.file_type().is_block_device() {
        return false;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    matches!(
        (sysfs_u64(&sys.join("start")), sysfs_u64(&sys.join("size"))),
        (Some(start), Some(size)) if start * 512 == offset && size * 512 == len
    )
}

impl SlotTarget {
    /// Opens slot `slot` (byte range `offset..offset+len` of `disk`) for writing. For a block
    /// device, `partition_node` is used when sysfs confirms it is exactly that range.
    pub fn open_for_write(
        slot: &str,
        disk: &Path,
        disk_is_block_device: bool,
        partition_node: &Path,
        offset: u64,
        len: u64,
    ) -> Result<Self, SlotIoError> {
        let (path, base) =
            if disk_is_block_device && partition_node_matches(partition_node, offset, len) {
                (partition_node.to_path_buf(), 0)
            } else {
                (disk.to_path_buf(), offset)
            };
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            // tmpfs and some FUSE file systems refuse O_DIRECT with EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open(false).map_err(|source| SlotIoError::Open {
                    slot: slot.into(),
                    path: path.clone(),
                    source,
                })?,
                false,
            ),
            Err(source) => {
                return Err(SlotIoError::Open {
                    slot: slot.into(),
                    path,
                    source,
                })
            }
        };
        Ok(Self {
            file,
            path,
            base,
            len,
            direct,
        })
    }

    /// Whether direct I/O is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path written to (partition node or disk image).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, slot: &str, offset: u64, len: usize) -> Result<u64, SlotIoError> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(SlotIoError::OutOfBounds {
                slot: slot.into(),
                offset,
                len: len as u64,
                slot_len: self.len,
            }),
        }
    }

    /// Writes `buf` at `offset` within the slot. With direct I/O, `buf` must be aligned and a
    /// multiple of [`DIRECT_ALIGN`] long (use [`AlignedBuf`]).
    pub fn write_at(&self, slot: &str, buf: &[u8], offset: u64) -> Result<(), SlotIoError> {
        let at = self.check(slot, offset, buf.len())?;
        self.file
            .write_all_at(buf, at)
            .map_err(|source| SlotIoError::Io {
                what: "writing",
                slot: slot.into(),
                path: self.path.clone(),
                offset,
                source,
            })
    }

    /// Reads into `buf` at `offset` within the slot (same alignment rules as writing).
    pub fn read_at(&self, slot: &str, buf: &mut [u8], offset: u64) -> Result<(), SlotIoError> {
        let at = self.check(slot, offset, buf.len())?;
        self.file
            .read_exact_at(buf, at)
            .map_err(|source| SlotIoError::Io {
                what: "reading back",
                slot: slot.into(),
                path: self.path.clone(),
                offset,
                source,
            })
    }

    /// Makes every write durable.
    pub fn sync(&self, slot: &str) -> Result<(), SlotIoError> {
        self.file.sync_data().map_err(|source| SlotIoError::Io {
            what: "flushing",
            slot: slot.into(),
            path: self.path.clone(),
            offset: 0,
            source,
        })?;
        if !self.direct {
            // So the read-back that follows sees the device, not cached pages.
            let _ = sys::drop_page_cache(&self.file, self.base, self.len);
        }
        Ok(())
    }

    /// A buffer suitable for this target's I/O.
    pub fn buffer(len: usize) -> AlignedBuf {
        AlignedBuf::new(len.next_multiple_of(DIRECT_ALIGN), DIRECT_ALIGN)
    }
}
