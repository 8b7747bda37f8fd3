//! The install pipeline: verified streaming of a bundle into the inactive slot.
//!
//! Order of operations, each step a precondition of the next:
//! 1. find the running slot and the target (the other slot); refuse if they coincide;
//! 2. verify the bundle header's signature against the keyring (no byte is written before);
//! 3. check compatible string, version (no downgrade unless allowed) and size against the slot;
//! 4. mark the target unbootable (P0 T0 S0, crash-safe GPT write) and wipe its slot record;
//! 5. stream: a reader thread, decompression + per-chunk SHA-256 on worker threads, and
//!    aligned (O_DIRECT where possible) writes on this thread, overlapped; memory is bounded by
//!    the bundle reader's in-flight chunk limit;
//! 6. every 64 MiB and at the end, flush, then read that flushed region back (bypassing the
//!    page cache) on a verifier thread, overlapped with writing the next region; the SHA-256
//!    of everything read back must equal the signed whole-image hash;
//! 7. write the slot record (version, hash), flush;
//! 8. flip: target priority above the others, tries = N, successful = 0 (crash-safe);
//! 9. write the reboot-required sentinel.
//!
//! A failure or signal anywhere before step 8 leaves the target unbootable and the running
//! slot as it was; the GPT of a disk is only ever changed by the crash-safe writer.
//!
//! With [`InstallOptions::adaptive`], step 3 also hashes the running slot (read-only) and
//! step 5 copies every chunk found there instead of reading its frame from the bundle
//! ([`crate::adaptive`]); the checks of steps 5-6 are the same.

use std::cmp::Ordering;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::adaptive::{self, ChunkSource, Plan, PlanSummary};
use crate::attrs::SlotAttributes;
use crate::bundle::{BundleError, BundleReader, BundleSource, Keyring};
use crate::footer::{self, SlotRecord, RECORD_BYTES};
use crate::running;
use crate::select;
use crate::slotio::{ReadOnlyView, SlotBacking, SlotIo, SlotIoError, SlotTarget};
use crate::slots::{AbDisk, SlotError};
use crate::sys::AlignedBuf;

/// Default path of the reboot-required sentinel (watched by kured and similar).
pub const DEFAULT_SENTINEL: &str = "/run/reboot-required";

/// Errors of an install. Every variant leaves the running slot untouched and, from the
/// invalidation step on, the target unbootable.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Disk or slot error.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The bundle was refused or failed verification.
    #[error("bundle refused: {0}")]
    Bundle(#[from] BundleError),
    /// Slot I/O failed.
    #[error(transparent)]
    SlotIo(#[from] SlotIoError),
    /// No slot boots and none was named as running.
    #[error("cannot tell which slot is running and none is bootable: pass --running")]
    NoRunningSlot,
    /// The install target would be the running slot.
    #[error("refusing to install into {slot}: it is the running slot")]
    TargetIsRunning {
        /// The slot.
        slot: String,
    },
    /// The bundle is for other devices.
    #[error("bundle is for {bundle:?}, this device is {device:?}")]
    Incompatible {
        /// Bundle compatible string.
        bundle: String,
        /// Device compatible string.
        device: String,
    },
    /// The target is the only known-good slot (the running one is not committed).
    #[error("refusing to overwrite {target}: it is the only known-good slot and the running slot {running} ({state}) is not committed; run the health commit (or boot {target}) first")]
    TargetIsLastGood {
        /// The target slot.
        target: String,
        /// The running slot.
        running: String,
        /// The running slot's attributes.
        state: String,
    },
    /// The device's compatible string is not known.
    #[error(
        "the device's compatible string is unknown (no --compatible and {slot} has no slot record)"
    )]
    CompatibleUnknown {
        /// The running slot.
        slot: String,
    },
    /// The bundle is older than the running slot.
    #[error("bundle version {bundle} is older than running version {running} on {slot} (use --allow-downgrade)")]
    Downgrade {
        /// Bundle version.
        bundle: String,
        /// Running version.
        running: String,
        /// The running slot.
        slot: String,
    },
    /// The image does not fit.
    #[error("image of {image} bytes does not fit slot {slot}: {usable} bytes usable ({slot_size}-byte partition minus the {record}-byte slot record)")]
    TooLarge {
        /// Image size.
        image: u64,
        /// Target slot.
        slot: String,
        /// Usable bytes.
        usable: u64,
        /// Partition size.
        slot_size: u64,
        /// Record size.
        record: u64,
    },
    /// The slot read back differs from the signed image hash.
    #[error("read-back of {slot} does not match the signed image hash (expected {expected}, read {actual}); slot left unbootable")]
    ReadbackMismatch {
        /// Target slot.
        slot: String,
        /// Signed hash.
        expected: String,
        /// Hash of what was read.
        actual: String,
    },
    /// Reading the running slot for an adaptive install failed (nothing was changed).
    #[error("adaptive install: reading the running slot {slot} failed: {source}")]
    ReadRunning {
        /// Running slot.
        slot: String,
        /// OS error.
        source: io::Error,
    },
    /// Interrupted by a signal.
    #[error("interrupted; {slot} left unbootable, running slot untouched")]
    Interrupted {
        /// Target slot.
        slot: String,
    },
    /// Interrupted by a signal before the target was changed.
    #[error("interrupted before anything was written; the disk is unchanged")]
    InterruptedBeforeWrite,
    /// Writing the sentinel failed (the install itself succeeded).
    #[error("install succeeded but writing the reboot sentinel {path} failed: {source}")]
    Sentinel {
        /// Sentinel path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

/// Install settings.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Tries given to the new slot.
    pub tries: u8,
    /// Allow installing a version lower than the running one.
    pub allow_downgrade: bool,
    /// The device's compatible string; default: the running slot's recorded one.
    pub compatible: Option<String>,
    /// The running slot's label or letter, when it cannot be detected.
    pub running: Option<String>,
    /// Where to write the reboot-required sentinel; `None` for no sentinel.
    pub sentinel: Option<PathBuf>,
    /// Decompression worker threads (0: one per core).
    pub workers: usize,
    /// Copy the chunks the running slot already holds instead of reading them from the
    /// bundle ([`crate::adaptive`]).
    pub adaptive: bool,
    /// Stop after every check (signature, policy, size, target can be opened; the adaptive
    /// plan): report what would happen, change nothing.
    pub dry_run: bool,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            tries: select::DEFAULT_TRIES,
            allow_downgrade: false,
            compatible: None,
            running: None,
            sentinel: Some(PathBuf::from(DEFAULT_SENTINEL)),
            workers: 0,
            adaptive: false,
            dry_run: false,
        }
    }
}

/// Progress events, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum InstallEvent {
    /// The signature verified.
    Verified {
        /// Image version.
        version: String,
        /// Compatible string.
        compatible: String,
        /// Image size.
        image_size: u64,
        /// Key id that verified.
        key_id: String,
    },
    /// Running and target slots chosen.
    Plan {
        /// Running slot.
        running: String,
        /// How the running slot was found.
        running_source: String,
        /// Target slot.
        target: String,
    },
    /// An adaptive install's plan: what comes from the running slot.
    AdaptivePlan {
        /// Running slot indexed.
        running: String,
        /// Running-slot bytes hashed.
        bytes_hashed: u64,
        /// Seconds the hashing took.
        index_seconds: f64,
        /// What the plan takes from where.
        #[serde(flatten)]
        summary: PlanSummary,
    },
    /// Target made unbootable and opened for writing.
    TargetInvalidated {
        /// Target slot.
        target: String,
        /// Path written.
        path: String,
        /// Whether O_DIRECT is used.
        direct_io: bool,
    },
    /// Bytes written so far.
    Written {
        /// Bytes written.
        bytes: u64,
        /// Total.
        total: u64,
    },
    /// Bytes read back and hashed so far.
    ReadBack {
        /// Bytes verified.
        bytes: u64,
        /// Total.
        total: u64,
    },
    /// The slot matched the signed hash.
    ReadbackVerified {
        /// SHA-256.
        sha256: String,
    },
    /// The slot was flipped.
    Activated {
        /// Slot.
        slot: String,
        /// New attributes.
        attributes: String,
    },
}

/// Summary of a finished install.
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    /// Running slot.
    pub running: String,
    /// Target slot.
    pub target: String,
    /// Installed version.
    pub version: String,
    /// Image size.
    pub image_size: u64,
    /// Image SHA-256.
    pub sha256: String,
    /// Seconds spent writing (decompress + verify + write).
    pub write_seconds: f64,
    /// Seconds spent on flush + read-back verification.
    pub verify_seconds: f64,
    /// Total seconds.
    pub total_seconds: f64,
    /// Whether O_DIRECT was used.
    pub direct_io: bool,
    /// Target attributes after the flip.
    pub attributes: String,
    /// Sentinel written, if any.
    pub sentinel: Option<String>,
    /// What an adaptive install took from the running slot (`None`: not adaptive).
    pub adaptive: Option<AdaptiveOutcome>,
    /// Only checked, nothing written ([`InstallOptions::dry_run`]).
    pub dry_run: bool,
}

/// What an adaptive install did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AdaptiveOutcome {
    /// The plan, as made from the running slot's hashes.
    #[serde(flatten)]
    pub planned: PlanSummary,
    /// Planned copies whose bytes no longer matched when read (or could not be read), and
    /// were taken from the bundle instead.
    pub fallbacks: u32,
}

/// Compares version strings the way package managers broadly do: split into runs of digits
/// and non-digits; digit runs compare numerically, others as text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Runs an install of `bundle` onto `disk`. `cancel` is polled between chunks (set it from a
/// signal handler); `events` receives progress.
pub fn install<D: SlotBacking, R: BundleSource>(
    disk: &mut AbDisk<D>,
    bundle: R,
    keyring: &Keyring,
    options: &InstallOptions,
    cancel: &AtomicBool,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<InstallReport, InstallError> {
    let started = Instant::now();
    let slots = disk.slots()?;
    let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();

    // 1. Running and target slots.
    let (found, target) = running::running_and_target(disk, &slots, options.running.as_deref())?;
    let (running, source) = (found.index, found.source);
    let source_text = source.as_str().to_string();
    if select::check_install_target(&attrs, target).is_err() {
        return Err(InstallError::TargetIsLastGood {
            target: slots[target].name.clone(),
            running: slots[running].name.clone(),
            state: attrs[running].to_string(),
        });
    }
    let sector_size = disk.gpt.sector_size();
    let running_record = footer::read_record(&mut disk.dev, &slots[running], sector_size);

    // 2. Signature before anything else.
    // A source read that gave up on a signal fails the header: report the signal instead.
    let mut reader = BundleReader::new(bundle, keyring).map_err(|e| {
        if cancel.load(AtomicOrdering::Relaxed) {
            InstallError::InterruptedBeforeWrite
        } else {
            e.into()
        }
    })?;
    let header = reader.header().clone();
    events(InstallEvent::Verified {
        version: header.image_version.clone(),
        compatible: header.compatible.clone(),
        image_size: header.image_size,
        key_id: reader.matched_key().to_string(),
    });

    // 3. Policy and size.
    let device_compatible = match (&options.compatible, &running_record) {
        (Some(c), _) => c.clone(),
        (None, Some(r)) => r.compatible.clone(),
        (None, None) => {
            return Err(InstallError::CompatibleUnknown {
                slot: slots[running].name.clone(),
            })
        }
    };
    if header.compatible != device_compatible {
        return Err(InstallError::Incompatible {
            bundle: header.compatible.clone(),
            device: device_compatible,
        });
    }
    if let Some(r) = &running_record {
        if !options.allow_downgrade
            && compare_versions(&header.image_version, &r.version) == Ordering::Less
        {
            return Err(InstallError::Downgrade {
                bundle: header.image_version.clone(),
                running: r.version.clone(),
                slot: slots[running].name.clone(),
            });
        }
    }
    // 4-7. Invalidate, stream, verify, record.
    events(InstallEvent::Plan {
        running: slots[running].name.clone(),
        running_source: source_text,
        target: slots[target].name.clone(),
    });
    let reuse = options.adaptive.then(|| Reuse {
        slot: running,
        image_len: running_record.as_ref().map(|r| r.image_size),
    });
    let report =
        |written: SlotWritten, attributes: SlotAttributes, sentinel, dry_run| InstallReport {
            running: slots[running].name.clone(),
            target: slots[target].name.clone(),
            version: header.image_version.clone(),
            image_size: header.image_size,
            sha256: hex::encode(header.image_sha256),
            write_seconds: written.write_seconds,
            verify_seconds: written.verify_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
            direct_io: written.direct_io,
            attributes: attributes.to_string(),
            sentinel,
            adaptive: written.adaptive,
            dry_run,
        };
    if options.dry_run {
        let indexed = prepare_target(disk, target, &header, reuse, events)?;
        let nothing_written = SlotWritten {
            write_seconds: 0.0,
            verify_seconds: 0.0,
            direct_io: false,
            adaptive: indexed.map(|i| AdaptiveOutcome {
                planned: i.plan.summary,
                fallbacks: 0,
            }),
        };
        return Ok(report(nothing_written, attrs[target], None, true));
    }
    let written = write_slot(
        disk,
        target,
        &mut reader,
        workers_for(options.workers),
        reuse,
        cancel,
        events,
    )?;

    // 8. Flip. Re-read the slots: the write above went through the partition, not the GPT,
    // so the in-memory GPT is current; the invalidated state is the base (the writer writes
    // what differs from the slots it is given).
    let current = disk.slots()?;
    let now: Vec<SlotAttributes> = current.iter().map(|s| s.attrs).collect();
    let flipped = select::activate_for_trial(&now, target, options.tries);
    disk.write_slot_attributes(&current, &flipped)?;
    events(InstallEvent::Activated {
        slot: slots[target].name.clone(),
        attributes: flipped[target].to_string(),
    });

    // 9. Sentinel.
    let sentinel = match &options.sentinel {
        Some(path) => {
            write_sentinel(path, &slots[target].name, &header.image_version).map_err(|source| {
                InstallError::Sentinel {
                    path: path.clone(),
                    source,
                }
            })?;
            Some(path.display().to_string())
        }
        None => None,
    };
    Ok(report(written, flipped[target], sentinel, false))
}

/// Timings of [`write_slot`].
#[derive(Debug, Clone, Copy)]
pub struct SlotWritten {
    /// Seconds until the last chunk was written and flushed (read-back runs alongside).
    pub write_seconds: f64,
    /// Seconds the read-back and slot record took after that.
    pub verify_seconds: f64,
    /// Whether O_DIRECT was used.
    pub direct_io: bool,
    /// What an adaptive install took from the running slot.
    pub adaptive: Option<AdaptiveOutcome>,
}

/// Where an adaptive install may copy chunks from: the running slot.
#[derive(Debug, Clone, Copy)]
pub struct Reuse {
    /// Index of the running slot.
    pub slot: usize,
    /// Length of the image it holds, from its slot record (`None`: hash the whole slot).
    pub image_len: Option<u64>,
}

/// Decompression workers: one per core, at most two by default. Two already decompress and
/// hash faster than disks write (about 1.3 GB/s each here), and each worker holds about two
/// chunks in flight, so capping keeps memory under 64 MiB on any machine.
fn workers_for(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(2)
    } else {
        requested
    }
}

/// The checks before a slot is written, which change nothing: the image fits the slot, the
/// slot can be opened for writing (not mounted, right partition node), and, for an adaptive
/// install, the running slot is hashed and the plan made ([`InstallEvent::AdaptivePlan`]).
fn prepare_target<D: SlotBacking>(
    disk: &mut AbDisk<D>,
    target: usize,
    header: &crate::bundle::BundleHeader,
    reuse: Option<Reuse>,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<Option<IndexedRunning>, InstallError> {
    let sector_size = disk.gpt.sector_size();
    let slots = disk.slots()?;
    let slot = &slots[target];
    let slot_size = slot.size_bytes(sector_size);
    let usable = footer::max_image_size(slot_size);
    if header.image_size > usable {
        return Err(InstallError::TooLarge {
            image: header.image_size,
            slot: slot.name.clone(),
            usable,
            slot_size,
            record: RECORD_BYTES,
        });
    }
    // Probe-open the slot first: a target that is mounted or cannot be opened is refused
    // while the disk is still exactly as it was.
    drop(disk.dev.open_slot(
        &slot.name,
        slot.partition(),
        slot.offset_bytes(sector_size),
        slot_size,
    )?);
    // Adaptive: hash the running slot (read-only) while the target is still as it was.
    let Some(r) = reuse else {
        return Ok(None);
    };
    let running = &slots[r.slot];
    let indexed =
        index_running(disk, running, sector_size, r.image_len, header).map_err(|source| {
            InstallError::ReadRunning {
                slot: running.name.clone(),
                source,
            }
        })?;
    events(InstallEvent::AdaptivePlan {
        running: running.name.clone(),
        bytes_hashed: indexed.bytes_hashed,
        index_seconds: indexed.seconds,
        summary: indexed.plan.summary,
    });
    Ok(Some(indexed))
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
    let header = reader.header().clone();
    let adaptive = prepare_target(disk, target, &header, reuse, events)?;
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
    let out = disk.dev.open_slot(
        &slot.name,
        slot.partition(),
        slot.offset_bytes(sector_size),
        slot_size,
    )?;
    let out: &dyn SlotIo = &*out;
    let record_offset = slot_size - RECORD_BYTES;
    let mut record_buf = SlotTarget::buffer(RECORD_BYTES as usize);
    out.write_at(&slot.name, &record_buf, record_offset)?;
    events(InstallEvent::TargetInvalidated {
        target: slot.name.clone(),
        path: out.describe(),
        direct_io: out.is_direct(),
    });

    // 5 + 6. Stream, and verify what is on the device while the stream goes on: after every
    // FLUSH_EVERY bytes the writer flushes, and a verifier thread reads that flushed region
    // back (bypassing the page cache) into the whole-image SHA-256. So every byte is read
    // back only after a flush, as if the slot were read back after the last one, but the
    // read-back overlaps the writing instead of following it.
    let total = header.image_size;
    // The read-back checks the signed whole-image hash from the disk itself; per-chunk hashes
    // still check every byte before it is written.
    reader.skip_image_hash();
    let verified_bytes = AtomicU64::new(0);
    let (region_tx, region_rx) = mpsc::channel::<(u64, u64)>();
    let slot_name = slot.name.clone();
    let (stream_result, readback, stream_end) = std::thread::scope(|scope| {
        let verifier =
            scope.spawn(|| verify_regions(out, &slot_name, region_rx, cancel, &verified_bytes));
        let mut writer = ChunkWriter {
            out,
            slot: &slot.name,
            total,
            write_buf: SlotTarget::buffer(header.chunk_size as usize),
            flushed: 0,
            regions: region_tx,
            last_event: Instant::now(),
            cancel,
            progress: &mut |written| {
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
            },
        };
        let result = match &adaptive {
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
            slot: slot.name.clone(),
        });
    }
    let write_seconds = (stream_end - started).as_secs_f64();
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
            slot: slot.name.clone(),
            expected: hex::encode(header.image_sha256),
            actual: hex::encode(actual),
        });
    }
    events(InstallEvent::ReadbackVerified {
        sha256: hex::encode(actual),
    });

    // 7. Slot record.
    let record = SlotRecord {
        image_size: total,
        image_sha256: header.image_sha256,
        version: header.image_version.clone(),
        compatible: header.compatible.clone(),
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
        adaptive: adaptive.map(|a| AdaptiveOutcome {
            planned: a.plan.summary,
            fallbacks: fallbacks.unwrap_or(0),
        }),
    })
}

/// Payload bytes an adaptive install reads from chunk `first` on (a bundle chunk) before its
/// next skip that is larger than `gap` (smaller skips are read through), per the plan.
fn bytes_to_read_from(
    header: &crate::bundle::BundleHeader,
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
struct IndexedRunning {
    view: Box<dyn ReadOnlyView>,
    plan: Plan,
    bytes_hashed: u64,
    seconds: f64,
}

/// Hashes the running slot through a read-only view and plans the adaptive install.
fn index_running<D: SlotBacking>(
    disk: &mut AbDisk<D>,
    running: &crate::slots::Slot,
    sector_size: u32,
    image_len: Option<u64>,
    header: &crate::bundle::BundleHeader,
) -> io::Result<IndexedRunning> {
    let started = Instant::now();
    let size = running.size_bytes(sector_size);
    // The slot record's tail block is never image data.
    let usable = footer::max_image_size(size);
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

/// Writes a factory image into slot `target` of a fresh disk (`disk init --seed`): the same
/// verified write as an install, then the slot is marked good and boots next.
pub fn seed_slot<D: SlotBacking, R: BundleSource>(
    disk: &mut AbDisk<D>,
    target: usize,
    bundle: R,
    keyring: &Keyring,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<SlotWritten, InstallError> {
    let mut reader = BundleReader::new(bundle, keyring)?;
    let never = AtomicBool::new(false);
    let written = write_slot(
        disk,
        target,
        &mut reader,
        workers_for(0),
        None,
        &never,
        events,
    )?;
    let slots = disk.slots()?;
    let attrs: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
    disk.write_slot_attributes(&slots, &select::mark_good(&attrs, target))?;
    Ok(written)
}

/// Bytes written between two flushes, each flushed region then being read back.
const FLUSH_EVERY: u64 = 64 << 20;
/// Read-back piece size.
const READBACK_PIECE: usize = 2 << 20;

/// Writes verified chunks into the slot with aligned writes; after every [`FLUSH_EVERY`]
/// bytes and at the end, flushes and hands the flushed region to the verifier.
struct ChunkWriter<'a> {
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

impl ChunkWriter<'_> {
    /// Writes one verified chunk at its image offset (chunks come in image order).
    fn put(&mut self, image_offset: u64, data: &[u8]) -> Result<(), InstallError> {
        if self.cancel.load(AtomicOrdering::Relaxed) {
            return Err(InstallError::Interrupted {
                slot: self.slot.to_string(),
            });
        }
        // Direct I/O needs an aligned buffer and whole blocks: copy the verified chunk in and
        // zero-pad the tail (which stays below the slot record).
        let padded = data.len().next_multiple_of(crate::slotio::DIRECT_ALIGN);
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
fn stream_into_slot<R: Read + Send>(
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
fn stream_adaptive<R: BundleSource>(
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
fn verify_regions(
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
            let aligned = want.next_multiple_of(crate::slotio::DIRECT_ALIGN);
            out.read_at(slot, &mut buf[..aligned], at)?;
            hasher.update(&buf[..want]);
            at += want as u64;
            verified.store(at, AtomicOrdering::Relaxed);
        }
        expected_offset = offset + len;
    }
    Ok(hasher.finalize().into())
}

/// Writes the reboot-required sentinel atomically (temp file + rename).
pub fn write_sentinel(path: &Path, slot: &str, version: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // The temporary name is fresh (pid and a random tag) and created with O_EXCL|O_NOFOLLOW, so
    // a symlink or file planted at a predictable name is never followed or clobbered: the open
    // fails instead. The rename then replaces only the sentinel path itself (a symlink there is
    // replaced, not followed).
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".abupdate-tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = path.with_file_name(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)?;
    let written = file
        .write_all(
            format!("abupdate: {version} installed in {slot}; reboot to boot it\n").as_bytes(),
        )
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Opens a bundle source: `-` for stdin, an `http://` or `https://` URL (streamed with resume
/// and the default [`crate::http::FetchOptions`]; see [`crate::http`]), a block device (read up
/// to the bundle's own declared length, so a bundle on a raw disk may be followed by padding),
/// or a file.
pub fn open_bundle_source(path: &Path) -> Result<Box<dyn BundleSource>, BundleError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(url) = path.to_str().filter(|s| crate::http::is_url(s)) {
        let fetch_err = |e| BundleError::Io {
            context: format!("fetching bundle {url}"),
            source: io::Error::other(e),
        };
        let fetcher = crate::http::Fetcher::new(Default::default()).map_err(fetch_err)?;
        let source = fetcher
            .open(url, 0, Default::default())
            .map_err(fetch_err)?;
        return Ok(Box::new(io::BufReader::with_capacity(
            crate::http::STREAM_BUFFER,
            source,
        )));
    }
    if path == Path::new("-") {
        return Ok(Box::new(io::BufReader::with_capacity(1 << 20, io::stdin())));
    }
    let io_err = |e| BundleError::Io {
        context: format!("opening bundle {}", path.display()),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let is_block = file
        .metadata()
        .map_err(io_err)?
        .file_type()
        .is_block_device();
    if is_block {
        let header = crate::bundle::read_unverified_header(&mut io::BufReader::new(&file))?;
        let len = header.bundle_len();
        let file = std::fs::File::open(path).map_err(io_err)?;
        return Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            file.take(len),
        )));
    }
    Ok(Box::new(io::BufReader::with_capacity(1 << 20, file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        use Ordering::*;
        for (a, b, o) in [
            ("1.0", "1.0", Equal),
            ("1.10", "1.9", Greater),
            ("2", "10", Less),
            ("v2", "v3", Less),
            ("1.0.1", "1.0", Greater),
            ("2025.06.1", "2025.06.01", Equal),
            ("1.0-rc1", "1.0-rc2", Less),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
        }
    }
}
