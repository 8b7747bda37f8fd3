//! Crash-consistency harness: power loss at every write.
//!
//! An install (small image) and each attribute operation (boot try, mark-good, mark-bad,
//! rollback) run on a [`RecordingDevice`] that logs every write and flush. The harness then
//! rebuilds the disk as it would be after a power cut:
//! - after each operation of the log (every prefix);
//! - with the operation at the cut torn: only its first sectors landed (sector writes are
//!   assumed atomic, as disks guarantee for one logical sector);
//! - with any one write issued since the last flush lost (the device may reorder or drop
//!   unflushed writes).
//!
//! Every resulting disk must: have a valid GPT copy (the library reads it; cgpt and sgdisk
//! agree on a sample), hold slot attributes that are entirely the old or entirely the new
//! state, boot a slot, and that slot must be the old good one (unchanged bytes) or the new
//! one fully written and verified (content hash and slot record match). The running slot's
//! bytes never change.

mod common;

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use abupdate::attrs::SlotAttributes;
use abupdate::bundle::Keyring;
use abupdate::disk::blockdev::{BlockDevice, MemDevice, RecordedOp, RecordingDevice};
use abupdate::disk::gpt::Gpt;
use abupdate::disk::record::{self, SlotRecord};
use abupdate::disk::slots::AbDisk;
use abupdate::install::{install, InstallOptions};
use abupdate::select;
use common::*;
use sha2::{Digest, Sha256};

const SECTOR: usize = 512;

fn labels() -> abupdate::layout::SlotLabels {
    abupdate::layout::SlotLabels::default()
}

/// A fresh disk in memory with recognisable bytes in ROOT-A.
fn base_disk(dir: &Path) -> MemDevice {
    let path = dir.join("base.img");
    abupdate_ok(&[
        "disk",
        "init",
        path.to_str().unwrap(),
        "--slot-size",
        "1M",
        "--disk-size",
        "4M",
    ]);
    let mut dev = MemDevice {
        data: std::fs::read(&path).unwrap(),
        sector_size: 512,
    };
    let disk = AbDisk::open(dev.clone(), "base", &labels()).unwrap();
    let a = &disk.slots().unwrap()[0];
    let (off, len) = (a.offset_bytes(512) as usize, a.size_bytes(512) as usize);
    for (i, b) in dev.data[off..off + len].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    dev
}

fn slot_ranges(dev: &MemDevice) -> Vec<(usize, usize)> {
    let disk = AbDisk::open(dev.clone(), "x", &labels()).unwrap();
    disk.slots()
        .unwrap()
        .iter()
        .map(|s| (s.offset_bytes(512) as usize, s.size_bytes(512) as usize))
        .collect()
}

/// Installs `bundle` (compatible "crash", no sentinel) onto an in-process disk.
fn install_bundle<D: abupdate::install::slotio::SlotBacking>(
    disk: &mut AbDisk<D>,
    bundle: &Path,
    keyring: &Keyring,
    adaptive: bool,
) -> Result<abupdate::install::InstallReport, abupdate::install::InstallError> {
    let options = InstallOptions {
        compatible: Some("crash".into()),
        sentinel: None,
        adaptive,
        ..Default::default()
    };
    install(
        disk,
        Cursor::new(std::fs::read(bundle).unwrap()),
        keyring,
        &options,
        &AtomicBool::new(false),
        &mut |_| {},
    )
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Applies `ops` to `base`, returning the disk after the power cut described by `cut`.
fn replay(
    base: &[u8],
    ops: &[RecordedOp],
    upto: usize,
    torn: Option<usize>,
    lost: Option<usize>,
) -> Vec<u8> {
    let mut data = base.to_vec();
    for (i, op) in ops[..upto].iter().enumerate() {
        if Some(i) == lost {
            continue;
        }
        if let RecordedOp::Write {
            offset,
            data: bytes,
        } = op
        {
            let o = *offset as usize;
            data[o..o + bytes.len()].copy_from_slice(bytes);
        }
    }
    if let (
        Some(sectors),
        Some(RecordedOp::Write {
            offset,
            data: bytes,
        }),
    ) = (torn, ops.get(upto))
    {
        let o = *offset as usize;
        let n = (sectors * SECTOR).min(bytes.len());
        data[o..o + n].copy_from_slice(&bytes[..n]);
    }
    data
}

/// Every crash state of a log: (description, disk bytes).
fn crash_states(base: &[u8], ops: &[RecordedOp]) -> Vec<(String, Vec<u8>)> {
    let mut states = Vec::new();
    let mut last_flush = 0usize;
    for upto in 0..=ops.len() {
        states.push((
            format!("cut after {upto} ops"),
            replay(base, ops, upto, None, None),
        ));
        // Unflushed writes before the cut may be lost.
        for lost in last_flush..upto {
            if matches!(ops[lost], RecordedOp::Write { .. }) {
                states.push((
                    format!("cut after {upto} ops, op {lost} lost"),
                    replay(base, ops, upto, None, Some(lost)),
                ));
            }
        }
        if let Some(RecordedOp::Write { data, .. }) = ops.get(upto) {
            let sectors = data.len() / SECTOR;
            let tears: BTreeSet<usize> = [1, sectors / 2, sectors.saturating_sub(1)]
                .into_iter()
                .filter(|&s| s >= 1 && s < sectors)
                .collect();
            for t in tears {
                states.push((
                    format!("op {upto} torn after {t} of {sectors} sectors"),
                    replay(base, ops, upto, Some(t), None),
                ));
            }
        }
        if let Some(RecordedOp::Flush) = ops.get(upto) {
            last_flush = upto + 1;
        }
    }
    states
}

fn attrs_of(data: &[u8]) -> Option<Vec<SlotAttributes>> {
    let mut dev = MemDevice {
        data: data.to_vec(),
        sector_size: 512,
    };
    Gpt::read(&mut dev).ok()?;
    let disk = AbDisk::open(dev, "state", &labels()).ok()?;
    Some(disk.slots().ok()?.iter().map(|s| s.attrs).collect())
}

/// Cross-checks a sample of states with the real tools: cgpt reads the same attributes as
/// the library, and sgdisk can load the table.
fn check_with_tools(dir: &Path, data: &[u8], expected: &[SlotAttributes], what: &str) {
    check_partitions_with_tools(dir, data, &[1, 2], expected, what)
}

/// [`check_with_tools`] for slots at partitions `parts` (a disk with the boot chain has them at
/// 3 and 5).
fn check_partitions_with_tools(
    dir: &Path,
    data: &[u8],
    parts: &[u32],
    expected: &[SlotAttributes],
    what: &str,
) {
    let path = dir.join("sample.img");
    std::fs::write(&path, data).unwrap();
    let p = path.to_str().unwrap();
    for (&part, a) in parts.iter().zip(expected) {
        let fields = cgpt_fields(p, part);
        assert_eq!(
            fields,
            (a.priority(), a.tries(), a.successful()),
            "{what}: cgpt disagrees"
        );
    }
    let (_, text) = tool("sgdisk", &["-p", p]);
    assert!(
        text.contains("ROOT-A") && text.contains("ROOT-B"),
        "{what}: sgdisk cannot read: {text}"
    );
}

#[test]
fn power_cut_at_every_write_of_an_install() {
    cut_every_write_of_an_install(false);
}

/// The same for an adaptive install, whose image is mostly ROOT-A's bytes: the copies from
/// the running slot go through the same writes, flushes and read-back.
#[test]
fn power_cut_at_every_write_of_an_adaptive_install() {
    cut_every_write_of_an_install(true);
}

fn cut_every_write_of_an_install(adaptive: bool) {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = base_disk(dir.path());
    let ranges = slot_ranges(&base);
    let a_hash = sha(&base.data[ranges[0].0..ranges[0].0 + ranges[0].1]);

    let image = dir.path().join("v2.img");
    let image_len = 300 * 1024 + 17;
    if adaptive {
        // ROOT-A's bytes with chunk 2 (of 64 KiB chunks) changed.
        let mut bytes = base.data[ranges[0].0..ranges[0].0 + image_len].to_vec();
        bytes[2 * 65536 + 100] ^= 0x5a;
        std::fs::write(&image, bytes).unwrap();
    } else {
        make_image(&image, image_len, 42);
    }
    let image_bytes = std::fs::read(&image).unwrap();
    let bundle = dir.path().join("v2.abup");
    make_bundle_chunked(&image, "2", "crash", &bundle, "64K");
    let keyring = Keyring::load(&test_pubkey()).unwrap();

    // ROOT-B holds an older good image (P1 T0 S1): the install must take it out of the boot
    // order before overwriting it, so no cut can boot a half-overwritten B.
    let mut prep = AbDisk::open(base.clone(), "prep", &labels()).unwrap();
    let slots = prep.slots().unwrap();
    prep.write_slot_attributes(
        &slots,
        &[
            SlotAttributes::new(2, 0, true),
            SlotAttributes::new(1, 0, true),
        ],
    )
    .unwrap();
    let base = prep.dev;

    let rec = RecordingDevice::new(base.clone());
    let mut disk = AbDisk::open(rec, "recording", &labels()).unwrap();
    let report = install_bundle(&mut disk, &bundle, &keyring, adaptive).unwrap();
    assert_eq!(report.target, "ROOT-B");
    if adaptive {
        // 5 chunks: 0, 1, 3 and the short tail 4 come from ROOT-A; 2 changed.
        let a = report.adaptive.expect("adaptive outcome");
        assert_eq!(
            (a.planned.chunks, a.planned.reused_chunks, a.fallbacks),
            (5, 4, 0)
        );
    }
    let ops = disk.dev.log.clone();
    let writes = ops
        .iter()
        .filter(|o| matches!(o, RecordedOp::Write { .. }))
        .count();
    let flushes = ops.len() - writes;

    let old_attrs = attrs_of(&base.data).unwrap();
    let states = crash_states(&base.data, &ops);
    let mut booted_new = 0;
    let mut booted_old = 0;
    for (n, (what, data)) in states.iter().enumerate() {
        let attrs = attrs_of(data).unwrap_or_else(|| panic!("{what}: no valid GPT"));
        // The running slot is never written.
        assert_eq!(
            sha(&data[ranges[0].0..ranges[0].0 + ranges[0].1]),
            a_hash,
            "{what}: ROOT-A changed"
        );
        let choice =
            select::boot_attempt(&attrs).unwrap_or_else(|| panic!("{what}: nothing boots"));
        if choice.index == 1 {
            // Only a fully written, verified slot may boot.
            let b = &data[ranges[1].0..ranges[1].0 + ranges[1].1];
            assert_eq!(
                &b[..image_bytes.len()],
                &image_bytes[..],
                "{what}: ROOT-B boots with partial content"
            );
            let record = SlotRecord::decode(&b[b.len() - record::RECORD_BYTES as usize..]);
            assert_eq!(
                record.map(|r| r.version),
                Some("2".to_string()),
                "{what}: ROOT-B boots without its record"
            );
            booted_new += 1;
        } else {
            assert_eq!(attrs[0], old_attrs[0], "{what}: ROOT-A attributes changed");
            booted_old += 1;
        }
        if n % 25 == 0 {
            check_with_tools(dir.path(), data, &attrs, what);
        }
    }
    assert!(
        booted_new > 0 && booted_old > 0,
        "the cut points must cover both outcomes"
    );
    println!(
        "{}install: {} writes, {flushes} flushes, {} crash states explored ({booted_old} boot ROOT-A, {booted_new} boot the verified ROOT-B)",
        if adaptive { "adaptive " } else { "" },
        writes,
        states.len()
    );
}

/// An install of a bundle with a kernel onto a disk with the boot chain: the slot is the pair
/// (KERN-B, ROOT-B). Every crash state boots the old good ROOT-A with its kernel untouched, or
/// ROOT-B with both its kernel and its root fully written and its record (with the kernel's
/// hash and the signed header) in place.
#[test]
fn power_cut_at_every_write_of_a_kernel_install() {
    if !have_gpt_tools() || !on_path("mkfs.vfat") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.img");
    abupdate_ok(&[
        "disk",
        "init",
        path.to_str().unwrap(),
        "--slot-size",
        "1M",
        "--kernel-size",
        "256K",
        "--esp-size",
        "1M",
        "--disk-size",
        "8M",
    ]);
    let base = MemDevice {
        data: std::fs::read(&path).unwrap(),
        sector_size: 512,
    };
    let disk = AbDisk::open(base.clone(), "base", &labels()).unwrap();
    let range = |e: &abupdate::disk::gpt::Entry| {
        (
            e.first_lba as usize * SECTOR,
            (e.last_lba - e.first_lba + 1) as usize * SECTOR,
        )
    };
    let slots = disk.slots().unwrap();
    let roots: Vec<_> = slots.iter().map(|s| range(&s.entry)).collect();
    let kerns: Vec<_> = slots
        .iter()
        .map(|s| range(s.kernel.as_ref().expect("a KERN partition")))
        .collect();
    let untouched = |data: &[u8]| {
        let (o, l) = roots[0];
        let (ko, kl) = kerns[0];
        (sha(&data[o..o + l]), sha(&data[ko..ko + kl]))
    };
    let a_before = untouched(&base.data);

    let (image, kernel) = (dir.path().join("v2.img"), dir.path().join("uki.efi"));
    make_image(&image, 200 * 1024 + 3, 7);
    make_image(&kernel, 150 * 1024 + 11, 8);
    let (image_bytes, kernel_bytes) = (
        std::fs::read(&image).unwrap(),
        std::fs::read(&kernel).unwrap(),
    );
    let bundle = dir.path().join("v2.abup");
    make_kernel_bundle(&image, &kernel, "2", "crash", &bundle, "64K");
    let keyring = Keyring::load(&test_pubkey()).unwrap();

    let rec = RecordingDevice::new(base.clone());
    let mut disk = AbDisk::open(rec, "recording", &labels()).unwrap();
    let report = install_bundle(&mut disk, &bundle, &keyring, false).unwrap();
    assert_eq!(report.target, "ROOT-B");
    let ops = disk.dev.log.clone();
    let old_attrs = attrs_of(&base.data).unwrap();
    let states = crash_states(&base.data, &ops);
    let (mut booted_new, mut booted_old) = (0, 0);
    for (n, (what, data)) in states.iter().enumerate() {
        let attrs = attrs_of(data).unwrap_or_else(|| panic!("{what}: no valid GPT"));
        assert_eq!(
            untouched(data),
            a_before,
            "{what}: ROOT-A or KERN-A changed"
        );
        let choice =
            select::boot_attempt(&attrs).unwrap_or_else(|| panic!("{what}: nothing boots"));
        if choice.index == 1 {
            let (o, l) = roots[1];
            let b = &data[o..o + l];
            assert_eq!(
                &b[..image_bytes.len()],
                &image_bytes[..],
                "{what}: ROOT-B partial"
            );
            let (ko, _) = kerns[1];
            assert_eq!(
                &data[ko..ko + kernel_bytes.len()],
                &kernel_bytes[..],
                "{what}: ROOT-B boots with a partial kernel"
            );
            let record = SlotRecord::decode(&b[b.len() - record::RECORD_BYTES as usize..])
                .unwrap_or_else(|| panic!("{what}: ROOT-B boots without its record"));
            let k = record.kernel.expect("the record names the kernel");
            assert_eq!(
                (k.size, k.sha256),
                (kernel_bytes.len() as u64, sha(&kernel_bytes))
            );
            let at = record::header_offset(l as u64, k.header_len).unwrap() as usize;
            let header = &b[at..at + k.header_len as usize];
            let key = std::fs::read_to_string(test_pubkey()).unwrap();
            let key = hex::decode(key.split_whitespace().nth(1).unwrap()).unwrap();
            let verified =
                abupdate_core::signed_header::Verified::check(header, &[key.try_into().unwrap()])
                    .unwrap_or_else(|e| panic!("{what}: the kept header does not verify: {e}"));
            assert_eq!(verified.kernel().unwrap().sha256, k.sha256);
            booted_new += 1;
        } else {
            assert_eq!(attrs[0], old_attrs[0], "{what}: ROOT-A attributes changed");
            booted_old += 1;
        }
        if n % 25 == 0 {
            check_partitions_with_tools(dir.path(), data, &[3, 5], &attrs, what);
        }
    }
    assert!(
        booted_new > 0 && booted_old > 0,
        "the cut points must cover both outcomes"
    );
    println!(
        "kernel install: {} ops, {} crash states explored ({booted_old} boot ROOT-A, {booted_new} boot the verified pair KERN-B + ROOT-B)",
        ops.len(),
        states.len()
    );
}

/// Attribute operations: every crash state holds exactly the old or the new attributes.
#[test]
fn power_cut_at_every_write_of_attribute_operations() {
    if !have_gpt_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_disk(dir.path());
    // Start from "v2 installed in B, on trial": A P2 T0 S1, B P3 T3 S0, and a damaged backup
    // entry array in one variant so the repair path is cut too.
    let mut disk = AbDisk::open(base.clone(), "b", &labels()).unwrap();
    let slots = disk.slots().unwrap();
    disk.write_slot_attributes(
        &slots,
        &[
            SlotAttributes::new(2, 0, true),
            SlotAttributes::new(3, 3, false),
        ],
    )
    .unwrap();
    base = disk.dev.clone();
    let mut damaged = base.clone();
    let len = damaged.data.len();
    damaged.data[len - 512 - 10 * 512 + 3] ^= 0x40;

    type Op = fn(&[SlotAttributes]) -> Vec<SlotAttributes>;
    let operations: Vec<(&str, Op)> = vec![
        ("boot try", |a| {
            let c = select::boot_attempt(a).unwrap();
            let mut v = a.to_vec();
            v[c.index] = c.updated;
            v
        }),
        ("mark-good B", |a| select::mark_good(a, 1)),
        ("mark-bad B", |a| select::mark_bad_guarded(a, 1).unwrap()),
        ("rollback to A", |a| select::rollback_to(a, 0).unwrap()),
        ("install: invalidate B", |a| {
            let mut v = a.to_vec();
            v[1] = select::invalidate(a[1]);
            v
        }),
        ("flip A to trial", |a| select::activate_for_trial(a, 0, 3)),
    ];
    let mut total_states = 0;
    for start in [&base, &damaged] {
        for (name, op) in &operations {
            let rec = RecordingDevice::new(start.clone());
            let mut disk = AbDisk::open(rec, "rec", &labels()).unwrap();
            let slots = disk.slots().unwrap();
            let old: Vec<SlotAttributes> = slots.iter().map(|s| s.attrs).collect();
            let new = op(&old);
            assert_ne!(
                new, old,
                "{name}: the operation must change something to be a test"
            );
            disk.write_slot_attributes(&slots, &new).unwrap();
            let ops = disk.dev.log.clone();
            let states = crash_states(&start.data, &ops);
            for (n, (what, data)) in states.iter().enumerate() {
                let what = format!("{name}: {what}");
                let attrs = attrs_of(data).unwrap_or_else(|| panic!("{what}: no valid GPT"));
                assert!(
                    attrs == old || attrs == new,
                    "{what}: mixed state {attrs:?}"
                );
                assert!(select::next_slot(&attrs).is_some(), "{what}: nothing boots");
                if n % 10 == 0 {
                    check_with_tools(dir.path(), data, &attrs, &what);
                }
            }
            total_states += states.len();
            // After the full log, both copies are valid and identical (repair included).
            let mut final_dev = MemDevice {
                data: replay(&start.data, &ops, ops.len(), None, None),
                sector_size: 512,
            };
            assert!(
                Gpt::read(&mut final_dev).unwrap().is_consistent(),
                "{name}: copies differ after the write"
            );
            let _ = final_dev.len();
        }
    }
    println!(
        "attribute operations: {total_states} crash states explored, none mixed or unbootable"
    );
}

/// A disk that silently corrupts one byte of what it is given at `corrupt_at` (the
/// read-back must catch it, and the slot must stay unbootable), and with `shifting_view`
/// hands out read-only views whose bytes change after the first read ([`ShiftingView`]).
struct LyingDisk {
    inner: MemDevice,
    corrupt_at: u64,
    shifting_view: bool,
}

impl BlockDevice for LyingDisk {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut data = buf.to_vec();
        if (offset..offset + buf.len() as u64).contains(&self.corrupt_at) {
            data[(self.corrupt_at - offset) as usize] ^= 0x20;
        }
        self.inner.write_at(&data, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl abupdate::install::slotio::SlotBacking for LyingDisk {
    fn open_slot(
        &mut self,
        _slot: &str,
        _partition: u32,
        offset: u64,
        len: u64,
    ) -> Result<
        Box<dyn abupdate::install::slotio::SlotIo + '_>,
        abupdate::install::slotio::SlotIoError,
    > {
        Ok(Box::new(abupdate::install::slotio::DeviceSlot::new(
            self, offset, len,
        )))
    }
    fn location(&self) -> Option<(&Path, bool)> {
        None
    }
    fn read_only_view(
        &mut self,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Box<dyn abupdate::install::slotio::ReadOnlyView>> {
        let view = self.inner.read_only_view(offset, len)?;
        if !self.shifting_view {
            return Ok(view);
        }
        let mut bytes = vec![0u8; len as usize];
        view.read_at(&mut bytes, 0)?;
        Ok(Box::new(ShiftingView {
            bytes,
            seen: Default::default(),
        }))
    }
}

#[test]
fn a_disk_that_corrupts_writes_is_caught_by_the_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_disk(dir.path());
    let ranges = slot_ranges(&base);
    let image = dir.path().join("v2.img");
    make_image(&image, 200 * 1024, 43);
    let bundle = dir.path().join("v2.abup");
    make_bundle(&image, "2", "crash", &bundle);
    let keyring = Keyring::load(&test_pubkey()).unwrap();
    let lying = LyingDisk {
        inner: base,
        corrupt_at: ranges[1].0 as u64 + 150 * 1024,
        shifting_view: false,
    };
    let mut disk = AbDisk::open(lying, "lying", &labels()).unwrap();
    let err = install_bundle(&mut disk, &bundle, &keyring, false).unwrap_err();
    assert!(
        matches!(
            err,
            abupdate::install::InstallError::ReadbackMismatch { .. }
        ),
        "{err}"
    );
    let slots = disk.slots().unwrap();
    assert!(
        !slots[1].attrs.is_bootable(),
        "a slot that failed read-back must not boot"
    );
    assert_eq!(
        select::next_slot(&[slots[0].attrs, slots[1].attrs]),
        Some(0)
    );
}

/// The first read of an offset already read once (the copy after the hashing) comes back
/// with one bit flipped: a running slot whose bytes changed after the adaptive install
/// hashed them.
struct ShiftingView {
    bytes: Vec<u8>,
    seen: std::sync::Mutex<(BTreeSet<u64>, bool)>,
}

impl abupdate::install::slotio::ReadOnlyView for ShiftingView {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.copy_from_slice(&self.bytes[offset as usize..offset as usize + buf.len()]);
        let mut seen = self.seen.lock().unwrap();
        if !seen.0.insert(offset) && !seen.1 {
            seen.1 = true;
            buf[0] ^= 1;
        }
        Ok(())
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A planned copy whose bytes no longer match their signed hash is not written: the chunk
/// comes from the bundle instead, and the slot still verifies.
#[test]
fn adaptive_copy_that_changed_since_hashing_falls_back_to_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_disk(dir.path());
    let ranges = slot_ranges(&base);
    // v2 is exactly ROOT-A's first 200 KiB: the whole image is planned as a copy.
    let image_bytes = base.data[ranges[0].0..ranges[0].0 + 200 * 1024].to_vec();
    let image = dir.path().join("v2.img");
    std::fs::write(&image, &image_bytes).unwrap();
    let bundle = dir.path().join("v2.abup");
    make_bundle(&image, "2", "crash", &bundle);
    let keyring = Keyring::load(&test_pubkey()).unwrap();
    let faulty = LyingDisk {
        inner: base,
        corrupt_at: u64::MAX,
        shifting_view: true,
    };
    let mut disk = AbDisk::open(faulty, "shifting", &labels()).unwrap();
    let report = install_bundle(&mut disk, &bundle, &keyring, true).unwrap();
    let a = report.adaptive.expect("adaptive outcome");
    assert_eq!((a.planned.chunks, a.planned.reused_chunks), (1, 1));
    assert_eq!(a.fallbacks, 1, "the changed copy must not be used");
    let b = &disk.dev.inner.data[ranges[1].0..ranges[1].0 + image_bytes.len()];
    assert_eq!(b, &image_bytes[..]);
}
