//! The latency floor: the least work the `latency` workload's path needs, built from the raw
//! parts (Automerge, ed25519, rusqlite, quinn) with no engine around them, and run in the same
//! topology (C replicas, each on its own thread, SQLite file and QUIC endpoint, and one hub,
//! all on this machine's cores). It is the latency counterpart of the physical limits: what a
//! change takes from its write to its visibility when nothing but the necessary work is done.
//!
//! Each change goes the path Syncline's does, with the same durability:
//! 1. the writer makes an Automerge change, signs it, commits it to its SQLite file
//!    (`synchronous=FULL`), and sends it to the hub over its QUIC stream;
//! 2. the hub parses it, verifies the signature, commits it (`FULL`), and sends it to every
//!    other replica;
//! 3. each reader parses it, verifies the signature, applies it to its Automerge document and
//!    commits it unsynced (`NORMAL`, as Syncline commits received changes); the change is
//!    visible then, and its latency is taken.
//!
//! Pipelined, the writer sends before its commit and the hub relays before its commit (both
//! still commit durably right after, so nothing is acknowledged before it is durable): the two
//! fsyncs leave the path. Each reader shows the change once applied and commits it right
//! after, as Syncline's replica thread does since `de6af19` (it commits when quiet, a batch
//! at a time). That is the least a change can take here with every write still made.
//!
//! What it leaves out is everything else an engine does: no outbox, cursors, positions, log
//! chain, events or patches, no channels between threads (each replica and the hub do all of
//! their work on one current-thread runtime), no reconnects, no error handling beyond failing
//! the run. The hub runs as a thread of the bench process rather than as a process of its own;
//! both share the same cores either way.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use automerge::transaction::Transactable;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Serialize;
use tokio::sync::watch;

use crate::fleet::now_us;
use crate::procs::CpuClock;
use crate::workloads::Latency;

/// The floor of the `latency` workload, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub clients: usize,
    pub changes: usize,
    pub rate: f64,
    /// Whether the writer and the hub send before their durable commits.
    pub pipelined: bool,
    pub latency: Latency,
    /// CPU time (user and system) of the process from the first write to the end, per change.
    pub cpu_ms_per_change: f64,
}

/// A frame: a 4-byte length, then the write time (microseconds since the epoch, 8 bytes), the
/// signature (64 bytes) and the change.
const HEAD: usize = 8 + 64;

fn frame(t0: u64, sig: &Signature, change: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + HEAD + change.len());
    f.extend(((HEAD + change.len()) as u32).to_be_bytes());
    f.extend(t0.to_be_bytes());
    f.extend(sig.to_bytes());
    f.extend(change);
    f
}

/// Reads one frame's body; `None` at the end of the stream.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(_) => {}
        Err(_) => return Ok(None),
    }
    let len = u32::from_be_bytes(len) as usize;
    ensure!(len <= 1 << 20, "a frame of {len} bytes");
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Parses a frame body and checks its signature: the write time and the change.
fn verified(body: &[u8], key: &VerifyingKey) -> Result<(u64, automerge::Change)> {
    ensure!(body.len() > HEAD, "a frame of {} bytes", body.len());
    let t0 = u64::from_be_bytes(body[..8].try_into()?);
    let sig = Signature::from_bytes(body[8..HEAD].try_into()?);
    let change = automerge::Change::from_bytes(body[HEAD..].to_vec())?;
    key.verify_strict(&change.hash().0, &sig)
        .context("a bad signature")?;
    Ok((t0, change))
}

fn open_store(path: &std::path::Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(
        "CREATE TABLE changes (hash BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID",
    )?;
    Ok(conn)
}

/// Inserts one change in a transaction of its own, at `synchronous=FULL` or NORMAL (cached
/// statements, as the stores have).
fn store(conn: &rusqlite::Connection, full: bool, hash: &[u8], data: &[u8]) -> Result<()> {
    let level = if full {
        "PRAGMA synchronous = FULL"
    } else {
        "PRAGMA synchronous = NORMAL"
    };
    conn.prepare_cached(level)?.execute([])?;
    conn.prepare_cached("INSERT INTO changes (hash, data) VALUES (?1, ?2)")?
        .execute((hash, data))?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs the floor: `clients` replicas writing `per_client` changes each at `rate` changes/s
/// (spread over the period as in `fanout`), files under `dir`; `pipelined` sends before the
/// durable commits instead of after.
pub fn measure(
    dir: &std::path::Path,
    clients: usize,
    per_client: usize,
    rate: f64,
    pipelined: bool,
    within: Duration,
) -> Result<Floor> {
    ensure!(clients >= 2, "the floor needs two replicas or more");
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let vk = key.verifying_key();
    let cert = syncline_net::tls::self_signed(vec!["localhost".into()])?;
    let fp = syncline_net::tls::parse_fingerprint(&syncline_net::tls::fingerprint(&cert.cert_der))?;
    let server_config = syncline_net::tls::server_config(&cert)?;
    let client_config = syncline_net::tls::client_config(vec![fp])?;
    let deadline = Instant::now() + within;

    // The hub: accepts every replica's stream, then verifies, commits and relays each frame.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let hub_store = dir.join("floor-hub.sqlite");
    let hub = std::thread::spawn(move || -> Result<()> {
        runtime()?.block_on(async move {
            let conn = open_store(&hub_store)?;
            let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
            addr_tx.send(endpoint.local_addr()?)?;
            let mut sends = Vec::new();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Vec<u8>)>();
            for i in 0..clients {
                let conn = endpoint.accept().await.context("no connection")?.await?;
                let (send, mut recv) = conn.accept_bi().await?;
                sends.push(send);
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Ok(Some(body)) = read_frame(&mut recv).await {
                        if tx.send((i, body)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut relayed = 0;
            while relayed < clients * per_client {
                let Some((from, body)) = rx.recv().await else {
                    bail!("the hub's replicas left after {relayed} changes");
                };
                if body.is_empty() {
                    continue; // The stream's opening frame.
                }
                let (_, change) = verified(&body, &vk)?;
                if !pipelined {
                    store(&conn, true, &change.hash().0, change.raw_bytes())?;
                }
                let mut f = (body.len() as u32).to_be_bytes().to_vec();
                f.extend(&body);
                for (to, send) in sends.iter_mut().enumerate() {
                    if to != from {
                        send.write_all(&f).await?;
                    }
                }
                if pipelined {
                    // Lets the connections send before the commit blocks the thread.
                    tokio::task::yield_now().await;
                    store(&conn, true, &change.hash().0, change.raw_bytes())?;
                }
                relayed += 1;
            }
            // Every replica leaves once it has everything: their streams end, then their
            // connections.
            while rx.recv().await.is_some() {}
            endpoint.wait_idle().await;
            Ok(())
        })
    });
    let hub_addr = addr_rx
        .recv_timeout(within)
        .map_err(|_| anyhow!("the floor's hub did not start"))?;

    // The replicas: each connects, then writes on schedule and takes in what the hub relays.
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut replicas = Vec::new();
    for c in 0..clients {
        let (key, client_config) = (key.clone(), client_config.clone());
        let (ready_tx, mut start_rx) = (ready_tx.clone(), start_rx.clone());
        let path = dir.join(format!("floor-{c}.sqlite"));
        replicas.push(std::thread::spawn(move || -> Result<Vec<f64>> {
            runtime()?.block_on(async move {
                let conn = open_store(&path)?;
                let mut doc = automerge::Automerge::new();
                let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
                endpoint.set_default_client_config(client_config);
                let link = endpoint.connect(hub_addr, "localhost")?.await?;
                let (mut send, mut recv) = link.open_bi().await?;
                send.write_all(&0u32.to_be_bytes()).await?; // Opens the stream at the hub.
                // Frames come through a task of their own (a read is not cancel-safe).
                let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Ok(Some(body)) = read_frame(&mut recv).await {
                        if frames_tx.send(body).is_err() {
                            break;
                        }
                    }
                });
                ready_tx.send(())?;
                let start = loop {
                    if let Some(s) = *start_rx.borrow_and_update() {
                        break s;
                    }
                    start_rx.changed().await?;
                };
                let vk = key.verifying_key();
                let mut samples = Vec::with_capacity((clients - 1) * per_client);
                let mut written = 0;
                let offset = c as f64 / clients as f64;
                let next = |i: usize| start + Duration::from_secs_f64((i as f64 + offset) / rate);
                while written < per_client || samples.len() < (clients - 1) * per_client {
                    let due = (written < per_client).then(|| next(written));
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.unwrap_or(deadline).into()) => {
                            if due.is_none() {
                                bail!("replica {c} timed out with {} changes in", samples.len());
                            }
                            let t0 = now_us();
                            let mut tx = doc.transaction();
                            tx.put(automerge::ROOT, format!("w{c}_{written}"), t0 as i64)?;
                            tx.commit();
                            let change = doc
                                .get_last_local_change()
                                .ok_or_else(|| anyhow!("no change"))?;
                            let sig = key.sign(&change.hash().0);
                            if !pipelined {
                                store(&conn, true, &change.hash().0, change.raw_bytes())?;
                            }
                            send.write_all(&frame(t0, &sig, change.raw_bytes())).await?;
                            if pipelined {
                                tokio::task::yield_now().await;
                                store(&conn, true, &change.hash().0, change.raw_bytes())?;
                            }
                            written += 1;
                        }
                        body = frames.recv() => {
                            let body = body.ok_or_else(|| anyhow!("the hub closed the stream"))?;
                            let (t0, change) = verified(&body, &vk)?;
                            let hash = change.hash();
                            let data = change.raw_bytes().to_vec();
                            doc.apply_changes([change])?;
                            if pipelined {
                                // Visible once applied; stored right after.
                                samples.push(now_us().saturating_sub(t0) as f64 / 1000.0);
                                store(&conn, false, &hash.0, &data)?;
                            } else {
                                store(&conn, false, &hash.0, &data)?;
                                samples.push(now_us().saturating_sub(t0) as f64 / 1000.0);
                            }
                        }
                    }
                }
                // Everything in; once the hub has read all that this replica sent, it leaves.
                send.finish()?;
                let _ = send.stopped().await;
                link.close(0u32.into(), b"done");
                endpoint.wait_idle().await;
                Ok(samples)
            })
        }));
    }
    drop(ready_tx);
    for _ in 0..clients {
        ready_rx
            .recv_timeout(within)
            .map_err(|_| anyhow!("a floor replica did not connect"))?;
    }
    let cpu = CpuClock::new(Vec::new());
    let cpu_before = cpu.seconds()?;
    // The first write a little after every replica is ready.
    start_tx.send(Some(Instant::now() + Duration::from_millis(50)))?;
    let mut samples = Vec::new();
    for r in replicas {
        samples.extend(
            r.join()
                .map_err(|_| anyhow!("a floor replica panicked"))??,
        );
    }
    hub.join()
        .map_err(|_| anyhow!("the floor's hub panicked"))??;
    let changes = clients * per_client;
    Ok(Floor {
        clients,
        changes,
        rate,
        pipelined,
        latency: Latency::of(samples),
        cpu_ms_per_change: (cpu.seconds()? - cpu_before) * 1000.0 / changes as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_reaches_every_other_replica_in_both_orders() {
        for pipelined in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let f = measure(dir.path(), 3, 4, 20.0, pipelined, Duration::from_secs(60)).unwrap();
            assert_eq!(f.latency.samples, 3 * 4 * 2, "pipelined: {pipelined}");
            assert!(f.latency.p50_ms > 0.0 && f.latency.max_ms < 60_000.0);
            // Every change is stored by its writer, the hub and both readers.
            for name in ["floor-hub", "floor-0", "floor-1", "floor-2"] {
                let conn =
                    rusqlite::Connection::open(dir.path().join(format!("{name}.sqlite"))).unwrap();
                let n: i64 = conn
                    .query_row("SELECT count(*) FROM changes", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(n, 12, "{name}, pipelined: {pipelined}");
            }
        }
    }
}
