//! SIGTERM ends an install promptly whatever its bundle source is doing: a pipe that stalls
//! mid-bundle (`install -`), a download whose server stops sending (`install URL`, `update`),
//! plain or adaptive. Each time: exit 130 within a few seconds, the target slot left
//! unbootable (P0 T0 S0), the running slot's bytes unchanged, and the disk lock gone (a full
//! install afterwards succeeds). Also: a redirect to a non-HTTP scheme is refused at once.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::http_server::{Behavior, Server};
use common::*;

/// Serves `data` at `path` as a server that stops sending after `stall_after` bytes of the
/// body (Range ignored, the whole length declared) and then stays silent, connection open,
/// for far longer than any test waits.
fn serve_stalling(srv: &Server, path: &str, data: Vec<u8>, stall_after: Option<usize>) {
    srv.put(path, data);
    srv.behave(
        path,
        Behavior {
            ignore_range: true,
            stall_once: stall_after.map(|n| (n as u64, Duration::from_secs(600))),
            ..Behavior::default()
        },
    );
}

/// The paths requested from `srv`, in order.
fn requested_paths(srv: &Server) -> Vec<String> {
    srv.log().into_iter().map(|l| l.path).collect()
}

/// A disk whose ROOT-A holds v1.0 (seeded, good, boots next) and whose ROOT-B is a good
/// fallback, so "unbootable afterwards" means the install changed it; and a v2.0 bundle.
struct Node {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
    running_hash: String,
    bundle_path: PathBuf,
    bundle: Vec<u8>,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let v1 = d.join("v1.img");
    make_image(&v1, 2 * 1024 * 1024 + 777, 1);
    let v1b = d.join("v1.abup");
    make_bundle(&v1, "1.0", "test-board", &v1b);
    let disk = d.join("disk.img").display().to_string();
    let pubkey = test_pubkey().display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "8M",
        "--seed",
        v1b.to_str().unwrap(),
        "--keyring",
        &pubkey,
    ]);
    tool_ok(
        "cgpt",
        &["add", "-i", "2", "-P", "1", "-T", "0", "-S", "1", &disk],
    );
    let v2 = d.join("v2.img");
    make_image(&v2, 6 * 1024 * 1024, 2);
    let bundle_path = d.join("v2.abup");
    make_bundle(&v2, "2.0", "test-board", &bundle_path);
    let (a_off, a_len) = partition_range(&disk, 1);
    Node {
        running_hash: sha256_range(Path::new(&disk), a_off, a_len),
        bundle: std::fs::read(&bundle_path).unwrap(),
        bundle_path,
        _dir: dir,
        dir: d,
        disk,
    }
}

impl Node {
    /// Runs abupdate with `args` (no proxy variables, no config from the environment),
    /// stdin, stdout and stderr piped.
    fn spawn(&self, args: &[&str]) -> Child {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        for var in [
            "ALL_PROXY",
            "all_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
            "ABUPDATE_CONFIG",
            "ABUPDATE_DISK",
        ] {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until the install under way has marked ROOT-B unbootable (it then streams).
    fn wait_for_invalidated_target(&self, child: &mut Child) {
        for _ in 0..500 {
            if cgpt_fields(&self.disk, 2) == (0, 0, false) {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("abupdate exited ({status}) before invalidating the target");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the target was never invalidated");
    }

    /// After an interrupt: ROOT-B unbootable, ROOT-A's bytes and attributes unchanged, the
    /// GPT clean; then a full install from the bundle file succeeds, so the lock is gone.
    fn assert_interrupted_cleanly(&self) {
        assert_eq!(cgpt_fields(&self.disk, 2), (0, 0, false), "target state");
        let (a_off, a_len) = partition_range(&self.disk, 1);
        assert_eq!(
            sha256_range(Path::new(&self.disk), a_off, a_len),
            self.running_hash,
            "running slot changed"
        );
        assert!(cgpt_fields(&self.disk, 1).2, "running slot still good");
        assert_sgdisk_clean(&self.disk);
        let args = install_args(self.bundle_path.to_str().unwrap(), &self.disk);
        abupdate_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let (p, t, s) = cgpt_fields(&self.disk, 2);
        assert_eq!((t, s), (3, false), "ROOT-B on trial");
        assert!(p > cgpt_fields(&self.disk, 1).0, "ROOT-B boots next (P{p})");
    }
}

/// Sends SIGTERM to `child` and waits at most `limit` for it to exit; returns its output and
/// how long it took. A child still running after `limit` is killed and the test fails.
fn terminate_within(mut child: Child, limit: Duration) -> (Output, Duration) {
    tool_ok("kill", &["-TERM", &child.id().to_string()]);
    let sent = Instant::now();
    // The test's end of stdin stays open: the install must not need it closed to stop.
    let stdin = child.stdin.take();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if sent.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running {limit:?} after SIGTERM; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = sent.elapsed();
    drop(stdin);
    (child.wait_with_output().unwrap(), took)
}

fn assert_exit_130(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
}

/// `install -` whose pipe delivered a third of the bundle and then went quiet, the writer
/// still holding it open: SIGTERM ends the install at once, not when the pipe closes.
#[test]
fn sigterm_ends_an_install_from_a_stalled_pipe() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let mut args = install_args("-", &n.disk);
    args.push("--json".into());
    let mut child = n.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&n.bundle[..n.bundle.len() / 3]).unwrap();
    stdin.flush().unwrap();
    child.stdin = Some(stdin);
    n.wait_for_invalidated_target(&mut child);
    let (out, took) = terminate_within(child, Duration::from_secs(5));
    assert_exit_130(&out);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    n.assert_interrupted_cleanly();
}

/// Starts an install or update against `srv` whose bundle stalls after a third, waits until
/// the target is invalidated, sends SIGTERM and checks the outcome. The read timeout is the
/// default 60 s: the signal must not wait for it.
fn sigterm_during_stalled_download(n: &Node, srv: &Server, args: &[&str]) {
    let mut child = n.spawn(args);
    n.wait_for_invalidated_target(&mut child);
    let (out, took) = terminate_within(child, Duration::from_secs(5));
    assert_exit_130(&out);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(!srv.log().is_empty());
    n.assert_interrupted_cleanly();
}

#[test]
fn sigterm_ends_an_install_from_a_stalled_download() {
    if !have_gpt_tools() {
        return;
    }
    let pubkey = test_pubkey().display().to_string();
    for adaptive in [false, true] {
        let n = node();
        let srv = Server::start();
        serve_stalling(&srv, "/v2.abup", n.bundle.clone(), Some(n.bundle.len() / 3));
        let url = srv.url("/v2.abup");
        let mut args = vec![
            "install",
            &url,
            "--disk",
            &n.disk,
            "--keyring",
            &pubkey,
            "--no-sentinel",
            "--json",
        ];
        if adaptive {
            args.push("--adaptive");
        }
        sigterm_during_stalled_download(&n, &srv, &args);
    }
}

/// `update` shares the install path: its download stalls, SIGTERM ends it just as promptly.
#[test]
fn sigterm_ends_an_update_whose_bundle_download_stalls() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let index = n.dir.join("index.json");
    let key = test_key().display().to_string();
    abupdate_ok(&[
        "channel",
        "create",
        "--bundle",
        n.bundle_path.to_str().unwrap(),
        "--key",
        &key,
        "--out",
        index.to_str().unwrap(),
    ]);
    let srv = Server::start();
    srv.put("/stable/index.json", std::fs::read(&index).unwrap());
    serve_stalling(
        &srv,
        "/stable/v2.abup",
        n.bundle.clone(),
        Some(n.bundle.len() / 3),
    );
    let pubkey = test_pubkey().display().to_string();
    let channel = srv.url("/stable/index.json");
    let cache = n.dir.join("cache");
    let args = [
        "update",
        "--disk",
        &n.disk,
        "--keyring",
        &pubkey,
        "--channel",
        &channel,
        "--running",
        "ROOT-A",
        "--no-sentinel",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--json",
    ];
    sigterm_during_stalled_download(&n, &srv, &args);
}

/// A redirect to `file:` is refused as an unsupported scheme after one request, not followed
/// (or retried) until "too many redirects"; exit 9, the disk unchanged.
#[test]
fn redirect_to_a_file_url_is_an_unsupported_scheme() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.redirect("/v2.abup", 302, "file:///etc/passwd");
    let disk_before = sha256_file(Path::new(&n.disk));
    let url = srv.url("/v2.abup");
    let pubkey = test_pubkey().display().to_string();
    let child = n.spawn(&[
        "install",
        &url,
        "--disk",
        &n.disk,
        "--keyring",
        &pubkey,
        "--no-sentinel",
        "--retry-delay",
        "10ms",
    ]);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(stderr.contains("unsupported scheme"), "{stderr}");
    assert_eq!(requested_paths(&srv), ["/v2.abup"]);
    assert_eq!(sha256_file(Path::new(&n.disk)), disk_before, "disk changed");
}
