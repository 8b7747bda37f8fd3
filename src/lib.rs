//! abupdate: A/B root partition updates for GPT disks.
//!
//! The crate is split by concern:
//! - [`attrs`], [`select`]: re-exported from the `no_std` decision core, `abupdate_core`
//!   (the cgpt attribute bits; the boot selection state machine, matching vboot's cgptlib).
//! - [`blockdev`]: the block device abstraction (files, block devices, in-memory, recording).
//! - [`disklock`]: every file naming a disk's storage, for the disk lock.
//! - [`gpt`]: reading both GPT copies and executing the crash-safe attribute writes (the
//!   structures, validation and write plan are `abupdate_core::gpt`, re-exported there).
//! - [`layout`]: the one validated view of a disk's partition table and slot labels
//!   (re-exported from `abupdate_core`).
//! - [`slots`]: finding the A/B slots on a disk and reporting their state.
//! - [`init`]: creating a fresh file-backed A/B disk.
//! - [`footer`]: the per-slot record of what is installed (version, image hash).
//! - [`running`]: finding the running slot (and the install target).
//! - [`boot`]: the boot-time hook.
//! - [`commit`]: the post-boot health commit and manual slot operations.
//! - [`exit`]: the CLI's documented exit codes.
//! - [`install`]: the verified streaming install pipeline.
//! - [`pipeline`]: the one parallel chunk pipeline (ordered, bounded) under the bundle reader and writer.
//! - [`adaptive`]: adaptive installs that copy unchanged chunks from the running slot.
//! - [`slotio`]: bounded, direct I/O on the target slot.
//! - [`bundle`]: the signed, chunked, zstd-compressed update bundle format.
//! - [`sys`]: the only module with `unsafe` (ioctls, flock, aligned buffers).
//! - [`http`]: fetching bundles over HTTP(S) with resume, bounded retries and timeouts.
//! - [`channel`]: the signed update channel index, update decisions and the download cache.
//! - [`config`]: the `/etc/abupdate.toml` configuration file.
//! - [`update`]: `check` and `update`: ask the channel, decide, then install or download.
//! - [`cli`]: the `abupdate` command line (parsing, settings, output); `main.rs` only calls it.

pub mod adaptive;
pub use abupdate_core::attrs;
pub mod blockdev;
pub mod boot;
pub mod bundle;
pub mod channel;
pub mod cli;
pub mod commit;
pub mod config;
pub mod disklock;
pub mod exit;
pub mod footer;
pub mod gpt;
pub mod http;
pub mod init;
pub mod install;
pub use abupdate_core::layout;
pub mod pipeline;
pub mod running;
pub use abupdate_core::select;
pub mod slotio;
pub mod slots;
pub mod sys;
pub mod update;
