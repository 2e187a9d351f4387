//! The one error type the bindings throw (Kotlin `SynclineException`, Swift and Python
//! `SynclineError`). It is flat: each variant carries a message that says what is wrong and
//! what to do, readable as is from Kotlin and Swift.

use syncline_net::NetError;

/// Why a call failed. A call that fails changed nothing.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
#[non_exhaustive]
pub enum SynclineError {
    /// A document id (or subscription prefix) is not valid: 1 to 256 bytes of `/`-separated
    /// segments of ASCII letters, digits and `- _ . ~ : @`.
    #[error("{0}")]
    InvalidDocId(String),
    /// The operations are not valid JSON operations, or one cannot be applied (bad value,
    /// out-of-range splice, a change over the size limit...). Nothing was applied.
    #[error("{0}")]
    InvalidOperation(String),
    /// An operation's path does not lead where it needs (missing key, not a counter, index
    /// out of range...). Nothing was applied.
    #[error("{0}")]
    InvalidPath(String),
    /// The replica does not hold the document (yet: a subscribed document arrives when the
    /// hub sends it).
    #[error("{0}")]
    UnknownDocument(String),
    /// A setting is wrong: a hub address, fingerprint or key, or no hub configured.
    #[error("{0}")]
    InvalidConfig(String),
    /// The store is already open, in this app or in another process: one owner per store.
    #[error("{0}")]
    Locked(String),
    /// The disk is full: the write was refused and nothing stored was lost.
    #[error("{0}")]
    StorageFull(String),
    /// The store could not be read or written (I/O error, corrupt file, identity file).
    #[error("{0}")]
    Storage(String),
    /// The network layer failed to start (binding the UDP socket...).
    #[error("{0}")]
    Network(String),
    /// The replica is closed.
    #[error("the replica is closed; open it again to use it")]
    Closed,
    /// The library could not start its background threads.
    #[error("{0}")]
    Runtime(String),
}

impl From<syncline_core::Error> for SynclineError {
    fn from(e: syncline_core::Error) -> Self {
        use syncline_core::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidDocId { .. } => SynclineError::InvalidDocId(message),
            E::InvalidPath { .. } => SynclineError::InvalidPath(message),
            // Automerge refusing an operation is the caller's input, not the store's fault.
            E::InvalidOperation { .. } | E::Automerge { .. } => {
                SynclineError::InvalidOperation(message)
            }
            E::UnknownDocument(_) => SynclineError::UnknownDocument(message),
            // The app's key does not open the store (or it gave none for an encrypted one).
            E::InvalidPeerId { .. } | E::StoreKey { .. } => SynclineError::InvalidConfig(message),
            E::StorageFull => SynclineError::StorageFull(message),
            E::Locked { path } => SynclineError::Locked(format!(
                "the store at {} is already open (by this app or another process); close the \
                 other Replica first: one owner per store",
                path.parent().unwrap_or(&path).display()
            )),
            // A hub session's errors (Change, Wire, Protocol) end the session, never a call;
            // the rest is the store's.
            E::Change(_) | E::Wire(_) | E::Protocol(_) => SynclineError::Network(message),
            _ => SynclineError::Storage(message),
        }
    }
}

impl From<NetError> for SynclineError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Core(e) => e.into(),
            NetError::Config(m) => SynclineError::InvalidConfig(m),
            NetError::Stopped => SynclineError::Closed,
            e @ NetError::NotDurable(_) => SynclineError::Storage(e.to_string()),
            e => SynclineError::Network(e.to_string()),
        }
    }
}
