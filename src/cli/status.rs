//! `status`: the slots, their attributes and the health of both GPT copies.

use anyhow::Result;
use clap::Args;

use super::settings::DiskFlags;
use crate::config::Loaded;
use crate::disk::running;

/// `status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub disk: DiskFlags,
    /// The running slot, when this is not the live disk.
    #[arg(long)]
    pub running: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs `status`.
pub fn run(args: StatusArgs, cfg: &Loaded) -> Result<()> {
    let settings = args.disk.merge(cfg)?;
    let mut disk = settings.open(false)?;
    let report = running::status_report(&mut disk, args.running.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
