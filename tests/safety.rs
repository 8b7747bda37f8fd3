//! Regression tests for the safety holes of issue 11 (labels, lying partition tables,
//! committed slots, unverified slots), each driving the real binary on real disk images and
//! checking with sgdisk/cgpt that nothing but what is allowed changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::gpt_edit::{self, FIRST_LBA, FIRST_USABLE, LAST_LBA};
use common::*;

struct Disk {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: String,
}

impl Disk {
    /// `disk init --seed`: v1 (with its slot record) in ROOT-A, the only good slot; ROOT-B
    /// empty. A v2 bundle is at `dir/v2.abup`.
    fn seeded() -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let disk = seeded_disk(&d);
        Disk {
            _dir: dir,
            dir: d,
            disk,
        }
    }

    fn path(&self) -> &Path {
        Path::new(&self.disk)
    }

    fn bundle(&self, n: u32) -> String {
        self.dir.join(format!("v{n}.abup")).display().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        abupdate(args)
    }

    fn install(&self, bundle: &str, extra: &[&str]) -> Output {
        let mut args = install_args(bundle, &self.disk);
        args.extend(extra.iter().map(|s| s.to_string()));
        abupdate(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code `want`, one `abupdate: error:` line, and returns it.
fn refused(out: &Output, want: i32) -> String {
    let err = stderr(out);
    assert_eq!(
        code(out),
        Some(want),
        "expected exit {want}: stdout {} stderr {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("abupdate: error:"))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string();
    assert!(!err.contains("panicked"), "{err}");
    line
}

/// Adds partition 3, `STATE`, a Linux data partition (not a slot type) in the spare space.
fn add_state_partition(disk: &str) {
    tool_ok(
        "sgdisk",
        &[
            "--new=3:0:+2M",
            "--change-name=3:STATE",
            "--typecode=3:8300",
            disk,
        ],
    );
}

#[test]
fn labels_from_the_command_line_and_environment_are_validated() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    add_state_partition(&d.disk);
    let before = sha256_file(d.path());
    let v2 = d.bundle(2);
    // The same label twice: before the fix this installed into the running ROOT-A.
    let line = refused(&d.install(&v2, &["--labels", "ROOT-A,ROOT-A"]), 2);
    assert!(line.contains("both \"ROOT-A\""), "{line}");
    // Three labels: before the fix, the third (a data partition) could be written.
    let line = refused(&d.install(&v2, &["--labels", "ROOT-A,ROOT-B,STATE"]), 2);
    assert!(line.contains("exactly two"), "{line}");
    // From the environment, for a command that writes attributes.
    let out = std::process::Command::new(bin())
        .args([
            "set-attributes",
            "--disk",
            &d.disk,
            "--slot",
            "A",
            "--priority",
            "5",
        ])
        .env("ABUPDATE_LABELS", "ROOT-A,ROOT-A")
        .output()
        .unwrap();
    refused(&out, 2);
    // A data partition named as a slot: same count, distinct, but not a slot type.
    for labels in ["ROOT-A,STATE", "STATE,ROOT-B"] {
        let line = refused(&d.install(&v2, &["--labels", labels]), 4);
        assert!(
            line.contains("STATE") && line.contains("same type"),
            "{line}"
        );
        let line = refused(
            &d.run(&[
                "mark-good",
                "--disk",
                &d.disk,
                "--labels",
                labels,
                "--slot",
                "STATE",
            ]),
            4,
        );
        assert!(line.contains("same type"), "{line}");
    }
    // The config file's value goes through the same check.
    let cfg = d.dir.join("abupdate.toml");
    std::fs::write(&cfg, "labels = [\"ROOT-A\", \"ROOT-A\"]\n").unwrap();
    let out = abupdate(&[
        "--config",
        cfg.to_str().unwrap(),
        "status",
        "--disk",
        &d.disk,
    ]);
    let line = refused(&out, 2);
    assert!(line.contains("both \"ROOT-A\""), "{line}");
    assert_eq!(
        sha256_file(d.path()),
        before,
        "a refused command changed the disk"
    );
    assert_eq!(cgpt_fields(&d.disk, 1), (1, 0, true));
    assert_eq!(cgpt_fields(&d.disk, 2), (0, 0, false));
}

/// Every command that writes, run on a table that lies: each must refuse with exit 4, name
/// `names` in its one error line, and leave every byte of the disk as it was.
fn every_writer_refuses(d: &Disk, names: &[&str]) {
    let before = sha256_file(d.path());
    let disk = d.disk.as_str();
    let v2 = d.bundle(2);
    let commands: Vec<Vec<String>> = vec![
        install_args(&v2, disk),
        ["boot", "--disk", disk].map(String::from).to_vec(),
        ["commit", "--disk", disk, "--slot", "A", "--check", "true"]
            .map(String::from)
            .to_vec(),
        ["mark-good", "--disk", disk, "--slot", "B", "--force"]
            .map(String::from)
            .to_vec(),
        ["mark-bad", "--disk", disk, "--slot", "A", "--force"]
            .map(String::from)
            .to_vec(),
        ["rollback", "--disk", disk, "--slot", "B"]
            .map(String::from)
            .to_vec(),
        [
            "set-attributes",
            "--disk",
            disk,
            "--slot",
            "B",
            "--priority",
            "9",
            "--force",
        ]
        .map(String::from)
        .to_vec(),
        ["status", "--disk", disk].map(String::from).to_vec(),
    ];
    for args in commands {
        let out = abupdate(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let line = refused(&out, 4);
        for n in names {
            assert!(line.contains(n), "{args:?}: {line} does not name {n}");
        }
        assert_eq!(sha256_file(d.path()), before, "{args:?} changed the disk");
    }
}

#[test]
fn a_slot_starting_inside_the_running_slot_is_refused_by_every_writer() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    let (a_off, a_len) = partition_range(&d.disk, 1);
    let a_first = a_off / 512;
    let a_last = a_first + a_len / 512 - 1;
    // ROOT-B (partition 2) now starts in the middle of ROOT-A, CRCs valid.
    gpt_edit::rewrite(
        d.path(),
        512,
        |i, e| {
            if i == 1 {
                gpt_edit::set_u64(e, FIRST_LBA, (a_first + a_last) / 2);
            }
        },
        |_| {},
    );
    let (ok, text) = tool("sgdisk", &["-v", &d.disk]);
    assert!(!ok || !text.contains("No problems found"), "sgdisk: {text}");
    assert!(
        text.contains("overlap"),
        "sgdisk sees the overlap too: {text}"
    );
    every_writer_refuses(
        &d,
        &[
            "partition 1 (\"ROOT-A\"",
            "partition 2 (\"ROOT-B\"",
            "overlap",
        ],
    );
}

#[test]
fn a_slot_over_the_gpt_itself_is_refused_even_when_the_header_lies_about_the_usable_range() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    // ROOT-B moved to start at LBA 1 (the primary header), its end unchanged, and the header
    // widened to claim LBA 1 is usable: every CRC is valid.
    gpt_edit::rewrite(
        d.path(),
        512,
        |i, e| {
            if i == 1 {
                let len = gpt_edit::get_u64(e, LAST_LBA) - gpt_edit::get_u64(e, FIRST_LBA);
                gpt_edit::set_u64(e, FIRST_LBA, 1);
                gpt_edit::set_u64(e, LAST_LBA, 1 + len.min(1000));
            }
        },
        |h| gpt_edit::set_u64(h, FIRST_USABLE, 1),
    );
    every_writer_refuses(&d, &["partition 2 (\"ROOT-B\"", "primary GPT header"]);
}

#[test]
fn a_slot_past_the_last_usable_lba_is_refused() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    // ROOT-B's end pushed into the backup entry array.
    let sectors = std::fs::metadata(d.path()).unwrap().len() / 512;
    gpt_edit::rewrite(
        d.path(),
        512,
        |i, e| {
            if i == 1 {
                gpt_edit::set_u64(e, LAST_LBA, sectors - 2);
            }
        },
        |_| {},
    );
    every_writer_refuses(&d, &["partition 2 (\"ROOT-B\"", "backup GPT"]);
}

#[test]
fn a_failing_check_on_a_committed_slot_changes_nothing_unless_asked() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    // Both slots committed: ROOT-B v2 installed, booted, checked good.
    let out = d.install(&d.bundle(2), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    abupdate_ok(&["boot", "--disk", &d.disk]);
    abupdate_ok(&[
        "commit", "--disk", &d.disk, "--slot", "B", "--check", "true",
    ]);
    let good = (cgpt_fields(&d.disk, 1), cgpt_fields(&d.disk, 2));
    assert!(good.0 .2 && good.1 .2, "both committed: {good:?}");
    let before = sha256_file(d.path());
    // The health-commit unit at a later boot, with a passing glitch: exit 6, nothing written.
    let line = refused(
        &d.run(&[
            "commit", "--disk", &d.disk, "--slot", "B", "--check", "exit 1",
        ]),
        6,
    );
    assert!(
        line.contains("NOT marked bad") && line.contains("committed"),
        "{line}"
    );
    assert_eq!(
        sha256_file(d.path()),
        before,
        "a committed slot was changed"
    );
    // --reboot must not reboot either (there is nothing to fall back to by design): it is
    // the same refusal; we cannot observe a reboot here, but the attributes stay.
    // Asked explicitly: marked bad, the node falls back to ROOT-A.
    let line = refused(
        &d.run(&[
            "commit",
            "--disk",
            &d.disk,
            "--slot",
            "B",
            "--check",
            "exit 1",
            "--mark-bad-committed",
        ]),
        6,
    );
    assert!(line.contains("ROOT-B marked bad"), "{line}");
    assert_eq!(cgpt_fields(&d.disk, 2), (0, 0, false));
    assert_eq!(status_json(&d.disk, &[])["next_boot"], "ROOT-A");
    // A slot on trial is still marked bad by a failing check (the fallback that matters).
    let out = d.install(&d.bundle(2), &["--running", "A"]);
    assert!(out.status.success(), "{}", stderr(&out));
    abupdate_ok(&["boot", "--disk", &d.disk]);
    let line = refused(
        &d.run(&[
            "commit", "--disk", &d.disk, "--slot", "B", "--check", "exit 1",
        ]),
        6,
    );
    assert!(line.contains("ROOT-B marked bad"), "{line}");
    assert_eq!(cgpt_fields(&d.disk, 2), (0, 0, false));
}

#[test]
fn a_slot_whose_install_was_cut_short_cannot_be_made_bootable_without_force() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    // ROOT-B got v2 once (it has a record), then was marked bad.
    let out = d.install(&d.bundle(2), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    abupdate_ok(&["mark-bad", "--disk", &d.disk, "--slot", "B"]);
    let version_b = |d: &Disk| status_json(&d.disk, &[])["slots"][1]["version"].clone();
    assert_eq!(version_b(&d), "2.0");
    // A new install into ROOT-B, killed (-9) half way through the stream: by then it has
    // wiped ROOT-B's record and is writing the image.
    let bundle = std::fs::read(d.bundle(2)).unwrap();
    let mut piped = PipedInstall::start(&d.disk, &bundle, bundle.len() / 2);
    piped.wait_for_lock();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !version_b(&d).is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the record was never wiped"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    piped.child.kill().unwrap();
    piped.child.wait().unwrap();
    assert_eq!(cgpt_fields(&d.disk, 2), (0, 0, false));
    let before = sha256_file(d.path());
    let attempts: [&[&str]; 3] = [
        &["mark-good", "--disk", &d.disk, "--slot", "B"],
        &[
            "commit", "--disk", &d.disk, "--slot", "B", "--check", "true",
        ],
        &[
            "set-attributes",
            "--disk",
            &d.disk,
            "--slot",
            "B",
            "--priority",
            "3",
            "--tries",
            "2",
        ],
    ];
    for args in attempts {
        let line = refused(&d.run(args), 8);
        assert!(
            line.contains("refusing to make ROOT-B bootable") && line.contains("no slot record"),
            "{args:?}: {line}"
        );
        assert_eq!(sha256_file(d.path()), before, "{args:?} changed the disk");
    }
    // The operator can still insist.
    abupdate_ok(&["mark-good", "--disk", &d.disk, "--slot", "B", "--force"]);
    assert!(cgpt_fields(&d.disk, 2).2);
}

#[test]
fn a_slot_whose_content_no_longer_matches_its_record_cannot_be_marked_good() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    let out = d.install(&d.bundle(2), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    abupdate_ok(&["mark-bad", "--disk", &d.disk, "--slot", "B"]);
    // One byte of ROOT-B's image changes behind abupdate's back.
    let (b_off, _) = partition_range(&d.disk, 2);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path())
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"X", b_off + 1000).unwrap();
    drop(f);
    let before = sha256_file(d.path());
    let line = refused(&d.run(&["mark-good", "--disk", &d.disk, "--slot", "B"]), 8);
    assert!(line.contains("does not match its slot record"), "{line}");
    assert_eq!(sha256_file(d.path()), before);
    // An intact slot is verified and accepted: ROOT-A, marked bad with --force, then good.
    abupdate_ok(&["mark-bad", "--disk", &d.disk, "--slot", "A", "--force"]);
    abupdate_ok(&["mark-good", "--disk", &d.disk, "--slot", "A"]);
    assert!(cgpt_fields(&d.disk, 1).2);
}

#[test]
fn verification_reads_the_device_on_a_loop_device() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    let d = Disk::seeded();
    let lo = LoopDevice::attach(d.path(), None);
    lo.wait_partition(2);
    // Cache the empty ROOT-B through the whole-disk node before the install writes it
    // through the partition node: the later verification must not read the stale cache.
    abupdate_ok(&["status", "--disk", lo.as_str()]);
    let mut args = install_args(&d.bundle(2), lo.as_str());
    args.extend(["--running", "A"].map(String::from));
    let out = abupdate(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    abupdate_ok(&["mark-bad", "--disk", lo.as_str(), "--slot", "B"]);
    abupdate_ok(&["mark-good", "--disk", lo.as_str(), "--slot", "B"]);
    assert!(cgpt_fields(lo.as_str(), 2).2);
}

#[test]
fn the_sentinel_never_follows_a_planted_symlink() {
    let d = Disk::seeded();
    let victim = d.dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let sentinel = d.dir.join("run").join("reboot-required");
    std::fs::create_dir_all(sentinel.parent().unwrap()).unwrap();
    // Before the fix the temporary file had this fixed name and was opened following links.
    for planted in ["reboot-required.abupdate-tmp", "reboot-required.tmp"] {
        std::os::unix::fs::symlink(&victim, sentinel.with_file_name(planted)).unwrap();
    }
    let key = test_pubkey().display().to_string();
    let bundle = d.bundle(2);
    let out = d.run(&[
        "install",
        &bundle,
        "--disk",
        &d.disk,
        "--keyring",
        &key,
        "--compatible",
        "test-board",
        "--sentinel",
        sentinel.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let text = std::fs::read_to_string(&sentinel).unwrap();
    assert!(text.contains("2.0 installed in ROOT-B"), "{text}");
    assert!(!std::fs::symlink_metadata(&sentinel).unwrap().is_symlink());
    // Only the sentinel and the two planted links are there: no temporary file left behind.
    let names = std::fs::read_dir(sentinel.parent().unwrap())
        .unwrap()
        .count();
    assert_eq!(names, 3);
}

#[test]
fn a_closed_output_pipe_ends_status_quietly() {
    let d = Disk::seeded();
    for args in [
        &["status", "--disk", &d.disk][..],
        &["status", "--json", "--disk", &d.disk],
    ] {
        // The reading end is closed before abupdate writes a byte.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(bin())
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.is_empty(), "{err}");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    }
}

#[test]
fn a_keyring_entry_that_cannot_be_read_is_an_error_not_skipped() {
    let d = Disk::seeded();
    let ring = d.dir.join("ring");
    std::fs::create_dir(&ring).unwrap();
    std::fs::copy(test_pubkey(), ring.join("good.pub")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/old.pub", ring.join("old.pub")).unwrap();
    let bundle = d.bundle(2);
    let before = std::fs::read(d.path()).unwrap();
    let install = |ring: &Path| {
        d.run(&[
            "install",
            &bundle,
            "--disk",
            &d.disk,
            "--keyring",
            ring.to_str().unwrap(),
            "--compatible",
            "test-board",
            "--no-sentinel",
        ])
    };
    let line = refused(&install(&ring), 3);
    assert!(line.contains("old.pub"), "{line}");
    std::fs::remove_file(ring.join("old.pub")).unwrap();
    std::fs::create_dir(ring.join("dir.pub")).unwrap();
    let line = refused(&install(&ring), 3);
    assert!(line.contains("dir.pub"), "{line}");
    assert_eq!(
        std::fs::read(d.path()).unwrap(),
        before,
        "a refused keyring wrote the disk"
    );
}

/// Found by the model test (seed 1555): demoting the only committed slot to a one-try trial
/// left a disk that booted once and then had nothing bootable. Every slot operation now keeps
/// a committed slot while one exists, unless `--force`.
#[test]
fn the_last_committed_slot_cannot_be_demoted_to_a_trial_without_force() {
    if !have_gpt_tools() {
        return;
    }
    let d = Disk::seeded();
    let before = std::fs::read(d.path()).unwrap();
    let demote = |extra: &[&str]| {
        let mut args = vec![
            "set-attributes",
            "--disk",
            &d.disk,
            "--slot",
            "ROOT-A",
            "--priority",
            "7",
            "--tries",
            "1",
            "--successful",
            "0",
        ];
        args.extend_from_slice(extra);
        d.run(&args)
    };
    let line = refused(&demote(&[]), 8);
    assert!(line.contains("no committed slot"), "{line}");
    assert_eq!(
        std::fs::read(d.path()).unwrap(),
        before,
        "a refused change wrote"
    );
    // mark-bad of the committed slot while the other is only on trial: refused too.
    assert_eq!(code(&d.install(&d.bundle(2), &[])), Some(0));
    let on_trial = std::fs::read(d.path()).unwrap();
    let line = refused(
        &d.run(&["mark-bad", "--disk", &d.disk, "--slot", "ROOT-A"]),
        8,
    );
    assert!(line.contains("no committed slot"), "{line}");
    assert_eq!(std::fs::read(d.path()).unwrap(), on_trial);
    // The operator can still say so explicitly.
    assert_eq!(code(&demote(&["--force"])), Some(0));
    assert_eq!(cgpt_fields(&d.disk, 1), (7, 1, false));
}

/// On a disk with the boot chain a slot is the pair (KERN-x, ROOT-x): a table with a kernel
/// partition for one slot only, or a "kernel" partition of another type, is refused by every
/// command (exit 4, the partitions named, the disk unchanged), as sgdisk still reads it fine.
#[test]
fn a_kernel_partition_for_one_slot_only_is_refused() {
    if !have_gpt_tools() || !have("mkfs.vfat (Debian dosfstools)", on_path("mkfs.vfat")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "4M",
        "--kernel-size",
        "1M",
    ]);
    let status = status_json(&disk, &[]);
    assert_eq!(status["slots"][0]["kernel_partition"], 2, "{status}");
    assert_eq!(status["slots"][1]["kernel_partition"], 4, "{status}");
    for (edit, says) in [
        (vec!["-c", "4:KERN-X"], "no partition labelled KERN-B"),
        (vec!["-t", "2:8300"], "not the ChromeOS kernel type"),
    ] {
        let broken = dir.path().join("broken.img").display().to_string();
        std::fs::copy(&disk, &broken).unwrap();
        let mut args = edit.clone();
        args.push(&broken);
        tool_ok("sgdisk", &args);
        assert_sgdisk_clean(&broken);
        let before = std::fs::read(&broken).unwrap();
        for cmd in [
            &["status", "--disk", &broken][..],
            &["boot", "--disk", &broken],
            &["mark-good", "--disk", &broken, "--slot", "A"],
        ] {
            let line = refused(&abupdate(cmd), 4);
            assert!(line.contains(says), "{cmd:?}: {line}");
        }
        assert_eq!(std::fs::read(&broken).unwrap(), before, "{edit:?}");
    }
}
