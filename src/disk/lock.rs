//! Which files name the same storage as an open disk, so that the abupdate lock (a `flock` on
//! each of them) holds whatever path a second process names the disk by.
//!
//! `flock` locks an inode, so every path to the same node (symlinks, `/dev/disk/by-*`, hard
//! links) is covered by the disk's own lock. Across inodes this module adds, from sysfs: a loop
//! device's backing file, every loop device backed by an image file, and a partition's whole
//! disk (and that disk's backing file). Not covered: a copy of the image, device-mapper or
//! NBD stacks, a backing file outside this mount namespace, another machine.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Opens (read-only, which is all `flock` needs) every other file naming the storage of `disk`,
/// with the path each was opened from. Best effort: what sysfs does not show is not found.
pub fn aliases(disk: &File) -> Vec<(PathBuf, File)> {
    let mut out = Vec::new();
    let Ok(meta) = disk.metadata() else {
        return out;
    };
    let mut block_dirs = Vec::new();
    if meta.file_type().is_block_device() {
        let dir = sysfs_dir(meta.rdev());
        // A partition's sysfs directory sits inside its disk's.
        if dir.join("partition").exists() {
            if let Some(parent) = parent_dir(&dir) {
                out.extend(open_block_node(&parent));
                block_dirs.push(parent);
            }
        }
        block_dirs.push(dir);
    } else if meta.is_file() {
        out.extend(loops_backed_by(meta.dev(), meta.ino()));
    }
    for dir in block_dirs {
        let Some(backing) = backing_file(&dir) else {
            continue;
        };
        if let Ok(file) = File::open(&backing) {
            if file.metadata().is_ok_and(|m| m.is_file()) {
                out.push((backing, file));
            }
        }
    }
    out
}

/// The sysfs directory of a partition's whole disk.
fn parent_dir(partition: &Path) -> Option<PathBuf> {
    Some(partition.canonicalize().ok()?.parent()?.to_path_buf())
}

/// `/sys/dev/block/MAJ:MIN` of a device number.
fn sysfs_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

/// The backing file path of a loop device's sysfs directory (absent for other devices and
/// unbound loops).
fn backing_file(dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join("loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Every bound loop device whose backing file is the inode `(dev, ino)`.
fn loops_backed_by(dev: u64, ino: u64) -> Vec<(PathBuf, File)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| {
            backing_file(dir)
                .and_then(|b| std::fs::metadata(b).ok())
                .is_some_and(|m| m.dev() == dev && m.ino() == ino)
        })
        .filter_map(|dir| open_block_node(&dir))
        .collect()
}

/// Opens `/dev/NAME` for the sysfs directory `.../NAME`, if that node is this device.
fn open_block_node(dir: &Path) -> Option<(PathBuf, File)> {
    let want = std::fs::read_to_string(dir.join("dev")).ok()?;
    let node = Path::new("/dev").join(dir.file_name()?);
    let file = File::open(&node).ok()?;
    let meta = file.metadata().ok()?;
    let rdev = meta.rdev();
    let is_it = meta.file_type().is_block_device()
        && want.trim() == format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    is_it.then_some((node, file))
}
