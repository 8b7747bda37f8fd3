//! ChromeOS/cgpt slot attributes inside the 64-bit GPT partition attribute field.
//!
//! The layout follows vboot_reference's cgptlib: priority in bits 48-51, tries in bits 52-55,
//! successful in bit 56. Every other bit (the UEFI-defined bits 0-2, the reserved bits and the
//! rest of the type-specific range) is carried through untouched, so a partition's other flags
//! survive any slot operation.

use bitflags::bitflags;

bitflags! {
    /// Named single-bit flags of the GPT attribute field that abupdate knows about.
    ///
    /// `const _ = !0` keeps unknown bits when converting, so no bit is ever dropped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct GptAttributeFlags: u64 {
        /// UEFI: the partition is required for the platform to function.
        const REQUIRED = 1 << 0;
        /// UEFI: firmware must not produce a block I/O protocol for it.
        const NO_BLOCK_IO = 1 << 1;
        /// UEFI: legacy BIOS bootable.
        const LEGACY_BIOS_BOOTABLE = 1 << 2;
        /// cgpt: the slot has booted and passed its health commit.
        const SUCCESSFUL = 1 << 56;
        /// Keep all other bits as they are.
        const _ = !0;
    }
}

/// Bit offset of the 4-bit priority field.
pub const PRIORITY_SHIFT: u32 = 48;
/// Bit offset of the 4-bit tries field.
pub const TRIES_SHIFT: u32 = 52;
/// Largest value the priority and tries fields can hold.
pub const FIELD_MAX: u8 = 15;
const FIELD_MASK: u64 = 0xF;

/// The slot-relevant view of one partition's 64-bit attribute field.
///
/// Setters touch only their own bits; `raw()` gives back the full field with every other bit
/// exactly as it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlotAttributes(u64);

/// The three cgpt fields of a slot, as plain numbers (for display and JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SlotFields {
    /// Boot priority 0-15; 0 means never boot.
    pub priority: u8,
    /// Remaining boot attempts 0-15 for a slot not yet marked successful.
    pub tries: u8,
    /// Whether the slot has been committed as healthy.
    pub successful: bool,
}

impl SlotAttributes {
    /// Wraps a raw 64-bit GPT attribute field.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// Builds attributes from the three fields with every other bit clear.
    ///
    /// Values above 15 are clamped to 15, as `cgpt add` refuses them.
    pub fn new(priority: u8, tries: u8, successful: bool) -> Self {
        Self(0)
            .with_priority(priority)
            .with_tries(tries)
            .with_successful(successful)
    }

    /// The full 64-bit field, including bits abupdate does not interpret.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The named flags of the field.
    pub fn flags(self) -> GptAttributeFlags {
        GptAttributeFlags::from_bits_retain(self.0)
    }

    /// Boot priority (bits 48-51).
    pub const fn priority(self) -> u8 {
        ((self.0 >> PRIORITY_SHIFT) & FIELD_MASK) as u8
    }

    /// Remaining tries (bits 52-55).
    pub const fn tries(self) -> u8 {
        ((self.0 >> TRIES_SHIFT) & FIELD_MASK) as u8
    }

    /// Successful flag (bit 56).
    pub fn successful(self) -> bool {
        self.flags().contains(GptAttributeFlags::SUCCESSFUL)
    }

    /// Returns a copy with the priority replaced (clamped to 15).
    pub fn with_priority(self, priority: u8) -> Self {
        Self(set_field(self.0, PRIORITY_SHIFT, priority))
    }

    /// Returns a copy with the tries replaced (clamped to 15).
    pub fn with_tries(self, tries: u8) -> Self {
        Self(set_field(self.0, TRIES_SHIFT, tries))
    }

    /// Returns a copy with the successful bit replaced.
    pub fn with_successful(self, successful: bool) -> Self {
        let mut flags = self.flags();
        flags.set(GptAttributeFlags::SUCCESSFUL, successful);
        Self(flags.bits())
    }

    /// The three cgpt fields.
    pub fn fields(self) -> SlotFields {
        SlotFields {
            priority: self.priority(),
            tries: self.tries(),
            successful: self.successful(),
        }
    }

    /// Whether cgptlib would consider booting this slot at all.
    pub fn is_bootable(self) -> bool {
        self.priority() > 0 && (self.successful() || self.tries() > 0)
    }
}

fn set_field(raw: u64, shift: u32, value: u8) -> u64 {
    let value = u64::from(value.min(FIELD_MAX));
    (raw & !(FIELD_MASK << shift)) | (value << shift)
}

impl core::fmt::Display for SlotAttributes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "P{} T{} S{}",
            self.priority(),
            self.tries(),
            u8::from(self.successful())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (priority, tries, successful) combination round-trips, and setters never disturb
    /// bits outside their own field, whatever the other 61 bits hold.
    #[test]
    fn exhaustive_fields_round_trip_and_preserve_other_bits() {
        let backgrounds = [
            0u64,
            !0u64,
            0x0000_FFFF_FFFF_FFFF,
            0xFE00_0000_0000_0007,
            0xA5A5_A5A5_A5A5_A5A5,
        ];
        let slot_mask = (0xFFu64 << PRIORITY_SHIFT) | (1 << 56);
        for &background in &backgrounds {
            for priority in 0..=15u8 {
                for tries in 0..=15u8 {
                    for successful in [false, true] {
                        let attrs = SlotAttributes::from_raw(background)
                            .with_priority(priority)
                            .with_tries(tries)
                            .with_successful(successful);
                        assert_eq!(attrs.priority(), priority);
                        assert_eq!(attrs.tries(), tries);
                        assert_eq!(attrs.successful(), successful);
                        assert_eq!(attrs.raw() & !slot_mask, background & !slot_mask);
                        let expected_bootable = priority > 0 && (successful || tries > 0);
                        assert_eq!(attrs.is_bootable(), expected_bootable);
                        // Changing one field leaves the other two alone.
                        let bumped = attrs.with_tries(15 - tries);
                        assert_eq!(bumped.priority(), priority);
                        assert_eq!(bumped.successful(), successful);
                    }
                }
            }
        }
    }

    /// The bit positions agree with what Debian's cgpt writes (see REFERENCE.md).
    #[test]
    fn matches_cgpt_bit_layout() {
        // `cgpt add -i 1 -P 2 -T 0 -S 1` gives attribute flags 0x0102000000000000.
        assert_eq!(SlotAttributes::new(2, 0, true).raw(), 0x0102_0000_0000_0000);
        // `-P 1 -T 6 -S 0` gives raw bits 48-63 of 0x61.
        assert_eq!(SlotAttributes::new(1, 6, false).raw() >> 48, 0x61);
    }

    #[test]
    fn values_above_fifteen_are_clamped() {
        let attrs = SlotAttributes::new(200, 16, false);
        assert_eq!((attrs.priority(), attrs.tries()), (15, 15));
    }
}
