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
#[command(name = "abupdate", version, about = "A/B root partition updates for GPT disks")]
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
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

fn open_disk(args: &DiskArgs, writable: bool) -> Result<AbDisk<FileDevice>> {
    let dev = FileDevice::open(&args.disk, writable, args.sector_size)?;
    let disk = AbDisk::open(dev, &args.disk.display().to_string(), &args.labels)?;
    Ok(disk)
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
        report.slots[i].version = footer::read_record(&mut disk.dev, slot, sector_size).map(|r| r.version);
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
        Command::Status { disk, running, json } => status(&disk, running.as_deref(), json),
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
        if cause.downcast_ref::<GptError>().is_some() || cause.downcast_ref::<SlotError>().is_some() {
            return Exit::Disk;
        }
        if let Some(exit) = abupdate::exit::classify_error(cause) {
            return exit;
        }
    }
    Exit::Failure
}
