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
use crate::ids::{ChangeHash, Cursor, DocId, Epoch, PeerId};
use crate::protocol::Handshake;
use crate::store::HubStore;
use crate::wire::{
    self, Ack, CaughtUp, Changes, ErrorCode, ErrorMessage, Heads, Message, Reject, Role, Target,
};

/// Identifies a connection to the hub.
pub type SessionId = u64;

/// Subscriptions one session may hold.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
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

/// Who may do what. The hub checks it on every operation, so a change to the policy (a
/// revoked grant) holds for live sessions at once.
pub trait Policy {
    /// Whether an authenticated key may open a session at all.
    fn may_connect(&self, peer: &PeerId) -> bool;
    /// Whether `peer` may receive `doc`.
    fn may_read(&self, peer: &PeerId, doc: &DocId) -> bool;
    /// Whether changes authored by `author` may be stored in `doc`.
    fn may_write(&self, author: &PeerId, doc: &DocId) -> bool;
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
    reconciles: VecDeque<(DocId, Vec<ChangeHash>)>,
    failed: bool,
}

struct QueuedPush {
    session: SessionId,
    push_id: u64,
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
    ready: BTreeSet<SessionId>,
    metrics: HubMetrics,
    rng: StdRng,
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
            ready: BTreeSet::new(),
            metrics: HubMetrics::default(),
            rng: rng_seed.map_or_else(StdRng::from_entropy, StdRng::seed_from_u64),
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

    /// The authenticated peer of a session.
    pub fn session_peer(&self, id: SessionId) -> Option<PeerId> {
        self.sessions.get(&id).and_then(|s| s.peer)
    }

    /// A new connection: returns its id; its first message (Hello) is ready to send.
    pub fn accept(&mut self) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        let nonce: [u8; 32] = self.rng.r#gen();
        let (handshake, hello) =
            Handshake::start(self.identity.clone(), Role::Hub, Role::Replica, None, nonce);
        self.sessions.insert(
            id,
            HubSession {
                handshake,
                peer: None,
                out: VecDeque::from([hello]),
                subs: BTreeMap::new(),
                reconciles: VecDeque::new(),
                failed: false,
            },
        );
        self.ready.insert(id);
        id
    }

    /// The connection ended.
    pub fn close(&mut self, id: SessionId) {
        self.sessions.remove(&id);
        self.queued.retain(|q| q.session != id);
        self.ready.remove(&id);
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
        if let Err(e) = &result {
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

    fn fail(&mut self, id: SessionId, code: ErrorCode, mut message: String) {
        self.metrics.reject(match code {
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::VersionMismatch => "version",
            ErrorCode::LimitExceeded => "limit",
            _ => "protocol",
        });
        if let Some(s) = self.sessions.get_mut(&id) {
            message.truncate(wire::MAX_ERROR_TEXT);
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
            Message::Subscribe(sub) => {
                if !s.subs.contains_key(&sub.target) && s.subs.len() >= MAX_SUBSCRIPTIONS {
                    return Err(ProtocolError::Limit(format!(
                        "over {MAX_SUBSCRIPTIONS} subscriptions"
                    ))
                    .into());
                }
                let epoch = self.store.epoch();
                let state = if sub.epoch == epoch {
                    SubState::CatchUp { from: sub.cursor }
                } else if sub.epoch == Epoch::none() {
                    SubState::CatchUp { from: Cursor(0) }
                } else {
                    SubState::Reset {
                        after: None,
                        then: self.store.last_cursor()?,
                    }
                };
                let s = self
                    .sessions
                    .get_mut(&id)
                    .ok_or(ProtocolError::Unexpected {
                        message: "Subscribe",
                        state: "closed",
                    })?;
                s.subs.insert(sub.target, state);
                self.ready.insert(id);
            }
            Message::Push(push) => {
                let verified = match change::verify_batch(&push.doc, push.changes) {
                    Ok(v) => v,
                    Err(e) => {
                        let (code, why) = match e {
                            ChangeError::BadSignature { .. } => {
                                (ErrorCode::BadSignature, "bad_signature")
                            }
                            _ => (ErrorCode::MalformedChange, "malformed_change"),
                        };
                        self.metrics.reject(why);
                        tracing::warn!(session = id, %peer, error = %e, "refused a push");
                        s.out.push_back(Message::Reject(Reject {
                            push_id: push.push_id,
                            doc: push.doc,
                            code,
                            message: e.to_string(),
                        }));
                        self.ready.insert(id);
                        return Ok(());
                    }
                };
                if let Some(c) = verified
                    .iter()
                    .find(|c| !self.policy.may_write(&c.author(), &push.doc))
                {
                    self.metrics.reject("not_authorized");
                    let message = format!(
                        "key {} may not write {}; ask the hub operator for a write grant",
                        c.author(),
                        push.doc
                    );
                    s.out.push_back(Message::Reject(Reject {
                        push_id: push.push_id,
                        doc: push.doc,
                        code: ErrorCode::NotAuthorized,
                        message,
                    }));
                    self.ready.insert(id);
                    return Ok(());
                }
                self.queued.push(QueuedPush {
                    session: id,
                    push_id: push.push_id,
                    changes: verified,
                });
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
                return Err(ProtocolError::Closed {
                    code: e.code as u16,
                    message: e.message,
                }
                .into());
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

    /// Commits every queued push in one transaction, then acknowledges them and relays the
    /// new changes. If the store fails, every queued push is refused (the replicas keep them
    /// in their outboxes) and the error is returned for the operator's logs.
    pub fn flush(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut self.queued);
        let all: Vec<VerifiedChange> = queued
            .iter()
            .flat_map(|q| q.changes.iter().cloned())
            .collect();
        let cursors = match self.store.append(&all) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "commit failed; refusing the queued pushes");
                for q in queued {
                    self.metrics.reject("storage");
                    if let Some(s) = self.sessions.get_mut(&q.session) {
                        let doc = q.changes[0].doc().clone();
                        s.out.push_back(Message::Reject(Reject {
                            push_id: q.push_id,
                            doc,
                            code: ErrorCode::StorageUnavailable,
                            message: format!("the hub could not store the changes ({e}); they stay in your outbox"),
                        }));
                        self.ready.insert(q.session);
                    }
                }
                return Err(e);
            }
        };
        self.metrics.commits += 1;
        let mut cursors = cursors.into_iter();
        for q in queued {
            let mut fresh: Vec<(Cursor, SignedChange)> = Vec::new();
            for c in &q.changes {
                match cursors.next().flatten() {
                    Some(cursor) => fresh.push((cursor, c.signed().clone())),
                    None => self.metrics.changes_duplicate += 1,
                }
            }
            self.metrics.changes_stored += fresh.len() as u64;
            if let Some(s) = self.sessions.get_mut(&q.session) {
                s.out.push_back(Message::Ack(Ack { push_id: q.push_id }));
                self.ready.insert(q.session);
            }
            if let (Some(first), Some((last, _))) = (q.changes.first(), fresh.last()) {
                let doc = first.doc().clone();
                let last = *last;
                self.broadcast(
                    q.session,
                    &doc,
                    fresh.into_iter().map(|(_, c)| c).collect(),
                    last,
                );
            }
        }
        Ok(())
    }

    fn broadcast(
        &mut self,
        author: SessionId,
        doc: &DocId,
        changes: Vec<SignedChange>,
        cursor: Cursor,
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
                    *state = SubState::CatchUp {
                        from: Cursor(cursor.0.saturating_sub(changes.len() as u64)),
                    };
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
                s.out.push_back(Message::Changes(Changes {
                    doc: doc.clone(),
                    changes: changes.clone(),
                    cursor: Some((target, cursor)),
                }));
                self.ready.insert(id);
            }
        }
    }

    /// The next message for a session: queued ones first, then catch-up and repair work read
    /// from the store. Poll it while the connection can take more.
    pub fn poll_transmit(&mut self, id: SessionId) -> Result<Option<Message>> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(None);
        };
        if let Some(m) = s.out.pop_front() {
            return Ok(Some(m));
        }
        if s.failed {
            return Ok(None);
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
                        out.push(Message::Heads(Heads {
                            doc: d.clone(),
                            heads: self.store.heads(d)?,
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
                let mut out: Vec<Message> = Vec::new();
                let mut group: Option<(DocId, Vec<SignedChange>, Cursor, usize)> = None;
                let mut sent = 0u64;
                for e in batch.entries {
                    if !self.policy.may_read(&peer, &e.doc) {
                        continue;
                    }
                    sent += 1;
                    let size = e.change.bytes.len();
                    match &mut group {
                        Some((d, v, c, bytes))
                            if *d == e.doc
                                && v.len() < wire::MAX_CHANGES_PER_DELTA
                                && *bytes + size <= MAX_MESSAGE_BYTES =>
                        {
                            v.push(e.change);
                            *c = e.cursor;
                            *bytes += size;
                        }
                        _ => {
                            if let Some((d, v, c, _)) = group.take() {
                                out.push(Message::Changes(Changes {
                                    doc: d,
                                    changes: v,
                                    cursor: Some((target.clone(), c)),
                                }));
                            }
                            group = Some((e.doc, vec![e.change], e.cursor, size));
                        }
                    }
                }
                if let Some((d, v, c, _)) = group.take() {
                    out.push(Message::Changes(Changes {
                        doc: d,
                        changes: v,
                        cursor: Some((target.clone(), c)),
                    }));
                }
                self.metrics.changes_sent += sent;
                let next = if batch.at_end {
                    out.push(Message::CaughtUp(CaughtUp {
                        target: target.clone(),
                        epoch,
                        cursor: batch.next,
                    }));
                    SubState::Live
                } else {
                    SubState::CatchUp { from: batch.next }
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
