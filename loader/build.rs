//! Build-time configuration of the loader, from the environment:
//!
//! - `ABUPDATE_LOADER_KEYS`: a public key file (`abupdate keygen`'s `NAME.pub`) or a directory
//!   whose `*.pub` files are all trusted. The keys are compiled in: the loader starts only a
//!   kernel whose slot record holds a bundle header signed by one of them. Without it the
//!   loader is built with no trusted key and refuses every kernel (it says so at boot).
//! - `ABUPDATE_LOADER_CMDLINE`: kernel command-line words the loader adds after
//!   `root=PARTUUID=… abupdate.slot=… abupdate.loader=1` (default: consoles on the screen and
//!   the first serial line, and a reboot 10 s after a kernel panic, so a kernel that panics
//!   comes back to the loader, which spends the slot's next try).
//!
//! Why build time: the trusted keys must be part of the loader binary itself (the binary is
//! what firmware Secure Boot vouches for); a key file next to it on the ESP could be swapped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200 panic=10";

fn main() {
    println!("cargo:rerun-if-env-changed=ABUPDATE_LOADER_KEYS");
    println!("cargo:rerun-if-env-changed=ABUPDATE_LOADER_CMDLINE");
    let keys = match std::env::var_os("ABUPDATE_LOADER_KEYS") {
        Some(path) => read_keys(Path::new(&path)),
        None => Vec::new(),
    };
    let cmdline =
        std::env::var("ABUPDATE_LOADER_CMDLINE").unwrap_or_else(|_| DEFAULT_CMDLINE.into());
    let mut out = String::from("/// Trusted public keys (ed25519), from ABUPDATE_LOADER_KEYS.\n");
    out.push_str("pub const TRUSTED_KEYS: &[[u8; 32]] = &[\n");
    for key in &keys {
        out.push_str("    [");
        for b in key {
            let _ = write!(out, "{b:#04x}, ");
        }
        out.push_str("],\n");
    }
    out.push_str("];\n");
    let _ = writeln!(
        out,
        "/// Extra kernel command line, from ABUPDATE_LOADER_CMDLINE.\npub const EXTRA_CMDLINE: &str = {cmdline:?};"
    );
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(dest.join("config.rs"), out).expect("writing config.rs");
}

/// The keys of a `.pub` file or of every `*.pub` file of a directory.
fn read_keys(path: &Path) -> Vec<[u8; 32]> {
    println!("cargo:rerun-if-changed={}", path.display());
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("ABUPDATE_LOADER_KEYS {}: {e}", path.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    files.iter().map(|f| parse_public_key(f)).collect()
}

/// `abupdate-ed25519-public-v1 <64 hex digits> [comment]` (docs/bundle-format.md, "Keys").
fn parse_public_key(file: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("ABUPDATE_LOADER_KEYS: reading {}: {e}", file.display()));
    let mut words = text.split_whitespace();
    let (Some("abupdate-ed25519-public-v1"), Some(hex)) = (words.next(), words.next()) else {
        panic!("{} is not an abupdate public key file", file.display());
    };
    assert!(
        hex.len() == 64,
        "{}: a key is 64 hex digits",
        file.display()
    );
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .unwrap_or_else(|_| panic!("{}: not hex", file.display()));
    }
    key
}
