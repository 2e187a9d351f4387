//! Syncline for mobile apps: a [UniFFI](https://mozilla.github.io/uniffi-rs/) surface over
//! the replica and its QUIC sync, for Kotlin (Android) and Swift (iOS), and Python (the
//! tests).
//!
//! - [`Replica`]: open a store in a directory, change documents with the shared operation
//!   set (JSON), read them as JSON, subscribe, start and stop sync, observe.
//! - [`ReplicaObserver`]: implemented by the app; told of document changes and of the sync
//!   status, pushed (nothing polls).
//! - [`SynclineError`]: the one error type, flat, with messages that say what to do.
//!
//! The library runs one small tokio runtime of its own (quinn runs inside it); each open
//! replica owns a thread for its SQLite store, as the edge-node does. `mobile-ffi/README.md`
//! shows the API from Kotlin and Swift and how to build the Android and iOS artifacts.

mod config;
mod error;
mod observer;
mod replica;
mod runtime;

pub use config::{HubConfig, ReplicaConfig};
pub use error::SynclineError;
pub use observer::{ChangeOrigin, DocChange, Patch, ReplicaObserver, SyncStatus};
pub use replica::Replica;

uniffi::setup_scaffolding!();
