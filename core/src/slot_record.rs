//! The slot record: what is installed in a slot, kept in the slot partition's last 4 KiB.
//!
//! Encoding and decoding only; reading the record from a slot and hashing the slot's content
//! happen in `abupdate::disk::record`; the loader reads it in `loader/src/kernel.rs`.
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
//!
//! Format version 2, written for a slot with a kernel partition (KERN-x), adds after the
//! compatible string (the CRC then covers them too):
//!
//! | size | field |
//! |---|---|
//! | 8 | kernel image size in bytes |
//! | 32 | SHA-256 of the kernel image |
//! | 4 | length H of the bundle's signed header |
//!
//! and keeps the bundle's signed header itself (H bytes) in the 4 KiB-aligned area just
//! before the record block ([`header_offset`]). The boot loader verifies that header under
//! its embedded keys and the kernel against the hash the header signs
//! ([`crate::signed_header`]); the record's own kernel fields are what `status` and the
//! Linux-side checks read, and must equal the header's.

use alloc::string::String;
use alloc::vec::Vec;

/// Bytes reserved at the end of each slot for the record.
pub const RECORD_BYTES: u64 = 4096;
const MAGIC: &[u8; 8] = b"ABUPSLOT";
const FORMAT: u32 = 1;
/// The record format with a kernel and the signed header.
const FORMAT_WITH_KERNEL: u32 = 2;
/// Longest version or compatible string.
pub const MAX_STRING: usize = 255;

/// What is installed in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SlotRecord {
    /// Image size in bytes.
    pub image_size: u64,
    /// SHA-256 of the image, as verified at install.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "crate::slot_record::hex_bytes")
    )]
    pub image_sha256: [u8; 32],
    /// Image version from the bundle.
    pub version: String,
    /// Compatible string from the bundle.
    pub compatible: String,
    /// The kernel installed into the slot's KERN partition, on a disk with the boot chain.
    pub kernel: Option<KernelRecord>,
}

/// The kernel half of a slot's record (format version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KernelRecord {
    /// Kernel image size in bytes, from the start of the KERN partition.
    pub size: u64,
    /// SHA-256 of the kernel image, as verified at install.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "crate::slot_record::hex_bytes")
    )]
    pub sha256: [u8; 32],
    /// Length of the bundle's signed header kept before the record block.
    pub header_len: u32,
}

/// Serializes bytes as lowercase hex.
#[cfg(feature = "serde")]
pub fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    s.serialize_str(core::str::from_utf8(&out).expect("hex digits are ASCII"))
}

impl SlotRecord {
    /// Encodes into a 4096-byte block. Strings longer than 255 bytes are truncated at a char
    /// boundary (the bundle format limits them anyway).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_BYTES as usize);
        out.extend_from_slice(MAGIC);
        let format = if self.kernel.is_some() {
            FORMAT_WITH_KERNEL
        } else {
            FORMAT
        };
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.image_sha256);
        for s in [&self.version, &self.compatible] {
            let s = truncate(s);
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        if let Some(k) = &self.kernel {
            out.extend_from_slice(&k.size.to_le_bytes());
            out.extend_from_slice(&k.sha256);
            out.extend_from_slice(&k.header_len.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.resize(RECORD_BYTES as usize, 0);
        out
    }

    /// Decodes a block; `None` for anything but an intact record (blank, torn, foreign).
    pub fn decode(block: &[u8]) -> Option<Self> {
        let mut r = Reader { buf: block, at: 0 };
        if r.take(8)? != MAGIC {
            return None;
        }
        let format = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        if format != FORMAT && format != FORMAT_WITH_KERNEL {
            return None;
        }
        let image_size = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let image_sha256: [u8; 32] = r.take(32)?.try_into().ok()?;
        let version = r.string()?;
        let compatible = r.string()?;
        let kernel = if format == FORMAT_WITH_KERNEL {
            Some(KernelRecord {
                size: u64::from_le_bytes(r.take(8)?.try_into().ok()?),
                sha256: r.take(32)?.try_into().ok()?,
                header_len: u32::from_le_bytes(r.take(4)?.try_into().ok()?),
            })
        } else {
            None
        };
        let end = r.at;
        let crc = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        (crc32fast::hash(&block[..end]) == crc).then_some(Self {
            image_size,
            image_sha256,
            version,
            compatible,
            kernel,
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

/// Largest image that fits a slot of `slot_bytes` (the record takes the last 4 KiB).
pub fn max_image_size(slot_bytes: u64) -> u64 {
    slot_bytes.saturating_sub(RECORD_BYTES)
}

/// Bytes kept for a signed header of `header_len` bytes: rounded up to whole 4 KiB blocks.
pub fn header_area(header_len: u32) -> u64 {
    u64::from(header_len).div_ceil(RECORD_BYTES) * RECORD_BYTES
}

/// Byte offset in a slot of `slot_bytes` where a signed header of `header_len` bytes is kept
/// (right before the record block); `None` when it does not fit.
pub fn header_offset(slot_bytes: u64, header_len: u32) -> Option<u64> {
    slot_bytes.checked_sub(RECORD_BYTES + header_area(header_len))
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
            kernel: None,
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

    #[test]
    fn a_record_with_a_kernel_round_trips_and_tears_as_none() {
        let rec = SlotRecord {
            image_size: 1 << 20,
            image_sha256: [1; 32],
            version: "3".into(),
            compatible: "c".into(),
            kernel: Some(KernelRecord {
                size: 777,
                sha256: [2; 32],
                header_len: 5000,
            }),
        };
        let block = rec.encode();
        assert_eq!(SlotRecord::decode(&block), Some(rec));
        let used = 8 + 4 + 8 + 32 + 2 + 1 + 2 + 1 + 8 + 32 + 4 + 4;
        for i in 0..used {
            let mut torn = block.clone();
            torn[i] ^= 0x01;
            assert_eq!(SlotRecord::decode(&torn), None, "flip at {i} accepted");
        }
        assert_eq!(header_area(5000), 8192);
        assert_eq!(header_offset(1 << 20, 5000), Some((1 << 20) - 4096 - 8192));
        assert_eq!(header_offset(8192, 5000), None);
    }
}
