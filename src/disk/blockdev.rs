//! Block devices as abupdate sees them: positioned reads and writes plus an explicit flush.
//!
//! The GPT writer is written against [`BlockDevice`] so the same code runs on a disk image, a
//! loop device, a real disk, an in-memory image in unit tests, and the recording device the
//! crash-consistency harness replays.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::disk::sys;

/// Positioned I/O on a disk with a known logical sector size.
pub trait BlockDevice {
    /// Logical sector size in bytes (512 or 4096).
    fn sector_size(&self) -> u32;
    /// Total size in bytes.
    fn len(&self) -> u64;
    /// Whether the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier write durable (a write barrier: `fdatasync` on real devices).
    fn flush(&mut self) -> io::Result<()>;
}

/// A disk opened from a path: a regular file (disk image) or a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    sector_size: u32,
    len: u64,
    is_block_device: bool,
    /// The other files naming this storage, kept open while their locks are held.
    lock_guards: std::sync::OnceLock<Vec<(PathBuf, File)>>,
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path could not be opened or inspected.
    #[error("cannot open disk {path}: {source}")]
    Io {
        /// The disk path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is not a disk image or block device")]
    NotADisk {
        /// The path given.
        path: PathBuf,
    },
    /// The block device is read-only.
    #[error("{path} is a read-only device; nothing can be written to it")]
    ReadOnly {
        /// The disk path.
        path: PathBuf,
    },
    /// A sector size other than 512 or 4096.
    #[error("{path}: unsupported logical sector size {size} (expected 512 or 4096)")]
    BadSectorSize {
        /// The disk path.
        path: PathBuf,
        /// The size found or given.
        size: u32,
    },
    /// Another process holds the disk lock.
    #[error("{path} is locked by another abupdate process ({holder})")]
    Locked {
        /// The disk path.
        path: PathBuf,
        /// Who holds it, as far as /proc/locks tells.
        holder: String,
    },
}

impl FileDevice {
    /// Opens `path` for reading (and writing when `writable`). For a regular file the sector
    /// size is `sector_size` or 512; for a block device it is read from the kernel and a
    /// conflicting `sector_size` is an error.
    pub fn open(path: &Path, writable: bool, sector_size: Option<u32>) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let file_type = meta.file_type();
        if writable && file_type.is_block_device() && sys::is_read_only(&file).map_err(io_err)? {
            return Err(OpenError::ReadOnly {
                path: path.to_path_buf(),
            });
        }
        let (len, detected, is_block_device) = if file_type.is_block_device() {
            let len = sys::block_device_size(&file).map_err(io_err)?;
            let sector = sys::logical_sector_size(&file).map_err(io_err)?;
            (len, Some(sector), true)
        } else if file_type.is_file() {
            (meta.len(), None, false)
        } else {
            return Err(OpenError::NotADisk {
                path: path.to_path_buf(),
            });
        };
        let size = match (detected, sector_size) {
            (Some(found), Some(given)) if found != given => {
                return Err(OpenError::BadSectorSize {
                    path: path.to_path_buf(),
                    size: given,
                })
            }
            (Some(found), _) => found,
            (None, given) => given.unwrap_or(512),
        };
        if size != 512 && size != 4096 {
            return Err(OpenError::BadSectorSize {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            sector_size: size,
            len,
            is_block_device,
            lock_guards: Default::default(),
        })
    }

    /// Takes the exclusive abupdate lock on this disk, so two abupdate processes never
    /// interleave writes: a `flock` on the disk node or image file and on every other file
    /// naming the same storage ([`crate::disk::lock`]: a loop device and its backing file, a
    /// partition's disk). Held until the device is dropped; on error, drop the device.
    pub fn lock(&self) -> Result<(), OpenError> {
        if self.lock_guards.get().is_some() {
            return Ok(());
        }
        let aliases = crate::disk::lock::aliases(&self.file);
        let mut set: Vec<(&Path, &File)> = std::iter::once((self.path.as_path(), &self.file))
            .chain(aliases.iter().map(|(p, f)| (p.as_path(), f)))
            .collect();
        // One order in every process (by inode), so of two processes racing for overlapping
        // sets one wins the first common file instead of each taking a part and both failing;
        // an inode reached twice is locked once (a second flock would conflict with our own).
        set.sort_by_key(|(_, f)| inode_key(f));
        set.dedup_by_key(|(_, f)| inode_key(f));
        for (path, file) in set {
            match sys::try_lock_exclusive(file) {
                Ok(true) => {}
                Ok(false) => {
                    let mut holder = lock_holder(file);
                    if path != self.path {
                        holder.push_str(&format!(", through {}", path.display()));
                    }
                    return Err(OpenError::Locked {
                        path: self.path.clone(),
                        holder,
                    });
                }
                Err(source) => {
                    return Err(OpenError::Io {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let _ = self.lock_guards.set(aliases);
        Ok(())
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device (as opposed to a disk image file).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockDevice for FileDevice {
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A disk held in memory, for unit tests and crash replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDevice {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Logical sector size.
    pub sector_size: u32,
}

impl MemDevice {
    /// A zeroed disk of `len` bytes.
    pub fn new(len: usize, sector_size: u32) -> Self {
        Self {
            data: vec![0; len],
            sector_size,
        }
    }
}

/// Identity of a file for lock ordering: (device, inode); (0, 0) if fstat fails.
fn inode_key(file: &File) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
}

/// Names the process holding a flock on `file`, from /proc/locks (best effort).
fn lock_holder(file: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return "holder unknown".into();
    };
    let inode = meta.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        if fields.len() >= 6
            && fields[1] == "FLOCK"
            && fields[5].rsplit(':').next() == Some(inode.as_str())
        {
            let pid = fields[4];
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            return format!("held by pid {pid} {}: {cmdline}", comm.trim());
        }
    }
    "holder unknown".into()
}

fn out_of_range(offset: u64, len: usize, size: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("access of {len} bytes at offset {offset} beyond the end of a {size}-byte device"),
    )
}

impl BlockDevice for MemDevice {
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset)
            .map_err(|_| out_of_range(offset, buf.len(), self.data.len()))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| out_of_range(offset, buf.len(), self.data.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let size = self.data.len();
        let start = usize::try_from(offset).map_err(|_| out_of_range(offset, buf.len(), size))?;
        let dst = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get_mut(start..end))
            .ok_or_else(|| out_of_range(offset, buf.len(), size))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One operation seen by a [`RecordingDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedOp {
    /// A write of these bytes at this offset.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A flush (write barrier).
    Flush,
}

/// Wraps a device and logs every write and flush, so a harness can replay each prefix of the
/// log (a power cut after each operation) and torn variants of each write.
#[derive(Debug)]
pub struct RecordingDevice<D> {
    /// The wrapped device, which receives every operation too.
    pub inner: D,
    /// Operations in the order issued.
    pub log: Vec<RecordedOp>,
}

impl<D: BlockDevice> RecordingDevice<D> {
    /// Starts recording on top of `inner`.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            log: Vec::new(),
        }
    }
}

impl<D: BlockDevice> BlockDevice for RecordingDevice<D> {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.push(RecordedOp::Write {
            offset,
            data: buf.to_vec(),
        });
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.push(RecordedOp::Flush);
        self.inner.flush()
    }
}
