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
//! 3. verifies the slot's kernel ([`kernel`]): the bundle header kept in the slot record must
//!    verify under a key built into this loader, and KERN-x must hash to the kernel hash that
//!    header signs;
//! 4. starts it with `root=PARTUUID=<ROOT-x> abupdate.slot=ROOT-x abupdate.loader=1` (and the
//!    build's extra words) as its command line; `abupdate.loader=1` tells the initramfs hook
//!    that the try is spent, so `abupdate boot` does not spend a second one.
//!
//! A kernel that fails step 3 or 4 is never retried in the same boot: its slot is marked bad
//! as cgptlib's firmware does (a committed slot keeps its attributes) and set aside, and the
//! choice runs again. When no slot is left, or the disk is refused, the loader says why on the
//! console and the serial line and resets after a delay: it never loops on a slot, and a slot
//! on trial runs out of tries by itself when its kernel dies later (the kernel command line
//! has `panic=`, so a panic comes back here).

#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code)]
mod firmware;
mod kernel;
mod slots;

use alloc::format;
use alloc::string::String;
use uefi::prelude::*;

mod config {
    include!(concat!(env!("OUT_DIR"), "/config.rs"));
}

/// Seconds to show a fatal message before the reset.
const FATAL_DELAY_SECONDS: u32 = 10;

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    let why = boot();
    log::error!("abupdate-loader: {why}; resetting in {FATAL_DELAY_SECONDS} s");
    firmware::reset_after(FATAL_DELAY_SECONDS)
}

/// Chooses, verifies and starts a slot; returns only why nothing could be started.
fn boot() -> String {
    log::info!(
        "abupdate-loader: secure boot {}",
        if firmware::secure_boot() {
            "on: the firmware checked this loader, and checks each kernel image it loads"
        } else {
            "off"
        }
    );
    let mut ab = match slots::find() {
        Ok(ab) => ab,
        Err(why) => return why,
    };
    // Each failed slot is set aside, so this ends after at most one attempt per slot.
    loop {
        let choice = match ab.choose_and_spend_try() {
            Ok(choice) => choice,
            Err(why) => return why,
        };
        log::info!("abupdate-loader: {choice}");
        if cfg!(feature = "stop-after-choice") {
            firmware::power_off();
        }
        let failure = match kernel::load_verified(&ab, choice.slot, config::TRUSTED_KEYS) {
            Ok(kernel) => {
                let cmdline = format!(
                    "root=PARTUUID={} abupdate.slot={} abupdate.loader=1 {}",
                    choice.partuuid,
                    choice.label,
                    config::EXTRA_CMDLINE
                );
                log::info!(
                    "abupdate-loader: kernel of {} version {} verified ({} bytes); starting it: {cmdline}",
                    choice.label,
                    kernel.version,
                    kernel.image.len()
                );
                let started = firmware::start_image(&kernel.image, &cmdline);
                format!(
                    "kernel of {}: {}",
                    choice.label,
                    started.err().unwrap_or_default()
                )
            }
            Err(why) => format!("refusing the kernel of {}: {why}", choice.label),
        };
        match ab.set_aside(choice.slot) {
            Ok(now) => log::error!(
                "abupdate-loader: {failure}; {} marked bad ({now}), choosing again",
                choice.label
            ),
            Err(why) => return format!("{failure}; marking {} bad failed: {why}", choice.label),
        }
    }
}
