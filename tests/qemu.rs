//! End-to-end A/B cycle on a real kernel (issue 6).
//!
//! Each test boots a raw GPT disk image in QEMU (scripts/qemu/run-vm): a Debian cloud kernel,
//! an initramfs whose `/init` runs `abupdate boot` (the try-spending slot choice) and
//! switch_roots into the chosen slot, and small ext4 root filesystems whose `/sbin/init`
//! runs `abupdate commit` (health check), optionally `abupdate install` of a bundle attached
//! as a second disk, and powers off. The initramfs runs the real boot hook,
//! dist/initramfs/abupdate-boot-hook. The guest prints the hook's `abupdate: booting ...`
//! and `BOOTED`, `INSTALLED` lines on the serial console; the host checks them and the slot
//! attributes with `cgpt`. Scenarios 6-8 (the hook's failure paths) are in qemu_hook/.
//!
//! Assets (kernel, initramfs, static guest binary) are built once per run by
//! scripts/qemu/build-assets into `$ABUPDATE_QEMU_DIR` (default target/qemu) and reused by
//! every test; root filesystems, bundles and disks live in `target/qemu/work/<pid>/`. The
//! factory disk is `abupdate disk init --seed v1.abup --keyring release.pub`: v1 and its slot
//! record in ROOT-A, so the hook prints `booting ROOT-A version 1` and the in-guest install takes the
//! device's compatible string from the running slot's record (no `--compatible`).
//!
//! Needs qemu-system-x86_64, busybox-static, cpio, e2fsprogs, cgpt and gdisk (sgdisk), and
//! apt access to the Debian archive the first time (kernel package). The tests skip (printing
//! `SKIP:` and why) only when qemu-system-x86_64 is absent and `CI=true` is not set; under
//! CI a missing QEMU is a failure, and so, anywhere, is anything else missing or any asset
//! that cannot be built (the first failure is kept and every test reports it, without
//! building again).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------ plumbing

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script(name: &str) -> PathBuf {
    repo().join("scripts/qemu").join(name)
}

fn qemu_dir() -> PathBuf {
    match std::env::var_os("ABUPDATE_QEMU_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("target/qemu"),
    }
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Returns false (after printing `SKIP:` and why) when the QEMU tests cannot run on this
/// machine. Under CI (`CI=true`, as .ci/run sets) that is a failure instead, as for the other
/// integration tests (tests/common's `have`): CI installs qemu-system-x86.
fn qemu_available() -> bool {
    if on_path("qemu-system-x86_64") {
        return true;
    }
    let why = "qemu-system-x86_64 not found on PATH (apt-get install qemu-system-x86)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why}: QEMU is required under CI"
    );
    say(&format!("SKIP: {why}"));
    false
}

macro_rules! require_qemu {
    () => {
        if !qemu_available() {
            return;
        }
    };
}

// After the macro: scenarios 6-8 use require_qemu!.
mod qemu_hook;

/// Writes straight to stderr, bypassing the test harness's capture, so that the boot
/// sequences show in CI logs of passing tests too.
fn say(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{msg}");
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    if !out.status.success() {
        panic!(
            "{shown} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A clean per-test directory under the work dir (left in place afterwards for post-mortems).
fn test_dir(name: &str) -> PathBuf {
    let d = assets().work.join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn copy_disk(from: &Path, to: &Path) {
    // cp keeps the image sparse; fs::copy would too on most filesystems, but say so.
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

// ------------------------------------------------------------------------------ assets

const SLOT_SIZE: &str = "64M";
const ROOTFS_SIZE: &str = "16M";
const COMPATIBLE: &str = "abupdate-qemu-x86_64";

struct Assets {
    work: PathBuf,
    /// The host-side abupdate (`target/qemu/abupdate`, the static guest binary).
    abupdate: PathBuf,
    bundle_v2: PathBuf,
    /// v3 that boots and passes its check (power-cut scenario (c)).
    bundle_v3: PathBuf,
    bundle_v3_failing: PathBuf,
    bundle_v3_broken: PathBuf,
    /// A fresh disk (`abupdate disk init --seed v1.abup`): v1 and its slot record in ROOT-A.
    /// Tests copy it.
    disk_v1: PathBuf,
}

/// The assets, or why they could not be built (kept, so that every test fails with the first
/// error instead of trying again).
static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();

fn assets() -> &'static Assets {
    let built = ASSETS.get_or_init(|| {
        std::panic::catch_unwind(build_assets).map_err(|e| panic_message(e.as_ref()))
    });
    match built {
        Ok(a) => a,
        Err(e) => panic!("QEMU test assets could not be built:\n{e}"),
    }
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn build_assets() -> Assets {
    let t0 = Instant::now();
    let dir = qemu_dir();
    let work = work_dir(&dir);
    run(Command::new(script("build-assets")).env("ABUPDATE_QEMU_DIR", &dir));
    let abupdate = dir.join("abupdate");
    let t_assets = t0.elapsed();

    let common = work.join("common");
    let _ = fs::remove_dir_all(&common);
    fs::create_dir_all(&common).unwrap();

    // Signing key; its public half goes into every root filesystem's keyring.
    let key = common.join("release");
    run(Command::new(&abupdate).args(["keygen", "--out"]).arg(&key));
    let key_secret = common.join("release.key");
    let key_public = common.join("release.pub");
    assert!(
        key_secret.is_file() && key_public.is_file(),
        "keygen wrote no release.key/release.pub"
    );

    let rootfs = |version: &str, file: &str, flags: &[&str]| -> PathBuf {
        let out = common.join(file);
        run(Command::new(script("build-rootfs"))
            .env("ABUPDATE_QEMU_DIR", &dir)
            .arg(version)
            .arg(&out)
            .args(["--size", ROOTFS_SIZE, "--key"])
            .arg(&key_public)
            .args(flags));
        out
    };
    let bundle = |image: &Path, version: &str, file: &str| -> PathBuf {
        let out = common.join(file);
        run(Command::new(&abupdate)
            .args(["bundle", "create", "--image"])
            .arg(image)
            .arg("--key")
            .arg(&key_secret)
            .args(["--version", version, "--compatible", COMPATIBLE])
            // Small chunks, so the adaptive install of scenario 3 finds most of them.
            .args(["--chunk-size", "256K", "--out"])
            .arg(&out));
        out
    };

    let rootfs_v1 = rootfs("1", "rootfs-v1.img", &[]);
    let rootfs_v2 = rootfs("2", "rootfs-v2.img", &[]);
    let rootfs_v3 = rootfs("3", "rootfs-v3.img", &[]);
    let rootfs_v3_failing = rootfs("3", "rootfs-v3-failing.img", &["--failing-check"]);
    let rootfs_v3_broken = rootfs("3", "rootfs-v3-broken.img", &["--broken-init"]);
    let bundle_v1 = bundle(&rootfs_v1, "1", "v1.abup");
    let bundle_v2 = bundle(&rootfs_v2, "2", "v2.abup");
    let bundle_v3 = bundle(&rootfs_v3, "3", "v3.abup");
    let bundle_v3_failing = bundle(&rootfs_v3_failing, "3", "v3-failing.abup");
    let bundle_v3_broken = bundle(&rootfs_v3_broken, "3", "v3-broken.abup");

    let disk_v1 = common.join("disk-v1.img");
    let _ = fs::remove_file(&disk_v1);
    // The factory image: v1 verified and written into ROOT-A with its slot record, which
    // gives the boot hook its version and the in-guest install its compatible string.
    run(Command::new(&abupdate)
        .args(["disk", "init"])
        .arg(&disk_v1)
        .args(["--slot-size", SLOT_SIZE, "--seed"])
        .arg(&bundle_v1)
        .arg("--keyring")
        .arg(&key_public));
    let st = status_json(&abupdate, &disk_v1);
    let slots = st["slots"].as_array().expect("status: slots");
    assert_eq!(
        (
            slots[0]["name"].as_str(),
            slots[0]["version"].as_str(),
            slots[0]["successful"].as_bool()
        ),
        (Some("ROOT-A"), Some("1"), Some(true)),
        "disk init --seed: {st}"
    );
    assert!(slots[1]["version"].is_null(), "ROOT-B empty: {st}");

    say(&format!(
        "qemu assets ready in {:.1}s (build-assets {:.1}s) in {}",
        t0.elapsed().as_secs_f64(),
        t_assets.as_secs_f64(),
        dir.display()
    ));
    Assets {
        work,
        abupdate,
        bundle_v2,
        bundle_v3,
        bundle_v3_failing,
        bundle_v3_broken,
        disk_v1,
    }
}

/// This process's work dir, `<qemu dir>/work/<pid>`: other `cargo test` runs on the same
/// tree (a developer's, CI's) may run these tests at the same time. Dirs of processes that
/// are gone are removed; the current run's stay for post-mortems until the next run.
fn work_dir(dir: &Path) -> PathBuf {
    let root = dir.join("work");
    fs::create_dir_all(&root).unwrap();
    for entry in fs::read_dir(&root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = match name.parse::<u32>() {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => true, // left by older layouts
        };
        if stale {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let work = root.join(std::process::id().to_string());
    fs::create_dir_all(&work).unwrap();
    work
}

/// `abupdate status --disk DISK --json`.
fn status_json(abupdate: &Path, disk: &Path) -> serde_json::Value {
    let out = stdout_of(
        Command::new(abupdate)
            .args(["status", "--json", "--disk"])
            .arg(disk),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// Slot versions from the slot records, as `abupdate status` shows them ("-" for none).
fn slot_versions(disk: &Path) -> (String, String) {
    let st = status_json(&assets().abupdate, disk);
    let v = |i: usize| {
        st["slots"][i]["version"]
            .as_str()
            .unwrap_or("-")
            .to_string()
    };
    (v(0), v(1))
}

// ------------------------------------------------------------------------------ disk checks

/// Partition numbers and extents of the slots (from sgdisk, independent of abupdate).
#[derive(Clone, Debug)]
struct Layout {
    a: u32,
    b: u32,
    /// (partition, first sector, sector count)
    extents: Vec<(u32, u64, u64)>,
    /// Disk size in 512-byte sectors.
    sectors: u64,
}

impl Layout {
    fn read(disk: &Path) -> Layout {
        let text = stdout_of(Command::new("sgdisk").arg("-p").arg(disk));
        let mut a = None;
        let mut b = None;
        let mut extents = Vec::new();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() >= 7 && w[0].parse::<u32>().is_ok() && w[1].parse::<u64>().is_ok() {
                let n: u32 = w[0].parse().unwrap();
                let first: u64 = w[1].parse().unwrap();
                let last: u64 = w[2].parse().unwrap();
                extents.push((n, first, last - first + 1));
                match *w.last().unwrap() {
                    "ROOT-A" => a = Some(n),
                    "ROOT-B" => b = Some(n),
                    _ => {}
                }
            }
        }
        let sectors = fs::metadata(disk).unwrap().len() / 512;
        Layout {
            a: a.unwrap_or_else(|| panic!("no ROOT-A in:\n{text}")),
            b: b.unwrap_or_else(|| panic!("no ROOT-B in:\n{text}")),
            extents,
            sectors,
        }
    }

    fn extent(&self, part: u32) -> (u64, u64) {
        let &(_, s, n) = self.extents.iter().find(|e| e.0 == part).unwrap();
        (s, n)
    }

    /// Whether a write of `n` sectors at `sector` touches GPT metadata (protective MBR,
    /// primary header and entries in the first 34 sectors, backup entries and header in the
    /// last 33). Writes may be 4 KiB-aligned, so this is an overlap test.
    fn is_gpt_write(&self, w: &GuestWrite) -> bool {
        w.sector < 34 || w.sector + w.nsectors > self.sectors - 33
    }

    fn in_part(&self, part: u32, w: &GuestWrite) -> bool {
        let (s, n) = self.extent(part);
        w.sector < s + n && w.sector + w.nsectors > s
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attrs {
    priority: u8,
    tries: u8,
    successful: u8,
}

impl std::fmt::Display for Attrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "P{} T{} S{}", self.priority, self.tries, self.successful)
    }
}

/// One slot's attributes as `cgpt show -i N -P/-T/-S` reads them.
fn attrs(disk: &Path, part: u32) -> Attrs {
    let field = |flag: &str| -> u8 {
        let out = stdout_of(
            Command::new("cgpt")
                .args(["show", "-i", &part.to_string(), flag])
                .arg(disk),
        );
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("cgpt show {flag}: {out:?}"))
    };
    Attrs {
        priority: field("-P"),
        tries: field("-T"),
        successful: field("-S"),
    }
}

fn slot_attrs(disk: &Path) -> (Attrs, Attrs) {
    let l = Layout::read(disk);
    (attrs(disk, l.a), attrs(disk, l.b))
}

/// `sgdisk -v`: Ok when it finds no problems, else its report.
fn sgdisk_verify(disk: &Path) -> Result<(), String> {
    let out = Command::new("sgdisk")
        .arg("-v")
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("No problems found") {
        Ok(())
    } else {
        Err(text)
    }
}

fn sha256_of_slot(disk: &Path, part: u32) -> String {
    let (start, n) = Layout::read(disk).extent(part);
    let mut f = fs::File::open(disk).unwrap();
    f.seek(SeekFrom::Start(start * 512)).unwrap();
    let mut buf = vec![0u8; (n * 512) as usize];
    f.read_exact(&mut buf).unwrap();
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&buf))
}

// ------------------------------------------------------------------------------ VM runs

/// What one boot printed on the serial console.
#[derive(Debug, Clone)]
struct Boot {
    log: String,
    log_path: PathBuf,
    killed: bool,
}

impl Boot {
    fn lines(&self) -> impl Iterator<Item = &str> {
        self.log.lines().map(|l| l.trim_end_matches('\r'))
    }
    fn field_line(&self, tag: &str) -> Option<Vec<String>> {
        self.lines()
            .find_map(|l| l.strip_prefix(tag).filter(|r| r.starts_with(' ')))
            .map(|r| r.split_whitespace().map(String::from).collect())
    }
    /// Each slot the boot hook (dist/initramfs/abupdate-boot-hook) chose, in order, with the
    /// version it read from the slot record: its lines
    /// `abupdate: booting <slot> version <version> (...)`.
    fn hook_choices(&self) -> Vec<(String, String)> {
        const TAG: &str = "abupdate: booting ";
        self.lines()
            .filter_map(|l| l.find(TAG).map(|i| &l[i + TAG.len()..]))
            .filter_map(|r| match r.split_whitespace().collect::<Vec<_>>()[..] {
                [slot, "version", version, ..] => Some((slot.to_string(), version.to_string())),
                _ => None,
            })
            .collect()
    }
    /// The slot the boot hook chose last (the one it mounted, if any).
    fn hook_slot(&self) -> Option<String> {
        self.hook_choices().pop().map(|c| c.0)
    }
    /// The version the boot hook read from that slot's record (`?` without one).
    fn hook_version(&self) -> Option<String> {
        self.hook_choices().pop().map(|c| c.1)
    }
    /// The hook's line giving up (`abupdate: <cause> (... exit N); starting /init rescue`),
    /// when /init's rescue (INITRAMFS-RESCUE, poweroff) ran.
    fn rescue(&self) -> Option<String> {
        self.lines().any(|l| l == "INITRAMFS-RESCUE").then(|| {
            self.lines()
                .find(|l| l.contains("; starting /init rescue"))
                .unwrap_or("(no hook line)")
                .to_string()
        })
    }
    /// `BOOTED <slot> <version> <good|bad|error>`.
    fn booted(&self) -> Option<(String, String, String)> {
        self.field_line("BOOTED")
            .map(|w| (w[0].clone(), w[1].clone(), w[2].clone()))
    }
    fn installed(&self) -> Option<i32> {
        self.field_line("INSTALLED").map(|w| w[0].parse().unwrap())
    }
    fn panicked(&self) -> bool {
        self.log.contains("Kernel panic")
    }
    fn noboot(&self) -> bool {
        self.lines()
            .any(|l| l.contains("abupdate: no bootable slot on"))
    }
    /// One word for the boot sequence printout: `ROOT-A v1 good`, `ROOT-B panic`, ...
    fn summary(&self) -> String {
        if let Some((slot, version, health)) = self.booted() {
            let mut s = format!("{slot} v{version} {health}");
            if let Some(rc) = self.installed() {
                s.push_str(&format!(" +install rc={rc}"));
            } else if self.killed && self.log.contains("INSTALL-START") {
                s.push_str(" +install (killed)");
            } else if self.killed {
                s.push_str(" (killed)");
            }
            s
        } else if self.noboot() {
            "NOBOOT".into()
        } else if self.rescue().is_some() {
            "RESCUE".into()
        } else if let Some(slot) = self.hook_slot() {
            let v = self.hook_version().unwrap_or_default();
            if self.panicked() {
                format!("{slot} v{v} panic")
            } else if self.killed {
                format!("{slot} v{v} (killed)")
            } else {
                format!("{slot} v{v} ???")
            }
        } else if self.killed {
            "(killed before the hook)".into()
        } else {
            "???".into()
        }
    }
    fn explain(&self) -> String {
        format!("serial log {}:\n{}", self.log_path.display(), self.log)
    }
}

#[derive(Default)]
struct RunOpts<'a> {
    bundle: Option<&'a Path>,
    append: Option<&'a str>,
    /// run-vm's --timeout (default 180 s).
    timeout_s: Option<u64>,
}

/// Boots `disk` once and waits for the VM to end (poweroff, panic or timeout).
fn boot(dir: &Path, name: &str, disk: &Path, opts: &RunOpts) -> Boot {
    let log_path = dir.join(format!("{name}.log"));
    let mut cmd = vm_command(disk, &log_path, opts);
    let out = cmd.output().expect("run-vm");
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let b = Boot {
        log,
        log_path: log_path.clone(),
        killed: false,
    };
    assert!(
        out.status.success(),
        "run-vm {name} exited {}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.explain()
    );
    b
}

fn vm_command(disk: &Path, log: &Path, opts: &RunOpts) -> Command {
    let mut cmd = Command::new(script("run-vm"));
    cmd.env("ABUPDATE_QEMU_DIR", qemu_dir())
        .arg(disk)
        .args(opts.bundle)
        .arg("--log")
        .arg(log)
        .arg("--timeout")
        .arg(opts.timeout_s.unwrap_or(180).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = opts.append {
        cmd.args(["--append", a]);
    }
    cmd
}

/// A boot sequence with its printout.
struct Sequence {
    name: String,
    dir: PathBuf,
    disk: PathBuf,
    boots: Vec<String>,
    n: usize,
    started: Instant,
}

impl Sequence {
    fn new(name: &str, from: &Path) -> Sequence {
        let dir = test_dir(name);
        let disk = dir.join("disk.img");
        copy_disk(from, &disk);
        Sequence {
            name: name.to_string(),
            dir,
            disk,
            boots: Vec::new(),
            n: 0,
            started: Instant::now(),
        }
    }

    fn boot(&mut self, opts: &RunOpts) -> Boot {
        self.n += 1;
        let t = Instant::now();
        let b = boot(&self.dir, &format!("boot{:02}", self.n), &self.disk, opts);
        let (a, bb) = slot_attrs(&self.disk);
        let (va, vb) = slot_versions(&self.disk);
        let line = format!(
            "{}: boot {} {:>5.1}s  {:<28} after: ROOT-A v{va} {a}, ROOT-B v{vb} {bb}",
            self.name,
            self.n,
            t.elapsed().as_secs_f64(),
            b.summary()
        );
        say(&line);
        self.boots.push(b.summary());
        b
    }

    fn finish(&self) {
        say(&format!(
            "{}: booted {} in {:.1}s",
            self.name,
            self.boots.join(" -> "),
            self.started.elapsed().as_secs_f64()
        ));
    }
}

fn assert_booted(b: &Boot, slot: &str, version: &str, health: &str) {
    assert_eq!(
        b.booted(),
        Some((slot.to_string(), version.to_string(), health.to_string())),
        "expected BOOTED {slot} {version} {health}; {}",
        b.explain()
    );
    assert_eq!(b.hook_slot().as_deref(), Some(slot), "{}", b.explain());
    assert_eq!(
        b.hook_version().as_deref(),
        Some(version),
        "the boot hook must read the version from the slot record; {}",
        b.explain()
    );
}

// ------------------------------------------------------------------------------ scenarios

/// Scenario 1: a fresh disk boots ROOT-A v1 and the health commit keeps it good.
#[test]
fn qemu_1_fresh_disk_boots_root_a() {
    require_qemu!();
    let a = assets();
    let mut s = Sequence::new("qemu_1_fresh", &a.disk_v1);
    let l = Layout::read(&s.disk);
    let before = attrs(&s.disk, l.a);
    assert_eq!(before.successful, 1, "disk init must leave ROOT-A good");

    let b = s.boot(&RunOpts::default());
    assert_booted(&b, "ROOT-A", "1", "good");
    let (ra, rb) = slot_attrs(&s.disk);
    assert_eq!(
        (ra.successful, ra.tries),
        (1, 0),
        "ROOT-A after commit: {ra}"
    );
    assert!(
        ra.priority > rb.priority,
        "ROOT-A must stay first: A {ra}, B {rb}"
    );
    assert_eq!(rb.successful, 0, "ROOT-B is empty: {rb}");
    sgdisk_verify(&s.disk).expect("sgdisk -v");
    s.finish();
}

/// Scenario 2's result, shared with scenarios 3 and 4: v2 installed from inside the guest
/// and committed on ROOT-B, v1 still good on ROOT-A.
static DISK_V2: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn disk_v2() -> &'static Path {
    let made = DISK_V2.get_or_init(|| {
        std::panic::catch_unwind(install_v2).map_err(|e| panic_message(e.as_ref()))
    });
    match made {
        Ok(p) => p,
        Err(e) => panic!("scenario 2 (the v2 disk other scenarios start from) failed:\n{e}"),
    }
}

fn install_v2() -> PathBuf {
    {
        let a = assets();
        let mut s = Sequence::new("qemu_2_install_v2", &a.disk_v1);
        let l = Layout::read(&s.disk);

        let b = s.boot(&RunOpts {
            bundle: Some(&a.bundle_v2),
            ..Default::default()
        });
        assert_booted(&b, "ROOT-A", "1", "good");
        assert_eq!(b.installed(), Some(0), "install v2 failed; {}", b.explain());
        let (ra, rb) = slot_attrs(&s.disk);
        assert_eq!(rb.successful, 0, "new slot not yet proven: {rb}");
        assert!(rb.tries > 0, "new slot needs tries: {rb}");
        assert!(
            rb.priority > ra.priority,
            "new slot must boot next: A {ra}, B {rb}"
        );
        assert_eq!(
            (ra.successful, ra.tries),
            (1, 0),
            "old slot untouched: {ra}"
        );
        sgdisk_verify(&s.disk).expect("sgdisk -v after install");

        let b = s.boot(&RunOpts::default());
        assert_booted(&b, "ROOT-B", "2", "good");
        let (ra2, rb2) = slot_attrs(&s.disk);
        assert_eq!(
            (rb2.successful, rb2.tries),
            (1, 0),
            "ROOT-B after commit: {rb2}"
        );
        assert!(
            rb2.priority > ra2.priority,
            "ROOT-B must stay first: A {ra2}, B {rb2}"
        );
        assert_eq!(ra2, ra, "ROOT-A (fallback) untouched");
        sgdisk_verify(&s.disk).expect("sgdisk -v after commit");
        assert_eq!(
            sha256_of_slot(&s.disk, l.a),
            sha256_of_slot(&a.disk_v1, l.a),
            "ROOT-A contents changed"
        );

        // The state is stable: another boot is ROOT-B again and writes nothing new.
        let b = s.boot(&RunOpts::default());
        assert_booted(&b, "ROOT-B", "2", "good");
        assert_eq!(
            slot_attrs(&s.disk),
            (ra2, rb2),
            "a good boot must not change attributes"
        );
        s.finish();
        s.disk.clone()
    }
}

/// Scenario 2: in-guest install of v2, reboot into ROOT-B v2, committed good.
#[test]
fn qemu_2_install_v2_boots_root_b() {
    require_qemu!();
    disk_v2();
}

/// Scenario 3: v3 whose health check fails is marked bad on its first boot; the next boot
/// is v2 again.
#[test]
fn qemu_3_failing_check_rolls_back() {
    require_qemu!();
    let a = assets();
    let mut s = Sequence::new("qemu_3_failing_check", disk_v2());
    let l = Layout::read(&s.disk);
    let b_before = attrs(&s.disk, l.b);
    let b_hash = sha256_of_slot(&s.disk, l.b);

    // An adaptive install, running from ROOT-B: the chunks v3 shares with v2 (busybox, the
    // abupdate binary) are copied from ROOT-B, read through a read-only handle on /dev/vda.
    let b = s.boot(&RunOpts {
        bundle: Some(&a.bundle_v3_failing),
        append: Some("abupdate.adaptive=1"),
        ..Default::default()
    });
    assert_booted(&b, "ROOT-B", "2", "good");
    assert_eq!(b.installed(), Some(0), "install v3 failed; {}", b.explain());
    let plan: serde_json::Value = b
        .lines()
        .find(|l| l.contains(r#""event":"adaptive-plan""#))
        .and_then(|l| serde_json::from_str(&l[l.find('{').unwrap_or(0)..]).ok())
        .unwrap_or_else(|| panic!("no adaptive-plan event; {}", b.explain()));
    let (reused, chunks) = (
        plan["reused_chunks"].as_u64().unwrap_or(0),
        plan["chunks"].as_u64().unwrap_or(0),
    );
    assert_eq!(plan["running"], "ROOT-B", "{plan}");
    assert!(
        chunks > 0 && reused * 2 > chunks,
        "most of v3 should come from ROOT-B: {plan}"
    );
    say(&format!(
        "qemu_3: adaptive install copied {reused} of {chunks} chunks from ROOT-B"
    ));
    let ra = attrs(&s.disk, l.a);
    assert!(
        ra.tries > 0 && ra.successful == 0,
        "ROOT-A staged for trial: {ra}"
    );

    let b = s.boot(&RunOpts::default());
    assert_booted(&b, "ROOT-A", "3", "bad");
    let (ra, rb) = slot_attrs(&s.disk);
    assert_eq!(
        (ra.priority, ra.tries, ra.successful),
        (0, 0, 0),
        "bad slot must be P0 T0 S0: {ra}"
    );
    assert_eq!(rb, b_before, "ROOT-B (v2) untouched");
    sgdisk_verify(&s.disk).expect("sgdisk -v");

    let b = s.boot(&RunOpts::default());
    assert_booted(&b, "ROOT-B", "2", "good");
    assert_eq!(attrs(&s.disk, l.b), b_before);
    assert_eq!(
        sha256_of_slot(&s.disk, l.b),
        b_hash,
        "ROOT-B contents changed"
    );
    s.finish();
}

/// Scenario 4: v3 whose /sbin/init dies panics the kernel on every try; once its tries are
/// spent the machine comes back on v2, untouched.
#[test]
fn qemu_4_broken_init_falls_back_after_tries() {
    require_qemu!();
    let a = assets();
    let mut s = Sequence::new("qemu_4_broken_init", disk_v2());
    let l = Layout::read(&s.disk);
    let b_before = attrs(&s.disk, l.b);
    let b_hash = sha256_of_slot(&s.disk, l.b);

    let b = s.boot(&RunOpts {
        bundle: Some(&a.bundle_v3_broken),
        ..Default::default()
    });
    assert_booted(&b, "ROOT-B", "2", "good");
    assert_eq!(b.installed(), Some(0), "install v3 failed; {}", b.explain());
    let staged = attrs(&s.disk, l.a);
    assert!(
        staged.tries > 0 && staged.successful == 0,
        "ROOT-A staged for trial: {staged}"
    );
    let tries = staged.tries as usize;
    say(&format!("{}: ROOT-A staged with {staged}", s.name));

    // Each try boots ROOT-A and panics; cgptlib spends the last try on a boot of that slot
    // too (tries 1 -> P0 T0), so exactly `tries` panicking boots come first.
    for i in 1..=tries {
        let b = s.boot(&RunOpts::default());
        assert_eq!(
            b.hook_slot().as_deref(),
            Some("ROOT-A"),
            "try {i}; {}",
            b.explain()
        );
        assert!(
            b.panicked() && b.booted().is_none(),
            "try {i} should panic; {}",
            b.explain()
        );
        let ra = attrs(&s.disk, l.a);
        assert_eq!(ra.tries as usize, tries - i, "tries after try {i}: {ra}");
        assert_eq!(
            attrs(&s.disk, l.b),
            b_before,
            "ROOT-B untouched during try {i}"
        );
    }
    let ra = attrs(&s.disk, l.a);
    assert_eq!(
        (ra.priority, ra.tries, ra.successful),
        (0, 0, 0),
        "spent slot: {ra}"
    );

    let b = s.boot(&RunOpts::default());
    assert_booted(&b, "ROOT-B", "2", "good");
    assert_eq!(attrs(&s.disk, l.b), b_before, "ROOT-B attributes untouched");
    assert_eq!(
        sha256_of_slot(&s.disk, l.b),
        b_hash,
        "ROOT-B contents untouched"
    );
    sgdisk_verify(&s.disk).expect("sgdisk -v");
    s.finish();
}

// ------------------------------------------------------------------------------ power cut

/// One guest write request as QEMU's `virtio_blk_handle_write` trace shows it, and whether
/// `virtio_blk_rw_complete` reported it done.
#[derive(Debug, Clone)]
struct GuestWrite {
    req: String,
    sector: u64,
    nsectors: u64,
    done: bool,
}

fn parse_trace(text: &str) -> Vec<GuestWrite> {
    let mut writes: Vec<GuestWrite> = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let val = |key: &str| {
            w.iter()
                .position(|x| *x == key)
                .and_then(|i| w.get(i + 1))
                .copied()
        };
        if line.contains("virtio_blk_handle_write") {
            if let (Some(req), Some(sector), Some(n)) = (val("req"), val("sector"), val("nsectors"))
            {
                writes.push(GuestWrite {
                    req: req.to_string(),
                    sector: sector.parse().unwrap_or(0),
                    nsectors: n.parse().unwrap_or(0),
                    done: false,
                });
            }
        } else if line.contains("virtio_blk_rw_complete") {
            if let Some(req) = val("req") {
                // Request structs are reused: complete the latest write with this address.
                if let Some(wr) = writes.iter_mut().rev().find(|x| x.req == req && !x.done) {
                    wr.done = true;
                }
            }
        }
    }
    writes
}

/// Where to cut the power, counting only writes issued after the serial log showed the
/// run's marker line.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Once `n` writes to GPT sectors have completed.
    GptWritesDone(usize),
    /// Once `n` writes into partition `part` have completed.
    PartWritesDone { part: u32, n: usize },
}

/// A traced run: the boot, every write it made, and how many of them came before the marker.
struct Traced {
    boot: Boot,
    writes: Vec<GuestWrite>,
    boundary: usize,
}

impl Traced {
    fn after_marker(&self) -> &[GuestWrite] {
        &self.writes[self.boundary.min(self.writes.len())..]
    }
}

/// Runs a VM with write tracing and throttled writes, and SIGKILLs QEMU at `cut` (or lets it
/// finish when there is no cut or it never comes). `marker` ("" = from the start) is the
/// serial line after which writes count.
fn boot_and_cut(
    dir: &Path,
    name: &str,
    disk: &Path,
    layout: &Layout,
    opts: &RunOpts,
    marker: &str,
    cut: Option<Cut>,
) -> Traced {
    let log_path = dir.join(format!("{name}.log"));
    let trace = dir.join(format!("{name}.trace"));
    let pidfile = dir.join(format!("{name}.pid"));
    let _ = fs::remove_file(&pidfile);
    let _ = fs::remove_file(&trace);
    let mut cmd = vm_command(disk, &log_path, opts);
    // 5 write requests/s. QEMU's leaky bucket (no iops-max) admits a request while its
    // level is <= iops/10, and each request adds 1: at 5/s a write that follows another waits
    // >= 100 ms even after an idle spell (at 10/s two could pass back to back), time enough
    // to kill between two writes after seeing the first complete (we poll every 5 ms).
    cmd.arg("--trace-writes")
        .arg(&trace)
        .args(["--throttle-iops", "5"])
        .arg("--pidfile")
        .arg(&pidfile);
    let mut child: Child = cmd.spawn().expect("run-vm");
    let started = Instant::now();
    let mut killed = false;
    let mut boundary: Option<usize> = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{name}: VM did not end"
        );
        if killed {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if boundary.is_none()
            && fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains(marker)
        {
            // Writes beyond the trace length when the marker is first seen come after it (the
            // guest prints the marker before it starts the command).
            boundary = Some(parse_trace(&fs::read_to_string(&trace).unwrap_or_default()).len());
        }
        if let (Some(cut), Some(bound)) = (cut, boundary) {
            let writes = parse_trace(&fs::read_to_string(&trace).unwrap_or_default());
            let after = &writes[bound.min(writes.len())..];
            let hit = match cut {
                Cut::GptWritesDone(n) => {
                    after
                        .iter()
                        .filter(|w| w.done && layout.is_gpt_write(w))
                        .count()
                        >= n
                }
                Cut::PartWritesDone { part, n } => {
                    after
                        .iter()
                        .filter(|w| w.done && layout.in_part(part, w))
                        .count()
                        >= n
                }
            };
            if hit {
                // QEMU's own PID (from its -pidfile), signalled directly: no kill(1) needed.
                if let Some(pid) = fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
                    .filter(|&p| p > 1)
                {
                    // SAFETY: kill(2) with a PID and a signal number has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let writes = parse_trace(&fs::read_to_string(&trace).unwrap_or_default());
    Traced {
        boot: Boot {
            log,
            log_path,
            killed,
        },
        boundary: boundary.unwrap_or(writes.len()),
        writes,
    }
}

/// After a power cut: the disk must still have a valid GPT copy, the next boot must come up
/// good on one of the slot/version pairs in `ok` (the old system, or the new one if the cut
/// came late enough) with that slot's record naming the version that booted, and right after
/// that recovery boot `sgdisk -v` must find no problem at all. Right after the cut the two
/// GPT copies may legitimately disagree (a cut between the primary and the backup write:
/// sgdisk then reports a bad backup CRC); that is printed, and the recovery boot's writers
/// (boot hook, commit) must have repaired it.
fn check_after_cut(s: &mut Sequence, what: &str, ok: &[(&str, &str)]) {
    let pre = sgdisk_verify(&s.disk);
    let st = status_json(&assets().abupdate, &s.disk);
    let copies = st["gpt"].as_array().cloned().unwrap_or_default();
    assert!(
        copies.iter().any(|c| c["valid"] == true),
        "{what}: right after the cut no GPT copy is valid: {st}"
    );
    let b = s.boot(&RunOpts::default());
    let good = b.booted().is_some_and(|(slot, version, health)| {
        health == "good" && ok.iter().any(|(s, v)| *s == slot && *v == version)
    });
    assert!(
        good,
        "{what}: after the cut the next boot must be one of {ok:?}, good; {}",
        b.explain()
    );
    let (slot, version, _) = b.booted().unwrap();
    let (va, vb) = slot_versions(&s.disk);
    let recorded = if slot == "ROOT-A" { va } else { vb };
    assert_eq!(
        recorded, version,
        "{what}: {slot}'s slot record must name the version that booted"
    );
    let post = sgdisk_verify(&s.disk);
    if let Err(report) = &pre {
        let copy_state: Vec<String> = copies
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["copy"].as_str().unwrap_or("?"),
                    c["problem"].as_str().unwrap_or("ok")
                )
            })
            .collect();
        let first = report
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("Caution: The CRC") || l.starts_with("Problem:"))
            .unwrap_or("problems found");
        say(&format!(
            "{}: {what}: torn GPT pair right after the cut (sgdisk -v: {first:?}; abupdate: {}); after the recovery boot: {}",
            s.name,
            copy_state.join(", "),
            if post.is_ok() { "clean" } else { "STILL BROKEN" }
        ));
    }
    if let Err(report) = post {
        panic!("{what}: sgdisk -v after the recovery boot:\n{report}");
    }
}

/// One power-cut case.
struct CutCase {
    what: String,
    /// Disk to start from.
    from: PathBuf,
    bundle: Option<PathBuf>,
    /// Serial line after which writes count ("" = from power-on).
    marker: &'static str,
    cut: Cut,
    /// Acceptable (slot, version) of the recovery boot.
    ok: &'static [(&'static str, &'static str)],
}

/// Scenario 5: cut the power (SIGKILL QEMU) at every GPT write and in the middle of the
/// image write of (a) an install of v2 on a fresh v1 disk, (b) the first boot of v2 (the hook
/// spends a try, the commit marks it good), (c) an install of v3 over the old slot of a
/// committed v2 disk (the fallback slot is invalidated first). Every time the next boot must
/// be a good slot with consistent contents and the GPT must verify.
#[test]
fn qemu_5_power_cut() {
    require_qemu!();
    let a = assets();
    let name = "qemu_5_power_cut";
    let dir = test_dir(name);
    let layout = Layout::read(&a.disk_v1);
    let started = Instant::now();
    let gpt = |w: &[GuestWrite]| {
        w.iter()
            .filter(|w| layout.is_gpt_write(w))
            .map(|w| (w.sector, w.nsectors))
            .collect::<Vec<_>>()
    };
    let into = |part: u32, w: &[GuestWrite]| w.iter().filter(|w| layout.in_part(part, w)).count();

    // Calibration: uncut, traced runs, to learn which writes each phase makes.
    let v1_installed = dir.join("v1-installed.img");
    copy_disk(&a.disk_v1, &v1_installed);
    let t = boot_and_cut(
        &dir,
        "calibrate-a",
        &v1_installed,
        &layout,
        &RunOpts {
            bundle: Some(&a.bundle_v2),
            ..Default::default()
        },
        "INSTALL-START",
        None,
    );
    assert_eq!(t.boot.installed(), Some(0), "{}", t.boot.explain());
    let a_gpt = gpt(t.after_marker());
    let a_img = into(layout.b, t.after_marker());
    say(&format!(
        "{name}: (a) install v2: GPT writes (sector, count) {a_gpt:?}, {a_img} writes into ROOT-B"
    ));

    let scratch = dir.join("calibrate-b.img");
    copy_disk(&v1_installed, &scratch);
    let t = boot_and_cut(
        &dir,
        "calibrate-b",
        &scratch,
        &layout,
        &RunOpts::default(),
        "",
        None,
    );
    assert_booted(&t.boot, "ROOT-B", "2", "good");
    let b_gpt = gpt(t.after_marker());
    say(&format!(
        "{name}: (b) first boot of v2: GPT writes {b_gpt:?}"
    ));

    let scratch = dir.join("calibrate-c.img");
    copy_disk(disk_v2(), &scratch);
    let t = boot_and_cut(
        &dir,
        "calibrate-c",
        &scratch,
        &layout,
        &RunOpts {
            bundle: Some(&a.bundle_v3),
            ..Default::default()
        },
        "INSTALL-START",
        None,
    );
    assert_eq!(t.boot.installed(), Some(0), "{}", t.boot.explain());
    let c_gpt = gpt(t.after_marker());
    let c_img = into(layout.a, t.after_marker());
    say(&format!(
        "{name}: (c) install v3 over ROOT-A: GPT writes {c_gpt:?}, {c_img} writes into ROOT-A"
    ));

    const A1_B2: &[(&str, &str)] = &[("ROOT-A", "1"), ("ROOT-B", "2")];
    const B2_A3: &[(&str, &str)] = &[("ROOT-B", "2"), ("ROOT-A", "3")];
    let mut cases = Vec::new();
    for n in [a_img / 4, a_img * 3 / 4] {
        cases.push(CutCase {
            what: format!("(a) image write {}/{a_img}", n.max(1)),
            from: a.disk_v1.clone(),
            bundle: Some(a.bundle_v2.clone()),
            marker: "INSTALL-START",
            cut: Cut::PartWritesDone {
                part: layout.b,
                n: n.max(1),
            },
            ok: A1_B2,
        });
    }
    for n in spread(a_gpt.len(), 8) {
        cases.push(CutCase {
            what: format!("(a) install GPT write {n}/{}", a_gpt.len()),
            from: a.disk_v1.clone(),
            bundle: Some(a.bundle_v2.clone()),
            marker: "INSTALL-START",
            cut: Cut::GptWritesDone(n),
            ok: A1_B2,
        });
    }
    for n in spread(b_gpt.len(), 8) {
        cases.push(CutCase {
            what: format!("(b) first-boot GPT write {n}/{}", b_gpt.len()),
            from: v1_installed.clone(),
            bundle: None,
            marker: "",
            cut: Cut::GptWritesDone(n),
            ok: A1_B2,
        });
    }
    cases.push(CutCase {
        what: format!("(c) image write {}/{c_img}", (c_img / 2).max(1)),
        from: disk_v2().to_path_buf(),
        bundle: Some(a.bundle_v3.clone()),
        marker: "INSTALL-START",
        cut: Cut::PartWritesDone {
            part: layout.a,
            n: (c_img / 2).max(1),
        },
        ok: B2_A3,
    });
    for n in spread(c_gpt.len(), 8) {
        cases.push(CutCase {
            what: format!("(c) install GPT write {n}/{}", c_gpt.len()),
            from: disk_v2().to_path_buf(),
            bundle: Some(a.bundle_v3.clone()),
            marker: "INSTALL-START",
            cut: Cut::GptWritesDone(n),
            ok: B2_A3,
        });
    }

    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut s = Sequence::new(&format!("{name}/cut{:02}", i + 1), &case.from);
        let opts = RunOpts {
            bundle: case.bundle.as_deref(),
            ..Default::default()
        };
        let t = boot_and_cut(
            &s.dir,
            "cut",
            &s.disk,
            &layout,
            &opts,
            case.marker,
            Some(case.cut),
        );
        let what = &case.what;
        assert!(
            t.boot.killed,
            "{what}: the cut point never came; {}",
            t.boot.explain()
        );
        // Where the cut really landed: writes that completed after the marker. With the
        // throttle this equals the target unless the host stalled the poll loop for >100 ms;
        // the case is still a valid cut, just at a later write.
        let landed = match case.cut {
            Cut::GptWritesDone(_) => {
                let n = t
                    .after_marker()
                    .iter()
                    .filter(|w| w.done && layout.is_gpt_write(w))
                    .count();
                format!("{n} GPT writes done")
            }
            Cut::PartWritesDone { part, .. } => {
                let n = t
                    .after_marker()
                    .iter()
                    .filter(|w| w.done && layout.in_part(part, w))
                    .count();
                format!("{n} slot writes done")
            }
        };
        say(&format!(
            "{}: power cut at {what} ({landed}), during: {}",
            s.name,
            t.boot.summary()
        ));
        s.boots.push(format!("CUT({what})"));
        // Check every case before failing, so one run shows all the bad cut points.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_after_cut(&mut s, what, case.ok)
        }));
        s.finish();
        match outcome {
            // Passed: drop this case's disk (the failing ones stay for a look).
            Ok(()) => drop(fs::remove_file(&s.disk)),
            Err(e) => failures.push(format!(
                "{}: {}",
                s.name,
                e.downcast_ref::<String>()
                    .map(String::as_str)
                    .unwrap_or("panic")
            )),
        }
    }
    say(&format!(
        "{name}: {} cuts, {} failed, in {:.1}s",
        cases.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    ));
    assert!(
        failures.is_empty(),
        "power-cut failures:\n{}",
        failures.join("\n")
    );
}

/// Up to `max` distinct values spread over 1..=n.
fn spread(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (1..=n).collect();
    }
    let mut v: Vec<usize> = (0..max).map(|i| 1 + i * (n - 1) / (max - 1)).collect();
    v.dedup();
    v
}
