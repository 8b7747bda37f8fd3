//! Reading a slot's record and checking the slot's content against it.
//!
//! The record itself (layout, encoding, decoding) lives in the `no_std` core,
//! [`abupdate_core::slot_record`], so the boot loader reads it the same way; this module does
//! the I/O: reading the record block at the end of a slot and hashing the slot's content.

pub use abupdate_core::slot_record::{
    header_area, header_offset, max_image_size, KernelRecord, SlotRecord, MAX_STRING, RECORD_BYTES,
};

/// Reads the record of `slot`; `None` when absent, torn or unreadable.
pub fn read_record<D: crate::disk::blockdev::BlockDevice>(
    dev: &mut D,
    slot: &crate::disk::slots::Slot,
    sector_size: u32,
) -> Option<SlotRecord> {
    let size = slot.size_bytes(sector_size);
    if size < RECORD_BYTES {
        return None;
    }
    let mut block = vec![0u8; RECORD_BYTES as usize];
    dev.read_at(
        &mut block,
        slot.offset_bytes(sector_size) + size - RECORD_BYTES,
    )
    .ok()?;
    SlotRecord::decode(&block)
}

/// Why a slot's content cannot be trusted ([`verify_slot`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// No valid record: nothing was installed, or an install did not finish.
    #[error("it has no slot record (nothing verified was installed there, or an install into it did not finish)")]
    NoRecord,
    /// The slot pairs a kernel partition with its root, and its record names no kernel.
    #[error("its slot record names no kernel for {kernel} (installed by a bundle without a kernel, or by an older abupdate)")]
    NoKernel {
        /// The kernel partition.
        kernel: String,
    },
    /// The record names an image larger than the slot can hold.
    #[error("its slot record names a {image_size}-byte image, larger than the slot")]
    TooLarge {
        /// Image size in the record.
        image_size: u64,
    },
    /// The slot's bytes do not hash to the recorded SHA-256.
    #[error(
        "its content does not match its slot record ({what}: SHA-256 {found}, recorded {recorded})"
    )]
    Mismatch {
        /// Which partition, of which recorded version (`KERN-B of version 2`).
        what: String,
        /// Recorded hash, hex.
        recorded: String,
        /// Computed hash, hex.
        found: String,
    },
    /// The slot could not be read.
    #[error("reading it failed at byte offset {offset}: {error}")]
    Unreadable {
        /// Byte offset within the slot.
        offset: u64,
        /// The OS error text.
        error: String,
    },
}

/// Checks that `slot` holds what its record says: the record is valid and the first
/// `image_size` bytes hash to the recorded SHA-256; on a slot with a kernel partition, the
/// record names a kernel and KERN-x's first `size` bytes hash to its SHA-256 (the pair is one
/// slot). Costs one read of the images; used before a command makes a slot bootable that was
/// not (mark-good, commit, set-attributes), so a slot whose install was cut short is never
/// made the next boot by hand.
pub fn verify_slot<D: crate::disk::blockdev::BlockDevice>(
    dev: &mut D,
    slot: &crate::disk::slots::Slot,
    sector_size: u32,
) -> Result<SlotRecord, Unverified> {
    let record = read_record(dev, slot, sector_size).ok_or(Unverified::NoRecord)?;
    if record.image_size > max_image_size(slot.size_bytes(sector_size)) {
        return Err(Unverified::TooLarge {
            image_size: record.image_size,
        });
    }
    let mismatch = |what: &str, recorded: &[u8; 32], found: [u8; 32]| Unverified::Mismatch {
        what: format!("{} of version {}", what, record.version),
        recorded: hex::encode(recorded),
        found: hex::encode(found),
    };
    let base = slot.offset_bytes(sector_size);
    let found = hash_range(dev, base, record.image_size)?;
    if found != record.image_sha256 {
        return Err(mismatch(&slot.name, &record.image_sha256, found));
    }
    if let Some(entry) = &slot.kernel {
        let kernel = record.kernel.ok_or(Unverified::NoKernel {
            kernel: entry.name.clone(),
        })?;
        let size = (entry.last_lba - entry.first_lba + 1) * u64::from(sector_size);
        if kernel.size > size {
            return Err(Unverified::TooLarge {
                image_size: kernel.size,
            });
        }
        let found = hash_range(dev, entry.first_lba * u64::from(sector_size), kernel.size)?;
        if found != kernel.sha256 {
            return Err(mismatch(&entry.name, &kernel.sha256, found));
        }
    }
    Ok(record)
}

/// SHA-256 of `len` bytes of `dev` at `base`; errors name the offset from `base`.
fn hash_range<D: crate::disk::blockdev::BlockDevice>(
    dev: &mut D,
    base: u64,
    len: u64,
) -> Result<[u8; 32], Unverified> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], base + done)
            .map_err(|e| Unverified::Unreadable {
                offset: done,
                error: e.to_string(),
            })?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status --json` shows the record with the hash as lowercase hex (serialized by the core).
    #[test]
    fn record_json_has_hex_hash() {
        let mut image_sha256 = [0u8; 32];
        image_sha256[0] = 0xab;
        image_sha256[31] = 0x0f;
        let rec = SlotRecord {
            image_size: 7,
            image_sha256,
            version: "1.2".into(),
            compatible: "x".into(),
            kernel: None,
        };
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["image_sha256"], hex::encode(image_sha256));
        assert_eq!(json["image_size"], 7);
        assert_eq!(json["version"], "1.2");
    }
}
