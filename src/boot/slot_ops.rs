//! The slot operations: mark-good, mark-bad, rollback and set-attributes, and the one gate
//! every attribute change passes ([`apply`]): it may not take away the last bootable or the
//! last committed slot, and it may not make a slot bootable or successful whose content does
//! not match its slot record, unless forced. The health commit ([`super::health`]) and the
//! CLI call these; nothing else changes slot attributes after boot.

use serde::Serialize;

use crate::attrs::SlotAttributes;
use crate::disk::blockdev::BlockDevice;
use crate::disk::slots::{AbDisk, SlotError};
use crate::select::{self, RollbackRefusal};

use super::health::CheckOutcome;

/// Errors of slot operations.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Reading or writing the slots failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Rollback refused: the other slot is not known good.
    #[error("refusing to roll back to {slot}: {reason} ({state})")]
    RollbackRefused {
        /// The slot that would boot.
        slot: String,
        /// Why.
        reason: &'static str,
        /// Its attributes.
        state: String,
    },
    /// A health check failed; the slot has been marked bad.
    #[error("health check failed: {check}: {outcome}; {slot} marked bad")]
    CheckFailed {
        /// The check command.
        check: String,
        /// What happened.
        outcome: CheckOutcome,
        /// The slot marked bad.
        slot: String,
    },
    /// The change (marking the slot bad, or setting its attributes) would leave the device
    /// with no bootable slot, or with no committed slot to fall back to.
    #[error("refusing to change {slot}: {lost} ({state}); use --force to do it anyway")]
    LastBootableSlot {
        /// The slot.
        slot: String,
        /// What would be lost.
        lost: select::BootPathLoss,
        /// All slots' states.
        state: String,
    },
    /// A health check failed on the only bootable (or the only committed) slot, which was
    /// therefore left as it was.
    #[error("health check failed: {check}: {outcome}; {slot} NOT marked bad: {lost}")]
    CheckFailedOnLastSlot {
        /// The check command.
        check: String,
        /// What happened.
        outcome: CheckOutcome,
        /// The slot.
        slot: String,
        /// Why it was left: what marking it bad would have lost.
        lost: select::BootPathLoss,
    },
    /// A health check failed on a committed (successful) slot, which was left as it was.
    #[error("health check failed: {check}: {outcome}; {slot} NOT marked bad: it is committed ({state}), not on trial; pass --mark-bad-committed to fall back anyway")]
    CheckFailedOnCommittedSlot {
        /// The check command.
        check: String,
        /// What happened.
        outcome: CheckOutcome,
        /// The slot.
        slot: String,
        /// Its attributes.
        state: String,
    },
    /// The change would make a slot bootable (or successful) whose content is not verified.
    #[error("refusing to make {slot} bootable ({before} -> {after}): {why}; use --force to do it anyway")]
    Unverified {
        /// The slot.
        slot: String,
        /// Its attributes now.
        before: String,
        /// The attributes asked for.
        after: String,
        /// Why its content is not trusted (boxed: it carries two hashes).
        why: Box<crate::disk::record::Unverified>,
    },
    /// There are not exactly two slots, so "the other slot" is ambiguous.
    #[error("rollback needs exactly two slots, found {0}")]
    NotTwoSlots(usize),
}

/// What a slot operation did.
#[derive(Debug, Clone, Serialize)]
pub struct SlotChange {
    /// The slot operated on.
    pub slot: String,
    /// Its attributes before.
    pub before: String,
    /// Its attributes after.
    pub after: String,
    /// GPT bytes written (0 when nothing changed).
    pub bytes_written: u64,
}

/// Whether going from `before` to `after` gives a slot more trust: it becomes bootable, or
/// becomes successful. Such a change is only made for a slot whose content matches its record.
fn gains_trust(before: SlotAttributes, after: SlotAttributes) -> bool {
    after.is_bootable() && (!before.is_bootable() || (after.successful() && !before.successful()))
}

/// Applies `op` to the slots' attributes and writes the result, after checking (unless
/// `force`) that every slot the change makes bootable or successful holds verified content
/// ([`crate::disk::record::verify_slot`]). Every slot operation goes through here.
fn apply<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    index: usize,
    force: bool,
    op: impl FnOnce(&[SlotAttributes]) -> Result<Vec<SlotAttributes>, CommitError>,
) -> Result<SlotChange, CommitError> {
    let slots = disk.slots()?;
    let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
    let new = op(&attrs)?;
    if !force {
        // Whatever the operation, it may not take away the last way to boot.
        if let Err(lost) = select::keeps_boot_path(&attrs, &new) {
            return Err(CommitError::LastBootableSlot {
                slot: slots[index].name.clone(),
                lost,
                state: slots
                    .iter()
                    .zip(&new)
                    .map(|(s, a)| format!("{} {a}", s.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let sector_size = disk.dev.sector_size();
        for (i, slot) in slots.iter().enumerate() {
            if gains_trust(attrs[i], new[i]) {
                crate::disk::record::verify_slot(&mut disk.dev, slot, sector_size).map_err(
                    |why| CommitError::Unverified {
                        slot: slot.name.clone(),
                        before: attrs[i].to_string(),
                        after: new[i].to_string(),
                        why: Box::new(why),
                    },
                )?;
            }
        }
    }
    let bytes_written = disk.write_slot_attributes(&slots, &new)?;
    Ok(SlotChange {
        slot: slots[index].name.clone(),
        before: attrs[index].to_string(),
        after: new[index].to_string(),
        bytes_written,
    })
}

/// Marks slot `index` good: successful, no tries, priority above the others. A slot that was
/// not already good must hold verified content, unless `force`.
pub fn mark_good<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    index: usize,
    force: bool,
) -> Result<SlotChange, CommitError> {
    apply(disk, index, force, |a| Ok(select::mark_good(a, index)))
}

/// Sets slot `index`'s attributes to `new` (the low-level `set-attributes`). Making an
/// unverified slot bootable needs `force`, like [`mark_good`].
pub fn set_attributes<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    index: usize,
    new: SlotAttributes,
    force: bool,
) -> Result<SlotChange, CommitError> {
    apply(disk, index, force, |a| {
        let mut all = a.to_vec();
        all[index] = new;
        Ok(all)
    })
}

/// Marks slot `index` bad: P0 T0 S0, so the next boot falls back. Refused when no other slot
/// would be bootable, unless `force`.
pub fn mark_bad<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    index: usize,
    force: bool,
) -> Result<SlotChange, CommitError> {
    let names: Vec<String> = disk.slots()?.iter().map(|s| s.name.clone()).collect();
    apply(disk, index, force, |a| {
        if force {
            let mut new = a.to_vec();
            new[index] = select::mark_bad(a[index]);
            return Ok(new);
        }
        select::mark_bad_guarded(a, index).map_err(|lost| CommitError::LastBootableSlot {
            slot: names[index].clone(),
            lost,
            state: names
                .iter()
                .zip(a)
                .map(|(n, s)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    })
}

/// Makes the slot other than `running` boot next, only if it is marked successful.
pub fn rollback<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    running: usize,
) -> Result<SlotChange, CommitError> {
    let slots = disk.slots()?;
    if slots.len() != 2 {
        return Err(CommitError::NotTwoSlots(slots.len()));
    }
    let other = 1 - running;
    let name = slots[other].name.clone();
    apply(disk, other, false, |a| {
        select::rollback_to(a, other).map_err(|r| CommitError::RollbackRefused {
            slot: name,
            reason: match r {
                RollbackRefusal::NotSuccessful => "it was never marked successful",
                RollbackRefusal::ZeroPriority => "it is marked unbootable (priority 0)",
            },
            state: a[other].to_string(),
        })
    })
}
