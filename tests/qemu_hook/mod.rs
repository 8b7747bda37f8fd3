//! Scenarios 6-8: the boot hook's (dist/initramfs/abupdate-boot-hook) failure paths on a real
//! kernel (issue 11): a slot that cannot be mounted, the only bootable slot unmountable, a
//! disk that never appears. Each must end the boot with one line naming the cause and the
//! real exit code, and never loop: a successful slot spends no try, so a hook that reboots
//! on a mount failure picks the same slot forever.

use super::*;

/// A short limit: these boots end in seconds; a hook stuck in a shell hits it.
const TIMEOUT: RunOpts<'static> = RunOpts {
    bundle: None,
    append: None,
    timeout_s: Some(60),
};

/// `cgpt add -i PART -P PRIORITY DISK`.
fn set_priority(disk: &Path, part: u32, priority: u8) {
    run(Command::new("cgpt")
        .args(["add", "-i", &part.to_string(), "-P", &priority.to_string()])
        .arg(disk));
}

/// Zeroes the first MiB of the slot: the ext4 superblock goes, the slot record (at the end
/// of the slot) stays, so the hook still prints the slot's version.
fn wreck_filesystem(disk: &Path, part: u32) {
    let (start, _) = Layout::read(disk).extent(part);
    let mut f = fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(start * 512)).unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
}

fn choices(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(s, v)| (s.to_string(), v.to_string()))
        .collect()
}

/// Scenario 6: ROOT-A (v1, successful, boots next) has no file system; ROOT-B (v2,
/// successful) is fine. The hook marks ROOT-A bad and mounts ROOT-B in the same boot.
#[test]
fn qemu_6_unmountable_good_slot_falls_back_to_other_good_slot() {
    require_qemu!();
    let mut s = Sequence::new("qemu_6_unmountable_good_slot", disk_v2());
    let l = Layout::read(&s.disk);
    set_priority(&s.disk, l.a, attrs(&s.disk, l.b).priority + 1);
    wreck_filesystem(&s.disk, l.a);
    let (ra, rb) = slot_attrs(&s.disk);
    assert!(
        ra.successful == 1 && rb.successful == 1 && ra.priority > rb.priority,
        "setup: A {ra}, B {rb}"
    );

    let b = s.boot(&TIMEOUT);
    assert_eq!(
        b.hook_choices(),
        choices(&[("ROOT-A", "1"), ("ROOT-B", "2")]),
        "ROOT-A, then ROOT-B in the same boot; {}",
        b.explain()
    );
    assert!(
        b.log.contains(&format!(
            "abupdate: cannot mount /dev/vda{} (ROOT-A) as ext4 (mount exit",
            l.a
        )) && b.log.contains("marking ROOT-A bad"),
        "the hook must say why it leaves ROOT-A; {}",
        b.explain()
    );
    assert_booted(&b, "ROOT-B", "2", "good");
    let (ra2, rb2) = slot_attrs(&s.disk);
    assert_eq!(
        (ra2.priority, ra2.tries, ra2.successful),
        (0, 0, 0),
        "unmountable ROOT-A must be marked bad: {ra2}"
    );
    assert_eq!(
        (rb2.successful, rb2.tries),
        (1, 0),
        "ROOT-B stays good: {rb2}"
    );
    sgdisk_verify(&s.disk).expect("sgdisk -v");

    // The next boot goes straight to ROOT-B and writes nothing.
    let b = s.boot(&TIMEOUT);
    assert_eq!(
        b.hook_choices(),
        choices(&[("ROOT-B", "2")]),
        "{}",
        b.explain()
    );
    assert_booted(&b, "ROOT-B", "2", "good");
    assert_eq!(
        slot_attrs(&s.disk),
        (ra2, rb2),
        "a good boot writes nothing"
    );
    s.finish();
}

/// Scenario 7: the only bootable slot (ROOT-A, successful; ROOT-B empty) cannot be mounted.
/// The hook must not burn it (mark-bad refuses without --force), must say why, and must
/// stop instead of rebooting into it again; every boot ends the same way.
#[test]
fn qemu_7_only_slot_unmountable_is_not_burned() {
    require_qemu!();
    let a = assets();
    let mut s = Sequence::new("qemu_7_only_slot_unmountable", &a.disk_v1);
    let l = Layout::read(&s.disk);
    wreck_filesystem(&s.disk, l.a);
    let before = slot_attrs(&s.disk);
    assert!(
        before.0.successful == 1 && before.1.priority == 0,
        "setup: {before:?}"
    );

    for _ in 0..2 {
        let b = s.boot(&TIMEOUT);
        assert_eq!(
            b.hook_choices(),
            choices(&[("ROOT-A", "1")]),
            "{}",
            b.explain()
        );
        let why = b
            .rescue()
            .unwrap_or_else(|| panic!("the hook must stop, not reboot; {}", b.explain()));
        assert!(
            why.contains(&format!("cannot mount /dev/vda{} (ROOT-A) as ext4", l.a))
                && why.contains("the only bootable slot on /dev/vda")
                && why.contains("(mark-bad exit 8)"),
            "cause and exit code: {why}"
        );
        assert!(b.booted().is_none() && !b.noboot(), "{}", b.explain());
        assert_eq!(
            slot_attrs(&s.disk),
            before,
            "the last good slot must not be burned"
        );
    }
    sgdisk_verify(&s.disk).expect("sgdisk -v");
    s.finish();
}

/// Scenario 8: the disk named on the kernel command line never appears: the hook waits
/// `abupdate.rootwait` seconds and says so, with abupdate's real exit code (4), rather than
/// "no bootable slot".
#[test]
fn qemu_8_missing_disk_is_named() {
    require_qemu!();
    let a = assets();
    let mut s = Sequence::new("qemu_8_missing_disk", &a.disk_v1);
    let before = slot_attrs(&s.disk);
    let b = s.boot(&RunOpts {
        append: Some("abupdate.disk=/dev/vdz abupdate.rootwait=2"),
        ..TIMEOUT
    });
    let why = b
        .rescue()
        .unwrap_or_else(|| panic!("the hook must stop with a message; {}", b.explain()));
    assert!(
        why.contains("disk /dev/vdz did not appear within 2s (abupdate boot exit 4)"),
        "cause and exit code: {why}"
    );
    assert!(
        !b.noboot() && b.hook_choices().is_empty(),
        "{}",
        b.explain()
    );
    assert_eq!(slot_attrs(&s.disk), before, "/dev/vda untouched");
    s.finish();
}
