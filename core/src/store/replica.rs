//! A replica's SQLite file: documents (snapshot plus incremental signed changes), the outbox
//! of local changes the hub has not acknowledged, subscriptions with their cursors.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::change::{SignedChange, VerifiedChange};
use crate::error::{Error, Result, SqlContext};
use crate::ids::{ChangeHash, Cursor, DocId, Epoch};
use crate::store::sqlite;
use crate::wire::{Mark, Position, Target};

const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE docs (
        doc TEXT PRIMARY KEY,
        snapshot BLOB,
        incremental_bytes INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    -- Every verified change the replica holds. `bytes` is NULL once the change is inside the
    -- document's snapshot; the signature stays so the change can be re-uploaded and proven.
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        doc TEXT NOT NULL REFERENCES docs(doc),
        hash BLOB NOT NULL,
        signature BLOB NOT NULL,
        bytes BLOB,
        UNIQUE (doc, hash)
    );
    CREATE INDEX changes_incremental ON changes (doc, id) WHERE bytes IS NOT NULL;
    -- Changes to upload, in the order they were made. A row leaves when the hub acknowledges.
    -- AUTOINCREMENT: ids are never reused, so a session's sent-up-to mark stays valid.
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        doc TEXT NOT NULL,
        hash BLOB NOT NULL,
        rejected TEXT,
        UNIQUE (doc, hash)
    );
    -- `last_epoch`: the hub log this replica last exchanged changes with.
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE subscriptions (
        target TEXT PRIMARY KEY,
        epoch BLOB NOT NULL,
        cursor INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Version 2: snapshots in a table of their own. In the `docs` row, which every stored
    // change updated, a snapshot of hundreds of KB was copied two to three times per change.
    "CREATE TABLE snapshots (doc TEXT PRIMARY KEY REFERENCES docs(doc), data BLOB NOT NULL);
    INSERT INTO snapshots (doc, data) SELECT doc, snapshot FROM docs WHERE snapshot IS NOT NULL;
    ALTER TABLE docs DROP COLUMN snapshot;",
    // Version 3: whether a change's own signature was checked. A change the replica accepted
    // on a later change of its author (`change::verify_docs_covered`) holds the signature the
    // hub relayed, unchecked: it is checked before the change is uploaded again.
    "ALTER TABLE changes ADD COLUMN checked INTEGER NOT NULL DEFAULT 1;",
    // Version 4: the signature of the change at each subscription's cursor (protocol version
    // 3), NULL where unknown: the hub checks it to notice a log rolled back and grown again.
    "ALTER TABLE subscriptions ADD COLUMN mark BLOB;",
];

/// Bytes of the `written` meta value: an epoch, a position (big-endian), a mark.
const WRITTEN_LEN: usize = 16 + 8 + 64;

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// What it follows.
    pub target: Target,
    /// The hub log its cursor belongs to ([`Epoch::none`] before the first catch-up).
    pub epoch: Epoch,
    /// The last position received.
    pub cursor: Cursor,
    /// The signature of the change at `cursor`, when the replica knows it.
    pub mark: Option<Mark>,
}

/// A document as stored: its snapshot (if compacted) and the changes not in it.
#[derive(Debug, Default)]
pub struct StoredDoc {
    /// `Automerge::save` output, if the document was compacted.
    pub snapshot: Option<Vec<u8>>,
    /// Changes not in the snapshot, in the order they were stored.
    pub changes: Vec<Vec<u8>>,
    /// Their total size in bytes.
    pub incremental_bytes: u64,
}

/// A change as the replica stores it.
#[derive(Debug, Clone)]
pub struct StoredChange {
    /// The document.
    pub doc: DocId,
    /// The change hash.
    pub hash: ChangeHash,
    /// The author's signature.
    pub signature: [u8; 64],
    /// The change bytes, or `None` once they live only in the document's snapshot.
    pub bytes: Option<Vec<u8>>,
    /// Whether the signature was checked when the change was stored (see
    /// [`VerifiedChange::signature_checked`]).
    pub checked: bool,
}

/// One outbox row to upload.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Row id (increasing).
    pub row: i64,
    /// The document.
    pub doc: DocId,
    /// The change hash.
    pub hash: ChangeHash,
    /// The signed change, or `None` if its bytes must come from the document (compacted).
    pub signed: Option<SignedChange>,
    /// The signature.
    pub signature: [u8; 64],
    /// Whether the signature was checked when the change was stored: one that was not is
    /// checked before it is uploaded (see [`VerifiedChange::signature_checked`]).
    pub checked: bool,
}

/// A replica's store. One process owns it: it is not shared between writers.
pub struct ReplicaStore {
    conn: Connection,
    /// `synchronous`: FULL as opened, NORMAL after a
    /// [`received_batch`](Self::received_batch) or an [`ack_outbox`](Self::ack_outbox).
    level: sqlite::SyncLevel,
    /// The syncs of local batches, when they are deferred
    /// ([`set_deferred_sync`](Self::set_deferred_sync)).
    deferred: sqlite::DeferredSync,
    /// The store's key, for the connection of its background checkpoints.
    key: Option<crate::store::StoreKey>,
    /// The highest outbox row committed through this store (or there at its opening): no
    /// row lies after it, so [`outbox_after`](Self::outbox_after) answers from memory
    /// there. A replica reads the outbox after every message, and a reader's every live
    /// change would otherwise start a read transaction to find it empty. (One store per
    /// file at a time, as the replica's document cache already assumes.)
    outbox_end: i64,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaStore")
    }
}

/// Writes grouped in one transaction: nothing is durable (nor acknowledged) before
/// [`WriteBatch::commit`] returns.
pub struct WriteBatch<'a> {
    tx: rusqlite::Transaction<'a>,
    /// Bytes of new changes per document of this batch: each document's row is created and
    /// updated once per batch, at commit, not once per change.
    added: std::collections::HashMap<DocId, i64>,
    /// The store's [`ReplicaStore::outbox_end`], raised to `outbox_end` once committed.
    store_outbox_end: &'a mut i64,
    /// The highest outbox row this batch added.
    outbox_end: i64,
}

fn signature_from(blob: Vec<u8>) -> Result<[u8; 64]> {
    blob.try_into().map_err(|b: Vec<u8>| Error::Corrupt {
        what: "signature".into(),
        reason: format!("{} bytes instead of 64", b.len()),
    })
}

fn hash_from(blob: Vec<u8>) -> Result<ChangeHash> {
    let a: [u8; 32] = blob.try_into().map_err(|b: Vec<u8>| Error::Corrupt {
        what: "change hash".into(),
        reason: format!("{} bytes instead of 32", b.len()),
    })?;
    Ok(ChangeHash(a))
}

fn doc_from(s: String) -> Result<DocId> {
    DocId::new(s).map_err(|e| Error::Corrupt {
        what: "document id".into(),
        reason: e.to_string(),
    })
}

impl ReplicaStore {
    /// Opens or creates the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_keyed(path, None)
    }

    /// Opens or creates the store at `path`, encrypted with `key` if given (SQLCipher: the
    /// `encryption` feature).
    pub fn open_keyed(path: &Path, key: Option<&crate::store::StoreKey>) -> Result<Self> {
        Self::init(
            sqlite::open_keyed(path, "replica", MIGRATIONS, 16, key)?,
            key.cloned(),
        )
    }

    fn init(conn: Connection, key: Option<crate::store::StoreKey>) -> Result<Self> {
        let outbox_end = conn
            .query_row("SELECT coalesce(max(id), 0) FROM outbox", [], |r| r.get(0))
            .ctx("reading the outbox")?;
        Ok(ReplicaStore {
            conn,
            level: sqlite::SyncLevel::default(),
            deferred: sqlite::DeferredSync::default(),
            key,
            outbox_end,
        })
    }

    /// Bounds the store file to about `bytes` (SQLite's `max_page_count`): a write that would
    /// grow it further is refused with [`Error::StorageFull`](crate::Error::StorageFull) and
    /// stores nothing; space freed inside the file (the outbox emptied by the hub's
    /// acknowledgements, compaction) is reused, so writing resumes by itself once the hub has
    /// taken what waited. A store already larger than the bound keeps its size and cannot grow.
    /// The WAL is outside the bound: with checkpoints in the background, it is checkpointed
    /// at a quarter of the bound (at least 4 MiB) and restarted within 4 MiB after that.
    pub fn set_max_bytes(&self, bytes: u64) -> Result<()> {
        let page: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .ctx("reading the page size")?;
        let pages = bytes.div_ceil(page.max(512) as u64).max(1);
        self.conn
            .pragma_update(None, "max_page_count", pages as i64)
            .ctx("bounding the store's size")?;
        self.deferred.bound_changed(&self.conn);
        Ok(())
    }

    /// A store in memory (lost when dropped).
    pub fn open_in_memory() -> Result<Self> {
        Self::init(sqlite::open_in_memory("replica", MIGRATIONS)?, None)
    }

    /// Starts a group of writes that is durable once committed (`synchronous=FULL`: the WAL
    /// is synced at the commit): local writes, subscriptions, anything acknowledged to an app.
    pub fn batch(&mut self) -> Result<WriteBatch<'_>> {
        self.begin(true)
    }

    /// Starts a group of local writes (an app's changes, with their outbox entries): a
    /// [`batch`](Self::batch), durable once committed; or, with deferred syncs, committed
    /// unsynced and durable once [`sync`](Self::sync) returns.
    pub fn local_batch(&mut self) -> Result<WriteBatch<'_>> {
        self.deferred.check()?;
        if self.deferred.on {
            self.deferred.wait();
            self.begin(false)
        } else {
            self.begin(true)
        }
    }

    /// Defers the sync of local writes: [`local_batch`](Self::local_batch) commits at
    /// `synchronous=NORMAL` (written to the WAL, in the OS's page cache: a process crash loses
    /// nothing), and [`sync`](Self::sync) makes them durable. The replica thread turns it on
    /// so that an app's change goes out to the hub while its fsync runs; it answers the app
    /// only after the sync (`ReplicaHandle::call`). Turning it off syncs what waits.
    pub fn set_deferred_sync(&mut self, on: bool) -> Result<()> {
        self.deferred.turn(on, &self.conn, self.key.as_ref())
    }

    /// Whether local writes have committed since the last [`sync`](Self::sync) without being
    /// synced to disk.
    pub fn unsynced(&self) -> bool {
        self.deferred.unsynced()
    }

    /// Makes every commit so far durable ([`sqlite::DeferredSync`]). If this fails, the
    /// writes since the last sync may be lost in a power cut (a process crash loses nothing):
    /// the error says so, and the store refuses local writes until it is reopened.
    pub fn sync(&mut self) -> Result<()> {
        self.deferred.sync(&self.conn)
    }

    /// Starts a group of writes of changes received from the hub, with the cursors they
    /// advance: atomic, but not synced at its commit (`synchronous=NORMAL`). A power cut may
    /// roll back the last such commits, cursors with their changes, which the hub (holding
    /// them durably since before it relayed them) sends again; the next durable commit syncs
    /// the WAL, these with it, so a local write never outlives a received change it builds
    /// on. A process crash loses nothing (the WAL is in the OS's page cache). This takes the
    /// third fsync off a remote change's way to visible (writer, hub, reader).
    pub fn received_batch(&mut self) -> Result<WriteBatch<'_>> {
        self.begin(false)
    }

    fn begin(&mut self, synced: bool) -> Result<WriteBatch<'_>> {
        self.set_synced(synced)?;
        Ok(WriteBatch {
            tx: self.conn.transaction().ctx("starting a write")?,
            added: std::collections::HashMap::new(),
            store_outbox_end: &mut self.outbox_end,
            outbox_end: 0,
        })
    }

    /// Sets `synchronous` to FULL or NORMAL, if it is not that already. Every write but a
    /// [`received_batch`](Self::received_batch) and an [`ack_outbox`](Self::ack_outbox) sets
    /// FULL first.
    fn set_synced(&mut self, full: bool) -> Result<()> {
        self.level.set(&self.conn, full)
    }

    /// Whether the last write committed synced (`synchronous=FULL`), for tests.
    #[cfg(test)]
    pub(crate) fn commits_synced(&self) -> bool {
        self.conn
            .pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))
            .is_ok_and(|level| level >= 2)
    }

    /// The documents held, in id order.
    pub fn doc_ids(&self) -> Result<Vec<DocId>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT doc FROM docs ORDER BY doc")
            .ctx("listing documents")?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .ctx("listing documents")?;
        rows.map(|r| doc_from(r.ctx("listing documents")?))
            .collect()
    }

    /// The documents held whose id starts with `prefix`, in id order (an index range: ids
    /// are printable ASCII, below `\x7f`).
    pub fn doc_ids_with_prefix(&self, prefix: &str) -> Result<Vec<DocId>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT doc FROM docs WHERE doc >= ?1 AND doc < ?1 || char(127) ORDER BY doc",
            )
            .ctx("listing documents")?;
        let rows = st
            .query_map([prefix], |r| r.get::<_, String>(0))
            .ctx("listing documents")?;
        rows.map(|r| doc_from(r.ctx("listing documents")?))
            .collect()
    }

    /// Changes of `doc` waiting for the hub's acknowledgement (refused ones not counted).
    pub fn unacknowledged(&self, doc: &DocId) -> Result<u64> {
        self.conn
            .prepare_cached("SELECT count(*) FROM outbox WHERE doc = ?1 AND rejected IS NULL")
            .and_then(|mut st| st.query_row([doc.as_str()], |r| r.get::<_, i64>(0)))
            .map(|n| n.max(0) as u64)
            .ctx("counting a document's outbox")
    }

    /// Forgets a document locally, in one transaction: its changes, snapshot, refused outbox
    /// entries and subscription. The caller checks that nothing of it awaits the hub.
    pub fn forget_doc(&mut self, doc: &DocId) -> Result<()> {
        self.set_synced(true)?;
        let tx = self.conn.transaction().ctx("forgetting a document")?;
        for sql in [
            "DELETE FROM outbox WHERE doc = ?1",
            "DELETE FROM changes WHERE doc = ?1",
            "DELETE FROM snapshots WHERE doc = ?1",
            "DELETE FROM docs WHERE doc = ?1",
        ] {
            tx.execute(sql, [doc.as_str()])
                .ctx("forgetting a document")?;
        }
        tx.execute(
            "DELETE FROM subscriptions WHERE target = ?1",
            [Target::Doc(doc.clone()).key()],
        )
        .ctx("forgetting a document")?;
        tx.commit().ctx("forgetting a document")
    }

    /// Whether the document is held.
    pub fn has_doc(&self, doc: &DocId) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM docs WHERE doc = ?1")
            .and_then(|mut st| st.exists([doc.as_str()]))
            .ctx("looking up a document")
    }

    /// Reads a document's snapshot and incremental changes.
    pub fn load_doc(&self, doc: &DocId) -> Result<Option<StoredDoc>> {
        let head = self
            .conn
            .prepare_cached(
                "SELECT s.data, d.incremental_bytes FROM docs d
                 LEFT JOIN snapshots s ON s.doc = d.doc WHERE d.doc = ?1",
            )
            .and_then(|mut st| {
                st.query_row([doc.as_str()], |r| {
                    Ok((r.get::<_, Option<Vec<u8>>>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
            })
            .ctx("loading a document")?;
        let Some((snapshot, incremental_bytes)) = head else {
            return Ok(None);
        };
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT bytes FROM changes WHERE doc = ?1 AND bytes IS NOT NULL ORDER BY id",
            )
            .ctx("loading changes")?;
        let changes = st
            .query_map([doc.as_str()], |r| r.get::<_, Vec<u8>>(0))
            .ctx("loading changes")?
            .collect::<Result<Vec<_>, _>>()
            .ctx("loading changes")?;
        Ok(Some(StoredDoc {
            snapshot,
            changes,
            incremental_bytes: incremental_bytes.max(0) as u64,
        }))
    }

    /// The signature stored for a change, and whether it was checked when the change was
    /// stored (`false`: the change was accepted on a later change of its author, and this is
    /// the signature its hub relayed). `None` for a change the store holds only inside a
    /// snapshot it received (the snapshot's signed heads cover it).
    pub fn signature(&self, doc: &DocId, hash: &ChangeHash) -> Result<Option<([u8; 64], bool)>> {
        let row = self
            .conn
            .prepare_cached("SELECT signature, checked FROM changes WHERE doc = ?1 AND hash = ?2")
            .and_then(|mut st| {
                st.query_row(params![doc.as_str(), &hash.0[..]], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?))
                })
                .optional()
            })
            .ctx("reading a signature")?;
        row.map(|(sig, checked)| Ok((signature_from(sig)?, checked)))
            .transpose()
    }

    /// Whether the change is stored.
    pub fn has_change(&self, doc: &DocId, hash: &ChangeHash) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM changes WHERE doc = ?1 AND hash = ?2")
            .and_then(|mut st| st.exists(params![doc.as_str(), &hash.0[..]]))
            .ctx("looking up a change")
    }

    /// Outbox rows after `after_row`, oldest first, at most `limit`.
    pub fn outbox_after(&self, after_row: i64, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.read_outbox(after_row, limit, false)
    }

    /// The rows of one document that come first after `after_row`: the rows after it, oldest
    /// first, up to the first row of another document, at most `limit` (what one push
    /// carries). The read stops there: a push of a writer that queued 20 changes each to ten
    /// documents read the other nine documents' rows too, and dropped them, ten times over.
    pub fn outbox_run(&self, after_row: i64, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.read_outbox(after_row, limit, true)
    }

    fn read_outbox(&self, after_row: i64, limit: usize, one_doc: bool) -> Result<Vec<OutboxEntry>> {
        if after_row >= self.outbox_end {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT o.id, o.doc, o.hash, c.signature, c.bytes, c.checked FROM outbox o
                 JOIN changes c ON c.doc = o.doc AND c.hash = o.hash
                 WHERE o.id > ?1 ORDER BY o.id LIMIT ?2",
            )
            .ctx("reading the outbox")?;
        let mut rows = st
            .query(params![after_row, limit as i64])
            .ctx("reading the outbox")?;
        let mut out: Vec<OutboxEntry> = Vec::new();
        while let Some(r) = rows.next().ctx("reading the outbox")? {
            let doc: String = r.get(1).ctx("reading the outbox")?;
            if one_doc && out.first().is_some_and(|first| first.doc.as_str() != doc) {
                break;
            }
            let signature = signature_from(r.get(3).ctx("reading the outbox")?)?;
            let bytes: Option<Vec<u8>> = r.get(4).ctx("reading the outbox")?;
            out.push(OutboxEntry {
                row: r.get(0).ctx("reading the outbox")?,
                doc: doc_from(doc)?,
                hash: hash_from(r.get(2).ctx("reading the outbox")?)?,
                signed: bytes.map(|bytes| SignedChange { bytes, signature }),
                signature,
                checked: r.get(5).ctx("reading the outbox")?,
            });
        }
        Ok(out)
    }

    /// The epoch of the hub log this replica last exchanged changes with.
    pub fn last_epoch(&self) -> Result<Epoch> {
        let v: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'last_epoch'", [], |r| {
                r.get(0)
            })
            .optional()
            .ctx("reading the last epoch")?;
        let Some(b) = v else { return Ok(Epoch::none()) };
        let bytes: [u8; 16] = b.try_into().map_err(|_| Error::Corrupt {
            what: "last epoch".into(),
            reason: "length".into(),
        })?;
        Ok(Epoch(bytes))
    }

    /// Removes one row from the outbox without an acknowledgement: a change this replica
    /// cannot upload (its signature, as relayed to it, does not verify).
    pub fn drop_outbox(&mut self, row: i64) -> Result<()> {
        self.set_synced(true)?;
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE id = ?1")
            .and_then(|mut st| st.execute([row]))
            .ctx("dropping an outbox row")?;
        Ok(())
    }

    /// Removes acknowledged rows from the outbox, recording the acknowledging hub's epoch in
    /// the same transaction. Not synced (`synchronous=NORMAL`), like a
    /// [`received_batch`](Self::received_batch): a power cut that rolls it back leaves the
    /// store as it was before the acknowledgement arrived, which a crash can always do; the
    /// rows are uploaded again and acknowledged where the hub holds them. The next durable
    /// commit syncs it. This saves a gateway one fsync per acknowledged push.
    /// With `at` (protocol version 3), the highest position of the push's changes becomes the
    /// replica's written position in `epoch` if it is higher than the one recorded there (a
    /// change sent again after a lost acknowledgement is acknowledged at its old position),
    /// or with `replace` (a repair from a rolled-back log: the old position names nothing
    /// now, even when higher).
    pub fn ack_outbox(
        &mut self,
        rows: &[i64],
        epoch: Epoch,
        at: Option<Position>,
        replace: bool,
    ) -> Result<()> {
        let at = match (at, self.written()?) {
            (Some(new), Some((e, old))) if !replace && e == epoch && old.cursor >= new.cursor => {
                None
            }
            (at, _) => at,
        };
        self.set_synced(false)?;
        let tx = self.conn.transaction().ctx("acknowledging uploads")?;
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_epoch', ?1)")
            .and_then(|mut st| st.execute([&epoch.0[..]]))
            .ctx("acknowledging uploads")?;
        if let Some(at) = at {
            let mut value = Vec::with_capacity(WRITTEN_LEN);
            value.extend_from_slice(&epoch.0);
            value.extend_from_slice(&at.cursor.0.to_be_bytes());
            value.extend_from_slice(&at.mark.0);
            tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('written', ?1)")
                .and_then(|mut st| st.execute([&value]))
                .ctx("acknowledging uploads")?;
        }
        {
            let mut st = tx
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .ctx("acknowledging uploads")?;
            for r in rows {
                st.execute([r]).ctx("acknowledging uploads")?;
            }
        }
        tx.commit().ctx("acknowledging uploads")
    }

    /// Forgets the written position (after a repair from a rolled-back log uploaded what it
    /// named).
    pub fn clear_written(&mut self) -> Result<()> {
        self.set_synced(true)?;
        self.conn
            .execute("DELETE FROM meta WHERE key = 'written'", [])
            .ctx("clearing the written position")?;
        Ok(())
    }

    /// The newest acknowledged position of this replica's own changes, with its log's epoch
    /// (protocol version 3; `None` before the first such acknowledgement).
    pub fn written(&self) -> Result<Option<(Epoch, Position)>> {
        // Cached: read at every acknowledgement.
        let v: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'written'")
            .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
            .ctx("reading the written position")?;
        let Some(v) = v else { return Ok(None) };
        let corrupt = || Error::Corrupt {
            what: "written position".into(),
            reason: format!("{} bytes, not {WRITTEN_LEN}", v.len()),
        };
        if v.len() != WRITTEN_LEN {
            return Err(corrupt());
        }
        let (epoch, rest) = v.split_at(16);
        let (cursor, mark) = rest.split_at(8);
        Ok(Some((
            Epoch(epoch.try_into().map_err(|_| corrupt())?),
            Position {
                cursor: Cursor(u64::from_be_bytes(
                    cursor.try_into().map_err(|_| corrupt())?,
                )),
                mark: Mark(mark.try_into().map_err(|_| corrupt())?),
            },
        )))
    }

    /// Marks rows as refused by the hub (they stay, and are offered again next session).
    pub fn reject_outbox(&mut self, rows: &[i64], reason: &str) -> Result<()> {
        self.set_synced(true)?;
        let tx = self.conn.transaction().ctx("recording a refusal")?;
        {
            let mut st = tx
                .prepare_cached("UPDATE outbox SET rejected = ?2 WHERE id = ?1")
                .ctx("recording a refusal")?;
            for r in rows {
                st.execute(params![r, reason]).ctx("recording a refusal")?;
            }
        }
        tx.commit().ctx("recording a refusal")
    }

    /// Rows waiting for the hub, and how many of them it refused.
    pub fn outbox_len(&self) -> Result<(u64, u64)> {
        self.conn
            .query_row("SELECT count(*), count(rejected) FROM outbox", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .ctx("counting the outbox")
    }

    /// Subscriptions with their hub epoch, cursor and mark.
    pub fn subscriptions(&self) -> Result<Vec<Subscription>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT target, epoch, cursor, mark FROM subscriptions ORDER BY target")
            .ctx("reading subscriptions")?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .ctx("reading subscriptions")?;
        let mut out = Vec::new();
        for row in rows {
            let (t, e, c, m) = row.ctx("reading subscriptions")?;
            let target = Target::from_key(&t).ok_or_else(|| Error::Corrupt {
                what: "subscription".into(),
                reason: t.clone(),
            })?;
            let epoch = Epoch(e.try_into().map_err(|_| Error::Corrupt {
                what: "epoch".into(),
                reason: t.clone(),
            })?);
            let mark = match m {
                None => None,
                Some(m) => Some(Mark(m.try_into().map_err(|_| Error::Corrupt {
                    what: "subscription mark".into(),
                    reason: t,
                })?)),
            };
            out.push(Subscription {
                target,
                epoch,
                cursor: Cursor(c.max(0) as u64),
                mark,
            });
        }
        Ok(out)
    }

    /// The changes of `doc` still stored with their bytes (not in its snapshot), oldest first.
    pub fn incremental_hashes(&self, doc: &DocId) -> Result<Vec<ChangeHash>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT hash FROM changes WHERE doc = ?1 AND bytes IS NOT NULL ORDER BY id",
            )
            .ctx("listing incremental changes")?;
        let rows = st
            .query_map([doc.as_str()], |r| r.get::<_, Vec<u8>>(0))
            .ctx("listing incremental changes")?;
        rows.map(|r| hash_from(r.ctx("listing incremental changes")?))
            .collect()
    }

    /// Replaces a document's snapshot: `snapshot` holds every change in `covered`, whose bytes
    /// are dropped (their signatures stay). Changes still in the outbox keep their bytes.
    pub fn compact(&mut self, doc: &DocId, snapshot: &[u8], covered: &[ChangeHash]) -> Result<()> {
        self.set_synced(true)?;
        self.replace_snapshot(doc, snapshot, &[], covered)
    }

    /// Stores a snapshot received from the hub as the document's snapshot, in one
    /// transaction: its signed heads as changes whose bytes are in it (their signatures cover
    /// the rest of it, [`crate::snapshot`]), and the bytes of the `covered` changes dropped.
    pub fn store_snapshot(
        &mut self,
        doc: &DocId,
        snapshot: &crate::snapshot::Snapshot,
        covered: &[ChangeHash],
    ) -> Result<()> {
        self.set_synced(true)?;
        self.replace_snapshot(doc, &snapshot.data, &snapshot.signed, covered)
    }

    fn replace_snapshot(
        &mut self,
        doc: &DocId,
        snapshot: &[u8],
        heads: &[crate::snapshot::SignedHead],
        covered: &[ChangeHash],
    ) -> Result<()> {
        let tx = self.conn.transaction().ctx("compacting")?;
        {
            tx.execute(
                "INSERT OR IGNORE INTO docs (doc) VALUES (?1)",
                [doc.as_str()],
            )
            .ctx("compacting")?;
            let mut head = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO changes (doc, hash, signature, bytes) VALUES (?1, ?2, ?3, NULL)",
                )
                .ctx("compacting")?;
            for h in heads {
                head.execute(params![doc.as_str(), &h.hash.0[..], &h.signature[..]])
                    .ctx("compacting")?;
            }
            let mut drop_bytes = tx
                .prepare_cached(
                    "UPDATE changes SET bytes = NULL WHERE doc = ?1 AND hash = ?2 AND bytes IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.doc = ?1 AND o.hash = ?2)",
                )
                .ctx("compacting")?;
            for h in covered {
                drop_bytes
                    .execute(params![doc.as_str(), &h.0[..]])
                    .ctx("compacting")?;
            }
            tx.execute(
                "INSERT INTO snapshots (doc, data) VALUES (?1, ?2)
                 ON CONFLICT (doc) DO UPDATE SET data = excluded.data",
                params![doc.as_str(), snapshot],
            )
            .ctx("compacting")?;
            tx.execute(
                "UPDATE docs SET incremental_bytes = (SELECT coalesce(sum(length(bytes)), 0)
                   FROM changes WHERE doc = ?1 AND bytes IS NOT NULL)
                 WHERE doc = ?1",
                [doc.as_str()],
            )
            .ctx("compacting")?;
        }
        tx.commit().ctx("compacting")
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` if the file is sound.
    pub fn integrity_check(&self) -> Result<()> {
        let r: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .ctx("checking integrity")?;
        if r == "ok" {
            Ok(())
        } else {
            Err(Error::Corrupt {
                what: "store file".into(),
                reason: r,
            })
        }
    }

    /// Every stored (doc, hash, signature, bytes-if-any), for checks and exports.
    pub fn all_changes(&self) -> Result<Vec<StoredChange>> {
        let mut st = self
            .conn
            .prepare("SELECT doc, hash, signature, bytes, checked FROM changes ORDER BY id")
            .ctx("reading changes")?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })
            .ctx("reading changes")?;
        let mut out = Vec::new();
        for row in rows {
            let (d, h, s, b, checked) = row.ctx("reading changes")?;
            out.push(StoredChange {
                doc: doc_from(d)?,
                hash: hash_from(h)?,
                signature: signature_from(s)?,
                bytes: b,
                checked,
            });
        }
        Ok(out)
    }
}

impl WriteBatch<'_> {
    /// Stores a change; `false` if it was already there.
    pub fn insert_change(&mut self, change: &VerifiedChange) -> Result<bool> {
        let doc = change.doc();
        // The document's row must exist before its changes (foreign key): once per batch.
        if !self.added.contains_key(doc) {
            self.tx
                .prepare_cached("INSERT OR IGNORE INTO docs (doc) VALUES (?1)")
                .and_then(|mut st| st.execute([doc.as_str()]))
                .ctx("creating a document")?;
            self.added.insert(doc.clone(), 0);
        }
        let signed = change.signed();
        let n = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO changes (doc, hash, signature, bytes, checked)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    doc.as_str(),
                    &change.hash().0[..],
                    &signed.signature[..],
                    &signed.bytes,
                    change.signature_checked()
                ])
            })
            .ctx("storing a change")?;
        if n == 1
            && let Some(bytes) = self.added.get_mut(doc)
        {
            *bytes += signed.bytes.len() as i64;
        }
        Ok(n == 1)
    }

    /// Takes out a change [`insert_change`](Self::insert_change) stored in this batch (one the
    /// document then refused).
    pub fn remove_new_change(&mut self, change: &VerifiedChange) -> Result<()> {
        let n = self
            .tx
            .prepare_cached("DELETE FROM changes WHERE doc = ?1 AND hash = ?2")
            .and_then(|mut st| st.execute(params![change.doc().as_str(), &change.hash().0[..]]))
            .ctx("taking out a refused change")?;
        if n == 1
            && let Some(bytes) = self.added.get_mut(change.doc())
        {
            *bytes -= change.signed().bytes.len() as i64;
        }
        // A document this batch created for changes all refused is not held after all.
        self.tx
            .prepare_cached(
                "DELETE FROM docs WHERE doc = ?1
                 AND NOT EXISTS (SELECT 1 FROM changes WHERE doc = ?1)
                 AND NOT EXISTS (SELECT 1 FROM snapshots WHERE doc = ?1)",
            )
            .and_then(|mut st| st.execute([change.doc().as_str()]))
            .ctx("taking out a refused change")?;
        Ok(())
    }

    /// Queues a stored change for upload. If its bytes were compacted away, `bytes` puts them
    /// back so the outbox can be read without the document.
    pub fn enqueue_upload(
        &mut self,
        doc: &DocId,
        hash: &ChangeHash,
        bytes: Option<&[u8]>,
    ) -> Result<()> {
        if let Some(bytes) = bytes {
            self.tx
                .prepare_cached(
                    "UPDATE changes SET bytes = ?3 WHERE doc = ?1 AND hash = ?2 AND bytes IS NULL",
                )
                .and_then(|mut st| st.execute(params![doc.as_str(), &hash.0[..], bytes]))
                .ctx("queueing an upload")?;
        }
        // Only a change stored with its own signature can be uploaded: one that came inside a
        // snapshot from the hub is covered by its author's signature of a later change, which
        // a hub does not take one by one (its author's replica uploads it).
        let added = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO outbox (doc, hash) SELECT ?1, ?2
                 WHERE EXISTS (SELECT 1 FROM changes WHERE doc = ?1 AND hash = ?2)",
            )
            .and_then(|mut st| st.execute(params![doc.as_str(), &hash.0[..]]))
            .ctx("queueing an upload")?;
        if added > 0 {
            self.outbox_end = self.outbox_end.max(self.tx.last_insert_rowid());
        }
        Ok(())
    }

    /// Adds a subscription if it is not there yet (from the start of the hub's log).
    pub fn add_subscription(&mut self, target: &Target) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO subscriptions (target, epoch, cursor) VALUES (?1, ?2, 0)",
            )
            .and_then(|mut st| st.execute(params![target.key(), &Epoch::none().0[..]]))
            .ctx("adding a subscription")?;
        Ok(())
    }

    /// Records how far a subscription has received, with the changes that got it there, and
    /// the mark of the change at `cursor` if known.
    pub fn set_cursor(
        &mut self,
        target: &Target,
        epoch: Epoch,
        cursor: Cursor,
        mark: Option<Mark>,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO subscriptions (target, epoch, cursor, mark) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (target) DO UPDATE SET epoch = excluded.epoch,
                     cursor = excluded.cursor, mark = excluded.mark",
            )
            .and_then(|mut st| {
                st.execute(params![
                    target.key(),
                    &epoch.0[..],
                    cursor.0 as i64,
                    mark.as_ref().map(|m| &m.0[..])
                ])
            })
            .ctx("recording a cursor")?;
        Ok(())
    }

    /// Advances a subscription's cursor within its current epoch (never backwards), with the
    /// mark of the change at the new position (`None`: unknown).
    pub fn advance_cursor(
        &mut self,
        target: &Target,
        cursor: Cursor,
        mark: Option<Mark>,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE subscriptions SET cursor = ?2, mark = ?3 WHERE target = ?1 AND cursor < ?2",
            )
            .and_then(|mut st| {
                st.execute(params![
                    target.key(),
                    cursor.0 as i64,
                    mark.as_ref().map(|m| &m.0[..])
                ])
            })
            .ctx("recording a cursor")?;
        Ok(())
    }

    /// Records the epoch of the hub log this batch's changes came from.
    pub fn set_last_epoch(&mut self, epoch: Epoch) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_epoch', ?1)")
            .and_then(|mut st| st.execute([&epoch.0[..]]))
            .ctx("recording the hub epoch")?;
        Ok(())
    }

    /// Makes every write of the batch durable.
    pub fn commit(self) -> Result<()> {
        {
            let mut st = self
                .tx
                .prepare_cached(
                    "UPDATE docs SET incremental_bytes = incremental_bytes + ?2 WHERE doc = ?1",
                )
                .ctx("storing changes")?;
            for (doc, bytes) in self.added.iter().filter(|(_, b)| **b > 0) {
                st.execute(params![doc.as_str(), bytes])
                    .ctx("storing changes")?;
            }
        }
        self.tx.commit().ctx("committing")?;
        *self.store_outbox_end = (*self.store_outbox_end).max(self.outbox_end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The outbox's end is kept in memory: what a committed batch queued is read, what a
    /// batch dropped uncommitted queued is not, and a store opened again finds its rows.
    #[test]
    fn the_outbox_is_read_up_to_what_committed_batches_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let who = crate::identity::Identity::generate();
        let doc = crate::DocId::new("d/1").unwrap();
        let changes = crate::store::hub::tests::signed_changes(&who, &doc, [1; 8], 1, 3);
        fn queue<'s>(
            store: &'s mut super::ReplicaStore,
            c: &crate::change::VerifiedChange,
        ) -> super::WriteBatch<'s> {
            let mut batch = store.batch().unwrap();
            batch.insert_change(c).unwrap();
            batch.enqueue_upload(c.doc(), &c.hash(), None).unwrap();
            batch
        }
        let rows = |store: &super::ReplicaStore, after: i64| -> Vec<i64> {
            let out = store.outbox_after(after, 10).unwrap();
            out.iter().map(|e| e.row).collect()
        };
        let mut store = super::ReplicaStore::open(&path).unwrap();
        assert!(rows(&store, 0).is_empty());
        queue(&mut store, &changes[0]).commit().unwrap();
        assert_eq!(rows(&store, 0), vec![1]);
        assert!(rows(&store, 1).is_empty());
        drop(queue(&mut store, &changes[1]));
        assert_eq!(rows(&store, 0), vec![1], "a batch dropped queues nothing");
        queue(&mut store, &changes[2]).commit().unwrap();
        // (The dropped batch's row id was rolled back with it.)
        assert_eq!(rows(&store, 1), vec![2], "the next committed row is read");
        assert!(rows(&store, 2).is_empty());
        drop(store);
        let store = super::ReplicaStore::open(&path).unwrap();
        assert_eq!(rows(&store, 0), vec![1, 2]);
        assert_eq!(rows(&store, 1), vec![2]);
    }

    /// A push's read of the outbox takes the first document's run of rows and stops at the
    /// first row of another, in outbox order: A, A, B, A gives A, A; then B; then A.
    #[test]
    fn a_push_reads_the_outbox_up_to_the_first_row_of_another_document() {
        let dir = tempfile::tempdir().unwrap();
        let who = crate::identity::Identity::generate();
        let (a, b) = (
            crate::DocId::new("d/a").unwrap(),
            crate::DocId::new("d/b").unwrap(),
        );
        let of_a = crate::store::hub::tests::signed_changes(&who, &a, [1; 8], 1, 3);
        let of_b = crate::store::hub::tests::signed_changes(&who, &b, [2; 8], 1, 1);
        let mut store = super::ReplicaStore::open(&dir.path().join("r.db")).unwrap();
        let mut batch = store.batch().unwrap();
        for c in [&of_a[0], &of_a[1], &of_b[0], &of_a[2]] {
            batch.insert_change(c).unwrap();
            batch.enqueue_upload(c.doc(), &c.hash(), None).unwrap();
        }
        batch.commit().unwrap();
        let run = |after: i64, limit: usize| -> Vec<(i64, String)> {
            let out = store.outbox_run(after, limit).unwrap();
            out.iter().map(|e| (e.row, e.doc.to_string())).collect()
        };
        assert_eq!(run(0, 10), vec![(1, "d/a".into()), (2, "d/a".into())]);
        assert_eq!(run(0, 1), vec![(1, "d/a".into())], "at most the limit");
        assert_eq!(run(2, 10), vec![(3, "d/b".into())]);
        assert_eq!(run(3, 10), vec![(4, "d/a".into())]);
        assert!(run(4, 10).is_empty());
        let run = store.outbox_run(0, 10).unwrap();
        assert_eq!(run[1].hash, of_a[1].hash());
        assert_eq!(
            run[1].signed.as_ref().map(|s| s.bytes.clone()),
            Some(of_a[1].signed().bytes.clone()),
            "with the change's bytes"
        );
        // The whole outbox, for tools, still reads across documents.
        assert_eq!(store.outbox_after(0, 10).unwrap().len(), 4);
    }

    #[test]
    fn the_written_position_only_grows_in_one_log_unless_replaced() {
        use crate::wire::{Mark, Position};
        let dir = tempfile::tempdir().unwrap();
        let mut store = super::ReplicaStore::open(&dir.path().join("r.db")).unwrap();
        let (e1, e2) = (crate::Epoch([1; 16]), crate::Epoch([2; 16]));
        let at = |n: u64| Position {
            cursor: crate::Cursor(n),
            mark: Mark([n as u8; 64]),
        };
        store.ack_outbox(&[], e1, Some(at(5)), false).unwrap();
        // A change sent again, acknowledged where it was stored before: lower, kept out.
        store.ack_outbox(&[], e1, Some(at(3)), false).unwrap();
        assert_eq!(store.written().unwrap(), Some((e1, at(5))));
        store.ack_outbox(&[], e1, Some(at(7)), false).unwrap();
        assert_eq!(store.written().unwrap(), Some((e1, at(7))));
        // Another log (a restore) or a repair from a rolled-back one: replaced, even lower.
        store.ack_outbox(&[], e2, Some(at(2)), false).unwrap();
        assert_eq!(store.written().unwrap(), Some((e2, at(2))));
        store.ack_outbox(&[], e2, Some(at(4)), false).unwrap();
        store.ack_outbox(&[], e2, Some(at(1)), true).unwrap();
        assert_eq!(store.written().unwrap(), Some((e2, at(1))));
    }

    #[test]
    fn received_changes_and_acknowledgements_commit_unsynced_and_every_other_batch_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = super::ReplicaStore::open(&dir.path().join("r.db")).unwrap();
        let mode = |s: &super::ReplicaStore| -> i64 {
            s.conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode(&store), 2, "FULL as opened");
        store.received_batch().unwrap().commit().unwrap();
        assert_eq!(mode(&store), 1, "NORMAL for received changes");
        store.batch().unwrap().commit().unwrap();
        assert_eq!(
            mode(&store),
            2,
            "FULL again for what an app is told is durable"
        );
        store
            .ack_outbox(&[], crate::ids::Epoch([1; 16]), None, false)
            .unwrap();
        assert_eq!(mode(&store), 1, "NORMAL for an acknowledgement");
        store.batch().unwrap().commit().unwrap();
        assert_eq!(mode(&store), 2, "and FULL again after it");
    }

    #[test]
    fn deferred_local_writes_commit_unsynced_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = super::ReplicaStore::open(&path).unwrap();
        let mode = |s: &super::ReplicaStore| -> i64 {
            s.conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        // As opened: a local batch is a durable batch.
        store.local_batch().unwrap().commit().unwrap();
        assert_eq!(mode(&store), 2);
        assert!(!store.unsynced());

        store.set_deferred_sync(true).unwrap();
        store.local_batch().unwrap().commit().unwrap();
        assert_eq!(mode(&store), 1, "NORMAL: written to the WAL, not synced");
        assert!(store.unsynced());
        assert!(
            std::fs::metadata(format!("{}-wal", path.display())).is_ok(),
            "the WAL that sync() syncs is where SQLite wrote"
        );
        store.sync().unwrap();
        assert!(!store.unsynced());

        // Turning it off syncs what waits, and local batches are durable again.
        store.local_batch().unwrap().commit().unwrap();
        assert!(store.unsynced());
        store.set_deferred_sync(false).unwrap();
        assert!(!store.unsynced());
        store.local_batch().unwrap().commit().unwrap();
        assert_eq!(mode(&store), 2);

        // A sync that fails stays failed, and the store refuses writes, until it is reopened
        // (the WAL removed under it makes the sync fail).
        store.set_deferred_sync(true).unwrap();
        store.local_batch().unwrap().commit().unwrap();
        std::fs::remove_file(format!("{}-wal", path.display())).unwrap();
        let failed = store.sync();
        assert!(
            matches!(failed, Err(crate::Error::Unsynced { .. })),
            "{failed:?}"
        );
        assert!(matches!(
            store.local_batch().map(|_| ()),
            Err(crate::Error::Unsynced { .. })
        ));
        assert!(store.sync().is_err(), "no later sync passes for it");
        drop(store);
        let mut store = super::ReplicaStore::open(&path).unwrap();
        store.local_batch().unwrap().commit().unwrap();

        // In memory there is nothing to sync.
        let mut mem = super::ReplicaStore::open_in_memory().unwrap();
        mem.set_deferred_sync(true).unwrap();
        mem.local_batch().unwrap().commit().unwrap();
        mem.sync().unwrap();
        assert!(!mem.unsynced());
    }

    /// A store at `path` with a table to fill with blobs.
    fn filler_store(path: &std::path::Path) -> super::ReplicaStore {
        let store = super::ReplicaStore::open(path).unwrap();
        store
            .conn
            .execute_batch("CREATE TABLE filler (x BLOB)")
            .unwrap();
        store
    }

    /// Commits `blobs` blobs of 64 KiB, one at a time: about 16 pages of WAL each.
    fn fill(s: &super::ReplicaStore, blobs: usize) {
        for _ in 0..blobs {
            s.conn
                .execute("INSERT INTO filler VALUES (zeroblob(65536))", [])
                .unwrap();
        }
    }

    fn wait_for(what: &str, done: &dyn Fn() -> bool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < until, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The frames in the WAL of the store at `path`, read from another connection (its
    /// passive checkpoint copies nothing the store's own would not).
    fn wal_frames(path: &std::path::Path) -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap()
    }

    #[test]
    fn with_deferred_syncs_the_wal_is_checkpointed_off_the_owners_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = filler_store(&path);
        let db_bytes = || std::fs::metadata(&path).unwrap().len();
        // 96 commits of 64 KiB: about 1,600 pages of WAL, past SQLite's 1,000; 656 of them,
        // about 10,500 pages, past the 10,000 of a background checkpoint (and short of the
        // 11,000 at which the owner's commit would copy them itself).
        store.set_deferred_sync(true).unwrap();
        assert_eq!(store.deferred.background_checkpoints(), Some(0));

        // On a thread that has no checkpoint thread of its own, the commits checkpoint as
        // SQLite does by default: the WAL stays bounded whichever thread writes.
        let before = db_bytes();
        let mut store = std::thread::spawn(move || {
            fill(&store, 96);
            store
        })
        .join()
        .unwrap();
        // (The first 1,000 pages or so: about 58 of the 96 blobs.)
        assert!(
            db_bytes() >= before + 48 * 65536,
            "checkpointed at the commits"
        );
        assert_eq!(store.deferred.background_checkpoints(), Some(0));

        // On the owner's thread, the commit past 10,000 pages wakes the checkpoint thread
        // (SQLite's own checkpoint would copy the pages inside that commit, and never wake
        // it), which copies them into the database file; none before.
        let before = db_bytes();
        fill(&store, 96);
        assert_eq!(
            crate::store::sqlite::background_wakes().map(|w| w.0),
            Some(0),
            "not woken before 10,000 pages"
        );
        fill(&store, 560);
        wait_for("a background checkpoint", &|| {
            store.deferred.background_checkpoints() >= Some(1)
        });
        wait_for("the pages in the database file", &|| {
            db_bytes() >= before + 600 * 65536
        });

        // Off, SQLite checkpoints at the commits again, and the thread is gone.
        store.set_deferred_sync(false).unwrap();
        assert_eq!(store.deferred.background_checkpoints(), None);
        let auto: i64 = store
            .conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 1000);
        // And a second store on this thread may take the slot now.
        let mut other = super::ReplicaStore::open(&dir.path().join("o.db")).unwrap();
        other.set_deferred_sync(true).unwrap();
        assert_eq!(other.deferred.background_checkpoints(), Some(0));
        // While it holds it, a third one keeps SQLite's checkpoints.
        let mut third = super::ReplicaStore::open(&dir.path().join("t.db")).unwrap();
        third.set_deferred_sync(true).unwrap();
        assert_eq!(third.deferred.background_checkpoints(), None);
    }

    #[test]
    fn a_background_checkpoint_that_cannot_copy_the_whole_wal_is_tried_again_without_a_commit() {
        // As on a full disk, where no commit succeeds to wake the thread again: here a reader
        // holds the WAL's first frames, so the checkpoint cannot copy past them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = filler_store(&path);
        store.set_deferred_sync(true).unwrap();
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let rows: i64 = reader
            .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        // About 10,300 pages: due, short of the backstop.
        fill(&store, 640);
        wait_for("a background checkpoint tried", &|| {
            store.deferred.background_tries() >= Some(1)
        });
        assert_eq!(store.deferred.background_checkpoints(), Some(0));
        reader.execute_batch("COMMIT").unwrap();
        wait_for("the whole WAL copied, with no commit since", &|| {
            store.deferred.background_checkpoints() >= Some(1)
        });
        // And the next write starts the WAL over.
        fill(&store, 1);
        assert!(wal_frames(&path) < 100, "the WAL restarted");
    }

    #[test]
    fn a_writer_that_never_pauses_keeps_the_wal_near_its_due_pages() {
        // The background checkpoint waits for a pause in the commits, and copies all but the
        // frames committed meanwhile: the owner's commit copies the rest once the WAL is 1,000
        // pages past due, and the WAL starts over.
        let dir = tempfile::tempdir().unwrap();
        let mut store = filler_store(&dir.path().join("r.db"));
        store.set_deferred_sync(true).unwrap();
        // About 32,000 pages, three times the due ones.
        fill(&store, 2_000);
        let (wakes, peak) = crate::store::sqlite::background_wakes().unwrap();
        assert!(wakes >= 1);
        // About 11,000 pages (44 MiB); more only if the owner's commit came while the
        // background checkpoint was copying. The owner's commit stepped in at 20,000 before,
        // and a 64 MiB disk (16,000 pages) filled up with the WAL.
        assert!(peak < 16_000, "the WAL reached {peak} pages");
    }

    #[test]
    fn a_store_bounded_in_size_checkpoints_its_wal_sooner() {
        // The WAL is outside the bound: a checkpoint is due at a quarter of it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = filler_store(&path);
        store.set_deferred_sync(true).unwrap();
        // 16 MiB: 4,096 pages, a checkpoint due at 1,024.
        store.set_max_bytes(16 << 20).unwrap();
        fill(&store, 48);
        assert_eq!(
            crate::store::sqlite::background_wakes().map(|w| w.0),
            Some(0)
        );
        fill(&store, 24);
        assert_eq!(
            crate::store::sqlite::background_wakes().map(|w| w.0),
            Some(1)
        );
        wait_for("a background checkpoint", &|| {
            store.deferred.background_checkpoints() >= Some(1)
        });
    }

    #[cfg(feature = "encryption")]
    #[test]
    fn an_encrypted_stores_background_checkpoints_use_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let key = crate::store::StoreKey::generate();
        let mut store = super::ReplicaStore::open_keyed(&path, Some(&key)).unwrap();
        store
            .conn
            .execute_batch("CREATE TABLE filler (x BLOB)")
            .unwrap();
        store.set_deferred_sync(true).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for _ in 0..704 {
            store
                .conn
                .execute("INSERT INTO filler VALUES (zeroblob(65536))", [])
                .unwrap();
        }
        // A checkpoint counts only if it succeeded: its connection opened the file with the
        // key, and wrote the pages encrypted.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.deferred.background_checkpoints() < Some(1)
            || std::fs::metadata(&path).unwrap().len() < before + 600 * 65536
        {
            assert!(
                std::time::Instant::now() < until,
                "no background checkpoint"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(store);
        assert!(
            !std::fs::read(&path)
                .unwrap()
                .starts_with(b"SQLite format 3")
        );
        let store = super::ReplicaStore::open_keyed(&path, Some(&key)).unwrap();
        let rows: i64 = store
            .conn
            .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 704);
    }

    #[test]
    fn a_data_directory_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = crate::store::lock_dir(dir.path()).unwrap();
        let second = crate::store::lock_dir(dir.path());
        assert!(
            matches!(second, Err(crate::Error::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        crate::store::lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn a_version_1_store_keeps_its_snapshots_after_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(super::MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO docs (doc, snapshot, incremental_bytes) VALUES ('a/b', x'0102', 7)",
                [],
            )
            .unwrap();
            conn.execute("INSERT INTO docs (doc) VALUES ('a/c')", [])
                .unwrap();
        }
        let store = super::ReplicaStore::open(&path).unwrap();
        let ab = crate::DocId::new("a/b").unwrap();
        let ac = crate::DocId::new("a/c").unwrap();
        let stored = store.load_doc(&ab).unwrap().unwrap();
        assert_eq!(stored.snapshot, Some(vec![1, 2]));
        assert_eq!(stored.incremental_bytes, 7);
        assert_eq!(store.load_doc(&ac).unwrap().unwrap().snapshot, None);
        assert_eq!(store.doc_ids().unwrap(), vec![ab, ac]);
        store.integrity_check().unwrap();
    }
}
