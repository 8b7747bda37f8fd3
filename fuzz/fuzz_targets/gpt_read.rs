//! Fuzzes the GPT reader and the slot layer: arbitrary bytes as a disk image.
//!
//! Must never panic. When a table is accepted, an attribute write must either fail before
//! writing anything or leave both copies valid and identical, reading back the attributes
//! written.
#![no_main]

use abupdate::disk::blockdev::MemDevice;
use abupdate::disk::gpt::Gpt;
use abupdate::disk::slots::AbDisk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    let mut dev = MemDevice {
        data: bytes,
        sector_size: 512,
    };
    let Ok(gpt) = Gpt::read(&mut dev) else { return };
    let _ = gpt.health();
    let labels = abupdate::layout::SlotLabels::default();
    let Ok(mut disk) = AbDisk::open(dev, "fuzz", &labels) else {
        return;
    };
    let Ok(slots) = disk.slots() else { return };
    let new: Vec<_> = slots
        .iter()
        .map(|s| s.attrs.with_tries(s.attrs.tries() ^ 1))
        .collect();
    let before = disk.dev.data.clone();
    if disk.write_slot_attributes(&slots, &new).is_err() {
        assert!(disk.dev.data == before, "a refused write changed the disk");
        return;
    }
    let mut dev = disk.dev;
    let reread = Gpt::read(&mut dev).expect("a written table reads back");
    assert!(reread.is_consistent());
    let disk = AbDisk::open(dev, "fuzz", &labels).expect("slots still found");
    let attrs: Vec<_> = disk.slots().unwrap().iter().map(|s| s.attrs).collect();
    assert_eq!(attrs, new);
});
