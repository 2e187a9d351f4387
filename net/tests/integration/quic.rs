use std::time::Duration;

use serde_json::json;
use syncline_core::hub::{AllowAll, Hub};
use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Event, Replica, ReplicaOptions};
use syncline_core::store::SqliteHubStore;
use syncline_core::wire::Target;
use syncline_core::{DocId, DocPrefix};
use syncline_net::client::{HubAddress, ReplicaHandle, SyncSettings};
use syncline_net::server::{self, HubHandle};
use syncline_net::tls;

struct TestHub {
    addr: String,
    fingerprint: [u8; 32],
    endpoint: quinn::Endpoint,
    handle: HubHandle<SqliteHubStore, AllowAll>,
}

fn start_hub(dir: &std::path::Path) -> TestHub {
    let cert = tls::self_signed(vec!["localhost".into()]).unwrap();
    let fingerprint = tls::parse_fingerprint(&tls::fingerprint(&cert.cert_der)).unwrap();
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
        handle,
    }
}

fn replica(dir: &std::path::Path, name: &str) -> ReplicaHandle {
    let r = Replica::open(
        &dir.join(name),
        Identity::generate(),
        ReplicaOptions::default(),
    )
    .unwrap();
    ReplicaHandle::spawn(r).unwrap().0
}

/// A hub in `dir`, its address, and replicas `a.db` and `b.db` (`b`, opened with
/// `b_options`, subscribed to everything), not syncing yet.
async fn hub_and_pair(
    dir: &std::path::Path,
    b_options: ReplicaOptions,
) -> (TestHub, HubAddress, ReplicaHandle, ReplicaHandle) {
    let hub = start_hub(dir);
    let address = HubAddress {
        addr: hub.addr.clone(),
        fingerprint: hub.fingerprint,
        key: None,
    };
    let a = replica(dir, "a.db");
    let b = Replica::open(&dir.join("b.db"), Identity::generate(), b_options).unwrap();
    let b = ReplicaHandle::spawn(b).unwrap().0;
    b.call(|r| r.subscribe(Target::Prefix(DocPrefix::all())))
        .await
        .unwrap()
        .unwrap();
    (hub, address, a, b)
}

/// Starts `a` and `b` syncing with the hub at `address`, and waits for both sessions.
async fn start_pair(a: &ReplicaHandle, b: &ReplicaHandle, address: HubAddress) {
    a.start_sync(SyncSettings::new(vec![address.clone()]))
        .unwrap();
    b.start_sync(SyncSettings::new(vec![address])).unwrap();
    until("both sessions", || async {
        a.link().connected && b.link().connected
    })
    .await;
}

/// Waits for an event saying `doc` changed.
async fn shown(events: &mut tokio::sync::broadcast::Receiver<Event>, doc: &DocId) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Event::DocChanged { doc: d, .. }) = events.recv().await
                && &d == doc
            {
                break;
            }
        }
    })
    .await
    .expect("the change shown");
}

fn ops(j: serde_json::Value) -> Vec<Op> {
    Op::list_from_json(&j.to_string()).unwrap()
}

/// Waits for a condition, polling, up to a deadline.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_converge_through_a_hub_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, address, a, b) = hub_and_pair(dir.path(), ReplicaOptions::default()).await;
    let doc = DocId::new("sites/berlin").unwrap();
    let d = doc.clone();
    a.call(move |r| {
        r.change(
            &d,
            &ops(json!([{"op":"put","path":["n"],"value":{"$counter":0}}])),
        )
    })
    .await
    .unwrap()
    .unwrap();
    a.start_sync(SyncSettings::new(vec![address.clone()]))
        .unwrap();
    b.start_sync(SyncSettings::new(vec![address])).unwrap();
    for (r, by) in [(&a, 2), (&b, 5), (&a, 1)] {
        let d = doc.clone();
        until("the document to reach the replica", || {
            let d = d.clone();
            async move { r.call(move |r| r.doc(&d).is_ok()).await.unwrap() }
        })
        .await;
        let d = doc.clone();
        r.call(move |r| r.change(&d, &ops(json!([{"op":"increment","path":["n"],"by":by}]))))
            .await
            .unwrap()
            .unwrap();
    }
    for r in [&a, &b] {
        let d = doc.clone();
        until("both replicas to see all increments", || {
            let d = d.clone();
            async move { r.call(move |r| r.json(&d).ok()).await.unwrap() == Some(json!({"n": 8})) }
        })
        .await;
    }
    until("the outboxes to drain", || async {
        a.call(|r| r.status().unwrap().outbox).await.unwrap() == 0
            && b.call(|r| r.status().unwrap().outbox).await.unwrap() == 0
    })
    .await;
    let stored = hub
        .handle
        .call(|h| h.store().change_count().unwrap())
        .await
        .unwrap();
    assert_eq!(stored, 4);
    assert!(a.link().connected);
    hub.endpoint.close(0u32.into(), b"done");
}

/// The replica thread commits an app's change without its fsync, so that the upload can go
/// while the fsync runs, and answers the app only once the change is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_answered_once_synced_and_committed_unsynced_before() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(
        &dir.path().join("a.db"),
        Identity::generate(),
        ReplicaOptions::default(),
    )
    .unwrap();
    let (a, thread) = ReplicaHandle::spawn(r).unwrap();
    let doc = DocId::new("sites/berlin").unwrap();
    let put = |v: i64| ops(json!([{"op":"put","path":["n"],"value":v}]));
    let (d, p) = (doc.clone(), put(1));
    let unsynced_inside = a
        .call(move |r| {
            r.change(&d, &p).unwrap();
            r.unsynced()
        })
        .await
        .unwrap();
    assert!(unsynced_inside, "the change committed without its fsync");
    let (d, p) = (doc.clone(), put(2));
    a.call(move |r| r.change(&d, &p)).await.unwrap().unwrap();
    assert!(
        !a.call(|r| r.unsynced()).await.unwrap(),
        "the call was answered once its change was synced"
    );
    // Whoever takes the replica back gets it with syncs at commit again.
    drop(a);
    let mut r = thread.join().unwrap();
    assert!(!r.unsynced());
    r.change(&doc, &put(3)).unwrap();
    assert!(!r.unsynced());
    assert_eq!(r.json(&doc).unwrap(), json!({"n": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_makes_the_replica_refuse_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let mut wrong = hub.fingerprint;
    wrong[0] ^= 1;
    let a = replica(dir.path(), "a.db");
    let doc = DocId::new("d").unwrap();
    let d = doc.clone();
    a.call(move |r| r.change(&d, &ops(json!([{"op":"put","path":["x"],"value":1}]))))
        .await
        .unwrap()
        .unwrap();
    a.start_sync(SyncSettings::new(vec![HubAddress {
        addr: hub.addr.clone(),
        fingerprint: wrong,
        key: None,
    }]))
    .unwrap();
    until("a refused connection attempt", || async {
        a.link()
            .last_error
            .is_some_and(|e| e.contains("fingerprint"))
    })
    .await;
    assert!(!a.link().connected);
    let stored = hub
        .handle
        .call(|h| h.store().change_count().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored, 0,
        "nothing reached a hub the replica does not trust"
    );
    assert_eq!(a.call(|r| r.status().unwrap().outbox).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fails_over_to_the_second_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    // The first configured hub is down: nothing listens there.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let a = replica(dir.path(), "a.db");
    let doc = DocId::new("d").unwrap();
    let d = doc.clone();
    a.call(move |r| r.change(&d, &ops(json!([{"op":"put","path":["x"],"value":1}]))))
        .await
        .unwrap()
        .unwrap();
    let mut settings = SyncSettings::new(vec![
        HubAddress {
            addr: dead_addr,
            fingerprint: hub.fingerprint,
            key: None,
        },
        HubAddress {
            addr: hub.addr.clone(),
            fingerprint: hub.fingerprint,
            key: None,
        },
    ]);
    settings.connect_timeout = Duration::from_millis(500);
    a.start_sync(settings).unwrap();
    until("the write to reach the second hub", || async {
        hub.handle
            .call(|h| h.store().change_count().unwrap())
            .await
            .unwrap()
            == 1
    })
    .await;
    assert_eq!(a.link().hub.as_deref(), Some(hub.addr.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_changes_are_pushed_and_an_aborted_sync_ends_the_session_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let address = HubAddress {
        addr: hub.addr.clone(),
        fingerprint: hub.fingerprint,
        key: None,
    };
    let a = replica(dir.path(), "a.db");
    let mut link = a.link_changes();
    let wait = Duration::from_secs(20);
    let task = a
        .start_sync(SyncSettings::new(vec![address.clone()]))
        .unwrap();
    tokio::time::timeout(wait, link.wait_for(|l| l.connected))
        .await
        .expect("a pushed link change to connected")
        .unwrap();
    until("the session to be authenticated", || async {
        a.call(|r| r.status().unwrap().hub.is_some()).await.unwrap()
    })
    .await;

    // An app going to the background aborts the sync task mid-session.
    task.abort();
    let _ = task.await;
    tokio::time::timeout(wait, link.wait_for(|l| !l.connected))
        .await
        .expect("a pushed link change to disconnected")
        .unwrap();
    until("the replica to end its session", || async {
        a.call(|r| !r.is_connected()).await.unwrap()
    })
    .await;

    // Writes made meanwhile wait in the outbox and go up when sync starts again.
    let doc = DocId::new("d").unwrap();
    a.call(move |r| r.change(&doc, &ops(json!([{"op":"put","path":["x"],"value":1}]))))
        .await
        .unwrap()
        .unwrap();
    a.start_sync(SyncSettings::new(vec![address])).unwrap();
    until("the write to reach the hub after the restart", || async {
        hub.handle
            .call(|h| h.store().change_count().unwrap())
            .await
            .unwrap()
            == 1
    })
    .await;
    assert!(a.link().connected);
}

/// The replica thread shows a received change at once and commits it once quiet: its file
/// then holds it with no call to the replica (a call would commit it first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_change_that_cannot_be_stored_ends_the_session_to_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    // b is bounded to the size it has: the change it receives, once shown, cannot be stored
    // when the replica thread is quiet.
    let bounded = ReplicaOptions {
        max_store_bytes: Some(1),
        ..ReplicaOptions::default()
    };
    let (hub, address, a, b) = hub_and_pair(dir.path(), bounded).await;
    start_pair(&a, &b, address).await;
    let mut events = b.events();
    let doc = DocId::new("sites/berlin").unwrap();
    let d = doc.clone();
    let big = "x".repeat(256 * 1024);
    a.call(move |r| r.change(&d, &ops(json!([{"op":"put","path":["k"],"value":big}]))))
        .await
        .unwrap()
        .unwrap();
    shown(&mut events, &doc).await;
    // With nothing else for b to do, its failed commit ends the session, and b connects
    // again, to be sent the change again.
    until("b's next session", || async { b.link().attempts >= 2 }).await;
    // The link state names the cause, not the transport's end.
    let error = b.link().last_error.unwrap_or_default();
    assert!(
        error.contains("the session ended: the store is full"),
        "{error}"
    );
    hub.endpoint.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_change_reaches_the_file_once_the_replica_thread_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, address, a, b) = hub_and_pair(dir.path(), ReplicaOptions::default()).await;
    start_pair(&a, &b, address).await;
    let mut events = b.events();
    let doc = DocId::new("sites/berlin").unwrap();
    let d = doc.clone();
    let hash = a
        .call(move |r| {
            r.change(&d, &ops(json!([{"op":"put","path":["k"],"value":1}])))?;
            Ok::<_, syncline_core::Error>(r.doc(&d)?.heads()[0])
        })
        .await
        .unwrap()
        .unwrap();
    shown(&mut events, &doc).await;
    let file = syncline_core::store::ReplicaStore::open(&dir.path().join("b.db")).unwrap();
    until("the change in b's file", || async {
        file.has_change(&doc, &hash).unwrap()
    })
    .await;
    hub.endpoint.close(0u32.into(), b"done");
}
