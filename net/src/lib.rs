//! Syncline's transports: the QUIC drivers of the core state machines, shared by the hub, the
//! edge-node and the mobile bindings.
//!
//! - [`tls`]: self-signed hub certificates pinned by fingerprint, and the channel binding.
//! - [`server`]: the hub driver ([`server::HubHandle`]): one thread owns the hub machine and
//!   its store; connection tasks feed it.
//! - [`client`]: the replica driver ([`client::ReplicaHandle`]): one thread owns the replica
//!   and its store; a sync task keeps a session with one of several hubs, reconnecting with
//!   backoff and failing over.

pub mod backoff;
pub mod client;
pub mod server;
mod stream;

pub use stream::Traffic;
pub mod tls;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// TLS or certificate setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// The QUIC connection could not be made.
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection broke.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer sent bytes that are not messages.
    #[error(transparent)]
    Wire(#[from] syncline_core::error::WireError),
    /// The engine refused.
    #[error(transparent)]
    Core(#[from] syncline_core::Error),
    /// A socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The thread owning the store has stopped.
    #[error("the store thread has stopped")]
    Stopped,
    /// The call ran, but the store could not sync its writes to disk: they may not survive a
    /// power cut.
    #[error("the write is not durable: {0}")]
    NotDurable(String),
    /// Gave up waiting.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The session failed, for this cause (a full store, a refused change, the hub's error
    /// message); the sync task connects again.
    #[error("the session ended: {0}")]
    Ended(String),
}
