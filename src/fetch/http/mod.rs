//! Fetching bundles and channel indexes over HTTP(S), with resume.
//!
//! [`HttpSource`] is a [`Read`] over a bundle at a URL that survives dropped connections: when
//! a connection fails, stalls, or ends before the bundle does, it reconnects with
//! `Range: bytes=N-`, where N is the number of bytes it has already handed to its reader, and
//! carries on as if nothing happened. The consumer (the verifying [`crate::bundle::BundleReader`]
//! of the install pipeline) never sees the seam.
//!
//! Why byte-level resume is safe: the source sits below the bundle reader, which checks the
//! header's signature, every chunk's SHA-256 against the signed chunk table and finally the
//! whole-image hash. Whichever connection a byte arrived on, it is authenticated exactly as if
//! the bundle had been read from a local file, so resuming at any byte is at least as strict as
//! resuming at chunk boundaries, and wastes nothing. If the file on the server changes between
//! two connections, the first chunk that mixes the two fails its hash; to fail earlier and
//! with a clear message, resumed requests carry `If-Range` with the first response's strong
//! `ETag` (or `Last-Modified`), and a changed length or validator is reported as
//! [`HttpError::Changed`].
//!
//! Server behaviour and what the source does:
//! - `206 Partial Content`: `Content-Range` must start at N (and keep the same total length),
//!   else [`HttpError::BadRange`].
//! - `200 OK` to a ranged request (a server or proxy that ignores `Range`): the first N bytes
//!   of the new response are read and discarded, then the stream continues; reported as a
//!   [`FetchEvent::FetchRangeIgnored`] event. This costs bandwidth, never correctness.
//! - `408`, `429`, `5xx`, connection errors, timeouts, a body that ends early, and a transfer
//!   slower than the low-speed limit: retried (see below). Other statuses fail at once.
//! - Length: the source learns the bundle's length from the bundle header as it streams past
//!   (and from the channel index, when there is one). A server whose `Content-Length` or
//!   `Content-Range` total disagrees fails cleanly with [`HttpError::LengthMismatch`]; the
//!   check runs when the reader first asks for payload bytes, i.e. after the header's
//!   signature verified, so a forged header is reported as a bad signature, not as a length
//!   problem.
//!
//! Retries are bounded: at most [`FetchOptions::retries`] reconnections per download, with
//! exponential back-off from [`FetchOptions::retry_delay`] (doubling, capped at
//! [`FetchOptions::max_retry_delay`], reset after a connection that delivered data; a
//! `Retry-After` header in seconds is honoured within the cap). Every retry is reported as a
//! [`FetchEvent::FetchRetry`] and counted in [`FetchStats`].
//!
//! Nothing can hang: connect and per-read timeouts are set on every connection, and a
//! connection that delivers less than [`FetchOptions::low_speed_limit`] bytes per second over a
//! [`FetchOptions::read_timeout`] window of time spent waiting for the network counts as
//! stalled (like curl's `--speed-limit`/`--speed-time`; time the consumer spends writing does
//! not count against the server). Redirects are followed (at most
//! [`FetchOptions::max_redirects`]); the Range header is kept across them. Proxies come from
//! the usual environment variables (`ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY` and their lower
//! case forms, with `NO_PROXY`); HTTPS uses rustls with the Mozilla root certificates, or the
//! PEM file in [`FetchOptions::ca_file`].

use std::path::PathBuf;
use std::time::Duration;

mod error;
mod events;
mod fetcher;
mod source;
mod url;

pub use error::HttpError;
pub use events::{EventSink, FetchEvent, FetchStats, FetchSummary};
pub use fetcher::{is_url, Expected, Fetched, Fetcher};
pub use source::{HttpSource, RECONNECT_GAP, STREAM_BUFFER};
pub use url::{parse_content_range, resolve_url};

/// Default number of reconnections per download.
pub const DEFAULT_RETRIES: u32 = 10;
/// Default first back-off delay.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Default cap of the back-off delay.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Default connect timeout (name resolution, TCP, TLS, sending the request).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default read timeout: the longest wait for response headers or for any single read, and the
/// window of the low-speed check.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default low-speed limit in bytes per second (see [`FetchOptions::low_speed_limit`]).
pub const DEFAULT_LOW_SPEED_LIMIT: u64 = 1024;
/// Default maximum number of redirects followed per request.
pub const DEFAULT_MAX_REDIRECTS: u32 = 10;
/// Retries per mirror when fetching a channel index: the index is small, and a mirror that
/// does not answer should not hold up the next one for long.
pub const INDEX_RETRIES: u32 = 2;

/// How downloads behave. Every field has a command-line flag and a `[fetch]` config key.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchOptions {
    /// Reconnections allowed per download (0: fail at the first error).
    pub retries: u32,
    /// First back-off delay; doubles after each failed attempt in a row.
    pub retry_delay: Duration,
    /// Cap of the back-off delay.
    pub max_retry_delay: Duration,
    /// Connect timeout (resolve, TCP, TLS, request).
    pub connect_timeout: Duration,
    /// Read timeout: per read, for the response headers, and the low-speed window.
    pub read_timeout: Duration,
    /// Bytes per second below which a connection counts as stalled (0: no check).
    pub low_speed_limit: u64,
    /// Redirects followed per request.
    pub max_redirects: u32,
    /// PEM file of trusted CA certificates (default: the built-in Mozilla roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            retries: DEFAULT_RETRIES,
            retry_delay: DEFAULT_RETRY_DELAY,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            low_speed_limit: DEFAULT_LOW_SPEED_LIMIT,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            ca_file: None,
        }
    }
}
