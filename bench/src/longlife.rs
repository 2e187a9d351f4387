//! Long life: a gateway writes one reading a second to one logical document for simulated
//! days (run as fast as the replica takes them), on a rolling policy, syncing with a real hub
//! process; beside it in the same run, the same writes to a plain document (the baseline that
//! shows why documents need a bound). Then a fresh replica catches up the rolling document.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use syncline_core::identity::Identity;
use syncline_core::ids::{DocId, DocPrefix};
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::ReplicaOptions;
use syncline_core::rolling::Rolling;
use syncline_core::wire::Target;
use syncline_net::client::HubAddress;

use crate::fleet::{Node, wait_until, wait_uploaded};

/// The simulated clock every replica of this workload reads (ms since the Unix epoch).
static SIM_MS: AtomicI64 = AtomicI64::new(0);

fn sim_clock() -> i64 {
    SIM_MS.load(Ordering::Relaxed)
}

/// 2026-01-01T00:00:00Z: day one of the simulation.
const T0: i64 = 1_767_225_600_000;
/// Readings per group commit: a gateway that commits once a minute.
const GROUP: i64 = 60;

/// The documented bound on the device's store under a rolling policy (docs/BENCHMARKS.md,
/// "Long life"): bytes per reading held, for the kept buckets, the current one and one more
/// on its way to the hub, plus a fixed part (SQLite's schema pages and a WAL that checkpoints
/// at about 4 MB).
pub const BOUND_BYTES_PER_READING: u64 = 600;
pub const BOUND_FIXED_BYTES: u64 = 8 << 20;

/// The store bound for `keep` buckets of `period_secs` readings (one a second).
pub fn store_bound(period_secs: u64, keep: u32) -> u64 {
    (u64::from(keep) + 2) * period_secs * BOUND_BYTES_PER_READING + BOUND_FIXED_BYTES
}

/// One slice of simulated time: a day for the rolling document, a quarter day for the plain
/// one (it slows down too much to write for days).
#[derive(Debug, Clone, Serialize)]
pub struct Day {
    pub day: u32,
    /// Simulated hours written by the end of this slice.
    pub hours: f64,
    pub writes_per_sec: f64,
    /// Store file plus its WAL at the end of the day.
    pub store_bytes: u64,
    pub buckets_held: usize,
    pub outbox: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Catchup {
    pub seconds: f64,
    pub changes: usize,
    pub bytes_in: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LongLife {
    pub days: u32,
    pub day_secs: i64,
    pub period_secs: u64,
    pub keep: u32,
    pub writes: u64,
    pub rolling: Vec<Day>,
    /// Last day's write rate over day one's, rolling document.
    pub rate_ratio: f64,
    pub store_bytes_max: u64,
    pub hub_store_bytes: u64,
    /// The same readings to one plain document, for `plain.len()` days.
    pub plain: Vec<Day>,
    pub plain_slice_secs: i64,
    pub plain_rate_ratio: f64,
    pub fresh_replica: Catchup,
    /// The targets, judged on this run.
    pub verdict: Verdict,
}

/// Issue 9's long-life targets, judged on one run (the fresh replica's catch-up is checked
/// as it runs: it must show the writer's state, or the workload fails).
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The last day's write rate is at least half of day one's.
    pub rate_within_2x: bool,
    /// [`store_bound`] for this run's policy.
    pub store_bound_bytes: u64,
    /// No day ended with the device's store above it.
    pub store_within_bound: bool,
}

fn store_bytes(path: &Path) -> u64 {
    let wal = path.with_extension("sqlite-wal");
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes `days` simulated days (of `day_secs` seconds: 86,400 but in the smoke run) of one
/// reading a second to `doc` through `node`; the day's write rate, store size, buckets held
/// and outbox after each day. With `settle`, each day ends by waiting (that long at most) for
/// the hub to acknowledge the day and letting the replica roll once more: a bucket is kept
/// until the hub holds it, and with a day of a few minutes (the smoke run) the last minutes'
/// acknowledgements would otherwise still be on their way when the buckets are counted.
async fn write_days(
    node: &Node,
    path: &Path,
    doc: &DocId,
    days: u32,
    day_secs: i64,
    label: &str,
    settle: Option<Duration>,
) -> Result<Vec<Day>> {
    let mut out = Vec::new();
    for day in 0..days {
        let started = Instant::now();
        for minute in 0..(day_secs / GROUP) {
            let base = T0 + (i64::from(day) * day_secs + minute * GROUP) * 1000;
            SIM_MS.store(base + (GROUP - 1) * 1000, Ordering::Relaxed);
            let group: Vec<(DocId, Vec<Op>)> = (0..GROUP)
                .map(|s| {
                    let t = base + s * 1000;
                    let put = |k: &str, v| Op::Put {
                        path: vec![PathElem::Key(k.into())],
                        value: v,
                    };
                    (
                        doc.clone(),
                        vec![
                            put(
                                "celsius",
                                Value::Float(20.0 + ((t / 1000) % 600) as f64 / 100.0),
                            ),
                            put("at", Value::Timestamp(t)),
                        ],
                    )
                })
                .collect();
            node.call(move |r| r.change_many(&group)).await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some(within) = settle {
            wait_uploaded(std::slice::from_ref(node), within).await?;
            // The roll step (at most a minute) after the day's last roll: the time the next
            // day's first minute of writes sets the clock to.
            let end = T0 + i64::from(day + 1) * day_secs * 1000;
            SIM_MS.store(end + 59_000, Ordering::Relaxed);
            node.call(|r| r.roll()).await??;
        }
        let prefix = format!("{doc}@");
        let (buckets_held, outbox) = node
            .call(move |r| -> syncline_core::Result<(usize, u64)> {
                Ok((
                    r.store().doc_ids_with_prefix(&prefix)?.len(),
                    r.status()?.outbox,
                ))
            })
            .await??;
        let d = Day {
            day: day + 1,
            hours: (i64::from(day + 1) * day_secs) as f64 / 3600.0,
            writes_per_sec: (day_secs / GROUP * GROUP) as f64 / seconds,
            store_bytes: store_bytes(path),
            buckets_held,
            outbox,
        };
        crate::say(format!(
            "   {label} {:>5.0} h: {:>6.0} writes/s, store {:>6.1} MB, {} buckets held, outbox {}",
            d.hours,
            d.writes_per_sec,
            d.store_bytes as f64 / 1e6,
            d.buckets_held,
            d.outbox
        ));
        out.push(d);
    }
    Ok(out)
}

fn ratio(days: &[Day]) -> f64 {
    match (days.first(), days.last()) {
        (Some(a), Some(b)) => b.writes_per_sec / a.writes_per_sec,
        _ => f64::NAN,
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn measure(
    hub: &HubAddress,
    hub_data: &Path,
    dir: &Path,
    identity: &Identity,
    days: u32,
    plain_slices: u32,
    plain_slice_secs: i64,
    day_secs: i64,
    period_secs: u64,
    keep: u32,
    within: Duration,
) -> Result<LongLife> {
    SIM_MS.store(T0, Ordering::Relaxed);
    let policy =
        Rolling::new(DocPrefix::new("gw/")?, period_secs, keep).map_err(anyhow::Error::msg)?;
    let options = ReplicaOptions {
        patch_events: false,
        clock: sim_clock,
        rolling: vec![policy],
        ..ReplicaOptions::default()
    };
    let logical = DocId::new("gw/boiler")?;

    // The baseline first: the same readings to a plain document, no policy.
    let plain_path = dir.join("plain.sqlite");
    let mut plain = Node::open_with(
        Some(&plain_path),
        identity,
        ReplicaOptions {
            rolling: Vec::new(),
            ..options.clone()
        },
    )?;
    plain.start_sync(hub)?;
    let plain_days = write_days(
        &plain,
        &plain_path,
        &DocId::new("plain/boiler")?,
        plain_slices,
        plain_slice_secs,
        "plain  ",
        None,
    )
    .await?;
    plain.close().await?;

    let path = dir.join("gateway.sqlite");
    let mut gateway = Node::open_with(Some(&path), identity, options.clone())?;
    gateway.start_sync(hub)?;
    let rolling = write_days(
        &gateway,
        &path,
        &logical,
        days,
        day_secs,
        "rolling",
        Some(within),
    )
    .await?;
    wait_uploaded(std::slice::from_ref(&gateway), within).await?;
    let l = logical.clone();
    let expected = gateway.call(move |r| r.json(&l)).await??;
    gateway.close().await?;

    // A fresh replica with the same policy follows the logical document.
    let mut fresh = Node::open_with(Some(&dir.join("fresh.sqlite")), identity, options)?;
    let l = logical.clone();
    fresh.call(move |r| r.subscribe(Target::Doc(l))).await??;
    let started = Instant::now();
    fresh.start_sync(hub)?;
    wait_until(
        "the fresh replica to show the gateway's state",
        within,
        || {
            let (l, expected) = (logical.clone(), expected.clone());
            let fresh = &fresh;
            async move { fresh.call(move |r| r.json(&l).ok() == Some(expected)).await }
        },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let prefix = format!("{logical}@");
    let changes = fresh
        .call(move |r| -> syncline_core::Result<usize> {
            let mut n = 0;
            for b in r.store().doc_ids_with_prefix(&prefix)? {
                n += r.doc(&b)?.changes().len();
            }
            Ok(n)
        })
        .await??;
    let fresh_replica = Catchup {
        seconds,
        changes,
        bytes_in: fresh.bytes().0,
    };
    fresh.close().await?;
    if rolling.is_empty() {
        bail!("no day was written");
    }
    let rate_ratio = ratio(&rolling);
    let store_bytes_max = rolling.iter().map(|d| d.store_bytes).max().unwrap_or(0);
    let store_bound_bytes = store_bound(period_secs, keep);
    Ok(LongLife {
        days,
        day_secs,
        period_secs,
        keep,
        writes: u64::from(days) * (day_secs / GROUP * GROUP) as u64,
        rate_ratio,
        store_bytes_max,
        hub_store_bytes: dir_bytes(hub_data),
        rolling,
        plain_rate_ratio: ratio(&plain_days),
        plain: plain_days,
        plain_slice_secs,
        fresh_replica,
        verdict: Verdict {
            rate_within_2x: rate_ratio >= 0.5,
            store_bound_bytes,
            store_within_bound: store_bytes_max <= store_bound_bytes,
        },
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
