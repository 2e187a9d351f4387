use serde_json::json;
use syncline_e2e::{Edge, Hub, free_udp_addr, hub_init};

use crate::converged;

/// Two hubs peered both ways, each granting the other the `hub` mode.
fn peered_pair(dir: &std::path::Path) -> (Hub, Hub) {
    let (d1, d2) = (dir.join("hub1"), dir.join("hub2"));
    let ((k1, f1), (k2, f2)) = (hub_init(&d1), hub_init(&d2));
    let (a1, a2) = (free_udp_addr(), free_udp_addr());
    let h1 = Hub::start_with(&d1, &a1, &["--peer", &a2, "--peer-fingerprint", &f2]);
    let h2 = Hub::start_with(&d2, &a2, &["--peer", &a1, "--peer-fingerprint", &f1]);
    h1.grant(&k2, "", "hub");
    h2.grant(&k1, "", "hub");
    (h1, h2)
}

#[test]
fn peered_hubs_serve_the_same_data_and_an_edge_fails_over_to_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = peered_pair(dir.path());
    // Edge A prefers hub 1 and falls back to hub 2; edge B uses hub 2 only.
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let ka = Edge::init(
        &da,
        &[(&h1.addr, &h1.fingerprint), (&h2.addr, &h2.fingerprint)],
    );
    let kb = Edge::init(&db, &[(&h2.addr, &h2.fingerprint)]);
    for h in [&h1, &h2] {
        h.grant(&ka, "", "rw");
        h.grant(&kb, "", "rw");
    }
    let a = Edge::start(&da);
    let b = Edge::start(&db);
    b.subscribe("").unwrap();
    let doc = "fleet/berlin";
    a.change(
        doc,
        json!([{"op":"put","path":["n"],"value":{"$counter":1}}]),
    )
    .unwrap();
    converged(&[&a, &b], doc, 60);
    b.change(doc, json!([{"op":"increment","path":["n"],"by":10}]))
        .unwrap();
    assert_eq!(converged(&[&a, &b], doc, 60)["n"], json!(11));
    // Hub 1 dies: edge A moves to hub 2 and its data is there; writes keep converging.
    h1.proc.kill9();
    a.change(doc, json!([{"op":"increment","path":["n"],"by":100}]))
        .unwrap();
    assert_eq!(converged(&[&a, &b], doc, 60)["n"], json!(111));
    let status = a.status().unwrap();
    assert_eq!(status["hub"], json!(h2.addr), "{status}");
}
