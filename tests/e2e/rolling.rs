//! Rolling documents through real `syncline-edge` processes: a logical document written every
//! few milliseconds rolls into a new bucket every 2 s; the writing edge and a following edge
//! show the same latest state through the logical id, and each keeps only its newest buckets;
//! a hub with a retention drops the buckets past it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use syncline_e2e::{Edge, Hub, http, until};

const ROLLING: &str = "\n[[rolling]]\nprefix = \"sensors/\"\nperiod_secs = 2\nkeep = 2\n";

fn rolling_edge(hub: &Hub, data: &std::path::Path) -> Edge {
    let key = Edge::init(data, &[(&hub.addr, &hub.fingerprint)]);
    hub.grant(&key, "sensors/", "rw");
    let config = data.join("edge.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(ROLLING);
    std::fs::write(&config, text).unwrap();
    Edge::start(data)
}

fn buckets(e: &Edge, logical: &str) -> Vec<String> {
    let (code, body) = http(&e.api, "GET", "/v1/docs", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["docs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .filter(|d| d.starts_with(&format!("{logical}@2s.")))
        .map(str::to_string)
        .collect()
}

/// Writes `sensors/temp`'s `c` = 0, 1, 2... every 20 ms for `secs` seconds, checking that the
/// writer never holds more than 3 buckets; returns how many readings went and every bucket
/// the writer held meanwhile.
fn write_readings(writer: &Edge, secs: u64) -> (i64, std::collections::BTreeSet<String>) {
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let (code, body) = writer
            .change("sensors/temp", json!([{"op":"put","path":["c"],"value":i}]))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let held = buckets(writer, "sensors/temp");
        assert!(held.len() <= 3, "{held:?}");
        seen.extend(held);
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    (i, seen)
}

#[test]
fn a_rolling_document_shows_the_same_state_on_every_edge_and_keeps_its_newest_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub"), "127.0.0.1:0");
    let writer = rolling_edge(&hub, &dir.path().join("writer"));
    let reader = rolling_edge(&hub, &dir.path().join("reader"));
    let (code, body) = http(
        &reader.api,
        "POST",
        "/v1/subscriptions",
        Some(&json!({"doc": "sensors/temp"}).to_string()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");

    // Readings for 7 s: at least 3 buckets; the first write starts "unit", later buckets
    // carry it over.
    let (code, body) = writer
        .change(
            "sensors/temp",
            json!([{"op":"put","path":["unit"],"value":"C"}]),
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (i, seen) = write_readings(&writer, 7);
    assert!(seen.len() >= 3, "it rolled: {seen:?}");
    let last = json!({"unit": "C", "c": i - 1});
    let view = |e: &Edge| {
        e.get("sensors/temp")
            .ok()
            .flatten()
            .map(|v| v["doc"].clone())
    };
    assert_eq!(view(&writer), Some(last.clone()));
    until("the reader to show the writer's last reading", 20, || {
        (view(&reader) == Some(last.clone())).then_some(())
    });
    // Both settle on the 2 newest buckets held, and still show the last state.
    for e in [&writer, &reader] {
        until("old buckets to be forgotten", 20, || {
            (buckets(e, "sensors/temp").len() <= 2).then_some(())
        });
        assert_eq!(view(e), Some(last.clone()));
    }
    // The hub kept every bucket: the first is still there for an audit by its id.
    let first = seen.iter().next().unwrap().clone();
    let auditor = hub.follower(&dir.path().join("auditor"));
    until("the auditor to hold the first bucket", 20, || {
        auditor.get(&first).ok().flatten().map(|_| ())
    });
}

#[test]
fn the_hub_drops_buckets_past_its_retention() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[[retention]]\nprefix = \"sensors/\"\nmax_age_secs = 2\n",
    )
    .unwrap();
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    let writer = rolling_edge(&hub, &dir.path().join("writer"));
    let (_, seen) = write_readings(&writer, 7);
    assert!(seen.len() >= 3, "it rolled: {seen:?}");
    // A bucket ends 2 s after it starts and is dropped 2 s later.
    until("the hub to drop a bucket past its retention", 20, || {
        hub.metric("syncline_hub_expired_docs_total")
            .filter(|n| *n >= 1)
    });
    // A follower of everything gets the newest bucket, and never the first (the log is
    // served in order: had the hub kept the first, it would have come before).
    let auditor = hub.follower(&dir.path().join("auditor"));
    let newest = seen.iter().next_back().unwrap().clone();
    until("the auditor to hold the newest bucket", 20, || {
        auditor.get(&newest).ok().flatten().map(|_| ())
    });
    let first = seen.iter().next().unwrap().clone();
    assert_eq!(auditor.get(&first).unwrap(), None, "{first} was dropped");
    assert!(hub.metric("syncline_hub_expired_changes_total").unwrap() > 0);
}
