use std::sync::atomic::Ordering;

use serde_json::json;
use syncline_e2e::{Edge, Hub, until};

use crate::{cluster, converged, writer};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn a_hub_killed_under_load_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edges) = cluster(dir.path(), 2);
    let doc = "load/hub-kill";
    edges[0]
        .change(
            doc,
            json!([{"op":"put","path":["n"],"value":{"$counter":0}}]),
        )
        .unwrap();
    converged(&[&edges[0], &edges[1]], doc, 30);
    let (stop, acked, t) = writer(edges[0].api.clone(), doc, "n".into());
    until("writes to flow", 20, || {
        (acked.load(Ordering::Relaxed) > 30).then_some(())
    });
    let (addr, data) = (hub.addr.clone(), hub.data.clone());
    hub.proc.kill9();
    // The edge keeps acknowledging writes while the hub is down.
    let before = acked.load(Ordering::Relaxed);
    until("offline writes", 20, || {
        (acked.load(Ordering::Relaxed) > before + 20).then_some(())
    });
    let restarted_ms = now_ms();
    let _hub = Hub::start(&data, &addr);
    // The restarted hub answers the old connections' packets with a stateless reset (its
    // reset key is derived from its TLS key), so both edges, the writing one and the idle one
    // (its keepalive goes every 10 s), reconnect well before QUIC's 30 s idle timeout.
    until("both edges to reconnect to the restarted hub", 15, || {
        edges
            .iter()
            .all(|e| {
                e.status().is_ok_and(|s| {
                    s["connected"] == json!(true)
                        && s["last_connected_ms"]
                            .as_u64()
                            .is_some_and(|t| t >= restarted_ms)
                })
            })
            .then_some(())
    });
    until("more writes after the restart", 20, || {
        (acked.load(Ordering::Relaxed) > before + 40).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let total = acked.load(Ordering::Relaxed);
    let state = converged(&[&edges[0], &edges[1]], doc, 60);
    assert_eq!(state["n"], json!(total));
}

#[test]
fn an_edge_killed_under_load_uploads_every_write_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, mut edges) = cluster(dir.path(), 2);
    let doc = "load/edge-kill";
    edges[0]
        .change(
            doc,
            json!([{"op":"put","path":["n"],"value":{"$counter":0}}]),
        )
        .unwrap();
    converged(&[&edges[0], &edges[1]], doc, 30);
    let (stop, acked, t) = writer(edges[0].api.clone(), doc, "n".into());
    until("writes to flow", 20, || {
        (acked.load(Ordering::Relaxed) > 50).then_some(())
    });
    edges[0].kill9();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let total = acked.load(Ordering::Relaxed);
    edges[0].restart();
    let state = converged(&[&edges[0], &edges[1]], doc, 60);
    // Every acknowledged write is there. One more may be: the kill can land after a commit and
    // before its HTTP answer (durable, never acknowledged); the writer has one request in
    // flight at most.
    let n = state["n"].as_i64().unwrap();
    assert!(
        n == total || n == total + 1,
        "counter {n}, acknowledged {total}"
    );
}

#[test]
fn an_edge_fails_over_to_the_second_hub() {
    let dir = tempfile::tempdir().unwrap();
    // Hub A exists (it has a certificate) but is down; hub B runs.
    let a_data = dir.path().join("hub-a");
    let (code, out, err) = syncline_e2e::run(
        std::process::Command::new(syncline_e2e::bin("syncline-hub"))
            .args(["init", "--json", "--data"])
            .arg(&a_data),
    );
    assert_eq!(code, 0, "{err}");
    let a: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let b = Hub::start(&dir.path().join("hub-b"), "127.0.0.1:0");
    let data = dir.path().join("edge");
    let key = Edge::init(
        &data,
        &[
            (&closed, a["fingerprint"].as_str().unwrap()),
            (&b.addr, &b.fingerprint),
        ],
    );
    b.grant(&key, "", "rw");
    let edge = Edge::start(&data);
    let doc = "failover/doc";
    edge.change(doc, json!([{"op":"put","path":["x"],"value":1}]))
        .unwrap();
    // A second edge on hub B sees the write.
    let edge2 = b.follower(&dir.path().join("edge2"));
    converged(&[&edge, &edge2], doc, 60);
    let status = edge.status().unwrap();
    assert_eq!(status["hub"], json!(b.addr));
}
