//! `service`: serve `io.abupdate.Updater1` on D-Bus ([`crate::service`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::settings::{self, DiskFlags, FetchFlags};
use crate::config::Loaded;
use crate::install::InstallOptions;
use crate::service::ServiceConfig;

/// `service`.
#[derive(Args, Debug)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// Trusted public key file or directory of *.pub files [default: /etc/abupdate/keys] [config: keyring].
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Tries given to a new slot [default: 3] [config: tries].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=15))]
    pub tries: Option<u8>,
    /// This device's compatible string (default: the running slot's recorded one) [config: compatible].
    #[arg(long)]
    pub compatible: Option<String>,
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
    let config = ServiceConfig {
        disk: args.disk.merge(cfg)?,
        keyring: settings::keyring_path(args.keyring, cfg),
        install: InstallOptions {
            tries: settings::tries(args.tries, cfg),
            compatible: settings::compatible(args.compatible, cfg),
            adaptive: settings::adaptive(false, cfg),
            sentinel,
            ..Default::default()
        },
        fetch: args.fetch.merge(cfg),
    };
    crate::service::serve(config, args.bus_address.as_deref())
}
