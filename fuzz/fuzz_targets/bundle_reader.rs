//! Fuzzes the streaming reader on whole bundles.
//!
//! Input: one mode byte, then the bundle. Random mutations almost never keep
//! a valid signature, so with bit 0 of the mode set the target re-signs the
//! header with the test key (key id at offset 64, signature = the 64 bytes
//! before `header_len`, which is at offset 12; see docs/bundle-format.md).
//! That lets the fuzzer reach the chunk table checks, the bounded zstd
//! decoding and the end-of-bundle checks. Bit 1 selects the parallel reader.
//! Bit 2 (sequential reader only) skips runs of chunks as an adaptive install
//! does ([`BundleReader::skip_chunks`]), the run lengths taken from the
//! mode's upper bits.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use abupdate::bundle::keys::{parse_secret_key, KeyId};
use abupdate::bundle::{BundleReader, Keyring};
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

fn test_key() -> &'static (SigningKey, Keyring) {
    static KEY: OnceLock<(SigningKey, Keyring)> = OnceLock::new();
    KEY.get_or_init(|| {
        let text = include_str!("../../fixtures/test-keys/TEST-ONLY-DO-NOT-USE.key");
        let key = parse_secret_key(Path::new("TEST-ONLY-DO-NOT-USE.key"), text).unwrap();
        let ring = Keyring::from_keys([key.verifying_key()]).unwrap();
        (key, ring)
    })
}

fn resign(bundle: &mut [u8], key: &SigningKey) {
    if bundle.len() < 80 {
        return;
    }
    let header_len = u32::from_le_bytes([bundle[12], bundle[13], bundle[14], bundle[15]]) as usize;
    if header_len < 80 + 64 || header_len > bundle.len() {
        return;
    }
    bundle[64..72].copy_from_slice(&KeyId::of(&key.verifying_key()).0);
    let signature = key.sign(&bundle[..header_len - 64]);
    bundle[header_len - 64..header_len].copy_from_slice(&signature.to_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (key, ring) = test_key();
    let mut bundle = rest.to_vec();
    if mode & 1 == 1 {
        resign(&mut bundle, key);
    }
    let Ok(mut reader) = BundleReader::new(&bundle[..], ring) else {
        return;
    };
    let image_size = reader.header().image_size;
    let mut produced = 0u64;
    if mode & 4 == 4 {
        // Alternate: skip a run of (mode >> 3) % 4 + 1 chunks, read one.
        let run = u32::from((mode >> 3) % 4 + 1);
        let chunk_size = u64::from(reader.header().chunk_size);
        loop {
            let left = reader.header().chunk_count() - reader.next_index();
            if left == 0 {
                break;
            }
            let skip = run.min(left);
            if reader.skip_chunks(skip, None).is_err() {
                break;
            }
            produced = u64::from(reader.next_index()) * chunk_size;
            match reader.next_chunk() {
                Ok(Some(chunk)) => {
                    assert_eq!(chunk.image_offset, produced);
                    produced += chunk.data.len() as u64;
                }
                _ => break,
            }
        }
        produced = produced.min(image_size);
    } else if mode & 2 == 0 {
        while let Ok(Some(chunk)) = reader.next_chunk() {
            assert_eq!(chunk.image_offset, produced);
            produced += chunk.data.len() as u64;
        }
    } else {
        let _ = reader.read_parallel(2, &mut |chunk| {
            assert_eq!(chunk.image_offset, produced);
            produced += chunk.data.len() as u64;
            Ok(())
        });
    }
    // Verified output never exceeds the signed image size.
    assert!(produced <= image_size);
});
