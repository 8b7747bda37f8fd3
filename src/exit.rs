//! Exit codes of the `abupdate` command, as documented in README.md.

/// Process exit codes. Scripts (the initramfs hook, the health-commit unit) branch on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Success = 0,
    /// An error that fits no other class.
    Failure = 1,
    /// Bad command-line usage (clap's own code), or a bad or incomplete configuration file.
    Usage = 2,
    /// The bundle or channel index was refused: bad signature, corrupt, truncated, wrong key,
    /// too large, not what the signed index describes.
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
    /// Fetching over the network failed: unreachable, HTTP error status, retries exhausted,
    /// the server's length disagrees with the bundle's. The running slot is untouched.
    FetchFailed = 9,
    /// Interrupted by a signal; the target slot was left unbootable.
    Interrupted = 130,
}

/// Classifies a library error; `None` for errors from elsewhere (the caller looks further
/// down the error chain, then falls back to [`Exit::Failure`]).
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    use crate::boot::hook::BootError;
    use crate::boot::slot_ops::CommitError;
    use crate::bundle::{BundleError, KeyError};
    use crate::config::ConfigError;
    use crate::disk::blockdev::OpenError;
    use crate::disk::gpt::GptError;
    use crate::disk::slots::SlotError;
    use crate::fetch::channel::ChannelError;
    use crate::fetch::http::HttpError;
    use crate::install::slotio::SlotIoError;
    use crate::install::InstallError;
    // Wrappers that only say which step failed: the error inside decides.
    if let Some(e) = err.downcast_ref::<crate::fetch::update::UpdateError>() {
        let inner = e.inner();
        return if std::ptr::addr_eq(inner, err) {
            None
        } else {
            classify_error(inner)
        };
    }
    if let Some(e) = err.downcast_ref::<crate::disk::slots::OpenDiskError>() {
        return classify_error(e.inner());
    }
    if let Some(e) = err.downcast_ref::<OpenError>() {
        return Some(match e {
            OpenError::Locked { .. } => Exit::Busy,
            _ => Exit::Disk,
        });
    }
    if let Some(e) = err.downcast_ref::<HttpError>() {
        return Some(classify_http(e));
    }
    if err.is::<ConfigError>() || err.is::<crate::layout::LabelError>() {
        return Some(Exit::Usage);
    }
    if let Some(e) = err.downcast_ref::<crate::disk::init::InitError>() {
        use crate::disk::init::InitError;
        return Some(match e {
            InitError::Invalid(_) | InitError::TooSmall { .. } => Exit::Usage,
            InitError::Exists { .. } | InitError::Io { .. } | InitError::Gpt { .. } => {
                Exit::Failure
            }
        });
    }
    if let Some(e) = err.downcast_ref::<ChannelError>() {
        return Some(match e {
            ChannelError::Fetch(h) => classify_http(h),
            ChannelError::NoChannel => Exit::Usage,
            ChannelError::Bundle(b) => match http_inside(b) {
                Some(h) => classify_http(h),
                None if e.is_refusal() => Exit::BadBundle,
                None => Exit::Failure,
            },
            ChannelError::Io { .. } => Exit::Failure,
            _ if e.is_refusal() => Exit::BadBundle,
            ChannelError::AllMirrorsFailed { failures }
                if failures
                    .iter()
                    .all(|(_, f)| matches!(f, ChannelError::Fetch(HttpError::Cancelled))) =>
            {
                Exit::Interrupted
            }
            _ => Exit::FetchFailed,
        });
    }
    if let Some(h) = err.downcast_ref::<BundleError>().and_then(http_inside) {
        return Some(classify_http(h));
    }
    if let Some(InstallError::Bundle(b)) = err.downcast_ref::<InstallError>() {
        if let Some(h) = http_inside(b) {
            return Some(classify_http(h));
        }
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
            InstallError::ReadbackMismatch { .. } | InstallError::ReadRunning { .. } => Exit::Disk,
            InstallError::Bundle(_) | InstallError::TooLarge { .. } => Exit::BadBundle,
            InstallError::Interrupted { .. } | InstallError::InterruptedBeforeWrite => {
                Exit::Interrupted
            }
            InstallError::Sentinel { .. } => Exit::Failure,
            InstallError::Downgrade { .. }
            | InstallError::Incompatible { .. }
            | InstallError::TargetIsRunning { .. }
            | InstallError::TargetIsLastGood { .. }
            | InstallError::CompatibleUnknown { .. }
            | InstallError::KernelWithoutPartition { .. }
            | InstallError::KernelMissing { .. } => Exit::Refused,
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
            CommitError::CheckFailed { .. }
            | CommitError::CheckFailedOnLastSlot { .. }
            | CommitError::CheckFailedOnCommittedSlot { .. } => Exit::HealthCheckFailed,
            CommitError::RollbackRefused { .. }
            | CommitError::LastBootableSlot { .. }
            | CommitError::Unverified { .. } => Exit::Refused,
            CommitError::Slot(_) | CommitError::NotTwoSlots(_) => Exit::Disk,
        });
    }
    None
}

/// A download error that reached the bundle reader through its `Read` source.
/// The exit code of an error: the first error in its chain of causes that
/// [`classify_error`] knows, else [`Exit::Failure`].
pub fn classify_chain(err: &(dyn std::error::Error + 'static)) -> Exit {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(exit) = classify_error(e) {
            return exit;
        }
        cause = e.source();
    }
    Exit::Failure
}

/// An error and its causes on one line, without repeating a cause its parent already shows.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = e.source();
    }
    out.replace('\n', " ")
}

fn http_inside(err: &crate::bundle::BundleError) -> Option<&crate::fetch::http::HttpError> {
    match err {
        crate::bundle::BundleError::Io { source, .. } => {
            crate::fetch::http::HttpError::from_io(source)
        }
        _ => None,
    }
}

fn classify_http(err: &crate::fetch::http::HttpError) -> Exit {
    match err {
        crate::fetch::http::HttpError::Cancelled => Exit::Interrupted,
        crate::fetch::http::HttpError::RetriesExhausted { last, .. } => classify_http(last),
        // The bundle served is not the one the signed index names: refused, not "not fetched".
        crate::fetch::http::HttpError::NotAsIndexed { .. } => Exit::BadBundle,
        _ => Exit::FetchFailed,
    }
}
