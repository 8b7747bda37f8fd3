//! The disk: everything between a path and the two slots on it.
//!
//! - [`blockdev`]: block devices as abupdate sees them (files, block devices, in memory, and
//!   the recording device the crash harness replays).
//! - [`gpt`]: reading both GPT copies and executing the core's crash-safe write plans.
//! - [`slots`]: [`slots::AbDisk`], the one validated view of an A/B disk every command opens.
//! - [`record`]: the slot record (what is installed) as stored in a slot, and checking a
//!   slot's content against it.
//! - [`running`]: which slot is running (the install targets the other one:
//!   [`crate::install::running_and_target`]).
//! - [`init`]: `disk init`, a fresh file-backed A/B disk.
//! - [`lock`]: every file naming the same storage, for the disk lock.
//! - [`sys`]: the only module with `unsafe` (ioctls, `flock`, aligned buffers).

pub mod blockdev;
pub mod gpt;
pub mod init;
pub(crate) mod lock;
pub mod record;
pub mod running;
pub mod slots;
#[allow(unsafe_code)]
pub(crate) mod sys;
