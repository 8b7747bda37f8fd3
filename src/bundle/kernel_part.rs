//! The kernel part of a bundle: a second image (the slot's Unified Kernel Image, for KERN-x)
//! signed together with the root image.
//!
//! Why a critical extension and not a format version bump: the fixed header, the root image's
//! chunk table and its payload keep their places, so every offset an old reader or a resumed
//! download computes for the root image is unchanged, and bundles without a kernel are byte
//! for byte what they were. The kernel's own chunk table sits in the extension value
//! ([`abupdate_core::signed_header::KernelPart`], the same bytes the boot loader reads), and
//! its frames follow the root image's. An old reader refuses such a bundle (it does not know
//! the critical tag) instead of installing a root without its kernel.
//!
//! The kernel part is streamed by the same reader as the root image: [`BundleHeader::kernel_view`]
//! is a header whose "image" is the kernel and whose payload starts where the root's ends.

use abupdate_core::signed_header::KernelPart;

use super::error::BundleError;
use super::format::{max_compressed_len, BundleHeader, ChunkEntry, VerifiedHeader, EXT_KERNEL};

impl BundleHeader {
    /// The kernel part, when the bundle carries one (checked when the header was parsed).
    pub fn kernel(&self) -> Option<KernelPart> {
        if self.payload_offset.is_some() {
            return None;
        }
        let ext = self.extensions.iter().find(|e| e.tag == EXT_KERNEL)?;
        KernelPart::parse(&ext.value, self.chunk_size).ok()
    }

    /// The kernel part as an image of its own: its size, hash and chunk table, its frames at
    /// the bundle offset right after the root image's. `None` without a kernel part.
    pub fn kernel_view(&self) -> Option<BundleHeader> {
        let kernel = self.kernel()?;
        Some(BundleHeader {
            format_version: self.format_version,
            image_version: self.image_version.clone(),
            compatible: self.compatible.clone(),
            image_size: kernel.size,
            image_sha256: kernel.sha256,
            chunk_size: self.chunk_size,
            compression: self.compression,
            signer_key_id: self.signer_key_id,
            extensions: Vec::new(),
            chunks: kernel
                .chunks
                .iter()
                .map(|&(compressed_len, sha256)| ChunkEntry {
                    compressed_len,
                    sha256,
                })
                .collect(),
            payload_offset: Some(self.header_len() + self.payload_len()),
        })
    }

    /// True when this image's last frame ends the bundle file (no kernel part follows it).
    pub fn ends_bundle(&self) -> bool {
        self.payload_offset.is_some() || self.kernel().is_none()
    }
}

impl VerifiedHeader {
    /// The kernel part's view ([`BundleHeader::kernel_view`]), verified by the same signature.
    pub fn kernel_view(&self) -> Option<VerifiedHeader> {
        self.header()
            .kernel_view()
            .map(|view| self.with_header(view))
    }
}

/// Checks a parsed header's kernel part, if any: the extension decodes for the header's chunk
/// size and every frame length is within the format's bound.
pub(crate) fn check(header: &BundleHeader) -> Result<(), BundleError> {
    let Some(ext) = header.extensions.iter().find(|e| e.tag == EXT_KERNEL) else {
        return Ok(());
    };
    let kernel = KernelPart::parse(&ext.value, header.chunk_size).map_err(|e| {
        BundleError::InvalidKernelPart {
            reason: e.to_string(),
        }
    })?;
    let chunk_size = u64::from(header.chunk_size);
    for (i, &(len, _)) in kernel.chunks.iter().enumerate() {
        let chunk_len = (kernel.size - i as u64 * chunk_size).min(chunk_size) as u32;
        let limit = max_compressed_len(chunk_len);
        if len == 0 || len > limit {
            return Err(BundleError::InvalidKernelPart {
                reason: format!("chunk {i}: compressed length {len} is outside 1..={limit}"),
            });
        }
    }
    Ok(())
}

/// The extension value for a kernel of `size` bytes whose table is `chunks`.
pub(crate) fn extension_value(size: u64, sha256: [u8; 32], chunks: &[ChunkEntry]) -> Vec<u8> {
    KernelPart {
        size,
        sha256,
        chunks: chunks
            .iter()
            .map(|c| (c.compressed_len, c.sha256))
            .collect(),
    }
    .encode()
}
