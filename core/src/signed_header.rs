//! The signed bundle header as the boot loader checks it: signature under a trusted key, then
//! the kernel part it describes.
//!
//! Why in the core: the loader must start only a kernel our own signing key vouches for, the way
//! ChromeOS firmware checks its kernels. An install keeps the bundle's signed header in the
//! slot record ([`crate::slot_record`]); before starting KERN-x the loader verifies that header
//! here and compares KERN-x's bytes with the kernel hash it names. The Linux side parses the
//! same header with its full bundle reader (`abupdate::bundle::format`, which checks every
//! field for streaming); this module reads only what the kernel check needs, with the same
//! layout constants, and refuses anything it cannot place exactly.
//!
//! Layout (docs/bundle-format.md): an 80-byte fixed header, the version and compatible
//! strings, the extension area, the chunk table, then a 64-byte ed25519 signature over every
//! byte before it. The kernel part is the critical extension [`EXT_KERNEL`]:
//!
//! | size | field |
//! |---:|---|
//! | 8 | kernel image size in bytes (>= 1) |
//! | 32 | SHA-256 of the kernel image |
//! | 4 | kernel chunk count, `ceil(size / chunk_size)` |
//! | 36 per chunk | the kernel's chunk table (compressed length, SHA-256), as the image's |

use alloc::vec::Vec;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// The bundle magic.
pub const MAGIC: [u8; 8] = *b"ABUPBNDL";
/// The format version this module reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const FIXED_HEADER_LEN: usize = 80;
/// Length of one chunk table entry.
pub const CHUNK_ENTRY_LEN: usize = 36;
/// Length of the ed25519 signature at the header's end.
pub const SIGNATURE_LEN: usize = 64;
/// Bit 15 of an extension tag: a reader that does not know the tag must refuse the bundle.
pub const EXTENSION_CRITICAL: u16 = 0x8000;
/// The kernel part (critical: a reader that ignored it would install a root without its kernel).
pub const EXT_KERNEL: u16 = EXTENSION_CRITICAL | 0x0001;
/// Fixed part of the kernel extension's value, before its chunk table.
pub const KERNEL_EXT_FIXED_LEN: usize = 8 + 32 + 4;

/// Byte offsets of the fixed header's fields.
pub mod offset {
    /// `format_version`, u16.
    pub const FORMAT_VERSION: usize = 8;
    /// `flags`, u16.
    pub const FLAGS: usize = 10;
    /// `header_len`, u32.
    pub const HEADER_LEN: usize = 12;
    /// `image_size`, u64.
    pub const IMAGE_SIZE: usize = 16;
    /// `chunk_size`, u32.
    pub const CHUNK_SIZE: usize = 24;
    /// `chunk_count`, u32.
    pub const CHUNK_COUNT: usize = 28;
    /// `image_sha256`, 32 bytes.
    pub const IMAGE_SHA256: usize = 32;
    /// `signer_key_id`, 8 bytes.
    pub const KEY_ID: usize = 64;
    /// `compression`, u8.
    pub const COMPRESSION: usize = 72;
    /// reserved u8.
    pub const RESERVED: usize = 73;
    /// `version_len`, u16.
    pub const VERSION_LEN: usize = 74;
    /// `compatible_len`, u16.
    pub const COMPATIBLE_LEN: usize = 76;
    /// `extensions_len`, u16.
    pub const EXTENSIONS_LEN: usize = 78;
}

/// The key id: the first 8 bytes of SHA-256 of the 32-byte public key.
pub fn key_id(public_key: &[u8; 32]) -> [u8; 8] {
    let digest = Sha256::digest(public_key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

/// The kernel image a bundle carries, as its signed header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPart {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the whole kernel image.
    pub sha256: [u8; 32],
    /// Its chunk table: (compressed length, SHA-256 of the uncompressed chunk).
    pub chunks: Vec<(u32, [u8; 32])>,
}

impl KernelPart {
    /// Parses the value of an [`EXT_KERNEL`] record for a bundle of `chunk_size`.
    pub fn parse(value: &[u8], chunk_size: u32) -> Result<KernelPart, HeaderError> {
        if value.len() < KERNEL_EXT_FIXED_LEN {
            return Err(HeaderError::KernelExtension(
                "shorter than its 44 fixed bytes",
            ));
        }
        let size = le64(value, 0);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&value[8..40]);
        let count = le32(value, 40) as u64;
        if size == 0 {
            return Err(HeaderError::KernelExtension("kernel size is 0"));
        }
        if chunk_size == 0 || count != size.div_ceil(u64::from(chunk_size)) {
            return Err(HeaderError::KernelExtension(
                "chunk count is not ceil(size / chunk_size)",
            ));
        }
        let table = &value[KERNEL_EXT_FIXED_LEN..];
        if table.len() as u64 != count * CHUNK_ENTRY_LEN as u64 {
            return Err(HeaderError::KernelExtension(
                "chunk table length is not 36 bytes per chunk",
            ));
        }
        let chunks = table
            .chunks_exact(CHUNK_ENTRY_LEN)
            .map(|e| {
                let mut h = [0u8; 32];
                h.copy_from_slice(&e[4..]);
                (le32(e, 0), h)
            })
            .collect();
        Ok(KernelPart {
            size,
            sha256,
            chunks,
        })
    }

    /// Encodes the extension value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(KERNEL_EXT_FIXED_LEN + CHUNK_ENTRY_LEN * self.chunks.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for (len, hash) in &self.chunks {
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(hash);
        }
        out
    }
}

/// Why a signed header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not a bundle header, or one of another format version.
    #[error("not an abupdate bundle header of format version 1")]
    NotAHeader,
    /// The lengths in the fixed header do not add up to the bytes given.
    #[error("header lengths do not add up ({0})")]
    Lengths(&'static str),
    /// No trusted key has the signer's key id.
    #[error("signed by key {}, which is not trusted", KeyIdHex(key_id))]
    UntrustedKey {
        /// The signer key id in the header.
        key_id: [u8; 8],
    },
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The extension area is malformed.
    #[error("malformed extension area at byte {0}")]
    Extensions(usize),
    /// The bundle carries no kernel.
    #[error("the bundle carries no kernel")]
    NoKernel,
    /// The kernel extension is malformed.
    #[error("kernel extension: {0}")]
    KernelExtension(&'static str),
}

/// A key id as 16 hex digits, as `abupdate` prints key ids.
struct KeyIdHex<'a>(&'a [u8; 8]);

impl core::fmt::Display for KeyIdHex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A header whose signature verified under one of the trusted keys.
#[derive(Debug)]
pub struct Verified<'a> {
    bytes: &'a [u8],
    /// The version string.
    pub version: &'a str,
    /// The chunk size.
    pub chunk_size: u32,
    /// The extension area.
    extensions: &'a [u8],
    /// Index into the trusted keys of the key that verified it.
    pub key_index: usize,
}

impl<'a> Verified<'a> {
    /// Checks `bytes` (exactly one whole header) against `trusted` public keys: the lengths
    /// must add up, a trusted key must carry the signer's id, and the ed25519 signature over
    /// every byte before it must verify (`verify_strict`, as the bundle reader).
    pub fn check(bytes: &'a [u8], trusted: &[[u8; 32]]) -> Result<Verified<'a>, HeaderError> {
        if bytes.len() < FIXED_HEADER_LEN + SIGNATURE_LEN
            || bytes[..8] != MAGIC
            || le16(bytes, offset::FORMAT_VERSION) != FORMAT_VERSION
        {
            return Err(HeaderError::NotAHeader);
        }
        let header_len = le32(bytes, offset::HEADER_LEN) as usize;
        let version_len = le16(bytes, offset::VERSION_LEN) as usize;
        let compatible_len = le16(bytes, offset::COMPATIBLE_LEN) as usize;
        let extensions_len = le16(bytes, offset::EXTENSIONS_LEN) as usize;
        let chunk_count = le32(bytes, offset::CHUNK_COUNT) as u64;
        let expected = (FIXED_HEADER_LEN + version_len + compatible_len + extensions_len) as u64
            + CHUNK_ENTRY_LEN as u64 * chunk_count
            + SIGNATURE_LEN as u64;
        if header_len as u64 != expected {
            return Err(HeaderError::Lengths("header_len"));
        }
        if bytes.len() != header_len {
            return Err(HeaderError::Lengths("bytes given"));
        }
        let mut signer = [0u8; 8];
        signer.copy_from_slice(&bytes[offset::KEY_ID..offset::KEY_ID + 8]);
        let key_index = trusted
            .iter()
            .position(|k| key_id(k) == signer)
            .ok_or(HeaderError::UntrustedKey { key_id: signer })?;
        let key = VerifyingKey::from_bytes(&trusted[key_index])
            .map_err(|_| HeaderError::UntrustedKey { key_id: signer })?;
        let (signed, signature) = bytes.split_at(header_len - SIGNATURE_LEN);
        let signature = Signature::from_slice(signature).map_err(|_| HeaderError::BadSignature)?;
        key.verify_strict(signed, &signature)
            .map_err(|_| HeaderError::BadSignature)?;
        let strings = FIXED_HEADER_LEN;
        let version = core::str::from_utf8(&bytes[strings..strings + version_len])
            .map_err(|_| HeaderError::Lengths("version is not UTF-8"))?;
        let ext_start = strings + version_len + compatible_len;
        Ok(Verified {
            bytes,
            version,
            chunk_size: le32(bytes, offset::CHUNK_SIZE),
            extensions: &bytes[ext_start..ext_start + extensions_len],
            key_index,
        })
    }

    /// The whole header.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The root image's signed size and SHA-256.
    pub fn image(&self) -> (u64, [u8; 32]) {
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&self.bytes[offset::IMAGE_SHA256..offset::IMAGE_SHA256 + 32]);
        (le64(self.bytes, offset::IMAGE_SIZE), sha)
    }

    /// The value of extension `tag`, if present.
    pub fn extension(&self, tag: u16) -> Result<Option<&'a [u8]>, HeaderError> {
        find_extension(self.extensions, tag)
    }

    /// The kernel part this header signs.
    pub fn kernel(&self) -> Result<KernelPart, HeaderError> {
        let value = self.extension(EXT_KERNEL)?.ok_or(HeaderError::NoKernel)?;
        KernelPart::parse(value, self.chunk_size)
    }
}

/// Walks an extension area (tag u16, len u16, value) and returns the value of `tag`.
pub fn find_extension(area: &[u8], tag: u16) -> Result<Option<&[u8]>, HeaderError> {
    let mut pos = 0;
    while pos < area.len() {
        if area.len() - pos < 4 {
            return Err(HeaderError::Extensions(pos));
        }
        let (t, len) = (le16(area, pos), le16(area, pos + 2) as usize);
        let value = area
            .get(pos + 4..pos + 4 + len)
            .ok_or(HeaderError::Extensions(pos))?;
        if t == tag {
            return Ok(Some(value));
        }
        pos += 4 + len;
    }
    Ok(None)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use ed25519_dalek::{Signer, SigningKey};

    /// A header built by hand (the full writer lives in the `abupdate` crate, whose tests
    /// check that both agree on real bundles).
    fn header(key: &SigningKey, kernel: Option<&KernelPart>) -> Vec<u8> {
        let version = b"7";
        let compatible = b"test";
        let mut ext = Vec::new();
        if let Some(k) = kernel {
            let value = k.encode();
            ext.extend_from_slice(&EXT_KERNEL.to_le_bytes());
            ext.extend_from_slice(&(value.len() as u16).to_le_bytes());
            ext.extend_from_slice(&value);
        }
        let header_len = FIXED_HEADER_LEN
            + version.len()
            + compatible.len()
            + ext.len()
            + CHUNK_ENTRY_LEN
            + SIGNATURE_LEN;
        let mut out = vec![0u8; FIXED_HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&1u16.to_le_bytes());
        out[12..16].copy_from_slice(&(header_len as u32).to_le_bytes());
        out[16..24].copy_from_slice(&100u64.to_le_bytes());
        out[24..28].copy_from_slice(&65536u32.to_le_bytes());
        out[28..32].copy_from_slice(&1u32.to_le_bytes());
        out[64..72].copy_from_slice(&key_id(key.verifying_key().as_bytes()));
        out[72] = 1;
        out[74..76].copy_from_slice(&1u16.to_le_bytes());
        out[76..78].copy_from_slice(&4u16.to_le_bytes());
        out[78..80].copy_from_slice(&(ext.len() as u16).to_le_bytes());
        out.extend_from_slice(version);
        out.extend_from_slice(compatible);
        out.extend_from_slice(&ext);
        out.extend_from_slice(&[9u8; CHUNK_ENTRY_LEN]);
        let sig = key.sign(&out);
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    fn kernel() -> KernelPart {
        KernelPart {
            size: 70000,
            sha256: [5; 32],
            chunks: vec![(100, [1; 32]), (200, [2; 32])],
        }
    }

    #[test]
    fn a_signed_kernel_part_is_found_and_every_flipped_bit_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let trusted = [*key.verifying_key().as_bytes()];
        let bytes = header(&key, Some(&kernel()));
        let v = Verified::check(&bytes, &trusted).unwrap();
        assert_eq!(v.version, "7");
        assert_eq!(v.kernel().unwrap(), kernel());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(
                Verified::check(&bad, &trusted).is_err(),
                "flip at byte {i} accepted"
            );
        }
    }

    #[test]
    fn wrong_key_missing_kernel_and_truncation_are_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let bytes = header(&key, Some(&kernel()));
        let refused = Verified::check(&bytes, &[*other.verifying_key().as_bytes()]).unwrap_err();
        assert!(matches!(refused, HeaderError::UntrustedKey { .. }));
        let id = key_id(key.verifying_key().as_bytes());
        let hex: alloc::string::String = id.iter().map(|b| alloc::format!("{b:02x}")).collect();
        assert_eq!(
            alloc::format!("{refused}"),
            alloc::format!("signed by key {hex}, which is not trusted")
        );
        let trusted = [*key.verifying_key().as_bytes()];
        assert!(Verified::check(&bytes[..bytes.len() - 1], &trusted).is_err());
        let plain = header(&key, None);
        let v = Verified::check(&plain, &trusted).unwrap();
        assert_eq!(v.kernel(), Err(HeaderError::NoKernel));
    }

    #[test]
    fn kernel_extension_counts_must_agree() {
        let mut k = kernel();
        assert!(KernelPart::parse(&k.encode(), 65536).is_ok());
        assert!(
            KernelPart::parse(&k.encode(), 1 << 20).is_err(),
            "1 chunk of 1 MiB, 2 listed"
        );
        k.size = 0;
        assert!(KernelPart::parse(&k.encode(), 65536).is_err());
        let good = kernel().encode();
        assert!(KernelPart::parse(&good[..good.len() - 1], 65536).is_err());
    }
}
