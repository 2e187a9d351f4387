//! Backups of a hub's SQLite store, taken while the hub serves: full and incremental, restored
//! into a data directory, and verified offline (integrity, hashes, every signature).
//!
//! A backup file is itself a SQLite file with the hub store's schema plus a `backup` table
//! that says what it holds: the epoch of the log it was taken from and the positions
//! `(after, through]` of the changes it holds. A full backup holds `(0, through]` and opens
//! as a hub store; an incremental one holds the changes after the backup it was taken
//! `--since`. The grants are copied whole into every backup; peer positions are not (a
//! restored hub syncs with its peers from the start, deduplicated).
//!
//! Why a logical copy and not SQLite's online backup API: the backup API restarts whenever
//! another connection writes the source, so on a hub that commits every few milliseconds a
//! backup taken in steps (to show progress) would never end, and one taken in a single step
//! shows none. Here the copy runs inside one read transaction (WAL: the hub keeps writing,
//! the copy sees one consistent state), in ranges of positions that report progress, and the
//! same code takes incremental backups.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::change::{self, SignedChange};
use crate::error::{Error, Result, SqlContext};
use crate::ids::{ChangeHash, Cursor, DocId, Epoch, PeerId};
use crate::store::hub::{MIGRATIONS, SqliteHubStore};
use crate::store::sqlite::{self, blob_to_hashes};

/// Changes copied or verified between two progress reports.
const STEP: u64 = 20_000;

/// Whether a backup holds the whole log or the changes after another backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    /// Every change up to `through`: restorable on its own.
    Full,
    /// The changes after another backup of the same log: restorable after it.
    Incremental,
}

/// What a backup file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Full or incremental.
    pub kind: BackupKind,
    /// The epoch of the hub log it was taken from.
    pub epoch: Epoch,
    /// It holds the changes at positions after this one (0 for a full backup)...
    pub after: Cursor,
    /// ... up to and including this one: the end of the log when the backup was taken.
    pub through: Cursor,
    /// How many changes it holds.
    pub changes: u64,
    /// When it was taken (milliseconds since the Unix epoch).
    pub created_ms: u64,
}

/// A long operation's progress: `done` of `total` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Changes handled so far.
    pub done: u64,
    /// Changes in all.
    pub total: u64,
}

/// What [`restore`] put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The restored log ends here (the last backup's `through`).
    pub through: Cursor,
    /// Changes restored.
    pub changes: u64,
    /// The new epoch of the restored log: replicas that synced with the hub after the backup
    /// see it change, reconcile by heads and upload what the backup lacks.
    pub epoch: Epoch,
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The files, in order, with what each holds.
    pub files: Vec<BackupInfo>,
    /// Changes whose bytes, hash, metadata and signature were checked.
    pub changes: u64,
    /// Documents they belong to.
    pub docs: u64,
    /// Distinct authors (public keys) that signed them.
    pub authors: u64,
}

fn backup_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Backup {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Takes a backup of the hub store at `store` (a live hub may be serving it) into `to`.
/// With `since`, an incremental backup: the changes after that backup (full or incremental,
/// taken from the same log). `to` must not exist; it appears whole or not at all (the copy is
/// written to `to.partial`, synced, then renamed). `progress` is called as changes are copied.
pub fn backup(
    store: &Path,
    to: &Path,
    since: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<BackupInfo> {
    if to.exists() {
        return Err(backup_error(
            to,
            "already exists: choose another file name (a backup never overwrites one)",
        ));
    }
    let base = since.map(read_info).transpose()?;
    let src = open_live(store)?;
    let partial = partial_path(to);
    let _ = std::fs::remove_file(&partial);
    // The destination gets the schema of a hub store, then the rows.
    drop(SqliteHubStore::open(&partial)?);
    let result = copy_into(&src, store, &partial, base.as_ref(), since, progress);
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    drop(src);
    finish_file(&partial, to)?;
    Ok(info)
}

/// Where a backup starts: after its base (an incremental one), which must be of this log
/// (`epoch`) and end within it (`through`); else at the start.
fn start_after(
    base: Option<&BackupInfo>,
    epoch: Epoch,
    through: Cursor,
    named: &Path,
) -> Result<Cursor> {
    let Some(b) = base else {
        return Ok(Cursor(0));
    };
    if b.epoch != epoch {
        return Err(backup_error(
            named,
            "was taken from another log (the hub was restored or replaced since): take a full \
             backup",
        ));
    }
    if through < b.through {
        return Err(backup_error(
            named,
            format!(
                "ends at position {}, after the end of the log ({}): it is not a backup of this \
                 hub; take a full backup",
                b.through.0, through.0
            ),
        ));
    }
    Ok(b.through)
}

/// Opens the live store, checking that its schema is the one this build writes (a backup
/// never migrates the store under a running hub, and never writes to it; it opens it
/// read-write only because SQLite opens attached files with the main file's mode).
fn open_live(store: &Path) -> Result<Connection> {
    if !store.is_file() {
        return Err(backup_error(
            store,
            "no hub store here: check --data (it holds hub.db)",
        ));
    }
    let conn = Connection::open_with_flags(
        store,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx("opening the hub store for a backup")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .ctx("setting the busy timeout")?;
    check_schema(&conn, store)?;
    Ok(conn)
}

/// The oldest schema a backup file may have: those of version 5 (before the chain) and 6
/// (before `dropped_upto`) read as well, migrated and chained by the restore.
const OLDEST_BACKUP_SCHEMA: u32 = 5;

/// Checks that the live store has this build's schema.
fn check_schema(conn: &Connection, path: &Path) -> Result<()> {
    check_schema_in(conn, path, MIGRATIONS.len() as u32)
}

/// Checks that a file's schema is between `oldest` and this build's.
fn check_schema_in(conn: &Connection, path: &Path, oldest: u32) -> Result<()> {
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .ctx("reading the schema version")?;
    let newest = MIGRATIONS.len() as u32;
    if !(oldest..=newest).contains(&version) {
        let reads = if oldest == newest {
            format!("version {newest}")
        } else {
            format!("versions {oldest} to {newest}")
        };
        return Err(backup_error(
            path,
            format!(
                "schema version {version}, this syncline-hub reads {reads}: use the \
                 syncline-hub that wrote it"
            ),
        ));
    }
    Ok(())
}

fn copy_into(
    src: &Connection,
    store: &Path,
    partial: &Path,
    base: Option<&BackupInfo>,
    since: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<BackupInfo> {
    let partial_str = utf8(partial)?;
    src.execute("ATTACH DATABASE ?1 AS dst", [partial_str])
        .ctx("opening the backup file")?;
    // The copy is made durable once, at the end (`finish_file`); a crash before leaves only
    // the `.partial` file, which the next backup removes.
    src.execute_batch("PRAGMA dst.synchronous = OFF; PRAGMA dst.journal_mode = OFF;")
        .ctx("configuring the backup file")?;
    // One transaction: its first read fixes the state the whole copy sees.
    src.execute_batch("BEGIN").ctx("starting the backup")?;
    let result = (|| {
        let epoch = read_epoch(src, "main")?;
        let through: u64 = src
            .query_row("SELECT coalesce(max(seq), 0) FROM main.log", [], |r| {
                r.get::<_, i64>(0)
            })
            .ctx("reading the log")? as u64;
        // A running hub syncs its group commits after relaying them (`Hub::set_deferred_sync`):
        // sync what this copy sees, so that it never holds positions a power cut could take
        // back from the live store (an incremental backup would then start past them).
        let wal = format!("{}-wal", store.display());
        match sqlite::sync_file(Path::new(&wal)) {
            Ok(()) => {}
            // No WAL: the store is closed and its commits are in the database file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(backup_error(store, format!("syncing {wal}: {e}"))),
        }
        let after = start_after(base, epoch, Cursor(through), since.unwrap_or(store))?;
        let total: u64 = src
            .query_row(
                "SELECT count(*) FROM main.log WHERE seq > ?1",
                [after.0 as i64],
                |r| r.get::<_, i64>(0),
            )
            .ctx("reading the log")? as u64;
        progress(Progress { done: 0, total });
        let mut done = 0u64;
        let mut from = after.0;
        while from < through {
            // Positions have gaps (duplicates are not stored): step by rows, not positions.
            let to: u64 = src
                .query_row(
                    "SELECT coalesce(max(seq), ?2) FROM
                        (SELECT seq FROM main.log WHERE seq > ?1 AND seq <= ?2 ORDER BY seq
                         LIMIT ?3)",
                    params![from as i64, through as i64, STEP as i64],
                    |r| r.get::<_, i64>(0),
                )
                .ctx("reading the log")? as u64;
            let n = src
                .execute(
                    "INSERT INTO dst.log (seq, doc, hash, deps, author, signature, bytes,
                         instance, actor_seq, chain)
                     SELECT seq, doc, hash, deps, author, signature, bytes, instance, actor_seq,
                         chain
                     FROM main.log WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                    params![from as i64, to as i64],
                )
                .ctx("copying the log")?;
            done += n as u64;
            from = to;
            progress(Progress { done, total });
        }
        src.execute(
            "INSERT OR IGNORE INTO dst.docs SELECT DISTINCT doc FROM dst.log",
            [],
        )
        .ctx("copying the documents")?;
        src.execute_batch(
            "DELETE FROM dst.grants;
             INSERT INTO dst.grants SELECT * FROM main.grants;",
        )
        .ctx("copying the grants")?;
        describe(
            src,
            "dst",
            base.is_some(),
            epoch,
            after,
            Cursor(through),
            done,
        )
    })();
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = src.execute_batch(end).ctx("ending the backup");
    src.execute("DETACH DATABASE dst", [])
        .ctx("closing the backup file")?;
    let info = result?;
    ended?;
    Ok(info)
}

fn read_epoch(conn: &Connection, schema: &str) -> Result<Epoch> {
    let sql = format!("SELECT value FROM {schema}.meta WHERE key = 'epoch'");
    let blob: Option<Vec<u8>> = conn
        .query_row(&sql, [], |r| r.get(0))
        .optional()
        .ctx("reading the epoch")?;
    let bytes: [u8; 16] = blob
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Corrupt {
            what: "epoch".into(),
            reason: "missing or not 16 bytes".into(),
        })?;
    Ok(Epoch(bytes))
}

/// Writes the `backup` table of the backup file attached as `schema` (what it holds), and
/// returns that description.
fn describe(
    conn: &Connection,
    schema: &str,
    incremental: bool,
    epoch: Epoch,
    after: Cursor,
    through: Cursor,
    changes: u64,
) -> Result<BackupInfo> {
    let info = BackupInfo {
        kind: if incremental {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        epoch,
        after,
        through,
        changes,
        created_ms: now_ms(),
    };
    conn.execute_batch(&format!(
        "CREATE TABLE {schema}.backup (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;"
    ))
    .ctx("writing the backup description")?;
    write_info(conn, schema, &info)?;
    Ok(info)
}

fn write_info(conn: &Connection, schema: &str, info: &BackupInfo) -> Result<()> {
    let kind = match info.kind {
        BackupKind::Full => "full",
        BackupKind::Incremental => "incremental",
    };
    let mut st = conn
        .prepare(&format!(
            "INSERT INTO {schema}.backup (key, value) VALUES (?1, ?2)"
        ))
        .ctx("writing the backup description")?;
    st.execute(params!["format", 1i64])
        .ctx("writing the backup description")?;
    st.execute(params!["kind", kind])
        .ctx("writing the backup description")?;
    st.execute(params!["epoch", &info.epoch.0[..]])
        .ctx("writing the backup description")?;
    for (key, value) in [
        ("after", info.after.0),
        ("through", info.through.0),
        ("changes", info.changes),
        ("created_ms", info.created_ms),
    ] {
        st.execute(params![key, value as i64])
            .ctx("writing the backup description")?;
    }
    Ok(())
}

/// Takes a backup from any hub store (the PostgreSQL store among them) into `to`, in the same
/// format as [`backup`]: the log up to its end when the call starts, read in pages. That is a
/// consistent state because a store makes positions visible in commit order and never changes
/// a stored change: every position up to the end is there, and stays as it is. Signatures are
/// copied as they are ([`verify`] checks them); each change's bytes are parsed for the
/// columns the file indexes.
pub fn backup_store(
    store: &mut dyn crate::store::HubStore,
    to: &Path,
    since: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<BackupInfo> {
    const PAGE: usize = 10_000;
    if to.exists() {
        return Err(backup_error(
            to,
            "already exists: choose another file name (a backup never overwrites one)",
        ));
    }
    let base = since.map(read_info).transpose()?;
    let epoch = store.epoch();
    let through = store.last_cursor()?;
    let after = start_after(base.as_ref(), epoch, through, since.unwrap_or(to))?;
    let partial = partial_path(to);
    let _ = std::fs::remove_file(&partial);
    drop(SqliteHubStore::open(&partial)?);
    let result = (|| -> Result<BackupInfo> {
        let mut conn = Connection::open(&partial).ctx("opening the backup file")?;
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = OFF;")
            .ctx("configuring the backup file")?;
        let tx = conn.transaction().ctx("writing the backup")?;
        let all = crate::wire::Target::Prefix(crate::ids::DocPrefix::all());
        // Progress counts positions: counting rows would read the log twice.
        let total = through.0 - after.0;
        progress(Progress { done: 0, total });
        let mut changes = 0u64;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO log (seq, doc, hash, deps, author, signature, bytes, instance,
                         actor_seq, chain) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .ctx("writing the backup")?;
            let mut at = after;
            while at < through {
                let batch = store.read_log(&all, at, PAGE)?;
                for e in batch.entries.iter().take_while(|e| e.cursor <= through) {
                    let c =
                        automerge::Change::from_bytes(e.change.bytes.clone()).map_err(|err| {
                            Error::Corrupt {
                                what: format!("stored change at position {}", e.cursor.0),
                                reason: err.to_string(),
                            }
                        })?;
                    let actor = c.actor_id().to_bytes();
                    let author = actor.get(..32).unwrap_or_default();
                    let instance = actor.get(32..40).unwrap_or_default();
                    let deps: Vec<u8> = c.deps().iter().flat_map(|d| d.0).collect();
                    insert
                        .execute(params![
                            e.cursor.0 as i64,
                            e.doc.as_str(),
                            &c.hash().0[..],
                            deps,
                            author,
                            &e.change.signature[..],
                            &e.change.bytes,
                            instance,
                            c.seq() as i64,
                            e.chain.as_ref().map(|m| &m.0[..]),
                        ])
                        .ctx("writing the backup")?;
                    changes += 1;
                }
                let next = batch.next.min(through);
                if next <= at && !batch.at_end {
                    return Err(backup_error(
                        to,
                        "the store's log did not advance while read",
                    ));
                }
                at = if batch.at_end { through } else { next };
                progress(Progress {
                    done: at.0 - after.0,
                    total,
                });
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO docs SELECT DISTINCT doc FROM log",
            [],
        )
        .ctx("writing the documents")?;
        tx.execute("DELETE FROM grants", [])
            .ctx("writing the grants")?;
        for g in store.grants()? {
            tx.execute(
                "INSERT INTO grants (peer, prefix, can_read, can_write, can_relay)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    &g.peer.as_bytes()[..],
                    g.prefix.as_str(),
                    g.read,
                    g.write,
                    g.relay
                ],
            )
            .ctx("writing the grants")?;
        }
        let info = describe(&tx, "main", base.is_some(), epoch, after, through, changes)?;
        tx.commit().ctx("writing the backup")?;
        Ok(info)
    })();
    let info = match result {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    finish_file(&partial, to)?;
    Ok(info)
}

/// One change of a backup file, as its `log` table holds it.
#[derive(Debug, Clone)]
pub struct BackupRow {
    /// Its position in the log the backup was taken from.
    pub seq: i64,
    /// Its document.
    pub doc: String,
    /// Its hash (32 bytes).
    pub hash: Vec<u8>,
    /// Its dependencies' hashes, concatenated.
    pub deps: Vec<u8>,
    /// Its author's public key.
    pub author: Vec<u8>,
    /// Its author's signature.
    pub signature: Vec<u8>,
    /// The author's Automerge bytes.
    pub bytes: Vec<u8>,
    /// The actor instance (8 bytes after the key).
    pub instance: Vec<u8>,
    /// The actor's sequence number.
    pub actor_seq: i64,
}

/// Reads a backup file's changes in position order, `batch` at a time, for a store that
/// restores them itself (PostgreSQL). Returns the grants the file holds.
pub fn read_rows(
    path: &Path,
    batch: usize,
    f: &mut dyn FnMut(Vec<BackupRow>) -> Result<()>,
) -> Result<Vec<crate::hub::Grant>> {
    let conn = open_backup(path)?;
    {
        let mut st = conn
            .prepare(
                "SELECT seq, doc, hash, deps, author, signature, bytes, coalesce(instance, x''),
                     coalesce(actor_seq, 0) FROM log ORDER BY seq",
            )
            .ctx("reading a backup")?;
        let mut rows = st.query([]).ctx("reading a backup")?;
        let mut out = Vec::with_capacity(batch);
        while let Some(r) = rows.next().ctx("reading a backup")? {
            out.push(BackupRow {
                seq: r.get(0).ctx("reading a backup")?,
                doc: r.get(1).ctx("reading a backup")?,
                hash: r.get(2).ctx("reading a backup")?,
                deps: r.get(3).ctx("reading a backup")?,
                author: r.get(4).ctx("reading a backup")?,
                signature: r.get(5).ctx("reading a backup")?,
                bytes: r.get(6).ctx("reading a backup")?,
                instance: r.get(7).ctx("reading a backup")?,
                actor_seq: r.get(8).ctx("reading a backup")?,
            });
            if out.len() >= batch {
                f(std::mem::take(&mut out))?;
            }
        }
        if !out.is_empty() {
            f(out)?;
        }
    }
    // The grants (the file's schema is a hub store's).
    crate::store::hub::read_grants(&conn)
}

/// Reads what a backup file holds (and checks it is one).
pub fn read_info(path: &Path) -> Result<BackupInfo> {
    let conn = open_backup(path)?;
    info_of(&conn, path)
}

fn open_backup(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(backup_error(path, "no such file"));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx("opening a backup file")?;
    // A file that is not SQLite fails on its first read: say what it is not.
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'backup'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| backup_error(path, format!("not a Syncline backup (not SQLite: {e})")))?;
    if has_table.is_none() {
        return Err(backup_error(
            path,
            "not a Syncline backup (no backup table): give a file written by \
             `syncline-hub backup`",
        ));
    }
    check_schema_in(&conn, path, OLDEST_BACKUP_SCHEMA)?;
    Ok(conn)
}

fn info_of(conn: &Connection, path: &Path) -> Result<BackupInfo> {
    let get = |key: &str| -> Result<rusqlite::types::Value> {
        conn.query_row("SELECT value FROM backup WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()
        .ctx("reading the backup description")?
        .ok_or_else(|| backup_error(path, format!("its description lacks {key:?}")))
    };
    use rusqlite::types::Value;
    let int = |key: &str| -> Result<u64> {
        match get(key)? {
            Value::Integer(n) if n >= 0 => Ok(n as u64),
            _ => Err(backup_error(path, format!("its {key:?} is not a count"))),
        }
    };
    if int("format")? != 1 {
        return Err(backup_error(
            path,
            "written in a backup format this syncline-hub does not read: use a newer one",
        ));
    }
    let kind = match get("kind")? {
        Value::Text(s) if s == "full" => BackupKind::Full,
        Value::Text(s) if s == "incremental" => BackupKind::Incremental,
        _ => {
            return Err(backup_error(
                path,
                "its kind is neither full nor incremental",
            ));
        }
    };
    let epoch = match get("epoch")? {
        Value::Blob(b) => Epoch(
            b.try_into()
                .map_err(|_| backup_error(path, "its epoch is not 16 bytes"))?,
        ),
        _ => return Err(backup_error(path, "its epoch is not 16 bytes")),
    };
    let info = BackupInfo {
        kind,
        epoch,
        after: Cursor(int("after")?),
        through: Cursor(int("through")?),
        changes: int("changes")?,
        created_ms: int("created_ms")?,
    };
    // An incremental backup may start at 0 too (its base was a backup of an empty log).
    if (kind == BackupKind::Full && info.after != Cursor(0)) || info.through < info.after {
        return Err(backup_error(path, "its positions do not hold together"));
    }
    Ok(info)
}

/// Checks that `files` are a full backup followed by incremental ones, each starting where
/// the one before ends, all of one log. Returns what each holds.
pub fn check_chain(files: &[PathBuf]) -> Result<Vec<BackupInfo>> {
    let Some(first) = files.first() else {
        return Err(backup_error(Path::new(""), "no backup file given"));
    };
    let infos = files
        .iter()
        .map(|f| read_info(f))
        .collect::<Result<Vec<_>>>()?;
    if infos[0].kind != BackupKind::Full {
        return Err(backup_error(
            first,
            "is incremental: give the full backup first, then the incremental ones in the \
             order they were taken",
        ));
    }
    for (i, pair) in infos.windows(2).enumerate() {
        let (prev, next) = (&pair[0], &pair[1]);
        let path = &files[i + 1];
        if next.kind != BackupKind::Incremental {
            return Err(backup_error(
                path,
                "is a full backup: only the first file may be full",
            ));
        }
        if next.epoch != prev.epoch || next.after != prev.through {
            return Err(backup_error(
                path,
                format!(
                    "starts after position {} of log {}, but the file before it ends at {} of \
                     log {}: give the incremental backups in the order they were taken, with \
                     none missing",
                    next.after.0,
                    hex::encode(next.epoch.0),
                    prev.through.0,
                    hex::encode(prev.epoch.0)
                ),
            ));
        }
    }
    Ok(infos)
}

/// Restores `files` (a full backup, then any incremental ones in the order they were taken)
/// as the hub store at `store`, replacing it if there is one. The caller holds the data
/// directory's lock (no hub runs on it). The restored log gets a new epoch, and no peer
/// positions; it keeps the full backup's chains, and chains the changes of incremental
/// backups (and of a full backup of schema 5) when opened. The store appears whole or not
/// at all: it is built in `store.restoring`, then moved into place.
pub fn restore(
    files: &[PathBuf],
    store: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<RestoreSummary> {
    let infos = check_chain(files)?;
    let total: u64 = infos.iter().map(|i| i.changes).sum();
    let building = store.with_extension("db.restoring");
    remove_with_sidecars(&building)?;
    std::fs::copy(&files[0], &building)
        .map_err(|e| backup_error(&files[0], format!("cannot copy it: {e}")))?;
    let result = (|| {
        let mut done = infos[0].changes;
        progress(Progress { done, total });
        {
            let conn = Connection::open(&building).ctx("opening the restored store")?;
            conn.execute_batch(
                "PRAGMA synchronous = OFF; PRAGMA journal_mode = OFF;
                 DROP TABLE backup; DELETE FROM peers;",
            )
            .ctx("preparing the restored store")?;
            for (file, info) in files.iter().zip(&infos).skip(1) {
                conn.execute("ATTACH DATABASE ?1 AS inc", [utf8(file)?])
                    .ctx("opening an incremental backup")?;
                conn.execute_batch(
                    "BEGIN;
                     INSERT INTO log (seq, doc, hash, deps, author, signature, bytes, instance,
                         actor_seq)
                         SELECT seq, doc, hash, deps, author, signature, bytes, instance,
                             actor_seq
                         FROM inc.log ORDER BY seq;
                     INSERT OR IGNORE INTO docs SELECT doc FROM inc.docs;
                     DELETE FROM grants;
                     INSERT INTO grants SELECT * FROM inc.grants;
                     COMMIT;",
                )
                .ctx("restoring an incremental backup")?;
                conn.execute("DETACH DATABASE inc", [])
                    .ctx("closing an incremental backup")?;
                done += info.changes;
                progress(Progress { done, total });
            }
        }
        // Back to the settings of a live store (WAL, FULL), with a new epoch.
        let mut restored = SqliteHubStore::open(&building)?;
        let epoch = restored.new_epoch()?;
        drop(restored);
        Ok(RestoreSummary {
            through: infos.last().map_or(Cursor(0), |i| i.through),
            changes: done,
            epoch,
        })
    })();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = remove_with_sidecars(&building);
            return Err(e);
        }
    };
    // `SqliteHubStore::open` left the file in WAL mode with an empty WAL (checkpointed at
    // close); replace the old store and its WAL.
    // The old store's WAL would be replayed into the new file: remove it, then rename over
    // the old store (a rename replaces it at once: there is always a hub.db).
    remove_with_sidecars_only(store)?;
    remove_with_sidecars_only(&building)?;
    std::fs::rename(&building, store)
        .map_err(|e| backup_error(store, format!("cannot move the restored store in: {e}")))?;
    sync_dir(store)?;
    Ok(summary)
}

/// Verifies backup files offline: SQLite integrity, the chain of files, and for every change
/// its bytes (they parse), its hash and metadata (they match the stored columns), its document
/// id, and its author's signature.
pub fn verify(files: &[PathBuf], progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
    let infos = if files.len() == 1 {
        vec![read_info(&files[0])?]
    } else {
        check_chain(files)?
    };
    let total: u64 = infos.iter().map(|i| i.changes).sum();
    let mut done = 0u64;
    let mut docs = std::collections::HashSet::new();
    let mut authors = std::collections::HashSet::new();
    progress(Progress { done, total });
    for (file, info) in files.iter().zip(&infos) {
        let conn = open_backup(file)?;
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .ctx("checking the file's integrity")?;
        if check != "ok" {
            return Err(backup_error(
                file,
                format!("SQLite integrity check failed: {check}"),
            ));
        }
        let stored: u64 = conn
            .query_row(
                "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM log",
                [],
                |r| {
                    let (n, lo, hi): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                    Ok((n as u64, lo as u64, hi as u64))
                },
            )
            .ctx("reading the log")
            .and_then(|(n, lo, hi)| {
                if n != info.changes || (n > 0 && (lo <= info.after.0 || hi > info.through.0)) {
                    Err(backup_error(
                        file,
                        format!(
                            "holds {n} changes at positions {lo}..={hi}, but says {} in \
                             ({}, {}]: it was altered",
                            info.changes, info.after.0, info.through.0
                        ),
                    ))
                } else {
                    Ok(n)
                }
            })?;
        let mut st = conn
            .prepare(
                "SELECT seq, doc, hash, deps, author, signature, bytes, instance, actor_seq
                 FROM log ORDER BY doc, seq",
            )
            .ctx("reading the log")?;
        let mut rows = st.query([]).ctx("reading the log")?;
        let mut batch: Vec<Row> = Vec::new();
        let mut seen = 0u64;
        while let Some(r) = rows.next().ctx("reading the log")? {
            let row = Row {
                seq: r.get(0).ctx("reading the log")?,
                doc: r.get(1).ctx("reading the log")?,
                hash: r.get(2).ctx("reading the log")?,
                deps: r.get(3).ctx("reading the log")?,
                author: r.get(4).ctx("reading the log")?,
                signature: r.get(5).ctx("reading the log")?,
                bytes: r.get(6).ctx("reading the log")?,
                instance: r.get(7).ctx("reading the log")?,
                actor_seq: r.get(8).ctx("reading the log")?,
            };
            if batch.first().is_some_and(|b| b.doc != row.doc) || batch.len() >= 256 {
                seen += verify_rows(file, std::mem::take(&mut batch), &mut authors)?;
                progress(Progress {
                    done: done + seen,
                    total,
                });
            }
            docs.insert(row.doc.clone());
            batch.push(row);
        }
        seen += verify_rows(file, batch, &mut authors)?;
        debug_assert_eq!(seen, stored);
        done += seen;
        progress(Progress { done, total });
    }
    Ok(VerifyReport {
        files: infos,
        changes: done,
        docs: docs.len() as u64,
        authors: authors.len() as u64,
    })
}

struct Row {
    seq: i64,
    doc: String,
    hash: Vec<u8>,
    deps: Vec<u8>,
    author: Vec<u8>,
    signature: Vec<u8>,
    bytes: Vec<u8>,
    instance: Option<Vec<u8>>,
    actor_seq: Option<i64>,
}

/// Verifies rows of one document; returns how many.
fn verify_rows(
    file: &Path,
    rows: Vec<Row>,
    authors: &mut std::collections::HashSet<PeerId>,
) -> Result<u64> {
    let Some(first) = rows.first() else {
        return Ok(0);
    };
    let at = |row: &Row, what: &str| {
        backup_error(
            file,
            format!(
                "the change at position {} of document {:?} {what}",
                row.seq, row.doc
            ),
        )
    };
    let doc =
        DocId::new(first.doc.clone()).map_err(|e| at(first, &format!("has a bad id: {e}")))?;
    let mut signed = Vec::with_capacity(rows.len());
    for row in &rows {
        let signature: [u8; 64] = row
            .signature
            .clone()
            .try_into()
            .map_err(|_| at(row, "has a signature that is not 64 bytes"))?;
        signed.push(SignedChange {
            bytes: row.bytes.clone(),
            signature,
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let verified = match change::verify_batch_parallel(&doc, signed, threads) {
        Ok(v) => v,
        Err(e) => {
            // Name the row that fails, not only the hash.
            let bad = rows
                .iter()
                .find(|r| {
                    let Ok(signature) = r.signature.clone().try_into() else {
                        return true;
                    };
                    change::verify(
                        &doc,
                        SignedChange {
                            bytes: r.bytes.clone(),
                            signature,
                        },
                    )
                    .is_err()
                })
                .unwrap_or(first);
            return Err(at(bad, &format!("fails verification: {e}")));
        }
    };
    for (row, v) in rows.iter().zip(&verified) {
        let hash = ChangeHash(
            row.hash
                .clone()
                .try_into()
                .map_err(|_| at(row, "has a stored hash that is not 32 bytes"))?,
        );
        if v.hash() != hash {
            return Err(at(row, "is stored under another hash than its bytes have"));
        }
        if blob_to_hashes(&row.deps)? != v.deps() {
            return Err(at(
                row,
                "is stored with other dependencies than its bytes have",
            ));
        }
        if row.author[..] != v.author().as_bytes()[..] {
            return Err(at(row, "is stored under another author than its signer"));
        }
        // The hub knows a change by (author, instance, sequence number): they must be the
        // change's own, or a restored hub would misjudge duplicates.
        let (instance, actor_seq) = crate::store::actor_key(v);
        if row.instance.as_deref() != Some(&instance[..]) || row.actor_seq != Some(actor_seq) {
            return Err(at(
                row,
                "is stored under another actor or sequence number than its own",
            ));
        }
        authors.insert(v.author());
    }
    Ok(rows.len() as u64)
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| backup_error(path, "the path is not UTF-8: choose another"))
}

fn partial_path(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Syncs `partial` to disk and renames it to `to`, then syncs the folder.
fn finish_file(partial: &Path, to: &Path) -> Result<()> {
    let io = |e: std::io::Error| backup_error(to, format!("cannot write it: {e}"));
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(partial, to).map_err(io)?;
    sync_dir(to)
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| backup_error(path, format!("cannot sync its folder: {e}")))?;
    }
    Ok(())
}

/// Removes a SQLite file and its `-wal` and `-shm` files, those that exist.
fn remove_with_sidecars(path: &Path) -> Result<()> {
    remove_if_exists(path)?;
    remove_with_sidecars_only(path)
}

fn remove_with_sidecars_only(path: &Path) -> Result<()> {
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        remove_if_exists(Path::new(&name))?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(backup_error(path, format!("cannot remove it: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Grant;
    use crate::identity::Identity;
    use crate::store::HubStore;
    use crate::store::signed_changes;

    struct Fixture {
        dir: tempfile::TempDir,
        store: PathBuf,
        who: Identity,
        doc: DocId,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = dir.path().join("hub.db");
            let mut s = SqliteHubStore::open(&store).unwrap();
            s.put_grant(&Grant {
                peer: PeerId::from_bytes([7; 32]),
                prefix: crate::DocPrefix::all(),
                read: true,
                write: true,
                relay: false,
            })
            .unwrap();
            Fixture {
                dir,
                store,
                who: Identity::generate(),
                doc: DocId::new("sites/a").unwrap(),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Appends `n` changes under a fresh actor instance, one commit each `per` changes.
        fn write(&self, n: usize, per: usize) {
            let mut s = SqliteHubStore::open(&self.store).unwrap();
            let changes = signed_changes(&self.who, &self.doc, rand::random(), 1, n);
            for part in changes.chunks(per) {
                s.append(part).unwrap();
            }
        }
    }

    fn quiet(_: Progress) {}

    fn log_of(path: &Path) -> Vec<(u64, Vec<u8>)> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT seq, hash FROM log ORDER BY seq").unwrap();
        st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    /// The log's chains, in order.
    fn chains_of(path: &Path) -> Vec<Option<Vec<u8>>> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT chain FROM log ORDER BY seq").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn backups_of_the_schema_before_the_chain_restore_and_the_restored_log_is_chained() {
        let f = Fixture::new();
        f.write(40, 16);
        let full = f.path("full.bak");
        backup(&f.store, &full, None, &mut quiet).unwrap();
        f.write(10, 10);
        let inc = f.path("inc.bak");
        backup(&f.store, &inc, Some(&full), &mut quiet).unwrap();
        assert_eq!(
            chains_of(&full),
            chains_of(&f.store)[..40],
            "the log's chains"
        );
        // The base as version 5 wrote it (no chain column); the increment of this version.
        {
            let c = Connection::open(&full).unwrap();
            c.execute_batch("ALTER TABLE log DROP COLUMN chain; PRAGMA user_version = 5;")
                .unwrap();
        }
        verify(&[full.clone(), inc.clone()], &mut quiet).unwrap();
        let target = f.path("restored.db");
        restore(&[full, inc], &target, &mut quiet).unwrap();
        assert_eq!(log_of(&target), log_of(&f.store));
        // Chained at the restore, in order, as commits would have chained it.
        let mut restored = SqliteHubStore::open(&target).unwrap();
        let all = crate::wire::Target::Prefix(crate::DocPrefix::all());
        let log = restored.read_log(&all, Cursor(0), 100).unwrap().entries;
        assert_eq!(log.len(), 50);
        let mut head = None;
        for e in &log {
            let c = crate::store::chain(head.as_ref(), &e.change.signature);
            assert_eq!(e.chain, Some(c));
            head = Some(c);
        }
        // A file of a schema older than 5 is refused, saying which versions are read.
        let old = f.path("old.bak");
        backup(&f.store, &old, None, &mut quiet).unwrap();
        Connection::open(&old)
            .unwrap()
            .execute_batch("PRAGMA user_version = 4;")
            .unwrap();
        let e = verify(&[old], &mut quiet).unwrap_err().to_string();
        assert!(
            e.contains("schema version 4") && e.contains("versions 5 to 7"),
            "{e}"
        );
    }

    #[test]
    fn full_then_incremental_backups_restore_every_change_under_a_new_epoch() {
        let f = Fixture::new();
        f.write(300, 64);
        let full = f.path("full.bak");
        let mut reports = Vec::new();
        let a = backup(&f.store, &full, None, &mut |p| reports.push(p)).unwrap();
        assert_eq!(
            (a.kind, a.after, a.through, a.changes),
            (BackupKind::Full, Cursor(0), Cursor(300), 300)
        );
        assert_eq!(
            reports.last(),
            Some(&Progress {
                done: 300,
                total: 300
            })
        );
        f.write(50, 50);
        let inc = f.path("inc.bak");
        let b = backup(&f.store, &inc, Some(&full), &mut quiet).unwrap();
        assert_eq!(
            (b.kind, b.after, b.through, b.changes),
            (BackupKind::Incremental, Cursor(300), Cursor(350), 50)
        );
        let live_epoch = SqliteHubStore::open(&f.store).unwrap().epoch();
        assert_eq!(a.epoch, live_epoch);

        // Restore both into another data directory: the same log, a new epoch, the grants.
        let target = f.path("restored.db");
        let summary = restore(&[full.clone(), inc.clone()], &target, &mut quiet).unwrap();
        assert_eq!((summary.through, summary.changes), (Cursor(350), 350));
        assert_eq!(log_of(&target), log_of(&f.store));
        let mut restored = SqliteHubStore::open(&target).unwrap();
        assert_eq!(restored.epoch(), summary.epoch);
        assert_ne!(restored.epoch(), live_epoch);
        assert_eq!(restored.grants().unwrap().len(), 1);
        assert!(restored.heads(&f.doc).unwrap().complete);
        drop(restored);

        // The full backup alone restores the older state, over an existing store.
        let summary = restore(std::slice::from_ref(&full), &target, &mut quiet).unwrap();
        assert_eq!(summary.changes, 300);
        assert_eq!(log_of(&target), log_of(&f.store)[..300]);

        let report = verify(&[full, inc], &mut quiet).unwrap();
        assert_eq!((report.changes, report.docs, report.authors), (350, 1, 1));
    }

    #[test]
    fn a_backup_taken_while_the_hub_writes_is_consistent() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let f = Fixture::new();
        f.write(2_000, 64);
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let info = std::thread::scope(|s| {
            s.spawn(|| {
                let mut store = SqliteHubStore::open(&f.store).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let c = signed_changes(&f.who, &f.doc, rand::random(), 2, 16);
                    store.append(&c).unwrap();
                    written.fetch_add(16, Ordering::Relaxed);
                }
            });
            // Inside the backup's transaction, let the hub commit more before the copy goes on.
            let mut first = true;
            let info = backup(&f.store, &f.path("live.bak"), None, &mut |_| {
                if std::mem::take(&mut first) {
                    let at = written.load(Ordering::Relaxed);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                    while written.load(Ordering::Relaxed) < at + 64 {
                        assert!(std::time::Instant::now() < deadline, "the writer stalled");
                        std::thread::yield_now();
                    }
                }
            })
            .unwrap();
            stop.store(true, Ordering::Relaxed);
            info
        });
        // Every change up to `through` is in the backup, none after it, and the hub went on.
        let log = log_of(&f.store);
        let upto: Vec<_> = log
            .iter()
            .filter(|(s, _)| *s <= info.through.0)
            .cloned()
            .collect();
        assert!(
            log.len() >= upto.len() + 64,
            "the hub committed during the backup"
        );
        assert_eq!(log_of(&f.path("live.bak")), upto);
        assert_eq!(info.changes as usize, upto.len());
        verify(&[f.path("live.bak")], &mut quiet).unwrap();
    }

    #[test]
    fn a_backup_read_through_the_store_trait_is_the_same_backup() {
        let f = Fixture::new();
        f.write(700, 64);
        let a = f.path("attached.bak");
        let b = f.path("paged.bak");
        backup(&f.store, &a, None, &mut quiet).unwrap();
        let mut store = SqliteHubStore::open(&f.store).unwrap();
        let info = backup_store(&mut store, &b, None, &mut quiet).unwrap();
        assert_eq!(
            (info.kind, info.changes, info.through),
            (BackupKind::Full, 700, Cursor(700))
        );
        let rows = |p: &Path| {
            let c = Connection::open(p).unwrap();
            let mut st = c.prepare("SELECT * FROM log ORDER BY seq").unwrap();
            let n = st.column_count();
            st.query_map([], |r| {
                (0..n)
                    .map(|i| r.get::<_, rusqlite::types::Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
        };
        assert_eq!(rows(&a), rows(&b), "the same rows, column for column");
        verify(std::slice::from_ref(&b), &mut quiet).unwrap();
        // Incremental through the trait, restorable after the first.
        f.write(30, 30);
        let inc = f.path("paged-inc.bak");
        let i = backup_store(&mut store, &inc, Some(&b), &mut quiet).unwrap();
        assert_eq!((i.after, i.changes), (Cursor(700), 30));
        let target = f.path("restored.db");
        assert_eq!(
            restore(&[b, inc], &target, &mut quiet).unwrap().changes,
            730
        );
        assert_eq!(log_of(&target), log_of(&f.store));
        // The full backup's chains kept, the increment's chained on from them at the restore
        // (the same here: its commit held no duplicate).
        drop(SqliteHubStore::open(&target).unwrap());
        assert_eq!(chains_of(&target), chains_of(&f.store));
    }

    #[test]
    fn bad_chains_and_bad_files_are_refused_with_what_to_do() {
        let f = Fixture::new();
        f.write(10, 10);
        let full = f.path("full.bak");
        backup(&f.store, &full, None, &mut quiet).unwrap();
        f.write(10, 10);
        let inc1 = f.path("inc1.bak");
        backup(&f.store, &inc1, Some(&full), &mut quiet).unwrap();
        f.write(10, 10);
        let inc2 = f.path("inc2.bak");
        backup(&f.store, &inc2, Some(&inc1), &mut quiet).unwrap();
        let target = f.path("t.db");
        let msg = |r: Result<RestoreSummary>| r.unwrap_err().to_string();

        assert!(
            msg(restore(std::slice::from_ref(&inc1), &target, &mut quiet))
                .contains("give the full backup first")
        );
        assert!(
            msg(restore(&[full.clone(), inc2.clone()], &target, &mut quiet))
                .contains("none missing")
        );
        assert!(
            msg(restore(&[full.clone(), full.clone()], &target, &mut quiet))
                .contains("only the first")
        );
        assert!(!target.exists(), "a refused restore writes nothing");
        assert_eq!(
            restore(
                &[full.clone(), inc1.clone(), inc2.clone()],
                &target,
                &mut quiet
            )
            .unwrap()
            .changes,
            30
        );

        // A chain that starts with a backup of an empty log.
        let empty = Fixture::new();
        let e0 = empty.path("empty.bak");
        assert_eq!(
            backup(&empty.store, &e0, None, &mut quiet).unwrap().through,
            Cursor(0)
        );
        empty.write(5, 5);
        let e1 = empty.path("after-empty.bak");
        let info = backup(&empty.store, &e1, Some(&e0), &mut quiet).unwrap();
        assert_eq!(
            (info.kind, info.after, info.changes),
            (BackupKind::Incremental, Cursor(0), 5)
        );
        let t = empty.path("t.db");
        assert_eq!(restore(&[e0, e1], &t, &mut quiet).unwrap().changes, 5);

        // An existing file is never overwritten.
        let e = backup(&f.store, &full, None, &mut quiet).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        // A base from another log.
        let other = Fixture::new();
        other.write(5, 5);
        let e = backup(&other.store, &other.path("x.bak"), Some(&full), &mut quiet).unwrap_err();
        assert!(e.to_string().contains("take a full backup"), "{e}");
        assert!(!other.path("x.bak").exists() && !other.path("x.bak.partial").exists());
        // Not a backup: a hub store, and garbage.
        let e = read_info(&f.store).unwrap_err();
        assert!(e.to_string().contains("not a Syncline backup"), "{e}");
        std::fs::write(
            f.path("junk"),
            b"this is not sqlite at all, not even close......",
        )
        .unwrap();
        let e = verify(&[f.path("junk")], &mut quiet).unwrap_err();
        assert!(matches!(e, Error::Backup { .. }), "{e}");
    }

    #[test]
    fn verify_names_the_change_that_was_tampered_with() {
        let f = Fixture::new();
        f.write(100, 100);
        let full = f.path("full.bak");
        backup(&f.store, &full, None, &mut quiet).unwrap();
        verify(std::slice::from_ref(&full), &mut quiet).unwrap();
        let tamper = |sql: &str| {
            let copy = f.path("t.bak");
            std::fs::copy(&full, &copy).unwrap();
            Connection::open(&copy).unwrap().execute_batch(sql).unwrap();
            verify(&[copy], &mut quiet).unwrap_err().to_string()
        };
        for (sql, position, says) in [
            (
                "UPDATE log SET signature = zeroblob(64) WHERE seq = 42",
                42,
                "fails verification",
            ),
            (
                "UPDATE log SET doc = 'sites/b' WHERE seq = 7",
                7,
                "fails verification",
            ),
            (
                "UPDATE log SET author = zeroblob(32) WHERE seq = 9",
                9,
                "another author",
            ),
            (
                "UPDATE log SET actor_seq = 999 WHERE seq = 11",
                11,
                "sequence number",
            ),
        ] {
            let e = tamper(sql);
            assert!(
                e.contains(&format!("position {position} ")) && e.contains(says),
                "{sql}: {e}"
            );
        }
        let e = tamper("DELETE FROM log WHERE seq = 50");
        assert!(e.contains("altered"), "{e}");
    }
}
