//! Smoke run of the fuzz targets' checks on the stored corpus (fuzz/corpus/*), so every
//! `cargo test` (and CI) replays each input — including every crash ever found, which is
//! added to the corpus as a regression case — without needing nightly or libFuzzer.
//! Longer fuzzing: `scripts/fuzz [SECONDS]`.

use std::path::{Path, PathBuf};

use abupdate::bundle::{read_unverified_header, BundleReader, Keyring};
use abupdate::disk::blockdev::MemDevice;
use abupdate::disk::gpt::Gpt;
use abupdate::disk::slots::AbDisk;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn gpt_read_corpus() {
    let labels = abupdate::layout::SlotLabels::default();
    let mut accepted = 0;
    for (path, data) in corpus("gpt_read") {
        let mut bytes = data.clone();
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        let mut dev = MemDevice {
            data: bytes,
            sector_size: 512,
        };
        if Gpt::read(&mut dev).is_err() {
            continue;
        }
        let Ok(mut disk) = AbDisk::open(dev, "corpus", &labels) else {
            continue;
        };
        let slots = disk.slots().unwrap();
        let new: Vec<_> = slots
            .iter()
            .map(|s| s.attrs.with_tries(s.attrs.tries() ^ 1))
            .collect();
        let before = disk.dev.data.clone();
        if let Err(e) = disk.write_slot_attributes(&slots, &new) {
            // Refusing is fine (e.g. no room for a copy), writing part of it is not.
            assert!(
                disk.dev.data == before,
                "{}: refused write changed the disk: {e}",
                path.display()
            );
            continue;
        }
        let mut dev = disk.dev;
        assert!(
            Gpt::read(&mut dev).unwrap().is_consistent(),
            "{}",
            path.display()
        );
        accepted += 1;
    }
    assert!(accepted > 0, "the corpus must hold at least one valid disk");
}

#[test]
fn bundle_corpora() {
    let ring = Keyring::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/test-keys/TEST-ONLY-DO-NOT-USE.pub"),
    )
    .unwrap();
    for target in ["bundle_header", "bundle_reader"] {
        for (_, data) in corpus(target) {
            let body = if target == "bundle_reader" && !data.is_empty() {
                &data[1..]
            } else {
                &data[..]
            };
            let _ = read_unverified_header(&mut &body[..]);
            if let Ok(mut reader) = BundleReader::new(body, &ring) {
                while let Ok(Some(_)) = reader.next_chunk() {}
            }
        }
    }
}
