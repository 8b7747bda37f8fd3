//! What a download reports as it goes (retries, resumes, ignored ranges) and its totals.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// Progress of downloads, for the event stream (`--json`) and stderr.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum FetchEvent {
    /// A connection answered (the first one, or a resume).
    FetchConnected {
        /// URL requested.
        url: String,
        /// URL after redirects.
        final_url: String,
        /// HTTP status.
        status: u16,
        /// Byte offset the response starts at (after discarding, for a 200 to a ranged request).
        offset: u64,
        /// Total length the server reports, if any.
        length: Option<u64>,
    },
    /// A failed attempt; another follows after `delay_ms`.
    FetchRetry {
        /// URL.
        url: String,
        /// This retry's number (1-based).
        attempt: u32,
        /// Retries allowed.
        retries: u32,
        /// Bytes delivered so far (where the next request resumes).
        offset: u64,
        /// Back-off before the next attempt.
        delay_ms: u64,
        /// Why the attempt failed.
        error: String,
    },
    /// The server ignored `Range`; `offset` bytes are being read again and discarded.
    FetchRangeIgnored {
        /// URL.
        url: String,
        /// Bytes discarded.
        offset: u64,
    },
}

impl fmt::Display for FetchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchEvent::FetchConnected {
                final_url,
                status,
                offset,
                length,
                ..
            } => {
                write!(f, "GET {final_url}: HTTP {status}")?;
                if *offset > 0 {
                    write!(f, ", resuming at byte {offset}")?;
                }
                if let Some(len) = length {
                    write!(f, " ({len} bytes)")?;
                }
                Ok(())
            }
            FetchEvent::FetchRetry {
                attempt,
                retries,
                offset,
                delay_ms,
                error,
                ..
            } => write!(
                f,
                "retry {attempt}/{retries} in {:.1} s, resuming at byte {offset}: {error}",
                *delay_ms as f64 / 1000.0
            ),
            FetchEvent::FetchRangeIgnored { url, offset } => write!(
                f,
                "{url}: server ignored Range; re-reading and discarding {offset} bytes"
            ),
        }
    }
}

/// Counters of all downloads made through one [`Fetcher`].
#[derive(Debug, Default)]
pub struct FetchStats {
    pub(super) requests: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) range_ignored: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) skipped: AtomicU64,
}

/// A snapshot of [`FetchStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct FetchSummary {
    /// HTTP requests made.
    pub requests: u64,
    /// Retries (reconnections after a failure).
    pub retries: u64,
    /// Responses that ignored `Range`.
    pub range_ignored: u64,
    /// Bytes delivered to readers.
    pub bytes: u64,
    /// Bytes received and thrown away (re-sent prefixes).
    pub discarded: u64,
    /// Bytes jumped over without downloading them (an adaptive install's reused chunks).
    pub skipped: u64,
}

impl FetchStats {
    /// The current counts.
    pub fn snapshot(&self) -> FetchSummary {
        FetchSummary {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            range_ignored: self.range_ignored.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// Receives [`FetchEvent`]s; called from whichever thread reads.
pub type EventSink = Arc<dyn Fn(&FetchEvent) + Send + Sync>;
