#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! Changes accepted on a later signature of their actor (`change::verify_docs_covered`),
//! through a real hub machine and SQLite stores on disk: a reader catching up a writer's run
//! checks one signature for it, stores the others as not checked, still passes its audit,
//! and re-uploads every change it holds in a repair, except one whose relayed signature a
//! hostile hub damaged, which comes back from its author instead.

use syncline_core::DocId;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::Replica;

use crate::support::{connect, hub, replica_of, sync, sync_through, sync_with_empty_hub};

fn doc() -> DocId {
    DocId::new("plant/covered").unwrap()
}

/// `n` writes by `w`, made offline, then uploaded to the hub in one session.
fn write_run(hub: &mut crate::support::TestHub, w: &mut Replica, n: i64) {
    for i in 0..n {
        w.change(
            &doc(),
            &[Op::Put {
                path: vec![PathElem::Key(format!("k{}", i % 7))],
                value: Value::Int(i),
            }],
        )
        .unwrap();
    }
    let s = connect(hub, w);
    sync(hub, &mut [(w, s)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0);
    w.disconnect();
    hub.close(s);
}

/// How many of `r`'s stored changes were accepted without their own signature checked.
fn not_checked(r: &Replica) -> usize {
    let all = r.store().all_changes().unwrap();
    all.iter().filter(|c| !c.checked).count()
}

#[test]
fn a_reader_checks_one_signature_per_run_and_a_repair_uploads_every_change_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub1 = hub(dir.path());
    let mut writer = replica_of(dir.path(), "writer", 1, doc());
    write_run(&mut hub1, &mut writer, 50);

    let mut reader = replica_of(dir.path(), "reader", 2, doc());
    let s = connect(&mut hub1, &mut reader);
    sync(&mut hub1, &mut [(&mut reader, s)]).unwrap();
    assert_eq!(reader.json(&doc()).unwrap(), writer.json(&doc()).unwrap());
    // The hub sends the run in one message here: its newest change is checked, and the 49
    // before it are in its hash-linked history.
    assert_eq!(reader.store().all_changes().unwrap().len(), 50);
    assert_eq!(not_checked(&reader), 49);
    assert_eq!(reader.verify_stored().unwrap(), 50);
    reader.disconnect();

    // The hub is replaced by an empty one (another log): the reader uploads all 50, each
    // checked on the way (the new hub verifies every signature too), and its outbox empties.
    let (_other, mut hub2) = sync_with_empty_hub(&mut reader);
    assert_eq!(reader.status().unwrap().outbox, 0);
    assert_eq!(hub2.store().change_count().unwrap(), 50);
}

#[test]
fn a_relayed_signature_a_hub_damaged_is_covered_kept_out_of_uploads_and_its_author_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub1 = hub(dir.path());
    let mut writer = replica_of(dir.path(), "writer", 1, doc());
    write_run(&mut hub1, &mut writer, 20);

    // The hub damages the relayed signature of one change that is not the run's newest.
    let mut reader = replica_of(dir.path(), "reader", 2, doc());
    let mut damaged = None;
    let s = connect(&mut hub1, &mut reader);
    sync_through(&mut hub1, &mut [(&mut reader, s)], |m| {
        if let Some(c) = m.as_changes_mut()
            && c.changes.len() == 20
        {
            c.changes[10].signature[3] ^= 0x20;
            damaged = Some(c.changes[10].clone());
        }
    })
    .unwrap();
    let damaged = damaged.expect("the run came in one message");
    assert_eq!(reader.json(&doc()).unwrap(), writer.json(&doc()).unwrap());
    let stored = reader.store().all_changes().unwrap();
    let row = stored
        .iter()
        .find(|c| c.signature == damaged.signature)
        .expect("stored as relayed");
    assert!(!row.checked);
    // The audit finds it covered by the writer's newest signature.
    assert_eq!(reader.verify_stored().unwrap(), 20);
    reader.disconnect();

    // A repair to an empty hub uploads the 19 others; the damaged one is not sent (a hub
    // would refuse the whole push), and nothing stays stuck in the outbox.
    let (_other, mut hub2) = sync_with_empty_hub(&mut reader);
    assert_eq!(reader.status().unwrap().outbox, 0);
    assert_eq!(hub2.store().change_count().unwrap(), 19);
    // Its author holds it signed and uploads it in its own repair.
    let s = connect(&mut hub2, &mut writer);
    sync(&mut hub2, &mut [(&mut writer, s)]).unwrap();
    assert_eq!(hub2.store().change_count().unwrap(), 20);

    // The audit is not fooled by the flag: the run's newest change, its signature damaged
    // on disk and marked not checked, has no later change of its actor to cover it.
    let file = rusqlite::Connection::open(dir.path().join("reader.db")).unwrap();
    let newest: i64 = file
        .query_row("SELECT max(id) FROM changes", [], |r| r.get(0))
        .unwrap();
    file.execute(
        "UPDATE changes SET checked = 0, signature = zeroblob(64) WHERE id = ?1",
        [newest],
    )
    .unwrap();
    let e = reader.verify_stored().unwrap_err();
    assert!(e.to_string().contains("covered by no signature"), "{e}");
}

#[test]
fn a_commit_of_many_documents_is_applied_on_several_threads_and_matches_the_writer() {
    use syncline_core::replica::{Event, ReplicaOptions};
    use syncline_core::wire::Target;
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let docs: Vec<DocId> = (0..40)
        .map(|d| DocId::new(format!("fleet/d{d}")).unwrap())
        .collect();
    let mut writer = replica_of(dir.path(), "writer", 1, doc());
    for (n, d) in docs.iter().enumerate() {
        for i in 0..10 {
            let value = Value::Int((n * 100 + i) as i64);
            let ops = [Op::Put {
                path: vec![PathElem::Key(format!("k{}", i % 3))],
                value,
            }];
            writer.change(d, &ops).unwrap();
        }
    }
    let s = connect(&mut hub, &mut writer);
    sync(&mut hub, &mut [(&mut writer, s)]).unwrap();
    assert_eq!(writer.status().unwrap().outbox, 0);

    let options = ReplicaOptions {
        verify_threads: 2,
        ..ReplicaOptions::default()
    };
    let identity = syncline_core::identity::Identity::from_seed([2; 32]);
    let mut reader = Replica::open(&dir.path().join("reader.db"), identity, options).unwrap();
    let prefix = syncline_core::ids::DocPrefix::new("fleet/").unwrap();
    reader.subscribe(Target::Prefix(prefix)).unwrap();
    let s = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, s)]).unwrap();
    let mut changed = std::collections::BTreeMap::new();
    while let Some(e) = reader.poll_event() {
        if let Event::DocChanged { doc, .. } = e {
            *changed.entry(doc).or_insert(0) += 1;
        }
    }
    // 400 changes of 40 documents arrive in one commit: split over two threads.
    assert_eq!(changed.len(), 40);
    assert!(
        changed.values().all(|n| *n == 1),
        "one event per document: {changed:?}"
    );
    for d in &docs {
        assert_eq!(reader.json(d).unwrap(), writer.json(d).unwrap(), "{d}");
    }
    // Reopened from disk, every document is whole and every change covered.
    drop(reader);
    let identity = syncline_core::identity::Identity::from_seed([2; 32]);
    let mut reopened = Replica::open(
        &dir.path().join("reader.db"),
        identity,
        ReplicaOptions::default(),
    )
    .unwrap();
    assert_eq!(reopened.verify_stored().unwrap(), 400);
    for d in &docs {
        assert_eq!(reopened.json(d).unwrap(), writer.json(d).unwrap(), "{d}");
    }
}

#[test]
fn a_replica_holds_at_most_its_bound_of_documents_in_memory_and_loses_none() {
    use syncline_core::replica::ReplicaOptions;
    use syncline_core::wire::Target;
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let docs: Vec<DocId> = (0..40)
        .map(|d| DocId::new(format!("cache/d{d}")).unwrap())
        .collect();
    let mut writer = replica_of(dir.path(), "writer", 1, doc());
    for (n, d) in docs.iter().enumerate() {
        let ops = [Op::Put {
            path: vec![PathElem::Key("v".into())],
            value: Value::Int(n as i64),
        }];
        writer.change(d, &ops).unwrap();
    }
    let ws = connect(&mut hub, &mut writer);
    sync(&mut hub, &mut [(&mut writer, ws)]).unwrap();

    let options = ReplicaOptions {
        max_cached_docs: 8,
        ..ReplicaOptions::default()
    };
    let identity = syncline_core::identity::Identity::from_seed([2; 32]);
    let mut reader = Replica::open(&dir.path().join("reader.db"), identity, options).unwrap();
    let prefix = syncline_core::ids::DocPrefix::new("cache/").unwrap();
    reader.subscribe(Target::Prefix(prefix)).unwrap();
    let rs = connect(&mut hub, &mut reader);
    sync(&mut hub, &mut [(&mut reader, rs), (&mut writer, ws)]).unwrap();
    assert!(
        reader.cached_docs() <= 8,
        "{} in memory",
        reader.cached_docs()
    );
    // Every document, dropped from memory or not, reads back whole from the store, and
    // reads alone keep the bound too.
    for (n, d) in docs.iter().enumerate() {
        assert_eq!(
            reader.json(d).unwrap(),
            serde_json::json!({ "v": n }),
            "{d}"
        );
        assert!(
            reader.cached_docs() <= 8,
            "{} in memory",
            reader.cached_docs()
        );
    }
    // A write to a document dropped long ago, and one more from the writer to another: both
    // arrive, and the bound holds again after the writes.
    let ops = [Op::Put {
        path: vec![PathElem::Key("r".into())],
        value: Value::Int(1),
    }];
    reader.change(&docs[0], &ops).unwrap();
    writer.change(&docs[1], &ops).unwrap();
    sync(&mut hub, &mut [(&mut reader, rs), (&mut writer, ws)]).unwrap();
    assert!(
        reader.cached_docs() <= 8,
        "{} in memory",
        reader.cached_docs()
    );
    assert_eq!(
        reader.json(&docs[0]).unwrap(),
        writer.json(&docs[0]).unwrap()
    );
    assert_eq!(
        reader.json(&docs[1]).unwrap(),
        writer.json(&docs[1]).unwrap()
    );
    assert_eq!(reader.status().unwrap().outbox, 0);
    assert_eq!(reader.verify_stored().unwrap(), 42);
}
