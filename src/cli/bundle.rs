//! `bundle create`, `bundle info` and `bundle verify`.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;

use super::output::Progress;
use crate::bundle::format::{BundleHeader, RawHeader};
use crate::bundle::{BundleError, KeyId, Keyring};

pub use super::keygen::{keygen, KeygenReport};
pub use crate::bundle::{verify, VerifyReport};

/// Bundle creation and inspection.
#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Compress (zstd, all cores), hash and sign an image into a bundle.
    Create {
        /// The raw image (e.g. an ext4 or erofs root filesystem).
        #[arg(long)]
        image: PathBuf,
        /// Secret key file (from `abupdate keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Image version string.
        #[arg(long)]
        version: String,
        /// Compatible string: which devices the image is for.
        #[arg(long)]
        compatible: String,
        /// Output bundle file.
        #[arg(long)]
        out: PathBuf,
        /// Uncompressed chunk size (64K to 64M, power of two).
        #[arg(long, value_parser = parse_size, default_value = "4M")]
        chunk_size: u64,
        /// A kernel image (a Unified Kernel Image) for the slot's KERN partition, signed
        /// together with the root image: the pair installs and rolls back as one slot.
        #[arg(long)]
        kernel: Option<PathBuf>,
    },
    /// Show a bundle's header (and check its signature when a keyring is given).
    Info {
        /// The bundle file.
        bundle: PathBuf,
        /// Trusted key file or directory, to check the signature.
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fully verify a bundle: signature, every chunk, the whole-image hash.
    Verify {
        /// The bundle file.
        bundle: PathBuf,
        /// Trusted key directory (any *.pub in it may have signed).
        #[arg(long, conflicts_with = "pubkey", required_unless_present = "pubkey")]
        keyring: Option<PathBuf>,
        /// A single trusted public key file.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `bundle` subcommand.
pub fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Create {
            image,
            key,
            version,
            compatible,
            out,
            chunk_size,
            kernel,
        } => {
            let secret = crate::bundle::keys::read_secret_key(&key)?;
            let chunk_size = u32::try_from(chunk_size)
                .map_err(|_| anyhow::anyhow!("chunk size {chunk_size} is too large"))?;
            let mut progress = Progress::new("compressing", false);
            let mut options = crate::bundle::CreateOptions::new(&version, &compatible);
            options.chunk_size = chunk_size;
            options.kernel = kernel;
            let header = crate::bundle::create_bundle_with_options(
                &image,
                &secret,
                &options,
                &out,
                &mut |d, t| progress.update(d, t),
            )?;
            progress.finish();
            let kernel = header
                .kernel()
                .map(|k| format!(", kernel {} bytes", k.size))
                .unwrap_or_default();
            println!(
                "created {}: version {}, compatible {}, {} bytes in {} chunks{kernel}, {} bytes on disk",
                out.display(),
                header.image_version,
                header.compatible,
                header.image_size,
                header.chunk_count(),
                header.bundle_len()
            );
            Ok(())
        }
        BundleCommand::Info {
            bundle,
            keyring,
            json,
        } => {
            let ring = keyring.as_deref().map(Keyring::load).transpose()?;
            let report = info(&bundle, ring.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json(true))?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        BundleCommand::Verify {
            bundle,
            keyring,
            pubkey,
            json,
        } => {
            let ring = Keyring::load(
                keyring
                    .as_deref()
                    .or(pubkey.as_deref())
                    .expect("clap requires one"),
            )?;
            let mut progress = Progress::new("verifying", json);
            let report = verify(&bundle, &ring, 0, &mut |d, t| progress.update(d, t))?;
            progress.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: OK, signed by key {}, version {}, compatible {}, {} bytes, sha256 {} ({:.2} s)",
                    bundle.display(),
                    report.key_id,
                    report.image_version,
                    report.compatible,
                    report.image_size,
                    report.image_sha256,
                    report.seconds
                );
            }
            Ok(())
        }
    }
}

/// The signature state shown by `bundle info`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// The header verified under this keyring key.
    Verified {
        /// The key it verified under.
        key_id: KeyId,
    },
    /// No keyring was given: nothing shown is authenticated.
    NotChecked,
}

/// What `bundle info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    /// The bundle file.
    pub path: PathBuf,
    /// The parsed header.
    pub header: BundleHeader,
    /// Number of chunks.
    pub chunk_count: u32,
    /// Header length (= payload offset).
    pub header_len: u64,
    /// Bundle length according to the header.
    pub bundle_len: u64,
    /// Actual file length (differs from `bundle_len` if truncated/extended).
    pub file_len: u64,
    /// Signature state.
    pub signature: SignatureStatus,
}

/// Reads a bundle's header for `bundle info`. With a keyring the signature
/// is verified (a bad one is an error); without, the header is shown as
/// unverified. The payload is not read: use [`verify`] for that.
pub fn info(bundle: &Path, keyring: Option<&Keyring>) -> Result<InfoReport, BundleError> {
    let file = File::open(bundle)
        .map_err(|e| BundleError::io(format!("opening bundle {}", bundle.display()), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| BundleError::io(format!("reading metadata of {}", bundle.display()), e))?
        .len();
    let raw = RawHeader::read(&mut BufReader::new(file))?;
    let signature = match keyring {
        Some(ring) => SignatureStatus::Verified {
            key_id: raw.verify(ring)?,
        },
        None => SignatureStatus::NotChecked,
    };
    let header = raw.parse()?;
    Ok(InfoReport {
        path: bundle.to_path_buf(),
        chunk_count: header.chunk_count(),
        header_len: header.header_len(),
        bundle_len: header.bundle_len(),
        file_len,
        header,
        signature,
    })
}

impl InfoReport {
    /// Human-readable text, one `key: value` per line.
    pub fn to_text(&self) -> String {
        let h = &self.header;
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<16} {v}\n"));
        line("bundle:", self.path.display().to_string());
        line("format version:", h.format_version.to_string());
        line("image version:", h.image_version.clone());
        line("compatible:", h.compatible.clone());
        line("image size:", format!("{} bytes", h.image_size));
        line("image sha256:", hex::encode(h.image_sha256));
        line("compression:", "zstd".into());
        line(
            "chunks:",
            format!("{} x {} bytes", self.chunk_count, h.chunk_size),
        );
        line("header length:", format!("{} bytes", self.header_len));
        let size_note = if self.file_len == self.bundle_len {
            String::new()
        } else {
            format!(" (file is {} bytes: truncated or extended!)", self.file_len)
        };
        line(
            "bundle length:",
            format!("{} bytes{size_note}", self.bundle_len),
        );
        line("signed by key:", h.signer_key_id.to_string());
        line(
            "signature:",
            match &self.signature {
                SignatureStatus::Verified { key_id } => format!("verified (key {key_id})"),
                SignatureStatus::NotChecked => "NOT CHECKED (no keyring given)".into(),
            },
        );
        if let Some(k) = h.kernel() {
            line(
                "kernel:",
                format!(
                    "{} bytes in {} chunks, sha256 {}",
                    k.size,
                    k.chunks.len(),
                    hex::encode(k.sha256)
                ),
            );
        }
        for ext in &h.extensions {
            line(
                "extension:",
                format!("tag {:#06x}, {} bytes", ext.tag, ext.value.len()),
            );
        }
        s
    }

    /// JSON for `bundle info --json`; the per-chunk table (which can have up
    /// to a million entries) only with `with_chunks`.
    pub fn to_json(&self, with_chunks: bool) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let (Some(k), Some(o)) = (self.header.kernel(), v.as_object_mut()) {
            o.insert(
                "kernel".into(),
                serde_json::json!({
                    "size": k.size,
                    "sha256": hex::encode(k.sha256),
                    "chunks": k.chunks.len(),
                }),
            );
        }
        if !with_chunks {
            if let Some(h) = v.get_mut("header").and_then(|h| h.as_object_mut()) {
                h.remove("chunks");
            }
        }
        v
    }
}

/// Parses a size such as `4M`, `4MiB`, `65536`, `64k` (binary multiples:
/// k/K = 1024; K, M, G, T). For `--chunk-size`, `--slot-size`, `--disk-size`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional K/M/G suffix"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
