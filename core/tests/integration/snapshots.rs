#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! Catch-up from snapshots through a real hub machine and SQLite stores on disk: the hub
//! compacts a document in bounded steps, a replica far behind takes one snapshot in place of
//! thousands of changes, ends with the same document as the writers, keeps its own
//! unacknowledged writes, reopens from disk with every change covered by a signature, and
//! refuses a snapshot the hub altered.

use std::path::Path;

use syncline_core::DocId;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::Replica;
use syncline_core::store::HubStore;

use crate::support::{TestHub, connect, hub, sync, sync_with_empty_hub};

fn replica(dir: &Path, name: &str, seed: u8) -> Replica {
    crate::support::replica_of(dir, name, seed, doc())
}

fn doc() -> DocId {
    DocId::new("plant/line-1").unwrap()
}

fn put(key: String, n: i64) -> Op {
    Op::Put {
        path: vec![PathElem::Key(key)],
        value: Value::Int(n),
    }
}

/// `n` writes from each of two writers, in turns, synced through the hub as they go. Each
/// write is a new value (a put of the value a key holds makes no change).
fn write_turns(hub: &mut TestHub, a: &mut Replica, b: &mut Replica, n: usize) {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let (sa, sb) = (connect(hub, a), connect(hub, b));
    for i in 0..n {
        let v = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        a.change(&doc(), &[put(format!("a{}", i % 50), v)]).unwrap();
        b.change(&doc(), &[put(format!("b{}", i % 50), v)]).unwrap();
        if i % 64 == 63 {
            sync(hub, &mut [(a, sa), (b, sb)]).unwrap();
        }
    }
    sync(hub, &mut [(a, sa), (b, sb)]).unwrap();
    for (r, s) in [(a, sa), (b, sb)] {
        r.disconnect();
        hub.close(s);
    }
}

/// Compaction steps until none is left; returns how many snapshots were stored.
fn compact_all(hub: &mut TestHub) -> u64 {
    let mut stored = 0;
    for _ in 0..1_000 {
        let done = hub.compact(512).unwrap();
        stored += u64::from(done.stored);
        if !done.more {
            return stored;
        }
    }
    panic!("compaction did not finish");
}

#[test]
fn a_replica_far_behind_catches_up_from_one_snapshot_with_the_writers_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    let mut reader = replica(dir.path(), "reader", 3);
    write_turns(&mut hub, &mut a, &mut b, 5);
    let s = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, s)]).unwrap();
    assert_eq!(reader.json(&doc()).unwrap(), a.json(&doc()).unwrap());
    reader.disconnect();
    hub.close(s);

    // The reader is offline while the writers make 2,000 more changes.
    write_turns(&mut hub, &mut a, &mut b, 1_000);
    assert_eq!(compact_all(&mut hub), 1, "one document due");
    let sent_before = hub.metrics().changes_sent;
    let s = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, s)]).unwrap();
    assert_eq!(reader.snapshots(), 1);
    assert_eq!(hub.metrics().snapshots_sent, 1);
    assert!(
        hub.metrics().changes_sent - sent_before < 100,
        "the snapshot replaced the changes: {} sent",
        hub.metrics().changes_sent - sent_before
    );
    let heads = a.doc(&doc()).unwrap().heads();
    assert_eq!(reader.doc(&doc()).unwrap().heads(), heads);
    assert_eq!(reader.json(&doc()).unwrap(), a.json(&doc()).unwrap());
    assert!(reader.is_synced(), "{:?}", reader.status().unwrap());

    // Live changes go on arriving after it.
    let sa = connect(&mut hub, &mut a);
    a.change(&doc(), &[put("after".into(), 1)]).unwrap();
    sync(&mut hub, &mut [(&mut a, sa), (&mut reader, s)]).unwrap();
    assert_eq!(
        reader.json(&doc()).unwrap()["after"],
        serde_json::json!(1),
        "a live change after the snapshot"
    );

    // From disk: the same document, every one of its 2,011 changes covered by a signature.
    let heads = reader.doc(&doc()).unwrap().heads();
    drop(reader);
    let mut reopened = replica(dir.path(), "reader", 3);
    assert_eq!(reopened.doc(&doc()).unwrap().heads(), heads);
    assert_eq!(reopened.verify_stored().unwrap(), 2_011);
}

#[test]
fn a_fresh_replica_takes_the_snapshot_and_later_changes_in_its_first_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    write_turns(&mut hub, &mut a, &mut b, 600);
    assert_eq!(compact_all(&mut hub), 1);
    // Changes after the snapshot come as changes.
    write_turns(&mut hub, &mut a, &mut b, 20);
    let mut fresh = replica(dir.path(), "fresh", 4);
    let s = connect(&mut hub, &mut fresh);
    sync(&mut hub, &mut [(&mut fresh, s)]).unwrap();
    assert_eq!(fresh.snapshots(), 1);
    assert_eq!(
        fresh.doc(&doc()).unwrap().heads(),
        a.doc(&doc()).unwrap().heads()
    );
    assert_eq!(fresh.verify_stored().unwrap(), 1_240);
}

#[test]
fn writes_the_hub_has_not_acknowledged_stay_on_top_of_a_snapshot_and_are_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    let mut reader = replica(dir.path(), "reader", 3);
    write_turns(&mut hub, &mut a, &mut b, 2);
    let s = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, s)]).unwrap();
    reader.disconnect();
    hub.close(s);
    // Offline, the reader writes too.
    for i in 0..3 {
        reader
            .change(&doc(), &[put(format!("mine{i}"), i)])
            .unwrap();
    }
    write_turns(&mut hub, &mut a, &mut b, 800);
    compact_all(&mut hub);
    let s = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, s)]).unwrap();
    assert_eq!(reader.snapshots(), 1);
    let json = reader.json(&doc()).unwrap();
    assert_eq!(json["mine2"], serde_json::json!(2), "its own write kept");
    assert_eq!(json["a49"], a.json(&doc()).unwrap()["a49"]);
    assert_eq!(
        reader.status().unwrap().outbox,
        0,
        "uploaded and acknowledged"
    );
    let sa = connect(&mut hub, &mut a);
    sync(&mut hub, &mut [(&mut a, sa), (&mut reader, s)]).unwrap();
    assert_eq!(
        a.doc(&doc()).unwrap().heads(),
        reader.doc(&doc()).unwrap().heads()
    );
    let held = reader
        .doc(&doc())
        .unwrap()
        .automerge()
        .get_changes_meta(&[])
        .len();
    assert_eq!((held, reader.verify_stored().unwrap()), (1_607, 1_607));
}

#[test]
fn a_snapshot_the_hub_altered_fails_the_session_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    write_turns(&mut hub, &mut a, &mut b, 600);
    compact_all(&mut hub);
    let mut stored = hub.store().snapshot(&doc()).unwrap().unwrap();
    stored.snapshot.signed[0].signature[10] ^= 1;
    hub.store().put_snapshot(&doc(), &stored).unwrap();
    let mut fresh = replica(dir.path(), "fresh", 4);
    let s = connect(&mut hub, &mut fresh);
    let err = sync(&mut hub, &mut [(&mut fresh, s)]).unwrap_err();
    assert!(
        err.to_string().contains("signature does not verify"),
        "{err}"
    );
    assert_eq!(fresh.snapshots(), 0);
    assert!(!fresh.store().has_doc(&doc()).unwrap());
}

#[test]
fn after_a_snapshot_a_repair_uploads_what_the_replica_holds_signed_and_its_outbox_empties() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub1 = hub(dir.path());
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    write_turns(&mut hub1, &mut a, &mut b, 600);
    compact_all(&mut hub1);
    let mut reader = replica(dir.path(), "reader", 3);
    let s = connect(&mut hub1, &mut reader);
    sync(&mut hub1, &mut [(&mut reader, s)]).unwrap();
    assert_eq!(reader.snapshots(), 1);
    reader.change(&doc(), &[put("mine".into(), 1)]).unwrap();
    sync(&mut hub1, &mut [(&mut reader, s)]).unwrap();
    reader.disconnect();

    // The hub is replaced by an empty one (another log): the reader repairs it with what it
    // holds signed one by one (its own change, the snapshot's signed heads), and nothing
    // stays stuck in its outbox.
    let (_other, mut hub2) = sync_with_empty_hub(&mut reader);
    assert_eq!(reader.status().unwrap().outbox, 0);
    assert_eq!(
        hub2.store().change_count().unwrap(),
        3,
        "its own and 2 heads"
    );
}
