//! The slot choice on the firmware side: find the A/B disk, read and validate its GPT, choose
//! the slot and spend its try, all through `abupdate-core` (the code `abupdate boot` runs); set
//! a slot aside whose kernel failed; read partitions for the kernel check.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use abupdate_core::attrs::SlotAttributes;
use abupdate_core::gpt::{Entry, SectorIo, Table, MIN_DISK_SECTORS};
use abupdate_core::layout::{self, SlotEntries, SlotLabels};
use abupdate_core::select;

use crate::firmware::{self, Disk, DiskError};

/// The slot labels the loader looks for (abupdate's defaults).
const LABELS: [&str; 2] = ["ROOT-A", "ROOT-B"];

/// What the loader chose.
pub struct Choice {
    /// Which slot (0 for the first label, 1 for the second).
    pub slot: usize,
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

/// The A/B disk: its validated GPT, the two slots, and the slots set aside during this boot.
pub struct AbDisk {
    disk: Disk,
    table: Table,
    slots: SlotEntries,
    n: usize,
    set_aside: [bool; 2],
}

/// Finds the A/B disk: the first whole disk whose GPT names both slot labels.
pub fn find() -> Result<AbDisk, String> {
    let labels = SlotLabels::new(LABELS.iter().map(|l| l.to_string()).collect())
        .map_err(|e| format!("slot labels: {e}"))?;
    let mut refusals: Vec<String> = Vec::new();
    for (n, disk) in firmware::whole_disks().into_iter().enumerate() {
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
        return Ok(AbDisk {
            disk,
            table,
            slots,
            n,
            set_aside: [false; 2],
        });
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

impl AbDisk {
    fn attrs(&self) -> Vec<SlotAttributes> {
        let entries = self.table.entries();
        self.slots
            .index
            .iter()
            .map(|&i| SlotAttributes::from_raw(entries[i].attributes))
            .collect()
    }

    /// Chooses the slot to boot among those not set aside in this boot and persists the
    /// spent try (`select::boot_attempt`, the core's crash-safe write plan).
    pub fn choose_and_spend_try(&mut self) -> Result<Choice, String> {
        let n = self.n;
        let attrs = self.attrs();
        // A slot set aside in this boot takes no part in the choice (as cgptlib skips a
        // kernel that failed to verify), whatever its attributes still say.
        let candidates: Vec<SlotAttributes> = attrs
            .iter()
            .zip(self.set_aside)
            .map(|(&a, aside)| if aside { SlotAttributes::default() } else { a })
            .collect();
        let Some(choice) = select::boot_attempt(&candidates) else {
            let state: Vec<String> = LABELS
                .iter()
                .zip(&attrs)
                .zip(self.set_aside)
                .map(|((l, a), aside)| {
                    format!(
                        "{l} {a}{}",
                        if aside { " (failed in this boot)" } else { "" }
                    )
                })
                .collect();
            return Err(format!("disk {n}: no bootable slot ({})", state.join(", ")));
        };
        let bytes_written = self.write_attributes(choice.index, choice.updated)?;
        let index = self.slots.index[choice.index];
        Ok(Choice {
            slot: choice.index,
            label: LABELS[choice.index].to_string(),
            partuuid: self.table.entries()[index]
                .unique_guid
                .hyphenated()
                .to_string(),
            before: attrs[choice.index],
            after: choice.updated,
            bytes_written,
        })
    }

    /// A slot whose kernel failed to verify, load or start: marked bad as cgptlib's firmware
    /// does (`select::mark_bad_firmware`: priority and tries cleared unless it is committed)
    /// and set aside for the rest of this boot. Returns the attributes it now has.
    pub fn set_aside(&mut self, slot: usize) -> Result<SlotAttributes, String> {
        self.set_aside[slot] = true;
        let now = self.attrs()[slot];
        let bad = select::mark_bad_firmware(now);
        if bad != now {
            self.write_attributes(slot, bad)?;
        }
        Ok(bad)
    }

    fn write_attributes(&mut self, slot: usize, new: SlotAttributes) -> Result<u64, String> {
        let n = self.n;
        let changes = vec![(self.slots.index[slot], new.raw())];
        let plan = self
            .table
            .plan_attributes(&changes)
            .map_err(|e| format!("disk {n}: {e}"))?;
        let bytes = plan.bytes(self.table.sector_size());
        #[cfg(not(feature = "power-cut-test"))]
        let executed = self.table.execute(&mut self.disk, plan);
        #[cfg(feature = "power-cut-test")]
        let executed = self.table.execute(&mut PausingIo(&mut self.disk), plan);
        executed.map_err(|e| format!("disk {n}: {e}"))?;
        Ok(bytes)
    }

    /// The partition entry of slot `slot`'s root (`kernel == false`) or kernel partition.
    pub fn partition(&self, slot: usize, kernel: bool) -> Option<Entry> {
        let index = if kernel {
            self.slots.kernel?[slot]
        } else {
            self.slots.index[slot]
        };
        Some(self.table.entries()[index].clone())
    }

    /// A partition's length in bytes.
    pub fn partition_len(&self, part: &Entry) -> u64 {
        (part.last_lba - part.first_lba + 1) * u64::from(self.disk.block_size)
    }

    /// Reads `len` bytes at byte `offset` of a partition (whole blocks read around them),
    /// feeding them to `sink` in pieces of at most 4 MiB.
    pub fn read_partition(
        &self,
        part: &Entry,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String> {
        const PIECE: u64 = 4 << 20;
        let block = u64::from(self.disk.block_size);
        let part_len = self.partition_len(part);
        if offset.checked_add(len).is_none_or(|end| end > part_len) {
            return Err(format!(
                "{}: bytes {offset}..{} are outside its {part_len} bytes",
                part.name,
                offset.saturating_add(len)
            ));
        }
        let mut at = offset;
        let end = offset + len;
        let mut buf = Vec::new();
        while at < end {
            let first = at / block;
            let want = (end - at).min(PIECE);
            let skip = (at % block) as usize;
            let blocks = (skip as u64 + want).div_ceil(block);
            buf.resize((blocks * block) as usize, 0);
            self.disk
                .read(part.first_lba + first, &mut buf)
                .map_err(|e| format!("{}: {e}", part.name))?;
            sink(&buf[skip..skip + want as usize]);
            at += want;
        }
        Ok(())
    }
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
