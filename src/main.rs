//! The `abupdate` command line: a thin layer over the library. Errors become one line on
//! stderr and an exit code from the table in README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use abupdate::blockdev::FileDevice;
use abupdate::bundle::cli_support::parse_size;
use abupdate::bundle::{BundleSource, Keyring};
use abupdate::channel::{Found, SlotView, Verdict};
use abupdate::config::{parse_duration, Loaded, RebootPolicy, Strategy};
use abupdate::exit::Exit;
use abupdate::http::{EventSink, Expected, FetchEvent, FetchOptions, FetchSummary, Fetcher};
use abupdate::init::{create_disk_image, InitSpec};
use abupdate::install::{InstallOptions, InstallReport};
use abupdate::layout::SlotLabels;
use abupdate::slots::{AbDisk, DEFAULT_LABELS};
use abupdate::{footer, running};

#[derive(Parser)]
#[command(
    name = "abupdate",
    version,
    about = "A/B root partition updates for GPT disks"
)]
struct Cli {
    /// Configuration file (default /etc/abupdate.toml, which may be absent; a file named here
    /// must exist). Flags override its settings.
    #[arg(long, global = true, env = "ABUPDATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Options naming the disk and its slots, shared by every command that opens one; each falls
/// back to the configuration file.
#[derive(Args, Clone)]
struct DiskFlags {
    /// Disk image file or block device holding the A/B slots [config: disk].
    #[arg(long, env = "ABUPDATE_DISK")]
    disk: Option<PathBuf>,
    /// Logical sector size of a disk image file (block devices report their own) [config: sector-size].
    #[arg(long)]
    sector_size: Option<u32>,
    /// Slot partition labels, A first: two different labels, each on exactly one partition of
    /// the same type [default: ROOT-A,ROOT-B] [config: labels].
    #[arg(long, env = "ABUPDATE_LABELS", value_delimiter = ',', num_args = 1..)]
    labels: Option<Vec<String>>,
}

/// The disk settings after flags and configuration are merged.
#[derive(Clone)]
struct DiskArgs {
    disk: PathBuf,
    sector_size: Option<u32>,
    labels: SlotLabels,
}

/// Download behaviour; each flag falls back to the configuration file's `[fetch]` table.
#[derive(Args, Clone, Default)]
struct FetchFlags {
    /// Reconnections allowed per download [default: 10] [config: fetch.retries].
    #[arg(long)]
    retries: Option<u32>,
    /// First back-off delay, doubling per failure in a row (e.g. 500ms, 2s) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    retry_delay: Option<Duration>,
    /// Cap of the back-off delay [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    max_retry_delay: Option<Duration>,
    /// Connect timeout [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// Read timeout: per read, for response headers, and the low-speed window [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    read_timeout: Option<Duration>,
    /// Bytes/s below which a connection counts as stalled, 0 = off [default: 1024].
    #[arg(long)]
    low_speed_limit: Option<u64>,
    /// Redirects followed per request [default: 10].
    #[arg(long)]
    max_redirects: Option<u32>,
    /// PEM file of trusted CA certificates [default: built-in Mozilla roots].
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// Channel and policy options shared by `check` and `update`.
#[derive(Args, Clone)]
struct ChannelFlags {
    /// Channel index URL; repeat for mirrors, tried in order [config: channel].
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Trusted public key file or directory of *.pub files [default: /etc/abupdate/keys] [config: keyring].
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// This device's compatible string (default: the running slot's recorded one) [config: compatible].
    #[arg(long)]
    compatible: Option<String>,
    /// The running slot, when it cannot be detected (default: the slot that boots next).
    #[arg(long)]
    running: Option<String>,
}

/// What happens after an install.
#[derive(Args, Clone)]
struct RebootFlags {
    /// Reboot-required sentinel path, for fleet reboot coordinators such as kured [default: /run/reboot-required] [config: sentinel].
    #[arg(long)]
    sentinel: Option<PathBuf>,
    /// Do not write the sentinel (reboot policy `none`).
    #[arg(long)]
    no_sentinel: bool,
    /// Reboot once the install succeeded (reboot policy `now`).
    #[arg(long)]
    reboot: bool,
    /// Reboot policy: sentinel, now or none [default: sentinel] [config: reboot].
    #[arg(long, value_enum)]
    reboot_policy: Option<RebootPolicy>,
}

#[derive(Subcommand)]
enum Command {
    /// Disk preparation.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Show the slots, their attributes and the health of both GPT copies.
    Status {
        #[command(flatten)]
        disk: DiskFlags,
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
        disk: DiskFlags,
        /// Output format.
        #[arg(long, value_enum, default_value = "env")]
        format: BootFormat,
    },
    /// Mark a slot (default: the running one) good: successful, no tries, boots next.
    MarkGood {
        #[command(flatten)]
        disk: DiskFlags,
        #[command(flatten)]
        slot: SlotArg,
        /// Mark it good even if its content does not match its slot record (or it has none,
        /// as after an interrupted install).
        #[arg(long)]
        force: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Mark a slot (default: the running one) bad: priority 0, tries 0, not successful.
    MarkBad {
        #[command(flatten)]
        disk: DiskFlags,
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
        disk: DiskFlags,
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
        disk: DiskFlags,
        #[command(flatten)]
        slot: SlotArg,
        /// A health check command (run with sh -c; exit 0 = healthy). Repeatable [config: health-checks, used when neither --check nor --checks-file is given].
        #[arg(long = "check")]
        checks: Vec<String>,
        /// A file of checks, one command per line (blank lines and # comments ignored).
        #[arg(long)]
        checks_file: Option<PathBuf>,
        /// Time each check may run before it counts as failed (seconds, or e.g. 2m) [default: 60s] [config: health-timeout].
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Reboot when a check failed (after marking the slot bad).
        #[arg(long)]
        reboot: bool,
        /// Mark the slot good even if its content does not match its slot record.
        #[arg(long)]
        force: bool,
        /// When a check fails on a committed (successful) slot, mark it bad anyway (by default
        /// only a slot on trial is marked bad; a committed one is reported with exit 6).
        #[arg(long)]
        mark_bad_committed: bool,
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
        /// Bundle file, block device holding a bundle, `-` for stdin, or an http(s):// URL
        /// (streamed into the slot with resume, never stored).
        bundle: PathBuf,
        #[command(flatten)]
        disk: DiskFlags,
        /// Trusted public key file or directory of *.pub files [default: /etc/abupdate/keys] [config: keyring].
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Tries given to the new slot before it falls back [default: 3] [config: tries].
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: Option<u8>,
        /// This device's compatible string (default: the running slot's recorded one) [config: compatible].
        #[arg(long)]
        compatible: Option<String>,
        /// Allow a version lower than the running slot's.
        #[arg(long)]
        allow_downgrade: bool,
        /// The running slot, when it cannot be detected (default: the slot that boots next).
        #[arg(long)]
        running: Option<String>,
        /// Adaptive install: copy every chunk the running slot already holds (found by its
        /// signed hash) instead of reading it from the bundle; a download skips those bytes
        /// with Range requests [config: adaptive].
        #[arg(long)]
        adaptive: bool,
        /// Run every check (signature, compatible, version, size, target not mounted) and,
        /// with --adaptive, make the plan; report what would happen and write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        reboot: RebootFlags,
        #[command(flatten)]
        fetch: FetchFlags,
        /// JSON lines: one object per progress event, then the report.
        #[arg(long)]
        json: bool,
    },
    /// Ask the update channel whether a newer compatible version than the running one exists.
    Check {
        #[command(flatten)]
        disk: DiskFlags,
        #[command(flatten)]
        channel: ChannelFlags,
        #[command(flatten)]
        fetch: FetchFlags,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Check the channel and act on the update strategy: install (auto), download and verify
    /// into the cache (download-only), or nothing (off); the reboot follows the reboot policy.
    Update {
        #[command(flatten)]
        disk: DiskFlags,
        #[command(flatten)]
        channel: ChannelFlags,
        /// auto, download-only or off [default: auto] [config: strategy].
        #[arg(long, value_enum)]
        strategy: Option<Strategy>,
        /// Download cache directory [default: /var/cache/abupdate] [config: cache-dir].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Tries given to the new slot before it falls back [default: 3] [config: tries].
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: Option<u8>,
        /// Adaptive install: download only the chunks the running slot does not already
        /// hold (see `install --adaptive`) [config: adaptive].
        #[arg(long)]
        adaptive: bool,
        #[command(flatten)]
        reboot: RebootFlags,
        #[command(flatten)]
        fetch: FetchFlags,
        /// JSON lines: one object per event, then a `done` object.
        #[arg(long)]
        json: bool,
    },
    /// Update channel publishing (operator side).
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Low-level: set a slot's cgpt attributes directly (like `cgpt add -P -T -S`).
    SetAttributes {
        #[command(flatten)]
        disk: DiskFlags,
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
        /// Allow making a slot bootable whose content does not match its slot record.
        #[arg(long)]
        force: bool,
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
enum ChannelCommand {
    /// Write the signed channel index for a bundle (version, compatible, size and image hash
    /// from its header), signed with the same key as bundles.
    Create {
        /// The bundle the channel offers.
        #[arg(long)]
        bundle: PathBuf,
        /// Secret key file (from `abupdate keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Bundle URL written into the index: absolute, or relative to the index's own URL
        /// [default: the bundle's file name, i.e. beside the index].
        #[arg(long)]
        bundle_url: Option<String>,
        /// Output index file.
        #[arg(long)]
        out: PathBuf,
        /// Nodes refuse the index this long after signing (e.g. `7d`), so a mirror that
        /// keeps serving a stale index is noticed. Re-sign the index before it runs out.
        #[arg(long, value_parser = parse_duration, conflicts_with = "expires_at")]
        expires_in: Option<Duration>,
        /// Nodes refuse the index from this UTC time on (RFC 3339, e.g.
        /// `2027-01-01T00:00:00Z`).
        #[arg(long, value_parser = parse_rfc3339_seconds)]
        expires_at: Option<u64>,
    },
}

/// Parses an RFC 3339 UTC time into Unix seconds.
fn parse_rfc3339_seconds(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("invalid time {s:?} ({e}); e.g. 2027-01-01T00:00:00Z"))?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("{s:?} is before 1970"))
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

#[allow(clippy::too_many_arguments)]
fn commit_cmd(
    args: &DiskArgs,
    slot: Option<&str>,
    checks: &[String],
    timeout: Duration,
    policy: abupdate::commit::CommitPolicy,
    reboot: bool,
    json: bool,
) -> Result<()> {
    let mut disk = open_disk_locked(args)?;
    let index = target_slot(&disk, args, slot)?;
    let result = abupdate::commit::commit(
        &mut disk,
        index,
        checks,
        timeout,
        policy,
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
        Err(err @ abupdate::commit::CommitError::CheckFailedOnCommittedSlot { .. }) => {
            Err(err.into())
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

// ---- Settings: flags over the configuration file over built-in defaults. ----

fn resolve_disk(flags: &DiskFlags, cfg: &Loaded) -> Result<DiskArgs> {
    let c = &cfg.config;
    let disk = flags
        .disk
        .clone()
        .or_else(|| c.disk.clone())
        .ok_or_else(|| cfg.unset("disk", "--disk (or ABUPDATE_DISK)", "disk"))?;
    // One check for every source of the setting (flag, ABUPDATE_LABELS, config file).
    let labels = match flags.labels.clone().or_else(|| c.labels.clone()) {
        Some(list) => SlotLabels::new(list)?,
        None => SlotLabels::default(),
    };
    Ok(DiskArgs {
        disk,
        sector_size: flags.sector_size.or(c.sector_size),
        labels,
    })
}

fn fetch_options(flags: &FetchFlags, cfg: &Loaded) -> FetchOptions {
    let base = cfg.config.fetch_options();
    FetchOptions {
        retries: flags.retries.unwrap_or(base.retries),
        retry_delay: flags.retry_delay.unwrap_or(base.retry_delay),
        max_retry_delay: flags.max_retry_delay.unwrap_or(base.max_retry_delay),
        connect_timeout: flags.connect_timeout.unwrap_or(base.connect_timeout),
        read_timeout: flags.read_timeout.unwrap_or(base.read_timeout),
        low_speed_limit: flags.low_speed_limit.unwrap_or(base.low_speed_limit),
        max_redirects: flags.max_redirects.unwrap_or(base.max_redirects),
        ca_file: flags.ca_file.clone().or(base.ca_file),
    }
}

fn keyring_path(flag: Option<&Path>, cfg: &Loaded) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| cfg.config.keyring.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING))
}

/// The reboot policy and the sentinel to write (none for policy `none`).
fn reboot_settings(flags: &RebootFlags, cfg: &Loaded) -> (RebootPolicy, Option<PathBuf>) {
    let policy = if flags.reboot {
        RebootPolicy::Now
    } else if flags.no_sentinel {
        RebootPolicy::None
    } else {
        flags
            .reboot_policy
            .or(cfg.config.reboot)
            .unwrap_or_default()
    };
    let sentinel = flags
        .sentinel
        .clone()
        .or_else(|| cfg.config.sentinel.clone())
        .unwrap_or_else(|| PathBuf::from(abupdate::install::DEFAULT_SENTINEL));
    let write = policy != RebootPolicy::None && !flags.no_sentinel;
    (policy, write.then_some(sentinel))
}

const DEFAULT_KEYRING: &str = "/etc/abupdate/keys";

fn json_line(value: &impl serde::Serialize) {
    if let Ok(line) = serde_json::to_string(value) {
        println!("{line}");
    }
}

/// SIGINT/SIGTERM set the returned flag; the install and downloads poll it.
fn cancel_flag() -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    // The first signal asks the pipeline to stop at the next chunk (target left unbootable)
    // and downloads to stop at their next wait; a second one exits at once, e.g. when the
    // bundle source itself has stalled. Either way the target was invalidated before its
    // first byte changed.
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            signal,
            Exit::Interrupted as i32,
            Arc::clone(&cancel),
        )?;
        signal_hook::flag::register(signal, Arc::clone(&cancel))?;
    }
    Ok(cancel)
}

/// Download events: JSON lines on stdout with --json, else retries and resumes on stderr.
fn fetch_sink(json: bool) -> EventSink {
    Arc::new(move |event: &FetchEvent| {
        if json {
            json_line(event);
        } else if !matches!(event, FetchEvent::FetchConnected { offset: 0, .. }) {
            eprintln!("fetch: {event}");
        }
    })
}

fn show_install_event(event: abupdate::install::InstallEvent, json: bool, progress: &mut Progress) {
    use abupdate::install::InstallEvent as E;
    if json {
        json_line(&event);
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
        } => eprintln!("running slot {running} (from {running_source}); target {target}"),
        E::AdaptivePlan {
            running,
            bytes_hashed,
            index_seconds,
            summary,
        } => eprintln!(
            "adaptive: hashed {} MiB of {running} in {index_seconds:.2} s; {} of {} chunks ({} MiB) found there, {} MiB of the bundle's payload still to read, {} MiB skipped",
            bytes_hashed >> 20,
            summary.reused_chunks,
            summary.chunks,
            summary.reused_bytes >> 20,
            mib(summary.bundle_bytes),
            mib(summary.skipped_bundle_bytes),
        ),
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
}

/// Runs the install pipeline with progress output.
fn run_install(
    disk: &mut AbDisk<FileDevice>,
    source: Box<dyn BundleSource>,
    keyring: &Keyring,
    options: &InstallOptions,
    cancel: &Arc<AtomicBool>,
    json: bool,
) -> Result<InstallReport, abupdate::install::InstallError> {
    // A stalled pipe or server must not hold up a signal: reads wait on their own thread.
    let source = abupdate::bundle::Interruptible::new(source, Arc::clone(cancel))?;
    let mut progress = Progress::new("writing", json);
    let result = abupdate::install::install(disk, source, keyring, options, cancel, &mut |e| {
        show_install_event(e, json, &mut progress)
    });
    progress.finish();
    result
}

fn print_installed(report: &InstallReport, fetch: Option<FetchSummary>, json: bool) {
    if json {
        let action = if report.dry_run {
            "dry-run"
        } else {
            "installed"
        };
        json_line(
            &serde_json::json!({"event": "done", "action": action, "report": report, "fetch": fetch}),
        );
        return;
    }
    if report.dry_run {
        println!(
            "dry run: {} ({} bytes) would be installed into {} (running {}); every check passed, nothing was written",
            report.version, report.image_size, report.target, report.running
        );
        if let Some(a) = report.adaptive {
            println!(
                "adaptive: {} of {} chunks ({} bytes) would be copied from {}; {} bytes of the bundle's payload would be read, {} skipped",
                a.planned.reused_chunks,
                a.planned.chunks,
                a.planned.reused_bytes,
                report.running,
                a.planned.bundle_bytes,
                a.planned.skipped_bundle_bytes
            );
        }
        return;
    }
    println!(
        "installed {} into {} ({} bytes in {:.2} s: write {:.2} s, flush + verify {:.2} s); reboot to try it",
        report.version, report.target, report.image_size, report.total_seconds, report.write_seconds, report.verify_seconds
    );
    if let Some(a) = report.adaptive {
        println!(
            "adaptive: {} of {} chunks copied from {} ({} bytes), {} fell back to the bundle",
            a.planned.reused_chunks - a.fallbacks,
            a.planned.chunks,
            report.running,
            a.planned.reused_bytes,
            a.fallbacks
        );
    }
    if let Some(f) = fetch {
        println!(
            "fetched {} bytes in {} requests: {} retries, {} responses ignored Range ({} bytes re-sent), {} bytes skipped",
            f.bytes, f.requests, f.retries, f.range_ignored, f.discarded, f.skipped
        );
    }
}

/// Bytes as MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

fn reboot_now() -> Result<()> {
    eprintln!("abupdate: rebooting");
    let status = std::process::Command::new("reboot").status()?;
    anyhow::ensure!(status.success(), "reboot failed: {status}");
    Ok(())
}

fn open_url_source(
    fetcher: &Fetcher,
    url: &str,
    expected: Expected,
    cancel: &AtomicBool,
) -> Result<Box<dyn BundleSource>> {
    // The first request may wait up to the read timeout for a silent server.
    let (fetcher, url) = (fetcher.clone(), url.to_string());
    let source =
        abupdate::bundle::run_interruptible(cancel, move || fetcher.open(&url, 0, expected))
            .map_err(|_| abupdate::http::HttpError::Cancelled)??;
    Ok(Box::new(std::io::BufReader::with_capacity(
        abupdate::http::STREAM_BUFFER,
        source,
    )))
}

#[allow(clippy::too_many_arguments)]
fn install_cmd(
    bundle: &Path,
    args: &DiskArgs,
    keyring: &Path,
    mut options: InstallOptions,
    policy: RebootPolicy,
    sentinel: Option<PathBuf>,
    fetch: FetchOptions,
    json: bool,
) -> Result<()> {
    let cancel = cancel_flag()?;
    options.sentinel = sentinel;
    let keyring = load_keyring(keyring)?;
    let mut disk = open_disk_locked(args)?;
    let url = bundle.to_str().filter(|s| abupdate::http::is_url(s));
    let (source, fetcher) = match url {
        Some(url) => {
            let fetcher = Fetcher::new(fetch)?
                .with_events(fetch_sink(json))
                .with_cancel(Arc::clone(&cancel));
            (
                open_url_source(&fetcher, url, Expected::default(), &cancel)?,
                Some(fetcher),
            )
        }
        None => (abupdate::install::open_bundle_source(bundle)?, None),
    };
    let report = run_install(&mut disk, source, &keyring, &options, &cancel, json)?;
    print_installed(&report, fetcher.map(|f| f.stats()), json);
    if policy == RebootPolicy::Now && !report.dry_run {
        drop(disk);
        reboot_now()?;
    }
    Ok(())
}

// ---- check / update ----

/// The node as `check` and `update` see it.
struct Node {
    running: usize,
    other: usize,
    attrs: Vec<abupdate::attrs::SlotAttributes>,
    views: Vec<SlotView>,
    device_compatible: String,
}

fn inspect_node(args: &DiskArgs, running: Option<&str>, compatible: Option<&str>) -> Result<Node> {
    use abupdate::install::InstallError;
    let mut disk = open_disk(args, false)?;
    let slots = disk.slots()?;
    let attrs: Vec<_> = slots.iter().map(|s| s.attrs).collect();
    let running = match running {
        Some(name) => disk.slot_index(&slots, name)?,
        None => running::detect(&args.disk, disk.dev.is_block_device(), &slots)
            .map(|(i, _)| i)
            .or_else(|| abupdate::select::next_slot(&attrs))
            .ok_or(InstallError::NoRunningSlot)?,
    };
    let other =
        (0..slots.len())
            .find(|&i| i != running)
            .ok_or_else(|| InstallError::TargetIsRunning {
                slot: slots[running].name.clone(),
            })?;
    let sector_size = disk.gpt.sector_size();
    let records: Vec<_> = slots
        .iter()
        .map(|s| footer::read_record(&mut disk.dev, s, sector_size))
        .collect();
    let views = slots
        .iter()
        .zip(&records)
        .map(|(s, r)| SlotView {
            name: s.name.clone(),
            attrs: s.attrs,
            version: r.as_ref().map(|r| r.version.clone()),
            sha256: r.as_ref().map(|r| r.image_sha256),
        })
        .collect();
    let device_compatible = compatible
        .map(String::from)
        .or_else(|| records[running].as_ref().map(|r| r.compatible.clone()))
        .ok_or_else(|| InstallError::CompatibleUnknown {
            slot: slots[running].name.clone(),
        })?;
    Ok(Node {
        running,
        other,
        attrs,
        views,
        device_compatible,
    })
}

/// What `check` reports (and `update` emits as its `check` event).
#[derive(serde::Serialize)]
struct CheckReport {
    verdict: Verdict,
    update_available: bool,
    message: String,
    running_slot: String,
    running_version: Option<String>,
    device_compatible: String,
    latest_version: String,
    channel_compatible: String,
    channel: String,
    index_url: String,
    key_id: String,
    bundle_urls: Vec<String>,
    size: u64,
    sha256: String,
    skipped_mirrors: Vec<serde_json::Value>,
}

impl CheckReport {
    fn text(&self) -> String {
        format!(
            "{} runs {}; channel {} offers {} for {}: {}",
            self.running_slot,
            self.running_version
                .as_deref()
                .unwrap_or("an unknown version"),
            self.index_url,
            self.latest_version,
            self.channel_compatible,
            self.message
        )
    }
}

struct Checked {
    node: Node,
    found: Found,
    report: CheckReport,
    keyring: Keyring,
}

fn check_channel(
    args: &DiskArgs,
    flags: &ChannelFlags,
    cfg: &Loaded,
    fetcher: &Fetcher,
    json_events: bool,
) -> Result<Checked> {
    let channels = if flags.channels.is_empty() {
        cfg.config.channel.clone().unwrap_or_default()
    } else {
        flags.channels.clone()
    };
    let keyring = load_keyring(&keyring_path(flags.keyring.as_deref(), cfg))?;
    let compatible = flags
        .compatible
        .clone()
        .or_else(|| cfg.config.compatible.clone());
    let node = inspect_node(args, flags.running.as_deref(), compatible.as_deref())?;
    let found = abupdate::channel::fetch_index(fetcher, &channels, &keyring, &mut |url, err| {
        if json_events {
            json_line(
                &serde_json::json!({"event": "channel-mirror-failed", "url": url, "error": err.to_string()}),
            );
        } else {
            eprintln!("channel {url} skipped: {err}");
        }
    })?;
    let running = &node.views[node.running];
    let verdict = abupdate::channel::decide(
        running,
        &node.views[node.other],
        &node.attrs,
        node.other,
        &node.device_compatible,
        &found.index,
    );
    let report = CheckReport {
        verdict,
        update_available: verdict == Verdict::Available,
        message: verdict.describe().to_string(),
        running_slot: running.name.clone(),
        running_version: running.version.clone(),
        device_compatible: node.device_compatible.clone(),
        latest_version: found.index.version.clone(),
        channel_compatible: found.index.compatible.clone(),
        channel: found.channel.clone(),
        index_url: found.index_url.clone(),
        key_id: found.key_id.to_string(),
        bundle_urls: found.bundle_urls.clone(),
        size: found.index.size,
        sha256: found.index.sha256.clone(),
        skipped_mirrors: found
            .skipped
            .iter()
            .map(|(u, e)| serde_json::json!({"url": u, "error": e}))
            .collect(),
    };
    Ok(Checked {
        node,
        found,
        report,
        keyring,
    })
}

fn check_cmd(
    args: &DiskArgs,
    flags: &ChannelFlags,
    cfg: &Loaded,
    fetch: FetchOptions,
    json: bool,
) -> Result<()> {
    // Events go to stderr: with --json, stdout is exactly one object.
    let fetcher = Fetcher::new(fetch)?.with_events(fetch_sink(false));
    let checked = check_channel(args, flags, cfg, &fetcher, false)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&checked.report)?);
    } else {
        println!("{}", checked.report.text());
    }
    Ok(())
}

fn write_sentinel(path: &Path, slot: &str, version: &str) -> Result<()> {
    abupdate::install::write_sentinel(path, slot, version)
        .with_context(|| format!("writing the reboot sentinel {}", path.display()))
}

/// Settings of `update` beyond the disk and channel.
struct UpdateSettings {
    strategy: Strategy,
    cache_dir: PathBuf,
    tries: u8,
    adaptive: bool,
    policy: RebootPolicy,
    sentinel: Option<PathBuf>,
    fetch: FetchOptions,
    json: bool,
}

fn update_cmd(
    args: &DiskArgs,
    flags: &ChannelFlags,
    cfg: &Loaded,
    s: UpdateSettings,
) -> Result<()> {
    let json = s.json;
    let done = |action: &str, extra: serde_json::Value| {
        if json {
            let mut v = serde_json::json!({"event": "done", "action": action, "strategy": s.strategy.to_string()});
            if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
                obj.extend(more);
            }
            json_line(&v);
        }
    };
    let cancel = cancel_flag()?;
    let fetcher = Fetcher::new(s.fetch.clone())?
        .with_events(fetch_sink(json))
        .with_cancel(Arc::clone(&cancel));
    let Checked {
        node,
        found,
        report,
        keyring,
    } = check_channel(args, flags, cfg, &fetcher, json)?;
    if json {
        json_line(&serde_json::json!({"event": "check", "report": &report}));
    } else {
        eprintln!("{}", report.text());
    }
    let index = &found.index;
    let other = node.views[node.other].name.clone();
    match report.verdict {
        Verdict::Incompatible => {
            return Err(abupdate::install::InstallError::Incompatible {
                bundle: index.compatible.clone(),
                device: node.device_compatible.clone(),
            }
            .into())
        }
        Verdict::UpToDate | Verdict::PreviouslyFailed | Verdict::RunningNotCommitted => {
            if !json {
                println!("nothing to do: {}", report.message);
            }
            done("none", serde_json::json!({"verdict": report.verdict}));
            return Ok(());
        }
        Verdict::PendingReboot => {
            if let Some(path) = &s.sentinel {
                write_sentinel(path, &other, &index.version)?;
            }
            if !json {
                println!(
                    "{} already holds {} and boots next; reboot to try it",
                    other, index.version
                );
            }
            done(
                "pending-reboot",
                serde_json::json!({"verdict": report.verdict, "slot": other, "version": index.version}),
            );
            if s.policy == RebootPolicy::Now {
                reboot_now()?;
            }
            return Ok(());
        }
        Verdict::Available => {}
    }

    if s.strategy == Strategy::DownloadOnly {
        let mut progress = Progress::new("downloading", json);
        let downloaded = abupdate::channel::download_to_cache(
            &fetcher,
            &found,
            &keyring,
            &s.cache_dir,
            &mut |label, d, t| {
                if progress.label != label {
                    progress.set_label(label);
                }
                progress.update(d, t)
            },
            &mut |url, err| eprintln!("bundle {url} failed: {err}; trying the next mirror"),
        )?;
        progress.finish();
        if !json {
            println!(
                "downloaded and verified {} into {}; install it with `abupdate update --strategy auto` or `abupdate install {}`",
                index.version,
                downloaded.path.display(),
                downloaded.path.display()
            );
        }
        done(
            "downloaded",
            serde_json::json!({"version": index.version, "download": downloaded, "fetch": fetcher.stats()}),
        );
        return Ok(());
    }

    // Auto: install, from the cache when a verified download is waiting there.
    let options = InstallOptions {
        tries: s.tries,
        allow_downgrade: false,
        compatible: Some(node.device_compatible.clone()),
        running: Some(node.views[node.running].name.clone()),
        sentinel: s.sentinel.clone(),
        workers: 0,
        adaptive: s.adaptive,
        dry_run: false,
    };
    let mut disk = open_disk_locked(args)?;
    let installed = if let Some(path) = abupdate::channel::cached_bundle(&s.cache_dir, index) {
        if !json {
            eprintln!(
                "installing {} from the download cache {}",
                index.version,
                path.display()
            );
        }
        let header = abupdate::bundle::read_unverified_header(&mut std::io::BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        ))?;
        anyhow::ensure!(
            hex::encode(header.image_sha256) == index.sha256,
            "cached bundle {} is not the one the channel index names; delete it",
            path.display()
        );
        let source = abupdate::install::open_bundle_source(&path)?;
        let report = run_install(&mut disk, source, &keyring, &options, &cancel, json)?;
        abupdate::channel::prune_cache(&s.cache_dir, None)?;
        report
    } else {
        let mut result = None;
        for (i, url) in found.bundle_urls.iter().enumerate() {
            let attempt =
                open_url_source(&fetcher, url, index.expected(), &cancel).and_then(|source| {
                    run_install(&mut disk, source, &keyring, &options, &cancel, json)
                        .map_err(anyhow::Error::from)
                });
            match attempt {
                Ok(r) => {
                    result = Some(r);
                    break;
                }
                Err(e) if i + 1 < found.bundle_urls.len() && classify(&e) == Exit::FetchFailed => {
                    if json {
                        json_line(
                            &serde_json::json!({"event": "bundle-mirror-failed", "url": url, "error": one_line(&e)}),
                        );
                    } else {
                        eprintln!(
                            "bundle {url} failed: {}; trying the next mirror",
                            one_line(&e)
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        result.expect("the loop returns or installs")
    };
    print_installed(&installed, Some(fetcher.stats()), json);
    if s.policy == RebootPolicy::Now {
        drop(disk);
        reboot_now()?;
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
    // Commands that work on the node read the configuration file; the boot hook only when it
    // is named explicitly (a broken file must not stop a machine from booting); build-host
    // commands never need it, but an explicitly named file is always checked.
    let node_command = !matches!(
        cli.command,
        Command::Disk(_)
            | Command::Keygen { .. }
            | Command::Bundle(_)
            | Command::Channel(_)
            | Command::Boot { .. }
    );
    let cfg = if node_command || cli.config.is_some() {
        abupdate::config::load(cli.config.as_deref())?
    } else {
        Loaded::default()
    };
    let cfg = &cfg;
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
            let labels = SlotLabels::new(labels)?;
            let [a, b] = labels.as_slice() else {
                unreachable!("SlotLabels holds two labels")
            };
            let spec = InitSpec {
                slot_size,
                disk_size,
                sector_size,
                labels: [a.clone(), b.clone()],
                type_guid,
            };
            create_disk_image(&file, &spec)?;
            println!(
                "created {} ({} bytes): {} and {} of {} bytes each, {} boots next",
                file.display(),
                spec.effective_disk_size().unwrap_or_default(),
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
                    labels,
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
        } => status(&resolve_disk(&disk, cfg)?, running.as_deref(), json),
        Command::Boot { disk, format } => boot_hook(&resolve_disk(&disk, cfg)?, format),
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
            adaptive,
            dry_run,
            reboot,
            fetch,
            json,
        } => {
            let c = &cfg.config;
            let options = InstallOptions {
                tries: tries.or(c.tries).unwrap_or(abupdate::select::DEFAULT_TRIES),
                allow_downgrade,
                compatible: compatible.or_else(|| c.compatible.clone()),
                running,
                adaptive: adaptive || c.adaptive.unwrap_or(false),
                dry_run,
                ..Default::default()
            };
            let (policy, sentinel) = reboot_settings(&reboot, cfg);
            install_cmd(
                &bundle,
                &resolve_disk(&disk, cfg)?,
                &keyring_path(keyring.as_deref(), cfg),
                options,
                policy,
                sentinel,
                fetch_options(&fetch, cfg),
                json,
            )
        }
        Command::Check {
            disk,
            channel,
            fetch,
            json,
        } => check_cmd(
            &resolve_disk(&disk, cfg)?,
            &channel,
            cfg,
            fetch_options(&fetch, cfg),
            json,
        ),
        Command::Update {
            disk,
            channel,
            strategy,
            cache_dir,
            tries,
            adaptive,
            reboot,
            fetch,
            json,
        } => {
            let c = &cfg.config;
            let strategy = strategy.or(c.strategy).unwrap_or_default();
            if strategy == Strategy::Off {
                // Nothing is opened or fetched: the disk need not even be configured.
                if json {
                    json_line(
                        &serde_json::json!({"event": "done", "action": "none", "strategy": "off", "reason": "strategy off"}),
                    );
                } else {
                    println!(
                        "update strategy is off: this node is updated from outside; nothing done"
                    );
                }
                return Ok(());
            }
            let (policy, sentinel) = reboot_settings(&reboot, cfg);
            let settings = UpdateSettings {
                strategy,
                cache_dir: cache_dir
                    .or_else(|| c.cache_dir.clone())
                    .unwrap_or_else(|| PathBuf::from(abupdate::channel::DEFAULT_CACHE_DIR)),
                tries: tries.or(c.tries).unwrap_or(abupdate::select::DEFAULT_TRIES),
                adaptive: adaptive || c.adaptive.unwrap_or(false),
                policy,
                sentinel,
                fetch: fetch_options(&fetch, cfg),
                json,
            };
            update_cmd(&resolve_disk(&disk, cfg)?, &channel, cfg, settings)
        }
        Command::Channel(ChannelCommand::Create {
            bundle,
            key,
            bundle_url,
            out,
            expires_in,
            expires_at,
        }) => {
            let secret = abupdate::bundle::keys::read_secret_key(&key)?;
            let mut index = abupdate::channel::index_for_bundle(&bundle, bundle_url.as_deref())?;
            index.expires = match (expires_in, expires_at) {
                (Some(d), _) => Some(abupdate::channel::unix_now().saturating_add(d.as_secs())),
                (None, at) => at,
            };
            let text = abupdate::channel::sign_index(&index, &secret);
            let tmp = out.with_extension("abupdate-tmp");
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {}: version {}, compatible {}, bundle {} ({} bytes), image sha256 {}, {}, signed by key {}",
                out.display(),
                index.version,
                index.compatible,
                index.bundle,
                index.size,
                index.sha256,
                index.expires.map_or_else(
                    || "never expires".to_string(),
                    |t| format!("expires {}", abupdate::channel::rfc3339(t))
                ),
                abupdate::bundle::KeyId::of(&secret.verifying_key())
            );
            Ok(())
        }
        Command::MarkGood {
            disk,
            slot,
            force,
            json,
        } => {
            let disk = resolve_disk(&disk, cfg)?;
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_good(&mut ab, index, force)?;
            print_change(&change, "mark-good", json)
        }
        Command::MarkBad {
            disk,
            slot,
            force,
            json,
        } => {
            let disk = resolve_disk(&disk, cfg)?;
            let mut ab = open_disk_locked(&disk)?;
            let index = target_slot(&ab, &disk, slot.slot.as_deref())?;
            let change = abupdate::commit::mark_bad(&mut ab, index, force)?;
            print_change(&change, "mark-bad", json)
        }
        Command::Rollback { disk, slot, json } => {
            let disk = resolve_disk(&disk, cfg)?;
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
            force,
            mark_bad_committed,
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
            if checks.is_empty() {
                checks = cfg.config.health_checks.clone().unwrap_or_default();
            }
            let timeout = timeout
                .or(cfg.config.health_timeout)
                .unwrap_or(Duration::from_secs(60));
            commit_cmd(
                &resolve_disk(&disk, cfg)?,
                slot.slot.as_deref(),
                &checks,
                timeout,
                abupdate::commit::CommitPolicy {
                    force,
                    mark_bad_committed,
                },
                reboot,
                json,
            )
        }
        Command::SetAttributes {
            disk,
            slot,
            priority,
            tries,
            successful,
            force,
        } => {
            let disk = resolve_disk(&disk, cfg)?;
            let mut ab = open_disk_locked(&disk)?;
            let slots = ab.slots()?;
            let index = ab.slot_index(&slots, &slot)?;
            let mut a = slots[index].attrs;
            if let Some(p) = priority {
                a = a.with_priority(p);
            }
            if let Some(t) = tries {
                a = a.with_tries(t);
            }
            if let Some(s) = successful {
                a = a.with_successful(s == 1);
            }
            let change = abupdate::commit::set_attributes(&mut ab, index, a, force)?;
            println!(
                "{}: {} -> {} ({} bytes written)",
                change.slot, change.before, change.after, change.bytes_written
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    abupdate::sys::default_sigpipe();
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
