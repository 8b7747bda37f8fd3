//! The bad-input matrix: every command fed missing files, directories, files it may not
//! open, read-only disks, disks of the wrong size or sector size, corrupt tables, and disks
//! held by another process. Each must give one `abupdate: error:` line, the documented exit
//! code, and leave the disk byte-for-byte unchanged.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
    bundle: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let disk = d.join("disk.img").display().to_string();
    abupdate_ok(&["disk", "init", &disk, "--slot-size", "4M"]);
    let image = d.join("v2.img");
    make_image(&image, 1 << 20, 21);
    let bundle = d.join("v2.abup");
    make_bundle(&image, "2", "test-board", &bundle);
    Fixture {
        _dir: dir,
        dir: d,
        disk,
        bundle,
    }
}

/// Runs abupdate, checks the exit code, the single error line and its content, and that
/// `disk` (when given) did not change.
fn expect_error(args: &[&str], code: i32, needle: &str, disk: Option<&str>) {
    let before = disk.map(|d| sha256_file(Path::new(d)));
    let out = abupdate(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("abupdate: error:"))
        .collect();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: expected one error line: {stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "{args:?}: expected {needle:?} in {}",
        errors[0]
    );
    if let (Some(d), Some(before)) = (disk, before) {
        assert_eq!(
            sha256_file(Path::new(d)),
            before,
            "{args:?} changed the disk"
        );
    }
}

#[test]
fn missing_files_and_directories() {
    if !have_gpt_tools() {
        return;
    }
    let f = fixture();
    let dir = f.dir.to_str().unwrap();
    let missing = f.dir.join("missing").display().to_string();
    let b = f.bundle.to_str().unwrap();
    let key = test_pubkey();
    let k = key.to_str().unwrap();
    let disk = f.disk.as_str();
    for disk_arg in [missing.as_str(), dir] {
        let needle = if disk_arg == dir {
            "not a disk image"
        } else {
            "No such file"
        };
        for args in [
            vec!["status", "--disk", disk_arg],
            vec!["boot", "--disk", disk_arg],
            vec!["mark-good", "--disk", disk_arg, "--slot", "A"],
            vec!["mark-bad", "--disk", disk_arg, "--slot", "A"],
            vec!["rollback", "--disk", disk_arg, "--slot", "A"],
            vec![
                "commit", "--disk", disk_arg, "--slot", "A", "--check", "true",
            ],
            vec![
                "set-attributes",
                "--disk",
                disk_arg,
                "--slot",
                "A",
                "--tries",
                "1",
            ],
            vec![
                "install",
                b,
                "--disk",
                disk_arg,
                "--keyring",
                k,
                "--compatible",
                "test-board",
                "--no-sentinel",
            ],
        ] {
            // Writers open the disk read-write, which the OS refuses for a directory; status
            // opens it read-only and abupdate itself says what is wrong.
            let needle = if disk_arg == dir && args[0] != "status" {
                "Is a directory"
            } else {
                needle
            };
            expect_error(&args, 4, needle, None);
        }
    }
    // Bundle, keyring and key inputs.
    let install = |bundle: &str, keyring: &str| {
        vec![
            "install",
            bundle,
            "--disk",
            disk,
            "--keyring",
            keyring,
            "--compatible",
            "test-board",
            "--no-sentinel",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let empty_keys = f.dir.join("empty-keys");
    std::fs::create_dir(&empty_keys).unwrap();
    for (args, needle) in [
        (install(&missing, k), "No such file"),
        (install(dir, k), "Is a directory"),
        (install(b, &missing), "No such file"),
        (install(b, empty_keys.to_str().unwrap()), "no"),
    ] {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&argv, 3, needle, Some(disk));
    }
    let out_bundle = f.dir.join("out.abup").display().to_string();
    let tk = test_key();
    for (args, needle) in [
        (
            vec![
                "bundle",
                "create",
                "--image",
                missing.as_str(),
                "--key",
                tk.to_str().unwrap(),
                "--version",
                "1",
                "--compatible",
                "c",
                "--out",
                out_bundle.as_str(),
            ],
            "No such file",
        ),
        (
            vec![
                "bundle",
                "create",
                "--image",
                dir,
                "--key",
                tk.to_str().unwrap(),
                "--version",
                "1",
                "--compatible",
                "c",
                "--out",
                out_bundle.as_str(),
            ],
            "",
        ),
        (
            vec![
                "bundle",
                "create",
                "--image",
                b,
                "--key",
                missing.as_str(),
                "--version",
                "1",
                "--compatible",
                "c",
                "--out",
                out_bundle.as_str(),
            ],
            "No such file",
        ),
        (vec!["bundle", "info", missing.as_str()], "No such file"),
        (
            vec!["bundle", "verify", missing.as_str(), "--pubkey", k],
            "No such file",
        ),
        (
            vec!["bundle", "verify", b, "--pubkey", missing.as_str()],
            "No such file",
        ),
    ] {
        expect_error(&args, 3, needle, None);
        assert!(
            !Path::new(&out_bundle).exists(),
            "{args:?} left a partial bundle"
        );
    }
    // keygen never overwrites.
    let name = f.dir.join("k").display().to_string();
    abupdate_ok(&["keygen", "--out", &name]);
    let secret_before = std::fs::read(format!("{name}.key")).unwrap();
    expect_error(&["keygen", "--out", &name], 3, "exists", None);
    assert_eq!(std::fs::read(format!("{name}.key")).unwrap(), secret_before);
}

#[test]
fn wrong_sizes_and_sector_sizes_and_corrupt_tables() {
    if !have_gpt_tools() {
        return;
    }
    let f = fixture();
    // A disk too small for its slots is never created.
    let small = f.dir.join("small.img");
    expect_error(
        &[
            "disk",
            "init",
            small.to_str().unwrap(),
            "--slot-size",
            "8M",
            "--disk-size",
            "4M",
        ],
        2,
        "cannot hold",
        None,
    );
    assert!(!small.exists());
    // Sizes that do not fit in 64 bits are refused, not wrapped to a tiny disk.
    for (disk_size, slot_size, says) in [
        ("18446744073709551615", "4M", "too large"),
        ("64M", "18446744073709551615", "cannot hold"),
    ] {
        expect_error(
            &[
                "disk",
                "init",
                small.to_str().unwrap(),
                "--slot-size",
                slot_size,
                "--disk-size",
                disk_size,
            ],
            2,
            says,
            None,
        );
        assert!(!small.exists());
    }
    // A boot-chain disk whose loader file is missing is refused before anything is created.
    expect_error(
        &[
            "disk",
            "init",
            small.to_str().unwrap(),
            "--slot-size",
            "4M",
            "--kernel-size",
            "1M",
            "--efi",
            "/nonexistent/BOOTX64.EFI",
        ],
        1,
        "/nonexistent/BOOTX64.EFI",
        None,
    );
    assert!(!small.exists());
    // --efi and --esp-size only make sense with the boot chain (--kernel-size): usage error.
    for flag in [["--efi", "/x.efi"], ["--esp-size", "8M"]] {
        let out = abupdate(&[
            "disk",
            "init",
            small.to_str().unwrap(),
            "--slot-size",
            "4M",
            flag[0],
            flag[1],
        ]);
        assert_eq!(out.status.code(), Some(2), "{flag:?}");
        assert!(!small.exists());
    }
    // An existing file is never overwritten.
    expect_error(
        &["disk", "init", &f.disk, "--slot-size", "4M"],
        1,
        "already exists",
        Some(&f.disk),
    );
    // A 4096-byte-sector image read as 512: no valid GPT, clearly; with the right size: fine.
    let big = f.dir.join("4k.img").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &big,
        "--slot-size",
        "4M",
        "--sector-size",
        "4096",
    ]);
    expect_error(&["status", "--disk", &big], 4, "no valid GPT", Some(&big));
    expect_error(&["boot", "--disk", &big], 4, "no valid GPT", Some(&big));
    assert_eq!(
        status_json(&big, &["--sector-size", "4096"])["sector_size"],
        4096
    );
    expect_error(
        &["status", "--disk", &big, "--sector-size", "1024"],
        4,
        "unsupported logical sector size",
        None,
    );
    // Both copies corrupt.
    let mut bytes = std::fs::read(&f.disk).unwrap();
    let len = bytes.len();
    bytes[512 + 8] ^= 1;
    bytes[len - 512 + 8] ^= 1;
    std::fs::write(&f.disk, bytes).unwrap();
    for args in [
        vec!["status", "--disk", f.disk.as_str()],
        vec!["boot", "--disk", f.disk.as_str()],
        vec![
            "set-attributes",
            "--disk",
            f.disk.as_str(),
            "--slot",
            "B",
            "--priority",
            "1",
        ],
    ] {
        expect_error(
            &args,
            4,
            "primary: header at LBA 1 has bad CRC32",
            Some(&f.disk),
        );
    }
    let k = test_pubkey();
    expect_error(
        &[
            "install",
            f.bundle.to_str().unwrap(),
            "--disk",
            &f.disk,
            "--keyring",
            k.to_str().unwrap(),
            "--compatible",
            "test-board",
            "--no-sentinel",
        ],
        4,
        "no valid GPT",
        Some(&f.disk),
    );
}

/// Permissions only bind an unprivileged user (root bypasses them), so these run as nobody.
#[test]
fn files_the_user_may_not_open() {
    if !have_gpt_tools() || !have("root and setpriv", on_path("setpriv") && have_loop()) {
        return;
    }
    let f = fixture();
    std::fs::set_permissions(&f.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .args(args)
            .output()
            .unwrap()
    };
    let check = |args: &[&str], code: i32, needle: &str| {
        let before = sha256_file(Path::new(&f.disk));
        let out = as_nobody(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.starts_with("abupdate: error:"))
                .count(),
            1
        );
        assert_eq!(sha256_file(Path::new(&f.disk)), before);
    };
    std::fs::set_permissions(&f.disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    check(&["status", "--disk", &f.disk], 4, "Permission denied");
    // Readable but not writable: status works, writes are refused.
    std::fs::set_permissions(&f.disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert!(as_nobody(&["status", "--disk", &f.disk]).status.success());
    check(
        &[
            "set-attributes",
            "--disk",
            &f.disk,
            "--slot",
            "B",
            "--tries",
            "2",
        ],
        4,
        "Permission denied",
    );
    check(&["boot", "--disk", &f.disk], 4, "Permission denied");
}

#[test]
fn read_only_loop_device() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let f = fixture();
    let path = tool_ok("losetup", &["-r", "-P", "--show", "-f", &f.disk]);
    let lo = LoopDevice {
        path: PathBuf::from(path),
    };
    lo.wait_partition(2);
    let dev = lo.as_str();
    assert_eq!(status_json(dev, &[])["next_boot"], "ROOT-A");
    expect_error(
        &[
            "set-attributes",
            "--disk",
            dev,
            "--slot",
            "B",
            "--tries",
            "2",
        ],
        4,
        "is a read-only device",
        Some(&f.disk),
    );
    let k = test_pubkey();
    expect_error(
        &[
            "install",
            f.bundle.to_str().unwrap(),
            "--disk",
            dev,
            "--keyring",
            k.to_str().unwrap(),
            "--compatible",
            "test-board",
            "--no-sentinel",
        ],
        4,
        "is a read-only device",
        Some(&f.disk),
    );
}

#[test]
fn a_lock_held_by_another_process_is_named() {
    if !have_gpt_tools() || !have("flock(1)", on_path("flock")) {
        return;
    }
    let f = fixture();
    let mut holder = Command::new("flock")
        .args([f.disk.as_str(), "sleep", "30"])
        .spawn()
        .unwrap();
    wait_for_flock(&mut holder);
    for args in [
        vec!["boot", "--disk", f.disk.as_str()],
        vec![
            "commit",
            "--disk",
            f.disk.as_str(),
            "--slot",
            "A",
            "--check",
            "true",
        ],
        vec![
            "set-attributes",
            "--disk",
            f.disk.as_str(),
            "--slot",
            "B",
            "--tries",
            "2",
        ],
    ] {
        expect_error(
            &args,
            7,
            "locked by another abupdate process (held by pid",
            Some(&f.disk),
        );
    }
    // Reading does not need the lock.
    assert_eq!(status_json(&f.disk, &[])["next_boot"], "ROOT-A");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// A real install and a commit at the same time: the commit waits for nothing and
/// writes nothing; it is refused with the install's PID while the install goes on.
#[test]
fn install_and_commit_do_not_interleave() {
    if !have_gpt_tools() {
        return;
    }
    let f = fixture();
    let bundle = std::fs::read(&f.bundle).unwrap();
    let half = bundle.len() / 2;
    let mut install = PipedInstall::start(&f.disk, &bundle, half);
    install.wait_for_lock();
    let out = abupdate(&[
        "commit", "--disk", &f.disk, "--slot", "A", "--check", "true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains(&format!("held by pid {}", install.child.id())),
        "{stderr}"
    );
    let result = install.finish(&bundle, half);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(cgpt_fields(&f.disk, 2), (3, 3, false));
    assert_sgdisk_clean(&f.disk);
}

/// A target partition that is mounted is refused before anything is written.
#[test]
fn a_mounted_target_is_refused() {
    if !have_gpt_tools() || !have_loop() || !have("mkfs.ext4", on_path("mkfs.ext4")) {
        return;
    }
    let f = fixture();
    let lo = LoopDevice::attach(Path::new(&f.disk), None);
    let p2 = lo.wait_partition(2);
    tool_ok("mkfs.ext4", &["-q", p2.to_str().unwrap()]);
    let mnt = f.dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    tool_ok("mount", &[p2.to_str().unwrap(), mnt.to_str().unwrap()]);
    let dev = lo.as_str().to_string();
    let before_b = cgpt_fields(&dev, 2);
    let k = test_pubkey();
    let out = abupdate(&[
        "install",
        f.bundle.to_str().unwrap(),
        "--disk",
        &dev,
        "--keyring",
        k.to_str().unwrap(),
        "--compatible",
        "test-board",
        "--no-sentinel",
    ]);
    let _ = Command::new("umount").arg(&mnt).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("is in use (mounted"), "{stderr}");
    assert_eq!(
        cgpt_fields(&dev, 2),
        before_b,
        "the GPT changed although the install was refused"
    );
    assert_eq!(cgpt_fields(&dev, 1), (2, 0, true));
}
