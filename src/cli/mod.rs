//! The `abupdate` command line, as a module of the library: one clap-derive `Args` struct
//! per command in one file per command group, one merged settings type per command
//! ([`settings`]), and the error → exit code mapping. `src/main.rs` only parses and calls
//! [`main`]. Errors become one line on stderr and an exit code from the table in README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Loaded;
use crate::exit::Exit;

pub mod bundle;
pub mod channel;
pub mod disk;
pub mod install;
pub mod keygen;
pub mod output;
pub mod service;
pub mod settings;
pub mod slot_ops;
pub mod status;
pub mod update;

#[cfg(test)]
mod tests;

/// The `abupdate` command line.
#[derive(Parser)]
#[command(
    name = "abupdate",
    version,
    about = "A/B root partition updates for GPT disks"
)]
pub struct Cli {
    /// Configuration file (default /etc/abupdate.toml, which may be absent; a file named here
    /// must exist). Flags override its settings.
    #[arg(long, global = true, env = "ABUPDATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands, each wrapping its own `Args` struct.
#[derive(Subcommand)]
pub enum Command {
    /// Disk preparation.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Show the slots, their attributes and the health of both GPT copies.
    Status(status::StatusArgs),
    /// Boot-time hook: choose the slot to boot, spend a try, print what to mount.
    Boot(slot_ops::BootArgs),
    /// Mark a slot (default: the running one) good: successful, no tries, boots next.
    MarkGood(slot_ops::MarkGoodArgs),
    /// Mark a slot (default: the running one) bad: priority 0, tries 0, not successful.
    MarkBad(slot_ops::MarkBadArgs),
    /// Make the other slot boot next, only if it is marked successful.
    Rollback(slot_ops::RollbackArgs),
    /// Post-boot health commit: run checks, then mark the running slot good or bad.
    Commit(slot_ops::CommitArgs),
    /// Generate an ed25519 signing key pair: NAME.key (mode 0600) and NAME.pub.
    Keygen(keygen::KeygenArgs),
    /// Bundle creation and inspection.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Verify a bundle and stream it into the inactive slot, then make that slot boot next.
    Install(install::InstallArgs),
    /// Ask the update channel whether a newer compatible version than the running one exists.
    Check(update::CheckArgs),
    /// Check the channel and act on the update strategy: install (auto), download and verify
    /// into the cache (download-only), or nothing (off); the reboot follows the reboot policy.
    Update(update::UpdateArgs),
    /// Update channel publishing (operator side).
    #[command(subcommand)]
    Channel(channel::ChannelCommand),
    /// Low-level: set a slot's cgpt attributes directly (like `cgpt add -P -T -S`).
    SetAttributes(slot_ops::SetAttributesArgs),
    /// Serve io.abupdate.Updater1 on D-Bus: status, progress and control for other programs.
    Service(service::ServiceArgs),
}

impl Command {
    /// Whether the command works on the node and so reads the configuration file. The boot
    /// hook reads it only when it is named explicitly (a broken file must not stop a machine
    /// from booting); build-host commands never need it.
    fn reads_config(&self) -> bool {
        !matches!(
            self,
            Command::Disk(_)
                | Command::Keygen(_)
                | Command::Bundle(_)
                | Command::Channel(_)
                | Command::Boot(_)
        )
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    // An explicitly named file is always checked.
    let cfg = if cli.command.reads_config() || cli.config.is_some() {
        crate::config::load(cli.config.as_deref())?
    } else {
        Loaded::default()
    };
    let cfg = &cfg;
    match cli.command {
        Command::Disk(cmd) => disk::run(cmd),
        Command::Status(args) => status::run(args, cfg),
        Command::Service(args) => service::run(args, cfg),
        Command::Boot(args) => slot_ops::boot(args, cfg),
        Command::MarkGood(args) => slot_ops::mark_good(args, cfg),
        Command::MarkBad(args) => slot_ops::mark_bad(args, cfg),
        Command::Rollback(args) => slot_ops::rollback(args, cfg),
        Command::Commit(args) => slot_ops::commit(args, cfg),
        Command::SetAttributes(args) => slot_ops::set_attributes(args, cfg),
        Command::Keygen(args) => keygen::run(args),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Install(args) => install::run(args, cfg),
        Command::Check(args) => update::check(args, cfg),
        Command::Update(args) => update::update(args, cfg),
        Command::Channel(cmd) => channel::run(cmd),
    }
}

/// Runs a parsed command line and turns its error into one line on stderr and the
/// documented exit code.
pub fn main(cli: Cli) -> ExitCode {
    crate::disk::sys::default_sigpipe();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("abupdate: error: {}", one_line(&err));
            ExitCode::from(classify(&err) as u8)
        }
    }
}

/// The error and its causes on one line ([`crate::exit::one_line`]).
pub fn one_line(err: &anyhow::Error) -> String {
    crate::exit::one_line(err.as_ref())
}

/// The documented exit code of an error ([`crate::exit::classify_chain`]).
pub fn classify(err: &anyhow::Error) -> Exit {
    crate::exit::classify_chain(err.as_ref())
}
