//! The UEFI loader (`loader/`) under real firmware: OVMF in QEMU (TCG) boots the loader from a
//! FAT ESP, the loader finds the A/B disk through Block I/O, reads and validates its GPT, chooses
//! the slot and spends its try with `abupdate-core`, prints the choice and powers off.
//!
//! - a fresh disk: ROOT-A, nothing written;
//! - a slot on trial after a real install: each boot spends one try, and the disk the loader
//!   leaves is byte-identical to the one `abupdate boot` leaves from the same start (the same
//!   core code decides and writes); after the tries, ROOT-A again, as cgpt reads it;
//! - power cuts while the loader spends a try: a test build of the loader (feature
//!   `power-cut-test`) pauses after each GPT write and flush, and the VM is killed in every
//!   pause; each cut leaves the old or the new attributes (never a mix), and the next boot
//!   chooses a slot and leaves a table `sgdisk -v` finds clean.
//!
//! These use a test build that powers off after the choice (the disks hold no kernels);
//! tests/efi_boot_chain.rs boots real kernels through the shipped build.
//!
//! Needs qemu-system-x86_64, OVMF (Debian `ovmf`), `mkfs.vfat` (`dosfstools`), `mcopy`
//! (`mtools`) and the `x86_64-unknown-uefi` Rust target; under `CI=true` a missing one fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use common::ovmf::{build_loader, console_lines, make_esp, ovmf_present, start_ovmf};
use common::*;

/// The two loader builds these tests use; both stop after the choice (feature
/// `stop-after-choice`): the disks here hold no kernels, and what is tested is the choice and
/// its writes. tests/efi_boot_chain.rs boots real kernels with the shipped build.
struct Loaders {
    shipped: PathBuf,
    power_cut: PathBuf,
}

/// Builds the loader (once per test process), or `None` when a facility is missing outside CI.
fn loaders() -> Option<&'static Loaders> {
    static LOADERS: OnceLock<Option<Loaders>> = OnceLock::new();
    LOADERS
        .get_or_init(|| {
            if !ovmf_present() {
                return None;
            }
            Some(Loaders {
                shipped: build_loader(&["stop-after-choice"], "target/choice", &[]),
                power_cut: build_loader(
                    &["stop-after-choice", "power-cut-test"],
                    "target/power-cut",
                    &[],
                ),
            })
        })
        .as_ref()
}

/// Starts OVMF with the ESP as the first disk and the A/B disk as the second; the console
/// (mirrored to serial) comes out on stdout.
fn start_vm(dir: &Path, esp: &Path, disk: &str) -> Child {
    start_vm_with(dir, &[&esp.display().to_string(), disk])
}

/// Starts OVMF with these raw drives, in order.
fn start_vm_with(dir: &Path, drives: &[&str]) -> Child {
    let drives: Vec<String> = drives
        .iter()
        .map(|d| format!("format=raw,file={d}"))
        .collect();
    start_ovmf(dir, 256, &drives)
}

/// The loader's lines ("abupdate-loader: …") as the VM prints them.
fn loader_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let all = console_lines(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in all {
            if let Some(i) = line.find("abupdate-loader: ") {
                let _ = tx.send(line[i..].to_string());
            }
        }
    });
    rx
}

/// Boots the shipped loader once and returns its last line (the choice, or why not).
fn boot(dir: &Path, esp: &Path, disk: &str) -> String {
    let mut child = start_vm(dir, esp, disk);
    let lines = loader_lines(&mut child);
    finish(child, lines)
}

/// Waits for the VM to power off and returns the loader's last line.
fn finish(mut child: Child, lines: mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => last = Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("the VM did not power off within 120 s (last loader line: {last:?})");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "qemu: {status}");
    last.expect("the loader printed nothing")
}

/// ROOT-A holds v1 (seeded, committed); v2 is installed into ROOT-B, on trial with two tries.
fn disk_with_a_trial(dir: &Path) -> String {
    let disk = seeded_disk(dir);
    let mut args = install_args(dir.join("v2.abup").to_str().unwrap(), &disk);
    args.extend(["--tries".to_string(), "2".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    abupdate_ok(&args);
    disk
}

/// Boots the VM with `disk` as its only drive (its own ESP) and returns the loader's last line.
fn boot_single_disk(dir: &Path, disk: &str) -> String {
    let mut child = start_vm_with(dir, &[disk]);
    let lines = loader_lines(&mut child);
    finish(child, lines)
}

#[test]
fn efi_disk_init_with_a_boot_chain_is_booted_by_the_firmware() {
    if !have_gpt_tools() {
        return;
    }
    let Some(l) = loaders() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img").display().to_string();
    let loader = l.shipped.display().to_string();
    abupdate_ok(&[
        "disk",
        "init",
        &disk,
        "--slot-size",
        "4M",
        "--kernel-size",
        "1M",
        "--efi",
        &loader,
    ]);
    assert_sgdisk_clean(&disk);
    // ChromeOS order and types; cgpt names the kernel partitions' type itself.
    let table = tool_ok("cgpt", &["show", &disk]);
    for (n, label) in ["EFI-SYSTEM", "KERN-A", "ROOT-A", "KERN-B", "ROOT-B"]
        .iter()
        .enumerate()
    {
        let i = (n + 1).to_string();
        assert_eq!(tool_ok("cgpt", &["show", "-i", &i, "-l", &disk]), *label);
    }
    assert!(table.contains("EFI System Partition"), "{table}");
    assert_eq!(table.matches("ChromeOS kernel").count(), 2, "{table}");
    // Attributes live on the ROOT partitions only.
    assert_eq!(cgpt_fields(&disk, 2), (0, 0, false));
    assert_eq!(cgpt_fields(&disk, 3), (2, 0, true));
    // The ESP is a FAT file system fsck finds clean, holding the loader byte for byte.
    let (first, len) = partition_range(&disk, 1);
    let esp = dir.path().join("esp.img");
    let bytes = std::fs::read(&disk).unwrap();
    std::fs::write(&esp, &bytes[first as usize..(first + len) as usize]).unwrap();
    let (clean, report) = tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    assert!(clean, "fsck.vfat: {report}");
    let copy = dir.path().join("copy.efi");
    tool_ok(
        "mcopy",
        &[
            "-i",
            esp.to_str().unwrap(),
            "::/EFI/BOOT/BOOTX64.EFI",
            copy.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256_file(&copy), sha256_file(&l.shipped));
    // Firmware boots the disk on its own: the loader finds its slots on the same disk.
    let line = boot_single_disk(dir.path(), &disk);
    assert!(line.contains("chose ROOT-A"), "{line}");
}

#[test]
fn efi_a_fresh_disk_boots_root_a_and_nothing_is_written() {
    let Some(l) = loaders() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img").display().to_string();
    abupdate_ok(&["disk", "init", &disk, "--slot-size", "4M"]);
    let before = sha256_file(Path::new(&disk));
    let esp = make_esp(dir.path(), "esp", &l.shipped);
    let line = boot(dir.path(), &esp, &disk);
    assert!(line.contains("chose ROOT-A"), "{line}");
    assert!(line.contains("0 GPT bytes written"), "{line}");
    assert_eq!(
        sha256_file(Path::new(&disk)),
        before,
        "a committed slot spends no try"
    );
}

#[test]
fn efi_the_loader_spends_tries_exactly_as_abupdate_boot() {
    if !have_gpt_tools() {
        return;
    }
    let Some(l) = loaders() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with_a_trial(dir.path());
    let hook = dir.path().join("hook.img").display().to_string();
    std::fs::copy(&disk, &hook).unwrap();
    let esp = make_esp(dir.path(), "esp", &l.shipped);
    for expected in ["ROOT-B", "ROOT-B", "ROOT-A"] {
        let line = boot(dir.path(), &esp, &disk);
        assert!(line.contains(&format!("chose {expected}")), "{line}");
        let env = abupdate_ok(&["boot", "--disk", &hook, "--format", "env"]);
        assert!(
            env.contains(&format!("ABUPDATE_SLOT='{expected}'")),
            "{env}"
        );
        assert_eq!(
            sha256_file(Path::new(&disk)),
            sha256_file(Path::new(&hook)),
            "the loader and `abupdate boot` left different disks after choosing {expected}"
        );
    }
    // Two boots spent both tries (the second leaves P0 T0, as cgptlib does); cgpt agrees.
    assert_eq!(cgpt_fields(&disk, 2), (0, 0, false));
    assert_eq!(cgpt_fields(&disk, 1), (1, 0, true));
    assert_sgdisk_clean(&disk);
}

#[test]
fn efi_power_cut_while_the_loader_spends_a_try() {
    if !have_gpt_tools() {
        return;
    }
    let Some(l) = loaders() else { return };
    let dir = tempfile::tempdir().unwrap();
    let template = disk_with_a_trial(dir.path());
    let esp_cut = make_esp(dir.path(), "esp-power-cut", &l.power_cut);
    let esp = make_esp(dir.path(), "esp", &l.shipped);
    let old = cgpt_fields(&template, 2);
    assert_eq!(old, (2, 2, false), "the install left ROOT-B on trial");
    let new = (2, 1, false);
    let mut cut = 1;
    loop {
        let disk = dir
            .path()
            .join(format!("cut-{cut}.img"))
            .display()
            .to_string();
        std::fs::copy(&template, &disk).unwrap();
        let mut child = start_vm(dir.path(), &esp_cut, &disk);
        let lines = loader_lines(&mut child);
        let mut pauses = 0;
        let mut finished = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        while pauses < cut {
            match lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) if line.contains("power-cut-test:") => pauses += 1,
                Ok(line) if line.contains("chose") => {
                    finished = true;
                    break;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the VM ended early"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    assert!(Instant::now() < deadline, "no pause {cut} within 120 s");
                }
            }
        }
        // The power cut: the loader is inside its pause after write or flush number `cut`.
        let _ = child.kill();
        let _ = child.wait();
        if finished {
            // Every pause was cut at; this run got through them all.
            assert!(cut > 4, "only {} pauses", cut - 1);
            eprintln!(
                "efi power cuts: {} cut points, each left old or new attributes",
                cut - 1
            );
            break;
        }
        let after = cgpt_fields(&disk, 2);
        assert!(
            after == old || after == new,
            "cut {cut}: ROOT-B is {after:?}, neither the old {old:?} nor the new {new:?}"
        );
        assert_eq!(
            cgpt_fields(&disk, 1),
            (1, 0, true),
            "cut {cut}: ROOT-A changed"
        );
        // The next boot (the shipped loader) chooses a slot and repairs whatever copy the
        // cut left stale.
        let line = boot(dir.path(), &esp, &disk);
        assert!(line.contains("chose ROOT-"), "cut {cut}: {line}");
        assert_sgdisk_clean(&disk);
        let json = status_json(&disk, &[]);
        assert!(
            !json.to_string().contains("stale"),
            "cut {cut}: a stale copy survived the next boot: {json}"
        );
        cut += 1;
    }
}
