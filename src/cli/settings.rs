//! Settings: flags (and their environment variables, which clap reads) over the configuration
//! file over built-in defaults, merged in one step per command. Each command's handler gets
//! one settings value built from its `Args` and the loaded [`Loaded`] configuration, and
//! never looks at either again.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::config::{parse_duration, Loaded, RebootPolicy};
use crate::disk::slots::DiskSpec;
use crate::fetch::http::FetchOptions;
use crate::layout::SlotLabels;

/// Default trusted key directory.
pub const DEFAULT_KEYRING: &str = "/etc/abupdate/keys";

/// Options naming the disk and its slots, shared by every command that opens one; each falls
/// back to the configuration file.
#[derive(Args, Clone, Debug, Default)]
pub struct DiskFlags {
    /// Disk image file or block device holding the A/B slots [config: disk].
    #[arg(long, env = "ABUPDATE_DISK")]
    pub disk: Option<PathBuf>,
    /// Logical sector size of a disk image file (block devices report their own) [config: sector-size].
    #[arg(long)]
    pub sector_size: Option<u32>,
    /// Slot partition labels, A first: two different labels, each on exactly one partition of
    /// the same type [default: ROOT-A,ROOT-B] [config: labels].
    #[arg(long, env = "ABUPDATE_LABELS", value_delimiter = ',', num_args = 1..)]
    pub labels: Option<Vec<String>>,
}

impl DiskFlags {
    /// Merges the disk flags with the configuration file.
    pub fn merge(&self, cfg: &Loaded) -> Result<DiskSpec> {
        let c = &cfg.config;
        let path = self
            .disk
            .clone()
            .or_else(|| c.disk.clone())
            .ok_or_else(|| cfg.unset("disk", "--disk (or ABUPDATE_DISK)", "disk"))?;
        // One check for every source of the setting (flag, ABUPDATE_LABELS, config file).
        let labels = match self.labels.clone().or_else(|| c.labels.clone()) {
            Some(list) => SlotLabels::new(list)?,
            None => SlotLabels::default(),
        };
        Ok(DiskSpec {
            path,
            sector_size: self.sector_size.or(c.sector_size),
            labels,
        })
    }
}

/// Download behaviour; each flag falls back to the configuration file's `[fetch]` table.
#[derive(Args, Clone, Debug, Default)]
pub struct FetchFlags {
    /// Reconnections allowed per download [default: 10] [config: fetch.retries].
    #[arg(long)]
    pub retries: Option<u32>,
    /// First back-off delay, doubling per failure in a row (e.g. 500ms, 2s) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub retry_delay: Option<Duration>,
    /// Cap of the back-off delay [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub max_retry_delay: Option<Duration>,
    /// Connect timeout [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Read timeout: per read, for response headers, and the low-speed window [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub read_timeout: Option<Duration>,
    /// Bytes/s below which a connection counts as stalled, 0 = off [default: 1024].
    #[arg(long)]
    pub low_speed_limit: Option<u64>,
    /// Redirects followed per request [default: 10].
    #[arg(long)]
    pub max_redirects: Option<u32>,
    /// PEM file of trusted CA certificates [default: built-in Mozilla roots].
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

impl FetchFlags {
    /// Merges the flags with the configuration file's `[fetch]` table and the defaults.
    pub fn merge(&self, cfg: &Loaded) -> FetchOptions {
        let base = cfg.config.fetch_options();
        FetchOptions {
            retries: self.retries.unwrap_or(base.retries),
            retry_delay: self.retry_delay.unwrap_or(base.retry_delay),
            max_retry_delay: self.max_retry_delay.unwrap_or(base.max_retry_delay),
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            read_timeout: self.read_timeout.unwrap_or(base.read_timeout),
            low_speed_limit: self.low_speed_limit.unwrap_or(base.low_speed_limit),
            max_redirects: self.max_redirects.unwrap_or(base.max_redirects),
            ca_file: self.ca_file.clone().or(base.ca_file),
        }
    }
}

/// What happens after an install.
#[derive(Args, Clone, Debug, Default)]
pub struct RebootFlags {
    /// Reboot-required sentinel path, for fleet reboot coordinators such as kured [default: /run/reboot-required] [config: sentinel].
    #[arg(long)]
    pub sentinel: Option<PathBuf>,
    /// Do not write the sentinel (reboot policy `none`).
    #[arg(long)]
    pub no_sentinel: bool,
    /// Reboot once the install succeeded (reboot policy `now`).
    #[arg(long)]
    pub reboot: bool,
    /// Reboot policy: sentinel, now or none [default: sentinel] [config: reboot].
    #[arg(long, value_enum)]
    pub reboot_policy: Option<RebootPolicy>,
}

/// The reboot policy and the sentinel to write, merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebootSettings {
    /// The policy.
    pub policy: RebootPolicy,
    /// The sentinel to write (none for policy `none`).
    pub sentinel: Option<PathBuf>,
}

impl RebootFlags {
    /// Merges the flags with the configuration file.
    pub fn merge(&self, cfg: &Loaded) -> RebootSettings {
        let policy = if self.reboot {
            RebootPolicy::Now
        } else if self.no_sentinel {
            RebootPolicy::None
        } else {
            self.reboot_policy.or(cfg.config.reboot).unwrap_or_default()
        };
        let sentinel = self
            .sentinel
            .clone()
            .or_else(|| cfg.config.sentinel.clone())
            .unwrap_or_else(|| PathBuf::from(crate::install::DEFAULT_SENTINEL));
        let write = policy != RebootPolicy::None && !self.no_sentinel;
        RebootSettings {
            policy,
            sentinel: write.then_some(sentinel),
        }
    }
}

/// The keyring path: the flag, else the configuration file, else the default.
pub fn keyring_path(flag: Option<PathBuf>, cfg: &Loaded) -> PathBuf {
    flag.or_else(|| cfg.config.keyring.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING))
}

/// The tries for a new slot: the flag, else the configuration file, else the default.
pub fn tries(flag: Option<u8>, cfg: &Loaded) -> u8 {
    flag.or(cfg.config.tries)
        .unwrap_or(crate::select::DEFAULT_TRIES)
}

/// Adaptive installs: on with the flag or the configuration file.
pub fn adaptive(flag: bool, cfg: &Loaded) -> bool {
    flag || cfg.config.adaptive.unwrap_or(false)
}

/// The device's compatible string override: the flag, else the configuration file.
pub fn compatible(flag: Option<String>, cfg: &Loaded) -> Option<String> {
    flag.or_else(|| cfg.config.compatible.clone())
}
