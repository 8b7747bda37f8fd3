//! Integration tests of the signed bundle format: round trips (including a
//! 2 GiB sparse image with measured peak memory), and every class of bad
//! input, each asserting the specific error variant.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use abupdate::bundle::format::{
    header_len_from_prefix, max_compressed_len, FIXED_HEADER_LEN, FORMAT_VERSION, SIGNATURE_LEN,
};
use abupdate::bundle::keys::{self, generate_signing_key};
use abupdate::bundle::{
    create_bundle, create_bundle_with_options, read_unverified_header, read_verified_header,
    BundleError, BundleHeader, BundleReader, ChunkEntry, Compression, CreateOptions, Extension,
    KeyId, Keyring, Section, MIN_CHUNK_SIZE,
};
use abupdate::cli::bundle as cli_support;
use ed25519_dalek::{Signer, SigningKey};
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const K64: u32 = MIN_CHUNK_SIZE;

fn ring(keys: &[&SigningKey]) -> Keyring {
    Keyring::from_keys(keys.iter().map(|k| k.verifying_key())).unwrap()
}

/// Half random, half repetitive: exercises both incompressible and
/// compressible frames.
fn mixed_image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(4096).enumerate() {
        if i % 2 == 0 {
            rng.fill_bytes(chunk);
        } else {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (j / 64) as u8 ^ i as u8;
            }
        }
    }
    v
}

/// Compresses to a few hundred bytes; keeps every-byte loops cheap.
fn compressible_image(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 3000) % 7) as u8).collect()
}

struct Built {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
    header: BundleHeader,
}

fn build_with(image: &[u8], key: &SigningKey, options: &CreateOptions) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image.img");
    fs::write(&img, image).unwrap();
    let path = dir.path().join("out.abb");
    let header = create_bundle_with_options(&img, key, options, &path, &mut |_, _| {}).unwrap();
    let bytes = fs::read(&path).unwrap();
    Built {
        _dir: dir,
        path,
        bytes,
        header,
    }
}

fn build(image: &[u8], key: &SigningKey, chunk_size: u32) -> Built {
    let mut o = CreateOptions::new("1.0.0", "test-board");
    o.chunk_size = chunk_size;
    build_with(image, key, &o)
}

/// A small bundle whose header has every section non-empty.
fn small_bundle(key: &SigningKey) -> (Vec<u8>, Built) {
    let image = compressible_image(3 * K64 as usize + 100);
    let mut o = CreateOptions::new("1.0.0", "test-board");
    o.chunk_size = K64;
    o.extensions = vec![Extension {
        tag: 0x0007,
        value: b"note".to_vec(),
    }];
    let b = build_with(&image, key, &o);
    (image, b)
}

fn read_seq(bytes: &[u8], ring: &Keyring) -> Result<Vec<u8>, BundleError> {
    let mut r = BundleReader::new(bytes, ring)?;
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk()? {
        assert_eq!(c.image_offset, out.len() as u64);
        out.extend_from_slice(c.data);
    }
    Ok(out)
}

fn read_par(bytes: &[u8], ring: &Keyring, workers: usize) -> Result<Vec<u8>, BundleError> {
    let mut r = BundleReader::new(bytes, ring)?;
    let mut out = Vec::new();
    r.read_parallel(workers, &mut |c| {
        assert_eq!(c.image_offset, out.len() as u64);
        out.extend_from_slice(c.data);
        Ok(())
    })?;
    Ok(out)
}

fn le32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Re-signs a (possibly patched) bundle following docs/bundle-format.md:
/// key id at offset 64, signature = the 64 bytes before `header_len`
/// (offset 12), over every header byte before it.
fn resign(bytes: &mut [u8], key: &SigningKey) {
    let hl = le32_at(bytes, 12) as usize;
    bytes[64..72].copy_from_slice(&KeyId::of(&key.verifying_key()).0);
    let sig = key.sign(&bytes[..hl - SIGNATURE_LEN]);
    bytes[hl - SIGNATURE_LEN..hl].copy_from_slice(&sig.to_bytes());
}

/// A bundle assembled from a hand-made header and hand-made frames.
fn craft(header: &BundleHeader, frames: &[Vec<u8>], key: &SigningKey) -> Vec<u8> {
    let mut out = header.encode_signed(key).unwrap();
    for f in frames {
        out.extend_from_slice(f);
    }
    out
}

fn one_chunk_header(key: &SigningKey, chunk: &[u8], compressed_len: usize) -> BundleHeader {
    BundleHeader {
        format_version: FORMAT_VERSION,
        image_version: "1".into(),
        compatible: "c".into(),
        image_size: chunk.len() as u64,
        image_sha256: Sha256::digest(chunk).into(),
        chunk_size: K64,
        compression: Compression::Zstd,
        signer_key_id: KeyId::of(&key.verifying_key()),
        extensions: vec![],
        chunks: vec![ChunkEntry {
            compressed_len: compressed_len as u32,
            sha256: Sha256::digest(chunk).into(),
        }],
        payload_offset: None,
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn round_trip_small_random_image() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let image = mixed_image(5 * K64 as usize + 12_345, 1);
    let b = build(&image, &key, K64);
    let h = &b.header;
    assert_eq!(h.chunk_count(), 6);
    assert_eq!(h.chunk_len(5), 12_345);
    assert_eq!(h.image_size, image.len() as u64);
    assert_eq!(h.image_sha256, <[u8; 32]>::from(Sha256::digest(&image)));
    assert_eq!(b.bytes.len() as u64, h.bundle_len());
    assert_eq!(
        header_len_from_prefix(&b.bytes).unwrap() as u64,
        h.header_len()
    );

    let mut reader = BundleReader::new(&b.bytes[..], &r).unwrap();
    assert_eq!(reader.header(), h);
    assert_eq!(reader.matched_key(), KeyId::of(&key.verifying_key()));
    let mut out = Vec::new();
    let mut indexes = Vec::new();
    while let Some(c) = reader.next_chunk().unwrap() {
        indexes.push(c.index);
        out.extend_from_slice(c.data);
    }
    assert_eq!(indexes, (0..6).collect::<Vec<_>>());
    assert_eq!(out, image);
    assert!(reader.next_chunk().unwrap().is_none());
    // Buffers depend on the chunk size only.
    assert!(reader.buffer_bytes() <= (K64 + max_compressed_len(K64)) as usize);

    for workers in [1, 2, 5] {
        assert_eq!(read_par(&b.bytes, &r, workers).unwrap(), image);
    }
    // No temporary files are left next to the output.
    let names: Vec<_> = fs::read_dir(b.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn round_trip_edge_sizes() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    for len in [
        1usize,
        K64 as usize - 1,
        K64 as usize,
        K64 as usize + 1,
        2 * K64 as usize,
    ] {
        let image = mixed_image(len, len as u64);
        let b = build(&image, &key, K64);
        assert_eq!(b.header.chunk_count() as usize, len.div_ceil(K64 as usize));
        assert_eq!(read_seq(&b.bytes, &r).unwrap(), image, "len {len}");
        assert_eq!(read_par(&b.bytes, &r, 2).unwrap(), image, "len {len}");
    }
}

#[test]
fn all_zstd_levels_decode_within_the_window_cap() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let image = mixed_image(2 * K64 as usize + 3, 8);
    for level in [-5, 1, 3, 19, 22] {
        let mut o = CreateOptions::new("1", "c");
        o.chunk_size = K64;
        o.zstd_level = level;
        o.threads = 1;
        let b = build_with(&image, &key, &o);
        assert_eq!(read_seq(&b.bytes, &r).unwrap(), image, "level {level}");
    }
}

#[test]
fn small_image_gets_small_buffers() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let b = build(&[1, 2, 3], &key, 64 << 20);
    let reader = BundleReader::new(&b.bytes[..], &r).unwrap();
    assert!(reader.buffer_bytes() < 8192, "{}", reader.buffer_bytes());
}

#[test]
fn progress_is_monotonic_and_complete() {
    let key = generate_signing_key();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i");
    let image = mixed_image(4 * K64 as usize + 7, 3);
    fs::write(&img, &image).unwrap();
    let mut calls = Vec::new();
    create_bundle(
        &img,
        &key,
        "v",
        "c",
        K64,
        &dir.path().join("b"),
        &mut |d, t| calls.push((d, t)),
    )
    .unwrap();
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        calls.last(),
        Some(&(image.len() as u64, image.len() as u64))
    );
}

#[test]
fn key_rotation_and_directory_keyring() {
    let old = generate_signing_key();
    let new = generate_signing_key();
    let dir = tempfile::tempdir().unwrap();
    keys::write_public_key(&dir.path().join("old.pub"), &old.verifying_key(), "old").unwrap();
    keys::write_public_key(&dir.path().join("new.pub"), &new.verifying_key(), "new").unwrap();
    let keyring = Keyring::load(dir.path()).unwrap();
    let image = mixed_image(70_000, 4);
    for key in [&old, &new] {
        let b = build(&image, key, K64);
        let reader = BundleReader::new(&b.bytes[..], &keyring).unwrap();
        assert_eq!(reader.matched_key(), KeyId::of(&key.verifying_key()));
    }
}

#[test]
fn resume_at_every_chunk() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let image = mixed_image(4 * K64 as usize + 999, 5);
    let b = build(&image, &key, K64);
    let verified = read_verified_header(&mut &b.bytes[..], &r).unwrap();
    let count = verified.header().chunk_count();
    for n in 0..=count {
        let off = verified.header().chunk_bundle_offset(n).unwrap() as usize;
        let start = verified.header().chunk_image_offset(n) as usize;
        // Without a prefix hash: per-chunk hashes only.
        let mut rd = BundleReader::resume_at(&b.bytes[off..], verified.clone(), n, None).unwrap();
        let mut out = Vec::new();
        while let Some(c) = rd.next_chunk().unwrap() {
            out.extend_from_slice(c.data);
        }
        assert_eq!(out, image[start.min(image.len())..], "resume at {n}");
        // With the hash of the already-installed prefix, the whole-image
        // hash is checked too; a wrong prefix is caught.
        let mut prefix = Sha256::new();
        prefix.update(&image[..start.min(image.len())]);
        let mut rd =
            BundleReader::resume_at(&b.bytes[off..], verified.clone(), n, Some(prefix)).unwrap();
        while rd.next_chunk().unwrap().is_some() {}
        {
            // Also at n == count: a reader resumed at the end still runs the
            // end-of-bundle checks.
            let mut wrong = Sha256::new();
            wrong.update(b"not the prefix");
            let mut rd =
                BundleReader::resume_at(&b.bytes[off..], verified.clone(), n, Some(wrong)).unwrap();
            let err = loop {
                match rd.next_chunk() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("wrong prefix hash accepted"),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(err, BundleError::ImageHashMismatch { .. }),
                "{err:?}"
            );
        }
    }
    assert!(matches!(
        BundleReader::resume_at(&b.bytes[..], verified.clone(), count + 1, None),
        Err(BundleError::ChunkIndexOutOfRange { .. })
    ));
    // Trailing data is refused on a resumed stream too.
    let off = verified.header().chunk_bundle_offset(2).unwrap() as usize;
    let mut tail = b.bytes[off..].to_vec();
    tail.push(0);
    let mut rd = BundleReader::resume_at(&tail[..], verified, 2, None).unwrap();
    let err = loop {
        match rd.next_chunk() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("trailing byte accepted"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, BundleError::TrailingData { offset } if offset == b.bytes.len() as u64));
}

// ---------------------------------------------------------------- keys and signatures

#[test]
fn wrong_key_is_untrusted() {
    let key = generate_signing_key();
    let other = generate_signing_key();
    let (_, b) = small_bundle(&key);
    let err = read_seq(&b.bytes, &ring(&[&other])).unwrap_err();
    assert!(
        matches!(err, BundleError::UntrustedKey { key_id } if key_id == KeyId::of(&key.verifying_key())),
        "{err:?}"
    );
    assert!(matches!(
        read_seq(&b.bytes, &Keyring::new()).unwrap_err(),
        BundleError::UntrustedKey { .. }
    ));
}

#[test]
fn key_id_of_another_trusted_key_does_not_verify() {
    let key = generate_signing_key();
    let other = generate_signing_key();
    let (_, mut b) = small_bundle(&key);
    // Claim `other` signed it, without re-signing.
    let other_id = KeyId::of(&other.verifying_key());
    b.bytes[64..72].copy_from_slice(&other_id.0);
    let err = read_seq(&b.bytes, &ring(&[&key, &other])).unwrap_err();
    assert!(
        matches!(err, BundleError::BadSignature { key_id } if key_id == other_id),
        "{err:?}"
    );
}

#[test]
fn signature_from_another_bundle_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let a = build(&mixed_image(100_000, 10), &key, K64);
    let b = build(&mixed_image(100_000, 11), &key, K64);
    assert_eq!(a.header.header_len(), b.header.header_len());
    let hl = a.header.header_len() as usize;
    let mut spliced = a.bytes.clone();
    spliced[hl - SIGNATURE_LEN..hl].copy_from_slice(&b.bytes[hl - SIGNATURE_LEN..hl]);
    assert!(matches!(
        read_seq(&spliced, &r).unwrap_err(),
        BundleError::BadSignature { .. }
    ));
    // And b's header with a's payload: the header verifies, the chunks don't.
    let mut mixed = b.bytes[..hl].to_vec();
    mixed.extend_from_slice(&a.bytes[hl..]);
    let err = read_seq(&mixed, &r).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::ChunkHashMismatch { index: 0, .. } | BundleError::Truncated { .. }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- truncation

#[test]
fn truncation_at_every_byte_names_the_section() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    let h = &b.header;
    let hl = h.header_len() as usize;
    let v_end = FIXED_HEADER_LEN + h.image_version.len();
    let c_end = v_end + h.compatible.len();
    // The caller's "note" and the writer's first-block hashes.
    let e_end = c_end
        + h.extensions
            .iter()
            .map(|e| 4 + e.value.len())
            .sum::<usize>();
    let t_end = e_end + 36 * h.chunk_count() as usize;
    assert_eq!(t_end + SIGNATURE_LEN, hl);
    let expected_section = |len: usize| -> Section {
        match len {
            l if l < FIXED_HEADER_LEN => Section::FixedHeader,
            l if l < v_end => Section::ImageVersion,
            l if l < c_end => Section::Compatible,
            l if l < e_end => Section::Extensions,
            l if l < t_end => Section::ChunkTable,
            l if l < hl => Section::Signature,
            l => {
                let i = (0..h.chunk_count())
                    .rev()
                    .find(|&i| h.chunk_bundle_offset(i).unwrap() as usize <= l)
                    .unwrap();
                Section::Chunk(i)
            }
        }
    };
    for len in 0..b.bytes.len() {
        for parallel in [false, true] {
            let cut = &b.bytes[..len];
            let err = if parallel {
                read_par(cut, &r, 2).unwrap_err()
            } else {
                read_seq(cut, &r).unwrap_err()
            };
            match err {
                BundleError::Truncated { section, offset } => {
                    assert_eq!(section, expected_section(len), "len {len}");
                    assert_eq!(offset, len as u64, "len {len}");
                }
                other => panic!("len {len} parallel {parallel}: {other:?}"),
            }
        }
    }
    assert!(read_seq(&b.bytes, &r).is_ok());
}

// ---------------------------------------------------------------- bit flips

#[test]
fn every_header_bit_flip_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    let hl = b.header.header_len() as usize;
    for byte in 0..hl {
        for bit in 0..8 {
            let mut m = b.bytes.clone();
            m[byte] ^= 1 << bit;
            let err = read_seq(&m, &r).expect_err("flipped header accepted");
            let ok = match byte {
                0..=7 => matches!(err, BundleError::BadMagic { .. }),
                8..=9 => matches!(err, BundleError::UnsupportedFormatVersion { .. }),
                10..=11 => matches!(err, BundleError::ReservedNotZero { field: "flags", .. }),
                // Length-defining fields: refused by the prefix checks, or
                // by the signature when the flipped value is still coherent.
                12..=31 | 74..=79 => matches!(
                    err,
                    BundleError::BadSignature { .. }
                        | BundleError::HeaderLengthMismatch { .. }
                        | BundleError::HeaderLimit { .. }
                        | BundleError::ChunkCountMismatch { .. }
                        | BundleError::InvalidChunkSize { .. }
                        | BundleError::EmptyImage
                ),
                64..=71 => matches!(err, BundleError::UntrustedKey { .. }),
                72 => matches!(err, BundleError::UnsupportedCompression { .. }),
                73 => matches!(
                    err,
                    BundleError::ReservedNotZero {
                        field: "reserved",
                        ..
                    }
                ),
                // Image hash, strings, extensions, chunk table, signature.
                _ => matches!(err, BundleError::BadSignature { .. }),
            };
            assert!(ok, "byte {byte} bit {bit}: {err:?}");
        }
    }
}

#[test]
fn every_payload_byte_flip_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (image, b) = small_bundle(&key);
    let hl = b.header.header_len() as usize;
    let mut harmless = 0;
    for byte in hl..b.bytes.len() {
        let mut m = b.bytes.clone();
        m[byte] ^= 1 << (byte % 8);
        for parallel in [false, true] {
            let result = if parallel {
                read_par(&m, &r, 2)
            } else {
                read_seq(&m, &r)
            };
            // Some frame-header bits do not change the decoded bytes (e.g. a
            // larger window descriptor). The signature covers the
            // uncompressed chunks, so such a change is harmless and may pass
            // -- but only with exactly the signed image as output.
            let err = match result {
                Ok(data) => {
                    assert_eq!(data, image, "byte {byte}: altered image accepted");
                    harmless += 1;
                    continue;
                }
                Err(e) => e,
            };
            assert!(
                matches!(
                    err,
                    BundleError::ChunkDecompress { .. }
                        | BundleError::ChunkHashMismatch { .. }
                        | BundleError::ChunkTooLarge { .. }
                        | BundleError::ChunkTooSmall { .. }
                        | BundleError::ChunkTrailingBytes { .. }
                ),
                "byte {byte}: {err:?}"
            );
        }
    }
    // Nearly every flip must be caught by decoding or by a chunk hash.
    assert!(harmless <= 2 * 8, "{harmless} harmless flips");
}

#[test]
fn random_payload_flip_gives_hash_mismatch_for_that_chunk() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    // Random data is stored in raw zstd blocks: a flipped byte decodes fine
    // and only the chunk hash catches it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut image = vec![0u8; 3 * K64 as usize];
    rng.fill_bytes(&mut image);
    let b = build(&image, &key, K64);
    let start = b.header.chunk_bundle_offset(1).unwrap() as usize;
    let mut m = b.bytes.clone();
    m[start + 1000] ^= 0x10;
    for err in [
        read_seq(&m, &r).unwrap_err(),
        read_par(&m, &r, 2).unwrap_err(),
    ] {
        assert!(
            matches!(err, BundleError::ChunkHashMismatch { index: 1, image_offset } if image_offset == K64 as u64),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------- crafted frames

fn zstd_no_content_size(data: &[u8], window_log: u32) -> Vec<u8> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.window_log(window_log).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn read_err(bytes: &[u8], r: &Keyring) -> BundleError {
    let e1 = read_seq(bytes, r).unwrap_err();
    let e2 = read_par(bytes, r, 2).unwrap_err();
    assert_eq!(
        format!("{e1:?}"),
        format!("{e2:?}"),
        "sequential and parallel differ"
    );
    e1
}

#[test]
fn zstd_bomb_is_stopped_at_the_declared_length() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let chunk = vec![0u8; K64 as usize];
    let huge = vec![0u8; 32 << 20];

    // Frame without a content size, small window: only decoding reveals it.
    let bomb = zstd_no_content_size(&huge, 16);
    assert!(bomb.len() < 4096, "{}", bomb.len());
    let h = one_chunk_header(&key, &chunk, bomb.len());
    let err = read_err(&craft(&h, &[bomb], &key), &r);
    assert!(
        matches!(err, BundleError::ChunkTooLarge { index: 0, expected } if expected == K64),
        "{err:?}"
    );

    // Frame that declares its (too large) content size.
    let declared = zstd::bulk::compress(&huge, 3).unwrap();
    let h = one_chunk_header(&key, &chunk, declared.len());
    let err = read_err(&craft(&h, &[declared], &key), &r);
    assert!(
        matches!(err, BundleError::ChunkTooLarge { index: 0, .. }),
        "{err:?}"
    );

    // A window bigger than the chunk size is refused before zstd allocates it.
    let wide = zstd_no_content_size(&huge, 24);
    let h = one_chunk_header(&key, &chunk, wide.len());
    let err = read_err(&craft(&h, &[wide], &key), &r);
    assert!(
        matches!(err, BundleError::ChunkDecompress { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn frame_smaller_than_declared_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let chunk = vec![1u8; K64 as usize];
    let short = &chunk[..1000];
    let with_size = zstd::bulk::compress(short, 3).unwrap();
    let h = one_chunk_header(&key, &chunk, with_size.len());
    let err = read_err(&craft(&h, &[with_size], &key), &r);
    assert!(
        matches!(
            err,
            BundleError::ChunkTooSmall {
                index: 0,
                actual: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    let without = zstd_no_content_size(short, 16);
    let h = one_chunk_header(&key, &chunk, without.len());
    let err = read_err(&craft(&h, &[without], &key), &r);
    assert!(
        matches!(
            err,
            BundleError::ChunkTooSmall {
                index: 0,
                actual: 1000,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn bytes_after_the_frame_inside_a_chunk_are_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let chunk = vec![3u8; K64 as usize];
    let mut frame = zstd::bulk::compress(&chunk, 3).unwrap();
    let single = frame.len();
    // A second complete frame (which a multi-frame decoder would accept).
    frame.extend_from_slice(&zstd::bulk::compress(&chunk, 3).unwrap());
    let h = one_chunk_header(&key, &chunk, frame.len());
    let err = read_err(&craft(&h, &[frame], &key), &r);
    assert!(
        matches!(err, BundleError::ChunkTrailingBytes { index: 0, extra } if extra == single),
        "{err:?}"
    );
}

#[test]
fn garbage_frame_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let chunk = vec![3u8; K64 as usize];
    let garbage = vec![0xAAu8; 100];
    let h = one_chunk_header(&key, &chunk, garbage.len());
    let err = read_err(&craft(&h, &[garbage], &key), &r);
    assert!(
        matches!(err, BundleError::ChunkDecompress { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn whole_image_hash_mismatch_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let image = mixed_image(2 * K64 as usize + 5, 20);
    let b = build(&image, &key, K64);
    let mut h = b.header.clone();
    h.image_sha256[0] ^= 1;
    let mut bytes = h.encode_signed(&key).unwrap();
    bytes.extend_from_slice(&b.bytes[h.header_len() as usize..]);
    let err = read_err(&bytes, &r);
    assert!(
        matches!(err, BundleError::ImageHashMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn invalid_chunk_table_entries_are_refused_after_the_signature() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let chunk = vec![3u8; K64 as usize];
    for (len, limit) in [
        (0u32, max_compressed_len(K64)),
        (max_compressed_len(K64) + 1, max_compressed_len(K64)),
    ] {
        let h = one_chunk_header(&key, &chunk, len as usize);
        let err = read_seq(&craft(&h, &[], &key), &r).unwrap_err();
        assert!(
            matches!(err, BundleError::InvalidChunkEntry { index: 0, compressed_len, limit: l } if compressed_len == len && l == limit),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------- header fields

/// Patches a header field and re-signs, so only the field check can refuse.
fn patched(bytes: &[u8], key: &SigningKey, off: usize, value: &[u8]) -> Vec<u8> {
    let mut m = bytes.to_vec();
    m[off..off + value.len()].copy_from_slice(value);
    if m.len() >= FIXED_HEADER_LEN && le32_at(&m, 12) as usize <= m.len() {
        resign(&mut m, key);
    }
    m
}

#[test]
fn header_field_checks() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    let count = b.header.chunk_count();
    let check = |m: Vec<u8>, pred: &dyn Fn(&BundleError) -> bool, what: &str| {
        let err = read_seq(&m, &r).unwrap_err();
        assert!(pred(&err), "{what}: {err:?}");
        // The unverified path applies the same prefix checks.
        if !matches!(
            err,
            BundleError::BadSignature { .. } | BundleError::UntrustedKey { .. }
        ) {
            assert!(read_unverified_header(&mut &m[..]).is_err(), "{what}");
        }
    };
    check(
        patched(&b.bytes, &key, 8, &2u16.to_le_bytes()),
        &|e| {
            matches!(
                e,
                BundleError::UnsupportedFormatVersion {
                    found: 2,
                    supported: 1
                }
            )
        },
        "format version 2",
    );
    check(
        patched(&b.bytes, &key, 0, b"ABUPBNDX"),
        &|e| matches!(e, BundleError::BadMagic { .. }),
        "magic",
    );
    check(
        patched(&b.bytes, &key, 28, &(count + 1).to_le_bytes()),
        &|e| matches!(e, BundleError::ChunkCountMismatch { declared, expected } if *declared == count + 1 && *expected == count as u64),
        "chunk count +1",
    );
    check(
        patched(&b.bytes, &key, 28, &(count - 1).to_le_bytes()),
        &|e| matches!(e, BundleError::ChunkCountMismatch { .. }),
        "chunk count -1",
    );
    check(
        patched(&b.bytes, &key, 28, &u32::MAX.to_le_bytes()),
        &|e| {
            matches!(
                e,
                BundleError::HeaderLimit {
                    field: "chunk_count",
                    ..
                }
            )
        },
        "chunk count u32::MAX",
    );
    for size in [1u64 << 63, u64::MAX, ((MIN_CHUNK_SIZE as u64) << 20) | 1] {
        check(
            patched(&b.bytes, &key, 16, &size.to_le_bytes()),
            &|e| matches!(e, BundleError::HeaderLimit { field: "image_size", value, .. } if *value == size),
            "absurd image size",
        );
    }
    check(
        patched(&b.bytes, &key, 16, &0u64.to_le_bytes()),
        &|e| matches!(e, BundleError::EmptyImage),
        "zero image size",
    );
    for cs in [0u32, 1, 4096, 3 * 65536, 1 << 27, 1 << 31] {
        check(
            patched(&b.bytes, &key, 24, &cs.to_le_bytes()),
            &|e| matches!(e, BundleError::InvalidChunkSize { value, .. } if *value == cs as u64),
            "chunk size",
        );
    }
    check(
        patched(&b.bytes, &key, 12, &u32::MAX.to_le_bytes()),
        &|e| matches!(e, BundleError::HeaderLengthMismatch { declared, .. } if *declared == u32::MAX as u64),
        "header_len",
    );
    check(
        patched(&b.bytes, &key, 72, &[2]),
        &|e| matches!(e, BundleError::UnsupportedCompression { found: 2 }),
        "compression",
    );
    check(
        patched(&b.bytes, &key, 10, &[1, 0]),
        &|e| {
            matches!(
                e,
                BundleError::ReservedNotZero {
                    field: "flags",
                    offset: 10,
                    value: 1
                }
            )
        },
        "flags",
    );
    check(
        patched(&b.bytes, &key, 73, &[9]),
        &|e| {
            matches!(
                e,
                BundleError::ReservedNotZero {
                    field: "reserved",
                    offset: 73,
                    value: 9
                }
            )
        },
        "reserved",
    );
    check(
        patched(&b.bytes, &key, 74, &u16::MAX.to_le_bytes()),
        &|e| {
            matches!(
                e,
                BundleError::HeaderLimit {
                    field: "version_len",
                    ..
                }
            )
        },
        "version_len",
    );
    check(
        patched(&b.bytes, &key, 76, &256u16.to_le_bytes()),
        &|e| {
            matches!(
                e,
                BundleError::HeaderLimit {
                    field: "compatible_len",
                    ..
                }
            )
        },
        "compatible_len",
    );
    // Any u16 is within the extension area's limit; a length that disagrees with header_len
    // is refused as such.
    check(
        patched(&b.bytes, &key, 78, &u16::MAX.to_le_bytes()),
        &|e| matches!(e, BundleError::HeaderLengthMismatch { .. }),
        "extensions_len",
    );
    // Signed but invalid strings are refused after the signature check.
    check(
        patched(&b.bytes, &key, FIXED_HEADER_LEN, &[0xff]),
        &|e| {
            matches!(
                e,
                BundleError::InvalidString {
                    field: "image_version",
                    ..
                }
            )
        },
        "non-UTF-8 version",
    );
    check(
        patched(&b.bytes, &key, FIXED_HEADER_LEN + 5, b"\n"),
        &|e| {
            matches!(
                e,
                BundleError::InvalidString {
                    field: "compatible",
                    ..
                }
            )
        },
        "control char in compatible",
    );
}

#[test]
fn absurd_sizes_are_refused_before_reading_further() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    // Only the 80-byte prefix exists: a reader that allocated or read from
    // the declared sizes first would report truncation instead.
    let mut prefix = b.bytes[..FIXED_HEADER_LEN].to_vec();
    prefix[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
    let err = read_seq(&prefix, &r).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::HeaderLimit {
                field: "image_size",
                ..
            }
        ),
        "{err:?}"
    );
    let mut prefix = b.bytes[..FIXED_HEADER_LEN].to_vec();
    prefix[28..32].copy_from_slice(&(1u32 << 31).to_le_bytes());
    let err = read_seq(&prefix, &r).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::HeaderLimit {
                field: "chunk_count",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn extensions_critical_and_not() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (image, b) = small_bundle(&key);
    assert_eq!(
        b.header.extensions[0],
        Extension {
            tag: 7,
            value: b"note".to_vec()
        }
    );
    // The writer adds the first-block hashes (non-critical) after the caller's extensions.
    assert_eq!(b.header.extensions.len(), 2);
    assert_eq!(
        b.header.extensions[1].tag,
        abupdate::bundle::format::EXT_FIRST_BLOCK_HASHES
    );
    let first = b.header.first_block_hashes().expect("first-block hashes");
    assert_eq!(first.len(), b.header.chunks.len());
    let cs = b.header.chunk_size as usize;
    for (i, h) in first.iter().enumerate() {
        let chunk = &image[i * cs..((i + 1) * cs).min(image.len())];
        let d = sha2::Sha256::digest(&chunk[..chunk.len().min(4096)]);
        assert_eq!(&h[..], &d[..4], "chunk {i}");
    }
    assert_eq!(read_seq(&b.bytes, &r).unwrap(), image);
    // Set the critical bit on the (signed) extension and re-sign.
    let off = FIXED_HEADER_LEN + b.header.image_version.len() + b.header.compatible.len();
    let m = patched(&b.bytes, &key, off, &0x8007u16.to_le_bytes());
    assert!(matches!(
        read_seq(&m, &r).unwrap_err(),
        BundleError::UnknownCriticalExtension { tag: 0x8007 }
    ));
    // A record running past the area.
    let m = patched(&b.bytes, &key, off + 2, &u16::MAX.to_le_bytes());
    assert!(matches!(
        read_seq(&m, &r).unwrap_err(),
        BundleError::MalformedExtension { offset: 0, .. }
    ));
    // The writer refuses critical extensions.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i");
    fs::write(&img, [1u8; 10]).unwrap();
    let mut o = CreateOptions::new("1", "c");
    o.extensions = vec![Extension {
        tag: 0x8001,
        value: vec![],
    }];
    assert!(matches!(
        create_bundle_with_options(&img, &key, &o, &dir.path().join("b"), &mut |_, _| {}),
        Err(BundleError::UnknownCriticalExtension { tag: 0x8001 })
    ));
}

#[test]
fn trailing_garbage_is_refused() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    for extra in [&[0u8][..], b"garbage", &[0u8; 100_000]] {
        let mut m = b.bytes.clone();
        m.extend_from_slice(extra);
        let err = read_err(&m, &r);
        assert!(
            matches!(err, BundleError::TrailingData { offset } if offset == b.bytes.len() as u64),
            "{err:?}"
        );
    }
}

#[test]
fn reader_refuses_use_after_an_error() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let (_, b) = small_bundle(&key);
    let cut = &b.bytes[..b.header.chunk_bundle_offset(1).unwrap() as usize + 3];
    let mut rd = BundleReader::new(cut, &r).unwrap();
    assert!(rd.next_chunk().unwrap().is_some());
    assert!(matches!(
        rd.next_chunk(),
        Err(BundleError::Truncated { .. })
    ));
    assert!(matches!(rd.next_chunk(), Err(BundleError::ReaderFailed)));
}

#[test]
fn sink_error_stops_the_parallel_reader() {
    let key = generate_signing_key();
    let r = ring(&[&key]);
    let b = build(&mixed_image(6 * K64 as usize, 30), &key, K64);
    let mut rd = BundleReader::new(&b.bytes[..], &r).unwrap();
    let err = rd
        .read_parallel(2, &mut |c| {
            if c.index == 2 {
                Err(io::Error::other("disk full"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, BundleError::Sink { index: 2, .. }), "{err:?}");
}

// ---------------------------------------------------------------- writer input checks

#[test]
fn writer_input_checks() {
    let key = generate_signing_key();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    let one = dir.path().join("one");
    fs::write(&one, b"x").unwrap();
    let nothing = &mut |_, _| {};
    assert!(matches!(
        create_bundle(&empty, &key, "1", "c", K64, &out, nothing),
        Err(BundleError::EmptyImage)
    ));
    for cs in [0, 4096, 3 * 65536, 1 << 27] {
        assert!(matches!(
            create_bundle(&one, &key, "1", "c", cs, &out, nothing),
            Err(BundleError::InvalidChunkSize { .. })
        ));
    }
    assert!(matches!(
        create_bundle(&one, &key, "", "c", K64, &out, nothing),
        Err(BundleError::InvalidString {
            field: "image_version",
            ..
        })
    ));
    assert!(matches!(
        create_bundle(&one, &key, "1", &"c".repeat(256), K64, &out, nothing),
        Err(BundleError::HeaderLimit {
            field: "compatible",
            ..
        })
    ));
    assert!(matches!(
        create_bundle(&one, &key, "1\n", "c", K64, &out, nothing),
        Err(BundleError::InvalidString {
            field: "image_version",
            ..
        })
    ));
    // A sparse image past the chunk-count limit is refused up front.
    let big = dir.path().join("big");
    let f = fs::File::create(&big).unwrap();
    f.set_len(((K64 as u64) << 20) + 1).unwrap();
    assert!(matches!(
        create_bundle(&big, &key, "1", "c", K64, &out, nothing),
        Err(BundleError::HeaderLimit {
            field: "image_size",
            ..
        })
    ));
    assert!(!out.exists());
    // Only the inputs remain: no temporary files.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
}

// ---------------------------------------------------------------- CLI handlers and fixtures

fn fixture_keys() -> (SigningKey, Keyring) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/test-keys");
    let key = keys::read_secret_key(&dir.join("TEST-ONLY-DO-NOT-USE.key")).unwrap();
    let ring = Keyring::load(&dir.join("TEST-ONLY-DO-NOT-USE.pub")).unwrap();
    (key, ring)
}

#[test]
fn fixture_test_keys_and_cli_handlers() {
    let (key, r) = fixture_keys();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/test-keys");
    // The directory form of the keyring finds the same key.
    assert_eq!(Keyring::load(&dir).unwrap().len(), 1);
    let image = mixed_image(3 * K64 as usize + 1, 40);
    let b = build(&image, &key, K64);

    let info = cli_support::info(&b.path, Some(&r)).unwrap();
    assert!(matches!(
        info.signature,
        cli_support::SignatureStatus::Verified { .. }
    ));
    assert_eq!(info.file_len, info.bundle_len);
    let text = info.to_text();
    assert!(
        text.contains("test-board") && text.contains("verified"),
        "{text}"
    );
    let json = info.to_json(false);
    assert_eq!(json["header"]["image_size"], image.len() as u64);
    assert_eq!(
        json["header"]["image_sha256"],
        hex::encode(Sha256::digest(&image))
    );
    assert_eq!(json["header"]["compression"], "zstd");
    assert_eq!(json["signature"]["status"], "verified");
    assert!(json["header"].get("chunks").is_none());
    assert_eq!(
        info.to_json(true)["header"]["chunks"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    let unverified = cli_support::info(&b.path, None).unwrap();
    assert!(unverified.to_text().contains("NOT CHECKED"));
    let other = ring(&[&generate_signing_key()]);
    assert!(matches!(
        cli_support::info(&b.path, Some(&other)),
        Err(BundleError::UntrustedKey { .. })
    ));

    let report = cli_support::verify(&b.path, &r, 0, &mut |_, _| {}).unwrap();
    assert_eq!(report.image_size, image.len() as u64);
    assert_eq!(report.chunks, 4);
    let mut m = b.bytes.clone();
    let last = m.len() - 1;
    m[last] ^= 0xff;
    fs::write(&b.path, &m).unwrap();
    assert!(cli_support::verify(&b.path, &r, 2, &mut |_, _| {}).is_err());
}

/// Regenerates fixtures/test-keys and the fuzz seed corpus. Run with
/// `ABUPDATE_REGENERATE=1 cargo test --test bundle regenerate -- --ignored`.
#[test]
#[ignore]
fn regenerate_fixtures_and_corpus() {
    if std::env::var_os("ABUPDATE_REGENERATE").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys_dir = root.join("fixtures/test-keys");
    fs::create_dir_all(&keys_dir).unwrap();
    let name = keys_dir.join("TEST-ONLY-DO-NOT-USE");
    if !name.with_extension("key").exists() {
        cli_support::keygen(&name).unwrap();
    }
    let (key, _) = fixture_keys();
    let header_dir = root.join("fuzz/corpus/bundle_header");
    let reader_dir = root.join("fuzz/corpus/bundle_reader");
    fs::create_dir_all(&header_dir).unwrap();
    fs::create_dir_all(&reader_dir).unwrap();
    let seeds = [
        ("one-byte", vec![7u8]),
        ("two-chunks", compressible_image(K64 as usize + 10)),
        ("mixed", mixed_image(3000, 1)),
    ];
    for (name, image) in seeds {
        let b = build(&image, &key, K64);
        let hl = b.header.header_len() as usize;
        fs::write(header_dir.join(name), &b.bytes[..hl]).unwrap();
        if b.bytes.len() < 8192 {
            // The reader target re-signs inputs whose first byte is odd.
            let mut seed = vec![1u8];
            seed.extend_from_slice(&b.bytes);
            fs::write(reader_dir.join(name), seed).unwrap();
        }
    }
}

// ---------------------------------------------------------------- 2 GiB sparse image, memory

const GIB2: u64 = 2 << 30;
const PROBE_ENV: &str = "ABUPDATE_BUNDLE_MEM_PROBE";

fn vm_hwm_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The markers written into the sparse image: (offset, bytes).
fn sparse_markers() -> Vec<(u64, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut v = vec![(0u64, b"start".to_vec()), (GIB2 - 5, b"end!!".to_vec())];
    for _ in 0..20 {
        let off = rng.gen_range(0..GIB2 - 70_000);
        let mut data = vec![0u8; 65_536];
        rng.fill_bytes(&mut data);
        v.push((off, data));
    }
    v
}

/// Runs in a child process (a fresh address space, so VmHWM measures only
/// this step): creates or reads the bundle, prints "HWM <before> <after>" in
/// KiB.
#[test]
#[ignore]
fn child_memory_probe() {
    let Ok(spec) = std::env::var(PROBE_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (mode, image, bundle) = (
        parts.next().unwrap(),
        PathBuf::from(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    let (key, r) = fixture_keys();
    let before = vm_hwm_kib();
    match mode {
        "create" => {
            create_bundle(
                &image,
                &key,
                "2g",
                "sparse",
                4 << 20,
                &bundle,
                &mut |_, _| {},
            )
            .unwrap();
        }
        "read" | "read-parallel" => {
            let mut expected = fs::File::open(&image).unwrap();
            let f = io::BufReader::new(fs::File::open(&bundle).unwrap());
            let mut rd = BundleReader::new(f, &r).unwrap();
            let mut buf = vec![0u8; 4 << 20];
            let mut check = |data: &[u8]| -> io::Result<()> {
                let want = &mut buf[..data.len()];
                expected.read_exact(want)?;
                assert!(want == data, "chunk differs from the image");
                Ok(())
            };
            if mode == "read" {
                while let Some(c) = rd.next_chunk().unwrap() {
                    check(c.data).unwrap();
                }
                println!("BUFFERS {}", rd.buffer_bytes());
            } else {
                rd.read_parallel(2, &mut |c| check(c.data)).unwrap();
            }
        }
        other => panic!("unknown probe mode {other}"),
    }
    println!("HWM {before} {}", vm_hwm_kib());
}

fn run_probe(mode: &str, image: &Path, bundle: &Path) -> (u64, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_memory_probe",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            PROBE_ENV,
            format!("{mode}|{}|{}", image.display(), bundle.display()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{mode} probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("HWM ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no HWM line in {stdout}"));
    let mut it = line.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let (before, after) = (it.next().unwrap(), it.next().unwrap());
    eprintln!("{mode}: VmHWM {before} KiB -> {after} KiB");
    (after.saturating_sub(before), stdout)
}

/// Round trip of a 2 GiB sparse image with 4 MiB chunks; the peak resident
/// memory growth of the writer and of both readers is measured in separate
/// child processes and must stay far below the image size.
#[test]
fn sparse_2gib_round_trip_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("sparse.img");
    let f = fs::File::create(&image).unwrap();
    f.set_len(GIB2).unwrap();
    for (off, data) in sparse_markers() {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data, off).unwrap();
    }
    drop(f);
    let bundle = dir.path().join("sparse.abb");

    let (create_growth, _) = run_probe("create", &image, &bundle);
    let (key, r) = fixture_keys();
    drop(key);
    let header = read_verified_header(&mut fs::File::open(&bundle).unwrap(), &r).unwrap();
    assert_eq!(header.header().image_size, GIB2);
    assert_eq!(header.header().chunk_count(), 512);
    let (read_growth, stdout) = run_probe("read", &image, &bundle);
    let (par_growth, _) = run_probe("read-parallel", &image, &bundle);

    // The sequential reader's own buffers: one compressed frame + one chunk.
    let buffers: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("BUFFERS ").map(|(_, rest)| rest))
        .unwrap()
        .parse()
        .unwrap();
    assert!(buffers <= 2 * (4 << 20) + (1 << 20), "{buffers}");

    // Bounds (KiB) derived from the design, with room for allocator slack:
    // writer: 2*threads+2 slots of (chunk + compressed) + zstd contexts;
    // sequential reader: ~3 chunks; parallel reader: slots like the writer.
    // The image is 2 GiB = 2 097 152 KiB.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let slots = 2 * threads + 2;
    let create_bound = slots * 8 * 1024 + threads * 16 * 1024 + 32 * 1024;
    assert!(
        create_growth < create_bound,
        "writer grew {create_growth} KiB (bound {create_bound})"
    );
    assert!(
        read_growth < 48 * 1024,
        "sequential reader grew {read_growth} KiB"
    );
    let par_bound = 6 * 8 * 1024 + 2 * 8 * 1024 + 32 * 1024;
    assert!(
        par_growth < par_bound,
        "parallel reader grew {par_growth} KiB (bound {par_bound})"
    );
}
