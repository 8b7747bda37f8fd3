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

use std::sync::Mutex;

use crate::disk::blockdev::{BlockDevice, FileDevice, MemDevice, RecordingDevice};
use crate::disk::sys::{self, AlignedBuf};

/// Byte I/O on one open slot, shared between the writer and the read-back thread.
pub trait SlotIo: Sync {
    /// Writes `buf` at `offset` within the slot.
    fn write_at(&self, slot: &str, buf: &[u8], offset: u64) -> Result<(), SlotIoError>;
    /// Reads into `buf` at `offset` within the slot.
    fn read_at(&self, slot: &str, buf: &mut [u8], offset: u64) -> Result<(), SlotIoError>;
    /// Makes every write durable.
    fn sync(&self, slot: &str) -> Result<(), SlotIoError>;
    /// What is written to, for messages.
    fn describe(&self) -> String;
    /// Whether writes bypass the page cache.
    fn is_direct(&self) -> bool;
}

/// A disk that can open one of its slots for writing, and say where it lives.
pub trait SlotBacking: BlockDevice {
    /// Opens the byte range `offset..offset+len` (slot `slot`, partition `partition`).
    fn open_slot(
        &mut self,
        slot: &str,
        partition: u32,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn SlotIo + '_>, SlotIoError>;
    /// The path and whether it is a block device, when the disk is a real one (used to find
    /// the running slot on a live system).
    fn location(&self) -> Option<(&Path, bool)>;
    /// A read-only view of bytes `offset..offset+len` of the disk (the running slot, for an
    /// adaptive install), owned and independent of this device, so it can be read while a
    /// slot is open for writing. It can only read: nothing through it can change the slot.
    fn read_only_view(&mut self, offset: u64, len: u64) -> io::Result<Box<dyn ReadOnlyView>>;
}

/// Read access to one byte range of a disk ([`SlotBacking::read_only_view`]).
pub trait ReadOnlyView: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` within the range.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Length of the range.
    fn len(&self) -> u64;
    /// Whether the range is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn out_of_view(offset: u64, want: usize, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("read of {want} bytes at {offset} is outside the {len}-byte view"),
    )
}

/// A byte range of a disk opened read-only (`O_RDONLY`).
struct FileView {
    file: File,
    base: u64,
    len: u64,
}

impl ReadOnlyView for FileView {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(out_of_view(offset, buf.len(), self.len));
        }
        self.file.read_exact_at(buf, self.base + offset)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// A copy of a byte range of an in-process device.
struct CopiedView(Vec<u8>);

impl ReadOnlyView for CopiedView {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| out_of_view(offset, buf.len(), self.0.len() as u64))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

impl SlotBacking for FileDevice {
    fn open_slot(
        &mut self,
        slot: &str,
        partition: u32,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn SlotIo + '_>, SlotIoError> {
        let node = crate::disk::slots::partition_device_path(self.path(), partition);
        Ok(Box::new(SlotTarget::open_for_write(
            slot,
            self.path(),
            self.is_block_device(),
            &node,
            offset,
            len,
        )?))
    }
    fn location(&self) -> Option<(&Path, bool)> {
        Some((self.path(), self.is_block_device()))
    }
    fn read_only_view(&mut self, offset: u64, len: u64) -> io::Result<Box<dyn ReadOnlyView>> {
        if offset.saturating_add(len) > self.len() {
            return Err(out_of_view(offset, 0, self.len()));
        }
        let file = File::open(self.path())?;
        Ok(Box::new(FileView {
            file,
            base: offset,
            len,
        }))
    }
}

/// A slot inside an in-process device (memory image, recording layer): every access goes
/// through the device, bounded to the slot.
pub struct DeviceSlot<'a, D> {
    dev: Mutex<&'a mut D>,
    base: u64,
    len: u64,
}

impl<'a, D: BlockDevice> DeviceSlot<'a, D> {
    /// The slot at `base..base+len` of `dev`.
    pub fn new(dev: &'a mut D, base: u64, len: u64) -> Self {
        Self {
            dev: Mutex::new(dev),
            base,
            len,
        }
    }

    fn bounded(&self, slot: &str, offset: u64, len: usize) -> Result<u64, SlotIoError> {
        bounded_offset(slot, self.base, self.len, offset, len)
    }

    fn io_err(
        &self,
        what: &'static str,
        slot: &str,
        offset: u64,
        source: io::Error,
    ) -> SlotIoError {
        SlotIoError::Io {
            what,
            slot: slot.into(),
            path: PathBuf::from("<device>"),
            offset,
            source,
        }
    }
}

impl<D: BlockDevice + Send> SlotIo for DeviceSlot<'_, D> {
    fn write_at(&self, slot: &str, buf: &[u8], offset: u64) -> Result<(), SlotIoError> {
        let at = self.bounded(slot, offset, buf.len())?;
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        dev.write_at(buf, at)
            .map_err(|e| self.io_err("writing", slot, offset, e))
    }
    fn read_at(&self, slot: &str, buf: &mut [u8], offset: u64) -> Result<(), SlotIoError> {
        let at = self.bounded(slot, offset, buf.len())?;
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        dev.read_at(buf, at)
            .map_err(|e| self.io_err("reading back", slot, offset, e))
    }
    fn sync(&self, slot: &str) -> Result<(), SlotIoError> {
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        dev.flush().map_err(|e| self.io_err("flushing", slot, 0, e))
    }
    fn describe(&self) -> String {
        format!("in-process device at byte {}", self.base)
    }
    fn is_direct(&self) -> bool {
        false
    }
}

/// A device that lives in this process (memory, or a recording layer over one), so a slot is
/// simply a byte range of it: there is no partition node to open.
pub trait InProcessDevice: BlockDevice + Send {}

impl InProcessDevice for MemDevice {}
impl<D: BlockDevice + Send> InProcessDevice for RecordingDevice<D> {}

impl<D: InProcessDevice> SlotBacking for D {
    fn open_slot(
        &mut self,
        _slot: &str,
        _partition: u32,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn SlotIo + '_>, SlotIoError> {
        Ok(Box::new(DeviceSlot::new(self, offset, len)))
    }
    fn location(&self) -> Option<(&Path, bool)> {
        None
    }
    fn read_only_view(&mut self, offset: u64, len: u64) -> io::Result<Box<dyn ReadOnlyView>> {
        let len_usize = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "view too large"))?;
        let mut bytes = vec![0u8; len_usize];
        self.read_at(&mut bytes, offset)?;
        Ok(Box::new(CopiedView(bytes)))
    }
}

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
    /// The partition is mounted or held open exclusively by another program.
    #[error("slot {slot} ({path}) is in use (mounted or opened exclusively by another program); refusing to write it")]
    Busy {
        /// Slot label.
        slot: String,
        /// Partition node.
        path: PathBuf,
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

/// The absolute offset of an access of `len` bytes at `offset` within a slot of `slot_len`
/// bytes starting at `base`, or an error if any byte would fall outside the slot.
fn bounded_offset(
    slot: &str,
    base: u64,
    slot_len: u64,
    offset: u64,
    len: usize,
) -> Result<u64, SlotIoError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= slot_len => Ok(base + offset),
        _ => Err(SlotIoError::OutOfBounds {
            slot: slot.into(),
            offset,
            len: len as u64,
            slot_len,
        }),
    }
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

impl SlotIo for SlotTarget {
    fn write_at(&self, slot: &str, buf: &[u8], offset: u64) -> Result<(), SlotIoError> {
        SlotTarget::write_at(self, slot, buf, offset)
    }
    fn read_at(&self, slot: &str, buf: &mut [u8], offset: u64) -> Result<(), SlotIoError> {
        SlotTarget::read_at(self, slot, buf, offset)
    }
    fn sync(&self, slot: &str) -> Result<(), SlotIoError> {
        SlotTarget::sync(self, slot)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn is_direct(&self) -> bool {
        self.direct
    }
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
        // On a partition node, O_EXCL makes the kernel refuse (EBUSY) while the partition is
        // mounted or held exclusively by another program, so a slot in use is never written.
        let exclusive = base == 0 && disk_is_block_device;
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            let mut flags = 0;
            if direct {
                flags |= libc::O_DIRECT;
            }
            if exclusive {
                flags |= libc::O_EXCL;
            }
            o.custom_flags(flags);
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
            Err(source) if source.raw_os_error() == Some(libc::EBUSY) => {
                return Err(SlotIoError::Busy {
                    slot: slot.into(),
                    path,
                })
            }
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
        bounded_offset(slot, self.base, self.len, offset, len)
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
