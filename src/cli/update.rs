//! `check` and `update`: the CLI side only merges settings and prints what
//! [`crate::fetch::update`] reports.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::install::{cancel_flag, reboot_now};
use super::output::{fetch_sink, json_line, print_installed, InstallDisplay, Progress};
use super::settings::{self, DiskFlags, FetchFlags, RebootFlags, RebootSettings};
use crate::config::{Loaded, RebootPolicy, Strategy};
use crate::disk::slots::DiskSpec;
use crate::fetch::http::{FetchOptions, Fetcher};
use crate::fetch::update::{ChannelRequest, UpdateEvent, UpdateOutcome, UpdateSettings};

/// Channel and policy options shared by `check` and `update`.
#[derive(Args, Clone, Debug, Default)]
pub struct ChannelFlags {
    /// Channel index URL; repeat for mirrors, tried in order [config: channel].
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Trusted public key file or directory of *.pub files [default: /etc/abupdate/keys] [config: keyring].
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// This device's compatible string (default: the running slot's recorded one) [config: compatible].
    #[arg(long)]
    pub compatible: Option<String>,
    /// The running slot, when it cannot be detected (default: the slot that boots next).
    #[arg(long)]
    pub running: Option<String>,
}

impl ChannelFlags {
    /// Merges the flags with the configuration file.
    pub fn merge(self, cfg: &Loaded) -> ChannelRequest {
        ChannelRequest {
            channels: if self.channels.is_empty() {
                cfg.config.channel.clone().unwrap_or_default()
            } else {
                self.channels
            },
            keyring: settings::keyring_path(self.keyring, cfg),
            compatible: settings::compatible(self.compatible, cfg),
            running: self.running,
        }
    }
}

/// `check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub channel: ChannelFlags,
    #[command(flatten)]
    pub fetch: FetchFlags,
    /// Machine-readable output (one JSON object).
    #[arg(long)]
    pub json: bool,
}

/// `update`.
#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub channel: ChannelFlags,
    /// auto, download-only or off [default: auto] [config: strategy].
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// Download cache directory [default: /var/cache/abupdate] [config: cache-dir].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Tries given to the new slot before it falls back [default: 3] [config: tries].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
    pub tries: Option<u8>,
    /// Adaptive install: download only the chunks the running slot does not already
    /// hold (see `install --adaptive`) [config: adaptive].
    #[arg(long)]
    pub adaptive: bool,
    #[command(flatten)]
    pub reboot: RebootFlags,
    #[command(flatten)]
    pub fetch: FetchFlags,
    /// JSON lines: one object per event, then a `done` object.
    #[arg(long)]
    pub json: bool,
}

/// The merged settings of `check`.
#[derive(Debug)]
pub struct CheckSettings {
    /// The disk.
    pub disk: DiskSpec,
    /// The channel request.
    pub channel: ChannelRequest,
    /// Download behaviour.
    pub fetch: FetchOptions,
    /// One JSON object.
    pub json: bool,
}

impl CheckSettings {
    /// Merges `check`'s flags with the configuration file.
    pub fn merge(args: CheckArgs, cfg: &Loaded) -> Result<Self> {
        Ok(Self {
            disk: args.disk.merge(cfg)?,
            fetch: args.fetch.merge(cfg),
            channel: args.channel.merge(cfg),
            json: args.json,
        })
    }
}

/// The merged settings of `update` (an `off` strategy needs no disk).
#[derive(Debug)]
pub struct UpdateCommandSettings {
    /// The disk; `None` when the strategy is off.
    pub disk: Option<DiskSpec>,
    /// The channel request.
    pub channel: ChannelRequest,
    /// Strategy, cache, tries, adaptive and sentinel.
    pub update: UpdateSettings,
    /// Reboot policy.
    pub reboot: RebootSettings,
    /// Download behaviour.
    pub fetch: FetchOptions,
    /// JSON lines.
    pub json: bool,
}

impl UpdateCommandSettings {
    /// Merges `update`'s flags with the configuration file.
    pub fn merge(args: UpdateArgs, cfg: &Loaded) -> Result<Self> {
        let c = &cfg.config;
        let strategy = args.strategy.or(c.strategy).unwrap_or_default();
        let reboot = args.reboot.merge(cfg);
        // Nothing is opened or fetched with strategy off: the disk need not be configured.
        let disk = match strategy {
            Strategy::Off => None,
            _ => Some(args.disk.merge(cfg)?),
        };
        Ok(Self {
            disk,
            update: UpdateSettings {
                strategy,
                cache_dir: args
                    .cache_dir
                    .or_else(|| c.cache_dir.clone())
                    .unwrap_or_else(|| PathBuf::from(crate::fetch::channel::DEFAULT_CACHE_DIR)),
                tries: settings::tries(args.tries, cfg),
                adaptive: settings::adaptive(args.adaptive, cfg),
                sentinel: reboot.sentinel.clone(),
            },
            reboot,
            fetch: args.fetch.merge(cfg),
            channel: args.channel.merge(cfg),
            json: args.json,
        })
    }
}

/// Runs `check`.
pub fn check(args: CheckArgs, cfg: &Loaded) -> Result<()> {
    let s = CheckSettings::merge(args, cfg)?;
    // Events go to stderr: with --json, stdout is exactly one object.
    let fetcher = Fetcher::new(s.fetch)?.with_events(fetch_sink(false));
    let checked = crate::fetch::update::check(&s.disk, &s.channel, &fetcher, &mut |event| {
        show_event(event, false, &mut None, &mut InstallDisplay::new(false))
    })?;
    if s.json {
        println!("{}", serde_json::to_string_pretty(&checked.report)?);
    } else {
        println!("{}", checked.report.text());
    }
    Ok(())
}

/// Runs `update`.
pub fn update(args: UpdateArgs, cfg: &Loaded) -> Result<()> {
    let s = UpdateCommandSettings::merge(args, cfg)?;
    let json = s.json;
    let Some(disk) = &s.disk else {
        print_outcome(&UpdateOutcome::Off, &s.update, None, json);
        return Ok(());
    };
    let cancel = cancel_flag()?;
    let fetcher = Fetcher::new(s.fetch.clone())?
        .with_events(fetch_sink(json))
        .with_cancel(Arc::clone(&cancel));
    let mut download = None;
    let mut display = InstallDisplay::new(json);
    let outcome = crate::fetch::update::update(
        disk,
        &s.channel,
        &s.update,
        &fetcher,
        &cancel,
        &mut |event| show_event(event, json, &mut download, &mut display),
    );
    if let Some(progress) = &download {
        progress.finish();
    }
    display.finish();
    let outcome = outcome?;
    print_outcome(&outcome, &s.update, Some(&fetcher), json);
    let reboots = matches!(
        outcome,
        UpdateOutcome::PendingReboot { .. } | UpdateOutcome::Installed(_)
    );
    if reboots && s.reboot.policy == RebootPolicy::Now {
        reboot_now()?;
    }
    Ok(())
}

/// Shows an event of `check` or `update`.
fn show_event(
    event: UpdateEvent,
    json: bool,
    download: &mut Option<Progress>,
    display: &mut InstallDisplay,
) {
    match event {
        UpdateEvent::ChannelMirrorFailed { url, error } => {
            if json {
                json_line(
                    &serde_json::json!({"event": "channel-mirror-failed", "url": url, "error": error.to_string()}),
                );
            } else {
                eprintln!("channel {url} skipped: {error}");
            }
        }
        UpdateEvent::Checked(report) => {
            if json {
                json_line(&serde_json::json!({"event": "check", "report": report}));
            } else {
                eprintln!("{}", report.text());
            }
        }
        UpdateEvent::Download { label, done, total } => {
            let progress = download.get_or_insert_with(|| Progress::new("downloading", json));
            if progress.label != label {
                progress.set_label(label);
            }
            progress.update(done, total)
        }
        UpdateEvent::DownloadMirrorFailed { url, error } => {
            eprintln!("bundle {url} failed: {error}; trying the next mirror")
        }
        UpdateEvent::InstallingFromCache { version, path } => {
            if !json {
                eprintln!(
                    "installing {} from the download cache {}",
                    version,
                    path.display()
                );
            }
        }
        UpdateEvent::Install(event) => display.show(event),
        UpdateEvent::BundleMirrorFailed { url, error } => {
            display.finish();
            if json {
                json_line(
                    &serde_json::json!({"event": "bundle-mirror-failed", "url": url, "error": error}),
                );
            } else {
                eprintln!("bundle {url} failed: {error}; trying the next mirror");
            }
        }
    }
}

/// Prints what `update` did: a text line, or the `done` JSON line.
fn print_outcome(
    outcome: &UpdateOutcome,
    s: &UpdateSettings,
    fetcher: Option<&Fetcher>,
    json: bool,
) {
    let done = |action: &str, extra: serde_json::Value| {
        if json {
            let mut v = serde_json::json!({"event": "done", "action": action, "strategy": s.strategy.to_string()});
            if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
                obj.extend(more);
            }
            json_line(&v);
        }
    };
    match outcome {
        UpdateOutcome::Off => {
            if json {
                json_line(
                    &serde_json::json!({"event": "done", "action": "none", "strategy": "off", "reason": "strategy off"}),
                );
            } else {
                println!("update strategy is off: this node is updated from outside; nothing done");
            }
        }
        UpdateOutcome::NoUpdate { verdict, message } => {
            if !json {
                println!("nothing to do: {message}");
            }
            done("none", serde_json::json!({"verdict": verdict}));
        }
        UpdateOutcome::PendingReboot {
            verdict,
            slot,
            version,
        } => {
            if !json {
                println!("{slot} already holds {version} and boots next; reboot to try it");
            }
            done(
                "pending-reboot",
                serde_json::json!({"verdict": verdict, "slot": slot, "version": version}),
            );
        }
        UpdateOutcome::Downloaded { version, download } => {
            if !json {
                println!(
                    "downloaded and verified {} into {}; install it with `abupdate update --strategy auto` or `abupdate install {}`",
                    version,
                    download.path.display(),
                    download.path.display()
                );
            }
            done(
                "downloaded",
                serde_json::json!({"version": version, "download": download, "fetch": fetcher.map(Fetcher::stats)}),
            );
        }
        UpdateOutcome::Installed(report) => {
            print_installed(report, fetcher.map(Fetcher::stats), json)
        }
    }
}
