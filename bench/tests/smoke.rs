//! The benchmark suite at its smallest scale, against the workspace's debug binaries: every
//! workload runs to the end and reports numbers that hold together. (Speed is measured by
//! running the suite itself, in release, not here.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // A panic is a failed test.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_workload_runs_at_smoke_scale_and_reports_consistent_numbers() {
    let exe = env!("CARGO_BIN_EXE_syncline-bench");
    let dir = std::path::Path::new(exe).parent().unwrap();
    for bin in ["syncline-hub", "syncline-edge"] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is missing next to syncline-bench: build the workspace first \
             (`cargo test --workspace` builds it)"
        );
    }
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("result.json");
    let out = Command::new(exe)
        .args(["--scale", "smoke", "--timeout", "120", "--json"])
        .arg(&json)
        .env("SYNCLINE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "syncline-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    for f in r["fanout"].as_array().unwrap() {
        let (c, n) = (
            f["clients"].as_u64().unwrap(),
            f["changes"].as_u64().unwrap(),
        );
        // Every change was seen by every other replica, each with a latency.
        let samples = f["latency"]["samples"].as_u64().unwrap();
        assert_eq!(samples, n * (c - 1), "{f}");
        assert!(f["latency"]["p50_ms"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["latency"]["p99_ms"].as_f64() >= f["latency"]["p50_ms"].as_f64());
        // A small change costs a few hundred bytes on the wire, not kilobytes.
        let per_change = f["wire_bytes_per_change"].as_f64().unwrap();
        assert!((50.0..2000.0).contains(&per_change), "{f}");
        // And some CPU, counted from /proc (10 ms ticks: zero is possible for a short run).
        assert!(f["cpu_ms_per_change"].as_f64().unwrap() >= 0.0, "{f}");
    }
    // The latency run, beside its floor in both orders: every change at every other replica.
    let l = &r["latency"];
    let samples = l["latency"]["samples"].as_u64().unwrap();
    assert_eq!(samples, 3 * 3 * 2, "{l}");
    for key in ["floor", "floor_pipelined"] {
        assert_eq!(l[key]["latency"]["samples"].as_u64(), Some(samples), "{l}");
        assert_eq!(l[key]["pipelined"], key == "floor_pipelined", "{l}");
        assert!(l[key]["latency"]["p50_ms"].as_f64().unwrap() > 0.0, "{l}");
    }
    for (i, changes) in r["ingest"].as_array().unwrap().iter().zip([200, 400]) {
        assert_eq!(i["changes"], changes, "{i}");
        assert!(i["changes_per_sec"].as_f64().unwrap() > 0.0, "{i}");
    }
    // The same through real syncline-edge processes, their HTTP API and event streams.
    let fe = &r["fanout_edges"][0];
    assert_eq!(fe["clients"], 2, "{fe}");
    assert_eq!(fe["latency"]["samples"], 10, "{fe}");
    let md = &r["many_docs"][0];
    assert_eq!(md["docs"], 50, "{md}");
    assert!(md["bytes_in"].as_u64().unwrap() > 50 * 10 * 50, "{md}");
    // Five fresh replicas caught up in turn; the result is their median.
    let mut runs: Vec<f64> = md["runs_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 5, "{md}");
    assert!(runs.iter().all(|s| *s > 0.0), "{md}");
    runs.sort_by(f64::total_cmp);
    assert_eq!(md["seconds"].as_f64(), Some(runs[2]), "{md}");
    // The replica that missed 1,200 changes took them as one snapshot, far smaller than
    // the changes with their signatures (about 200 bytes each).
    let cu = &r["catch_up"][0];
    assert_eq!(cu["changes"], 1200, "{cu}");
    assert_eq!(cu["snapshot"], true, "{cu}");
    assert!(cu["bytes_in"].as_u64().unwrap() < 1200 * 100, "{cu}");

    // Reconnecting costs what changed (one change), not what is held (10 or 100 documents).
    let rc = r["reconnect"].as_array().unwrap();
    let small = rc[0]["bytes_in"].as_u64().unwrap();
    let large = rc[1]["bytes_in"].as_u64().unwrap();
    assert!(small > 0 && large > 0, "{rc:?}");
    assert!(
        large < small * 2,
        "10x the documents held cost {small} -> {large} bytes"
    );

    // Ingest through a SQLite hub and through 1 and 2 instances on one PostgreSQL database
    // acknowledges every change; the cross-instance latency has a sample per change.
    let pg = &r["postgres"];
    let rows = pg["ingest"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{pg}");
    for row in rows {
        assert_eq!(row["ingest"]["changes"], 400, "{row}");
        assert!(
            row["ingest"]["changes_per_sec"].as_f64().unwrap() > 0.0,
            "{row}"
        );
    }
    assert_eq!(pg["cross_instance"]["latency"]["samples"], 20, "{pg}");

    // Long life: every simulated day was written and measured, the device held no more than
    // the buckets it keeps (plus the current one), and a fresh replica caught up what they hold.
    let ll = &r["long_life"];
    let days = ll["rolling"].as_array().unwrap();
    assert_eq!(days.len(), 3, "{ll}");
    assert_eq!(ll["writes"], 3 * 600, "{ll}");
    for d in days {
        assert!(d["writes_per_sec"].as_f64().unwrap() > 0.0, "{d}");
        assert!(d["buckets_held"].as_u64().unwrap() <= 3 + 1, "{d}");
    }
    assert_eq!(ll["plain"].as_array().unwrap().len(), 2, "{ll}");
    let fresh = ll["fresh_replica"]["changes"].as_u64().unwrap();
    assert!((2 * 100..=4 * 100).contains(&fresh), "{ll}");
    // The targets (the write rate, the store bound) are judged on the full run: at this
    // scale SQLite's fixed pages dwarf the bound's readings, and a rate over seconds is no test.
    for k in ["rate_within_2x", "store_within_bound"] {
        assert!(ll["verdict"][k].is_boolean(), "{k}: {ll}");
    }

    // Retention dropped every bucket, in sweeps no bigger than the budget allows.
    let rt = &r["retention"];
    assert_eq!(rt["buckets"], 4, "{rt}");
    assert!(rt["sweeps"].as_u64().unwrap() >= 1, "{rt}");
    assert!(rt["drop_per_sec"].as_f64().unwrap() > 0.0, "{rt}");
    assert!(
        rt["sweep_max_ms"].as_f64() >= rt["sweep_p50_ms"].as_f64(),
        "{rt}"
    );

    // The backup holds every change of the store, and each step took time.
    let b = &r["backup"];
    assert_eq!(b["changes"], 1000, "{b}");
    // Through PostgreSQL and back: every change, every signature checked again.
    let pg = &b["postgres"];
    assert_eq!(pg["verified_changes"], 1000, "{b}");
    assert!(pg["restore_seconds"].as_f64().unwrap() > 0.0, "{b}");
    assert!(pg["backup_seconds"].as_f64().unwrap() > 0.0, "{b}");
    assert!(b["backup_bytes"].as_u64().unwrap() > 1000 * 100, "{b}");
    assert_eq!(b["export_changes"], 500, "{b}");
    for k in [
        "backup_seconds",
        "verify_seconds",
        "restore_seconds",
        "raw_verify_per_sec",
        "export_seconds",
        "verify_export_seconds",
    ] {
        assert!(b[k].as_f64().unwrap() > 0.0, "{k}: {b}");
    }

    let idle = &r["footprint"]["idle_connections"][0];
    assert!(
        idle["hub_rss_after"].as_u64() > idle["hub_rss_before"].as_u64(),
        "{idle}"
    );
    assert!(r["footprint"]["edge_idle_rss"].as_u64().unwrap() > 1 << 20);
    assert!(
        r["limits"]["sqlite_insert_256_per_txn_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
