#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! A power cut on a replica: the commits that are not synced (received changes with the
//! cursors they advance, acknowledgements) may be lost, back to the last synced commit. The
//! store files are copied right after a synced commit (what the disk is then sure to hold),
//! the replica goes on, and then it is closed and its files are put back from that copy, as
//! the worst such cut would leave them. Nothing acknowledged to the app may be lost, nothing
//! may be skipped, and no rollback may be imagined.

use std::path::{Path, PathBuf};

use syncline_core::DocId;
use syncline_core::hub::SessionId;
use syncline_core::replica::Replica;
use syncline_core::store::HubStore;

use crate::support::{TestHub, connect, hub, put_in, replica_of, sync, sync_unsynced};

fn doc() -> DocId {
    DocId::new("plant/power").unwrap()
}

fn write(r: &mut Replica, key: &str, n: i64) {
    put_in(r, &doc(), key, n);
}

/// The files of the replica store `dir/NAME.db` (its WAL may hold the newest commits).
fn files(dir: &Path, name: &str) -> Vec<PathBuf> {
    ["db", "db-wal"]
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .collect()
}

/// What the disk holds of `dir/NAME.db` now, copied aside.
fn image(dir: &Path, name: &str) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    files(dir, name)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).ok();
            (f, bytes)
        })
        .collect()
}

/// The power cut: `r` (on `dir/NAME.db`, key seed `seed`, its session `s` with `h`) stops,
/// its store's files are put back to `image`, and it opens again: the commits since are gone.
fn cut_back_to(
    image: &[(PathBuf, Option<Vec<u8>>)],
    h: &mut TestHub,
    mut r: Replica,
    s: SessionId,
    dir: &Path,
    name: &str,
    seed: u8,
) -> Replica {
    r.disconnect();
    h.close(s);
    drop(r);
    put_back(image, dir, name);
    replica_of(dir, name, seed, doc())
}

/// Puts the files of `dir/NAME.db` back to `image` (closed first), with no shared index.
fn put_back(image: &[(PathBuf, Option<Vec<u8>>)], dir: &Path, name: &str) {
    for (f, bytes) in image {
        match bytes {
            Some(b) => std::fs::write(f, b).unwrap(),
            None => {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let _ = std::fs::remove_file(dir.join(format!("{name}.db-shm")));
}

/// Both replicas connected to `h` and caught up.
fn live(h: &mut TestHub, w: &mut Replica, r: &mut Replica) -> (SessionId, SessionId) {
    let (sw, sr) = (connect(h, w), connect(h, r));
    sync(h, &mut [(w, sw), (r, sr)]).unwrap();
    (sw, sr)
}

#[test]
fn a_power_cut_that_takes_back_an_acknowledgement_has_the_write_acknowledged_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    let mut r = replica_of(dir.path(), "r", 2, doc());
    let (sw, sr) = live(&mut h, &mut w, &mut r);

    // The write is durable when `change` returns: what the disk holds from here on.
    write(&mut w, "k", 1);
    let synced = image(dir.path(), "w");
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0, "acknowledged");
    let (_, at) = w.store().written().unwrap().expect("a written position");
    assert_eq!(r.json(&doc()).unwrap()["k"], serde_json::json!(1));

    // The cut takes the acknowledgement back: the write is there, and in the outbox again.
    let mut w = cut_back_to(&synced, &mut h, w, sw, dir.path(), "w", 1);
    assert_eq!(w.json(&doc()).unwrap()["k"], serde_json::json!(1));
    assert_eq!(
        w.status().unwrap().outbox,
        1,
        "the acknowledgement was lost"
    );

    // Uploaded again: the hub has it already and acknowledges it where it stored it; no
    // rollback is taken for one, and the reader gets nothing twice.
    let duplicates = h.metrics().changes_duplicate;
    let sw = connect(&mut h, &mut w);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0, "acknowledged again");
    assert_eq!(h.metrics().changes_duplicate, duplicates + 1);
    assert_eq!(h.metrics().changes_stored, 1, "stored once");
    let (_, again) = w.store().written().unwrap().expect("a written position");
    assert_eq!(
        again.cursor, at.cursor,
        "acknowledged at its stored position"
    );
    assert_eq!(h.metrics().cursors_ahead, 0);
    assert_eq!(h.metrics().cursors_rewritten, 0);

    // And the next write goes up as any other.
    write(&mut w, "k", 2);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0);
    assert_eq!(r.json(&doc()).unwrap()["k"], serde_json::json!(2));
}

#[test]
fn a_power_cut_that_takes_back_received_changes_has_the_hub_send_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    let mut r = replica_of(dir.path(), "r", 2, doc());
    let (sw, sr) = live(&mut h, &mut w, &mut r);
    let synced = image(dir.path(), "r");

    // r takes in three changes and moves its cursor past them, in commits not synced.
    for i in 0..3 {
        write(&mut w, &format!("k{i}"), i);
    }
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(r.json(&doc()).unwrap()["k2"], serde_json::json!(2));

    let mut r = cut_back_to(&synced, &mut h, r, sr, dir.path(), "r", 2);
    assert!(
        !r.doc_ids().unwrap().contains(&doc()),
        "the received changes were lost with the cut"
    );

    // Its cursor went back with them: the hub sends them again, and sees no rollback.
    let sr = connect(&mut h, &mut r);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    for i in 0..3 {
        assert_eq!(
            r.json(&doc()).unwrap()[format!("k{i}")],
            serde_json::json!(i)
        );
    }
    assert_eq!(h.metrics().cursors_ahead, 0);
    assert_eq!(h.metrics().cursors_rewritten, 0);
    assert_eq!(r.status().unwrap().outbox, 0);
}

#[test]
fn a_power_cut_that_takes_back_a_caught_up_subscription_has_it_caught_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    for i in 0..3 {
        write(&mut w, &format!("k{i}"), i);
    }
    let sw = connect(&mut h, &mut w);
    sync(&mut h, &mut [(&mut w, sw)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0);

    // r's subscription is an app's write, synced: what the disk holds from here on. Its
    // catch-up (the changes, the cursor, the caught-up record) commits unsynced.
    let mut r = replica_of(dir.path(), "r", 2, doc());
    let synced = image(dir.path(), "r");
    let sr = connect(&mut h, &mut r);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    let key = syncline_core::wire::Target::Doc(doc()).key();
    assert!(r.status().unwrap().synced.contains(&key));
    let caught_up = r.store().subscriptions().unwrap();
    assert!(caught_up[0].cursor.0 > 0, "{caught_up:?}");

    // The worst cut takes all of it back: subscribed, at the start of the log.
    let mut r = cut_back_to(&synced, &mut h, r, sr, dir.path(), "r", 2);
    let subs = r.store().subscriptions().unwrap();
    assert_eq!(subs.len(), 1, "the subscription was synced");
    assert_eq!(
        subs[0].cursor.0, 0,
        "its caught-up record was lost with the cut"
    );

    // The next session catches up again from there: every change, no rollback seen.
    let sr = connect(&mut h, &mut r);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert!(r.status().unwrap().synced.contains(&key));
    for i in 0..3 {
        assert_eq!(
            r.json(&doc()).unwrap()[format!("k{i}")],
            serde_json::json!(i)
        );
    }
    assert_eq!(
        r.store().subscriptions().unwrap()[0].cursor,
        caught_up[0].cursor
    );
    assert_eq!(h.metrics().cursors_ahead, 0);
    assert_eq!(h.metrics().cursors_rewritten, 0);
}

/// A hub on `dir/hub.db` that relays before it syncs.
fn deferring_hub(dir: &Path) -> TestHub {
    let mut h = hub(dir);
    h.set_deferred_sync(true).unwrap();
    h
}

#[test]
fn a_power_cut_at_a_hub_that_relayed_before_its_sync_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = deferring_hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    let mut r = replica_of(dir.path(), "r", 2, doc());
    let (sw, sr) = (connect(&mut h, &mut w), connect(&mut h, &mut r));
    write(&mut w, "k", 1);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0, "acknowledged once synced");
    // Synced: what the hub's disk is sure to hold.
    let synced = image(dir.path(), "hub");

    // The next change is committed unsynced and relayed: the reader has it, the writer is
    // not acknowledged.
    write(&mut w, "lost", 2);
    sync_unsynced(&mut h, &mut [(&mut w, sw), (&mut r, sr)]);
    assert_eq!(r.json(&doc()).unwrap()["lost"], serde_json::json!(2));
    assert_eq!(
        w.status().unwrap().outbox,
        1,
        "no acknowledgement before the sync"
    );

    // The power cut takes the hub back to its last sync.
    drop(h);
    put_back(&synced, dir.path(), "hub");
    let mut h = deferring_hub(dir.path());
    w.disconnect();
    r.disconnect();

    // Another writer's change takes the position the lost one had.
    let mut v = replica_of(dir.path(), "v", 3, doc());
    let sv = connect(&mut h, &mut v);
    sync(&mut h, &mut [(&mut v, sv)]).unwrap();
    write(&mut v, "v", 3);
    sync(&mut h, &mut [(&mut v, sv)]).unwrap();
    assert_eq!(v.json(&doc()).unwrap().get("lost"), None, "the hub lost it");

    // The reader finds its mark no longer matches and is repaired; the writer uploads the
    // lost change again, and it is acknowledged.
    let (sw, sr) = (connect(&mut h, &mut w), connect(&mut h, &mut r));
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr), (&mut v, sv)]).unwrap();
    assert_eq!(
        h.metrics().cursors_rewritten + h.metrics().cursors_ahead,
        1,
        "the reader's position was taken by another change"
    );
    assert_eq!(w.status().unwrap().outbox, 0);
    let all = serde_json::json!({"k": 1, "lost": 2, "v": 3});
    for x in [&mut w, &mut r, &mut v] {
        assert_eq!(x.json(&doc()).unwrap(), all);
    }
    // A replica that starts now finds every change in the hub's log.
    let mut fresh = replica_of(dir.path(), "fresh", 4, doc());
    let sf = connect(&mut h, &mut fresh);
    sync(&mut h, &mut [(&mut fresh, sf)]).unwrap();
    assert_eq!(fresh.json(&doc()).unwrap(), all);
}

#[test]
fn a_hub_whose_sync_fails_sends_nothing_more_until_it_is_restarted() {
    use syncline_core::wire::{ErrorCode, Message};
    let dir = tempfile::tempdir().unwrap();
    let mut h = deferring_hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    let mut r = replica_of(dir.path(), "r", 2, doc());
    let (sw, sr) = (connect(&mut h, &mut w), connect(&mut h, &mut r));
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();

    // A change committed unsynced, then a sync that fails (its WAL gone from under it).
    write(&mut w, "k", 1);
    while let Some(m) = w.poll_transmit().unwrap() {
        h.handle_message(sw, m).unwrap();
    }
    h.flush().unwrap();
    std::fs::remove_file(dir.path().join("hub.db-wal")).unwrap();
    assert!(h.sync().is_err());
    // Neither the relay nor the acknowledgement leaves: each session gets only the error.
    for s in [sw, sr] {
        let mut out = Vec::new();
        while let Some(m) = h.poll_transmit(s).unwrap() {
            out.push(m);
        }
        assert!(
            matches!(&out[..], [Message::Error(e)] if e.code == ErrorCode::StorageUnavailable),
            "{out:?}"
        );
    }
    assert!(h.sync().is_err(), "no later sync passes for it");
    assert!(h.store().append(&[]).is_err(), "nor any commit");
    assert_eq!(w.status().unwrap().outbox, 1);

    // Restarted, it takes the write (again, or for the first time) and relays it.
    drop(h);
    let mut h = deferring_hub(dir.path());
    w.disconnect();
    r.disconnect();
    let (sw, sr) = (connect(&mut h, &mut w), connect(&mut h, &mut r));
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(w.status().unwrap().outbox, 0);
    assert_eq!(r.json(&doc()).unwrap()["k"], serde_json::json!(1));
}

/// The files of `image` written as the store `dir/AS.db`, opened as a replica (key seed
/// `seed`): what a replica finds after a crash that left its disk as `image`.
fn open_image(image: &[(PathBuf, Option<Vec<u8>>)], dir: &Path, name: &str, seed: u8) -> Replica {
    for ((_, bytes), f) in image.iter().zip(files(dir, name)) {
        if let Some(b) = bytes {
            std::fs::write(f, b).unwrap();
        }
    }
    replica_of(dir, name, seed, doc())
}

/// A reader that leaves its received changes open (`Replica::defer_received`, as the replica
/// thread does) shows them at once and stores them at `commit_received`, or at its own next
/// write, which commits them first. A crash before that loses them with the cursor they
/// advanced: the hub sends them again.
#[test]
fn received_changes_left_open_are_stored_at_their_commit_or_sent_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = hub(dir.path());
    let mut w = replica_of(dir.path(), "w", 1, doc());
    let mut r = replica_of(dir.path(), "r", 2, doc());
    r.defer_received(true).unwrap();
    let (sw, sr) = live(&mut h, &mut w, &mut r);

    write(&mut w, "k", 1);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert_eq!(r.json(&doc()).unwrap()["k"], serde_json::json!(1));
    assert!(r.received_uncommitted(), "shown before its commit");
    let before_commit = image(dir.path(), "r");
    r.commit_received().unwrap();
    assert!(!r.received_uncommitted());
    let committed = image(dir.path(), "r");

    write(&mut w, "j", 2);
    sync(&mut h, &mut [(&mut w, sw), (&mut r, sr)]).unwrap();
    assert!(r.received_uncommitted());
    write(&mut r, "own", 3);
    assert!(
        !r.received_uncommitted(),
        "the local write committed it first"
    );
    let with_own = image(dir.path(), "r");

    // Crashed before the commit: the change is not there, and neither is its cursor.
    let mut crashed = open_image(&before_commit, dir.path(), "crashed", 2);
    assert!(
        !crashed.json(&doc()).is_ok_and(|j| j.get("k").is_some()),
        "not stored before its commit"
    );
    let sc = connect(&mut h, &mut crashed);
    sync(&mut h, &mut [(&mut crashed, sc)]).unwrap();
    assert_eq!(
        crashed.json(&doc()).unwrap()["k"],
        serde_json::json!(1),
        "sent again"
    );
    assert_eq!(h.metrics().cursors_ahead, 0);
    assert_eq!(h.metrics().cursors_rewritten, 0);

    // Crashed after the commit, and after the reader's own write: all there, offline.
    let mut stored = open_image(&committed, dir.path(), "stored", 2);
    assert_eq!(stored.json(&doc()).unwrap()["k"], serde_json::json!(1));
    let mut own = open_image(&with_own, dir.path(), "own", 2);
    assert_eq!(
        own.json(&doc()).unwrap(),
        serde_json::json!({"k": 1, "j": 2, "own": 3})
    );

    // Only `poll_transmit`'s flush leaves changes waiting: any other (a catch-up's, a
    // repair's) comes before a step that reads the store, and stores them at once.
    write(&mut w, "x", 4);
    while let Some(m) = w.poll_transmit().unwrap() {
        h.handle_message(sw, m).unwrap();
    }
    h.flush().unwrap();
    h.sync().unwrap();
    while let Some(m) = h.poll_transmit(sr).unwrap() {
        r.handle_message(m).unwrap();
    }
    r.flush().unwrap();
    assert_eq!(r.json(&doc()).unwrap()["x"], serde_json::json!(4));
    assert!(
        !r.received_uncommitted(),
        "stored by a flush outside poll_transmit"
    );
}
