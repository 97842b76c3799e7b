//! Users' ed25519 public keys, and the secret seeds the signing helper
//! reads.
//!
//! A key is written as text in one of two forms, both of its 32 bytes:
//! standard base64 with padding (44 characters, the form tt-host writes)
//! or 64 hexadecimal digits. A [`KeyRing`] maps each user to the keys
//! registered for them (`tt-host key add USER PUBKEY`); a user may have
//! several, and a signature by any of them counts. It serializes as
//! `{"USER": ["BASE64", ...], ...}` so the daemon can keep it in its
//! state directory.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The longest user name a key ring takes, in bytes.
pub const MAX_USER_LEN: usize = 256;

/// What is wrong with a key, a seed or a user name.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "public key '{text}' is neither 44 characters of base64 nor 64 hex digits \
         ({what}); give the key's 32 bytes in one of those forms"
    )]
    Encoding { text: String, what: String },
    #[error(
        "public key '{0}' is not a point on the ed25519 curve; check that it was copied whole"
    )]
    NotAPoint(String),
    #[error(
        "public key '{0}' is a weak (small-order) key, which anyone can sign for; generate another"
    )]
    Weak(String),
    #[error(
        "secret key seed{origin} is not 32 bytes in base64 or hex ({what}); \
         write the seed's 32 bytes as base64 on one line"
    )]
    Seed { origin: String, what: String },
    #[error("{path}: {err}")]
    Io {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "user name '{0}' is empty, longer than {MAX_USER_LEN} bytes, or holds spaces or \
         control characters; use a plain name"
    )]
    BadUser(String),
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Decode 32 bytes given as base64 (standard, padded) or 64 hex digits.
fn decode_32(text: &str) -> Result<[u8; 32], String> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        decode_hex(text).ok_or_else(|| "bad hex".to_string())?
    } else {
        STANDARD
            .decode(text)
            .map_err(|e| format!("bad base64: {e}"))?
    };
    let len = bytes.len();
    bytes.try_into().map_err(|_| format!("{len} bytes, not 32"))
}

/// Parse a public key written as base64 or hex (surrounding whitespace
/// is ignored). Points off the curve and weak keys are refused.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let text = text.trim();
    let shown: String = text.chars().take(100).collect();
    let bytes = decode_32(text).map_err(|what| KeyError::Encoding {
        text: shown.clone(),
        what,
    })?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint(shown.clone()))?;
    if key.is_weak() {
        return Err(KeyError::Weak(shown));
    }
    Ok(key)
}

/// A public key in the form tt-host writes: standard base64, padded.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Parse a secret key seed (32 bytes, base64 or hex; surrounding
/// whitespace is ignored). The seed itself never appears in an error.
pub fn parse_secret_seed(text: &str) -> Result<SigningKey, KeyError> {
    let bytes = decode_32(text.trim()).map_err(|what| KeyError::Seed {
        origin: String::new(),
        what,
    })?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Read a secret key seed file: one line, the seed's 32 bytes in base64
/// (or hex).
pub fn read_secret_seed_file(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|err| KeyError::Io {
        path: path.display().to_string(),
        err,
    })?;
    parse_secret_seed(&text).map_err(|e| match e {
        KeyError::Seed { what, .. } => KeyError::Seed {
            origin: format!(" in {}", path.display()),
            what,
        },
        other => other,
    })
}

/// A secret seed written the way [`read_secret_seed_file`] reads it.
pub fn encode_secret_seed(key: &SigningKey) -> String {
    STANDARD.encode(key.to_bytes())
}

/// Check a user name: non-empty, at most [`MAX_USER_LEN`] bytes, no
/// whitespace or control characters.
pub fn check_user(user: &str) -> Result<(), KeyError> {
    if user.is_empty()
        || user.len() > MAX_USER_LEN
        || user.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        let shown: String = user.chars().take(100).collect();
        return Err(KeyError::BadUser(shown.escape_debug().to_string()));
    }
    Ok(())
}

/// Each user's registered public keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, Vec<String>>",
    into = "BTreeMap<String, Vec<String>>"
)]
pub struct KeyRing {
    users: BTreeMap<String, Vec<VerifyingKey>>,
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> KeyRing {
        KeyRing::default()
    }

    /// Register `key` for `user`. Returns false if it was already
    /// registered for them (nothing changes).
    pub fn add(&mut self, user: &str, key: VerifyingKey) -> Result<bool, KeyError> {
        check_user(user)?;
        let keys = self.users.entry(user.to_string()).or_default();
        if keys.contains(&key) {
            return Ok(false);
        }
        keys.push(key);
        Ok(true)
    }

    /// Unregister `key` for `user`. Returns false if it was not
    /// registered for them.
    pub fn remove(&mut self, user: &str, key: &VerifyingKey) -> bool {
        let Some(keys) = self.users.get_mut(user) else {
            return false;
        };
        let before = keys.len();
        keys.retain(|k| k != key);
        let removed = keys.len() != before;
        if keys.is_empty() {
            self.users.remove(user);
        }
        removed
    }

    /// The keys registered for `user`, in the order they were added
    /// (empty if none).
    pub fn keys(&self, user: &str) -> &[VerifyingKey] {
        self.users.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The users with at least one key, in name order.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

impl TryFrom<BTreeMap<String, Vec<String>>> for KeyRing {
    type Error = KeyError;

    fn try_from(map: BTreeMap<String, Vec<String>>) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::new();
        for (user, keys) in map {
            check_user(&user)?;
            for text in keys {
                ring.add(&user, parse_public_key(&text)?)?;
            }
        }
        Ok(ring)
    }
}

impl From<KeyRing> for BTreeMap<String, Vec<String>> {
    fn from(ring: KeyRing) -> Self {
        ring.users
            .into_iter()
            .map(|(user, keys)| (user, keys.iter().map(encode_public_key).collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_public_key_parses_from_base64_and_hex_and_round_trips() {
        let public = key(1).verifying_key();
        let b64 = encode_public_key(&public);
        assert_eq!(b64.len(), 44);
        assert_eq!(parse_public_key(&format!("  {b64}\n")).unwrap(), public);
        let hex: String = public
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(parse_public_key(&hex).unwrap(), public);
        assert_eq!(parse_public_key(&hex.to_uppercase()).unwrap(), public);
    }

    #[test]
    fn bad_public_keys_are_refused_with_the_reason() {
        let e = parse_public_key("not base64!").unwrap_err().to_string();
        assert!(
            e.contains("'not base64!'") && e.contains("bad base64"),
            "{e}"
        );
        let short = STANDARD.encode([7u8; 31]);
        let e = parse_public_key(&short).unwrap_err().to_string();
        assert!(e.contains("31 bytes, not 32"), "{e}");
        let e = parse_public_key(&"0".repeat(63)).unwrap_err().to_string();
        assert!(e.contains("bad base64"), "{e}");
        // The identity point is on the curve but of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let e = parse_public_key(&STANDARD.encode(identity))
            .unwrap_err()
            .to_string();
        assert!(e.contains("weak"), "{e}");
        // y = 2 does not decompress to a curve point.
        let mut off = [0u8; 32];
        off[0] = 2;
        let e = parse_public_key(&STANDARD.encode(off))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a point"), "{e}");
    }

    #[test]
    fn a_seed_file_gives_the_signing_key_and_errors_hide_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.key");
        std::fs::write(&path, format!("{}\n", encode_secret_seed(&key(9)))).unwrap();
        let k = read_secret_seed_file(&path).unwrap();
        assert_eq!(k.verifying_key(), key(9).verifying_key());

        let secret = STANDARD.encode([5u8; 16]);
        std::fs::write(&path, &secret).unwrap();
        let e = read_secret_seed_file(&path).unwrap_err().to_string();
        assert!(e.contains("alice.key") && e.contains("16 bytes"), "{e}");
        assert!(!e.contains(&secret), "{e}");

        let e = read_secret_seed_file(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }

    #[test]
    fn a_ring_holds_several_keys_per_user_and_survives_serde() {
        let mut ring = KeyRing::new();
        assert!(ring.add("alice", key(1).verifying_key()).unwrap());
        assert!(ring.add("alice", key(2).verifying_key()).unwrap());
        assert!(!ring.add("alice", key(1).verifying_key()).unwrap());
        assert!(ring.add("bob", key(3).verifying_key()).unwrap());
        assert_eq!(ring.keys("alice").len(), 2);
        assert!(ring.keys("carol").is_empty());
        assert!(ring.add("bad name", key(4).verifying_key()).is_err());
        assert!(ring.add("", key(4).verifying_key()).is_err());

        let json = serde_json::to_string(&ring).unwrap();
        let back: KeyRing = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ring);

        assert!(ring.remove("bob", &key(3).verifying_key()));
        assert!(!ring.remove("bob", &key(3).verifying_key()));
        assert_eq!(ring.users().collect::<Vec<_>>(), ["alice"]);

        let e = serde_json::from_str::<KeyRing>(r#"{"alice":["AAAA"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'AAAA'"), "{e}");
    }
}
