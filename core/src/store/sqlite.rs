//! Opening SQLite files with the settings every store uses, and schema migrations.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::config::DbConfig;

use crate::error::{Error, Result, SqlContext};
use crate::store::StoreKey;

/// A connection's `synchronous` level, FULL as opened, switched only when it changes:
/// SQLite parses a pragma again at every run (a cached statement does not help), and the
/// stores that switch would otherwise do it at nearly every write.
#[derive(Debug)]
pub(crate) struct SyncLevel {
    full: bool,
}

impl Default for SyncLevel {
    fn default() -> Self {
        SyncLevel { full: true }
    }
}

impl SyncLevel {
    /// Sets `synchronous` to FULL or NORMAL, if it is not that already.
    pub(crate) fn set(&mut self, conn: &Connection, full: bool) -> Result<()> {
        if self.full != full {
            let sql = if full {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            conn.execute(sql, []).ctx("setting synchronous")?;
            self.full = full;
        }
        Ok(())
    }
}

/// The syncs of a store whose commits may wait for an explicit sync: they commit at
/// `synchronous=NORMAL` (in the WAL, in the OS's page cache: a process crash loses nothing)
/// and are durable once [`DeferredSync::sync`] returns. A sync that fails stays failed: every
/// later one fails with it until the store is reopened (after a failed fsync, a later one
/// may succeed with the data lost), and the store refuses the writes that would wait for it.
#[derive(Debug, Default)]
pub(crate) struct DeferredSync {
    /// Whether commits wait for [`DeferredSync::sync`].
    pub(crate) on: bool,
    /// Whether a commit waits for it now.
    unsynced: bool,
    /// Whether the WAL's directory was synced since the store was opened.
    dir_synced: bool,
    /// The file and the cause of a sync that failed.
    failed: Option<(String, String)>,
    /// The WAL's checkpoints, moved off the owner's thread while the deferral is on.
    background: Option<BackgroundCheckpoint>,
}

impl DeferredSync {
    /// Turns the deferral on or off for the store on `conn` (opened with `key`). On, its WAL
    /// checkpoints move to a thread of their own ([`BackgroundCheckpoint`]; if that thread
    /// cannot start, SQLite's own go on, and the deferral still holds). Off, what waits is
    /// synced and the checkpoints come back to the commits.
    pub(crate) fn turn(
        &mut self,
        on: bool,
        conn: &Connection,
        key: Option<&StoreKey>,
    ) -> Result<()> {
        if on {
            if self.background.is_none() {
                self.background = BackgroundCheckpoint::start(conn, key).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "WAL checkpoints stay at the commits");
                    None
                });
            }
        } else {
            self.sync(conn)?;
            if let Some(b) = self.background.take() {
                b.stop(conn)?;
            }
        }
        self.on = on;
        Ok(())
    }

    /// The store's size bound changed: a background checkpoint is due at [`due_pages`] of
    /// the new one.
    pub(crate) fn bound_changed(&self, conn: &Connection) {
        if let Some(b) = &self.background {
            b.set_due(due_pages(conn));
        }
    }

    /// Checkpoints run in the background so far that copied the whole WAL.
    #[cfg(test)]
    pub(crate) fn background_checkpoints(&self) -> Option<u64> {
        self.background.as_ref().map(BackgroundCheckpoint::done)
    }

    /// Checkpoints tried in the background so far, whatever they copied.
    #[cfg(test)]
    pub(crate) fn background_tries(&self) -> Option<u64> {
        self.background.as_ref().map(BackgroundCheckpoint::tried)
    }

    /// The failed sync, if one failed since the store was opened.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.failed {
            Some((path, reason)) => Err(Error::Unsynced {
                path: path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A commit that waits for the next sync is about to be made.
    pub(crate) fn wait(&mut self) {
        self.unsynced = true;
    }

    /// Whether a commit waits for the next sync.
    pub(crate) fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Makes every commit on `conn` durable, if one waits: as a `synchronous=FULL` commit
    /// does at its end, the WAL file, where SQLite wrote them, is synced (`fdatasync`), and
    /// the first time its directory too (the WAL may have been created by an unsynced
    /// commit). A store in memory has nothing to sync.
    pub(crate) fn sync(&mut self, conn: &Connection) -> Result<()> {
        self.check()?;
        if !self.unsynced {
            return Ok(());
        }
        if let Err((path, reason)) = self.sync_files(conn) {
            self.failed = Some((path.clone(), reason.clone()));
            return Err(Error::Unsynced { path, reason });
        }
        self.unsynced = false;
        Ok(())
    }

    fn sync_files(&mut self, conn: &Connection) -> std::result::Result<(), (String, String)> {
        let Some(path) = conn.path().filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let wal = format!("{path}-wal");
        // (SQLite keeps the WAL file while a connection is open: a missing one is an error.)
        sync_file(Path::new(&wal)).map_err(|e| (wal.clone(), e.to_string()))?;
        if !self.dir_synced {
            if let Some(dir) = Path::new(&wal)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| (dir.display().to_string(), e.to_string()))?;
            }
            self.dir_synced = true;
        }
        Ok(())
    }
}

/// WAL pages after which SQLite checkpoints by default (at the commit that passes them).
const SQLITE_CHECKPOINT_PAGES: i32 = 1000;

/// WAL pages after which a background checkpoint is due: 40 MiB of 4 KiB pages, ten times
/// SQLite's default. Even off the live threads, checkpoints cost the live changes around
/// them: in the latency workload, a run with none has a p99 about 0.8 ms lower, on a RAM
/// disk too (BENCHMARKS E2E-20). At SQLite's 1,000 pages, one of the replicas or the hub
/// checkpointed for about every 20th change, often enough to be in the p99; ten times fewer
/// leaves them to the slowest half percent. Each copies more frames, but a page rewritten by
/// many changes (the same few B-tree pages of a live document) is copied once. A store bounded
/// in size ([`due_pages`]) checkpoints sooner: the WAL is outside the bound.
const CHECKPOINT_PAGES: i32 = 10_000;

/// WAL pages past the due ones at which the owner's thread checkpoints at its commit, as
/// SQLite does by default, when the background thread has not finished: a writer that never
/// pauses commits during every background checkpoint, which then copies all but the last
/// frames and cannot restart the WAL. The owner's checkpoint copies only those (a few MiB)
/// and restarts it at the next write: the WAL stays within about 44 MiB. (With the backstop
/// at twice the due pages, the WAL of a nemesis edge, on a 64 MiB disk, grew past 57 MiB.)
const BACKSTOP_PAGES: i32 = SQLITE_CHECKPOINT_PAGES;

/// The WAL pages at which a background checkpoint of the store on `conn` is due: a quarter of
/// its size bound (`max_page_count`, [`ReplicaStore::set_max_bytes`]) if that is less than
/// [`CHECKPOINT_PAGES`], never less than SQLite's 1,000.
///
/// [`ReplicaStore::set_max_bytes`]: crate::store::ReplicaStore::set_max_bytes
fn due_pages(conn: &Connection) -> std::ffi::c_int {
    let max: i64 = conn
        .pragma_query_value(None, "max_page_count", |r| r.get(0))
        .unwrap_or(i64::MAX);
    (max / 4).clamp(
        i64::from(SQLITE_CHECKPOINT_PAGES),
        i64::from(CHECKPOINT_PAGES),
    ) as i32
}

/// The background checkpoint of the store a thread owns.
struct Slot {
    id: u64,
    wake: mpsc::SyncSender<()>,
    /// The WAL pages at which a checkpoint is due ([`due_pages`]).
    due: std::ffi::c_int,
    /// The thread was woken and has not copied the whole WAL yet: commits do not wake it
    /// again (it retries by itself).
    pending: Arc<AtomicBool>,
    /// Commits made so far: the thread waits for them to pause.
    commits: Arc<AtomicU64>,
    /// Times the hook woke the thread (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    wakes: u64,
    /// The most pages the WAL held at a commit (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    peak: std::ffi::c_int,
}

/// How long the owner's commits must pause before a checkpoint starts.
const QUIET: Duration = Duration::from_millis(10);

/// The longest a due checkpoint waits for that pause.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// How long a checkpoint that could not copy the whole WAL (it failed: a full disk; or a
/// reader holds old frames) waits before it is tried again. It is tried again without a
/// commit to wake it: on a full disk, no commit succeeds until the WAL restarts.
const RETRY: Duration = Duration::from_millis(250);

thread_local! {
    /// The background checkpoint of the store this thread owns, if it has one. One per
    /// thread: the WAL hook cannot tell connections apart.
    static BACKGROUND: RefCell<Option<Slot>> = const { RefCell::new(None) };
}

/// Times the WAL hook woke this thread's background checkpoint, and the most pages it saw in
/// the WAL; `None` without one.
#[cfg(test)]
pub(crate) fn background_wakes() -> Option<(u64, std::ffi::c_int)> {
    BACKGROUND.with(|b| b.borrow().as_ref().map(|s| (s.wakes, s.peak)))
}

/// The WAL hook of a connection whose checkpoints run in the background: SQLite calls it after
/// every commit with the pages in the WAL. Once a checkpoint is due ([`due_pages`]) it wakes
/// the background thread, unless that thread is at it already; or it checkpoints here as
/// SQLite's default hook does: [`BACKSTOP_PAGES`] past the due ones, or past SQLite's 1,000
/// pages when this thread has no background thread (the store moved to another thread).
fn wal_hook(wal: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    let here = BACKGROUND.with(|b| {
        let mut b = b.borrow_mut();
        let Some(slot) = b.as_mut() else {
            // The store moved to a thread without a checkpoint thread: as SQLite does.
            return pages >= SQLITE_CHECKPOINT_PAGES;
        };
        slot.commits.fetch_add(1, Ordering::Relaxed);
        slot.peak = slot.peak.max(pages);
        if pages < slot.due {
            return false; // nothing due
        }
        if pages >= slot.due + BACKSTOP_PAGES {
            return true;
        }
        if slot.pending.swap(true, Ordering::AcqRel) {
            return false; // due, and the thread is at it
        }
        match slot.wake.try_send(()) {
            Err(mpsc::TrySendError::Disconnected(())) => {
                // The thread is gone: every commit past due checkpoints here, as SQLite's.
                slot.pending.store(false, Ordering::Release);
                true
            }
            _ => {
                slot.wakes += 1;
                false
            }
        }
    });
    if here {
        // As SQLite's default hook: the commit has happened whatever the checkpoint does.
        let _ = wal.checkpoint();
    }
    Ok(())
}

/// WAL checkpoints on a thread of their own, for a store whose owner thread serves live
/// traffic. By default SQLite checkpoints inside the commit that takes the WAL past 1,000
/// pages: copying them into the database file and syncing it takes milliseconds, and a live
/// change that commits at that moment waits for it (it was the largest part of the latency
/// tail in `syncline-bench --only latency` at 300 changes). Here that commit only wakes this
/// thread, which checkpoints over its own connection (`PASSIVE`: it never blocks the owner's
/// writes, which go on appending to the WAL meanwhile); SQLite restarts the WAL at the owner's
/// first write after a checkpoint that copied everything. Until one has, the thread tries
/// again by itself ([`RETRY`]): a checkpoint that failed on a full disk is not woken again by
/// a commit, as none succeeds. Durability is unchanged: a checkpoint syncs the WAL before it
/// copies and the database after.
#[derive(Debug)]
pub(crate) struct BackgroundCheckpoint {
    id: u64,
    wake: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Checkpoints the thread has run that copied the whole WAL, and all it tried (read by
    /// tests).
    #[cfg_attr(not(test), allow(dead_code))]
    done: Arc<AtomicU64>,
    #[cfg_attr(not(test), allow(dead_code))]
    tried: Arc<AtomicU64>,
}

impl BackgroundCheckpoint {
    /// Moves `conn`'s checkpoints to a thread of their own, which opens its own connection to
    /// the same file (with `key`, for an encrypted store). `None` where that cannot be: a store
    /// in memory, a thread that already has one, no threads (browsers); SQLite's own
    /// checkpoints then go on as before.
    pub(crate) fn start(conn: &Connection, key: Option<&StoreKey>) -> Result<Option<Self>> {
        let Some(path) = conn.path().filter(|p| !p.is_empty()).map(str::to_owned) else {
            return Ok(None);
        };
        if BACKGROUND.with(|b| b.borrow().is_some()) {
            return Ok(None);
        }
        let own = Connection::open(&path).ctx("opening the store for its checkpoints")?;
        if let Some(key) = key {
            apply_key(&own, Path::new(&path), key)?;
        }
        own.busy_timeout(Duration::from_secs(5))
            .ctx("setting the busy timeout")?;
        // A checkpoint syncs the WAL before it copies and the database file after.
        own.pragma_update(None, "synchronous", "FULL")
            .ctx("setting synchronous=FULL")?;
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let done = Arc::new(AtomicU64::new(0));
        let counted = done.clone();
        let tried = Arc::new(AtomicU64::new(0));
        let trying = tried.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let counting = commits.clone();
        let pending = Arc::new(AtomicBool::new(false));
        let at_it = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("syncline-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    // Until the whole WAL is copied: then the owner's next write restarts it.
                    let mut failed = false;
                    loop {
                        if !wait_for_pause(&woken, &commits) {
                            return; // the store is closing
                        }
                        let r = own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                        });
                        trying.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Ok((log, copied)) if copied >= log => {
                                counted.fetch_add(1, Ordering::Relaxed);
                                if failed {
                                    tracing::info!(path, "the WAL checkpoint succeeded again");
                                }
                                break;
                            }
                            // Commits came during the copy (the backstop copies the rest
                            // if they go on), or a reader holds old frames.
                            Ok(_) => {}
                            // Once per stretch of failures: on a full disk, they go on until
                            // space is freed.
                            Err(e) if !failed => {
                                failed = true;
                                tracing::warn!(path, error = %e, "a WAL checkpoint failed; trying again every 250 ms");
                            }
                            Err(_) => {}
                        }
                        if let Err(mpsc::RecvTimeoutError::Disconnected) = woken.recv_timeout(RETRY)
                        {
                            return;
                        }
                    }
                    at_it.store(false, Ordering::Release);
                }
            });
        let Ok(thread) = spawned else {
            return Ok(None);
        };
        static IDS: AtomicU64 = AtomicU64::new(1);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        BACKGROUND.with(|b| {
            *b.borrow_mut() = Some(Slot {
                id,
                wake: wake.clone(),
                due: due_pages(conn),
                pending,
                commits: counting,
                wakes: 0,
                peak: 0,
            })
        });
        conn.wal_hook(Some(wal_hook));
        Ok(Some(BackgroundCheckpoint {
            id,
            wake: Some(wake),
            thread: Some(thread),
            done,
            tried,
        }))
    }

    /// Sets the WAL pages at which a checkpoint is due, if this thread owns the store.
    fn set_due(&self, pages: std::ffi::c_int) {
        BACKGROUND.with(|b| {
            if let Some(s) = b.borrow_mut().as_mut().filter(|s| s.id == self.id) {
                s.due = pages;
            }
        });
    }

    /// Checkpoints run by the thread so far that copied the whole WAL.
    #[cfg(test)]
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Checkpoints the thread has tried so far, whatever they copied.
    #[cfg(test)]
    pub(crate) fn tried(&self) -> u64 {
        self.tried.load(Ordering::Relaxed)
    }

    /// Gives `conn`'s checkpoints back to SQLite (at its commits, as by default) and ends the
    /// thread once its checkpoint in progress is done.
    pub(crate) fn stop(mut self, conn: &Connection) -> Result<()> {
        conn.pragma_update(None, "wal_autocheckpoint", SQLITE_CHECKPOINT_PAGES)
            .ctx("restoring the WAL's checkpoints")?;
        self.end();
        Ok(())
    }

    fn end(&mut self) {
        BACKGROUND.with(|b| {
            let mut b = b.borrow_mut();
            if b.as_ref().is_some_and(|s| s.id == self.id) {
                *b = None;
            }
        });
        self.wake = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the owner's commits pause for [`QUIET`], or [`MAX_WAIT`]: a checkpoint takes
/// milliseconds of the machine's CPU and disk, and should not run beside a live change's work
/// (on a small machine, a change's commits at every replica and at the hub come in one burst,
/// a few milliseconds long). False if the store is closing.
fn wait_for_pause(woken: &mpsc::Receiver<()>, commits: &AtomicU64) -> bool {
    let due = Instant::now();
    loop {
        let seen = commits.load(Ordering::Relaxed);
        if let Err(mpsc::RecvTimeoutError::Disconnected) = woken.recv_timeout(QUIET) {
            return false;
        }
        if commits.load(Ordering::Relaxed) == seen || due.elapsed() >= MAX_WAIT {
            return true;
        }
    }
}

impl Drop for BackgroundCheckpoint {
    fn drop(&mut self) {
        // (A store dropped with it on: its connection closes too. On another thread than
        // the owner's, the owner's slot stays until its next use finds the thread gone.)
        self.end();
    }
}

/// Syncs a file's data (`fdatasync`), opened for writing: some systems sync only such
/// handles.
pub(crate) fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_data())
}

/// Opens (or creates) a store file: WAL, `synchronous=FULL` (a commit survives power loss),
/// foreign keys on, a page cache of `cache_mib` MiB, and migrations run in one transaction.
/// The schema version is SQLite's `user_version`: the number of migrations applied.
pub(crate) fn open(
    path: &Path,
    kind: &str,
    migrations: &[&str],
    cache_mib: u32,
) -> Result<Connection> {
    open_keyed(path, kind, migrations, cache_mib, None)
}

/// [`open`] with an encryption key (SQLCipher): a new file is encrypted with it, an existing
/// one must have been.
pub(crate) fn open_keyed(
    path: &Path,
    kind: &str,
    migrations: &[&str],
    cache_mib: u32,
    key: Option<&StoreKey>,
) -> Result<Connection> {
    let conn = Connection::open(path).ctx("opening the store file")?;
    // In the browser (OPFS) there is no shared memory for WAL's index: WAL works there only
    // with the database held exclusively, which it is anyway (one worker owns the store).
    // This must come before the first read, which would otherwise look for the shared index.
    if cfg!(target_arch = "wasm32") {
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .ctx("taking the store exclusively")?;
    }
    if let Some(key) = key {
        apply_key(&conn, path, key)?;
    }
    // The first read of the file: an encrypted store opened without its key (or with another
    // key) reads as "not a database".
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => {}
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
            return Err(Error::StoreKey {
                path: path.to_owned(),
                reason: if key.is_some() {
                    "this key does not open the store (or the file is not a Syncline store): \
                     check the key file"
                        .into()
                } else {
                    "the store is encrypted (or is not a Syncline store): give its key \
                     (`db_key_file`)"
                        .into()
                },
            });
        }
        Err(e) => return Err(e).ctx("reading the store file"),
    }
    configure(&conn, cache_mib)?;
    migrate(conn, kind, migrations)
}

#[cfg(feature = "encryption")]
fn apply_key(conn: &Connection, _path: &Path, key: &StoreKey) -> Result<()> {
    // SQLCipher logs a failed decryption on stderr; the caller gets a typed error instead.
    conn.execute_batch("PRAGMA cipher_log_level = NONE")
        .ctx("configuring the store cipher")?;
    conn.pragma_update(None, "key", &*key.pragma_value())
        .ctx("setting the store key")
}

#[cfg(not(feature = "encryption"))]
fn apply_key(_conn: &Connection, path: &Path, _key: &StoreKey) -> Result<()> {
    Err(Error::StoreKey {
        path: path.to_owned(),
        reason: "this build cannot encrypt stores: build it with the `encryption` feature \
                 (syncline-edge has it by default)"
            .into(),
    })
}

/// An in-memory store (tests and simulations that do not restart).
pub(crate) fn open_in_memory(kind: &str, migrations: &[&str]) -> Result<Connection> {
    let conn = Connection::open_in_memory().ctx("opening an in-memory store")?;
    configure(&conn, 0)?;
    migrate(conn, kind, migrations)
}

fn configure(conn: &Connection, cache_mib: u32) -> Result<()> {
    if cache_mib > 0 {
        // A negative cache_size is in KiB. The default (2 MiB) no longer holds the indexes of
        // a log of 100,000 changes, and every insert then reads pages back from the OS.
        conn.pragma_update(None, "cache_size", -(i64::from(cache_mib) * 1024))
            .ctx("setting the page cache size")?;
    }
    conn.busy_timeout(Duration::from_secs(5))
        .ctx("setting the busy timeout")?;
    // The query planner's stability guarantee: a cached statement keeps its plan. Without it
    // (the bundled SQLite has STAT4), a bound LIMIT or range value marks the statement to be
    // re-planned at every bind, and every outbox and log read parsed its SQL again: a tenth
    // of a replica thread's time on the way of a live change (perf, `--only latency`).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .ctx("setting the query planner stability guarantee")?;
    let want = "wal";
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", want, |r| r.get(0))
        .ctx("setting the journal mode")?;
    if mode != want && mode != "memory" {
        return Err(Error::Corrupt {
            what: "journal".into(),
            reason: format!("journal_mode is {mode}, not {want}"),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .ctx("setting synchronous=FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .ctx("enabling foreign keys")?;
    Ok(())
}

fn migrate(mut conn: Connection, kind: &str, migrations: &[&str]) -> Result<Connection> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .ctx("reading the schema version")?;
    let target = migrations.len() as u32;
    if current > target {
        return Err(Error::Corrupt {
            what: format!("{kind} schema"),
            reason: format!(
                "version {current} was written by a newer Syncline (this one knows {target}); upgrade"
            ),
        });
    }
    if current < target {
        let tx = conn.transaction().ctx("starting a migration")?;
        for (i, sql) in migrations.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql).ctx("migrating the schema")?;
            tracing::info!(kind, version = i + 1, "migrated store schema");
        }
        tx.pragma_update(None, "user_version", target)
            .ctx("recording the schema version")?;
        tx.commit().ctx("committing a migration")?;
    }
    Ok(conn)
}

/// Encodes hashes as one blob of 32-byte chunks.
pub(crate) fn hashes_to_blob(hashes: &[crate::ChangeHash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.0).collect()
}

/// Inverse of [`hashes_to_blob`]; a blob that is not whole chunks is corrupt.
pub(crate) fn blob_to_hashes(blob: &[u8]) -> Result<Vec<crate::ChangeHash>> {
    if !blob.len().is_multiple_of(32) {
        return Err(Error::Corrupt {
            what: "hash list".into(),
            reason: format!("{} bytes", blob.len()),
        });
    }
    Ok(blob
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            crate::ChangeHash(h)
        })
        .collect())
}
