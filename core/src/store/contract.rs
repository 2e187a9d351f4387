//! What every [`HubStore`] must do, as one check that any implementation runs against a fresh,
//! empty store: the SQLite store in this crate's tests, the PostgreSQL store in the hub's.
//! A failed check panics with what was expected: it is test support, compiled only for tests
//! and with the `testing` feature.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: a panic is a failed check.

use automerge::transaction::Transactable;

use crate::change::{self, VerifiedChange};
use crate::hub::Grant;
use crate::identity::Identity;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
use crate::store::{Appended, Dropped, HubStore, PeerState, chain};
use crate::wire::{Position, Target};

/// `n` changes by `who` to `doc`, each a put of one key, under actor instance `instance`;
/// each change depends on the one before.
pub fn changes(who: &Identity, doc: &DocId, instance: [u8; 8], n: usize) -> Vec<VerifiedChange> {
    let mut am = automerge::Automerge::new();
    am.set_actor(change::actor_for(&who.peer_id(), instance));
    (0..n)
        .map(|i| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, format!("k{i}"), i as i64).unwrap();
            tx.commit();
            let c = am.get_last_local_change().unwrap();
            change::sign(who, doc, c).unwrap()
        })
        .collect()
}

fn stored(a: &[Appended]) -> Vec<u64> {
    a.iter()
        .map(|x| match x {
            Appended::Stored(p) => p.cursor.0,
            other => panic!("expected Stored, got {other:?}"),
        })
        .collect()
}

/// Runs every check on `store`, which must be empty.
pub fn check(store: &mut dyn HubStore) {
    let alice = Identity::from_seed([1; 32]);
    let bob = Identity::from_seed([2; 32]);
    let a = DocId::new("sites/a").unwrap();
    let b = DocId::new("sites/b").unwrap();
    let other = DocId::new("other/x").unwrap();
    assert_eq!(
        store.last_cursor().unwrap(),
        Cursor(0),
        "a fresh store is empty"
    );
    assert_ne!(store.epoch(), Epoch([0; 16]), "a store has an epoch");

    // Appends: positions grow in input order, one group commit at a time.
    let ca = changes(&alice, &a, [1; 8], 5);
    let appended = store.append(&ca[..3]).unwrap();
    let first = stored(&appended);
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    let cb = changes(&bob, &b, [2; 8], 2);
    let mut batch = ca[3..].to_vec();
    batch.extend(cb.iter().cloned());
    let second = stored(&store.append(&batch).unwrap());
    assert!(second[0] > first[2] && second.windows(2).all(|w| w[0] < w[1]));
    let end = store.last_cursor().unwrap();
    assert_eq!(end.0, *second.last().unwrap());

    // A resent change is a duplicate at its position, with its chain (also twice in one
    // batch); another change under a used actor and sequence number is a conflict naming the
    // stored one; nothing moves.
    let dup = store.append(&[ca[0].clone(), ca[0].clone()]).unwrap();
    let Appended::Stored(at0) = appended[0] else {
        panic!("stored")
    };
    assert_eq!(
        dup,
        vec![Appended::Duplicate(at0), Appended::Duplicate(at0)]
    );
    let forked = {
        let mut am = automerge::Automerge::new();
        am.set_actor(change::actor_for(&alice.peer_id(), [1; 8]));
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "forked", 1).unwrap();
        tx.commit();
        change::sign(&alice, &a, am.get_last_local_change().unwrap()).unwrap()
    };
    assert_eq!(forked.automerge().seq(), ca[0].automerge().seq());
    let got = store.append(&[forked]).unwrap();
    assert_eq!(
        got,
        vec![Appended::Conflict {
            existing: ca[0].hash()
        }]
    );
    assert_eq!(store.last_cursor().unwrap(), end, "nothing stored");

    // The same bytes signed into another document are another change there.
    let same_bytes = change::sign(&alice, &other, ca[0].automerge().clone()).unwrap();
    let more = store.append(std::slice::from_ref(&same_bytes)).unwrap();
    assert!(stored(&more)[0] > end.0);
    let end = store.last_cursor().unwrap();

    // The chain, which replicas resume with: each stored change's is the hash of the chain
    // before it and of its signature; commits that stored nothing (the duplicates and the
    // conflict above) leave it where it was; append returns what it stored.
    let log = store
        .read_log(&Target::Prefix(DocPrefix::all()), Cursor(0), 100)
        .unwrap()
        .entries;
    let mut head = None;
    for e in &log {
        let expected = chain(head.as_ref(), &e.change.signature);
        assert_eq!(e.chain, Some(expected), "the chain at {}", e.cursor.0);
        head = Some(expected);
    }
    assert_eq!(
        more,
        vec![Appended::Stored(Position {
            cursor: end,
            mark: head.unwrap()
        })]
    );

    // Reads: by document, by prefix, in pages, with the end position.
    let batch = store
        .read_log(&Target::Doc(a.clone()), Cursor(0), 100)
        .unwrap();
    assert!(batch.at_end);
    assert_eq!(batch.next, end);
    let hashes: Vec<ChangeHash> = batch
        .entries
        .iter()
        .map(|e| change::verify(&e.doc, e.change.clone()).unwrap().hash())
        .collect();
    assert_eq!(
        hashes,
        ca.iter().map(VerifiedChange::hash).collect::<Vec<_>>()
    );
    let sites = Target::Prefix(DocPrefix::new("sites/").unwrap());
    let page = store.read_log(&sites, Cursor(0), 4).unwrap();
    assert_eq!(page.entries.len(), 4);
    assert!(!page.at_end);
    assert_eq!(page.next, page.entries[3].cursor);
    let rest = store.read_log(&sites, page.next, 100).unwrap();
    assert_eq!(rest.entries.len(), 3, "7 changes under sites/");
    assert!(rest.at_end);
    let all = store
        .read_log(&Target::Prefix(DocPrefix::all()), Cursor(0), 100)
        .unwrap();
    assert_eq!(all.entries.len(), 8);
    assert!(all.entries.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let none = store.read_log(&sites, end, 100).unwrap();
    assert!(none.entries.is_empty() && none.at_end && none.next == end);

    // Documents, in id order, under a target, after one.
    let docs = store.docs_page(&sites, None, 10).unwrap();
    assert_eq!(docs, vec![a.clone(), b.clone()]);
    assert_eq!(
        store.docs_page(&sites, Some(&a), 10).unwrap(),
        vec![b.clone()]
    );
    let all_docs = store
        .docs_page(&Target::Prefix(DocPrefix::all()), None, 2)
        .unwrap();
    assert_eq!(all_docs, vec![other.clone(), a.clone()]);
    assert_eq!(
        store.docs_page(&Target::Doc(b.clone()), None, 10).unwrap(),
        vec![b.clone()]
    );

    // Heads from metadata; a change whose ancestor is missing is left out.
    let h = store.heads(&a).unwrap();
    assert!(h.complete);
    assert_eq!(h.heads, vec![ca[4].hash()]);
    let gap = changes(&bob, &other, [3; 8], 3);
    store.append(&[gap[0].clone(), gap[2].clone()]).unwrap();
    let h = store.heads(&other).unwrap();
    assert!(!h.complete, "gap[2] lacks gap[1]");
    let mut expected = vec![same_bytes.hash(), gap[0].hash()];
    expected.sort();
    assert_eq!(h.heads, expected);

    // Repair: what a replica that has some changes lacks, in log order.
    let missing = store.changes_not_covered(&a, &[ca[2].hash()]).unwrap();
    let got: Vec<ChangeHash> = missing
        .into_iter()
        .map(|s| change::verify(&a, s).unwrap().hash())
        .collect();
    assert_eq!(got, vec![ca[3].hash(), ca[4].hash()]);
    let unknown = ChangeHash([9; 32]);
    assert_eq!(store.changes_not_covered(&a, &[unknown]).unwrap().len(), 5);

    // Grants: added, replaced, revoked, each bumping the version.
    let peer = PeerId::from_bytes([5; 32]);
    let v0 = store.grants_version().unwrap();
    let grant = |prefix: &str, write: bool| Grant {
        peer,
        prefix: DocPrefix::new(prefix).unwrap(),
        read: true,
        write,
        relay: false,
    };
    store.put_grant(&grant("", false)).unwrap();
    store.put_grant(&grant("sites/", true)).unwrap();
    store.put_grant(&grant("", true)).unwrap();
    assert_eq!(store.grants_version().unwrap(), v0 + 3);
    let g = store.grants().unwrap();
    assert_eq!(g.len(), 2);
    assert!(g.iter().all(|g| g.write && g.read && !g.relay));
    assert_eq!(
        store
            .revoke(&peer, Some(&DocPrefix::new("sites/").unwrap()))
            .unwrap(),
        1
    );
    assert_eq!(store.revoke(&PeerId::from_bytes([6; 32]), None).unwrap(), 0);
    assert_eq!(store.revoke(&peer, None).unwrap(), 1);
    assert!(store.grants().unwrap().is_empty());
    assert!(store.grants_version().unwrap() > v0 + 3);

    // Peer positions: zero until recorded, then what was recorded.
    let hub = PeerId::from_bytes([8; 32]);
    assert_eq!(store.peer_state(&hub).unwrap(), PeerState::default());
    let state = PeerState {
        recv_epoch: Epoch([1; 16]),
        recv_cursor: Cursor(42),
        push_epoch: Epoch([2; 16]),
        pushed: Cursor(7),
    };
    store.set_peer_state(&hub, &state).unwrap();
    store
        .set_peer_state(
            &hub,
            &PeerState {
                recv_cursor: Cursor(43),
                ..state
            },
        )
        .unwrap();
    assert_eq!(store.peer_state(&hub).unwrap().recv_cursor, Cursor(43));

    // Snapshots: stored, replaced, read back whole or as metadata; changes counted by range.
    assert_eq!(store.snapshot(&a).unwrap(), None);
    assert_eq!(store.snapshot_meta(&a).unwrap(), None);
    let end = store.last_cursor().unwrap();
    let all_a = store.count_changes(&a, Cursor(0), end).unwrap();
    assert_eq!(all_a, 5, "alice's five changes of sites/a");
    let a_log = store
        .read_log(&Target::Doc(a.clone()), Cursor(0), 100)
        .unwrap();
    assert_eq!(
        store
            .count_changes(&a, a_log.entries[1].cursor, a_log.entries[3].cursor)
            .unwrap(),
        2,
        "the range is (after, upto]"
    );
    let epoch = store.epoch();
    let snap = |upto: Cursor, data: Vec<u8>| crate::store::HubSnapshot {
        epoch,
        upto,
        changes: 5,
        snapshot: crate::snapshot::Snapshot {
            data,
            signed: vec![crate::snapshot::SignedHead {
                hash: ca[4].hash(),
                signature: ca[4].signed().signature,
            }],
        },
    };
    let first = snap(a_log.entries[2].cursor, vec![1, 2, 3]);
    store.put_snapshot(&a, &first).unwrap();
    let second = snap(a_log.entries[4].cursor, vec![4; 1000]);
    store.put_snapshot(&a, &second).unwrap();
    assert_eq!(
        store.snapshot(&a).unwrap(),
        Some(second.clone()),
        "replaced"
    );
    assert_eq!(
        store.snapshot_meta(&a).unwrap(),
        Some(crate::store::SnapshotMeta {
            epoch: second.epoch,
            upto: second.upto,
            changes: 5,
            bytes: 1000,
        })
    );
    assert_eq!(store.snapshot(&b).unwrap(), None, "per document");

    // Retention: a document's changes go oldest first, at most `limit` a call, then the
    // document (and its snapshot); the others stay, and positions are not reused. The
    // highest position it dropped a change at is kept.
    assert_eq!(
        store.dropped_upto().unwrap(),
        Cursor(0),
        "nothing dropped yet"
    );
    let d = store.drop_doc(&a, 3).unwrap();
    assert_eq!((d.changes, d.gone), (3, false));
    assert_eq!(store.dropped_upto().unwrap(), a_log.entries[2].cursor);
    assert_eq!(store.snapshot(&a).unwrap(), None, "it held dropped changes");
    let left = store
        .read_log(&Target::Doc(a.clone()), Cursor(0), 100)
        .unwrap();
    let left: Vec<ChangeHash> = left
        .entries
        .iter()
        .map(|e| change::verify(&e.doc, e.change.clone()).unwrap().hash())
        .collect();
    assert_eq!(
        left,
        vec![ca[3].hash(), ca[4].hash()],
        "the oldest went first"
    );
    assert_eq!(
        store.drop_doc(&a, 100).unwrap(),
        Dropped {
            changes: 2,
            gone: true
        }
    );
    assert_eq!(store.docs_page(&sites, None, 10).unwrap(), vec![b.clone()]);
    assert_eq!(store.heads(&a).unwrap().heads, Vec::<ChangeHash>::new());
    assert_eq!(
        store
            .read_log(&sites, Cursor(0), 100)
            .unwrap()
            .entries
            .len(),
        2
    );
    let never = DocId::new("sites/never").unwrap();
    assert_eq!(
        store.drop_doc(&never, 10).unwrap(),
        Dropped {
            changes: 0,
            gone: true
        }
    );
    // Dropping the newest changes of the log lowers its end, not its highest position: a
    // replica whose cursor is there was not rolled back.
    let newest = store.last_cursor().unwrap();
    assert!(store.drop_doc(&other, 100).unwrap().gone);
    assert_eq!(
        store.dropped_upto().unwrap(),
        newest,
        "`other` held the newest"
    );
    assert!(
        store.last_cursor().unwrap() < newest,
        "`other` held the newest"
    );
    assert_eq!(store.high_water().unwrap(), newest);
    let again = changes(&Identity::from_seed([3; 32]), &a, [4; 8], 2);
    let got = store.append(&again[..1]).unwrap();
    assert!(stored(&got)[0] > end.0, "positions are not reused");
    assert_eq!(store.high_water().unwrap(), store.last_cursor().unwrap());

    // A change a commit passes over (a duplicate) is chained all the same, in its place: the
    // chain is the same on every store for the same commits.
    let Appended::Stored(before) = got[0] else {
        panic!("stored")
    };
    let got = store.append(&[again[0].clone(), again[1].clone()]).unwrap();
    let passed = chain(Some(&before.mark), &again[0].signed().signature);
    let expected = chain(Some(&passed), &again[1].signed().signature);
    assert_eq!(got[0], Appended::Duplicate(before));
    assert!(
        matches!(got[1], Appended::Stored(p) if p.mark == expected),
        "{got:?}"
    );
    let last = store
        .read_log(&Target::Doc(a.clone()), before.cursor, 10)
        .unwrap()
        .entries;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].chain, Some(expected), "stored as returned");
}
