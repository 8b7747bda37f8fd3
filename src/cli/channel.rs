//! `channel create`: write the signed channel index for a bundle.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::config::parse_duration;

/// Update channel publishing (operator side).
#[derive(Subcommand, Debug)]
pub enum ChannelCommand {
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

/// Runs a `channel` subcommand.
pub fn run(cmd: ChannelCommand) -> Result<()> {
    let ChannelCommand::Create {
        bundle,
        key,
        bundle_url,
        out,
        expires_in,
        expires_at,
    } = cmd;
    let secret = crate::bundle::keys::read_secret_key(&key)?;
    let mut index = crate::fetch::channel::index_for_bundle(&bundle, bundle_url.as_deref())?;
    index.expires = match (expires_in, expires_at) {
        (Some(d), _) => Some(crate::fetch::channel::unix_now().saturating_add(d.as_secs())),
        (None, at) => at,
    };
    let text = crate::fetch::channel::sign_index(&index, &secret);
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
                |t| format!("expires {}", crate::fetch::channel::rfc3339(t))
            ),
            crate::bundle::KeyId::of(&secret.verifying_key())
        );
    Ok(())
}
