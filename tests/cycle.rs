//! The whole update cycle driven through the CLI, checked with cgpt after every step:
//! install v2 → boot → commit → good; install v3 → boot → failed check → back to v2;
//! install v3 → three uncommitted boots → v2 again by itself. On an image file and on a loop
//! device.

mod common;

use std::path::Path;

use common::*;

fn boot(disk: &str) -> (String, String) {
    let out = abupdate_ok(&["boot", "--disk", disk, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["slot"].as_str().unwrap().to_string(),
        v["version"].as_str().unwrap_or("-").to_string(),
    )
}

fn install(disk: &str, bundle: &Path) {
    let args = install_args(bundle.to_str().unwrap(), disk);
    abupdate_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn walk_cycle(disk: &str, dir: &Path) {
    let mut booted = Vec::new();
    let image = dir.join("img");
    make_image(&image, 1024 * 1024, 9);
    let v2 = dir.join("v2.abup");
    make_bundle(&image, "2", "test-board", &v2);
    make_image(&image, 1024 * 1024, 10);
    let v3 = dir.join("v3.abup");
    make_bundle(&image, "3", "test-board", &v3);

    // Install v2 → boot → commit healthy → v2 is good.
    install(disk, &v2);
    assert_eq!(cgpt_fields(disk, 2), (3, 3, false));
    let b = boot(disk);
    assert_eq!(b, ("ROOT-B".into(), "2".into()));
    booted.push(b);
    assert_eq!(cgpt_fields(disk, 2), (3, 2, false));
    abupdate_ok(&[
        "commit",
        "--disk",
        disk,
        "--slot",
        "B",
        "--check",
        "true",
        "--check",
        "test -d /",
    ]);
    assert_eq!(cgpt_fields(disk, 2), (3, 0, true));
    assert_eq!(cgpt_fields(disk, 1), (2, 0, true));
    // A second commit writes nothing.
    let before = sha256_file(Path::new(disk));
    let out = abupdate_ok(&[
        "commit", "--disk", disk, "--slot", "B", "--check", "true", "--json",
    ]);
    assert!(out.contains("\"bytes_written\":0"), "{out}");
    if Path::new(disk).is_file() {
        assert_eq!(sha256_file(Path::new(disk)), before);
    }

    // Install v3 → boot → commit fails → next boot is v2.
    install(disk, &v3);
    assert_eq!(cgpt_fields(disk, 1), (4, 3, false));
    let b = boot(disk);
    assert_eq!(b, ("ROOT-A".into(), "3".into()));
    booted.push(b);
    let out = abupdate(&[
        "commit", "--disk", disk, "--slot", "A", "--check", "true", "--check", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exit 7")
            && stderr.contains("status 7")
            && stderr.contains("ROOT-A marked bad"),
        "{stderr}"
    );
    assert_eq!(cgpt_fields(disk, 1), (0, 0, false));
    let b = boot(disk);
    assert_eq!(b, ("ROOT-B".into(), "2".into()));
    booted.push(b);
    assert_eq!(cgpt_fields(disk, 2), (3, 0, true));

    // Install v3 → three boots without a commit → v2 comes back by itself.
    install(disk, &v3);
    for tries_left in [2u8, 1, 0] {
        let b = boot(disk);
        assert_eq!(b, ("ROOT-A".into(), "3".into()));
        booted.push(b);
        let expected_priority = if tries_left == 0 { 0 } else { 4 };
        assert_eq!(cgpt_fields(disk, 1), (expected_priority, tries_left, false));
    }
    let b = boot(disk);
    assert_eq!(b, ("ROOT-B".into(), "2".into()));
    booted.push(b);
    assert_sgdisk_clean(disk);
    println!(
        "booted: {}",
        booted
            .iter()
            .map(|(s, v)| format!("{s}(v{v})"))
            .collect::<Vec<_>>()
            .join(" -> ")
    );

    // Rollback to A is refused (never successful); mark-bad of the only bootable slot too.
    let out = abupdate(&["rollback", "--disk", disk, "--slot", "B"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("never marked successful"));
    let out = abupdate(&["mark-bad", "--disk", disk, "--slot", "B"]);
    assert_eq!(out.status.code(), Some(8));
    assert_eq!(cgpt_fields(disk, 2), (3, 0, true));
    // A failing check on the only bootable slot leaves it bootable.
    let out = abupdate(&["commit", "--disk", disk, "--slot", "B", "--check", "false"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT marked bad"));
    assert_eq!(cgpt_fields(disk, 2), (3, 0, true));
}

#[test]
fn update_cycle_on_an_image_file() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    abupdate_ok(&["disk", "init", disk.to_str().unwrap(), "--slot-size", "4M"]);
    walk_cycle(disk.to_str().unwrap(), dir.path());
}

#[test]
fn update_cycle_on_a_loop_device() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    abupdate_ok(&["disk", "init", disk.to_str().unwrap(), "--slot-size", "4M"]);
    let lo = LoopDevice::attach(&disk, None);
    lo.wait_partition(2);
    walk_cycle(lo.as_str(), dir.path());
}

#[test]
fn rollback_to_a_good_slot_and_timeouts() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let d = disk.to_str().unwrap();
    abupdate_ok(&["disk", "init", d, "--slot-size", "4M"]);
    tool_ok(
        "cgpt",
        &["add", "-i", "2", "-P", "3", "-T", "0", "-S", "1", d],
    );
    // Running B, both good: rollback makes A boot next.
    abupdate_ok(&["rollback", "--disk", d, "--slot", "B"]);
    assert_eq!(status_json(d, &[])["next_boot"], "ROOT-A");
    assert!(cgpt_fields(d, 1).2);
    // A check that hangs is killed after the timeout and counts as failed.
    let start = std::time::Instant::now();
    let out = abupdate(&[
        "commit",
        "--disk",
        d,
        "--slot",
        "A",
        "--check",
        "sleep 30",
        "--timeout",
        "1",
        // A is committed: only asked explicitly does a failed check mark it bad.
        "--mark-bad-committed",
    ]);
    assert_eq!(out.status.code(), Some(6));
    assert!(start.elapsed().as_secs() < 10);
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out after 1 s"));
    assert_eq!(cgpt_fields(d, 1), (0, 0, false));
    assert_eq!(status_json(d, &[])["next_boot"], "ROOT-B");
}

#[test]
fn checks_file_runs_each_line() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let d = disk.to_str().unwrap();
    abupdate_ok(&["disk", "init", d, "--slot-size", "4M"]);
    tool_ok(
        "cgpt",
        &["add", "-i", "2", "-P", "3", "-T", "2", "-S", "0", d],
    );
    let checks = dir.path().join("health-checks");
    let marker = dir.path().join("ran");
    std::fs::write(
        &checks,
        format!(
            "# comment\ntouch {}\n\n   \nexit 4\ntouch {}.never\n",
            marker.display(),
            marker.display()
        ),
    )
    .unwrap();
    let out = abupdate(&[
        "commit",
        "--disk",
        d,
        "--slot",
        "B",
        "--checks-file",
        checks.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exit 4: exited with status 4"));
    assert!(marker.exists());
    assert!(
        !dir.path().join("ran.never").exists(),
        "checks after the failing one must not run"
    );
    assert_eq!(cgpt_fields(d, 2), (0, 0, false));
}
