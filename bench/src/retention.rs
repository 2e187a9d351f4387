//! Hub retention: how fast `Hub::expire` drops rolling buckets from a SQLite hub store on
//! disk, and how long each sweep holds the hub's thread, beside the baseline measured in the
//! same run: appending the same changes in group commits of 256 (the hub's ingest path to
//! the same file).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use syncline_core::DocId;
use syncline_core::hub::{AllowAll, Hub, RETENTION_BUDGET};
use syncline_core::identity::Identity;
use syncline_core::ids::DocPrefix;
use syncline_core::rolling::{Retention, Rolling};
use syncline_core::store::SqliteHubStore;

use crate::backups::build_store;
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

/// `buckets` hourly buckets of `per_bucket` readings (puts into 1,000 keys, as the backup
/// workload's) in a hub store under `dir`, then dropped by sweeps as `syncline-hub run`
/// makes them.
pub fn measure(dir: &Path, buckets: u64, per_bucket: u64) -> Result<RetentionResult> {
    let path = dir.join("hub.db");
    let author = Identity::generate();
    let policy = Rolling::new(DocPrefix::new("gw/")?, 3600, 2).map_err(anyhow::Error::msg)?;
    let logical = DocId::new("gw/boiler")?;
    let ids = (0..buckets)
        .map(|b| policy.bucket_id(&logical, 490_000 + b as i64))
        .collect::<Option<Vec<_>>>()
        .context("a bucket id too long")?;
    let built = build_store(&path, &author, &ids, per_bucket as usize)?;
    let store = SqliteHubStore::open(&path)?;
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
    let append_per_sec = total as f64 / built.append_secs;
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
