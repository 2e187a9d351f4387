//! The hub service (`syncline-hub`): a thin driver of `syncline_core::hub::Hub` over the QUIC
//! server of `syncline-net`, with grants kept in the hub's store, a metrics endpoint and a
//! CLI. The binary is `src/main.rs`; this library holds its parts so they can be tested.
//!
//! - [`config`]: the settings of `syncline-hub run` (flags > `SYNCLINE_*` > file > defaults).
//! - [`data`]: the data directory (identity, TLS certificate, store) and `init`.
//! - [`grants`]: parsing keys, prefixes and modes for the grants CLI.
//! - [`metrics`]: Prometheus text and the `/healthz` and `/metrics` HTTP server.
//! - [`ops`]: what `backup`, `restore` and `verify` print.
//! - [`pg`]: the hub store on PostgreSQL, shared by several hub instances.
//! - [`service`]: `run`: the QUIC server, grant reloading and graceful shutdown.
//!
//! WebSocket (browsers) is not served yet: issue 5.

pub mod config;
pub mod data;
pub mod grants;
pub mod metrics;
pub mod ops;
pub mod pg;
pub mod service;
pub mod ws;

/// How often a running hub checks the store's grants version by default (grants changed by
/// the CLI, or by another process, hold on live sessions within this; on a shared PostgreSQL
/// store, a notification makes every instance reload them at once).
pub const GRANTS_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// An error in what the operator asked for (a bad flag, key, file or setting): the binary
/// prints it and exits with code 2, having written nothing.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Builds a [`Usage`] error wrapped in `anyhow`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}
