//! The workloads of issue 8, each against a real hub process.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use syncline_core::identity::Identity;
use syncline_core::ids::{ChangeHash, DocId, DocPrefix};
use syncline_core::ops::PathElem;
use syncline_core::ops::{Op, Value};
use syncline_core::replica::{Event, Origin};
use syncline_core::wire::Target;
use syncline_net::client::HubAddress;

use crate::fleet::{Node, now_us, open_many, percentile, wait_until, wait_uploaded};
use crate::procs::CpuClock;

/// Writes made offline in groups of this many changes (one transaction each).
const GROUP: usize = 64;

fn put(key: String, v: i64) -> Vec<Op> {
    vec![Op::Put {
        path: vec![PathElem::Key(key)],
        value: Value::Int(v),
    }]
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        Latency {
            samples: ms.len(),
            p50_ms: percentile(&ms, 50.0),
            p95_ms: percentile(&ms, 95.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Fanout {
    pub clients: usize,
    pub changes: usize,
    /// Per-client write rate (changes/s), or `None` for as fast as possible.
    pub rate: Option<f64>,
    pub seconds: f64,
    pub changes_per_sec: f64,
    pub latency: Latency,
    /// Bytes the writers sent to the hub per change (frames, QUIC payload, not headers).
    pub wire_bytes_per_change: f64,
    /// CPU time (user and system) of the bench process and the hubs from the first write to
    /// convergence, per change: the cost of a change to all of its replicas and the hub.
    pub cpu_ms_per_change: f64,
}

/// C replicas subscribed to one document, each writing M changes (one put of a key that
/// carries its write time); time until every replica holds every change, and the
/// write-to-visible latency of each change at every other replica. Replica `i` syncs with
/// `hubs[i % hubs.len()]` (several hub instances on one store: the latency crosses them).
/// `cpu` counts this process and the hubs' processes.
#[allow(clippy::too_many_arguments)]
pub async fn fanout(
    hubs: &[HubAddress],
    cpu: &CpuClock,
    dir: &Path,
    identity: &Identity,
    clients: usize,
    per_client: usize,
    rate: Option<f64>,
    within: Duration,
) -> Result<Fanout> {
    let doc = DocId::new("bench/fanout")?;
    let mut nodes = open_many(dir, "fanout", clients, identity, true)?;
    for (i, n) in nodes.iter_mut().enumerate() {
        let d = doc.clone();
        n.call(move |r| r.subscribe(Target::Doc(d))).await??;
        n.start_sync(&hubs[i % hubs.len()])?;
    }
    let target = Target::Doc(doc.clone()).key();
    wait_until("every replica to connect and subscribe", within, || async {
        for n in &nodes {
            let t = target.clone();
            let ok = n
                .call(move |r| r.status().map(|s| s.synced.contains(&t)))
                .await??;
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;

    // Every remote put seen by every replica: latency from the time in its key.
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut listeners = Vec::new();
    for n in &nodes {
        let mut events = n.handle.events();
        let samples = samples.clone();
        listeners.push(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::DocChanged {
                        origin: Origin::Remote,
                        patches,
                        ..
                    }) => {
                        let now = now_us();
                        let mut got = Vec::new();
                        for p in patches {
                            if let [PathElem::Key(k)] = &p.path[..]
                                && let Some(t) =
                                    k.rsplit('_').next().and_then(|t| t.parse::<u64>().ok())
                            {
                                got.push(now.saturating_sub(t) as f64 / 1000.0);
                            }
                        }
                        if let Ok(mut s) = samples.lock() {
                            s.extend(got);
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        }));
    }

    let bytes_before: u64 = nodes
        .iter()
        .map(|n| {
            n.handle
                .traffic()
                .bytes_out
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let cpu_before = cpu.seconds()?;
    let start = Instant::now();
    let mut writers = Vec::new();
    for (c, n) in nodes.iter().enumerate() {
        let handle = n.handle.clone();
        let doc = doc.clone();
        writers.push(tokio::spawn(async move {
            let mut last: Option<ChangeHash> = None;
            for i in 0..per_client {
                if let Some(rate) = rate {
                    // Writers spread over the period, each at `rate` changes/s.
                    let offset = c as f64 / clients as f64;
                    let at = start + Duration::from_secs_f64((i as f64 + offset) / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let doc = doc.clone();
                last = handle
                    .call(move |r| {
                        let key = format!("w{c}_{i}_{}", now_us());
                        r.change(&doc, &put(key, 1))?;
                        // A local change depends on every head: right after it, it is the
                        // only head.
                        Ok::<_, syncline_core::Error>(r.doc(&doc)?.heads().first().copied())
                    })
                    .await??;
            }
            anyhow::Ok(last)
        }));
    }
    let mut lasts = Vec::new();
    for w in writers {
        if let Some(h) = w.await?? {
            lasts.push(h);
        }
    }
    wait_until("every replica to hold every change", within, || async {
        for n in &nodes {
            if !n.has_all(&doc, &lasts).await? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = cpu.seconds()? - cpu_before;
    let bytes_after: u64 = nodes
        .iter()
        .map(|n| {
            n.handle
                .traffic()
                .bytes_out
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let changes = clients * per_client;
    // A replica answers a call before it hands out the events of the same round: the last
    // events may still be on their way to the listeners. Wait for them, bounded (a missing
    // one shows in the sample count).
    let expected = changes * (clients - 1);
    let _ = wait_until("the last change events", Duration::from_secs(5), || async {
        Ok(samples.lock().map_or(0, |s| s.len()) >= expected)
    })
    .await;
    for l in &listeners {
        l.abort();
    }
    let latency = Latency::of(samples.lock().map(|s| s.clone()).unwrap_or_default());
    for n in nodes {
        n.close().await?;
    }
    Ok(Fanout {
        clients,
        changes,
        rate,
        seconds,
        changes_per_sec: changes as f64 / seconds,
        latency,
        wire_bytes_per_change: bytes_after.saturating_sub(bytes_before) as f64 / changes as f64,
        cpu_ms_per_change: cpu_seconds * 1000.0 / changes as f64,
    })
}

/// Writes `per_doc` changes to each of `docs` (groups of [`GROUP`] per transaction), each a
/// put of a value that no earlier call wrote (`round` tells calls apart).
async fn write_offline(node: &Node, docs: Vec<DocId>, per_doc: usize, round: i64) -> Result<()> {
    let mut batch = Vec::with_capacity(GROUP);
    let flush = |batch: &mut Vec<(DocId, Vec<Op>)>| {
        let b = std::mem::take(batch);
        node.call(move |r| r.change_many(&b))
    };
    for d in &docs {
        for i in 0..per_doc {
            batch.push((
                d.clone(),
                put(format!("k{}", i % 100), round * 1_000_000_000 + i as i64),
            ));
            if batch.len() == GROUP {
                flush(&mut batch).await??;
            }
        }
    }
    if !batch.is_empty() {
        flush(&mut batch).await??;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct Ingest {
    pub writers: usize,
    pub docs: usize,
    pub changes: usize,
    pub seconds: f64,
    pub changes_per_sec: f64,
}

/// `writers` replicas each hold `docs_per_writer` documents of `per_doc` changes written
/// offline; they all connect at once. Time until the hub has acknowledged (committed) every
/// change.
/// Writer `w` uploads to `hubs[w % hubs.len()]`.
pub async fn ingest(
    hubs: &[HubAddress],
    dir: &Path,
    identity: &Identity,
    writers: usize,
    docs_per_writer: usize,
    per_doc: usize,
    within: Duration,
) -> Result<Ingest> {
    let mut nodes = open_many(dir, "ingest", writers, identity, false)?;
    for (w, n) in nodes.iter().enumerate() {
        let docs = (0..docs_per_writer)
            .map(|d| DocId::new(format!("ingest/w{w}/d{d}")))
            .collect::<Result<Vec<_>, _>>()?;
        write_offline(n, docs, per_doc, 0).await?;
    }
    let start = Instant::now();
    for (w, n) in nodes.iter_mut().enumerate() {
        n.start_sync(&hubs[w % hubs.len()])?;
    }
    wait_uploaded(&nodes, within).await?;
    let seconds = start.elapsed().as_secs_f64();
    for n in nodes {
        n.close().await?;
    }
    let changes = writers * docs_per_writer * per_doc;
    Ok(Ingest {
        writers,
        docs: writers * docs_per_writer,
        changes,
        seconds,
        changes_per_sec: changes as f64 / seconds,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct CatchUp {
    pub docs: usize,
    pub changes: usize,
    pub seconds: f64,
    pub changes_per_sec: f64,
    pub bytes_in: u64,
    /// Each run's seconds, where the workload repeats (`seconds` is their median).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs_seconds: Vec<f64>,
}

/// A writer stores `docs` documents of `per_doc` changes at the hub; then a fresh replica
/// subscribes to their prefix. Time from its first connection attempt until it holds every
/// document and has caught up.
pub async fn many_docs(
    hub: &HubAddress,
    dir: &Path,
    identity: &Identity,
    docs: usize,
    per_doc: usize,
    repeats: usize,
    within: Duration,
) -> Result<CatchUp> {
    let prefix = format!("many{docs}/");
    let mut writer = Node::open(Some(&dir.join("many-writer.sqlite")), identity, false)?;
    let ids = (0..docs)
        .map(|d| DocId::new(format!("{prefix}d{d}")))
        .collect::<Result<Vec<_>, _>>()?;
    write_offline(&writer, ids, per_doc, 0).await?;
    writer.start_sync(hub)?;
    wait_uploaded(std::slice::from_ref(&writer), within).await?;
    writer.close().await?;

    // One catch-up of 1,000 documents lasts about 0.1 s: one run is one sample of a noisy
    // machine. Each of `repeats` fresh replicas catches up in turn; the result is their
    // median, each run's time in `runs_seconds`.
    let target = Target::Prefix(DocPrefix::new(&prefix)?);
    let mut runs = Vec::with_capacity(repeats);
    let mut bytes_in = 0;
    for run in 0..repeats.max(1) {
        let path = dir.join(format!("many-fresh-{run}.sqlite"));
        let (seconds, bytes) = fresh_catch_up(hub, &path, identity, &target, docs, within)
            .await
            .with_context(|| format!("fresh replica {} of {}", run + 1, repeats.max(1)))?;
        runs.push(seconds);
        bytes_in = bytes;
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let seconds = percentile(&sorted, 50.0);
    Ok(CatchUp {
        docs,
        changes: docs * per_doc,
        seconds,
        changes_per_sec: (docs * per_doc) as f64 / seconds,
        bytes_in,
        runs_seconds: runs,
    })
}

/// A fresh replica at `path` subscribes to `target` and syncs with `hub`: seconds from its
/// first connection attempt until it holds `docs` documents and has caught up, and the bytes
/// it received.
async fn fresh_catch_up(
    hub: &HubAddress,
    path: &Path,
    identity: &Identity,
    target: &Target,
    docs: usize,
    within: Duration,
) -> Result<(f64, u64)> {
    let mut fresh = Node::open(Some(path), identity, false)?;
    let key = target.key();
    {
        let target = target.clone();
        fresh.call(move |r| r.subscribe(target)).await??;
    }
    // The end is its `Synced` event (sent once every change before the hub's `CaughtUp` is
    // committed), not a 20 ms poll, which added up to 20 ms to a catch-up of 100-200 ms and
    // queued store reads on the replica thread while it worked. Polling stays as the
    // fallback when events lag.
    let mut events = fresh.handle.events();
    let start = Instant::now();
    fresh.start_sync(hub)?;
    loop {
        match tokio::time::timeout(Duration::from_millis(20), events.recv()).await {
            Ok(Ok(Event::Synced { target: t })) if &t == target => {
                if holds_all(&fresh, &key, docs).await? {
                    break;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                anyhow::bail!("the fresh replica stopped while catching up")
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) | Err(_) => {
                if holds_all(&fresh, &key, docs).await? {
                    break;
                }
            }
        }
        if start.elapsed() > within {
            anyhow::bail!("timed out after {within:?} waiting for the fresh replica to catch up");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (bytes_in, _) = fresh.bytes();
    fresh.close().await?;
    Ok((seconds, bytes_in))
}

/// Whether `node` has caught up subscription `key` and holds `docs` documents.
async fn holds_all(node: &Node, key: &str, docs: usize) -> Result<bool> {
    let key = key.to_owned();
    node.call(move |r| -> Result<bool> {
        Ok(r.status()?.synced.contains(&key) && r.doc_ids()?.len() == docs)
    })
    .await?
}

/// Reopens the replica store at `path`, connects it, and waits until it holds `last` of `doc`:
/// seconds from the connection attempt, and bytes received and sent.
async fn reopen_until_has(
    hub: &HubAddress,
    path: &Path,
    identity: &Identity,
    doc: &DocId,
    last: &[ChangeHash],
    within: Duration,
) -> Result<(f64, u64, u64)> {
    let reader = Node::open(Some(path), identity, false)?;
    let (seconds, reader) = connect_until_has(reader, hub, doc, last, within).await?;
    let (bytes_in, bytes_out) = reader.bytes();
    reader.close().await?;
    Ok((seconds, bytes_in, bytes_out))
}

/// Connects `reader` and waits until it holds `last` of `doc`, told by its change events (a
/// poll every 20 ms would add up to 20 ms to a catch-up of tens of ms; polling stays as the
/// fallback when events lag): seconds from the connection attempt.
async fn connect_until_has(
    mut reader: Node,
    hub: &HubAddress,
    doc: &DocId,
    last: &[ChangeHash],
    within: Duration,
) -> Result<(f64, Node)> {
    let want: std::collections::BTreeSet<ChangeHash> = last.iter().copied().collect();
    let mut events = reader.handle.events();
    let start = Instant::now();
    let mut connected = None;
    reader.start_sync(hub)?;
    loop {
        match tokio::time::timeout(Duration::from_millis(20), events.recv()).await {
            Ok(Ok(Event::DocChanged { doc: d, heads, .. })) if d == *doc => {
                if heads.into_iter().collect::<std::collections::BTreeSet<_>>() == want {
                    break;
                }
            }
            Ok(Ok(Event::Connected { .. })) => {
                connected.get_or_insert(start.elapsed());
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                anyhow::bail!("the reader stopped while catching up")
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) | Err(_) => {
                if reader.has_all(doc, last).await? {
                    break;
                }
            }
        }
        if start.elapsed() > within {
            anyhow::bail!("timed out after {within:?} waiting for the reader to catch up");
        }
    }
    if let Some(c) = connected {
        say_connect_share(start.elapsed(), c);
    }
    Ok((start.elapsed().as_secs_f64(), reader))
}

/// Where a catch-up's time went, on stderr.
fn say_connect_share(total: Duration, connected: Duration) {
    eprintln!(
        "   (authenticated after {:.1} ms of {:.1} ms)",
        connected.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
}

/// The heads of `doc` at `node`.
async fn heads(node: &Node, doc: &DocId) -> Result<Vec<ChangeHash>> {
    let d = doc.clone();
    node.call(move |r| -> Result<Vec<ChangeHash>> { Ok(r.doc(&d)?.heads()) })
        .await?
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineCatchUp {
    #[serde(flatten)]
    pub catch_up: CatchUp,
    /// Whether the hub sent the document as one snapshot.
    pub snapshot: bool,
    /// Seconds from the last upload until the hub had compacted the document (in the
    /// background; not part of `seconds`).
    pub compaction_seconds: f64,
}

/// A replica that holds a document goes offline; a writer adds `changes` changes to it; the
/// hub compacts the document (in the background, as it does with every document that gains
/// many changes); the replica reopens its store and reconnects. Time until it holds every
/// change, each covered by a verified signature of its author: one per change, or, in a
/// snapshot, one per actor over the hash-linked history.
pub async fn offline_catch_up(
    hub_proc: &crate::procs::Hub,
    hub: &HubAddress,
    dir: &Path,
    identity: &Identity,
    changes: usize,
    within: Duration,
) -> Result<OfflineCatchUp> {
    let doc = DocId::new(format!("catchup/{changes}"))?;
    let path = dir.join(format!("offline-{changes}.sqlite"));
    let mut reader = Node::open(Some(&path), identity, false)?;
    let (d, key) = (doc.clone(), Target::Doc(doc.clone()).key());
    reader.call(move |r| r.subscribe(Target::Doc(d))).await??;
    reader.start_sync(hub)?;
    wait_until("the reader to subscribe", within, || async {
        let key = key.clone();
        reader
            .call(move |r| -> Result<bool> { Ok(r.status()?.synced.contains(&key)) })
            .await?
    })
    .await?;
    reader.close().await?;

    let mut writer = Node::open(
        Some(&dir.join(format!("offline-writer-{changes}.sqlite"))),
        identity,
        false,
    )?;
    write_offline(&writer, vec![doc.clone()], changes, 0).await?;
    let last = heads(&writer, &doc).await?;
    writer.start_sync(hub)?;
    wait_uploaded(std::slice::from_ref(&writer), within).await?;
    writer.close().await?;
    let uploaded = Instant::now();
    wait_until("the hub to compact the document", within, || async {
        Ok(hub_proc.metric("syncline_hub_snapshots_built_total")? >= 1.0)
    })
    .await?;
    let compaction_seconds = uploaded.elapsed().as_secs_f64();
    let (seconds, bytes_in, _) =
        reopen_until_has(hub, &path, identity, &doc, &last, within).await?;
    Ok(OfflineCatchUp {
        catch_up: CatchUp {
            docs: 1,
            changes,
            seconds,
            changes_per_sec: changes as f64 / seconds,
            bytes_in,
            runs_seconds: Vec::new(),
        },
        snapshot: hub_proc.metric("syncline_hub_snapshots_sent_total")? >= 1.0,
        compaction_seconds,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconnect {
    pub docs_held: usize,
    pub seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A replica holds `docs` documents (one subscription on their prefix), goes offline, one of
/// them gains one change, and the replica reconnects: time and bytes until it has it. The
/// work should not grow with the documents that did not change.
pub async fn reconnect(
    hub: &HubAddress,
    dir: &Path,
    identity: &Identity,
    docs: usize,
    within: Duration,
) -> Result<Reconnect> {
    let prefix = format!("held{docs}/");
    let mut writer = Node::open(
        Some(&dir.join(format!("held-writer-{docs}.sqlite"))),
        identity,
        false,
    )?;
    let ids = (0..docs)
        .map(|d| DocId::new(format!("{prefix}d{d}")))
        .collect::<Result<Vec<_>, _>>()?;
    write_offline(&writer, ids.clone(), 1, 0).await?;
    writer.start_sync(hub)?;
    wait_uploaded(std::slice::from_ref(&writer), within).await?;

    let path = dir.join(format!("held-reader-{docs}.sqlite"));
    let mut reader = Node::open(Some(&path), identity, false)?;
    let target = Target::Prefix(DocPrefix::new(&prefix)?);
    let key = target.key();
    reader.call(move |r| r.subscribe(target)).await??;
    reader.start_sync(hub)?;
    wait_until("the reader to hold every document", within, || async {
        let key = key.clone();
        reader
            .call(move |r| -> Result<bool> {
                Ok(r.status()?.synced.contains(&key) && r.doc_ids()?.len() == docs)
            })
            .await?
    })
    .await?;
    reader.close().await?;

    let changed = ids[docs / 2].clone();
    write_offline(&writer, vec![changed.clone()], 1, 1).await?;
    let last = heads(&writer, &changed).await?;
    wait_uploaded(std::slice::from_ref(&writer), within).await?;
    writer.close().await?;
    let (seconds, bytes_in, bytes_out) =
        reopen_until_has(hub, &path, identity, &changed, &last, within).await?;
    Ok(Reconnect {
        docs_held: docs,
        seconds,
        bytes_in,
        bytes_out,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub connections: usize,
    pub hub_rss_before: u64,
    pub hub_rss_after: u64,
    pub bytes_per_connection: f64,
}

/// Opens `n` idle sessions (in-memory replicas, no documents) and measures the hub's RSS.
pub async fn idle_connections(
    hub: &HubAddress,
    hub_pid: u32,
    identity: &Identity,
    n: usize,
    within: Duration,
) -> Result<Idle> {
    let before = crate::procs::rss_of(hub_pid)?;
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        let mut node = Node::open(None, identity, false)?;
        node.start_sync(hub)?;
        nodes.push(node);
    }
    wait_until("every idle replica to authenticate", within, || async {
        for n in &nodes {
            if n.call(|r| r.status().map(|s| s.hub.is_none())).await?? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    // The hub's session count settles with the last handshakes: sample for a second and keep
    // the largest value.
    let mut after = 0;
    for _ in 0..10 {
        after = after.max(crate::procs::rss_of(hub_pid)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in nodes {
        node.close().await?;
    }
    Ok(Idle {
        connections: n,
        hub_rss_before: before,
        hub_rss_after: after,
        bytes_per_connection: after.saturating_sub(before) as f64 / n as f64,
    })
}
