#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! A hub whose data directory is rolled back under its replicas (a raw copy of `hub.db` put
//! back, a disk snapshot restored): same epoch, an older log, and new changes numbered again
//! from the old end. A replica whose cursor is past the log's end must not skip them. And a
//! log restored under a new epoch, with a repair cut short.

use std::path::{Path, PathBuf};

use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::Replica;
use syncline_core::store::{HubStore, SqliteHubStore};
use syncline_core::wire::{Message, Target};
use syncline_core::{DocId, DocPrefix};

use crate::support::put_in;

type TestHub = Hub<SqliteHubStore, AllowAll>;

fn hub(file: &Path) -> TestHub {
    Hub::new(
        Identity::from_seed([9; 32]),
        SqliteHubStore::open(file).unwrap(),
        AllowAll,
        None,
    )
}

fn doc() -> DocId {
    DocId::new("plant/rollback").unwrap()
}

fn replica(dir: &Path, name: &str, seed: u8) -> Replica {
    crate::support::replica_of(dir, name, seed, doc())
}

fn sync(hub: &mut TestHub, r: &mut Replica) {
    sync_with(hub, r, |_| {});
}

/// A session to the end, in which `live` runs once the replica is caught up (its writes then
/// go up as live pushes: the hub does not send them back).
fn sync_with(hub: &mut TestHub, r: &mut Replica, live: impl FnOnce(&mut Replica)) {
    let s: SessionId = hub.accept();
    r.connect(Some(hub.peer_id()));
    let mut live = Some(live);
    loop {
        let mut moved = false;
        while let Some(m) = r.poll_transmit().unwrap() {
            hub.handle_message(s, m).unwrap();
            moved = true;
        }
        hub.flush().unwrap();
        while let Some(m) = hub.poll_transmit(s).unwrap() {
            r.handle_message(m).unwrap();
            moved = true;
        }
        if !moved {
            match live.take() {
                Some(f) => f(r),
                None => break,
            }
        }
    }
    r.disconnect();
    hub.close(s);
}

fn write(r: &mut Replica, key: &str, n: i64) {
    put_in(r, &doc(), key, n);
}

/// A hub file holding five changes of the writer `a` (`early0`...), and a whole copy of it
/// taken with the hub closed; `b` is a reader that has not synced yet.
fn five_changes_and_a_copy(dir: &Path) -> (PathBuf, PathBuf, Replica, Replica) {
    let file = dir.join("hub.db");
    let copy = dir.join("hub-copy.db");
    let (mut a, b) = (replica(dir, "a", 1), replica(dir, "b", 2));
    let mut h = hub(&file);
    for i in 0..5 {
        write(&mut a, &format!("early{i}"), i);
    }
    sync(&mut h, &mut a);
    drop(h); // closes the file (its WAL is checkpointed): a whole copy
    std::fs::copy(&file, &copy).unwrap();
    (file, copy, a, b)
}

/// a writes five more changes (`late0`...) and a document of their own (`plant/lost`); b
/// follows everything under `plant/` too, and syncs to the end. Returns that document and
/// that subscription.
fn late_writes_and_a_lost_doc(
    h: &mut TestHub,
    a: &mut Replica,
    b: &mut Replica,
) -> (DocId, Target) {
    for i in 0..5 {
        write(a, &format!("late{i}"), i);
    }
    let lost = DocId::new("plant/lost").unwrap();
    a.change(
        &lost,
        &[Op::Put {
            path: vec![PathElem::Key("only".into())],
            value: Value::Int(1),
        }],
    )
    .unwrap();
    sync(h, a);
    let everything = Target::Prefix(DocPrefix::new("plant/").unwrap());
    b.subscribe(everything.clone()).unwrap();
    sync(h, b);
    (lost, everything)
}

/// Puts the hub file back to `copy` and opens the hub on it; a new replica `c` writes `n`
/// changes (`after0`...), which take the positions after the copy's end.
fn put_back_and_write(dir: &Path, copy: &Path, file: &Path, n: i64) -> (TestHub, Replica) {
    std::fs::rename(copy, file).unwrap();
    let mut h = hub(file);
    let mut c = replica(dir, "c", 3);
    sync(&mut h, &mut c);
    for i in 0..n {
        write(&mut c, &format!("after{i}"), i);
    }
    sync(&mut h, &mut c);
    (h, c)
}

#[test]
fn a_replica_whose_cursor_is_past_a_rolled_back_log_repairs_instead_of_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut a, mut b) = five_changes_and_a_copy(dir.path());

    // Five more changes; the reader b follows to the end of the log.
    let mut h = hub(&file);
    for i in 0..5 {
        write(&mut a, &format!("late{i}"), i);
    }
    sync(&mut h, &mut a);
    sync(&mut h, &mut b);
    assert_eq!(b.json(&doc()).unwrap()["late4"], serde_json::json!(4));
    drop(h);

    // The directory is rolled back to the copy: same epoch, five changes. A third writer's
    // changes take the positions b has already passed.
    let (mut h, mut c) = put_back_and_write(dir.path(), &copy, &file, 3);

    sync(&mut h, &mut b);
    let json = b.json(&doc()).unwrap();
    assert_eq!(json["after2"], serde_json::json!(2), "not skipped: {json}");
    assert_eq!(h.metrics().cursors_ahead, 1);
    // And what the rolled-back hub lost comes back from the replicas that hold it.
    sync(&mut h, &mut a);
    sync(&mut h, &mut c);
    assert_eq!(
        c.doc(&doc()).unwrap().heads(),
        b.doc(&doc()).unwrap().heads()
    );
    assert_eq!(c.json(&doc()).unwrap()["late4"], serde_json::json!(4));
}

#[test]
fn a_replica_notices_a_rolled_back_log_that_has_grown_past_its_cursor_again() {
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut a, mut b) = five_changes_and_a_copy(dir.path());

    // Five more changes (positions 6 to 10), and a document of its own (11); b follows
    // everything under `plant/` to position 11.
    let mut h = hub(&file);
    let (lost, _) = late_writes_and_a_lost_doc(&mut h, &mut a, &mut b);
    assert_eq!(b.json(&doc()).unwrap()["late4"], serde_json::json!(4));
    assert_eq!(b.json(&lost).unwrap()["only"], serde_json::json!(1));
    drop(h);

    // Rolled back to five changes, then eight new ones: the log is at 13 again, past b's
    // cursors (10 and 11), and positions 6 to 11 hold changes b never got.
    let (mut h, mut c) = put_back_and_write(dir.path(), &copy, &file, 8);
    assert!(h.store().last_cursor().unwrap().0 > 11);
    assert!(h.store().heads(&lost).unwrap().heads.is_empty());

    sync(&mut h, &mut b);
    let json = b.json(&doc()).unwrap();
    for i in 0..8 {
        assert_eq!(
            json[format!("after{i}").as_str()],
            serde_json::json!(i),
            "after{i} skipped: {json}"
        );
    }
    // Both subscriptions of b noticed it.
    assert_eq!(h.metrics().cursors_rewritten, 2);
    assert_eq!(h.metrics().cursors_ahead, 0);
    // The document the hub lost whole comes back from b too.
    assert!(!h.store().heads(&lost).unwrap().heads.is_empty());
    // What the rolled-back hub lost comes back from b, and reaches c.
    sync(&mut h, &mut c);
    assert_eq!(c.json(&doc()).unwrap()["late4"], serde_json::json!(4));
    assert_eq!(
        c.doc(&doc()).unwrap().heads(),
        b.doc(&doc()).unwrap().heads()
    );
    // A replica whose cursor was not rewritten reads on from it: no second repair.
    sync(&mut h, &mut b);
    assert_eq!(h.metrics().cursors_rewritten, 2);
}

#[test]
fn a_writer_notices_that_its_acknowledged_writes_were_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    // a writes alone: the hub never sends a writer its own changes, so its cursor stays
    // where its last received change was.
    let (file, copy, mut a, _) = five_changes_and_a_copy(dir.path());
    let mut h = hub(&file);
    sync_with(&mut h, &mut a, |a| {
        for i in 0..5 {
            write(a, &format!("late{i}"), i);
        }
    });
    assert_eq!(a.status().unwrap().outbox, 0, "acknowledged");
    drop(h);

    // Put back: the five acknowledged writes are gone, and c's take their positions.
    let (mut h, mut c) = put_back_and_write(dir.path(), &copy, &file, 8);
    assert_eq!(c.json(&doc()).unwrap().get("late4"), None);
    sync(&mut h, &mut a);
    assert_eq!(h.metrics().cursors_rewritten, 1);
    // a took c's writes and gave its lost ones back.
    assert_eq!(a.json(&doc()).unwrap()["after7"], serde_json::json!(7));
    sync(&mut h, &mut c);
    assert_eq!(c.json(&doc()).unwrap()["late4"], serde_json::json!(4));
    assert_eq!(
        c.doc(&doc()).unwrap().heads(),
        a.doc(&doc()).unwrap().heads()
    );
    // Repaired once: the next session reads on.
    sync(&mut h, &mut a);
    assert_eq!(h.metrics().cursors_rewritten, 1);
}

#[test]
fn a_repair_cut_off_before_its_end_is_made_again_at_the_next_session() {
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut a, mut b) = five_changes_and_a_copy(dir.path());
    let mut h = hub(&file);
    let (lost, everything) = late_writes_and_a_lost_doc(&mut h, &mut a, &mut b);
    drop(h);
    let (mut h, mut c) = put_back_and_write(dir.path(), &copy, &file, 8);

    // b's session repairs both subscriptions; c writes while it does (the repair's catch-up
    // reads it), and the link breaks just before the CaughtUpAt of `plant/`, after which b
    // would have uploaded the document the hub lost whole.
    let mut c_wrote = false;
    let cut = sync_until(&mut h, &mut b, |h, m| {
        if matches!(m, Message::Heads(_)) && !c_wrote {
            c_wrote = true;
            write(&mut c, "during", 1);
            sync(h, &mut c);
        }
        matches!(m, Message::CaughtUpAt(u) if u.target == everything)
    });
    assert!(cut, "the repair stalled");
    assert!(c_wrote);
    assert_eq!(h.metrics().cursors_rewritten, 2);
    assert!(h.store().heads(&lost).unwrap().heads.is_empty());

    // The next session repairs `plant/` again (and the other too, if its CaughtUpAt was
    // still waiting for its answers), and the lost document comes back.
    sync(&mut h, &mut b);
    assert!(h.metrics().cursors_rewritten >= 3);
    assert!(!h.store().heads(&lost).unwrap().heads.is_empty());
    let json = b.json(&doc()).unwrap();
    for i in 0..8 {
        assert_eq!(
            json[format!("after{i}").as_str()],
            serde_json::json!(i),
            "{json}"
        );
    }
    assert_eq!(json["during"], serde_json::json!(1), "{json}");
    sync(&mut h, &mut c);
    assert_eq!(
        c.doc(&doc()).unwrap().heads(),
        b.doc(&doc()).unwrap().heads()
    );
}

#[test]
fn a_writer_whose_lost_write_is_stored_again_lower_is_repaired_once() {
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut a, _) = five_changes_and_a_copy(dir.path());
    // Another writer's changes of another document (6 to 9), then a's write (10).
    let mut h = hub(&file);
    let other = DocId::new("plant/other").unwrap();
    let mut d = crate::support::replica_of(dir.path(), "d", 4, other.clone());
    for i in 0..4 {
        d.change(
            &other,
            &[Op::Put {
                path: vec![PathElem::Key(format!("o{i}"))],
                value: Value::Int(i),
            }],
        )
        .unwrap();
    }
    sync(&mut h, &mut d);
    sync_with(&mut h, &mut a, |a| write(a, "x", 1));
    drop(h);

    // Put back without new writes: a's written position (10) is past the end (5).
    std::fs::rename(&copy, &file).unwrap();
    let mut h = hub(&file);
    sync(&mut h, &mut a);
    assert_eq!(h.metrics().cursors_ahead, 1);
    let mut c = replica(dir.path(), "c", 3);
    sync(&mut h, &mut c);
    assert_eq!(
        c.json(&doc()).unwrap()["x"],
        serde_json::json!(1),
        "given back"
    );
    // Stored again at 6: the next sessions read on, no repair again.
    sync(&mut h, &mut a);
    sync(&mut h, &mut a);
    assert_eq!(h.metrics().cursors_ahead, 1);
    assert_eq!(h.metrics().cursors_rewritten, 0);
}

/// A session that breaks when the hub sends a message `breaks` picks (it may act on the hub
/// first): that message and whatever would follow are lost; the replica commits what it got
/// before (its sends go nowhere). Returns whether it came.
fn sync_until(
    hub: &mut TestHub,
    r: &mut Replica,
    mut breaks: impl FnMut(&mut TestHub, &Message) -> bool,
) -> bool {
    let s: SessionId = hub.accept();
    r.connect(Some(hub.peer_id()));
    let mut broke = false;
    while !broke {
        let mut moved = false;
        while let Some(m) = r.poll_transmit().unwrap() {
            hub.handle_message(s, m).unwrap();
            moved = true;
        }
        hub.flush().unwrap();
        while let Some(m) = hub.poll_transmit(s).unwrap() {
            if breaks(hub, &m) {
                broke = true;
                break;
            }
            r.handle_message(m).unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
    while r.poll_transmit().unwrap().is_some() {}
    r.disconnect();
    hub.close(s);
    broke
}

/// How many of its changes the hub acknowledged to `r` since the last call (its events).
fn acknowledged(r: &mut Replica) -> u64 {
    let mut n = 0;
    while let Some(e) = r.poll_event() {
        if let syncline_core::replica::Event::Acknowledged { changes, .. } = e {
            n += changes;
        }
    }
    n
}

/// Puts the hub file back from `copy`, as a raw copy does (its WAL gone with the old file).
fn copy_back(copy: &Path, file: &Path) {
    std::fs::copy(copy, file).unwrap();
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(file.with_extension(ext));
    }
}

/// The hub on `file` put back from `copy` as `syncline-hub restore` does: a new epoch.
fn restore(copy: &Path, file: &Path) -> TestHub {
    copy_back(copy, file);
    let mut store = SqliteHubStore::open(file).unwrap();
    store.new_epoch().unwrap();
    Hub::new(Identity::from_seed([9; 32]), store, AllowAll, None)
}

/// A hub file on which c wrote one change of `doc()`, and a copy of it (the backup); then a,
/// following all of `plant/`, writes to `plant/lost` and is acknowledged, in a session that
/// breaks before its subscription catches up. Returns the two files, c, a and that document.
fn acknowledged_but_never_caught_up(dir: &Path) -> (PathBuf, PathBuf, Replica, Replica, DocId) {
    let (file, copy) = (dir.join("hub.db"), dir.join("hub-copy.db"));
    let lost = DocId::new("plant/lost").unwrap();
    let mut h = hub(&file);
    let mut c = replica(dir, "c", 3);
    write(&mut c, "before", 0);
    sync(&mut h, &mut c);
    drop(h);
    std::fs::copy(&file, &copy).unwrap();

    let mut h = hub(&file);
    let mut a = crate::support::bare_replica(dir, "a", 1);
    a.subscribe(Target::Prefix(DocPrefix::new("plant/").unwrap()))
        .unwrap();
    put_in(&mut a, &lost, "first", 1);
    assert!(sync_until(&mut h, &mut a, |_, m| matches!(
        m,
        Message::CaughtUpAt(_)
    )));
    let status = a.status().unwrap();
    assert_eq!(status.outbox, 0, "the write is acknowledged");
    assert!(status.synced.is_empty(), "and no subscription caught up");
    acknowledged(&mut a);
    (file, copy, c, a, lost)
}

/// a writes `second` to `doc()` in a session that breaks at the hub's `CaughtUpAt`: the write
/// is acknowledged, and stays in a's outbox (the session's repair or check is not over).
fn second_write_cut_short(h: &mut TestHub, a: &mut Replica) {
    let second = a
        .change(
            &doc(),
            &[Op::Put {
                path: vec![PathElem::Key("second".into())],
                value: Value::Int(2),
            }],
        )
        .unwrap()[0];
    assert!(sync_until(h, a, |_, m| matches!(m, Message::CaughtUpAt(_))));
    assert!(acknowledged(a) >= 1, "the second write is acknowledged");
    let outbox = a.store().outbox_after(0, 1000).unwrap();
    assert!(
        outbox.iter().any(|e| e.hash == second),
        "and stays in the outbox until the repair or check is over"
    );
}

/// A new replica finds the first write of `acknowledged_but_never_caught_up` at the hub.
fn hub_got_back(h: &mut TestHub, dir: &Path, lost: &DocId) {
    let mut b = crate::support::replica_of(dir, "b", 2, lost.clone());
    sync(h, &mut b);
    assert_eq!(
        b.json(lost).unwrap(),
        serde_json::json!({"first": 1}),
        "the hub got back the write it lost"
    );
}

#[test]
fn a_write_acknowledged_before_a_restore_comes_back_though_the_repair_was_cut_short() {
    // A subscription that never caught up names, at the next session, the log its replica
    // last exchanged changes with; a repair of it cut short must not change which that is.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, _c, mut a, lost) = acknowledged_but_never_caught_up(dir.path());

    // The backup is restored: a new log, without the write or its document. a's repair is
    // cut short after the new log acknowledged a's next write (to the other document), before
    // the end of the repair, which is what uploads the documents the new log does not have.
    let mut h = restore(&copy, &file);
    second_write_cut_short(&mut h, &mut a);

    sync(&mut h, &mut a);
    hub_got_back(&mut h, dir.path(), &lost);
}

#[test]
fn a_write_lost_by_a_rollback_comes_back_though_the_check_was_cut_short() {
    // The same with the log put back under the same epoch: the hub finds the rollback at
    // the replica's written position. A newer acknowledgement in a session that breaks
    // before that check's end must not replace it: at the next session the newer position
    // would hold the same change, and the check would pass.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut c, mut a, lost) = acknowledged_but_never_caught_up(dir.path());
    let (epoch, first_at) = a.store().written().unwrap().unwrap();

    // Put back as it was, with the same epoch; others' writes take the positions again.
    copy_back(&copy, &file);
    let mut h = hub(&file);
    assert_eq!(h.store().epoch(), epoch);
    for i in 0..3 {
        write(&mut c, &format!("again{i}"), i);
    }
    sync(&mut h, &mut c);
    second_write_cut_short(&mut h, &mut a);
    assert_eq!(
        a.store().written().unwrap().unwrap().1,
        first_at,
        "the position being checked is kept"
    );

    sync(&mut h, &mut a);
    assert_ne!(
        a.store().written().unwrap().unwrap().1,
        first_at,
        "once checked, the newest acknowledged position replaces it"
    );
    hub_got_back(&mut h, dir.path(), &lost);
}

#[test]
fn a_rollback_found_by_a_cursor_mark_holds_the_acknowledgements_of_its_repair() {
    // The same check through a reader's cursor mark alone (no written position): a write
    // acknowledged during that repair counts only at its end.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy) = (dir.path().join("hub.db"), dir.path().join("hub-copy.db"));
    let mut h = hub(&file);
    let (mut c, mut a) = (replica(dir.path(), "c", 3), replica(dir.path(), "a", 1));
    write(&mut c, "before", 0);
    sync(&mut h, &mut c);
    drop(h);
    std::fs::copy(&file, &copy).unwrap();
    let mut h = hub(&file);
    for i in 0..2 {
        write(&mut c, &format!("more{i}"), i);
    }
    sync(&mut h, &mut c);
    sync(&mut h, &mut a);
    assert!(
        a.store().written().unwrap().is_none(),
        "a has written nothing"
    );
    drop(h);

    // Put back, and grown past a's cursor by someone else's changes.
    copy_back(&copy, &file);
    let mut h = hub(&file);
    let mut d = replica(dir.path(), "d", 4);
    for i in 0..3 {
        write(&mut d, &format!("other{i}"), i);
    }
    sync(&mut h, &mut d);
    second_write_cut_short(&mut h, &mut a);
    assert!(
        a.store().written().unwrap().is_none(),
        "no position of the log under check is recorded"
    );
    // The next session repairs again, and the write held back goes up again.
    sync(&mut h, &mut a);
    assert_eq!(a.status().unwrap().outbox, 0);
    let mut b = replica(dir.path(), "b", 2);
    sync(&mut h, &mut b);
    assert_eq!(b.json(&doc()).unwrap()["second"], 2);
}

/// The change at position `at` of the hub's log.
fn change_at(h: &mut TestHub, at: u64) -> syncline_core::change::SignedChange {
    let all = Target::Prefix(DocPrefix::all());
    let batch = h
        .store()
        .read_log(&all, syncline_core::Cursor(at - 1), 1)
        .unwrap();
    assert_eq!(batch.entries[0].cursor.0, at, "a change at {at}");
    batch.entries[0].change.clone()
}

#[test]
fn a_reader_whose_marked_change_came_back_to_its_position_gets_what_was_stored_below_it() {
    // Old log: a's five changes (1 to 5), b's change of another document (6), w's change of
    // a document of its own (7); the reader r follows all of `plant/` to 7.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, _a, mut b) = five_changes_and_a_copy(dir.path());
    let mut h = hub(&file);
    put_in(&mut b, &DocId::new("plant/other").unwrap(), "b1", 1);
    sync(&mut h, &mut b);
    let own = DocId::new("plant/w").unwrap();
    let mut w = crate::support::bare_replica(dir.path(), "w", 6);
    w.subscribe(Target::Doc(own.clone())).unwrap();
    put_in(&mut w, &own, "w1", 1);
    sync(&mut h, &mut w);
    let w1 = change_at(&mut h, 7);
    let mut r = replica(dir.path(), "r", 4);
    r.subscribe(Target::Prefix(DocPrefix::new("plant/").unwrap()))
        .unwrap();
    sync(&mut h, &mut r);
    assert_eq!(r.json(&own).unwrap()["w1"], serde_json::json!(1));
    drop(h);

    // Rolled back to the five changes. c writes `after0` (6); w, whose written position (7)
    // is past the end, is repaired and uploads `w1` again: back at 7, the change r marked
    // there.
    let (mut h, _c) = put_back_and_write(dir.path(), &copy, &file, 1);
    sync(&mut h, &mut w);
    assert_eq!(
        change_at(&mut h, 7),
        w1,
        "the same change at the marked position"
    );

    // r's marks at 7 name the log up to it, not only the change there: r gets `after0`.
    sync(&mut h, &mut r);
    assert_eq!(
        r.json(&doc()).unwrap()["after0"],
        serde_json::json!(0),
        "after0, stored below r's cursors in the new log, is not skipped"
    );
    assert_eq!(
        h.metrics().cursors_rewritten,
        2,
        "both of r's subscriptions"
    );
}

#[test]
fn a_writer_that_subscribed_to_nothing_gets_its_writes_back_into_a_restored_hub() {
    // w subscribed to nothing (a sensor gateway that only uploads): its first write follows
    // the document it wrote, so a restore repairs it like any other. Acknowledged, in the
    // hub; the hub is then restored from a backup taken before the second write.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy) = (dir.path().join("hub.db"), dir.path().join("hub-copy.db"));
    let mut h = hub(&file);
    let readings = DocId::new("plant/readings").unwrap();
    let mut w = crate::support::bare_replica(dir.path(), "w", 6);
    put_in(&mut w, &readings, "t0", 20);
    sync(&mut h, &mut w);
    drop(h);
    std::fs::copy(&file, &copy).unwrap();
    let mut h = hub(&file);
    put_in(&mut w, &readings, "t1", 21);
    sync(&mut h, &mut w);
    assert_eq!(acknowledged(&mut w), 2, "both readings acknowledged");
    assert_eq!(w.status().unwrap().outbox, 0);
    drop(h);

    // Restored (a new epoch): w's next session uploads what the hub lost.
    let mut h = restore(&copy, &file);
    sync(&mut h, &mut w);
    let mut r = crate::support::replica_of(dir.path(), "r", 7, readings.clone());
    sync(&mut h, &mut r);
    assert_eq!(
        r.json(&readings).unwrap(),
        serde_json::json!({"t0": 20, "t1": 21}),
        "the reading the restore lost came back from w"
    );
}

#[test]
fn a_write_sent_again_after_a_lost_acknowledgement_is_checked_at_its_position() {
    // The hub holds c's change (1); a copy of it is taken.
    let dir = tempfile::tempdir().unwrap();
    let (file, copy) = (dir.path().join("hub.db"), dir.path().join("hub-copy.db"));
    let mut h = hub(&file);
    let mut c = replica(dir.path(), "c", 3);
    write(&mut c, "before", 0);
    sync(&mut h, &mut c);
    drop(h);
    std::fs::copy(&file, &copy).unwrap();

    // w's first write is committed (2), its acknowledgement lost with the session.
    let mut h = hub(&file);
    let mut w = replica(dir.path(), "w", 4);
    write(&mut w, "w1", 1);
    assert!(sync_until(&mut h, &mut w, |_, m| matches!(
        m,
        Message::AckAt(_)
    )));
    assert_eq!(w.status().unwrap().outbox, 1, "not acknowledged yet");
    // Sent again: a duplicate, acknowledged at its position; that session breaks before its
    // subscription caught up, so w's cursor says nothing of it.
    assert!(sync_until(&mut h, &mut w, |_, m| matches!(
        m,
        Message::CaughtUpAt(_)
    )));
    assert_eq!(w.status().unwrap().outbox, 0, "acknowledged");
    let (_, written) = w.store().written().unwrap().expect("a written position");
    assert_eq!(written.cursor.0, 2, "where the hub stored it");
    drop(h);

    // Rolled back to the copy: w's written position is past the log's end, and its write,
    // which only w holds, comes back.
    copy_back(&copy, &file);
    let mut h = hub(&file);
    sync(&mut h, &mut w);
    assert_eq!(h.metrics().cursors_ahead, 1);
    let mut r = replica(dir.path(), "r", 5);
    sync(&mut h, &mut r);
    assert_eq!(
        r.json(&doc()).unwrap()["w1"],
        serde_json::json!(1),
        "w1 came back"
    );
}

#[test]
fn on_a_hub_with_retention_a_gap_above_what_it_dropped_still_counts_as_a_rollback() {
    // Retention runs on this hub (for other documents; it has dropped nothing).
    let retention = || {
        vec![
            syncline_core::rolling::Retention::new(DocPrefix::new("logs/").unwrap(), 3600).unwrap(),
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, copy, mut a, _b) = five_changes_and_a_copy(dir.path());
    let mut h = hub(&file);
    h.set_retention(retention());
    write(&mut a, "late", 1);
    sync(&mut h, &mut a);
    let (_, written) = a.store().written().unwrap().expect("acknowledged");
    assert_eq!(written.cursor.0, 6);
    drop(h);

    // Rolled back to the five changes; a duplicate uses position 6 up (no change stored
    // there) and c's change takes 7: a's written position is a gap of the new log.
    copy_back(&copy, &file);
    let mut h = hub(&file);
    h.set_retention(retention());
    let first = change_at(&mut h, 1);
    let dup = syncline_core::change::verify(&doc(), first).unwrap();
    assert!(matches!(
        h.store().append(&[dup]).unwrap()[..],
        [syncline_core::store::Appended::Duplicate(_)]
    ));
    let mut c = replica(dir.path(), "c", 3);
    write(&mut c, "after", 0);
    sync(&mut h, &mut c);
    assert_eq!(change_at(&mut h, 7), {
        let all = Target::Prefix(DocPrefix::all());
        h.store()
            .read_log(&all, syncline_core::Cursor(5), 1)
            .unwrap()
            .entries[0]
            .change
            .clone()
    });

    // Nothing was dropped at or above 6: the gap is the rollback's, and a's write comes back.
    sync(&mut h, &mut a);
    assert_eq!(h.metrics().cursors_rewritten, 1);
    let mut r = replica(dir.path(), "r", 5);
    sync(&mut h, &mut r);
    assert_eq!(r.json(&doc()).unwrap()["late"], serde_json::json!(1));
}
