//! Streaming verified chunks into the target slot, and reading flushed regions back against
//! the signed hash while the writing goes on.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{bytes_to_read_from, InstallError};
use crate::bundle::{BundleError, BundleReader, BundleSource};
use crate::disk::sys::AlignedBuf;
use crate::install::adaptive::{ChunkSource, Plan};
use crate::install::slotio::{ReadOnlyView, SlotIo, SlotTarget};

/// Bytes written between two flushes, each flushed region then being read back.
const FLUSH_EVERY: u64 = 64 << 20;
/// Read-back piece size.
const READBACK_PIECE: usize = 2 << 20;

/// Writes verified chunks into the slot with aligned writes; after every [`FLUSH_EVERY`]
/// bytes and at the end, flushes and hands the flushed region to the verifier.
pub(super) struct ChunkWriter<'a> {
    out: &'a dyn SlotIo,
    slot: &'a str,
    total: u64,
    write_buf: AlignedBuf,
    flushed: u64,
    regions: mpsc::Sender<(u64, u64)>,
    last_event: Instant,
    cancel: &'a AtomicBool,
    progress: &'a mut dyn FnMut(u64),
}

impl<'a> ChunkWriter<'a> {
    /// A writer of a `total`-byte image into `slot` through `out`, with a write buffer for
    /// chunks of up to `chunk_size` bytes; flushed regions go to `regions`, progress to
    /// `progress` (at most every 200 ms), and `cancel` is checked before every chunk.
    pub(super) fn new(
        out: &'a dyn SlotIo,
        slot: &'a str,
        total: u64,
        chunk_size: usize,
        regions: mpsc::Sender<(u64, u64)>,
        cancel: &'a AtomicBool,
        progress: &'a mut dyn FnMut(u64),
    ) -> Self {
        ChunkWriter {
            out,
            slot,
            total,
            write_buf: SlotTarget::buffer(chunk_size),
            flushed: 0,
            regions,
            last_event: Instant::now(),
            cancel,
            progress,
        }
    }

    /// Writes one verified chunk at its image offset (chunks come in image order).
    fn put(&mut self, image_offset: u64, data: &[u8]) -> Result<(), InstallError> {
        if self.cancel.load(AtomicOrdering::Relaxed) {
            return Err(InstallError::Interrupted {
                slot: self.slot.to_string(),
            });
        }
        // Direct I/O needs an aligned buffer and whole blocks: copy the verified chunk in and
        // zero-pad the tail (which stays below the slot record).
        let padded = data
            .len()
            .next_multiple_of(crate::install::slotio::DIRECT_ALIGN);
        self.write_buf[..data.len()].copy_from_slice(data);
        self.write_buf[data.len()..padded].fill(0);
        self.out
            .write_at(self.slot, &self.write_buf[..padded], image_offset)?;
        let done = image_offset + data.len() as u64;
        if done - self.flushed >= FLUSH_EVERY || done == self.total {
            self.out.sync(self.slot)?;
            // A closed channel means the verifier stopped on an error it will report.
            let _ = self.regions.send((self.flushed, done - self.flushed));
            self.flushed = done;
        }
        if self.last_event.elapsed().as_millis() >= 200 || done == self.total {
            self.last_event = Instant::now();
            (self.progress)(done);
        }
        Ok(())
    }
}

/// Streams every chunk of the bundle into the slot, decoded on `workers` threads.
pub(super) fn stream_into_slot<R: Read + Send>(
    writer: &mut ChunkWriter<'_>,
    reader: &mut BundleReader<R>,
    workers: usize,
) -> Result<(), InstallError> {
    let mut sink_error: Option<InstallError> = None;
    let result = reader.read_parallel(workers, &mut |chunk| {
        writer.put(chunk.image_offset, chunk.data).map_err(|e| {
            let io = io::Error::other(e.to_string());
            sink_error = Some(e);
            io
        })
    });
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(sink_error.take().unwrap_or(InstallError::Bundle(e))),
    }
}

/// Writes the image following `plan`: chunks found in the running slot are read from
/// `running`, checked against their signed hash and written, while their frames are skipped
/// in the bundle (runs of them in one skip); the others are read from the bundle and decoded
/// as usual. A planned copy whose bytes no longer match is taken from the bundle instead.
/// Returns the number of such fallbacks.
pub(super) fn stream_adaptive<R: BundleSource>(
    writer: &mut ChunkWriter<'_>,
    reader: &mut BundleReader<R>,
    header: &crate::bundle::BundleHeader,
    plan: &Plan,
    running: &dyn ReadOnlyView,
) -> Result<u32, InstallError> {
    let mut local = vec![0u8; header.chunk_size as usize];
    let mut pending_skip = 0u32;
    let mut fallbacks = 0u32;
    let gap = reader.source().read_through_gap();
    for (i, source) in plan.sources.iter().enumerate() {
        let index = i as u32;
        let len = header.chunk_len(index) as usize;
        let copied = match *source {
            ChunkSource::Running { offset } => {
                let bytes = &mut local[..len];
                let read = running.read_at(bytes, offset).is_ok();
                let ok =
                    read && <[u8; 32]>::from(Sha256::digest(&*bytes)) == header.chunks[i].sha256;
                if !ok {
                    fallbacks += 1;
                }
                ok
            }
            ChunkSource::Bundle => false,
        };
        if copied {
            writer.put(header.chunk_image_offset(index), &local[..len])?;
            pending_skip += 1;
            continue;
        }
        if pending_skip > 0 {
            let next_read = bytes_to_read_from(header, plan, i, gap);
            reader.skip_chunks(pending_skip, Some(next_read))?;
            pending_skip = 0;
        }
        let chunk = reader.next_chunk()?.ok_or_else(|| {
            InstallError::Bundle(BundleError::Internal(format!(
                "the bundle reader ended before chunk {index}"
            )))
        })?;
        writer.put(chunk.image_offset, chunk.data)?;
    }
    // Skipping the last run also runs the end-of-bundle checks (nothing trails the payload).
    reader.skip_chunks(pending_skip, None)?;
    Ok(fallbacks)
}

/// Reads back each flushed region in order and returns the SHA-256 of everything read.
pub(super) fn verify_regions(
    out: &dyn SlotIo,
    slot: &str,
    regions: mpsc::Receiver<(u64, u64)>,
    cancel: &AtomicBool,
    verified: &AtomicU64,
) -> Result<[u8; 32], InstallError> {
    let mut hasher = Sha256::new();
    let mut buf = SlotTarget::buffer(READBACK_PIECE);
    let mut expected_offset = 0u64;
    for (offset, len) in regions {
        debug_assert_eq!(offset, expected_offset);
        let mut at = offset;
        while at < offset + len {
            if cancel.load(AtomicOrdering::Relaxed) {
                return Err(InstallError::Interrupted {
                    slot: slot.to_string(),
                });
            }
            let want = ((offset + len - at) as usize).min(READBACK_PIECE);
            let aligned = want.next_multiple_of(crate::install::slotio::DIRECT_ALIGN);
            out.read_at(slot, &mut buf[..aligned], at)?;
            hasher.update(&buf[..want]);
            at += want as u64;
            verified.store(at, AtomicOrdering::Relaxed);
        }
        expected_offset = offset + len;
    }
    Ok(hasher.finalize().into())
}
