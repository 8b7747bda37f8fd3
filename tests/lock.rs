//! The disk lock covers the storage, not one path naming it: while an install holds the lock
//! through a loop device, its backing file (or a partition of it, or a symlink) is refused, and
//! the other way round. Real loop devices; the attributes are read back with `cgpt`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
    bundle: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let disk = d.join("disk.img").display().to_string();
    abupdate_ok(&["disk", "init", &disk, "--slot-size", "4M"]);
    let image = d.join("v2.img");
    make_image(&image, 1 << 20, 31);
    let bundle = d.join("v2.abup");
    make_bundle(&image, "2", "test-board", &bundle);
    Fixture {
        _dir: dir,
        dir: d,
        bundle: std::fs::read(&bundle).unwrap(),
        disk,
    }
}

/// What the half-written install must not get: ROOT-B made bootable behind its back.
fn make_b_bootable(disk: &str) -> Output {
    abupdate(&[
        "set-attributes",
        "--disk",
        disk,
        "--slot",
        "ROOT-B",
        "--priority",
        "15",
        "--successful",
        "1",
    ])
}

/// `other` must be refused with exit 7 naming `holder`, and ROOT-B's attributes (read from the
/// backing file) must stay as the install left them mid-write: P0 T0 S0.
fn assert_refused(other: &str, holder: u32, image: &str) {
    let out = make_b_bootable(other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{other}: {stderr}");
    assert!(
        stderr.contains(&format!("held by pid {holder}")),
        "{other}: {stderr}"
    );
    assert_eq!(cgpt_fields(image, 2), (0, 0, false), "{other}");
}

fn finish_ok(install: PipedInstall, bundle: &[u8], from: usize, image: &str) {
    let out = install.finish(bundle, from);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cgpt_fields(image, 2), (3, 3, false));
}

#[test]
fn a_lock_held_through_a_loop_device_covers_its_backing_file() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let f = fixture();
    let lo = LoopDevice::attach(Path::new(&f.disk), None);
    let part2 = lo.wait_partition(2);
    let link = f.dir.join("disk-link.img");
    std::os::unix::fs::symlink(&f.disk, &link).unwrap();
    let half = f.bundle.len() / 2;
    let mut install = PipedInstall::start(lo.as_str(), &f.bundle, half);
    install.wait_for_lock();
    let pid = install.child.id();
    // The backing file, a symlink to it, and a partition of the locked disk.
    for other in [
        f.disk.as_str(),
        link.to_str().unwrap(),
        part2.to_str().unwrap(),
    ] {
        assert_refused(other, pid, &f.disk);
    }
    finish_ok(install, &f.bundle, half, &f.disk);
}

#[test]
fn a_lock_held_through_the_backing_file_covers_its_loop_device() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let f = fixture();
    let lo = LoopDevice::attach(Path::new(&f.disk), None);
    lo.wait_partition(2);
    let link = f.dir.join("loop-link");
    std::os::unix::fs::symlink(&lo.path, &link).unwrap();
    let half = f.bundle.len() / 2;
    let mut install = PipedInstall::start(&f.disk, &f.bundle, half);
    install.wait_for_lock();
    let pid = install.child.id();
    for other in [lo.as_str(), link.to_str().unwrap()] {
        assert_refused(other, pid, &f.disk);
    }
    finish_ok(install, &f.bundle, half, &f.disk);
}
