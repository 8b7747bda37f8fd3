//! `keygen`: generate an ed25519 signing key pair.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::bundle::keys::{self, KeyId};
use crate::bundle::{BundleError, KeyError};

/// `keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Output name (NAME.key and NAME.pub are written; neither may exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `keygen`.
pub fn run(args: KeygenArgs) -> Result<()> {
    let report = keygen(&args.out)?;
    println!(
        "wrote {} (secret, mode 0600) and {} (public), key id {}",
        report.secret_path.display(),
        report.public_path.display(),
        report.key_id
    );
    Ok(())
}

/// What `keygen` produced.
#[derive(Debug, Clone, Serialize)]
pub struct KeygenReport {
    /// Id of the new key.
    pub key_id: KeyId,
    /// The secret key file (mode 0600).
    pub secret_path: PathBuf,
    /// The public key file.
    pub public_path: PathBuf,
}

/// Generates a key pair and writes `NAME.key` (mode 0600) and `NAME.pub`,
/// where `name` is a path without extension. Refuses to overwrite either
/// file; on failure no half-written pair is left behind.
pub fn keygen(name: &Path) -> Result<KeygenReport, BundleError> {
    let secret_path = with_suffix(name, "key");
    let public_path = with_suffix(name, "pub");
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(KeyError::Exists { path: path.clone() }.into());
        }
    }
    let comment = name
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = keys::generate_signing_key();
    keys::write_secret_key(&secret_path, &key, &comment)?;
    if let Err(e) = keys::write_public_key(&public_path, &key.verifying_key(), &comment) {
        // Without its public half the secret key is useless and confusing.
        let _ = std::fs::remove_file(&secret_path);
        return Err(e.into());
    }
    Ok(KeygenReport {
        key_id: KeyId::of(&key.verifying_key()),
        secret_path,
        public_path,
    })
}

fn with_suffix(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Keyring;

    #[test]
    fn keygen_writes_both_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("release");
        let report = keygen(&name).unwrap();
        let key = keys::read_secret_key(&report.secret_path).unwrap();
        let ring = Keyring::load(&report.public_path).unwrap();
        assert!(ring.get(&KeyId::of(&key.verifying_key())).is_some());
        assert!(matches!(
            keygen(&name),
            Err(BundleError::Key(KeyError::Exists { .. }))
        ));
    }
}
