//! `syncline-edge run`: the replica thread, the sync task and the local API, until a signal.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use syncline_core::identity::Identity;
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::store::StoreKey;
use syncline_net::client::{ReplicaHandle, SyncSettings};
use tokio::sync::watch;

use crate::api::{ApiState, router};
use crate::config::{DEFAULT_API, DataDir, write_atomically};

/// How long open requests and event streams get to finish after a signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the replica thread gets to finish what it is doing after the API stops.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often rolling documents are looked at, at most (a quarter period if shorter).
const ROLL_TICK: Duration = Duration::from_secs(5);

/// Runs the daemon on `data` until SIGTERM or SIGINT. `api` overrides the configured API
/// address.
pub async fn run(data: &DataDir, api: Option<String>) -> anyhow::Result<()> {
    let config = data.load_config()?;
    let identity = Identity::load(&data.identity()).with_context(|| {
        format!(
            "loading the device identity; run `syncline-edge init --data {}` first",
            data.root().display()
        )
    })?;
    let public_key = identity.peer_id().to_string();
    // One process owns the store: a second daemon on this directory stops here.
    let _lock = syncline_core::store::lock_dir(data.root())?;
    let store_key = config
        .db_key_file
        .as_deref()
        .map(StoreKey::load)
        .transpose()
        .context("loading the store's key (db_key_file in edge.toml)")?;
    let options = ReplicaOptions {
        store_key,
        max_store_bytes: config.max_store_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        max_cached_docs: config
            .max_cached_docs
            .unwrap_or(ReplicaOptions::default().max_cached_docs),
        rolling: config
            .rolling
            .iter()
            .map(|r| r.to_policy())
            .collect::<anyhow::Result<_>>()?,
        ..ReplicaOptions::default()
    };
    let roll_tick = options
        .rolling
        .iter()
        .map(|r| Duration::from_millis(r.period_secs().saturating_mul(250)).min(ROLL_TICK))
        .min();
    let replica = Replica::open(&data.store(), identity, options)
        .with_context(|| format!("opening the store {}", data.store().display()))?;
    let (handle, thread) = ReplicaHandle::spawn(replica)?;
    if let Some(every) = roll_tick {
        // Rolling documents move on with the clock even when nobody writes: follow the next
        // bucket, forget the oldest (Replica::roll does nothing until it is due).
        let h = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match h.call(|r| r.roll()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "rolling documents failed; retrying"),
                    Err(_) => return, // the replica has stopped
                }
            }
        });
    }

    let hubs = config
        .hub
        .iter()
        .map(|h| h.to_address())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sync = if hubs.is_empty() {
        tracing::warn!("no hub configured: working offline; writes wait in the outbox");
        None
    } else {
        tracing::info!(hubs = ?config.hub.iter().map(|h| &h.addr).collect::<Vec<_>>(), "syncing");
        Some(handle.start_sync(SyncSettings::new(hubs))?)
    };

    let api = api
        .or(config.api.clone())
        .unwrap_or_else(|| DEFAULT_API.to_owned());
    let listener = tokio::net::TcpListener::bind(&api)
        .await
        .with_context(|| format!("binding the API to {api}"))?;
    let bound: SocketAddr = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(
            %bound,
            "the API has no authentication and listens beyond loopback: any host that reaches \
             it can read and write every document"
        );
    }
    write_atomically(&data.api_addr(), format!("{bound}\n").as_bytes())?;
    println!("api on {bound} key {public_key}");

    let (stop_tx, stop_rx) = watch::channel(false);
    let state = ApiState::new(handle.clone(), public_key, stop_rx.clone());
    let mut signalled = stop_rx.clone();
    let serve = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        let _ = signalled.wait_for(|s| *s).await;
    });
    let mut draining = stop_rx;
    let drain_deadline = async move {
        let _ = draining.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        r = serve => r.context("serving the API")?,
        () = drain_deadline => tracing::warn!("open API connections did not finish in time"),
    }

    if let Some(sync) = sync {
        sync.abort();
        let _ = sync.await;
    }
    drop(handle);
    let joined = tokio::time::timeout(
        JOIN_TIMEOUT,
        tokio::task::spawn_blocking(move || thread.join()),
    )
    .await;
    match joined {
        Ok(Ok(Ok(replica))) => drop(replica),
        Ok(_) => tracing::error!("the replica thread panicked"),
        // Still held by a connection that did not close: the store is crash-safe, go anyway.
        Err(_) => tracing::warn!("the replica thread did not stop in time"),
    }
    let _ = std::fs::remove_file(data.api_addr());
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops it");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
