//! `install`: verify a bundle (file, block device, stdin or URL) and stream it into the
//! inactive slot.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::output::{fetch_sink, print_installed, InstallDisplay};
use super::settings::{self, DiskFlags, FetchFlags, RebootFlags, RebootSettings};
use crate::config::{Loaded, RebootPolicy};
use crate::disk::slots::DiskSpec;
use crate::exit::Exit;
use crate::fetch::http::{Expected, FetchOptions, Fetcher};
use crate::install::InstallOptions;

/// `install`.
#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Bundle file, block device holding a bundle, `-` for stdin, or an http(s):// URL
    /// (streamed into the slot with resume, never stored).
    pub bundle: PathBuf,
    #[command(flatten)]
    pub disk: DiskFlags,
    /// Trusted public key file or directory of *.pub files [default: /etc/abupdate/keys] [config: keyring].
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Tries given to the new slot before it falls back [default: 3] [config: tries].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
    pub tries: Option<u8>,
    /// This device's compatible string (default: the running slot's recorded one) [config: compatible].
    #[arg(long)]
    pub compatible: Option<String>,
    /// Allow a version lower than the running slot's.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// The running slot, when it cannot be detected (default: the slot that boots next).
    #[arg(long)]
    pub running: Option<String>,
    /// Adaptive install: copy every chunk the running slot already holds (found by its
    /// signed hash) instead of reading it from the bundle; a download skips those bytes
    /// with Range requests [config: adaptive].
    #[arg(long)]
    pub adaptive: bool,
    /// Run every check (signature, compatible, version, size, target not mounted) and,
    /// with --adaptive, make the plan; report what would happen and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub reboot: RebootFlags,
    #[command(flatten)]
    pub fetch: FetchFlags,
    /// JSON lines: one object per progress event, then the report.
    #[arg(long)]
    pub json: bool,
}

/// The merged settings of `install`.
#[derive(Debug)]
pub struct InstallSettings {
    /// The bundle path or URL.
    pub bundle: PathBuf,
    /// The disk.
    pub disk: DiskSpec,
    /// The keyring path.
    pub keyring: PathBuf,
    /// The install options (the sentinel included).
    pub options: InstallOptions,
    /// What happens after the install.
    pub reboot: RebootSettings,
    /// Download behaviour for a URL.
    pub fetch: FetchOptions,
    /// JSON lines.
    pub json: bool,
}

impl InstallSettings {
    /// Merges `install`'s flags with the configuration file.
    pub fn merge(args: InstallArgs, cfg: &Loaded) -> Result<Self> {
        let reboot = args.reboot.merge(cfg);
        let options = InstallOptions {
            tries: settings::tries(args.tries, cfg),
            allow_downgrade: args.allow_downgrade,
            compatible: settings::compatible(args.compatible, cfg),
            running: args.running,
            adaptive: settings::adaptive(args.adaptive, cfg),
            dry_run: args.dry_run,
            sentinel: reboot.sentinel.clone(),
            ..Default::default()
        };
        Ok(Self {
            bundle: args.bundle,
            disk: args.disk.merge(cfg)?,
            keyring: settings::keyring_path(args.keyring, cfg),
            options,
            reboot,
            fetch: args.fetch.merge(cfg),
            json: args.json,
        })
    }
}

/// Runs `install`.
pub fn run(args: InstallArgs, cfg: &Loaded) -> Result<()> {
    let s = InstallSettings::merge(args, cfg)?;
    let json = s.json;
    let cancel = cancel_flag()?;
    let keyring = crate::bundle::Keyring::load(&s.keyring)?;
    let mut disk = s.disk.open_locked()?;
    let url = s.bundle.to_str().filter(|u| crate::fetch::http::is_url(u));
    let (source, fetcher) = match url {
        Some(url) => {
            let fetcher = Fetcher::new(s.fetch)?
                .with_events(fetch_sink(json))
                .with_cancel(Arc::clone(&cancel));
            let source =
                crate::fetch::update::open_url(&fetcher, url, Expected::default(), &cancel)?;
            (source, Some(fetcher))
        }
        None => (crate::install::open_bundle_source(&s.bundle)?, None),
    };
    let mut display = InstallDisplay::new(json);
    let result = crate::fetch::update::install_from(
        &mut disk,
        source,
        &keyring,
        &s.options,
        &cancel,
        &mut |e| display.show(e),
    );
    display.finish();
    let report = result?;
    print_installed(&report, fetcher.map(|f| f.stats()), json);
    if s.reboot.policy == RebootPolicy::Now && !report.dry_run {
        drop(disk);
        reboot_now()?;
    }
    Ok(())
}

/// SIGINT/SIGTERM set the returned flag; the install and downloads poll it.
pub fn cancel_flag() -> Result<Arc<AtomicBool>> {
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

/// Reboots the machine.
pub fn reboot_now() -> Result<()> {
    eprintln!("abupdate: rebooting");
    let status = std::process::Command::new("reboot").status()?;
    anyhow::ensure!(status.success(), "reboot failed: {status}");
    Ok(())
}
