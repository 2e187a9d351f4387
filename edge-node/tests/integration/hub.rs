//! Two edge daemons converge through a real hub (in this process, over QUIC on loopback).

use serde_json::json;
use syncline_core::hub::{AllowAll, Hub};
use syncline_core::identity::Identity;
use syncline_core::store::SqliteHubStore;
use syncline_net::server::{self, HubHandle};
use syncline_net::tls;

use crate::harness::*;

struct TestHub {
    addr: String,
    fingerprint: String,
    endpoint: quinn::Endpoint,
    _handle: HubHandle<SqliteHubStore, AllowAll>,
}

fn start_hub(dir: &std::path::Path) -> TestHub {
    let cert = tls::self_signed(vec!["localhost".into()]).unwrap();
    let fingerprint = tls::fingerprint(&cert.cert_der);
    let store = SqliteHubStore::open(&dir.join("hub.db")).unwrap();
    let hub = Hub::new(Identity::generate(), store, AllowAll, None);
    let (handle, _thread) = HubHandle::spawn(hub);
    let endpoint = quinn::Endpoint::server(
        tls::server_config(&cert).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap().to_string();
    tokio::spawn(server::serve(endpoint.clone(), handle.clone()));
    TestHub {
        addr,
        fingerprint,
        endpoint,
        _handle: handle,
    }
}

#[test]
fn two_edges_converge_through_a_hub_and_the_first_hub_down_fails_over() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _enter = runtime.enter();
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path());
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a_dir, &[(&hub.addr, &hub.fingerprint)]);
    // b's preferred hub is down: it fails over to the second.
    init(
        &b_dir,
        &[
            (&closed_port(), &hub.fingerprint),
            (&hub.addr, &hub.fingerprint),
        ],
    );
    let a = Daemon::start(&a_dir);
    let b = Daemon::start(&b_dir);
    let (status, _) = b.post("/v1/subscriptions", r#"{"prefix":"sites/"}"#);
    assert_eq!(status, 200);
    let mut events = EventStream::open(&b.addr, "/v1/docs/sites%2Fberlin/events");

    let (status, v) = a.post(
        "/v1/docs/sites%2Fberlin/changes",
        r#"{"ops":[{"op":"put","path":["stock"],"value":{"$counter":10}}]}"#,
    );
    assert_eq!(status, 200, "{v}");
    until("b to receive a's write", || {
        b.get("/v1/docs/sites%2Fberlin").1["doc"] == json!({"stock": 10})
    });
    events.wait_for("\"origin\":\"remote\"");

    let (status, _) = b.post(
        "/v1/docs/sites%2Fberlin/changes",
        r#"{"ops":[{"op":"increment","path":["stock"],"by":-3}]}"#,
    );
    assert_eq!(status, 200);
    until("both to converge", || {
        let (va, vb) = (
            a.get("/v1/docs/sites%2Fberlin").1,
            b.get("/v1/docs/sites%2Fberlin").1,
        );
        va["doc"] == json!({"stock": 7}) && va == vb
    });
    until("both outboxes to drain", || {
        a.get("/v1/status").1["outbox"] == json!(0) && b.get("/v1/status").1["outbox"] == json!(0)
    });
    let status = b.get("/v1/status").1;
    assert_eq!(status["connected"], json!(true), "{status}");
    assert_eq!(status["hub"], json!(hub.addr), "{status}");
    hub.endpoint.close(0u32.into(), b"done");
}
