//! Errors of the bundle format, its keys, the writer and the reader.
//!
//! Every variant names what was wrong and where (field, byte offset in the
//! bundle, chunk index), because a refused update is only actionable when the
//! operator can tell a truncated download from a forged bundle.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::keys::KeyId;

/// The part of a bundle file a truncation or read error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The 80-byte fixed header prefix (magic .. extensions_len).
    FixedHeader,
    /// The image version string.
    ImageVersion,
    /// The compatible string.
    Compatible,
    /// The extension (TLV) area.
    Extensions,
    /// The chunk table.
    ChunkTable,
    /// The ed25519 signature closing the header.
    Signature,
    /// The compressed frame of the chunk with this index.
    Chunk(u32),
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::FixedHeader => f.write_str("fixed header"),
            Section::ImageVersion => f.write_str("image version string"),
            Section::Compatible => f.write_str("compatible string"),
            Section::Extensions => f.write_str("extension area"),
            Section::ChunkTable => f.write_str("chunk table"),
            Section::Signature => f.write_str("signature"),
            Section::Chunk(i) => write!(f, "compressed frame of chunk {i}"),
        }
    }
}

/// Errors about key files and keyrings.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file or directory could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Refused to overwrite an existing key file.
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A key file does not follow the documented one-line format.
    #[error("key file {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The bytes are not a usable ed25519 public key.
    #[error("key file {path}: invalid ed25519 public key: {reason}")]
    InvalidPublicKey {
        /// The file.
        path: PathBuf,
        /// Why it was refused (not a curve point, weak key).
        reason: String,
    },
    /// A keyring directory holds no `*.pub` file.
    #[error("keyring directory {path} contains no *.pub key file")]
    NoKeys {
        /// The directory.
        path: PathBuf,
    },
    /// Two different keys in one keyring share a key id (8 bytes of a
    /// SHA-256); the signature's key id could not pick one of them.
    #[error("keyring: two different keys share key id {key_id} ({first} and {second})")]
    DuplicateKeyId {
        /// The colliding id.
        key_id: KeyId,
        /// Where the first key came from.
        first: PathBuf,
        /// Where the second key came from.
        second: PathBuf,
    },
}

/// Errors of creating, inspecting or reading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An I/O error outside of a plain truncation.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done (names the file or bundle section).
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The bundle ended inside `section`; `offset` is the bundle byte offset
    /// at which data ran out.
    #[error("bundle truncated: {section} ends early at byte offset {offset}")]
    Truncated {
        /// The section that was being read.
        section: Section,
        /// Byte offset in the bundle where the data ended.
        offset: u64,
    },
    /// The file does not start with the bundle magic.
    #[error("not an abupdate bundle: magic is {found:02x?}, expected \"ABUPBNDL\"")]
    BadMagic {
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// The bundle uses a format version this build does not implement.
    #[error("unsupported bundle format version {found} (this build reads version {supported})")]
    UnsupportedFormatVersion {
        /// The version in the file.
        found: u16,
        /// The version this build implements.
        supported: u16,
    },
    /// A reserved header field is not zero (a future feature this build does
    /// not know would otherwise be silently ignored).
    #[error("reserved header field {field} at byte offset {offset} is {value:#x}, must be 0")]
    ReservedNotZero {
        /// The field name as in docs/bundle-format.md.
        field: &'static str,
        /// Its byte offset in the bundle.
        offset: u64,
        /// The value found.
        value: u64,
    },
    /// A header field exceeds a documented limit.
    #[error("header field {field} is {value}, limit is {limit}")]
    HeaderLimit {
        /// The field name as in docs/bundle-format.md.
        field: &'static str,
        /// The value found (or requested, when writing).
        value: u64,
        /// The documented limit.
        limit: u64,
    },
    /// The chunk size is not a power of two in the allowed range.
    #[error("chunk size {value} is invalid: must be a power of two from {min} to {max}")]
    InvalidChunkSize {
        /// The chunk size found or requested.
        value: u64,
        /// Smallest allowed chunk size.
        min: u32,
        /// Largest allowed chunk size.
        max: u32,
    },
    /// The image is empty; bundles of empty images are refused (see
    /// docs/bundle-format.md, "Zero-length images").
    #[error("image is empty: zero-length images are refused")]
    EmptyImage,
    /// The declared chunk count does not match image size / chunk size.
    #[error(
        "chunk count {declared} does not match image size and chunk size (expected {expected})"
    )]
    ChunkCountMismatch {
        /// Chunk count in the header.
        declared: u32,
        /// ceil(image_size / chunk_size).
        expected: u64,
    },
    /// `header_len` does not equal the length computed from the other fields.
    #[error("header_len is {declared}, but the header fields add up to {computed}")]
    HeaderLengthMismatch {
        /// The header_len field.
        declared: u64,
        /// The length computed from the fixed fields.
        computed: u64,
    },
    /// The compression field names an unknown algorithm.
    #[error("unsupported compression id {found} (only 1 = zstd is known)")]
    UnsupportedCompression {
        /// The compression id found.
        found: u8,
    },
    /// A string field is empty, not UTF-8, or contains control characters.
    #[error("header string {field} is invalid: {reason}")]
    InvalidString {
        /// Which string (image_version or compatible).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The extension area is not a well-formed list of records.
    #[error("malformed extension area at extension byte offset {offset}: {reason}")]
    MalformedExtension {
        /// Offset inside the extension area.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// An extension tag appears twice.
    #[error("extension tag {tag:#06x} appears more than once")]
    DuplicateExtension {
        /// The repeated tag.
        tag: u16,
    },
    /// An extension with the critical bit set is not understood by this build.
    #[error("unknown critical extension tag {tag:#06x}: this bundle needs a newer abupdate")]
    UnknownCriticalExtension {
        /// The unknown tag (bit 15 set).
        tag: u16,
    },
    /// The kernel part (critical extension `0x8001`) is malformed.
    #[error("kernel part (extension 0x8001): {reason}")]
    InvalidKernelPart {
        /// What is wrong.
        reason: String,
    },
    /// A chunk table entry has an impossible compressed length.
    #[error(
        "chunk table entry {index}: compressed length {compressed_len} is outside 1..={limit}"
    )]
    InvalidChunkEntry {
        /// The chunk index.
        index: u32,
        /// Its compressed length.
        compressed_len: u32,
        /// The largest allowed compressed length for that chunk.
        limit: u32,
    },
    /// The signature's key id is not in the keyring.
    #[error("bundle is signed by key {key_id}, which is not in the keyring")]
    UntrustedKey {
        /// The key id named by the bundle.
        key_id: KeyId,
    },
    /// The signature does not verify under the named key.
    #[error("bad signature: header does not verify under key {key_id}")]
    BadSignature {
        /// The key that was tried.
        key_id: KeyId,
    },
    /// zstd refused a chunk's frame (corrupt, truncated frame, window too big).
    #[error("chunk {index} (bundle offset {bundle_offset}): zstd frame is invalid: {reason}")]
    ChunkDecompress {
        /// The chunk index.
        index: u32,
        /// Byte offset of the frame in the bundle.
        bundle_offset: u64,
        /// What zstd (or the frame check) reported.
        reason: String,
    },
    /// A chunk decompresses to more bytes than the header declares
    /// (a zstd bomb is stopped here, at the declared length plus one byte).
    #[error("chunk {index}: decompresses to more than the declared {expected} bytes")]
    ChunkTooLarge {
        /// The chunk index.
        index: u32,
        /// The uncompressed length the header declares.
        expected: u32,
    },
    /// A chunk decompresses to fewer bytes than the header declares.
    #[error("chunk {index}: decompresses to {actual} bytes, header declares {expected}")]
    ChunkTooSmall {
        /// The chunk index.
        index: u32,
        /// The uncompressed length the header declares.
        expected: u32,
        /// The length actually produced (or declared by the frame).
        actual: u64,
    },
    /// Bytes follow the end of the zstd frame inside a chunk's compressed span.
    #[error("chunk {index}: {extra} bytes follow the end of its zstd frame")]
    ChunkTrailingBytes {
        /// The chunk index.
        index: u32,
        /// How many compressed bytes were left over.
        extra: usize,
    },
    /// A chunk's SHA-256 does not match the signed chunk table.
    #[error("chunk {index} (image offset {image_offset}): SHA-256 does not match the signed chunk table")]
    ChunkHashMismatch {
        /// The chunk index.
        index: u32,
        /// Byte offset of the chunk in the image.
        image_offset: u64,
    },
    /// The SHA-256 of the whole image does not match the header.
    #[error("whole-image SHA-256 mismatch: header says {expected}, image hashes to {actual}")]
    ImageHashMismatch {
        /// Hex of the signed whole-image hash.
        expected: String,
        /// Hex of the computed hash.
        actual: String,
    },
    /// Data follows the last chunk.
    #[error("trailing data after the last chunk at bundle offset {offset}")]
    TrailingData {
        /// Bundle byte offset of the first trailing byte.
        offset: u64,
    },
    /// A chunk index past the end was asked for.
    #[error("chunk index {index} is out of range (bundle has {count} chunks)")]
    ChunkIndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// The number of chunks.
        count: u32,
    },
    /// The reader already returned an error; its position is undefined.
    #[error("bundle reader already failed; start a new reader (or resume at a chunk)")]
    ReaderFailed,
    /// The consumer of verified chunks returned an error.
    #[error("writing verified chunk {index}: {source}")]
    Sink {
        /// The chunk being written.
        index: u32,
        /// The consumer's error.
        #[source]
        source: io::Error,
    },
    /// A worker thread of the writer or parallel reader panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// Key file or keyring error.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<crate::pipeline::PipelineFault> for BundleError {
    fn from(fault: crate::pipeline::PipelineFault) -> Self {
        BundleError::Internal(fault.to_string())
    }
}

impl BundleError {
    /// Builds an [`BundleError::Io`] with a context string.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        BundleError::Io {
            context: context.into(),
            source,
        }
    }
}
