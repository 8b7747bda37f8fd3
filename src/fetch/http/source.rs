//! [`HttpSource`]: the resuming [`Read`] over a bundle at a URL (see the module docs of
//! [`crate::fetch::http`]).

use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::Ordering;

use std::time::{Duration, Instant};
use ureq::ResponseExt;

use crate::bundle::format::{header_len_from_prefix, FIXED_HEADER_LEN};
use crate::bundle::read_unverified_header;

use super::url::{check_url, io_reason, retry_after};
use super::{parse_content_range, Expected, FetchEvent, Fetcher, HttpError};

impl Fetcher {
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
