//! Syncline's engine: identity, signed Automerge changes, the SQLite store, and the sync
//! protocol as sans-IO state machines. No sockets and no async runtime live here; the
//! edge-node, hub, wasm and mobile crates drive these machines over their transports.
//!
//! - [`identity::Identity`]: a replica's ed25519 key pair; its public key is its [`PeerId`].
//! - [`ops::Op`] and [`document::Document`]: the JSON-shaped operation set on Automerge.
//! - [`change`]: signing and verifying changes; only a [`change::VerifiedChange`] is stored.
//! - [`replica::Replica`]: a replica's documents, its durable store (outbox, cursors) and its
//!   sync session with a hub.
//! - [`hub::Hub`]: the hub machine over a [`store::HubStore`] (SQLite here, PostgreSQL later).
//! - [`wire`]: frames and messages (see `docs/PROTOCOL.md`).
//!
//! Two replicas converging through a hub, with messages moved by hand where a real driver
//! would use QUIC or a WebSocket:
//!
//! ```
//! use syncline_core::hub::{AllowAll, Hub};
//! use syncline_core::identity::Identity;
//! use syncline_core::ops::Op;
//! use syncline_core::replica::{Replica, ReplicaOptions};
//! use syncline_core::store::SqliteHubStore;
//! use syncline_core::DocId;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteHubStore::open_in_memory()?;
//! let mut hub = Hub::new(Identity::generate(), store, AllowAll, None);
//! let mut alice = Replica::open_in_memory(Identity::generate(), ReplicaOptions::default())?;
//! let mut bob = Replica::open_in_memory(Identity::generate(), ReplicaOptions::default())?;
//! let doc = DocId::new("sites/berlin/inventory")?;
//!
//! // Alice creates the document; both connect and sync.
//! alice.change(&doc, &Op::list_from_json(r#"[{"op":"put","path":["bolts"],"value":{"$counter":10}}]"#)?)?;
//! bob.subscribe(syncline_core::wire::Target::Doc(doc.clone()))?;
//! let sessions = [hub.accept(), hub.accept()];
//! alice.connect(Some(hub.peer_id()));
//! bob.connect(Some(hub.peer_id()));
//! // A driver's loop: send what each side has to say until nothing moves.
//! fn sync(hub: &mut Hub<SqliteHubStore, AllowAll>, reps: [(&mut Replica, u64); 2])
//!     -> syncline_core::Result<()> {
//!     let [(a, sa), (b, sb)] = reps;
//!     loop {
//!         let mut moved = false;
//!         for (r, s) in [(&mut *a, sa), (&mut *b, sb)] {
//!             while let Some(m) = r.poll_transmit()? {
//!                 hub.handle_message(s, m)?;
//!                 moved = true;
//!             }
//!         }
//!         hub.flush()?; // one group commit for everything received
//!         for (r, s) in [(&mut *a, sa), (&mut *b, sb)] {
//!             while let Some(m) = hub.poll_transmit(s)? {
//!                 r.handle_message(m)?;
//!                 moved = true;
//!             }
//!         }
//!         if !moved {
//!             return Ok(());
//!         }
//!     }
//! }
//! sync(&mut hub, [(&mut alice, sessions[0]), (&mut bob, sessions[1])])?;
//!
//! // Both take bolts at once; the counter adds both decrements.
//! let take = |n: i64| Op::list_from_json(&format!(r#"[{{"op":"increment","path":["bolts"],"by":{}}}]"#, -n));
//! alice.change(&doc, &take(2)?)?;
//! bob.change(&doc, &take(3)?)?;
//! sync(&mut hub, [(&mut alice, sessions[0]), (&mut bob, sessions[1])])?;
//! assert_eq!(alice.json(&doc)?, serde_json::json!({"bolts": 5}));
//! assert_eq!(alice.json(&doc)?, bob.json(&doc)?);
//! assert_eq!(alice.doc(&doc)?.heads(), bob.doc(&doc)?.heads());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod audit;
pub mod change;
pub mod document;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod identity;
pub mod ids;
pub mod ops;
mod parallel;
pub mod protocol;
pub mod replica;
pub mod rolling;
pub mod snapshot;
pub mod store;

pub mod wire;

/// The deterministic simulation, for this crate's tests and, with the `testing` feature,
/// for running the same seeds on other hub stores.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod sim;

pub use error::{Error, Result};
pub use ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
