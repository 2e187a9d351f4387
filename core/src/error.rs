//! Typed errors. What a remote peer can cause has its own enums ([`ChangeError`],
//! [`WireError`], [`ProtocolError`]) so that a hub can count and refuse it.

use std::path::PathBuf;

use crate::ids::{ChangeHash, DocId};

/// Why a string is not a valid [`DocId`](crate::DocId).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocIdError {
    /// The id is empty.
    #[error("it is empty")]
    Empty,
    /// The id is longer than [`MAX_DOC_ID_LEN`](crate::ids::MAX_DOC_ID_LEN).
    #[error("it is {len} bytes long, over the limit of 256")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Two slashes in a row, or a leading or trailing slash.
    #[error("it has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("it has a '.' or '..' segment")]
    DotSegment,
    /// A character outside the allowed set.
    #[error("it contains {0:?}; use ASCII letters, digits and - _ . ~ : @ between '/'")]
    BadChar(char),
}

/// Why a signed change was refused. Every variant is something a remote peer can cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The bytes are not an Automerge change (or its checksum is wrong).
    #[error("the bytes are not a valid Automerge change: {0}")]
    Malformed(String),
    /// The change's actor is not `public key (32 bytes) || store instance (8 bytes)` with a
    /// valid ed25519 key.
    #[error("change {hash}: its actor is not bound to an ed25519 public key")]
    ActorNotBound {
        /// The change.
        hash: ChangeHash,
    },
    /// The signature does not verify under the key named by the change's actor, for this
    /// document (forged, altered, replayed from another document, or actor spoofed).
    #[error("change {hash} in {doc}: the signature does not verify for this document and author")]
    BadSignature {
        /// The document it was presented for.
        doc: DocId,
        /// The change.
        hash: ChangeHash,
    },
    /// A change held without a verified signature of its own (from a snapshot, or whose
    /// relayed signature fails) is in the history of no signed change of its actor, so no
    /// signature of its author covers it.
    #[error(
        "change {hash} of {doc} is covered by no signature of its author (neither its own nor \
         a later change's of its actor)"
    )]
    NotCovered {
        /// The document.
        doc: DocId,
        /// The change.
        hash: ChangeHash,
    },
}

/// Why bytes from the wire could not be read as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame's length prefix is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame ended before the message did.
    #[error("truncated frame: {0}")]
    Truncated(String),
    /// The bytes do not decode as a message.
    #[error("undecodable message: {0}")]
    Garbage(String),
    /// The message decoded but is out of bounds (too many changes, too many heads...).
    #[error("message over a limit: {0}")]
    OverLimit(String),
}

/// A peer broke the protocol (as opposed to sending unreadable bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// No protocol version in common.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// Their lowest version.
        theirs_min: u16,
        /// Their highest version.
        theirs_max: u16,
    },
    /// The peer's handshake signature does not verify.
    #[error("the peer failed to prove its identity (bad handshake signature)")]
    BadHandshake,
    /// A message that is not allowed in the session's current state.
    #[error("unexpected {message} message {state}")]
    Unexpected {
        /// The message kind.
        message: &'static str,
        /// Where the session was.
        state: &'static str,
    },
    /// The peer is not the one we expected (pinned hub key).
    #[error("the peer is {actual}, not the expected {expected}")]
    WrongPeer {
        /// Who we wanted.
        expected: String,
        /// Who answered.
        actual: String,
    },
    /// The peer closed the session with an error.
    #[error("the peer closed the session: {code}: {message}")]
    Closed {
        /// Its error code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// Too many of something at once (subscriptions, unacknowledged pushes...).
    #[error("limit exceeded: {0}")]
    Limit(String),
}

impl From<crate::wire::ErrorMessage> for ProtocolError {
    /// The peer's closing `Error` message.
    fn from(e: crate::wire::ErrorMessage) -> Self {
        ProtocolError::Closed {
            code: e.code as u16,
            message: e.message,
        }
    }
}

/// Everything that can go wrong in `syncline-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A document id failed validation.
    #[error("invalid document id {id:?}: {reason}")]
    InvalidDocId {
        /// The input.
        id: String,
        /// What is wrong with it.
        reason: DocIdError,
    },
    /// A peer id is not 64 hex characters.
    #[error("invalid public key {input:?}: expected 64 hex characters")]
    InvalidPeerId {
        /// The input (cut to 80 characters).
        input: String,
    },
    /// An operation's path does not lead where the operation needs.
    #[error("in {doc}: invalid path {path}: {reason}")]
    InvalidPath {
        /// The document.
        doc: DocId,
        /// The path, as JSON.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An operation is malformed (bad value, bad index...).
    #[error("in {doc}: invalid operation: {reason}")]
    InvalidOperation {
        /// The document.
        doc: DocId,
        /// What is wrong.
        reason: String,
    },
    /// The document is not in this store.
    #[error("document {0} is not held by this replica")]
    UnknownDocument(DocId),
    /// A signed change was refused.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// Bytes from the wire were unreadable.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The identity file could not be read or written.
    #[error("identity file {path}: {reason}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What went wrong, and what to do.
        reason: String,
    },
    /// The disk (or the store's size limit) is full: the write was refused, nothing stored
    /// was lost. Free space and retry.
    #[error("the store is full: write refused, nothing stored was lost; free disk space and retry")]
    StorageFull,
    /// The store holds data this version cannot read (or that is corrupt).
    #[error("store {what} is corrupt or from an unknown version: {reason}")]
    Corrupt {
        /// Which part.
        what: String,
        /// What was found.
        reason: String,
    },
    /// Too many changes of a document are waiting for their dependencies.
    #[error("document {doc}: {count} changes wait for missing dependencies (limit reached)")]
    TooManyPending {
        /// The document.
        doc: DocId,
        /// How many wait.
        count: usize,
    },
    /// Another process holds the data directory: one process owns a store's writes.
    #[error("{path} is in use by another process; stop it first (one process owns a store)")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A backup file is missing, damaged, altered, out of order or not a backup.
    #[error("backup {path}: {reason}")]
    Backup {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A document export is missing, damaged, altered or not an export.
    #[error("export {path}: {reason}")]
    Export {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The store's log was replaced (restored from a backup) while this hub ran: the hub
    /// still holds the old log's epoch, and must restart so replicas see the new one.
    #[error(
        "the store's log was replaced (restored) while this hub ran: restart the hub so that \
         replicas see the new epoch"
    )]
    StoreReplaced,
    /// A database server (the hub's PostgreSQL store) failed or could not be reached. The
    /// operation did nothing; retry once the database is back.
    #[error("database error while {context}: {reason}")]
    Database {
        /// What we were doing.
        context: &'static str,
        /// The cause, as the driver gives it.
        reason: String,
    },
    /// Syncing a store's writes to disk failed: the writes since the last sync are applied
    /// (a process crash keeps them) but may be lost in a power cut. The store refuses writes
    /// and syncs from then on, until it is reopened.
    #[error(
        "syncing {path} to disk failed: {reason}; the writes since the last sync are applied \
         but may not survive a power cut; check the disk, then restart (the store refuses \
         writes until it is reopened)"
    )]
    Unsynced {
        /// The file.
        path: String,
        /// The cause, as the OS gives it.
        reason: String,
    },
    /// A store's encryption key is missing, wrong, unreadable, or this build cannot encrypt.
    #[error("store key {path}: {reason}")]
    StoreKey {
        /// The key file, or the store.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// SQLite failed.
    #[error("storage error while {context}: {source}{}", extended_code(source))]
    Sqlite {
        /// What we were doing.
        context: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// Automerge refused an operation.
    #[error("in {doc}: {source}")]
    Automerge {
        /// The document.
        doc: DocId,
        /// The cause (boxed: Automerge's error is large, and errors travel by value).
        #[source]
        source: Box<automerge::AutomergeError>,
    },
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SQLite's extended result code, where it says more than the message (which names only the
/// primary code: "disk I/O error" for a dozen causes), for the operator to look up.
fn extended_code(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code > 0xff => {
            format!(" (SQLite extended code {})", f.extended_code)
        }
        _ => String::new(),
    }
}

/// Adds context to SQLite errors and maps "disk full" to [`Error::StorageFull`].
pub(crate) trait SqlContext<T> {
    fn ctx(self, context: &'static str) -> Result<T>;
}

/// Whether SQLite failed for want of disk space: `SQLITE_FULL`, or the WAL index (`-shm`)
/// that could not grow. The latter is what a full disk gives when the WAL has room in its
/// file (it restarted, and keeps its size) but its index does not: after the process
/// restarted, the first connection cut the index file down, and it must grow again as the
/// WAL fills (found by the nemesis: an edge's writes answered 500 instead of 507).
fn out_of_space(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            f.code == rusqlite::ErrorCode::DiskFull
                || f.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE
        }
        _ => false,
    }
}

impl<T> SqlContext<T> for std::result::Result<T, rusqlite::Error> {
    fn ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|source| {
            if out_of_space(&source) {
                Error::StorageFull
            } else {
                Error::Sqlite { context, source }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(
        extended: std::ffi::c_int,
        message: &str,
    ) -> std::result::Result<(), rusqlite::Error> {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(extended),
            Some(message.into()),
        ))
    }

    #[test]
    fn a_full_disk_is_storage_full_whether_the_wal_or_its_index_could_not_grow() {
        let full = failure(rusqlite::ffi::SQLITE_FULL, "database or disk is full");
        assert!(matches!(full.ctx("committing"), Err(Error::StorageFull)));
        let index = failure(rusqlite::ffi::SQLITE_IOERR_SHMSIZE, "disk I/O error");
        assert!(matches!(index.ctx("committing"), Err(Error::StorageFull)));
        // Any other I/O error stays one, with the code that tells it apart.
        let write = failure(rusqlite::ffi::SQLITE_IOERR_WRITE, "disk I/O error");
        let e = write.ctx("committing").unwrap_err();
        assert!(matches!(e, Error::Sqlite { .. }));
        assert_eq!(
            e.to_string(),
            "storage error while committing: disk I/O error (SQLite extended code 778)"
        );
    }
}
