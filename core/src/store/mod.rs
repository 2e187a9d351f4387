//! Durable storage. [`ReplicaStore`] is a replica's SQLite file; [`HubStore`] is the trait a
//! hub's change log implements (SQLite here, PostgreSQL in the hub crate later), with
//! [`SqliteHubStore`] as the embedded default.

mod hub;
mod replica;
mod sqlite;

pub use hub::{DocHeads, HubStore, LogBatch, LogEntry, PeerState, SqliteHubStore};
pub use replica::{OutboxEntry, ReplicaStore, StoredChange, StoredDoc};
pub use sqlite::SCHEMA_VERSION;
