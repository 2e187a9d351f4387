//! The IoT gateway daemon, `syncline-edge`: a thin driver of the core [`Replica`] that keeps
//! the device's documents in SQLite, syncs them with a hub over QUIC (through
//! `syncline-net`), and serves a local HTTP+JSON API (`docs/API.md`) to the apps on the box.
//!
//! - [`config`]: the data directory (identity, `edge.toml`, store, API address).
//! - [`daemon`]: `syncline-edge run`: replica thread, sync task, API, graceful shutdown.
//! - [`api`]: the HTTP routes; each converts a request into one call on the replica thread.
//! - [`api_client`]: the HTTP client behind the CLI commands (`get`, `put`, `watch`...).
//!
//! [`Replica`]: syncline_core::replica::Replica

pub mod api;
pub mod api_client;
pub mod config;
pub mod daemon;
