//! `abupdate service` under a real, private `dbus-daemon` (Debian `dbus`), driven by `busctl`
//! as an independent client:
//! - the interface it introspects is `dist/dbus/io.abupdate.Updater1.xml`; the `Status`
//!   property is `status --json`;
//! - an install from a FIFO the test feeds: a second operation meanwhile gets
//!   `io.abupdate.Updater1.Error.Busy`; the `ProgressUpdate` signals (`busctl monitor`) count
//!   up and reach the total only in the read-back; `Completed` reports exit 0; the slot is
//!   installed and on trial;
//! - `Cancel` midway: `Completed` with exit 130, the target unbootable, the running slot
//!   untouched; the service killed (SIGKILL) mid-install: the same; the disk lock excludes the
//!   CLI while the service installs;
//! - the bus policy from `dist/dbus/`: an unprivileged user reads properties but its method
//!   calls are refused by the bus;
//! - `Check` and `Update` against a channel on a loopback HTTP server: the verdict in
//!   `ChannelVerdict`, then the install, as `abupdate update` does.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DEST: &str = "io.abupdate.Updater1";
const PATH: &str = "/io/abupdate/Updater1";

/// A private bus with the service on it; both are killed on drop.
struct Bus {
    address: String,
    daemon: Child,
    service: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(s) = self.service.as_mut() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Bus {
    /// Starts `dbus-daemon` on a socket in `dir` with a permissive default policy followed by
    /// the shipped one (`dist/dbus/io.abupdate.Updater1.conf`), then the service on `disk`.
    fn start(dir: &Path, disk: &str) -> Option<Bus> {
        Bus::start_with(dir, disk, &[])
    }

    /// [`Bus::start`] with `extra` service arguments.
    fn start_with(dir: &Path, disk: &str, extra: &[&str]) -> Option<Bus> {
        if !have(
            "dbus-daemon, busctl and setpriv (Debian dbus, systemd, util-linux)",
            on_path("dbus-daemon") && on_path("busctl") && on_path("setpriv"),
        ) {
            return None;
        }
        // The unprivileged caller must reach the socket.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join("bus");
        let policy =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/dbus/io.abupdate.Updater1.conf");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
  <include>{}</include>
</busconfig>
"#,
                socket.display(),
                policy.display()
            ),
        )
        .unwrap();
        let daemon = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        wait_until("the bus socket", || socket.exists());
        let mut bus = Bus {
            address: format!("unix:path={}", socket.display()),
            daemon,
            service: None,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        bus.start_service(disk);
        Some(bus)
    }

    fn start_service(&mut self, disk: &str) {
        let log = std::fs::File::create(self.dir.join("service.log")).unwrap();
        let child = Command::new(bin())
            .args(["service", "--disk", disk, "--keyring"])
            .arg(test_pubkey())
            .args(["--compatible", "test-board", "--sentinel", "none"])
            .args(["--bus-address", &self.address])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start abupdate service");
        self.service = Some(child);
        wait_until("the service on the bus", || {
            self.busctl(&["status", DEST]).0
        });
    }

    /// Runs busctl on this bus: (success, stdout + stderr).
    fn busctl(&self, args: &[&str]) -> (bool, String) {
        self.busctl_as(None, args)
    }

    /// [`Bus::busctl`] as user and group `uid` (through setpriv), or as root.
    fn busctl_as(&self, uid: Option<u32>, args: &[&str]) -> (bool, String) {
        let address = format!("--address={}", self.address);
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "busctl"]);
                c
            }
            None => Command::new("busctl"),
        };
        let out = cmd.arg(&address).args(args).output().expect("run busctl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A property as busctl's JSON `{"type":…,"data":…}`.
    fn property(&self, name: &str) -> serde_json::Value {
        let (ok, out) = self.busctl(&["--json=short", "get-property", DEST, PATH, DEST, name]);
        assert!(ok, "get-property {name}: {out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["data"].clone()
    }

    fn call(&self, method: &str, args: &[&str]) -> (bool, String) {
        let mut all = vec!["call", DEST, PATH, DEST, method];
        all.extend_from_slice(args);
        self.busctl(&all)
    }

    /// Waits until no operation is in progress.
    fn wait_idle(&self) {
        wait_until("the operation to end", || {
            self.property("Operation").as_str() == Some("")
        });
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A FIFO the service reads the bundle from, so the test decides when bytes arrive.
fn fifo(dir: &Path) -> PathBuf {
    let path = dir.join("bundle.fifo");
    tool_ok("mkfifo", &[path.to_str().unwrap()]);
    path
}

/// Opens `fifo` for writing (blocks until the service opened it for reading) and sends
/// `bytes`; returns the writer, still open.
fn feed(fifo: &Path, bytes: &[u8]) -> std::fs::File {
    let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    w.write_all(bytes).unwrap();
    w
}

/// The signals `busctl --json=short monitor` saw: (member, payload data).
fn signals(log: &Path) -> Vec<(String, serde_json::Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "signal" && v["interface"] == DEST)
        .map(|v| {
            (
                v["member"].as_str().unwrap_or("").to_string(),
                v["payload"]["data"].clone(),
            )
        })
        .collect()
}

fn normalized(xml: &str) -> String {
    xml.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn service_installs_with_progress_signals_one_operation_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let disk = seeded_disk(dir.path());
    let Some(bus) = Bus::start(dir.path(), &disk) else {
        return;
    };
    // The interface is what dist/ documents.
    let (ok, xml) = bus.busctl(&["introspect", "--xml-interface", DEST, PATH]);
    assert!(ok, "{xml}");
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/dbus/io.abupdate.Updater1.xml"),
    )
    .unwrap();
    let start = shipped.find("<interface").unwrap();
    let end = shipped.find("</interface>").unwrap() + "</interface>".len();
    assert!(
        normalized(&xml).contains(&normalized(&shipped[start..end])),
        "dist/dbus/io.abupdate.Updater1.xml differs from the service's introspection:\n{xml}"
    );
    let status: serde_json::Value =
        serde_json::from_str(bus.property("Status").as_str().unwrap()).unwrap();
    assert_eq!(status["slots"][0]["version"], "1.0", "{status}");
    // The same as typed D-Bus structures: (name, partition, PARTUUID, priority, tries,
    // successful, bootable, next boot, running, size, version, KERN partition).
    let slots = bus.property("Slots");
    assert_eq!(slots[0][0], "ROOT-A", "{slots}");
    assert_eq!(slots[0][2], status["slots"][0]["partuuid"], "{slots}");
    assert_eq!(
        (&slots[0][3], &slots[0][5], &slots[0][10]),
        (
            &serde_json::json!(1),
            &serde_json::json!(true),
            &serde_json::json!("1.0")
        ),
        "{slots}"
    );
    assert_eq!(slots[1][10], "", "{slots}");

    let monitor_log = dir.path().join("monitor.log");
    let mut monitor = Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["--json=short", "monitor", DEST])
        .stdout(std::fs::File::create(&monitor_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let fifo = fifo(dir.path());
    let bundle = std::fs::read(dir.path().join("v2.abup")).unwrap();
    let (ok, out) = bus.call("Install", &["sa{sv}", fifo.to_str().unwrap(), "0"]);
    assert!(ok, "{out}");
    // The install waits for the FIFO's writer: a second operation is refused meanwhile.
    let (ok, out) = bus.call("MarkGood", &["s", "ROOT-A"]);
    assert!(!ok && out.contains("install is in progress"), "{out}");
    assert_eq!(bus.property("Operation"), "install");
    // The service holds the disk lock: the CLI is excluded as from another CLI (exit 7).
    let out = abupdate(&["mark-good", "--disk", &disk, "--slot", "ROOT-A"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    drop(feed(&fifo, &bundle));
    bus.wait_idle();
    assert_eq!(bus.property("LastError"), serde_json::json!(["", 0]));
    let progress = bus.property("Progress");
    assert_eq!(progress[0], progress[1], "{progress}");
    assert_eq!(progress[2], "done", "{progress}");
    assert_eq!(
        cgpt_fields(&disk, 2),
        (2, 3, false),
        "v2 in ROOT-B, on trial"
    );
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let _ = monitor.wait();

    let seen = signals(&monitor_log);
    let updates: Vec<(u64, u64, String)> = seen
        .iter()
        .filter(|(m, _)| m == "ProgressUpdate")
        .map(|(_, d)| {
            (
                d[0].as_u64().unwrap(),
                d[1].as_u64().unwrap(),
                d[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(updates.len() >= 3, "{seen:?}");
    for pair in updates.windows(2) {
        assert!(pair[1].0 >= pair[0].0, "progress went back: {updates:?}");
    }
    let image = 1024 * 1024 + 512;
    let last = updates.last().unwrap();
    assert_eq!((last.0, last.1), (2 * image, 2 * image), "{updates:?}");
    for (done, total, phase) in &updates {
        if done == total && *total > 0 {
            assert_ne!(
                phase, "writing",
                "the total before the read-back: {updates:?}"
            );
        }
    }
    let completed: Vec<&serde_json::Value> = seen
        .iter()
        .filter(|(m, _)| m == "Completed")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        completed,
        [&serde_json::json!(["install", 0, ""])],
        "{seen:?}"
    );
}

/// ROOT-B left unbootable, ROOT-A (partition 1) committed and byte for byte as it was.
fn assert_interrupted(disk: &str, a_before: &str) {
    let (a_start, a_len) = partition_range(disk, 1);
    assert_eq!(
        cgpt_fields(disk, 2),
        (0, 0, false),
        "ROOT-B left unbootable"
    );
    assert_eq!(cgpt_fields(disk, 1), (1, 0, true));
    assert_eq!(sha256_range(Path::new(disk), a_start, a_len), a_before);
}

#[test]
fn service_cancel_and_kill_leave_the_target_unbootable_and_policy_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = seeded_disk(dir.path());
    let Some(mut bus) = Bus::start(dir.path(), &disk) else {
        return;
    };
    let (a_start, a_len) = partition_range(&disk, 1);
    let a_before = sha256_range(Path::new(&disk), a_start, a_len);
    let bundle = std::fs::read(dir.path().join("v2.abup")).unwrap();
    let half = bundle.len() / 2;

    // The bus policy: anyone reads, only root and the abupdate group call.
    let nobody = Some(65534);
    let (ok, out) = bus.busctl_as(nobody, &["get-property", DEST, PATH, DEST, "Operation"]);
    assert!(ok, "an unprivileged user reads properties: {out}");
    let (ok, out) = bus.busctl_as(
        nobody,
        &["call", DEST, PATH, DEST, "MarkBad", "s", "ROOT-A"],
    );
    assert!(!ok && out.contains("Access denied"), "{out}");
    assert_eq!(cgpt_fields(&disk, 1), (1, 0, true));

    // Cancel midway: half the bundle sent, the writer kept open (a stalled source).
    let fifo = fifo(dir.path());
    let (ok, out) = bus.call("Install", &["sa{sv}", fifo.to_str().unwrap(), "0"]);
    assert!(ok, "{out}");
    let writer = feed(&fifo, &bundle[..half]);
    wait_until("the writing phase", || {
        bus.property("Progress")[2] == "writing"
    });
    let (ok, out) = bus.call("Cancel", &[]);
    assert!(ok, "{out}");
    bus.wait_idle();
    drop(writer);
    let last_error = bus.property("LastError");
    assert_eq!(last_error[1], 130, "{last_error}");
    assert_interrupted(&disk, &a_before);

    // Killed mid-install: the disk is as a killed CLI leaves it.
    std::fs::remove_file(&fifo).unwrap();
    let fifo = self::fifo(dir.path());
    let (ok, out) = bus.call("Install", &["sa{sv}", fifo.to_str().unwrap(), "0"]);
    assert!(ok, "{out}");
    let writer = feed(&fifo, &bundle[..half]);
    wait_until("the writing phase", || {
        bus.property("Progress")[2] == "writing"
    });
    let service = bus.service.as_mut().unwrap();
    service.kill().unwrap();
    service.wait().unwrap();
    drop(writer);
    assert_interrupted(&disk, &a_before);
    assert_sgdisk_clean(&disk);
    // A new service installs over the interrupted one.
    bus.start_service(&disk);
    let fifo2 = dir.path().join("again.fifo");
    tool_ok("mkfifo", &[fifo2.to_str().unwrap()]);
    let (ok, out) = bus.call("Install", &["sa{sv}", fifo2.to_str().unwrap(), "0"]);
    assert!(ok, "{out}");
    drop(feed(&fifo2, &bundle));
    bus.wait_idle();
    assert_eq!(bus.property("LastError"), serde_json::json!(["", 0]));
    assert_eq!(cgpt_fields(&disk, 2), (2, 3, false));
}

#[test]
fn service_checks_and_updates_from_a_channel() {
    let dir = tempfile::tempdir().unwrap();
    let disk = seeded_disk(dir.path());
    let srv = common::http_server::Server::start();
    let index = dir.path().join("index.json");
    let bundle = dir.path().join("v2.abup");
    abupdate_ok(&[
        "channel",
        "create",
        "--bundle",
        bundle.to_str().unwrap(),
        "--key",
        test_key().to_str().unwrap(),
        "--out",
        index.to_str().unwrap(),
    ]);
    srv.put("/stable/index.json", std::fs::read(&index).unwrap());
    srv.put("/stable/v2.abup", std::fs::read(&bundle).unwrap());
    let url = srv.url("/stable/index.json");
    let cache = dir.path().join("cache");
    let extra = [
        "--channel",
        &url,
        "--running",
        "ROOT-A",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let Some(bus) = Bus::start_with(dir.path(), &disk, &extra) else {
        return;
    };
    assert_eq!(bus.property("NextBoot"), "ROOT-A");
    assert_eq!(bus.property("ChannelVerdict"), "");
    let (ok, out) = bus.call("Check", &[]);
    assert!(ok, "{out}");
    bus.wait_idle();
    let verdict: serde_json::Value =
        serde_json::from_str(bus.property("ChannelVerdict").as_str().unwrap()).unwrap();
    assert_eq!(verdict["verdict"], "available", "{verdict}");
    assert_eq!(verdict["latest_version"], "2.0", "{verdict}");
    assert!(
        srv.requests_for("/stable/v2.abup").is_empty(),
        "Check downloads nothing"
    );
    let (ok, out) = bus.call("Update", &[]);
    assert!(ok, "{out}");
    bus.wait_idle();
    assert_eq!(bus.property("LastError"), serde_json::json!(["", 0]));
    assert_eq!(
        cgpt_fields(&disk, 2),
        (2, 3, false),
        "v2 in ROOT-B, on trial"
    );
    assert_eq!(bus.property("NextBoot"), "ROOT-B");
    let progress = bus.property("Progress");
    assert_eq!(
        (&progress[0], &progress[2]),
        (&progress[1], &serde_json::json!("done"))
    );

    // The health commit's and the operator's slot operations.
    let (ok, out) = bus.call("MarkGood", &["s", "ROOT-B"]);
    assert!(ok && out.contains("ROOT-B"), "{out}");
    assert!(cgpt_fields(&disk, 2).2, "ROOT-B committed");
    let (ok, out) = bus.call("MarkBad", &["s", "ROOT-B"]);
    assert!(ok, "{out}");
    assert_eq!(cgpt_fields(&disk, 2), (0, 0, false));
    // Rollback to a slot that is not committed is refused with the CLI's exit code.
    let (ok, out) = bus.call("Rollback", &[]);
    assert!(!ok && out.contains("exit 8"), "{out}");
    assert_eq!(bus.property("LastError")[1], 8);
    assert_eq!(bus.property("NextBoot"), "ROOT-A");
}
