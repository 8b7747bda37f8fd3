//! abupdate-core: the pure decision logic of abupdate, free of `std`.
//!
//! Why a separate `#![no_std]` crate: the UEFI boot loader must make exactly the same slot
//! choice and spend tries exactly as `abupdate boot` does, and a boot loader has no operating
//! system underneath. Everything here is I/O free and needs only `alloc`: the caller reads
//! bytes, hands them in, and executes the writes this crate plans. The `abupdate` crate does
//! that on Linux block devices; the boot loader will do it through UEFI's block I/O protocol.
//!
//! - [`attrs`]: the ChromeOS/cgpt slot attribute bits.
//! - [`select`]: the boot selection state machine, matching vboot's cgptlib.
//! - [`gpt`]: GPT header/entry parsing, per-copy validation with CRC checks, and the plan of
//!   a crash-safe attribute write (which sectors, in which order, where to flush).
//! - [`layout`]: the one validated view of a partition table and its two slot labels.
//! - [`slot_record`]: the per-slot record of what is installed (encoding, decoding).
//! - [`signed_header`]: the bundle's signed header as the loader checks it (signature under a
//!   trusted key, the kernel part).

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod attrs;
pub mod gpt;
pub mod layout;
pub mod select;
pub mod signed_header;
pub mod slot_record;
