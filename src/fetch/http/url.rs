//! URL and header helpers: scheme checks, relative references (RFC 3986), `Content-Range`,
//! `Retry-After`.

use std::io;

use super::{is_url, HttpError};

pub(super) fn check_url(url: &str) -> Result<(), HttpError> {
    if is_url(url) {
        Ok(())
    } else {
        Err(HttpError::BadUrl {
            url: url.to_string(),
            reason: "only http:// and https:// URLs are supported".into(),
        })
    }
}

pub(super) fn retry_after(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The message of an I/O error from the client, unwrapping the client's own error.
pub(super) fn io_reason(e: &io::Error) -> String {
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
pub(super) fn url_scheme(reference: &str) -> Option<&str> {
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
}
