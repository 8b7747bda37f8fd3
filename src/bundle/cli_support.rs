//! Handlers behind the `keygen` and `bundle` subcommands, kept free of clap
//! so they are testable and the CLI stays a thin argument mapping.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::error::{BundleError, KeyError};
use super::format::{BundleHeader, RawHeader};
use super::keys::{self, KeyId, Keyring};
use super::reader::BundleReader;

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
        if !with_chunks {
            if let Some(h) = v.get_mut("header").and_then(|h| h.as_object_mut()) {
                h.remove("chunks");
            }
        }
        v
    }
}

/// What `bundle verify` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The bundle file.
    pub path: PathBuf,
    /// Key the signature verified under.
    pub key_id: KeyId,
    /// Image version.
    pub image_version: String,
    /// Compatible string.
    pub compatible: String,
    /// Verified image size.
    pub image_size: u64,
    /// Hex of the verified whole-image SHA-256.
    pub image_sha256: String,
    /// Number of chunks verified.
    pub chunks: u32,
    /// Bundle length.
    pub bundle_len: u64,
    /// Wall time of the check, in seconds.
    pub seconds: f64,
}

/// Fully verifies a bundle: signature, every chunk (decompressed with
/// bounds, hashed), the whole-image hash and the absence of trailing data.
/// `threads` decode workers (0 = one per core); `progress(done, total)` in
/// uncompressed bytes.
pub fn verify(
    bundle: &Path,
    keyring: &Keyring,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, BundleError> {
    let start = Instant::now();
    let file = File::open(bundle)
        .map_err(|e| BundleError::io(format!("opening bundle {}", bundle.display()), e))?;
    let mut reader = BundleReader::new(BufReader::with_capacity(1 << 20, file), keyring)?;
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let total = reader.header().image_size;
    progress(0, total);
    reader.read_parallel(threads, &mut |chunk| {
        progress(chunk.image_offset + chunk.data.len() as u64, total);
        Ok(())
    })?;
    let h = reader.header();
    Ok(VerifyReport {
        path: bundle.to_path_buf(),
        key_id: reader.matched_key(),
        image_version: h.image_version.clone(),
        compatible: h.compatible.clone(),
        image_size: h.image_size,
        image_sha256: hex::encode(h.image_sha256),
        chunks: h.chunk_count(),
        bundle_len: h.bundle_len(),
        seconds: start.elapsed().as_secs_f64(),
    })
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
