//! Steps 4-7 of an install: writing a verified bundle into the target slot, which stays
//! unbootable throughout.
//!
//! A slot is one partition (ROOT-x) or, on a disk with the boot chain, the pair (KERN-x,
//! ROOT-x). Each image of the bundle (the root image, then the kernel part if the bundle has
//! one) goes through the same [`write_part`]: streamed, flushed, read back against its signed
//! hash. Only when every part verified is the slot record written (with the kernel's size and
//! hash and the bundle's signed header, which the boot loader verifies before it starts the
//! kernel); the caller flips the slot once, for the pair.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::adaptive::{self, ChunkSource, Plan};
use super::slotio::{ReadOnlyView, SlotBacking, SlotIo, SlotTarget};
use super::stream::{stream_adaptive, stream_into_slot, verify_regions, ChunkWriter};
use super::{AdaptiveOutcome, InstallError, InstallEvent};
use crate::attrs::SlotAttributes;
use crate::bundle::{BundleError, BundleHeader, BundleReader, BundleSource, VerifiedHeader};
use crate::disk::record::{self, KernelRecord, SlotRecord, RECORD_BYTES};
use crate::disk::slots::{AbDisk, Slot};
use crate::select;

/// Timings of [`write_slot`].
#[derive(Debug, Clone, Copy)]
pub struct SlotWritten {
    /// Seconds until the last chunk was written and flushed (read-back runs alongside).
    pub write_seconds: f64,
    /// Seconds the read-back and slot record took after that.
    pub verify_seconds: f64,
    /// Whether O_DIRECT was used.
    pub direct_io: bool,
    /// What an adaptive install took from the running slot (the root image).
    pub adaptive: Option<AdaptiveOutcome>,
}

/// Where an adaptive install may copy chunks from: the running slot.
#[derive(Debug, Clone, Copy)]
pub struct Reuse {
    /// Index of the running slot.
    pub slot: usize,
    /// Length of the image it holds, from its slot record (`None`: hash the whole slot).
    pub image_len: Option<u64>,
    /// Length of the kernel its KERN partition holds, from the same record.
    pub kernel_len: Option<u64>,
}

/// Decompression workers: one per core, at most two by default. Two already decompress and
/// hash faster than disks write (about 1.3 GB/s each here), and each worker holds about two
/// chunks in flight, so capping keeps memory under 64 MiB on any machine.
pub(super) fn workers_for(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(2)
    } else {
        requested
    }
}

/// What [`prepare_target`] found: the adaptive plans of the root image and the kernel part.
pub(super) struct Prepared {
    pub(super) root: Option<IndexedRunning>,
    kernel: Option<IndexedRunning>,
}

/// The KERN partition of `slot` as a slot of its own (name, extent), for the part writer.
fn kernel_slot(slot: &Slot) -> Option<Slot> {
    slot.kernel.as_ref().map(|entry| Slot {
        name: entry.name.clone(),
        entry: entry.clone(),
        attrs: SlotAttributes::default(),
        kernel: None,
    })
}

/// The checks before a slot is written, which change nothing: the bundle's parts match the
/// slot (a kernel exactly when the slot has a KERN partition), each image fits its partition,
/// each partition can be opened for writing (not mounted, right partition node), and, for an
/// adaptive install, the running slot is hashed and the plan made
/// ([`InstallEvent::AdaptivePlan`]).
pub(super) fn prepare_target<D: SlotBacking>(
    disk: &mut AbDisk<D>,
    target: usize,
    verified: &VerifiedHeader,
    reuse: Option<Reuse>,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<Prepared, InstallError> {
    let header = verified.header();
    let kernel_view = verified.kernel_view();
    let sector_size = disk.gpt.sector_size();
    let slots = disk.slots()?;
    let slot = &slots[target];
    let slot_size = slot.size_bytes(sector_size);
    let kern = kernel_slot(slot);
    let usable = match (&kernel_view, &kern) {
        (None, None) => record::max_image_size(slot_size),
        (Some(_), Some(_)) => {
            let header_len = verified.signed_bytes().len() as u32;
            record::header_offset(slot_size, header_len).unwrap_or(0)
        }
        (Some(k), None) => {
            return Err(InstallError::KernelWithoutPartition {
                slot: slot.name.clone(),
                kernel_size: k.header().image_size,
            })
        }
        (None, Some(k)) => {
            return Err(InstallError::KernelMissing {
                slot: slot.name.clone(),
                kernel: k.name.clone(),
            })
        }
    };
    if header.image_size > usable {
        return Err(InstallError::TooLarge {
            image: header.image_size,
            slot: slot.name.clone(),
            usable,
            slot_size,
            record: slot_size - usable,
        });
    }
    if let (Some(view), Some(kern)) = (&kernel_view, &kern) {
        let size = kern.size_bytes(sector_size);
        if view.header().image_size > size {
            return Err(InstallError::TooLarge {
                image: view.header().image_size,
                slot: kern.name.clone(),
                usable: size,
                slot_size: size,
                record: 0,
            });
        }
    }
    // Probe-open the partitions first: a target that is mounted or cannot be opened is
    // refused while the disk is still exactly as it was.
    for part in std::iter::once(slot).chain(kern.as_ref()) {
        drop(open_partition(disk, part, sector_size)?);
    }
    // Adaptive: hash the running slot (read-only) while the target is still as it was.
    let Some(r) = reuse else {
        return Ok(Prepared {
            root: None,
            kernel: None,
        });
    };
    let running = &slots[r.slot];
    let index = |disk: &mut AbDisk<D>, part: &Slot, len, header: &BundleHeader| {
        index_running(disk, part, sector_size, len, header).map_err(|source| {
            InstallError::ReadRunning {
                slot: part.name.clone(),
                source,
            }
        })
    };
    let root = index(disk, running, r.image_len, header)?;
    events(InstallEvent::AdaptivePlan {
        running: running.name.clone(),
        bytes_hashed: root.bytes_hashed,
        index_seconds: root.seconds,
        summary: root.plan.summary,
    });
    let kernel = match (&kernel_view, kernel_slot(running)) {
        (Some(view), Some(running_kern)) => {
            let indexed = index(disk, &running_kern, r.kernel_len, view.header())?;
            events(InstallEvent::AdaptivePlan {
                running: running_kern.name.clone(),
                bytes_hashed: indexed.bytes_hashed,
                index_seconds: indexed.seconds,
                summary: indexed.plan.summary,
            });
            Some(indexed)
        }
        _ => None,
    };
    Ok(Prepared {
        root: Some(root),
        kernel,
    })
}

/// Steps 4-7 of an install into slot `target` from an already signature-checked reader:
/// invalidate the slot, stream verified chunks into it, flush, read back against the signed
/// hash, write the slot record. The slot stays unbootable; the caller decides what it becomes.
#[allow(clippy::too_many_arguments)]
pub fn write_slot<D: SlotBacking, R: BundleSource>(
    disk: &mut AbDisk<D>,
    target: usize,
    reader: &mut BundleReader<R>,
    workers: usize,
    reuse: Option<Reuse>,
    cancel: &AtomicBool,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<SlotWritten, InstallError> {
    // 4. Target unbootable before its bytes change; its old record goes too.
    let started = Instant::now();
    let verified = reader.verified_header().clone();
    let header = verified.header();
    let prepared = prepare_target(disk, target, &verified, reuse, events)?;
    if cancel.load(AtomicOrdering::Relaxed) {
        return Err(InstallError::InterruptedBeforeWrite);
    }
    let sector_size = disk.gpt.sector_size();
    let slots = disk.slots()?;
    let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
    let slot = &slots[target];
    let slot_size = slot.size_bytes(sector_size);
    let mut invalid = attrs.clone();
    invalid[target] = select::invalidate(attrs[target]);
    disk.write_slot_attributes(&slots, &invalid)?;
    let record_offset = slot_size - RECORD_BYTES;
    let mut record_buf = SlotTarget::buffer(RECORD_BYTES as usize);

    // 5 + 6, per image: the root image into ROOT-x, then the kernel into KERN-x.
    let root = {
        let out = open_partition(disk, slot, sector_size)?;
        out.write_at(&slot.name, &record_buf, record_offset)?;
        events(InstallEvent::TargetInvalidated {
            target: slot.name.clone(),
            path: out.describe(),
            direct_io: out.is_direct(),
        });
        write_part(
            &*out,
            &slot.name,
            reader,
            prepared.root.as_ref(),
            workers,
            cancel,
            events,
        )?
    };
    let mut stream_end = root.stream_end;
    let kernel = match kernel_slot(slot) {
        Some(kern) => {
            reader.start_kernel_part()?;
            let view = reader.header().clone();
            events(InstallEvent::KernelPart {
                partition: kern.name.clone(),
                size: view.image_size,
            });
            let kout = open_partition(disk, &kern, sector_size)?;
            stream_end = write_part(
                &*kout,
                &kern.name,
                reader,
                prepared.kernel.as_ref(),
                workers,
                cancel,
                events,
            )?
            .stream_end;
            Some(KernelRecord {
                size: view.image_size,
                sha256: view.image_sha256,
                header_len: verified.signed_bytes().len() as u32,
            })
        }
        None => None,
    };
    let write_seconds = (stream_end - started).as_secs_f64();

    // 7. Slot record, after every part verified; with a kernel, the signed header goes
    // before the record block and is on the device before the record that points at it.
    let out = open_partition(disk, slot, sector_size)?;
    if let Some(k) = &kernel {
        let at = record::header_offset(slot_size, k.header_len).ok_or_else(|| {
            InstallError::Bundle(BundleError::Internal(
                "the signed header does not fit the slot".into(),
            ))
        })?;
        let mut area = SlotTarget::buffer(record::header_area(k.header_len) as usize);
        area[..k.header_len as usize].copy_from_slice(verified.signed_bytes());
        out.write_at(&slot.name, &area, at)?;
        out.sync(&slot.name)?;
    }
    let record = SlotRecord {
        image_size: header.image_size,
        image_sha256: header.image_sha256,
        version: header.image_version.clone(),
        compatible: header.compatible.clone(),
        kernel,
    };
    record_buf.copy_from_slice(&record.encode());
    out.write_at(&slot.name, &record_buf, record_offset)?;
    out.sync(&slot.name)?;
    // What the read-back and record added after the last chunk was written.
    let verify_seconds = stream_end.elapsed().as_secs_f64();
    if cancel.load(AtomicOrdering::Relaxed) {
        return Err(InstallError::Interrupted {
            slot: slot.name.clone(),
        });
    }
    Ok(SlotWritten {
        write_seconds,
        verify_seconds,
        direct_io: out.is_direct(),
        adaptive: prepared.root.map(|a| AdaptiveOutcome {
            planned: a.plan.summary,
            fallbacks: root.fallbacks.unwrap_or(0),
        }),
    })
}

/// Opens one partition of the target slot for writing.
fn open_partition<'d, D: SlotBacking>(
    disk: &'d mut AbDisk<D>,
    part: &Slot,
    sector_size: u32,
) -> Result<Box<dyn SlotIo + 'd>, InstallError> {
    Ok(disk.dev.open_slot(
        &part.name,
        part.partition(),
        part.offset_bytes(sector_size),
        part.size_bytes(sector_size),
    )?)
}

/// What [`write_part`] did.
struct PartWritten {
    stream_end: Instant,
    fallbacks: Option<u32>,
}

/// Streams the reader's current image into `out` and verifies it there: after every
/// FLUSH_EVERY bytes the writer flushes, and a verifier thread reads that flushed region back
/// (bypassing the page cache) into the whole-image SHA-256, which must equal the signed one.
/// So every byte is read back only after a flush, as if the partition were read back after
/// the last one, but the read-back overlaps the writing instead of following it.
fn write_part<R: BundleSource>(
    out: &dyn SlotIo,
    name: &str,
    reader: &mut BundleReader<R>,
    adaptive: Option<&IndexedRunning>,
    workers: usize,
    cancel: &AtomicBool,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<PartWritten, InstallError> {
    let header = reader.header().clone();
    let total = header.image_size;
    // The read-back checks the signed whole-image hash from the disk itself; per-chunk hashes
    // still check every byte before it is written.
    reader.skip_image_hash();
    let verified_bytes = AtomicU64::new(0);
    let (region_tx, region_rx) = mpsc::channel::<(u64, u64)>();
    let (stream_result, readback, stream_end) = std::thread::scope(|scope| {
        let verifier =
            scope.spawn(|| verify_regions(out, name, region_rx, cancel, &verified_bytes));
        let mut progress = |written| {
            events(InstallEvent::Written {
                bytes: written,
                total,
            });
            let checked = verified_bytes.load(AtomicOrdering::Relaxed);
            if checked > 0 {
                events(InstallEvent::ReadBack {
                    bytes: checked,
                    total,
                });
            }
        };
        let mut writer = ChunkWriter::new(
            out,
            name,
            total,
            header.chunk_size as usize,
            region_tx,
            cancel,
            &mut progress,
        );
        let result = match adaptive {
            Some(indexed) => {
                stream_adaptive(&mut writer, reader, &header, &indexed.plan, &*indexed.view)
                    .map(Some)
            }
            None => stream_into_slot(&mut writer, reader, workers).map(|()| None),
        };
        drop(writer);
        let stream_end = Instant::now();
        let readback = verifier.join();
        (result, readback, stream_end)
    });
    // A signal stops the stream wherever it is (a blocked source read gives up with an
    // error), so whatever the threads returned, the install was interrupted.
    if cancel.load(AtomicOrdering::Relaxed) {
        return Err(InstallError::Interrupted {
            slot: name.to_string(),
        });
    }
    let fallbacks = stream_result?;
    let actual = readback.map_err(|_| {
        InstallError::Bundle(BundleError::Internal("read-back thread panicked".into()))
    })??;
    events(InstallEvent::ReadBack {
        bytes: total,
        total,
    });
    if actual != header.image_sha256 {
        return Err(InstallError::ReadbackMismatch {
            slot: name.to_string(),
            expected: hex::encode(header.image_sha256),
            actual: hex::encode(actual),
        });
    }
    events(InstallEvent::ReadbackVerified {
        sha256: hex::encode(actual),
    });
    Ok(PartWritten {
        stream_end,
        fallbacks,
    })
}

/// Payload bytes an adaptive install reads from chunk `first` on (a bundle chunk) before its
/// next skip that is larger than `gap` (smaller skips are read through), per the plan.
pub(super) fn bytes_to_read_from(
    header: &BundleHeader,
    plan: &Plan,
    first: usize,
    gap: u64,
) -> u64 {
    let mut wanted = 0u64;
    let mut gap_run = 0u64;
    for (entry, source) in header.chunks[first..].iter().zip(&plan.sources[first..]) {
        let frame = u64::from(entry.compressed_len);
        match source {
            ChunkSource::Bundle => {
                wanted += gap_run + frame;
                gap_run = 0;
            }
            ChunkSource::Running { .. } => {
                gap_run += frame;
                if gap_run > gap {
                    break;
                }
            }
        }
    }
    wanted
}

/// The running slot's chunk index and the plan made from it.
pub(super) struct IndexedRunning {
    view: Box<dyn ReadOnlyView>,
    pub(super) plan: Plan,
    bytes_hashed: u64,
    seconds: f64,
}

/// Hashes a running partition through a read-only view and plans the adaptive install.
fn index_running<D: SlotBacking>(
    disk: &mut AbDisk<D>,
    running: &Slot,
    sector_size: u32,
    image_len: Option<u64>,
    header: &BundleHeader,
) -> io::Result<IndexedRunning> {
    let started = Instant::now();
    let size = running.size_bytes(sector_size);
    // The slot record's tail block is never image data.
    let usable = record::max_image_size(size);
    let view = disk
        .dev
        .read_only_view(running.offset_bytes(sector_size), usable)?;
    let len = image_len.unwrap_or(usable).min(usable);
    let local = adaptive::index_view(&*view, len, header)?;
    let mut candidate = vec![0u8; header.chunk_size as usize];
    let mut bytes_hashed = local.bytes_hashed;
    let plan = adaptive::plan(header, &local, &mut |offset, len, sha256| {
        let bytes = &mut candidate[..len];
        bytes_hashed += len as u64;
        view.read_at(bytes, offset).is_ok() && <[u8; 32]>::from(Sha256::digest(&*bytes)) == *sha256
    });
    Ok(IndexedRunning {
        view,
        plan,
        bytes_hashed,
        seconds: started.elapsed().as_secs_f64(),
    })
}
