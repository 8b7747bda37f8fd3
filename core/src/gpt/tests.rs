//! The GPT tests on in-memory images: parsing and validation of both copies (every bit flip),
//! and attribute writes and repairs executed from their [`WritePlan`]s.

use alloc::vec;
use alloc::vec::Vec;

use super::*;

/// A disk image in memory.
#[derive(Clone)]
struct Disk {
    data: Vec<u8>,
    sector_size: u32,
}

impl Disk {
    fn put(&mut self, offset: u64, bytes: &[u8]) {
        let at = offset as usize;
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

fn read(dev: &Disk) -> Result<Table, NoValidCopy> {
    let ss = dev.sector_size as usize;
    Table::read(dev.sector_size, (dev.data.len() / ss) as u64, |lba, buf| {
        let at = lba as usize * ss;
        let src = dev.data.get(at..at + buf.len()).ok_or("past the end")?;
        buf.copy_from_slice(src);
        Ok(())
    })
}

/// Plans the change and executes the plan on `dev` as `abupdate::gpt` does on a block device.
fn write_attributes(
    table: &mut Table,
    dev: &mut Disk,
    changes: &[(usize, u64)],
) -> Result<u64, PlanError> {
    let plan = table.plan_attributes(changes)?;
    let ss = u64::from(dev.sector_size);
    let written = plan.bytes(dev.sector_size);
    for step in plan.steps {
        match step {
            WriteStep::Sectors { lba, bytes } | WriteStep::Header { lba, bytes } => {
                dev.put(lba * ss, &bytes)
            }
            WriteStep::Flush { which, copy, .. } => table.set_copy(which, copy),
        }
    }
    Ok(written)
}

/// A minimal valid GPT on a memory disk, built by hand so the parser is tested against an
/// independent writer (the integration tests use sgdisk and cgpt for that too).
fn mem_disk(sector_size: u32, sectors: u64) -> Disk {
    let ss = sector_size as usize;
    let mut dev = Disk {
        data: vec![0; ss * sectors as usize],
        sector_size,
    };
    let array_bytes = 128 * 128;
    let array_sectors = (array_bytes as u64).div_ceil(sector_size as u64);
    let mut entries = vec![0u8; array_bytes];
    for (i, name) in ["ROOT-A", "ROOT-B"].iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&[1; 16]);
        e[16..32].copy_from_slice(&[i as u8 + 2; 16]);
        e[32..40].copy_from_slice(&(40 + 10 * i as u64).to_le_bytes());
        e[40..48].copy_from_slice(&(49 + 10 * i as u64).to_le_bytes());
        e[48..56].copy_from_slice(&(0x0001_0000_0000_0004u64 << i).to_le_bytes());
        for (j, u) in name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    let last = sectors - 1;
    for (my, alt, elba) in [(1, last, 2), (last, 1, last - array_sectors)] {
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&(2 + array_sectors).to_le_bytes());
        h[48..56].copy_from_slice(&(last - array_sectors - 1).to_le_bytes());
        h[72..80].copy_from_slice(&elba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        dev.put(my * ss as u64, &h);
        dev.put(elba * ss as u64, &entries);
    }
    dev
}

#[test]
fn reads_both_copies_at_both_sector_sizes() {
    for ss in [512u32, 4096] {
        let dev = mem_disk(ss, 200);
        let gpt = read(&dev).unwrap();
        assert!(gpt.is_consistent());
        let names: Vec<_> = gpt
            .entries()
            .into_iter()
            .filter(|e| e.is_used())
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["ROOT-A", "ROOT-B"]);
    }
}

/// Flipping any single bit of a header (within its CRC'd bytes) or of an entry array makes
/// that copy invalid and the other copy is used, with the original content.
#[test]
fn every_bit_flip_selects_the_other_copy() {
    for ss in [512u32, 4096] {
        let pristine = mem_disk(ss, 200);
        let reference_dev = pristine.clone();
        let reference = read(&reference_dev).unwrap().entries();
        let ssz = ss as usize;
        let last = 199usize;
        let array_sectors = (128 * 128usize).div_ceil(ssz);
        let regions = [
            (Which::Primary, ssz, 92),
            (Which::Backup, last * ssz, 92),
            (Which::Primary, 2 * ssz, 128 * 128),
            (Which::Backup, (last - array_sectors) * ssz, 128 * 128),
        ];
        let mut dev = pristine.clone();
        for (damaged, start, len) in regions {
            for bit in 0..len * 8 {
                dev.data[start + bit / 8] ^= 1 << (bit % 8);
                let gpt = read(&dev).unwrap();
                dev.data[start + bit / 8] ^= 1 << (bit % 8);
                let expected_in_use = match damaged {
                    Which::Primary => Which::Backup,
                    Which::Backup => Which::Primary,
                };
                assert_eq!(gpt.current_which(), expected_in_use, "bit {bit} at {start}");
                assert_eq!(gpt.entries(), reference);
                let health = gpt.health();
                let bad = health.iter().find(|h| h.copy == damaged).unwrap();
                assert!(!bad.valid, "flip of bit {bit} at {start} went unnoticed");
            }
        }
    }
}

#[test]
fn both_copies_broken_is_an_error() {
    let mut dev = mem_disk(512, 200);
    dev.data[512] ^= 1;
    dev.data[199 * 512] ^= 1;
    match read(&dev) {
        Err(NoValidCopy { .. }) => {}
        other => panic!("expected NoValidCopy, got {other:?}"),
    }
}

#[test]
fn attribute_write_changes_only_attribute_bytes_and_crcs() {
    let mut dev = mem_disk(512, 200);
    let before = dev.data.clone();
    let mut gpt = read(&dev).unwrap();
    let written = write_attributes(&mut gpt, &mut dev, &[(1, 0x0102_0000_0000_0000)]).unwrap();
    // One entry sector and one header sector per copy.
    assert_eq!(written, 4 * 512);
    let diffs: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != dev.data[i])
        .collect();
    for i in diffs {
        let in_primary_header =
            (512 + 16..512 + 20).contains(&i) || (512 + 88..512 + 92).contains(&i);
        let in_backup_header = (199 * 512 + 16..199 * 512 + 20).contains(&i)
            || (199 * 512 + 88..199 * 512 + 92).contains(&i);
        let entry_attr = |base: usize| (base + 128 + 48..base + 128 + 56).contains(&i);
        assert!(
            in_primary_header
                || in_backup_header
                || entry_attr(1024)
                || entry_attr((199 - 32) * 512),
            "unexpected change at byte {i}"
        );
    }
    let reread = read(&dev).unwrap();
    assert!(reread.is_consistent());
    assert_eq!(reread.entries()[1].attributes, 0x0102_0000_0000_0000);
    // Unchanged attributes write nothing.
    let mut gpt = reread;
    assert_eq!(
        write_attributes(&mut gpt, &mut dev, &[(1, 0x0102_0000_0000_0000)]).unwrap(),
        0
    );
}

#[test]
fn an_unchanged_write_still_repairs_then_writes_nothing() {
    for damaged_offset in [512usize, 199 * 512, 2 * 512 + 100, (199 - 32) * 512 + 100] {
        let mut dev = mem_disk(512, 200);
        let attrs = read(&dev).unwrap().entries()[0].attributes;
        dev.data[damaged_offset] ^= 0x08;
        let mut gpt = read(&dev).unwrap();
        assert!(!gpt.is_consistent());
        let written = write_attributes(&mut gpt, &mut dev, &[(0, attrs)]).unwrap();
        assert!(written > 0, "damage at {damaged_offset} not repaired");
        let mut again = read(&dev).unwrap();
        assert!(again.is_consistent());
        assert_eq!(
            write_attributes(&mut again, &mut dev, &[(0, attrs)]).unwrap(),
            0
        );
    }
}

#[test]
fn write_repairs_a_damaged_copy() {
    for damaged_offset in [512usize, 199 * 512] {
        let mut dev = mem_disk(512, 200);
        dev.data[damaged_offset + 30] ^= 0xFF;
        let mut gpt = read(&dev).unwrap();
        assert!(!gpt.is_consistent());
        write_attributes(&mut gpt, &mut dev, &[(0, 1 << 56)]).unwrap();
        let reread = read(&dev).unwrap();
        assert!(
            reread.is_consistent(),
            "damage at {damaged_offset} not repaired"
        );
        assert_eq!(reread.entries()[0].attributes, 1 << 56);
    }
}

/// The plan as data: (kind, LBA) of each step.
fn steps(plan: &WritePlan) -> Vec<(char, u64)> {
    plan.steps
        .iter()
        .map(|s| match s {
            WriteStep::Sectors { lba, .. } => ('s', *lba),
            WriteStep::Header { lba, .. } => ('h', *lba),
            WriteStep::Flush { lba, .. } => ('f', *lba),
        })
        .collect()
}

/// The crash-safe order: primary entries, primary header, flush, then the backup the same way;
/// a damaged backup is first rewritten whole with the old entries and flushed.
#[test]
fn plan_order_is_crash_safe() {
    let change = [(1, 0x0102_0000_0000_0000)];
    let table = read(&mem_disk(512, 200)).unwrap();
    let plan = table.plan_attributes(&change).unwrap();
    let expected = [
        ('s', 2),
        ('h', 1),
        ('f', 1),
        ('s', 167),
        ('h', 199),
        ('f', 199),
    ];
    assert_eq!(steps(&plan), expected);
    assert_eq!(plan.bytes(512), 4 * 512);

    let mut dev = mem_disk(512, 200);
    dev.data[(199 - 32) * 512 + 100] ^= 0x08;
    let table = read(&dev).unwrap();
    assert_eq!(table.current_which(), Which::Primary);
    let plan = table.plan_attributes(&change).unwrap();
    let mut repair: Vec<(char, u64)> = (167..199).map(|lba| ('s', lba)).collect();
    repair.extend([('h', 199), ('f', 199)]);
    repair.extend(expected);
    assert_eq!(steps(&plan), repair);
    match &plan.steps[repair.len() - 1] {
        WriteStep::Flush { which, copy, .. } => {
            assert_eq!(*which, Which::Backup);
            assert_eq!(
                decode_entry(1, &copy.entries[128..256]).attributes,
                change[0].1
            );
        }
        other => panic!("expected the final flush, got {other:?}"),
    }
}

/// A plan for an entry past the array is refused before any step.
#[test]
fn no_such_entry_is_refused() {
    let table = read(&mem_disk(512, 200)).unwrap();
    assert_eq!(
        table.plan_attributes(&[(128, 0)]),
        Err(PlanError::NoSuchEntry {
            index: 128,
            count: 128
        })
    );
}
