//! Durable storage. [`ReplicaStore`] is a replica's SQLite file; [`HubStore`] is the trait a
//! hub's change log implements (SQLite here, PostgreSQL in the hub crate later), with
//! [`SqliteHubStore`] as the embedded default.

pub mod backup;
#[cfg(any(test, feature = "testing"))]
pub mod contract;
mod hub;
mod key;
mod replica;
mod sqlite;

#[cfg(test)]
pub(crate) use hub::tests::signed_changes;
pub use hub::{
    Appended, DocHeads, Dropped, HubSnapshot, HubStore, LogBatch, LogEntry, PeerState,
    SnapshotMeta, SqliteHubStore, actor_key, chain, chain_from, chain_on, complete_heads,
    snapshot_epoch, stored_snapshot, unchained, uncovered_positions,
};
pub use key::StoreKey;
pub use replica::{OutboxEntry, ReplicaStore, StoredChange, StoredDoc, Subscription, WriteBatch};

/// An exclusive lock on a data directory, held for as long as this value lives (the OS
/// releases it if the process dies, so a crash never leaves it stuck).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Takes the data directory's lock (`DIR/lock`), or fails at once with
/// [`Error::Locked`](crate::Error::Locked) if another process holds it.
pub fn lock_dir(dir: &std::path::Path) -> crate::Result<DirLock> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| crate::Error::Identity {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::Error::Locked { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(crate::Error::Identity {
            path,
            reason: format!("cannot lock: {e}"),
        }),
    }
}
