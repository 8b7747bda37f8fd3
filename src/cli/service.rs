//! `service`: serve `io.abupdate.Updater1` on D-Bus ([`crate::service`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::settings::{self, DiskFlags, FetchFlags};
use super::update::ChannelFlags;
use crate::config::Loaded;
use crate::fetch::update::UpdateSettings;
use crate::install::InstallOptions;
use crate::service::ServiceConfig;

/// `service`.
#[derive(Args, Debug)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// The update channel, keyring, compatible string (also for `Install`).
    #[command(flatten)]
    pub channel: ChannelFlags,
    /// Tries given to a new slot [default: 3] [config: tries].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
    pub tries: Option<u8>,
    /// What `Update` does: auto, download-only or off [config: strategy].
    #[arg(long, value_enum)]
    pub strategy: Option<crate::config::Strategy>,
    /// Where `Update` keeps downloads [config: cache_dir].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// The D-Bus address to serve on (default: the system bus).
    #[arg(long, env = "ABUPDATE_BUS_ADDRESS")]
    pub bus_address: Option<String>,
    /// Where to write the reboot-required sentinel after an install; `none` for no sentinel
    /// [default: /run/reboot-required].
    #[arg(long)]
    pub sentinel: Option<PathBuf>,
    #[command(flatten)]
    pub fetch: FetchFlags,
}

/// Runs `service` until the bus connection ends.
pub fn run(args: ServiceArgs, cfg: &Loaded) -> Result<()> {
    let sentinel = match args.sentinel {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(PathBuf::from(crate::install::DEFAULT_SENTINEL)),
    };
    let channel = args.channel.merge(cfg);
    let tries = settings::tries(args.tries, cfg);
    let adaptive = settings::adaptive(false, cfg);
    let c = &cfg.config;
    let config = ServiceConfig {
        disk: args.disk.merge(cfg)?,
        keyring: channel.keyring.clone(),
        install: InstallOptions {
            tries,
            compatible: channel.compatible.clone(),
            running: channel.running.clone(),
            adaptive,
            sentinel: sentinel.clone(),
            ..Default::default()
        },
        fetch: args.fetch.merge(cfg),
        update: UpdateSettings {
            strategy: args.strategy.or(c.strategy).unwrap_or_default(),
            cache_dir: args
                .cache_dir
                .or_else(|| c.cache_dir.clone())
                .unwrap_or_else(|| PathBuf::from(crate::fetch::channel::DEFAULT_CACHE_DIR)),
            tries,
            adaptive,
            sentinel,
        },
        channel,
    };
    crate::service::serve(config, args.bus_address.as_deref())
}
