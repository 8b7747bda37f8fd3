//! Unit tests of the header layout (src/bundle/format.rs).

use super::*;

fn sample(key: &SigningKey) -> BundleHeader {
    BundleHeader {
        format_version: FORMAT_VERSION,
        image_version: "1.2.3".into(),
        compatible: "test-board".into(),
        image_size: 3 * MIN_CHUNK_SIZE as u64 + 5,
        image_sha256: [7; 32],
        chunk_size: MIN_CHUNK_SIZE,
        compression: Compression::Zstd,
        signer_key_id: KeyId::of(&key.verifying_key()),
        extensions: vec![Extension {
            tag: 0x0042,
            value: b"hello".to_vec(),
        }],
        chunks: (0..4)
            .map(|i| ChunkEntry {
                compressed_len: 100 + i,
                sha256: [i as u8; 32],
            })
            .collect(),
        payload_offset: None,
    }
}

#[test]
fn header_round_trips() {
    let key = crate::bundle::keys::generate_signing_key();
    let ring = Keyring::from_keys([key.verifying_key()]).unwrap();
    let h = sample(&key);
    let bytes = h.encode_signed(&key).unwrap();
    assert_eq!(bytes.len() as u64, h.header_len());
    assert_eq!(
        header_len_from_prefix(&bytes).unwrap() as u64,
        h.header_len()
    );
    let v = read_verified_header(&mut &bytes[..], &ring).unwrap();
    assert_eq!(v.header(), &h);
    assert_eq!(v.key_id(), h.signer_key_id);
    assert_eq!(h.chunk_len(3), 5);
    assert_eq!(h.chunk_bundle_offset(0).unwrap(), h.header_len());
    assert_eq!(h.chunk_bundle_offset(4).unwrap(), h.bundle_len());
    assert!(h.chunk_bundle_offset(5).is_err());
}

#[test]
fn every_truncation_names_its_section() {
    let key = crate::bundle::keys::generate_signing_key();
    let bytes = sample(&key).encode_signed(&key).unwrap();
    for len in 0..bytes.len() {
        let err = read_unverified_header(&mut &bytes[..len]).unwrap_err();
        assert!(
            matches!(err, BundleError::Truncated { offset, .. } if offset == len as u64),
            "len {len}: {err:?}"
        );
    }
}

#[test]
fn critical_extension_is_refused_and_duplicates_too() {
    assert!(matches!(
        parse_extensions(&[0x02, 0x80, 0, 0]),
        Err(BundleError::UnknownCriticalExtension { tag: 0x8002 })
    ));
    // The kernel part is the one known critical tag (its value is checked with the table).
    assert!(parse_extensions(&[0x01, 0x80, 0, 0]).is_ok());
    assert!(matches!(
        parse_extensions(&[1, 0, 0, 0, 1, 0, 0, 0]),
        Err(BundleError::DuplicateExtension { tag: 1 })
    ));
    assert!(matches!(
        parse_extensions(&[1, 0, 5, 0, 1]),
        Err(BundleError::MalformedExtension { offset: 0, .. })
    ));
    assert_eq!(
        parse_extensions(&[1, 0, 1, 0, 9]).unwrap()[0].value,
        vec![9]
    );
}
