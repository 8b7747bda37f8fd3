//! The boot selection state machine, pure and I/O free.
//!
//! It mirrors vboot_reference's `GptNextKernelEntry` (first call) and `GptUpdateKernelEntry`:
//! - a slot is a candidate when `priority > 0` and (`successful` or `tries > 0`);
//! - the highest priority wins; on a tie the slot with the lowest partition-table index wins,
//!   because cgptlib scans the entry array in order and only replaces its pick on a strictly
//!   greater priority;
//! - trying an unsuccessful slot spends one try; the try that spends the last one still boots
//!   the slot but leaves it at P0 T0 (cgptlib falls through from TRY to BAD), so a later health
//!   commit must restore its priority;
//! - marking bad clears priority and tries only when the slot is not successful.
//!
//! On top of the firmware rules sit the operations abupdate adds (install, mark-good,
//! mark-bad, rollback); each is a function from attributes to attributes so it can be tested
//! over every state.

use alloc::vec::Vec;

use crate::attrs::{SlotAttributes, FIELD_MAX};

/// Tries given to a freshly installed slot unless the caller chooses another number.
pub const DEFAULT_TRIES: u8 = 3;

/// What a boot attempt decided: which slot (by index into the slice given) and its new
/// attributes after spending a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootChoice {
    /// Index into the slot slice of the slot to boot.
    pub index: usize,
    /// That slot's attributes after the try was spent.
    pub updated: SlotAttributes,
}

/// Picks the slot cgptlib would boot, without changing anything.
///
/// `slots` must be in partition-table order; the returned index refers to it.
pub fn next_slot(slots: &[SlotAttributes]) -> Option<usize> {
    let mut best: Option<(usize, u8)> = None;
    for (index, attrs) in slots.iter().enumerate() {
        if !(attrs.successful() || attrs.tries() > 0) {
            continue;
        }
        let priority = attrs.priority();
        // Strictly greater, starting from 0: priority 0 never wins, ties keep the earlier slot.
        if priority > best.map_or(0, |(_, p)| p) {
            best = Some((index, priority));
        }
    }
    best.map(|(index, _)| index)
}

/// `GptUpdateKernelEntry(TRY)`: the attributes of a slot after one boot attempt of it.
pub fn spend_try(attrs: SlotAttributes) -> SlotAttributes {
    if attrs.successful() {
        return attrs;
    }
    if attrs.tries() > 1 {
        return attrs.with_tries(attrs.tries() - 1);
    }
    mark_bad_firmware(attrs)
}

/// `GptUpdateKernelEntry(BAD)`: clears priority and tries unless the slot is successful.
pub fn mark_bad_firmware(attrs: SlotAttributes) -> SlotAttributes {
    if attrs.successful() {
        attrs
    } else {
        attrs.with_priority(0).with_tries(0)
    }
}

/// One boot: choose a slot and spend a try on it. `None` when nothing is bootable.
pub fn boot_attempt(slots: &[SlotAttributes]) -> Option<BootChoice> {
    next_slot(slots).map(|index| BootChoice {
        index,
        updated: spend_try(slots[index]),
    })
}

/// The priority that puts slot `index` strictly above every other slot, if one exists.
///
/// Like `cgpt prioritize`, it prefers one above the current maximum; when another slot already
/// holds 15 there is no room and the caller must lower the others first (see [`prioritize`]).
fn top_priority(slots: &[SlotAttributes], index: usize) -> u8 {
    others_max_priority(slots, index)
        .saturating_add(1)
        .clamp(1, FIELD_MAX)
}

/// The highest priority among the slots other than `index` (0 if none).
fn others_max_priority(slots: &[SlotAttributes], index: usize) -> u8 {
    slots
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, a)| a.priority())
        .max()
        .unwrap_or(0)
}

/// Makes slot `index` the highest priority strictly, renumbering the others if needed.
///
/// Returns the new attribute vector. Other slots keep their relative order; only when the
/// target cannot go above them (another holds 15) are the others' non-zero priorities shifted
/// down by one, which never turns a bootable slot unbootable (a priority of 1 stays 1 and
/// the target goes to 2 at least).
pub fn prioritize(
    slots: &[SlotAttributes],
    index: usize,
    base: SlotAttributes,
) -> Vec<SlotAttributes> {
    let mut out = slots.to_vec();
    out[index] = base;
    if others_max_priority(&out, index) >= FIELD_MAX {
        for (i, attrs) in out.iter_mut().enumerate() {
            if i != index && attrs.priority() > 1 {
                *attrs = attrs.with_priority(attrs.priority() - 1);
            }
        }
    }
    let priority = top_priority(&out, index);
    out[index] = out[index].with_priority(priority);
    out
}

/// Why an install into a slot was refused before anything was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastGoodSlot;

/// An install may overwrite slot `target` only if some other slot is successful and bootable:
/// otherwise the device would be left with no known-good slot to fall back to (for example
/// while it runs an uncommitted trial of the other slot, as Mender also refuses).
pub fn check_install_target(slots: &[SlotAttributes], target: usize) -> Result<(), LastGoodSlot> {
    let other_good = slots
        .iter()
        .enumerate()
        .any(|(i, a)| i != target && a.successful() && a.is_bootable());
    if other_good {
        Ok(())
    } else {
        Err(LastGoodSlot)
    }
}

/// Install step 1: the target slot becomes unbootable before its bytes change.
pub fn invalidate(attrs: SlotAttributes) -> SlotAttributes {
    attrs.with_priority(0).with_tries(0).with_successful(false)
}

/// Install final step: the freshly verified slot boots next, on probation with `tries` tries.
pub fn activate_for_trial(
    slots: &[SlotAttributes],
    index: usize,
    tries: u8,
) -> Vec<SlotAttributes> {
    let base = slots[index]
        .with_tries(tries.clamp(1, FIELD_MAX))
        .with_successful(false);
    prioritize(slots, index, base)
}

/// Health commit passed: successful, no tries, and a priority above the other slots.
///
/// The priority is restored because spending the last try leaves P0 (see module docs); a slot
/// that is already successful with a top priority and no tries is returned unchanged so a
/// second commit writes nothing.
pub fn mark_good(slots: &[SlotAttributes], index: usize) -> Vec<SlotAttributes> {
    let current = slots[index];
    let already_top = slots
        .iter()
        .enumerate()
        .all(|(i, a)| i == index || a.priority() < current.priority());
    if current.successful() && current.tries() == 0 && already_top {
        return slots.to_vec();
    }
    prioritize(slots, index, current.with_tries(0).with_successful(true))
}

/// Health commit failed: the slot must never boot again until reinstalled.
pub fn mark_bad(attrs: SlotAttributes) -> SlotAttributes {
    invalidate(attrs)
}

/// Whether some slot boots without spending tries: successful, with a priority. Such a slot
/// is what the device falls back to when a trial runs out of tries.
pub fn has_committed_slot(slots: &[SlotAttributes]) -> bool {
    slots.iter().any(|a| a.successful() && a.priority() > 0)
}

/// What a change of attributes would take away (see [`keeps_boot_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPathLoss {
    /// No slot at all would be bootable.
    NoBootableSlot,
    /// Only slots on trial would be bootable: once their tries are spent (or after a power
    /// cut mid-trial), nothing boots.
    NoCommittedSlot,
}

impl core::fmt::Display for BootPathLoss {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NoBootableSlot => "no slot would be bootable",
            Self::NoCommittedSlot => {
                "no committed slot would be left to boot or fall back to, only slots on trial"
            }
        })
    }
}

/// Checks that going from `before` to `after` keeps what the device had: a bootable slot, and
/// a committed (successful) slot to fall back to. A trial whose tries run out with no committed
/// slot behind it leaves nothing to boot, so demoting the last committed slot (to a trial, or
/// to bad) is as dangerous as unmarking the last bootable one. Changes on a disk that had
/// neither are not blocked by what it never had.
pub fn keeps_boot_path(
    before: &[SlotAttributes],
    after: &[SlotAttributes],
) -> Result<(), BootPathLoss> {
    if next_slot(before).is_some() && next_slot(after).is_none() {
        return Err(BootPathLoss::NoBootableSlot);
    }
    if has_committed_slot(before) && !has_committed_slot(after) {
        return Err(BootPathLoss::NoCommittedSlot);
    }
    Ok(())
}

/// [`mark_bad`] on slot `index`, refused when it would take away the last bootable or the last
/// committed slot ([`keeps_boot_path`]): a failing health check on the last good slot must not
/// turn a running device into a brick.
pub fn mark_bad_guarded(
    slots: &[SlotAttributes],
    index: usize,
) -> Result<Vec<SlotAttributes>, BootPathLoss> {
    let mut out = slots.to_vec();
    out[index] = mark_bad(slots[index]);
    keeps_boot_path(slots, &out)?;
    Ok(out)
}

/// Why a rollback was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackRefusal {
    /// The other slot never passed a health commit.
    NotSuccessful,
    /// The other slot is marked unbootable (priority 0).
    ZeroPriority,
}

/// Makes slot `index` (the other slot) boot next, only if it is known good.
pub fn rollback_to(
    slots: &[SlotAttributes],
    index: usize,
) -> Result<Vec<SlotAttributes>, RollbackRefusal> {
    let target = slots[index];
    if !target.successful() {
        return Err(RollbackRefusal::NotSuccessful);
    }
    if target.priority() == 0 {
        return Err(RollbackRefusal::ZeroPriority);
    }
    Ok(prioritize(slots, index, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> impl Iterator<Item = SlotAttributes> {
        (0..=15u8).flat_map(|p| {
            (0..=15u8).flat_map(move |t| [false, true].map(move |s| SlotAttributes::new(p, t, s)))
        })
    }

    /// A direct transcription of the cgptlib rules in another shape (a sort), checked against
    /// `next_slot` over every pair of slot states.
    fn reference_pick(slots: &[SlotAttributes]) -> Option<usize> {
        let mut candidates: Vec<(usize, u8)> = slots
            .iter()
            .enumerate()
            .filter(|(_, a)| a.priority() > 0 && (a.successful() || a.tries() > 0))
            .map(|(i, a)| (i, a.priority()))
            .collect();
        // Highest priority first; among equals, lowest index first.
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        candidates.first().map(|c| c.0)
    }

    #[test]
    fn next_slot_matches_reference_over_all_pairs() {
        for a in all_states() {
            for b in all_states() {
                assert_eq!(next_slot(&[a, b]), reference_pick(&[a, b]), "{a} / {b}");
            }
        }
    }

    #[test]
    fn spend_try_over_all_states() {
        for a in all_states() {
            let after = spend_try(a);
            if a.successful() {
                assert_eq!(after, a);
            } else if a.tries() > 1 {
                assert_eq!(after, a.with_tries(a.tries() - 1));
            } else {
                assert_eq!((after.priority(), after.tries()), (0, 0));
                assert!(!after.successful());
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let a = SlotAttributes::new(3, 0, true);
        let b = SlotAttributes::new(3, 0, true);
        assert_eq!(next_slot(&[a, b]), Some(0));
    }

    #[test]
    fn last_try_still_boots_but_leaves_p0() {
        let slots = [
            SlotAttributes::new(1, 0, true),
            SlotAttributes::new(2, 1, false),
        ];
        let choice = boot_attempt(&slots).unwrap();
        assert_eq!(choice.index, 1);
        assert_eq!(choice.updated, SlotAttributes::new(0, 0, false));
        // The health commit restores it above A.
        let mut after = slots;
        after[1] = choice.updated;
        let good = mark_good(&after, 1);
        assert_eq!(good[1].fields().priority, 2);
        assert!(good[1].successful());
        assert_eq!(next_slot(&good), Some(1));
    }

    #[test]
    fn mark_good_is_idempotent() {
        for a in all_states() {
            for b in all_states() {
                let once = mark_good(&[a, b], 1);
                let twice = mark_good(&once, 1);
                assert_eq!(once, twice);
                assert_eq!(next_slot(&once), Some(1), "{a} / {b}");
            }
        }
    }

    #[test]
    fn prioritize_keeps_others_bootable() {
        for a in all_states() {
            for b in all_states() {
                let out = activate_for_trial(&[a, b], 1, 3);
                assert_eq!(next_slot(&out), Some(1));
                assert_eq!(out[0].is_bootable(), a.is_bootable(), "{a} / {b}");
            }
        }
    }

    #[test]
    fn keeps_boot_path_over_all_pairs() {
        // Every change of one slot of a pair, checked against the plain-words rule: after the
        // change some slot still boots (when one did), and some successful slot with a priority
        // still exists (when one did).
        let states: Vec<SlotAttributes> = all_states().collect();
        for &a in &states {
            for &b in &states {
                let before = [a, b];
                let committed =
                    |s: &[SlotAttributes]| s.iter().any(|x| x.successful() && x.priority() > 0);
                for &new_b in &states {
                    let after = [a, new_b];
                    let lost_boot =
                        reference_pick(&before).is_some() && reference_pick(&after).is_none();
                    let lost_committed = committed(&before) && !committed(&after);
                    let verdict = keeps_boot_path(&before, &after);
                    assert_eq!(
                        verdict.is_ok(),
                        !lost_boot && !lost_committed,
                        "{a} {b} -> {new_b}"
                    );
                    if lost_boot {
                        assert_eq!(verdict, Err(BootPathLoss::NoBootableSlot));
                    }
                }
            }
        }
    }

    #[test]
    fn a_kept_boot_path_survives_any_number_of_boots() {
        // The promise behind keeps_boot_path: from a disk with a committed slot, a checked
        // change leaves a disk that still boots after its trials spend every try.
        for a in all_states() {
            for b in all_states() {
                let mut slots = [a, b];
                if !has_committed_slot(&slots) {
                    continue;
                }
                for _ in 0..20 {
                    let Some(choice) = boot_attempt(&slots) else {
                        panic!("{a} / {b}: nothing boots");
                    };
                    slots[choice.index] = choice.updated;
                }
            }
        }
    }
}
