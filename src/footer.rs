//! The slot record: what is installed in a slot, kept in the slot partition's last 4 KiB.
//!
//! Why there and not in the GPT partition name: the name is how slots are found (and what
//! cgpt, sgdisk and udev show as the label), so it must stay stable; and a GPT write is the
//! boot-critical operation we keep as small as possible. The record is written only after the
//! image was verified against the signed hash, while the slot is still unbootable, so a torn
//! record is never trusted: it carries its own CRC32 and a torn one reads as "no record".
//!
//! Layout (little endian), at byte `slot_size - 4096` of the partition:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `ABUPSLOT` |
//! | 8 | 4 | record format version (1) |
//! | 12 | 8 | image size in bytes |
//! | 20 | 32 | SHA-256 of the image |
//! | 52 | 2 | length V of the version string (<= 255) |
//! | 54 | V | version string (UTF-8) |
//! | 54+V | 2 | length C of the compatible string (<= 255) |
//! | 56+V | C | compatible string (UTF-8) |
//! | 56+V+C | 4 | CRC32 of bytes 0..56+V+C |

use serde::Serialize;

/// Bytes reserved at the end of each slot for the record.
pub const RECORD_BYTES: u64 = 4096;
const MAGIC: &[u8; 8] = b"ABUPSLOT";
const FORMAT: u32 = 1;
/// Longest version or compatible string.
pub const MAX_STRING: usize = 255;

/// What is installed in a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotRecord {
    /// Image size in bytes.
    pub image_size: u64,
    /// SHA-256 of the image, as verified at install.
    #[serde(serialize_with = "crate::footer::hex_bytes")]
    pub image_sha256: [u8; 32],
    /// Image version from the bundle.
    pub version: String,
    /// Compatible string from the bundle.
    pub compatible: String,
}

/// Serializes bytes as lowercase hex.
pub fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

impl SlotRecord {
    /// Encodes into a 4096-byte block. Strings longer than 255 bytes are truncated at a char
    /// boundary (the bundle format limits them anyway).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_BYTES as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.image_sha256);
        for s in [&self.version, &self.compatible] {
            let s = truncate(s);
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.resize(RECORD_BYTES as usize, 0);
        out
    }

    /// Decodes a block; `None` for anything but an intact record (blank, torn, foreign).
    pub fn decode(block: &[u8]) -> Option<Self> {
        let mut r = Reader { buf: block, at: 0 };
        if r.take(8)? != MAGIC || u32::from_le_bytes(r.take(4)?.try_into().ok()?) != FORMAT {
            return None;
        }
        let image_size = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let image_sha256: [u8; 32] = r.take(32)?.try_into().ok()?;
        let version = r.string()?;
        let compatible = r.string()?;
        let end = r.at;
        let crc = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        (crc32fast::hash(&block[..end]) == crc).then_some(Self {
            image_size,
            image_sha256,
            version,
            compatible,
        })
    }
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn string(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        if len > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// Reads the record of `slot`; `None` when absent, torn or unreadable.
pub fn read_record<D: crate::blockdev::BlockDevice>(
    dev: &mut D,
    slot: &crate::slots::Slot,
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
    /// The record names an image larger than the slot can hold.
    #[error("its slot record names a {image_size}-byte image, larger than the slot")]
    TooLarge {
        /// Image size in the record.
        image_size: u64,
    },
    /// The slot's bytes do not hash to the recorded SHA-256.
    #[error("its content does not match its slot record (version {version}: SHA-256 {found}, recorded {recorded})")]
    Mismatch {
        /// The recorded version.
        version: String,
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
/// `image_size` bytes hash to the recorded SHA-256. Costs one read of the image; used before
/// a command makes a slot bootable that was not (mark-good, commit, set-attributes), so a
/// slot whose install was cut short is never made the next boot by hand.
pub fn verify_slot<D: crate::blockdev::BlockDevice>(
    dev: &mut D,
    slot: &crate::slots::Slot,
    sector_size: u32,
) -> Result<SlotRecord, Unverified> {
    use sha2::{Digest, Sha256};
    let record = read_record(dev, slot, sector_size).ok_or(Unverified::NoRecord)?;
    if record.image_size > max_image_size(slot.size_bytes(sector_size)) {
        return Err(Unverified::TooLarge {
            image_size: record.image_size,
        });
    }
    let base = slot.offset_bytes(sector_size);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < record.image_size {
        let n = (record.image_size - done).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], base + done)
            .map_err(|e| Unverified::Unreadable {
                offset: done,
                error: e.to_string(),
            })?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    let found: [u8; 32] = hasher.finalize().into();
    if found != record.image_sha256 {
        return Err(Unverified::Mismatch {
            version: record.version.clone(),
            recorded: hex::encode(record.image_sha256),
            found: hex::encode(found),
        });
    }
    Ok(record)
}

/// Largest image that fits a slot of `slot_bytes` (the record takes the last 4 KiB).
pub fn max_image_size(slot_bytes: u64) -> u64 {
    slot_bytes.saturating_sub(RECORD_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_records() {
        let rec = SlotRecord {
            image_size: 12345,
            image_sha256: [7; 32],
            version: "2.0.1".into(),
            compatible: "qemu-x86_64".into(),
        };
        let block = rec.encode();
        assert_eq!(block.len(), 4096);
        assert_eq!(SlotRecord::decode(&block), Some(rec));
        assert_eq!(SlotRecord::decode(&[0u8; 4096]), None);
        let used = 8 + 4 + 8 + 32 + 2 + 5 + 2 + 11 + 4;
        for i in 0..used {
            let mut torn = block.clone();
            torn[i] ^= 0x10;
            assert_eq!(SlotRecord::decode(&torn), None, "flip at {i} accepted");
        }
    }
}
