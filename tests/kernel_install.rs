//! Bundles with a kernel and their install into a slot that is a pair (KERN-x, ROOT-x), on
//! disk images made by `disk init --kernel-size`, checked with the binary and with sgdisk/cgpt.
//!
//! - `bundle create --kernel`: `bundle verify` and `info` see the kernel; a flipped byte in the
//!   kernel's frames, a cut inside them, and bytes after them are refused;
//! - `install` writes the root into ROOT-B and the kernel into KERN-B, records both and the
//!   signed header, flips once; `--adaptive` copies kernel chunks from the running KERN-A;
//!   `mark-good` verifies the pair (a changed KERN byte is refused);
//! - mismatches are refused before anything is written (exit 8 or 3, disk byte-identical): a
//!   kernel bundle on a disk without KERN partitions, a bundle without a kernel on a paired
//!   slot, a kernel larger than KERN-x.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const BOARD: &str = "test-board";

/// A disk with the boot chain, v1 (root + kernel) seeded into the pair (KERN-A, ROOT-A).
fn chain_disk(dir: &Path) -> Option<String> {
    if !have_gpt_tools()
        || !have(
            "mkfs.vfat (dosfstools)",
            on_path("mkfs.vfat") && on_path("mcopy"),
        )
    {
        return None;
    }
    let (image, kernel) = (dir.join("v1.img"), dir.join("uki-v1.efi"));
    make_image(&image, 600 * 1024 + 5, 1);
    make_image(&kernel, 300 * 1024 + 1, 11);
    make_kernel_bundle(&image, &kernel, "1", BOARD, &dir.join("v1.abup"), "64K");
    let disk = dir.join("disk.img").display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "2M",
        "--kernel-size",
        "1M",
        "--esp-size",
        "1M",
        "--seed",
        dir.join("v1.abup").to_str().unwrap(),
        "--keyring",
        test_pubkey().to_str().unwrap(),
    ]);
    Some(disk)
}

/// v2: a new root and a kernel that shares most chunks with v1's (chunk 1 changed).
fn v2_bundle(dir: &Path) -> (PathBuf, Vec<u8>) {
    let image = dir.join("v2.img");
    make_image(&image, 700 * 1024, 2);
    let mut kernel = std::fs::read(dir.join("uki-v1.efi")).unwrap();
    kernel[65536 + 10] ^= 0x11;
    kernel.extend_from_slice(b"v2 kernel tail");
    let kernel_path = dir.join("uki-v2.efi");
    std::fs::write(&kernel_path, &kernel).unwrap();
    let bundle = dir.join("v2.abup");
    make_kernel_bundle(&image, &kernel_path, "2", BOARD, &bundle, "64K");
    (bundle, kernel)
}

#[test]
fn a_kernel_bundle_verifies_and_damage_in_its_kernel_part_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (image, kernel) = (dir.path().join("i.img"), dir.path().join("k.efi"));
    make_image(&image, 300 * 1024, 3);
    make_image(&kernel, 200 * 1024 + 9, 4);
    let bundle = dir.path().join("b.abup");
    make_kernel_bundle(&image, &kernel, "1", BOARD, &bundle, "64K");
    let key = test_pubkey().display().to_string();
    let b = bundle.to_str().unwrap();
    let json: serde_json::Value = serde_json::from_str(&abupdate_ok(&[
        "bundle", "verify", b, "--pubkey", &key, "--json",
    ]))
    .unwrap();
    assert_eq!(json["kernel"][0], 200 * 1024 + 9, "{json}");
    assert_eq!(json["kernel"][1], sha256_file(&kernel), "{json}");
    let info = abupdate_ok(&["bundle", "info", b]);
    assert!(
        info.contains("kernel:") && info.contains("4 chunks"),
        "{info}"
    );

    let bytes = std::fs::read(&bundle).unwrap();
    let len = bytes.len();
    let damaged = dir.path().join("damaged.abup");
    let d = damaged.to_str().unwrap();
    // The kernel's frames are the file's last bytes: flip one, cut one off, add one.
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = bytes.clone();
    flipped[len - 100] ^= 0x01;
    cases.push(("a flipped byte in the kernel's last frame", flipped));
    cases.push(("a cut inside the kernel part", bytes[..len - 1].to_vec()));
    let mut longer = bytes.clone();
    longer.push(0);
    cases.push(("a byte after the kernel part", longer));
    for (what, data) in cases {
        std::fs::write(&damaged, data).unwrap();
        let out = abupdate(&["bundle", "verify", d, "--pubkey", &key]);
        assert_eq!(out.status.code(), Some(3), "{what}: {out:?}");
    }
}

#[test]
fn install_writes_kernel_and_root_into_the_pair_and_records_both() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = chain_disk(dir.path()) else {
        return;
    };
    let (bundle, kernel) = v2_bundle(dir.path());
    let kern_a_before = {
        let (o, l) = partition_range(&disk, 2);
        sha256_range(Path::new(&disk), o, l)
    };
    let mut args = install_args(bundle.to_str().unwrap(), &disk);
    args.extend(["--adaptive".to_string(), "--json".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = abupdate_ok(&args);
    // The adaptive plans: one for ROOT-A (nothing shared), one for KERN-A (all but chunk 1
    // and the changed tail).
    let plans: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "adaptive-plan")
        .collect();
    assert_eq!(plans.len(), 2, "{out}");
    assert_eq!(plans[1]["running"], "KERN-A", "{out}");
    assert_eq!(plans[1]["reused_chunks"], 3, "{out}");
    assert!(out.contains("\"event\":\"kernel-part\""), "{out}");

    // KERN-B holds the kernel, KERN-A and ROOT-A are as they were.
    let (kern_b, _) = partition_range(&disk, 4);
    assert_eq!(
        sha256_range(Path::new(&disk), kern_b, kernel.len() as u64),
        hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &kernel
        )))
    );
    let (o, l) = partition_range(&disk, 2);
    assert_eq!(sha256_range(Path::new(&disk), o, l), kern_a_before);
    assert_eq!(cgpt_fields(&disk, 5), (2, 3, false));
    assert_eq!(cgpt_fields(&disk, 4), (0, 0, false), "no bits on KERN-B");
    let st = status_json(&disk, &[]);
    assert_eq!(st["slots"][1]["version"], "2", "{st}");
    assert_eq!(st["slots"][1]["kernel_partition"], 4, "{st}");
    // The health commit verifies the pair: a byte of KERN-B changed since the install makes
    // mark-good refuse (exit 8, nothing written); the intact pair is marked good.
    let altered = dir.path().join("altered.img");
    std::fs::copy(&disk, &altered).unwrap();
    let mut bytes = std::fs::read(&altered).unwrap();
    bytes[kern_b as usize + 100] ^= 0x01;
    std::fs::write(&altered, bytes).unwrap();
    let before = sha256_file(&altered);
    let a = altered.to_str().unwrap();
    let out = abupdate(&["mark-good", "--disk", a, "--slot", "ROOT-B"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("KERN-B of version 2"), "{stderr}");
    assert_eq!(sha256_file(&altered), before);
    abupdate_ok(&["mark-good", "--disk", &disk, "--slot", "ROOT-B"]);
    assert_sgdisk_clean(&disk);
}

#[test]
fn mismatched_bundles_and_layouts_are_refused_with_the_disk_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = chain_disk(dir.path()) else {
        return;
    };
    // A bundle without a kernel on a paired slot.
    let image = dir.path().join("plain.img");
    make_image(&image, 100 * 1024, 5);
    let plain = dir.path().join("plain.abup");
    make_bundle_chunked(&image, "2", BOARD, &plain, "64K");
    // A kernel larger than KERN-x (1 MiB).
    let big = dir.path().join("big.efi");
    make_image(&big, 1024 * 1024 + 1, 6);
    let too_big = dir.path().join("too-big.abup");
    make_kernel_bundle(&image, &big, "2", BOARD, &too_big, "64K");
    // A kernel bundle on a disk without kernel partitions.
    let plain_disk = dir.path().join("plain-disk.img").display().to_string();
    std::fs::create_dir_all(dir.path().join("plain")).unwrap();
    let seeded = seeded_disk(&dir.path().join("plain"));
    let (bundle, _) = v2_bundle(dir.path());
    std::fs::copy(&seeded, &plain_disk).unwrap();

    for (what, bundle, disk, code, text) in [
        (
            "no kernel",
            &plain,
            &disk,
            8,
            "the bundle carries no kernel",
        ),
        (
            "kernel too large",
            &too_big,
            &disk,
            3,
            "does not fit slot KERN-B",
        ),
        (
            "no KERN partition",
            &bundle,
            &plain_disk,
            8,
            "has no kernel partition",
        ),
    ] {
        let before = sha256_file(Path::new(disk));
        let args = install_args(bundle.to_str().unwrap(), disk);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = abupdate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{what}: {stderr}");
        assert!(stderr.contains(text), "{what}: {stderr}");
        let errors = stderr.lines().filter(|l| l.starts_with("abupdate: error:"));
        assert_eq!(errors.count(), 1, "{what}: one error line: {stderr}");
        assert_eq!(
            sha256_file(Path::new(disk)),
            before,
            "{what}: the disk changed"
        );
    }
}

#[test]
fn behind_the_loader_abupdate_boot_spends_no_second_try_and_status_says_who_chose() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = chain_disk(dir.path()) else {
        return;
    };
    let (bundle, _) = v2_bundle(dir.path());
    let args = install_args(bundle.to_str().unwrap(), &disk);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    abupdate_ok(&args);
    assert_eq!(cgpt_fields(&disk, 5), (2, 3, false));
    // The loader chose ROOT-B and spent its try (as it would: T3 -> T2).
    abupdate_ok(&[
        "set-attributes",
        "--disk",
        &disk,
        "--slot",
        "ROOT-B",
        "--tries",
        "2",
    ]);
    let before = sha256_file(Path::new(&disk));
    let cmdline = dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        "root=PARTUUID=x abupdate.slot=ROOT-B abupdate.loader=1 console=ttyS0\n",
    )
    .unwrap();
    let c = cmdline.to_str().unwrap();
    let env = abupdate_ok(&["boot", "--disk", &disk, "--kernel-cmdline", c]);
    assert!(env.contains("ABUPDATE_SLOT='ROOT-B'"), "{env}");
    assert!(env.contains("ABUPDATE_CHOSEN_BY=loader"), "{env}");
    assert!(env.contains("ABUPDATE_TRIES_LEFT=2"), "{env}");
    assert_eq!(
        sha256_file(Path::new(&disk)),
        before,
        "a second try was spent"
    );
    // Without the loader's words the hook chooses and spends, as always.
    std::fs::write(&cmdline, "console=ttyS0\n").unwrap();
    let env = abupdate_ok(&["boot", "--disk", &disk, "--kernel-cmdline", c]);
    assert!(env.contains("ABUPDATE_CHOSEN_BY=abupdate-boot"), "{env}");
    assert_eq!(cgpt_fields(&disk, 5), (2, 1, false));
}

#[test]
fn a_boot_chain_disk_too_small_says_what_it_must_hold() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("small.img");
    let out = abupdate(&[
        "disk",
        "init",
        disk.to_str().unwrap(),
        "--slot-size",
        "1M",
        "--kernel-size",
        "256K",
        "--esp-size",
        "1M",
        "--disk-size",
        "6M",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .contains("an EFI system partition, two kernel partitions and two 1048576-byte slots")
            && stderr.contains("needs at least 6308352 bytes"),
        "{stderr}"
    );
    assert!(!disk.exists(), "nothing is created");
}
