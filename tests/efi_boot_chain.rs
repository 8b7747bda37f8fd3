//! The whole boot chain under real firmware: OVMF (QEMU, TCG) → abupdate's loader (the
//! shipped build, with this run's release key built in) → the slot's Unified Kernel Image
//! (the Debian cloud kernel and the QEMU harness's initramfs, built by scripts/build-uki) →
//! the initramfs hook → the slot's root filesystem, which runs the health commit and installs
//! the next bundle from a second virtio disk (scripts/qemu/rootfs-init).
//!
//! Each kernel carries a marker the initramfs prints (`KERNEL-MARKER v1`), so a line says which
//! slot's kernel runs, not only which root is mounted. The scenarios:
//! - a fresh disk boots slot A through the loader, and v2 (new kernel + new root) is installed
//!   into B from the running system;
//! - B boots with the v2 kernel, the hook does not spend a second try (the loader did), the
//!   health commit marks it good, and the next boot is B again with nothing written;
//! - v3, whose kernel panics before any abupdate code runs, is installed into A: the loader
//!   spends its tries, each boot ends in the panic, and then the loader falls back to B with
//!   no Linux code of ours having run in between;
//! - a KERN partition altered after install (one byte) is refused by the loader, which says
//!   why and boots the other slot;
//! - Secure Boot: OVMF enforcing with Debian's snakeoil test key boots the `sbsign`ed loader
//!   and UKI, refuses a loader with one byte changed, and refuses an unsigned UKI the loader
//!   hands it.
//!
//! Power cuts while the loader spends a try are tests/efi.rs's (the same write path).
//! Needs what tests/efi.rs and tests/qemu.rs need, plus objcopy (binutils), the systemd EFI
//! stub (systemd-boot-efi), and for Secure Boot sbsign (sbsigntool) and openssl; under
//! `CI=true` a missing one fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use common::ovmf::{
    build_loader, console_lines, ovmf_present, start_firmware, Firmware, PLAIN, SNAKEOIL_CERT,
    SNAKEOIL_KEY, SNAKEOIL_SECURE_BOOT,
};
use common::*;

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const COMPATIBLE: &str = "qemu-efi-x86_64";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command, panicking with its output when it fails; returns stdout.
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything the scenarios boot, built once per test process.
struct Assets {
    work: PathBuf,
    key_secret: PathBuf,
    key_public: PathBuf,
    loader: PathBuf,
    rootfs_v1: PathBuf,
    uki_v1: PathBuf,
    disk_v1: PathBuf,
    bundle_v2: PathBuf,
    bundle_v3_panic: PathBuf,
}

fn assets() -> Option<&'static Assets> {
    static ASSETS: OnceLock<Option<Assets>> = OnceLock::new();
    ASSETS.get_or_init(build_assets).as_ref()
}

fn build_assets() -> Option<Assets> {
    if !ovmf_present()
        || !have(
            "objcopy and the systemd EFI stub (Debian binutils, systemd-boot-efi)",
            on_path("objcopy") && Path::new(STUB).exists(),
        )
    {
        return None;
    }
    let t0 = Instant::now();
    let qemu_dir = match std::env::var_os("ABUPDATE_QEMU_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("target/qemu"),
    };
    let script = |name: &str| repo().join("scripts/qemu").join(name);
    run(Command::new(script("build-assets")).env("ABUPDATE_QEMU_DIR", &qemu_dir));
    let work = qemu_dir
        .join("work-efi")
        .join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let at = |name: &str| work.join(name);

    let key = at("release");
    abupdate_ok(&["keygen", "--out", key.to_str().unwrap()]);
    let (key_secret, key_public) = (at("release.key"), at("release.pub"));
    // The shipped loader, with this run's key built in and the harness's console.
    let loader = build_loader(
        &[],
        "target/boot-chain",
        &[
            ("ABUPDATE_LOADER_KEYS", key_public.to_str().unwrap()),
            ("ABUPDATE_LOADER_CMDLINE", "console=ttyS0 panic=1 quiet"),
        ],
    );

    let rootfs = |version: &str| {
        let out = at(&format!("rootfs-v{version}.img"));
        run(Command::new(script("build-rootfs"))
            .env("ABUPDATE_QEMU_DIR", &qemu_dir)
            .arg(version)
            .arg(&out)
            .args(["--size", "32M", "--key"])
            .arg(&key_public));
        out
    };
    // A UKI: the harness kernel and initramfs, plus the initrd that marks (or breaks) it.
    let uki = |name: &str, extra_initrd: &Path| {
        let out = at(&format!("uki-{name}.efi"));
        run(Command::new(repo().join("scripts/build-uki"))
            .arg("--kernel")
            .arg(qemu_dir.join("vmlinuz"))
            .arg("--initrd")
            .arg(qemu_dir.join("initramfs.cpio.gz"))
            .arg("--initrd")
            .arg(extra_initrd)
            .args(["--version", name, "--out"])
            .arg(&out));
        out
    };
    let marker = |text: &str| {
        let out = at(&format!("marker-{text}.cpio.gz"));
        run(Command::new(script("build-marker-initrd"))
            .arg(text)
            .arg(&out));
        out
    };
    let panic_initrd = at("panic.cpio.gz");
    run(Command::new(script("build-panic-initrd")).arg(&panic_initrd));
    let bundle = |version: &str, image: &Path, kernel: &Path| {
        let out = at(&format!("v{version}.abup"));
        create_bundle(
            image,
            Some(kernel),
            &key_secret,
            version,
            COMPATIBLE,
            &out,
            "256K",
        );
        out
    };
    let (rootfs_v1, rootfs_v2) = (rootfs("1"), rootfs("2"));
    let uki_v1 = uki("v1", &marker("v1"));
    // scripts/build-uki is reproducible: the same inputs give the same bytes (objcopy would
    // stamp the time into the PE header; the script puts the stub's back).
    let again = at("uki-v1-again.efi");
    std::fs::copy(&uki_v1, &again).unwrap();
    let _ = uki("v1", &at("marker-v1.cpio.gz"));
    assert_eq!(
        sha256_file(&uki_v1),
        sha256_file(&again),
        "scripts/build-uki gave different bytes for the same inputs"
    );
    let bundle_v1 = bundle("1", &rootfs_v1, &uki_v1);
    let bundle_v2 = bundle("2", &rootfs_v2, &uki("v2", &marker("v2")));
    // v3's root is fine; its kernel never reaches the initramfs's /init.
    let bundle_v3_panic = bundle("3", &rootfs_v2, &uki("v3-panic", &panic_initrd));

    let disk_v1 = at("disk-v1.img");
    chain_disk(&disk_v1, &loader, &bundle_v1, &key_public);
    eprintln!(
        "efi boot chain: assets ready in {:.1} s in {}",
        t0.elapsed().as_secs_f64(),
        work.display()
    );
    Some(Assets {
        work,
        key_secret,
        key_public,
        loader,
        rootfs_v1,
        uki_v1,
        disk_v1,
        bundle_v2,
        bundle_v3_panic,
    })
}

/// `disk init` of a disk with the boot chain (32 MiB kernel partitions, 40 MiB slots), `loader`
/// on its ESP and `bundle` seeded into the pair (KERN-A, ROOT-A).
fn chain_disk(disk: &Path, loader: &Path, bundle: &Path, keyring: &Path) {
    abupdate_ok(&[
        "disk",
        "init",
        disk.to_str().unwrap(),
        "--slot-size",
        "40M",
        "--kernel-size",
        "32M",
        "--efi",
        loader.to_str().unwrap(),
        "--seed",
        bundle.to_str().unwrap(),
        "--keyring",
        keyring.to_str().unwrap(),
    ]);
}

/// What one boot printed on the console.
struct Console {
    lines: Vec<String>,
}

impl Console {
    fn has(&self, text: &str) -> bool {
        self.lines.iter().any(|l| l.contains(text))
    }

    fn assert_has(&self, what: &str, texts: &[&str]) {
        for text in texts {
            assert!(
                self.has(text),
                "{what}: no line with {text:?}\n{}",
                self.tail()
            );
        }
    }

    fn assert_lacks(&self, what: &str, texts: &[&str]) {
        for text in texts {
            assert!(
                !self.has(text),
                "{what}: a line with {text:?}\n{}",
                self.tail()
            );
        }
    }

    /// The loader's, the kernel marker's, the hook's and the root's lines, for messages.
    fn tail(&self) -> String {
        let keep = [
            "abupdate-loader:",
            "KERNEL-MARKER",
            "abupdate:",
            "Kernel panic",
            "COMMIT",
            "BOOTED",
            "INSTALLED",
            "INITRAMFS-",
        ];
        self.lines
            .iter()
            .filter(|l| keep.iter().any(|k| l.contains(k)))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Boots `disk` (its own ESP) as the first virtio disk, with `bundle` (zero-padded to whole
/// sectors) as the second one when given, until the VM powers off or resets (`-no-reboot`).
fn boot(dir: &Path, disk: &Path, bundle: Option<&Path>) -> Console {
    boot_on(&PLAIN, dir, disk, bundle, None)
}

/// [`boot`] on `firmware`; the VM is also stopped at the first line containing `stop_at`.
fn boot_on(
    firmware: &Firmware,
    dir: &Path,
    disk: &Path,
    bundle: Option<&Path>,
    stop_at: Option<&str>,
) -> Console {
    let mut drives = vec![format!("if=virtio,format=raw,file={}", disk.display())];
    if let Some(bundle) = bundle {
        let padded = dir.join("bundle.padded");
        std::fs::copy(bundle, &padded).unwrap();
        tool_ok("truncate", &["-s", "%512", padded.to_str().unwrap()]);
        drives.push(format!(
            "if=virtio,format=raw,readonly=on,file={}",
            padded.display()
        ));
    }
    let started = Instant::now();
    let mut child = start_firmware(firmware, dir, 512, &drives);
    let lines = console_lines(&mut child);
    let deadline = started + Duration::from_secs(240);
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                let stop = stop_at.is_some_and(|s| line.contains(s));
                seen.push(line);
                if stop {
                    let _ = child.kill();
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the VM did not end within 240 s:\n{}",
                    Console { lines: seen }.tail()
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = child.wait();
    let console = Console { lines: seen };
    eprintln!(
        "efi boot chain: boot of {} in {:.1} s:\n{}",
        disk.display(),
        started.elapsed().as_secs_f64(),
        console.tail()
    );
    console
}

/// A per-test directory with a copy of the v1 disk.
fn fresh(name: &str) -> Option<(PathBuf, PathBuf)> {
    let a = assets()?;
    let dir = a.work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    tool_ok(
        "cp",
        &[
            "--sparse=always",
            a.disk_v1.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    Some((dir, disk))
}

/// (priority, tries, successful) of ROOT-A and ROOT-B, as Debian's cgpt reads them (the
/// partitions: 1 ESP, 2 KERN-A, 3 ROOT-A, 4 KERN-B, 5 ROOT-B).
fn roots(disk: &Path) -> [(u8, u8, bool); 2] {
    let d = disk.to_str().unwrap();
    [cgpt_fields(d, 3), cgpt_fields(d, 5)]
}

#[test]
fn efi_boot_chain_updates_kernel_and_root_together_and_falls_back_from_a_panicking_kernel() {
    let Some((dir, disk)) = fresh("chain") else {
        return;
    };
    let a = assets().unwrap();

    // 1. A fresh disk boots A through the loader; v2 is installed into B from the system.
    let c = boot(&dir, &disk, Some(&a.bundle_v2));
    c.assert_has(
        "fresh disk",
        &[
            "abupdate-loader: chose ROOT-A",
            "abupdate-loader: kernel of ROOT-A version 1 verified",
            "KERNEL-MARKER v1",
            "abupdate: booting ROOT-A version 1",
            "chosen by loader",
            "BOOTED ROOT-A 1 good",
            "INSTALLED 0",
        ],
    );
    assert_eq!(roots(&disk)[1], (2, 3, false), "v2 in ROOT-B, on trial");

    // 2. B boots with the v2 kernel; the loader spent the try, the hook spends none.
    let c = boot(&dir, &disk, None);
    c.assert_has(
        "v2 trial",
        &[
            "abupdate-loader: chose ROOT-B",
            "P2 T3 S0 -> P2 T2 S0",
            "KERNEL-MARKER v2",
            "abupdate: booting ROOT-B version 2 (trial=1, tries left 2, chosen by loader)",
            "COMMIT 0",
            "BOOTED ROOT-B 2 good",
        ],
    );
    assert!(roots(&disk)[1].2, "the health commit marked ROOT-B good");

    // 3. Committed: B again, nothing written; v3 (its kernel panics) goes into A.
    let c = boot(&dir, &disk, Some(&a.bundle_v3_panic));
    c.assert_has(
        "v2 committed",
        &[
            "abupdate-loader: chose ROOT-B",
            "0 GPT bytes written",
            "KERNEL-MARKER v2",
            "BOOTED ROOT-B 2 good",
            "INSTALLED 0",
        ],
    );
    let [root_a, _] = roots(&disk);
    assert_eq!((root_a.1, root_a.2), (3, false), "v3 in ROOT-A, on trial");

    // 4. Each boot of A spends a try and dies in its kernel: no abupdate code runs.
    for try_number in 1..=3 {
        let c = boot(&dir, &disk, None);
        let what = format!("v3 try {try_number}");
        c.assert_has(&what, &["abupdate-loader: chose ROOT-A", "Kernel panic"]);
        c.assert_lacks(&what, &["KERNEL-MARKER", "abupdate: booting", "BOOTED"]);
    }
    assert_eq!(roots(&disk)[0], (0, 0, false), "ROOT-A's tries are spent");

    // 5. The loader falls back to B by itself.
    let c = boot(&dir, &disk, None);
    c.assert_has(
        "fallback",
        &[
            "abupdate-loader: chose ROOT-B",
            "KERNEL-MARKER v2",
            "BOOTED ROOT-B 2 good",
        ],
    );
    c.assert_lacks("fallback", &["chose ROOT-A"]);
    assert_sgdisk_clean(disk.to_str().unwrap());
}

#[test]
fn efi_a_kern_partition_altered_after_install_is_refused_and_the_other_slot_boots() {
    let Some((dir, disk)) = fresh("altered") else {
        return;
    };
    let a = assets().unwrap();
    let d = disk.to_str().unwrap();
    // v2 installed into B (on trial), as an install on the running A leaves it.
    abupdate_ok(&[
        "install",
        a.bundle_v2.to_str().unwrap(),
        "--disk",
        d,
        "--keyring",
        a.key_public.to_str().unwrap(),
        "--running",
        "ROOT-A",
        "--no-sentinel",
    ]);
    assert_eq!(roots(&disk)[1], (2, 3, false));
    // One byte of KERN-B's kernel flipped.
    let (kern_b, _) = partition_range(d, 4);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[kern_b as usize + 4096] ^= 0x20;
    std::fs::write(&disk, &bytes).unwrap();
    drop(bytes);

    let c = boot(&dir, &disk, None);
    c.assert_has(
        "altered KERN-B",
        &[
            "abupdate-loader: chose ROOT-B",
            "refusing the kernel of ROOT-B: KERN-B: the kernel does not match its signed hash",
            "ROOT-B marked bad",
            "abupdate-loader: chose ROOT-A",
            "KERNEL-MARKER v1",
            "BOOTED ROOT-A 1 good",
        ],
    );
    c.assert_lacks("altered KERN-B", &["KERNEL-MARKER v2"]);
    assert_eq!(roots(&disk)[1], (0, 0, false), "ROOT-B is marked bad");
    assert_eq!(roots(&disk)[0], (1, 0, true), "ROOT-A is as it was");
}

/// Secure Boot (OVMF with the snakeoil key enrolled, enforcing): the loader and the UKI signed
/// with `sbsign` boot; a loader with one byte changed is not started by the firmware; a UKI
/// that is not signed is refused by the firmware when the loader loads it, and the loader
/// says so. Firmware → loader → kernel is a verified chain.
#[test]
fn efi_secure_boot_verifies_the_loader_and_each_kernel_it_starts() {
    let Some((dir, _)) = fresh("secure-boot") else {
        return;
    };
    if !have(
        "sbsign (sbsigntool), openssl and OVMF's snakeoil Secure Boot files",
        on_path("sbsign")
            && on_path("openssl")
            && [
                SNAKEOIL_SECURE_BOOT.code,
                SNAKEOIL_SECURE_BOOT.vars,
                SNAKEOIL_KEY,
                SNAKEOIL_CERT,
            ]
            .iter()
            .all(|f| Path::new(f).exists()),
    ) {
        return;
    }
    let a = assets().unwrap();
    let at = |name: &str| dir.join(name);
    let key = at("snakeoil.key");
    run(Command::new("openssl")
        .args([
            "pkey",
            "-passin",
            "pass:snakeoil",
            "-in",
            SNAKEOIL_KEY,
            "-out",
        ])
        .arg(&key));
    let sign = |input: &Path, name: &str| {
        let out = at(name);
        run(Command::new("sbsign")
            .arg("--key")
            .arg(&key)
            .args(["--cert", SNAKEOIL_CERT, "--output"])
            .arg(&out)
            .arg(input));
        out
    };
    let loader = sign(&a.loader, "loader.signed.efi");
    let mut tampered = std::fs::read(&loader).unwrap();
    tampered[0x1000] ^= 0x01;
    let tampered_loader = at("loader.tampered.efi");
    std::fs::write(&tampered_loader, tampered).unwrap();
    let uki = sign(&a.uki_v1, "uki-v1.signed.efi");
    let disk = |name: &str, loader: &Path, kernel: &Path| {
        let bundle = at(&format!("{name}.abup"));
        let image = &a.rootfs_v1;
        create_bundle(
            image,
            Some(kernel),
            &a.key_secret,
            "1",
            COMPATIBLE,
            &bundle,
            "256K",
        );
        let disk = at(&format!("{name}.img"));
        chain_disk(&disk, loader, &bundle, &a.key_public);
        disk
    };
    let sb = &SNAKEOIL_SECURE_BOOT;

    let c = boot_on(sb, &dir, &disk("signed", &loader, &uki), None, None);
    c.assert_has(
        "signed chain",
        &[
            "abupdate-loader: secure boot on",
            "abupdate-loader: chose ROOT-A",
            "KERNEL-MARKER v1",
            "BOOTED ROOT-A 1 good",
        ],
    );

    // The firmware refuses the changed loader and falls through its boot options.
    let c = boot_on(
        sb,
        &dir,
        &disk("tampered-loader", &tampered_loader, &uki),
        None,
        Some("No bootable option"),
    );
    c.assert_has("tampered loader", &["Access Denied"]);
    c.assert_lacks("tampered loader", &["abupdate-loader:", "KERNEL-MARKER"]);

    // An unsigned kernel image passes our own check (our key signed the bundle) but not the
    // firmware's: the loader reports the refusal and starts nothing.
    let c = boot_on(
        sb,
        &dir,
        &disk("unsigned-kernel", &loader, &a.uki_v1),
        None,
        None,
    );
    c.assert_has(
        "unsigned UKI",
        &[
            "kernel of ROOT-A version 1 verified",
            "kernel of ROOT-A: the firmware refused to load it",
            "no bootable slot",
        ],
    );
    c.assert_lacks("unsigned UKI", &["KERNEL-MARKER"]);
}
