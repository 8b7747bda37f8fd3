//! The GPT layer against independent readers and writers: Debian's cgpt and sgdisk, on disk
//! image files and on real loop devices (512- and 4096-byte sectors).

mod common;

use std::path::Path;

use common::*;

fn init(dir: &Path, name: &str, extra: &[&str]) -> String {
    let path = dir.join(name);
    let p = path.to_str().unwrap().to_string();
    let mut args = vec!["disk", "init", p.as_str(), "--slot-size", "8M"];
    args.extend_from_slice(extra);
    abupdate_ok(&args);
    p
}

fn slot_fields(status: &serde_json::Value, i: usize) -> (u8, u8, bool) {
    let s = &status["slots"][i];
    (
        s["priority"].as_u64().unwrap() as u8,
        s["tries"].as_u64().unwrap() as u8,
        s["successful"].as_bool().unwrap(),
    )
}

#[test]
fn init_disk_passes_sgdisk_and_cgpt_reads_the_attributes() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = init(dir.path(), "disk.img", &[]);
    assert_sgdisk_clean(&disk);
    assert_eq!(cgpt_fields(&disk, 1), (2, 0, true));
    assert_eq!(cgpt_fields(&disk, 2), (0, 0, false));
    assert_eq!(tool_ok("cgpt", &["show", "-i", "1", "-l", &disk]), "ROOT-A");
    assert_eq!(tool_ok("cgpt", &["show", "-i", "2", "-l", &disk]), "ROOT-B");
    // A protective MBR is present (Linux needs it): sgdisk reports it as such.
    let (_, text) = tool("sgdisk", &["-p", &disk]);
    assert!(!text.contains("MBR: not present"), "{text}");
    let status = status_json(&disk, &[]);
    assert_eq!(status["next_boot"], "ROOT-A");
    let partuuid = status["slots"][0]["partuuid"].as_str().unwrap().to_string();
    assert_eq!(
        tool_ok("cgpt", &["show", "-i", "1", "-u", &disk]).to_lowercase(),
        partuuid
    );
    assert!(status["gpt"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["valid"] == true));
}

/// Every priority/tries/successful value written by cgpt is read back identically.
#[test]
fn abupdate_reads_every_value_cgpt_writes() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = init(dir.path(), "disk.img", &[]);
    for p in 0..=15u8 {
        for t in 0..=15u8 {
            let s = (p + t) % 2;
            tool_ok(
                "cgpt",
                &[
                    "add",
                    "-i",
                    "2",
                    "-P",
                    &p.to_string(),
                    "-T",
                    &t.to_string(),
                    "-S",
                    &s.to_string(),
                    &disk,
                ],
            );
            let status = status_json(&disk, &[]);
            assert_eq!(slot_fields(&status, 1), (p, t, s == 1), "P{p} T{t} S{s}");
            // Slot A is untouched by the edit and still read right.
            assert_eq!(slot_fields(&status, 0), (2, 0, true));
        }
    }
}

/// Every value abupdate writes reads back identically in cgpt, and the disk stays valid.
#[test]
fn cgpt_reads_every_value_abupdate_writes() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = init(dir.path(), "disk.img", &[]);
    // Set a bit outside the slot fields with sgdisk (bit 60) and a UEFI bit (legacy BIOS
    // bootable, bit 2): abupdate must keep both.
    tool_ok("sgdisk", &["-A", "2:set:60", "-A", "2:set:2", &disk]);
    for p in 0..=15u8 {
        for t in 0..=15u8 {
            for s in 0..=1u8 {
                if (p as u32 * 16 + t as u32) % 5 != 0 && s == 1 {
                    continue; // every S0 combination, a fifth of the S1 ones
                }
                abupdate_ok(&[
                    "set-attributes",
                    "--disk",
                    &disk,
                    "--slot",
                    "B",
                    "--priority",
                    &p.to_string(),
                    "--tries",
                    &t.to_string(),
                    "--successful",
                    &s.to_string(),
                    "--force", // raw attribute encoding on slots with no record
                ]);
                assert_eq!(cgpt_fields(&disk, 2), (p, t, s == 1), "P{p} T{t} S{s}");
            }
        }
        assert_sgdisk_clean(&disk);
    }
    let (_, text) = tool("sgdisk", &["-A", "2:show", &disk]);
    assert!(
        text.contains("60") && text.contains("legacy BIOS bootable"),
        "{text}"
    );
    // Raw attribute word, as cgpt sees it: P15 T15 S0 with bit 60 = 0x10FF in bits 48-63.
    assert_eq!(cgpt_fields(&disk, 1), (2, 0, true));
}

/// A disk partitioned by sgdisk alone (no abupdate involvement) is read correctly.
#[test]
fn reads_a_disk_made_by_sgdisk() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sg.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let d = disk.to_str().unwrap();
    tool_ok(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:2048:+4M",
            "-c",
            "1:EFI",
            "-n",
            "2:0:+16M",
            "-c",
            "2:ROOT-A",
            "-n",
            "3:0:+16M",
            "-c",
            "3:ROOT-B",
            "-A",
            "2:set:56",
            "-A",
            "2:set:48",
            "-A",
            "3:set:49",
            "-A",
            "3:set:52",
            d,
        ],
    );
    let status = status_json(d, &[]);
    assert_eq!(status["slots"][0]["partition"], 2);
    assert_eq!(slot_fields(&status, 0), (1, 0, true));
    assert_eq!(slot_fields(&status, 1), (2, 1, false));
    assert_eq!(status["next_boot"], "ROOT-B");
}

/// The same round trips on a real loop device, with 512- and 4096-byte logical sectors.
#[test]
fn loop_device_round_trip_both_sector_sizes() {
    if !have_gpt_tools() || !have_loop() {
        return;
    }
    for ss in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let img = init(dir.path(), "disk.img", &["--sector-size", &ss.to_string()]);
        let lo = LoopDevice::attach(Path::new(&img), Some(ss));
        let dev = lo.as_str();
        lo.wait_partition(1);
        lo.wait_partition(2);
        let status = status_json(dev, &[]);
        assert_eq!(status["sector_size"], ss);
        assert_eq!(slot_fields(&status, 0), (2, 0, true));
        abupdate_ok(&[
            "set-attributes",
            "--disk",
            dev,
            "--slot",
            "B",
            "--priority",
            "5",
            "--tries",
            "3",
            "--successful",
            "0",
            "--force", // raw attribute encoding on slots with no record
        ]);
        assert_eq!(cgpt_fields(dev, 2), (5, 3, false));
        tool_ok(
            "cgpt",
            &["add", "-i", "1", "-P", "7", "-T", "1", "-S", "0", dev],
        );
        let status = status_json(dev, &[]);
        assert_eq!(slot_fields(&status, 0), (7, 1, false));
        assert_eq!(status["next_boot"], "ROOT-A");
        assert_sgdisk_clean(dev);
        // A file opened with the wrong sector size is refused, not misread.
        let out = abupdate(&[
            "status",
            "--disk",
            dev,
            "--sector-size",
            if ss == 512 { "4096" } else { "512" },
        ]);
        assert!(!out.status.success());
    }
}

/// A damaged primary header is reported, the backup is used, and the next write repairs it.
#[test]
fn torn_primary_is_reported_used_from_backup_and_repaired() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = init(dir.path(), "disk.img", &[]);
    for (round, (offset, what)) in [(512 + 40u64, "header"), (1024 + 200, "entry array")]
        .into_iter()
        .enumerate()
    {
        let tries = (round + 2).to_string();
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[offset as usize] ^= 0x5A;
        std::fs::write(&disk, &bytes).unwrap();
        let status = status_json(&disk, &[]);
        assert_eq!(
            status["gpt"][0]["valid"], false,
            "damaged primary {what} not detected"
        );
        assert_eq!(status["gpt"][1]["in_use"], true);
        assert_eq!(slot_fields(&status, 0), (2, 0, true));
        // The next write repairs the damaged copy (an unchanged one would too, see the gpt
        // unit tests); on a healthy disk an unchanged write writes nothing.
        abupdate_ok(&[
            "set-attributes",
            "--disk",
            &disk,
            "--slot",
            "B",
            "--priority",
            "1",
            "--tries",
            &tries,
            "--force", // raw attribute encoding on slots with no record
        ]);
        let status = status_json(&disk, &[]);
        assert!(status["gpt"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["valid"] == true && g["problem"].is_null()));
        assert_sgdisk_clean(&disk);
        assert_eq!(cgpt_fields(&disk, 2), (1, round as u8 + 2, false));
    }
    // Damaged backup: reported, primary used, repaired on the next write.
    let len = std::fs::metadata(&disk).unwrap().len();
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[(len - 512 + 24) as usize] ^= 1;
    std::fs::write(&disk, &bytes).unwrap();
    let status = status_json(&disk, &[]);
    assert_eq!(status["gpt"][1]["valid"], false);
    abupdate_ok(&[
        "set-attributes",
        "--disk",
        &disk,
        "--slot",
        "B",
        "--tries",
        "4",
        "--force", // raw attribute encoding on slots with no record
    ]);
    assert_sgdisk_clean(&disk);
    let status = status_json(&disk, &[]);
    assert_eq!(status["gpt"][1]["valid"], true);
}

/// Bad disks: one line on stderr naming the problem, exit code 4, file unchanged.
#[test]
fn bad_disks_give_one_line_errors_and_stay_unchanged() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cases: Vec<(String, &str)> = Vec::new();

    let zeros = d.join("zeros.img");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    cases.push((zeros.display().to_string(), "no valid GPT"));

    let random = d.join("random.img");
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&random, noise).unwrap();
    cases.push((random.display().to_string(), "no valid GPT"));

    let tiny = d.join("tiny.img");
    std::fs::write(&tiny, vec![0u8; 1024]).unwrap();
    cases.push((tiny.display().to_string(), "too small"));

    let nolabels = d.join("nolabels.img");
    std::fs::File::create(&nolabels)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    tool_ok(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:0:+4M",
            "-c",
            "1:data",
            "-n",
            "2:0:+4M",
            "-c",
            "2:ROOT-B",
            nolabels.to_str().unwrap(),
        ],
    );
    cases.push((
        nolabels.display().to_string(),
        "no partition labelled ROOT-A",
    ));

    let dup = d.join("dup.img");
    std::fs::File::create(&dup)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    tool_ok(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:0:+4M",
            "-c",
            "1:ROOT-A",
            "-n",
            "2:0:+4M",
            "-c",
            "2:ROOT-B",
            "-n",
            "3:0:+4M",
            "-c",
            "3:ROOT-A",
            dup.to_str().unwrap(),
        ],
    );
    cases.push((dup.display().to_string(), "more than one partition (1, 3)"));

    // Truncated: the backup GPT and half of slot B are gone.
    let truncated = init(d, "truncated.img", &[]);
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    cases.push((truncated.clone(), "does not fit"));

    // Truncated inside the primary entry array: no copy can be read.
    let cut = init(d, "cut.img", &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(8192)
        .unwrap();
    cases.push((cut, "no valid GPT"));

    // An entry array larger than the disk, in both copies, with correct header CRCs.
    let huge = init(d, "huge.img", &[]);
    let mut bytes = std::fs::read(&huge).unwrap();
    let len = bytes.len();
    for header in [512usize, len - 512] {
        bytes[header + 80..header + 84].copy_from_slice(&0x0100_0000u32.to_le_bytes());
        bytes[header + 16..header + 20].copy_from_slice(&[0; 4]);
        let crc = crc32fast::hash(&bytes[header..header + 92]);
        bytes[header + 16..header + 20].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&huge, &bytes).unwrap();
    cases.push((huge, "larger than"));

    for (disk, expected) in &cases {
        for args in [
            vec!["status", "--disk", disk.as_str()],
            vec!["boot", "--disk", disk.as_str()],
            vec!["mark-good", "--disk", disk.as_str(), "--slot", "A"],
            vec![
                "set-attributes",
                "--disk",
                disk.as_str(),
                "--slot",
                "A",
                "--priority",
                "9",
            ],
        ] {
            let before = sha256_file(Path::new(disk));
            let out = abupdate(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(4), "{args:?}: {stderr}");
            assert_eq!(
                stderr.lines().count(),
                1,
                "{args:?}: not one line: {stderr}"
            );
            assert!(
                stderr.contains(expected),
                "{args:?}: expected {expected:?} in {stderr}"
            );
            assert_eq!(
                sha256_file(Path::new(disk)),
                before,
                "{args:?} changed {disk}"
            );
        }
    }
}

/// A missing file and a directory are clear errors too.
#[test]
fn missing_and_directory_disks() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let out = abupdate(&["status", "--disk", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    let out = abupdate(&["status", "--disk", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a disk image or block device"));
}
