//! `syncline-bench`: the end-to-end benchmark suite. It starts real `syncline-hub` processes
//! (and a `syncline-edge` for its footprint) on 127.0.0.1, drives them with replicas hosted in
//! this process (each a real replica on its own SQLite file, thread and QUIC endpoint), measures
//! the physical limits in the same run, optionally runs the Automerge reference server on the
//! same workloads, and prints a table plus JSON.
//!
//! ```sh
//! cargo build --release -p syncline-hub -p syncline-edge -p syncline-bench
//! target/release/syncline-bench --scale standard --json bench-result.json
//! ```

mod backups;
mod edges;
mod fleet;
mod floor;
mod limits;
mod longlife;
mod procs;
mod reference;
mod retention;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use syncline_core::identity::Identity;
use syncline_net::client::HubAddress;

use crate::procs::{Bins, CpuClock, Hub};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scale {
    /// Seconds: checks that every workload runs (the test suite uses it).
    Smoke,
    /// A few minutes: C up to 100, 1,000 documents, 10,000-change catch-up, 1,000 idle.
    Standard,
    /// Adds C = 1,000, 10,000 documents, 100,000-change catch-up, 10,000 idle connections.
    Full,
}

/// End-to-end benchmarks of Syncline against real hub processes on loopback.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How big.
    #[arg(long, value_enum, default_value = "standard")]
    scale: Scale,
    /// Where `syncline-hub` and `syncline-edge` are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also run the Automerge reference server (automerge-repo) on the same workloads; needs
    /// `npm ci` in the reference directory.
    #[arg(long)]
    reference: bool,
    /// The reference harness (package.json, run.mjs).
    #[arg(long, default_value = "bench/reference")]
    reference_dir: PathBuf,
    /// Only these workloads (comma separated): limits, fanout, fanout-edges, latency, ingest,
    /// many-docs, catch-up, reconnect, footprint, backup, postgres, long-life, retention.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Give up on one workload after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Changes each of the 10 replicas writes in `latency` (at 0.5 changes/s each). At the
    /// default 10, the p99 of 900 samples is the 9th slowest, nearly one change's readers;
    /// 30 gives 2,700 samples and a steadier p99 for both sides.
    #[arg(long, default_value_t = 10)]
    latency_changes: usize,
}

struct Run {
    args: Args,
    bins: Bins,
    identity: Identity,
    results: serde_json::Map<String, Value>,
    within: Duration,
    /// Targets the run judged and missed: the bench fails once its results are written.
    missed: Vec<String>,
}

impl Run {
    fn wants(&self, w: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|o| o == w)
    }

    fn record(&mut self, key: &str, v: Value) {
        self.results.insert(key.to_string(), v);
    }

    /// A fresh hub in a temp dir, its address for the replicas, and the dir.
    fn hub(&self) -> Result<(Hub, HubAddress, tempfile::TempDir)> {
        self.hub_on(None)
    }

    /// A fresh hub in a temp dir with its store in PostgreSQL at `store`, if given.
    fn hub_on(&self, store: Option<&str>) -> Result<(Hub, HubAddress, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("hub");
        let hub = Hub::start_on(
            &self.bins,
            &data,
            &self.identity.peer_id().to_string(),
            store,
        )?;
        let address = HubAddress {
            addr: hub.addr.clone(),
            fingerprint: syncline_net::tls::parse_fingerprint(&hub.fingerprint)?,
            key: None,
        };
        Ok((hub, address, dir))
    }
}

fn say(line: impl AsRef<str>) {
    eprintln!("{}", line.as_ref());
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("syncline-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary's directory")?
            .to_path_buf(),
    };
    let within = Duration::from_secs(args.timeout);
    let mut run = Run {
        bins: Bins(bin_dir),
        identity: Identity::generate(),
        results: serde_json::Map::new(),
        within,
        args,
        missed: Vec::new(),
    };
    let scale = run.args.scale;
    let smoke = scale == Scale::Smoke;
    run.record(
        "machine",
        json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "scale": format!("{scale:?}").to_lowercase(),
            "commit": option_env!("SYNCLINE_COMMIT"),
        }),
    );

    let mut slowest = f64::NAN;
    if run.wants("limits") {
        say("== physical limits (same run)");
        let l = limits::measure(if smoke { 512 } else { 8192 }).await?;
        slowest = l.slowest_ingest_part();
        say(format!(
            "automerge apply {:.0}/s, ed25519 verify {:.0}/s (batch 64: {:.0}/s), sqlite {:.0}/s (1 per txn) {:.0}/s (256 per txn), quic {:.0} msgs/s, change {:.0} B",
            l.automerge_apply_per_sec,
            l.ed25519_verify_per_sec,
            l.ed25519_verify_batch64_per_sec,
            l.sqlite_insert_1_per_txn_per_sec,
            l.sqlite_insert_256_per_txn_per_sec,
            l.quic_messages_per_sec,
            l.change_bytes
        ));
        run.record("limits", serde_json::to_value(&l)?);
    }

    if run.wants("fanout") {
        let sizes: &[(usize, usize)] = match scale {
            Scale::Smoke => &[(2, 20), (10, 5)],
            Scale::Standard => &[(2, 500), (10, 100), (100, 10)],
            Scale::Full => &[(2, 500), (10, 100), (100, 10), (1000, 2)],
        };
        let mut out = Vec::new();
        for &(c, m) in sizes {
            say(format!(
                "== fan-out: {c} replicas x {m} changes on one document"
            ));
            let (hub, addr, dir) = run.hub()?;
            let f = workloads::fanout(
                std::slice::from_ref(&addr),
                &CpuClock::new(vec![hub.proc.pid()]),
                dir.path(),
                &run.identity,
                c,
                m,
                None,
                within,
            )
            .await
            .with_context(|| format!("fan-out C={c}"))?;
            say(format!(
                "   {:.2} s to converge, {:.0} changes/s; write-to-visible p50 {:.1} ms p99 {:.1} ms ({} samples); {:.0} B on the wire per change",
                f.seconds,
                f.changes_per_sec,
                f.latency.p50_ms,
                f.latency.p99_ms,
                f.latency.samples,
                f.wire_bytes_per_change
            ));
            let mut v = serde_json::to_value(&f)?;
            if run.args.reference && c <= 100 {
                v["reference"] = reference::run(
                    &run.args.reference_dir,
                    &[
                        "--workload",
                        "fanout",
                        "--clients",
                        &c.to_string(),
                        "--changes",
                        &m.to_string(),
                    ],
                    within,
                )?;
                say(format!("   reference: {}", v["reference"]));
            }
            out.push(v);
        }
        run.record("fanout", Value::Array(out));
    }

    if run.wants("fanout-edges") {
        // The last size is the unsaturated latency run, as in `latency`.
        let sizes: &[(usize, usize, Option<f64>)] = match scale {
            Scale::Smoke => &[(2, 5, None), (3, 3, Some(2.0))],
            Scale::Standard => &[(2, 100, None), (10, 20, None), (10, 10, Some(0.5))],
            Scale::Full => &[
                (2, 100, None),
                (10, 20, None),
                (100, 5, None),
                (10, 10, Some(0.5)),
            ],
        };
        let mut out = Vec::new();
        for &(c, m, rate) in sizes {
            let pace = rate.map_or("as fast as the API answers".into(), |r| {
                format!("{r} changes/s each")
            });
            say(format!(
                "== fan-out through {c} syncline-edge processes x {m} changes, {pace} (HTTP API, event stream)"
            ));
            let (hub, _addr, dir) = run.hub()?;
            let f = tokio::task::block_in_place(|| {
                edges::fanout(&run.bins, &hub, dir.path(), c, m, rate, within)
            })
            .with_context(|| format!("fan-out through edges, C={c}"))?;
            say(format!(
                "   {:.2} s to converge, {:.0} changes/s; write-to-visible p50 {:.1} ms p99 {:.1} ms ({} samples)",
                f.seconds, f.changes_per_sec, f.latency.p50_ms, f.latency.p99_ms, f.latency.samples
            ));
            out.push(serde_json::to_value(&f)?);
        }
        run.record("fanout_edges", Value::Array(out));
    }

    if run.wants("latency") {
        // Unsaturated: 10 replicas at 0.5 changes/s each.
        let (c, m, rate) = if smoke {
            (3, 3, 2.0)
        } else {
            (10, run.args.latency_changes, 0.5)
        };
        say(format!(
            "== latency: {c} replicas writing {rate} changes/s each, {m} changes each"
        ));
        // Every side gets its writing schedule plus `--timeout` to converge: at 300 changes
        // each, the schedule alone is 600 s, the default timeout.
        let within = within + Duration::from_secs_f64(m as f64 / rate);
        let (hub, addr, dir) = run.hub()?;
        let f = workloads::fanout(
            std::slice::from_ref(&addr),
            &CpuClock::new(vec![hub.proc.pid()]),
            dir.path(),
            &run.identity,
            c,
            m,
            Some(rate),
            within,
        )
        .await
        .context("latency")?;
        say(format!(
            "   write-to-visible p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms max {:.1} ms ({} samples)",
            f.latency.p50_ms,
            f.latency.p95_ms,
            f.latency.p99_ms,
            f.latency.max_ms,
            f.latency.samples
        ));
        let mut v = serde_json::to_value(&f)?;
        say(format!(
            "   CPU of the bench process and the hub: {:.2} ms per change",
            f.cpu_ms_per_change
        ));
        // The floor, in both orders (`floor.rs`): what the path costs from raw parts.
        for (key, pipelined) in [("floor", false), ("floor_pipelined", true)] {
            let floor_dir = tempfile::tempdir()?;
            let path = floor_dir.path().to_path_buf();
            let floor = tokio::task::spawn_blocking(move || {
                floor::measure(&path, c, m, rate, pipelined, within)
            })
            .await?
            .with_context(|| format!("latency {key}"))?;
            say(format!(
                "   {key}: p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms max {:.1} ms; {:.2} ms of CPU per change",
                floor.latency.p50_ms,
                floor.latency.p95_ms,
                floor.latency.p99_ms,
                floor.latency.max_ms,
                floor.cpu_ms_per_change
            ));
            v[key] = serde_json::to_value(&floor)?;
        }
        if run.args.reference {
            v["reference"] = reference::run(
                &run.args.reference_dir,
                &[
                    "--workload",
                    "fanout",
                    "--clients",
                    &c.to_string(),
                    "--changes",
                    &m.to_string(),
                    "--rate",
                    &rate.to_string(),
                ],
                within,
            )?;
            say(format!("   reference: {}", v["reference"]));
        }
        run.record("latency", v);
    }

    if run.wants("ingest") {
        // 20,000 changes in all, from 1, 10 and 100 writers (10 documents each).
        let sizes: &[(usize, usize, usize)] = if smoke {
            &[(1, 4, 50), (2, 4, 50)]
        } else {
            &[(1, 10, 2000), (10, 10, 200), (100, 10, 20)]
        };
        let mut out = Vec::new();
        for &(w, d, k) in sizes {
            say(format!(
                "== ingest: {w} writers x {d} documents x {k} changes, uploaded at once"
            ));
            let (_hub, addr, dir) = run.hub()?;
            let i = workloads::ingest(
                std::slice::from_ref(&addr),
                dir.path(),
                &run.identity,
                w,
                d,
                k,
                within,
            )
            .await
            .context("ingest")?;
            let ratio = i.changes_per_sec / slowest;
            say(format!(
                "   {} changes acknowledged in {:.2} s: {:.0} changes/s ({:.0}% of the slowest physical limit)",
                i.changes,
                i.seconds,
                i.changes_per_sec,
                ratio * 100.0
            ));
            let mut v = serde_json::to_value(&i)?;
            v["ratio_to_slowest_limit"] = json!(ratio);
            out.push(v);
        }
        run.record("ingest", Value::Array(out));
    }

    if run.wants("many-docs") {
        let sizes: &[usize] = match scale {
            Scale::Smoke => &[50],
            Scale::Standard => &[1000],
            Scale::Full => &[1000, 10_000],
        };
        let mut out = Vec::new();
        for &docs in sizes {
            // A catch-up of 1,000 documents is one short sample (about 0.1 s here, 2.4 s for
            // the reference): both sides repeat it and report the median.
            let repeats = if docs >= 10_000 { 3 } else { 5 };
            say(format!(
                "== many documents: a fresh replica catches up {docs} documents of 10 changes \
                 (median of {repeats} fresh replicas)"
            ));
            let (_hub, addr, dir) = run.hub()?;
            let c =
                workloads::many_docs(&addr, dir.path(), &run.identity, docs, 10, repeats, within)
                    .await
                    .context("many documents")?;
            let runs: Vec<String> = c.runs_seconds.iter().map(|s| format!("{:.3}", s)).collect();
            say(format!(
                "   {:.3} s (runs {}), {:.0} changes/s, {} bytes received",
                c.seconds,
                runs.join(", "),
                c.changes_per_sec,
                c.bytes_in
            ));
            let mut v = serde_json::to_value(&c)?;
            if run.args.reference {
                // Each run of the reference is a process of its own (server, writer, fresh
                // client): fresh clients one after another against one server grow slower
                // and erratic (1.5-10 s), and fail at times, as that server ages.
                let mut runs = Vec::with_capacity(repeats);
                for r in 0..repeats {
                    say(format!("   reference run {} of {repeats}", r + 1));
                    let one = reference::run(
                        &run.args.reference_dir,
                        &[
                            "--workload",
                            "many-docs",
                            "--docs",
                            &docs.to_string(),
                            "--changes-per-doc",
                            "10",
                        ],
                        within,
                    )?;
                    let failed = one["converged"] != Value::Bool(true);
                    runs.push(one);
                    if failed {
                        break;
                    }
                }
                v["reference"] = reference::median_run(runs);
                say(format!("   reference: {}", v["reference"]));
            }
            out.push(v);
        }
        run.record("many_docs", Value::Array(out));
    }

    if run.wants("catch-up") {
        let sizes: &[usize] = match scale {
            // Over the hub's compaction threshold (`COMPACT_AFTER`), at every scale.
            Scale::Smoke => &[1_200],
            Scale::Standard => &[10_000],
            Scale::Full => &[10_000, 100_000],
        };
        let mut out = Vec::new();
        for &n in sizes {
            say(format!(
                "== offline catch-up: a replica missed {n} changes to one document"
            ));
            let (hub, addr, dir) = run.hub()?;
            let c = workloads::offline_catch_up(&hub, &addr, dir.path(), &run.identity, n, within)
                .await
                .context("offline catch-up")?;
            say(format!(
                "   {:.2} s, {:.0} changes/s, {} bytes received, {} (the hub compacted it {:.2} s after the upload)",
                c.catch_up.seconds,
                c.catch_up.changes_per_sec,
                c.catch_up.bytes_in,
                if c.snapshot {
                    "as one snapshot"
                } else {
                    "as changes"
                },
                c.compaction_seconds
            ));
            let mut v = serde_json::to_value(&c)?;
            if run.args.reference {
                v["reference"] = reference::run(
                    &run.args.reference_dir,
                    &[
                        "--workload",
                        "catch-up",
                        "--changes",
                        &n.to_string(),
                        "--reader",
                        "offline",
                    ],
                    within,
                )?;
                say(format!("   reference: {}", v["reference"]));
            }
            out.push(v);
        }
        run.record("catch_up", Value::Array(out));
    }

    if run.wants("reconnect") {
        let sizes: &[usize] = match scale {
            Scale::Smoke => &[10, 100],
            Scale::Standard => &[10, 1000],
            Scale::Full => &[10, 10_000],
        };
        let mut out = Vec::new();
        for &docs in sizes {
            say(format!(
                "== reconnect: 1 changed document among {docs} held"
            ));
            let (_hub, addr, dir) = run.hub()?;
            let r = workloads::reconnect(&addr, dir.path(), &run.identity, docs, within)
                .await
                .context("reconnect")?;
            say(format!(
                "   {:.3} s, {} bytes in, {} bytes out",
                r.seconds, r.bytes_in, r.bytes_out
            ));
            out.push(serde_json::to_value(&r)?);
        }
        run.record("reconnect", Value::Array(out));
    }

    if run.wants("postgres") {
        let (writers, docs, per_doc) = if smoke { (4, 2, 50) } else { (10, 10, 200) };
        let total = writers * docs * per_doc;
        say(format!(
            "== PostgreSQL store: ingest of {total} changes by {writers} writers, SQLite hub \
             beside 1 and 2 instances on one database; cross-instance latency"
        ));
        let pg = syncline_e2e::Postgres::start();
        let mut rows = Vec::new();
        for (label, store, instances) in [
            ("sqlite", None, 1usize),
            ("postgres, 1 instance", Some(pg.url.as_str()), 1),
            ("postgres, 2 instances", Some(pg.url.as_str()), 2),
        ] {
            let hubs: Vec<_> = (0..instances)
                .map(|_| run.hub_on(store))
                .collect::<Result<_>>()?;
            let addrs: Vec<HubAddress> = hubs.iter().map(|(_, a, _)| a.clone()).collect();
            let dir = tempfile::tempdir()?;
            let i = workloads::ingest(
                &addrs,
                dir.path(),
                &run.identity,
                writers,
                docs,
                per_doc,
                within,
            )
            .await
            .with_context(|| format!("ingest on {label}"))?;
            say(format!(
                "   {label}: {:.0} changes/s acknowledged ({:.2} s)",
                i.changes_per_sec, i.seconds
            ));
            rows.push(json!({"store": label, "instances": instances, "ingest": i}));
            drop(hubs);
        }
        // Write-to-visible across instances: two replicas, one on each, 20 changes/s each.
        let hubs: Vec<_> = (0..2)
            .map(|_| run.hub_on(Some(pg.url.as_str())))
            .collect::<Result<_>>()?;
        let addrs: Vec<HubAddress> = hubs.iter().map(|(_, a, _)| a.clone()).collect();
        let dir = tempfile::tempdir()?;
        let m = if smoke { 10 } else { 200 };
        let pids = hubs.iter().map(|(h, _, _)| h.proc.pid()).collect();
        let cross = workloads::fanout(
            &addrs,
            &CpuClock::new(pids),
            dir.path(),
            &run.identity,
            2,
            m,
            Some(20.0),
            within,
        )
        .await
        .context("cross-instance latency")?;
        say(format!(
            "   cross-instance write-to-visible at 20 changes/s per replica: p50 {:.1} ms, p99 {:.1} ms",
            cross.latency.p50_ms, cross.latency.p99_ms
        ));
        drop(hubs);
        run.record("postgres", json!({"ingest": rows, "cross_instance": cross}));
    }

    if run.wants("long-life") {
        // (days, seconds a day, rolling period, buckets kept, plain slices, slice seconds)
        let (days, day_secs, period, keep, slices, slice_secs) = match scale {
            Scale::Smoke => (3, 600, 100, 3, 2, 300),
            Scale::Standard => (3, 86_400, 3_600, 24, 2, 21_600),
            Scale::Full => (30, 86_400, 3_600, 24, 4, 21_600),
        };
        say(format!(
            "== long life: one reading a second to one logical document for {days} simulated \
             days of {day_secs} s, rolling every {period} s, {keep} buckets kept; the same to a \
             plain document for {slices} x {slice_secs} s"
        ));
        let (hub, addr, dir) = run.hub()?;
        let l = longlife::measure(
            &addr,
            &hub.data,
            dir.path(),
            &run.identity,
            days,
            slices,
            slice_secs,
            day_secs,
            period,
            keep,
            within,
        )
        .await
        .context("long life")?;
        say(format!(
            "   rolling: last day at {:.2}x day one's write rate, store at most {:.1} MB; plain: \
             last day at {:.2}x; a fresh replica caught up {} changes in {:.2} s; hub store {:.1} MB",
            l.rate_ratio,
            l.store_bytes_max as f64 / 1e6,
            l.plain_rate_ratio,
            l.fresh_replica.changes,
            l.fresh_replica.seconds,
            l.hub_store_bytes as f64 / 1e6
        ));
        let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
        say(format!(
            "   targets: write rate on the last day within 2x of day one: {}; device store \
             within {:.1} MB ({} bytes a reading for {} + 2 buckets, plus {} MiB): {}",
            verdict(l.verdict.rate_within_2x),
            l.verdict.store_bound_bytes as f64 / 1e6,
            longlife::BOUND_BYTES_PER_READING,
            keep,
            longlife::BOUND_FIXED_BYTES >> 20,
            verdict(l.verdict.store_within_bound)
        ));
        run.record("long_life", serde_json::to_value(&l)?);
        // At full scale the run is the proof of issue 9's targets: a miss fails the bench
        // (after the JSON is written).
        if scale == Scale::Full && !(l.verdict.rate_within_2x && l.verdict.store_within_bound) {
            run.missed.push("long life (see the verdict)".into());
        }
    }

    if run.wants("retention") {
        let (buckets, per_bucket) = match scale {
            Scale::Smoke => (4, 300),
            Scale::Standard => (20, 3_600),
            Scale::Full => (100, 3_600),
        };
        say(format!(
            "== retention: {buckets} hourly buckets of {per_bucket} readings in a hub store, \
             dropped by sweeps; baseline: appending them"
        ));
        let dir = tempfile::tempdir()?;
        let r = retention::measure(dir.path(), buckets, per_bucket).context("retention")?;
        say(format!(
            "   dropped {:.0} changes/s ({:.2}x the append rate of {:.0}/s); a sweep p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms; an idle sweep {:.2} ms; store {:.1} MB, {:.1} MB after",
            r.drop_per_sec,
            r.drop_over_append,
            r.append_per_sec,
            r.sweep_p50_ms,
            r.sweep_p99_ms,
            r.sweep_max_ms,
            r.idle_sweep_ms,
            r.store_bytes as f64 / 1e6,
            r.store_bytes_after as f64 / 1e6
        ));
        run.record("retention", serde_json::to_value(&r)?);
    }

    if run.wants("backup") {
        let (docs, per_doc, export) = match scale {
            Scale::Smoke => (2, 500, 500),
            Scale::Standard => (100, 1000, 10_000),
            Scale::Full => (1000, 1000, 100_000),
        };
        say(format!(
            "== backup, verify, restore: a hub store of {} changes in {docs} documents",
            docs * per_doc
        ));
        let dir = tempfile::tempdir()?;
        // A PostgreSQL server of its own for the same backup's round trip through it.
        let pg = syncline_e2e::Postgres::start();
        let b = backups::measure(
            &run.bins,
            dir.path(),
            docs,
            per_doc,
            export,
            Some(pg.url.as_str()),
        )
        .context("backup")?;
        say(format!(
            "   store {:.1} MB, backup {:.1} MB; backup {:.2} s ({:.0}/s), verify {:.2} s ({:.0}/s; \
             raw batch verify {:.0}/s), restore {:.2} s ({:.0}/s); copying the store file {:.2} s",
            b.store_bytes as f64 / 1e6,
            b.backup_bytes as f64 / 1e6,
            b.backup_seconds,
            b.backup_changes_per_sec,
            b.verify_seconds,
            b.verify_changes_per_sec,
            b.raw_verify_per_sec,
            b.restore_seconds,
            b.restore_changes_per_sec,
            b.copy_seconds
        ));
        say(format!(
            "   restore of the same backup as schema 5 wrote it (every change chained) {:.2} s",
            b.restore_unchained_seconds
        ));
        say(format!(
            "   export of one document of {} changes {:.2} s ({:.1} MB); verify-export {:.2} s ({:.0} changes/s)",
            b.export_changes,
            b.export_seconds,
            b.export_bytes as f64 / 1e6,
            b.verify_export_seconds,
            b.verify_export_changes_per_sec
        ));
        if let Some(p) = &b.postgres {
            say(format!(
                "   PostgreSQL: restore of the same backup {:.2} s ({:.0}/s); backup from it {:.2} s ({:.0}/s, {:.1} MB)",
                p.restore_seconds,
                p.restore_changes_per_sec,
                p.backup_seconds,
                p.backup_changes_per_sec,
                p.backup_bytes as f64 / 1e6
            ));
        }
        run.record("backup", serde_json::to_value(&b)?);
    }

    if run.wants("footprint") {
        let counts: &[usize] = match scale {
            Scale::Smoke => &[20],
            Scale::Standard => &[1000],
            Scale::Full => &[1000, 10_000],
        };
        let mut idle = Vec::new();
        for &n in counts {
            say(format!(
                "== footprint: hub memory with {n} idle connections"
            ));
            let (hub, addr, _dir) = run.hub()?;
            let i = workloads::idle_connections(&addr, hub.proc.pid(), &run.identity, n, within)
                .await
                .context("idle connections")?;
            say(format!(
                "   hub RSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per connection",
                i.hub_rss_before as f64 / 1048576.0,
                i.hub_rss_after as f64 / 1048576.0,
                i.bytes_per_connection / 1024.0
            ));
            idle.push(serde_json::to_value(&i)?);
        }
        say("== footprint: edge-node idle RSS and binary sizes");
        let (hub, _addr, dir) = run.hub()?;
        let edge_rss = edge_idle_rss(&run, &hub, dir.path()).await?;
        let scratch = tempfile::tempdir()?;
        let mut sizes = serde_json::Map::new();
        for name in ["syncline-edge", "syncline-hub"] {
            let (size, stripped) = procs::binary_sizes(&run.bins.path(name)?, scratch.path())?;
            say(format!(
                "   {name}: {:.1} MiB, stripped {}",
                size as f64 / 1048576.0,
                stripped.map_or("n/a".into(), |s| format!("{:.1} MiB", s as f64 / 1048576.0))
            ));
            sizes.insert(
                name.into(),
                json!({"bytes": size, "stripped_bytes": stripped}),
            );
        }
        say(format!(
            "   edge-node idle RSS {:.1} MiB",
            edge_rss as f64 / 1048576.0
        ));
        run.record(
            "footprint",
            json!({"idle_connections": idle, "edge_idle_rss": edge_rss, "binaries": sizes}),
        );
    }

    let out = Value::Object(run.results);
    println!("{}", serde_json::to_string_pretty(&out)?);
    if let Some(path) = &run.args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
        say(format!("results written to {}", path.display()));
    }
    if !run.missed.is_empty() {
        anyhow::bail!("targets missed: {}", run.missed.join(", "));
    }
    Ok(())
}

/// Starts a `syncline-edge` connected to `hub`, waits until its session is up, and returns
/// its largest RSS over one idle second.
async fn edge_idle_rss(run: &Run, hub: &Hub, dir: &std::path::Path) -> Result<u64> {
    let edge = run.bins.path("syncline-edge")?;
    let data = dir.join("edge");
    let out = std::process::Command::new(&edge)
        .args(["init", "--json", "--data"])
        .arg(&data)
        .args(["--hub", &hub.addr, "--hub-fingerprint", &hub.fingerprint])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "edge init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let key = v["public_key"].as_str().context("edge key")?;
    let status = std::process::Command::new(run.bins.path("syncline-hub")?)
        .args(["grant", "--data"])
        .arg(&hub.data)
        .args([key, "", "rw"])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "granting the edge");
    let mut proc = procs::Proc::spawn(
        std::process::Command::new(&edge)
            .args(["run", "--api", "127.0.0.1:0", "--data"])
            .arg(&data),
    )?;
    let line = proc.line_starting("api on ", Duration::from_secs(30))?;
    let api = line
        .split_whitespace()
        .nth(2)
        .context("api address")?
        .to_string();
    fleet::wait_until("the edge to connect", run.within, || {
        let api = api.clone();
        async move {
            let body = tokio::task::spawn_blocking(move || reference::http_get(&api, "/v1/status"))
                .await??;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            Ok(v["connected"] == json!(true))
        }
    })
    .await?;
    let mut rss = 0;
    for _ in 0..10 {
        rss = rss.max(proc.rss()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(rss)
}
