//! OVMF virtual machines for the boot-chain tests: building the loader, a FAT ESP holding it,
//! and QEMU (TCG) with OVMF's code and a fresh copy of its variable store per VM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::{have, on_path, tool_ok};

/// OVMF's firmware code (Debian `ovmf`), read-only pflash.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Its variable store template, copied per VM.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// True when QEMU, OVMF and the FAT tools are here; otherwise says which are missing (and
/// fails under `CI=true`, see [`have`]).
pub fn ovmf_present() -> bool {
    let present = on_path("qemu-system-x86_64")
        && Path::new(OVMF_CODE).exists()
        && Path::new(OVMF_VARS).exists()
        && on_path("mkfs.vfat")
        && on_path("mcopy");
    have(
        "qemu-system-x86_64, OVMF, mkfs.vfat and mcopy (Debian qemu-system-x86, ovmf, dosfstools, mtools)",
        present,
    )
}

/// Builds the loader (`loader/`, target x86_64-unknown-uefi) with `features` into its own
/// `target_dir` (relative to `loader/`), with `env` set for its build script (trusted keys,
/// command line), and returns the `.efi`.
pub fn build_loader(features: &[&str], target_dir: &str, env: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("loader");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&dir)
        .args(["build", "--release", "--quiet", "--target-dir", target_dir]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cargo");
    assert!(
        out.status.success(),
        "building the loader ({features:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(target_dir)
        .join("x86_64-unknown-uefi/release/abupdate-loader.efi")
}

/// A FAT ESP image `dir/NAME.img` holding `loader` as `\EFI\BOOT\BOOTX64.EFI`, the path
/// firmware boots.
pub fn make_esp(dir: &Path, name: &str, loader: &Path) -> PathBuf {
    let esp = dir.join(format!("{name}.img"));
    let img = esp.to_str().unwrap();
    tool_ok("truncate", &["-s", "34M", img]);
    tool_ok("mkfs.vfat", &["-F", "32", "-n", "ESP", img]);
    tool_ok("mmd", &["-i", img, "::/EFI", "::/EFI/BOOT"]);
    tool_ok(
        "mcopy",
        &[
            "-i",
            img,
            loader.to_str().unwrap(),
            "::/EFI/BOOT/BOOTX64.EFI",
        ],
    );
    esp
}

/// Which OVMF build a VM runs.
pub struct Firmware {
    /// The code image (read-only pflash).
    pub code: &'static str,
    /// The variable store template (copied per VM).
    pub vars: &'static str,
    /// Secure Boot builds need SMM and a secure pflash.
    pub secure_boot: bool,
}

/// OVMF without Secure Boot.
pub const PLAIN: Firmware = Firmware {
    code: OVMF_CODE,
    vars: OVMF_VARS,
    secure_boot: false,
};

/// Debian's OVMF with Secure Boot enforced and the "snakeoil" test key enrolled in PK, KEK and
/// db (its private key and certificate ship in `ovmf` for testers: [`SNAKEOIL_KEY`],
/// [`SNAKEOIL_CERT`], password `snakeoil`).
pub const SNAKEOIL_SECURE_BOOT: Firmware = Firmware {
    code: "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd",
    vars: "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd",
    secure_boot: true,
};
/// The snakeoil signing key (encrypted, password `snakeoil`).
pub const SNAKEOIL_KEY: &str = "/usr/share/ovmf/PkKek-1-snakeoil.key";
/// Its certificate.
pub const SNAKEOIL_CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";

/// Starts OVMF (q35, TCG, `-no-reboot`: a reset ends the VM) with `memory_mib` and these
/// drives, each a `-drive` option value such as `format=raw,file=disk.img`. The console,
/// mirrored to the serial line, comes out on the child's stdout.
pub fn start_ovmf(dir: &Path, memory_mib: u32, drives: &[String]) -> Child {
    start_firmware(&PLAIN, dir, memory_mib, drives)
}

/// [`start_ovmf`] on the given firmware.
pub fn start_firmware(
    firmware: &Firmware,
    dir: &Path,
    memory_mib: u32,
    drives: &[String],
) -> Child {
    let vars = dir.join("vars.fd");
    std::fs::copy(firmware.vars, &vars).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64");
    if firmware.secure_boot {
        qemu.args(["-machine", "q35,smm=on"])
            .args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
    } else {
        qemu.args(["-machine", "q35"]);
    }
    qemu.args(["-accel", "tcg"])
        .args(["-m", &memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-net", "none"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            firmware.code
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    for drive in drives {
        qemu.arg("-drive").arg(drive);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64")
}

/// The VM's console lines (carriage returns and escape sequences' line noise kept out), sent
/// as they come; the channel closes when the VM ends.
pub fn console_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut raw = Vec::new();
        while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
            let line = String::from_utf8_lossy(&raw).replace('\r', "");
            let _ = tx.send(line.trim_end().to_string());
            raw.clear();
        }
    });
    rx
}
