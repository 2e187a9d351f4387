//! The physical limits, measured in the same run as the workloads so that every figure can be
//! read as a ratio: raw Automerge apply, raw ed25519 verification (one at a time and in
//! batches of 64), raw SQLite inserts with the store's durability settings, and the QUIC
//! loopback message rate.

use std::time::Instant;

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use ed25519_dalek::{Signer, SigningKey, Verifier};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Automerge `apply_changes` of 256 small changes at a time, fresh document.
    pub automerge_apply_per_sec: f64,
    /// ed25519 `verify_strict`, one at a time.
    pub ed25519_verify_per_sec: f64,
    /// ed25519 `verify_batch` of 64.
    pub ed25519_verify_batch64_per_sec: f64,
    /// SQLite rows/s, WAL, `synchronous=FULL`, one row per transaction.
    pub sqlite_insert_1_per_txn_per_sec: f64,
    /// SQLite rows/s, WAL, `synchronous=FULL`, 256 rows per transaction.
    pub sqlite_insert_256_per_txn_per_sec: f64,
    /// 131-byte length-prefixed messages/s over one QUIC stream on 127.0.0.1.
    pub quic_messages_per_sec: f64,
    /// Mean size of the small change used throughout (bytes of the Automerge change).
    pub change_bytes: f64,
}

impl Limits {
    /// The slowest per-change part of durable ingest (verify in batches, apply, insert in
    /// groups): the bound an end-to-end ingest is compared with.
    pub fn slowest_ingest_part(&self) -> f64 {
        self.ed25519_verify_batch64_per_sec
            .min(self.automerge_apply_per_sec)
            .min(self.sqlite_insert_256_per_txn_per_sec)
    }
}

fn rate(n: usize, start: Instant) -> f64 {
    n as f64 / start.elapsed().as_secs_f64()
}

/// Small changes by one actor, each a put into one of 1,000 keys.
fn changes(n: usize) -> Vec<automerge::Change> {
    let mut doc = automerge::Automerge::new();
    (0..n)
        .filter_map(|i| {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("s{}", i % 1000), i as i64)
                .ok()?;
            tx.commit();
            doc.get_last_local_change()
        })
        .collect()
}

/// Measures each limit on `n` small changes (a multiple of 256; 8,192 gives stable figures).
pub async fn measure(n: usize) -> Result<Limits> {
    let n = n.max(256) / 256 * 256;
    let cs = changes(n);
    let change_bytes = cs.iter().map(|c| c.raw_bytes().len()).sum::<usize>() as f64 / n as f64;

    let mut doc = automerge::Automerge::new();
    let start = Instant::now();
    for chunk in cs.chunks(256) {
        doc.apply_changes(chunk.to_vec())?;
    }
    let automerge_apply_per_sec = rate(n, start);

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let msgs: Vec<Vec<u8>> = cs.iter().map(|c| c.hash().0.to_vec()).collect();
    let sigs: Vec<_> = msgs.iter().map(|m| key.sign(m)).collect();
    let vk = key.verifying_key();
    let start = Instant::now();
    for (m, s) in msgs.iter().zip(&sigs).take(n / 4) {
        vk.verify(m, s).context("verify")?;
    }
    let ed25519_verify_per_sec = rate(n / 4, start);
    let start = Instant::now();
    for (ms, ss) in msgs.chunks(64).zip(sigs.chunks(64)) {
        let refs: Vec<&[u8]> = ms.iter().map(|m| &m[..]).collect();
        let keys = vec![vk; ms.len()];
        ed25519_dalek::verify_batch(&refs, ss, &keys).context("verify_batch")?;
    }
    let ed25519_verify_batch64_per_sec = rate(n, start);

    let dir = tempfile::tempdir()?;
    let conn = rusqlite::Connection::open(dir.path().join("limits.sqlite"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")?;
    let blob = vec![7u8; change_bytes as usize];
    let start = Instant::now();
    let singles = (n / 32).min(300);
    for _ in 0..singles {
        conn.execute("INSERT INTO t (data) VALUES (?1)", [&blob])?;
    }
    let sqlite_insert_1_per_txn_per_sec = rate(singles, start);
    let mut conn = conn;
    let start = Instant::now();
    for _ in 0..(n / 256) {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO t (data) VALUES (?1)")?;
            for _ in 0..256 {
                st.execute([&blob])?;
            }
        }
        tx.commit()?;
    }
    let sqlite_insert_256_per_txn_per_sec = rate(n, start);

    let quic_messages_per_sec = quic_rate(n * 12, 131).await?;
    Ok(Limits {
        automerge_apply_per_sec,
        ed25519_verify_per_sec,
        ed25519_verify_batch64_per_sec,
        sqlite_insert_1_per_txn_per_sec,
        sqlite_insert_256_per_txn_per_sec,
        quic_messages_per_sec,
        change_bytes,
    })
}

/// Messages/s of `size` bytes with a 4-byte length prefix, written one `write_all` each on one
/// stream of a QUIC connection (TLS 1.3, the hub's settings) on 127.0.0.1, until the receiver
/// has read them all.
async fn quic_rate(n: usize, size: usize) -> Result<f64> {
    use syncline_net::tls;
    let cert = tls::self_signed(vec!["localhost".into()])?;
    let fp = tls::parse_fingerprint(&tls::fingerprint(&cert.cert_der))?;
    let server = quinn::Endpoint::server(tls::server_config(&cert)?, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let total = n * (size + 4);
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (_send, mut recv) = conn.accept_bi().await?;
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < total {
            match recv.read(&mut buf).await? {
                Some(k) => got += k,
                None => break,
            }
        }
        anyhow::Ok(got)
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(tls::client_config(vec![fp])?);
    let conn = client.connect(addr, "localhost")?.await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(1u8, size));
    let start = Instant::now();
    for _ in 0..n {
        send.write_all(&frame).await?;
    }
    let got = receiver.await??;
    let r = rate(n, start);
    anyhow::ensure!(got == total, "received {got} of {total} bytes");
    Ok(r)
}
