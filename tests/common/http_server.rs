//! A loopback HTTP/1.1 server for the fetch tests, with fault modes a real network has: cut
//! connections, wrong lengths, slow and stalled bytes, servers that ignore `Range`, redirects,
//! error statuses and a CONNECT proxy. It serves whole files and single ranges (closed or
//! open-ended) as nginx does, and logs every request so tests can count what was fetched.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the server misbehaves for one path.
#[derive(Clone, Default)]
pub struct Behavior {
    /// Absolute byte offsets at which to cut the connection, one per response, in order.
    pub cuts: VecDeque<u64>,
    /// Apply `cuts` only to responses to `Range` requests.
    pub cut_ranged_only: bool,
    /// Added to the honest Content-Length; the body sent is the smaller of the two.
    pub length_delta: i64,
    /// Answer every request 200 with the whole file.
    pub ignore_range: bool,
    /// Send the body in pieces of this many bytes with this pause between them.
    pub slow: Option<(usize, Duration)>,
    /// Once: after this offset, go silent for this long (connection open), then close.
    pub stall_once: Option<(u64, Duration)>,
    /// On every response: after this offset, one byte every 50 ms.
    pub drip_after: Option<u64>,
    /// Answer with this status instead.
    pub status: Option<u16>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range_start: Option<u64>,
    /// Last byte of a closed range.
    pub range_last: Option<u64>,
}

/// What the server holds: files, redirects, per-path behaviour, the request log.
#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    redirects: HashMap<String, (u16, String)>,
    behavior: HashMap<String, Behavior>,
    log: Vec<Logged>,
}

/// The server; it lives as long as the test process.
pub struct Server {
    pub addr: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let st = Arc::clone(&state);
        // The accept loop lives as long as the test process; every connection gets a thread.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = Arc::clone(&st);
                std::thread::spawn(move || handle(stream, &st));
            }
        });
        Server { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn put(&self, path: &str, data: Vec<u8>) {
        self.state.lock().unwrap().files.insert(path.into(), data);
    }

    /// The file served at `path`.
    pub fn get(&self, path: &str) -> Vec<u8> {
        self.state.lock().unwrap().files[path].clone()
    }

    pub fn redirect(&self, from: &str, status: u16, to: &str) {
        self.state
            .lock()
            .unwrap()
            .redirects
            .insert(from.into(), (status, to.into()));
    }

    pub fn behave(&self, path: &str, b: Behavior) {
        self.state.lock().unwrap().behavior.insert(path.into(), b);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn requests_for(&self, path: &str) -> Vec<Logged> {
        self.log().into_iter().filter(|l| l.path == path).collect()
    }
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
) -> Option<(String, String, HashMap<String, String>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((method, target, headers))
}

fn handle(stream: TcpStream, st: &Mutex<State>) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some((mut method, mut target, mut headers)) = read_request(&mut reader) else {
        return;
    };
    let mut out = stream;
    if method == "CONNECT" {
        // A forward proxy: tunnel to "the origin", which is this same server.
        st.lock().unwrap().log.push(Logged {
            method: method.clone(),
            path: target.clone(),
            range_start: None,
            range_last: None,
        });
        let _ = out.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
        let Some(next) = read_request(&mut reader) else {
            return;
        };
        (method, target, headers) = next;
    }
    let path = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/".to_string(), |j| target[i + 3 + j..].to_string()),
        None => target.clone(),
    };
    // "bytes=START-" or "bytes=START-LAST" (LAST inclusive), as nginx takes them.
    let range = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let last = if b.is_empty() {
                None
            } else {
                Some(b.parse::<u64>().ok()?)
            };
            Some((a.parse::<u64>().ok()?, last))
        });
    let range_start = range.map(|(a, _)| a);
    let range_last = range.and_then(|(_, b)| b);
    let (file, redirect, behavior) = {
        let mut s = st.lock().unwrap();
        s.log.push(Logged {
            method,
            path: path.clone(),
            range_start,
            range_last,
        });
        let file = s.files.get(&path).cloned();
        let redirect = s.redirects.get(&path).cloned();
        // The stall happens once: the live behaviour forgets it now.
        let live = s.behavior.entry(path.clone()).or_default();
        let snapshot = live.clone();
        live.stall_once = None;
        (file, redirect, snapshot)
    };
    let mut b = behavior;
    let respond = |out: &mut TcpStream, status: u16, extra: &str| {
        let _ = write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n"
        );
        let _ = out.shutdown(Shutdown::Both);
    };
    if let Some((status, to)) = redirect {
        return respond(&mut out, status, &format!("Location: {to}\r\n"));
    }
    if let Some(status) = b.status {
        return respond(&mut out, status, "");
    }
    let Some(data) = file else {
        return respond(&mut out, 404, "");
    };
    let len = data.len() as u64;
    let start = if b.ignore_range {
        0
    } else {
        range_start.unwrap_or(0)
    };
    if start >= len {
        return respond(&mut out, 416, &format!("Content-Range: bytes */{len}\r\n"));
    }
    let last = match range_last {
        Some(l) if !b.ignore_range => l.min(len - 1),
        _ => len - 1,
    };
    let declared = ((last + 1 - start) as i64 + b.length_delta).max(0) as u64;
    let send_end = len.min(start + declared);
    let cut = {
        let mut s = st.lock().unwrap();
        let live = s.behavior.get_mut(&path).unwrap();
        match live.cuts.front() {
            Some(&c)
                if c > start
                    && c < send_end
                    && (!live.cut_ranged_only || range_start.is_some()) =>
            {
                live.cuts.pop_front();
                Some(c)
            }
            _ => None,
        }
    };
    b.cuts.clear();
    let end = cut.unwrap_or(send_end);
    let send_end = send_end.min(last + 1);
    let end = end.min(send_end);
    let status_line = if range_start.is_some() && !b.ignore_range {
        format!("206 Partial Content\r\nContent-Range: bytes {start}-{last}/{len}")
    } else {
        "200 OK".to_string()
    };
    let head = format!(
        "HTTP/1.1 {status_line}\r\nContent-Length: {declared}\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n"
    );
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let piece = b.slow.map_or(16 * 1024, |(n, _)| n);
    let mut pos = start;
    let started = Instant::now();
    while pos < end {
        if let Some(after) = b.drip_after {
            if pos >= after {
                if out
                    .write_all(&data[pos as usize..pos as usize + 1])
                    .is_err()
                    || started.elapsed() > Duration::from_secs(20)
                {
                    return;
                }
                pos += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let mut n = (end - pos).min(piece as u64);
        if let Some(after) = b.drip_after {
            if pos < after {
                n = n.min(after - pos);
            }
        }
        if let Some((at, _)) = b.stall_once {
            if pos < at {
                n = n.min(at - pos);
            }
        }
        if out
            .write_all(&data[pos as usize..(pos + n) as usize])
            .is_err()
        {
            return;
        }
        pos += n;
        if let Some((at, pause)) = b.stall_once {
            if pos == at {
                let _ = out.flush();
                std::thread::sleep(pause);
                b.stall_once = None;
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
        }
        if let Some((_, pause)) = b.slow {
            std::thread::sleep(pause);
        }
    }
    let _ = out.flush();
    let _ = out.shutdown(Shutdown::Both);
}
