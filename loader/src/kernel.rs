//! The kernel check: a slot's kernel (KERN-x) is started only when the bundle header kept in
//! its slot record verifies under a key built into this loader, and KERN-x holds exactly the
//! kernel that header signs.
//!
//! Why the header and not the record alone: the record is written by the Linux side and
//! carries no signature; the header is the bundle's own signed bytes, so the hash the loader
//! compares against comes from the release key, not from whatever wrote the disk. This is the
//! ChromeOS firmware's check of its kernels, with our keys and our bundle format.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abupdate_core::signed_header::Verified;
use abupdate_core::slot_record::{header_area, header_offset, SlotRecord, RECORD_BYTES};
use sha2::{Digest, Sha256};

use crate::slots::AbDisk;

/// A kernel that verified: its bytes and the version the record names.
pub struct VerifiedKernel {
    /// The kernel image (a PE/COFF UEFI application, the UKI).
    pub image: Vec<u8>,
    /// The installed version.
    pub version: String,
}

/// Reads slot `slot`'s record, verifies the signed header it keeps against `trusted`, reads
/// the kernel from KERN-x and checks it against the signed hash. The error says what failed
/// and where, for the console.
pub fn load_verified(
    ab: &AbDisk,
    slot: usize,
    trusted: &[[u8; 32]],
) -> Result<VerifiedKernel, String> {
    if trusted.is_empty() {
        return Err(
            "this loader was built without trusted keys (ABUPDATE_LOADER_KEYS), so it starts no kernel"
                .into(),
        );
    }
    let root = ab
        .partition(slot, false)
        .ok_or("slot without a root partition")?;
    let kern = ab.partition(slot, true).ok_or_else(|| {
        format!(
            "{} has no kernel partition (KERN-x) paired with it",
            root.name
        )
    })?;
    let root_len = ab.partition_len(&root);

    let mut block = Vec::with_capacity(RECORD_BYTES as usize);
    ab.read_partition(&root, root_len - RECORD_BYTES, RECORD_BYTES, &mut |b| {
        block.extend_from_slice(b)
    })?;
    let record = SlotRecord::decode(&block).ok_or_else(|| {
        format!(
            "{} has no slot record (nothing verified was installed, or an install did not finish)",
            root.name
        )
    })?;
    let kernel = record
        .kernel
        .ok_or_else(|| format!("{}'s slot record names no kernel", root.name))?;
    let at = header_offset(root_len, kernel.header_len).ok_or_else(|| {
        format!(
            "{}'s slot record names a header larger than the slot",
            root.name
        )
    })?;
    let mut header = Vec::with_capacity(header_area(kernel.header_len) as usize);
    ab.read_partition(&root, at, u64::from(kernel.header_len), &mut |b| {
        header.extend_from_slice(b)
    })?;
    let verified = Verified::check(&header, trusted)
        .map_err(|e| format!("{}: the bundle header in its slot record: {e}", root.name))?;
    let signed = verified
        .kernel()
        .map_err(|e| format!("{}: the bundle header in its slot record: {e}", root.name))?;
    if (signed.size, signed.sha256) != (kernel.size, kernel.sha256)
        || verified.image() != (record.image_size, record.image_sha256)
    {
        return Err(format!(
            "{}: its slot record does not match the signed bundle header it keeps",
            root.name
        ));
    }

    let mut image = Vec::with_capacity(signed.size as usize);
    let mut hasher = Sha256::new();
    ab.read_partition(&kern, 0, signed.size, &mut |b| {
        hasher.update(b);
        image.extend_from_slice(b);
    })?;
    let found: [u8; 32] = hasher.finalize().into();
    if found != signed.sha256 {
        return Err(format!(
            "{}: the kernel does not match its signed hash (SHA-256 {}, signed {})",
            kern.name,
            hex(&found),
            hex(&signed.sha256)
        ));
    }
    Ok(VerifiedKernel {
        image,
        version: record.version,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
