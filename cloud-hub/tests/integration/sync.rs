//! Edge replicas (syncline-net's QUIC client) against the real hub process: grants decide who
//! connects and writes, and a revoke reaches a live session.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use syncline_core::DocId;
use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_net::client::{HubAddress, ReplicaHandle, SyncSettings};
use syncline_net::tls;

use crate::support::{HubProcess, hub};

const LIMIT: Duration = Duration::from_secs(30);

fn replica(dir: &Path, name: &str) -> (ReplicaHandle, String) {
    let id = Identity::generate();
    let key = id.peer_id().to_string();
    let r = Replica::open(&dir.join(name), id, ReplicaOptions::default()).unwrap();
    (ReplicaHandle::spawn(r).0, key)
}

fn address(p: &HubProcess) -> HubAddress {
    HubAddress {
        addr: p.addr.clone(),
        fingerprint: tls::parse_fingerprint(&p.fingerprint).unwrap(),
        key: Some(syncline_core::PeerId::from_hex(&p.key).unwrap()),
    }
}

async fn write(r: &ReplicaHandle, doc: &str, value: i64) {
    let doc = DocId::new(doc).unwrap();
    let ops =
        Op::list_from_json(&json!([{"op":"put","path":["v"],"value":value}]).to_string()).unwrap();
    r.call(move |r| r.change(&doc, &ops))
        .await
        .unwrap()
        .unwrap();
}

/// (outbox, rejected)
async fn outbox(r: &ReplicaHandle) -> (u64, u64) {
    r.call(|r| {
        let s = r.status().unwrap();
        (s.outbox, s.rejected)
    })
    .await
    .unwrap()
}

async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn grant(data: &Path, key: &str, prefix: &str, mode: &str) {
    let o = hub(&["grant", "--data", data.to_str().unwrap(), key, prefix, mode]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The hub's metric, read off the async workers (it is a blocking HTTP call).
async fn metric(p: &HubProcess, sample: &str) -> u64 {
    tokio::task::block_in_place(|| p.metric(sample))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_replica_syncs_a_write_to_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let (a, key) = replica(tmp.path(), "a.db");
    let p = HubProcess::run(&data, true);
    // Granted while the hub runs: the poller loads it.
    grant(&data, &key, "sites/", "rw");
    write(&a, "sites/berlin", 1).await;
    a.start_sync(SyncSettings::new(vec![address(&p)])).unwrap();
    until("the outbox to drain", || async {
        outbox(&a).await == (0, 0)
    })
    .await;
    assert_eq!(metric(&p, "syncline_hub_changes_stored_total").await, 1);
    assert_eq!(metric(&p, "syncline_hub_log_changes").await, 1);
    assert_eq!(metric(&p, "syncline_hub_sessions_opened_total").await, 1);
    assert_eq!(metric(&p, "syncline_hub_sessions").await, 1);
    assert!(metric(&p, "syncline_hub_commits_total").await >= 1);

    // A write on its way while the hub stops is either stored or still in the outbox.
    let mut p = p;
    write(&a, "sites/berlin", 2).await;
    p.signal("-TERM");
    let status = tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", p.logs());
    let logs = p.logs();
    assert!(logs.contains("closing the QUIC endpoint"), "{logs}");
    let (left, _) = outbox(&a).await;
    let store = syncline_core::store::SqliteHubStore::open(&data.join("hub.db")).unwrap();
    let stored = store.change_count().unwrap();
    assert!(
        stored == 2 || left == 1,
        "the write was lost: {stored} stored, {left} left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let (a, _key) = replica(tmp.path(), "a.db");
    let p = HubProcess::run(&data, true);
    write(&a, "sites/berlin", 1).await;
    a.start_sync(SyncSettings::new(vec![address(&p)])).unwrap();
    until("the hub to count an unknown peer", || async {
        metric(&p, "syncline_hub_rejects_total{reason=\"unknown_peer\"}").await >= 1
    })
    .await;
    assert_eq!(outbox(&a).await.0, 1, "nothing was acknowledged");
    assert_eq!(metric(&p, "syncline_hub_log_changes").await, 0);
    assert_eq!(metric(&p, "syncline_hub_sessions_opened_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_loses_its_write_right_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let (a, key) = replica(tmp.path(), "a.db");
    grant(&data_init(&data), &key, "", "rw");
    let p = HubProcess::run(&data, true);
    write(&a, "d/0", 0).await;
    a.start_sync(SyncSettings::new(vec![address(&p)])).unwrap();
    until("the first write to be acknowledged", || async {
        outbox(&a).await == (0, 0)
    })
    .await;

    let o = hub(&["revoke", "--data", data.to_str().unwrap(), &key]);
    assert!(o.status.success());
    let revoked = Instant::now();
    // Writes made more than a second after the revoke must be refused on the live session;
    // writes before that may still land while the hub has not reloaded.
    for i in 1.. {
        let made = Instant::now();
        write(&a, &format!("d/{i}"), i).await;
        let deadline = Instant::now() + LIMIT;
        let outcome = loop {
            let o = outbox(&a).await;
            if o.0 == 0 || o.1 > 0 {
                break o;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the hub to answer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if outcome.1 > 0 {
            break;
        }
        assert!(
            made.duration_since(revoked) < Duration::from_secs(1),
            "a write made {:?} after the revoke was accepted",
            made.duration_since(revoked)
        );
    }
    assert!(a.link().connected, "the refusal came on the live session");
    assert!(
        metric(&p, "syncline_hub_rejects_total{reason=\"not_authorized\"}").await >= 1,
        "{}",
        p.logs()
    );
    assert!(p.logs().contains("grants reloaded"), "{}", p.logs());
}

fn data_init(data: &Path) -> std::path::PathBuf {
    let o = hub(&["init", "--data", data.to_str().unwrap()]);
    assert!(o.status.success());
    data.to_owned()
}
