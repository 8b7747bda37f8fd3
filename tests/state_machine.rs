//! Exhaustive proof of the slot state machine over every state of two slots (512 x 512
//! attribute combinations) and every event: a boot try (with a power cut before or after its
//! attribute write), mark-good, guarded mark-bad, rollback, and an install (power cut after the
//! invalidation, or completed).
//!
//! Properties:
//! 1. a slot that is successful and bootable stays so, unless it is explicitly marked bad or
//!    is itself the target of an install;
//! 2. an unverified slot is never chosen once its tries are spent, and boots at most `tries`
//!    times without a commit;
//! 3. a device with a bootable successful slot always keeps a bootable slot.

use abupdate::attrs::SlotAttributes;
use abupdate::select::{self, boot_attempt, next_slot};

fn all_states() -> Vec<SlotAttributes> {
    let mut v = Vec::with_capacity(512);
    for p in 0..=15u8 {
        for t in 0..=15u8 {
            for s in [false, true] {
                v.push(SlotAttributes::new(p, t, s));
            }
        }
    }
    v
}

fn good(a: SlotAttributes) -> bool {
    a.successful() && a.is_bootable()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    BootCrashBeforeWrite,
    BootCrashAfterWrite,
    MarkGood(usize),
    MarkBad(usize),
    Rollback(usize),
    InstallInvalidated(usize),
    InstallCompleted(usize),
}

/// The states an event can lead to (one per possible power-cut point).
fn apply(state: [SlotAttributes; 2], event: Event) -> Vec<[SlotAttributes; 2]> {
    let v = |x: Vec<SlotAttributes>| [x[0], x[1]];
    match event {
        Event::BootCrashBeforeWrite => vec![state],
        Event::BootCrashAfterWrite => match boot_attempt(&state) {
            Some(choice) => {
                let mut s = state;
                s[choice.index] = choice.updated;
                vec![s]
            }
            None => vec![state],
        },
        Event::MarkGood(i) => vec![v(select::mark_good(&state, i))],
        Event::MarkBad(i) => match select::mark_bad_guarded(&state, i) {
            Ok(s) => vec![v(s)],
            Err(_) => vec![state],
        },
        Event::Rollback(running) => match select::rollback_to(&state, 1 - running) {
            Ok(s) => vec![v(s)],
            Err(_) => vec![state],
        },
        Event::InstallInvalidated(target) | Event::InstallCompleted(target)
            if select::check_install_target(&state, target).is_err() =>
        {
            vec![state]
        }
        Event::InstallInvalidated(target) => {
            let mut s = state;
            s[target] = select::invalidate(state[target]);
            vec![s]
        }
        Event::InstallCompleted(target) => {
            let mut s = state;
            s[target] = select::invalidate(state[target]);
            vec![s, v(select::activate_for_trial(&s, target, 3))]
        }
    }
}

#[test]
fn every_state_and_event_keeps_the_invariants() {
    let states = all_states();
    let events = [
        Event::BootCrashBeforeWrite,
        Event::BootCrashAfterWrite,
        Event::MarkGood(0),
        Event::MarkGood(1),
        Event::MarkBad(0),
        Event::MarkBad(1),
        Event::Rollback(0),
        Event::Rollback(1),
        Event::InstallInvalidated(0),
        Event::InstallInvalidated(1),
        Event::InstallCompleted(0),
        Event::InstallCompleted(1),
    ];
    let mut transitions = 0u64;
    for &a in &states {
        for &b in &states {
            let state = [a, b];
            let had_good = good(a) || good(b);
            for &event in &events {
                for after in apply(state, event) {
                    transitions += 1;
                    // Property 3.
                    if had_good {
                        assert!(
                            next_slot(&after).is_some(),
                            "{event:?} from [{a}, {b}] left no bootable slot: [{}, {}]",
                            after[0],
                            after[1]
                        );
                    }
                    // Property 1.
                    for k in 0..2 {
                        let targeted = matches!(event, Event::MarkBad(i) | Event::InstallInvalidated(i) | Event::InstallCompleted(i) if i == k);
                        if good(state[k]) && !targeted {
                            assert!(
                                good(after[k]),
                                "{event:?} from [{a}, {b}] broke good slot {k}: {}",
                                after[k]
                            );
                        }
                    }
                }
            }
            // Property 2: boots without a commit.
            let mut s = state;
            let mut boots = [0u32; 2];
            for _ in 0..40 {
                let Some(choice) = boot_attempt(&s) else {
                    break;
                };
                let chosen = s[choice.index];
                assert!(
                    chosen.successful() || chosen.tries() > 0,
                    "booted an unverified slot with no tries: {chosen}"
                );
                boots[choice.index] += 1;
                s[choice.index] = choice.updated;
                transitions += 1;
            }
            for k in 0..2 {
                if !state[k].successful() {
                    assert!(
                        boots[k] <= u32::from(state[k].tries()),
                        "[{a}, {b}]: slot {k} booted {} times with {} tries",
                        boots[k],
                        state[k].tries()
                    );
                }
            }
        }
    }
    println!(
        "state machine: {} states x {} events, {transitions} transitions checked",
        states.len() * states.len(),
        events.len()
    );
}

/// The update cycle as a sequence: install, trial boots, commit or not.
#[test]
fn trial_boots_fall_back_after_tries_are_spent() {
    for tries in 1..=15u8 {
        let mut s = [
            SlotAttributes::new(2, 0, true),
            SlotAttributes::new(0, 0, false),
        ];
        let v = select::activate_for_trial(&s, 1, tries);
        s = [v[0], v[1]];
        for boot in 0..tries {
            let choice = boot_attempt(&s).unwrap();
            assert_eq!(choice.index, 1, "boot {boot} of {tries}");
            s[1] = choice.updated;
        }
        // Tries spent, never committed: A boots from now on.
        for _ in 0..3 {
            assert_eq!(boot_attempt(&s).unwrap().index, 0);
        }
    }
}
