//! `status`: the slots, their attributes and the health of both GPT copies.

use anyhow::Result;
use clap::Args;

use super::settings::DiskFlags;
use crate::config::Loaded;
use crate::disk::record;
use crate::disk::running::{self, Fallback};

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
    let mut report = disk.status()?;
    let slots = disk.slots()?;
    let found = running::find(&disk, &slots, args.running.as_deref(), Fallback::Nothing)?;
    let running = found.as_ref().map(|r| r.index);
    report.running_source = found.map(|r| r.source.as_str());
    let sector_size = disk.gpt.sector_size();
    for (i, slot) in slots.iter().enumerate() {
        report.slots[i].running = running == Some(i);
        report.slots[i].version =
            record::read_record(&mut disk.dev, slot, sector_size).map(|r| r.version);
    }
    report.running = running.map(|i| slots[i].name.clone());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
