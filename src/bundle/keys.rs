//! Ed25519 signing keys, their file formats, and keyrings.
//!
//! Key files are one line of text (see docs/bundle-format.md, "Key files"):
//!
//! ```text
//! abupdate-ed25519-secret-v1 <64 hex digits: 32-byte seed> [comment]
//! abupdate-ed25519-public-v1 <64 hex digits: 32-byte public key> [comment]
//! ```
//!
//! Text rather than PEM/PKCS#8 so that a key can be inspected, copied into a
//! provisioning script, and diffed without a parser; the type tag makes a
//! secret key pasted into a keyring directory an error rather than a trusted key.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use super::error::KeyError;

/// First token of a secret key file.
pub const SECRET_KEY_TAG: &str = "abupdate-ed25519-secret-v1";
/// First token of a public key file.
pub const PUBLIC_KEY_TAG: &str = "abupdate-ed25519-public-v1";
/// Largest key file accepted; a key file is one short line, so anything
/// bigger is not a key file and is not read into memory.
const MAX_KEY_FILE_LEN: u64 = 4096;

/// Short identifier of a public key: the first 8 bytes of SHA-256 of the
/// 32-byte public key. Printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// Computes the id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        // One definition of the id, shared with the boot loader's header check.
        KeyId(abupdate_core::signed_header::key_id(key.as_bytes()))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Generates a new signing key from the operating system's RNG.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// Renders the secret key file contents (one line, newline-terminated).
///
/// `comment` is stored after the key for humans; it must be one line.
pub fn encode_secret_key(key: &SigningKey, comment: &str) -> String {
    encode_line(SECRET_KEY_TAG, key.as_bytes(), comment)
}

/// Renders the public key file contents (one line, newline-terminated).
pub fn encode_public_key(key: &VerifyingKey, comment: &str) -> String {
    encode_line(PUBLIC_KEY_TAG, key.as_bytes(), comment)
}

fn encode_line(tag: &str, bytes: &[u8; 32], comment: &str) -> String {
    // Control characters would break the one-line format; drop them rather
    // than fail, the comment is informational only.
    let comment: String = comment.chars().filter(|c| !c.is_control()).collect();
    let comment = comment.trim();
    if comment.is_empty() {
        format!("{tag} {}\n", hex::encode(bytes))
    } else {
        format!("{tag} {} {comment}\n", hex::encode(bytes))
    }
}

/// Writes a secret key file, created with mode 0600 and refusing to
/// overwrite an existing file.
///
/// The mode is given at `open(2)` time: a chmod after creation would leave a
/// window in which the key is readable by others under the default umask.
pub fn write_secret_key(path: &Path, key: &SigningKey, comment: &str) -> Result<(), KeyError> {
    write_new_file(path, encode_secret_key(key, comment).as_bytes(), 0o600)
}

/// Writes a public key file (mode 0644), refusing to overwrite.
pub fn write_public_key(path: &Path, key: &VerifyingKey, comment: &str) -> Result<(), KeyError> {
    write_new_file(path, encode_public_key(key, comment).as_bytes(), 0o644)
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(e)
            }
        })?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(())
}

/// Reads a secret key file.
pub fn read_secret_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_key_file(path)?;
    parse_secret_key(path, &text)
}

/// Parses the text of a secret key file; `path` is only used in errors.
pub fn parse_secret_key(path: &Path, text: &str) -> Result<SigningKey, KeyError> {
    let bytes = parse_line(path, text, SECRET_KEY_TAG)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Reads a public key file, refusing points that are not on the curve and
/// weak (small-order) keys, under which signatures would prove nothing.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_key_file(path)?;
    parse_public_key(path, &text)
}

/// Parses the text of a public key file; `path` is only used in errors.
pub fn parse_public_key(path: &Path, text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = parse_line(path, text, PUBLIC_KEY_TAG)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::InvalidPublicKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if key.is_weak() {
        return Err(KeyError::InvalidPublicKey {
            path: path.to_path_buf(),
            reason: "weak (small-order) key".into(),
        });
    }
    Ok(key)
}

fn read_key_file(path: &Path) -> Result<String, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "file is {} bytes; a key file is one line of at most {MAX_KEY_FILE_LEN}",
                meta.len()
            ),
        });
    }
    let bytes = fs::read(path).map_err(io_err)?;
    String::from_utf8(bytes).map_err(|_| KeyError::Format {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

fn parse_line(path: &Path, text: &str, want_tag: &str) -> Result<[u8; 32], KeyError> {
    let format_err = |reason: String| KeyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.contains('\n') || line.contains('\r') {
        return Err(format_err("must be exactly one line".into()));
    }
    let mut parts = line.splitn(3, ' ');
    let tag = parts.next().unwrap_or("");
    if tag != want_tag {
        let hint = if tag == SECRET_KEY_TAG || tag == PUBLIC_KEY_TAG {
            format!(" (this is a {tag} file)")
        } else {
            String::new()
        };
        return Err(format_err(format!(
            "expected first word {want_tag:?}, found {:?}{hint}",
            truncate_for_error(tag)
        )));
    }
    let hex_part = parts.next().unwrap_or("");
    if hex_part.len() != 64 {
        return Err(format_err(format!(
            "key must be 64 hex digits, found {} characters",
            hex_part.len()
        )));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut bytes)
        .map_err(|e| format_err(format!("key is not valid hex: {e}")))?;
    Ok(bytes)
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(40).collect()
}

/// One trusted public key and where it came from.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// The key id (first 8 bytes of SHA-256 of the key).
    pub id: KeyId,
    /// The public key.
    pub key: VerifyingKey,
    /// The file it was loaded from (empty when built in memory).
    pub source: PathBuf,
}

/// The set of public keys a bundle may be signed with.
///
/// Holding several keys allows rotation: devices trust the old and the new
/// key while bundles switch over. A bundle names its signer's [`KeyId`], so
/// verification costs one signature check whatever the keyring's size.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<KeyId, TrustedKey>,
}

impl Keyring {
    /// An empty keyring (trusts nothing).
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Builds a keyring from keys in memory.
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> Result<Keyring, KeyError> {
        let mut ring = Keyring::new();
        for key in keys {
            ring.add(key, PathBuf::new())?;
        }
        Ok(ring)
    }

    /// Loads a keyring from a public key file, or from every `*.pub` file
    /// directly inside a directory (sorted by name; other files are ignored,
    /// so a README can live there). A malformed `*.pub` file is an error
    /// rather than skipped: silently losing a key would surface much later as
    /// an untrusted-key failure on a device.
    pub fn load(path: &Path) -> Result<Keyring, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mut ring = Keyring::new();
        if !meta.is_dir() {
            ring.add(read_public_key(path)?, path.to_path_buf())?;
            return Ok(ring);
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let p = entry.path();
            // Every `*.pub` entry counts, whatever it is: a dangling symlink or a directory
            // named `x.pub` then fails to read with its path, instead of vanishing.
            if p.extension().is_some_and(|e| e == "pub") {
                files.push(p);
            }
        }
        files.sort();
        for file in files {
            let key = read_public_key(&file)?;
            ring.add(key, file)?;
        }
        if ring.is_empty() {
            return Err(KeyError::NoKeys {
                path: path.to_path_buf(),
            });
        }
        Ok(ring)
    }

    /// Adds a key. The same key twice is kept once; two different keys with
    /// the same id are refused.
    pub fn add(&mut self, key: VerifyingKey, source: PathBuf) -> Result<KeyId, KeyError> {
        let id = KeyId::of(&key);
        if let Some(existing) = self.keys.get(&id) {
            if existing.key == key {
                return Ok(id);
            }
            return Err(KeyError::DuplicateKeyId {
                key_id: id,
                first: existing.source.clone(),
                second: source,
            });
        }
        self.keys.insert(id, TrustedKey { id, key, source });
        Ok(id)
    }

    /// Looks a key up by id.
    pub fn get(&self, id: &KeyId) -> Option<&TrustedKey> {
        self.keys.get(id)
    }

    /// The ids of all keys, sorted.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the keyring trusts no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_files_round_trip_and_secret_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_signing_key();
        let sk = dir.path().join("k.key");
        let pk = dir.path().join("k.pub");
        write_secret_key(&sk, &key, "test key").unwrap();
        write_public_key(&pk, &key.verifying_key(), "test key").unwrap();
        let mode = fs::metadata(&sk).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret_key(&sk).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_public_key(&pk).unwrap(), key.verifying_key());
        assert!(matches!(
            write_secret_key(&sk, &key, ""),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn wrong_tag_and_bad_hex_are_refused() {
        let key = generate_signing_key();
        let p = Path::new("x.pub");
        let secret_text = encode_secret_key(&key, "");
        assert!(matches!(
            parse_public_key(p, &secret_text),
            Err(KeyError::Format { .. })
        ));
        let bad = format!("{PUBLIC_KEY_TAG} {}\n", "zz".repeat(32));
        assert!(matches!(
            parse_public_key(p, &bad),
            Err(KeyError::Format { .. })
        ));
        let two_lines = format!("{}\nextra\n", encode_public_key(&key.verifying_key(), ""));
        assert!(matches!(
            parse_public_key(p, &two_lines),
            Err(KeyError::Format { .. })
        ));
        // The identity point is a weak key: every signature would "verify".
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = format!("{PUBLIC_KEY_TAG} {}\n", hex::encode(identity));
        assert!(matches!(
            parse_public_key(p, &weak),
            Err(KeyError::InvalidPublicKey { .. })
        ));
    }

    #[test]
    fn keyring_from_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = generate_signing_key();
        let b = generate_signing_key();
        write_public_key(&dir.path().join("a.pub"), &a.verifying_key(), "a").unwrap();
        {
            // A dangling `*.pub` symlink or a directory named `*.pub` is an error naming it.
            let odd = tempfile::tempdir().unwrap();
            write_public_key(&odd.path().join("a.pub"), &a.verifying_key(), "a").unwrap();
            std::os::unix::fs::symlink("/nonexistent/k.pub", odd.path().join("gone.pub")).unwrap();
            let err = Keyring::load(odd.path()).unwrap_err().to_string();
            assert!(err.contains("gone.pub"), "{err}");
            std::fs::remove_file(odd.path().join("gone.pub")).unwrap();
            std::fs::create_dir(odd.path().join("x.pub")).unwrap();
            let err = Keyring::load(odd.path()).unwrap_err().to_string();
            assert!(err.contains("x.pub"), "{err}");
        }
        write_public_key(&dir.path().join("b.pub"), &b.verifying_key(), "b").unwrap();
        fs::write(dir.path().join("README"), "not a key").unwrap();
        let ring = Keyring::load(dir.path()).unwrap();
        assert_eq!(ring.len(), 2);
        assert!(ring.get(&KeyId::of(&a.verifying_key())).is_some());
        assert!(ring.get(&KeyId::of(&b.verifying_key())).is_some());

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Keyring::load(empty.path()),
            Err(KeyError::NoKeys { .. })
        ));
    }
}
