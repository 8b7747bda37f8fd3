//! The `abupdate` command line: a thin layer over the library. Errors become one line on
//! stderr and an exit code from the table in README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use abupdate::blockdev::FileDevice;
use abupdate::exit::Exit;
use abupdate::init::{create_disk_image, InitSpec};
use abupdate::slots::{AbDisk, DEFAULT_LABELS};
use abupdate::{footer, running};

#[derive(Parser)]
#[command(
    name = "abupdate",
    version,
    about = "A/B root partition updates for GPT disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options naming the disk and its slots, shared by every command that opens one.
#[derive(Args, Clone)]
struct DiskArgs {
    /// Disk image file or block device holding the A/B slots.
    #[arg(long, env = "ABUPDATE_DISK")]
    disk: PathBuf,
    /// Logical sector size of a disk image file (block devices report their own).
    #[arg(long)]
    sector_size: Option<u32>,
    /// Slot partition labels, A first.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_LABELS.map(String::from))]
    labels: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Disk preparation.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Show the slots, their attributes and the health of both GPT copies.
    Status {
        #[command(flatten)]
        disk: DiskArgs,
        /// The running slot, when this is not the live disk.
        #[arg(long)]
        running: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot-time hook: choose the slot to boot, spend a try, print what to mount.
    Boot {
        #[command(flatten)]
        disk: DiskArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "env")]
        format: BootFormat,
    },
    /// Mark a slot (default: the running one) good: successful, no tries, boots next.
    MarkGood {
        #[command(flatten)]
        disk: DiskArgs,
        #[command(flatten)]
        slot: SlotArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Mark a slot (default: the running one) bad: priority 0, tries 0, not successful.
    MarkBad {
        #[command(flatten)]
        disk: DiskArgs,
        #[command(flatten)]
        slot: SlotArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make the other slot boot next, only if it is marked successful.
    Rollback {
        #[command(flatten)]
        disk: DiskArgs,
        /// The running slot, when it cannot be detected.
        #[arg(long)]
        slot: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Post-boot health commit: run checks, then mark the running slot good or bad.
    Commit {
        #[command(flatten)]
        disk: DiskArgs,
        #[command(flatten)]
        slot: SlotArg,
        /// A health check command (run with sh -c; exit 0 = healthy). Repeatable.
        #[arg(long = "check")]
        checks: Vec<String>,
        /// Seconds each check may run before it counts as failed.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Reboot when a check failed (after marking the slot bad).
        #[arg(long)]
        reboot: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Low-level: set a slot's cgpt attributes directly (like `cgpt add -P -T -S`).
    SetAttributes {
        #[command(flatten)]
        disk: DiskArgs,
        /// Slot label or letter.
        #[arg(long)]
        slot: String,
        /// Priority 0-15.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=15))]
        priority: Option<u8>,
        /// Tries 0-15.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=15))]
        tries: Option<u8>,
        /// Successful flag 0 or 1.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
        successful: Option<u8>,
    },
}

/// Output format of the boot hook.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BootFormat {
    /// Shell `KEY=value` lines to `eval`.
    Env,
    /// One JSON object.
    Json,
    /// `root=PARTUUID=… abupdate.slot=…`.
    Cmdline,
}

/// Names the slot an operation applies to.
#[derive(Args, Clone)]
struct SlotArg {
    /// Slot label or letter (A, B); default: the running slot.
    #[arg(long)]
    slot: Option<String>,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a file-backed A/B disk image (protective MBR, GPT, ROOT-A good, ROOT-B empty).
    Init {
        /// Image file to create (must not exist).
        file: PathBuf,
        /// Size of each slot (e.g. 512M, 1G).
        #[arg(long, value_parser = parse_size)]
        slot_size: u64,
        /// Total disk size (default: both slots plus 16 MiB spare and GPT).
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// Logical sector size, 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// Slot partition labels, A first.
        #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = DEFAULT_LABELS.map(String::from))]
        labels: Vec<String>,
        /// Partition type GUID of the slots (default: Linux root x86-64).
        #[arg(long, default_value = abupdate::init::LINUX_ROOT_X86_64)]
        type_guid: String,
    },
}

/// Parses `123`, `4K`, `64M`, `1G`, `2T` (binary units; a trailing `iB` or `B` is accepted).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn open_disk(args: &DiskArgs, writable: bool) -> Result<AbDisk<FileDevice>> {
    let dev = FileDevice::open(&args.disk, writable, args.sector_size)?;
    let disk = AbDisk::open(dev, &args.disk.display().to_string(), &args.labels)?;
    Ok(disk)
}

/// Opens the disk writable and takes the abupdate lock.
fn open_disk_locked(args: &DiskArgs) -> Result<AbDisk<FileDevice>> {
    let dev = FileDevice::open(&args.disk, true, args.sector_size)?;
    dev.lock()?;
    Ok(AbDisk::open(
        dev,
        &args.disk.display().to_string(),
        &args.labels,
    )?)
}

/// The slot named by `--slot`, else the detected running slot.
fn target_slot(disk: &AbDisk<FileDevice>, args: &DiskArgs, slot: Option<&str>) -> Result<usize> {
    let slots = disk.slots()?;
    if let Some(name) = slot {
        return Ok(disk.slot_index(&slots, name)?);
    }
    running::detect(&args.disk, disk.dev.is_block_device(), &slots)
        .map(|(i, _)| i)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell which slot of {} is running (not in /proc/cmdline, {}, or the root device): pass --slot",
                args.disk.display(),
                running::MARKER_FILE
            )
        })
}

fn print_change(change: &abupdate::commit::SlotChange, verb: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(change)?);
    } else if change.bytes_written == 0 {
        println!(
            "{}: {} already {} ({}); nothing written",
            verb, change.slot, change.after, verb
        );
    } else {
        println!(
            "{}: {} {} -> {}",
            verb, change.slot, change.before, change.after
        );
    }
    Ok(())
}

fn boot_hook(args: &DiskArgs, format: BootFormat) -> Result<()> {
    let mut disk = open_disk_locked(args)?;
    let decision = abupdate::boot::boot(&mut disk, &args.disk)?;
    match format {
        BootFormat::Env => print!("{}", decision.to_env()),
        BootFormat::Json => println!("{}", serde_json::to_string(&decision)?),
        BootFormat::Cmdline => println!("{}", decision.to_cmdline()),
    }
    Ok(())
}

fn commit_cmd(
    args: &DiskArgs,
    slot: Option<&str>,
    checks: &[String],
    timeout: u64,
    reboot: bool,
    json: bool,
) -> Result<()> {
    let mut disk = open_disk_locked(args)?;
    let index = target_slot(&disk, args, slot)?;
    let result = abupdate::commit::commit(
        &mut disk,
        index,
        checks,
        std::time::Duration::from_secs(timeout),
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
        Err(err) => {
            if reboot {
                eprintln!("abupdate: error: {err}");
                eprintln!("abupdate: rebooting");
                let _ = std::process::Command::new("reboot").status();
            }
            Err(err.into())
        }
    }
}

fn status(args: &DiskArgs, running_name: Option<&str>, json: bool) -> Result<()> {
    let mut disk = open_disk(args, false)?;
    let mut report = disk.status()?;
    let slots = disk.slots()?;
    let running = match running_name {
        Some(name) => Some(disk.slot_index(&slots, name)?),
        None => running::detect(&args.disk, disk.dev.is_block_device(), &slots).map(|(i, _)| i),
    };
    let sector_size = disk.gpt.sector_size();
    for (i, slot) in slots.iter().enumerate() {
        report.slots[i].running = running == Some(i);
        report.slots[i].version =
            footer::read_record(&mut disk.dev, slot, sector_size).map(|r| r.version);
    }
    report.running = running.map(|i| slots[i].name.clone());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Disk(DiskCommand::Init {
            file,
            slot_size,
            disk_size,
            sector_size,
            labels,
            type_guid,
        }) => {
            let spec = InitSpec {
                slot_size,
                disk_size,
                sector_size,
                labels: [labels[0].clone(), labels[1].clone()],
                type_guid,
            };
            create_disk_image(&file, &spec)?;
            println!(
                "created {} ({} bytes): {} and {} of {} bytes each, {} boots next",
                file.display(),
                spec.effective_disk_size(),
                spec.labels[0],
                spec.labels[1],
                slot_size,
                spec.labels[0]
            );
            Ok(())
        }
        Command::Status {
            disk,
            running,
            json,
        } => status(&disk, running.as_deref(), json),
        Command::Boot { disk, format } => boot_hook(&disk, format),
        Command::MarkGood { disk, slot, json } => {
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_good(&mut ab, index)?;
            print_change(&change, "mark-good", json)
        }
        Command::MarkBad { disk, slot, json } => {
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_bad(&mut ab, index)?;
            print_change(&change, "mark-bad", json)
        }
        Command::Rollback { disk, slot, json } => {
            let mut ab = open_disk_locked(&disk)?;
            let running = target_slot(&ab, &disk, slot.as_deref())?;
            let change = abupdate::commit::rollback(&mut ab, running)?;
            print_change(&change, "rollback", json)
        }
        Command::Commit {
            disk,
            slot,
            checks,
            timeout,
            reboot,
            json,
        } => commit_cmd(&disk, slot.slot.as_deref(), &checks, timeout, reboot, json),
        Command::SetAttributes {
            disk,
            slot,
            priority,
            tries,
            successful,
        } => {
            let mut ab = open_disk_locked(&disk)?;
            let slots = ab.slots()?;
            let index = ab.slot_index(&slots, &slot)?;
            let mut new: Vec<_> = slots.iter().map(|s| s.attrs).collect();
            let mut a = new[index];
            if let Some(p) = priority {
                a = a.with_priority(p);
            }
            if let Some(t) = tries {
                a = a.with_tries(t);
            }
            if let Some(s) = successful {
                a = a.with_successful(s == 1);
            }
            new[index] = a;
            let written = ab.write_slot_attributes(&slots, &new)?;
            println!(
                "{}: {} -> {} ({} bytes written)",
                slots[index].name, slots[index].attrs, a, written
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = classify(&err);
            eprintln!("abupdate: error: {}", one_line(&err));
            ExitCode::from(code as u8)
        }
    }
}

/// The error and its causes on one line, without repeating a cause its parent already shows.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Maps an error to the documented exit code by looking for the library's error types.
fn classify(err: &anyhow::Error) -> Exit {
    use abupdate::blockdev::OpenError;
    use abupdate::gpt::GptError;
    use abupdate::slots::SlotError;
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<OpenError>() {
            return match e {
                OpenError::Locked { .. } => Exit::Busy,
                _ => Exit::Disk,
            };
        }
        if cause.downcast_ref::<GptError>().is_some() || cause.downcast_ref::<SlotError>().is_some()
        {
            return Exit::Disk;
        }
        if let Some(e) = cause.downcast_ref::<abupdate::boot::BootError>() {
            return match e {
                abupdate::boot::BootError::NoBootableSlot { .. } => Exit::NoBootableSlot,
                abupdate::boot::BootError::Slot(_) => Exit::Disk,
            };
        }
        if let Some(e) = cause.downcast_ref::<abupdate::commit::CommitError>() {
            match e {
                abupdate::commit::CommitError::CheckFailed { .. } => {
                    return Exit::HealthCheckFailed
                }
                abupdate::commit::CommitError::RollbackRefused { .. } => return Exit::Refused,
                abupdate::commit::CommitError::Slot(_) => return Exit::Disk,
                abupdate::commit::CommitError::NotTwoSlots(_) => return Exit::Disk,
            }
        }
        if let Some(exit) = abupdate::exit::classify_error(cause) {
            return exit;
        }
    }
    Exit::Failure
}
