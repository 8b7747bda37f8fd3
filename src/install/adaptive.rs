//! Adaptive installs: chunks the running slot already holds are copied from it instead of
//! being fetched and decompressed from the bundle.
//!
//! Two versions of a root filesystem share most of their blocks. The bundle's signed chunk
//! table names the SHA-256 of every chunk of the new image, so the install can hash the
//! running slot and take every chunk it finds there from the local disk. It looks in two
//! places:
//! - at chunk-aligned offsets (the chunk's own offset, or another): found by hashing the
//!   running slot in chunk-sized pieces;
//! - at any 4 KiB-aligned offset, when the bundle carries first-block hashes
//!   ([`crate::bundle::format::EXT_FIRST_BLOCK_HASHES`]): a file system packs files one after
//!   the other, so when a file early in the image grows or goes away, everything after it
//!   moves by whole blocks, off the chunk grid. Every 4 KiB block of the running slot is
//!   hashed into a compact sorted index; a chunk whose first-block hash appears there is
//!   checked at each candidate offset (at most [`MAX_CANDIDATES`]) against its full hash.
//!
//! The bundle source then skips the frames of the chunks found: a file seeks, a download asks
//! for the next needed frame with a new `Range` request, so unchanged data is never
//! transferred.
//!
//! Nothing is trusted more than in a plain install:
//! - a copied chunk is hashed again when it is read for writing and must equal the signed
//!   chunk hash, else it is fetched from the bundle after all;
//! - the running slot is only ever read, through a read-only view
//!   ([`crate::install::slotio::SlotBacking::read_only_view`]);
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

use crate::bundle::format::{FIRST_BLOCK_HASH_LEN, FIRST_BLOCK_LEN};
use crate::bundle::BundleHeader;
use crate::install::slotio::ReadOnlyView;

/// Candidate offsets checked per chunk at most, besides the one the previous chunk's move
/// predicts (all-zero blocks appear everywhere).
pub const MAX_CANDIDATES: usize = 4;

/// Chunk hashes found in the running slot, each with the byte offset where it was found, and
/// the first-block index.
#[derive(Debug, Default, Clone)]
pub struct LocalChunks {
    by_hash: HashMap<[u8; 32], u64>,
    /// (first-block hash, block number) of every 4 KiB block, sorted: 8 bytes a block, so a
    /// 4 GiB slot costs 8 MiB.
    blocks: Vec<(u32, u32)>,
    /// Length of the indexed data (candidates must end within it).
    pub indexed_len: u64,
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

    /// Records that the 4 KiB block number `block` has this first-block hash. Call
    /// [`LocalChunks::seal`] after the last one.
    pub fn insert_block(&mut self, hash: [u8; FIRST_BLOCK_HASH_LEN], block: u32) {
        self.blocks.push((u32::from_be_bytes(hash), block));
    }

    /// Sorts the block index for lookups.
    pub fn seal(&mut self) {
        self.blocks.sort_unstable();
    }

    /// Byte offsets of the (at most [`MAX_CANDIDATES`]) blocks with this first-block hash
    /// that lie nearest to `near` (a byte offset): moved data is usually found a little
    /// before or after where it was, and common blocks (all zeros, fill) appear everywhere.
    pub fn candidates_near(&self, hash: [u8; FIRST_BLOCK_HASH_LEN], near: u64) -> Vec<u64> {
        let key = u32::from_be_bytes(hash);
        let start = self.blocks.partition_point(|&(h, _)| h < key);
        let end = start + self.blocks[start..].partition_point(|&(h, _)| h == key);
        let same = &self.blocks[start..end];
        let near_block = near / FIRST_BLOCK_LEN as u64;
        // Walk outwards from the nearest block number in both directions.
        let mut right = same.partition_point(|&(_, b)| u64::from(b) < near_block);
        let mut left = right;
        let mut out = Vec::with_capacity(MAX_CANDIDATES);
        while out.len() < MAX_CANDIDATES && (left > 0 || right < same.len()) {
            let dist = |i: usize| u64::from(same[i].1).abs_diff(near_block);
            let take_right = match (left > 0, right < same.len()) {
                (true, true) => dist(right) <= dist(left - 1),
                (false, true) => true,
                _ => false,
            };
            let block = if take_right {
                right += 1;
                same[right - 1].1
            } else {
                left -= 1;
                same[left].1
            };
            out.push(u64::from(block) * FIRST_BLOCK_LEN as u64);
        }
        out
    }

    /// Whether the 4 KiB block at byte `offset` has this first-block hash (false for an
    /// offset that is not block-aligned or not indexed).
    pub fn block_has(&self, hash: [u8; FIRST_BLOCK_HASH_LEN], offset: u64) -> bool {
        offset % FIRST_BLOCK_LEN as u64 == 0
            && u32::try_from(offset / FIRST_BLOCK_LEN as u64).is_ok_and(|block| {
                self.blocks
                    .binary_search(&(u32::from_be_bytes(hash), block))
                    .is_ok()
            })
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

/// Decides, for every chunk of `header`, whether the running slot has it: at a chunk-aligned
/// offset found by its hash; else, with first-block hashes, where the previous chunk's move
/// predicts it, then at the first-block candidates nearest to that place. `check(offset, len,
/// sha256)` confirms that the `len` bytes at `offset` hash to `sha256`.
pub fn plan(
    header: &BundleHeader,
    local: &LocalChunks,
    check: &mut dyn FnMut(u64, usize, &[u8; 32]) -> bool,
) -> Plan {
    let mut summary = PlanSummary {
        chunks: header.chunk_count(),
        ..PlanSummary::default()
    };
    let first_blocks = header.first_block_hashes();
    // How far the previous chunk found off the grid had moved (running offset - own offset).
    let mut last_move: Option<i64> = None;
    let mut sources = Vec::with_capacity(header.chunks.len());
    for (i, entry) in header.chunks.iter().enumerate() {
        let frame = u64::from(entry.compressed_len);
        let len = header.chunk_len(i as u32) as usize;
        let own = header.chunk_image_offset(i as u32);
        let fits = |c: u64| {
            c.checked_add(len as u64)
                .is_some_and(|end| end <= local.indexed_len)
        };
        let found = local.find(&entry.sha256).or_else(|| {
            let first = first_blocks.as_ref()?[i];
            let predicted = last_move
                .and_then(|m| own.checked_add_signed(m))
                .filter(|&c| fits(c));
            if let Some(c) = predicted.filter(|&c| local.block_has(first, c)) {
                if check(c, len, &entry.sha256) {
                    return Some(c);
                }
            }
            local
                .candidates_near(first, predicted.unwrap_or(own))
                .into_iter()
                .filter(|&c| fits(c) && Some(c) != predicted)
                .find(|&c| check(c, len, &entry.sha256))
        });
        match found {
            Some(offset) => {
                if offset != own {
                    last_move = Some(offset as i64 - own as i64);
                }
                summary.reused_chunks += 1;
                summary.reused_bytes += len as u64;
                summary.skipped_bundle_bytes += frame;
                sources.push(ChunkSource::Running { offset });
            }
            None => {
                summary.bundle_bytes += frame;
                sources.push(ChunkSource::Bundle);
            }
        }
    }
    Plan { sources, summary }
}

/// Hashes the first `len` bytes of `view` (the running slot) in pieces of the bundle's chunk
/// size at chunk-aligned offsets. When the new image ends in a short chunk, that length is
/// also hashed at the same offset, so an unchanged tail is found too. When the bundle has
/// first-block hashes, every 4 KiB block is hashed into the block index as well.
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
    let with_blocks = header.first_block_hashes().is_some();
    let mut local = LocalChunks {
        indexed_len: len,
        ..LocalChunks::default()
    };
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
        if with_blocks {
            // Chunk sizes are powers of two of at least 64 KiB: blocks never straddle pieces.
            for (k, block) in bytes.chunks(FIRST_BLOCK_LEN).enumerate() {
                let number = (offset / FIRST_BLOCK_LEN as u64) + k as u64;
                let Ok(number) = u32::try_from(number) else {
                    break;
                };
                let digest = Sha256::digest(block);
                let mut hash = [0u8; FIRST_BLOCK_HASH_LEN];
                hash.copy_from_slice(&digest[..FIRST_BLOCK_HASH_LEN]);
                local.insert_block(hash, number);
            }
        }
        offset += piece;
    }
    local.seal();
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
            payload_offset: None,
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
        let p = plan(&header, &local, &mut |_, _, _| false);
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
        let p = plan(&header, &local, &mut |_, _, _| false);
        assert!(p.sources.iter().all(|s| *s == ChunkSource::Bundle));
        assert_eq!(p.summary.reused_chunks, 0);
        assert_eq!(p.summary.skipped_bundle_bytes, 0);
        // An empty index (no running image) plans the same.
        let p2 = plan(&header, &LocalChunks::default(), &mut |_, _, _| false);
        assert_eq!(p2, p);
    }

    /// The header with the first-block hashes a bundle writer adds.
    fn with_first_blocks(mut header: BundleHeader, image: &[u8]) -> BundleHeader {
        let cs = header.chunk_size as usize;
        let value = image
            .chunks(cs)
            .flat_map(|c| {
                let d = Sha256::digest(&c[..c.len().min(FIRST_BLOCK_LEN)]);
                d[..FIRST_BLOCK_HASH_LEN].to_vec()
            })
            .collect();
        header.extensions.push(crate::bundle::Extension {
            tag: crate::bundle::format::EXT_FIRST_BLOCK_HASHES,
            value,
        });
        header
    }

    #[test]
    fn chunks_moved_off_the_grid_by_whole_blocks_are_found() {
        let cs = 64 * 1024;
        let old = pattern(12 * cs, 3);
        // Three 4 KiB blocks early in the image went away: everything after moved 12 KiB.
        let mut new = old[..10 * 4096].to_vec();
        new.extend_from_slice(&old[13 * 4096..]);
        let header = with_first_blocks(header_for(&new, cs as u32), &new);
        let local = index_view(&Bytes(old.clone()), old.len() as u64, &header).unwrap();
        let mut checks = 0;
        let p = plan(&header, &local, &mut |offset, len, sha| {
            checks += 1;
            let at = offset as usize;
            <[u8; 32]>::from(Sha256::digest(&old[at..at + len])) == *sha
        });
        // Chunk 0 holds the cut; every later chunk is old data 12 KiB further on.
        assert_eq!(p.sources[0], ChunkSource::Bundle);
        for (i, s) in p.sources.iter().enumerate().skip(1) {
            assert_eq!(
                *s,
                ChunkSource::Running {
                    offset: (i * cs + 3 * 4096) as u64
                },
                "chunk {i}"
            );
        }
        assert!(checks <= p.sources.len() * MAX_CANDIDATES);
        // Without the extension only the grid is searched: nothing lines up.
        let plain = plan(&header_for(&new, cs as u32), &local, &mut |_, _, _| {
            panic!("no candidates without first-block hashes")
        });
        assert_eq!(plain.summary.reused_chunks, 0);
    }

    #[test]
    fn candidates_come_nearest_first() {
        let mut local = LocalChunks::default();
        for b in (1..100).step_by(2) {
            local.insert_block([0, 0, 0, 7], b);
        }
        local.insert_block([0, 0, 0, 8], 50);
        local.seal();
        let blocks = |near: u64| -> Vec<u64> {
            local
                .candidates_near([0, 0, 0, 7], near * 4096)
                .into_iter()
                .map(|o| o / 4096)
                .collect()
        };
        assert_eq!(blocks(50), [51, 49, 53, 47]);
        assert_eq!(blocks(0), [1, 3, 5, 7]);
        assert_eq!(blocks(1000), [99, 97, 95, 93]);
        assert!(local.candidates_near([1, 2, 3, 4], 0).is_empty());
        assert!(local.block_has([0, 0, 0, 7], 3 * 4096));
        assert!(!local.block_has([0, 0, 0, 7], 4 * 4096));
        assert!(!local.block_has([0, 0, 0, 7], 3 * 4096 + 1));
        assert!(local.block_has([0, 0, 0, 8], 50 * 4096));
    }

    #[test]
    fn index_stops_at_the_given_length() {
        let cs = 64 * 1024;
        let old = pattern(4 * cs, 1);
        let header = header_for(&old, cs as u32);
        let local = index_view(&Bytes(old.clone()), 2 * cs as u64, &header).unwrap();
        assert_eq!(local.bytes_hashed, 2 * cs as u64);
        let p = plan(&header, &local, &mut |_, _, _| false);
        assert_eq!(p.summary.reused_chunks, 2);
    }
}
