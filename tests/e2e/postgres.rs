//! Hubs on PostgreSQL: two instances on one database serving the same data set, one of them
//! killed under load; an online backup of the database and a restore.

use std::process::Command;
use std::sync::atomic::Ordering;

use serde_json::json;
use syncline_e2e::{Edge, Hub, Postgres, bin, run, until};

use crate::{converged, writer};

#[test]
fn two_instances_on_one_database_serve_one_data_set_and_edges_fail_over_when_one_is_killed() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    // Neither instance polls the grants within the test (every 10 minutes): the grants
    // below and the revocation reach them by PostgreSQL's notifications alone.
    let store = ["--store", pg.url.as_str(), "--grants-poll-ms", "600000"];
    let a = Hub::start_with(&dir.path().join("hub-a"), "127.0.0.1:0", &store);
    let b = Hub::start_with(&dir.path().join("hub-b"), "127.0.0.1:0", &store);
    // Two edges prefer A, two prefer B; each knows both. Grants are in the shared database:
    // granted once, they hold on both instances.
    let mut keys = Vec::new();
    let edges: Vec<Edge> = (0..4)
        .map(|i| {
            let data = dir.path().join(format!("edge{i}"));
            let hubs = if i < 2 {
                [(&*a.addr, &*a.fingerprint), (&*b.addr, &*b.fingerprint)]
            } else {
                [(&*b.addr, &*b.fingerprint), (&*a.addr, &*a.fingerprint)]
            };
            let key = Edge::init(&data, &hubs);
            a.grant(&key, "", "rw");
            keys.push(key);
            let e = Edge::start(&data);
            e.subscribe("").unwrap();
            e
        })
        .collect();
    let all: Vec<&Edge> = edges.iter().collect();
    let doc = "pg/counters";
    // Each edge owns one counter; a change written through one instance reaches the edges
    // of the other.
    for (i, e) in edges.iter().enumerate() {
        let (code, body) = e
            .change(
                doc,
                json!([{"op":"put","path":[format!("c{i}")],"value":{"$counter":0}}]),
            )
            .unwrap();
        assert_eq!(code, 200, "{body}");
    }
    converged(&all, doc, 60);

    let writers: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| writer(e.api.clone(), doc, format!("c{i}")))
        .collect();
    until("writes to flow on every edge", 30, || {
        writers
            .iter()
            .all(|(_, n, _)| n.load(Ordering::Relaxed) > 10)
            .then_some(())
    });
    // Instance A dies under load; its edges move to B by themselves.
    a.proc.kill9();
    let before: Vec<i64> = writers
        .iter()
        .map(|(_, n, _)| n.load(Ordering::Relaxed))
        .collect();
    until("more writes after the kill", 30, || {
        writers
            .iter()
            .zip(&before)
            .all(|((_, n, _), b)| n.load(Ordering::Relaxed) > b + 10)
            .then_some(())
    });
    let mut acked = Vec::new();
    for (stop, n, t) in writers {
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        acked.push(n.load(Ordering::Relaxed));
    }
    // Every acknowledged write of every edge is at every edge, through instance B.
    let state = converged(&all, doc, 120);
    for (i, n) in acked.iter().enumerate() {
        assert_eq!(state[format!("c{i}")], json!(n), "edge {i}: {state}");
    }
    for e in &edges {
        until("the outbox to drain", 60, || {
            (e.status().ok()?["outbox"] == json!(0)).then_some(())
        });
    }

    let hub = |args: &[&str]| run(Command::new(bin("syncline-hub")).args(args));
    // A revocation written to the shared database holds on B (which did not make it) as
    // soon as B is notified, long before its next grants poll, as its grants-version gauge
    // shows: edge 3's next write is refused there and reaches no other edge.
    let version = |h: &Hub| h.metric("syncline_hub_grants_version");
    let granted = version(&b).expect("the grants version gauge");
    let (code, _, err) = hub(&["revoke", "--store", &pg.url, &keys[3]]);
    assert_eq!(code, 0, "{err}");
    until("B to apply the revocation", 10, || {
        (version(&b)? > granted).then_some(())
    });
    let (code, body) = edges[3]
        .change(doc, json!([{"op":"put","path":["revoked"],"value":1}]))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    until("the hub to refuse the revoked edge's write", 10, || {
        (edges[3].status().ok()?["rejected"].as_i64()? >= 1).then_some(())
    });
    let (code, body) = edges[0]
        .change(doc, json!([{"op":"put","path":["after"],"value":1}]))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    until("a granted edge's later write to arrive", 30, || {
        (edges[1].get(doc).ok()??["doc"]["after"] == json!(1)).then_some(())
    });
    let state = edges[1].get(doc).unwrap().unwrap();
    assert_eq!(state["doc"].get("revoked"), None, "{state}");

    // An online backup of the database while B serves; it verifies offline.
    let file = dir.path().join("pg.bak");
    let file = file.to_str().unwrap();
    let (code, out, err) = hub(&["backup", "--store", &pg.url, "--to", file, "--json"]);
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let total: i64 = acked.iter().sum::<i64>() + 4;
    assert!(
        info["changes"].as_i64().unwrap() >= total,
        "{info} < {total}"
    );
    let (code, _, err) = hub(&["verify", "--from", file]);
    assert_eq!(code, 0, "{err}");
    // Restoring needs every instance stopped.
    let (code, _, err) = hub(&["restore", "--from", file, "--store", &pg.url, "--force"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stop every hub instance"), "{err}");
    assert_eq!(b.proc.terminate(30), 0);
    let (code, out, err) = hub(&["restore", "--from", file, "--store", &pg.url, "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("new log epoch"), "{out}");
}
