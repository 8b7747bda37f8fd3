//! Which slot is running: the one fact the install and commit paths must never get wrong.
//!
//! Sources, in order of trust: an explicit `--slot`; the kernel command line
//! (`root=PARTUUID=…` or `abupdate.slot=LABEL`); the marker file the initramfs hook writes
//! (`/run/abupdate-slot`); and the device number of the mounted root filesystem compared
//! with each slot's partition device node.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::disk::blockdev::BlockDevice;
use crate::disk::slots::{partition_device_path, AbDisk, Slot, SlotError};
use crate::install::slotio::SlotBacking;

/// How the running slot was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunningSource {
    /// Given on the command line.
    Explicit,
    /// `root=PARTUUID=` on the kernel command line.
    KernelPartuuid,
    /// `abupdate.slot=` on the kernel command line.
    KernelSlotName,
    /// `abupdate.loader=` with `abupdate.slot=` on the kernel command line: abupdate's UEFI
    /// loader chose this slot, spent its try and started its kernel.
    Loader,
    /// The initramfs hook's marker file.
    MarkerFile,
    /// The root filesystem's device is this slot's partition.
    RootDevice,
    /// Not the live disk (an image being prepared): the slot that would boot next.
    NextBoot,
}

impl RunningSource {
    /// The kebab-case name used in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RunningSource::Explicit => "explicit",
            RunningSource::KernelPartuuid => "kernel-partuuid",
            RunningSource::KernelSlotName => "kernel-slot-name",
            RunningSource::Loader => "chosen-by-loader",
            RunningSource::MarkerFile => "marker-file",
            RunningSource::RootDevice => "root-device",
            RunningSource::NextBoot => "next-boot",
        }
    }
}

/// Default path of the marker file the initramfs hook writes into the new root's `/run`.
pub const MARKER_FILE: &str = "/run/abupdate-slot";

/// The slot abupdate's UEFI loader chose, when the kernel command line says so: the loader
/// passes `abupdate.loader=1 abupdate.slot=LABEL` (and `root=PARTUUID=`) to the kernel it
/// starts, after it spent that slot's try.
pub fn loader_choice(cmdline: &str, slots: &[Slot]) -> Option<usize> {
    let words = || cmdline.split_whitespace();
    words()
        .any(|w| w.starts_with("abupdate.loader="))
        .then_some(())?;
    words()
        .filter_map(|w| w.strip_prefix("abupdate.slot="))
        .find_map(|name| slots.iter().position(|s| s.name == name))
}

/// Finds the running slot from the kernel command line text, if it names one of `slots`.
pub fn from_cmdline(cmdline: &str, slots: &[Slot]) -> Option<(usize, RunningSource)> {
    if let Some(i) = loader_choice(cmdline, slots) {
        return Some((i, RunningSource::Loader));
    }
    for word in cmdline.split_whitespace() {
        if let Some(uuid) = word.strip_prefix("root=PARTUUID=") {
            if let Some(i) = slots
                .iter()
                .position(|s| s.partuuid().to_string().eq_ignore_ascii_case(uuid))
            {
                return Some((i, RunningSource::KernelPartuuid));
            }
        }
        if let Some(name) = word.strip_prefix("abupdate.slot=") {
            if let Some(i) = slots.iter().position(|s| s.name == name) {
                return Some((i, RunningSource::KernelSlotName));
            }
        }
    }
    None
}

/// Finds the running slot on this machine, for the disk at `disk_path`. `None` when the disk
/// is not the one the system runs from (e.g. a disk image being prepared).
pub fn detect(
    disk_path: &Path,
    disk_is_block_device: bool,
    slots: &[Slot],
) -> Option<(usize, RunningSource)> {
    if let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") {
        if let Some(found) = from_cmdline(&cmdline, slots) {
            return Some(found);
        }
    }
    if !disk_is_block_device {
        return None;
    }
    if let Ok(marker) = std::fs::read_to_string(MARKER_FILE) {
        let name = marker.trim();
        if let Some(i) = slots.iter().position(|s| s.name == name) {
            return Some((i, RunningSource::MarkerFile));
        }
    }
    let root_dev = std::fs::metadata("/").ok()?.dev();
    slots
        .iter()
        .position(|s| {
            std::fs::metadata(partition_device_path(disk_path, s.partition()))
                .map(|m| m.rdev() == root_dev)
                .unwrap_or(false)
        })
        .map(|i| (i, RunningSource::RootDevice))
}

/// The running slot and how it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Index into the disk's slots.
    pub index: usize,
    /// How it was found.
    pub source: RunningSource,
}

/// What [`find`] answers when the running slot is neither named nor detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Nothing: the caller asks for `--slot` (manual slot operations, `status`).
    Nothing,
    /// The slot that boots next, as when preparing a disk image (install, check, update).
    NextBoot,
}

/// The one place the running slot is found: the slot named by `explicit`, else the one
/// [`detect`] finds on this machine for `disk`, else the `fallback`.
pub fn find<D: BlockDevice + SlotBacking>(
    disk: &AbDisk<D>,
    slots: &[Slot],
    explicit: Option<&str>,
    fallback: Fallback,
) -> Result<Option<Running>, SlotError> {
    if let Some(name) = explicit {
        return Ok(Some(Running {
            index: disk.slot_index(slots, name)?,
            source: RunningSource::Explicit,
        }));
    }
    let detected = disk
        .dev
        .location()
        .and_then(|(path, is_block)| detect(path, is_block, slots));
    if let Some((index, source)) = detected {
        return Ok(Some(Running { index, source }));
    }
    Ok(match fallback {
        Fallback::Nothing => None,
        Fallback::NextBoot => {
            let attrs: Vec<_> = slots.iter().map(|s| s.attrs).collect();
            crate::select::next_slot(&attrs).map(|index| Running {
                index,
                source: RunningSource::NextBoot,
            })
        }
    })
}

/// The report `status` shows: [`AbDisk::status`] with each slot's recorded version and the
/// running slot (named by `explicit`, else detected; none on a disk image) and how it was
/// found. The CLI's `status` and the D-Bus service's `Status`/`Slots` both come from here.
pub fn status_report<D: BlockDevice + SlotBacking>(
    disk: &mut AbDisk<D>,
    explicit: Option<&str>,
) -> Result<crate::disk::slots::Status, SlotError> {
    let mut report = disk.status()?;
    let slots = disk.slots()?;
    let found = find(disk, &slots, explicit, Fallback::Nothing)?;
    let sector_size = disk.gpt.sector_size();
    for (i, slot) in slots.iter().enumerate() {
        report.slots[i].running = found.as_ref().is_some_and(|r| r.index == i);
        report.slots[i].version =
            crate::disk::record::read_record(&mut disk.dev, slot, sector_size).map(|r| r.version);
    }
    report.running = found.as_ref().map(|r| slots[r.index].name.clone());
    report.running_source = found.map(|r| r.source.as_str());
    Ok(report)
}
