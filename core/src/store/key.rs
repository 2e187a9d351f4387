//! Encryption at rest: a 256-bit key for a replica's SQLite file (SQLCipher, behind the
//! `encryption` cargo feature). Without the key the file is unreadable: SQLite sees no
//! database, and none of its pages (documents, changes, the outbox) is in the clear.
//!
//! The key lives outside the store: in a file of its own (`StoreKey::load`, 64 hex
//! characters; keep it on another medium than the store, or have the platform's keystore
//! write it there at boot), or handed over by the app (the mobile library takes the bytes from
//! the Android Keystore or the iOS Keychain).

use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A store's encryption key. Its bytes are wiped from memory when it is dropped, and it never
/// prints them.
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::StoreKey {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl StoreKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StoreKey(Zeroizing::new(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        StoreKey::from_bytes(rand::random())
    }

    /// Reads a key file: 64 hex characters (a final newline is allowed).
    pub fn load(path: &Path) -> Result<Self> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| key_error(path, format!("cannot read it: {e}")))?,
        );
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| {
            key_error(
                path,
                "is not 64 hex characters: write one with `syncline-edge init --db-key-file` \
                 or `openssl rand -hex 32`",
            )
        })?;
        Ok(StoreKey::from_bytes(bytes))
    }

    /// Writes the key to a new file (mode 0600), whole or not at all. An existing file is
    /// never replaced: the store it opens would become unreadable.
    pub fn save_new(&self, path: &Path) -> Result<()> {
        if path.exists() {
            return Err(key_error(
                path,
                "exists already: a key file is never replaced",
            ));
        }
        let hex = Zeroizing::new(format!("{}\n", hex::encode(*self.0)));
        crate::identity::write_private(path, hex.as_bytes())
            .map_err(|e| key_error(path, format!("cannot write it: {e}")))
    }

    /// `PRAGMA key` takes a raw key as `x'HEX'`: no key derivation, the key is the key.
    #[cfg(feature = "encryption")]
    pub(crate) fn pragma_value(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("x'{}'", hex::encode(*self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::replica::{Replica, ReplicaOptions};

    #[cfg(feature = "encryption")]
    #[test]
    fn an_encrypted_store_is_unreadable_without_its_key_and_opens_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.db");
        let id = Identity::generate();
        let key = StoreKey::generate();
        let keyed = |k: Option<StoreKey>| ReplicaOptions {
            store_key: k,
            ..ReplicaOptions::default()
        };
        let doc = crate::DocId::new("secret/doc").unwrap();
        let marker = "plaintext-marker-5f3a9c";
        {
            let mut r = Replica::open(&path, id.clone(), keyed(Some(key.clone()))).unwrap();
            let ops = crate::ops::Op::list_from_json(&format!(
                r#"{{"ops":[{{"op":"put","path":["note"],"value":"{marker}"}}]}}"#
            ))
            .unwrap();
            r.change(&doc, &ops).unwrap();
            // Still open: the WAL holds the change too; neither file shows it.
            for f in ["replica.db", "replica.db-wal"] {
                if let Ok(bytes) = std::fs::read(dir.path().join(f)) {
                    assert!(
                        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                        "{f} holds the plaintext"
                    );
                }
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()));
        assert!(
            !bytes.starts_with(b"SQLite format 3"),
            "not even the header is clear"
        );
        let e = Replica::open(&path, id.clone(), keyed(None)).unwrap_err();
        assert!(
            matches!(e, Error::StoreKey { .. }) && e.to_string().contains("encrypted"),
            "{e}"
        );
        let e = Replica::open(&path, id.clone(), keyed(Some(StoreKey::generate()))).unwrap_err();
        assert!(e.to_string().contains("does not open"), "{e}");
        let mut r = Replica::open(&path, id, keyed(Some(key))).unwrap();
        assert_eq!(r.json(&doc).unwrap()["note"], marker);
    }

    #[cfg(not(feature = "encryption"))]
    #[test]
    fn a_build_without_encryption_refuses_a_key_rather_than_store_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let options = ReplicaOptions {
            store_key: Some(StoreKey::generate()),
            ..ReplicaOptions::default()
        };
        let e = Replica::open(&dir.path().join("r.db"), Identity::generate(), options).unwrap_err();
        assert!(e.to_string().contains("encryption` feature"), "{e}");
    }

    #[test]
    fn a_key_file_round_trips_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.key");
        let k = StoreKey::generate();
        k.save_new(&path).unwrap();
        assert_eq!(*StoreKey::load(&path).unwrap().0, *k.0);
        assert!(k.save_new(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        assert!(
            StoreKey::load(&path)
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
        assert_eq!(format!("{k:?}"), "StoreKey(..)");
    }
}
