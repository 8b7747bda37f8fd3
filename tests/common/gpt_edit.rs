//! Rewriting a GPT the way a buggy or hostile tool would, with valid CRCs, so the tests can
//! hand abupdate a table that passes every checksum but lies about the layout. sgdisk and
//! cgpt refuse to create such tables, so this edits the raw structures (UEFI 2.x, chapter 5).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Byte offsets inside a partition entry.
pub const TYPE_GUID: usize = 0;
/// First LBA.
pub const FIRST_LBA: usize = 32;
/// Last LBA.
pub const LAST_LBA: usize = 40;
/// Name (UTF-16LE, 72 bytes).
pub const NAME: usize = 56;
/// Byte offsets inside a header.
pub const FIRST_USABLE: usize = 40;
/// Last usable LBA.
pub const LAST_USABLE: usize = 48;

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// Applies `edit_entry(index, entry)` to every entry and `edit_header(header)` to the header
/// of both GPT copies, then recomputes both CRCs of each copy. `sector` is the logical sector
/// size the image uses.
pub fn rewrite(
    disk: &Path,
    sector: u64,
    edit_entry: impl Fn(usize, &mut [u8]),
    edit_header: impl Fn(&mut [u8]),
) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut primary = vec![0u8; sector as usize];
    f.read_exact_at(&mut primary, sector).unwrap();
    assert_eq!(
        &primary[..8],
        b"EFI PART",
        "{} has no primary GPT",
        disk.display()
    );
    let backup_lba = u64_at(&primary, 32);
    for header_lba in [1, backup_lba] {
        let mut header = vec![0u8; sector as usize];
        f.read_exact_at(&mut header, header_lba * sector).unwrap();
        let size = u32_at(&header, 12) as usize;
        let entries_lba = u64_at(&header, 72);
        let count = u32_at(&header, 80) as usize;
        let entry_size = u32_at(&header, 84) as usize;
        let mut entries = vec![0u8; count * entry_size];
        f.read_exact_at(&mut entries, entries_lba * sector).unwrap();
        for (i, e) in entries.chunks_exact_mut(entry_size).enumerate() {
            edit_entry(i, e);
        }
        f.write_all_at(&entries, entries_lba * sector).unwrap();
        edit_header(&mut header);
        header[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        header[16..20].fill(0);
        let crc = crc32fast::hash(&header[..size]);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&header, header_lba * sector).unwrap();
    }
    f.sync_all().unwrap();
}

/// Sets a u64 field of a byte slice.
pub fn set_u64(b: &mut [u8], offset: usize, value: u64) {
    b[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Reads a u64 field.
pub fn get_u64(b: &[u8], offset: usize) -> u64 {
    u64_at(b, offset)
}

/// Sets an entry's name.
pub fn set_name(entry: &mut [u8], name: &str) {
    entry[NAME..NAME + 72].fill(0);
    for (i, unit) in name.encode_utf16().take(36).enumerate() {
        entry[NAME + 2 * i..NAME + 2 * i + 2].copy_from_slice(&unit.to_le_bytes());
    }
}

/// An entry's name.
pub fn name(entry: &[u8]) -> String {
    let units: Vec<u16> = entry[NAME..NAME + 72]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}
