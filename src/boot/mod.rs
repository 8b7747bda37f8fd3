//! The boot side: what runs at boot and after it, on the running system.
//!
//! - [`hook`]: `abupdate boot`, the initramfs hook's core: choose the slot with cgptlib's rules
//!   (the `no_std` core's [`crate::select`]), spend its try, persist it crash-safely.
//! - [`health`]: `abupdate commit`, the post-boot health commit.
//! - [`slot_ops`]: mark-good, mark-bad, rollback, set-attributes, and the gate every
//!   attribute change after boot passes.

pub mod health;
pub mod hook;
pub mod slot_ops;
