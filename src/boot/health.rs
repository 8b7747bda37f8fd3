//! The post-boot health commit: run the checks, then mark the running slot good, or (on a
//! slot on trial) bad; the attribute changes go through [`super::slot_ops`].

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::disk::blockdev::BlockDevice;
use crate::disk::slots::AbDisk;

use super::slot_ops::{mark_bad, mark_good, CommitError, SlotChange};

/// Result of one health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum CheckOutcome {
    /// Exit status 0.
    Passed,
    /// Non-zero exit status.
    Failed {
        /// The exit code, if it exited.
        code: Option<i32>,
    },
    /// Killed after the timeout.
    TimedOut {
        /// The timeout in seconds.
        seconds: u64,
    },
    /// Could not be started.
    NotStarted {
        /// The OS error.
        error: String,
    },
}

impl std::fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckOutcome::Passed => write!(f, "passed"),
            CheckOutcome::Failed { code: Some(c) } => write!(f, "exited with status {c}"),
            CheckOutcome::Failed { code: None } => write!(f, "killed by a signal"),
            CheckOutcome::TimedOut { seconds } => write!(f, "timed out after {seconds} s"),
            CheckOutcome::NotStarted { error } => write!(f, "could not start: {error}"),
        }
    }
}

/// Runs `check` with `sh -c` in its own process group, killing the whole group after
/// `timeout` (so a check's own children cannot outlive it).
pub fn run_check(check: &str, timeout: Duration) -> CheckOutcome {
    use std::os::unix::process::CommandExt;
    let mut child = match Command::new("/bin/sh")
        .arg("-c")
        .arg(check)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return CheckOutcome::NotStarted {
                error: e.to_string(),
            }
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return CheckOutcome::Passed,
            Ok(Some(status)) => {
                return CheckOutcome::Failed {
                    code: status.code(),
                }
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = crate::disk::sys::kill_process_group(child.id());
                let _ = child.wait();
                return CheckOutcome::TimedOut {
                    seconds: timeout.as_secs(),
                };
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return CheckOutcome::NotStarted {
                    error: e.to_string(),
                }
            }
        }
    }
}

/// Report of a health commit.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// Each check and its outcome, in order (stops at the first failure).
    pub checks: Vec<(String, CheckOutcome)>,
    /// The attribute change made.
    pub change: SlotChange,
    /// Whether all checks passed.
    pub healthy: bool,
}

/// What a health commit may do beyond the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitPolicy {
    /// Mark a slot good even if its content does not match its record.
    pub force: bool,
    /// On a failed check, mark the slot bad even when it is committed (successful).
    pub mark_bad_committed: bool,
}

/// Runs the checks in order; all pass → mark good (the slot's content is verified against its
/// record first, unless [`CommitPolicy::force`]); the first failure → mark bad and return
/// [`CommitError::CheckFailed`] (after the write), but only for a slot on trial (not
/// successful). A committed slot is left as it was ([`CommitError::CheckFailedOnCommittedSlot`])
/// unless [`CommitPolicy::mark_bad_committed`]: the health-commit unit runs at every boot, and a
/// passing glitch (a slow network at boot) must not roll a long-good system back to an older
/// release that `update` would then never leave. The only bootable slot is never marked bad
/// ([`CommitError::CheckFailedOnLastSlot`]): falling back needs somewhere to fall back to. A
/// commit on a slot that is already good writes nothing.
pub fn commit<D: BlockDevice>(
    disk: &mut AbDisk<D>,
    index: usize,
    checks: &[String],
    timeout: Duration,
    policy: CommitPolicy,
    mut on_check: impl FnMut(&str, &CheckOutcome),
) -> Result<CommitReport, CommitError> {
    let mut results = Vec::new();
    for check in checks {
        let outcome = run_check(check, timeout);
        on_check(check, &outcome);
        let passed = outcome == CheckOutcome::Passed;
        results.push((check.clone(), outcome.clone()));
        if passed {
            continue;
        }
        let slot = &disk.slots()?[index];
        if slot.attrs.successful() && !policy.mark_bad_committed {
            return Err(CommitError::CheckFailedOnCommittedSlot {
                check: check.clone(),
                outcome,
                slot: slot.name.clone(),
                state: slot.attrs.to_string(),
            });
        }
        return match mark_bad(disk, index, false) {
            Ok(change) => Err(CommitError::CheckFailed {
                check: check.clone(),
                outcome,
                slot: change.slot,
            }),
            Err(CommitError::LastBootableSlot { slot, lost, .. }) => {
                Err(CommitError::CheckFailedOnLastSlot {
                    check: check.clone(),
                    outcome,
                    slot,
                    lost,
                })
            }
            Err(other) => Err(other),
        };
    }
    let change = mark_good(disk, index, policy.force)?;
    Ok(CommitReport {
        checks: results,
        change,
        healthy: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_pass_fail_and_time_out() {
        assert_eq!(
            run_check("true", Duration::from_secs(5)),
            CheckOutcome::Passed
        );
        assert_eq!(
            run_check("exit 3", Duration::from_secs(5)),
            CheckOutcome::Failed { code: Some(3) }
        );
        assert_eq!(
            run_check("sleep 5", Duration::from_millis(200)),
            CheckOutcome::TimedOut { seconds: 0 }
        );
    }
}
