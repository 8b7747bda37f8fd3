//! What an install tells its caller: progress events as it goes, and the report at the end.

use serde::Serialize;

use crate::install::adaptive::PlanSummary;

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
    /// The root image is written and verified; the bundle's kernel part goes into the slot's
    /// kernel partition next (its Written/ReadBack events count the kernel's bytes).
    KernelPart {
        /// The kernel partition.
        partition: String,
        /// Kernel size in bytes.
        size: u64,
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
