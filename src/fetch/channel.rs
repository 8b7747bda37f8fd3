//! Update channels: a small signed index at a URL that names the latest bundle, the decision
//! whether a node should install it, and the download cache of the `download-only` strategy.
//!
//! The index file is a JSON envelope (docs/fleet.md is the specification):
//!
//! ```json
//! {
//!   "index": "{\"format\":1,\"version\":\"2.0\",\"compatible\":\"acme-gw\",...}",
//!   "key_id": "0123456789abcdef",
//!   "signature": "<128 hex digits: ed25519 signature>"
//! }
//! ```
//!
//! `index` is the signed text, kept as a string so that the exact signed bytes survive any
//! JSON re-encoding; the signature covers [`SIGNATURE_DOMAIN`] followed by those bytes, made
//! with the same ed25519 keys as bundles (the domain prefix keeps an index signature from ever
//! being valid for anything else). One file, so a mirror that syncs files one by one can never
//! serve an index with the signature of another. Nothing inside `index` is interpreted before
//! the signature verified.

use std::cmp::Ordering;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::attrs::SlotAttributes;
use crate::bundle::{self, BundleError, KeyId, Keyring};
use crate::fetch::http::{self, Expected, Fetcher, HttpError};
use crate::install::compare_versions;
use crate::select;

mod cache;

pub use cache::{cached_bundle, cached_path, download_to_cache, prune_cache, Downloaded};

/// Prefix of the signed message of a channel index.
pub const SIGNATURE_DOMAIN: &[u8] = b"abupdate-channel-index-v1\n";
/// The index format this build writes and reads.
pub const INDEX_FORMAT: u32 = 1;
/// Largest index envelope accepted.
pub const MAX_INDEX_BYTES: u64 = 64 * 1024;
/// Default directory of the download cache.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/abupdate";

/// Errors of channels, indexes and the cache.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No channel URL is configured.
    #[error(
        "no update channel: pass --channel URL or set channel = [\"URL\", ...] in the config file"
    )]
    NoChannel,
    /// Fetching failed.
    #[error(transparent)]
    Fetch(#[from] HttpError),
    /// The envelope is not a signed index (not JSON, missing fields, bad hex).
    #[error("channel index {url} is malformed: {reason}")]
    Malformed {
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The index is signed by a key not in the keyring.
    #[error("channel index {url} is signed by key {key_id}, which is not in the keyring")]
    UntrustedKey {
        /// Where it came from.
        url: String,
        /// The key named.
        key_id: KeyId,
    },
    /// The signature does not verify.
    #[error("channel index {url}: bad signature (does not verify under key {key_id})")]
    BadSignature {
        /// Where it came from.
        url: String,
        /// The key tried.
        key_id: KeyId,
    },
    /// The signed index content is invalid.
    #[error("channel index {url}: {reason}")]
    Invalid {
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The index is past its signed expiry time.
    #[error(
        "channel index {url} expired at {} (this node's clock says {}): the channel has not been re-signed, or the mirror serves a stale copy",
        rfc3339(*.expired_at),
        rfc3339(*.now)
    )]
    Expired {
        /// Where it came from.
        url: String,
        /// Its `expires` time (Unix seconds).
        expired_at: u64,
        /// The time it was checked at (Unix seconds).
        now: u64,
    },
    /// Every mirror failed; each failure is listed.
    #[error("no mirror served a valid channel index: {}", list_failures(.failures))]
    AllMirrorsFailed {
        /// (URL, error) per mirror, in the order tried.
        failures: Vec<(String, ChannelError)>,
    },
    /// Reading a bundle (channel create, cache verification).
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The cached bundle is not the one the index describes.
    #[error("downloaded bundle {path} is not what the signed index describes: {reason}")]
    CacheMismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Formats Unix seconds as an RFC 3339 UTC time (seconds precision).
pub fn rfc3339(unix_seconds: u64) -> String {
    // RFC 3339 ends at year 9999; a signed field can hold anything up to 2^64-1.
    const LAST_RFC3339_SECOND: u64 = 253_402_300_799;
    if unix_seconds > LAST_RFC3339_SECOND {
        return format!("{unix_seconds} s after 1970-01-01T00:00:00Z");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now, in seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses an index whose signed `expires` time is at or before `now` (Unix seconds).
///
/// A node whose clock is behind (no RTC, before NTP) accepts an index it would refuse later:
/// the check can only err towards installing a properly signed update, never towards
/// refusing a fresh one.
pub fn check_expiry(index: &ChannelIndex, now: u64, url: &str) -> Result<(), ChannelError> {
    match index.expires {
        Some(expired_at) if expired_at <= now => Err(ChannelError::Expired {
            url: url.to_string(),
            expired_at,
            now,
        }),
        _ => Ok(()),
    }
}

fn list_failures(failures: &[(String, ChannelError)]) -> String {
    failures
        .iter()
        .map(|(url, e)| format!("[{url}: {e}]"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl ChannelError {
    /// Whether this error (or, for [`ChannelError::AllMirrorsFailed`], any mirror's) means
    /// something was refused as untrustworthy or invalid, rather than not fetched.
    pub fn is_refusal(&self) -> bool {
        match self {
            ChannelError::Malformed { .. }
            | ChannelError::UntrustedKey { .. }
            | ChannelError::BadSignature { .. }
            | ChannelError::Invalid { .. }
            | ChannelError::Expired { .. }
            | ChannelError::CacheMismatch { .. } => true,
            ChannelError::Bundle(e) => !matches!(e, BundleError::Io { .. }),
            ChannelError::AllMirrorsFailed { failures } => {
                failures.iter().any(|(_, e)| e.is_refusal())
            }
            _ => false,
        }
    }

    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ChannelError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The signed content of a channel index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelIndex {
    /// Index format ([`INDEX_FORMAT`]).
    pub format: u32,
    /// Latest image version on the channel.
    pub version: String,
    /// Which devices the image is for.
    pub compatible: String,
    /// Bundle URL: absolute, or relative to the URL the index was fetched from.
    pub bundle: String,
    /// Bundle file length in bytes.
    pub size: u64,
    /// SHA-256 of the image (hex), as in the bundle header.
    pub sha256: String,
    /// When the index stops being trusted, in seconds since the Unix epoch (UTC). A node
    /// refuses an index past this time, so a mirror that keeps serving an old signed index
    /// (a freeze attack: the node never hears of a security fix) is noticed once it expires.
    /// Absent: the index never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl ChannelIndex {
    /// The image hash as bytes (validated by [`verify_index`]).
    pub fn sha256_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let _ = hex::decode_to_slice(&self.sha256, &mut out);
        out
    }

    /// What a download of this index's bundle must be.
    pub fn expected(&self) -> Expected {
        Expected {
            len: Some(self.size),
            version: Some(self.version.clone()),
            compatible: Some(self.compatible.clone()),
            image_sha256: Some(self.sha256_bytes()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    index: String,
    key_id: String,
    signature: String,
}

/// A verified index and who signed it.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedIndex {
    /// The index.
    pub index: ChannelIndex,
    /// The key its signature verified under.
    pub key_id: KeyId,
}

/// Builds the index for a bundle file: version, compatible, length and image hash from its
/// header (the file length must match what the header declares). `bundle_url` defaults to the
/// file's name, i.e. the bundle sits beside the index.
pub fn index_for_bundle(
    bundle: &Path,
    bundle_url: Option<&str>,
) -> Result<ChannelIndex, ChannelError> {
    let file = fs::File::open(bundle)
        .map_err(|e| ChannelError::io(format!("opening bundle {}", bundle.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| ChannelError::io(format!("reading {}", bundle.display()), e))?
        .len();
    let header = bundle::read_unverified_header(&mut io::BufReader::new(file))?;
    if header.bundle_len() != len {
        return Err(ChannelError::Invalid {
            url: bundle.display().to_string(),
            reason: format!(
                "the file is {len} bytes but its header declares {}",
                header.bundle_len()
            ),
        });
    }
    let url = match bundle_url {
        Some(u) => u.to_string(),
        None => bundle
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ChannelError::Invalid {
                url: bundle.display().to_string(),
                reason: "no file name".into(),
            })?,
    };
    Ok(ChannelIndex {
        format: INDEX_FORMAT,
        version: header.image_version,
        compatible: header.compatible,
        bundle: url,
        size: len,
        sha256: hex::encode(header.image_sha256),
        expires: None,
    })
}

/// Signs `index` with `key`, returning the envelope file text.
pub fn sign_index(index: &ChannelIndex, key: &SigningKey) -> String {
    let text = serde_json::to_string(index).expect("index serializes");
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(text.as_bytes());
    let signature = key.sign(&message);
    let envelope = Envelope {
        index: text,
        key_id: KeyId::of(&key.verifying_key()).to_string(),
        signature: hex::encode(signature.to_bytes()),
    };
    let mut out = serde_json::to_string_pretty(&envelope).expect("envelope serializes");
    out.push('\n');
    out
}

/// Verifies an index envelope against `keyring`, then parses and checks the signed content.
/// `url` names the source in errors.
pub fn verify_index(
    bytes: &[u8],
    keyring: &Keyring,
    url: &str,
) -> Result<VerifiedIndex, ChannelError> {
    let malformed = |reason: String| ChannelError::Malformed {
        url: url.to_string(),
        reason,
    };
    let envelope: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("not a signed index envelope: {e}")))?;
    let mut id = [0u8; 8];
    hex::decode_to_slice(&envelope.key_id, &mut id)
        .map_err(|e| malformed(format!("key_id is not 16 hex digits: {e}")))?;
    let key_id = KeyId(id);
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&envelope.signature, &mut sig)
        .map_err(|e| malformed(format!("signature is not 128 hex digits: {e}")))?;
    let trusted = keyring.get(&key_id).ok_or(ChannelError::UntrustedKey {
        url: url.to_string(),
        key_id,
    })?;
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(envelope.index.as_bytes());
    trusted
        .key
        .verify_strict(&message, &Signature::from_bytes(&sig))
        .map_err(|_| ChannelError::BadSignature {
            url: url.to_string(),
            key_id,
        })?;
    let invalid = |reason: String| ChannelError::Invalid {
        url: url.to_string(),
        reason,
    };
    let index: ChannelIndex = serde_json::from_str(&envelope.index)
        .map_err(|e| invalid(format!("signed content is not an index: {e}")))?;
    if index.format != INDEX_FORMAT {
        return Err(invalid(format!(
            "index format {} is not supported (this abupdate reads format {INDEX_FORMAT})",
            index.format
        )));
    }
    bundle::format::check_string("version", &index.version).map_err(|e| invalid(e.to_string()))?;
    bundle::format::check_string("compatible", &index.compatible)
        .map_err(|e| invalid(e.to_string()))?;
    let mut sha = [0u8; 32];
    hex::decode_to_slice(&index.sha256, &mut sha)
        .map_err(|e| invalid(format!("sha256 is not 64 hex digits: {e}")))?;
    if index.size == 0 {
        return Err(invalid("size is 0".into()));
    }
    if index.bundle.is_empty() {
        return Err(invalid("bundle URL is empty".into()));
    }
    Ok(VerifiedIndex { index, key_id })
}

/// The index found on a channel.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    /// The verified index.
    pub index: ChannelIndex,
    /// The key it verified under.
    pub key_id: KeyId,
    /// The channel URL that served it (as configured).
    pub channel: String,
    /// Where it was finally fetched from (after redirects).
    pub index_url: String,
    /// The bundle URLs to try, in order: resolved against the serving mirror, then against
    /// the other mirrors in their configured order.
    pub bundle_urls: Vec<String>,
    /// Mirrors that failed before this one, with why.
    pub skipped: Vec<(String, String)>,
}

/// Fetches and verifies the index from the first mirror (in order) that serves a valid one.
/// Reports each mirror that fails through `on_skip`.
pub fn fetch_index(
    fetcher: &Fetcher,
    channels: &[String],
    keyring: &Keyring,
    on_skip: &mut dyn FnMut(&str, &ChannelError),
) -> Result<Found, ChannelError> {
    if channels.is_empty() {
        return Err(ChannelError::NoChannel);
    }
    let mut failures: Vec<(String, ChannelError)> = Vec::new();
    for (i, channel) in channels.iter().enumerate() {
        let attempt = fetcher
            .get_bytes(
                channel,
                MAX_INDEX_BYTES,
                http::INDEX_RETRIES.min(fetcher.options().retries),
            )
            .map_err(ChannelError::from)
            .and_then(|fetched| {
                let verified = verify_index(&fetched.body, keyring, &fetched.final_url)?;
                check_expiry(&verified.index, unix_now(), &fetched.final_url)?;
                Ok((verified, fetched))
            });
        match attempt {
            Ok((verified, fetched)) => {
                let mut bundle_urls = Vec::new();
                let bases = std::iter::once(fetched.final_url.as_str())
                    .chain(channels[i + 1..].iter().map(String::as_str))
                    .chain(channels[..i].iter().map(String::as_str));
                for base in bases {
                    let url = http::resolve_url(base, &verified.index.bundle)?;
                    if !bundle_urls.contains(&url) {
                        bundle_urls.push(url);
                    }
                }
                return Ok(Found {
                    index: verified.index,
                    key_id: verified.key_id,
                    channel: channel.clone(),
                    index_url: fetched.final_url,
                    bundle_urls,
                    skipped: failures
                        .iter()
                        .map(|(u, e)| (u.clone(), e.to_string()))
                        .collect(),
                });
            }
            Err(e) if is_cancelled(&e) => return Err(e),
            Err(e) => {
                on_skip(channel, &e);
                failures.push((channel.clone(), e));
            }
        }
    }
    Err(ChannelError::AllMirrorsFailed { failures })
}

fn is_cancelled(e: &ChannelError) -> bool {
    matches!(e, ChannelError::Fetch(HttpError::Cancelled))
}

/// What one slot holds, for [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// Label.
    pub name: String,
    /// Attributes.
    pub attrs: SlotAttributes,
    /// Installed version, from the slot record.
    pub version: Option<String>,
    /// Installed image hash, from the slot record.
    pub sha256: Option<[u8; 32]>,
}

/// What `check` and `update` conclude.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The running slot has the channel's version or a newer one.
    UpToDate,
    /// A newer compatible version is available.
    Available,
    /// The other slot already holds it and boots next: only a reboot is missing.
    PendingReboot,
    /// The other slot holds it but it is not set to boot (its trial failed, it was marked bad,
    /// or the node was rolled back): not installed again automatically.
    PreviouslyFailed,
    /// The running slot is still on trial (not committed), so the other slot is the only
    /// known-good one and must not be overwritten yet.
    RunningNotCommitted,
    /// The channel serves another device type.
    Incompatible,
}

impl Verdict {
    /// A one-line explanation.
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::UpToDate => "up to date",
            Verdict::Available => "update available",
            Verdict::PendingReboot => "update installed, waiting for a reboot",
            Verdict::PreviouslyFailed => {
                "the channel's version failed on this node before (its slot is not set to boot); not installing it again automatically: `abupdate install` it to retry"
            }
            Verdict::RunningNotCommitted => {
                "the running slot is not committed yet (health commit pending); not touching the other, last known-good slot"
            }
            Verdict::Incompatible => "the channel serves bundles for another device type",
        }
    }
}

/// Decides what to do about `index` on a node whose running slot is `running` and other slot
/// `other`. `slots` are all slots' attributes in table order; `other_index` indexes it.
pub fn decide(
    running: &SlotView,
    other: &SlotView,
    slots: &[SlotAttributes],
    other_index: usize,
    device_compatible: &str,
    index: &ChannelIndex,
) -> Verdict {
    if index.compatible != device_compatible {
        return Verdict::Incompatible;
    }
    let sha = index.sha256_bytes();
    if running.sha256 == Some(sha) {
        return Verdict::UpToDate;
    }
    if let Some(v) = &running.version {
        if compare_versions(&index.version, v) != Ordering::Greater {
            return Verdict::UpToDate;
        }
    }
    if other.sha256 == Some(sha) {
        return if select::next_slot(slots) == Some(other_index) {
            Verdict::PendingReboot
        } else {
            Verdict::PreviouslyFailed
        };
    }
    if select::check_install_target(slots, other_index).is_err() {
        return Verdict::RunningNotCommitted;
    }
    Verdict::Available
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ChannelIndex {
        ChannelIndex {
            format: 1,
            version: "2.0".into(),
            compatible: "board".into(),
            bundle: "b.abup".into(),
            size: 1000,
            sha256: "ab".repeat(32),
            expires: None,
        }
    }

    #[test]
    fn expiry_is_signed_and_checked() {
        let key = bundle::keys::generate_signing_key();
        let ring = Keyring::from_keys([key.verifying_key()]).unwrap();
        let mut ix = index();
        ix.expires = Some(1_800_000_000);
        let text = sign_index(&ix, &key);
        let v = verify_index(text.as_bytes(), &ring, "u").unwrap();
        assert_eq!(v.index.expires, Some(1_800_000_000));
        assert!(check_expiry(&v.index, 1_799_999_999, "u").is_ok());
        for now in [1_800_000_000, 1_800_000_001, u64::MAX] {
            let err = check_expiry(&v.index, now, "u").unwrap_err();
            assert!(err.is_refusal());
            assert!(
                err.to_string().contains("expired at 2027-01-15T08:00:00Z"),
                "{err}"
            );
        }
        // Pushing the expiry later breaks the signature.
        let extended = text.replace("1800000000", "1900000000");
        assert_ne!(extended, text);
        assert!(matches!(
            verify_index(extended.as_bytes(), &ring, "u"),
            Err(ChannelError::BadSignature { .. })
        ));
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(rfc3339(u64::MAX).contains("after 1970"));
        // No expiry: never expires; an index written without the field still reads.
        assert!(check_expiry(&index(), u64::MAX, "u").is_ok());
        assert!(!sign_index(&index(), &key).contains("expires"));
    }

    #[test]
    fn sign_and_verify_round_trip_and_tamper() {
        let key = bundle::keys::generate_signing_key();
        let ring = Keyring::from_keys([key.verifying_key()]).unwrap();
        let text = sign_index(&index(), &key);
        let v = verify_index(text.as_bytes(), &ring, "u").unwrap();
        assert_eq!(v.index, index());
        // Tampering with the signed text breaks the signature.
        let tampered = text.replace("2.0", "9.0");
        assert!(matches!(
            verify_index(tampered.as_bytes(), &ring, "u"),
            Err(ChannelError::BadSignature { .. })
        ));
        // Another key is not trusted.
        let other = bundle::keys::generate_signing_key();
        let ring2 = Keyring::from_keys([other.verifying_key()]).unwrap();
        assert!(matches!(
            verify_index(text.as_bytes(), &ring2, "u"),
            Err(ChannelError::UntrustedKey { .. })
        ));
        assert!(matches!(
            verify_index(b"<html>", &ring, "u"),
            Err(ChannelError::Malformed { .. })
        ));
    }

    #[test]
    fn decisions() {
        let good = SlotAttributes::new(2, 0, true);
        let empty = SlotAttributes::new(0, 0, false);
        let sha = index().sha256_bytes();
        let view = |name: &str, attrs, version: Option<&str>, sha256| SlotView {
            name: name.into(),
            attrs,
            version: version.map(String::from),
            sha256,
        };
        let a = view("A", good, Some("1.0"), Some([1; 32]));
        let b = view("B", empty, None, None);
        let slots = [good, empty];
        assert_eq!(
            decide(&a, &b, &slots, 1, "board", &index()),
            Verdict::Available
        );
        assert_eq!(
            decide(&a, &b, &slots, 1, "other", &index()),
            Verdict::Incompatible
        );
        let a2 = view("A", good, Some("2.0"), Some([1; 32]));
        assert_eq!(
            decide(&a2, &b, &slots, 1, "board", &index()),
            Verdict::UpToDate
        );
        let a3 = view("A", good, Some("3.0"), Some([1; 32]));
        assert_eq!(
            decide(&a3, &b, &slots, 1, "board", &index()),
            Verdict::UpToDate
        );
        // Installed in B, B boots next: pending reboot.
        let trial = SlotAttributes::new(3, 3, false);
        let b2 = view("B", trial, Some("2.0"), Some(sha));
        assert_eq!(
            decide(&a, &b2, &[good, trial], 1, "board", &index()),
            Verdict::PendingReboot
        );
        // Installed in B, B failed (P0 T0 S0 with its record): not again.
        let b3 = view("B", empty, Some("2.0"), Some(sha));
        assert_eq!(
            decide(&a, &b3, &slots, 1, "board", &index()),
            Verdict::PreviouslyFailed
        );
        // Running on trial, B the last good one.
        let on_trial = SlotAttributes::new(3, 2, false);
        let b4 = view(
            "B",
            SlotAttributes::new(2, 0, true),
            Some("0.9"),
            Some([2; 32]),
        );
        let a4 = view("A", on_trial, Some("1.0"), Some([1; 32]));
        assert_eq!(
            decide(&a4, &b4, &[on_trial, b4.attrs], 1, "board", &index()),
            Verdict::RunningNotCommitted
        );
    }
}
