//! The grants CLI's inputs and outputs. Grants live in the hub's store (`hub.db`); the CLI
//! writes them there directly (SQLite WAL lets it while the hub runs) and each change bumps
//! the store's grants version, which a running hub polls.

use std::fmt;
use std::str::FromStr;

use syncline_core::hub::Grant;
use syncline_core::{DocPrefix, PeerId};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Receive the documents.
    Read,
    /// Author changes to them.
    Write,
    /// Both.
    ReadWrite,
    /// A peer hub: read, write, and relay other authors' changes (it checked their rights).
    Hub,
}

impl Mode {
    /// The mode of a stored grant (`None` for a grant that allows nothing).
    pub fn of(grant: &Grant) -> Option<Self> {
        match (grant.read, grant.write, grant.relay) {
            (true, true, true) => Some(Mode::Hub),
            (true, true, false) => Some(Mode::ReadWrite),
            (true, false, false) => Some(Mode::Read),
            (false, true, false) => Some(Mode::Write),
            _ => None,
        }
    }

    /// `(read, write, relay)`.
    pub fn rights(self) -> (bool, bool, bool) {
        match self {
            Mode::Read => (true, false, false),
            Mode::Write => (false, true, false),
            Mode::ReadWrite => (true, true, false),
            Mode::Hub => (true, true, true),
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" | "r" => Ok(Mode::Read),
            "write" | "w" => Ok(Mode::Write),
            "rw" | "read-write" => Ok(Mode::ReadWrite),
            "hub" => Ok(Mode::Hub),
            _ => Err(format!("{s:?} is not a mode: write read, write, rw or hub")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Read => "read",
            Mode::Write => "write",
            Mode::ReadWrite => "rw",
            Mode::Hub => "hub",
        })
    }
}

/// Parses a replica's public key: 64 hex characters, as `syncline-edge init --json` prints
/// it, that are a valid ed25519 key.
pub fn parse_key(s: &str) -> Result<PeerId, String> {
    let hint = "expected the 64 hex characters of a public key, as `syncline-edge init --json` \
                prints it";
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not a public key: {hint}"));
    }
    let peer = PeerId::from_hex(s).map_err(|e| format!("{e}: {hint}"))?;
    if peer.verifying_key().is_none() {
        return Err(format!(
            "{s} is not a valid ed25519 public key: copy it again from the replica"
        ));
    }
    Ok(peer)
}

/// Parses a document prefix: `""` (every document), `sites/` or `sites/berlin/inventory`.
pub fn parse_prefix(s: &str) -> Result<DocPrefix, String> {
    DocPrefix::new(s).map_err(|e| {
        format!(
            "{e}: a prefix is \"\" (every document) or a document path such as sites/ or \
             sites/berlin/inventory (letters, digits and - _ . ~ : @ between slashes)"
        )
    })
}

/// The grants as one JSON array: `[{"public_key", "prefix", "mode"}]`.
pub fn to_json(grants: &[Grant]) -> String {
    let items: Vec<serde_json::Value> = grants
        .iter()
        .map(|g| {
            serde_json::json!({
                "public_key": g.peer.to_string(),
                "prefix": g.prefix.as_str(),
                "mode": Mode::of(g).map_or("none".to_owned(), |m| m.to_string()),
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// The grants as a table for people: key, mode, prefix (quoted, so "" shows).
pub fn to_table(grants: &[Grant]) -> String {
    let mut out = String::new();
    for g in grants {
        let mode = Mode::of(g).map_or("none".to_owned(), |m| m.to_string());
        out.push_str(&format!("{}  {mode:<5}  {:?}\n", g.peer, g.prefix.as_str()));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test with its message.

    use syncline_core::identity::Identity;

    use super::*;

    #[test]
    fn keys_must_be_64_hex_of_a_valid_point() {
        let id = Identity::generate().peer_id();
        assert_eq!(parse_key(&id.to_string()).unwrap(), id);
        assert!(parse_key("abc").is_err());
        assert!(parse_key(&format!(" {id}")).is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn modes_and_prefixes() {
        assert_eq!("rw".parse::<Mode>().unwrap().rights(), (true, true, false));
        assert_eq!("hub".parse::<Mode>().unwrap().rights(), (true, true, true));
        assert!("admin".parse::<Mode>().is_err());
        assert_eq!(parse_prefix("").unwrap().as_str(), "");
        assert!(parse_prefix("sites/../x").is_err());
        assert!(parse_prefix("a b").is_err());
    }
}
