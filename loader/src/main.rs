//! abupdate's UEFI boot loader.
//!
//! Why it exists: on an ordinary UEFI PC or cloud VM nothing in the firmware reads the cgpt
//! priority/tries/successful attributes, so a kernel that panics before the initramfs never
//! spends a try and never falls back. This loader runs before any kernel and makes the slot
//! choice itself, with the very code `abupdate boot` runs on Linux (`abupdate-core`): the same
//! GPT parsing and validation, the same cgptlib rules, the same crash-safe write order.
//!
//! What it does, in order:
//! 1. finds the disk whose GPT names both slot labels (every whole disk the firmware's Block
//!    I/O protocol offers), reads both GPT copies and validates the layout;
//! 2. chooses the slot and spends its try (`select::boot_attempt`), writing the attributes
//!    with the core's write plan (nothing is written when nothing changes, e.g. a committed
//!    slot), and repairs a stale GPT copy on the way, as cgptlib does;
//! 3. prints the choice on the console and the serial line.
//!
//! Starting the slot's kernel (KERN-x, verified against the signed slot record) is the next
//! step (issue 13); until then the loader powers the machine off after step 3, which is what
//! the tests of the choice and of power cuts during it need. When no slot is bootable, or the
//! disk is refused, it says why and resets after a delay: it never loops on a slot.

#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code)]
mod firmware;
mod slots;

use uefi::prelude::*;

/// Seconds to show a fatal message before the reset.
const FATAL_DELAY_SECONDS: u32 = 10;

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    match slots::choose_and_spend_try() {
        Ok(choice) => {
            log::info!("abupdate-loader: {choice}");
            firmware::power_off()
        }
        Err(why) => {
            log::error!("abupdate-loader: {why}; resetting in {FATAL_DELAY_SECONDS} s");
            firmware::reset_after(FATAL_DELAY_SECONDS)
        }
    }
}
