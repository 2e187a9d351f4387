//! Hub retention: how fast `Hub::expire` drops rolling buckets from a SQLite hub store on
//! disk, and how long each sweep holds the hub's thread, beside the baseline measured in the
//! same run: appending the same changes in group commits of 256 (the hub's ingest path to
//! the same file).

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, ensure};
use automerge::transaction::Transactable;
use serde::Serialize;
use syncline_core::DocId;
use syncline_core::change::{self, VerifiedChange};
use syncline_core::hub::{AllowAll, Hub, RETENTION_BUDGET};
use syncline_core::identity::Identity;
use syncline_core::ids::DocPrefix;
use syncline_core::rolling::{Retention, Rolling};
use syncline_core::store::SqliteHubStore;

use crate::fleet::percentile;

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct RetentionResult {
    pub buckets: u64,
    pub changes_per_bucket: u64,
    pub store_bytes: u64,
    /// Baseline: changes appended per second, 256 per group commit.
    pub append_per_sec: f64,
    /// Changes dropped per second by back-to-back sweeps.
    pub drop_per_sec: f64,
    pub drop_over_append: f64,
    pub sweeps: u64,
    /// Time one sweep holds the hub's thread, dropping (ms).
    pub sweep_p50_ms: f64,
    pub sweep_p99_ms: f64,
    pub sweep_max_ms: f64,
    /// A sweep of 1,024 documents of which none has expired (ms).
    pub idle_sweep_ms: f64,
    /// The store file after the sweeps (freed pages stay in it, for reuse).
    pub store_bytes_after: u64,
}

fn bucket_changes(author: &Identity, doc: &DocId, n: u64) -> Result<Vec<VerifiedChange>> {
    let mut am = automerge::Automerge::new();
    am.set_actor(change::actor_for(&author.peer_id(), rand::random()));
    (0..n)
        .map(|i| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "temp", i as f64 / 10.0)?;
            tx.put(automerge::ROOT, "at", i as i64)?;
            tx.commit();
            let c = am
                .get_last_local_change()
                .ok_or_else(|| anyhow::anyhow!("no change made"))?;
            Ok(change::sign(author, doc, c)?)
        })
        .collect()
}

/// `buckets` hourly buckets of `per_bucket` readings in a hub store under `dir`, then
/// dropped by sweeps as `syncline-hub run` makes them.
pub fn measure(dir: &Path, buckets: u64, per_bucket: u64) -> Result<RetentionResult> {
    let path = dir.join("hub.db");
    let author = Identity::generate();
    let policy = Rolling::new(DocPrefix::new("gw/")?, 3600, 2).map_err(anyhow::Error::msg)?;
    let logical = DocId::new("gw/boiler")?;
    let mut store = SqliteHubStore::open(&path)?;
    let mut append_secs = 0.0;
    for b in 0..buckets {
        let Some(doc) = policy.bucket_id(&logical, 490_000 + b as i64) else {
            anyhow::bail!("bucket id too long");
        };
        let changes = bucket_changes(&author, &doc, per_bucket)?;
        let t = Instant::now();
        for part in changes.chunks(256) {
            syncline_core::store::HubStore::append(&mut store, part)?;
        }
        append_secs += t.elapsed().as_secs_f64();
    }
    let total = buckets * per_bucket;
    let store_bytes = std::fs::metadata(&path)?.len();

    let mut hub = Hub::new(author, store, AllowAll, None);
    hub.set_retention(vec![
        Retention::new(DocPrefix::new("gw/")?, 1).map_err(anyhow::Error::msg)?,
    ]);
    // Nothing has expired at time 1: a sweep only reads one page of documents.
    let t = Instant::now();
    hub.expire(1, RETENTION_BUDGET)?;
    let idle_sweep_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut sweeps = Vec::new();
    let started = Instant::now();
    let now = u64::MAX / 2;
    while hub.metrics().expired_changes < total {
        let t = Instant::now();
        hub.expire(now, RETENTION_BUDGET)?;
        sweeps.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(sweeps.len() < 1_000_000, "the sweeps do not finish");
    }
    let drop_secs = started.elapsed().as_secs_f64();
    ensure!(
        hub.metrics().expired_docs == buckets,
        "{} of {buckets} buckets dropped",
        hub.metrics().expired_docs
    );
    sweeps.sort_by(f64::total_cmp);
    let append_per_sec = total as f64 / append_secs;
    let drop_per_sec = total as f64 / drop_secs;
    Ok(RetentionResult {
        buckets,
        changes_per_bucket: per_bucket,
        store_bytes,
        append_per_sec,
        drop_per_sec,
        drop_over_append: drop_per_sec / append_per_sec,
        sweeps: sweeps.len() as u64,
        sweep_p50_ms: percentile(&sweeps, 50.0),
        sweep_p99_ms: percentile(&sweeps, 99.0),
        sweep_max_ms: sweeps.last().copied().unwrap_or(f64::NAN),
        idle_sweep_ms,
        store_bytes_after: std::fs::metadata(&path)?.len(),
    })
}
