//! The hub's change log: every verified change, numbered in commit order, with its author's
//! bytes and signature. The hub never materializes documents on this path: heads and
//! dependencies come from change metadata.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::change::{SignedChange, VerifiedChange};
use crate::error::{Error, Result, SqlContext};
use crate::hub::Grant;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
use crate::store::sqlite::{self, blob_to_hashes, hashes_to_blob};
use crate::wire::{Mark, Position, Target};

pub(crate) const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE docs (doc TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        doc TEXT NOT NULL,
        hash BLOB NOT NULL,
        deps BLOB NOT NULL,
        author BLOB NOT NULL,
        signature BLOB NOT NULL,
        bytes BLOB NOT NULL,
        UNIQUE (doc, hash)
    );
    CREATE INDEX log_doc_seq ON log (doc, seq);",
    // Version 2: grants live with the data, so every hub instance on one store sees the same.
    "CREATE TABLE grants (
        peer BLOB NOT NULL,
        prefix TEXT NOT NULL,
        can_read INTEGER NOT NULL,
        can_write INTEGER NOT NULL,
        can_relay INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (peer, prefix)
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('grants_version', 0);",
    // Version 3: how far this hub has synced with each peer hub.
    "CREATE TABLE peers (
        peer BLOB PRIMARY KEY,
        recv_epoch BLOB NOT NULL,
        recv_cursor INTEGER NOT NULL,
        push_epoch BLOB NOT NULL,
        pushed INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Version 4: a change is known by its author's actor and sequence number, not by its hash.
    // An index on random 32-byte hashes makes every insert of a group commit dirty a different
    // index page once the log is large (1.26 MB of WAL per 256 changes at 100,000 changes,
    // ingest down from 24,000/s to 13,000/s); an author's sequence numbers grow, so their
    // index is appended to. A different change under a used (actor, seq) is refused.
    // `instance` and `actor_seq` of older rows are filled in by the hub at open.
    "CREATE TABLE log_v4 (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        doc TEXT NOT NULL,
        hash BLOB NOT NULL,
        deps BLOB NOT NULL,
        author BLOB NOT NULL,
        signature BLOB NOT NULL,
        bytes BLOB NOT NULL,
        instance BLOB,
        actor_seq INTEGER
    );
    INSERT INTO log_v4 (seq, doc, hash, deps, author, signature, bytes)
        SELECT seq, doc, hash, deps, author, signature, bytes FROM log ORDER BY seq;
    DROP TABLE log;
    ALTER TABLE log_v4 RENAME TO log;
    CREATE INDEX log_doc_seq ON log (doc, seq);
    CREATE UNIQUE INDEX log_actor_seq ON log (doc, author, instance, actor_seq);",
    // Version 5: compacted documents, served to replicas that missed many changes.
    "CREATE TABLE snapshots (
        doc TEXT PRIMARY KEY,
        epoch BLOB NOT NULL,
        upto INTEGER NOT NULL,
        changes INTEGER NOT NULL,
        data BLOB NOT NULL,
        heads BLOB NOT NULL
    ) WITHOUT ROWID;",
    // Version 6: each change's place in a hash chain over the log (see [`chain`]), the mark
    // replicas resume with. Older rows are chained by the hub at open.
    "ALTER TABLE log ADD COLUMN chain BLOB;",
    // Version 7: the highest position retention dropped a change at
    // ([`HubStore::dropped_upto`]); for an older store, every position given so far may be
    // a drop. (A version of its own: an older hub running retention would not raise it.)
    "INSERT OR IGNORE INTO meta (key, value) SELECT 'dropped_upto',
         coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'log'), 0);",
];

/// The chain of the log up to a change: the hash of the chain before it (all zeros for the
/// first) and of its signature. A replica resumes with the chain at its cursor, and the hub
/// tells a log rolled back and grown again by it: equal chains at a position mean the same
/// changes, in the same order, up to it (a signature names one change). The hubs chain every
/// change of a commit in order, also those already stored, and start from the chain of the
/// last change stored; stored chains are never recomputed, except by a restore.
pub fn chain(prev: Option<&Mark>, signature: &[u8]) -> Mark {
    use sha2::{Digest, Sha512};
    let mut h = Sha512::new();
    h.update(b"syncline log chain\0");
    h.update(prev.map_or(&[0u8; 64][..], |m| &m.0[..]));
    h.update(signature);
    Mark(h.finalize().into())
}

/// Chains `signature` on from `head`, which moves to the result: the next change's chain.
pub fn chain_on(head: &mut Option<Mark>, signature: &[u8]) -> Mark {
    let next = chain(head.as_ref(), signature);
    *head = Some(next);
    next
}

/// A chain read from a store (`None` for a row not chained yet).
pub fn chain_from(blob: Option<Vec<u8>>, at: i64) -> Result<Option<Mark>> {
    blob.map(|b| {
        b.try_into().map(Mark).map_err(|_| Error::Corrupt {
            what: "chain in the hub log".into(),
            reason: format!("seq {at}"),
        })
    })
    .transpose()
}

/// What [`HubStore::append`] did with one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this position, with its chain ([`chain`]) as the mark.
    Stored(Position),
    /// Already stored (a re-sent change), at this position of the log: nothing to do.
    Duplicate(Position),
    /// Not stored: another change of this document already has the same author, actor
    /// instance and sequence number (the author's store was copied and both copies wrote).
    Conflict {
        /// The change stored under that actor and sequence number.
        existing: ChangeHash,
    },
}

/// One change in the hub's log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Its position.
    pub cursor: Cursor,
    /// Its document.
    pub doc: DocId,
    /// The author's bytes and signature.
    pub change: SignedChange,
    /// Its chain ([`chain`]); `None` in a store not chained yet.
    pub chain: Option<Mark>,
}

/// A page of the log for one subscription target.
#[derive(Debug, Clone)]
pub struct LogBatch {
    /// Matching changes, in log order.
    pub entries: Vec<LogEntry>,
    /// Position reached: every matching change up to it is in `entries` or was before `after`.
    pub next: Cursor,
    /// Whether `next` is the end of the log (when the read started).
    pub at_end: bool,
}

/// A document's heads as the hub knows them, from change metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocHeads {
    /// Heads of the changes whose whole history is stored (sorted).
    pub heads: Vec<ChangeHash>,
    /// Whether every stored change has its whole history stored too. After a restore from an
    /// older backup, a change can be stored while an ancestor is not: those are left out of
    /// `heads`, or a replica would take the ancestor as present and never upload it.
    pub complete: bool,
}

/// What one [`HubStore::drop_doc`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Changes removed.
    pub changes: u64,
    /// Whether the document is gone (none of its changes is left).
    pub gone: bool,
}

/// A compacted document as the hub keeps it ([`crate::hub::Hub::compact`]): every change of
/// the document at a position up to `upto` is in it (or was refused by the document's checks,
/// as every replica refuses it), in the log of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSnapshot {
    /// The log it was built from; a snapshot of another log (a restored store) is not used.
    pub epoch: Epoch,
    /// The position it covers up to.
    pub upto: Cursor,
    /// How many changes it holds.
    pub changes: u64,
    /// The saved document and its signed heads.
    pub snapshot: crate::snapshot::Snapshot,
}

/// What the hub knows of a stored snapshot without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// See [`HubSnapshot::epoch`].
    pub epoch: Epoch,
    /// See [`HubSnapshot::upto`].
    pub upto: Cursor,
    /// See [`HubSnapshot::changes`].
    pub changes: u64,
    /// Size of the saved document.
    pub bytes: u64,
}

/// How far a hub has synced with one peer hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerState {
    /// The peer's log epoch `recv_cursor` belongs to.
    pub recv_epoch: Epoch,
    /// Position in the peer's log received and committed here.
    pub recv_cursor: Cursor,
    /// The peer's log epoch that acknowledged `pushed`.
    pub push_epoch: Epoch,
    /// Position in this hub's log the peer has acknowledged.
    pub pushed: Cursor,
}

/// What a hub needs from its storage. One implementation per engine (SQLite embedded,
/// PostgreSQL for several hub instances). Calls are blocking; a hub runs its store on a
/// thread of its own. Every method that writes commits before it returns.
pub trait HubStore {
    /// The identity of this log: changes when the log is replaced (restore from backup).
    fn epoch(&self) -> Epoch;

    /// Appends verified changes in one durable transaction (group commit): durable when this
    /// returns, or, with deferred syncs, when [`HubStore::sync`] does. Returns what happened
    /// to each change, in order.
    fn append(&mut self, changes: &[VerifiedChange]) -> Result<Vec<Appended>>;

    /// Defers the sync of [`HubStore::append`]'s commits to [`HubStore::sync`], if the engine
    /// can (SQLite: commits at `synchronous=NORMAL`, in the OS's page cache, which a process
    /// crash keeps); a store that cannot keeps its commits durable. Turning it off syncs
    /// what waits. The hub uses it to relay changes while their fsync runs
    /// ([`Hub::set_deferred_sync`](crate::hub::Hub::set_deferred_sync)).
    fn set_deferred_sync(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }

    /// Whether appends wait for [`HubStore::sync`] to be durable.
    fn defers_sync(&self) -> bool {
        false
    }

    /// Makes every append so far durable.
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    /// Up to `limit` changes of documents under `target` with positions after `after`.
    fn read_log(&mut self, target: &Target, after: Cursor, limit: usize) -> Result<LogBatch>;

    /// The last position in the log.
    fn last_cursor(&mut self) -> Result<Cursor>;

    /// The highest position this log ever gave a change, even if retention dropped it since:
    /// a replica's position past it means the store was rolled back under the replica. The
    /// hub takes the greater of it and [`HubStore::last_cursor`] (a restored store's record of
    /// the positions it gave may start below its log's end).
    fn high_water(&mut self) -> Result<Cursor> {
        self.last_cursor()
    }

    /// The highest position at which retention ([`HubStore::drop_doc`]) ever dropped a
    /// change (0: none). A position above it with no change was never used by this log, or
    /// the log was rolled back; at or below it, the change may have been dropped. A store
    /// that does not keep it answers its highest position (every gap may be a drop).
    fn dropped_upto(&mut self) -> Result<Cursor> {
        self.high_water()
    }

    /// Documents under `target`, in id order, after `after`, at most `limit`.
    fn docs_page(
        &mut self,
        target: &Target,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<DocId>>;

    /// The document's heads, from change metadata.
    fn heads(&mut self, doc: &DocId) -> Result<DocHeads>;

    /// Every grant.
    fn grants(&mut self) -> Result<Vec<Grant>>;

    /// Adds or replaces the grant of `grant.peer` on `grant.prefix`.
    fn put_grant(&mut self, grant: &Grant) -> Result<()>;

    /// Removes the grants of `peer` (on `prefix` only, if given); returns how many went.
    fn revoke(&mut self, peer: &PeerId, prefix: Option<&DocPrefix>) -> Result<usize>;

    /// A number that changes whenever the grants change (a hub reloads them when it does).
    fn grants_version(&mut self) -> Result<u64>;

    /// How far this hub has synced with a peer hub (all zero if never).
    fn peer_state(&mut self, peer: &PeerId) -> Result<PeerState>;

    /// Records how far this hub has synced with a peer hub.
    fn set_peer_state(&mut self, peer: &PeerId, state: &PeerState) -> Result<()>;

    /// The document's changes that are not ancestors of the known hashes in `have`, in log
    /// order (the repair path).
    fn changes_not_covered(
        &mut self,
        doc: &DocId,
        have: &[ChangeHash],
    ) -> Result<Vec<SignedChange>>;

    /// Removes up to `limit` of the document's changes, oldest first, in one transaction,
    /// and the document once none is left (retention: [`crate::rolling::Retention`]). Space
    /// is reused by later writes; positions are never reused.
    fn drop_doc(&mut self, doc: &DocId, limit: usize) -> Result<Dropped>;

    /// Stores (replaces) the document's snapshot.
    fn put_snapshot(&mut self, doc: &DocId, snapshot: &HubSnapshot) -> Result<()>;

    /// The document's snapshot, if one is stored.
    fn snapshot(&mut self, doc: &DocId) -> Result<Option<HubSnapshot>>;

    /// What the stored snapshot covers, without its bytes.
    fn snapshot_meta(&mut self, doc: &DocId) -> Result<Option<SnapshotMeta>>;

    /// How many of the document's changes are at positions in `after + 1 ..= upto`.
    fn count_changes(&mut self, doc: &DocId, after: Cursor, upto: Cursor) -> Result<u64>;
}

/// A boxed store is a store: a hub binary picks its engine at start-up.
impl<T: HubStore + ?Sized> HubStore for Box<T> {
    fn epoch(&self) -> Epoch {
        (**self).epoch()
    }
    fn append(&mut self, changes: &[VerifiedChange]) -> Result<Vec<Appended>> {
        (**self).append(changes)
    }
    fn set_deferred_sync(&mut self, on: bool) -> Result<()> {
        (**self).set_deferred_sync(on)
    }
    fn defers_sync(&self) -> bool {
        (**self).defers_sync()
    }
    fn sync(&mut self) -> Result<()> {
        (**self).sync()
    }
    fn read_log(&mut self, target: &Target, after: Cursor, limit: usize) -> Result<LogBatch> {
        (**self).read_log(target, after, limit)
    }
    fn last_cursor(&mut self) -> Result<Cursor> {
        (**self).last_cursor()
    }
    fn high_water(&mut self) -> Result<Cursor> {
        (**self).high_water()
    }
    fn dropped_upto(&mut self) -> Result<Cursor> {
        (**self).dropped_upto()
    }
    fn docs_page(
        &mut self,
        target: &Target,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<DocId>> {
        (**self).docs_page(target, after, limit)
    }
    fn heads(&mut self, doc: &DocId) -> Result<DocHeads> {
        (**self).heads(doc)
    }
    fn grants(&mut self) -> Result<Vec<Grant>> {
        (**self).grants()
    }
    fn put_grant(&mut self, grant: &Grant) -> Result<()> {
        (**self).put_grant(grant)
    }
    fn revoke(&mut self, peer: &PeerId, prefix: Option<&DocPrefix>) -> Result<usize> {
        (**self).revoke(peer, prefix)
    }
    fn grants_version(&mut self) -> Result<u64> {
        (**self).grants_version()
    }
    fn peer_state(&mut self, peer: &PeerId) -> Result<PeerState> {
        (**self).peer_state(peer)
    }
    fn set_peer_state(&mut self, peer: &PeerId, state: &PeerState) -> Result<()> {
        (**self).set_peer_state(peer, state)
    }
    fn changes_not_covered(
        &mut self,
        doc: &DocId,
        have: &[ChangeHash],
    ) -> Result<Vec<SignedChange>> {
        (**self).changes_not_covered(doc, have)
    }
    fn drop_doc(&mut self, doc: &DocId, limit: usize) -> Result<Dropped> {
        (**self).drop_doc(doc, limit)
    }
    fn put_snapshot(&mut self, doc: &DocId, snapshot: &HubSnapshot) -> Result<()> {
        (**self).put_snapshot(doc, snapshot)
    }
    fn snapshot(&mut self, doc: &DocId) -> Result<Option<HubSnapshot>> {
        (**self).snapshot(doc)
    }
    fn snapshot_meta(&mut self, doc: &DocId) -> Result<Option<SnapshotMeta>> {
        (**self).snapshot_meta(doc)
    }
    fn count_changes(&mut self, doc: &DocId, after: Cursor, upto: Cursor) -> Result<u64> {
        (**self).count_changes(doc, after, upto)
    }
}

/// The embedded SQLite hub store.
pub struct SqliteHubStore {
    conn: Connection,
    epoch: Epoch,
    /// The syncs of appends, when they are deferred ([`HubStore::set_deferred_sync`]).
    deferred: sqlite::DeferredSync,
    /// `synchronous`: appends with deferred syncs leave it at NORMAL (the pragma is parsed
    /// again at every run, about 30 us, so it is not switched back after each one); every
    /// other write sets FULL first ([`Self::durable_writes`]).
    level: sqlite::SyncLevel,
}

impl std::fmt::Debug for SqliteHubStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteHubStore({:?})", self.epoch)
    }
}

impl SqliteHubStore {
    /// Opens or creates the hub store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(sqlite::open(path, "hub", MIGRATIONS, 64)?)
    }

    /// A hub store in memory.
    pub fn open_in_memory() -> Result<Self> {
        Self::init(sqlite::open_in_memory("hub", MIGRATIONS)?)
    }

    fn init(conn: Connection) -> Result<Self> {
        let existing: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()
            .ctx("reading the epoch")?;
        let epoch = match existing {
            Some(b) => Epoch(b.try_into().map_err(|_| Error::Corrupt {
                what: "epoch".into(),
                reason: "length".into(),
            })?),
            None => {
                let e = Epoch::random();
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                    [&e.0[..]],
                )
                .ctx("writing the epoch")?;
                e
            }
        };
        let mut store = SqliteHubStore {
            conn,
            epoch,
            deferred: sqlite::DeferredSync::default(),
            level: sqlite::SyncLevel::default(),
        };
        store.backfill_actor_keys()?;
        store.backfill_chains()?;
        Ok(store)
    }

    /// Sets `synchronous=FULL` if an append left NORMAL: every write but an append with
    /// deferred syncs calls this first, so that it is durable at its commit.
    fn durable_writes(&mut self) -> Result<()> {
        self.level.set(&self.conn, true)
    }

    /// [`HubStore::append`] at the connection's `synchronous` level.
    fn append_now(&mut self, changes: &[VerifiedChange]) -> Result<Vec<Appended>> {
        // Immediate: the chain is read and extended under the write lock (other hub
        // instances may share the file).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .ctx("starting a commit")?;
        let mut out = Vec::with_capacity(changes.len());
        {
            let last: Option<(i64, Option<Vec<u8>>)> = tx
                .prepare_cached("SELECT seq, chain FROM log ORDER BY seq DESC LIMIT 1")
                .ctx("appending to the log")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .ctx("appending to the log")?;
            let mut head = match last {
                Some((seq, c)) => Some(chain_from(c, seq)?.ok_or_else(|| unchained(seq))?),
                None => None,
            };
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO log (doc, hash, deps, author, signature, bytes, instance, actor_seq,
                         chain)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                )
                .ctx("appending to the log")?;
            let mut existing = tx
                .prepare_cached(
                    "SELECT hash, seq, chain FROM log
                     WHERE doc = ?1 AND author = ?2 AND instance = ?3 AND actor_seq = ?4",
                )
                .ctx("appending to the log")?;
            let mut doc = tx
                .prepare_cached("INSERT OR IGNORE INTO docs (doc) VALUES (?1)")
                .ctx("appending to the log")?;
            let mut last_doc: Option<&DocId> = None;
            for c in changes {
                if last_doc != Some(c.doc()) {
                    doc.execute([c.doc().as_str()])
                        .ctx("appending to the log")?;
                    last_doc = Some(c.doc());
                }
                let (instance, actor_seq) = actor_key(c);
                let mark = chain_on(&mut head, &c.signed().signature);
                let n = insert
                    .execute(params![
                        c.doc().as_str(),
                        &c.hash().0[..],
                        hashes_to_blob(&c.deps()),
                        &c.author().as_bytes()[..],
                        &c.signed().signature[..],
                        &c.signed().bytes,
                        &instance[..],
                        actor_seq,
                        &mark.0[..],
                    ])
                    .ctx("appending to the log")?;
                if n == 1 {
                    out.push(Appended::Stored(Position {
                        cursor: Cursor(tx.last_insert_rowid() as u64),
                        mark,
                    }));
                    continue;
                }
                let (stored, seq, at): (Vec<u8>, i64, Option<Vec<u8>>) = existing
                    .query_row(
                        params![
                            c.doc().as_str(),
                            &c.author().as_bytes()[..],
                            &instance[..],
                            actor_seq
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .ctx("appending to the log")?;
                let stored = hash_from(stored)?;
                out.push(if stored == c.hash() {
                    Appended::Duplicate(Position {
                        cursor: Cursor(seq as u64),
                        mark: chain_from(at, seq)?.ok_or_else(|| unchained(seq))?,
                    })
                } else {
                    Appended::Conflict { existing: stored }
                });
            }
        }
        tx.commit().ctx("committing to the log")?;
        Ok(out)
    }

    /// Chains the changes stored before schema version 6 ([`chain`]), in one transaction,
    /// with progress in the log.
    fn backfill_chains(&mut self) -> Result<()> {
        let what = "chaining the log";
        // Unchained rows, when there are any, reach the log's end (a migration leaves every
        // row, a restore the rows of its incremental backups, and an append refuses to chain
        // past one): one look at the last row, not a scan of the log at every start.
        let unchained = |c: &Connection| -> Result<bool> {
            c.query_row(
                "SELECT coalesce((SELECT chain IS NULL FROM log ORDER BY seq DESC LIMIT 1), 0)",
                [],
                |r| r.get(0),
            )
            .ctx("reading the log")
        };
        if !unchained(&self.conn)? {
            return Ok(());
        }
        // Under the write lock (another instance may open the file at the same time).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .ctx(what)?;
        if !unchained(&tx)? {
            return Ok(());
        }
        let todo: i64 = tx
            .query_row("SELECT count(*) FROM log WHERE chain IS NULL", [], |r| {
                r.get(0)
            })
            .ctx(what)?;
        tracing::info!(changes = todo, "chaining stored changes");
        {
            let mut read = tx
                .prepare("SELECT seq, signature, chain FROM log ORDER BY seq")
                .ctx(what)?;
            let mut write = tx
                .prepare("UPDATE log SET chain = ?2 WHERE seq = ?1")
                .ctx(what)?;
            let mut rows = read.query([]).ctx(what)?;
            let mut head: Option<Mark> = None;
            let mut done = 0u64;
            while let Some(row) = rows.next().ctx(what)? {
                let seq: i64 = row.get(0).ctx(what)?;
                if let Some(c) = chain_from(row.get(2).ctx(what)?, seq)? {
                    head = Some(c);
                    continue;
                }
                let signature = signature_from(row.get(1).ctx(what)?, seq)?;
                let c = chain_on(&mut head, &signature);
                write.execute(params![seq, &c.0[..]]).ctx(what)?;
                done += 1;
                if done.is_multiple_of(100_000) {
                    tracing::info!(done, of = todo, "chaining stored changes");
                }
            }
        }
        tx.commit().ctx(what)
    }

    /// Fills in the actor instance and sequence number of changes stored before schema
    /// version 4 (their bytes hold them), in one transaction, with progress in the log.
    fn backfill_actor_keys(&mut self) -> Result<()> {
        let todo: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM log WHERE actor_seq IS NULL",
                [],
                |r| r.get(0),
            )
            .ctx("reading the log")?;
        if todo == 0 {
            return Ok(());
        }
        tracing::info!(
            changes = todo,
            "indexing stored changes by author and sequence number"
        );
        let tx = self.conn.transaction().ctx("indexing the log")?;
        {
            let mut read = tx
                .prepare("SELECT seq, bytes FROM log WHERE actor_seq IS NULL ORDER BY seq")
                .ctx("indexing the log")?;
            let mut write = tx
                .prepare("UPDATE OR IGNORE log SET instance = ?2, actor_seq = ?3 WHERE seq = ?1")
                .ctx("indexing the log")?;
            let mut rows = read.query([]).ctx("indexing the log")?;
            let mut done = 0u64;
            while let Some(row) = rows.next().ctx("indexing the log")? {
                let seq: i64 = row.get(0).ctx("indexing the log")?;
                let bytes: Vec<u8> = row.get(1).ctx("indexing the log")?;
                let change =
                    automerge::Change::try_from(&bytes[..]).map_err(|e| Error::Corrupt {
                        what: format!("stored change at position {seq}"),
                        reason: e.to_string(),
                    })?;
                let actor = change.actor_id().to_bytes();
                let instance = actor.get(32..40).unwrap_or_default();
                // OR IGNORE: two different changes under one actor and sequence number, both
                // stored by an older hub, leave the second without a key (both stay readable).
                write
                    .execute(params![seq, instance, change.seq() as i64])
                    .ctx("indexing the log")?;
                done += 1;
                if done.is_multiple_of(100_000) {
                    tracing::info!(done, of = todo, "indexing stored changes");
                }
            }
        }
        tx.commit().ctx("indexing the log")
    }

    /// Gives the log a new epoch, as after a restore: cursors handed out before mean nothing.
    pub fn new_epoch(&mut self) -> Result<Epoch> {
        self.durable_writes()?;
        let e = Epoch::random();
        self.conn
            .execute("UPDATE meta SET value = ?1 WHERE key = 'epoch'", [&e.0[..]])
            .ctx("writing the epoch")?;
        self.epoch = e;
        Ok(e)
    }

    /// Writes a consistent copy of the store to `path` while it is in use (`VACUUM INTO`).
    pub fn backup_to(&self, path: &Path) -> Result<()> {
        let target = path.to_str().ok_or_else(|| Error::Corrupt {
            what: "backup path".into(),
            reason: "not UTF-8".into(),
        })?;
        self.conn
            .execute("VACUUM INTO ?1", [target])
            .ctx("writing a backup")?;
        Ok(())
    }

    /// Number of changes stored.
    pub fn change_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM log", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .ctx("counting")
    }

    fn graph(&self, doc: &DocId) -> Result<Vec<(i64, ChangeHash, Vec<ChangeHash>)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT seq, hash, deps FROM log WHERE doc = ?1 ORDER BY seq")
            .ctx("reading a change graph")?;
        let rows = st
            .query_map([doc.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .ctx("reading a change graph")?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, h, d) = row.ctx("reading a change graph")?;
            let hash = blob_to_hashes(&h)?.pop().ok_or_else(|| Error::Corrupt {
                what: "hash".into(),
                reason: "empty".into(),
            })?;
            out.push((seq, hash, blob_to_hashes(&d)?));
        }
        Ok(out)
    }
}

/// The positions, in log order, of the changes of a document's `graph` (position, hash,
/// dependencies, in log order) that are not ancestors of (or among) the known hashes of
/// `have`: what the repair path sends. For [`HubStore::changes_not_covered`].
pub fn uncovered_positions(
    graph: &[(i64, ChangeHash, Vec<ChangeHash>)],
    have: &[ChangeHash],
) -> Vec<i64> {
    let deps_of: HashMap<ChangeHash, &Vec<ChangeHash>> =
        graph.iter().map(|(_, h, d)| (*h, d)).collect();
    let mut covered: HashSet<ChangeHash> = HashSet::new();
    let mut stack: Vec<ChangeHash> = have
        .iter()
        .filter(|h| deps_of.contains_key(h))
        .copied()
        .collect();
    while let Some(h) = stack.pop() {
        if covered.insert(h)
            && let Some(deps) = deps_of.get(&h)
        {
            stack.extend(deps.iter().filter(|d| deps_of.contains_key(d)).copied());
        }
    }
    graph
        .iter()
        .filter(|(_, h, _)| !covered.contains(h))
        .map(|(s, _, _)| *s)
        .collect()
}

/// Heads of the sub-graph of changes whose every ancestor is present (Kahn's algorithm:
/// a change joins once all its dependencies have). For [`HubStore::heads`].
pub fn complete_heads<'a>(
    changes: impl Iterator<Item = (ChangeHash, &'a [ChangeHash])>,
) -> DocHeads {
    let changes: Vec<(ChangeHash, &[ChangeHash])> = changes.collect();
    let present: HashSet<ChangeHash> = changes.iter().map(|(h, _)| *h).collect();
    let mut waiting: HashMap<ChangeHash, usize> = HashMap::new();
    let mut children: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut ready: Vec<ChangeHash> = Vec::new();
    let mut incomplete = false;
    for (h, deps) in &changes {
        if deps.iter().any(|d| !present.contains(d)) {
            incomplete = true;
            continue; // never joins
        }
        waiting.insert(*h, deps.len());
        if deps.is_empty() {
            ready.push(*h);
        }
        for d in *deps {
            children.entry(*d).or_default().push(*h);
        }
    }
    let mut complete: HashSet<ChangeHash> = HashSet::new();
    while let Some(h) = ready.pop() {
        if !complete.insert(h) {
            continue;
        }
        for c in children.get(&h).map(Vec::as_slice).unwrap_or_default() {
            if let Some(n) = waiting.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    ready.push(*c);
                }
            }
        }
    }
    if complete.len() != changes.len() {
        incomplete = true;
    }
    let deps_of_complete: HashSet<ChangeHash> = changes
        .iter()
        .filter(|(h, _)| complete.contains(h))
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let mut heads: Vec<ChangeHash> = complete
        .iter()
        .filter(|h| !deps_of_complete.contains(h))
        .copied()
        .collect();
    heads.sort();
    DocHeads {
        heads,
        complete: !incomplete,
    }
}

/// A change's actor instance (the 8 bytes after the author's key) and sequence number: what
/// a hub store keys a change by.
pub fn actor_key(c: &VerifiedChange) -> ([u8; 8], i64) {
    let actor = c.automerge().actor_id().to_bytes();
    let mut instance = [0u8; 8];
    // A verified change's actor is the author's key and an 8-byte instance.
    if let Some(tail) = actor.get(32..40) {
        instance.copy_from_slice(tail);
    }
    (instance, c.automerge().seq() as i64)
}

/// A change stored without its chain after the log was chained: written by a hub of an older
/// version still running on the store. Chaining on from before it would leave it out.
pub fn unchained(seq: i64) -> Error {
    Error::Corrupt {
        what: format!("the hub log's chain at position {seq}"),
        reason: "missing: a hub of an older version wrote this change; stop every older hub on \
                 this store, then restart this one (it chains the log at start)"
            .into(),
    }
}

fn signature_from(blob: Vec<u8>, seq: i64) -> Result<[u8; 64]> {
    blob.try_into().map_err(|_| Error::Corrupt {
        what: "signature in the hub log".into(),
        reason: format!("seq {seq}"),
    })
}

fn hash_from(blob: Vec<u8>) -> Result<ChangeHash> {
    let bytes: [u8; 32] = blob.try_into().map_err(|b: Vec<u8>| Error::Corrupt {
        what: "change hash".into(),
        reason: format!("{} bytes instead of 32", b.len()),
    })?;
    Ok(ChangeHash(bytes))
}

fn target_filter(target: &Target) -> (&'static str, String) {
    match target {
        Target::Doc(d) => ("doc = ?3", d.as_str().to_owned()),
        Target::Prefix(p) => ("substr(doc, 1, length(?3)) = ?3", p.as_str().to_owned()),
    }
}

/// The grants table of a hub store file (the live store, or a backup of one).
pub(crate) fn read_grants(conn: &Connection) -> Result<Vec<Grant>> {
    let mut st = conn
        .prepare_cached(
            "SELECT peer, prefix, can_read, can_write, can_relay FROM grants ORDER BY peer, prefix",
        )
        .ctx("reading grants")?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .ctx("reading grants")?;
    let mut out = Vec::new();
    for row in rows {
        let (peer, prefix, read, write, relay) = row.ctx("reading grants")?;
        let peer: [u8; 32] = peer.try_into().map_err(|_| Error::Corrupt {
            what: "grant".into(),
            reason: "key length".into(),
        })?;
        let prefix = DocPrefix::new(prefix).map_err(|e| Error::Corrupt {
            what: "grant".into(),
            reason: e.to_string(),
        })?;
        out.push(Grant {
            peer: PeerId::from_bytes(peer),
            prefix,
            read,
            write,
            relay,
        });
    }
    Ok(out)
}

impl HubStore for SqliteHubStore {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn append(&mut self, changes: &[VerifiedChange]) -> Result<Vec<Appended>> {
        self.deferred.check()?;
        if !self.deferred.on {
            self.durable_writes()?;
            return self.append_now(changes);
        }
        // Unsynced (NORMAL), and left so for the next append: every other write sets FULL
        // again first (`durable_writes`).
        self.level.set(&self.conn, false)?;
        self.deferred.wait();
        self.append_now(changes)
    }

    fn set_deferred_sync(&mut self, on: bool) -> Result<()> {
        self.deferred.turn(on, &self.conn, None)?;
        if !on {
            self.durable_writes()?;
        }
        Ok(())
    }

    fn defers_sync(&self) -> bool {
        self.deferred.on
    }

    fn sync(&mut self) -> Result<()> {
        self.deferred.sync(&self.conn)
    }

    fn read_log(&mut self, target: &Target, after: Cursor, limit: usize) -> Result<LogBatch> {
        let tx = self.conn.transaction().ctx("reading the log")?;
        let end: i64 = tx
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM log")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .ctx("reading the log")?;
        let (filter, arg) = target_filter(target);
        let sql = format!(
            "SELECT seq, doc, bytes, signature, chain FROM log
             WHERE seq > ?1 AND seq <= ?2 AND {filter} ORDER BY seq LIMIT ?4"
        );
        let mut entries = Vec::new();
        {
            let mut st = tx.prepare_cached(&sql).ctx("reading the log")?;
            let rows = st
                .query_map(params![after.0 as i64, end, arg, limit as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Option<Vec<u8>>>(4)?,
                    ))
                })
                .ctx("reading the log")?;
            for row in rows {
                let (seq, doc, bytes, sig, chained) = row.ctx("reading the log")?;
                let signature = signature_from(sig, seq)?;
                let doc = DocId::new(doc).map_err(|e| Error::Corrupt {
                    what: "hub log".into(),
                    reason: e.to_string(),
                })?;
                entries.push(LogEntry {
                    cursor: Cursor(seq as u64),
                    doc,
                    change: SignedChange { bytes, signature },
                    chain: chain_from(chained, seq)?,
                });
            }
        }
        let full = entries.len() >= limit;
        let next = if full {
            entries.last().map_or(after, |e| e.cursor)
        } else {
            Cursor(end.max(after.0 as i64) as u64)
        };
        Ok(LogBatch {
            entries,
            next,
            at_end: !full,
        })
    }

    fn last_cursor(&mut self) -> Result<Cursor> {
        self.conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM log")
            .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            .map(|n| Cursor(n as u64))
            .ctx("reading the log end")
    }

    fn high_water(&mut self) -> Result<Cursor> {
        // AUTOINCREMENT: SQLite keeps the highest position it gave in `sqlite_sequence`, and
        // never gives one again.
        let given: i64 = self
            .conn
            .prepare_cached(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'log'), 0)",
            )
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .ctx("reading the log's highest position")?;
        Ok(Cursor(given.max(0) as u64))
    }

    fn dropped_upto(&mut self) -> Result<Cursor> {
        let upto: Option<i64> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'dropped_upto'")
            .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
            .ctx("reading the highest dropped position")?;
        match upto {
            Some(n) => Ok(Cursor(n.max(0) as u64)),
            None => self.high_water(),
        }
    }

    fn docs_page(
        &mut self,
        target: &Target,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<DocId>> {
        let (filter, arg) = target_filter(target);
        let sql = format!("SELECT doc FROM docs WHERE doc > ?1 AND {filter} ORDER BY doc LIMIT ?2");
        let mut st = self.conn.prepare_cached(&sql).ctx("listing documents")?;
        let rows = st
            .query_map(
                params![after.map_or("", |d| d.as_str()), limit as i64, arg],
                |r| r.get::<_, String>(0),
            )
            .ctx("listing documents")?;
        rows.map(|r| {
            DocId::new(r.ctx("listing documents")?).map_err(|e| Error::Corrupt {
                what: "hub docs".into(),
                reason: e.to_string(),
            })
        })
        .collect()
    }

    fn heads(&mut self, doc: &DocId) -> Result<DocHeads> {
        let graph = self.graph(doc)?;
        Ok(complete_heads(
            graph.iter().map(|(_, h, d)| (*h, d.as_slice())),
        ))
    }

    fn grants(&mut self) -> Result<Vec<Grant>> {
        read_grants(&self.conn)
    }

    fn put_grant(&mut self, grant: &Grant) -> Result<()> {
        self.durable_writes()?;
        let tx = self.conn.transaction().ctx("granting")?;
        tx.execute(
            "INSERT OR REPLACE INTO grants (peer, prefix, can_read, can_write, can_relay) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &grant.peer.as_bytes()[..],
                grant.prefix.as_str(),
                grant.read,
                grant.write,
                grant.relay
            ],
        )
        .ctx("granting")?;
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'grants_version'",
            [],
        )
        .ctx("granting")?;
        tx.commit().ctx("granting")
    }

    fn revoke(&mut self, peer: &PeerId, prefix: Option<&DocPrefix>) -> Result<usize> {
        self.durable_writes()?;
        let tx = self.conn.transaction().ctx("revoking")?;
        let n = match prefix {
            Some(p) => tx.execute(
                "DELETE FROM grants WHERE peer = ?1 AND prefix = ?2",
                params![&peer.as_bytes()[..], p.as_str()],
            ),
            None => tx.execute(
                "DELETE FROM grants WHERE peer = ?1",
                params![&peer.as_bytes()[..]],
            ),
        }
        .ctx("revoking")?;
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'grants_version'",
            [],
        )
        .ctx("revoking")?;
        tx.commit().ctx("revoking")?;
        Ok(n)
    }

    fn grants_version(&mut self) -> Result<u64> {
        // Cached: polled every 250 ms by default.
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'grants_version'")
            .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            .map(|v| v.max(0) as u64)
            .ctx("reading the grants version")
    }

    fn peer_state(&mut self, peer: &PeerId) -> Result<PeerState> {
        let row: Option<(Vec<u8>, i64, Vec<u8>, i64)> = self
            .conn
            .prepare_cached(
                "SELECT recv_epoch, recv_cursor, push_epoch, pushed FROM peers WHERE peer = ?1",
            )
            .and_then(|mut st| {
                st.query_row([&peer.as_bytes()[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .ctx("reading a peer's sync state")?;
        let Some((re, rc, pe, pc)) = row else {
            return Ok(PeerState::default());
        };
        let epoch = |b: Vec<u8>| -> Result<Epoch> {
            Ok(Epoch(b.try_into().map_err(|_| Error::Corrupt {
                what: "peer epoch".into(),
                reason: "length".into(),
            })?))
        };
        Ok(PeerState {
            recv_epoch: epoch(re)?,
            recv_cursor: Cursor(rc.max(0) as u64),
            push_epoch: epoch(pe)?,
            pushed: Cursor(pc.max(0) as u64),
        })
    }

    fn set_peer_state(&mut self, peer: &PeerId, state: &PeerState) -> Result<()> {
        self.durable_writes()?;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO peers (peer, recv_epoch, recv_cursor, push_epoch, pushed)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    &peer.as_bytes()[..],
                    &state.recv_epoch.0[..],
                    state.recv_cursor.0 as i64,
                    &state.push_epoch.0[..],
                    state.pushed.0 as i64
                ])
            })
            .ctx("recording a peer's sync state")?;
        Ok(())
    }

    fn changes_not_covered(
        &mut self,
        doc: &DocId,
        have: &[ChangeHash],
    ) -> Result<Vec<SignedChange>> {
        let graph = self.graph(doc)?;
        let wanted = uncovered_positions(&graph, have);
        let mut st = self
            .conn
            .prepare_cached("SELECT bytes, signature FROM log WHERE seq = ?1")
            .ctx("reading changes")?;
        let mut out = Vec::with_capacity(wanted.len());
        for seq in wanted {
            let (bytes, sig): (Vec<u8>, Vec<u8>) = st
                .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .ctx("reading changes")?;
            let signature: [u8; 64] = sig.try_into().map_err(|_| Error::Corrupt {
                what: "signature in the hub log".into(),
                reason: format!("seq {seq}"),
            })?;
            out.push(SignedChange { bytes, signature });
        }
        Ok(out)
    }

    fn drop_doc(&mut self, doc: &DocId, limit: usize) -> Result<Dropped> {
        self.durable_writes()?;
        const WHAT: &str = "dropping an expired document";
        let tx = self.conn.transaction().ctx(WHAT)?;
        let limit = limit.min(i64::MAX as usize) as i64;
        tx.prepare_cached(
            "UPDATE meta SET value = max(value,
                 coalesce((SELECT max(seq) FROM
                     (SELECT seq FROM log WHERE doc = ?1 ORDER BY seq LIMIT ?2)), 0))
             WHERE key = 'dropped_upto'",
        )
        .and_then(|mut st| st.execute(params![doc.as_str(), limit]))
        .ctx(WHAT)?;
        let changes = tx
            .prepare_cached(
                "DELETE FROM log WHERE seq IN
                     (SELECT seq FROM log WHERE doc = ?1 ORDER BY seq LIMIT ?2)",
            )
            .and_then(|mut st| st.execute(params![doc.as_str(), limit]))
            .ctx(WHAT)?;
        let left: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM log WHERE doc = ?1)")
            .and_then(|mut st| st.query_row([doc.as_str()], |r| r.get(0)))
            .ctx(WHAT)?;
        if !left {
            tx.execute("DELETE FROM docs WHERE doc = ?1", [doc.as_str()])
                .ctx(WHAT)?;
        }
        // A snapshot would still hold the dropped changes.
        tx.execute("DELETE FROM snapshots WHERE doc = ?1", [doc.as_str()])
            .ctx(WHAT)?;
        tx.commit().ctx(WHAT)?;
        Ok(Dropped {
            changes: changes as u64,
            gone: !left,
        })
    }

    fn put_snapshot(&mut self, doc: &DocId, snap: &HubSnapshot) -> Result<()> {
        self.durable_writes()?;
        self.conn
            .prepare_cached(
                "INSERT INTO snapshots (doc, epoch, upto, changes, data, heads)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (doc) DO UPDATE SET epoch = excluded.epoch, upto = excluded.upto,
                   changes = excluded.changes, data = excluded.data, heads = excluded.heads",
            )
            .and_then(|mut st| {
                st.execute(params![
                    doc.as_str(),
                    &snap.epoch.0[..],
                    snap.upto.0 as i64,
                    snap.changes as i64,
                    &snap.snapshot.data,
                    crate::snapshot::encode_heads(&snap.snapshot.signed),
                ])
            })
            .ctx("storing a snapshot")?;
        Ok(())
    }

    fn snapshot(&mut self, doc: &DocId) -> Result<Option<HubSnapshot>> {
        const WHAT: &str = "reading a snapshot";
        let row = self
            .conn
            .prepare_cached(
                "SELECT epoch, upto, changes, data, heads FROM snapshots WHERE doc = ?1",
            )
            .and_then(|mut st| {
                st.query_row([doc.as_str()], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                })
                .optional()
            })
            .ctx(WHAT)?;
        row.map(|(e, upto, changes, data, heads)| {
            stored_snapshot(doc, &e, upto, changes, data, &heads)
        })
        .transpose()
    }

    fn snapshot_meta(&mut self, doc: &DocId) -> Result<Option<SnapshotMeta>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT epoch, upto, changes, length(data) FROM snapshots WHERE doc = ?1",
            )
            .and_then(|mut st| {
                st.query_row([doc.as_str()], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .optional()
            })
            .ctx("reading a snapshot")?;
        row.map(|(e, upto, changes, bytes)| {
            Ok(SnapshotMeta {
                epoch: snapshot_epoch(doc, &e)?,
                upto: Cursor(upto.max(0) as u64),
                changes: changes.max(0) as u64,
                bytes: bytes.max(0) as u64,
            })
        })
        .transpose()
    }

    fn count_changes(&mut self, doc: &DocId, after: Cursor, upto: Cursor) -> Result<u64> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM log WHERE doc = ?1 AND seq > ?2 AND seq <= ?3")
            .and_then(|mut st| {
                st.query_row(params![doc.as_str(), after.0 as i64, upto.0 as i64], |r| {
                    r.get(0)
                })
            })
            .ctx("counting changes")?;
        Ok(n.max(0) as u64)
    }
}

/// A snapshot row's epoch, or the error naming the document.
pub fn snapshot_epoch(doc: &DocId, bytes: &[u8]) -> Result<Epoch> {
    bytes.try_into().map(Epoch).map_err(|_| Error::Corrupt {
        what: format!("snapshot of {doc}"),
        reason: format!("an epoch of {} bytes", bytes.len()),
    })
}

/// A snapshot as read from a store row (SQLite or PostgreSQL).
pub fn stored_snapshot(
    doc: &DocId,
    epoch: &[u8],
    upto: i64,
    changes: i64,
    data: Vec<u8>,
    heads: &[u8],
) -> Result<HubSnapshot> {
    let signed = crate::snapshot::decode_heads(heads).ok_or_else(|| Error::Corrupt {
        what: format!("snapshot of {doc}"),
        reason: format!("a signed-heads column of {} bytes", heads.len()),
    })?;
    Ok(HubSnapshot {
        epoch: snapshot_epoch(doc, epoch)?,
        upto: Cursor(upto.max(0) as u64),
        changes: changes.max(0) as u64,
        snapshot: crate::snapshot::Snapshot { data, signed },
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn the_sqlite_store_keeps_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        crate::store::contract::check(
            &mut SqliteHubStore::open(&dir.path().join("hub.db")).unwrap(),
        );
    }

    #[test]
    fn grants_persist_and_every_change_bumps_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let peer = PeerId::from_bytes([3; 32]);
        let all = DocPrefix::all();
        let sites = DocPrefix::new("sites/").unwrap();
        {
            let mut s = SqliteHubStore::open(&path).unwrap();
            assert_eq!(s.grants_version().unwrap(), 0);
            s.put_grant(&Grant {
                peer,
                prefix: all.clone(),
                read: true,
                write: false,
                relay: false,
            })
            .unwrap();
            s.put_grant(&Grant {
                peer,
                prefix: sites.clone(),
                read: true,
                write: true,
                relay: false,
            })
            .unwrap();
            // Replacing a grant on the same prefix.
            s.put_grant(&Grant {
                peer,
                prefix: all.clone(),
                read: true,
                write: true,
                relay: true,
            })
            .unwrap();
            assert_eq!(s.grants_version().unwrap(), 3);
        }
        let mut s = SqliteHubStore::open(&path).unwrap();
        let g = s.grants().unwrap();
        assert_eq!(g.len(), 2);
        assert!(g.iter().all(|g| g.write));
        assert!(g.iter().any(|g| g.relay && g.prefix == all));
        assert_eq!(s.revoke(&peer, Some(&sites)).unwrap(), 1);
        assert_eq!(s.revoke(&peer, None).unwrap(), 1);
        assert!(s.grants().unwrap().is_empty());
        assert_eq!(s.grants_version().unwrap(), 5);
    }

    #[test]
    fn heads_leave_out_changes_whose_history_is_missing() {
        let h = |n: u8| ChangeHash([n; 32]);
        // 1 <- 2 <- 3, and 5 depends on the missing 4.
        let graph = [
            (h(1), vec![]),
            (h(2), vec![h(1)]),
            (h(3), vec![h(2)]),
            (h(5), vec![h(4)]),
        ];
        let heads = complete_heads(graph.iter().map(|(a, d)| (*a, d.as_slice())));
        assert_eq!(
            heads,
            DocHeads {
                heads: vec![h(3)],
                complete: false
            }
        );
        let full = [(h(1), vec![]), (h(2), vec![h(1)]), (h(3), vec![h(1)])];
        let heads = complete_heads(full.iter().map(|(a, d)| (*a, d.as_slice())));
        assert_eq!(
            heads,
            DocHeads {
                heads: vec![h(2), h(3)],
                complete: true
            }
        );
    }

    /// With deferred syncs, an append leaves the connection at NORMAL for the next append;
    /// every other write runs at FULL, durable at its own commit.
    #[test]
    fn with_deferred_syncs_only_appends_commit_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteHubStore::open(&dir.path().join("hub.db")).unwrap();
        let level = |s: &SqliteHubStore| -> i64 {
            s.conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        assert_eq!(level(&s), FULL);
        s.set_deferred_sync(true).unwrap();
        let who = crate::identity::Identity::generate();
        let doc = DocId::new("d/1").unwrap();
        let changes = signed_changes(&who, &doc, [1; 8], 1, 8);
        let peer = PeerId::from_bytes([3; 32]);
        let grant = Grant {
            peer,
            prefix: DocPrefix::all(),
            read: true,
            write: true,
            relay: false,
        };
        let snapshot = HubSnapshot {
            epoch: s.epoch(),
            upto: Cursor(1),
            changes: 1,
            snapshot: crate::snapshot::Snapshot {
                data: Vec::new(),
                signed: Vec::new(),
            },
        };
        type Write = Box<dyn Fn(&mut SqliteHubStore)>;
        let writes: Vec<(&str, Write)> = vec![
            ("put_grant", Box::new(move |s| s.put_grant(&grant).unwrap())),
            (
                "revoke",
                Box::new(move |s| {
                    s.revoke(&peer, None).unwrap();
                }),
            ),
            (
                "set_peer_state",
                Box::new(move |s| s.set_peer_state(&peer, &PeerState::default()).unwrap()),
            ),
            (
                "put_snapshot",
                Box::new({
                    let doc = doc.clone();
                    move |s| s.put_snapshot(&doc, &snapshot).unwrap()
                }),
            ),
            (
                "new_epoch",
                Box::new(|s| {
                    s.new_epoch().unwrap();
                }),
            ),
            (
                "drop_doc",
                Box::new({
                    let doc = doc.clone();
                    move |s| {
                        s.drop_doc(&doc, 100).unwrap();
                    }
                }),
            ),
        ];
        for ((name, write), change) in writes.iter().zip(&changes) {
            s.append(std::slice::from_ref(change)).unwrap();
            assert_eq!(level(&s), NORMAL, "an append commits unsynced");
            write(&mut s);
            assert_eq!(level(&s), FULL, "{name} after an append");
            s.sync().unwrap();
        }
        s.append(&changes[7..]).unwrap();
        s.set_deferred_sync(false).unwrap();
        assert_eq!(level(&s), FULL, "deferral off");
    }

    /// `n` changes by `who` to `doc`, each one key put, made under actor instance `instance`.
    pub(crate) fn signed_changes(
        who: &crate::identity::Identity,
        doc: &DocId,
        instance: [u8; 8],
        value: i64,
        n: usize,
    ) -> Vec<VerifiedChange> {
        use automerge::transaction::Transactable;
        let mut am = automerge::Automerge::new();
        am.set_actor(crate::change::actor_for(&who.peer_id(), instance));
        (0..n)
            .map(|i| {
                let mut tx = am.transaction();
                tx.put(automerge::ROOT, format!("k{i}"), value).unwrap();
                tx.commit();
                let c = am.get_last_local_change().unwrap();
                crate::change::sign(who, doc, c).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_resent_change_is_a_duplicate_and_a_second_change_under_its_actor_seq_a_conflict() {
        let who = crate::identity::Identity::generate();
        let doc = DocId::new("d/1").unwrap();
        let other_doc = DocId::new("d/2").unwrap();
        let mut s = SqliteHubStore::open_in_memory().unwrap();
        let first = signed_changes(&who, &doc, [1; 8], 1, 3);
        let got = s.append(&first).unwrap();
        assert!(
            matches!(
                got[..],
                [
                    Appended::Stored(Position {
                        cursor: Cursor(1),
                        ..
                    }),
                    Appended::Stored(Position {
                        cursor: Cursor(2),
                        ..
                    }),
                    Appended::Stored(Position {
                        cursor: Cursor(3),
                        ..
                    })
                ]
            ),
            "{got:?}"
        );
        // The same changes again (a replica that did not get the Ack), and twice in a group.
        let mut again = first.clone();
        again.push(first[0].clone());
        assert!(
            s.append(&again)
                .unwrap()
                .iter()
                .all(|a| matches!(a, Appended::Duplicate(_)))
        );
        // A copied store: same actor, same sequence numbers, different values.
        let forked = signed_changes(&who, &doc, [1; 8], 2, 1);
        assert_eq!(
            s.append(&forked).unwrap(),
            vec![Appended::Conflict {
                existing: first[0].hash()
            }]
        );
        // Another instance of the same author, and the same actor in another document, are
        // different changes.
        let other_instance = signed_changes(&who, &doc, [2; 8], 2, 1);
        let same_actor_other_doc = signed_changes(&who, &other_doc, [1; 8], 2, 1);
        // (Refused inserts use up positions: positions grow, with gaps.)
        let got = s
            .append(&[other_instance, same_actor_other_doc].concat())
            .unwrap();
        assert!(
            matches!(got[..], [Appended::Stored(a), Appended::Stored(b)] if 3 < a.cursor.0 && a.cursor < b.cursor),
            "{got:?}"
        );
        assert_eq!(s.change_count().unwrap(), 5);
    }

    #[test]
    fn a_version_3_log_is_indexed_by_actor_and_seq_when_opened() {
        let who = crate::identity::Identity::generate();
        let doc = DocId::new("d/1").unwrap();
        let changes = signed_changes(&who, &doc, [7; 8], 1, 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let conn = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                conn.execute_batch(m).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                [&[9u8; 16][..]],
            )
            .unwrap();
            for c in &changes {
                conn.execute(
                    "INSERT OR IGNORE INTO docs (doc) VALUES (?1)",
                    [doc.as_str()],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO log (doc, hash, deps, author, signature, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        doc.as_str(),
                        &c.hash().0[..],
                        hashes_to_blob(&c.deps()),
                        &who.peer_id().as_bytes()[..],
                        &c.signed().signature[..],
                        &c.signed().bytes
                    ],
                )
                .unwrap();
            }
        }
        let mut s = SqliteHubStore::open(&path).unwrap();
        assert_eq!(s.epoch(), Epoch([9; 16]));
        assert_eq!(s.change_count().unwrap(), 4);
        assert!(
            s.append(&changes)
                .unwrap()
                .iter()
                .all(|a| matches!(a, Appended::Duplicate(_)))
        );
        let next = signed_changes(&who, &doc, [7; 8], 1, 5).pop().unwrap();
        // Positions go on after the migrated ones.
        let got = s.append(&[next]).unwrap();
        assert!(
            matches!(got[..], [Appended::Stored(p)] if p.cursor.0 > 4),
            "{got:?}"
        );
        let page = s
            .read_log(&Target::Doc(doc.clone()), Cursor(0), 100)
            .unwrap();
        assert_eq!(page.entries.len(), 5);
    }

    #[test]
    fn a_version_5_log_is_chained_when_opened_as_its_commits_would_have_chained_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let who = crate::identity::Identity::generate();
        let doc = DocId::new("d/1").unwrap();
        let all = Target::Prefix(DocPrefix::all());
        let chains = |s: &mut SqliteHubStore| -> Vec<Option<Mark>> {
            let log = s.read_log(&all, Cursor(0), 100).unwrap().entries;
            log.into_iter().map(|e| e.chain).collect()
        };
        let appended = {
            let mut s = SqliteHubStore::open(&path).unwrap();
            for (i, n) in [(1, 3), (2, 1), (3, 4)] {
                s.append(&signed_changes(&who, &doc, [i; 8], 0, n)).unwrap();
            }
            chains(&mut s)
        };
        assert_eq!(appended.len(), 8);
        assert!(appended.iter().all(Option::is_some));
        // The same file as schema version 5 wrote it: no chain column.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("ALTER TABLE log DROP COLUMN chain; PRAGMA user_version = 5;")
                .unwrap();
        }
        let mut s = SqliteHubStore::open(&path).unwrap();
        assert_eq!(chains(&mut s), appended, "chained at open, in log order");
        // Appends go on from the migrated chain.
        let next = signed_changes(&who, &doc, [4; 8], 0, 1);
        let got = s.append(&next).unwrap();
        let expected = chain(appended[7].as_ref(), &next[0].signed().signature);
        assert!(
            matches!(got[..], [Appended::Stored(p)] if p.mark == expected),
            "{got:?}"
        );
        // A change stored without its chain since (a hub of the older version still running
        // on the file): the next append refuses rather than chain on from before it.
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE log SET chain = NULL WHERE seq = 9", [])
            .unwrap();
        let more = signed_changes(&who, &doc, [5; 8], 0, 1);
        let e = s.append(&more).unwrap_err().to_string();
        assert!(e.contains("older version"), "{e}");
        assert_eq!(s.change_count().unwrap(), 9, "nothing stored");
    }
}
