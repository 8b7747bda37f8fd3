//! The `abupdate` command line: a thin layer over the library. Errors become one line on
//! stderr and an exit code from the table in README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
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
        /// Mark it bad even if no other slot is bootable (the device will not boot).
        #[arg(long)]
        force: bool,
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
        /// A file of checks, one command per line (blank lines and # comments ignored).
        #[arg(long)]
        checks_file: Option<PathBuf>,
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
    /// Generate an ed25519 signing key pair: NAME.key (mode 0600) and NAME.pub.
    Keygen {
        /// Output name (NAME.key and NAME.pub are written; neither may exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Bundle creation and inspection.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Verify a bundle and stream it into the inactive slot, then make that slot boot next.
    Install {
        /// Bundle file, block device holding a bundle, or `-` for stdin.
        bundle: PathBuf,
        #[command(flatten)]
        disk: DiskArgs,
        /// Trusted public key file or directory of *.pub files.
        #[arg(long, default_value = "/etc/abupdate/keys")]
        keyring: PathBuf,
        /// Tries given to the new slot before it falls back.
        #[arg(long, default_value_t = abupdate::select::DEFAULT_TRIES, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: u8,
        /// This device's compatible string (default: the running slot's recorded one).
        #[arg(long)]
        compatible: Option<String>,
        /// Allow a version lower than the running slot's.
        #[arg(long)]
        allow_downgrade: bool,
        /// The running slot, when it cannot be detected (default: the slot that boots next).
        #[arg(long)]
        running: Option<String>,
        /// Reboot-required sentinel path, for fleet reboot coordinators such as kured.
        #[arg(long, default_value = abupdate::install::DEFAULT_SENTINEL)]
        sentinel: PathBuf,
        /// Do not write the sentinel.
        #[arg(long)]
        no_sentinel: bool,
        /// Reboot once the install succeeded.
        #[arg(long)]
        reboot: bool,
        /// JSON lines: one object per progress event, then the report.
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
enum BundleCommand {
    /// Compress (zstd, all cores), hash and sign an image into a bundle.
    Create {
        /// The raw image (e.g. an ext4 or erofs root filesystem).
        #[arg(long)]
        image: PathBuf,
        /// Secret key file (from `abupdate keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Image version string.
        #[arg(long)]
        version: String,
        /// Compatible string: which devices the image is for.
        #[arg(long)]
        compatible: String,
        /// Output bundle file.
        #[arg(long)]
        out: PathBuf,
        /// Uncompressed chunk size (64K to 64M, power of two).
        #[arg(long, value_parser = parse_size, default_value = "4M")]
        chunk_size: u64,
    },
    /// Show a bundle's header (and check its signature when a keyring is given).
    Info {
        /// The bundle file.
        bundle: PathBuf,
        /// Trusted key file or directory, to check the signature.
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fully verify a bundle: signature, every chunk, the whole-image hash.
    Verify {
        /// The bundle file.
        bundle: PathBuf,
        /// Trusted key directory (any *.pub in it may have signed).
        #[arg(long, conflicts_with = "pubkey", required_unless_present = "pubkey")]
        keyring: Option<PathBuf>,
        /// A single trusted public key file.
        #[arg(long)]
        pubkey: Option<PathBuf>,
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
        /// Factory image: a bundle verified and written into ROOT-A (which stays the good slot).
        #[arg(long, requires = "keyring")]
        seed: Option<PathBuf>,
        /// Trusted key file or directory for --seed.
        #[arg(long)]
        keyring: Option<PathBuf>,
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
    let is_block = disk.dev.is_block_device();
    let decision = abupdate::boot::boot(&mut disk, &args.disk, is_block)?;
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

/// Progress display: a bar on a terminal, plain lines otherwise, nothing with --json.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain_next: u64,
    label: String,
    quiet: bool,
}

impl Progress {
    fn new(label: &str, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Self {
            bar,
            plain_next: 0,
            label: label.to_string(),
            quiet,
        }
    }

    fn set_label(&mut self, label: &str) {
        self.label = label.to_string();
        self.plain_next = 0;
        if let Some(bar) = &self.bar {
            bar.set_message(label.to_string());
            bar.set_position(0);
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if done >= self.plain_next || done == total {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            eprintln!("{}: {} / {} bytes ({pct}%)", self.label, done, total);
            self.plain_next = done + total / 10;
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn load_keyring(path: &std::path::Path) -> Result<abupdate::bundle::Keyring> {
    Ok(abupdate::bundle::Keyring::load(path)?)
}

#[allow(clippy::too_many_arguments)]
fn install_cmd(
    bundle: &std::path::Path,
    args: &DiskArgs,
    keyring: &std::path::Path,
    mut options: abupdate::install::InstallOptions,
    sentinel: PathBuf,
    no_sentinel: bool,
    reboot: bool,
    json: bool,
) -> Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let cancel = Arc::new(AtomicBool::new(false));
    // The first signal asks the pipeline to stop at the next chunk (target left unbootable);
    // a second one exits at once, e.g. when the bundle source itself has stalled. Either way
    // the target was invalidated before its first byte changed.
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            signal,
            Exit::Interrupted as i32,
            Arc::clone(&cancel),
        )?;
        signal_hook::flag::register(signal, Arc::clone(&cancel))?;
    }
    options.sentinel = (!no_sentinel).then_some(sentinel);
    let keyring = load_keyring(keyring)?;
    let mut disk = open_disk_locked(args)?;
    let source = abupdate::install::open_bundle_source(bundle)?;
    let mut progress = Progress::new("writing", json);
    let result = abupdate::install::install(
        &mut disk,
        source,
        &keyring,
        &options,
        &cancel,
        &mut |event| {
            use abupdate::install::InstallEvent as E;
            if json {
                if let Ok(line) = serde_json::to_string(&event) {
                    println!("{line}");
                }
                return;
            }
            match &event {
                E::Verified {
                    version,
                    compatible,
                    image_size,
                    key_id,
                } => {
                    eprintln!("signature ok (key {key_id}): version {version}, compatible {compatible}, {image_size} bytes")
                }
                E::Plan {
                    running,
                    running_source,
                    target,
                } => {
                    eprintln!("running slot {running} (from {running_source}); target {target}")
                }
                E::TargetInvalidated {
                    target,
                    path,
                    direct_io,
                } => eprintln!(
                    "{target} marked unbootable; writing via {path}{}",
                    if *direct_io { " (O_DIRECT)" } else { "" }
                ),
                E::Written { bytes, total } => progress.update(*bytes, *total),
                E::ReadBack { bytes, total } => {
                    if progress.label != "verifying" {
                        progress.set_label("verifying");
                    }
                    progress.update(*bytes, *total)
                }
                E::ReadbackVerified { sha256 } => {
                    progress.finish();
                    eprintln!("read-back matches signed hash {sha256}");
                }
                E::Activated { slot, attributes } => eprintln!("{slot} boots next: {attributes}"),
            }
        },
    );
    progress.finish();
    let report = result?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({"event": "done", "report": report}))?
        );
    } else {
        println!(
            "installed {} into {} ({} bytes in {:.2} s: write {:.2} s, flush + verify {:.2} s); reboot to try it",
            report.version, report.target, report.image_size, report.total_seconds, report.write_seconds, report.verify_seconds
        );
    }
    if reboot {
        drop(disk);
        let status = std::process::Command::new("reboot").status()?;
        anyhow::ensure!(status.success(), "reboot failed: {status}");
    }
    Ok(())
}

fn bundle_cmd(cmd: BundleCommand) -> Result<()> {
    use abupdate::bundle::{cli_support, keys};
    match cmd {
        BundleCommand::Create {
            image,
            key,
            version,
            compatible,
            out,
            chunk_size,
        } => {
            let secret = keys::read_secret_key(&key)?;
            let chunk_size = u32::try_from(chunk_size)
                .map_err(|_| anyhow::anyhow!("chunk size {chunk_size} is too large"))?;
            let mut progress = Progress::new("compressing", false);
            let header = abupdate::bundle::create_bundle(
                &image,
                &secret,
                &version,
                &compatible,
                chunk_size,
                &out,
                &mut |d, t| progress.update(d, t),
            )?;
            progress.finish();
            println!(
                "created {}: version {}, compatible {}, {} bytes in {} chunks, {} bytes on disk",
                out.display(),
                header.image_version,
                header.compatible,
                header.image_size,
                header.chunk_count(),
                header.bundle_len()
            );
            Ok(())
        }
        BundleCommand::Info {
            bundle,
            keyring,
            json,
        } => {
            let ring = keyring.as_deref().map(load_keyring).transpose()?;
            let report = cli_support::info(&bundle, ring.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json(true))?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        BundleCommand::Verify {
            bundle,
            keyring,
            pubkey,
            json,
        } => {
            let ring = load_keyring(
                keyring
                    .as_deref()
                    .or(pubkey.as_deref())
                    .expect("clap requires one"),
            )?;
            let mut progress = Progress::new("verifying", json);
            let report = cli_support::verify(&bundle, &ring, 0, &mut |d, t| progress.update(d, t))?;
            progress.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: OK, signed by key {}, version {}, compatible {}, {} bytes, sha256 {} ({:.2} s)",
                    bundle.display(),
                    report.key_id,
                    report.image_version,
                    report.compatible,
                    report.image_size,
                    report.image_sha256,
                    report.seconds
                );
            }
            Ok(())
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
            seed,
            keyring,
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
            if let (Some(seed), Some(keyring)) = (seed, keyring) {
                let ring = load_keyring(&keyring)?;
                let args = DiskArgs {
                    disk: file.clone(),
                    sector_size: Some(sector_size),
                    labels: spec.labels.to_vec(),
                };
                let seeded = (|| -> Result<()> {
                    let mut disk = open_disk_locked(&args)?;
                    let source = abupdate::install::open_bundle_source(&seed)?;
                    let written =
                        abupdate::install::seed_slot(&mut disk, 0, source, &ring, &mut |_| {})?;
                    let slot_a = disk.slots()?.remove(0);
                    let record = abupdate::footer::read_record(&mut disk.dev, &slot_a, sector_size);
                    println!(
                        "seeded {} with {} ({:.2} s, verified)",
                        spec.labels[0],
                        record.map(|r| r.version).unwrap_or_default(),
                        written.write_seconds + written.verify_seconds
                    );
                    Ok(())
                })();
                if seeded.is_err() {
                    // A half-made disk is worse than none.
                    let _ = std::fs::remove_file(&file);
                }
                seeded?;
            }
            Ok(())
        }
        Command::Status {
            disk,
            running,
            json,
        } => status(&disk, running.as_deref(), json),
        Command::Boot { disk, format } => boot_hook(&disk, format),
        Command::Keygen { out } => {
            let report = abupdate::bundle::cli_support::keygen(&out)?;
            println!(
                "wrote {} (secret, mode 0600) and {} (public), key id {}",
                report.secret_path.display(),
                report.public_path.display(),
                report.key_id
            );
            Ok(())
        }
        Command::Bundle(cmd) => bundle_cmd(cmd),
        Command::Install {
            bundle,
            disk,
            keyring,
            tries,
            compatible,
            allow_downgrade,
            running,
            sentinel,
            no_sentinel,
            reboot,
            json,
        } => {
            let options = abupdate::install::InstallOptions {
                tries,
                allow_downgrade,
                compatible,
                running,
                ..Default::default()
            };
            install_cmd(
                &bundle,
                &disk,
                &keyring,
                options,
                sentinel,
                no_sentinel,
                reboot,
                json,
            )
        }
        Command::MarkGood { disk, slot, json } => {
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_good(&mut ab, index)?;
            print_change(&change, "mark-good", json)
        }
        Command::MarkBad {
            disk,
            slot,
            force,
            json,
        } => {
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_bad(&mut ab, index, force)?;
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
            mut checks,
            checks_file,
            timeout,
            reboot,
            json,
        } => {
            if let Some(file) = checks_file {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading checks file {}", file.display()))?;
                checks.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            commit_cmd(&disk, slot.slot.as_deref(), &checks, timeout, reboot, json)
        }
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

/// Maps an error to the documented exit code: the first cause the library classifies.
fn classify(err: &anyhow::Error) -> Exit {
    err.chain()
        .find_map(abupdate::exit::classify_error)
        .unwrap_or(Exit::Failure)
}
