//! The HTTP client: its options, one-shot fetches of small files (channel indexes), retries
//! with back-off, and the shared state of one download.

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::ResponseExt;

use super::url::{check_url, io_reason, retry_after, url_scheme};
use super::{
    resolve_url, EventSink, FetchEvent, FetchOptions, FetchStats, FetchSummary, HttpError,
};

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
    pub(super) options: FetchOptions,
    events: Option<EventSink>,
    cancel: Option<Arc<AtomicBool>>,
    pub(super) stats: Arc<FetchStats>,
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

    pub(super) fn emit(&self, event: FetchEvent) {
        if let Some(sink) = &self.events {
            sink(&event);
        }
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Sleeps `delay`, waking early (with an error) when cancelled.
    pub(super) fn sleep(&self, delay: Duration) -> Result<(), HttpError> {
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
    pub(super) fn backoff(&self, failures_in_a_row: u32, err: &HttpError) -> Duration {
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
    pub(super) fn get(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
