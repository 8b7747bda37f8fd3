//! Signed, chunked, zstd-compressed update bundles.
//!
//! A bundle is a signed header followed by the payload: one independent
//! zstd frame per fixed-size chunk of the image. The header holds the image
//! version, compatible string, sizes, the SHA-256 of the whole image and a
//! chunk table (compressed length + SHA-256 of each uncompressed chunk),
//! and ends with an ed25519 signature over all of it. docs/bundle-format.md
//! is the specification.
//!
//! Why per-chunk frames with signed lengths: the byte offset of any chunk
//! is computable from the verified header, so a download can resume at
//! chunk N with an HTTP Range request, chunks can be decompressed in
//! parallel, and every chunk is authenticated on its own before it is
//! written to the target slot.
//!
//! Entry points:
//! - [`keys`]: key generation, key files, [`Keyring`].
//! - [`create_bundle`]: build a bundle from an image file.
//! - [`BundleReader`]: stream verified chunks out of a bundle
//!   ([`BundleReader::resume_at`] to start at chunk N,
//!   [`BundleReader::read_parallel`] to decode on several threads).
//! - [`verify()`]: fully verify a bundle file (`bundle verify`, the download cache).
//! - [`kernel_part`]: the kernel image a bundle may carry for the slot's KERN partition.

#![forbid(unsafe_code)]

pub mod error;
pub mod format;
pub mod interruptible;
pub mod kernel_part;
pub mod keys;
pub mod reader;
pub mod source;
pub mod verify;
pub mod writer;

pub use error::{BundleError, KeyError, Section};
pub use format::{
    read_unverified_header, read_verified_header, BundleHeader, ChunkEntry, Compression, Extension,
    VerifiedHeader, DEFAULT_CHUNK_SIZE, MAX_CHUNK_COUNT, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub use interruptible::{run_interruptible, Interrupted, Interruptible};
pub use keys::{KeyId, Keyring};
pub use reader::{BundleReader, ChunkDecoder, VerifiedChunk};
pub use source::BundleSource;
pub use verify::{verify, VerifyReport};
pub use writer::{create_bundle, create_bundle_with_options, CreateOptions};
