//! Shared helpers for the integration tests: running the binary and real tools, hashing
//! files, and loop devices that detach themselves.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

pub mod gpt_edit;
pub mod http_server;
pub mod ovmf;

/// Path of the abupdate binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_abupdate"))
}

/// Runs abupdate with `args`.
pub fn abupdate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run abupdate")
}

/// Runs abupdate and asserts success, returning stdout.
pub fn abupdate_ok(args: &[&str]) -> String {
    let out = abupdate(args);
    assert!(
        out.status.success(),
        "abupdate {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a tool and returns (success, stdout+stderr).
pub fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs a tool, asserting success, returning its stdout trimmed (stderr, where cgpt prints
/// its warnings about a damaged copy, is only shown on failure).
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a facility the test needs is present. Under CI (`CI=true`) a missing facility is a
/// failure, because CI installs everything; elsewhere the test prints why it skips.
pub fn have(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is required under CI but is missing");
    }
    eprintln!("SKIP: {what} is not available on this machine");
    false
}

/// Whether an executable is on PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The tools every interop test needs.
pub fn have_gpt_tools() -> bool {
    have("cgpt (Debian package cgpt)", on_path("cgpt"))
        && have("sgdisk (Debian package gdisk)", on_path("sgdisk"))
}

/// Whether loop devices can be set up (root and /dev/loop-control).
pub fn have_loop() -> bool {
    let root = unsafe_free_is_root();
    have(
        "root and loop devices",
        root && Path::new("/dev/loop-control").exists(),
    )
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// A loop device attached with partition scanning, detached on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// `losetup -P --show -f [--sector-size N] FILE`.
    pub fn attach(file: &Path, sector_size: Option<u32>) -> Self {
        let mut args = vec!["-P".to_string(), "--show".into(), "-f".into()];
        if let Some(ss) = sector_size {
            args.push("--sector-size".into());
            args.push(ss.to_string());
        }
        args.push(file.display().to_string());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let path = PathBuf::from(tool_ok("losetup", &argv));
        // Wait for udev/devtmpfs to create the partition nodes.
        let _ = Command::new("udevadm").args(["settle", "-t", "5"]).status();
        Self { path }
    }

    /// `/dev/loopNpK`.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }

    /// Waits until partition node `n` exists. Kernels built without CONFIG_EFI_PARTITION
    /// (this sandbox's is one) never scan the GPT themselves, so after a short wait the
    /// partitions are registered from user space with `partx -a` (BLKPG ioctls).
    pub fn wait_partition(&self, n: u32) -> PathBuf {
        let p = self.partition(n);
        for attempt in 0..100 {
            if p.exists() {
                return p;
            }
            if attempt == 10 {
                let _ = Command::new("partx").arg("-a").arg(&self.path).status();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} did not appear", p.display());
    }

    /// The path as &str.
    pub fn as_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Parses `abupdate status --json`.
pub fn status_json(disk: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--disk", disk, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&abupdate_ok(&args)).unwrap()
}

/// (priority, tries, successful) of partition `n` as cgpt reads it.
pub fn cgpt_fields(disk: &str, n: u32) -> (u8, u8, bool) {
    let i = n.to_string();
    let get = |flag: &str| {
        tool_ok("cgpt", &["show", "-i", &i, flag, disk])
            .parse::<u8>()
            .unwrap()
    };
    (get("-P"), get("-T"), get("-S") == 1)
}

/// Asserts `sgdisk -v` finds no problems.
pub fn assert_sgdisk_clean(disk: &str) {
    let (ok, text) = tool("sgdisk", &["-v", disk]);
    assert!(
        ok && text.contains("No problems found"),
        "sgdisk -v {disk}: {text}"
    );
}

/// The committed test-only signing key (never use it for real images).
pub fn test_key() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/test-keys/TEST-ONLY-DO-NOT-USE.key")
}

/// The public half of [`test_key`].
pub fn test_pubkey() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/test-keys/TEST-ONLY-DO-NOT-USE.pub")
}

/// Writes a deterministic, half-compressible image of `size` bytes (pseudo-random blocks
/// alternating with runs of a repeated pattern), different for each `seed`.
pub fn make_image(path: &Path, size: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        let block = (size - data.len()).min(4096);
        if (data.len() / 4096) % 2 == 0 {
            for _ in 0..block {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(state as u8);
            }
        } else {
            data.extend(std::iter::repeat_n((seed as u8).wrapping_add(0x41), block));
        }
    }
    std::fs::write(path, data).unwrap();
}

/// Bundles `image` with the test key (256 KiB chunks).
pub fn make_bundle(image: &Path, version: &str, compatible: &str, out: &Path) {
    make_bundle_chunked(image, version, compatible, out, "256K");
}

/// Bundles `image` with the test key and the given chunk size.
pub fn make_bundle_chunked(
    image: &Path,
    version: &str,
    compatible: &str,
    out: &Path,
    chunk_size: &str,
) {
    create_bundle(
        image,
        None,
        &test_key(),
        version,
        compatible,
        out,
        chunk_size,
    );
}

/// Bundles `image` and a `kernel` image (for the slot's KERN partition) with the test key.
pub fn make_kernel_bundle(
    image: &Path,
    kernel: &Path,
    version: &str,
    compatible: &str,
    out: &Path,
    chunk_size: &str,
) {
    let key = test_key();
    create_bundle(
        image,
        Some(kernel),
        &key,
        version,
        compatible,
        out,
        chunk_size,
    );
}

/// `abupdate bundle create` with every choice: an optional kernel, the secret `key`.
pub fn create_bundle(
    image: &Path,
    kernel: Option<&Path>,
    key: &Path,
    version: &str,
    compatible: &str,
    out: &Path,
    chunk_size: &str,
) {
    let mut args = vec![
        "bundle",
        "create",
        "--image",
        image.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--version",
        version,
        "--compatible",
        compatible,
        "--out",
        out.to_str().unwrap(),
        "--chunk-size",
        chunk_size,
    ];
    if let Some(kernel) = kernel {
        args.extend(["--kernel", kernel.to_str().unwrap()]);
    }
    abupdate_ok(&args);
}

/// SHA-256 of `len` bytes at `offset` of a file.
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut f.take(len), &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// (byte offset, byte length) of partition `n` of a disk image, as sgdisk reports it.
pub fn partition_range(disk: &str, n: u32) -> (u64, u64) {
    let text = tool_ok("sgdisk", &["-i", &n.to_string(), disk]);
    let num = |key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {text}"));
        line.split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = num("First sector");
    let last = num("Last sector");
    (first * 512, (last - first + 1) * 512)
}

/// `disk init --seed` in `dir`: `dir/disk.img` (4 MiB slots) with v1.0 (and its slot record)
/// in ROOT-A, the only good slot, and ROOT-B empty; bundles `dir/v1.abup` and `dir/v2.abup`
/// (version 2.0) of two different 1 MiB images. Returns the disk's path.
pub fn seeded_disk(dir: &Path) -> String {
    let disk = dir.join("disk.img").display().to_string();
    for (v, seed) in [("1", 1), ("2", 2)] {
        let image = dir.join(format!("v{v}.img"));
        make_image(&image, 1024 * 1024 + 512, seed);
        make_bundle(
            &image,
            &format!("{v}.0"),
            "test-board",
            &dir.join(format!("v{v}.abup")),
        );
    }
    let key = test_pubkey().display().to_string();
    let v1 = dir.join("v1.abup").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "4M",
        "--seed",
        &v1,
        "--keyring",
        &key,
    ]);
    disk
}

/// Arguments of `abupdate install SOURCE --disk DISK` with the test key, compatible
/// `test-board` and no sentinel: how the tests install.
pub fn install_args(source: &str, disk: &str) -> Vec<String> {
    let key = test_pubkey().display().to_string();
    [
        "install",
        source,
        "--disk",
        disk,
        "--keyring",
        &key,
        "--compatible",
        "test-board",
        "--no-sentinel",
    ]
    .map(String::from)
    .to_vec()
}

/// An `abupdate install -` fed from a pipe the test controls, so it can be held mid-stream.
pub struct PipedInstall {
    /// The running install.
    pub child: std::process::Child,
    /// Its standard input: the bundle bytes not yet sent.
    pub stdin: std::process::ChildStdin,
}

impl PipedInstall {
    /// Starts `abupdate install - --disk DISK` with the test key, compatible `test-board` and
    /// no sentinel, then sends the first `sent` bytes of `bundle`.
    pub fn start(disk: &str, bundle: &[u8], sent: usize) -> PipedInstall {
        use std::io::Write;
        let mut child = Command::new(bin())
            .args(install_args("-", disk))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&bundle[..sent]).unwrap();
        stdin.flush().unwrap();
        PipedInstall { child, stdin }
    }

    /// Waits until the install holds the disk lock.
    pub fn wait_for_lock(&mut self) {
        wait_for_flock(&mut self.child);
    }

    /// Sends the rest of the bundle (from byte `from`; errors ignored, since the install may
    /// already have stopped reading), closes stdin and waits for the exit.
    pub fn finish(mut self, bundle: &[u8], from: usize) -> Output {
        use std::io::Write;
        let _ = self.stdin.write_all(&bundle[from..]);
        drop(self.stdin);
        self.child.wait_with_output().unwrap()
    }
}

/// Waits (up to 20 s) until `child` holds a flock, as /proc/locks shows it. Sleeping a fixed
/// time instead would race with a slow machine; matching any FLOCK line would match another
/// test's lock.
pub fn wait_for_flock(child: &mut std::process::Child) {
    let pid = child.id().to_string();
    for _ in 0..1000 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        // Lines read "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF".
        if locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"FLOCK") && f.get(4) == Some(&pid.as_str())
        }) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pid {pid} exited ({status}) before taking its lock");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("pid {pid} never took its lock");
}

/// `abupdate bundle info BUNDLE --json`, parsed.
pub fn bundle_info(bundle: &Path) -> serde_json::Value {
    serde_json::from_str(&abupdate_ok(&[
        "bundle",
        "info",
        bundle.to_str().unwrap(),
        "--json",
    ]))
    .unwrap()
}
