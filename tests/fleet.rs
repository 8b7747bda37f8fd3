//! Fleet delivery end to end: `install URL`, `check`, `update` and `channel create` against a
//! real HTTP server on loopback (`common::http_server`, with fault modes: cut
//! connections, wrong lengths, slow and stalled bytes, a tampered chunk, a bad index signature,
//! redirects, a server that ignores Range, a CONNECT proxy). Every run either completes
//! verified (slot content equals the image, cgpt shows the new slot P3 T3 S0) or fails with
//! the documented exit code and the running slot untouched (same hash, still boots next).
//! Also the configuration file: unknown keys, flags over the file, strategies off and
//! download-only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::http_server::{Behavior, Server};
use common::*;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// Runs abupdate with proxy variables removed (the host's must not interfere) plus `env`.
fn abu_env(args: &[&str], env: &[(&str, &str)]) -> Output {
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
    cmd.envs(env.iter().copied());
    cmd.output().expect("run abupdate")
}

fn abu(args: &[&str]) -> Output {
    abu_env(args, &[])
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn count_events(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

/// A node: a disk whose ROOT-A was seeded with v1.0 (a slot record, good, boots next) and a
/// v2.0 bundle ready to serve.
struct Node {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
    running_hash: String,
    running_attrs: (u8, u8, bool),
    image: PathBuf,
    bundle: Vec<u8>,
    bundle_path: PathBuf,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let v1 = d.join("v1.img");
    make_image(&v1, 2 * 1024 * 1024 + 777, 1);
    let v1b = d.join("v1.abup");
    make_bundle(&v1, "1.0", "test-board", &v1b);
    let disk = d.join("disk.img").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "8M",
        "--seed",
        v1b.to_str().unwrap(),
        "--keyring",
        test_pubkey().to_str().unwrap(),
    ]);
    // As a fleet image builder leaves it: ROOT-A good at the priority `disk init` gives it.
    abupdate_ok(&[
        "set-attributes",
        "--disk",
        &disk,
        "--slot",
        "ROOT-A",
        "--priority",
        "2",
    ]);
    let image = d.join("v2.img");
    make_image(&image, 3 * 1024 * 1024 + 4321, 2);
    let bundle_path = d.join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle_path);
    let (a_off, a_len) = partition_range(&disk, 1);
    Node {
        running_hash: sha256_range(Path::new(&disk), a_off, a_len),
        running_attrs: cgpt_fields(&disk, 1),
        bundle: std::fs::read(&bundle_path).unwrap(),
        _dir: dir,
        dir: d,
        disk,
        image,
        bundle_path,
    }
}

impl Node {
    /// `abupdate install URL` with quick retry settings, JSON events.
    fn install_url(&self, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let pubkey = test_pubkey();
        let mut args = vec![
            "install",
            url,
            "--disk",
            &self.disk,
            "--keyring",
            pubkey.to_str().unwrap(),
            "--no-sentinel",
            "--retry-delay",
            "20ms",
            "--connect-timeout",
            "2s",
            "--json",
        ];
        if !extra.contains(&"--read-timeout") {
            args.extend_from_slice(&["--read-timeout", "2s"]);
        }
        args.extend_from_slice(extra);
        abu_env(&args, env)
    }

    fn assert_installed(&self) {
        let (b_off, _) = partition_range(&self.disk, 2);
        let len = std::fs::metadata(&self.image).unwrap().len();
        assert_eq!(
            sha256_range(Path::new(&self.disk), b_off, len),
            sha256_file(&self.image),
            "slot B content"
        );
        assert_eq!(cgpt_fields(&self.disk, 2), (3, 3, false));
        assert_eq!(status_json(&self.disk, &[])["next_boot"], "ROOT-B");
        assert_eq!(status_json(&self.disk, &[])["slots"][1]["version"], "2.0");
        self.assert_running_intact(false);
    }

    /// The running slot's bytes, attributes and the GPT are as before; with `boots_next`, it
    /// is still the slot that boots next (a failed install leaves ROOT-B unbootable).
    fn assert_running_intact(&self, boots_next: bool) {
        let (a_off, a_len) = partition_range(&self.disk, 1);
        assert_eq!(
            sha256_range(Path::new(&self.disk), a_off, a_len),
            self.running_hash,
            "running slot changed"
        );
        assert_eq!(cgpt_fields(&self.disk, 1), self.running_attrs);
        assert!(self.running_attrs.2, "the running slot is committed");
        assert_sgdisk_clean(&self.disk);
        if boots_next {
            let (p, _, _) = cgpt_fields(&self.disk, 2);
            assert_eq!(p, 0, "ROOT-B must be unbootable");
            assert_eq!(status_json(&self.disk, &[])["next_boot"], "ROOT-A");
        }
    }

    fn assert_failed_cleanly(&self, out: &Output, code: i32) {
        assert_eq!(out.status.code(), Some(code), "{}", text(out));
        self.assert_running_intact(true);
    }
}

fn done_event(out: &Output) -> serde_json::Value {
    json_lines(out)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "done")
        .unwrap_or_else(|| panic!("no done event: {}", text(out)))
}

// ---------------------------------------------------------------------------------------------
// install URL

#[test]
fn install_url_resumes_after_cut_connections() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    let cuts = [150_000u64, 600_000, 601_000, 1_200_000];
    srv.behave(
        "/v2.abup",
        Behavior {
            cuts: cuts.into_iter().collect(),
            ..Default::default()
        },
    );
    let out = n.install_url(&srv.url("/v2.abup"), &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    let events = json_lines(&out);
    assert_eq!(
        count_events(&events, "fetch-retry"),
        cuts.len(),
        "{}",
        text(&out)
    );
    let done = done_event(&out);
    assert_eq!(done["fetch"]["retries"], cuts.len() as u64);
    // Byte-level resume: each resumed request starts exactly where the cut was.
    let starts: Vec<u64> = srv
        .requests_for("/v2.abup")
        .iter()
        .filter_map(|l| l.range_start)
        .collect();
    assert_eq!(starts, cuts, "range starts");
    eprintln!("cut 4 times: {} retries counted", done["fetch"]["retries"]);
}

#[test]
fn too_many_cuts_fail_cleanly_with_exit_9() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    srv.behave(
        "/v2.abup",
        Behavior {
            cuts: (1..=6).map(|i| i * 200_000).collect(),
            ..Default::default()
        },
    );
    let out = n.install_url(&srv.url("/v2.abup"), &["--retries", "2"], &[]);
    n.assert_failed_cleanly(&out, 9);
    assert_eq!(count_events(&json_lines(&out), "fetch-retry"), 2);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("giving up after 3 attempts"),
        "{}",
        text(&out)
    );
}

#[test]
fn wrong_content_length_fails_cleanly() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    for (path, delta) in [("/short.abup", -1000i64), ("/long.abup", 1000)] {
        srv.put(path, n.bundle.clone());
        srv.behave(
            path,
            Behavior {
                length_delta: delta,
                ..Default::default()
            },
        );
        let started = Instant::now();
        let out = n.install_url(&srv.url(path), &[], &[]);
        n.assert_failed_cleanly(&out, 9);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("the bundle header says"), "{}", text(&out));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

#[test]
fn slow_but_steady_server_completes() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    srv.behave(
        "/v2.abup",
        Behavior {
            slow: Some((8 * 1024, Duration::from_millis(4))),
            ..Default::default()
        },
    );
    let out = n.install_url(&srv.url("/v2.abup"), &["--read-timeout", "1s"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    assert_eq!(done_event(&out)["fetch"]["retries"], 0);
}

#[test]
fn stalled_connection_times_out_and_resumes() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    srv.behave(
        "/v2.abup",
        Behavior {
            stall_once: Some((400_000, Duration::from_secs(30))),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let out = n.install_url(&srv.url("/v2.abup"), &["--read-timeout", "500ms"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    assert_eq!(done_event(&out)["fetch"]["retries"], 1);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited for the 30 s stall"
    );
}

#[test]
fn dripping_server_fails_cleanly_in_bounded_time() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    srv.behave(
        "/v2.abup",
        Behavior {
            drip_after: Some(100_000),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let out = n.install_url(
        &srv.url("/v2.abup"),
        &["--read-timeout", "400ms", "--retries", "1"],
        &[],
    );
    n.assert_failed_cleanly(&out, 9);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("low-speed limit"),
        "{}",
        text(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn tampered_chunk_is_refused() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    let mut bad = n.bundle.clone();
    let at = bad.len() - 300_000;
    bad[at] ^= 0x55;
    srv.put("/v2.abup", bad);
    let out = n.install_url(&srv.url("/v2.abup"), &[], &[]);
    n.assert_failed_cleanly(&out, 3);
}

#[test]
fn redirects_are_followed_also_when_resuming() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/pool/v2.abup", n.bundle.clone());
    srv.redirect("/latest.abup", 301, "/moved/v2.abup");
    srv.redirect("/moved/v2.abup", 302, &srv.url("/pool/v2.abup"));
    srv.behave(
        "/pool/v2.abup",
        Behavior {
            cuts: [500_000u64].into_iter().collect(),
            ..Default::default()
        },
    );
    let out = n.install_url(&srv.url("/latest.abup"), &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    // The resume went through both redirects again, keeping its Range header.
    assert_eq!(srv.requests_for("/latest.abup").len(), 2);
    let pool: Vec<_> = srv.requests_for("/pool/v2.abup");
    assert_eq!(pool.len(), 2);
    assert_eq!(pool[1].range_start, Some(500_000));

    // A redirect loop ends cleanly.
    srv.redirect("/loop-a", 302, "/loop-b");
    srv.redirect("/loop-b", 302, "/loop-a");
    let out = n.install_url(&srv.url("/loop-a"), &["--max-redirects", "4"], &[]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
}

#[test]
fn server_ignoring_range_restarts_and_discards() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    srv.behave(
        "/v2.abup",
        Behavior {
            ignore_range: true,
            cuts: [300_000u64, 900_000].into_iter().collect(),
            ..Default::default()
        },
    );
    let out = n.install_url(&srv.url("/v2.abup"), &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    let done = done_event(&out);
    assert_eq!(done["fetch"]["retries"], 2);
    assert_eq!(done["fetch"]["range_ignored"], 2);
    assert_eq!(done["fetch"]["discarded"], 300_000 + 900_000);
    assert_eq!(count_events(&json_lines(&out), "fetch-range-ignored"), 2);
}

#[test]
fn install_through_a_connect_proxy_from_the_environment() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    srv.put("/v2.abup", n.bundle.clone());
    let proxy = srv.url("");
    // The host name does not resolve: only the proxy can reach it.
    let out = n.install_url(
        "http://updates.example.invalid/v2.abup",
        &[],
        &[("HTTP_PROXY", &proxy)],
    );
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    let log = srv.log();
    assert!(
        log.iter()
            .any(|l| l.method == "CONNECT" && l.path == "updates.example.invalid:80"),
        "{log:?}"
    );
    // NO_PROXY keeps a host away from the proxy (and then it cannot be resolved).
    let n2 = node();
    let out = n2.install_url(
        "http://updates.example.invalid/v2.abup",
        &["--retries", "0"],
        &[
            ("HTTP_PROXY", &proxy),
            ("NO_PROXY", "updates.example.invalid"),
        ],
    );
    n2.assert_failed_cleanly(&out, 9);
}

// ---------------------------------------------------------------------------------------------
// Channels: check, update, mirrors, the index signature.

/// Publishes the v2 bundle with a signed index at `/stable/index.json` (bundle URL relative).
fn publish(srv: &Server, n: &Node) {
    publish_at(srv, n, "/stable", &[]);
}

/// Publishes the v2 bundle and an index made by `channel create` with `extra` arguments at
/// `DIR/index.json` and `DIR/v2.abup`; returns `channel create`'s output.
fn publish_at(srv: &Server, n: &Node, dir: &str, extra: &[&str]) -> String {
    let index = n.dir.join("index.json");
    let key = test_key();
    let mut args = vec![
        "channel",
        "create",
        "--bundle",
        n.bundle_path.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        index.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let said = abupdate_ok(&args);
    srv.put(&format!("{dir}/index.json"), std::fs::read(&index).unwrap());
    srv.put(&format!("{dir}/v2.abup"), n.bundle.clone());
    said
}

/// A mirror serving an index past its signed expiry is refused (exit 3, nothing fetched);
/// with a fresh mirror behind it, the fresh one is used and the stale one reported.
#[test]
fn expired_index_is_refused_and_a_fresh_mirror_used() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    let said = publish_at(
        &srv,
        &n,
        "/stale",
        &["--expires-at", "2020-01-01T00:00:00Z"],
    );
    assert!(said.contains("expires 2020-01-01T00:00:00Z"), "{said}");
    let said = publish_at(&srv, &n, "/fresh", &["--expires-in", "7d"]);
    assert!(said.contains("expires 20"), "{said}");
    let pubkey = test_pubkey().display().to_string();

    let stale = vec![srv.url("/stale/index.json")];
    assert_channel_refused(&n, &pubkey, &stale, "expired at 2020-01-01T00:00:00Z");
    assert!(srv.requests_for("/stale/v2.abup").is_empty());

    let both = vec![srv.url("/stale/index.json"), srv.url("/fresh/index.json")];
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(&channel_args(&n, &pubkey, &both));
    let out = abu(&args);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "available");
    assert!(
        report["skipped_mirrors"].to_string().contains("expired"),
        "{report}"
    );
}

/// An index whose signed text was changed after signing (version bumped).
fn forged_index(srv: &Server) -> Vec<u8> {
    let good = srv.get("/stable/index.json");
    String::from_utf8(good)
        .unwrap()
        .replace("\\\"version\\\":\\\"2.0\\\"", "\\\"version\\\":\\\"9.0\\\"")
        .into_bytes()
}

/// `check` and `update` on `urls` both refuse the channel: exit 3, `needle` in the message,
/// the running slot untouched.
fn assert_channel_refused(n: &Node, pubkey: &str, urls: &[String], needle: &str) {
    for cmd in ["check", "update"] {
        let mut args = vec![cmd];
        args.extend_from_slice(&channel_args(n, pubkey, urls));
        let out = abu(&args);
        n.assert_failed_cleanly(&out, 3);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{cmd}: {}",
            text(&out)
        );
    }
}

fn channel_args<'a>(n: &'a Node, pubkey: &'a str, urls: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![
        "--disk",
        n.disk.as_str(),
        "--keyring",
        pubkey,
        "--retry-delay",
        "10ms",
    ];
    for u in urls {
        args.push("--channel");
        args.push(u);
    }
    args
}

#[test]
fn check_and_update_with_mirrors() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    publish(&srv, &n);
    let forged = forged_index(&srv);
    srv.put("/bad/index.json", forged);
    srv.behave(
        "/down/index.json",
        Behavior {
            status: Some(503),
            ..Default::default()
        },
    );
    let pubkey = test_pubkey().display().to_string();
    let mirrors = vec![
        srv.url("/down/index.json"),
        srv.url("/bad/index.json"),
        srv.url("/stable/index.json"),
    ];
    let base = channel_args(&n, &pubkey, &mirrors);

    // check: the third mirror answers; the first two are reported as skipped.
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(&base);
    let out = abu(&args);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "available");
    assert_eq!(report["update_available"], true);
    assert_eq!(report["running_version"], "1.0");
    assert_eq!(report["latest_version"], "2.0");
    assert_eq!(report["bundle_urls"][0], srv.url("/stable/v2.abup"));
    assert_eq!(report["skipped_mirrors"].as_array().unwrap().len(), 2);
    let skipped = report["skipped_mirrors"].to_string();
    assert!(
        skipped.contains("503") && skipped.contains("bad signature"),
        "{skipped}"
    );
    assert!(
        srv.requests_for("/stable/v2.abup").is_empty(),
        "check downloads nothing"
    );

    // update: installs, writes the sentinel, leaves the reboot to the coordinator.
    let sentinel = n.dir.join("run/reboot-required");
    // On a disk image the running slot cannot be detected from the kernel command line, so
    // it is named, as on a node whose boot loader does not pass it.
    let mut args = vec![
        "update",
        "--json",
        "--running",
        "ROOT-A",
        "--sentinel",
        sentinel.to_str().unwrap(),
    ];
    args.extend_from_slice(&base);
    let out = abu(&args);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    assert_eq!(done_event(&out)["action"], "installed");
    assert!(std::fs::read_to_string(&sentinel).unwrap().contains("2.0"));
    assert_eq!(srv.requests_for("/stable/v2.abup").len(), 1);

    // Again before the reboot: nothing is downloaded, the sentinel is asserted again.
    std::fs::remove_file(&sentinel).unwrap();
    let out = abu(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(done_event(&out)["action"], "pending-reboot");
    assert!(sentinel.exists());
    assert_eq!(srv.requests_for("/stable/v2.abup").len(), 1);

    // The trial failed (slot marked bad): not installed again automatically.
    abupdate_ok(&["mark-bad", "--disk", &n.disk, "--slot", "ROOT-B"]);
    let out = abu(&args);
    assert!(out.status.success(), "{}", text(&out));
    let done = done_event(&out);
    assert_eq!(done["verdict"], "previously-failed");
    assert_eq!(srv.requests_for("/stable/v2.abup").len(), 1);
}

#[test]
fn index_with_bad_signature_is_refused() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    publish(&srv, &n);
    srv.put("/stable/index.json", forged_index(&srv));
    let pubkey = test_pubkey().display().to_string();
    let urls = vec![srv.url("/stable/index.json")];
    assert_channel_refused(&n, &pubkey, &urls, "bad signature");
    assert!(srv.requests_for("/stable/v2.abup").is_empty());
    // Unreachable channel: exit 9.
    let urls = vec!["http://127.0.0.1:9/index.json".to_string()];
    let mut args = vec!["check", "--retries", "0"];
    args.extend_from_slice(&channel_args(&n, &pubkey, &urls));
    let out = abu(&args);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
}

#[test]
fn update_with_a_bundle_unlike_its_index_is_refused() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    publish(&srv, &n);
    // The mirror serves another validly signed bundle of the same length under the indexed
    // name (the same image labelled 2.1).
    let other_b = n.dir.join("v2.1.abup");
    make_bundle(&n.image, "2.1", "test-board", &other_b);
    let data = std::fs::read(&other_b).unwrap();
    assert_eq!(
        data.len(),
        n.bundle.len(),
        "same length, so only the version differs"
    );
    srv.put("/stable/v2.abup", data);
    let pubkey = test_pubkey().display().to_string();
    let urls = vec![srv.url("/stable/index.json")];
    let mut args = vec!["update", "--no-sentinel"];
    args.extend_from_slice(&channel_args(&n, &pubkey, &urls));
    let out = abu(&args);
    n.assert_failed_cleanly(&out, 3);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bundle version is 2.1"),
        "{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration file.

fn write_config(n: &Node, body: &str) -> PathBuf {
    let path = n.dir.join("abupdate.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn config_unknown_key_and_missing_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abupdate.toml");
    std::fs::write(
        &path,
        "disk = \"/dev/null\"\nstrategy = \"auto\"\nretires = 3\n",
    )
    .unwrap();
    let out = abu(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("retires") && err.contains(path.to_str().unwrap()) && err.contains("line 3"),
        "{err}"
    );
    // Through the environment variable too, and a missing named file is an error.
    let missing = dir.path().join("missing.toml");
    let out = abu_env(
        &["status"],
        &[("ABUPDATE_CONFIG", missing.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    // No disk anywhere: a usage error that says where to set it.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = abu(&["status", "--config", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--disk"));
}

#[test]
fn config_settings_and_flag_overrides() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    publish(&srv, &n);
    srv.put("/bad/index.json", forged_index(&srv));
    let sentinel = n.dir.join("reboot-required");
    // The file points at a channel with a bad signature and asks for 5 tries.
    let cfg = write_config(
        &n,
        &format!(
            "disk = \"{}\"\nkeyring = \"{}\"\ncompatible = \"test-board\"\nchannel = [\"{}\"]\ntries = 5\nsentinel = \"{}\"\n\n[fetch]\nretries = 1\nretry-delay = \"10ms\"\n",
            n.disk,
            test_pubkey().display(),
            srv.url("/bad/index.json"),
            sentinel.display()
        ),
    );
    let c = cfg.to_str().unwrap();
    // From the file alone: the bad channel is refused.
    let out = abu(&["check", "--config", c]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // --channel overrides the file's channel, --tries its tries; disk, keyring and sentinel
    // still come from the file.
    let good = srv.url("/stable/index.json");
    let out = abu(&["update", "--config", c, "--channel", &good, "--tries", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(cgpt_fields(&n.disk, 2), (3, 2, false));
    assert!(sentinel.exists());
    // The file's tries apply without the flag (install from a file, same settings path).
    let n2 = node();
    let cfg2 = write_config(
        &n2,
        &format!(
            "disk = \"{}\"\nkeyring = \"{}\"\ntries = 5\nreboot = \"none\"\n",
            n2.disk,
            test_pubkey().display()
        ),
    );
    let out = abu(&[
        "install",
        n2.bundle_path.to_str().unwrap(),
        "--config",
        cfg2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(cgpt_fields(&n2.disk, 2), (3, 5, false));
}

#[test]
fn strategy_off_and_download_only() {
    if !have_gpt_tools() {
        return;
    }
    let n = node();
    let srv = Server::start();
    publish(&srv, &n);
    let cache = n.dir.join("cache");
    let cfg = write_config(
        &n,
        &format!(
            "disk = \"{}\"\nkeyring = \"{}\"\nchannel = [\"{}\"]\nstrategy = \"off\"\ncache-dir = \"{}\"\nreboot = \"none\"\n",
            n.disk,
            test_pubkey().display(),
            srv.url("/stable/index.json"),
            cache.display()
        ),
    );
    let c = cfg.to_str().unwrap();

    // off: says so, exit 0, nothing fetched or written.
    let out = abu(&["update", "--config", c]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("strategy is off"));
    assert!(srv.log().is_empty(), "{:?}", srv.log());
    n.assert_running_intact(true);

    // download-only, resuming a partial download an earlier run left behind.
    std::fs::create_dir_all(&cache).unwrap();
    let sha = sha256_file(&n.image);
    std::fs::write(
        cache.join(format!("{sha}.abup.partial")),
        &n.bundle[..500_000],
    )
    .unwrap();
    std::fs::write(cache.join("stale.abup"), b"old").unwrap();
    let out = abu(&[
        "update",
        "--config",
        c,
        "--strategy",
        "download-only",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let done = done_event(&out);
    assert_eq!(done["action"], "downloaded");
    assert_eq!(done["download"]["resumed_from"], 500_000);
    let cached = cache.join(format!("{sha}.abup"));
    assert_eq!(std::fs::read(&cached).unwrap(), n.bundle);
    assert!(!cache.join("stale.abup").exists());
    let gets = srv.requests_for("/stable/v2.abup");
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].range_start, Some(500_000));
    n.assert_running_intact(true);

    // Again: already downloaded, nothing fetched.
    let out = abu(&["update", "--config", c, "--strategy", "download-only"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(srv.requests_for("/stable/v2.abup").len(), 1);

    // auto installs from the cache without downloading, then empties it.
    let out = abu(&["update", "--config", c, "--strategy", "auto"]);
    assert!(out.status.success(), "{}", text(&out));
    n.assert_installed();
    assert_eq!(srv.requests_for("/stable/v2.abup").len(), 1);
    assert!(!cached.exists());
}

// ---------------------------------------------------------------------------------------------
// Adaptive installs.

/// A disk seeded with v1 (64 KiB chunks) and a v2 bundle that differs in chunks 5 and 20 and
/// in its (longer) tail: 33 chunks, 30 of them in the running slot.
struct AdaptiveNode {
    _dir: tempfile::TempDir,
    disk: String,
    image: Vec<u8>,
    bundle_path: PathBuf,
    running_hash: String,
}

fn bundle_64k(image: &Path, version: &str, out: &Path) {
    make_bundle_chunked(image, version, "test-board", out, "64K");
}

fn adaptive_node() -> AdaptiveNode {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v1 = d.join("v1.img");
    make_image(&v1, 2 * 1024 * 1024 + 777, 1);
    let v1b = d.join("v1.abup");
    bundle_64k(&v1, "1.0", &v1b);
    let disk = d.join("disk.img").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "8M",
        "--seed",
        v1b.to_str().unwrap(),
        "--keyring",
        test_pubkey().to_str().unwrap(),
    ]);
    let mut image = std::fs::read(&v1).unwrap();
    image[5 * 65536 + 10] ^= 1;
    image[20 * 65536] ^= 1;
    image.extend(std::iter::repeat_n(7u8, 10_000));
    let v2 = d.join("v2.img");
    std::fs::write(&v2, &image).unwrap();
    let bundle_path = d.join("v2.abup");
    bundle_64k(&v2, "2.0", &bundle_path);
    let (a_off, a_len) = partition_range(&disk, 1);
    AdaptiveNode {
        running_hash: sha256_range(Path::new(&disk), a_off, a_len),
        _dir: dir,
        disk,
        image,
        bundle_path,
    }
}

impl AdaptiveNode {
    /// `abupdate install SOURCE --adaptive --json` on this node's disk, plus `extra`.
    fn install(&self, source: &str, extra: &[&str]) -> Output {
        let mut args = install_args(source, &self.disk);
        args.extend(
            ["--adaptive", "--json"]
                .iter()
                .chain(extra)
                .map(|a| a.to_string()),
        );
        abu(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Checks a successful adaptive install: ROOT-B holds v2 and boots next, ROOT-A is
    /// unchanged, 30 of 33 chunks were copied; returns the `done` event.
    fn assert_installed(&self, out: &Output) -> serde_json::Value {
        assert!(out.status.success(), "{}", text(out));
        let (b_off, _) = partition_range(&self.disk, 2);
        let (a_off, a_len) = partition_range(&self.disk, 1);
        let got = sha256_range(Path::new(&self.disk), b_off, self.image.len() as u64);
        let want = hex::encode(Sha256::digest(&self.image));
        assert_eq!(got, want, "slot B content");
        assert_eq!(
            sha256_range(Path::new(&self.disk), a_off, a_len),
            self.running_hash,
            "running slot changed"
        );
        assert_eq!(cgpt_fields(&self.disk, 2), (2, 3, false));
        assert_sgdisk_clean(&self.disk);
        let done = done_event(out);
        let a = &done["report"]["adaptive"];
        assert_eq!(a["chunks"], 33, "{done}");
        assert_eq!(a["reused_chunks"], 30, "{done}");
        assert_eq!(a["fallbacks"], 0, "{done}");
        done
    }
}

/// Over HTTP the frames of reused chunks are never downloaded: each run of needed frames is
/// fetched with its own Range request.
#[test]
fn adaptive_install_downloads_only_the_chunks_the_running_slot_lacks() {
    if !have_gpt_tools() {
        return;
    }
    let n = adaptive_node();
    let bundle = std::fs::read(&n.bundle_path).unwrap();
    let srv = Server::start();
    srv.put("/v2.abup", bundle.clone());
    let url = srv.url("/v2.abup");
    let out = n.install(&url, &[]);
    let done = n.assert_installed(&out);
    let fetch = &done["fetch"];
    let fetched = fetch["bytes"].as_u64().unwrap();
    let skipped = fetch["skipped"].as_u64().unwrap();
    // What is fetched, at most: the header and chunks 0-5 on the first connection (the
    // frames before chunk 5 are a gap small enough to read through), one read buffer
    // beyond that (STREAM_BUFFER, 64 KiB), then just chunk 20 and the tail (chunk 32).
    let info = bundle_info(&n.bundle_path);
    let frame = |i: usize| {
        info["header"]["chunks"][i]["compressed_len"]
            .as_u64()
            .unwrap()
    };
    let first_connection = info["header_len"].as_u64().unwrap() + (0..=5).map(frame).sum::<u64>();
    let bound = first_connection + 64 * 1024 + frame(20) + frame(32);
    assert!(
        fetched <= bound && fetched < bundle.len() as u64 * 2 / 5,
        "fetched {fetched} of {} bytes (bound {bound})",
        bundle.len()
    );
    assert!(skipped > bundle.len() as u64 / 2, "{fetch}");
    // The whole bundle from byte 0, then one closed Range request for chunk 20 and one for
    // the tail (chunk 32), each after a gap larger than the read-through limit.
    let requests = srv.requests_for("/v2.abup");
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(requests[0].range_start, None);
    for r in &requests[1..] {
        let (start, last) = (r.range_start.unwrap(), r.range_last.unwrap());
        assert!(last - start < 128 * 1024, "{r:?}");
    }
    assert_eq!(requests[2].range_last, Some(bundle.len() as u64 - 1));
    println!(
        "adaptive download: {fetched} of {} bundle bytes fetched, {skipped} skipped, {} requests",
        bundle.len(),
        requests.len()
    );
}

/// From a file the reused frames are seeked over; from a pipe they are read and dropped;
/// both give the same verified slot.
#[test]
fn adaptive_install_from_a_file_and_from_stdin() {
    if !have_gpt_tools() {
        return;
    }
    for from_stdin in [false, true] {
        let n = adaptive_node();
        let source = if from_stdin {
            "-".to_string()
        } else {
            n.bundle_path.display().to_string()
        };
        let mut cmd = Command::new(bin());
        cmd.args(install_args(&source, &n.disk))
            .args(["--adaptive", "--json"]);
        if from_stdin {
            cmd.stdin(std::fs::File::open(&n.bundle_path).unwrap());
        }
        n.assert_installed(&cmd.output().unwrap());
    }
}

/// A v2 whose data moved off the chunk grid (three 4 KiB blocks near the start went away, as
/// when a file early in a file system shrinks): the first-block hashes in the bundle let the
/// install find the moved chunks in ROOT-A at their new, unaligned offsets.
#[test]
fn adaptive_install_finds_chunks_moved_by_whole_blocks() {
    if !have_gpt_tools() {
        return;
    }
    let n = adaptive_node();
    let dir = tempfile::tempdir().unwrap();
    let v1 = {
        let (a_off, _) = partition_range(&n.disk, 1);
        let mut f = std::fs::File::open(&n.disk).unwrap();
        let mut bytes = vec![0u8; 2 * 1024 * 1024 + 777];
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(a_off)).unwrap();
        f.read_exact(&mut bytes).unwrap();
        bytes
    };
    let mut image = v1[..10 * 4096].to_vec();
    image.extend_from_slice(&v1[13 * 4096..]);
    let v2 = dir.path().join("v2-moved.img");
    std::fs::write(&v2, &image).unwrap();
    let bundle = dir.path().join("v2-moved.abup");
    bundle_64k(&v2, "2.0", &bundle);
    let out = n.install(bundle.to_str().unwrap(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let (b_off, _) = partition_range(&n.disk, 2);
    assert_eq!(
        sha256_range(Path::new(&n.disk), b_off, image.len() as u64),
        hex::encode(Sha256::digest(&image)),
        "slot B content"
    );
    // 32 chunks: chunk 0 holds the cut; chunks 1-30 are ROOT-A's data 12 KiB further on;
    // the short tail (chunk 31) too.
    let done = done_event(&out);
    let a = &done["report"]["adaptive"];
    assert_eq!(a["chunks"], 32, "{done}");
    assert_eq!(a["reused_chunks"], 31, "{done}");
    assert_eq!(a["fallbacks"], 0, "{done}");
}

/// Dropped connections during an adaptive download are resumed like any other, and a resumed
/// closed range keeps its end: the retry asks for the rest of the same run, nothing more.
#[test]
fn adaptive_download_resumes_cut_connections_within_their_range() {
    if !have_gpt_tools() {
        return;
    }
    let n = adaptive_node();
    let bundle = std::fs::read(&n.bundle_path).unwrap();
    let info = bundle_info(&n.bundle_path);
    let frame = |i: usize| {
        info["header"]["chunks"][i]["compressed_len"]
            .as_u64()
            .unwrap()
    };
    let frame_start =
        |i: usize| info["header_len"].as_u64().unwrap() + (0..i).map(frame).sum::<u64>();
    // A cut inside chunk 20's closed range (the first, open-ended response covers every
    // offset, so cuts apply to ranged responses only).
    let cut_twenty = frame_start(20) + frame(20) / 2;
    let srv = Server::start();
    srv.put("/v2.abup", bundle);
    srv.behave(
        "/v2.abup",
        Behavior {
            cuts: [cut_twenty].into_iter().collect(),
            cut_ranged_only: true,
            ..Default::default()
        },
    );
    let url = srv.url("/v2.abup");
    let out = n.install(&url, &["--retry-delay", "10ms"]);
    let done = n.assert_installed(&out);
    assert_eq!(done["fetch"]["retries"], 1, "{done}");
    let requests = srv.requests_for("/v2.abup");
    let resumed = requests
        .iter()
        .find(|r| r.range_start == Some(cut_twenty))
        .unwrap_or_else(|| panic!("no resume at {cut_twenty}: {requests:?}"));
    assert_eq!(
        resumed.range_last,
        Some(frame_start(21) - 1),
        "the resumed request keeps the run's end: {requests:?}"
    );
}

/// A dry run over HTTP reads the header (and at most one read buffer), reports the adaptive
/// plan, and changes nothing: how much an update would download, asked before downloading it.
#[test]
fn adaptive_dry_run_over_http_reads_only_the_header() {
    if !have_gpt_tools() {
        return;
    }
    let n = adaptive_node();
    let bundle = std::fs::read(&n.bundle_path).unwrap();
    let disk_hash = sha256_file(Path::new(&n.disk));
    let srv = Server::start();
    srv.put("/v2.abup", bundle);
    let url = srv.url("/v2.abup");
    let out = n.install(&url, &["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let done = done_event(&out);
    assert_eq!(done["action"], "dry-run", "{done}");
    assert_eq!(done["report"]["adaptive"]["reused_chunks"], 30, "{done}");
    let info = bundle_info(&n.bundle_path);
    let header_len = info["header_len"].as_u64().unwrap();
    let fetched = done["fetch"]["bytes"].as_u64().unwrap();
    assert!(
        fetched <= header_len + 64 * 1024,
        "fetched {fetched}: {done}"
    );
    assert_eq!(sha256_file(Path::new(&n.disk)), disk_hash, "disk changed");
}

/// A bundle file cut short inside the last run of frames an adaptive install skips (seeking
/// past them, reading nothing after) is still refused as truncated, although every chunk
/// would come from ROOT-A: exit 3, the running slot untouched and still the one that boots
/// next.
#[test]
fn adaptive_install_refuses_a_bundle_truncated_inside_a_skipped_run() {
    if !have_gpt_tools() {
        return;
    }
    let n = adaptive_node();
    // v2 = ROOT-A's v1 with chunk 5 changed: chunks 6 to the end all come from ROOT-A.
    let (a_off, a_len) = partition_range(&n.disk, 1);
    let mut image = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&n.disk).unwrap();
        let mut bytes = vec![0u8; 2 * 1024 * 1024 + 777];
        f.seek(SeekFrom::Start(a_off)).unwrap();
        f.read_exact(&mut bytes).unwrap();
        bytes
    };
    image[5 * 65536 + 10] ^= 1;
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2-one-change.img");
    std::fs::write(&v2, &image).unwrap();
    let bundle = dir.path().join("v2-one-change.abup");
    bundle_64k(&v2, "2.0", &bundle);
    let info = bundle_info(&bundle);
    let frame = |i: usize| {
        info["header"]["chunks"][i]["compressed_len"]
            .as_u64()
            .unwrap()
    };
    // Cut the file in the middle of chunk 20's frame, inside the final skipped run 6-32.
    let cut =
        info["header_len"].as_u64().unwrap() + (0..20).map(frame).sum::<u64>() + frame(20) / 2;
    let bytes = std::fs::read(&bundle).unwrap();
    let truncated = dir.path().join("v2-one-change.truncated");
    std::fs::write(&truncated, &bytes[..cut as usize]).unwrap();
    let out = n.install(truncated.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated"),
        "{}",
        text(&out)
    );
    assert_eq!(
        sha256_range(Path::new(&n.disk), a_off, a_len),
        n.running_hash,
        "running slot changed"
    );
    assert_eq!(status_json(&n.disk, &[])["next_boot"], "ROOT-A");
    assert_eq!(cgpt_fields(&n.disk, 2).0, 0, "ROOT-B must be unbootable");
    assert_sgdisk_clean(&n.disk);
}
