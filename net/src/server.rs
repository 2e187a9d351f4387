//! The hub's QUIC driver. One thread owns the [`Hub`] machine and its store (blocking SQLite
//! never runs on async workers); connection tasks talk to it through a bounded channel, so a
//! flood of messages meets backpressure that reaches QUIC flow control. The thread drains
//! what is queued, commits it in one group commit ([`Hub::flush`]), then pumps each session
//! only while that connection's outbound channel has room: a slow reader stops being pumped
//! and its subscriptions fall back to the log, it never makes the hub buffer without bound.

use std::collections::{BTreeSet, HashMap};

use syncline_core::hub::{Hub, Policy, SessionId, VerifiedPush};
use syncline_core::store::HubStore;
use syncline_core::wire::Message;
use tokio::sync::{mpsc, oneshot, watch};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::client::HubAddress;
use crate::stream::Traffic;
use crate::{NetError, tls};

/// Messages queued from all connections to the hub thread.
const HUB_QUEUE: usize = 4096;
/// Messages queued from the hub thread to one connection.
const SESSION_QUEUE: usize = 64;
/// Commands the hub thread takes before it commits and answers.
const MAX_BATCH: usize = 4096;

/// Who opened a session's connection.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// A replica (or a peer hub) connected to this hub.
    Accepted,
    /// This hub connected to a peer hub (whose key may be pinned).
    Peer(Option<syncline_core::PeerId>),
}

type Job<S, P> = Box<dyn FnOnce(&mut Hub<S, P>) + Send>;

enum Command<S, P> {
    Open {
        binding: [u8; 32],
        side: Side,
        outbound: mpsc::Sender<Message>,
        /// Set to `true` once the session is authenticated; dropped if it never will be.
        authenticated: watch::Sender<bool>,
        reply: oneshot::Sender<SessionId>,
    },
    Message {
        session: SessionId,
        msg: Message,
    },
    /// A push its connection task verified (on whichever core ran the task).
    Push {
        session: SessionId,
        push: VerifiedPush,
    },
    WireError {
        session: SessionId,
        error: syncline_core::error::WireError,
    },
    Writable {
        session: SessionId,
    },
    Close {
        session: SessionId,
    },
    Call(Job<S, P>),
}

/// What the driver allows a hostile or broken peer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// QUIC connections served at once; more are refused at once (counted as
    /// `connection_limit`) and their peers retry with backoff.
    pub max_connections: usize,
    /// Time a peer has to open its stream and complete the authenticated handshake; past it
    /// the session is refused (counted as `handshake_timeout`) and the connection closed.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A cloneable handle to the hub thread.
pub struct HubHandle<S, P> {
    tx: mpsc::Sender<Command<S, P>>,
    traffic: Arc<Traffic>,
    limits: Limits,
}

impl<S, P> Clone for HubHandle<S, P> {
    fn clone(&self) -> Self {
        HubHandle {
            tx: self.tx.clone(),
            traffic: self.traffic.clone(),
            limits: self.limits,
        }
    }
}

impl<S, P> HubHandle<S, P>
where
    S: HubStore + Send + 'static,
    P: Policy + Send + 'static,
{
    /// Starts the hub thread. It ends when every handle is dropped.
    pub fn spawn(hub: Hub<S, P>) -> (Self, std::thread::JoinHandle<Hub<S, P>>) {
        let (tx, rx) = mpsc::channel(HUB_QUEUE);
        let thread = std::thread::Builder::new()
            .name("syncline-hub".into())
            .spawn(move || run(hub, rx))
            .expect("spawning the hub thread");
        (
            HubHandle {
                tx,
                traffic: Arc::new(Traffic::default()),
                limits: Limits::default(),
            },
            thread,
        )
    }

    /// Sets the limits of the sessions served from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes moved by every session of this hub so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Runs `f` on the hub thread and returns its result (metrics, grant changes, checks).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Hub<S, P>) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (reply, rx) = oneshot::channel();
        let job: Job<S, P> = Box::new(move |hub| {
            let _ = reply.send(f(hub));
        });
        self.tx
            .send(Command::Call(job))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Serves one QUIC connection until it ends: the replica opens one bidirectional stream
    /// and the Syncline session runs over it.
    pub async fn serve_connection(&self, conn: quinn::Connection) -> Result<(), NetError> {
        let deadline = self.limits.handshake_timeout;
        let Ok(stream) = tokio::time::timeout(deadline, conn.accept_bi()).await else {
            // A connection that never opens its stream holds resources for nothing.
            let _ = self.call(|h| h.count_reject("handshake_timeout")).await;
            conn.close(0u32.into(), b"no stream opened in time");
            return Err(NetError::Timeout("waiting for the peer to open its stream"));
        };
        let (send, recv) = stream?;
        self.run_session(&conn, send, recv, Side::Accepted).await
    }

    /// Opens a session on the hub thread: its id, the channel of what the hub sends on it, and
    /// how its connection task hands over what it receives.
    async fn open_session(
        &self,
        binding: [u8; 32],
        side: Side,
    ) -> Result<(SessionId, mpsc::Receiver<Message>, Incoming), NetError> {
        let (outbound, out_rx) = mpsc::channel::<Message>(SESSION_QUEUE);
        let (reply, rx) = oneshot::channel();
        let (authenticated, decision) = watch::channel(false);
        self.tx
            .send(Command::Open {
                binding,
                side,
                outbound,
                authenticated,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        let session = rx.await.map_err(|_| NetError::Stopped)?;
        if matches!(side, Side::Accepted) {
            // A peer that does not authenticate in time is refused; the hub thread ends the
            // session (an authenticated or closed one is left alone).
            let hub = self.clone();
            let after = self.limits.handshake_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = hub.call(move |h| h.expire_handshake(session, after)).await;
            });
        }
        let incoming = Incoming {
            session,
            // Pushes from the replicas (and peer hubs) that connect here, once authenticated;
            // on links this hub opened, the hub thread verifies what the peer sends.
            auth: matches!(side, Side::Accepted).then(|| AuthSeen {
                decision,
                auth_passed: AtomicBool::new(false),
            }),
        };
        Ok((session, out_rx, incoming))
    }

    /// Runs one session over a connection's stream until either side ends it.
    async fn run_session(
        &self,
        conn: &quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        side: Side,
    ) -> Result<(), NetError> {
        let binding = tls::channel_binding(conn)?;
        let (session, out_rx, incoming) = self.open_session(binding, side).await?;
        let result = crate::stream::run(
            self.traffic.clone(),
            send,
            recv,
            out_rx,
            self.tx.clone(),
            |msg| incoming.command(msg),
            || Command::Writable { session },
            |error| Some(Command::WireError { session, error }),
        )
        .await;
        let _ = self.tx.send(Command::Close { session }).await;
        conn.close(0u32.into(), b"session ended");
        result
    }
}

/// How one session's connection task hands what it receives to the hub thread. Once the
/// session is authenticated, pushes are verified here, on the task's core, so that the hub
/// thread only commits; before that (and on links this hub opened) the hub thread does it,
/// and refuses a push of an unauthenticated peer without verifying it.
struct Incoming {
    session: SessionId,
    /// On sessions accepted here (`None` on links this hub opened).
    auth: Option<AuthSeen>,
}

/// What a session's connection task knows of its authentication.
struct AuthSeen {
    /// The hub thread's decision: `true` once authenticated; the sender is dropped if the
    /// session never will be (it failed or closed).
    decision: watch::Receiver<bool>,
    /// The peer's `Auth` has passed through this task to the hub thread.
    auth_passed: AtomicBool,
}

impl AuthSeen {
    /// Whether the session is authenticated. A push that follows its peer's `Auth` (a
    /// replica sends its first pushes right behind it) waits for the hub thread's decision
    /// on that `Auth`, so that it is verified here rather than on the hub thread, and the
    /// session's messages stay in order. Before any `Auth`, a push is not waited for: the
    /// hub thread refuses it.
    async fn authenticated(&self) -> bool {
        if *self.decision.borrow() {
            return true;
        }
        let mut decision = self.decision.clone();
        loop {
            if *decision.borrow_and_update() {
                return true;
            }
            if !self.auth_passed.load(Ordering::Acquire) || decision.changed().await.is_err() {
                return false;
            }
        }
    }
}

impl Incoming {
    async fn command<S, P>(&self, msg: Message) -> Command<S, P> {
        let session = self.session;
        let Some(auth) = self.auth.as_ref() else {
            return Command::Message { session, msg };
        };
        match msg {
            Message::Auth(_) => {
                auth.auth_passed.store(true, Ordering::Release);
                return Command::Message { session, msg };
            }
            Message::Push(_) if auth.authenticated().await => {}
            _ => return Command::Message { session, msg },
        }
        match VerifiedPush::verify(msg) {
            Ok(push) => Command::Push { session, push },
            Err(msg) => Command::Message { session, msg },
        }
    }
}

/// One whole frame (length prefix included) as a message-based transport carries it: a
/// WebSocket binary message, for browsers. `Ok(None)` from the transport means a message
/// that is not a frame (a text message): the session is refused.
pub type FrameResult = Result<Option<Vec<u8>>, NetError>;

impl<S, P> HubHandle<S, P>
where
    S: HubStore + Send + 'static,
    P: Policy + Send + 'static,
{
    /// Serves one session over a message-based transport (a WebSocket): each item of
    /// `incoming` is one frame, each frame the hub sends goes to `outgoing` as one item. There
    /// is no TLS exporter to bind the handshake to (`wss://` ends in the browser's TLS stack),
    /// so the session runs unbound, as the protocol allows. Refusals are the same as on QUIC:
    /// a message that is not exactly one valid frame gets an `Error` and ends the session.
    pub async fn serve_frames<I, O>(&self, mut incoming: I, mut outgoing: O) -> Result<(), NetError>
    where
        I: futures_util::Stream<Item = FrameResult> + Unpin,
        O: futures_util::Sink<Vec<u8>> + Unpin,
        O::Error: std::fmt::Display,
    {
        use futures_util::{SinkExt, StreamExt};
        let (session, mut out_rx, handover) = self.open_session([0; 32], Side::Accepted).await?;
        let traffic = self.traffic.clone();
        let owner = self.tx.clone();
        let writer = async {
            while let Some(m) = out_rx.recv().await {
                let frame = m.to_frame();
                let len = frame.len() as u64;
                outgoing
                    .send(frame)
                    .await
                    .map_err(|e| NetError::Config(format!("websocket: {e}")))?;
                traffic.bytes_out.fetch_add(len, Ordering::Relaxed);
                if out_rx.is_empty() && owner.send(Command::Writable { session }).await.is_err() {
                    break;
                }
            }
            // The hub ended the session: close after what was queued.
            let _ = outgoing.close().await;
            Ok::<(), NetError>(())
        };
        let reader = async {
            while let Some(item) = incoming.next().await {
                let decoded = match item? {
                    Some(frame) => {
                        traffic
                            .bytes_in
                            .fetch_add(frame.len() as u64, Ordering::Relaxed);
                        Message::from_frame(&frame)
                    }
                    None => Err(syncline_core::error::WireError::Garbage(
                        "a text message; frames travel as binary messages".into(),
                    )),
                };
                match decoded {
                    Ok(msg) => self
                        .tx
                        .send(handover.command(msg).await)
                        .await
                        .map_err(|_| NetError::Stopped)?,
                    Err(error) => {
                        let _ = self
                            .tx
                            .send(Command::WireError {
                                session,
                                error: error.clone(),
                            })
                            .await;
                        // Keep the writer going so the Error reaches the peer.
                        return Err::<(), NetError>(error.into());
                    }
                }
            }
            Ok(())
        };
        let result = crate::stream::until_either(reader, writer).await;
        let _ = self.tx.send(Command::Close { session }).await;
        result
    }

    /// Keeps a link to a peer hub for as long as the hub runs: connects from `endpoint`
    /// (pinning the peer's certificate), runs the link session, and reconnects with backoff
    /// when it breaks. Both hubs then serve the same data set.
    pub fn start_peer(
        &self,
        endpoint: quinn::Endpoint,
        peer: HubAddress,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
            loop {
                let started = std::time::Instant::now();
                match hub.peer_session(&endpoint, &peer).await {
                    Ok(()) => tracing::info!(peer = %peer.addr, "peer link ended"),
                    Err(e) => tracing::warn!(peer = %peer.addr, error = %e, "peer link failed"),
                }
                if hub.tx.is_closed() {
                    return;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        })
    }

    async fn peer_session(
        &self,
        endpoint: &quinn::Endpoint,
        peer: &HubAddress,
    ) -> Result<(), NetError> {
        let addr = tokio::net::lookup_host(&peer.addr)
            .await?
            .next()
            .ok_or_else(|| NetError::Config(format!("{} resolves to no address", peer.addr)))?;
        let config = tls::client_config(vec![peer.fingerprint])?;
        let connecting = endpoint.connect_with(config, addr, "syncline")?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| NetError::Timeout("connecting to the peer hub"))??;
        let (send, recv) = conn.open_bi().await?;
        self.run_session(&conn, send, recv, Side::Peer(peer.key))
            .await
    }
}

/// Accepts connections on `endpoint` until it is closed, serving each in its own task, at
/// most [`Limits::max_connections`] at once: past it a connection is refused before its TLS
/// handshake (cheap for the hub) and counted as `connection_limit`; past half of it, new
/// peers must validate their address first (a QUIC retry).
pub async fn serve<S, P>(endpoint: quinn::Endpoint, hub: HubHandle<S, P>)
where
    S: HubStore + Send + 'static,
    P: Policy + Send + 'static,
{
    let max = hub.limits.max_connections;
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    while let Some(incoming) = endpoint.accept().await {
        // Under load (over half the slots taken), a new peer first proves that it receives
        // at its address (a QUIC retry: one round trip, no state kept here), so that a flood
        // from spoofed addresses costs the hub no TLS handshake. Clients follow it on their
        // own.
        if slots.available_permits() < max / 2
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            let hub = hub.clone();
            tokio::spawn(async move {
                let _ = hub.call(|h| h.count_reject("connection_limit")).await;
            });
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = hub.serve_connection(conn).await {
                        tracing::debug!(%remote, error = %e, "connection ended");
                    }
                }
                Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
            }
        });
    }
}

fn run<S: HubStore, P: Policy>(
    mut hub: Hub<S, P>,
    mut rx: mpsc::Receiver<Command<S, P>>,
) -> Hub<S, P> {
    let mut outbound: HashMap<SessionId, mpsc::Sender<Message>> = HashMap::new();
    // Sessions not authenticated yet, with the decision their connection task waits for.
    let mut handshaking: HashMap<SessionId, watch::Sender<bool>> = HashMap::new();
    let mut due: BTreeSet<SessionId> = BTreeSet::new();
    // Group commits are synced after their relays to replicas have left (see
    // `Hub::set_deferred_sync`); acknowledgements still wait for the sync.
    if let Err(e) = hub.set_deferred_sync(true) {
        tracing::warn!(error = %e, "deferring the log's syncs failed; commits sync at once");
    }
    while let Some(first) = rx.blocking_recv() {
        let mut cmd = Some(first);
        let mut taken = 0;
        while let Some(c) = cmd.take() {
            match c {
                Command::Open {
                    binding,
                    side,
                    outbound: tx,
                    authenticated: flag,
                    reply,
                } => {
                    let id = match side {
                        Side::Accepted => hub.accept_bound(binding),
                        Side::Peer(expected) => hub.connect_peer(expected, binding),
                    };
                    outbound.insert(id, tx);
                    handshaking.insert(id, flag);
                    due.insert(id);
                    let _ = reply.send(id);
                }
                Command::Message { session, msg } => {
                    if let Err(e) = hub.handle_message(session, msg) {
                        tracing::debug!(session, error = %e, "session refused a message");
                    }
                    if handshaking.contains_key(&session) {
                        if hub.session_peer(session).is_some() {
                            // Authenticated: its connection task verifies its pushes from now
                            // on, the ones waiting behind its Auth first.
                            if let Some(decision) = handshaking.remove(&session) {
                                decision.send_replace(true);
                            }
                        } else if hub.is_failed(session) {
                            // Never will be: the task stops waiting (the sender is dropped).
                            handshaking.remove(&session);
                        }
                    }
                    due.insert(session);
                }
                Command::Push { session, push } => {
                    if let Err(e) = hub.handle_verified_push(session, push) {
                        tracing::debug!(session, error = %e, "session refused a push");
                    }
                    due.insert(session);
                }
                Command::WireError { session, error } => {
                    hub.refuse_stream(session, &error);
                    due.insert(session);
                }
                Command::Writable { session } => {
                    due.insert(session);
                }
                Command::Close { session } => {
                    hub.close(session);
                    outbound.remove(&session);
                    handshaking.remove(&session);
                }
                Command::Call(job) => job(&mut hub),
            }
            taken += 1;
            if taken < MAX_BATCH {
                cmd = rx.try_recv().ok();
            }
        }
        let commits = hub.metrics().commits;
        let started = std::time::Instant::now();
        if let Err(e) = hub.flush() {
            tracing::error!(error = %e, "group commit failed; pushes were refused");
        }
        let committed = started.elapsed();
        // The relays go out to the replicas that may take them unsynced; the rest waits.
        for session in hub.take_ready() {
            if hub.relays_unsynced(session) {
                pump(&mut hub, &mut outbound, session);
            }
            due.insert(session);
        }
        let syncing = std::time::Instant::now();
        // (On error, every session has failed, with nothing of this round sent but the
        // relays above; the error is logged.)
        let _ = hub.sync();
        if hub.metrics().commits > commits {
            hub.record_commit_seconds((committed + syncing.elapsed()).as_secs_f64());
        }
        due.extend(hub.take_ready());
        for session in std::mem::take(&mut due) {
            pump(&mut hub, &mut outbound, session);
        }
    }
    if let Err(e) = hub.set_deferred_sync(false) {
        tracing::error!(error = %e, "syncing the log at the end failed");
    }
    hub
}

/// Sends a session's output while its connection has room. A full channel stops the pump;
/// the connection's writer asks again when it has drained.
fn pump<S: HubStore, P: Policy>(
    hub: &mut Hub<S, P>,
    outbound: &mut HashMap<SessionId, mpsc::Sender<Message>>,
    session: SessionId,
) {
    let Some(tx) = outbound.get(&session).cloned() else {
        return;
    };
    loop {
        match tx.try_reserve() {
            Ok(permit) => match hub.poll_transmit(session) {
                Ok(Some(m)) => permit.send(m),
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(session, error = %e, "reading the store for a session failed");
                    break;
                }
            },
            Err(mpsc::error::TrySendError::Full(())) => return,
            Err(mpsc::error::TrySendError::Closed(())) => {
                hub.close(session);
                outbound.remove(&session);
                return;
            }
        }
    }
    if hub.is_failed(session) && hub.is_idle(session) {
        // Its last message (an Error) is queued: dropping the sender ends the stream after it.
        outbound.remove(&session);
        hub.close(session);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

    use std::pin::pin;

    use futures_util::FutureExt;
    use syncline_core::DocId;
    use syncline_core::hub::AllowAll;
    use syncline_core::identity::Identity;
    use syncline_core::ops::Op;
    use syncline_core::replica::{Replica, ReplicaOptions};
    use syncline_core::store::SqliteHubStore;
    use syncline_core::wire::{Auth, Push};

    use super::*;

    type Cmd = Command<SqliteHubStore, AllowAll>;

    /// A push of one signed change, as a replica sends it.
    fn push() -> Message {
        let mut r =
            Replica::open_in_memory(Identity::generate(), ReplicaOptions::default()).unwrap();
        let doc = DocId::new("plant/a").unwrap();
        let ops = Op::list_from_json(r#"[{"op":"put","path":["t"],"value":1}]"#).unwrap();
        r.change(&doc, &ops).unwrap();
        let entry = r.store().outbox_after(0, 1).unwrap().remove(0);
        Message::Push(Push {
            push_id: 1,
            doc,
            changes: vec![entry.signed.unwrap()],
        })
    }

    fn incoming() -> (Incoming, watch::Sender<bool>) {
        let (decided, decision) = watch::channel(false);
        let incoming = Incoming {
            session: 7,
            auth: Some(AuthSeen {
                decision,
                auth_passed: AtomicBool::new(false),
            }),
        };
        (incoming, decided)
    }

    fn auth() -> Message {
        Message::Auth(Auth { signature: [0; 64] })
    }

    /// A push right behind its peer's `Auth` waits for the hub thread's decision on it, and is
    /// verified in the connection task once the session is authenticated.
    #[tokio::test]
    async fn a_push_behind_its_auth_is_verified_here_once_the_session_is_authenticated() {
        let (incoming, decided) = incoming();
        assert!(matches!(
            incoming.command::<_, _>(auth()).now_or_never(),
            Some(Cmd::Message { .. })
        ));
        let mut waiting = pin!(incoming.command::<SqliteHubStore, AllowAll>(push()));
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "the push waits for the decision on the Auth before it"
        );
        decided.send_replace(true);
        assert!(matches!(waiting.await, Cmd::Push { session: 7, .. }));
        // Later pushes are verified here at once.
        assert!(matches!(
            incoming
                .command::<SqliteHubStore, AllowAll>(push())
                .now_or_never(),
            Some(Cmd::Push { .. })
        ));
    }

    /// A push before any `Auth`, or behind one the hub thread refused, goes to the hub thread
    /// unverified (which refuses it): nothing is verified for an unauthenticated peer.
    #[tokio::test]
    async fn a_push_of_an_unauthenticated_peer_is_not_verified_here() {
        let (incoming, decided) = incoming();
        assert!(matches!(
            incoming
                .command::<SqliteHubStore, AllowAll>(push())
                .now_or_never(),
            Some(Cmd::Message { .. })
        ));
        let _ = incoming
            .command::<SqliteHubStore, AllowAll>(auth())
            .now_or_never();
        let mut waiting = pin!(incoming.command::<SqliteHubStore, AllowAll>(push()));
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(decided);
        assert!(matches!(waiting.await, Cmd::Message { session: 7, .. }));
    }
}
