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
//! ([`crate::install::adaptive`]); the checks of steps 5-6 are the same.

use std::cmp::Ordering;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Instant;

use crate::attrs::SlotAttributes;
use crate::bundle::{BundleError, BundleReader, BundleSource, Keyring};
use crate::disk::blockdev::BlockDevice;
use crate::disk::record;
use crate::disk::running;
use crate::disk::slots::{AbDisk, Slot, SlotError};
use crate::select;
use slotio::{SlotBacking, SlotIoError};

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
    /// The bundle carries a kernel, and the slot has no kernel partition to take it.
    #[error("the bundle carries a {kernel_size}-byte kernel, but {slot} has no kernel partition (KERN-x): this disk has no boot chain")]
    KernelWithoutPartition {
        /// Target slot.
        slot: String,
        /// Kernel size.
        kernel_size: u64,
    },
    /// The slot pairs a kernel partition with its root, and the bundle carries no kernel.
    #[error("the bundle carries no kernel, but {slot} is paired with {kernel}: installing the root alone would boot the new root with the slot's old kernel (build the bundle with --kernel)")]
    KernelMissing {
        /// Target slot.
        slot: String,
        /// Its kernel partition.
        kernel: String,
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
    /// bundle ([`crate::install::adaptive`]).
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

pub mod adaptive;
mod local;
mod report;
pub mod slotio;
mod stream;
mod version;
mod write;

use write::{bytes_to_read_from, prepare_target, workers_for};
pub use write::{write_slot, Reuse, SlotWritten};

pub use local::{open_bundle_source, write_sentinel};
pub use report::{AdaptiveOutcome, InstallEvent, InstallReport};
pub use version::compare_versions;

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
    let (found, target) = running_and_target(disk, &slots, options.running.as_deref())?;
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
    let running_record = record::read_record(&mut disk.dev, &slots[running], sector_size);

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
        kernel_len: running_record
            .as_ref()
            .and_then(|r| r.kernel.map(|k| k.size)),
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
        let prepared = prepare_target(disk, target, reader.verified_header(), reuse, events)?;
        let nothing_written = SlotWritten {
            write_seconds: 0.0,
            verify_seconds: 0.0,
            direct_io: false,
            adaptive: prepared.root.map(|i| AdaptiveOutcome {
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

/// The running slot ([`running::find`] with the next-boot fallback) and the target an install
/// writes: the other slot.
pub fn running_and_target<D: BlockDevice + SlotBacking>(
    disk: &AbDisk<D>,
    slots: &[Slot],
    explicit: Option<&str>,
) -> Result<(running::Running, usize), InstallError> {
    let running = running::find(disk, slots, explicit, running::Fallback::NextBoot)?
        .ok_or(InstallError::NoRunningSlot)?;
    let target = (0..slots.len())
        .find(|&i| i != running.index)
        .ok_or_else(|| InstallError::TargetIsRunning {
            slot: slots[running.index].name.clone(),
        })?;
    Ok((running, target))
}
