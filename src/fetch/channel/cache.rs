//! The download cache of the `download-only` strategy: bundles fetched ahead of time, fully
//! verified, named by the index they came from, resumed after an interruption.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{is_cancelled, ChannelError, ChannelIndex, Found};
use crate::bundle::{self, Keyring};
use crate::fetch::http::{Fetcher, HttpError};

/// Path of the verified cached bundle for `index` in `cache_dir`.
pub fn cached_path(cache_dir: &Path, index: &ChannelIndex) -> PathBuf {
    cache_dir.join(format!("{}.abup", index.sha256))
}

fn partial_path(cache_dir: &Path, index: &ChannelIndex) -> PathBuf {
    cache_dir.join(format!("{}.abup.partial", index.sha256))
}

/// The cached bundle for `index`, if one was downloaded and verified, and still matches.
pub fn cached_bundle(cache_dir: &Path, index: &ChannelIndex) -> Option<PathBuf> {
    let path = cached_path(cache_dir, index);
    let len = fs::metadata(&path).ok()?.len();
    (len == index.size).then_some(path)
}

/// Removes everything in the cache except files for `keep` (the current index's bundle).
pub fn prune_cache(cache_dir: &Path, keep: Option<&ChannelIndex>) -> Result<(), ChannelError> {
    let entries = match fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ChannelError::io(
                format!("reading {}", cache_dir.display()),
                e,
            ))
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".abup") || name.ends_with(".abup.partial");
        let kept = keep.is_some_and(|k| name.starts_with(&k.sha256));
        if ours && !kept {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Result of [`download_to_cache`].
#[derive(Debug, Clone, Serialize)]
pub struct Downloaded {
    /// The verified bundle file.
    pub path: PathBuf,
    /// The URL it came from (`None`: it was already in the cache).
    pub url: Option<String>,
    /// Bytes that were already there from an earlier, interrupted run.
    pub resumed_from: u64,
}

/// Downloads the bundle of `found` into `cache_dir` (resuming a partial file left by an
/// earlier run), trying the bundle URLs in order, then verifies it completely (signature,
/// every chunk, the image hash, and that it is what the index says) and renames it to
/// [`cached_path`]. A file that fails verification is deleted, so the next run starts over.
pub fn download_to_cache(
    fetcher: &Fetcher,
    found: &Found,
    keyring: &Keyring,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
    on_mirror_failed: &mut dyn FnMut(&str, &ChannelError),
) -> Result<Downloaded, ChannelError> {
    let index = &found.index;
    if let Some(path) = cached_bundle(cache_dir, index) {
        return Ok(Downloaded {
            path,
            url: None,
            resumed_from: 0,
        });
    }
    fs::create_dir_all(cache_dir)
        .map_err(|e| ChannelError::io(format!("creating {}", cache_dir.display()), e))?;
    prune_cache(cache_dir, Some(index))?;
    let partial = partial_path(cache_dir, index);
    let mut last_err = None;
    for url in &found.bundle_urls {
        match download_one(fetcher, url, index, &partial, progress) {
            Ok(resumed_from) => {
                let verified = verify_cached(&partial, keyring, index, progress);
                if let Err(e) = verified {
                    let _ = fs::remove_file(&partial);
                    return Err(e);
                }
                let path = cached_path(cache_dir, index);
                fs::rename(&partial, &path)
                    .map_err(|e| ChannelError::io(format!("renaming {}", partial.display()), e))?;
                return Ok(Downloaded {
                    path,
                    url: Some(url.clone()),
                    resumed_from,
                });
            }
            Err(e) if is_cancelled(&e) || e.is_refusal() => return Err(e),
            Err(e) => {
                on_mirror_failed(url, &e);
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or(ChannelError::NoChannel))
}

fn download_one(
    fetcher: &Fetcher,
    url: &str,
    index: &ChannelIndex,
    partial: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<u64, ChannelError> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .map_err(|e| ChannelError::io(format!("opening {}", partial.display()), e))?;
    let mut have = file
        .metadata()
        .map_err(|e| ChannelError::io(format!("reading {}", partial.display()), e))?
        .len();
    if have > index.size {
        file.set_len(0)
            .map_err(|e| ChannelError::io(format!("truncating {}", partial.display()), e))?;
        have = 0;
    }
    let resumed_from = have;
    if have == index.size {
        return Ok(resumed_from);
    }
    let mut source = fetcher.open(url, have, index.expected())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match source.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                return Err(match HttpError::from_io(&e) {
                    Some(_) => {
                        let inner = e.into_inner().expect("wrapped");
                        ChannelError::Fetch(*inner.downcast::<HttpError>().expect("checked"))
                    }
                    None => ChannelError::io(format!("downloading {url}"), e),
                })
            }
        };
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| ChannelError::io(format!("writing {}", partial.display()), e))?;
        have += n as u64;
        progress("downloading", have, index.size);
    }
    file.sync_all()
        .map_err(|e| ChannelError::io(format!("syncing {}", partial.display()), e))?;
    if have != index.size {
        return Err(ChannelError::CacheMismatch {
            path: partial.to_path_buf(),
            reason: format!(
                "download ended at {have} bytes, the index says {}",
                index.size
            ),
        });
    }
    Ok(resumed_from)
}

fn verify_cached(
    path: &Path,
    keyring: &Keyring,
    index: &ChannelIndex,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), ChannelError> {
    let report = bundle::verify(path, keyring, 0, &mut |d, t| progress("verifying", d, t))?;
    let mismatch = |reason: String| ChannelError::CacheMismatch {
        path: path.to_path_buf(),
        reason,
    };
    if report.image_sha256 != index.sha256 {
        return Err(mismatch(format!(
            "image sha256 {} , index says {}",
            report.image_sha256, index.sha256
        )));
    }
    if report.image_version != index.version || report.compatible != index.compatible {
        return Err(mismatch(format!(
            "bundle is {} for {}, index says {} for {}",
            report.image_version, report.compatible, index.version, index.compatible
        )));
    }
    Ok(())
}
