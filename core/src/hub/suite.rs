//! The hub's behaviour, as one suite that runs on every hub store: on SQLite in this crate's
//! tests (`hub::tests::sqlite`), on PostgreSQL in `syncline-hub`'s. Each case is a function
//! that builds its hubs with [`store`]; [`hub_suite!`](crate::hub_suite) makes one `#[test]`
//! per case for a store factory (a fresh, empty store each call).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: a panic is a failed check.
#![allow(missing_docs)] // Each case's name says what it checks.

use std::cell::RefCell;

use serde_json::json;

use super::*;
use crate::ids::DocPrefix;
use crate::ops::Op;
use crate::replica::{Event, Replica, ReplicaOptions};

/// The store every hub of the suite runs on.
pub type TestStore = Box<dyn HubStore + Send>;

thread_local! {
    /// The factory [`run`] sets for the case running on this thread (each test has its own).
    static MAKE: RefCell<Option<Box<dyn Fn() -> TestStore>>> = RefCell::new(None);
}

/// Runs one case of the suite with `make` as its store factory.
pub fn run(make: impl Fn() -> TestStore + 'static, case: fn()) {
    MAKE.with(|m| *m.borrow_mut() = Some(Box::new(make)));
    case();
}

/// A fresh, empty store from the factory of the running case.
fn store() -> TestStore {
    MAKE.with(|m| {
        (m.borrow()
            .as_ref()
            .expect("the suite runs through hub_suite!"))()
    })
}

/// How many changes `store` holds, read through the trait.
fn stored<S: HubStore + ?Sized>(store: &mut S) -> u64 {
    let mut n = 0;
    let mut after = Cursor(0);
    loop {
        let batch = store
            .read_log(&Target::Prefix(DocPrefix::all()), after, 1_000)
            .unwrap();
        n += batch.entries.len() as u64;
        if batch.at_end {
            return n;
        }
        after = batch.next;
    }
}

type MemHub = Hub<TestStore, AllowAll>;

fn mem_hub() -> MemHub {
    Hub::new(Identity::generate(), store(), AllowAll, None)
}

pub(crate) fn ops(j: serde_json::Value) -> Vec<Op> {
    Op::list_from_json(&j.to_string()).unwrap()
}

pub(crate) fn replica() -> Replica {
    Replica::open_in_memory(Identity::generate(), ReplicaOptions::default()).unwrap()
}

pub(crate) fn grant(peer: PeerId, prefix: &str, read: bool, write: bool) -> Grant {
    Grant {
        peer,
        prefix: DocPrefix::new(prefix).unwrap(),
        read,
        write,
        relay: false,
    }
}

/// Moves messages both ways until nothing moves; returns the replicas' errors.
pub(crate) fn pump<S: HubStore, P: Policy>(
    hub: &mut Hub<S, P>,
    reps: &mut [(&mut Replica, SessionId)],
) -> Vec<Error> {
    let mut errors = Vec::new();
    for _ in 0..10_000 {
        if !pump_step(hub, reps, &mut errors) {
            return errors;
        }
    }
    panic!("pump did not settle");
}

/// One round of [`pump`]: every replica's messages to the hub, a commit, every answer back
/// (the replicas' errors into `errors`). Whether anything moved.
pub(crate) fn pump_step<S: HubStore, P: Policy>(
    hub: &mut Hub<S, P>,
    reps: &mut [(&mut Replica, SessionId)],
    errors: &mut Vec<Error>,
) -> bool {
    let mut moved = false;
    for (r, sid) in reps.iter_mut() {
        while let Ok(Some(m)) = r.poll_transmit() {
            moved = true;
            let _ = hub.handle_message(*sid, m);
        }
    }
    hub.flush().unwrap();
    for (r, sid) in reps.iter_mut() {
        while let Ok(Some(m)) = hub.poll_transmit(*sid) {
            moved = true;
            if let Err(e) = r.handle_message(m) {
                errors.push(e);
            }
        }
    }
    moved
}

fn hub_with(grants: Vec<Grant>) -> Hub<TestStore, Grants> {
    Hub::new(Identity::generate(), store(), Grants { grants }, None)
}

pub(crate) fn connect<S: HubStore, P: Policy>(hub: &mut Hub<S, P>, r: &mut Replica) -> SessionId {
    let sid = hub.accept();
    r.connect(Some(hub.peer_id()));
    sid
}

pub(crate) fn events(r: &mut Replica) -> Vec<Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

pub fn an_unknown_key_is_refused_at_the_handshake() {
    let mut hub = hub_with(vec![]);
    let mut r = replica();
    let sid = connect(&mut hub, &mut r);
    let errors = pump(&mut hub, &mut [(&mut r, sid)]);
    assert!(
        errors.iter().any(|e| matches!(e, Error::Protocol(ProtocolError::Closed { message, .. }) if message.contains("not known"))),
        "{errors:?}"
    );
    assert_eq!(hub.session_peer(sid), None);
    assert_eq!(hub.metrics().rejects.get("unknown_peer"), Some(&1));
}

pub fn a_read_only_key_has_its_writes_refused_and_its_app_told() {
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, false)]);
    let doc = DocId::new("d").unwrap();
    r.change(&doc, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    let sid = connect(&mut hub, &mut r);
    pump(&mut hub, &mut [(&mut r, sid)]);
    assert!(events(&mut r).iter().any(|e| matches!(
        e,
        Event::Rejected {
            code: ErrorCode::NotAuthorized,
            ..
        }
    )));
    let status = r.status().unwrap();
    assert_eq!(
        (status.outbox, status.rejected),
        (1, 1),
        "the refused change stays, marked"
    );
    assert_eq!(stored(hub.store()), 0);
    // Still held locally.
    assert_eq!(r.json(&doc).unwrap(), json!({"a": 1}));
}

pub fn the_app_is_told_when_the_hub_stores_its_changes() {
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, true)]);
    let doc = DocId::new("d").unwrap();
    for v in 0..3 {
        r.change(&doc, &ops(json!([{"op":"put","path":["a"],"value":v}])))
            .unwrap();
    }
    events(&mut r);
    let sid = connect(&mut hub, &mut r);
    pump(&mut hub, &mut [(&mut r, sid)]);
    let acknowledged: u64 = events(&mut r)
        .iter()
        .filter_map(|e| match e {
            Event::Acknowledged { doc: d, changes } if *d == doc => Some(*changes),
            _ => None,
        })
        .sum();
    assert_eq!(acknowledged, 3);
    assert_eq!(r.status().unwrap().outbox, 0);
}

pub fn a_key_without_read_rights_never_receives_the_document() {
    let mut writer = replica();
    let mut reader = replica();
    let mut hub = hub_with(vec![
        grant(writer.peer_id(), "", true, true),
        grant(reader.peer_id(), "public/", true, true),
    ]);
    reader.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
    let secret = DocId::new("secret/plans").unwrap();
    let public = DocId::new("public/news").unwrap();
    writer
        .change(&secret, &ops(json!([{"op":"put","path":["x"],"value":1}])))
        .unwrap();
    writer
        .change(&public, &ops(json!([{"op":"put","path":["y"],"value":2}])))
        .unwrap();
    let ws = connect(&mut hub, &mut writer);
    let rs = connect(&mut hub, &mut reader);
    pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    // Live changes too, not only catch-up.
    writer
        .change(&secret, &ops(json!([{"op":"put","path":["x"],"value":3}])))
        .unwrap();
    writer
        .change(&public, &ops(json!([{"op":"put","path":["y"],"value":4}])))
        .unwrap();
    pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert_eq!(reader.doc_ids().unwrap(), vec![public.clone()]);
    assert_eq!(reader.json(&public).unwrap(), json!({"y": 4}));
    // A direct subscription or a reconcile does not leak it either.
    reader.subscribe(Target::Doc(secret.clone())).unwrap();
    pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert!(!reader.store().has_doc(&secret).unwrap());
}

pub fn a_revoked_grant_holds_at_once_on_a_live_session() {
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, true)]);
    let sid = connect(&mut hub, &mut r);
    let doc = DocId::new("d").unwrap();
    r.change(&doc, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    pump(&mut hub, &mut [(&mut r, sid)]);
    assert_eq!(stored(hub.store()), 1);
    hub.policy_mut().grants[0].write = false;
    r.change(&doc, &ops(json!([{"op":"put","path":["a"],"value":2}])))
        .unwrap();
    pump(&mut hub, &mut [(&mut r, sid)]);
    assert_eq!(stored(hub.store()), 1);
    assert_eq!(r.status().unwrap().rejected, 1);
}

/// A writer (its key, its replica) granted rw on everything, a reader granted read, and a
/// hub of those grants.
fn writer_and_reader() -> (Identity, Replica, Replica, Hub<TestStore, Grants>) {
    let me = Identity::generate();
    let writer = Replica::open_in_memory(me.clone(), ReplicaOptions::default()).unwrap();
    let reader = replica();
    let hub = hub_with(vec![
        grant(me.peer_id(), "", true, true),
        grant(reader.peer_id(), "", true, false),
    ]);
    (me, writer, reader, hub)
}

/// `change` signed again by `me` under each sequence number of `seqs` (renumbered: the
/// hub stores such changes, it does not apply documents; every replica's document refuses
/// them), pushed through session `ws` as push `id`; returns them.
fn push_renumbered<P: Policy>(
    hub: &mut Hub<TestStore, P>,
    ws: SessionId,
    (me, doc): (&Identity, &DocId),
    change: &automerge::Change,
    seqs: &[u64],
    id: u64,
) -> Vec<SignedChange> {
    let forged: Vec<SignedChange> = seqs
        .iter()
        .map(|seq| {
            crate::change::sign(me, doc, crate::change::renumbered(change, *seq))
                .unwrap()
                .into_signed()
        })
        .collect();
    let push = wire::Push {
        push_id: id,
        doc: doc.clone(),
        changes: forged.clone(),
    };
    hub.handle_message(ws, Message::Push(push)).unwrap();
    forged
}

pub fn a_change_covered_only_by_one_the_document_refuses_is_checked_on_its_own() {
    let (me, mut writer, mut reader, mut hub) = writer_and_reader();
    let doc = DocId::new("p/covered").unwrap();
    writer
        .change(&doc, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    writer
        .change(&doc, &ops(json!([{"op":"put","path":["a"],"value":2}])))
        .unwrap();
    let ws = connect(&mut hub, &mut writer);
    pump(&mut hub, &mut [(&mut writer, ws)]);
    // The writer's key signs its second change again under number 5 (on top of the
    // first): the hub stores it, every document refuses it.
    let second = writer.doc(&doc).unwrap().changes().remove(1);
    let forged = push_renumbered(&mut hub, ws, (&me, &doc), &second, &[5], 79).remove(0);
    pump(&mut hub, &mut [(&mut writer, ws)]);

    // The reader gets all three in one message, the first with its signature damaged:
    // it is in the history of the renumbered change (same actor), whose signature
    // verifies, but that change is refused, so the first is checked on its own.
    reader.subscribe(Target::Doc(doc.clone())).unwrap();
    let rs = connect(&mut hub, &mut reader);
    let mut failed = None;
    for _ in 0..100 {
        while let Some(m) = reader.poll_transmit().unwrap() {
            hub.handle_message(rs, m).unwrap();
        }
        hub.flush().unwrap();
        let mut moved = false;
        while let Some(mut m) = hub.poll_transmit(rs).unwrap() {
            moved = true;
            if let Some(c) = m.as_changes_mut()
                && c.changes.len() == 3
            {
                assert_eq!(c.changes[2], forged, "in log order");
                c.changes[0].signature[1] ^= 4;
            }
            if let Err(e) = reader.handle_message(m) {
                failed.get_or_insert(e);
            }
        }
        if !moved {
            break;
        }
    }
    let e = failed.expect("the damaged signature is found");
    assert!(
        matches!(e, Error::Change(ChangeError::BadSignature { .. })),
        "{e}"
    );
    assert!(
        !reader.store().has_doc(&doc).unwrap(),
        "nothing of it stored"
    );
}

pub fn changes_refused_in_a_commit_applied_on_several_threads_are_not_stored() {
    let me = Identity::generate();
    let mut writer = Replica::open_in_memory(me.clone(), ReplicaOptions::default()).unwrap();
    let options = ReplicaOptions {
        verify_threads: 2,
        ..ReplicaOptions::default()
    };
    let mut late = Replica::open_in_memory(Identity::generate(), options).unwrap();
    let mut hub = hub_with(vec![
        grant(me.peer_id(), "", true, true),
        grant(late.peer_id(), "", true, false),
    ]);
    let (small, big) = (DocId::new("p/small").unwrap(), DocId::new("p/big").unwrap());
    writer
        .change(&small, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    for i in 0..150 {
        writer
            .change(&big, &ops(json!([{"op":"put","path":["n"],"value":i}])))
            .unwrap();
    }
    let ws = connect(&mut hub, &mut writer);
    pump(&mut hub, &mut [(&mut writer, ws)]);
    // Two renumbered copies of the small document's change, signed by its writer: the
    // hub stores them (it does not apply), every replica's document refuses them.
    let first = writer.doc(&small).unwrap().changes().remove(0);
    push_renumbered(&mut hub, ws, (&me, &small), &first, &[5, 7], 78);
    pump(&mut hub, &mut [(&mut writer, ws)]);
    assert_eq!(stored(hub.store()), 153);

    // 153 changes of two documents in one commit: applied on two threads while the
    // store takes them, the two refused ones taken out again before it commits.
    late.subscribe(Target::Prefix(crate::ids::DocPrefix::new("p/").unwrap()))
        .unwrap();
    let ls = connect(&mut hub, &mut late);
    let errors = pump(&mut hub, &mut [(&mut late, ls)]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(late.status().unwrap().refused, 2);
    assert_eq!(late.json(&small).unwrap(), json!({"a": 1}));
    assert_eq!(late.json(&big).unwrap(), json!({"n": 149}));
    assert_eq!(
        late.verify_stored().unwrap(),
        151,
        "nothing refused was stored"
    );
}

pub fn a_writer_signing_a_renumbered_change_cannot_crash_or_wedge_its_readers() {
    let (me, mut writer, mut reader, mut hub) = writer_and_reader();
    let doc = DocId::new("plant/line1").unwrap();
    writer
        .change(&doc, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    reader.subscribe(Target::Doc(doc.clone())).unwrap();
    let ws = connect(&mut hub, &mut writer);
    let rs = connect(&mut hub, &mut reader);
    pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert_eq!(reader.json(&doc).unwrap(), json!({"a": 1}));

    // The writer's key signs its first change again under numbers 5 and 7: gaps, on
    // which Automerge would panic. (The hub stores them: it does not apply documents.)
    let first = writer.doc(&doc).unwrap().changes().remove(0);
    push_renumbered(&mut hub, ws, (&me, &doc), &first, &[5, 7], 77);
    let errors = pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(reader.status().unwrap().refused, 2);
    assert_eq!(reader.json(&doc).unwrap(), json!({"a": 1}));
    assert_eq!(
        reader.verify_stored().unwrap(),
        1,
        "nothing refused was stored"
    );

    // The session is still up, and the writer's next real change arrives.
    writer
        .change(&doc, &ops(json!([{"op":"put","path":["b"],"value":2}])))
        .unwrap();
    let errors = pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(reader.json(&doc).unwrap(), json!({"a": 1, "b": 2}));
    // And a fresh replica catching up the whole log gets the same.
    let mut late = replica();
    hub.policy_mut()
        .grants
        .push(grant(late.peer_id(), "", true, false));
    late.subscribe(Target::Doc(doc.clone())).unwrap();
    let ls = connect(&mut hub, &mut late);
    let errors = pump(&mut hub, &mut [(&mut late, ls)]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(late.json(&doc).unwrap(), json!({"a": 1, "b": 2}));
    assert_eq!(late.status().unwrap().refused, 2);
}

pub fn forged_and_replayed_pushes_are_refused_and_store_nothing() {
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, true)]);
    let sid = connect(&mut hub, &mut r);
    pump(&mut hub, &mut [(&mut r, sid)]);
    // A real signed change, taken from another replica's outbox.
    let mut author = replica();
    let doc = DocId::new("a").unwrap();
    author
        .change(&doc, &ops(json!([{"op":"put","path":["k"],"value":1}])))
        .unwrap();
    let real = author
        .store()
        .outbox_after(0, 10)
        .unwrap()
        .remove(0)
        .signed
        .unwrap();
    let mut forged = real.clone();
    forged.signature[0] ^= 1;
    let other = DocId::new("b").unwrap();
    for (push_id, doc, change) in [(90, doc.clone(), forged), (91, other, real)] {
        hub.handle_message(
            sid,
            Message::Push(wire::Push {
                push_id,
                doc,
                changes: vec![change],
            }),
        )
        .unwrap();
        hub.flush().unwrap();
        match hub.poll_transmit(sid).unwrap() {
            Some(Message::Reject(rj)) => {
                assert_eq!((rj.push_id, rj.code), (push_id, ErrorCode::BadSignature));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored(hub.store()), 0);
    assert_eq!(hub.metrics().rejects.get("bad_signature"), Some(&2));
    // The session stays usable.
    assert!(!hub.is_failed(sid));
}

pub fn a_cloned_store_that_reuses_an_actor_seq_is_refused_and_its_app_told() {
    let me = Identity::generate();
    let cloned = ReplicaOptions {
        instance: Some([4; 8]),
        ..ReplicaOptions::default()
    };
    let mut first = Replica::open_in_memory(me.clone(), cloned.clone()).unwrap();
    let mut copy = Replica::open_in_memory(me.clone(), cloned).unwrap();
    let mut hub = hub_with(vec![grant(me.peer_id(), "", true, true)]);
    let doc = DocId::new("plant/line1").unwrap();
    first
        .change(&doc, &ops(json!([{"op":"put","path":["speed"],"value":1}])))
        .unwrap();
    copy.change(&doc, &ops(json!([{"op":"put","path":["speed"],"value":2}])))
        .unwrap();
    let a = connect(&mut hub, &mut first);
    pump(&mut hub, &mut [(&mut first, a)]);
    assert_eq!(stored(hub.store()), 1);
    events(&mut copy);
    let b = connect(&mut hub, &mut copy);
    pump(&mut hub, &mut [(&mut copy, b)]);
    assert_eq!(stored(hub.store()), 1, "the second change is refused");
    assert_eq!(hub.metrics().rejects.get("conflicting_actor_seq"), Some(&1));
    let told = events(&mut copy).into_iter().any(|e| {
        matches!(e, Event::Rejected { code: ErrorCode::MalformedChange, ref message, .. }
            if message.contains("reuses sequence number 1"))
    });
    assert!(told, "the app is told why");
    assert!(!hub.is_failed(b), "the session stays up");
}

pub fn a_peer_error_with_multibyte_text_is_absorbed_without_panicking_or_answering() {
    // 1023 bytes, byte 1024 of a longer rendering inside a character: this used to panic
    // both the hub and the replica when they cut the text to quote it back.
    let text: String = std::iter::once('x')
        .chain(std::iter::repeat_n('é', 511))
        .collect();
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, true)]);
    let sid = connect(&mut hub, &mut r);
    pump(&mut hub, &mut [(&mut r, sid)]);
    let closing = ErrorMessage {
        code: ErrorCode::ProtocolViolation,
        message: text.clone(),
    };
    assert!(
        hub.handle_message(sid, Message::Error(closing.clone()))
            .is_err()
    );
    assert!(hub.is_failed(sid));
    assert_eq!(
        hub.poll_transmit(sid).unwrap(),
        None,
        "an Error is not answered"
    );
    let mut r2 = replica();
    r2.connect(None);
    let _hello = r2.poll_transmit().unwrap();
    assert!(r2.handle_message(Message::Error(closing)).is_err());
    assert_eq!(r2.poll_transmit().unwrap(), None);
    let mut long = text.repeat(3);
    wire::truncate_text(&mut long, wire::MAX_ERROR_TEXT);
    assert!(long.len() <= wire::MAX_ERROR_TEXT && long.len() >= wire::MAX_ERROR_TEXT - 1);
}

pub fn an_oversized_local_change_is_refused_and_leaves_nothing_behind() {
    let mut r = replica();
    let doc = DocId::new("d").unwrap();
    r.change(&doc, &ops(json!([{"op":"put","path":["a"],"value":1}])))
        .unwrap();
    let big = "x".repeat(wire::MAX_CHANGE_BYTES + 10);
    let err = r
        .change(
            &doc,
            &[Op::Put {
                path: vec!["b".into()],
                value: crate::ops::Value::Str(big),
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("split it"), "{err}");
    assert_eq!(r.json(&doc).unwrap(), json!({"a": 1}));
    assert_eq!(r.status().unwrap().outbox, 1);
}

pub fn a_gateway_writing_to_thousands_of_documents_syncs_them_all() {
    // Each written document is followed on its own: over the old bound of 1,024
    // subscriptions the hub failed the session at every connection, and nothing synced.
    let mut r = replica();
    let mut hub = hub_with(vec![grant(r.peer_id(), "", true, true)]);
    let group: Vec<_> = (0..1500)
        .map(|i| {
            (
                DocId::new(format!("sensors/{i}")).unwrap(),
                ops(json!([{"op":"put","path":["v"],"value":i}])),
            )
        })
        .collect();
    r.change_many(&group).unwrap();
    let sid = connect(&mut hub, &mut r);
    let errors = pump(&mut hub, &mut [(&mut r, sid)]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!hub.is_failed(sid));
    assert_eq!(stored(hub.store()), 1500);
    assert_eq!(r.status().unwrap().outbox, 0);
    assert_eq!(r.status().unwrap().subscriptions.len(), 1500);
}

pub fn a_slow_replica_falls_back_to_the_log_and_still_catches_up() {
    let mut fast = replica();
    let mut slow = replica();
    let mut hub = Hub::new(Identity::generate(), store(), AllowAll, None);
    slow.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
    let fs = connect(&mut hub, &mut fast);
    let ss = connect(&mut hub, &mut slow);
    pump(&mut hub, &mut [(&mut fast, fs), (&mut slow, ss)]);
    let doc = DocId::new("d").unwrap();
    fast.change(
        &doc,
        &ops(json!([{"op":"put","path":["n"],"value":{"$counter":0}}])),
    )
    .unwrap();
    // The slow replica's connection is never polled while the fast one writes a lot.
    for _ in 0..(MAX_QUEUED_MESSAGES * 2) {
        fast.change(&doc, &ops(json!([{"op":"increment","path":["n"],"by":1}])))
            .unwrap();
        while let Ok(Some(m)) = fast.poll_transmit() {
            hub.handle_message(fs, m).unwrap();
        }
        hub.flush().unwrap();
        while let Ok(Some(m)) = hub.poll_transmit(fs) {
            fast.handle_message(m).unwrap();
        }
    }
    assert!(hub.metrics().slow_fallbacks > 0);
    assert!(
        hub.sessions[&ss].out.len() <= MAX_QUEUED_MESSAGES,
        "the queue stayed bounded"
    );
    pump(&mut hub, &mut [(&mut fast, fs), (&mut slow, ss)]);
    assert_eq!(
        slow.json(&doc).unwrap(),
        json!({"n": MAX_QUEUED_MESSAGES * 2})
    );
    assert_eq!(
        slow.doc(&doc).unwrap().heads(),
        fast.doc(&doc).unwrap().heads()
    );
}

pub fn a_replica_that_has_not_caught_up_shows_lag() {
    let mut writer = replica();
    let mut reader = replica();
    let mut hub = mem_hub();
    reader.subscribe(Target::Prefix(DocPrefix::all())).unwrap();
    let doc = DocId::new("d").unwrap();
    for i in 0..5 {
        writer
            .change(&doc, &ops(json!([{"op":"put","path":["k"],"value":i}])))
            .unwrap();
    }
    let ws = connect(&mut hub, &mut writer);
    pump(&mut hub, &mut [(&mut writer, ws)]);
    let rs = connect(&mut hub, &mut reader);
    // Run the handshake by hand and stop as soon as the hub holds the subscription,
    // before it polls the catch-up from its log.
    let mut subscribed = false;
    while !subscribed {
        while let Ok(Some(m)) = reader.poll_transmit() {
            subscribed |= matches!(m, Message::Subscribe(_));
            hub.handle_message(rs, m).unwrap();
        }
        if !subscribed {
            while let Ok(Some(m)) = hub.poll_transmit(rs) {
                reader.handle_message(m).unwrap();
            }
        }
    }
    let lag = hub.replica_lags().unwrap();
    let reader_lag = lag
        .iter()
        .find(|(p, _)| *p == reader.peer_id())
        .map(|(_, l)| *l);
    assert!(reader_lag.is_some_and(|l| l > 0), "{lag:?}");
    pump(&mut hub, &mut [(&mut writer, ws), (&mut reader, rs)]);
    assert!(hub.replica_lags().unwrap().iter().all(|(_, l)| *l == 0));
}

pub fn compaction_stops_its_snapshot_before_a_change_still_waiting_for_its_dependencies() {
    let alice = Identity::from_seed([1; 32]);
    let doc = DocId::new("sites/waiting").unwrap();
    let made = crate::store::contract::changes(&alice, &doc, [1; 8], 30);
    let mut hub = Hub::new(Identity::generate(), store(), AllowAll, Some(1));
    hub.set_compaction(Some(10));
    // Change 11 is missing: 12 and the rest wait for it.
    let mut sent: Vec<VerifiedChange> = made[..10].to_vec();
    sent.extend(made[11..].iter().cloned());
    let at = hub.store.append(&sent).unwrap();
    hub.count_for_compaction(&doc, sent.len() as u64);
    let mut steps = 0;
    while hub.compact(4).unwrap().more {
        steps += 1;
        assert!(steps < 100);
    }
    let snap = hub.store.snapshot(&doc).unwrap().expect("built");
    let Appended::Stored(tenth) = at[9] else {
        panic!("stored")
    };
    assert_eq!(
        snap.upto, tenth.cursor,
        "up to the last change before the waiting ones"
    );
    assert_eq!(snap.changes, 10);
    assert_eq!(hub.metrics().snapshots_built, 1);
    // It verifies as a replica checks it: one signed head, every change covered.
    let v = crate::snapshot::verify(&doc, snap.snapshot).unwrap();
    assert_eq!(v.changes(), 10);

    // Compaction off: nothing is built.
    hub.set_compaction(None);
    hub.count_for_compaction(&doc, 100);
    assert_eq!(hub.compact(4).unwrap(), Compacted::default());
}

/// A replica of protocol version 2 (an older build), its handshake by hand: it is caught
/// up with `CaughtUp`, which it knows, and a `Resume`, which its version lacks, is refused.
pub fn a_version_2_replica_is_caught_up_without_marks_and_may_not_resume() {
    let mut hub = Hub::new(Identity::generate(), store(), AllowAll, None);
    let all = Target::Prefix(DocPrefix::all());
    let doc = DocId::new("v2/doc").unwrap();
    let mut w = replica();
    let ws = connect(&mut hub, &mut w);
    w.change(&doc, &ops(json!([{"op":"put","path":["k"],"value":1}])))
        .unwrap();
    pump(&mut hub, &mut [(&mut w, ws)]);

    let (sid, got) = session_of_version(&mut hub, 2, None);
    let kinds: Vec<&str> = got.iter().map(|m| m.kind()).collect();
    assert_eq!(kinds, ["Changes", "CaughtUp"], "{got:?}");
    let Some(Message::Changes(c)) = got.first() else {
        unreachable!()
    };
    let resume = Message::Resume(Box::new(wire::Resume {
        target: all,
        epoch: hub.store().epoch(),
        cursor: Cursor(1),
        mark: Some(Mark(c.changes[0].signature)),
        written: None,
    }));
    let e = hub.handle_message(sid, resume).unwrap_err();
    assert!(e.to_string().contains("before version 3"), "{e}");
}

/// A replica of this version and a hub of version 2 (an older build), its handshake by
/// hand: the replica subscribes with `Subscribe` though it holds a mark, and refuses the
/// version 3 messages its session lacks.
pub fn a_version_3_replica_resumes_a_version_2_hub_without_marks() {
    let mut hub = Hub::new(Identity::generate(), store(), AllowAll, None);
    let doc = DocId::new("v3/doc").unwrap();
    let mut r = replica();
    r.subscribe(Target::Doc(doc.clone())).unwrap();
    let rs = connect(&mut hub, &mut r);
    r.change(&doc, &ops(json!([{"op":"put","path":["k"],"value":1}])))
        .unwrap();
    pump(&mut hub, &mut [(&mut r, rs)]);
    r.disconnect();
    hub.close(rs);
    // Now marked (its own write, acknowledged with AckAt, and its caught-up cursor).
    assert!(r.store().written().unwrap().is_some());

    let old = Identity::generate();
    let v3_only = [
        Message::CaughtUpAt(Box::new(wire::CaughtUpAt {
            target: Target::Doc(doc.clone()),
            epoch: hub.store().epoch(),
            cursor: Cursor(1),
            mark: None,
            rolled_back: false,
        })),
        Message::AckAt(wire::AckAt {
            push_id: 1,
            at: None,
        }),
        Message::ChangesAt(Box::new(wire::ChangesAt {
            changes: Changes {
                doc: doc.clone(),
                changes: Vec::new(),
                cursor: Some((Target::Doc(doc.clone()), Cursor(1))),
            },
            mark: Mark([0; 64]),
        })),
    ];
    for m in v3_only {
        let (mut hs, hello) = Handshake::start(
            2,
            old.clone(),
            Role::Hub,
            Role::Replica,
            None,
            [5; 32],
            hub.store().epoch(),
            [0; 32],
        );
        r.connect(Some(old.peer_id()));
        let mut to_replica = vec![hello];
        let mut sent = Vec::new();
        for _ in 0..4 {
            for m in to_replica.drain(..) {
                r.handle_message(m).unwrap();
            }
            while let Some(m) = r.poll_transmit().unwrap() {
                match m {
                    Message::Hello(h) => to_replica.push(hs.on_hello(h).unwrap()),
                    Message::Auth(a) => {
                        hs.on_auth(a).unwrap();
                    }
                    other => sent.push(other),
                }
            }
        }
        assert_eq!(hs.version(), Some(2));
        let kinds: Vec<&str> = sent.iter().map(|m| m.kind()).collect();
        assert_eq!(kinds, ["Subscribe"], "{sent:?}");
        let e = r.handle_message(m).unwrap_err();
        assert!(e.to_string().contains("before version"), "{e}");
        r.disconnect();
    }
}

/// A hand-made replica session of `version` that subscribes to everything (resumes with
/// `resume` when given); returns the session, still open, and what the hub sent after the
/// handshake.
fn session_of_version(
    hub: &mut MemHub,
    version: u16,
    resume: Option<wire::Resume>,
) -> (SessionId, Vec<Message>) {
    let sid = hub.accept();
    let (mut hs, hello) = Handshake::start(
        version,
        Identity::generate(),
        Role::Replica,
        Role::Hub,
        Some(hub.peer_id()),
        [7; 32],
        Epoch::none(),
        [0; 32],
    );
    let mut to_hub = vec![hello];
    let mut got = Vec::new();
    let mut resume = Some(resume);
    for _ in 0..6 {
        for m in to_hub.drain(..) {
            hub.handle_message(sid, m).unwrap();
        }
        hub.flush().unwrap();
        while let Some(m) = hub.poll_transmit(sid).unwrap() {
            match m {
                Message::Hello(h) => to_hub.push(hs.on_hello(h).unwrap()),
                Message::Auth(a) => {
                    hs.on_auth(a).unwrap();
                    to_hub.push(match resume.take().flatten() {
                        Some(r) => Message::Resume(Box::new(r)),
                        None => Message::Subscribe(Subscribe {
                            target: Target::Prefix(DocPrefix::all()),
                            epoch: Epoch::none(),
                            cursor: Cursor(0),
                        }),
                    });
                }
                other => got.push(other),
            }
        }
    }
    assert_eq!(hs.version(), Some(version));
    (sid, got)
}

/// Version 4 marks a cursor with the chain of the log (`ChangesAt`); a version 3 replica
/// gets `Changes`, keeps the signature of the change at its cursor, and resumes with it:
/// the hub takes either mark, and repairs on neither.
pub fn a_version_3_replica_gets_changes_without_marks_and_resumes_with_a_signature() {
    let mut hub = mem_hub();
    let doc = DocId::new("v3/doc").unwrap();
    let mut w = replica();
    let ws = connect(&mut hub, &mut w);
    for v in 0..2 {
        w.change(&doc, &ops(json!([{"op":"put","path":["k"],"value":v}])))
            .unwrap();
        pump(&mut hub, &mut [(&mut w, ws)]);
    }

    let (_, got) = session_of_version(&mut hub, 4, None);
    let kinds: Vec<&str> = got.iter().map(|m| m.kind()).collect();
    assert_eq!(kinds, ["ChangesAt", "CaughtUpAt"], "{got:?}");
    let (Message::ChangesAt(c), Message::CaughtUpAt(u)) = (&got[0], &got[1]) else {
        unreachable!()
    };
    let signatures: Vec<_> = c.changes.changes.iter().map(|c| c.signature).collect();
    let first = crate::store::chain(None, &signatures[0]);
    assert_eq!(c.mark, crate::store::chain(Some(&first), &signatures[1]));
    assert_eq!(u.mark, Some(c.mark), "the same chain at the same position");

    let (_, got) = session_of_version(&mut hub, 3, None);
    let kinds: Vec<&str> = got.iter().map(|m| m.kind()).collect();
    assert_eq!(kinds, ["Changes", "CaughtUpAt"], "{got:?}");
    let epoch = hub.store.epoch();
    let resume = |mark| wire::Resume {
        target: Target::Prefix(DocPrefix::all()),
        epoch,
        cursor: Cursor(2),
        mark: Some(Mark(mark)),
        written: None,
    };
    // The signature of the change at 2 (version 3's mark), then the chain at 2: both
    // are this log; another mark is not.
    for (mark, rewritten) in [(signatures[1], 0), (c.mark.0, 0), (signatures[0], 1)] {
        let r = resume(mark);
        let (_, got) = session_of_version(&mut hub, 3, Some(r));
        assert!(got.iter().any(|m| matches!(m, Message::CaughtUpAt(_))));
        assert_eq!(hub.metrics().cursors_rewritten, rewritten);
    }
}

/// One `#[test]` per case of the hub suite, each on a fresh store from `$make` (an expression
/// of a `Fn() -> TestStore + 'static`).
#[macro_export]
macro_rules! hub_suite {
    ($make:expr) => {
        $crate::hub_suite!(@cases $make; an_unknown_key_is_refused_at_the_handshake,
            a_read_only_key_has_its_writes_refused_and_its_app_told,
            the_app_is_told_when_the_hub_stores_its_changes,
            a_key_without_read_rights_never_receives_the_document,
            a_revoked_grant_holds_at_once_on_a_live_session,
            a_change_covered_only_by_one_the_document_refuses_is_checked_on_its_own,
            changes_refused_in_a_commit_applied_on_several_threads_are_not_stored,
            a_writer_signing_a_renumbered_change_cannot_crash_or_wedge_its_readers,
            forged_and_replayed_pushes_are_refused_and_store_nothing,
            a_cloned_store_that_reuses_an_actor_seq_is_refused_and_its_app_told,
            a_peer_error_with_multibyte_text_is_absorbed_without_panicking_or_answering,
            an_oversized_local_change_is_refused_and_leaves_nothing_behind,
            a_gateway_writing_to_thousands_of_documents_syncs_them_all,
            a_slow_replica_falls_back_to_the_log_and_still_catches_up,
            a_replica_that_has_not_caught_up_shows_lag,
            compaction_stops_its_snapshot_before_a_change_still_waiting_for_its_dependencies,
            a_version_2_replica_is_caught_up_without_marks_and_may_not_resume,
            a_version_3_replica_resumes_a_version_2_hub_without_marks,
            a_version_3_replica_gets_changes_without_marks_and_resumes_with_a_signature);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                $crate::hub::suite::run($make, $crate::hub::suite::$case);
            }
        )*
    };
}
