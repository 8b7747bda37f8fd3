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

/// Classifies a library error; `None` for errors from elsewhere (the caller looks further
/// down the error chain, then falls back to [`Exit::Failure`]).
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    use crate::blockdev::OpenError;
    use crate::boot::BootError;
    use crate::bundle::{BundleError, KeyError};
    use crate::commit::CommitError;
    use crate::gpt::GptError;
    use crate::install::InstallError;
    use crate::slotio::SlotIoError;
    use crate::slots::SlotError;
    if let Some(e) = err.downcast_ref::<OpenError>() {
        return Some(match e {
            OpenError::Locked { .. } => Exit::Busy,
            _ => Exit::Disk,
        });
    }
    if err.is::<GptError>() || err.is::<SlotError>() || err.is::<SlotIoError>() {
        return Some(Exit::Disk);
    }
    if err.is::<BundleError>() || err.is::<KeyError>() {
        return Some(Exit::BadBundle);
    }
    if let Some(e) = err.downcast_ref::<InstallError>() {
        return Some(match e {
            InstallError::Slot(_) | InstallError::SlotIo(_) | InstallError::NoRunningSlot => {
                Exit::Disk
            }
            InstallError::ReadbackMismatch { .. } => Exit::Disk,
            InstallError::Bundle(_) | InstallError::TooLarge { .. } => Exit::BadBundle,
            InstallError::Interrupted { .. } => Exit::Interrupted,
            InstallError::Sentinel { .. } => Exit::Failure,
            InstallError::Downgrade { .. }
            | InstallError::Incompatible { .. }
            | InstallError::TargetIsRunning { .. }
            | InstallError::TargetIsLastGood { .. }
            | InstallError::CompatibleUnknown { .. } => Exit::Refused,
        });
    }
    if let Some(e) = err.downcast_ref::<BootError>() {
        return Some(match e {
            BootError::NoBootableSlot { .. } => Exit::NoBootableSlot,
            BootError::Slot(_) => Exit::Disk,
        });
    }
    if let Some(e) = err.downcast_ref::<CommitError>() {
        return Some(match e {
            CommitError::CheckFailed { .. } | CommitError::CheckFailedOnLastSlot { .. } => {
                Exit::HealthCheckFailed
            }
            CommitError::RollbackRefused { .. } | CommitError::LastBootableSlot { .. } => {
                Exit::Refused
            }
            CommitError::Slot(_) | CommitError::NotTwoSlots(_) => Exit::Disk,
        });
    }
    None
}
