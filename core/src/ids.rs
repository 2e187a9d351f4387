//! Newtypes for the names that cross the wire: documents, peers, changes, cursors.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DocIdError, Error};

/// Maximum length of a document id, in bytes.
pub const MAX_DOC_ID_LEN: usize = 256;

/// The name of a document: a `/`-separated path such as `sites/berlin/inventory`.
///
/// Only [`DocId::new`] builds one, so every `DocId` in the program is valid: 1 to
/// [`MAX_DOC_ID_LEN`] bytes, segments of ASCII letters, digits, `-`, `_`, `.`, `~`, `:` or `@`,
/// no empty segment, no `.` or `..` segment. The prefix structure is what grants and
/// subscriptions match on.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DocId(String);

impl DocId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        validate_path(&id, false).map_err(|reason| Error::InvalidDocId {
            id: id.clone(),
            reason,
        })?;
        Ok(DocId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this document falls under `prefix` (`""` matches every document).
    pub fn matches(&self, prefix: &DocPrefix) -> bool {
        self.0.starts_with(prefix.as_str())
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DocId::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({:?})", self.0)
    }
}

/// A document-id prefix, as used by subscriptions and grants: `""` (everything), `sites/`,
/// or `sites/berlin/inventory` (which also matches `sites/berlin/inventory2`; end it with `/`
/// to match a folder only).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DocPrefix(String);

impl DocPrefix {
    /// Validates `prefix`: empty, or the characters of a [`DocId`], possibly ending in `/`.
    pub fn new(prefix: impl Into<String>) -> Result<Self, Error> {
        let prefix = prefix.into();
        if !prefix.is_empty() {
            validate_path(&prefix, true).map_err(|reason| Error::InvalidDocId {
                id: prefix.clone(),
                reason,
            })?;
        }
        Ok(DocPrefix(prefix))
    }

    /// The prefix that matches every document.
    pub fn all() -> Self {
        DocPrefix(String::new())
    }

    /// The prefix as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DocPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DocPrefix::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DocPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocPrefix({:?})", self.0)
    }
}

fn validate_path(s: &str, trailing_slash_ok: bool) -> Result<(), DocIdError> {
    if s.is_empty() {
        return Err(DocIdError::Empty);
    }
    if s.len() > MAX_DOC_ID_LEN {
        return Err(DocIdError::TooLong { len: s.len() });
    }
    let body = if trailing_slash_ok {
        s.strip_suffix('/').unwrap_or(s)
    } else {
        s
    };
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err(DocIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(DocIdError::DotSegment);
        }
        if let Some(c) = segment.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | ':' | '@'))
        }) {
            return Err(DocIdError::BadChar(c));
        }
    }
    Ok(())
}

/// A replica's identity as others see it: its ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub(crate) [u8; 32]);

impl PeerId {
    /// Wraps raw public-key bytes (not checked to be a valid curve point: see
    /// [`PeerId::verifying_key`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PeerId(bytes)
    }

    /// Parses the 64-character hex form printed by [`fmt::Display`].
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| Error::InvalidPeerId {
            input: s.chars().take(80).collect(),
        })?;
        Ok(PeerId(out))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The ed25519 key, or `None` if the bytes are not a valid public key.
    ///
    /// Decompressing a key costs about a quarter of a signature check, and a live change is
    /// checked by its author's key at the hub and at every replica: each thread keeps up to
    /// `KEY_CACHE` keys it decompressed, and starts over when that is full (so more active
    /// authors than that on one thread cost speed, nothing else); invalid keys are not kept.
    pub fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        thread_local! {
            static KEYS: std::cell::RefCell<std::collections::HashMap<[u8; 32], ed25519_dalek::VerifyingKey>> =
                std::cell::RefCell::default();
        }
        // `try_with`: a thread tearing down its locals decompresses without the cache.
        let cached = KEYS
            .try_with(|k| k.borrow().get(&self.0).copied())
            .ok()
            .flatten();
        if cached.is_some() {
            return cached;
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0).ok()?;
        let _ = KEYS.try_with(|k| {
            let mut k = k.borrow_mut();
            if k.len() >= KEY_CACHE {
                k.clear();
            }
            k.insert(self.0, key);
        });
        Some(key)
    }
}

/// Keys a thread keeps decompressed (see [`PeerId::verifying_key`]): about 230 bytes each.
const KEY_CACHE: usize = 256;

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", &hex::encode(self.0)[..12])
    }
}

/// The hash of one Automerge change (SHA-256 over its bytes, as Automerge computes it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChangeHash(pub [u8; 32]);

impl ChangeHash {
    /// Parses a 64-character hex hash.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChangeHash(out))
    }
}

impl From<automerge::ChangeHash> for ChangeHash {
    fn from(h: automerge::ChangeHash) -> Self {
        ChangeHash(h.0)
    }
}

impl From<ChangeHash> for automerge::ChangeHash {
    fn from(h: ChangeHash) -> Self {
        automerge::ChangeHash(h.0)
    }
}

impl fmt::Display for ChangeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChangeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChangeHash({})", &hex::encode(self.0)[..12])
    }
}

/// A hub's position in its change log: every change a hub stores gets the next number.
/// Meaningful only together with the hub's [`Epoch`].
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize,
)]
pub struct Cursor(pub u64);

/// The identity of one hub log. A cursor from another epoch (another hub, or a hub restored
/// from a backup) means nothing, and the replica falls back to reconciling by heads.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Epoch(pub [u8; 16]);

impl Epoch {
    /// A fresh random epoch.
    pub fn random() -> Self {
        Epoch(rand::random())
    }

    /// The epoch of "no hub seen yet".
    pub fn none() -> Self {
        Epoch([0; 16])
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_ids_are_validated() {
        for ok in ["a", "sites/berlin/inventory", "x-1_y.z~w:v@u", "A/B9"] {
            assert!(DocId::new(ok).is_ok(), "{ok}");
        }
        let cases: &[(&str, DocIdError)] = &[
            ("", DocIdError::Empty),
            ("/a", DocIdError::EmptySegment),
            ("a/", DocIdError::EmptySegment),
            ("a//b", DocIdError::EmptySegment),
            ("a/../b", DocIdError::DotSegment),
            ("a/./b", DocIdError::DotSegment),
            ("a b", DocIdError::BadChar(' ')),
            ("caf\u{e9}", DocIdError::BadChar('\u{e9}')),
            ("a\0", DocIdError::BadChar('\0')),
        ];
        for (bad, why) in cases {
            match DocId::new(*bad) {
                Err(Error::InvalidDocId { reason, .. }) => assert_eq!(&reason, why, "{bad:?}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let long = "a".repeat(MAX_DOC_ID_LEN + 1);
        assert!(matches!(
            DocId::new(long),
            Err(Error::InvalidDocId {
                reason: DocIdError::TooLong { .. },
                ..
            })
        ));
    }

    #[test]
    fn prefixes_match_documents() {
        let d = DocId::new("sites/berlin/inventory").unwrap();
        assert!(d.matches(&DocPrefix::all()));
        assert!(d.matches(&DocPrefix::new("sites/").unwrap()));
        assert!(d.matches(&DocPrefix::new("sites/berlin/inventory").unwrap()));
        assert!(!d.matches(&DocPrefix::new("sites/paris/").unwrap()));
        assert!(DocPrefix::new("a//").is_err());
    }

    #[test]
    fn verifying_keys_are_the_same_from_the_cache_past_its_bound_and_invalid_ones_stay_invalid() {
        let ids: Vec<crate::identity::Identity> = (0..KEY_CACHE + 10)
            .map(|i: usize| {
                let mut seed = [0x5a; 32];
                seed[..8].copy_from_slice(&i.to_le_bytes());
                crate::identity::Identity::from_seed(seed)
            })
            .collect();
        for _ in 0..2 {
            for id in &ids {
                let key = id.peer_id().verifying_key().unwrap();
                assert_eq!(PeerId(key.to_bytes()), id.peer_id());
            }
        }
        let invalid = (0..=255u8)
            .map(|b| PeerId([b; 32]))
            .find(|p| ed25519_dalek::VerifyingKey::from_bytes(&p.0).is_err())
            .unwrap();
        assert!(invalid.verifying_key().is_none());
        assert!(invalid.verifying_key().is_none());
    }

    #[test]
    fn peer_id_hex_round_trips() {
        let p = PeerId([7; 32]);
        assert_eq!(PeerId::from_hex(&p.to_string()).unwrap(), p);
        assert!(matches!(
            PeerId::from_hex("zz"),
            Err(Error::InvalidPeerId { .. })
        ));
    }
}
