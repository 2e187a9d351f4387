//! The replica's QUIC driver. One thread owns the [`Replica`] and its store; the app's calls
//! and the sync task's messages reach it through one channel. The sync task keeps a session
//! with one of the configured hubs: it connects (pinning the hub's certificate fingerprint),
//! runs the session until it breaks, and tries again with exponential backoff and jitter,
//! moving to the next hub on failure (failover). The replica thread waits for its commands on
//! a current-thread runtime of its own, which times its commits of received changes
//! ([`Replica::defer_received`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use syncline_core::PeerId;
use syncline_core::replica::{Event, Replica};
use syncline_core::wire::Message;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::{NetError, tls};

const REPLICA_QUEUE: usize = 1024;
const SESSION_QUEUE: usize = 64;
const MAX_BATCH: usize = 1024;
const EVENT_BUFFER: usize = 1024;
/// How long the replica thread waits for quiet before it stores the received changes that
/// wait ([`Replica::defer_received`]).
const COMMIT_RECEIVED_AFTER: Duration = Duration::from_millis(5);

/// One hub a replica may sync with.
#[derive(Debug, Clone)]
pub struct HubAddress {
    /// `host:port`.
    pub addr: String,
    /// SHA-256 fingerprint of the hub's TLS certificate.
    pub fingerprint: [u8; 32],
    /// The hub's Syncline key, if known (pinned in the handshake too).
    pub key: Option<PeerId>,
}

impl HubAddress {
    /// Checks that `addr` is `host:port` or `[v6]:port`: a non-empty host without spaces and
    /// a port from 1 to 65535. The error says what was expected.
    pub fn check_addr(addr: &str) -> Result<(), NetError> {
        let bad = || {
            NetError::Config(format!(
                "the hub address {addr:?} is not HOST:PORT (such as hub.example.org:4433)"
            ))
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(()),
            _ => Err(bad()),
        }
    }
}

/// How the sync task behaves.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Hubs in order of preference.
    pub hubs: Vec<HubAddress>,
    /// First wait after every hub failed.
    pub backoff_min: Duration,
    /// Longest wait.
    pub backoff_max: Duration,
    /// Give up a connection attempt after this long.
    pub connect_timeout: Duration,
}

impl SyncSettings {
    /// Settings with the default timings.
    pub fn new(hubs: Vec<HubAddress>) -> Self {
        SyncSettings {
            hubs,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The state of the link to the hubs, for status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkState {
    /// The hub of the current session.
    pub hub: Option<String>,
    /// Whether a session is up.
    pub connected: bool,
    /// The last connection error, if any; for a session the replica ended itself (a full
    /// store, a refused change), that cause.
    pub last_error: Option<String>,
    /// When the current or last session started (ms since the Unix epoch).
    pub last_connected_ms: Option<u64>,
    /// Connection attempts so far.
    pub attempts: u64,
}

/// An app's call: runs on the replica, and returns what answers the app once the replica's
/// writes are synced (or could not be).
type Job = Box<dyn FnOnce(&mut Replica) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Result<(), NetError>) + Send>;

enum Command {
    Call(Job),
    Connected {
        binding: [u8; 32],
        hub_key: Option<PeerId>,
        outbound: mpsc::Sender<Message>,
    },
    Message(Message),
    Writable,
    Disconnected,
}

/// A cloneable handle to the replica thread.
#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Command>,
    traffic: Arc<crate::stream::Traffic>,
    events: broadcast::Sender<Event>,
    link: Arc<watch::Sender<LinkState>>,
}

impl ReplicaHandle {
    /// Starts the replica thread. It ends when every handle is dropped. Fails only if the
    /// system cannot give it a thread.
    pub fn spawn(replica: Replica) -> Result<(Self, std::thread::JoinHandle<Replica>), NetError> {
        let (tx, rx) = mpsc::channel(REPLICA_QUEUE);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let ev = events.clone();
        // A timer is all it needs: no sockets, no file descriptor.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("syncline-replica".into())
            .spawn(move || runtime.block_on(run(replica, rx, ev)))?;
        Ok((
            ReplicaHandle {
                tx,
                traffic: Arc::default(),
                events,
                link: Arc::new(watch::Sender::new(LinkState::default())),
            },
            thread,
        ))
    }

    /// Runs `f` on the replica thread (writes, reads, status) and returns its result. A write
    /// made here is durable when this returns; it is uploaded as soon as a session allows.
    /// `f` runs inside the thread's tokio runtime: it must not block on a runtime itself.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Replica) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |r| {
            let out = f(r);
            Box::new(move |synced: Result<(), NetError>| {
                let _ = reply.send(synced.map(|()| out));
            })
        });
        self.tx
            .send(Command::Call(job))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// The replica's events (document changes, refusals, sync progress). A receiver that
    /// falls more than 1,024 events behind is told how many it missed.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Bytes moved with the hubs so far.
    pub fn traffic(&self) -> &crate::stream::Traffic {
        &self.traffic
    }

    /// The state of the link to the hubs.
    pub fn link(&self) -> LinkState {
        self.link.borrow().clone()
    }

    /// The link state, marked changed whenever it changes (a session comes up or ends, an
    /// attempt fails): status pages and mobile observers wait on it instead of polling.
    pub fn link_changes(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    /// Starts the sync task on the current tokio runtime. Aborting the returned task ends the
    /// session cleanly: the replica learns it is disconnected and the link state says so.
    pub fn start_sync(
        &self,
        settings: SyncSettings,
    ) -> Result<tokio::task::JoinHandle<()>, NetError> {
        if settings.hubs.is_empty() {
            return Err(NetError::Config(
                "no hub configured; add one with --hub".into(),
            ));
        }
        let endpoint = quinn::Endpoint::client(
            "0.0.0.0:0"
                .parse()
                .map_err(|_| NetError::Config("bind".into()))?,
        )?;
        let handle = self.clone();
        Ok(tokio::spawn(async move {
            sync_loop(handle, endpoint, settings).await
        }))
    }

    fn set_link(&self, f: impl FnOnce(&mut LinkState)) {
        self.link.send_if_modified(|l| {
            let before = l.clone();
            f(l);
            *l != before
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn sync_loop(handle: ReplicaHandle, endpoint: quinn::Endpoint, settings: SyncSettings) {
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut index = 0usize;
    let mut failures_in_round = 0usize;
    loop {
        let hub = settings.hubs[index % settings.hubs.len()].clone();
        handle.set_link(|l| l.attempts += 1);
        let started = Instant::now();
        match session(&handle, &endpoint, &hub, &settings).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(hub = %hub.addr, error = %e, "hub session ended");
                handle.set_link(|l| l.last_error = Some(format!("{}: {e}", hub.addr)));
            }
        }
        handle.set_link(|l| {
            l.connected = false;
        });
        if handle.tx.is_closed() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            // The session was up for a while: start over gently with the preferred hub.
            backoff.reset();
            failures_in_round = 0;
            index = 0;
            continue;
        }
        index += 1;
        failures_in_round += 1;
        if failures_in_round >= settings.hubs.len() {
            failures_in_round = 0;
            // Every hub failed: wait before the next round.
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

async fn session(
    handle: &ReplicaHandle,
    endpoint: &quinn::Endpoint,
    hub: &HubAddress,
    settings: &SyncSettings,
) -> Result<(), NetError> {
    let addr = tokio::net::lookup_host(&hub.addr)
        .await?
        .next()
        .ok_or_else(|| NetError::Config(format!("{} resolves to no address", hub.addr)))?;
    let config = tls::client_config(vec![hub.fingerprint])?;
    let connecting = endpoint.connect_with(config, addr, "syncline")?;
    let conn = tokio::time::timeout(settings.connect_timeout, connecting)
        .await
        .map_err(|_| NetError::Timeout("connecting to the hub"))??;
    let binding = tls::channel_binding(&conn)?;
    let (send, recv) = conn.open_bi().await?;
    let (out_tx, out_rx) = mpsc::channel::<Message>(SESSION_QUEUE);
    handle
        .tx
        .send(Command::Connected {
            binding,
            hub_key: hub.key,
            outbound: out_tx,
        })
        .await
        .map_err(|_| NetError::Stopped)?;
    let mut end = SessionEnd {
        handle,
        armed: true,
    };
    handle.set_link(|l| {
        l.connected = true;
        l.hub = Some(hub.addr.clone());
        l.last_connected_ms = Some(now_ms());
    });
    let result = crate::stream::run(
        handle.traffic.clone(),
        send,
        recv,
        out_rx,
        handle.tx.clone(),
        |m| std::future::ready(Command::Message(m)),
        || Command::Writable,
        |_| None,
    )
    .await;
    // Asked before the replica forgets the session: why it failed, if it did. The link
    // state shows that cause, not the transport's error at the end.
    let failure = handle.call(|r| r.session_failure()).await.ok().flatten();
    let _ = handle.tx.send(Command::Disconnected).await;
    end.armed = false;
    handle.set_link(|l| l.connected = false);
    conn.close(0u32.into(), b"session ended");
    match failure {
        Some(cause) => Err(NetError::Ended(cause)),
        None => result,
    }
}

/// Ends the replica's side of a session when the sync task is aborted mid-session (an app
/// stopping sync as it goes to the background): `Drop` cannot await, so the replica thread is
/// told without waiting; if its queue is full, it finds the session's channel closed instead.
struct SessionEnd<'a> {
    handle: &'a ReplicaHandle,
    armed: bool,
}

impl Drop for SessionEnd<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.handle.tx.try_send(Command::Disconnected);
            self.handle.set_link(|l| l.connected = false);
        }
    }
}

async fn run(
    mut replica: Replica,
    mut rx: mpsc::Receiver<Command>,
    events: broadcast::Sender<Event>,
) -> Replica {
    let mut outbound: Option<mpsc::Sender<Message>> = None;
    // Local writes commit unsynced; the loop uploads them, then syncs, then answers the apps
    // whose calls wrote them: the upload does not wait for the fsync, the app does.
    if let Err(e) = replica.set_deferred_sync(true) {
        tracing::warn!(error = %e, "deferring the store's syncs failed; writes sync at commit");
    }
    if let Err(e) = replica.defer_received(true) {
        tracing::warn!(error = %e, "deferring the commits of received changes failed");
    }
    let mut replies: Vec<Reply> = Vec::new();
    // A command taken from the channel that belongs to the next round (see below).
    let mut carry: Option<Command> = None;
    loop {
        let mut cmd = match carry.take() {
            Some(c) => Some(c),
            // Received changes that wait are stored once the thread has been quiet a while.
            None if replica.received_uncommitted() => {
                match tokio::time::timeout(COMMIT_RECEIVED_AFTER, rx.recv()).await {
                    Ok(Some(c)) => Some(c),
                    Ok(None) => break,
                    Err(_) => {
                        commit_received(&mut replica);
                        if !replica.session_failed() {
                            continue;
                        }
                        // It failed (a full disk): the session's error goes out below and
                        // the session ends, for the hub to send the changes again. Waiting
                        // for the next command would leave it open, and the replica deaf.
                        None
                    }
                }
            }
            None => match rx.recv().await {
                Some(c) => Some(c),
                None => break,
            },
        };
        let mut taken = 0;
        while let Some(c) = cmd.take() {
            if !matches!(c, Command::Message(_) | Command::Writable) {
                // An app's call, or a new session, finds every received change stored.
                commit_received(&mut replica);
            }
            match c {
                Command::Call(job) => replies.push(job(&mut replica)),
                Command::Connected {
                    binding,
                    hub_key,
                    outbound: tx,
                } => {
                    replica.connect_bound(hub_key, binding);
                    outbound = Some(tx);
                }
                Command::Message(m) => {
                    if let Err(e) = replica.handle_message(m) {
                        tracing::warn!(error = %e, "the session with the hub failed");
                    }
                }
                Command::Writable => {}
                Command::Disconnected => {
                    replica.disconnect();
                    outbound = None;
                }
            }
            taken += 1;
            if taken < MAX_BATCH {
                cmd = rx.try_recv().ok();
                // A write's app waits for the round's end (upload, sync, answer): once one
                // waits, the round takes more calls (they share the sync) but ends at the
                // first other command, which starts the next round.
                if replica.unsynced()
                    && cmd.as_ref().is_some_and(|c| !matches!(c, Command::Call(_)))
                {
                    carry = cmd.take();
                }
            }
        }
        if let Some(tx) = outbound.as_ref() {
            // A full channel stops the pump; the writer's Writable brings us back.
            while let Ok(permit) = tx.try_reserve() {
                match replica.poll_transmit() {
                    Ok(Some(m)) => permit.send(m),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the outbox failed");
                        break;
                    }
                }
            }
            if tx.is_closed() {
                // The session's task is gone (aborted) without a word: end it here too.
                replica.disconnect();
                outbound = None;
            } else if replica.session_failed() {
                // The error for the hub is queued: dropping the sender ends the stream after
                // it; the sync task reconnects with backoff.
                outbound = None;
            }
        }
        // One sync for every call of the round (a group commit), after their uploads left.
        let synced = replica.sync().map_err(|e| {
            tracing::error!(error = %e, "syncing the store failed");
            e.to_string()
        });
        for reply in replies.drain(..) {
            reply(synced.clone().map_err(NetError::NotDurable));
        }
        while let Some(e) = replica.poll_event() {
            let _ = events.send(e);
        }
    }
    commit_received(&mut replica);
    if let Err(e) = replica.set_deferred_sync(false) {
        tracing::error!(error = %e, "syncing the store at the end failed");
    }
    replica
}

fn commit_received(replica: &mut Replica) {
    if let Err(e) = replica.commit_received() {
        tracing::warn!(error = %e, "storing received changes failed; the hub sends them again");
    }
}
