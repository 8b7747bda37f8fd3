//! Full verification of a bundle file: the signature, every chunk, the whole-image hash.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::error::BundleError;
use super::keys::{KeyId, Keyring};
use super::reader::BundleReader;

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
    /// The kernel part, verified the same way: size and hex SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<(u64, String)>,
    /// Bundle length.
    pub bundle_len: u64,
    /// Wall time of the check, in seconds.
    pub seconds: f64,
}

/// Fully verifies a bundle: signature, every chunk (decompressed with
/// bounds, hashed), the whole-image hash, the kernel part's the same way,
/// and the absence of trailing data.
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
    let root = reader.header().clone();
    let kernel_size = root.kernel().map_or(0, |k| k.size);
    let total = root.image_size + kernel_size;
    progress(0, total);
    reader.read_parallel(threads, &mut |chunk| {
        progress(chunk.image_offset + chunk.data.len() as u64, total);
        Ok(())
    })?;
    let kernel = match root.kernel() {
        Some(k) => {
            reader.start_kernel_part()?;
            reader.read_parallel(threads, &mut |chunk| {
                let done = root.image_size + chunk.image_offset + chunk.data.len() as u64;
                progress(done, total);
                Ok(())
            })?;
            Some((k.size, hex::encode(k.sha256)))
        }
        None => None,
    };
    let h = &root;
    Ok(VerifyReport {
        path: bundle.to_path_buf(),
        key_id: reader.matched_key(),
        image_version: h.image_version.clone(),
        compatible: h.compatible.clone(),
        image_size: h.image_size,
        image_sha256: hex::encode(h.image_sha256),
        chunks: h.chunk_count(),
        kernel,
        bundle_len: h.bundle_len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
