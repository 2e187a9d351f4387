//! The hub as a sans-IO state machine: authenticates replicas, verifies and stores their
//! changes with group commit, acknowledges after commit, relays the authors' bytes to the
//! subscribers allowed to read them, serves catch-up from cursors and repairs by heads.
//!
//! A driver (the hub's QUIC and WebSocket servers, or a simulator) calls:
//! [`Hub::accept`] per new connection; [`Hub::handle_message`] per message received (pushes
//! are verified and queued, not yet stored); [`Hub::flush`] once it has drained what was
//! readable (one transaction for every queued push, then acknowledgements and broadcasts);
//! [`Hub::poll_transmit`] per connection until `None`, sending while the transport has room
//! (a slow connection is simply polled less: its subscriptions fall back to reading the log,
//! so nothing queues without bound); [`Hub::close`] when a connection ends.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::change::{self, SignedChange, VerifiedChange};
use crate::error::{ChangeError, Error, ProtocolError, Result};
use crate::identity::Identity;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
use crate::protocol::Handshake;
use crate::rolling::Retention;
use crate::store::{Appended, HubSnapshot, HubStore};
use crate::wire::{
    self, Ack, CaughtUp, CaughtUpAt, Changes, ErrorCode, ErrorMessage, Heads, MAX_SNAPSHOT_BYTES,
    MAX_SNAPSHOT_HEADS, Mark, Message, Position, Reconciled, Reject, Role, SnapshotMessage,
    Subscribe, Target,
};

/// Identifies a connection to the hub.
pub type SessionId = u64;

/// Subscriptions one session may hold. A replica follows every document it writes to, so a
/// gateway writing to many documents holds as many subscriptions (about 200 bytes each here):
/// the bound is large enough for tens of thousands of documents, small enough to bound a
/// session's memory (about 13 MiB at most).
pub const MAX_SUBSCRIPTIONS: usize = 65_536;
/// Messages queued for one session before its live subscriptions fall back to the log.
pub const MAX_QUEUED_MESSAGES: usize = 256;
/// Reconcile requests one session may have waiting.
pub const MAX_PENDING_RECONCILES: usize = 4096;
/// Log entries read per catch-up step.
const CATCH_UP_BATCH: usize = 512;
/// Bytes of changes per outgoing message, about.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Documents listed per repair step.
const HEADS_BATCH: usize = 64;
/// Documents one [`Hub::expire`] call looks at, per retention rule.
const SWEEP_PAGE: usize = 1024;
/// How often `syncline-hub run` sweeps for expired buckets ([`Hub::expire`]).
pub const RETENTION_TICK: std::time::Duration = std::time::Duration::from_millis(250);
/// Changes one sweep drops at most: 5 ms of the hub's thread at p50, 17 ms at most, on
/// SQLite on this project's 2-core machines (`syncline-bench --only retention`).
pub const RETENTION_BUDGET: usize = 2_000;

/// Who may do what. The hub checks it on every operation, so a change to the policy (a
/// revoked grant) holds for live sessions at once.
pub trait Policy {
    /// Whether an authenticated key may open a session at all.
    fn may_connect(&self, peer: &PeerId) -> bool;
    /// Whether `peer` may receive `doc`.
    fn may_read(&self, peer: &PeerId, doc: &DocId) -> bool;
    /// Whether changes authored by `author` may be stored in `doc`.
    fn may_write(&self, author: &PeerId, doc: &DocId) -> bool;

    /// Whether `peer` is a hub whose pushes are taken on its word about authors' rights (it
    /// checked them; signatures are still verified here). Peer hubs need this.
    fn may_relay(&self, _peer: &PeerId) -> bool {
        false
    }
}

/// Lets every key do everything (tests, single-user setups).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn may_connect(&self, _: &PeerId) -> bool {
        true
    }
    fn may_read(&self, _: &PeerId, _: &DocId) -> bool {
        true
    }
    fn may_write(&self, _: &PeerId, _: &DocId) -> bool {
        true
    }
    fn may_relay(&self, _: &PeerId) -> bool {
        true
    }
}

/// One grant: a key may read and/or write the documents under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The key.
    pub peer: PeerId,
    /// The documents.
    pub prefix: crate::ids::DocPrefix,
    /// May receive them.
    pub read: bool,
    /// May author changes to them.
    pub write: bool,
    /// Is a peer hub: its pushes are taken on its word about authors' rights.
    pub relay: bool,
}

/// A policy from a list of grants: a key with no grant is unknown and refused at the handshake.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    /// The grants.
    pub grants: Vec<Grant>,
}

impl Policy for Grants {
    fn may_connect(&self, peer: &PeerId) -> bool {
        self.grants.iter().any(|g| g.peer == *peer)
    }
    fn may_read(&self, peer: &PeerId, doc: &DocId) -> bool {
        self.grants
            .iter()
            .any(|g| g.peer == *peer && g.read && doc.matches(&g.prefix))
    }
    fn may_write(&self, author: &PeerId, doc: &DocId) -> bool {
        self.grants
            .iter()
            .any(|g| g.peer == *author && g.write && doc.matches(&g.prefix))
    }
    fn may_relay(&self, peer: &PeerId) -> bool {
        self.grants.iter().any(|g| g.peer == *peer && g.relay)
    }
}

/// Counters a hub keeps (exported as metrics by the hub binary).
#[derive(Debug, Default, Clone)]
pub struct HubMetrics {
    /// Sessions authenticated.
    pub sessions_opened: u64,
    /// Changes stored.
    pub changes_stored: u64,
    /// Changes received that were already stored.
    pub changes_duplicate: u64,
    /// Changes sent to replicas.
    pub changes_sent: u64,
    /// Group commits.
    pub commits: u64,
    /// Refusals, by reason.
    pub rejects: BTreeMap<&'static str, u64>,
    /// Live subscriptions that fell back to the log because their session was slow.
    pub slow_fallbacks: u64,
    /// How long group commits took, as measured by the driver.
    pub commit_seconds: Histogram,
    /// Documents dropped by retention ([`Hub::expire`]).
    pub expired_docs: u64,
    /// Changes dropped by retention.
    pub expired_changes: u64,
    /// Snapshots built by compaction ([`Hub::compact`]).
    pub snapshots_built: u64,
    /// Snapshots sent to replicas in place of changes.
    pub snapshots_sent: u64,
    /// Subscriptions whose cursor was past the log's end (a rolled-back store), repaired.
    pub cursors_ahead: u64,
    /// Subscriptions whose cursor's change is not the one the replica got there (a store
    /// rolled back that has grown again), repaired.
    pub cursors_rewritten: u64,
}

/// A fixed-bucket histogram (Prometheus' cumulative buckets are computed when exported).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, increasing.
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more for "above the last bound".
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// Buckets for commit latency, in seconds: 0.5 ms to 2.5 s.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(COMMIT_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// `(upper bound, cumulative count)` pairs, ending with `+Inf` (as `f64::INFINITY`).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (b, total)
            })
            .collect()
    }
}

impl HubMetrics {
    fn reject(&mut self, why: &'static str) {
        *self.rejects.entry(why).or_default() += 1;
    }
}

#[derive(Debug, Clone)]
enum SubState {
    /// Repair: listing heads of the documents after `after`, then reading the log from `then`.
    Reset { after: Option<DocId>, then: Cursor },
    /// Reading the log after `from`.
    CatchUp { from: Cursor },
    /// Caught up; live changes are sent as they are committed.
    Live,
}

struct HubSession {
    handshake: Handshake,
    peer: Option<PeerId>,
    out: VecDeque<Message>,
    subs: BTreeMap<Target, SubState>,
    /// Subscriptions repaired by heads in this session although their epoch is this log's
    /// (it was rolled back under them): their `CaughtUpAt` says so, and the replica uploads
    /// the documents under them that no `Heads` named (the hub lost them whole).
    rolled_back: BTreeSet<Target>,
    reconciles: VecDeque<(DocId, Vec<ChangeHash>)>,
    failed: bool,
    /// Set when this hub opened the session to a peer hub (it acts as a replica there).
    link: Option<Box<PeerLink>>,
    /// Documents sent as a snapshot in this session, with the position each covers: their
    /// changes up to it are not sent again.
    covered: HashMap<DocId, Cursor>,
}

/// This hub's side of a session it opened to a peer hub: it follows the peer's whole log and
/// pushes its own log from the last position the peer acknowledged. No document is
/// materialized; when either log's epoch changed, it starts over from zero (idempotent).
struct PeerLink {
    peer_epoch: Epoch,
    ready: bool,
    next_push: u64,
    inflight: BTreeMap<u64, Cursor>,
    sent_upto: Cursor,
}

/// What to do once a queued batch is committed.
enum Reply {
    /// Acknowledge the replica's push.
    Ack(u64),
    /// Changes from a peer hub: record how far its log was received.
    PeerCursor(Option<Cursor>),
}

/// What a group commit answers once it is synced, when syncs are deferred
/// ([`Hub::set_deferred_sync`]).
enum Held {
    /// The writer's acknowledgement (an `AckAt` or `Ack`).
    Ack {
        session: SessionId,
        message: Message,
    },
    /// How far a peer hub's log was received.
    PeerCursor { session: SessionId, cursor: Cursor },
}

/// A `Push` whose signatures were checked where it was received (a connection task, on any
/// core); only [`VerifiedPush::verify`] makes one. See [`Hub::handle_verified_push`].
pub struct VerifiedPush {
    push_id: u64,
    doc: DocId,
    result: std::result::Result<Vec<VerifiedChange>, ChangeError>,
}

impl VerifiedPush {
    /// Verifies the changes of a `Push` within the wire limits; any other message (or a push
    /// over the limits, which the hub refuses the usual way) is given back untouched.
    pub fn verify(msg: Message) -> std::result::Result<VerifiedPush, Message> {
        if msg.check_limits().is_err() {
            return Err(msg);
        }
        match msg {
            Message::Push(push) => Ok(VerifiedPush {
                push_id: push.push_id,
                result: change::verify_batch(&push.doc, push.changes),
                doc: push.doc,
            }),
            other => Err(other),
        }
    }
}

struct QueuedPush {
    session: SessionId,
    reply: Reply,
    changes: Vec<VerifiedChange>,
}

/// The hub machine over a store `S` and an access policy `P`.
pub struct Hub<S, P> {
    identity: Identity,
    store: S,
    policy: P,
    sessions: HashMap<SessionId, HubSession>,
    next_session: SessionId,
    queued: Vec<QueuedPush>,
    /// Answers of commits that wait for [`Hub::sync`].
    held: Vec<Held>,
    ready: BTreeSet<SessionId>,
    metrics: HubMetrics,
    rng: StdRng,
    /// Set when other hub instances write to the same store ([`Hub::share_store`]).
    shared: Option<SharedTail>,
    /// Retention of rolling buckets ([`Hub::set_retention`]), each with where its sweep goes
    /// on (the last document looked at; `None`: from the start).
    retention: Vec<(Retention, Option<DocId>)>,
    /// The time of the last [`Hub::expire`] (seconds since the Unix epoch); 0 before the
    /// first, when nothing counts as expired.
    retention_now: u64,
    /// Compaction: a document is snapshotted once it gained this many changes (`None`: off).
    compact_after: Option<u64>,
    /// Changes committed per document since its last snapshot (counted from this start).
    since_snapshot: HashMap<DocId, u64>,
    /// The snapshot being built, a bounded step per [`Hub::compact`] call.
    building: Option<Building>,
    /// Documents past the snapshot bound (`snapshot::MAX_COVERAGE_STEPS`): not read again
    /// (at most 65,536 remembered).
    too_large: std::collections::HashSet<DocId>,
}

/// Compaction's default: snapshot a document once it gained this many changes.
pub const COMPACT_AFTER: u64 = 1_000;

/// At most this many documents are sent as snapshots in one session.
const MAX_SNAPSHOTS_PER_SESSION: usize = 1_024;

/// A document with at least this many changes in one catch-up read is considered for a
/// snapshot.
const SNAPSHOT_MIN_RUN: usize = 128;

/// Wire bytes of a small change in a `Changes` message (bytes, signature, framing), to weigh a
/// snapshot against the changes it replaces.
const CHANGE_WIRE_BYTES: u64 = 200;

/// A snapshot under construction ([`Hub::compact`]).
struct Building {
    doc: DocId,
    document: crate::document::Document,
    /// Log position read up to.
    at: Cursor,
    /// Per actor, the signatures of its newest change in the document and of its changes
    /// read but not in it yet.
    newest: HashMap<Vec<u8>, ActorHeads>,
    /// Changes read that the document does not hold yet (waiting for dependencies).
    waiting: HashMap<ChangeHash, Cursor>,
    /// The first stored change that does not parse: the snapshot stops before it.
    unreadable: Option<Cursor>,
    /// The document's first log position when the build started: if retention (of another
    /// instance, on a shared store) drops changes meanwhile, the snapshot is not stored.
    first: Option<Cursor>,
}

/// One actor's signatures while a snapshot is built: its highest numbered change in the
/// document, and those read that wait for their dependencies (by sequence number).
#[derive(Default)]
struct ActorHeads {
    applied: Option<(u64, ChangeHash, [u8; 64])>,
    waiting: BTreeMap<u64, (ChangeHash, [u8; 64])>,
}

/// What one [`Hub::compact`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Changes read into the snapshot being built.
    pub changes: u64,
    /// Whether a snapshot was stored.
    pub stored: bool,
    /// Whether work is left (a snapshot half built, or more documents due).
    pub more: bool,
}

/// What one [`Hub::expire`] call dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Documents dropped whole.
    pub docs: u64,
    /// Changes dropped.
    pub changes: u64,
}

/// How far this hub has relayed a store that other hub instances also write. With a shared
/// store every relay goes through the log in position order, this hub's own commits too: a
/// subscriber's cursor then never passes a change it was not sent. (Relaying its own commits
/// at once, as a lone hub does, would hand out a position while a lower one, committed by
/// another instance, is not relayed yet; if this hub then died, the replica would resume
/// after that lower position and never get it.)
struct SharedTail {
    /// Every change at or before this position has been relayed.
    at: Cursor,
    /// The sessions that pushed this hub's own commits after `at`, by position: they are not
    /// sent their own changes back.
    own: BTreeMap<u64, SessionId>,
}

impl<S: HubStore, P: Policy> Hub<S, P> {
    /// A hub with its identity, store and policy. `rng_seed` fixes handshake nonces (tests).
    pub fn new(identity: Identity, store: S, policy: P, rng_seed: Option<u64>) -> Self {
        Hub {
            identity,
            store,
            policy,
            sessions: HashMap::new(),
            next_session: 1,
            queued: Vec::new(),
            held: Vec::new(),
            ready: BTreeSet::new(),
            metrics: HubMetrics::default(),
            rng: rng_seed.map_or_else(StdRng::from_entropy, StdRng::seed_from_u64),
            shared: None,
            retention: Vec::new(),
            retention_now: 0,
            compact_after: Some(COMPACT_AFTER),
            since_snapshot: HashMap::new(),
            building: None,
            too_large: std::collections::HashSet::new(),
        }
    }

    /// Sets after how many new changes a document is compacted (`None`: never; then no
    /// snapshot is built, and those already stored are still served).
    pub fn set_compaction(&mut self, after: Option<u64>) {
        self.compact_after = after.map(|n| n.max(1));
        if self.compact_after.is_none() {
            self.building = None;
        }
    }

    /// Compaction, one bounded step: builds the snapshot of the document that gained the
    /// most changes since its last one (at least [`Hub::set_compaction`]'s number), reading up
    /// to `budget` of its changes per call into a document (checked as a replica checks
    /// them), and stores it once the log is read. Snapshots are served to replicas that are
    /// far behind, in place of the changes they cover ([`crate::snapshot`]). The hub's hot
    /// path never waits for this: call it when the hub is idle.
    pub fn compact(&mut self, budget: usize) -> Result<Compacted> {
        let mut done = Compacted::default();
        if self.building.is_none() && !self.start_building()? {
            return Ok(done);
        }
        let Some(b) = self.building.as_mut() else {
            return Ok(done);
        };
        let batch = self
            .store
            .read_log(&Target::Doc(b.doc.clone()), b.at, budget.max(1))?;
        let mut changes = Vec::with_capacity(batch.entries.len());
        for e in batch.entries {
            let Ok(c) = automerge::Change::try_from(&e.change.bytes[..]) else {
                tracing::warn!(doc = %b.doc, cursor = e.cursor.0, "a stored change does not parse; the snapshot stops before it");
                b.unreadable = Some(b.unreadable.map_or(e.cursor, |u| u.min(e.cursor)));
                continue;
            };
            let hash = ChangeHash::from(c.hash());
            b.newest
                .entry(c.actor_id().to_bytes().to_vec())
                .or_default()
                .waiting
                .insert(c.seq(), (hash, e.change.signature));
            b.waiting.insert(hash, e.cursor);
            changes.push(c);
        }
        done.changes = changes.len() as u64;
        for r in b.document.apply_changes(changes)? {
            b.waiting.remove(&r.hash);
        }
        let document = &b.document;
        b.waiting.retain(|h, _| !document.has_change(h));
        for heads in b.newest.values_mut() {
            let held: Vec<u64> = heads
                .waiting
                .iter()
                .filter(|(_, (h, _))| document.has_change(h))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in held {
                if let Some((h, sig)) = heads.waiting.remove(&seq)
                    && heads.applied.is_none_or(|(s, _, _)| seq > s)
                {
                    heads.applied = Some((seq, h, sig));
                }
            }
            // Refused ones never apply: only those still waiting stay.
            heads.waiting.retain(|_, (h, _)| b.waiting.contains_key(h));
        }
        b.at = batch.next;
        if !batch.at_end {
            done.more = true;
            return Ok(done);
        }
        let Some(b) = self.building.take() else {
            return Ok(done);
        };
        // Everything up to `upto` is in the snapshot or refused; a waiting change is not.
        let upto = b
            .waiting
            .values()
            .copied()
            .chain(b.unreadable)
            .min()
            .map_or(b.at, |c| Cursor(c.0.saturating_sub(1)));
        let first_now = self
            .store
            .read_log(&Target::Doc(b.doc.clone()), Cursor(0), 1)?
            .entries
            .first()
            .map(|e| e.cursor);
        if first_now != b.first {
            tracing::debug!(doc = %b.doc, "changes were dropped while the snapshot was built; not stored");
            done.more = self.due().is_some();
            return Ok(done);
        }
        let by_hash: HashMap<ChangeHash, [u8; 64]> = b
            .newest
            .values()
            .filter_map(|a| a.applied.map(|(_, h, s)| (h, s)))
            .collect();
        let am = b.document.automerge();
        match crate::snapshot::make(am, |h| by_hash.get(h).copied()) {
            Ok(snapshot) => {
                let snap = HubSnapshot {
                    epoch: self.store.epoch(),
                    upto,
                    changes: am.get_changes_meta(&[]).len() as u64,
                    snapshot,
                };
                self.store.put_snapshot(&b.doc, &snap)?;
                self.metrics.snapshots_built += 1;
                done.stored = true;
                tracing::debug!(doc = %b.doc, changes = snap.changes, bytes = snap.snapshot.data.len(), "document compacted");
            }
            Err(e) => {
                tracing::debug!(doc = %b.doc, "no snapshot: {e}");
                if matches!(e, crate::snapshot::MakeError::TooLarge { .. })
                    && self.too_large.len() < 65_536
                {
                    self.too_large.insert(b.doc.clone());
                }
            }
        }
        done.more = self.due().is_some();
        Ok(done)
    }

    /// Counts changes committed to `doc` towards its next snapshot. The count is kept for
    /// at most 65,536 documents: past that, those far from due are forgotten.
    fn count_for_compaction(&mut self, doc: &DocId, n: u64) {
        let Some(after) = self.compact_after else {
            return;
        };
        if let Some(c) = self.since_snapshot.get_mut(doc) {
            *c += n;
            return;
        }
        if self.too_large.contains(doc) {
            return;
        }
        if self.since_snapshot.len() >= 65_536 {
            self.since_snapshot.retain(|_, c| *c >= after / 4);
            if self.since_snapshot.len() >= 65_536 {
                return;
            }
        }
        self.since_snapshot.insert(doc.clone(), n);
    }

    /// The document most due for compaction.
    fn due(&self) -> Option<DocId> {
        let after = self.compact_after?;
        self.since_snapshot
            .iter()
            .filter(|(_, n)| **n >= after)
            .max_by_key(|(_, n)| **n)
            .map(|(d, _)| d.clone())
    }

    /// Starts building the snapshot of the document most due, from its stored snapshot if
    /// one of this log is there; `false` if none is due.
    fn start_building(&mut self) -> Result<bool> {
        let Some(doc) = self.due() else {
            return Ok(false);
        };
        self.since_snapshot.remove(&doc);
        let actor = automerge::ActorId::random();
        let mut newest = HashMap::new();
        let (document, at) = match self.store.snapshot(&doc)? {
            Some(s) if s.epoch == self.store.epoch() => {
                let d = crate::document::Document::load(
                    doc.clone(),
                    actor,
                    Some(&s.snapshot.data),
                    Vec::new(),
                )?;
                for h in &s.snapshot.signed {
                    if let Some(m) = d.automerge().get_change_meta_by_hash(&h.hash.into()) {
                        newest.insert(
                            m.actor.to_bytes().to_vec(),
                            ActorHeads {
                                applied: Some((m.seq, h.hash, h.signature)),
                                waiting: BTreeMap::new(),
                            },
                        );
                    }
                }
                (d, s.upto)
            }
            _ => (
                crate::document::Document::new(doc.clone(), actor),
                Cursor(0),
            ),
        };
        let first = self
            .store
            .read_log(&Target::Doc(doc.clone()), Cursor(0), 1)?
            .entries
            .first()
            .map(|e| e.cursor);
        self.building = Some(Building {
            doc,
            document,
            at,
            newest,
            waiting: HashMap::new(),
            unreadable: None,
            first,
        });
        Ok(true)
    }

    /// Sets the retention of rolling buckets (it applies from the next [`Hub::expire`]).
    pub fn set_retention(&mut self, rules: Vec<Retention>) {
        self.retention = rules.into_iter().map(|r| (r, None)).collect();
    }

    /// The retention rule that `doc` has expired under, at the time of the last sweep.
    fn expired_under(&self, doc: &DocId) -> Option<&Retention> {
        self.retention
            .iter()
            .map(|(r, _)| r)
            .find(|r| r.expired(doc, self.retention_now))
    }

    /// Drops from the store the rolling buckets past their retention at `now_secs` (seconds
    /// since the Unix epoch), and from then on refuses writes into them. Each call looks at
    /// one page of documents per rule, going on where the last call stopped, and drops at
    /// most `budget` changes, so that it holds the hub's thread briefly: call it regularly
    /// (`syncline-hub run` does, every [`RETENTION_TICK`]). Only ids of rolling buckets are
    /// ever dropped, never a document that is not one.
    pub fn expire(&mut self, now_secs: u64, budget: usize) -> Result<Expired> {
        self.retention_now = self.retention_now.max(now_secs);
        let now = self.retention_now;
        let mut out = Expired::default();
        for i in 0..self.retention.len() {
            let (rule, from) = &self.retention[i];
            let rule = rule.clone();
            let page = self.store.docs_page(
                &Target::Prefix(rule.prefix().clone()),
                from.as_ref(),
                SWEEP_PAGE,
            )?;
            let through = page.len() < SWEEP_PAGE;
            let mut reached = from.clone();
            for doc in page {
                if rule.expired(&doc, now) {
                    let left = budget.saturating_sub(out.changes as usize);
                    if left == 0 {
                        self.retention[i].1 = reached;
                        return Ok(out);
                    }
                    let dropped = self.store.drop_doc(&doc, left)?;
                    // A snapshot being built would bring the dropped changes back.
                    if self.building.as_ref().is_some_and(|b| b.doc == doc) {
                        self.building = None;
                    }
                    self.since_snapshot.remove(&doc);
                    out.changes += dropped.changes;
                    self.metrics.expired_changes += dropped.changes;
                    if !dropped.gone {
                        // The budget ran out inside this document: go on with it next time.
                        self.retention[i].1 = reached;
                        return Ok(out);
                    }
                    out.docs += 1;
                    self.metrics.expired_docs += 1;
                    tracing::debug!(%doc, "dropped a rolling bucket past its retention");
                }
                reached = Some(doc);
            }
            // Through the prefix: start over next time.
            self.retention[i].1 = if through { None } else { reached };
        }
        Ok(out)
    }

    /// Declares that other hub instances write to this hub's store (several instances on one
    /// PostgreSQL database). From now on, call [`Hub::poll_store`] regularly: it relays to this
    /// hub's subscribers what the others commit. The store must number changes in commit
    /// order (every change before a visible position is visible), as both stores here do.
    pub fn share_store(&mut self) -> Result<()> {
        // The others relay what they read of this store: its commits are synced at once.
        self.sync()?;
        self.store.set_deferred_sync(false)?;
        self.shared = Some(SharedTail {
            at: self.store.last_cursor()?,
            own: BTreeMap::new(),
        });
        Ok(())
    }

    /// Relays to live subscribers the changes that other hub instances committed to the
    /// shared store since the last call, and wakes peer links. Returns how many changes were
    /// relayed. Does nothing unless [`Hub::share_store`] was called.
    pub fn poll_store(&mut self) -> Result<usize> {
        const PAGE: usize = 1024;
        let Some(mut tail) = self.shared.take() else {
            return Ok(0);
        };
        let mut relayed = 0;
        let result = (|| -> Result<()> {
            loop {
                let batch = self.store.read_log(
                    &Target::Prefix(crate::ids::DocPrefix::all()),
                    tail.at,
                    PAGE,
                )?;
                // Runs of one document pushed by one session (0: another instance), within the
                // bounds of one message.
                let mut run: Option<(SessionId, DocId, Vec<SignedChange>, Cursor, Position)> = None;
                let mut run_bytes = 0usize;
                for e in batch.entries {
                    let before = tail.at;
                    tail.at = e.cursor;
                    let author = tail.own.remove(&e.cursor.0).unwrap_or(0);
                    relayed += 1;
                    let size = e.change.bytes.len();
                    let at = Position {
                        cursor: e.cursor,
                        mark: mark_of(&e),
                    };
                    match &mut run {
                        Some((session, doc, changes, _, last))
                            if *session == author
                                && *doc == e.doc
                                && changes.len() < wire::MAX_CHANGES_PER_DELTA
                                && run_bytes + size <= MAX_MESSAGE_BYTES =>
                        {
                            changes.push(e.change);
                            *last = at;
                            run_bytes += size;
                        }
                        _ => {
                            if let Some((session, doc, changes, from, last)) = run.take() {
                                self.broadcast(session, &doc, changes, from, last);
                            }
                            run = Some((author, e.doc, vec![e.change], before, at));
                            run_bytes = size;
                        }
                    }
                }
                if let Some((session, doc, changes, from, last)) = run.take() {
                    self.broadcast(session, &doc, changes, from, last);
                }
                tail.at = tail.at.max(batch.next);
                if batch.at_end {
                    return Ok(());
                }
            }
        })();
        // Own commits at or before the tail were passed over or never read: forget them.
        tail.own = tail.own.split_off(&(tail.at.0 + 1));
        self.shared = Some(tail);
        result?;
        if relayed > 0 {
            self.wake_links();
        }
        Ok(relayed)
    }

    /// Links to peer hubs push from the log: wake them when it grew.
    fn wake_links(&mut self) {
        for (&id, s) in &self.sessions {
            if s.link.as_ref().is_some_and(|l| l.ready) {
                self.ready.insert(id);
            }
        }
    }

    /// The hub's public key.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The store.
    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// The policy (change it to grant or revoke; it holds at once).
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// The counters.
    pub fn metrics(&self) -> &HubMetrics {
        &self.metrics
    }

    /// Open sessions, authenticated or not.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Records how long a group commit took (the core has no clock: the driver measures
    /// [`Hub::flush`] when it committed something, see [`HubMetrics::commits`]).
    pub fn record_commit_seconds(&mut self, seconds: f64) {
        self.metrics.commit_seconds.observe(seconds);
    }

    /// For each authenticated replica session: how far behind the log it is, as an upper bound
    /// of the log positions it has still to receive (its catching-up subscriptions' distance
    /// to the end of the log, plus the changes queued for it). Zero when it is live and its
    /// queue is empty.
    pub fn replica_lags(&mut self) -> Result<Vec<(PeerId, u64)>> {
        let end = self.store.last_cursor()?.0;
        Ok(self
            .sessions
            .values()
            .filter(|s| s.link.is_none())
            .filter_map(|s| {
                let peer = s.peer?;
                let catching_up: u64 = s
                    .subs
                    .values()
                    .map(|st| match st {
                        SubState::CatchUp { from } => end.saturating_sub(from.0),
                        SubState::Reset { then, .. } => end.saturating_sub(then.0).max(1),
                        SubState::Live => 0,
                    })
                    .max()
                    .unwrap_or(0);
                let queued: u64 = s
                    .out
                    .iter()
                    .map(|m| m.as_changes().map_or(0, |c| c.changes.len() as u64))
                    .sum();
                Some((peer, catching_up + queued))
            })
            .collect())
    }

    /// Counts a refusal made outside the state machine (by a transport driver: a connection
    /// over the limit), under `reason` in [`HubMetrics::rejects`].
    pub fn count_reject(&mut self, reason: &'static str) {
        self.metrics.reject(reason);
    }

    /// Fails a session whose peer has not completed the handshake yet (a driver calls it
    /// when the handshake deadline passes): an `Error` goes to the peer, the refusal is
    /// counted as `handshake_timeout`. Returns whether it did; an authenticated, failed or
    /// closed session is left alone.
    pub fn expire_handshake(&mut self, id: SessionId, after: std::time::Duration) -> bool {
        match self.sessions.get(&id) {
            Some(s) if s.peer.is_none() && !s.failed => {}
            _ => return false,
        }
        let message = format!(
            "no authenticated handshake within {} s; the session is closed",
            after.as_secs()
        );
        self.fail_as(
            id,
            ErrorCode::ProtocolViolation,
            message,
            "handshake_timeout",
        );
        true
    }

    /// The authenticated peer of a session.
    pub fn session_peer(&self, id: SessionId) -> Option<PeerId> {
        self.sessions.get(&id).and_then(|s| s.peer)
    }

    /// A new connection without channel binding: returns its id; its first message (Hello)
    /// is ready to send.
    pub fn accept(&mut self) -> SessionId {
        self.accept_bound([0; 32])
    }

    /// A new connection over a transport that gives a channel binding (a TLS exporter value
    /// both ends compute); both sides must pass the same value or the handshake fails.
    pub fn accept_bound(&mut self, binding: [u8; 32]) -> SessionId {
        self.open_session(Role::Hub, None, binding, None)
    }

    /// A connection this hub opened to a peer hub (`expected` pins its key). This hub acts as
    /// a replica there: it follows the peer's whole log into its own store, and pushes its own
    /// log to the peer, so both hubs serve the same data set without shared storage. The peer
    /// must let this hub's key connect, read everything and relay ([`Policy::may_relay`]).
    pub fn connect_peer(&mut self, expected: Option<PeerId>, binding: [u8; 32]) -> SessionId {
        let link = PeerLink {
            peer_epoch: Epoch::none(),
            ready: false,
            next_push: 1,
            inflight: BTreeMap::new(),
            sent_upto: Cursor(0),
        };
        self.open_session(Role::Replica, expected, binding, Some(Box::new(link)))
    }

    /// A new session playing `role` (the peer plays the other); its Hello is queued.
    fn open_session(
        &mut self,
        role: Role,
        expected: Option<PeerId>,
        binding: [u8; 32],
        link: Option<Box<PeerLink>>,
    ) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        let nonce: [u8; 32] = self.rng.r#gen();
        let other = match role {
            Role::Hub => Role::Replica,
            Role::Replica => Role::Hub,
        };
        // A hub following a peer hub's log (a link) takes changes, never snapshots.
        let max_version = match role {
            Role::Replica => 1,
            Role::Hub => crate::wire::PROTOCOL_VERSION,
        };
        let (handshake, hello) = Handshake::start(
            max_version,
            self.identity.clone(),
            role,
            other,
            expected,
            nonce,
            self.store.epoch(),
            binding,
        );
        let session = HubSession {
            handshake,
            peer: None,
            out: VecDeque::from([hello]),
            subs: BTreeMap::new(),
            rolled_back: BTreeSet::new(),
            reconciles: VecDeque::new(),
            failed: false,
            link,
            covered: HashMap::new(),
        };
        self.sessions.insert(id, session);
        self.ready.insert(id);
        id
    }

    /// The connection ended.
    pub fn close(&mut self, id: SessionId) {
        self.sessions.remove(&id);
        self.queued.retain(|q| q.session != id);
        self.ready.remove(&id);
    }

    /// The connection's bytes could not be read as messages (garbage, an oversized frame):
    /// the session fails with an error message for the peer, and the refusal is counted.
    pub fn refuse_stream(&mut self, id: SessionId, error: &crate::error::WireError) {
        self.metrics.reject("wire");
        self.fail(id, ErrorCode::ProtocolViolation, error.to_string());
    }

    /// Whether the session failed: send what `poll_transmit` still returns, then close it.
    pub fn is_failed(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_none_or(|s| s.failed)
    }

    /// Sessions that got something to send since the last call.
    pub fn take_ready(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.ready).into_iter().collect()
    }

    /// Handles one message from a session. An error is fatal to that session only: it
    /// queues an error message for the peer; send it, then close the connection.
    pub fn handle_message(&mut self, id: SessionId, msg: Message) -> Result<()> {
        let result = self.handle_inner(id, msg);
        if let Err(Error::Protocol(ProtocolError::Closed { .. })) = &result {
            // The peer closed the session with an error: nothing to answer.
            if let Some(s) = self.sessions.get_mut(&id) {
                s.failed = true;
                s.out.clear();
                s.subs.clear();
                s.reconciles.clear();
            }
            self.queued.retain(|q| q.session != id);
        } else if let Err(e) = &result {
            let code = match e {
                Error::Protocol(ProtocolError::VersionMismatch { .. }) => {
                    ErrorCode::VersionMismatch
                }
                Error::Protocol(ProtocolError::Limit(_)) => ErrorCode::LimitExceeded,
                Error::Protocol(ProtocolError::WrongPeer { .. }) => ErrorCode::UnknownPeer,
                _ => ErrorCode::ProtocolViolation,
            };
            self.fail(id, code, e.to_string());
        }
        result
    }

    fn fail(&mut self, id: SessionId, code: ErrorCode, message: String) {
        let reason = match code {
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::VersionMismatch => "version",
            ErrorCode::LimitExceeded => "limit",
            _ => "protocol",
        };
        self.fail_as(id, code, message, reason);
    }

    fn fail_as(
        &mut self,
        id: SessionId,
        code: ErrorCode,
        mut message: String,
        reason: &'static str,
    ) {
        // A failed session goes quiet: its peer's further messages (its own Error among them)
        // get no answer, or two failing sides would trade errors forever.
        if self.sessions.get(&id).is_none_or(|s| s.failed) {
            return;
        }
        self.metrics.reject(reason);
        if let Some(s) = self.sessions.get_mut(&id) {
            wire::truncate_text(&mut message, wire::MAX_ERROR_TEXT);
            s.failed = true;
            s.out.clear();
            s.subs.clear();
            s.reconciles.clear();
            s.out
                .push_back(Message::Error(ErrorMessage { code, message }));
            self.ready.insert(id);
        }
        self.queued.retain(|q| q.session != id);
    }

    /// A push whose signatures a connection task verified ([`VerifiedPush::verify`]), so that
    /// verification runs on every core and not on the hub's one thread. Answered exactly as
    /// [`Hub::handle_message`] answers the same `Push`.
    pub fn handle_verified_push(&mut self, id: SessionId, push: VerifiedPush) -> Result<()> {
        // The peer of a replica's (or peer hub's) authenticated session that has not failed.
        let peer = self
            .sessions
            .get(&id)
            .filter(|s| !s.failed && s.link.is_none())
            .and_then(|s| s.peer);
        match (peer, push.result) {
            (Some(peer), result) => {
                self.accept_push(id, peer, push.push_id, push.doc, result);
                Ok(())
            }
            // Not a replica's authenticated session: the usual path says why, as for any push.
            (None, Ok(verified)) => self.handle_message(
                id,
                Message::Push(wire::Push {
                    push_id: push.push_id,
                    doc: push.doc,
                    changes: verified
                        .into_iter()
                        .map(VerifiedChange::into_signed)
                        .collect(),
                }),
            ),
            (None, Err(_)) => {
                self.fail(
                    id,
                    ErrorCode::ProtocolViolation,
                    "unexpected Push before the session is authenticated".into(),
                );
                Ok(())
            }
        }
    }

    fn handle_inner(&mut self, id: SessionId, msg: Message) -> Result<()> {
        msg.check_limits()?;
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(ProtocolError::Unexpected {
                message: msg.kind(),
                state: "on a closed session",
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
        if s.link.is_some() {
            return self.handle_link(id, msg);
        }
        let Some(peer) = s.peer else {
            match msg {
                Message::Hello(h) => {
                    let auth = s.handshake.on_hello(h)?;
                    s.out.push_back(auth);
                    self.ready.insert(id);
                }
                Message::Auth(a) => {
                    let peer = s.handshake.on_auth(a)?;
                    if !self.policy.may_connect(&peer) {
                        self.fail(
                            id,
                            ErrorCode::UnknownPeer,
                            format!("key {peer} is not known to this hub; grant it first"),
                        );
                        return Ok(());
                    }
                    s.peer = Some(peer);
                    self.metrics.sessions_opened += 1;
                    tracing::debug!(session = id, %peer, "session authenticated");
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
        };
        match msg {
            Message::Subscribe(sub) => self.subscribe(id, peer, sub, None, None)?,
            Message::Resume(r) => {
                s.handshake.require(3, "Resume")?;
                let sub = Subscribe {
                    target: r.target,
                    epoch: r.epoch,
                    cursor: r.cursor,
                };
                self.subscribe(id, peer, sub, r.mark, r.written)?;
            }
            Message::Push(push) => {
                let result = change::verify_batch(&push.doc, push.changes);
                self.accept_push(id, peer, push.push_id, push.doc, result);
            }
            Message::Reconcile(r) => {
                if s.reconciles.len() >= MAX_PENDING_RECONCILES {
                    return Err(ProtocolError::Limit(format!(
                        "over {MAX_PENDING_RECONCILES} pending reconciles"
                    ))
                    .into());
                }
                s.reconciles.push_back((r.doc, r.heads));
                self.ready.insert(id);
            }
            Message::Error(e) => {
                return Err(ProtocolError::from(e).into());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    message: other.kind(),
                    state: "from a replica",
                }
                .into());
            }
        }
        Ok(())
    }

    /// The change at `cursor` of the log, if one is there (none in an empty log, or where
    /// retention dropped it).
    fn entry_at(&mut self, cursor: Cursor) -> Result<Option<crate::store::LogEntry>> {
        if cursor == Cursor(0) {
            return Ok(None);
        }
        let batch =
            self.store
                .read_log(&Target::Prefix(DocPrefix::all()), Cursor(cursor.0 - 1), 1)?;
        Ok(batch
            .entries
            .into_iter()
            .next()
            .filter(|e| e.cursor == cursor))
    }

    /// Starts (or restarts) a subscription of session `id`: from the replica's cursor when it
    /// is a position of this log that the replica's marks (if it sent any: of its cursor, of
    /// its newest acknowledged write) still name, by heads otherwise.
    fn subscribe(
        &mut self,
        id: SessionId,
        peer: PeerId,
        sub: Subscribe,
        mark: Option<Mark>,
        written: Option<Position>,
    ) -> Result<()> {
        {
            let s = self.sessions.get(&id).ok_or(ProtocolError::Unexpected {
                message: "Subscribe",
                state: "closed",
            })?;
            if !s.subs.contains_key(&sub.target) && s.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(ProtocolError::Limit(format!(
                    "over {MAX_SUBSCRIPTIONS} subscriptions"
                ))
                .into());
            }
        }
        let epoch = self.store.epoch();
        let end = self.store.last_cursor()?;
        // Positions retention dropped from the end of the log were given all the same.
        let high = self.store.high_water()?.max(end);
        // The store was rolled back under the replica (a copied data directory put back, a
        // disk snapshot restored), and new changes may take positions it has passed: its
        // cursor or its newest acknowledged write is past the log's end, or (once the log has
        // grown again) the change at either is not the one it got there. Compare heads
        // instead, as for another log. Where retention dropped a marked change, nothing is
        // known.
        let same = sub.epoch == epoch;
        let ahead = same && (sub.cursor > high || written.is_some_and(|w| w.cursor > high));
        let mut rewritten = false;
        if same && !ahead {
            // No change at a marked position counts as another one (the new log may have left
            // it unused: positions have gaps, a refused insert uses one up; the simulation
            // lost a write so), unless retention runs here and may have dropped it (at or
            // below the highest position it dropped a change at): every writer and reader of
            // an expired bucket would otherwise be repaired whole at its next session. There
            // a gap at a marked position goes unseen.
            let retention = !self.retention.is_empty();
            let marked = mark
                .map(|m| Position {
                    cursor: sub.cursor,
                    mark: m,
                })
                .into_iter()
                .chain(written);
            for p in marked {
                // The chain at the position (this build's marks), or the signature of the
                // change there (version 3's, still held by replicas that resumed with them).
                let other = match self.entry_at(p.cursor)? {
                    Some(here) => {
                        here.chain != Some(p.mark) && Mark(here.change.signature) != p.mark
                    }
                    // (Read after the change was found missing: a drop committed by another
                    // instance in between has raised it already.)
                    None => !retention || p.cursor > self.store.dropped_upto()?,
                };
                if other {
                    rewritten = true;
                    break;
                }
            }
        }
        let rolled_back = ahead || rewritten;
        if rolled_back {
            let what = if ahead {
                self.metrics.cursors_ahead += 1;
                "a replica's cursor or newest write is past the highest position of the log: \
                 the store was rolled back"
            } else {
                self.metrics.cursors_rewritten += 1;
                "the change at a replica's cursor or newest write is not the one it got there: \
                 the store was rolled back and has grown again"
            };
            tracing::warn!(
                peer = %peer,
                cursor = sub.cursor.0,
                written = ?written.map(|w| w.cursor.0),
                end = end.0,
                "{what}; repairing by heads"
            );
        }
        let state = if rolled_back || (!same && sub.epoch != Epoch::none()) {
            SubState::Reset {
                after: None,
                then: end,
            }
        } else if same {
            SubState::CatchUp { from: sub.cursor }
        } else {
            SubState::CatchUp { from: Cursor(0) }
        };
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(ProtocolError::Unexpected {
                message: "Subscribe",
                state: "closed",
            })?;
        if rolled_back {
            s.rolled_back.insert(sub.target.clone());
        } else {
            s.rolled_back.remove(&sub.target);
        }
        s.subs.insert(sub.target, state);
        self.ready.insert(id);
        Ok(())
    }

    /// Queues a verified push for the next group commit, or refuses it (bad signature, no
    /// write grant) with a `Reject` for its author's outbox.
    fn accept_push(
        &mut self,
        id: SessionId,
        peer: PeerId,
        push_id: u64,
        doc: DocId,
        result: std::result::Result<Vec<VerifiedChange>, ChangeError>,
    ) {
        let refusal = match result {
            Err(e) => {
                let (code, why) = match e {
                    ChangeError::BadSignature { .. } => (ErrorCode::BadSignature, "bad_signature"),
                    _ => (ErrorCode::MalformedChange, "malformed_change"),
                };
                tracing::warn!(session = id, %peer, error = %e, "refused a push");
                Some((code, why, e.to_string()))
            }
            Ok(verified) => {
                // A peer hub relays changes whose authors' rights it checked itself.
                let relay = self.policy.may_relay(&peer);
                let expired = self.expired_under(&doc).map(Retention::max_age_secs);
                let unauthorized = verified
                    .iter()
                    .find(|c| !relay && !self.policy.may_write(&c.author(), &doc));
                match (unauthorized, expired) {
                    (Some(c), _) => Some((
                        ErrorCode::NotAuthorized,
                        "not_authorized",
                        format!(
                            "key {} may not write {doc}; ask the hub operator for a write grant",
                            c.author()
                        ),
                    )),
                    (None, Some(max_age)) => Some((
                        ErrorCode::Expired,
                        "expired",
                        format!(
                            "{doc} is a rolling bucket that ended more than {max_age} s ago, past \
                             the hub's retention: the write is not kept (check this device's \
                             clock if it should have gone to a newer bucket)"
                        ),
                    )),
                    (None, None) => {
                        self.queued.push(QueuedPush {
                            session: id,
                            reply: Reply::Ack(push_id),
                            changes: verified,
                        });
                        None
                    }
                }
            }
        };
        if let Some((code, why, message)) = refusal {
            self.metrics.reject(why);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.out.push_back(Message::Reject(Reject {
                    push_id,
                    doc,
                    code,
                    message,
                }));
                self.ready.insert(id);
            }
        }
    }

    /// Defers the sync of group commits (off by default), where the store can: a
    /// [`flush`](Self::flush) then commits without syncing and queues its relays at once,
    /// and holds its acknowledgements until [`sync`](Self::sync) has made the commit durable.
    /// The driver sends the relays to replicas that check the log's chain
    /// ([`relays_unsynced`](Self::relays_unsynced)) while the fsync runs, and everything else
    /// after it. Acknowledged still means durable. A power cut before the sync loses changes
    /// that readers may hold at positions the log will give again; such a reader's mark no
    /// longer matches at its next session and it is repaired by heads (as under a store rolled
    /// back from a copy), and the writer, never acknowledged, uploads them again. A process
    /// crash loses nothing (the commits are in the OS's page cache). Not with a shared store
    /// (several instances relay from it). Turning it off syncs and answers what waits.
    pub fn set_deferred_sync(&mut self, on: bool) -> Result<()> {
        if !on {
            self.sync()?;
        }
        self.store.set_deferred_sync(on && self.shared.is_none())
    }

    /// Makes the group commits since the last sync durable, then sends the acknowledgements
    /// they held. If the sync fails, nothing more leaves: every session fails with the error
    /// (what was queued for them may not be on disk), the writers keep their pushes in their
    /// outboxes, and the store refuses appends and syncs until the hub is restarted (a failed
    /// fsync may have dropped the data, and a later one could succeed all the same). The error
    /// is returned for the operator's logs.
    pub fn sync(&mut self) -> Result<()> {
        let result = self.store.sync();
        let held = std::mem::take(&mut self.held);
        match &result {
            Ok(()) => {
                for h in held {
                    match h {
                        Held::Ack { session, message } => {
                            if let Some(s) = self.sessions.get_mut(&session) {
                                s.out.push_back(message);
                                self.ready.insert(session);
                            }
                        }
                        Held::PeerCursor { session, cursor } => {
                            self.record_peer_received(session, cursor)
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "syncing the log failed; refusing every session");
                let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.fail_as(
                        id,
                        ErrorCode::StorageUnavailable,
                        format!(
                            "the hub could not sync its log to disk ({e}); it refuses every \
                             session until it is restarted"
                        ),
                        "storage",
                    );
                }
            }
        }
        result
    }

    /// Whether the session may be sent relayed changes before their commit is synced: an
    /// authenticated replica that speaks version 4, and so shows at every session the log's
    /// chain at its positions, for the hub to find a log that lost what it relayed whatever
    /// took those positions since (version 3's marks miss a lost change put back at its
    /// position above another one lost). Not a peer hub: a link speaks version 1 (marks are
    /// not checked there), whichever side opened it; nor a browser (version 1). And none on a
    /// hub that runs retention: there an empty position at or below the highest one dropped
    /// reads as dropped, so a reader whose marked position a power cut emptied could skip the
    /// changes that took lower ones.
    pub fn relays_unsynced(&self, id: SessionId) -> bool {
        self.retention.is_empty()
            && self.sessions.get(&id).is_some_and(|s| {
                s.peer.is_some() && s.link.is_none() && !s.failed && s.handshake.speaks(4)
            })
    }

    /// Commits every queued push in one transaction, then acknowledges them and relays the
    /// new changes (with deferred syncs: relays at once, acknowledges at [`sync`](Self::sync)).
    /// If the store fails, every queued push is refused (the replicas keep them in their
    /// outboxes) and the error is returned for the operator's logs.
    pub fn flush(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        // Moved, not cloned, into one batch: the group commit's changes, in queue order.
        let queued = std::mem::take(&mut self.queued);
        let mut all: Vec<VerifiedChange> =
            Vec::with_capacity(queued.iter().map(|q| q.changes.len()).sum());
        let mut groups: Vec<(SessionId, Reply, usize, Option<DocId>)> =
            Vec::with_capacity(queued.len());
        for q in queued {
            groups.push((
                q.session,
                q.reply,
                q.changes.len(),
                q.changes.first().map(|c| c.doc().clone()),
            ));
            all.extend(q.changes);
        }
        let cursors = match self.store.append(&all) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "commit failed; refusing the queued pushes");
                for (session, reply, _, doc) in groups {
                    self.metrics.reject("storage");
                    let Reply::Ack(push_id) = reply else {
                        // Changes from a peer hub were not stored: restart that link from its
                        // recorded position rather than skip them.
                        self.fail(session, ErrorCode::StorageUnavailable, e.to_string());
                        continue;
                    };
                    let (Some(doc), Some(s)) = (doc, self.sessions.get_mut(&session)) else {
                        continue;
                    };
                    s.out.push_back(Message::Reject(Reject {
                        push_id,
                        doc,
                        code: ErrorCode::StorageUnavailable,
                        message: format!(
                            "the hub could not store the changes ({e}); they stay in your outbox"
                        ),
                    }));
                    self.ready.insert(session);
                }
                return Err(e);
            }
        };
        self.metrics.commits += 1;
        if cursors.iter().any(|a| matches!(a, Appended::Stored(_))) {
            self.wake_links();
        }

        let mut stored = all.into_iter().zip(cursors);
        for (session, reply, n, doc) in groups {
            let mut fresh: Vec<SignedChange> = Vec::new();
            let mut positions: Vec<u64> = Vec::new();
            let mut first = None;
            let mut last = None;
            // The highest position of the push's changes, stored now or before: the writer's
            // newest acknowledged write (a change sent again after a lost Ack counts too).
            let mut highest: Option<Position> = None;
            let mut conflict = None;
            for (c, appended) in stored.by_ref().take(n) {
                let at = match appended {
                    Appended::Stored(at) => {
                        fresh.push(c.into_signed());
                        positions.push(at.cursor.0);
                        first.get_or_insert(at.cursor);
                        last = Some(at);
                        Some(at)
                    }
                    Appended::Duplicate(at) => {
                        self.metrics.changes_duplicate += 1;
                        Some(at)
                    }
                    Appended::Conflict { existing } => {
                        self.metrics.reject("conflicting_actor_seq");
                        tracing::warn!(
                            doc = %c.doc(),
                            change = %c.hash(),
                            %existing,
                            author = %c.author(),
                            "refused a change that reuses the actor and sequence number of a stored one"
                        );
                        conflict.get_or_insert((c.hash(), existing, c.automerge().seq()));
                        None
                    }
                };
                highest = highest.into_iter().chain(at).max_by_key(|p| p.cursor);
            }
            self.metrics.changes_stored += fresh.len() as u64;
            if let (Some(doc), false) = (&doc, fresh.is_empty()) {
                self.count_for_compaction(doc, fresh.len() as u64);
            }
            let reply = match (reply, conflict, &doc) {
                (Reply::Ack(push_id), Some((hash, existing, seq)), Some(doc)) => {
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.out.push_back(Message::Reject(Reject {
                            push_id,
                            doc: doc.clone(),
                            code: ErrorCode::MalformedChange,
                            message: format!(
                                "change {hash} reuses sequence number {seq} of its actor, \
                                 already used by change {existing}: this store's actor was \
                                 copied (a store must never be cloned while in use)"
                            ),
                        }));
                        self.ready.insert(session);
                    }
                    None
                }
                (reply, _, _) => Some(reply),
            };
            let held = self.store.defers_sync();
            match reply {
                Some(Reply::Ack(push_id)) => {
                    if let Some(s) = self.sessions.get_mut(&session) {
                        // Version 3: where the push's changes are, for the writer to tell a
                        // rolled-back log by (it is not sent its own changes).
                        let message = if s.handshake.speaks(3) {
                            Message::AckAt(wire::AckAt {
                                push_id,
                                at: highest,
                            })
                        } else {
                            Message::Ack(Ack { push_id })
                        };
                        if held {
                            self.held.push(Held::Ack { session, message });
                        } else {
                            s.out.push_back(message);
                            self.ready.insert(session);
                        }
                    }
                }
                Some(Reply::PeerCursor(Some(cursor))) if held => {
                    self.held.push(Held::PeerCursor { session, cursor });
                }
                Some(Reply::PeerCursor(Some(cursor))) => self.record_peer_received(session, cursor),
                Some(Reply::PeerCursor(None)) | None => {}
            }
            match (&mut self.shared, doc, first, last) {
                // Relayed below, in log order with what other instances committed.
                (Some(tail), _, _, _) => {
                    tail.own.extend(positions.iter().map(|p| (*p, session)));
                }
                (None, Some(doc), Some(first), Some(last)) => {
                    self.broadcast(
                        session,
                        &doc,
                        fresh,
                        Cursor(first.0.saturating_sub(1)),
                        last,
                    );
                }
                _ => {}
            }
        }
        if self.shared.is_some() {
            // The commit stands and is acknowledged; a failed relay is retried at the next
            // poll (the tail did not move past what it could not read).
            if let Err(e) = self.poll_store() {
                tracing::warn!(error = %e, "relaying from the shared store failed; retrying");
            }
        }
        Ok(())
    }

    /// A message on a session this hub opened to a peer hub.
    fn handle_link(&mut self, id: SessionId, msg: Message) -> Result<()> {
        let closed = || ProtocolError::Unexpected {
            message: "message",
            state: "on a closed link",
        };
        let s = self.sessions.get_mut(&id).ok_or_else(closed)?;
        match msg {
            Message::Hello(h) => {
                let auth = s.handshake.on_hello(h)?;
                s.out.push_back(auth);
            }
            Message::Auth(a) => {
                let peer = s.handshake.on_auth(a)?;
                let peer_epoch = s.handshake.their_epoch().unwrap_or_else(Epoch::none);
                let state = self.store.peer_state(&peer)?;
                let s = self.sessions.get_mut(&id).ok_or_else(closed)?;
                s.peer = Some(peer);
                let link = s.link.as_mut().ok_or_else(closed)?;
                link.peer_epoch = peer_epoch;
                link.ready = true;
                // Positions from another epoch of the peer's log mean nothing: start over
                // (everything sent again is deduplicated by hash on both sides).
                link.sent_upto = if state.push_epoch == peer_epoch {
                    state.pushed
                } else {
                    Cursor(0)
                };
                let (epoch, cursor) = if state.recv_epoch == peer_epoch {
                    (peer_epoch, state.recv_cursor)
                } else {
                    (Epoch::none(), Cursor(0))
                };
                s.out.push_back(Message::Subscribe(wire::Subscribe {
                    target: Target::Prefix(crate::ids::DocPrefix::all()),
                    epoch,
                    cursor,
                }));
                self.metrics.sessions_opened += 1;
                tracing::info!(session = id, %peer, "linked to peer hub");
            }
            _ if s.peer.is_none() => {
                return Err(ProtocolError::Unexpected {
                    message: msg.kind(),
                    state: "during the handshake",
                }
                .into());
            }
            // (Links speak version 1: a ChangesAt is refused below, as any message out of place.)
            Message::Changes(c) => {
                let mut verified = change::verify_batch(&c.doc, c.changes)?;
                if self.expired_under(&c.doc).is_some() {
                    // Past retention here: not stored again, but the position moves on.
                    verified.clear();
                }
                let cursor = c.cursor.map(|(_, cursor)| cursor);
                self.queued.push(QueuedPush {
                    session: id,
                    reply: Reply::PeerCursor(cursor),
                    changes: verified,
                });
            }
            Message::CaughtUp(c) => {
                // Recorded after the changes queued before it are committed.
                self.queued.push(QueuedPush {
                    session: id,
                    reply: Reply::PeerCursor(Some(c.cursor)),
                    changes: Vec::new(),
                });
            }
            Message::Ack(a) => {
                let peer = s.peer.ok_or_else(closed)?;
                let link = s.link.as_mut().ok_or_else(closed)?;
                if let Some(pushed) = link.inflight.remove(&a.push_id) {
                    let push_epoch = link.peer_epoch;
                    let mut state = self.store.peer_state(&peer)?;
                    state.push_epoch = push_epoch;
                    state.pushed = pushed;
                    self.store.set_peer_state(&peer, &state)?;
                }
            }
            Message::Reject(r) if r.code == ErrorCode::Expired => {
                // The peer's retention dropped that bucket already: nothing to fix.
                tracing::debug!(session = id, doc = %r.doc, "the peer hub has expired a bucket");
                if let Some(link) = s.link.as_mut() {
                    link.inflight.remove(&r.push_id);
                }
            }
            Message::Reject(r) => {
                // The peer refused part of our log (most likely: this hub lacks the relay
                // right there). It is skipped, loudly; the operator fixes the grant.
                self.metrics.reject("peer_refused");
                tracing::error!(session = id, doc = %r.doc, code = ?r.code, message = %r.message,
                    "the peer hub refused changes; grant this hub's key hub rights on the peer");
                if let Some(link) = s.link.as_mut() {
                    link.inflight.remove(&r.push_id);
                }
            }
            Message::Heads(_) | Message::Reconciled(_) => {
                // Never asked for: the link subscribes with the peer's own epoch or none.
            }
            Message::Error(e) => {
                return Err(ProtocolError::from(e).into());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    message: other.kind(),
                    state: "from a peer hub",
                }
                .into());
            }
        }
        self.ready.insert(id);
        Ok(())
    }

    fn record_peer_received(&mut self, id: SessionId, cursor: Cursor) {
        let Some((peer, epoch)) = self
            .sessions
            .get(&id)
            .and_then(|s| Some((s.peer?, s.link.as_ref()?.peer_epoch)))
        else {
            return;
        };
        let result = self.store.peer_state(&peer).and_then(|mut state| {
            if state.recv_epoch != epoch {
                state.recv_epoch = epoch;
                state.recv_cursor = Cursor(0);
            }
            state.recv_cursor = state.recv_cursor.max(cursor);
            self.store.set_peer_state(&peer, &state)
        });
        if let Err(e) = result {
            // Not fatal: the changes are stored; the link would only receive them again.
            tracing::warn!(%peer, error = %e, "could not record the peer's position");
        }
    }

    /// The next push of this hub's log to a peer hub.
    fn poll_link(&mut self, id: SessionId) -> Result<Option<Message>> {
        let Some(link) = self.sessions.get(&id).and_then(|s| s.link.as_ref()) else {
            return Ok(None);
        };
        if !link.ready || link.inflight.len() >= 8 {
            return Ok(None);
        }
        let from = link.sent_upto;
        let batch =
            self.store
                .read_log(&Target::Prefix(crate::ids::DocPrefix::all()), from, 256)?;
        let Some(first) = batch.entries.first() else {
            return Ok(None);
        };
        let doc = first.doc.clone();
        let mut changes = Vec::new();
        let mut last = from;
        let mut bytes = 0;
        for e in batch.entries.into_iter().take_while(|e| e.doc == doc) {
            if !changes.is_empty() && bytes + e.change.bytes.len() > MAX_MESSAGE_BYTES {
                break;
            }
            bytes += e.change.bytes.len();
            last = e.cursor;
            changes.push(e.change);
        }
        let Some(link) = self.sessions.get_mut(&id).and_then(|s| s.link.as_mut()) else {
            return Ok(None);
        };
        let push_id = link.next_push;
        link.next_push += 1;
        link.sent_upto = last;
        link.inflight.insert(push_id, last);
        self.metrics.changes_sent += changes.len() as u64;
        Ok(Some(Message::Push(wire::Push {
            push_id,
            doc,
            changes,
        })))
    }

    /// Relays `changes` of `doc`, stored at positions after `from` up to `at`, to every
    /// live subscriber allowed to read it but `author` (0: none).
    fn broadcast(
        &mut self,
        author: SessionId,
        doc: &DocId,
        changes: Vec<SignedChange>,
        from: Cursor,
        at: Position,
    ) {
        for (&id, s) in self.sessions.iter_mut() {
            let Some(peer) = s.peer else { continue };
            if id == author || s.failed || !self.policy.may_read(&peer, doc) {
                continue;
            }
            let mut target_used: Option<Target> = None;
            let mut fallback = false;
            for (target, state) in s.subs.iter_mut() {
                if !matches!(state, SubState::Live) || !target.covers(doc) {
                    continue;
                }
                if s.out.len() >= MAX_QUEUED_MESSAGES {
                    // Too slow to take live changes: read them from the log when it catches up.
                    // (From the position before the first: positions can have gaps, so
                    // counting back from the last could skip some.)
                    *state = SubState::CatchUp { from };
                    fallback = true;
                } else if target_used.is_none() {
                    target_used = Some(target.clone());
                }
            }
            if fallback {
                self.metrics.slow_fallbacks += 1;
            }
            if let Some(target) = target_used {
                self.metrics.changes_sent += changes.len() as u64;
                s.out.push_back(changes_message(
                    s.handshake.speaks(4),
                    doc.clone(),
                    changes.clone(),
                    Some((target, at)),
                ));
                self.ready.insert(id);
            }
        }
    }

    /// Snapshots to send in place of runs of one catch-up read, to a session that takes them
    /// (version 2): for a document with many changes in the read whose stored snapshot (of
    /// this log) covers positions the replica lacks, when the snapshot is smaller than half
    /// the changes it replaces would be. The session then skips those changes.
    fn snapshots_for(
        &mut self,
        id: SessionId,
        peer: &PeerId,
        from: Cursor,
        entries: &[crate::store::LogEntry],
        epoch: Epoch,
    ) -> Result<Vec<Message>> {
        let Some(s) = self.sessions.get(&id) else {
            return Ok(Vec::new());
        };
        if !s.handshake.speaks(2) || s.covered.len() >= MAX_SNAPSHOTS_PER_SESSION {
            return Ok(Vec::new());
        }
        let mut runs: HashMap<&DocId, usize> = HashMap::new();
        for e in entries {
            if !s.covered.contains_key(&e.doc) {
                *runs.entry(&e.doc).or_default() += 1;
            }
        }
        let mut candidates: Vec<DocId> = runs
            .into_iter()
            .filter(|(d, n)| *n >= SNAPSHOT_MIN_RUN && self.policy.may_read(peer, d))
            .map(|(d, _)| d.clone())
            .collect();
        candidates.sort();
        let mut out = Vec::new();
        for doc in candidates {
            let Some(meta) = self.store.snapshot_meta(&doc)? else {
                continue;
            };
            if meta.epoch != epoch || meta.upto <= from || meta.bytes > MAX_SNAPSHOT_BYTES as u64 {
                continue;
            }
            let behind = self.store.count_changes(&doc, from, meta.upto)?;
            if behind.saturating_mul(CHANGE_WIRE_BYTES) < meta.bytes.saturating_mul(2) {
                continue;
            }
            let Some(snap) = self.store.snapshot(&doc)? else {
                continue;
            };
            if snap.epoch != epoch || snap.snapshot.signed.len() > MAX_SNAPSHOT_HEADS {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(&id) {
                s.covered.insert(doc.clone(), snap.upto);
            }
            self.metrics.snapshots_sent += 1;
            out.push(Message::Snapshot(SnapshotMessage {
                doc,
                snapshot: snap.snapshot,
            }));
        }
        Ok(out)
    }

    /// The next message for a session: queued ones first, then catch-up and repair work read
    /// from the store. Poll it while the connection can take more.
    pub fn poll_transmit(&mut self, id: SessionId) -> Result<Option<Message>> {
        // A step can yield nothing while work is left (a read whose changes were all skipped:
        // unreadable documents, or covered by a snapshot sent): take a few more.
        for _ in 0..64 {
            if let Some(m) = self.poll_step(id)? {
                return Ok(Some(m));
            }
            if self.is_idle(id) {
                break;
            }
        }
        Ok(None)
    }

    fn poll_step(&mut self, id: SessionId) -> Result<Option<Message>> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(None);
        };
        if let Some(m) = s.out.pop_front() {
            return Ok(Some(m));
        }
        if s.failed {
            return Ok(None);
        }
        if s.link.is_some() {
            return self.poll_link(id);
        }
        let Some(peer) = s.peer else { return Ok(None) };
        if let Some((doc, have)) = s.reconciles.pop_front() {
            if self.policy.may_read(&peer, &doc) {
                let changes = self.store.changes_not_covered(&doc, &have)?;
                let s = self
                    .sessions
                    .get_mut(&id)
                    .ok_or(ProtocolError::Unexpected {
                        message: "Reconcile",
                        state: "closed",
                    })?;
                self.metrics.changes_sent += changes.len() as u64;
                for chunk in chunk_changes(changes) {
                    s.out.push_back(Message::Changes(Changes {
                        doc: doc.clone(),
                        changes: chunk,
                        cursor: None,
                    }));
                }
            } else {
                self.metrics.reject("read_denied");
            }
            if let Some(s) = self.sessions.get_mut(&id) {
                s.out.push_back(Message::Reconciled(Reconciled { doc }));
            }
            return Ok(self.sessions.get_mut(&id).and_then(|s| s.out.pop_front()));
        }
        let work = s
            .subs
            .iter()
            .find(|(_, st)| !matches!(st, SubState::Live))
            .map(|(t, st)| (t.clone(), st.clone()));
        let Some((target, state)) = work else {
            return Ok(None);
        };
        let next_state = match state {
            SubState::Reset { after, then } => {
                let docs = self.store.docs_page(&target, after.as_ref(), HEADS_BATCH)?;
                let mut out = Vec::new();
                for d in &docs {
                    if self.policy.may_read(&peer, d) {
                        let h = self.store.heads(d)?;
                        // Too many heads to list: send none and ask for a full reconcile.
                        let listable = h.heads.len() <= wire::MAX_HEADS;
                        out.push(Message::Heads(Heads {
                            doc: d.clone(),
                            heads: if listable { h.heads } else { Vec::new() },
                            complete: h.complete && listable,
                        }));
                    }
                }
                let s = self
                    .sessions
                    .get_mut(&id)
                    .ok_or(ProtocolError::Unexpected {
                        message: "Heads",
                        state: "closed",
                    })?;
                s.out.extend(out);
                match docs.last() {
                    Some(last) => SubState::Reset {
                        after: Some(last.clone()),
                        then,
                    },
                    None => SubState::CatchUp { from: then },
                }
            }
            SubState::CatchUp { from } => {
                let batch = self.store.read_log(&target, from, CATCH_UP_BATCH)?;
                let epoch = self.store.epoch();
                let mut out = self.snapshots_for(id, &peer, from, &batch.entries, epoch)?;
                let covered = self
                    .sessions
                    .get(&id)
                    .map(|s| s.covered.clone())
                    .unwrap_or_default();
                let mut group: Option<(DocId, Vec<SignedChange>, Position, usize)> = None;
                let mut sent = 0u64;
                // A subscription repaired after a rollback moves no cursor until its CaughtUpAt:
                // a session cut before it must repair again, not resume from a mark of the
                // new log past the positions it was repairing.
                let repairing = self
                    .sessions
                    .get(&id)
                    .is_some_and(|s| s.rolled_back.contains(&target));
                // The change at the read's end, when the read holds it (a CaughtUpAt's mark).
                let last_mark = batch
                    .entries
                    .last()
                    .filter(|e| e.cursor == batch.next)
                    .map(mark_of);
                let at_marks = self
                    .sessions
                    .get(&id)
                    .is_some_and(|s| s.handshake.speaks(4));
                let message = |doc, changes, at: Position| {
                    changes_message(
                        at_marks,
                        doc,
                        changes,
                        (!repairing).then(|| (target.clone(), at)),
                    )
                };
                for e in batch.entries {
                    if !self.policy.may_read(&peer, &e.doc)
                        || covered.get(&e.doc).is_some_and(|upto| e.cursor <= *upto)
                    {
                        continue;
                    }
                    sent += 1;
                    let size = e.change.bytes.len();
                    let at = Position {
                        cursor: e.cursor,
                        mark: mark_of(&e),
                    };
                    match &mut group {
                        Some((d, v, c, bytes))
                            if *d == e.doc
                                && v.len() < wire::MAX_CHANGES_PER_DELTA
                                && *bytes + size <= MAX_MESSAGE_BYTES =>
                        {
                            v.push(e.change);
                            *c = at;
                            *bytes += size;
                        }
                        _ => {
                            if let Some((d, v, c, _)) = group.take() {
                                out.push(message(d, v, c));
                            }
                            group = Some((e.doc, vec![e.change], at, size));
                        }
                    }
                }
                if let Some((d, v, c, _)) = group.take() {
                    out.push(message(d, v, c));
                }
                self.metrics.changes_sent += sent;
                let next = if batch.at_end {
                    let (marks, rolled_back) = match self.sessions.get_mut(&id) {
                        Some(s) => (s.handshake.speaks(3), s.rolled_back.remove(&target)),
                        None => (false, false),
                    };
                    out.push(if marks {
                        let mark = match last_mark {
                            Some(m) => Some(m),
                            None => self.entry_at(batch.next)?.as_ref().map(mark_of),
                        };
                        Message::CaughtUpAt(Box::new(CaughtUpAt {
                            target: target.clone(),
                            epoch,
                            cursor: batch.next,
                            mark,
                            rolled_back,
                        }))
                    } else {
                        Message::CaughtUp(CaughtUp {
                            target: target.clone(),
                            epoch,
                            cursor: batch.next,
                        })
                    });
                    SubState::Live
                } else {
                    // A subscription to the one document a snapshot covers reads on from the
                    // snapshot's position: every entry before it is covered.
                    let from = match &target {
                        Target::Doc(d) => {
                            covered.get(d).map_or(batch.next, |u| (*u).max(batch.next))
                        }
                        Target::Prefix(_) => batch.next,
                    };
                    SubState::CatchUp { from }
                };
                let s = self
                    .sessions
                    .get_mut(&id)
                    .ok_or(ProtocolError::Unexpected {
                        message: "Changes",
                        state: "closed",
                    })?;
                s.out.extend(out);
                next
            }
            SubState::Live => SubState::Live,
        };
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(ProtocolError::Unexpected {
                message: "poll",
                state: "closed",
            })?;
        s.subs.insert(target, next_state);
        Ok(s.out.pop_front())
    }

    /// Whether a session has nothing left to send right now (no queue, no catch-up work).
    pub fn is_idle(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_none_or(|s| {
            s.out.is_empty()
                && (s.failed
                    || (s.reconciles.is_empty()
                        && s.subs.values().all(|st| matches!(st, SubState::Live))))
        })
    }

    /// Whether pushes are waiting for [`Hub::flush`].
    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }
}

/// The log's mark at an entry: its chain, or (in a store not chained yet) its signature, the
/// mark of version 3.
fn mark_of(e: &crate::store::LogEntry) -> Mark {
    e.chain.unwrap_or(Mark(e.change.signature))
}

/// Changes of `doc` for a subscriber: with the mark of the position reached to a session of
/// version 4 (`ChangesAt`), without it before.
fn changes_message(
    marks: bool,
    doc: DocId,
    changes: Vec<SignedChange>,
    cursor: Option<(Target, Position)>,
) -> Message {
    match cursor {
        Some((target, at)) if marks => Message::ChangesAt(Box::new(wire::ChangesAt {
            changes: Changes {
                doc,
                changes,
                cursor: Some((target, at.cursor)),
            },
            mark: at.mark,
        })),
        cursor => Message::Changes(Changes {
            doc,
            changes,
            cursor: cursor.map(|(t, at)| (t, at.cursor)),
        }),
    }
}

fn chunk_changes(changes: Vec<SignedChange>) -> Vec<Vec<SignedChange>> {
    let mut out: Vec<Vec<SignedChange>> = Vec::new();
    let mut bytes = 0;
    for c in changes {
        let size = c.bytes.len();
        match out.last_mut() {
            Some(last)
                if last.len() < wire::MAX_CHANGES_PER_DELTA
                    && bytes + size <= MAX_MESSAGE_BYTES =>
            {
                bytes += size;
                last.push(c);
            }
            _ => {
                bytes = size;
                out.push(vec![c]);
            }
        }
    }
    out
}

#[cfg(any(test, feature = "testing"))]
pub mod suite;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::suite::{connect, ops, pump, replica};
    use super::*;
    use crate::replica::Replica;
    use crate::store::SqliteHubStore;

    /// The hub suite on the embedded store.
    mod sqlite {
        crate::hub_suite!(|| Box::new(crate::store::SqliteHubStore::open_in_memory().unwrap()));
    }

    /// `hub_suite!` names its cases by hand: every public case of the suite is in its list
    /// (a case left out would run on no store), and nothing else.
    #[test]
    fn the_suite_macro_lists_every_case() {
        let source = include_str!("hub/suite.rs");
        let mut cases: Vec<&str> = source
            .lines()
            .filter_map(|l| {
                let (name, args) = l.strip_prefix("pub fn ")?.split_once('(')?;
                args.starts_with(')').then_some(name)
            })
            .collect();
        let (_, list) = source.split_once("@cases $make; ").unwrap();
        let (list, _) = list.split_once(");").unwrap();
        let mut listed: Vec<&str> = list.split(',').map(str::trim).collect();
        cases.sort_unstable();
        listed.sort_unstable();
        assert_eq!(cases.len(), 19);
        assert_eq!(cases, listed);
    }

    #[test]
    fn two_hub_instances_on_one_store_relay_each_others_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let open = || {
            let mut h = Hub::new(
                Identity::generate(),
                SqliteHubStore::open(&path).unwrap(),
                AllowAll,
                None,
            );
            h.share_store().unwrap();
            h
        };
        let (mut one, mut two) = (open(), open());
        let (mut a, mut b) = (replica(), replica());
        let doc = DocId::new("shared/d").unwrap();
        for r in [&mut a, &mut b] {
            r.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
        }
        let sa = connect(&mut one, &mut a);
        let sb = connect(&mut two, &mut b);
        let settle = |one: &mut MemHub, two: &mut MemHub, a: &mut Replica, b: &mut Replica| {
            for _ in 0..20 {
                pump(one, &mut [(&mut *a, sa)]);
                pump(two, &mut [(&mut *b, sb)]);
                let moved = one.poll_store().unwrap() + two.poll_store().unwrap();
                if moved == 0 && one.is_idle(sa) && two.is_idle(sb) {
                    return;
                }
            }
            panic!("did not settle");
        };
        settle(&mut one, &mut two, &mut a, &mut b);
        a.change(
            &doc,
            &ops(json!([{"op":"put","path":["n"],"value":{"$counter":0}}])),
        )
        .unwrap();
        settle(&mut one, &mut two, &mut a, &mut b);
        // Live: each replica writes through its own instance; the other instance relays it.
        for i in 0..50 {
            let r = if i % 2 == 0 { &mut a } else { &mut b };
            r.change(&doc, &ops(json!([{"op":"increment","path":["n"],"by":1}])))
                .unwrap();
            pump(&mut one, &mut [(&mut a, sa)]);
            pump(&mut two, &mut [(&mut b, sb)]);
        }
        settle(&mut one, &mut two, &mut a, &mut b);
        assert_eq!(a.json(&doc).unwrap(), json!({"n": 50}));
        assert_eq!(b.json(&doc).unwrap(), json!({"n": 50}));
        assert_eq!(a.doc(&doc).unwrap().heads(), b.doc(&doc).unwrap().heads());
        // Each instance relayed the other's commits once, never its own back.
        assert_eq!(a.status().unwrap().outbox, 0);
        assert_eq!(one.store().last_cursor().unwrap(), Cursor(51));
        // Relays follow the log's order, an instance's own commits too: a replica on `one`
        // never gets a position from `one` before the lower ones `two` committed (or its
        // cursor would pass them, and resuming elsewhere would skip them).
        let mut watcher = replica();
        watcher.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
        let sw = connect(&mut one, &mut watcher);
        pump(&mut one, &mut [(&mut watcher, sw)]);
        b.change(
            &doc,
            &ops(json!([{"op":"put","path":["from_b"],"value":1}])),
        )
        .unwrap();
        pump(&mut two, &mut [(&mut b, sb)]); // committed; `one` has not looked yet
        a.change(
            &doc,
            &ops(json!([{"op":"put","path":["from_a"],"value":1}])),
        )
        .unwrap();
        pump(&mut one, &mut [(&mut a, sa), (&mut watcher, sw)]);
        let seen = watcher.json(&doc).unwrap();
        assert_eq!(
            (&seen["from_a"], &seen["from_b"]),
            (&json!(1), &json!(1)),
            "{seen}"
        );
        settle(&mut one, &mut two, &mut a, &mut b);

        // A third replica catching up through either instance finds the whole log.
        let mut c = replica();
        c.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
        let sc = connect(&mut two, &mut c);
        pump(&mut two, &mut [(&mut c, sc)]);
        assert_eq!(
            c.json(&doc).unwrap(),
            json!({"n": 50, "from_a": 1, "from_b": 1})
        );
        assert!(
            one.shared.as_ref().unwrap().own.is_empty(),
            "own positions are forgotten"
        );
    }

    type MemHub = Hub<SqliteHubStore, AllowAll>;

    fn mem_hub() -> MemHub {
        Hub::new(
            Identity::generate(),
            SqliteHubStore::open_in_memory().unwrap(),
            AllowAll,
            None,
        )
    }

    fn pump_once(hub: &mut MemHub, reps: &mut [(&mut Replica, SessionId)]) -> bool {
        super::suite::pump_step(hub, reps, &mut Vec::new())
    }

    /// Moves messages on a link between two hubs and between each hub and its replicas.
    fn pump_two(
        a: &mut MemHub,
        b: &mut MemHub,
        link: Option<(SessionId, SessionId)>,
        on_a: &mut [(&mut Replica, SessionId)],
        on_b: &mut [(&mut Replica, SessionId)],
    ) {
        for _ in 0..10_000 {
            let mut moved = false;
            if let Some((la, lb)) = link {
                while let Ok(Some(m)) = a.poll_transmit(la) {
                    moved = true;
                    let _ = b.handle_message(lb, m);
                }
                b.flush().unwrap();
                while let Ok(Some(m)) = b.poll_transmit(lb) {
                    moved = true;
                    let _ = a.handle_message(la, m);
                }
                a.flush().unwrap();
            }
            moved |= pump_once(a, on_a);
            moved |= pump_once(b, on_b);
            if !moved {
                return;
            }
        }
        panic!("did not settle");
    }

    #[test]
    fn two_peered_hubs_serve_the_same_data_set() {
        let dir = tempfile::tempdir().unwrap();
        let path_b = dir.path().join("b.db");
        let mut a = mem_hub();
        let b_id = Identity::generate();
        let mut b = Hub::new(
            b_id.clone(),
            SqliteHubStore::open(&path_b).unwrap(),
            AllowAll,
            None,
        );
        let mut ra = replica();
        let mut rb = replica();
        for r in [&mut ra, &mut rb] {
            r.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
        }
        let doc = DocId::new("plant/line").unwrap();
        ra.change(
            &doc,
            &ops(json!([{"op":"put","path":["a"],"value":{"$counter":1}}])),
        )
        .unwrap();
        rb.change(
            &DocId::new("plant/other").unwrap(),
            &ops(json!([{"op":"put","path":["b"],"value":2}])),
        )
        .unwrap();
        let sa = connect(&mut a, &mut ra);
        let sb = connect(&mut b, &mut rb);
        let lb = b.accept();
        let la = a.connect_peer(Some(b.peer_id()), [0; 32]);
        pump_two(
            &mut a,
            &mut b,
            Some((la, lb)),
            &mut [(&mut ra, sa)],
            &mut [(&mut rb, sb)],
        );
        // Each edge sees the other's document through its own hub.
        assert_eq!(rb.json(&doc).unwrap(), json!({"a": 1}));
        // A peer hub, either side of the link, is sent only what is synced; replicas that
        // check marks may be sent more.
        assert!(!a.relays_unsynced(la) && !b.relays_unsynced(lb));
        assert!(a.relays_unsynced(sa) && b.relays_unsynced(sb));
        // Nor to any session of a hub that runs retention.
        b.set_retention(vec![
            crate::rolling::Retention::new(DocPrefix::new("logs/").unwrap(), 3600).unwrap(),
        ]);
        assert!(!b.relays_unsynced(sb));
        b.set_retention(Vec::new());
        assert_eq!(
            ra.json(&DocId::new("plant/other").unwrap()).unwrap(),
            json!({"b": 2})
        );
        // Live changes cross too.
        ra.change(&doc, &ops(json!([{"op":"increment","path":["a"],"by":5}])))
            .unwrap();
        rb.change(&doc, &ops(json!([{"op":"increment","path":["a"],"by":7}])))
            .unwrap();
        pump_two(
            &mut a,
            &mut b,
            Some((la, lb)),
            &mut [(&mut ra, sa)],
            &mut [(&mut rb, sb)],
        );
        assert_eq!(ra.json(&doc).unwrap(), json!({"a": 13}));
        assert_eq!(ra.doc(&doc).unwrap().heads(), rb.doc(&doc).unwrap().heads());
        assert_eq!(
            a.store().change_count().unwrap(),
            b.store().change_count().unwrap()
        );
        let stored = a.store().change_count().unwrap();
        assert_eq!(stored, 4);

        // Hub B loses everything (a new, empty store: a new epoch). The link notices the epoch
        // change and pushes A's whole log again; B's edge repairs itself from B.
        drop(b);
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path_b.display()));
        }
        let mut b = Hub::new(b_id, SqliteHubStore::open(&path_b).unwrap(), AllowAll, None);
        assert_eq!(b.store().change_count().unwrap(), 0);
        rb.disconnect();
        let sb = connect(&mut b, &mut rb);
        let lb = b.accept();
        a.close(la);
        let la = a.connect_peer(Some(b.peer_id()), [0; 32]);
        pump_two(
            &mut a,
            &mut b,
            Some((la, lb)),
            &mut [(&mut ra, sa)],
            &mut [(&mut rb, sb)],
        );
        assert_eq!(b.store().change_count().unwrap(), stored);
        rb.change(
            &doc,
            &ops(json!([{"op":"increment","path":["a"],"by":100}])),
        )
        .unwrap();
        pump_two(
            &mut a,
            &mut b,
            Some((la, lb)),
            &mut [(&mut ra, sa)],
            &mut [(&mut rb, sb)],
        );
        assert_eq!(ra.json(&doc).unwrap(), json!({"a": 113}));
        assert_eq!(ra.doc(&doc).unwrap().heads(), rb.doc(&doc).unwrap().heads());
    }

    #[test]
    fn histograms_bucket_and_accumulate() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.cumulative(), vec![(0.1, 2), (1.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 3.65).abs() < 1e-9);
    }
}
