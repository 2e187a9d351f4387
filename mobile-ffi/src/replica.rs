//! The `Replica` object: a store of documents on the device and its sync with the hubs.
//!
//! A thin layer: each method converts its arguments, runs the core on the replica's thread
//! (`syncline_net::client::ReplicaHandle`, as the edge-node does), and converts the result
//! and the error. Methods block the calling thread until the store has answered (a write
//! until it is committed): call them off the UI thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use syncline_core::DocId;
use syncline_core::DocPrefix;
use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Replica as CoreReplica, ReplicaOptions};
use syncline_core::store::DirLock;
use syncline_core::wire::Target;
use syncline_net::client::{HubAddress, ReplicaHandle, SyncSettings};
use tokio::sync::{mpsc, watch};

use crate::SynclineError;
use crate::config::{HubConfig, ReplicaConfig, hub_addresses};
use crate::observer::{self, ObserverSlot, Poke, ReplicaObserver, SyncStatus, hex_heads};
use crate::runtime::runtime;

/// Largest operations text accepted in one change (a change is at most 1 MiB once encoded;
/// its JSON form is larger). The edge-node's API has the same limit.
const MAX_OPS_JSON_BYTES: usize = 4 * 1024 * 1024;
/// How long closing waits for the sync task and the event pump to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait of `sync_now` (a longer timeout is cut to this, rather than overflow a clock).
const MAX_SYNC_NOW: Duration = Duration::from_secs(24 * 3600);

/// A replica: the app's documents in a local SQLite store, synced with a hub over QUIC.
///
/// Open it with `open`; it works offline at once. Writes are durable when
/// `change` returns and wait in an outbox until a hub acknowledges them.
#[derive(uniffi::Object)]
pub struct Replica {
    state: Mutex<Option<Open>>,
    public_key: String,
    dir: PathBuf,
}

/// What an open replica holds. Dropped as a whole by [`Replica::shutdown`].
struct Open {
    handle: ReplicaHandle,
    thread: std::thread::JoinHandle<CoreReplica>,
    lock: DirLock,
    hubs: Vec<HubAddress>,
    sync: Option<tokio::task::JoinHandle<()>>,
    syncing: Arc<AtomicBool>,
    pump: tokio::task::JoinHandle<()>,
    pokes: mpsc::Sender<Poke>,
    observer: ObserverSlot,
    /// Turns true when the replica closes: ends waits in `sync_now`.
    closing: watch::Sender<bool>,
}

impl Open {
    fn poke(&self, p: Poke) {
        // A full queue already holds a poke that recomputes the status.
        let _ = self.pokes.try_send(p);
    }
}

#[uniffi::export]
impl Replica {
    /// Opens (or creates) the replica stored in the directory `path` (the app's files
    /// directory, for example): its identity (`identity`, an ed25519 key made on first open)
    /// and its store (`replica.db`). One `Replica` per directory at a time: a second open
    /// fails with `Locked` until the first is shut down.
    #[uniffi::constructor]
    pub fn open(path: String, config: ReplicaConfig) -> Result<Arc<Self>, SynclineError> {
        let hubs = hub_addresses(&config.hubs)?;
        let store_key = crate::config::store_key(&config)?;
        if path.trim().is_empty() {
            return Err(SynclineError::InvalidConfig(
                "the replica's path is empty; give a directory such as the app's files \
                 directory"
                    .into(),
            ));
        }
        let dir = PathBuf::from(path);
        let rt = runtime()?;
        create_dir(&dir)?;
        let lock = syncline_core::store::lock_dir(&dir)?;
        let identity = Identity::load_or_generate(&dir.join("identity"))?;
        let public_key = identity.peer_id().to_string();
        let options = ReplicaOptions {
            store_key,
            ..ReplicaOptions::default()
        };
        let core = CoreReplica::open(&dir.join("replica.db"), identity, options)?;
        let (handle, thread) = ReplicaHandle::spawn(core)?;

        let observer: ObserverSlot = Arc::default();
        let (notices_tx, notices_rx) = std::sync::mpsc::sync_channel(observer::MAX_NOTICES);
        let slot = observer.clone();
        std::thread::Builder::new()
            .name("syncline-observer".into())
            .spawn(move || observer::deliver(slot, notices_rx))
            .map_err(|e| {
                SynclineError::Runtime(format!("cannot start the observer thread: {e}"))
            })?;
        let syncing = Arc::new(AtomicBool::new(false));
        let (pokes, pokes_rx) = mpsc::channel(4);
        let pump = rt.spawn(observer::pump(
            handle.clone(),
            syncing.clone(),
            pokes_rx,
            observer::Notices::new(notices_tx),
        ));
        Ok(Arc::new(Replica {
            state: Mutex::new(Some(Open {
                handle,
                thread,
                lock,
                hubs,
                sync: None,
                syncing,
                pump,
                pokes,
                observer,
                closing: watch::Sender::new(false),
            })),
            public_key,
            dir,
        }))
    }

    /// This replica's public key (64 hex characters): grant it on the hub
    /// (`syncline-hub grant --data DIR KEY PREFIX rw`).
    pub fn public_key(&self) -> String {
        self.public_key.clone()
    }

    /// Applies operations to a document (created if new) as one atomic change: all of them
    /// or, on any error, none. Returns the document's new heads once the change is committed
    /// to the store; it is uploaded when a hub session allows. The replica then follows the
    /// document, so it receives the others' changes to it too.
    ///
    /// `ops_json` is the shared operation set as JSON, `[{"op": "put", "path": ["temp"],
    /// "value": 21.5}, ...]` or `{"ops": [...]}` (see the README).
    pub fn change(&self, doc_id: String, ops_json: String) -> Result<Vec<String>, SynclineError> {
        let doc = DocId::new(doc_id)?;
        if ops_json.len() > MAX_OPS_JSON_BYTES {
            return Err(SynclineError::InvalidOperation(format!(
                "the operations are {} bytes of JSON, over the limit of {MAX_OPS_JSON_BYTES}; \
                 split them into several changes",
                ops_json.len()
            )));
        }
        let ops = Op::list_from_json(&ops_json).map_err(|e| {
            SynclineError::InvalidOperation(format!(
                "the operations are not a JSON list of valid operations: {e}"
            ))
        })?;
        if ops.is_empty() {
            return Err(SynclineError::InvalidOperation(
                "the change has no operations".into(),
            ));
        }
        let heads = self.call(move |r| r.change(&doc, &ops))??;
        Ok(hex_heads(&heads))
    }

    /// The document as plain JSON text: counters read as numbers, text as strings, timestamps
    /// as milliseconds, bytes as base64 strings.
    pub fn get(&self, doc_id: String) -> Result<String, SynclineError> {
        let doc = DocId::new(doc_id)?;
        let json = self.call(move |r| r.json(&doc))??;
        Ok(json.to_string())
    }

    /// The document's heads (hex hashes of the changes no other change depends on; two
    /// replicas with the same heads have the same state).
    pub fn heads(&self, doc_id: String) -> Result<Vec<String>, SynclineError> {
        let doc = DocId::new(doc_id)?;
        let heads = self.call(move |r| r.doc(&doc).map(|d| d.heads()))??;
        Ok(hex_heads(&heads))
    }

    /// The ids of the documents held.
    pub fn docs(&self) -> Result<Vec<String>, SynclineError> {
        let ids = self.call(|r| r.doc_ids())??;
        Ok(ids.into_iter().map(|d| d.to_string()).collect())
    }

    /// Follows every document whose id starts with `prefix` (`""` for everything this
    /// replica may read): the hub sends them, then their changes. Kept across restarts;
    /// subscribing again is harmless.
    pub fn subscribe(&self, prefix: String) -> Result<(), SynclineError> {
        let target = Target::Prefix(DocPrefix::new(prefix)?);
        self.call(move |r| r.subscribe(target))??;
        Ok(())
    }

    /// Follows one document.
    pub fn subscribe_doc(&self, doc_id: String) -> Result<(), SynclineError> {
        let target = Target::Doc(DocId::new(doc_id)?);
        self.call(move |r| r.subscribe(target))??;
        Ok(())
    }

    /// Replaces the hubs to sync with (in order of preference). If sync is on, it restarts
    /// with them.
    pub fn set_hubs(&self, hubs: Vec<HubConfig>) -> Result<(), SynclineError> {
        let hubs = hub_addresses(&hubs)?;
        let restart = {
            let mut state = self.lock();
            let open = state.as_mut().ok_or(SynclineError::Closed)?;
            open.hubs = hubs;
            open.sync.take()
        };
        if let Some(task) = restart {
            stop_task(task);
            if let Err(e) = self.start_sync() {
                self.set_syncing(false);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts syncing with the configured hubs, in the background: connects (pinning each
    /// hub's certificate), uploads the outbox, receives the subscribed documents, and keeps
    /// the session, reconnecting with backoff and failing over between hubs. Nothing is
    /// polled: it waits on the socket. Starting it again is harmless.
    pub fn start_sync(&self) -> Result<(), SynclineError> {
        let rt = runtime()?;
        let mut state = self.lock();
        let open = state.as_mut().ok_or(SynclineError::Closed)?;
        if open.hubs.is_empty() {
            return Err(SynclineError::InvalidConfig(
                "no hub configured: give hubs in ReplicaConfig when opening, or call \
                 set_hubs(), before starting sync"
                    .into(),
            ));
        }
        if open.sync.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let _runtime = rt.enter();
        let task = open
            .handle
            .start_sync(SyncSettings::new(open.hubs.clone()))?;
        open.sync = Some(task);
        open.syncing.store(true, Ordering::SeqCst);
        open.poke(Poke::Status);
        Ok(())
    }

    /// Stops syncing (the app goes to the background): closes the session and its socket.
    /// Writes keep working offline and wait in the outbox. Stopping again is harmless.
    pub fn stop_sync(&self) -> Result<(), SynclineError> {
        let task = {
            let mut state = self.lock();
            let open = state.as_mut().ok_or(SynclineError::Closed)?;
            open.syncing.store(false, Ordering::SeqCst);
            open.poke(Poke::Status);
            open.sync.take()
        };
        if let Some(task) = task {
            stop_task(task);
        }
        Ok(())
    }

    /// Syncs now, for apps that schedule their own work (a background task): starts sync if
    /// it is off (it stays on; call `stop_sync` after), reconnects at once if it is waiting
    /// to retry, then waits until the replica is caught up (connected, outbox empty, every
    /// subscription caught up) or `timeout_ms` passed. Returns the status then: check
    /// `caught_up`.
    pub fn sync_now(&self, timeout_ms: u64) -> Result<SyncStatus, SynclineError> {
        let (handle, mut closing, connected, running) = {
            let state = self.lock();
            let open = state.as_ref().ok_or(SynclineError::Closed)?;
            (
                open.handle.clone(),
                open.closing.subscribe(),
                open.handle.link().connected,
                open.sync.as_ref().is_some_and(|t| !t.is_finished()),
            )
        };
        if running && !connected {
            // Waiting out a backoff: try again now.
            let task = self.lock().as_mut().and_then(|o| o.sync.take());
            if let Some(task) = task {
                stop_task(task);
            }
        }
        self.start_sync()?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(timeout_ms).min(MAX_SYNC_NOW);
        self.block_on(async move {
            let mut events = handle.events();
            let mut link = handle.link_changes();
            loop {
                let status = observer::status(&handle, true).await?;
                if status.caught_up || tokio::time::Instant::now() >= deadline {
                    return Ok(status);
                }
                tokio::select! {
                    _ = events.recv() => {}
                    _ = link.changed() => {}
                    () = tokio::time::sleep_until(deadline) => {}
                    _ = closing.wait_for(|c| *c) => return Err(SynclineError::Closed),
                }
            }
        })?
    }

    /// The sync status now.
    pub fn status(&self) -> Result<SyncStatus, SynclineError> {
        let (handle, syncing) = {
            let state = self.lock();
            let open = state.as_ref().ok_or(SynclineError::Closed)?;
            (open.handle.clone(), open.syncing.load(Ordering::SeqCst))
        };
        self.block_on(async move { observer::status(&handle, syncing).await })?
    }

    /// Sets the observer of document changes and sync status (replacing any other). It is
    /// called at once with the current status.
    pub fn set_observer(&self, observer: Arc<dyn ReplicaObserver>) -> Result<(), SynclineError> {
        let state = self.lock();
        let open = state.as_ref().ok_or(SynclineError::Closed)?;
        if let Ok(mut slot) = open.observer.lock() {
            *slot = Some(observer);
        }
        open.poke(Poke::Resend);
        Ok(())
    }

    /// Removes the observer.
    pub fn clear_observer(&self) -> Result<(), SynclineError> {
        let state = self.lock();
        let open = state.as_ref().ok_or(SynclineError::Closed)?;
        if let Ok(mut slot) = open.observer.lock() {
            *slot = None;
        }
        Ok(())
    }

    /// Stops sync, closes the store and releases the directory (another `open` may follow),
    /// and drops the observer. Every later call fails with `Closed`; closing again is
    /// harmless. Dropping the last reference to the replica does the same (Kotlin's
    /// `close()`/`use {}`, Swift's `deinit`).
    pub fn shutdown(&self) {
        let open = self.lock().take();
        if let Some(open) = open {
            close(open, &self.dir);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Replica {
    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        // A poisoned lock only means a panic elsewhere mid-call; the state is still whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_syncing(&self, on: bool) {
        if let Some(open) = self.lock().as_ref() {
            open.syncing.store(on, Ordering::SeqCst);
            open.poke(Poke::Status);
        }
    }

    /// Runs `f` on the replica thread and waits for its result.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CoreReplica) -> R + Send + 'static,
    ) -> Result<R, SynclineError> {
        let handle = {
            let state = self.lock();
            state.as_ref().ok_or(SynclineError::Closed)?.handle.clone()
        };
        self.block_on(async move { handle.call(f).await })?
            .map_err(SynclineError::from)
    }

    /// Runs `fut` on the runtime and waits for it on this thread. A plain channel, not
    /// `Runtime::block_on`: the caller may be any thread of the host's.
    fn block_on<R: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = R> + Send + 'static,
    ) -> Result<R, SynclineError> {
        let rt = runtime()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| SynclineError::Closed)
    }
}

/// Creates the replica's directory (mode 0700 on Unix: it holds the secret key).
fn create_dir(dir: &Path) -> Result<(), SynclineError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        SynclineError::Storage(format!(
            "cannot create the replica's directory {}: {e}",
            dir.display()
        ))
    })
}

/// Aborts a sync task and waits (bounded) until it is gone, so that its session has ended
/// on the replica's side before anything else starts.
fn stop_task(task: tokio::task::JoinHandle<()>) {
    task.abort();
    wait_for(task);
}

fn wait_for(task: tokio::task::JoinHandle<()>) {
    let Ok(rt) = runtime() else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = task.await;
        let _ = tx.send(());
    });
    if rx.recv_timeout(STOP_TIMEOUT).is_err() {
        tracing::warn!("a background task did not stop in time");
    }
}

/// Ends an open replica: sync and the pump first (they hold handles to the replica thread),
/// then the replica thread (it ends when the last handle is gone, closing the store), then the
/// directory lock.
fn close(open: Open, dir: &Path) {
    let Open {
        handle,
        thread,
        lock,
        sync,
        pump,
        observer,
        closing,
        ..
    } = open;
    closing.send_replace(true);
    if let Some(task) = sync {
        stop_task(task);
    }
    pump.abort();
    wait_for(pump);
    if let Ok(mut slot) = observer.lock() {
        *slot = None;
    }
    drop(handle);
    if thread.join().is_err() {
        tracing::error!(dir = %dir.display(), "the replica thread panicked");
    }
    drop(lock);
}
