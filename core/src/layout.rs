//! The one validated view of a disk's layout: which partitions are the two slots, checked
//! before any command may write.
//!
//! Why one place: every writing command (install, boot, commit, mark-good/bad, rollback,
//! set-attributes, `disk init --seed`) finds its target through `abupdate::slots::AbDisk`, and
//! an `AbDisk` can only be built from a table that passed [`validate`]. So a typo in
//! `--labels`, a partition table that lies about where partitions are, or a data partition
//! that happens to carry a slot label is refused once, here, with the partitions named, instead
//! of in every command (or in none, as before: the config file's labels were checked, the
//! command line's were not).
//!
//! What is checked, as cgptlib's `GptSanityCheck` and `sgdisk -v` do for the entries, plus
//! what abupdate's slots need on top:
//! - labels: exactly two, distinct, non-empty ([`SlotLabels`], shared by the flag, the
//!   environment variable and the configuration file);
//! - every used entry: `first <= last`, inside the header's first/last usable LBA and the disk;
//! - no used entry overlaps another, the protective MBR, or either GPT copy (header or entry
//!   array, where the attribute writer would write them);
//! - each label names exactly one used partition, and both slots have the same partition type
//!   GUID (a data partition is not a slot);
//! - on a disk with the boot chain, each slot's kernel partition (`KERN-A` for `ROOT-A`, see
//!   [`kernel_label`]): both or neither, each exactly one partition of the ChromeOS kernel type.
//!
//! The checks are pure functions of the decoded table so they can be tested exhaustively on
//! synthetic tables, and live in the `no_std` core the boot loader shares.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use uuid::Uuid;

use crate::gpt::Entry;

/// Default slot labels, in the order abupdate calls them A and B.
pub const DEFAULT_LABELS: [&str; 2] = ["ROOT-A", "ROOT-B"];

/// The two slot labels, A first: distinct and non-empty by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLabels([String; 2]);

/// Why a list of slot labels was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Not exactly two labels.
    #[error("slot labels: need exactly two (A,B), got {count}: {labels:?}")]
    Count {
        /// How many were given.
        count: usize,
        /// What was given.
        labels: Vec<String>,
    },
    /// Both labels are the same.
    #[error("slot labels: A and B are both {0:?}; they must name two different partitions")]
    Same(String),
    /// An empty label.
    #[error("slot labels: an empty label in {0:?}")]
    Empty(Vec<String>),
    /// A label that cannot be a GPT partition name (36 UTF-16 units at most).
    #[error("slot labels: {0:?} is longer than a GPT partition name (36 UTF-16 units)")]
    TooLong(String),
}

impl SlotLabels {
    /// Checks a label list from any source (flag, environment, configuration file).
    pub fn new(labels: Vec<String>) -> Result<Self, LabelError> {
        if labels.iter().any(String::is_empty) {
            return Err(LabelError::Empty(labels));
        }
        if let Some(long) = labels.iter().find(|l| l.encode_utf16().count() > 36) {
            return Err(LabelError::TooLong(long.clone()));
        }
        match <[String; 2]>::try_from(labels) {
            Ok([a, b]) if a == b => Err(LabelError::Same(a)),
            Ok(pair) => Ok(Self(pair)),
            Err(labels) => Err(LabelError::Count {
                count: labels.len(),
                labels,
            }),
        }
    }

    /// The labels, A first.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl Default for SlotLabels {
    fn default() -> Self {
        Self(DEFAULT_LABELS.map(String::from))
    }
}

/// A range of LBAs the partitions must stay clear of, and what lives there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// What it is ("primary GPT entry array", ...).
    pub what: &'static str,
    /// First LBA.
    pub first: u64,
    /// Last LBA (inclusive).
    pub last: u64,
}

/// The disk geometry a table is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Sectors on the disk.
    pub disk_sectors: u64,
    /// The in-use header's first usable LBA.
    pub first_usable: u64,
    /// The in-use header's last usable LBA.
    pub last_usable: u64,
    /// The protective MBR and both GPT copies, where the attribute writer would write them.
    pub reserved: Vec<Reserved>,
}

/// A partition as named in messages: number, label and extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// 1-based partition number.
    pub number: u32,
    /// Its label.
    pub label: String,
    /// First LBA.
    pub first: u64,
    /// Last LBA (inclusive).
    pub last: u64,
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "partition {} ({:?}, LBA {}..={})",
            self.number, self.label, self.first, self.last
        )
    }
}

impl From<&Entry> for Extent {
    fn from(e: &Entry) -> Self {
        Self {
            number: e.number(),
            label: e.name.clone(),
            first: e.first_lba,
            last: e.last_lba,
        }
    }
}

/// Why a partition table was refused. Every variant names the partitions involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// An entry ends before it starts.
    #[error("{0} ends before it starts")]
    Inverted(Extent),
    /// An entry outside the usable LBA range the header declares (or outside the disk).
    #[error("{part} lies outside the usable LBA range {first_usable}..={last_usable}")]
    OutsideUsable {
        /// The partition.
        part: Extent,
        /// First usable LBA.
        first_usable: u64,
        /// Last usable LBA (capped at the disk's last LBA).
        last_usable: u64,
    },
    /// Two entries overlap.
    #[error("{a} and {b} overlap")]
    Overlap {
        /// The partition that starts first.
        a: Extent,
        /// The other one.
        b: Extent,
    },
    /// An entry overlaps the protective MBR or a GPT copy.
    #[error("{part} overlaps the {what} (LBA {first}..={last})")]
    OverlapsGpt {
        /// The partition.
        part: Extent,
        /// The structure.
        what: &'static str,
        /// Its first LBA.
        first: u64,
        /// Its last LBA.
        last: u64,
    },
    /// No used partition carries a slot label.
    #[error("no partition labelled {0}")]
    Missing(String),
    /// More than one used partition carries a slot label.
    #[error("label {label:?} is on more than one partition ({partitions})")]
    Duplicate {
        /// The label.
        label: String,
        /// Partition numbers, comma separated.
        partitions: String,
    },
    /// One slot has a kernel partition and the other has none.
    #[error("{present} pairs {slot_with} with a kernel partition but there is no partition labelled {missing} for {slot_without}: a disk has kernel partitions for both slots or for neither")]
    KernelMissing {
        /// The kernel partition found.
        present: Extent,
        /// Its slot.
        slot_with: String,
        /// The label that is missing.
        missing: String,
        /// The slot without one.
        slot_without: String,
    },
    /// A partition with a kernel label is not of the ChromeOS kernel type.
    #[error("{part} has type {found}, not the ChromeOS kernel type {KERNEL_TYPE}")]
    KernelType {
        /// The partition.
        part: Extent,
        /// Its type GUID.
        found: Uuid,
    },
    /// The two slots have different partition type GUIDs.
    #[error("{a} has type {a_type} but {b} has type {b_type}: both slots must be partitions of the same type (a data partition is not a slot)")]
    TypeMismatch {
        /// Slot A.
        a: Extent,
        /// Its type GUID.
        a_type: Uuid,
        /// Slot B.
        b: Extent,
        /// Its type GUID.
        b_type: Uuid,
    },
}

/// The ChromeOS kernel partition type: the type of KERN-A and KERN-B.
pub const KERNEL_TYPE: Uuid = Uuid::from_u128(0xFE3A2A5D_4F32_41A7_B725_ACCC3285A309);

/// The kernel partition paired with slot `label`: `KERN-` and the label's suffix after its
/// last `-` (`ROOT-A` → `KERN-A`), or the whole label when it has none. A slot is the pair
/// (KERN-x, ROOT-x); the attributes stay on the ROOT entry.
pub fn kernel_label(label: &str) -> String {
    format!("KERN-{}", label.rsplit('-').next().unwrap_or(label))
}

/// The slots of a validated table: entry indices of A and B (in label order), and of their
/// kernel partitions on a disk with the boot chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntries {
    /// 0-based entry index of each slot, A first.
    pub index: [usize; 2],
    /// 0-based entry index of each slot's kernel partition ([`kernel_label`]), when the disk
    /// has them (both or neither).
    pub kernel: Option<[usize; 2]>,
}

/// Validates the whole table and finds the two slots. `entries` are all entries of the
/// in-use copy (unused ones are ignored).
// Called once per disk open, and the error names both partitions in full: size is no concern.
#[allow(clippy::result_large_err)]
pub fn validate(
    entries: &[Entry],
    geometry: &Geometry,
    labels: &SlotLabels,
) -> Result<SlotEntries, LayoutError> {
    let used: Vec<&Entry> = entries.iter().filter(|e| e.is_used()).collect();
    let last_usable = geometry
        .last_usable
        .min(geometry.disk_sectors.saturating_sub(1));
    for e in &used {
        if e.first_lba > e.last_lba {
            return Err(LayoutError::Inverted(Extent::from(*e)));
        }
        // The GPT's own sectors first: the more telling message when a header also lies
        // about the usable range.
        if let Some(r) = geometry
            .reserved
            .iter()
            .find(|r| r.first <= e.last_lba && e.first_lba <= r.last)
        {
            return Err(LayoutError::OverlapsGpt {
                part: Extent::from(*e),
                what: r.what,
                first: r.first,
                last: r.last,
            });
        }
        if e.first_lba < geometry.first_usable || e.last_lba > last_usable {
            return Err(LayoutError::OutsideUsable {
                part: Extent::from(*e),
                first_usable: geometry.first_usable,
                last_usable,
            });
        }
    }
    // Sweep in start order, remembering the entry reaching furthest so far: any later entry
    // starting at or before that end overlaps it.
    let mut by_start = used.clone();
    by_start.sort_by_key(|e| (e.first_lba, e.index));
    let mut furthest: Option<&Entry> = None;
    for e in by_start {
        if let Some(f) = furthest {
            if e.first_lba <= f.last_lba {
                return Err(LayoutError::Overlap {
                    a: Extent::from(f),
                    b: Extent::from(e),
                });
            }
        }
        if furthest.is_none_or(|f| e.last_lba > f.last_lba) {
            furthest = Some(e);
        }
    }
    let mut index = [0usize; 2];
    for (slot, label) in labels.as_slice().iter().enumerate() {
        index[slot] = find_one(&used, label)?
            .ok_or_else(|| LayoutError::Missing(label.clone()))?
            .index;
    }
    let [a, b] = index.map(|i| &entries[i]);
    if a.type_guid != b.type_guid {
        return Err(LayoutError::TypeMismatch {
            a: Extent::from(a),
            a_type: a.type_guid,
            b: Extent::from(b),
            b_type: b.type_guid,
        });
    }
    let kernel = kernel_pair(&used, labels)?;
    Ok(SlotEntries { index, kernel })
}

/// The one used partition labelled `label`, if any.
#[allow(clippy::result_large_err)]
fn find_one<'a>(used: &[&'a Entry], label: &str) -> Result<Option<&'a Entry>, LayoutError> {
    let named: Vec<&'a Entry> = used.iter().copied().filter(|e| e.name == label).collect();
    match named.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(LayoutError::Duplicate {
            label: label.into(),
            partitions: many
                .iter()
                .map(|e| e.number().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Each slot's kernel partition: both or neither, each of the kernel type.
#[allow(clippy::result_large_err)]
fn kernel_pair(used: &[&Entry], labels: &SlotLabels) -> Result<Option<[usize; 2]>, LayoutError> {
    let slots = labels.as_slice();
    let names = [kernel_label(&slots[0]), kernel_label(&slots[1])];
    let found = [find_one(used, &names[0])?, find_one(used, &names[1])?];
    for e in found.iter().flatten() {
        if e.type_guid != KERNEL_TYPE {
            return Err(LayoutError::KernelType {
                part: Extent::from(*e),
                found: e.type_guid,
            });
        }
    }
    match found {
        [None, None] => Ok(None),
        [Some(a), Some(b)] => Ok(Some([a.index, b.index])),
        [a, b] => {
            let (with, present) = match (a, b) {
                (Some(e), _) => (0, e),
                (_, Some(e)) => (1, e),
                (None, None) => unreachable!("matched above"),
            };
            let without = 1 - with;
            Err(LayoutError::KernelMissing {
                present: Extent::from(present),
                slot_with: slots[with].clone(),
                missing: names[without].clone(),
                slot_without: slots[without].clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const ROOT: Uuid = Uuid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
    const DATA: Uuid = Uuid::from_u128(0x0FC63DAF_8483_4772_8E79_3D69D8477DE4);

    fn entry(index: usize, name: &str, first: u64, last: u64, ty: Uuid) -> Entry {
        Entry {
            index,
            type_guid: ty,
            unique_guid: Uuid::from_u128(index as u128 + 1),
            first_lba: first,
            last_lba: last,
            attributes: 0,
            name: name.into(),
        }
    }

    /// A 10000-sector disk with 512-byte sectors and 128 entries: GPT at 0..=33 and
    /// 9967..=9999, usable 34..=9966.
    fn geometry() -> Geometry {
        Geometry {
            disk_sectors: 10_000,
            first_usable: 34,
            last_usable: 9966,
            reserved: vec![
                Reserved {
                    what: "protective MBR",
                    first: 0,
                    last: 0,
                },
                Reserved {
                    what: "primary GPT header",
                    first: 1,
                    last: 1,
                },
                Reserved {
                    what: "primary GPT entry array",
                    first: 2,
                    last: 33,
                },
                Reserved {
                    what: "backup GPT entry array",
                    first: 9967,
                    last: 9998,
                },
                Reserved {
                    what: "backup GPT header",
                    first: 9999,
                    last: 9999,
                },
            ],
        }
    }

    fn labels() -> SlotLabels {
        SlotLabels::default()
    }

    fn good() -> Vec<Entry> {
        vec![
            entry(0, "STATE", 34, 999, DATA),
            entry(1, "ROOT-A", 1000, 3999, ROOT),
            entry(2, "ROOT-B", 4000, 6999, ROOT),
            entry(3, "", 0, 0, Uuid::nil()),
        ]
    }

    #[test]
    fn a_sound_table_gives_the_slots_in_label_order() {
        let found = validate(&good(), &geometry(), &labels()).unwrap();
        assert_eq!(found.index, [1, 2]);
        let swapped = SlotLabels::new(vec!["ROOT-B".into(), "ROOT-A".into()]).unwrap();
        assert_eq!(
            validate(&good(), &geometry(), &swapped).unwrap().index,
            [2, 1]
        );
    }

    #[test]
    fn label_lists_from_any_source_are_checked() {
        let l = |v: &[&str]| SlotLabels::new(v.iter().map(|s| s.to_string()).collect());
        assert!(matches!(l(&["ROOT-A", "ROOT-A"]), Err(LabelError::Same(_))));
        assert!(matches!(
            l(&["ROOT-A", "ROOT-B", "STATE"]),
            Err(LabelError::Count { count: 3, .. })
        ));
        assert!(matches!(l(&["ROOT-A"]), Err(LabelError::Count { .. })));
        assert!(matches!(l(&["ROOT-A", ""]), Err(LabelError::Empty(_))));
        assert!(matches!(
            l(&["ROOT-A", &"x".repeat(37)]),
            Err(LabelError::TooLong(_))
        ));
        assert!(l(&["KERN-A", "KERN-B"]).is_ok());
    }

    #[test]
    fn a_data_partition_with_a_slot_label_is_not_a_slot() {
        let custom = SlotLabels::new(vec!["ROOT-A".into(), "STATE".into()]).unwrap();
        let err = validate(&good(), &geometry(), &custom).unwrap_err();
        assert!(matches!(err, LayoutError::TypeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("partition 1 (\"STATE\""), "{err}");
    }

    #[test]
    fn missing_and_duplicate_labels() {
        let mut t = good();
        t[2].name = "ROOT-A".into();
        let err = validate(&t, &geometry(), &labels()).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Duplicate {
                label: "ROOT-A".into(),
                partitions: "2, 3".into()
            }
        );
        // An unused entry carrying a label does not count.
        let mut t = good();
        t[3].name = "ROOT-B".into();
        assert!(validate(&t, &geometry(), &labels()).is_ok());
        t[2].name = "other".into();
        assert_eq!(
            validate(&t, &geometry(), &labels()).unwrap_err(),
            LayoutError::Missing("ROOT-B".into())
        );
    }

    /// Every placement of ROOT-B's start and end over a grid around ROOT-A and the GPT
    /// structures: the table is accepted exactly when a sector map built independently (each
    /// sector of the disk owned by the GPT, by a partition, or free; beyond the usable range
    /// nothing may be owned) has no sector claimed twice.
    #[test]
    fn every_placement_of_a_slot_is_judged_like_a_sector_map() {
        let g = geometry();
        let points = [
            0, 1, 2, 33, 34, 35, 999, 1000, 1001, 2500, 3998, 3999, 4000, 4001, 6999, 7000, 9966,
            9967, 9999, 10_000, 10_500,
        ];
        let mut accepted = 0;
        for first in points {
            for last in points {
                let mut t = good();
                t[2].first_lba = first;
                t[2].last_lba = last;
                let map_len = 10_501;
                let mut claims = vec![0u8; map_len];
                for (s, c) in claims.iter_mut().enumerate() {
                    let s = s as u64;
                    if !(34..=9966).contains(&s) {
                        *c = 1; // the GPT's own sectors, or past the disk
                    }
                }
                for e in t.iter().filter(|e| e.is_used()) {
                    for s in e.first_lba..=e.last_lba.min(map_len as u64 - 1) {
                        claims[s as usize] += 1;
                    }
                }
                let sound = first <= last && claims.iter().all(|&c| c <= 1);
                let got = validate(&t, &g, &labels());
                assert_eq!(got.is_ok(), sound, "ROOT-B at {first}..={last}: {got:?}");
                match got {
                    Err(e) => assert!(e.to_string().contains("partition 3"), "{e}"),
                    Ok(_) => accepted += 1,
                }
            }
        }
        assert!(accepted > 3, "the grid must contain sound placements too");
    }

    #[test]
    fn overlap_names_both_partitions_even_when_a_third_lies_between() {
        let mut t = good();
        // ROOT-A spans far; STATE moved after ROOT-B, still inside ROOT-A.
        t[1].last_lba = 8000;
        let err = validate(&t, &geometry(), &labels()).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Overlap {
                a: Extent::from(&t[1]),
                b: Extent::from(&t[2])
            }
        );
        assert!(err.to_string().contains("partition 2"));
        assert!(err.to_string().contains("partition 3"));
    }

    #[test]
    fn usable_range_is_capped_at_the_disk() {
        let mut g = geometry();
        g.last_usable = u64::MAX;
        g.reserved.retain(|r| r.first < 9000);
        // ROOT-B reaching past the disk's last LBA (9999).
        let mut t = good();
        t[2].last_lba = 10_000;
        assert!(matches!(
            validate(&t, &g, &labels()),
            Err(LayoutError::OutsideUsable {
                last_usable: 9999,
                ..
            })
        ));
    }

    #[test]
    fn kernel_partitions_pair_by_suffix_both_or_neither_of_the_kernel_type() {
        let labels = SlotLabels::default();
        let g = geometry();
        let a = entry(0, "ROOT-A", 100, 199, ROOT);
        let b = entry(1, "ROOT-B", 200, 299, ROOT);
        // No kernel partitions: a plain A/B disk.
        let plain = validate(&[a.clone(), b.clone()], &g, &labels).unwrap();
        assert_eq!(plain.kernel, None);
        // Both: paired by suffix, whatever their order in the table.
        let kb = entry(2, "KERN-B", 300, 349, KERNEL_TYPE);
        let ka = entry(3, "KERN-A", 350, 399, KERNEL_TYPE);
        let both = validate(&[a.clone(), b.clone(), kb.clone(), ka.clone()], &g, &labels).unwrap();
        assert_eq!(both.kernel, Some([3, 2]));
        // Only one: refused, naming the one there and the one missing.
        let err = validate(&[a.clone(), b.clone(), ka.clone()], &g, &labels).unwrap_err();
        assert!(matches!(err, LayoutError::KernelMissing { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("KERN-B") && text.contains("ROOT-B"), "{text}");
        // A data partition that happens to be called KERN-A is not a kernel partition.
        let fake = entry(3, "KERN-A", 350, 399, DATA);
        let err = validate(&[a.clone(), b.clone(), kb.clone(), fake], &g, &labels).unwrap_err();
        assert!(matches!(err, LayoutError::KernelType { .. }), "{err}");
        // Two KERN-A: refused like two ROOT-A.
        let twice = entry(4, "KERN-A", 400, 449, KERNEL_TYPE);
        let err = validate(&[a, b, kb, ka, twice], &g, &labels).unwrap_err();
        assert!(matches!(err, LayoutError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn kernel_labels_take_the_slot_suffix() {
        assert_eq!(kernel_label("ROOT-A"), "KERN-A");
        assert_eq!(kernel_label("usr-b"), "KERN-b");
        assert_eq!(kernel_label("system"), "KERN-system");
    }
}
