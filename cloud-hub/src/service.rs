//! `syncline-hub run`: opens the data directory (making it if empty), starts the hub thread
//! with the store's grants as its policy, serves QUIC and the metrics endpoint, reloads grants
//! when the store's grants version changes, and shuts down cleanly on SIGTERM or SIGINT.
//!
//! Shutdown order: close the QUIC endpoint (no new connections; open ones end and their tasks
//! tell the hub thread), stop the grant poller and the metrics server, drop every hub handle,
//! then join the hub thread. It ends only once its queue is empty, so commands already queued
//! (an in-flight group commit among them) finish first; what was acknowledged stays durable
//! and what was not stays in the replicas' outboxes.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use syncline_core::hub::{Grants, Hub, RETENTION_BUDGET, RETENTION_TICK};
use syncline_core::store::{HubStore, SqliteHubStore};
use syncline_net::NetError;
use syncline_net::server::{self, HubHandle};
use syncline_net::tls;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Settings, StoreLocation, TlsSource};
use crate::data::{self, DataDir};
use crate::metrics::{self, Handle};
use crate::pg::{self, PgHubStore};
use crate::usage;

/// How long shutdown waits for open connections to end before it drops them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The UDP receive buffer the hub asks for. Every edge sends to this one socket: 100 edges
/// uploading at once (a hub restart, a network back) overflowed Linux's default (208 KiB),
/// and the dropped packets' QUIC loss recovery held those edges back for seconds
/// (`syncline-bench --only ingest`, 100 writers: 3-6 s instead of 1 s, hundreds of
/// `UdpRcvbufErrors`).
const UDP_RECEIVE_BUFFER: usize = 8 * 1024 * 1024;

/// Below this the hub warns: what the kernel granted is too small for bursts from many
/// edges.
const UDP_RECEIVE_BUFFER_LOW: usize = 2 * 1024 * 1024;

/// Asks for [`UDP_RECEIVE_BUFFER`]; the kernel caps it at `net.core.rmem_max`, and the hub
/// says so when that leaves it small.
fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "could not set the UDP receive buffer size");
    }
    match sock.recv_buffer_size() {
        Ok(got) if got < UDP_RECEIVE_BUFFER_LOW => tracing::warn!(
            bytes = got,
            "the UDP receive buffer is small: bursts from many edges will drop packets and \
             stall them; raise it with `sysctl -w net.core.rmem_max={UDP_RECEIVE_BUFFER}`"
        ),
        Ok(got) => tracing::info!(bytes = got, "UDP receive buffer"),
        Err(e) => tracing::warn!(error = %e, "could not read the UDP receive buffer size"),
    }
}

/// Runs the hub until SIGTERM or SIGINT (then returns `Ok`) or until the hub thread fails.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let dir = DataDir::new(&settings.data);
    let self_signed = settings.tls == TlsSource::SelfSigned;
    let (identity, cert) = dir.init(&[], self_signed)?;
    let cert = match (&settings.tls, cert) {
        (TlsSource::Files { cert, key }, _) => data::load_tls_files(cert, key)?,
        (TlsSource::SelfSigned, Some(c)) => c,
        (TlsSource::SelfSigned, None) => anyhow::bail!("the self-signed certificate was not made"),
    };
    let fingerprint = tls::fingerprint(&cert.cert_der);
    let server_config = tls::server_config(&cert).context("the TLS certificate")?;
    let endpoint_config = tls::endpoint_config(&cert);
    let ws_tls = match settings.ws_tls {
        true => Some(tls::https_server_config(&cert).context("the TLS certificate")?),
        false => None,
    };

    // One hub process owns the data directory (the grants CLI may still write to it).
    let _lock = syncline_core::store::lock_dir(dir.root()).map_err(|e| usage(e.to_string()))?;
    let shared = matches!(settings.store, StoreLocation::Postgres(_));
    let (mut store, notifies) = open_store_telling(&dir, &settings.store)?;
    if shared && !notifies {
        tracing::warn!(
            "this database does not take NOTIFY: this instance sees the others' commits at its \
             log poll (every {} ms) and grant changes at its grants poll (grants_poll_ms)",
            TAIL_POLL.as_millis()
        );
    }
    // Version first, then grants: a change in between is picked up again by the first poll.
    let version = store
        .grants_version()
        .context("reading the grants version")?;
    let grants = store.grants().context("reading the grants")?;
    let log_base = store.last_cursor().context("reading the log end")?.0;
    if grants.is_empty() {
        tracing::warn!(
            "no grants: every replica will be refused until you run `syncline-hub grant`"
        );
    }
    tracing::info!(
        data = %dir.root().display(),
        grants = grants.len(),
        log_changes = log_base,
        epoch = ?store.epoch(),
        "store opened"
    );
    let mut hub = Hub::new(identity, store, Grants { grants }, None);
    let retains = !settings.retention.is_empty();
    for r in &settings.retention {
        tracing::info!(prefix = %r.prefix(), max_age_secs = r.max_age_secs(), "retention of rolling buckets");
    }
    hub.set_retention(settings.retention.clone());
    hub.set_compaction(settings.compact_after);
    if shared {
        // Other instances write to the same log: relay what they commit.
        hub.share_store().context("reading the log end")?;
    }
    let key = hub.peer_id();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("syncline-hub-io")
        .build()
        .context("starting the async runtime")?;
    let (mut handle, thread) = HubHandle::spawn(hub);
    handle.set_limits(syncline_net::server::Limits {
        max_connections: settings.max_connections,
        ..syncline_net::server::Limits::default()
    });
    let outcome = runtime.block_on(serve(
        handle,
        settings.listen,
        settings.metrics,
        settings.ws,
        ws_tls,
        (endpoint_config, server_config),
        &fingerprint,
        &key.to_string(),
        version,
        log_base,
        settings.peers.clone(),
        match &settings.store {
            StoreLocation::Postgres(url) => Some((url.clone(), notifies)),
            StoreLocation::Sqlite => None,
        },
        retains,
        settings.grants_poll,
    ));
    // Drops whatever connection task is still alive, and with it its hub handle.
    runtime.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("waiting for the hub thread to finish the queued commands");
    match thread.join() {
        Ok(hub) => drop(hub),
        Err(_) => anyhow::bail!("the hub thread panicked; the store is consistent, restart"),
    }
    tracing::info!("hub stopped");
    outcome
}

#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
async fn serve(
    handle: Handle,
    listen: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    ws_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    (endpoint_config, server_config): (quinn::EndpointConfig, quinn::ServerConfig),
    fingerprint: &str,
    key: &str,
    grants_version: u64,
    log_base: u64,
    peers: Vec<syncline_net::client::HubAddress>,
    // The URL of a store shared with other instances, whose commits this one relays, and
    // whether it notifies them.
    shared: Option<(String, bool)>,
    retains: bool,
    grants_poll: Duration,
) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during startup still shuts down cleanly.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let cannot_listen = |e: std::io::Error| {
        usage(format!(
            "cannot listen on {listen} (UDP): {e}; choose another --listen"
        ))
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(cannot_listen)?;
    widen_receive_buffer(&socket);
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .map_err(cannot_listen)?;
    let quic_addr = endpoint.local_addr().context("reading the QUIC address")?;
    let metrics_listener = match metrics_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
            usage(format!(
                "cannot listen on {a} (TCP) for metrics: {e}; choose another --metrics"
            ))
        })?),
        None => None,
    };
    let ws_listener = match ws_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
            usage(format!(
                "cannot listen on {a} (TCP) for WebSockets: {e}; choose another --ws"
            ))
        })?),
        None => None,
    };

    let serve_task = tokio::spawn(server::serve(endpoint.clone(), handle.clone()));
    let peer_tasks: Vec<_> = peers
        .into_iter()
        .map(|p| {
            tracing::info!(peer = %p.addr, "linking to peer hub");
            handle.start_peer(endpoint.clone(), p)
        })
        .collect();
    let grants_applied: metrics::GrantsApplied =
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(grants_version));
    // On a shared store, one connection hears what every instance commits and every change
    // of the grants (if the database notifies them; else the tasks below only poll).
    let news = shared.map(|(url, notifies)| {
        let news = std::sync::Arc::new(StoreNews::default());
        let follower = notifies.then(|| tokio::spawn(follow_store(url, news.clone())));
        (follower, news)
    });
    let mut poller = tokio::spawn(poll_grants(
        handle.clone(),
        grants_version,
        grants_applied.clone(),
        grants_poll,
        news.as_ref().map(|(_, n)| n.clone()),
    ));
    let mut tail = news
        .as_ref()
        .map(|(_, n)| tokio::spawn(tail_store(handle.clone(), n.clone())));
    let sweeper = retains.then(|| tokio::spawn(expire_buckets(handle.clone())));
    let compactor = tokio::spawn(compact_docs(handle.clone()));
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut metrics_task = None;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "listening on {quic_addr} fingerprint {fingerprint} key {key}"
    )?;
    tracing::info!(%quic_addr, %fingerprint, %key, "QUIC server started");
    if let Some(listener) = metrics_listener {
        let addr = listener
            .local_addr()
            .context("reading the metrics address")?;
        let app = metrics::router(handle.clone(), log_base, grants_applied.clone());
        metrics_task = Some(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = metrics_stopped.await;
                })
                .await
        }));
        writeln!(out, "metrics on {addr}")?;
        tracing::info!(%addr, "metrics server started");
    }
    let (stop_ws, ws_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut ws_task = None;
    if let Some(listener) = ws_listener {
        let addr = listener
            .local_addr()
            .context("reading the WebSocket address")?;
        let app = crate::ws::router(handle.clone());
        let scheme = if ws_tls.is_some() { "wss" } else { "ws" };
        ws_task = Some(tokio::spawn(async move {
            match ws_tls {
                Some(config) => crate::ws::serve_tls(listener, config, app, ws_stopped).await,
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = ws_stopped.await;
                        })
                        .await
                }
            }
        }));
        writeln!(out, "websocket on {scheme}://{addr}/v1/sync")?;
        tracing::info!(%addr, "WebSocket endpoint started");
    }
    out.flush()?;
    drop(out);

    let result = tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM received: shutting down");
            Ok(())
        }
        _ = int.recv() => {
            tracing::info!("SIGINT received: shutting down");
            Ok(())
        }
        r = &mut poller => {
            let why = match r {
                Ok(e) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::error!(error = %why, "the hub thread stopped; shutting down");
            Err(anyhow::anyhow!("the hub thread stopped: {why}"))
        }
        r = async {
            match &mut tail {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        } => {
            tail = None;
            let why = match r {
                Ok(e) => e,
                Err(e) => e.to_string(),
            };
            tracing::error!(error = %why, "shutting down");
            Err(anyhow::anyhow!("{why}"))
        }
    };

    tracing::info!("closing the QUIC endpoint: no new connections, open ones end");
    for t in &peer_tasks {
        t.abort();
    }
    endpoint.close(0u32.into(), b"hub shutting down");
    let _ = serve_task.await;
    if tokio::time::timeout(DRAIN_TIMEOUT, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("connections did not end within {DRAIN_TIMEOUT:?}; dropping them");
    }
    poller.abort();
    let _ = poller.await;
    if let Some(t) = sweeper {
        t.abort();
        let _ = t.await;
    }
    compactor.abort();
    let _ = compactor.await;
    if let Some(t) = tail {
        t.abort();
        let _ = t.await;
    }
    if let Some((Some(t), _)) = news {
        t.abort();
        let _ = t.await;
    }
    let _ = stop_ws.send(());
    if let Some(task) = ws_task {
        // Open WebSocket sessions end with the runtime; what they pushed and was
        // acknowledged is committed already.
        if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
            tracing::warn!(
                "WebSocket sessions did not end within {DRAIN_TIMEOUT:?}; dropping them"
            );
        }
    }
    let _ = stop_metrics.send(());
    if let Some(task) = metrics_task {
        match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the metrics server failed"),
            Err(_) => tracing::warn!("the metrics server did not stop in time"),
            _ => {}
        }
    }
    drop(handle);
    result
}

/// Opens the store a hub runs on: the data directory's SQLite file, or PostgreSQL.
pub fn open_store(
    dir: &DataDir,
    location: &StoreLocation,
) -> anyhow::Result<Box<dyn HubStore + Send>> {
    Ok(open_store_telling(dir, location)?.0)
}

/// [`open_store`], and whether the store tells other instances of its commits and grant
/// changes (a PostgreSQL database that takes `NOTIFY`).
fn open_store_telling(
    dir: &DataDir,
    location: &StoreLocation,
) -> anyhow::Result<(Box<dyn HubStore + Send>, bool)> {
    Ok(match location {
        StoreLocation::Sqlite => (
            Box::new(
                SqliteHubStore::open(&dir.store_path())
                    .with_context(|| format!("opening {}", dir.store_path().display()))?,
            ),
            false,
        ),
        StoreLocation::Postgres(url) => {
            let store = PgHubStore::connect(url).with_context(|| {
                format!(
                    "opening the PostgreSQL store {}: check that the server runs and the URL's \
                     user may create tables",
                    redact(url)
                )
            })?;
            let notifies = store.notifies();
            (Box::new(store), notifies)
        }
    })
}

/// A store URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The pause between two sweeps while expired buckets are left to drop.
const RETENTION_BACKLOG_GAP: Duration = Duration::from_millis(25);

/// How often an instance on a shared store looks for what the others committed when no
/// notification came (the listening connection is down, or a notification was lost): the
/// bound on cross-instance write-to-visible latency then. One indexed `max(seq)` query per
/// tick when nothing is new.
pub const TAIL_POLL: Duration = Duration::from_millis(20);

/// What [`follow_store`] heard from the shared store, for the tasks that act on it.
#[derive(Default)]
struct StoreNews {
    /// Another instance committed: read the log now.
    commits: tokio::sync::Notify,
    /// The grants changed: reload them now.
    grants: tokio::sync::Notify,
}

/// Relays what other hub instances commit to the shared store (see `Hub::poll_store`): at
/// once when PostgreSQL notifies a commit ([`follow_store`]), and every [`TAIL_POLL`] in
/// any case. Returns why it stopped: the hub thread stopped, or the store was restored
/// under this instance (which must restart with the new epoch).
async fn tail_store(handle: Handle, news: std::sync::Arc<StoreNews>) -> String {
    let mut tick = tokio::time::interval(TAIL_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = news.commits.notified() => {}
        }
        match handle.call(|hub| hub.poll_store()).await {
            Ok(Ok(_)) => failing = false,
            Ok(Err(e @ syncline_core::Error::StoreReplaced)) => return e.to_string(),
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "reading what other hub instances stored failed; retrying");
                }
                failing = true;
            }
            Err(e) => return format!("the hub thread stopped: {e}"),
        }
    }
}

/// The first pause before listening again after the connection failed; it doubles up to
/// [`FOLLOW_RETRY_MAX`]. The log and the grants are polled meanwhile.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(30);

/// Listens for the commits and grant changes of every instance ([`pg::follow_store`]) and
/// wakes the task that acts on each, reconnecting after a failure (logged once until it
/// works again). Never ends.
async fn follow_store(url: String, news: std::sync::Arc<StoreNews>) {
    let mut pause = FOLLOW_RETRY;
    let failing = std::sync::atomic::AtomicBool::new(false);
    loop {
        let started = tokio::time::Instant::now();
        let Err(e) = pg::follow_store(&url, |heard| match heard {
            pg::StoreNews::Listening => {
                if failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("notified of other instances' commits and grant changes again");
                }
                // What committed before it listened was not notified: read it now.
                news.commits.notify_one();
                news.grants.notify_one();
            }
            pg::StoreNews::Commit => news.commits.notify_one(),
            pg::StoreNews::Grants => news.grants.notify_one(),
        })
        .await;
        if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "not notified of other instances' commits and grant changes; polling meanwhile, retrying");
        }
        if started.elapsed() > FOLLOW_RETRY_MAX {
            pause = FOLLOW_RETRY; // it ran for a while: a fresh failure
        }
        // Whatever changed while it was down is read now.
        news.commits.notify_one();
        news.grants.notify_one();
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(FOLLOW_RETRY_MAX);
    }
}

/// The hub machine behind a [`Handle`].
type HubOf = Hub<Box<dyn HubStore + Send>, Grants>;

/// Runs bounded steps of background work on the hub thread until it stops: one made by
/// `step` every `tick`, or after `gap` while a step reports work left. A failure is logged
/// once (`what` failed; retrying) until a step succeeds again.
async fn repeat_steps<F>(
    handle: Handle,
    tick: Duration,
    gap: Duration,
    what: &'static str,
    step: impl Fn() -> F,
) where
    F: FnOnce(&mut HubOf) -> syncline_core::Result<bool> + Send + 'static,
{
    let mut failing = false;
    let mut next = tick;
    loop {
        tokio::time::sleep(next).await;
        next = tick;
        match handle.call(step()).await {
            Ok(Ok(more)) => {
                failing = false;
                if more {
                    next = gap;
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "{what} failed; retrying");
                }
                failing = true;
            }
            Err(_) => return,
        }
    }
}

/// Drops the rolling buckets past their retention, a bounded amount every
/// [`RETENTION_TICK`] (see `Hub::expire`), until the hub thread stops. While a backlog
/// lasts (a sweep used its whole budget) it sweeps again after [`RETENTION_BACKLOG_GAP`]:
/// about a fifth of the hub thread, so drops keep up with the fastest ingest.
async fn expire_buckets(handle: Handle) {
    let sweep = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        move |hub: &mut HubOf| {
            let done = hub.expire(now, RETENTION_BUDGET)?;
            if done.docs > 0 {
                tracing::info!(
                    buckets = done.docs,
                    changes = done.changes,
                    "dropped rolling buckets past their retention"
                );
            }
            Ok(done.changes >= RETENTION_BUDGET as u64)
        }
    };
    repeat_steps(
        handle,
        RETENTION_TICK,
        RETENTION_BACKLOG_GAP,
        "dropping expired buckets",
        sweep,
    )
    .await;
}

/// Changes read into a snapshot per compaction step: about 15 ms of the hub thread.
const COMPACT_BUDGET: usize = 512;
/// How often compaction looks for a document due.
const COMPACT_TICK: Duration = Duration::from_millis(500);
/// The pause between two steps of a snapshot being built: compaction takes at most about
/// half of the hub thread, and pushes queued meanwhile go first.
const COMPACT_GAP: Duration = Duration::from_millis(15);

/// Compacts documents in bounded steps (see `Hub::compact`), until the hub thread stops.
async fn compact_docs(handle: Handle) {
    let step = || |hub: &mut HubOf| Ok(hub.compact(COMPACT_BUDGET)?.more);
    repeat_steps(
        handle,
        COMPACT_TICK,
        COMPACT_GAP,
        "compacting a document",
        step,
    )
    .await;
}

/// Reloads the grants when the store's grants version moves (the CLI or another process
/// changed them): at once when a shared store notifies the change (`news`), else at the next
/// poll, every `every`. A grant or a revoke holds on live sessions from then on, since the
/// hub checks its policy on every push and every relay. Returns when the hub thread has
/// stopped.
async fn poll_grants(
    handle: Handle,
    mut version: u64,
    applied: metrics::GrantsApplied,
    every: Duration,
    news: Option<std::sync::Arc<StoreNews>>,
) -> NetError {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let notified = async |news: &Option<std::sync::Arc<StoreNews>>| match news {
        Some(n) => n.grants.notified().await,
        None => std::future::pending().await,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = notified(&news) => {}
        }
        let seen = version;
        let reload = handle.call(move |hub| -> syncline_core::Result<Option<(u64, usize)>> {
            let v = hub.store().grants_version()?;
            if v == seen {
                return Ok(None);
            }
            let grants = hub.store().grants()?;
            let n = grants.len();
            hub.policy_mut().grants = grants;
            Ok(Some((v, n)))
        });
        match reload.await {
            Ok(Ok(Some((v, n)))) => {
                version = v;
                applied.store(v, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(grants = n, version = v, "grants reloaded");
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the grants failed; keeping the previous ones");
            }
            Err(e) => return e,
        }
    }
}
