//! The boot hook and the slot operations: `boot`, `commit`, `mark-good`, `mark-bad`,
//! `rollback` and `set-attributes`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::output::print_change;
use super::settings::DiskFlags;
use crate::boot::health::CommitPolicy;
use crate::boot::slot_ops::CommitError;
use crate::config::{parse_duration, Loaded};
use crate::disk::blockdev::FileDevice;
use crate::disk::running::{self, Fallback};
use crate::disk::slots::AbDisk;
use crate::disk::slots::DiskSpec;

/// Names the slot an operation applies to.
#[derive(Args, Clone, Debug, Default)]
pub struct SlotArg {
    /// Slot label or letter (A, B); default: the running slot.
    #[arg(long)]
    pub slot: Option<String>,
}

/// Output format of the boot hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BootFormat {
    /// Shell `KEY=value` lines to `eval`.
    Env,
    /// One JSON object.
    Json,
    /// `root=PARTUUID=… abupdate.slot=…`.
    Cmdline,
}

/// `boot`.
#[derive(Args, Debug)]
pub struct BootArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// Output format.
    #[arg(long, value_enum, default_value = "env")]
    pub format: BootFormat,
    /// This boot's kernel command line: when abupdate's UEFI loader chose the slot (it passes
    /// `abupdate.loader=1 abupdate.slot=LABEL`), that choice stands and no second try is spent.
    #[arg(long, default_value = "/proc/cmdline")]
    pub kernel_cmdline: PathBuf,
}

/// `mark-good`.
#[derive(Args, Debug)]
pub struct MarkGoodArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub slot: SlotArg,
    /// Mark it good even if its content does not match its slot record (or it has none,
    /// as after an interrupted install).
    #[arg(long)]
    pub force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `mark-bad`.
#[derive(Args, Debug)]
pub struct MarkBadArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub slot: SlotArg,
    /// Mark it bad even if it is the last bootable slot (the device will not boot), or the
    /// last committed one while the other slot is only on trial.
    #[arg(long)]
    pub force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `rollback`.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// The running slot, when it cannot be detected.
    #[arg(long)]
    pub slot: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub slot: SlotArg,
    /// A health check command (run with sh -c; exit 0 = healthy). Repeatable [config: health-checks, used when neither --check nor --checks-file is given].
    #[arg(long = "check")]
    pub checks: Vec<String>,
    /// A file of checks, one command per line (blank lines and # comments ignored).
    #[arg(long)]
    pub checks_file: Option<PathBuf>,
    /// Time each check may run before it counts as failed (seconds, or e.g. 2m) [default: 60s] [config: health-timeout].
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Reboot when a check failed (after marking the slot bad).
    #[arg(long)]
    pub reboot: bool,
    /// Mark the slot good even if its content does not match its slot record.
    #[arg(long)]
    pub force: bool,
    /// When a check fails on a committed (successful) slot, mark it bad anyway (by default
    /// only a slot on trial is marked bad; a committed one is reported with exit 6).
    #[arg(long)]
    pub mark_bad_committed: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `set-attributes`.
#[derive(Args, Debug)]
pub struct SetAttributesArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// Slot label or letter.
    #[arg(long)]
    pub slot: String,
    /// Priority 0-15.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=15))]
    pub priority: Option<u8>,
    /// Tries 0-15.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=15))]
    pub tries: Option<u8>,
    /// Successful flag 0 or 1.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub successful: Option<u8>,
    /// Allow making a slot bootable whose content does not match its slot record.
    #[arg(long)]
    pub force: bool,
}

/// The merged settings of `commit`.
#[derive(Debug)]
pub struct CommitSettings {
    /// The disk.
    pub disk: DiskSpec,
    /// The slot named by `--slot`.
    pub slot: Option<String>,
    /// The checks: flags and checks file, else the configuration file.
    pub checks: Vec<String>,
    /// Time each check may run.
    pub timeout: Duration,
    /// Force and mark-bad-committed.
    pub policy: CommitPolicy,
    /// Reboot after a failed check.
    pub reboot: bool,
    /// Machine-readable output.
    pub json: bool,
}

impl CommitSettings {
    /// Merges `commit`'s flags, its checks file and the configuration file.
    pub fn merge(args: CommitArgs, cfg: &Loaded) -> Result<Self> {
        let mut checks = args.checks;
        if let Some(file) = &args.checks_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading checks file {}", file.display()))?;
            checks.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if checks.is_empty() {
            checks = cfg.config.health_checks.clone().unwrap_or_default();
        }
        let timeout = args
            .timeout
            .or(cfg.config.health_timeout)
            .unwrap_or(Duration::from_secs(60));
        Ok(Self {
            disk: args.disk.merge(cfg)?,
            slot: args.slot.slot,
            checks,
            timeout,
            policy: CommitPolicy {
                force: args.force,
                mark_bad_committed: args.mark_bad_committed,
            },
            reboot: args.reboot,
            json: args.json,
        })
    }
}

/// The slot named by `--slot`, else the detected running slot.
fn target_slot(
    disk: &AbDisk<FileDevice>,
    settings: &DiskSpec,
    slot: Option<&str>,
) -> Result<usize> {
    let slots = disk.slots()?;
    running::find(disk, &slots, slot, Fallback::Nothing)?
        .map(|r| r.index)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell which slot of {} is running (not in /proc/cmdline, {}, or the root device): pass --slot",
                settings.path.display(),
                running::MARKER_FILE
            )
        })
}

/// Opens the disk locked and finds the slot an operation applies to.
fn open_with_slot(
    flags: &DiskFlags,
    slot: Option<&str>,
    cfg: &Loaded,
) -> Result<(AbDisk<FileDevice>, usize)> {
    let settings = flags.merge(cfg)?;
    let disk = settings.open_locked()?;
    let index = target_slot(&disk, &settings, slot)?;
    Ok((disk, index))
}

/// Runs the boot hook.
pub fn boot(args: BootArgs, cfg: &Loaded) -> Result<()> {
    let settings = args.disk.merge(cfg)?;
    let mut disk = settings.open_locked()?;
    let is_block = disk.dev.is_block_device();
    // No command line to read (not Linux, no /proc): nothing was chosen before us.
    let cmdline = std::fs::read_to_string(&args.kernel_cmdline).unwrap_or_default();
    let decision = crate::boot::hook::boot(&mut disk, &settings.path, is_block, &cmdline)?;
    match args.format {
        BootFormat::Env => print!("{}", decision.to_env()),
        BootFormat::Json => println!("{}", serde_json::to_string(&decision)?),
        BootFormat::Cmdline => println!("{}", decision.to_cmdline()),
    }
    Ok(())
}

/// Runs `mark-good`.
pub fn mark_good(args: MarkGoodArgs, cfg: &Loaded) -> Result<()> {
    let (mut disk, index) = open_with_slot(&args.disk, args.slot.slot.as_deref(), cfg)?;
    let change = crate::boot::slot_ops::mark_good(&mut disk, index, args.force)?;
    print_change(&change, "mark-good", args.json)
}

/// Runs `mark-bad`.
pub fn mark_bad(args: MarkBadArgs, cfg: &Loaded) -> Result<()> {
    let (mut disk, index) = open_with_slot(&args.disk, args.slot.slot.as_deref(), cfg)?;
    let change = crate::boot::slot_ops::mark_bad(&mut disk, index, args.force)?;
    print_change(&change, "mark-bad", args.json)
}

/// Runs `rollback`.
pub fn rollback(args: RollbackArgs, cfg: &Loaded) -> Result<()> {
    let (mut disk, running) = open_with_slot(&args.disk, args.slot.as_deref(), cfg)?;
    let change = crate::boot::slot_ops::rollback(&mut disk, running)?;
    print_change(&change, "rollback", args.json)
}

/// Runs `commit`.
pub fn commit(args: CommitArgs, cfg: &Loaded) -> Result<()> {
    let s = CommitSettings::merge(args, cfg)?;
    let mut disk = s.disk.open_locked()?;
    let index = target_slot(&disk, &s.disk, s.slot.as_deref())?;
    let json = s.json;
    let result = crate::boot::health::commit(
        &mut disk,
        index,
        &s.checks,
        s.timeout,
        s.policy,
        |check, outcome| {
            if !json {
                eprintln!("check {check}: {outcome}");
            }
        },
    );
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_change(&report.change, "mark-good", false)?;
            }
            Ok(())
        }
        // A committed slot was left as it was: rebooting would not change what boots.
        Err(err @ CommitError::CheckFailedOnCommittedSlot { .. }) => Err(err.into()),
        Err(err) => {
            if s.reboot {
                eprintln!("abupdate: error: {err}");
                eprintln!("abupdate: rebooting");
                let _ = std::process::Command::new("reboot").status();
            }
            Err(err.into())
        }
    }
}

/// Runs `set-attributes`.
pub fn set_attributes(args: SetAttributesArgs, cfg: &Loaded) -> Result<()> {
    let settings = args.disk.merge(cfg)?;
    let mut disk = settings.open_locked()?;
    let slots = disk.slots()?;
    let index = disk.slot_index(&slots, &args.slot)?;
    let mut a = slots[index].attrs;
    if let Some(p) = args.priority {
        a = a.with_priority(p);
    }
    if let Some(t) = args.tries {
        a = a.with_tries(t);
    }
    if let Some(s) = args.successful {
        a = a.with_successful(s == 1);
    }
    let change = crate::boot::slot_ops::set_attributes(&mut disk, index, a, args.force)?;
    println!(
        "{}: {} -> {} ({} bytes written)",
        change.slot, change.before, change.after, change.bytes_written
    );
    Ok(())
}
