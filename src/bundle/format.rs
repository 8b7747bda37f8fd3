//! The bundle byte layout: constants, limits, header encoding and parsing,
//! and signature verification. docs/bundle-format.md is the specification;
//! this module implements it and the two must change together.
//!
//! Reading a header is staged so that nothing is allocated from untrusted
//! sizes before they are checked: the 80-byte fixed prefix is read and every
//! length in it is checked against the limits, then exactly `header_len`
//! bytes are read, the signature is verified, and only then is the rest
//! (strings, extensions, chunk table) interpreted.

use std::io::{self, Read};
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::Serialize;

use super::error::{BundleError, Section};
use super::keys::{KeyId, Keyring};

// The layout constants the boot loader reads too live in the no_std core.
pub use abupdate_core::signed_header::{
    CHUNK_ENTRY_LEN, EXTENSION_CRITICAL, EXT_KERNEL, FIXED_HEADER_LEN, FORMAT_VERSION, MAGIC,
    SIGNATURE_LEN,
};
/// Smallest chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size (64 MiB).
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Default chunk size (4 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest chunk count; bounds the chunk table to 36 MiB.
pub const MAX_CHUNK_COUNT: u32 = 1 << 20;
/// Longest image version / compatible string, in bytes.
pub const MAX_STRING_LEN: u16 = 255;
/// Largest extension area, in bytes.
pub const MAX_EXTENSIONS_LEN: u16 = u16::MAX;
/// Non-critical extension: per chunk, the first [`FIRST_BLOCK_HASH_LEN`] bytes of the SHA-256
/// of the chunk's first [`FIRST_BLOCK_LEN`] bytes, in chunk order. An adaptive install uses
/// it to find a chunk in the running slot at any 4 KiB-aligned offset, not only its own
/// (file system blocks move when files before them change size).
pub const EXT_FIRST_BLOCK_HASHES: u16 = 0x0001;
/// Bytes of a chunk covered by its first-block hash (one file system block).
pub const FIRST_BLOCK_LEN: usize = 4096;
/// Bytes of SHA-256 kept per first-block hash: a hint to find candidates, each then checked
/// against the chunk's full signed hash.
pub const FIRST_BLOCK_HASH_LEN: usize = 4;
/// Largest possible header (all limits at their maximum).
pub const MAX_HEADER_LEN: u64 = FIXED_HEADER_LEN as u64
    + 2 * MAX_STRING_LEN as u64
    + MAX_EXTENSIONS_LEN as u64
    + CHUNK_ENTRY_LEN as u64 * MAX_CHUNK_COUNT as u64
    + SIGNATURE_LEN as u64;

// Byte offsets of the fixed header fields (docs/bundle-format.md, "Fixed header").
use abupdate_core::signed_header::offset::{
    CHUNK_COUNT as OFF_CHUNK_COUNT, CHUNK_SIZE as OFF_CHUNK_SIZE,
    COMPATIBLE_LEN as OFF_COMPATIBLE_LEN, COMPRESSION as OFF_COMPRESSION,
    EXTENSIONS_LEN as OFF_EXTENSIONS_LEN, FLAGS as OFF_FLAGS, FORMAT_VERSION as OFF_VERSION,
    HEADER_LEN as OFF_HEADER_LEN, IMAGE_SHA256 as OFF_IMAGE_SHA256, IMAGE_SIZE as OFF_IMAGE_SIZE,
    KEY_ID as OFF_KEY_ID, RESERVED as OFF_RESERVED, VERSION_LEN as OFF_VERSION_LEN,
};

/// The largest compressed length allowed for a chunk of `chunk_len`
/// uncompressed bytes: `len + len/128 + 4096`. It is above zstd's own
/// worst-case bound (`ZSTD_compressBound`), so any honest frame fits, and it
/// bounds the reader's compressed-frame buffer.
pub const fn max_compressed_len(chunk_len: u32) -> u32 {
    chunk_len + chunk_len / 128 + 4096
}

/// The compression algorithm of the chunk frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Each chunk is one independent zstd frame (id 1).
    Zstd,
}

impl Compression {
    fn id(self) -> u8 {
        match self {
            Compression::Zstd => 1,
        }
    }
}

/// One record of the extension area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extension {
    /// The tag; bit 15 ([`EXTENSION_CRITICAL`]) marks it critical.
    pub tag: u16,
    /// The value bytes (hex in JSON).
    #[serde(serialize_with = "ser_hex")]
    pub value: Vec<u8>,
}

impl Extension {
    /// True when a reader that does not know this tag must refuse the bundle.
    pub fn is_critical(&self) -> bool {
        self.tag & EXTENSION_CRITICAL != 0
    }
}

/// One chunk table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkEntry {
    /// Length of the chunk's zstd frame in the payload.
    pub compressed_len: u32,
    /// SHA-256 of the uncompressed chunk (hex in JSON).
    #[serde(serialize_with = "ser_hex")]
    pub sha256: [u8; 32],
}

/// The parsed bundle header.
///
/// A `BundleHeader` on its own proves nothing: anything can build one. Trust
/// is carried by [`VerifiedHeader`], which only signature verification makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleHeader {
    /// Format version (1).
    pub format_version: u16,
    /// The image version string (e.g. "2025.06.1").
    pub image_version: String,
    /// The compatible string a device must match (e.g. "acme-gateway-x86_64").
    pub compatible: String,
    /// Uncompressed image size in bytes.
    pub image_size: u64,
    /// SHA-256 of the whole uncompressed image (hex in JSON).
    #[serde(serialize_with = "ser_hex")]
    pub image_sha256: [u8; 32],
    /// Uncompressed chunk size (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Compression of the chunk frames.
    pub compression: Compression,
    /// Id of the key that signed the header.
    pub signer_key_id: KeyId,
    /// Non-critical extensions (critical ones are refused, none is known yet).
    pub extensions: Vec<Extension>,
    /// The chunk table, one entry per chunk in image order.
    pub chunks: Vec<ChunkEntry>,
    /// `None` for a bundle's own header (its payload follows the header). `Some(offset)` for
    /// the view of the kernel part ([`BundleHeader::kernel_view`]): its frames start at this
    /// bundle offset, after the root image's.
    #[serde(skip)]
    pub payload_offset: Option<u64>,
}

fn ser_hex<S: serde::Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v.as_ref()))
}

impl BundleHeader {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // The table length is bounded by MAX_CHUNK_COUNT on every path that
        // builds a header from a file; saturate rather than wrap otherwise.
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// The first-block hashes ([`EXT_FIRST_BLOCK_HASHES`]), one per chunk, when the bundle
    /// carries them with the right length.
    pub fn first_block_hashes(&self) -> Option<Vec<[u8; FIRST_BLOCK_HASH_LEN]>> {
        let ext = self
            .extensions
            .iter()
            .find(|e| e.tag == EXT_FIRST_BLOCK_HASHES)?;
        if ext.value.len() != self.chunks.len() * FIRST_BLOCK_HASH_LEN {
            return None;
        }
        Some(
            ext.value
                .chunks_exact(FIRST_BLOCK_HASH_LEN)
                .map(|c| c.try_into().expect("exact chunks"))
                .collect(),
        )
    }

    /// Uncompressed length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u32) -> u32 {
        let start = self.chunk_image_offset(index);
        let len = self
            .image_size
            .saturating_sub(start)
            .min(self.chunk_size as u64);
        len as u32
    }

    /// Byte offset of chunk `index` in the image.
    pub fn chunk_image_offset(&self, index: u32) -> u64 {
        index as u64 * self.chunk_size as u64
    }

    /// Length of the encoded header; the payload starts at this offset.
    pub fn header_len(&self) -> u64 {
        FIXED_HEADER_LEN as u64
            + self.image_version.len() as u64
            + self.compatible.len() as u64
            + self.extensions_len() as u64
            + CHUNK_ENTRY_LEN as u64 * self.chunks.len() as u64
            + SIGNATURE_LEN as u64
    }

    fn extensions_len(&self) -> usize {
        self.extensions.iter().map(|e| 4 + e.value.len()).sum()
    }

    /// Byte offset in the bundle file of chunk `index`'s compressed frame.
    /// `index == chunk_count()` gives the end of the bundle. This is where an
    /// HTTP Range request resumes a download at chunk `index`.
    pub fn chunk_bundle_offset(&self, index: u32) -> Result<u64, BundleError> {
        let count = self.chunk_count();
        if index > count {
            return Err(BundleError::ChunkIndexOutOfRange { index, count });
        }
        let before: u64 = self.chunks[..index as usize]
            .iter()
            .map(|c| c.compressed_len as u64)
            .sum();
        Ok(self.payload_offset.unwrap_or_else(|| self.header_len()) + before)
    }

    /// Total length of this image's payload (sum of compressed frame lengths).
    pub fn payload_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.compressed_len as u64).sum()
    }

    /// Total length of the bundle file: header, the image's frames, the kernel's frames.
    pub fn bundle_len(&self) -> u64 {
        let kernel = self
            .kernel()
            .map_or(0, |k| k.chunks.iter().map(|&(len, _)| u64::from(len)).sum());
        self.payload_offset.unwrap_or_else(|| self.header_len()) + self.payload_len() + kernel
    }

    /// Encodes and signs the header with `key`. The signer key id written is
    /// the id of `key` (the `signer_key_id` field is ignored).
    ///
    /// Only representability is checked here (lengths must fit their
    /// fields), not the format's limits: the writer checks those before it
    /// starts, and tests use this to build deliberately bad bundles.
    pub fn encode_signed(&self, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
        let too_big = |field: &'static str, value: usize, limit: u64| BundleError::HeaderLimit {
            field,
            value: value as u64,
            limit,
        };
        let version_len = u16::try_from(self.image_version.len())
            .map_err(|_| too_big("version_len", self.image_version.len(), u16::MAX as u64))?;
        let compatible_len = u16::try_from(self.compatible.len())
            .map_err(|_| too_big("compatible_len", self.compatible.len(), u16::MAX as u64))?;
        let ext_len = u16::try_from(self.extensions_len())
            .map_err(|_| too_big("extensions_len", self.extensions_len(), u16::MAX as u64))?;
        let chunk_count = u32::try_from(self.chunks.len())
            .map_err(|_| too_big("chunk_count", self.chunks.len(), u32::MAX as u64))?;
        let header_len =
            u32::try_from(self.header_len()).map_err(|_| BundleError::HeaderLimit {
                field: "header_len",
                value: self.header_len(),
                limit: u32::MAX as u64,
            })?;
        let key_id = KeyId::of(&key.verifying_key());

        let mut out = Vec::with_capacity(header_len as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format_version.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&header_len.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&chunk_count.to_le_bytes());
        out.extend_from_slice(&self.image_sha256);
        out.extend_from_slice(&key_id.0);
        out.push(self.compression.id());
        out.push(0);
        out.extend_from_slice(&version_len.to_le_bytes());
        out.extend_from_slice(&compatible_len.to_le_bytes());
        out.extend_from_slice(&ext_len.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_HEADER_LEN);
        out.extend_from_slice(self.image_version.as_bytes());
        out.extend_from_slice(self.compatible.as_bytes());
        for ext in &self.extensions {
            out.extend_from_slice(&ext.tag.to_le_bytes());
            // Fits: the whole area fits in u16 (checked above).
            out.extend_from_slice(&(ext.value.len() as u16).to_le_bytes());
            out.extend_from_slice(&ext.value);
        }
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.compressed_len.to_le_bytes());
            out.extend_from_slice(&chunk.sha256);
        }
        let signature = key.sign(&out);
        out.extend_from_slice(&signature.to_bytes());
        debug_assert_eq!(out.len() as u64, self.header_len());
        Ok(out)
    }
}

/// A header whose signature verified under a key of a keyring.
///
/// Only [`read_verified_header`] (and readers built on it) make one, so a
/// function taking `&VerifiedHeader` knows the chunk hashes are authentic.
/// Cloning is cheap (the header is shared).
#[derive(Debug, Clone)]
pub struct VerifiedHeader {
    header: Arc<BundleHeader>,
    key_id: KeyId,
    /// The signed header bytes as read (an install keeps them in the slot record, where the
    /// boot loader verifies them again).
    signed: Arc<[u8]>,
}

impl VerifiedHeader {
    /// The verified header.
    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    /// The id of the keyring key the signature verified under.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The signed header bytes, signature included.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed
    }

    /// The same verification, for another view of the same signed header (the kernel part).
    pub(crate) fn with_header(&self, header: BundleHeader) -> VerifiedHeader {
        VerifiedHeader {
            header: Arc::new(header),
            key_id: self.key_id,
            signed: self.signed.clone(),
        }
    }
}

/// The checked contents of the fixed header prefix.
#[derive(Debug, Clone, Copy)]
struct Prefix {
    header_len: u32,
    image_size: u64,
    chunk_size: u32,
    chunk_count: u32,
    image_sha256: [u8; 32],
    key_id: KeyId,
    version_len: u16,
    compatible_len: u16,
    extensions_len: u16,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Checks a chunk size against the format's rules.
pub fn check_chunk_size(chunk_size: u64) -> Result<u32, BundleError> {
    let ok = chunk_size.is_power_of_two()
        && chunk_size >= MIN_CHUNK_SIZE as u64
        && chunk_size <= MAX_CHUNK_SIZE as u64;
    if !ok {
        return Err(BundleError::InvalidChunkSize {
            value: chunk_size,
            min: MIN_CHUNK_SIZE,
            max: MAX_CHUNK_SIZE,
        });
    }
    Ok(chunk_size as u32)
}

/// Checks an image size for a chunk size and returns the chunk count.
pub fn check_image_size(image_size: u64, chunk_size: u32) -> Result<u32, BundleError> {
    if image_size == 0 {
        return Err(BundleError::EmptyImage);
    }
    let limit = chunk_size as u64 * MAX_CHUNK_COUNT as u64;
    if image_size > limit {
        return Err(BundleError::HeaderLimit {
            field: "image_size",
            value: image_size,
            limit,
        });
    }
    // Bounded by MAX_CHUNK_COUNT through the check above.
    Ok(image_size.div_ceil(chunk_size as u64) as u32)
}

/// Checks an image version or compatible string.
pub fn check_string(field: &'static str, s: &str) -> Result<(), BundleError> {
    if s.is_empty() {
        return Err(BundleError::InvalidString {
            field,
            reason: "empty".into(),
        });
    }
    if s.len() > MAX_STRING_LEN as usize {
        return Err(BundleError::HeaderLimit {
            field,
            value: s.len() as u64,
            limit: MAX_STRING_LEN as u64,
        });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(BundleError::InvalidString {
            field,
            reason: format!("contains control character {c:?}"),
        });
    }
    Ok(())
}

/// Parses and checks the fixed prefix. Every check that bounds an allocation
/// happens here, before anything else is read.
fn parse_prefix(b: &[u8; FIXED_HEADER_LEN]) -> Result<Prefix, BundleError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(BundleError::BadMagic { found: magic });
    }
    let version = le16(b, OFF_VERSION);
    if version != FORMAT_VERSION {
        return Err(BundleError::UnsupportedFormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = le16(b, OFF_FLAGS);
    if flags != 0 {
        return Err(BundleError::ReservedNotZero {
            field: "flags",
            offset: OFF_FLAGS as u64,
            value: flags as u64,
        });
    }
    let chunk_size = check_chunk_size(le32(b, OFF_CHUNK_SIZE) as u64)?;
    let image_size = le64(b, OFF_IMAGE_SIZE);
    let expected_count = check_image_size(image_size, chunk_size)?;
    let chunk_count = le32(b, OFF_CHUNK_COUNT);
    if chunk_count > MAX_CHUNK_COUNT {
        return Err(BundleError::HeaderLimit {
            field: "chunk_count",
            value: chunk_count as u64,
            limit: MAX_CHUNK_COUNT as u64,
        });
    }
    if chunk_count != expected_count {
        return Err(BundleError::ChunkCountMismatch {
            declared: chunk_count,
            expected: expected_count as u64,
        });
    }
    let compression = b[OFF_COMPRESSION];
    if compression != Compression::Zstd.id() {
        return Err(BundleError::UnsupportedCompression { found: compression });
    }
    if b[OFF_RESERVED] != 0 {
        return Err(BundleError::ReservedNotZero {
            field: "reserved",
            offset: OFF_RESERVED as u64,
            value: b[OFF_RESERVED] as u64,
        });
    }
    let version_len = le16(b, OFF_VERSION_LEN);
    let compatible_len = le16(b, OFF_COMPATIBLE_LEN);
    let extensions_len = le16(b, OFF_EXTENSIONS_LEN);
    for (field, value, limit) in [
        ("version_len", version_len, MAX_STRING_LEN),
        ("compatible_len", compatible_len, MAX_STRING_LEN),
        ("extensions_len", extensions_len, MAX_EXTENSIONS_LEN),
    ] {
        if value > limit {
            return Err(BundleError::HeaderLimit {
                field,
                value: value as u64,
                limit: limit as u64,
            });
        }
    }
    let computed = FIXED_HEADER_LEN as u64
        + version_len as u64
        + compatible_len as u64
        + extensions_len as u64
        + CHUNK_ENTRY_LEN as u64 * chunk_count as u64
        + SIGNATURE_LEN as u64;
    let header_len = le32(b, OFF_HEADER_LEN);
    if header_len as u64 != computed {
        return Err(BundleError::HeaderLengthMismatch {
            declared: header_len as u64,
            computed,
        });
    }
    let mut image_sha256 = [0u8; 32];
    image_sha256.copy_from_slice(&b[OFF_IMAGE_SHA256..OFF_IMAGE_SHA256 + 32]);
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&b[OFF_KEY_ID..OFF_KEY_ID + 8]);
    Ok(Prefix {
        header_len,
        image_size,
        chunk_size,
        chunk_count,
        image_sha256,
        key_id: KeyId(key_id),
        version_len,
        compatible_len,
        extensions_len,
    })
}

/// Reads the 80-byte fixed prefix from `bytes` (at least that long) and
/// returns the total header length. For HTTP: fetch the first
/// [`FIXED_HEADER_LEN`] bytes, call this, then fetch `header_len` bytes.
pub fn header_len_from_prefix(bytes: &[u8]) -> Result<u32, BundleError> {
    let prefix: &[u8; FIXED_HEADER_LEN] = bytes
        .get(..FIXED_HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(BundleError::Truncated {
            section: Section::FixedHeader,
            offset: bytes.len() as u64,
        })?;
    Ok(parse_prefix(prefix)?.header_len)
}

/// Reads into `buf` until it is full. On end of input, reports how many
/// bytes were read (so the caller can name the field that was cut).
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The raw header bytes with their checked prefix; kept private so that the
/// only ways out are a verified header or an explicitly unverified one.
pub(crate) struct RawHeader {
    prefix: Prefix,
    bytes: Vec<u8>,
}

impl RawHeader {
    /// Reads the fixed prefix, checks it, then reads the rest of the header.
    pub(crate) fn read<R: Read + ?Sized>(r: &mut R) -> Result<RawHeader, BundleError> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        // Magic and version are checked on their own first, so a file of a
        // future format version with a different prefix is reported as such
        // rather than as truncated or malformed.
        let got = read_full(r, &mut fixed[..OFF_FLAGS])
            .map_err(|e| BundleError::io("reading the bundle's fixed header", e))?;
        if got >= 8 && fixed[..8] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&fixed[..8]);
            return Err(BundleError::BadMagic { found });
        }
        if got == OFF_FLAGS && le16(&fixed, OFF_VERSION) != FORMAT_VERSION {
            return Err(BundleError::UnsupportedFormatVersion {
                found: le16(&fixed, OFF_VERSION),
                supported: FORMAT_VERSION,
            });
        }
        let got = if got == OFF_FLAGS {
            got + read_full(r, &mut fixed[OFF_FLAGS..])
                .map_err(|e| BundleError::io("reading the bundle's fixed header", e))?
        } else {
            got
        };
        if got < FIXED_HEADER_LEN {
            return Err(BundleError::Truncated {
                section: Section::FixedHeader,
                offset: got as u64,
            });
        }
        let prefix = parse_prefix(&fixed)?;
        let mut bytes = vec![0u8; prefix.header_len as usize];
        bytes[..FIXED_HEADER_LEN].copy_from_slice(&fixed);
        let got = read_full(r, &mut bytes[FIXED_HEADER_LEN..])
            .map_err(|e| BundleError::io("reading the bundle header", e))?;
        let end = FIXED_HEADER_LEN + got;
        if end < bytes.len() {
            return Err(BundleError::Truncated {
                section: prefix.section_at(end),
                offset: end as u64,
            });
        }
        Ok(RawHeader { prefix, bytes })
    }

    /// Verifies the signature with the keyring key the header names.
    pub(crate) fn verify(&self, keyring: &Keyring) -> Result<KeyId, BundleError> {
        let key_id = self.prefix.key_id;
        let trusted = keyring
            .get(&key_id)
            .ok_or(BundleError::UntrustedKey { key_id })?;
        let split = self.bytes.len() - SIGNATURE_LEN;
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(&self.bytes[split..]);
        let signature = Signature::from_bytes(&sig);
        // verify_strict refuses non-canonical signatures and small-order
        // components, so a signature has exactly one valid encoding.
        trusted
            .key
            .verify_strict(&self.bytes[..split], &signature)
            .map_err(|_| BundleError::BadSignature { key_id })?;
        Ok(key_id)
    }

    /// Interprets the variable part of the header.
    pub(crate) fn parse(&self) -> Result<BundleHeader, BundleError> {
        let p = &self.prefix;
        // RawHeader::read sized `bytes` from these very lengths, so the
        // splits below stay in bounds.
        let rest = &self.bytes[FIXED_HEADER_LEN..];
        let (version, rest) = rest.split_at(p.version_len as usize);
        let (compatible, rest) = rest.split_at(p.compatible_len as usize);
        let (extensions, rest) = rest.split_at(p.extensions_len as usize);
        let (table, _signature) = rest.split_at(CHUNK_ENTRY_LEN * p.chunk_count as usize);
        let image_version = parse_string("image_version", version)?;
        let compatible = parse_string("compatible", compatible)?;
        let extensions = parse_extensions(extensions)?;
        let mut header = BundleHeader {
            format_version: FORMAT_VERSION,
            image_version,
            compatible,
            image_size: p.image_size,
            image_sha256: p.image_sha256,
            chunk_size: p.chunk_size,
            compression: Compression::Zstd,
            signer_key_id: p.key_id,
            extensions,
            chunks: Vec::with_capacity(p.chunk_count as usize),
            payload_offset: None,
        };
        for (i, entry) in table.chunks_exact(CHUNK_ENTRY_LEN).enumerate() {
            let index = i as u32;
            let compressed_len = le32(entry, 0);
            let limit = max_compressed_len(header.chunk_len(index));
            if compressed_len == 0 || compressed_len > limit {
                return Err(BundleError::InvalidChunkEntry {
                    index,
                    compressed_len,
                    limit,
                });
            }
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&entry[4..]);
            header.chunks.push(ChunkEntry {
                compressed_len,
                sha256,
            });
        }
        super::kernel_part::check(&header)?;
        Ok(header)
    }
}

impl Prefix {
    /// The header section containing byte `offset` (for truncation errors).
    fn section_at(&self, offset: usize) -> Section {
        let mut end = FIXED_HEADER_LEN;
        for (len, section) in [
            (self.version_len as usize, Section::ImageVersion),
            (self.compatible_len as usize, Section::Compatible),
            (self.extensions_len as usize, Section::Extensions),
            (
                CHUNK_ENTRY_LEN * self.chunk_count as usize,
                Section::ChunkTable,
            ),
        ] {
            end += len;
            if offset < end {
                return section;
            }
        }
        Section::Signature
    }
}

fn parse_string(field: &'static str, bytes: &[u8]) -> Result<String, BundleError> {
    let s = std::str::from_utf8(bytes).map_err(|e| BundleError::InvalidString {
        field,
        reason: format!("not UTF-8: {e}"),
    })?;
    check_string(field, s)?;
    Ok(s.to_owned())
}

fn parse_extensions(area: &[u8]) -> Result<Vec<Extension>, BundleError> {
    let mut out: Vec<Extension> = Vec::new();
    let mut pos = 0;
    while pos < area.len() {
        if area.len() - pos < 4 {
            return Err(BundleError::MalformedExtension {
                offset: pos,
                reason: format!("{} bytes left, a record header needs 4", area.len() - pos),
            });
        }
        let tag = le16(area, pos);
        let len = le16(area, pos + 2) as usize;
        let start = pos + 4;
        if area.len() - start < len {
            return Err(BundleError::MalformedExtension {
                offset: pos,
                reason: format!(
                    "record {tag:#06x} declares {len} value bytes, {} left",
                    area.len() - start
                ),
            });
        }
        if out.iter().any(|e| e.tag == tag) {
            return Err(BundleError::DuplicateExtension { tag });
        }
        let ext = Extension {
            tag,
            value: area[start..start + len].to_vec(),
        };
        // The kernel part is the one critical extension this reader knows (checked with the
        // chunk table, which gives its chunk size); non-critical ones are kept (known ones
        // are used, unknown ones shown by `bundle info`).
        if ext.is_critical() && tag != EXT_KERNEL {
            return Err(BundleError::UnknownCriticalExtension { tag });
        }
        out.push(ext);
        pos = start + len;
    }
    Ok(out)
}

/// Reads a header from `r`, checks its limits and verifies its signature
/// against `keyring` before interpreting it. On success `r` is positioned at
/// the first payload byte.
pub fn read_verified_header<R: Read + ?Sized>(
    r: &mut R,
    keyring: &Keyring,
) -> Result<VerifiedHeader, BundleError> {
    let raw = RawHeader::read(r)?;
    let key_id = raw.verify(keyring)?;
    let header = raw.parse()?;
    Ok(VerifiedHeader {
        header: Arc::new(header),
        key_id,
        signed: raw.bytes.into(),
    })
}

/// Reads and parses a header WITHOUT verifying its signature. For
/// diagnostics (`bundle info` without a keyring) and fuzzing only: nothing
/// in the result may be trusted.
pub fn read_unverified_header<R: Read + ?Sized>(r: &mut R) -> Result<BundleHeader, BundleError> {
    RawHeader::read(r)?.parse()
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
