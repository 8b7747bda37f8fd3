//! Adaptive installs: chunks the running slot already holds are copied from it instead of
//! being fetched and decompressed from the bundle.
//!
//! Two versions of a root filesystem share most of their blocks. The bundle's signed chunk
//! table names the SHA-256 of every chunk of the new image, so the install can hash the
//! running slot in chunk-sized pieces (at chunk-aligned offsets, where a rebuilt image keeps
//! unchanged data when its layout is stable) and take every chunk it finds there from the
//! local disk. The bundle source then skips those frames: a file seeks, a download asks for
//! the next needed frame with a new `Range` request, so unchanged data is never transferred.
//!
//! Nothing is trusted more than in a plain install:
//! - a copied chunk is hashed again when it is read for writing and must equal the signed
//!   chunk hash, else it is fetched from the bundle after all;
//! - the running slot is only ever read, through a read-only view
//!   ([`crate::slotio::SlotBacking::read_only_view`]);
//! - the whole slot is read back and checked against the signed image hash before it is
//!   made bootable, exactly as in a plain install.
//!
//! Peers: RAUC's adaptive updates (`block-hash-index`) and Rugix's block-index deltas do the
//! same with finer blocks; here the chunk table already in every bundle is the index, so any
//! bundle can be installed adaptively (smaller `--chunk-size` at `bundle create` finds more).
//!
//! The planning ([`LocalChunks`], [`plan`]) is pure; [`index_view`] does the reading.

use std::collections::HashMap;
use std::io;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bundle::BundleHeader;
use crate::slotio::ReadOnlyView;

/// Chunk hashes found in the running slot, each with the byte offset where it was found.
#[derive(Debug, Default, Clone)]
pub struct LocalChunks {
    by_hash: HashMap<[u8; 32], u64>,
    /// Bytes hashed to build the index.
    pub bytes_hashed: u64,
}

impl LocalChunks {
    /// Records that `len` bytes at `offset` hash to `sha256` (the first offset is kept).
    pub fn insert(&mut self, sha256: [u8; 32], offset: u64) {
        self.by_hash.entry(sha256).or_insert(offset);
    }

    /// Where a chunk with this hash lies, if anywhere.
    pub fn find(&self, sha256: &[u8; 32]) -> Option<u64> {
        self.by_hash.get(sha256).copied()
    }

    /// Number of distinct hashes.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nothing was indexed.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// Where one chunk of the new image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    /// Its frame is read from the bundle and decompressed.
    Bundle,
    /// Copied from the running slot at this byte offset.
    Running {
        /// Byte offset within the running slot.
        offset: u64,
    },
}

/// The plan of an adaptive install: a source per chunk, and what it saves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One entry per chunk, in image order.
    pub sources: Vec<ChunkSource>,
    /// Summary figures.
    pub summary: PlanSummary,
}

/// What an adaptive plan takes from where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    /// Chunks in the image.
    pub chunks: u32,
    /// Chunks copied from the running slot.
    pub reused_chunks: u32,
    /// Image bytes copied from the running slot.
    pub reused_bytes: u64,
    /// Bundle payload bytes (compressed frames) still to be read.
    pub bundle_bytes: u64,
    /// Bundle payload bytes skipped.
    pub skipped_bundle_bytes: u64,
}

/// Decides, for every chunk of `header`, whether the running slot has it.
pub fn plan(header: &BundleHeader, local: &LocalChunks) -> Plan {
    let mut summary = PlanSummary {
        chunks: header.chunk_count(),
        ..PlanSummary::default()
    };
    let sources = header
        .chunks
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let frame = u64::from(entry.compressed_len);
            match local.find(&entry.sha256) {
                Some(offset) => {
                    summary.reused_chunks += 1;
                    summary.reused_bytes += u64::from(header.chunk_len(i as u32));
                    summary.skipped_bundle_bytes += frame;
                    ChunkSource::Running { offset }
                }
                None => {
                    summary.bundle_bytes += frame;
                    ChunkSource::Bundle
                }
            }
        })
        .collect();
    Plan { sources, summary }
}

/// Hashes the first `len` bytes of `view` (the running slot) in pieces of the bundle's chunk
/// size at chunk-aligned offsets. When the new image ends in a short chunk, that length is
/// also hashed at the same offset, so an unchanged tail is found too.
pub fn index_view(
    view: &dyn ReadOnlyView,
    len: u64,
    header: &BundleHeader,
) -> io::Result<LocalChunks> {
    let chunk_size = u64::from(header.chunk_size);
    let len = len.min(view.len());
    // (offset, length) of the new image's last chunk when it is short.
    let short_tail = header
        .chunk_count()
        .checked_sub(1)
        .map(|i| (header.chunk_image_offset(i), u64::from(header.chunk_len(i))))
        .filter(|&(_, l)| l > 0 && l < chunk_size);
    let mut local = LocalChunks::default();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut offset = 0u64;
    while offset < len {
        let piece = (len - offset).min(chunk_size);
        let bytes = &mut buf[..piece as usize];
        view.read_at(bytes, offset)?;
        local.bytes_hashed += piece;
        if piece == chunk_size {
            local.insert(Sha256::digest(&bytes[..]).into(), offset);
        }
        if let Some((_, tail)) = short_tail.filter(|&(at, t)| at == offset && t <= piece) {
            local.insert(Sha256::digest(&bytes[..tail as usize]).into(), offset);
        }
        offset += piece;
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::ChunkEntry;

    struct Bytes(Vec<u8>);
    impl ReadOnlyView for Bytes {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
    }

    fn header_for(image: &[u8], chunk_size: u32) -> BundleHeader {
        let chunks = image
            .chunks(chunk_size as usize)
            .map(|c| ChunkEntry {
                compressed_len: 100 + c.len() as u32 / 2,
                sha256: Sha256::digest(c).into(),
            })
            .collect();
        BundleHeader {
            format_version: 1,
            image_version: "2".into(),
            compatible: "board".into(),
            image_size: image.len() as u64,
            image_sha256: Sha256::digest(image).into(),
            chunk_size,
            compression: crate::bundle::Compression::Zstd,
            signer_key_id: crate::bundle::KeyId([0; 8]),
            extensions: Vec::new(),
            chunks,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
            .collect()
    }

    #[test]
    fn unchanged_chunks_come_from_the_running_slot() {
        let cs = 64 * 1024;
        let old = pattern(10 * cs + 123, 1);
        let mut new = old.clone();
        // Change chunk 3, move chunk 7's content to chunk 8, keep the short tail.
        new[3 * cs + 5] ^= 0xff;
        let seven = old[7 * cs..8 * cs].to_vec();
        new[8 * cs..9 * cs].copy_from_slice(&seven);
        let header = header_for(&new, cs as u32);
        let local = index_view(&Bytes(old.clone()), old.len() as u64, &header).unwrap();
        let p = plan(&header, &local);
        assert_eq!(p.sources.len(), 11);
        assert_eq!(p.sources[3], ChunkSource::Bundle);
        assert_eq!(
            p.sources[8],
            ChunkSource::Running {
                offset: 7 * cs as u64
            }
        );
        assert_eq!(
            p.sources[10],
            ChunkSource::Running {
                offset: 10 * cs as u64
            }
        );
        assert_eq!(p.summary.reused_chunks, 10);
        assert_eq!(p.summary.reused_bytes, new.len() as u64 - cs as u64);
        let frames: u64 = header
            .chunks
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum();
        assert_eq!(
            p.summary.bundle_bytes + p.summary.skipped_bundle_bytes,
            frames
        );
        assert_eq!(
            p.summary.bundle_bytes,
            u64::from(header.chunks[3].compressed_len)
        );
        // Every planned copy really holds the chunk's bytes.
        for (i, s) in p.sources.iter().enumerate() {
            if let ChunkSource::Running { offset } = *s {
                let len = header.chunk_len(i as u32) as usize;
                let at = i * cs;
                assert_eq!(
                    &old[offset as usize..offset as usize + len],
                    &new[at..at + len]
                );
            }
        }
    }

    #[test]
    fn nothing_in_common_means_everything_from_the_bundle() {
        let cs = 64 * 1024;
        let old = pattern(4 * cs, 1);
        let new = pattern(4 * cs, 2);
        let header = header_for(&new, cs as u32);
        let local = index_view(&Bytes(old.clone()), old.len() as u64, &header).unwrap();
        let p = plan(&header, &local);
        assert!(p.sources.iter().all(|s| *s == ChunkSource::Bundle));
        assert_eq!(p.summary.reused_chunks, 0);
        assert_eq!(p.summary.skipped_bundle_bytes, 0);
        // An empty index (no running image) plans the same.
        let p2 = plan(&header, &LocalChunks::default());
        assert_eq!(p2, p);
    }

    #[test]
    fn index_stops_at_the_given_length() {
        let cs = 64 * 1024;
        let old = pattern(4 * cs, 1);
        let header = header_for(&old, cs as u32);
        let local = index_view(&Bytes(old.clone()), 2 * cs as u64, &header).unwrap();
        assert_eq!(local.bytes_hashed, 2 * cs as u64);
        let p = plan(&header, &local);
        assert_eq!(p.summary.reused_chunks, 2);
    }
}
