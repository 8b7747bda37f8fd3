//! abupdate: A/B root partition updates for GPT disks.
//!
//! The folders are the architecture (ARCHITECTURE.md at the repository root is the map):
//! - [`attrs`], [`select`], [`layout`]: re-exported from the `no_std` decision core
//!   (`abupdate_core`, `core/`): the cgpt attribute bits, the boot selection state machine
//!   (vboot's cgptlib rules), the one validated view of a partition table. The UEFI loader
//!   runs the same code.
//! - [`disk`]: block devices, GPT I/O, the A/B slots, slot records, the running slot, disk
//!   creation, the disk lock, and the one module with `unsafe`.
//! - [`bundle`]: the signed, chunked, zstd-compressed update bundle format.
//! - [`install`]: the verified streaming install into the inactive slot (adaptive copies, slot
//!   I/O, the read-back).
//! - [`fetch`]: HTTP(S) with resume, the signed channel index, `check`/`update`.
//! - [`boot`]: the boot hook, the health commit, the slot operations.
//! - [`pipeline`]: the one parallel chunk pipeline (ordered, bounded) under the bundle reader
//!   and writer.
//! - [`config`], [`exit`]: the configuration file; the documented exit codes.
//! - [`cli`]: the `abupdate` command line (parsing, settings, output); `main.rs` only calls it.

#![deny(unsafe_code)]

pub use abupdate_core::{attrs, layout, select};

pub mod boot;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod disk;
pub mod exit;
pub mod fetch;
pub mod install;
pub(crate) mod pipeline;
pub mod service;
