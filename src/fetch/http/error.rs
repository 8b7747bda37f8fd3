//! Why a fetch failed, and which failures are worth a retry.

use std::io;
use std::path::PathBuf;

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
