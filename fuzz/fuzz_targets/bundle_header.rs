//! Fuzzes header parsing: arbitrary bytes as the start of a bundle.
//!
//! Must never panic or allocate beyond the format's limits; a header that
//! parses must re-encode to a header that parses back to the same value.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use abupdate::bundle::format::header_len_from_prefix;
use abupdate::bundle::keys::{parse_secret_key, KeyId};
use abupdate::bundle::{read_unverified_header, read_verified_header, Keyring};
use ed25519_dalek::SigningKey;
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

fuzz_target!(|data: &[u8]| {
    let (key, ring) = test_key();
    let _ = header_len_from_prefix(data);
    let _ = read_verified_header(&mut &data[..], ring);
    if let Ok(mut header) = read_unverified_header(&mut &data[..]) {
        assert!(header.header_len() <= data.len() as u64);
        // Re-encoding (signed by the test key) must round-trip exactly.
        header.signer_key_id = KeyId::of(&key.verifying_key());
        let encoded = header
            .encode_signed(key)
            .expect("parsed header must encode");
        let again =
            read_verified_header(&mut &encoded[..], ring).expect("re-encoded header must verify");
        assert_eq!(again.header(), &header);
    }
});
