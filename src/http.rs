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

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use ureq::ResponseExt;

use crate::bundle::format::{header_len_from_prefix, FIXED_HEADER_LEN};
use crate::bundle::read_unverified_header;

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

/// Errors of a download. [`HttpError::is_retryable`] tells transient ones apart.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Not an http:// or https:// URL, or a reference that cannot be resolved.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The request failed (connect, TLS, timeout, protocol, too many redirects).
    #[error("GET {url}: {source}")]
    Request {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: ureq::Error,
    },
    /// The server answered with an error status.
    #[error("GET {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// `Retry-After` in seconds, if the server sent one.
        retry_after: Option<u64>,
    },
    /// The transfer broke: read error, timeout, connection closed early, too slow.
    #[error("GET {url} at byte {offset}: {reason}")]
    Transfer {
        /// The URL.
        url: String,
        /// Bundle byte offset where it broke.
        offset: u64,
        /// What happened.
        reason: String,
    },
    /// A ranged request got a response for another range.
    #[error("GET {url}: asked for bytes {offset}-, server answered {status} with Content-Range {content_range:?}")]
    BadRange {
        /// The URL.
        url: String,
        /// The offset asked for.
        offset: u64,
        /// The status.
        status: u16,
        /// The Content-Range header (empty if absent).
        content_range: String,
    },
    /// The server's length disagrees with the bundle's (or the channel index's).
    #[error("GET {url}: {what} is {actual} bytes, but {expected_from} says {expected}")]
    LengthMismatch {
        /// The URL.
        url: String,
        /// Which length (e.g. "the server's Content-Length").
        what: &'static str,
        /// The length found.
        actual: u64,
        /// Where the expected length comes from.
        expected_from: &'static str,
        /// The expected length.
        expected: u64,
    },
    /// The file changed on the server between two connections of one download.
    #[error("GET {url}: the file changed on the server during the download ({reason}); try again")]
    Changed {
        /// The URL.
        url: String,
        /// What differs.
        reason: String,
    },
    /// The bundle is not the one the signed channel index describes.
    #[error("GET {url}: bundle {field} is {actual}, but the signed channel index says {expected}")]
    NotAsIndexed {
        /// The URL.
        url: String,
        /// The field (version, compatible, image sha256).
        field: &'static str,
        /// In the bundle.
        actual: String,
        /// In the index.
        expected: String,
    },
    /// A small download (channel index) is larger than allowed.
    #[error("GET {url}: response is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The retry budget ran out.
    #[error("GET {url}: giving up after {attempts} attempts (at byte {offset}): {last}")]
    RetriesExhausted {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// Bytes delivered so far.
        offset: u64,
        /// The last error.
        #[source]
        last: Box<HttpError>,
    },
    /// The CA file could not be used.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A local file (download cache) could not be written.
    #[error("{context}: {source}")]
    Local {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Cancelled by a signal.
    #[error("download interrupted")]
    Cancelled,
}

impl HttpError {
    /// Whether another attempt may succeed: transport failures, timeouts, early ends, and
    /// statuses 408, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            HttpError::Transfer { .. } => true,
            HttpError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..=599).contains(status)
            }
            HttpError::Request { source, .. } => matches!(
                source,
                ureq::Error::Io(_)
                    | ureq::Error::Timeout(_)
                    | ureq::Error::HostNotFound
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::Protocol(_)
            ),
            _ => false,
        }
    }

    /// Finds an `HttpError` carried inside an `io::Error` (how [`HttpSource`] reports through
    /// the [`Read`] interface).
    pub fn from_io(err: &io::Error) -> Option<&HttpError> {
        err.get_ref().and_then(|e| e.downcast_ref::<HttpError>())
    }
}

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
    requests: AtomicU64,
    retries: AtomicU64,
    range_ignored: AtomicU64,
    bytes: AtomicU64,
    discarded: AtomicU64,
    skipped: AtomicU64,
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

/// What a download is expected to be, from a signed channel index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    /// Bundle length in bytes.
    pub len: Option<u64>,
    /// Image version.
    pub version: Option<String>,
    /// Compatible string.
    pub compatible: Option<String>,
    /// SHA-256 of the image.
    pub image_sha256: Option<[u8; 32]>,
}

/// A small response body and where it finally came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The body.
    pub body: Vec<u8>,
    /// The URL after redirects (the base for relative references in the body).
    pub final_url: String,
}

/// An HTTP client with abupdate's timeouts, retry policy, event sink and cancel flag. Cheap to
/// clone; clones share the connection pool and the statistics.
#[derive(Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
    options: FetchOptions,
    events: Option<EventSink>,
    cancel: Option<Arc<AtomicBool>>,
    stats: Arc<FetchStats>,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Whether `s` is an http:// or https:// URL (what `install` streams from the network).
pub fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

impl Fetcher {
    /// A client with these options (reads the CA file, if any).
    pub fn new(options: FetchOptions) -> Result<Fetcher, HttpError> {
        use ureq::tls::{PemItem, RootCerts, TlsConfig};
        let mut tls = TlsConfig::builder();
        if let Some(path) = &options.ca_file {
            let ca_err = |reason: String| HttpError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let PemItem::Certificate(c) = item.map_err(|e| ca_err(e.to_string()))? {
                    certs.push(c);
                }
            }
            if certs.is_empty() {
                return Err(ca_err("no PEM certificate in it".into()));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let read = Some(options.read_timeout);
        let connect = Some(options.connect_timeout);
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by `Fetcher::get`, which checks where they lead.
            .max_redirects(0)
            .user_agent(concat!("abupdate/", env!("CARGO_PKG_VERSION")))
            // Byte offsets must be offsets into the bundle file itself.
            .accept_encoding("")
            .timeout_resolve(connect)
            .timeout_connect(connect)
            .timeout_send_request(connect)
            .timeout_recv_response(read)
            .timeout_per_read(read)
            .tls_config(tls.build())
            .build();
        Ok(Fetcher {
            agent: ureq::Agent::new_with_config(config),
            options,
            events: None,
            cancel: None,
            stats: Arc::new(FetchStats::default()),
        })
    }

    /// Sends progress events to `sink`.
    pub fn with_events(mut self, sink: EventSink) -> Self {
        self.events = Some(sink);
        self
    }

    /// Polls `flag` while waiting between attempts; when set, downloads end with
    /// [`HttpError::Cancelled`].
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// The options.
    pub fn options(&self) -> &FetchOptions {
        &self.options
    }

    /// Counters of every download made through this client (and its clones).
    pub fn stats(&self) -> FetchSummary {
        self.stats.snapshot()
    }

    fn emit(&self, event: FetchEvent) {
        if let Some(sink) = &self.events {
            sink(&event);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Sleeps `delay`, waking early (with an error) when cancelled.
    fn sleep(&self, delay: Duration) -> Result<(), HttpError> {
        let until = Instant::now() + delay;
        loop {
            if self.cancelled() {
                return Err(HttpError::Cancelled);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }

    /// Back-off before retry number `failures_in_a_row` (0-based), or the server's
    /// `Retry-After`, capped.
    fn backoff(&self, failures_in_a_row: u32, err: &HttpError) -> Duration {
        let cap = self.options.max_retry_delay;
        if let HttpError::Status {
            retry_after: Some(secs),
            ..
        } = err
        {
            return Duration::from_secs(*secs).min(cap);
        }
        let factor = 1u32
            .checked_shl(failures_in_a_row.min(20))
            .unwrap_or(u32::MAX);
        self.options.retry_delay.saturating_mul(factor).min(cap)
    }

    /// GETs a small resource (a channel index) into memory, refusing more than `limit`
    /// bytes; retried at most `retries` times.
    pub fn get_bytes(&self, url: &str, limit: u64, retries: u32) -> Result<Fetched, HttpError> {
        check_url(url)?;
        let mut attempt = 0u32;
        loop {
            if self.cancelled() {
                return Err(HttpError::Cancelled);
            }
            let err = match self.get_bytes_once(url, limit) {
                Ok(f) => return Ok(f),
                Err(e) => e,
            };
            if !err.is_retryable() {
                return Err(err);
            }
            if attempt >= retries {
                return Err(HttpError::RetriesExhausted {
                    url: url.to_string(),
                    attempts: attempt + 1,
                    offset: 0,
                    last: Box::new(err),
                });
            }
            let delay = self.backoff(attempt, &err);
            attempt += 1;
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            self.emit(FetchEvent::FetchRetry {
                url: url.to_string(),
                attempt,
                retries,
                offset: 0,
                delay_ms: delay.as_millis() as u64,
                error: err.to_string(),
            });
            self.sleep(delay)?;
        }
    }

    /// GETs `url` with `headers` (sent on every hop), following at most
    /// [`FetchOptions::max_redirects`] redirects. Followed here, not by the client, because the
    /// client takes a `Location` with another scheme (`file:///etc/passwd`) for a relative
    /// path and follows it until "too many redirects".
    fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<ureq::http::Response<ureq::Body>, HttpError> {
        let mut current = url.to_string();
        for hop in 0.. {
            let mut req = self.agent.get(&current);
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            let resp = req.call().map_err(|source| HttpError::Request {
                url: url.to_string(),
                source,
            })?;
            let location = match resp.status().as_u16() {
                301 | 302 | 303 | 307 | 308 => resp.headers().get("location"),
                _ => None,
            };
            let Some(location) = location.map(|l| String::from_utf8_lossy(l.as_bytes())) else {
                return Ok(resp);
            };
            if hop >= self.options.max_redirects {
                return Err(HttpError::Request {
                    url: url.to_string(),
                    source: ureq::Error::TooManyRedirects,
                });
            }
            current = match url_scheme(&location) {
                Some(_) if !is_url(&location) => {
                    return Err(HttpError::BadUrl {
                        url: location.into_owned(),
                        reason: format!(
                            "{current} redirects to an unsupported scheme (only http:// and https:// are followed)"
                        ),
                    })
                }
                _ => resolve_url(&current, &location)?,
            };
        }
        unreachable!("the hop counter is unbounded")
    }

    fn get_bytes_once(&self, url: &str, limit: u64) -> Result<Fetched, HttpError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.get(url, &[])?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(HttpError::Status {
                url: url.to_string(),
                status,
                retry_after: retry_after(&resp),
            });
        }
        let final_url = resp.get_uri().to_string();
        let mut body = Vec::new();
        let mut reader = resp.into_body().into_reader();
        let got = (&mut reader)
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| HttpError::Transfer {
                url: url.to_string(),
                offset: body.len() as u64,
                reason: io_reason(&e),
            })?;
        if got as u64 > limit {
            return Err(HttpError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        self.stats.bytes.fetch_add(got as u64, Ordering::Relaxed);
        Ok(Fetched { body, final_url })
    }

    /// Opens a resumable stream of the bundle at `url`, starting at byte `start` (non-zero to
    /// continue a partial download). The first request is made (and retried) here, so a bad
    /// URL fails before anything else happens.
    pub fn open(&self, url: &str, start: u64, expected: Expected) -> Result<HttpSource, HttpError> {
        check_url(url)?;
        let mut source = HttpSource {
            fetcher: self.clone(),
            url: url.to_string(),
            position: start,
            total: None,
            validator: None,
            body: None,
            skip: 0,
            expected,
            sniff: (start == 0).then(Vec::new),
            sniffed: None,
            sniff_checked: false,
            retries_used: 0,
            failures_in_a_row: 0,
            busy: Duration::ZERO,
            window_bytes: 0,
            ranges_ignored: false,
            window_end: None,
        };
        loop {
            match source.connect() {
                Ok(()) => return Ok(source),
                Err(e) => source.failed(e)?,
            }
        }
    }
}

/// What the source learned from the bundle header that streamed past it.
#[derive(Debug, Clone)]
struct Sniffed {
    header_len: u64,
    bundle_len: u64,
    version: String,
    compatible: String,
    image_sha256: [u8; 32],
}

/// A [`Read`] over a bundle at a URL that resumes after failures (see the module docs).
/// Errors come out as `io::Error`s wrapping an [`HttpError`] ([`HttpError::from_io`]).
pub struct HttpSource {
    fetcher: Fetcher,
    url: String,
    /// Bytes handed to the reader (plus the start offset): where a resume starts.
    position: u64,
    /// The resource length the server reported.
    total: Option<u64>,
    /// Strong ETag or Last-Modified of the first response, for If-Range.
    validator: Option<String>,
    body: Option<ureq::BodyReader<'static>>,
    /// Bytes of the current response still to be discarded (a 200 to a ranged request).
    skip: u64,
    expected: Expected,
    /// Header bytes collected while the stream is inside the bundle header.
    sniff: Option<Vec<u8>>,
    sniffed: Option<Sniffed>,
    sniff_checked: bool,
    retries_used: u32,
    failures_in_a_row: u32,
    /// Time spent inside network reads in the current low-speed window, and bytes received.
    busy: Duration,
    window_bytes: u64,
    /// The server answered a `Range` request with the whole resource once: skipping ahead
    /// by reconnecting would then download everything before the new position again.
    ranges_ignored: bool,
    /// End (exclusive) of the closed range the current request asks for, when the reader
    /// said how much it will read after a skip: the server then sends nothing beyond it.
    window_end: Option<u64>,
}

impl fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSource")
            .field("url", &self.url)
            .field("position", &self.position)
            .field("total", &self.total)
            .field("retries_used", &self.retries_used)
            .finish_non_exhaustive()
    }
}

impl HttpSource {
    /// Bytes delivered so far (including the start offset).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The total length, once known (channel index, bundle header, or server).
    pub fn len_hint(&self) -> Option<u64> {
        self.end()
    }

    /// Retries this download has used.
    pub fn retries_used(&self) -> u32 {
        self.retries_used
    }

    /// Moves `n` bytes ahead without delivering them; the caller then reads `next_read`
    /// bytes (when it knows). A small gap inside what the current request already covers is
    /// read through and thrown away ([`RECONNECT_GAP`]); otherwise the connection is dropped
    /// and the next read asks for the new position with a `Range` request, closed at
    /// `next_read` bytes when given, so the skipped bytes are never downloaded and nothing
    /// beyond the needed ones is sent. A server known to ignore `Range` is always read
    /// through.
    pub fn skip_ahead(&mut self, n: u64, next_read: Option<u64>) -> Result<(), HttpError> {
        if n == 0 {
            return Ok(());
        }
        let target = self.position.saturating_add(n);
        let inside_request = self.window_end.is_none_or(|w| target < w);
        let read_through = self.sniff.is_some()
            || self.ranges_ignored
            || (self.body.is_some() && self.skip == 0 && n <= RECONNECT_GAP && inside_request);
        if read_through {
            let mut scratch = vec![0u8; (n.min(64 * 1024)) as usize];
            let mut left = n;
            while left > 0 {
                let want = (left as usize).min(scratch.len());
                let got = self.read_inner(&mut scratch[..want])?;
                if got == 0 {
                    return Err(HttpError::Transfer {
                        url: self.url.clone(),
                        offset: self.position,
                        reason: format!("the stream ended {left} bytes before the skip target"),
                    });
                }
                left -= got as u64;
                self.fetcher
                    .stats
                    .discarded
                    .fetch_add(got as u64, Ordering::Relaxed);
            }
            return Ok(());
        }
        if let Some(end) = self.end() {
            if target > end {
                return Err(HttpError::Transfer {
                    url: self.url.clone(),
                    offset: self.position,
                    reason: format!("cannot skip to byte {target}: the bundle ends at {end}"),
                });
            }
        }
        self.body = None;
        self.skip = 0;
        self.position = target;
        self.window_end = next_read
            .filter(|&r| r > 0)
            .map(|r| target.saturating_add(r))
            .map(|w| self.end().map_or(w, |end| w.min(end)));
        self.fetcher.stats.skipped.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn end(&self) -> Option<u64> {
        self.expected
            .len
            .or(self.sniffed.as_ref().map(|s| s.bundle_len))
            .or(self.total)
    }

    /// One request at the current position; on success the body is ready to read.
    fn connect(&mut self) -> Result<(), HttpError> {
        if self.fetcher.cancelled() {
            return Err(HttpError::Cancelled);
        }
        let url = self.url.clone();
        let range = match self.window_end {
            Some(w) => format!("bytes={}-{}", self.position, w - 1),
            None => format!("bytes={}-", self.position),
        };
        let mut headers = Vec::new();
        if self.position > 0 {
            headers.push(("Range", range.as_str()));
            if let Some(v) = &self.validator {
                headers.push(("If-Range", v.as_str()));
            }
        }
        self.fetcher.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.fetcher.get(&url, &headers)?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let validator_now = header("etag")
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| header("last-modified"));
        let content_length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let total = match status {
            206 => {
                let content_range = header("content-range").unwrap_or_default();
                let parsed = parse_content_range(&content_range);
                match parsed {
                    Some((start, _, total)) if start == self.position && self.position > 0 => total,
                    _ => {
                        return Err(HttpError::BadRange {
                            url,
                            offset: self.position,
                            status,
                            content_range,
                        })
                    }
                }
            }
            200 => {
                if self.position > 0 {
                    if let (Some(old), Some(new)) = (&self.validator, &validator_now) {
                        if old != new {
                            return Err(HttpError::Changed {
                                url,
                                reason: format!("validator was {old}, is now {new}"),
                            });
                        }
                    }
                    self.skip = self.position;
                    self.ranges_ignored = true;
                    self.fetcher
                        .stats
                        .range_ignored
                        .fetch_add(1, Ordering::Relaxed);
                    self.fetcher.emit(FetchEvent::FetchRangeIgnored {
                        url: url.clone(),
                        offset: self.position,
                    });
                }
                content_length
            }
            _ => {
                return Err(HttpError::Status {
                    url,
                    status,
                    retry_after: retry_after(&resp),
                })
            }
        };
        if let Some(total) = total {
            if let Some(old) = self.total {
                if old != total {
                    return Err(HttpError::Changed {
                        url,
                        reason: format!("length was {old} bytes, is now {total}"),
                    });
                }
            }
            if let Some(expected) = self.expected.len {
                if total != expected {
                    return Err(HttpError::LengthMismatch {
                        url,
                        what: "the server's length",
                        actual: total,
                        expected_from: "the signed channel index",
                        expected,
                    });
                }
            }
            self.total = Some(total);
        }
        if self.validator.is_none() {
            self.validator = validator_now;
        }
        self.fetcher.emit(FetchEvent::FetchConnected {
            url: url.clone(),
            final_url: resp.get_uri().to_string(),
            status,
            offset: self.position,
            length: total,
        });
        self.body = Some(resp.into_body().into_reader());
        self.busy = Duration::ZERO;
        self.window_bytes = 0;
        Ok(())
    }

    /// Records a failed attempt: fails for good if it is not retryable or the budget is
    /// spent, else waits the back-off (the caller then reconnects).
    fn failed(&mut self, err: HttpError) -> Result<(), HttpError> {
        self.body = None;
        self.skip = 0;
        if !err.is_retryable() {
            return Err(err);
        }
        let retries = self.fetcher.options.retries;
        if self.retries_used >= retries {
            return Err(HttpError::RetriesExhausted {
                url: self.url.clone(),
                attempts: self.retries_used + 1,
                offset: self.position,
                last: Box::new(err),
            });
        }
        let delay = self.fetcher.backoff(self.failures_in_a_row, &err);
        self.retries_used += 1;
        self.failures_in_a_row += 1;
        self.fetcher.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.fetcher.emit(FetchEvent::FetchRetry {
            url: self.url.clone(),
            attempt: self.retries_used,
            retries,
            offset: self.position,
            delay_ms: delay.as_millis() as u64,
            error: err.to_string(),
        });
        self.fetcher.sleep(delay)
    }

    /// Reads from the current body, timing the wait for the low-speed check.
    fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        let body = self.body.as_mut().expect("connected");
        let started = Instant::now();
        let result = body.read(buf);
        self.busy += started.elapsed();
        let n = result.map_err(|e| HttpError::Transfer {
            url: self.url.clone(),
            offset: self.position,
            reason: io_reason(&e),
        })?;
        self.window_bytes += n as u64;
        let window = self.fetcher.options.read_timeout;
        let limit = self.fetcher.options.low_speed_limit;
        if limit > 0 && self.busy >= window {
            let floor = (limit as f64 * self.busy.as_secs_f64()) as u64;
            if self.window_bytes < floor {
                return Err(HttpError::Transfer {
                    url: self.url.clone(),
                    offset: self.position,
                    reason: format!(
                        "transfer stalled: {} bytes in {:.1} s, below the low-speed limit of {limit} bytes/s",
                        self.window_bytes,
                        self.busy.as_secs_f64()
                    ),
                });
            }
            self.busy = Duration::ZERO;
            self.window_bytes = 0;
        }
        Ok(n)
    }

    /// Reads and drops the prefix a server re-sent after ignoring `Range`.
    fn discard(&mut self) -> Result<(), HttpError> {
        let mut scratch = vec![0u8; 64 * 1024];
        while self.skip > 0 {
            let want = (self.skip as usize).min(scratch.len());
            let n = self.read_body(&mut scratch[..want])?;
            if n == 0 {
                return Err(HttpError::Transfer {
                    url: self.url.clone(),
                    offset: self.position,
                    reason: format!(
                        "connection closed while re-reading the prefix ({} bytes left)",
                        self.skip
                    ),
                });
            }
            self.skip -= n as u64;
            self.fetcher
                .stats
                .discarded
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Feeds delivered bytes to the header sniffer.
    fn sniff_bytes(&mut self, mut data: &[u8]) {
        while let Some(buf) = self.sniff.as_mut() {
            let need = if buf.len() < FIXED_HEADER_LEN {
                FIXED_HEADER_LEN
            } else {
                match header_len_from_prefix(buf) {
                    Ok(len) => len as usize,
                    Err(_) => {
                        // Not a bundle header: the reader reports what is wrong with it.
                        self.sniff = None;
                        return;
                    }
                }
            };
            if buf.len() >= need {
                // Unverified: used only to know where the stream ends and to compare with
                // the server and the index once the reader has verified the signature.
                let bytes = self.sniff.take().unwrap_or_default();
                if let Ok(h) = read_unverified_header(&mut &bytes[..]) {
                    self.sniffed = Some(Sniffed {
                        header_len: h.header_len(),
                        bundle_len: h.bundle_len(),
                        version: h.image_version.clone(),
                        compatible: h.compatible.clone(),
                        image_sha256: h.image_sha256,
                    });
                }
                return;
            }
            if data.is_empty() {
                return;
            }
            let take = (need - buf.len()).min(data.len());
            buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// Compares what the header declares with the server and the index; runs once, when the
    /// reader first asks for bytes past the header (so after it verified the signature).
    fn check_sniffed(&mut self) -> Result<(), HttpError> {
        if self.sniff_checked {
            return Ok(());
        }
        let Some(s) = self.sniffed.clone() else {
            return Ok(());
        };
        if self.position < s.header_len {
            return Ok(());
        }
        self.sniff_checked = true;
        let url = self.url.clone();
        if let Some(total) = self.total {
            if total != s.bundle_len {
                return Err(HttpError::LengthMismatch {
                    url,
                    what: "the server's length",
                    actual: total,
                    expected_from: "the bundle header",
                    expected: s.bundle_len,
                });
            }
        }
        let e = &self.expected;
        if let Some(len) = e.len {
            if len != s.bundle_len {
                return Err(HttpError::NotAsIndexed {
                    url,
                    field: "length",
                    actual: s.bundle_len.to_string(),
                    expected: len.to_string(),
                });
            }
        }
        let mismatch = |field, actual: String, expected: String| HttpError::NotAsIndexed {
            url: url.clone(),
            field,
            actual,
            expected,
        };
        if let Some(v) = &e.version {
            if *v != s.version {
                return Err(mismatch("version", s.version.clone(), v.clone()));
            }
        }
        if let Some(c) = &e.compatible {
            if *c != s.compatible {
                return Err(mismatch("compatible", s.compatible.clone(), c.clone()));
            }
        }
        if let Some(h) = &e.image_sha256 {
            if *h != s.image_sha256 {
                return Err(mismatch(
                    "image sha256",
                    hex::encode(s.image_sha256),
                    hex::encode(h),
                ));
            }
        }
        Ok(())
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.check_sniffed()?;
        loop {
            let end = self.end();
            if end.is_some_and(|end| self.position >= end) {
                return Ok(0);
            }
            if self.window_end.is_some_and(|w| self.position >= w) {
                // The closed range is used up: more reading needs a new, open request.
                self.body = None;
                self.skip = 0;
                self.window_end = None;
            }
            if self.body.is_none() {
                if let Err(e) = self.connect() {
                    self.failed(e)?;
                    continue;
                }
            }
            if self.skip > 0 {
                if let Err(e) = self.discard() {
                    self.failed(e)?;
                    continue;
                }
            }
            let end = self.end();
            let limit = match (end, self.window_end) {
                (Some(e), Some(w)) => Some(e.min(w)),
                (e, w) => e.or(w),
            };
            let want = match limit {
                Some(limit) => buf
                    .len()
                    .min((limit - self.position).min(usize::MAX as u64) as usize),
                None => buf.len(),
            };
            match self.read_body(&mut buf[..want]) {
                Ok(0) => {
                    if end.is_none() {
                        // No length from anywhere: the server's close is the end.
                        return Ok(0);
                    }
                    let reason = format!(
                        "connection closed after byte {} of {}",
                        self.position,
                        end.unwrap_or_default()
                    );
                    let err = HttpError::Transfer {
                        url: self.url.clone(),
                        offset: self.position,
                        reason,
                    };
                    self.failed(err)?;
                }
                Ok(n) => {
                    self.failures_in_a_row = 0;
                    if self.sniff.is_some() {
                        self.sniff_bytes(&buf[..n]);
                    }
                    self.position += n as u64;
                    self.fetcher
                        .stats
                        .bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) => self.failed(e)?,
            }
        }
    }
}

impl Read for HttpSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf).map_err(io::Error::other)
    }
}

/// Read buffer in front of an [`HttpSource`]: large enough for throughput, small enough that
/// what an adaptive install reads ahead and then skips stays small.
pub const STREAM_BUFFER: usize = 64 * 1024;

/// Gaps up to this size are read through on an open connection rather than skipped with a
/// new request: a request costs a round trip, and a connection dropped mid-body wastes what
/// was already in flight.
pub const RECONNECT_GAP: u64 = 256 * 1024;

fn check_url(url: &str) -> Result<(), HttpError> {
    if is_url(url) {
        Ok(())
    } else {
        Err(HttpError::BadUrl {
            url: url.to_string(),
            reason: "only http:// and https:// URLs are supported".into(),
        })
    }
}

fn retry_after(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The message of an I/O error from the client, unwrapping the client's own error.
fn io_reason(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`): (start, end, total).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, end, total))
}

/// Resolves `reference` (absolute, scheme-relative, absolute-path or relative) against the
/// URL `base`, as RFC 3986 section 5 does for http(s) URLs. For bundle URLs in a channel
/// index, relative to the URL the index was fetched from (after redirects).
pub fn resolve_url(base: &str, reference: &str) -> Result<String, HttpError> {
    let bad = |reason: &str| HttpError::BadUrl {
        url: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(bad("empty URL"));
    }
    if url_scheme(reference).is_some() {
        return if is_url(reference) {
            Ok(reference.to_string())
        } else {
            Err(bad("only http:// and https:// URLs are supported"))
        };
    }
    check_url(base)?;
    let (scheme, rest) = base.split_once("://").expect("checked http(s) URL");
    let rest = rest.split(['#', '?']).next().unwrap_or("");
    let (authority, base_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if let Some(r) = reference.strip_prefix("//") {
        let _ = r;
        return Ok(format!("{scheme}:{reference}"));
    }
    let (ref_path, ref_tail) = match reference.find(['?', '#']) {
        Some(i) => (&reference[..i], &reference[i..]),
        None => (reference, ""),
    };
    let merged = if ref_path.starts_with('/') {
        ref_path.to_string()
    } else if ref_path.is_empty() {
        base_path.to_string()
    } else {
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{ref_path}")
    };
    Ok(format!(
        "{scheme}://{authority}{}{ref_tail}",
        remove_dot_segments(&merged)
    ))
}

/// The scheme of an absolute URL (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`,
/// before the first `:`); `None` for a relative reference.
fn url_scheme(reference: &str) -> Option<&str> {
    let (scheme, _) = reference.split_once(':')?;
    let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(scheme)
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, 199, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/20"), None);
        assert_eq!(parse_content_range("bytes 0-20/20"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn url_resolution() {
        let base = "https://mirror.example/os/stable/index.json?x=1";
        for (reference, want) in [
            ("b.abup", "https://mirror.example/os/stable/b.abup"),
            ("../b.abup", "https://mirror.example/os/b.abup"),
            ("../../../b.abup", "https://mirror.example/b.abup"),
            ("./x/./b.abup", "https://mirror.example/os/stable/x/b.abup"),
            ("/pool/b.abup", "https://mirror.example/pool/b.abup"),
            ("//cdn.example/b.abup", "https://cdn.example/b.abup"),
            ("http://other/b.abup", "http://other/b.abup"),
            (
                "b.abup?sig=abc",
                "https://mirror.example/os/stable/b.abup?sig=abc",
            ),
        ] {
            assert_eq!(resolve_url(base, reference).unwrap(), want, "{reference}");
        }
        assert_eq!(
            resolve_url("http://h:8080", "b").unwrap(),
            "http://h:8080/b"
        );
        assert!(resolve_url(base, "ftp://x/b").is_err());
        assert!(resolve_url(base, "").is_err());
    }

    #[test]
    fn url_detection_and_retryability() {
        assert!(is_url("http://x/y") && is_url("HTTPS://x") && !is_url("/tmp/http://x"));
        let t = HttpError::Transfer {
            url: "u".into(),
            offset: 0,
            reason: "r".into(),
        };
        assert!(t.is_retryable());
        for (status, retry) in [
            (404, false),
            (403, false),
            (503, true),
            (429, true),
            (416, false),
        ] {
            let e = HttpError::Status {
                url: "u".into(),
                status,
                retry_after: None,
            };
            assert_eq!(e.is_retryable(), retry, "{status}");
        }
        let io = io::Error::other(t);
        assert!(HttpError::from_io(&io).is_some());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let f = Fetcher::new(FetchOptions {
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_millis(500),
            ..Default::default()
        })
        .unwrap();
        let e = HttpError::Transfer {
            url: "u".into(),
            offset: 0,
            reason: "r".into(),
        };
        let ms: Vec<u128> = (0..5).map(|i| f.backoff(i, &e).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 500, 500]);
        let busy = HttpError::Status {
            url: "u".into(),
            status: 503,
            retry_after: Some(100),
        };
        assert_eq!(f.backoff(0, &busy), Duration::from_millis(500));
    }
}
