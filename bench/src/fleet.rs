//! Replicas hosted by the bench process: each is a real `Replica` on its own SQLite file (or
//! in memory, for idle-connection counts), on its own thread, syncing with the hub process
//! over its own QUIC endpoint through `syncline-net`, exactly as the edge-node runs one.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use syncline_core::identity::Identity;
use syncline_core::ids::{ChangeHash, DocId};
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_net::client::{HubAddress, ReplicaHandle, SyncSettings};

/// One replica with its thread and sync task.
pub struct Node {
    pub handle: ReplicaHandle,
    thread: Option<std::thread::JoinHandle<Replica>>,
    sync: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens a replica on `path` (or in memory).
    pub fn open(path: Option<&Path>, identity: &Identity, patch_events: bool) -> Result<Node> {
        let options = ReplicaOptions {
            patch_events,
            ..ReplicaOptions::default()
        };
        Node::open_with(path, identity, options)
    }

    /// Opens a replica on `path` (or in memory) with these options.
    pub fn open_with(
        path: Option<&Path>,
        identity: &Identity,
        options: ReplicaOptions,
    ) -> Result<Node> {
        let replica = match path {
            Some(p) => Replica::open(p, identity.clone(), options)?,
            None => Replica::open_in_memory(identity.clone(), options)?,
        };
        let (handle, thread) = ReplicaHandle::spawn(replica)?;
        Ok(Node {
            handle,
            thread: Some(thread),
            sync: None,
        })
    }

    /// Starts syncing with `hub` (on the current tokio runtime).
    pub fn start_sync(&mut self, hub: &HubAddress) -> Result<()> {
        self.sync = Some(
            self.handle
                .start_sync(SyncSettings::new(vec![hub.clone()]))?,
        );
        Ok(())
    }

    /// Stops syncing and closes the store (the thread ends once every handle is gone).
    pub async fn close(mut self) -> Result<()> {
        if let Some(s) = self.sync.take() {
            s.abort();
            let _ = s.await;
        }
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the replica thread panicked"))?;
        }
        Ok(())
    }

    /// Runs `f` on the replica.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Replica) -> R + Send + 'static,
    ) -> Result<R> {
        Ok(self.handle.call(f).await?)
    }

    /// Whether the replica holds every change in `hashes` of `doc`.
    pub async fn has_all(&self, doc: &DocId, hashes: &[ChangeHash]) -> Result<bool> {
        let (doc, hashes) = (doc.clone(), hashes.to_vec());
        self.call(move |r| match r.doc(&doc) {
            Ok(d) => hashes.iter().all(|h| d.has_change(h)),
            Err(_) => false,
        })
        .await
    }

    /// Bytes received from and sent to hubs so far.
    pub fn bytes(&self) -> (u64, u64) {
        let t = self.handle.traffic();
        (
            t.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            t.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Local changes the hub has not acknowledged yet.
    pub async fn outbox(&self) -> Result<u64> {
        Ok(self.call(|r| r.status().map(|s| s.outbox)).await??)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.sync.take() {
            s.abort();
        }
    }
}

/// Polls `check` every 20 ms until it returns true; fails after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every node's outbox is empty (the hub acknowledged everything).
pub async fn wait_uploaded(nodes: &[Node], within: Duration) -> Result<Duration> {
    wait_until("the hub to acknowledge every change", within, || async {
        for n in nodes {
            if n.outbox().await? > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// Microseconds since the Unix epoch (timestamps written into keys for latency).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Percentile (0-100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Opens `n` nodes with stores under `dir`.
pub fn open_many(
    dir: &Path,
    name: &str,
    n: usize,
    identity: &Identity,
    patch_events: bool,
) -> Result<Vec<Node>> {
    (0..n)
        .map(|i| {
            Node::open(
                Some(&dir.join(format!("{name}-{i}.sqlite"))),
                identity,
                patch_events,
            )
            .with_context(|| format!("opening replica {i}"))
        })
        .collect()
}
