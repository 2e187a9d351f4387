//! A replica: its documents, its durable store, and its sync session with a hub.
//!
//! The replica is a sans-IO state machine. A driver (the edge-node's QUIC client, the wasm
//! WebSocket client, a test simulator) calls, in this order:
//!
//! 1. [`Replica::connect`] when a transport to a hub is open, and sends what
//!    [`Replica::poll_transmit`] returns;
//! 2. [`Replica::handle_message`] for every message received (it only queues and checks);
//! 3. [`Replica::poll_transmit`] until it returns `None` (it first commits what was received,
//!    in one transaction, then hands out acknowledgements, subscriptions and uploads);
//! 4. [`Replica::poll_event`] to learn what changed;
//! 5. [`Replica::disconnect`] when the transport closes.
//!
//! Local writes ([`Replica::change`]) work with or without a session: they are committed to
//! the store and kept in the outbox until the hub acknowledges them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use automerge::ReadDoc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::change::{self, SignedChange, VerifiedChange};
use crate::document::{Document, PatchSummary};
use crate::error::{Error, ProtocolError, Result};
use crate::identity::Identity;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
use crate::ops::Op;
use crate::protocol::Handshake;
use crate::rolling::Rolling;
use crate::store::ReplicaStore;
use crate::wire::{
    self, CaughtUpAt, Changes, ErrorCode, Heads, Mark, Message, Push, Reconcile, Reject, Resume,
    Role, Subscribe, Target,
};

/// Pushes sent and not yet answered, at most.
const MAX_INFLIGHT_PUSHES: usize = 8;
/// Changes in one push, at most.
const MAX_PUSH_CHANGES: usize = 256;
/// Bytes in one push, about (one oversized change still goes alone).
const MAX_PUSH_BYTES: usize = 1024 * 1024;
/// Received messages queued before they must be committed: each commit is one fsync, which a
/// catch-up of many small documents (one message each) waited on 16 times per 1,000 at 64.
const MAX_INCOMING: usize = 256;
/// Bytes of received changes queued before they must be committed (the bound on what a
/// commit holds in memory, whatever the messages' sizes).
const MAX_INCOMING_BYTES: usize = 8 * 1024 * 1024;
/// Events kept for the app before the oldest are dropped.
const MAX_EVENTS: usize = 10_000;

/// Settings of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Suffix of this store instance's Automerge actor. `None` (the default) draws a fresh one
    /// at every open, so that a store restored from an old backup never reuses a sequence
    /// number the hub has seen. Simulations fix it to be reproducible.
    pub instance: Option<[u8; 8]>,
    /// Seed for handshake nonces; `None` uses the OS random source.
    pub rng_seed: Option<u64>,
    /// Compact a document (snapshot, drop incremental bytes) when its incremental changes
    /// exceed this many bytes.
    pub compact_after_bytes: u64,
    /// Changes of one document that may wait for missing dependencies.
    pub max_pending_per_doc: usize,
    /// Compute what changed (patches) for [`Event::DocChanged`].
    pub patch_events: bool,
    /// Threads that verify the signatures of received changes (the calling thread is one of
    /// them). Verification and Automerge's apply cost about the same per change; verifying on
    /// every core keeps apply the only serial part. 1 verifies on the calling thread only.
    pub verify_threads: usize,
    /// The time stamped on local changes, in milliseconds since the Unix epoch: what an audit
    /// of the history shows as "when". The default reads the system clock; simulations fix it
    /// so that a seed replays exactly.
    pub clock: fn() -> i64,
    /// Encrypt the store file with this key (SQLCipher; needs the `encryption` feature). A
    /// store made with a key opens only with it.
    pub store_key: Option<crate::store::StoreKey>,
    /// Bound the store file to about this many bytes: writes beyond it are refused with
    /// [`Error::StorageFull`] and store nothing (`ReplicaStore::set_max_bytes`).
    pub max_store_bytes: Option<u64>,
    /// Rolling policies: logical documents under these prefixes are kept as one bucket
    /// document per period, so their history stays bounded ([`crate::rolling`]).
    pub rolling: Vec<Rolling>,
    /// Documents held in memory at most (between operations): past it the least recently
    /// used are dropped and loaded again from the store when next used. A gateway following
    /// thousands of documents keeps its memory bounded by this, not by what it stores.
    pub max_cached_docs: usize,
}

/// Milliseconds since the Unix epoch by the system clock; 0 before 1970, and on wasm, where
/// the standard library has no clock (bindings there set [`ReplicaOptions::clock`]).
pub fn system_clock_ms() -> i64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
    #[cfg(target_arch = "wasm32")]
    {
        0
    }
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            instance: None,
            rng_seed: None,
            compact_after_bytes: 1024 * 1024,
            max_pending_per_doc: 65_536,
            patch_events: true,
            verify_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            clock: system_clock_ms,
            store_key: None,
            max_store_bytes: None,
            rolling: Vec::new(),
            max_cached_docs: 1024,
        }
    }
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// This replica's app.
    Local,
    /// Another replica, through the hub.
    Remote,
}

/// What a replica reports to its app.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A document changed.
    DocChanged {
        /// Which.
        doc: DocId,
        /// Local write or remote change.
        origin: Origin,
        /// Its heads now.
        heads: Vec<ChangeHash>,
        /// What changed (empty if [`ReplicaOptions::patch_events`] is off).
        patches: Vec<PatchSummary>,
    },
    /// The hub refused some local changes (they stay here, and are offered again next session).
    Rejected {
        /// The document.
        doc: DocId,
        /// Why.
        code: ErrorCode,
        /// In words.
        message: String,
    },
    /// A subscription has caught up with the hub.
    Synced {
        /// The subscription.
        target: Target,
    },
    /// The session is authenticated and syncing.
    Connected {
        /// The hub's key.
        hub: PeerId,
    },
    /// The hub stored local changes of a document (durably). They leave the outbox then, or,
    /// in a session that repairs the hub's log or checks it for a rollback, at its end. That
    /// removal is not synced: after a power cut they may be in the outbox again, and are
    /// uploaded and acknowledged again (a second event for the same changes).
    Acknowledged {
        /// The document.
        doc: DocId,
        /// How many changes.
        changes: u64,
    },
    /// Events were dropped because the app did not read them.
    Lagged {
        /// How many.
        dropped: u64,
    },
}

/// A replica's sync state, for status pages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The hub, when a session is authenticated.
    pub hub: Option<String>,
    /// Local changes not yet acknowledged by the hub.
    pub outbox: u64,
    /// Of those, how many the hub refused.
    pub rejected: u64,
    /// Remote changes this replica refused since it was opened: signed by their author but
    /// breaking the rules Automerge asserts (the author's sequence or operation numbering,
    /// actors and objects it may name: [`crate::document::Refused`]; a damaged or copied store, or a
    /// hostile author). Not applied, not stored; logged as warnings.
    pub refused: u64,
    /// Subscriptions that have caught up in this session.
    pub synced: Vec<String>,
    /// Subscriptions.
    pub subscriptions: Vec<String>,
}

struct DocState {
    doc: Document,
    /// Stored changes Automerge holds back until their dependencies arrive.
    pending: HashSet<ChangeHash>,
    incremental_bytes: u64,
    /// When it was last used (the replica's use counter): the least recently used go first
    /// when the cache is over [`ReplicaOptions::max_cached_docs`].
    used: u64,
}

/// Documents of a commit are applied on several threads once it holds this many changes per
/// thread (a thread costs tens of microseconds; a small document's apply about as much).
const MIN_CHANGES_PER_APPLY_THREAD: usize = 64;

/// The most received changes whose commit may wait ([`Replica::defer_received`]): live
/// changes, not a catch-up.
pub const MAX_UNCOMMITTED: usize = 16;

/// Received changes applied, not stored yet ([`Replica::defer_received`]).
struct Uncommitted {
    changes: Vec<VerifiedChange>,
    cursors: Vec<(Target, Cursor, Option<Mark>)>,
    epoch: Option<Epoch>,
}

/// Writes received changes, the cursors they advance and the hub epoch they came from (if
/// it is new) in one batch, for the caller to commit; whether each change was new.
fn write_received<'s>(
    store: &'s mut ReplicaStore,
    changes: &[&VerifiedChange],
    cursors: &[(Target, Cursor, Option<Mark>)],
    epoch: Option<Epoch>,
) -> Result<(crate::store::WriteBatch<'s>, Vec<bool>)> {
    let mut batch = store.received_batch()?;
    let mut new = Vec::with_capacity(changes.len());
    for c in changes {
        new.push(batch.insert_change(c)?);
    }
    for (t, c, mark) in cursors {
        batch.advance_cursor(t, *c, *mark)?;
    }
    if let Some(epoch) = epoch {
        batch.set_last_epoch(epoch)?;
    }
    Ok((batch, new))
}

/// What applying one document's received changes did.
struct Applied {
    /// The changes the document's checks refused (not to be stored).
    refused: HashSet<ChangeHash>,
    /// The heads before, if the heads moved.
    before: Option<Vec<ChangeHash>>,
    /// What the apply did, when the app asked for patches in its events.
    patches: Vec<PatchSummary>,
}

/// Applies changes received for `doc`, new to it, to its state in one Automerge call; refused
/// ones are logged, and those waiting for dependencies stay pending (at most `max_pending`).
fn apply_received(
    doc: &DocId,
    state: &mut DocState,
    fresh: &[VerifiedChange],
    max_pending: usize,
    patch_events: bool,
) -> Result<Applied> {
    let before = state.doc.heads();
    let changes = fresh.iter().map(|c| c.automerge().clone()).collect();
    let mut patches = Vec::new();
    let refused = if patch_events {
        state.doc.apply_changes_patched(changes, &mut patches)?
    } else {
        state.doc.apply_changes(changes)?
    };
    for r in &refused {
        let author = fresh
            .iter()
            .find(|c| c.hash() == r.hash)
            .map(|c| c.author());
        tracing::warn!(%doc, ?author, "refused a remote change: {r}");
    }
    let refused: HashSet<ChangeHash> = refused.iter().map(|r| r.hash).collect();
    // One that waited since an earlier flush is stored already; it stops counting as pending
    // (it is left out again if the document is reloaded).
    state.pending.retain(|h| !refused.contains(h));
    let kept = fresh.iter().filter(|c| !refused.contains(&c.hash()));
    state.pending.extend(kept.clone().map(|c| c.hash()));
    let doc_ref = &state.doc;
    state.pending.retain(|h| !doc_ref.has_change(h));
    if state.pending.len() > max_pending {
        return Err(Error::TooManyPending {
            doc: doc.clone(),
            count: state.pending.len(),
        });
    }
    state.incremental_bytes += kept.map(|c| c.signed().bytes.len() as u64).sum::<u64>();
    let moved = state.doc.heads() != before;
    Ok(Applied {
        refused,
        before: moved.then_some(before),
        patches,
    })
}

/// What the outbox gives for the next push.
enum NextPush {
    /// A push to send.
    Send(Message),
    /// Every row read was dropped (not uploadable): read on.
    Dropped,
    /// No rows after the session's mark.
    Empty,
}

struct InFlight {
    doc: DocId,
    rows: Vec<i64>,
}

struct Session {
    handshake: Handshake,
    hub: Option<PeerId>,
    hub_epoch: Epoch,
    out: VecDeque<Message>,
    inflight: BTreeMap<u64, InFlight>,
    next_push: u64,
    sent_upto: i64,
    /// Epoch each subscription was requested with in this session.
    requested: HashMap<Target, Epoch>,
    /// Documents the hub listed during a repair.
    heads_seen: HashSet<DocId>,
    /// Documents whose Reconcile the hub has not finished answering.
    reconciling: HashSet<DocId>,
    /// Repairs that caught up but wait for reconciles before their new epoch is recorded.
    deferred: Vec<CaughtUpAt>,
    /// Subscriptions resumed with marks (of the cursor, of our written position) that have
    /// not caught up yet: until they have, the hub may still find the log rolled back.
    checking: HashSet<Target>,
    /// The session was not reconciled when it started, and has not been since.
    unsettled: bool,
    /// Acknowledgements taken before the session was reconciled: the outbox rows they
    /// acknowledged, and the highest position.
    held_rows: Vec<i64>,
    held_at: Option<crate::wire::Position>,
    /// A subscription of the session was repaired from a rolled-back log: once reconciled,
    /// the written position names nothing the log needs to be checked for.
    repaired_rollback: bool,
    /// The written position recorded before the session was sent in a `Resume` (or there is
    /// none), or one of this session's acknowledgements has replaced it: it names this log.
    /// Until then, it is replaced by the first position acknowledged, not kept if higher
    /// (it may name a log this one is not: the hub never checked it).
    written_checked: bool,
    synced: HashSet<Target>,
    failed: bool,
    /// What failed it first ([`Replica::session_failure`]).
    failure: Option<String>,
}

impl Session {
    /// Whether the hub's log is known to hold what this replica's state says a log holds:
    /// no subscription of the session asked for another log, nor had the hub check its
    /// marks (a rollback), without having caught up since. Until then the session records
    /// nothing that would let the next one skip the repair or the check: not the hub's
    /// epoch as the log last exchanged with (a subscription that never caught up would ask
    /// for the new log, and not be repaired), not a newer written position (the check would
    /// pass), and no acknowledged outbox row is deleted (this log may yet be replaced by
    /// one without it, and nothing would upload it again). The fault simulation lost
    /// acknowledged writes in each of these three ways.
    fn reconciled(&self) -> bool {
        self.checking.is_empty()
            && self
                .requested
                .values()
                .all(|e| *e == Epoch::none() || *e == self.hub_epoch)
    }
}

/// The replica's subscriptions, with a set of the documents followed one by one: a gateway
/// that writes to thousands of documents follows each, and every write asks whether its
/// document is followed already.
#[derive(Debug, Default)]
struct Subscriptions {
    list: Vec<Target>,
    docs: HashSet<DocId>,
    prefixes: Vec<DocPrefix>,
}

impl Subscriptions {
    fn covers(&self, doc: &DocId) -> bool {
        self.docs.contains(doc) || self.prefixes.iter().any(|p| doc.matches(p))
    }

    fn contains(&self, target: &Target) -> bool {
        match target {
            Target::Doc(d) => self.docs.contains(d),
            Target::Prefix(p) => self.prefixes.contains(p),
        }
    }

    fn push(&mut self, target: Target) {
        if self.contains(&target) {
            return;
        }
        match &target {
            Target::Doc(d) => {
                self.docs.insert(d.clone());
            }
            Target::Prefix(p) => self.prefixes.push(p.clone()),
        }
        self.list.push(target);
    }

    fn iter(&self) -> std::slice::Iter<'_, Target> {
        self.list.iter()
    }

    fn remove_doc(&mut self, doc: &DocId) {
        if self.docs.remove(doc) {
            self.list
                .retain(|t| !matches!(t, Target::Doc(d) if d == doc));
        }
    }
}

/// A replica of a set of documents. See the module docs for how a driver runs it.
pub struct Replica {
    identity: Identity,
    actor: automerge::ActorId,
    store: ReplicaStore,
    docs: HashMap<DocId, DocState>,
    /// Uses of documents so far (see `DocState::used`).
    uses: u64,
    subscriptions: Subscriptions,
    session: Option<Session>,
    /// Received changes not ingested yet, each with the hub's mark of the position its
    /// cursor reached (version 4), if it sent one.
    incoming: Vec<(Changes, Option<Mark>)>,
    /// Bytes of the changes in `incoming`.
    incoming_bytes: usize,
    events: VecDeque<Event>,
    dropped_events: u64,
    compactions: u64,
    /// Snapshots from the hub taken since the replica was opened.
    snapshots: u64,
    /// Buckets of rolling documents forgotten since the replica was opened.
    retired: u64,
    /// Remote changes refused since the replica was opened ([`Status::refused`]).
    refused: u64,
    /// The hub epoch this session's commits have recorded as the last one: each commit of
    /// received changes writes it only once (a page less per live change).
    epoch_recorded: Option<Epoch>,
    /// When [`Replica::roll`] next looks at the clock's bucket (ms, by `options.clock`).
    next_roll_ms: i64,
    /// Whether a small commit of received changes waits ([`Replica::defer_received`]).
    defer_received: bool,
    /// Received changes applied and shown, not stored yet.
    uncommitted: Option<Uncommitted>,
    options: ReplicaOptions,
    rng: StdRng,
}

impl Drop for Replica {
    /// Received changes that wait are stored, not dropped with the replica.
    fn drop(&mut self) {
        if let Err(e) = self.commit_received() {
            tracing::warn!(error = %e, "received changes were not stored; the hub sends them again");
        }
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replica({:?})", self.identity.peer_id())
    }
}

impl Replica {
    /// Opens (or creates) the replica stored at `path`.
    pub fn open(path: &Path, identity: Identity, options: ReplicaOptions) -> Result<Self> {
        let store = ReplicaStore::open_keyed(path, options.store_key.as_ref())?;
        if let Some(bytes) = options.max_store_bytes {
            store.set_max_bytes(bytes)?;
        }
        Self::with_store(store, identity, options)
    }

    /// A replica whose store lives in memory (lost on drop).
    pub fn open_in_memory(identity: Identity, options: ReplicaOptions) -> Result<Self> {
        Self::with_store(ReplicaStore::open_in_memory()?, identity, options)
    }

    fn with_store(
        store: ReplicaStore,
        identity: Identity,
        options: ReplicaOptions,
    ) -> Result<Self> {
        let mut rng = match options.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let instance = options.instance.unwrap_or_else(|| rng.r#gen());
        let actor = change::actor_for(&identity.peer_id(), instance);
        let mut subscriptions = Subscriptions::default();
        for s in store.subscriptions()? {
            subscriptions.push(s.target);
        }
        Ok(Replica {
            identity,
            actor,
            store,
            docs: HashMap::new(),
            uses: 0,
            subscriptions,
            session: None,
            incoming: Vec::new(),
            incoming_bytes: 0,
            defer_received: false,
            uncommitted: None,
            events: VecDeque::new(),
            dropped_events: 0,
            compactions: 0,
            snapshots: 0,
            retired: 0,
            refused: 0,
            epoch_recorded: None,
            next_roll_ms: i64::MIN,
            options,
            rng,
        })
    }

    /// This replica's public key.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The store, for checks and tools.
    pub fn store(&self) -> &ReplicaStore {
        &self.store
    }

    /// Defers the sync of local writes (off by default): [`change`](Self::change) and
    /// [`change_many`](Self::change_many) then commit without syncing, and are durable once
    /// [`sync`](Self::sync) returns. Whoever turns it on must sync before telling anyone a
    /// write is done. The replica thread (`ReplicaHandle`) does, so that a change is uploaded
    /// while its fsync runs instead of after it; a change uploaded and then lost to a power
    /// cut before its sync is harmless: the app was not answered, and a reopened store writes
    /// under a fresh actor, so the change's sequence number is never signed again (the hub
    /// sends the change back like any other). A replica opened with a fixed
    /// [`instance`](ReplicaOptions::instance) (simulations) keeps its syncs, since it would
    /// sign that sequence number again. Turning it off syncs what waits.
    pub fn set_deferred_sync(&mut self, on: bool) -> Result<()> {
        self.store
            .set_deferred_sync(on && self.options.instance.is_none())
    }

    /// Makes the local writes committed since the last sync durable (nothing to do unless
    /// syncs are deferred: [`set_deferred_sync`](Self::set_deferred_sync)).
    pub fn sync(&mut self) -> Result<()> {
        self.store.sync()
    }

    /// Whether local writes wait for [`sync`](Self::sync).
    pub fn unsynced(&self) -> bool {
        self.store.unsynced()
    }

    /// Defers the commit of a small group of received changes (live changes: up to
    /// [`MAX_UNCOMMITTED`], flushed by [`poll_transmit`](Self::poll_transmit); off by
    /// default): they are applied and their events out at once, and stored, with the cursors
    /// they advance, by [`commit_received`](Self::commit_received). Whoever turns it on calls it when idle and
    /// before any other use of the replica but [`handle_message`](Self::handle_message),
    /// [`poll_transmit`](Self::poll_transmit) and [`poll_event`](Self::poll_event), which
    /// commit first when they need to. The replica thread (`ReplicaHandle`) does, a few
    /// milliseconds after its last message: where a change's readers share the cores, each
    /// reader's store work then runs after the others have shown the change, not before.
    /// Until the commit, a crash loses those changes with their cursors, and the hub sends
    /// them again; acknowledged writes are not concerned (local writes and acknowledgements
    /// commit as before). Turning it off commits what waits.
    pub fn defer_received(&mut self, on: bool) -> Result<()> {
        self.defer_received = on;
        if on { Ok(()) } else { self.commit_received() }
    }

    /// Whether received changes wait for [`commit_received`](Self::commit_received).
    pub fn received_uncommitted(&self) -> bool {
        self.uncommitted.is_some()
    }

    /// Stores the received changes that wait ([`defer_received`](Self::defer_received)). If
    /// that fails, their documents are dropped from memory (reloaded from the store when
    /// next used) and the session fails: the hub sends them again, since their cursors did
    /// not move either.
    pub fn commit_received(&mut self) -> Result<()> {
        let Some(u) = self.uncommitted.take() else {
            return Ok(());
        };
        let changes: Vec<&VerifiedChange> = u.changes.iter().collect();
        let result = write_received(&mut self.store, &changes, &u.cursors, u.epoch)
            .and_then(|(batch, _)| batch.commit());
        if let Err(e) = &result {
            for c in &u.changes {
                self.docs.remove(c.doc());
            }
            if u.epoch.is_some() {
                self.epoch_recorded = None;
            }
            self.fail_session(e);
        }
        result
    }

    /// The documents held.
    pub fn doc_ids(&self) -> Result<Vec<DocId>> {
        self.store.doc_ids()
    }

    fn load(&mut self, id: &DocId, create: bool) -> Result<&mut DocState> {
        if !self.docs.contains_key(id) {
            // Read from the store, a document must find there what it showed before.
            self.commit_received()?;
            let state = match self.store.load_doc(id)? {
                Some(stored) => {
                    let mut changes = Vec::with_capacity(stored.changes.len());
                    let mut hashes = Vec::with_capacity(stored.changes.len());
                    for bytes in stored.changes {
                        let c = automerge::Change::try_from(&bytes[..]).map_err(|e| {
                            Error::Corrupt {
                                what: format!("stored change of {id}"),
                                reason: e.to_string(),
                            }
                        })?;
                        hashes.push(ChangeHash::from(c.hash()));
                        changes.push(c);
                    }
                    let doc = Document::load(
                        id.clone(),
                        self.actor.clone(),
                        stored.snapshot.as_deref(),
                        changes,
                    )?;
                    let pending = hashes.into_iter().filter(|h| !doc.has_change(h)).collect();
                    DocState {
                        doc,
                        pending,
                        incremental_bytes: stored.incremental_bytes,
                        used: 0,
                    }
                }
                None if create => DocState {
                    doc: Document::new(id.clone(), self.actor.clone()),
                    pending: HashSet::new(),
                    incremental_bytes: 0,
                    used: 0,
                },
                None => return Err(Error::UnknownDocument(id.clone())),
            };
            self.docs.insert(id.clone(), state);
        }
        self.uses += 1;
        let uses = self.uses;
        let state = self
            .docs
            .get_mut(id)
            .ok_or_else(|| Error::UnknownDocument(id.clone()))?;
        state.used = uses;
        Ok(state)
    }

    /// Drops the least recently used documents from memory while more than
    /// [`ReplicaOptions::max_cached_docs`] are held, down to seven eighths of it (one sort per
    /// eighth of the bound). The store holds everything a document's state is rebuilt from
    /// (its snapshot, its changes, the ones still waiting), so dropping one loses nothing:
    /// the next use loads it again. Called where no document is borrowed and every event of
    /// the operation has been made (after a commit of received changes, after local writes).
    fn trim_cache(&mut self) {
        let max = self.options.max_cached_docs.max(1);
        if self.docs.len() <= max {
            return;
        }
        let keep = max - max / 8;
        let mut by_use: Vec<(u64, DocId)> = self
            .docs
            .iter()
            .map(|(id, state)| (state.used, id.clone()))
            .collect();
        by_use.sort_unstable();
        let drop = by_use.len() - keep;
        for (_, id) in by_use.into_iter().take(drop) {
            self.docs.remove(&id);
        }
    }

    /// How many documents are held in memory (at most about
    /// [`ReplicaOptions::max_cached_docs`] between operations).
    pub fn cached_docs(&self) -> usize {
        self.docs.len()
    }

    /// A document held by this replica.
    pub fn doc(&mut self, id: &DocId) -> Result<&Document> {
        let id = match self.rolling_for(id).cloned() {
            None => id.clone(),
            Some(policy) => {
                let clock = policy.bucket_at((self.options.clock)());
                let newest = self.held_buckets(&policy, id, clock)?.pop();
                newest
                    .and_then(|b| policy.bucket_id(id, b))
                    .ok_or_else(|| Error::UnknownDocument(id.clone()))?
            }
        };
        // A read may bring one more document into memory: the bound is kept after it (the
        // one just read is the most recently used, and stays), or an app that only reads
        // would fill the cache past it.
        self.load(&id, false)?;
        self.trim_cache();
        Ok(&self.load(&id, false)?.doc)
    }

    /// A document as plain JSON.
    pub fn json(&mut self, id: &DocId) -> Result<serde_json::Value> {
        Ok(self.doc(id)?.to_json())
    }

    /// Applies `ops` to `doc` (created if new) as one change, signs it, commits it durably with
    /// its outbox entry (with deferred syncs: durable at the next [`sync`](Self::sync)), and
    /// returns the document's new heads. Nothing is applied if an op fails.
    pub fn change(&mut self, doc: &DocId, ops: &[Op]) -> Result<Vec<ChangeHash>> {
        self.change_many(&[(doc.clone(), ops.to_vec())])?;
        Ok(self.doc(doc).map(|d| d.heads()).unwrap_or_default())
    }

    /// Applies several changes and commits them in one transaction (group commit): all are
    /// durable when this returns (with deferred syncs: at the next [`sync`](Self::sync)), or
    /// none is.
    pub fn change_many(&mut self, changes: &[(DocId, Vec<Op>)]) -> Result<()> {
        let routed;
        let changes = if self.options.rolling.is_empty() {
            changes
        } else {
            self.roll()?;
            routed = self.route_writes(changes)?;
            &routed[..]
        };
        let result = self.change_many_inner(changes);
        if result.is_err() {
            // In-memory documents may be ahead of the store: reload them from disk when next used.
            for (doc, _) in changes {
                self.docs.remove(doc);
            }
        }
        result
    }

    fn change_many_inner(&mut self, changes: &[(DocId, Vec<Op>)]) -> Result<()> {
        let mut made: Vec<(VerifiedChange, Vec<ChangeHash>, Vec<PatchSummary>)> =
            Vec::with_capacity(changes.len());
        let now = (self.options.clock)();
        let patch_events = self.options.patch_events;
        for (doc, ops) in changes {
            let identity = self.identity.clone();
            let state = self.load(doc, true)?;
            let before = state.doc.heads();
            let mut patches = Vec::new();
            let logged = patch_events.then_some(&mut patches);
            if let Some(c) = state.doc.apply_ops_logged(ops, now, logged)? {
                // A change the hub would refuse would block the outbox behind it forever.
                if c.raw_bytes().len() > wire::MAX_CHANGE_BYTES {
                    return Err(Error::InvalidOperation {
                        doc: doc.clone(),
                        reason: format!(
                            "the change is {} bytes, over the limit of {} bytes; split it into \
                             several smaller changes",
                            c.raw_bytes().len(),
                            wire::MAX_CHANGE_BYTES
                        ),
                    });
                }
                made.push((change::sign(&identity, doc, c)?, before, patches));
            }
        }
        let new_subs: Vec<Target> = {
            let mut subs: Vec<Target> = Vec::new();
            for (c, _, _) in &made {
                if !self.subscriptions.covers(c.doc()) && !subs.iter().any(|t| t.covers(c.doc())) {
                    subs.push(Target::Doc(c.doc().clone()));
                }
            }
            subs
        };
        // A local change may build on received ones: they are stored first.
        self.commit_received()?;
        let mut batch = self.store.local_batch()?;
        for (c, _, _) in &made {
            batch.insert_change(c)?;
            batch.enqueue_upload(c.doc(), &c.hash(), None)?;
        }
        for t in &new_subs {
            batch.add_subscription(t)?;
        }
        batch.commit()?;
        for t in new_subs {
            if let Some(s) = self.session.as_mut().filter(|s| s.hub.is_some()) {
                s.requested.insert(t.clone(), Epoch::none());
                s.out.push_back(Message::Subscribe(Subscribe {
                    target: t.clone(),
                    epoch: Epoch::none(),
                    cursor: Cursor(0),
                }));
            }
            self.subscriptions.push(t);
        }
        // One event per document of the group: the patches its change made, or, where the
        // group changed it more than once, a diff from its heads before the group's first
        // change to its heads now (an event per change would repeat the later changes'
        // patches).
        // (document, heads before, bytes, the patches if it changed once)
        type Group = (DocId, Vec<ChangeHash>, u64, Option<Vec<PatchSummary>>);
        let mut per_doc: Vec<Group> = Vec::new();
        for (c, before, patches) in made {
            let bytes = c.signed().bytes.len() as u64;
            match per_doc.iter_mut().find(|(d, _, _, _)| d == c.doc()) {
                Some((_, _, b, p)) => {
                    *b += bytes;
                    *p = None;
                }
                None => per_doc.push((c.doc().clone(), before, bytes, Some(patches))),
            }
        }
        for (doc, before, bytes, patches) in per_doc {
            // Committed: from here on nothing may turn the write into an error.
            if let Some(state) = self.docs.get_mut(&doc) {
                state.incremental_bytes += bytes;
            }
            self.after_commit(&doc, &before, Origin::Local, patches);
        }
        self.trim_cache();
        Ok(())
    }

    /// After a commit that changed `doc` from `before`: tells the app, then compacts if due.
    /// The event's patches are `patched` when the apply logged them, or a diff from `before`.
    /// Nothing here may fail the committed write.
    fn after_commit(
        &mut self,
        doc: &DocId,
        before: &[ChangeHash],
        origin: Origin,
        patched: Option<Vec<PatchSummary>>,
    ) {
        let patch_events = self.options.patch_events;
        let Some(state) = self.docs.get(doc) else {
            return;
        };
        let heads = state.doc.heads();
        let patches = match patched {
            _ if !patch_events => Vec::new(),
            Some(p) => p,
            None => state.doc.diff(before, &heads),
        };
        self.push_event(Event::DocChanged {
            doc: doc.clone(),
            origin,
            heads,
            patches,
        });
        self.compact_after_commit(doc);
    }

    /// The rolling policy `id` is a logical document of, if any.
    fn rolling_for(&self, id: &DocId) -> Option<&Rolling> {
        self.options.rolling.iter().find(|p| p.applies(id))
    }

    /// The buckets of `logical` held (stored, or created in memory), oldest first, up to one
    /// period ahead of `clock`'s bucket.
    fn held_buckets(&self, policy: &Rolling, logical: &DocId, clock: i64) -> Result<Vec<i64>> {
        Ok(self
            .bucket_docs(policy, logical)?
            .into_keys()
            .take_while(|b| *b <= clock.saturating_add(1))
            .collect())
    }

    /// Every bucket of `logical` held (stored, or created in memory), by bucket.
    fn bucket_docs(&self, policy: &Rolling, logical: &DocId) -> Result<BTreeMap<i64, DocId>> {
        Ok(self
            .store
            .doc_ids_with_prefix(&policy.bucket_prefix(logical))?
            .iter()
            .chain(self.docs.keys())
            .filter_map(|d| match policy.split(d) {
                Some((l, b)) if l == *logical => Some((b, d.clone())),
                _ => None,
            })
            .collect())
    }

    /// Maps writes to rolling logical documents onto their buckets: the newest bucket held,
    /// or the clock's if newer. The first write into a new bucket starts with the top-level
    /// values of the newest older bucket held.
    fn route_writes(&mut self, changes: &[(DocId, Vec<Op>)]) -> Result<Vec<(DocId, Vec<Op>)>> {
        let clock_ms = (self.options.clock)();
        let mut routed = Vec::with_capacity(changes.len());
        let mut chosen: HashMap<DocId, DocId> = HashMap::new();
        for (doc, ops) in changes {
            let Some(policy) = self.rolling_for(doc).cloned() else {
                routed.push((doc.clone(), ops.clone()));
                continue;
            };
            if let Some(bucket) = chosen.get(doc) {
                routed.push((bucket.clone(), ops.clone()));
                continue;
            }
            let clock = policy.bucket_at(clock_ms);
            let newest = self.held_buckets(&policy, doc, clock)?.pop();
            let bucket = newest.map_or(clock, |n| n.max(clock));
            let too_long = || Error::InvalidOperation {
                doc: doc.clone(),
                reason: format!(
                    "the id is too long to roll: its bucket ids add \"{}\" and must stay within \
                     {} bytes; shorten it",
                    policy.bucket_prefix(doc).split_at(doc.as_str().len()).1,
                    crate::ids::MAX_DOC_ID_LEN
                ),
            };
            let id = policy.bucket_id(doc, bucket).ok_or_else(too_long)?;
            let mut all = Vec::new();
            if let Some(from) = newest.filter(|n| *n < bucket) {
                let from = policy.bucket_id(doc, from).ok_or_else(too_long)?;
                all.extend(self.load(&from, false)?.doc.root_values().into_iter().map(
                    |(key, value)| Op::Put {
                        path: vec![crate::ops::PathElem::Key(key)],
                        value,
                    },
                ));
            }
            all.extend(ops.iter().cloned());
            chosen.insert(doc.clone(), id.clone());
            routed.push((id, all));
        }
        Ok(routed)
    }

    /// Moves rolling documents on with the clock, for every rolling document held or
    /// followed: follows the buckets a view can come from (the clock's last `keep` periods)
    /// and the next one; keeps the buckets of the last `keep` periods and the newest bucket
    /// held, however old, and forgets older ones once nothing written there awaits the hub. Runs at most every 60 s (a
    /// quarter period if shorter) of the replica's clock; writes call it, and drivers call it
    /// from a timer (the edge-node every few seconds). Returns how many buckets it forgot.
    pub fn roll(&mut self) -> Result<usize> {
        let now = (self.options.clock)();
        if self.options.rolling.is_empty() || now < self.next_roll_ms {
            return Ok(0);
        }
        let step = self
            .options
            .rolling
            .iter()
            .map(|p| (p.period_secs() as i64 * 250).min(60_000))
            .min()
            .unwrap_or(60_000);
        self.next_roll_ms = now.saturating_add(step);
        let mut forgotten = 0;
        for policy in self.options.rolling.clone() {
            let clock = policy.bucket_at(now);
            let mut logicals: std::collections::BTreeSet<DocId> = self
                .store
                .doc_ids_with_prefix(policy.prefix().as_str())?
                .iter()
                .chain(self.subscriptions.docs.iter())
                .filter_map(|d| policy.split(d).map(|(l, _)| l))
                .collect();
            logicals.retain(|l| policy.applies(l));
            for logical in logicals {
                let keep = i64::from(policy.keep());
                // The clock's bucket (or a newer one held) and the keep - 1 before it stay,
                // and the newest bucket held however old: a replica never drops the last
                // state it has of a document.
                let buckets = self.bucket_docs(&policy, &logical)?;
                let newest = buckets
                    .range(..=clock.saturating_add(1))
                    .next_back()
                    .map(|(b, _)| *b);
                let kept_from = newest
                    .map_or(clock, |n| n.max(clock))
                    .saturating_sub(keep - 1);
                // Follow the window a view can come from, and the next bucket (a writer whose
                // clock is a little ahead may start it).
                let window = clock.saturating_sub(keep - 1);
                for b in window.max(kept_from)..=clock.saturating_add(1) {
                    if let Some(id) = policy.bucket_id(&logical, b) {
                        self.subscribe(Target::Doc(id))?;
                    }
                }
                let held: HashSet<DocId> = buckets.into_values().collect();
                let mut old: Vec<DocId> = held
                    .iter()
                    .chain(self.subscriptions.docs.iter())
                    .filter(|d| {
                        policy.split(d).is_some_and(|(l, b)| {
                            l == logical
                                && Some(b) != newest
                                && (b < kept_from || (b < window && !held.contains(*d)))
                        })
                    })
                    .cloned()
                    .collect();
                old.sort();
                old.dedup();
                for id in old {
                    if self.store.unacknowledged(&id)? > 0 {
                        continue; // kept until the hub has every change written there
                    }
                    self.commit_received()?;
                    self.store.forget_doc(&id)?;
                    self.docs.remove(&id);
                    self.subscriptions.remove_doc(&id);
                    if held.contains(&id) {
                        self.retired += 1;
                        forgotten += 1;
                        tracing::debug!(doc = %id, "forgot an old bucket of a rolling document");
                    }
                }
            }
        }
        Ok(forgotten)
    }

    /// Buckets of rolling documents this replica forgot since it was opened.
    pub fn retired(&self) -> u64 {
        self.retired
    }

    /// Follows a document or prefix from the hub (persisted; sent now if connected). A
    /// rolling logical document is followed through its buckets ([`Replica::roll`]).
    pub fn subscribe(&mut self, target: Target) -> Result<()> {
        if let Target::Doc(d) = &target
            && let Some(policy) = self.rolling_for(d).cloned()
        {
            let clock = policy.bucket_at((self.options.clock)());
            if let Some(id) = policy.bucket_id(d, clock) {
                self.subscribe(Target::Doc(id))?;
            }
            self.next_roll_ms = i64::MIN;
            return self.roll().map(|_| ());
        }
        if self.subscriptions.contains(&target) {
            return Ok(());
        }
        self.commit_received()?;
        let mut batch = self.store.batch()?;
        batch.add_subscription(&target)?;
        batch.commit()?;
        if let Some(s) = self.session.as_mut().filter(|s| s.hub.is_some()) {
            s.requested.insert(target.clone(), Epoch::none());
            s.out.push_back(Message::Subscribe(Subscribe {
                target: target.clone(),
                epoch: Epoch::none(),
                cursor: Cursor(0),
            }));
        }
        self.subscriptions.push(target);
        Ok(())
    }

    /// Checks the store file (`PRAGMA integrity_check`) and every stored change against its
    /// author's signature, compacted ones too (their bytes come from the document's
    /// snapshot); returns how many changes it verified. For audits and the fault-injection
    /// checker: every change on disk must be one its author signed.
    pub fn verify_stored(&mut self) -> Result<usize> {
        self.store.integrity_check()?;
        let stored = self.store.all_changes()?;
        let mut count = stored.len();
        let mut signed: HashMap<DocId, HashSet<ChangeHash>> = HashMap::new();
        let mut relayed_bad: HashMap<DocId, Vec<ChangeHash>> = HashMap::new();
        for row in stored {
            let (doc, hash, checked) = (row.doc.clone(), row.hash, row.checked);
            match change::verify(&doc, self.stored_signed(row)?) {
                Ok(_) => {
                    signed.entry(doc).or_default().insert(hash);
                }
                // Accepted on a later change of its actor: the signature beside it is what
                // the hub relayed. Proven below, by the same rule, over the stored rows.
                Err(crate::error::ChangeError::BadSignature { .. }) if !checked => {
                    relayed_bad.entry(doc).or_default().push(hash);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Each row whose relayed signature fails must be covered, through the stored rows'
        // own hash links (pending ones too), by a verified change of its actor. (Only a hub
        // that altered signatures makes such rows: their documents' rows are read again.)
        if !relayed_bad.is_empty() {
            let mut rows_of: HashMap<DocId, Vec<SignedChange>> = HashMap::new();
            for row in self.store.all_changes()? {
                if relayed_bad.contains_key(&row.doc) {
                    let doc = row.doc.clone();
                    let signed_change = self.stored_signed(row)?;
                    rows_of.entry(doc).or_default().push(signed_change);
                }
            }
            for (doc, bad) in relayed_bad {
                let rows = rows_of.remove(&doc).unwrap_or_default();
                change::verify_docs_covered(vec![(doc.clone(), rows)], 1).map_err(|e| match e {
                    crate::error::ChangeError::BadSignature { doc, hash } => {
                        crate::error::ChangeError::NotCovered { doc, hash }
                    }
                    other => other,
                })?;
                signed.entry(doc).or_default().extend(bad);
            }
        }
        // Changes that came inside a snapshot from the hub have no signature of their own,
        // nor do those with a relayed signature that does not verify: each must be in the
        // history of a verified change of its actor.
        for id in self.store.doc_ids()? {
            self.trim_cache();
            let none = HashSet::new();
            let rows = signed.get(&id).unwrap_or(&none);
            let am = self.load(&id, false)?.doc.automerge();
            let metas = am.get_changes_meta(&[]);
            let unsigned = metas
                .iter()
                .filter(|m| !rows.contains(&ChangeHash::from(m.hash)))
                .count();
            if unsigned == 0 {
                continue; // every change has its own verified signature
            }
            match crate::snapshot::uncovered(am, rows) {
                Ok(Some(hash)) => {
                    return Err(crate::error::ChangeError::NotCovered { doc: id, hash }.into());
                }
                Ok(None) => count += unsigned,
                Err(e) => {
                    tracing::warn!(doc = %id, "{unsigned} changes from a snapshot not checked: {e}");
                }
            }
        }
        self.trim_cache();
        Ok(count)
    }

    /// A stored change as its author signed it: the bytes of a compacted one come from its
    /// document's snapshot (same hash, same signature).
    fn stored_signed(&mut self, row: crate::store::StoredChange) -> Result<SignedChange> {
        let bytes = match row.bytes {
            Some(b) => b,
            None => self
                .doc(&row.doc)?
                .automerge()
                .get_change_by_hash(&row.hash.into())
                .ok_or_else(|| Error::Corrupt {
                    what: format!("document {}", row.doc),
                    reason: format!("compacted change {} is missing from its snapshot", row.hash),
                })?
                .raw_bytes()
                .to_vec(),
        };
        Ok(SignedChange {
            bytes,
            signature: row.signature,
        })
    }

    /// How many times this replica compacted a document since it was opened.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// The sync state.
    pub fn status(&self) -> Result<Status> {
        let (outbox, rejected) = self.store.outbox_len()?;
        let session = self.session.as_ref();
        Ok(Status {
            hub: session.and_then(|s| s.hub).map(|h| h.to_string()),
            outbox,
            rejected,
            refused: self.refused,
            synced: session
                .map(|s| s.synced.iter().map(Target::key).collect())
                .unwrap_or_default(),
            subscriptions: self.subscriptions.iter().map(Target::key).collect(),
        })
    }

    /// Whether a session is authenticated and every subscription has caught up.
    pub fn is_synced(&self) -> bool {
        self.session.as_ref().is_some_and(|s| {
            s.hub.is_some() && self.subscriptions.iter().all(|t| s.synced.contains(t))
        })
    }

    /// Whether changes received from the hub wait to be applied and stored (at the next
    /// [`flush`](Self::flush), which [`poll_transmit`](Self::poll_transmit) does first).
    pub fn has_unapplied(&self) -> bool {
        !self.incoming.is_empty()
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(e);
    }

    /// The next event for the app.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.dropped_events > 0 {
            let dropped = std::mem::take(&mut self.dropped_events);
            return Some(Event::Lagged { dropped });
        }
        self.events.pop_front()
    }

    // ---- sync session ----

    /// Starts a session over a freshly opened transport. `expected_hub` pins the hub's key.
    pub fn connect(&mut self, expected_hub: Option<PeerId>) {
        self.connect_bound(expected_hub, [0; 32]);
    }

    /// Like [`Replica::connect`], over a transport that gives a channel binding (a TLS
    /// exporter value); the hub must see the same value.
    pub fn connect_bound(&mut self, expected_hub: Option<PeerId>, binding: [u8; 32]) {
        self.epoch_recorded = None;
        let nonce: [u8; 32] = self.rng.r#gen();
        // Version 2 adds snapshots, which only a build that unwinds on panic loads.
        let max_version = if crate::snapshot::supported() {
            crate::wire::PROTOCOL_VERSION
        } else {
            1
        };
        let (handshake, hello) = Handshake::start(
            max_version,
            self.identity.clone(),
            Role::Replica,
            Role::Hub,
            expected_hub,
            nonce,
            Epoch::none(),
            binding,
        );
        self.incoming.clear();
        self.incoming_bytes = 0;
        self.session = Some(Session {
            handshake,
            hub: None,
            hub_epoch: Epoch::none(),
            out: VecDeque::from([hello]),
            inflight: BTreeMap::new(),
            next_push: 1,
            sent_upto: 0,
            requested: HashMap::new(),
            heads_seen: HashSet::new(),
            checking: HashSet::new(),
            unsettled: false,
            held_rows: Vec::new(),
            held_at: None,
            written_checked: true,
            repaired_rollback: false,
            reconciling: HashSet::new(),
            deferred: Vec::new(),
            synced: HashSet::new(),
            failed: false,
            failure: None,
        });
    }

    /// Ends the session (the transport closed). Unacknowledged uploads stay in the outbox.
    pub fn disconnect(&mut self) {
        self.session = None;
        self.incoming.clear();
        self.incoming_bytes = 0;
    }

    /// Whether the session failed (its last message, an error for the hub, may still be
    /// queued): close the transport once it is sent.
    pub fn session_failed(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.failed)
    }

    /// Why the session failed, if it did: its first cause (a full store, a bad signature,
    /// the hub's own error message). The transport's error at the end says less: the
    /// replica's side closes it.
    pub fn session_failure(&self) -> Option<String> {
        self.session.as_ref().and_then(|s| s.failure.clone())
    }

    /// Whether a session is open (authenticated or not).
    pub fn is_connected(&self) -> bool {
        self.session.is_some()
    }

    /// Handles one message from the hub. An error is fatal to the session: send what
    /// `poll_transmit` still returns (an error message for the hub), then close the transport
    /// and call [`Replica::disconnect`].
    pub fn handle_message(&mut self, msg: Message) -> Result<()> {
        let result = self.handle_message_inner(msg);
        if let Err(e) = &result {
            self.fail_session(e);
        }
        result
    }

    fn fail_session(&mut self, e: &Error) {
        if let Some(s) = self.session.as_mut() {
            s.failure.get_or_insert_with(|| e.to_string());
            // Never answer a failed session, nor the hub's own Error, with an Error.
            if s.failed || matches!(e, Error::Protocol(ProtocolError::Closed { .. })) {
                s.failed = true;
                s.out.clear();
                return;
            }
            s.failed = true;
            s.out.clear();
            let code = match e {
                Error::Change(_) => ErrorCode::BadSignature,
                Error::Wire(_) => ErrorCode::ProtocolViolation,
                Error::Protocol(ProtocolError::VersionMismatch { .. }) => {
                    ErrorCode::VersionMismatch
                }
                _ => ErrorCode::ProtocolViolation,
            };
            let mut message = e.to_string();
            wire::truncate_text(&mut message, wire::MAX_ERROR_TEXT);
            s.out
                .push_back(Message::Error(wire::ErrorMessage { code, message }));
        }
        self.incoming.clear();
        self.incoming_bytes = 0;
    }

    fn handle_message_inner(&mut self, msg: Message) -> Result<()> {
        msg.check_limits()?;
        if !matches!(msg, Message::Changes(_) | Message::ChangesAt(_)) {
            self.commit_received()?;
        }
        let Some(s) = self.session.as_mut() else {
            return Err(ProtocolError::Unexpected {
                message: msg.kind(),
                state: "without a session",
            }
            .into());
        };
        if s.failed {
            return Err(ProtocolError::Unexpected {
                message: msg.kind(),
                state: "after the session failed",
            }
            .into());
        }
        if s.hub.is_none() {
            match msg {
                Message::Hello(h) => {
                    let auth = s.handshake.on_hello(h)?;
                    s.out.push_back(auth);
                }
                Message::Auth(a) => {
                    let hub = s.handshake.on_auth(a)?;
                    s.hub = Some(hub);
                    s.hub_epoch = s.handshake.their_epoch().unwrap_or_else(Epoch::none);
                    let subs = self.store.subscriptions()?;
                    // A subscription that never caught up must still be repaired if the hub
                    // we last exchanged changes with had another log (it may have lost them).
                    let last = self.store.last_epoch()?;
                    let written = self.store.written()?;
                    let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
                        message: "Auth",
                        state: "closed",
                    })?;
                    let marks = s.handshake.speaks(3);
                    s.written_checked = written.is_none();
                    for sub in subs {
                        let target = sub.target;
                        // A subscription that never caught up reads from the start, in the log
                        // we last exchanged changes with.
                        let (epoch, cursor, mark) = if sub.epoch == Epoch::none() {
                            (last, Cursor(0), None)
                        } else {
                            (sub.epoch, sub.cursor, sub.mark)
                        };
                        s.requested.insert(target.clone(), epoch);
                        // The hub checks the changes at our cursor and at our newest
                        // acknowledged write are still the ones we got there.
                        let written = written
                            .filter(|(e, _)| *e == epoch && epoch != Epoch::none())
                            .map(|(_, position)| position);
                        let resume = marks && (mark.is_some() || written.is_some());
                        if resume {
                            s.checking.insert(target.clone());
                            s.written_checked |= written.is_some();
                        }
                        s.out.push_back(if resume {
                            Message::Resume(Box::new(Resume {
                                target,
                                epoch,
                                cursor,
                                mark,
                                written,
                            }))
                        } else {
                            Message::Subscribe(Subscribe {
                                target,
                                epoch,
                                cursor,
                            })
                        });
                    }
                    s.unsettled = !s.reconciled();
                    self.push_event(Event::Connected { hub });
                }
                Message::Error(e) => {
                    return Err(ProtocolError::from(e).into());
                }
                other => {
                    return Err(ProtocolError::Unexpected {
                        message: other.kind(),
                        state: "during the handshake",
                    }
                    .into());
                }
            }
            return Ok(());
        }
        // A ChangesAt (version 4) is its Changes and the hub's mark of the log at its cursor.
        let (msg, mark) = match msg {
            Message::ChangesAt(c) => {
                s.handshake.require(4, "ChangesAt")?;
                let c = *c;
                (Message::Changes(c.changes), Some(c.mark))
            }
            other => (other, None),
        };
        match msg {
            Message::Changes(c) => {
                if let Some((t, _)) = &c.cursor
                    && !s.requested.contains_key(t)
                {
                    return Err(ProtocolError::Unexpected {
                        message: "Changes",
                        state: "for a target not subscribed",
                    }
                    .into());
                }
                self.incoming_bytes += c.changes.iter().map(|c| c.bytes.len()).sum::<usize>();
                self.incoming.push((c, mark));
                if self.incoming.len() >= MAX_INCOMING || self.incoming_bytes >= MAX_INCOMING_BYTES
                {
                    self.flush()?;
                }
            }
            Message::CaughtUp(c) => {
                self.flush()?;
                self.on_caught_up(CaughtUpAt {
                    target: c.target,
                    epoch: c.epoch,
                    cursor: c.cursor,
                    mark: None,
                    rolled_back: false,
                })?;
            }
            Message::CaughtUpAt(c) => {
                s.handshake.require(3, "CaughtUpAt")?;
                self.flush()?;
                self.on_caught_up(*c)?;
            }
            Message::Snapshot(m) => {
                if !s.handshake.speaks(2) {
                    return Err(ProtocolError::Unexpected {
                        message: "Snapshot",
                        state: "in a version 1 session",
                    }
                    .into());
                }
                // What came before it is committed first: the snapshot lands on top.
                self.flush()?;
                self.on_snapshot(m)?;
            }
            Message::Ack(_) | Message::AckAt(_) => {
                let (push_id, at) = match msg {
                    Message::AckAt(a) => {
                        s.handshake.require(3, "AckAt")?;
                        (a.push_id, a.at)
                    }
                    Message::Ack(a) => (a.push_id, None),
                    _ => return Ok(()),
                };
                // A duplicate acknowledgement is harmless: the rows are gone already.
                if let Some(f) = s.inflight.remove(&push_id) {
                    if s.reconciled() {
                        self.store
                            .ack_outbox(&f.rows, s.hub_epoch, at, !s.written_checked)?;
                        s.written_checked |= at.is_some();
                    } else {
                        // Kept in the outbox (sent again if the session breaks first) until
                        // the session is reconciled: see `Session::reconciled`.
                        s.held_rows.extend_from_slice(&f.rows);
                        // The highest: a change sent again is acknowledged where it was.
                        s.held_at = s.held_at.into_iter().chain(at).max_by_key(|p| p.cursor);
                        s.unsettled = true;
                    }
                    self.push_event(Event::Acknowledged {
                        doc: f.doc,
                        changes: f.rows.len() as u64,
                    });
                }
            }
            Message::Reject(r) => self.on_reject(r)?,
            Message::Heads(h) => {
                self.flush()?;
                self.on_heads(h)?;
            }
            Message::Reconciled(r) => {
                // The answer's changes are committed before the repair can count as done.
                self.flush()?;
                let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
                    message: "Reconciled",
                    state: "closed",
                })?;
                s.reconciling.remove(&r.doc);
                let ready: Vec<CaughtUpAt> =
                    {
                        let reconciling = &s.reconciling;
                        let (ready, wait) = std::mem::take(&mut s.deferred).into_iter().partition(
                            |c: &CaughtUpAt| !reconciling.iter().any(|d| c.target.covers(d)),
                        );
                        s.deferred = wait;
                        ready
                    };
                for c in ready {
                    self.record_caught_up(c)?;
                }
            }
            Message::Error(e) => {
                return Err(ProtocolError::from(e).into());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    message: other.kind(),
                    state: "from a hub",
                }
                .into());
            }
        }
        Ok(())
    }

    /// A verified snapshot becomes the document's base ([`Document::rebase_on`]) and its
    /// stored snapshot, in one transaction with its signed heads; changes it covers lose
    /// their stored bytes (not their signatures).
    fn on_snapshot(&mut self, m: crate::wire::SnapshotMessage) -> Result<()> {
        let doc = m.doc;
        if !self.subscriptions.covers(&doc) {
            // A bucket forgotten during this session (the hub keeps it), or a document this
            // replica does not follow: nothing of it is taken.
            tracing::debug!(%doc, "a snapshot of a document no subscription covers; ignored");
            return Ok(());
        }
        let verified = crate::snapshot::verify(&doc, m.snapshot)?;
        let (loaded, snapshot) = verified.into_parts();
        let state = self.load(&doc, true)?;
        if loaded
            .get_heads()
            .iter()
            .all(|h| state.doc.has_change(&(*h).into()))
        {
            return Ok(()); // nothing new in it
        }
        let incremental = self.store.incremental_hashes(&doc)?;
        let state = self.load(&doc, false)?;
        let before = state.doc.heads();
        let loaded_heads = loaded.get_heads();
        let refused = match state.doc.rebase_on(loaded) {
            Ok(r) => r,
            Err(e) => {
                // The document in memory is half rebased: read it again from the store.
                self.docs.remove(&doc);
                return Err(e);
            }
        };
        for r in &refused {
            tracing::warn!(%doc, "refused a change on top of a snapshot: {r}");
        }
        let doc_ref = &state.doc;
        state.pending.retain(|h| !doc_ref.has_change(h));
        state.incremental_bytes = 0;
        // What the store keeps as the document's base must hold everything the document now
        // holds: the hub's bytes if nothing went on top of them, else the rebased document
        // (changes of this replica the hub's snapshot lacks, its own writes among them, may
        // have had their bytes only in the previous local snapshot).
        let covered: Vec<ChangeHash> = incremental
            .into_iter()
            .filter(|h| doc_ref.has_change(h))
            .collect();
        let snapshot = if doc_ref.automerge().get_heads() == loaded_heads {
            snapshot
        } else {
            crate::snapshot::Snapshot {
                data: doc_ref.save(),
                signed: snapshot.signed,
            }
        };
        if let Err(e) = self.store.store_snapshot(&doc, &snapshot, &covered) {
            // Not stored: the document in memory must not hold what the store does not.
            self.docs.remove(&doc);
            return Err(e);
        }
        self.refused += refused.len() as u64;
        self.snapshots += 1;
        self.after_commit(&doc, &before, Origin::Remote, None);
        Ok(())
    }

    /// How many snapshots from the hub this replica took since it was opened.
    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }

    fn on_reject(&mut self, r: Reject) -> Result<()> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "Reject",
            state: "closed",
        })?;
        let Some(f) = s.inflight.remove(&r.push_id) else {
            return Ok(());
        };
        self.store.reject_outbox(&f.rows, &r.message)?;
        tracing::warn!(doc = %f.doc, code = ?r.code, message = %r.message, "hub refused local changes");
        self.push_event(Event::Rejected {
            doc: f.doc,
            code: r.code,
            message: r.message,
        });
        Ok(())
    }

    /// Repair path: the hub lists its heads for a document.
    fn on_heads(&mut self, h: Heads) -> Result<()> {
        let held = self.store.has_doc(&h.doc)?;
        let mut upload: Vec<automerge::Change> = Vec::new();
        let mine = if held {
            let state = self.load(&h.doc, false)?;
            let mine = state.doc.heads();
            let mut sorted = mine.clone();
            sorted.sort();
            let mut theirs = h.heads.clone();
            theirs.sort();
            if sorted == theirs && h.complete {
                None
            } else {
                upload = state.doc.changes_since(&h.heads);
                Some(mine)
            }
        } else {
            Some(Vec::new())
        };
        self.enqueue_uploads(&h.doc, upload)?;
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "Heads",
            state: "closed",
        })?;
        s.heads_seen.insert(h.doc.clone());
        if let Some(mut heads) = mine {
            if heads.len() > wire::MAX_HEADS {
                // Too many to list: ask for everything (duplicates are harmless).
                heads.clear();
            }
            s.reconciling.insert(h.doc.clone());
            s.out
                .push_back(Message::Reconcile(Reconcile { doc: h.doc, heads }));
        }
        Ok(())
    }

    /// Puts changes the hub lacks into the outbox (durably, so a lost session retries).
    fn enqueue_uploads(&mut self, doc: &DocId, changes: Vec<automerge::Change>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.commit_received()?;
        let mut batch = self.store.batch()?;
        for c in &changes {
            batch.enqueue_upload(doc, &ChangeHash::from(c.hash()), Some(c.raw_bytes()))?;
        }
        batch.commit()
    }

    fn on_caught_up(&mut self, c: CaughtUpAt) -> Result<()> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "CaughtUp",
            state: "closed",
        })?;
        let Some(requested) = s.requested.get(&c.target).copied() else {
            return Err(ProtocolError::Unexpected {
                message: "CaughtUp",
                state: "for a target not subscribed",
            }
            .into());
        };
        s.repaired_rollback |= c.rolled_back;
        if (requested != c.epoch && requested != Epoch::none()) || c.rolled_back {
            // The hub's log is not the one our cursor came from (restored or another hub), or
            // is that log rolled back under our cursor: upload every document under the
            // target the hub did not list.
            let seen = std::mem::take(&mut s.heads_seen);
            let docs: Vec<DocId> = self
                .store
                .doc_ids()?
                .into_iter()
                .filter(|d| c.target.covers(d) && !seen.contains(d))
                .collect();
            for d in docs {
                let all = self.load(&d, false)?.doc.changes_since(&[]);
                self.enqueue_uploads(&d, all)?;
                self.trim_cache();
            }
        }
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "CaughtUp",
            state: "closed",
        })?;
        if s.reconciling.iter().any(|d| c.target.covers(d)) {
            // Changes we lack from before the repair are still on their way: record the new
            // epoch only once they are committed, or a broken session would skip them.
            s.deferred.push(c);
            return Ok(());
        }
        self.record_caught_up(c)
    }

    fn record_caught_up(&mut self, c: CaughtUpAt) -> Result<()> {
        // A bucket forgotten during the session is not followed again.
        if self.subscriptions.contains(&c.target) {
            self.commit_received()?;
            // Unsynced, as the cursors of received changes: a power cut that takes it back
            // has the hub send from the older cursor again. Synced, it cost an fsync per
            // subscription at every session (a tenth of a 100-writer ingest).
            let mut batch = self.store.received_batch()?;
            batch.set_cursor(&c.target, c.epoch, c.cursor, c.mark)?;
            batch.commit()?;
        }
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "CaughtUp",
            state: "closed",
        })?;
        s.requested.insert(c.target.clone(), c.epoch);
        s.synced.insert(c.target.clone());
        s.checking.remove(&c.target);
        if s.unsettled && s.reconciled() {
            // Every repair and check is over: this is the log last exchanged with, and what
            // it acknowledged counts now.
            s.unsettled = false;
            let (rows, at, epoch) = (
                std::mem::take(&mut s.held_rows),
                s.held_at.take(),
                s.hub_epoch,
            );
            let repaired = std::mem::take(&mut s.repaired_rollback);
            let cleared = repaired && at.is_none();
            let replace = repaired || !s.written_checked;
            s.written_checked |= at.is_some();
            self.store.ack_outbox(&rows, epoch, at, replace)?;
            if cleared {
                // The repair uploaded what the rolled-back log lacked: the old position
                // would only make every later session repair again.
                self.store.clear_written()?;
            }
        }
        self.push_event(Event::Synced { target: c.target });
        Ok(())
    }

    /// Commits every received change: verified (in batches), applied to the documents (one
    /// Automerge call per document), stored with the cursors they advance in one transaction.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_as(false)
    }

    /// [`flush`](Self::flush); `live`: from [`poll_transmit`](Self::poll_transmit), where a
    /// small commit may wait ([`defer_received`](Self::defer_received)). Every other flush
    /// comes before a step that reads the store (a catch-up's cursor, a repair's heads, a
    /// snapshot) and commits at once.
    fn flush_as(&mut self, live: bool) -> Result<()> {
        if self.incoming.is_empty() {
            return Ok(());
        }
        let incoming = std::mem::take(&mut self.incoming);
        self.incoming_bytes = 0;
        let mut touched: Vec<DocId> = Vec::new();
        let result = self.ingest(incoming, &mut touched, live);
        if let Err(e) = &result {
            for d in &touched {
                self.docs.remove(d);
            }
            self.fail_session(e);
        }
        self.trim_cache();
        result
    }

    fn ingest(
        &mut self,
        incoming: Vec<(Changes, Option<Mark>)>,
        touched: &mut Vec<DocId>,
        live: bool,
    ) -> Result<()> {
        // What waits is stored first: the store never holds a change after one it lacks.
        self.commit_received()?;
        // Each cursor with the hub's mark of the log there, or (from a hub of version 3) the
        // signature of its message's last change: the change at that position of the log (the
        // hub sends a position's change last).
        let mut cursors: Vec<(Target, Cursor, Option<Mark>)> = Vec::new();
        // A subscription whose CaughtUp waits for its repair's answers moves no cursor before
        // it: a session cut in between must repair again.
        let deferred: &[CaughtUpAt] = self.session.as_ref().map_or(&[], |s| &s.deferred);
        // Messages of one document go together: one coverage walk over all its changes.
        let mut received: Vec<(DocId, Vec<SignedChange>)> = Vec::with_capacity(incoming.len());
        let mut at: HashMap<DocId, usize> = HashMap::new();
        for (m, mark) in incoming {
            if let Some((t, c)) = m
                .cursor
                .filter(|(t, _)| !deferred.iter().any(|d| &d.target == t))
            {
                let mark = mark.or_else(|| m.changes.last().map(|c| Mark(c.signature)));
                cursors.push((t, c, mark));
            }
            match at.get(&m.doc) {
                Some(&i) => received[i].1.extend(m.changes),
                None => {
                    at.insert(m.doc.clone(), received.len());
                    received.push((m.doc, m.changes));
                }
            }
        }
        // A bucket forgotten during this session is left out: the hub keeps it.
        let forgotten = |r: &Replica, doc: &DocId| {
            !r.subscriptions.covers(doc) && r.options.rolling.iter().any(|p| p.split(doc).is_some())
        };
        let wanted: Vec<DocId> = received
            .iter()
            .filter(|(d, _)| !forgotten(self, d))
            .map(|(d, _)| d.clone())
            .collect();
        // One parallel batch for every message of the flush: many small documents verify on
        // every core too. Meanwhile this thread reads the documents from the store (into the
        // cache; a failed flush evicts them again), then verifies with the others.
        let verify_threads = self.options.verify_threads;
        let (per_doc, loaded) =
            change::verify_docs_covered_beside(received, verify_threads, || {
                for doc in &wanted {
                    touched.push(doc.clone());
                    self.load(doc, true)?;
                }
                Ok::<_, Error>(())
            });
        loaded?;
        let per_doc = per_doc?;
        // What is new to each document (dropping what it holds or waits for already).
        let mut work: Vec<(DocId, DocState, Vec<VerifiedChange>)> = Vec::new();
        for (doc, changes) in per_doc {
            if forgotten(self, &doc) {
                continue;
            }
            let state = self.load(&doc, true)?;
            let mut seen = HashSet::new();
            let fresh: Vec<VerifiedChange> = changes
                .into_iter()
                .filter(|c| {
                    seen.insert(c.hash())
                        && !state.pending.contains(&c.hash())
                        && !state.doc.has_change(&c.hash())
                })
                .collect();
            if fresh.is_empty() {
                continue;
            }
            // Out of the cache while it is applied; put back only on success (a failed flush
            // evicts what it touched).
            let state = self
                .docs
                .remove(&doc)
                .ok_or_else(|| Error::UnknownDocument(doc.clone()))?;
            work.push((doc, state, fresh));
        }
        // Documents are independent: with enough changes, parts of them are applied on
        // threads of their own while this thread stores the changes, in a transaction that
        // commits only if every apply succeeds (changes a document refuses are taken out of
        // it again); once stored, this thread applies the parts still left. A small commit
        // (a live change) is applied here, then stored.
        let max_pending = self.options.max_pending_per_doc;
        let patch_events = self.options.patch_events;
        let total: usize = work.iter().map(|w| w.2.len()).sum();
        let threads = self
            .options
            .verify_threads
            .min(total / MIN_CHANGES_PER_APPLY_THREAD)
            .min(work.len());
        let epoch = self
            .session
            .as_ref()
            .filter(|s| s.reconciled())
            .map(|s| s.hub_epoch)
            .filter(|e| self.epoch_recorded != Some(*e));
        let mut items: Vec<(&DocId, &mut DocState, &[VerifiedChange])> =
            Vec::with_capacity(work.len());
        let mut to_store: Vec<&VerifiedChange> = Vec::with_capacity(total);
        for (doc, state, fresh) in work.iter_mut() {
            let fresh: &[VerifiedChange] = fresh;
            to_store.extend(fresh.iter());
            items.push((doc, state, fresh));
        }
        let apply = |part: Vec<(&DocId, &mut DocState, &[VerifiedChange])>| {
            part.into_iter()
                .map(|(doc, state, fresh)| {
                    apply_received(doc, state, fresh, max_pending, patch_events)
                })
                .collect::<Vec<_>>()
        };
        // A live change is shown first and stored once the thread is idle (`defer_received`).
        let defer = live && self.defer_received && threads <= 1 && total <= MAX_UNCOMMITTED;
        let store = &mut self.store;
        let cursors_ref = &cursors;
        let write = move || -> Result<Option<(crate::store::WriteBatch<'_>, Vec<bool>)>> {
            let store = store; // moved in whole: the batch borrows the store past this call
            if defer {
                return Ok(None);
            }
            write_received(store, &to_store, cursors_ref, epoch).map(Some)
        };
        let (applied, written) = if threads <= 1 {
            let applied = vec![Some(apply(items))];
            (applied, write())
        } else {
            let parts = crate::parallel::split_by(
                items,
                threads * crate::parallel::PARTS_PER_THREAD,
                |i| i.2.len(),
            );
            crate::parallel::run_beside(parts, threads, apply, write)
        };
        let mut written = written?;
        let mut outcomes = Vec::with_capacity(work.len());
        for part in applied {
            outcomes.extend(part.ok_or_else(|| Error::Corrupt {
                what: "a commit of received changes".into(),
                reason: "an apply thread failed".into(),
            })?);
        }
        let mut changed: Vec<(DocId, Vec<ChangeHash>, Vec<PatchSummary>)> = Vec::new();
        let mut refused_total = 0;
        let mut at = 0;
        let mut done = Vec::with_capacity(work.len());
        let mut held = Vec::new();
        for ((doc, state, fresh), outcome) in work.into_iter().zip(outcomes) {
            let a = outcome?;
            if !a.refused.is_empty() {
                // A change taken in on the signature of one the document then refused is
                // checked on its own: the store keeps no proof of it otherwise.
                for c in fresh
                    .iter()
                    .filter(|c| !c.signature_checked() && !a.refused.contains(&c.hash()))
                {
                    change::verify(&doc, c.signed().clone())?;
                }
            }
            if let Some((batch, new)) = written.as_mut() {
                for (i, c) in fresh.iter().enumerate() {
                    if a.refused.contains(&c.hash()) && new[at + i] {
                        batch.remove_new_change(c)?;
                    }
                }
            }
            at += fresh.len();
            refused_total += a.refused.len() as u64;
            if let Some(before) = a.before {
                changed.push((doc.clone(), before, a.patches));
            }
            if defer {
                held.extend(fresh.into_iter().filter(|c| !a.refused.contains(&c.hash())));
            }
            done.push((doc, state));
        }
        let committed = written.map(|(batch, _)| batch.commit()).transpose()?;
        if committed.is_none() {
            self.uncommitted = Some(Uncommitted {
                changes: held,
                cursors,
                epoch,
            });
        }
        if epoch.is_some() {
            self.epoch_recorded = epoch;
        }
        self.refused += refused_total;
        self.docs.extend(done);
        for (doc, before, patches) in changed {
            self.after_commit(&doc, &before, Origin::Remote, Some(patches));
        }
        Ok(())
    }

    /// Compaction runs after a write is committed and acknowledged: its failure must not
    /// turn that write into an error (the app would retry a durable write), so it is logged
    /// and retried at the next write.
    fn compact_after_commit(&mut self, doc: &DocId) {
        if let Err(e) = self.maybe_compact(doc) {
            tracing::warn!(%doc, error = %e, "compaction failed; the document stays uncompacted");
        }
    }

    fn maybe_compact(&mut self, doc: &DocId) -> Result<()> {
        let limit = self.options.compact_after_bytes;
        if self
            .docs
            .get(doc)
            .is_none_or(|state| state.incremental_bytes <= limit)
        {
            return Ok(());
        }
        // The snapshot covers what the store holds: received changes that wait go in first.
        self.commit_received()?;
        let Some(state) = self.docs.get_mut(doc) else {
            return Ok(());
        };
        let snapshot = state.doc.save();
        // Only the changes still stored with their bytes can be dropped: work proportional to
        // what was written since the last compaction, not to the whole history. Pending
        // changes (not in the document yet) keep their bytes.
        let incremental = self.store.incremental_hashes(doc)?;
        let Some(state) = self.docs.get(doc) else {
            return Ok(());
        };
        let covered: Vec<ChangeHash> = incremental
            .into_iter()
            .filter(|h| state.doc.has_change(h))
            .collect();
        self.store.compact(doc, &snapshot, &covered)?;
        self.compactions += 1;
        // Count from zero again. What stays incremental (pending changes, and outbox entries
        // that keep their bytes until the hub has them) cannot be compacted away: counting it
        // would compact again at every write while an edge is offline with a large outbox.
        if let Some(state) = self.docs.get_mut(doc) {
            state.incremental_bytes = 0;
        }
        tracing::debug!(%doc, snapshot = snapshot.len(), "compacted");
        Ok(())
    }

    /// The next message for the hub. Commits received changes first.
    pub fn poll_transmit(&mut self) -> Result<Option<Message>> {
        if self.session.is_none() {
            return Ok(None);
        }
        if let Err(e) = self.flush_as(true) {
            tracing::warn!(error = %e, "refused changes from the hub");
        }
        let Some(s) = self.session.as_mut() else {
            return Ok(None);
        };
        if let Some(m) = s.out.pop_front() {
            return Ok(Some(m));
        }
        if s.failed || s.hub.is_none() || s.inflight.len() >= MAX_INFLIGHT_PUSHES {
            return Ok(None);
        }
        // Rows whose relayed signature fails are dropped on the way: a push of none of them
        // is not sent, the next rows are read instead (each turn drops at least one).
        loop {
            match self.next_push()? {
                NextPush::Send(push) => return Ok(Some(push)),
                NextPush::Dropped => continue,
                NextPush::Empty => return Ok(None),
            }
        }
    }

    /// The next `Push` of outbox rows after the session's mark, all of one document.
    fn next_push(&mut self) -> Result<NextPush> {
        let Some(s) = self.session.as_ref() else {
            return Ok(NextPush::Empty);
        };
        let entries = self.store.outbox_run(s.sent_upto, MAX_PUSH_CHANGES)?;
        let Some(first) = entries.first() else {
            return Ok(NextPush::Empty);
        };
        let doc = first.doc.clone();
        let mut rows = Vec::new();
        let mut changes: Vec<SignedChange> = Vec::new();
        let mut bytes = 0usize;
        let mut last_row = s.sent_upto;
        for e in entries.into_iter().take_while(|e| e.doc == doc) {
            let signed = match e.signed {
                Some(s) => s,
                None => {
                    // Compacted: rebuild the bytes from the document (same hash, same signature).
                    let state = self.load(&doc, false)?;
                    let c = state
                        .doc
                        .automerge()
                        .get_change_by_hash(&e.hash.into())
                        .ok_or_else(|| Error::Corrupt {
                            what: format!("outbox of {doc}"),
                            reason: format!(
                                "change {} is in neither the store nor the document",
                                e.hash
                            ),
                        })?;
                    SignedChange {
                        bytes: c.raw_bytes().to_vec(),
                        signature: e.signature,
                    }
                }
            };
            if !changes.is_empty() && bytes + signed.bytes.len() > MAX_PUSH_BYTES {
                break;
            }
            if !e.checked && change::verify(&doc, signed.clone()).is_err() {
                // A change accepted on a later change of its actor, whose own signature (as
                // the hub relayed it) does not verify: a hub takes changes one by one, so
                // only its author can upload it again. Dropped from the outbox, not the store.
                tracing::warn!(%doc, hash = %e.hash, "not uploading a change whose relayed signature does not verify");
                self.commit_received()?;
                self.store.drop_outbox(e.row)?;
                continue;
            }
            bytes += signed.bytes.len();
            last_row = e.row;
            rows.push(e.row);
            changes.push(signed);
        }
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            message: "Push",
            state: "closed",
        })?;
        s.sent_upto = last_row;
        if changes.is_empty() {
            return Ok(NextPush::Dropped);
        }
        let push_id = s.next_push;
        s.next_push += 1;
        s.inflight.insert(
            push_id,
            InFlight {
                doc: doc.clone(),
                rows,
            },
        );
        Ok(NextPush::Send(Message::Push(Push {
            push_id,
            doc,
            changes,
        })))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_offline_replica_compacts_per_threshold_not_per_write() {
        let options = ReplicaOptions {
            compact_after_bytes: 4_000,
            ..ReplicaOptions::default()
        };
        let mut r = Replica::open_in_memory(Identity::generate(), options).unwrap();
        let doc = DocId::new("sensors/hall").unwrap();
        let mut bytes = 0u64;
        for i in 0..300 {
            let ops = Op::list_from_json(&json!([{"op":"put","path":["t"],"value":i}]).to_string())
                .unwrap();
            r.change(&doc, &ops).unwrap();
        }
        for e in r.store().outbox_after(0, 1000).unwrap() {
            bytes += e.signed.map_or(0, |s| s.bytes.len() as u64);
        }
        // Every change is still in the outbox (never connected), with its bytes.
        assert_eq!(r.status().unwrap().outbox, 300);
        let expected = bytes / 4_000;
        assert!(r.compactions() >= 1, "it compacted at all");
        assert!(
            r.compactions() <= expected + 1,
            "{} compactions for {bytes} bytes: about one per 4,000 bytes written, not one per write",
            r.compactions()
        );
        // Reopened from the snapshot and the outbox entries, the document is whole.
        assert_eq!(r.json(&doc).unwrap(), json!({"t": 299}));
    }

    /// A subscription caught up is recorded as received changes are, unsynced: losing it to
    /// a power cut only has the hub send from the older cursor again (`power_cut` tests), and
    /// a replica subscribed to many documents no longer syncs its WAL once per document at
    /// every session.
    #[test]
    fn a_subscription_caught_up_is_recorded_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = crate::hub::Hub::new(
            Identity::generate(),
            crate::store::SqliteHubStore::open_in_memory().unwrap(),
            crate::hub::AllowAll,
            None,
        );
        let mut r = Replica::open(
            &dir.path().join("r.db"),
            Identity::generate(),
            ReplicaOptions::default(),
        )
        .unwrap();
        let target = Target::Doc(DocId::new("plant/a").unwrap());
        r.subscribe(target.clone()).unwrap();
        assert!(
            r.store().commits_synced(),
            "a subscription is an app's write"
        );
        let sid = crate::hub::suite::connect(&mut hub, &mut r);
        let errors = crate::hub::suite::pump(&mut hub, &mut [(&mut r, sid)]);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(r.status().unwrap().synced.contains(&target.key()));
        assert!(
            !r.store().commits_synced(),
            "the caught-up record committed unsynced"
        );
    }

    /// A large commit reads its documents while other threads verify it. When one of its
    /// changes is forged, the commit fails and leaves no trace of the documents it read:
    /// not in the store, not in memory either.
    #[test]
    fn a_large_commit_with_a_forged_change_leaves_no_document_behind() {
        let mut hub = crate::hub::Hub::new(
            Identity::generate(),
            crate::store::SqliteHubStore::open_in_memory().unwrap(),
            crate::hub::AllowAll,
            None,
        );
        let options = ReplicaOptions {
            verify_threads: 2,
            ..ReplicaOptions::default()
        };
        let mut r = Replica::open_in_memory(Identity::generate(), options).unwrap();
        let prefix = crate::ids::DocPrefix::new("plant/").unwrap();
        r.subscribe(Target::Prefix(prefix)).unwrap();
        let sid = crate::hub::suite::connect(&mut hub, &mut r);
        let errors = crate::hub::suite::pump(&mut hub, &mut [(&mut r, sid)]);
        assert!(errors.is_empty(), "{errors:?}");
        // Four new documents of 40 changes each: enough for the verification to be split
        // over threads (64 changes per thread at least).
        let author = Identity::generate();
        let docs: Vec<DocId> = (0..4)
            .map(|d| DocId::new(format!("plant/m{d}")).unwrap())
            .collect();
        for (d, doc) in docs.iter().enumerate() {
            let mut writer =
                Document::new(doc.clone(), change::actor_for(&author.peer_id(), [1; 8]));
            let mut changes = Vec::new();
            for i in 0..40 {
                let ops =
                    Op::list_from_json(&json!([{"op":"put","path":["t"],"value":i}]).to_string())
                        .unwrap();
                let c = writer.apply_ops(&ops).unwrap().unwrap();
                changes.push(change::sign(&author, doc, c).unwrap().signed().clone());
            }
            if d == docs.len() - 1 {
                // The last change's signature covers the rest: it is the one checked.
                changes[39].signature[0] ^= 1;
            }
            r.handle_message(Message::Changes(Changes {
                doc: doc.clone(),
                changes,
                cursor: None,
            }))
            .unwrap();
        }
        assert!(r.flush().is_err(), "the forged change fails the commit");
        for doc in &docs {
            assert!(
                matches!(r.doc(doc), Err(Error::UnknownDocument(_))),
                "{doc} was read for the commit and is gone with it"
            );
        }
        assert!(r.doc_ids().unwrap().is_empty());
    }

    #[test]
    fn a_group_commit_reports_each_document_once_with_each_change_once() {
        let mut r =
            Replica::open_in_memory(Identity::generate(), ReplicaOptions::default()).unwrap();
        let a = DocId::new("a").unwrap();
        let b = DocId::new("b").unwrap();
        let put = |k: &str| {
            vec![Op::Put {
                path: vec![k.into()],
                value: crate::ops::Value::Int(1),
            }]
        };
        r.change_many(&[
            (a.clone(), put("s0")),
            (a.clone(), put("s1")),
            (b.clone(), put("x")),
            (a.clone(), put("s2")),
        ])
        .unwrap();
        let events: Vec<Event> = std::iter::from_fn(|| r.poll_event()).collect();
        assert_eq!(events.len(), 2, "{events:?}");
        let Event::DocChanged { doc, patches, .. } = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(doc, &a);
        let paths: Vec<String> = patches.iter().map(|p| format!("{:?}", p.path)).collect();
        assert_eq!(paths.len(), 3, "each put once: {paths:?}");
    }
}
