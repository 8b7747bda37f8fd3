//! `abupdate install` end to end on real disk images and a loop device, read back with
//! sgdisk and cgpt; and every bad bundle refused with the running slot untouched.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
    running_hash: String,
}

/// A disk from `disk init` with a v1 image written into ROOT-A (as an image builder would).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let disk = d.join("disk.img").display().to_string();
    abupdate_ok(&["disk", "init", &disk, "--slot-size", "8M"]);
    let (a_off, a_len) = partition_range(&disk, 1);
    let v1 = d.join("v1.img");
    make_image(&v1, a_len as usize, 1);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[a_off as usize..(a_off + a_len) as usize].copy_from_slice(&std::fs::read(&v1).unwrap());
    std::fs::write(&disk, bytes).unwrap();
    let running_hash = sha256_range(Path::new(&disk), a_off, a_len);
    Setup {
        _dir: dir,
        dir: d,
        disk,
        running_hash,
    }
}

fn install(s: &Setup, bundle: &Path, extra: &[&str]) -> std::process::Output {
    install_on(&s.disk, bundle, extra)
}

/// `abupdate install BUNDLE --disk DISK` with the test key, compatible `test-board`, no
/// sentinel, and `extra`.
fn install_on(disk: &str, bundle: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = install_args(bundle.to_str().unwrap(), disk);
    args.extend(extra.iter().map(|a| a.to_string()));
    abupdate(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A v2 image and its good bundle, one too large for the slot, and one for another board:
/// (image, good, too large, other board).
fn good_and_policy_refused_bundles(s: &Setup) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let image = s.dir.join("v2.img");
    make_image(&image, 2 * 1024 * 1024 + 100, 4);
    let good = s.dir.join("good.abup");
    make_bundle(&image, "2.0", "test-board", &good);
    let big_image = s.dir.join("big.img");
    make_image(&big_image, 8 * 1024 * 1024, 5);
    let too_large = s.dir.join("big.abup");
    make_bundle(&big_image, "2.0", "test-board", &too_large);
    let other_board = s.dir.join("other.abup");
    make_bundle(&image, "2.0", "other-board", &other_board);
    (image, good, too_large, other_board)
}

fn assert_running_slot_intact(s: &Setup) {
    let (a_off, a_len) = partition_range(&s.disk, 1);
    assert_eq!(
        sha256_range(Path::new(&s.disk), a_off, a_len),
        s.running_hash,
        "running slot changed"
    );
    assert_eq!(cgpt_fields(&s.disk, 1), (2, 0, true));
    assert_sgdisk_clean(&s.disk);
}

#[test]
fn installs_v2_into_the_inactive_slot() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let image = s.dir.join("v2.img");
    make_image(&image, 5 * 1024 * 1024 + 12345, 2);
    let bundle = s.dir.join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle);
    let sentinel = s.dir.join("run/reboot-required");
    let out = abupdate(&[
        "install",
        bundle.to_str().unwrap(),
        "--disk",
        &s.disk,
        "--keyring",
        test_pubkey().to_str().unwrap(),
        "--compatible",
        "test-board",
        "--sentinel",
        sentinel.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"verified"));
    assert!(
        kinds.contains(&"readback-verified") && kinds.contains(&"activated"),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"done"));

    // Target content equals the image; attributes as specified; A untouched.
    let (b_off, _) = partition_range(&s.disk, 2);
    let img_len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(
        sha256_range(Path::new(&s.disk), b_off, img_len),
        sha256_file(&image)
    );
    assert_eq!(cgpt_fields(&s.disk, 2), (3, 3, false));
    assert_running_slot_intact(&s);
    let status = status_json(&s.disk, &[]);
    assert_eq!(status["next_boot"], "ROOT-B");
    assert_eq!(status["slots"][1]["version"], "2.0");
    assert!(std::fs::read_to_string(&sentinel).unwrap().contains("2.0"));
}

#[test]
fn installs_from_stdin_with_custom_tries() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let image = s.dir.join("v2.img");
    make_image(&image, 3 * 1024 * 1024, 3);
    let bundle = s.dir.join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle);
    let out = Command::new(bin())
        .args([
            "install",
            "-",
            "--disk",
            &s.disk,
            "--keyring",
            test_pubkey().to_str().unwrap(),
            "--compatible",
            "test-board",
            "--no-sentinel",
            "--tries",
            "6",
        ])
        .stdin(Stdio::from(std::fs::File::open(&bundle).unwrap()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cgpt_fields(&s.disk, 2), (3, 6, false));
    assert_running_slot_intact(&s);
}

/// Every bad bundle: non-zero exit with the documented code, one clear line, the running slot
/// untouched and still the one that boots next.
#[test]
fn bad_bundles_are_refused_and_the_running_slot_still_boots() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let (image, good, too_large, other_board) = good_and_policy_refused_bundles(&s);
    let good_bytes = std::fs::read(&good).unwrap();
    let header_len = {
        let info = bundle_info(&good);
        info["header_len"].as_u64().unwrap() as usize
    };
    let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good_bytes.clone();
        f(&mut b);
        let p = s.dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let bad_signature = variant("badsig.abup", &|b| b[header_len - 10] ^= 0x01);
    let corrupt_chunk = variant("corrupt.abup", &|b| {
        let mid = header_len + (b.len() - header_len) / 2;
        b[mid] ^= 0xFF;
    });
    let truncated = variant("truncated.abup", &|b| {
        b.truncate(header_len + (b.len() - header_len) * 2 / 3)
    });
    let other_key_dir = s.dir.join("otherkeys");
    std::fs::create_dir(&other_key_dir).unwrap();
    let k = other_key_dir.join("other");
    abupdate_ok(&["keygen", "--out", k.to_str().unwrap()]);
    let wrong_key = s.dir.join("wrongkey.abup");
    abupdate_ok(&[
        "bundle",
        "create",
        "--image",
        image.to_str().unwrap(),
        "--key",
        other_key_dir.join("other.key").to_str().unwrap(),
        "--version",
        "2.0",
        "--compatible",
        "test-board",
        "--out",
        wrong_key.to_str().unwrap(),
    ]);

    let cases: Vec<(&Path, i32, &str)> = vec![
        (&bad_signature, 3, "signature"),
        (&corrupt_chunk, 3, "chunk"),
        (&truncated, 3, "truncated"),
        (&too_large, 3, "does not fit slot ROOT-B"),
        (&other_board, 8, "other-board"),
        (&wrong_key, 3, "key"),
        (Path::new("/nonexistent/bundle"), 3, "No such file"),
    ];
    for (bundle, code, needle) in cases {
        let out = install(&s, bundle, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error_lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("abupdate: error"))
            .collect();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}: {stderr}",
            bundle.display()
        );
        assert_eq!(error_lines.len(), 1, "{}: {stderr}", bundle.display());
        assert!(
            error_lines[0]
                .to_lowercase()
                .contains(&needle.to_lowercase()),
            "{}: {stderr}",
            bundle.display()
        );
        assert_running_slot_intact(&s);
        let status = status_json(&s.disk, &[]);
        assert_eq!(status["next_boot"], "ROOT-A", "{}", bundle.display());
        // The target is never left bootable by a failed install.
        assert!(
            !status["slots"][1]["bootable"].as_bool().unwrap(),
            "{}",
            bundle.display()
        );
    }
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let image = s.dir.join("v.img");
    make_image(&image, 1024 * 1024, 6);
    let v3 = s.dir.join("v3.abup");
    make_bundle(&image, "3.0", "test-board", &v3);
    let v2 = s.dir.join("v2.abup");
    make_bundle(&image, "2.10", "test-board", &v2);
    let out = install(&s, &v3, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Pretend ROOT-B booted and committed: it is now the running slot with version 3.0.
    abupdate_ok(&["mark-good", "--disk", &s.disk, "--slot", "B"]);
    let (b_off, b_len) = partition_range(&s.disk, 2);
    let b_hash = sha256_range(Path::new(&s.disk), b_off, b_len);
    let out = install(&s, &v2, &["--running", "B"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("older than running version 3.0"));
    assert_eq!(sha256_range(Path::new(&s.disk), b_off, b_len), b_hash);
    assert_eq!(status_json(&s.disk, &[])["next_boot"], "ROOT-B");
    // Allowed explicitly, it goes into A.
    let out = install(&s, &v2, &["--running", "B", "--allow-downgrade"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = status_json(&s.disk, &[]);
    assert_eq!(status["next_boot"], "ROOT-A");
    assert_eq!(status["slots"][0]["version"], "2.10");
    assert_eq!(sha256_range(Path::new(&s.disk), b_off, b_len), b_hash);
}

/// The same install on a loop device: the target partition's own node is written.
#[test]
fn installs_on_a_loop_device_through_the_partition_node() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let s = setup();
    let image = s.dir.join("v2.img");
    make_image(&image, 4 * 1024 * 1024 + 4096, 7);
    let bundle = s.dir.join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle);
    let lo = LoopDevice::attach(Path::new(&s.disk), None);
    lo.wait_partition(1);
    let part2 = lo.wait_partition(2);
    let out = install_on(lo.as_str(), &bundle, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let invalidated: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "target-invalidated")
        .unwrap();
    assert_eq!(invalidated["path"], part2.display().to_string());
    assert_eq!(invalidated["target"], "ROOT-B");
    assert_eq!(cgpt_fields(lo.as_str(), 2), (3, 3, false));
    assert_sgdisk_clean(lo.as_str());
    let img_len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(sha256_range(&part2, 0, img_len), sha256_file(&image));
    drop(lo);
    assert_running_slot_intact(&s);
}

/// On a loop device with 4096-byte logical sectors: the sector size comes from the device,
/// the image lands in ROOT-B's partition node, and cgpt, sgdisk and the boot hook agree.
#[test]
fn installs_on_a_4096_byte_sector_loop_device() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk4k.img");
    abupdate_ok(&[
        "disk",
        "init",
        disk.to_str().unwrap(),
        "--slot-size",
        "8M",
        "--sector-size",
        "4096",
    ]);
    let image = dir.path().join("v2.img");
    make_image(&image, 5 * 1024 * 1024 + 8192, 9);
    let bundle = dir.path().join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle);
    let lo = LoopDevice::attach(&disk, Some(4096));
    let part1 = lo.wait_partition(1);
    let part2 = lo.wait_partition(2);
    let running_before = sha256_file(&part1);
    let out = install_on(lo.as_str(), &bundle, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = status_json(lo.as_str(), &[]);
    assert_eq!(status["sector_size"], 4096);
    assert_eq!(status["next_boot"], "ROOT-B");
    assert_eq!(status["slots"][1]["version"], "2.0", "{status}");
    assert_eq!(cgpt_fields(lo.as_str(), 2), (3, 3, false));
    assert_sgdisk_clean(lo.as_str());
    let img_len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(sha256_range(&part2, 0, img_len), sha256_file(&image));
    assert_eq!(sha256_file(&part1), running_before, "running slot written");
    let boot = abupdate_ok(&["boot", "--disk", lo.as_str(), "--format", "json"]);
    let boot: serde_json::Value = serde_json::from_str(&boot).unwrap();
    assert_eq!(boot["slot"], "ROOT-B", "{boot}");
    assert_eq!(cgpt_fields(lo.as_str(), 2), (3, 2, false));
}

/// SIGTERM mid-install: exit 130, the target left unbootable, the running slot untouched.
#[test]
fn sigterm_stops_cleanly_and_leaves_the_target_unbootable() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let image = s.dir.join("v2.img");
    make_image(&image, 6 * 1024 * 1024, 11);
    let bundle = s.dir.join("v2.abup");
    make_bundle(&image, "2.0", "test-board", &bundle);
    // ROOT-B starts as a good fallback, so "unbootable afterwards" means the install changed it.
    tool_ok(
        "cgpt",
        &["add", "-i", "2", "-P", "1", "-T", "0", "-S", "1", &s.disk],
    );
    let bytes = std::fs::read(&bundle).unwrap();
    let third = bytes.len() / 3;
    let install = PipedInstall::start(&s.disk, &bytes, third);
    // Wait until the target has been invalidated, then signal.
    for _ in 0..500 {
        if cgpt_fields(&s.disk, 2) == (0, 0, false) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        cgpt_fields(&s.disk, 2),
        (0, 0, false),
        "target not invalidated before writing"
    );
    tool_ok("kill", &["-TERM", &install.child.id().to_string()]);
    // More data lets the pipeline reach its next chunk, where it sees the request to stop.
    let out = install.finish(&bytes, third);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted; ROOT-B left unbootable"),
        "{stderr}"
    );
    assert_eq!(cgpt_fields(&s.disk, 2), (0, 0, false));
    assert_running_slot_intact(&s);
    assert_eq!(status_json(&s.disk, &[])["next_boot"], "ROOT-A");
}

/// `--dry-run` runs every check an install makes and writes nothing: a good bundle reports
/// what would happen (exit 0, no sentinel); bad ones fail with the same exit code as a real
/// install. The disk file is byte-for-byte unchanged either way.
#[test]
fn dry_run_checks_everything_and_writes_nothing() {
    if !have_gpt_tools() {
        return;
    }
    let s = setup();
    let (_, good, too_large, other_board) = good_and_policy_refused_bundles(&s);
    let sentinel = s.dir.join("reboot-required");
    let disk_hash = sha256_file(Path::new(&s.disk));

    for (bundle, code) in [(&good, 0), (&too_large, 3), (&other_board, 8)] {
        let mut args = install_args(bundle.to_str().unwrap(), &s.disk);
        // install_args turns the sentinel off; a dry run must not write one either way.
        args.retain(|a| a != "--no-sentinel");
        args.extend(
            [
                "--sentinel",
                sentinel.to_str().unwrap(),
                "--dry-run",
                "--adaptive",
                "--json",
            ]
            .iter()
            .map(|a| a.to_string()),
        );
        let out = abupdate(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}: {stderr}",
            bundle.display()
        );
        if code == 0 {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let done: serde_json::Value =
                serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            assert_eq!(done["action"], "dry-run", "{done}");
            assert_eq!(done["report"]["target"], "ROOT-B", "{done}");
            assert_eq!(done["report"]["dry_run"], true, "{done}");
            assert!(
                done["report"]["adaptive"]["chunks"].as_u64().unwrap() > 0,
                "{done}"
            );
        }
        assert_eq!(
            sha256_file(Path::new(&s.disk)),
            disk_hash,
            "{}: the dry run changed the disk",
            bundle.display()
        );
        assert!(!sentinel.exists(), "a dry run wrote the sentinel");
    }
    assert_running_slot_intact(&s);
}
