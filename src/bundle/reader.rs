//! Streaming, verifying bundle reader.
//!
//! A chunk is handed out only after its SHA-256 matched the signed chunk
//! table, so a consumer may write it to the target slot at once; the header's
//! signature is verified before the reader exists at all.
//!
//! Memory is bounded by the chunk size, not the image size: one compressed
//! frame buffer (at most [`max_compressed_len`]`(chunk_size)`), one
//! uncompressed chunk buffer (`chunk_size`), and a zstd context whose window
//! is capped at `chunk_size`; plus the chunk table (36 bytes per chunk). For
//! the default 4 MiB chunks that is about 12.1 MiB + 9 KiB per GiB of image.

use std::io::{self, Read};

use sha2::{Digest, Sha256};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::error::{BundleError, Section};
use super::format::{
    max_compressed_len, read_full, read_verified_header, BundleHeader, VerifiedHeader,
};
use super::keys::{KeyId, Keyring};
use super::source::BundleSource;
use crate::pipeline;

/// A chunk whose SHA-256 matched the signed chunk table.
pub struct VerifiedChunk<'a> {
    /// Chunk index (0-based).
    pub index: u32,
    /// Byte offset of this chunk in the image (and in the target slot).
    pub image_offset: u64,
    /// The uncompressed, verified bytes.
    pub data: &'a [u8],
}

impl std::fmt::Debug for VerifiedChunk<'_> {
    // Only the length: a derived Debug would print megabytes of data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedChunk")
            .field("index", &self.index)
            .field("image_offset", &self.image_offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Decompresses and verifies single chunk frames; one per worker thread.
///
/// Decompression is capped at the chunk's declared length: a frame that
/// would produce more is stopped after one extra byte and refused (zstd bomb
/// protection), and the zstd window is capped at the chunk size, so a frame
/// cannot make the decoder allocate more than about one chunk either.
pub struct ChunkDecoder {
    dctx: Decoder<'static>,
}

impl ChunkDecoder {
    /// A decoder for bundles with this chunk size.
    pub fn new(chunk_size: u32) -> Result<ChunkDecoder, BundleError> {
        let zstd_err = |e| BundleError::io("creating a zstd decoder", e);
        let mut dctx = Decoder::new().map_err(zstd_err)?;
        // An honest frame of at most chunk_size bytes never needs a larger
        // window (zstd shrinks the window to the source size); 10 is zstd's
        // minimum window log.
        let window_log = chunk_size.max(1).ilog2().max(10);
        dctx.set_parameter(DParameter::WindowLogMax(window_log))
            .map_err(zstd_err)?;
        Ok(ChunkDecoder { dctx })
    }

    /// Decompresses chunk `index` from its frame `compressed` into
    /// `out[..chunk_len]` and checks its length and SHA-256 against the
    /// verified header. Returns the verified bytes.
    pub fn decode<'o>(
        &mut self,
        verified: &VerifiedHeader,
        index: u32,
        compressed: &[u8],
        out: &'o mut [u8],
    ) -> Result<&'o [u8], BundleError> {
        let header = verified.header();
        let count = header.chunk_count();
        let entry = header
            .chunks
            .get(index as usize)
            .ok_or(BundleError::ChunkIndexOutOfRange { index, count })?;
        let expected = header.chunk_len(index);
        if compressed.len() != entry.compressed_len as usize {
            return Err(BundleError::ChunkDecompress {
                index,
                bundle_offset: header.chunk_bundle_offset(index)?,
                reason: format!(
                    "frame is {} bytes, chunk table says {}",
                    compressed.len(),
                    entry.compressed_len
                ),
            });
        }
        let out = out.get_mut(..expected as usize).ok_or_else(|| {
            BundleError::Internal(format!(
                "chunk {index}: output buffer shorter than the chunk length {expected}"
            ))
        })?;
        self.decompress_bounded(header, index, compressed, out)?;
        let digest = Sha256::digest(&*out);
        if digest.as_slice() != entry.sha256 {
            return Err(BundleError::ChunkHashMismatch {
                index,
                image_offset: header.chunk_image_offset(index),
            });
        }
        Ok(out)
    }

    /// Decompresses exactly one zstd frame that must produce exactly
    /// `out.len()` bytes.
    fn decompress_bounded(
        &mut self,
        header: &BundleHeader,
        index: u32,
        compressed: &[u8],
        out: &mut [u8],
    ) -> Result<(), BundleError> {
        let expected = out.len() as u32;
        // The bundle offset is a sum over the table: computed only for an
        // error, or reading would be quadratic in the chunk count.
        let corrupt = |reason: String| BundleError::ChunkDecompress {
            index,
            bundle_offset: header.chunk_bundle_offset(index).unwrap_or(0),
            reason,
        };
        // The frame header's content size, when present, gives the precise
        // error early; the streaming cap below is what actually enforces it.
        if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            if declared > expected as u64 {
                return Err(BundleError::ChunkTooLarge { index, expected });
            }
            if declared < expected as u64 {
                return Err(BundleError::ChunkTooSmall {
                    index,
                    expected,
                    actual: declared,
                });
            }
        }
        self.dctx
            .reinit()
            .map_err(|e| corrupt(format!("resetting the decoder: {e}")))?;
        let mut input = InBuffer::around(compressed);
        let mut output = OutBuffer::around(out);
        loop {
            let (in_before, out_before) = (input.pos(), output.pos());
            let remaining = if output.pos() < expected as usize {
                self.dctx.run(&mut input, &mut output)
            } else {
                // The chunk is full; the frame may only end now. Offer one
                // more byte of room to detect output beyond the declared
                // length without producing more than that one byte.
                let mut probe = [0u8; 1];
                let mut probe_out = OutBuffer::around(&mut probe[..]);
                let r = self.dctx.run(&mut input, &mut probe_out);
                if probe_out.pos() > 0 {
                    return Err(BundleError::ChunkTooLarge { index, expected });
                }
                r
            }
            .map_err(|e| corrupt(e.to_string()))?;
            if remaining == 0 {
                break; // frame complete and flushed
            }
            if input.pos() == in_before && output.pos() == out_before {
                // No progress possible: the compressed span ended mid-frame.
                return Err(corrupt(format!(
                    "frame is incomplete after {} of {} compressed bytes",
                    input.pos(),
                    compressed.len()
                )));
            }
        }
        let produced = output.pos();
        if input.pos() < compressed.len() {
            return Err(BundleError::ChunkTrailingBytes {
                index,
                extra: compressed.len() - input.pos(),
            });
        }
        if produced < expected as usize {
            return Err(BundleError::ChunkTooSmall {
                index,
                expected,
                actual: produced as u64,
            });
        }
        Ok(())
    }
}

/// Reads a bundle as a stream of verified chunks.
///
/// `BundleReader<R>` is `Send` when `R` is, so it can run in a pipeline
/// thread. See the module docs for the memory bound.
pub struct BundleReader<R> {
    inner: R,
    verified: VerifiedHeader,
    next_index: u32,
    /// Bundle byte offset of the next byte to read from `inner`.
    position: u64,
    decoder: ChunkDecoder,
    compressed: Vec<u8>,
    chunk: Vec<u8>,
    /// Running SHA-256 of the image so far; `None` after a resume without
    /// a prefix hash (then only the per-chunk hashes are checked).
    image_hasher: Option<Sha256>,
    /// The end-of-bundle checks ran (with the last chunk, or on the first
    /// call of a reader resumed at the end).
    end_checked: bool,
    failed: bool,
}

impl<R: Read> BundleReader<R> {
    /// Reads and verifies the header from `reader` (positioned at the start
    /// of the bundle) and returns a reader positioned at chunk 0.
    pub fn new(mut reader: R, keyring: &Keyring) -> Result<Self, BundleError> {
        let verified = read_verified_header(&mut reader, keyring)?;
        Self::with_state(reader, verified, 0, Some(Sha256::new()))
    }

    /// Builds a reader for a payload stream that starts at chunk
    /// `chunk_index` (byte offset [`BundleHeader::chunk_bundle_offset`]), for
    /// resuming a download with an HTTP Range request.
    ///
    /// `prefix_hash` is a SHA-256 already fed with the image bytes before
    /// this chunk (for example re-read from the target slot); with it the
    /// whole-image hash is still checked at the end. With `None` only the
    /// per-chunk hashes are checked, which still authenticates every byte
    /// handed out, since the chunk table is signed.
    ///
    pub fn resume_at(
        reader: R,
        verified: VerifiedHeader,
        chunk_index: u32,
        prefix_hash: Option<Sha256>,
    ) -> Result<Self, BundleError> {
        let count = verified.header().chunk_count();
        if chunk_index > count {
            return Err(BundleError::ChunkIndexOutOfRange {
                index: chunk_index,
                count,
            });
        }
        let hasher = if chunk_index == 0 {
            Some(prefix_hash.unwrap_or_default())
        } else {
            prefix_hash
        };
        Self::with_state(reader, verified, chunk_index, hasher)
    }

    fn with_state(
        inner: R,
        verified: VerifiedHeader,
        next_index: u32,
        image_hasher: Option<Sha256>,
    ) -> Result<Self, BundleError> {
        let header = verified.header();
        let position = header.chunk_bundle_offset(next_index)?;
        let decoder = ChunkDecoder::new(header.chunk_size)?;
        // Chunk 0 is the largest (only the last may be short); a small image
        // with a big chunk size gets small buffers.
        let max_chunk = header.chunk_len(0);
        let compressed = vec![0u8; max_compressed_len(max_chunk) as usize];
        let chunk = vec![0u8; max_chunk as usize];
        Ok(BundleReader {
            inner,
            verified,
            next_index,
            position,
            decoder,
            compressed,
            chunk,
            image_hasher,
            end_checked: false,
            failed: false,
        })
    }

    /// Moves on to the bundle's kernel part once every chunk of the root image was read:
    /// from here the reader hands out the kernel's chunks, as an image of its own
    /// ([`BundleHeader::kernel_view`]: its chunk table, its whole-image hash), from the same
    /// stream, which is at the kernel's first frame.
    pub fn start_kernel_part(&mut self) -> Result<(), BundleError> {
        let header = self.verified.header();
        if header.payload_offset.is_some() || self.next_index != header.chunk_count() {
            return Err(BundleError::Internal(
                "the kernel part starts after the root image's last chunk".into(),
            ));
        }
        let view = self
            .verified
            .kernel_view()
            .ok_or_else(|| BundleError::Internal("the bundle has no kernel part".into()))?;
        let max_chunk = view.header().chunk_len(0);
        self.compressed
            .resize(max_compressed_len(max_chunk) as usize, 0);
        self.chunk.resize(max_chunk as usize, 0);
        let start = view.header().chunk_bundle_offset(0)?;
        if start != self.position {
            return Err(BundleError::Internal(format!(
                "the root image ended at bundle offset {}, the kernel part starts at {start}",
                self.position
            )));
        }
        self.verified = view;
        self.next_index = 0;
        self.image_hasher = Some(Sha256::new());
        self.end_checked = false;
        Ok(())
    }

    /// The verified header.
    pub fn header(&self) -> &BundleHeader {
        self.verified.header()
    }

    /// The verified header with its key id (cheap to clone; pass it to
    /// [`BundleReader::resume_at`] to resume later).
    pub fn verified_header(&self) -> &VerifiedHeader {
        &self.verified
    }

    /// The id of the keyring key the bundle's signature verified under.
    pub fn matched_key(&self) -> KeyId {
        self.verified.key_id()
    }

    /// Index of the next chunk [`BundleReader::next_chunk`] will return.
    pub fn next_index(&self) -> u32 {
        self.next_index
    }

    /// Bundle byte offset of the next byte to be read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes held in the reader's chunk buffers (compressed + uncompressed).
    /// Fixed at construction: it depends on the chunk size only. The zstd
    /// context adds at most about one chunk (its window is capped).
    pub fn buffer_bytes(&self) -> usize {
        self.compressed.capacity() + self.chunk.capacity()
    }

    /// Stops computing the running whole-image SHA-256 for the rest of the stream.
    ///
    /// Every chunk is still checked against its signed hash before it is handed out, which
    /// already authenticates every byte. Only for callers that check the whole-image hash
    /// another way: the install pipeline hashes what it reads back from the slot, so hashing
    /// the stream too would cost a third SHA-256 pass on the writer's thread for nothing.
    pub fn skip_image_hash(&mut self) {
        self.image_hasher = None;
    }

    /// The underlying reader, to ask about its capabilities (reading from it directly would
    /// desynchronise the chunk positions, which is why this is not `&mut`).
    pub fn source(&self) -> &R {
        &self.inner
    }

    /// Gives the underlying reader back.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Returns the next verified chunk, or `None` after the last one.
    ///
    /// The last chunk is returned only after the end-of-bundle checks passed
    /// too (nothing trails the payload; the whole-image SHA-256 matches), so
    /// a caller that received every chunk has a fully verified image. After
    /// an error the reader refuses further use ([`BundleError::ReaderFailed`]).
    pub fn next_chunk(&mut self) -> Result<Option<VerifiedChunk<'_>>, BundleError> {
        if self.failed {
            return Err(BundleError::ReaderFailed);
        }
        if self.next_index >= self.verified.header().chunk_count() {
            if !self.end_checked {
                // Only reachable when resumed at the end: no chunk was read.
                if let Err(e) = self.finish() {
                    self.failed = true;
                    return Err(e);
                }
            }
            return Ok(None);
        }
        match self.advance() {
            Ok(len) => {
                let index = self.next_index - 1;
                Ok(Some(VerifiedChunk {
                    index,
                    image_offset: self.verified.header().chunk_image_offset(index),
                    data: &self.chunk[..len],
                }))
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Moves past the next `count` chunks without reading their frames, with one
    /// [`BundleSource::skip_ahead`] over their total length (one call, so a download makes
    /// one new request for a whole run); `next_read` is passed on as the hint of how much is
    /// read after. For a caller that has those chunks' bytes from elsewhere and checks them
    /// against the same signed chunk hashes ([`BundleHeader::chunks`]), as an adaptive install
    /// does. The stream's whole-image hash cannot cover skipped chunks, so it is turned off:
    /// the caller must check the whole image another way (the install reads the slot back).
    pub fn skip_chunks(&mut self, count: u32, next_read: Option<u64>) -> Result<(), BundleError>
    where
        R: BundleSource,
    {
        if self.failed {
            return Err(BundleError::ReaderFailed);
        }
        if count == 0 {
            return Ok(());
        }
        let first = self.next_index;
        let header = self.verified.header();
        let total = header.chunk_count();
        let end = first.checked_add(count).filter(|&e| e <= total).ok_or(
            BundleError::ChunkIndexOutOfRange {
                index: first.saturating_add(count - 1),
                count: total,
            },
        )?;
        let bytes: u64 = header.chunks[first as usize..end as usize]
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum();
        self.image_hasher = None;
        let result = self.inner.skip_ahead(bytes, next_read).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BundleError::Truncated {
                    section: Section::Chunk(first),
                    offset: self.position,
                }
            } else {
                BundleError::io(
                    format!(
                        "skipping {} chunk(s) from {} at bundle offset {}",
                        count,
                        Section::Chunk(first),
                        self.position
                    ),
                    e,
                )
            }
        });
        if let Err(e) = result {
            self.failed = true;
            return Err(e);
        }
        self.position += bytes;
        self.next_index = end;
        if end == total {
            if let Err(e) = self.finish() {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads, decodes and verifies the next chunk into `self.chunk`;
    /// returns its length.
    fn advance(&mut self) -> Result<usize, BundleError> {
        let index = self.next_index;
        let header = self.verified.header();
        let clen = header.chunks[index as usize].compressed_len as usize;
        let frame = &mut self.compressed[..clen];
        read_section(&mut self.inner, frame, Section::Chunk(index), self.position)?;
        let data = self
            .decoder
            .decode(&self.verified, index, frame, &mut self.chunk)?;
        let len = data.len();
        if let Some(h) = self.image_hasher.as_mut() {
            h.update(data);
        }
        self.position += clen as u64;
        self.next_index += 1;
        if self.next_index == header.chunk_count() {
            self.finish()?;
        }
        Ok(len)
    }

    /// End-of-bundle checks: nothing trails, the whole-image hash matches.
    fn finish(&mut self) -> Result<(), BundleError> {
        self.end_checked = true;
        // A kernel part's frames follow the root image's: its own reader checks the end.
        if self.verified.header().ends_bundle() {
            check_end(&mut self.inner, self.position)?;
        }
        if let Some(h) = self.image_hasher.take() {
            check_image_hash(self.verified.header(), h)?;
        }
        Ok(())
    }

    /// Reads every remaining chunk, decompressing and verifying them on
    /// `workers` threads, and hands them to `sink` in image order on the
    /// calling thread. Ends with the same end-of-bundle checks as
    /// [`BundleReader::next_chunk`].
    ///
    /// One thread reads frames from the underlying reader. At most
    /// `2 * workers + 2` chunks are in flight, so memory stays bounded by
    /// about that many times (chunk size + compressed frame) plus one zstd
    /// context per worker, however large the image.
    pub fn read_parallel(
        &mut self,
        workers: usize,
        sink: &mut dyn FnMut(VerifiedChunk<'_>) -> io::Result<()>,
    ) -> Result<(), BundleError>
    where
        R: Send,
    {
        if self.failed {
            return Err(BundleError::ReaderFailed);
        }
        let result = self.read_parallel_inner(workers.max(1), sink);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn read_parallel_inner(
        &mut self,
        workers: usize,
        sink: &mut dyn FnMut(VerifiedChunk<'_>) -> io::Result<()>,
    ) -> Result<(), BundleError>
    where
        R: Send,
    {
        let verified = self.verified.clone();
        let header = verified.header();
        let count = header.chunk_count();
        let first = self.next_index;
        if first >= count {
            return if self.end_checked {
                Ok(())
            } else {
                self.finish()
            };
        }
        let stages = DecodeStages {
            verified: &verified,
            first,
            max_chunk: header.chunk_len(0) as usize,
            max_frame: max_compressed_len(header.chunk_len(0)) as usize,
        };
        let frames = FrameReader {
            inner: &mut self.inner,
            header,
            first,
            position: self.position,
        };
        let mut hasher = self.image_hasher.take();
        let last = count - first - 1;
        let end_position = pipeline::run(
            &stages,
            pipeline::Names {
                pipeline: "parallel reader",
                producer: "bundle reader thread",
                worker: "decode worker",
            },
            count - first,
            workers,
            2 * workers + 2,
            frames,
            &mut |i, slot| {
                let index = first + i;
                if let Some(h) = hasher.as_mut() {
                    h.update(&slot.data);
                }
                sink(VerifiedChunk {
                    index,
                    image_offset: header.chunk_image_offset(index),
                    data: &slot.data,
                })
                .map_err(|source| BundleError::Sink { index, source })?;
                // Checked here, on the last chunk, so a wrong image hash is reported before
                // anything the reader thread finds after the last frame.
                if let Some(h) = hasher.take_if(|_| i == last) {
                    check_image_hash(header, h)?;
                }
                Ok(())
            },
        )?;
        self.position = end_position;
        self.next_index = count;
        self.end_checked = true;
        Ok(())
    }
}

/// A chunk's buffers as they travel reader → decoder → sink; `in_flight` of them exist, which
/// is what bounds memory.
struct FrameSlot {
    compressed: Vec<u8>,
    data: Vec<u8>,
}

/// The decode stage of [`BundleReader::read_parallel`]: item `i` is chunk `first + i`.
struct DecodeStages<'a> {
    verified: &'a VerifiedHeader,
    first: u32,
    max_chunk: usize,
    max_frame: usize,
}

impl pipeline::Stages for DecodeStages<'_> {
    type Slot = FrameSlot;
    type Worker = ChunkDecoder;
    type Error = BundleError;

    fn new_slot(&self) -> FrameSlot {
        FrameSlot {
            compressed: Vec::with_capacity(self.max_frame),
            data: Vec::new(),
        }
    }

    fn new_worker(&self) -> Result<ChunkDecoder, BundleError> {
        ChunkDecoder::new(self.verified.header().chunk_size)
    }

    fn work(
        &self,
        decoder: &mut ChunkDecoder,
        i: u32,
        slot: &mut FrameSlot,
    ) -> Result<(), BundleError> {
        slot.data.resize(self.max_chunk, 0);
        let len = decoder
            .decode(
                self.verified,
                self.first + i,
                &slot.compressed,
                &mut slot.data,
            )?
            .len();
        slot.data.truncate(len);
        Ok(())
    }
}

/// The reader thread of [`BundleReader::read_parallel`]: compressed frames in order, then the
/// end-of-bundle checks; its output is the bundle position after them.
struct FrameReader<'a, R> {
    inner: &'a mut R,
    header: &'a BundleHeader,
    first: u32,
    position: u64,
}

impl<R: Read + Send> pipeline::Producer<FrameSlot> for FrameReader<'_, R> {
    type Output = u64;
    type Error = BundleError;

    fn fill(&mut self, i: u32, slot: &mut FrameSlot) -> Result<(), BundleError> {
        let index = self.first + i;
        let clen = self.header.chunks[index as usize].compressed_len as usize;
        slot.compressed.resize(clen, 0);
        read_section(
            self.inner,
            &mut slot.compressed,
            Section::Chunk(index),
            self.position,
        )?;
        self.position += clen as u64;
        Ok(())
    }

    fn finish(self) -> Result<u64, BundleError> {
        if self.header.ends_bundle() {
            check_end(self.inner, self.position)?;
        }
        Ok(self.position)
    }
}

/// Reads exactly `buf.len()` bytes of `section`, which starts at bundle
/// offset `position`.
fn read_section<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    section: Section,
    position: u64,
) -> Result<(), BundleError> {
    let got = read_full(r, buf).map_err(|e| {
        BundleError::io(
            format!("reading the {section} at bundle offset {position}"),
            e,
        )
    })?;
    if got < buf.len() {
        return Err(BundleError::Truncated {
            section,
            offset: position + got as u64,
        });
    }
    Ok(())
}

/// Checks that nothing follows the last chunk.
fn check_end<R: Read + ?Sized>(r: &mut R, position: u64) -> Result<(), BundleError> {
    let mut probe = [0u8; 1];
    let got = read_full(r, &mut probe).map_err(|e| {
        BundleError::io(
            format!("checking for data after the payload at {position}"),
            e,
        )
    })?;
    if got > 0 {
        return Err(BundleError::TrailingData { offset: position });
    }
    Ok(())
}

fn check_image_hash(header: &BundleHeader, hasher: Sha256) -> Result<(), BundleError> {
    let expected = header.image_sha256;
    let actual: [u8; 32] = hasher.finalize().into();
    if actual != expected {
        return Err(BundleError::ImageHashMismatch {
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn reader_is_send() {
        assert_send::<BundleReader<std::fs::File>>();
        assert_send::<ChunkDecoder>();
        assert_send::<VerifiedHeader>();
    }
}
