#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! Rolling documents through a real hub machine and SQLite stores on disk, on a simulated
//! clock: buckets roll with the clock, a new bucket starts from the previous one, old buckets
//! are forgotten only once the hub holds them, and every replica shows the same view.

use std::cell::Cell;

use serde_json::json;
use syncline_core::DocId;
use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ids::DocPrefix;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::rolling::Rolling;
use syncline_core::store::{HubStore, SqliteHubStore};
use syncline_core::wire::Target;

thread_local! {
    // Each test runs on its own thread: one simulated clock per test.
    static NOW: Cell<i64> = const { Cell::new(0) };
}

fn now() -> i64 {
    NOW.with(Cell::get)
}

fn set_now(ms: i64) {
    NOW.with(|n| n.set(ms));
}

/// 2025-12-02T00:00:00Z.
const T0: i64 = 1_764_633_600_000;
const PERIOD_SECS: u64 = 60;

fn options(keep: u32) -> ReplicaOptions {
    ReplicaOptions {
        clock: now,
        rolling: vec![
            Rolling::new(DocPrefix::new("sensors/").unwrap(), PERIOD_SECS, keep).unwrap(),
        ],
        ..ReplicaOptions::default()
    }
}

fn hub() -> Hub<SqliteHubStore, AllowAll> {
    Hub::new(
        Identity::generate(),
        SqliteHubStore::open_in_memory().unwrap(),
        AllowAll,
        None,
    )
}

fn connect(hub: &mut Hub<SqliteHubStore, AllowAll>, r: &mut Replica) -> SessionId {
    let s = hub.accept();
    r.connect(Some(hub.peer_id()));
    s
}

/// Moves messages both ways until nothing moves.
fn sync(hub: &mut Hub<SqliteHubStore, AllowAll>, reps: &mut [(&mut Replica, SessionId)]) {
    loop {
        let mut moved = false;
        for (r, s) in reps.iter_mut() {
            while let Some(m) = r.poll_transmit().unwrap() {
                hub.handle_message(*s, m).unwrap();
                moved = true;
            }
        }
        hub.flush().unwrap();
        for (r, s) in reps.iter_mut() {
            while let Some(m) = hub.poll_transmit(*s).unwrap() {
                r.handle_message(m).unwrap();
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
}

fn put(key: &str, value: Value) -> Op {
    Op::Put {
        path: vec![PathElem::Key(key.into())],
        value,
    }
}

fn buckets_held(r: &Replica, logical: &str) -> Vec<DocId> {
    r.store()
        .doc_ids_with_prefix(&format!("{logical}@"))
        .unwrap()
}

#[test]
fn a_rolling_document_keeps_its_newest_buckets_and_every_replica_shows_the_same_state() {
    set_now(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub();
    let mut writer = Replica::open(
        &dir.path().join("w.sqlite"),
        Identity::generate(),
        options(3),
    )
    .unwrap();
    let mut reader = Replica::open(
        &dir.path().join("r.sqlite"),
        Identity::generate(),
        options(3),
    )
    .unwrap();
    let logical = DocId::new("sensors/temp").unwrap();
    reader.subscribe(Target::Doc(logical.clone())).unwrap();
    let sw = connect(&mut hub, &mut writer);
    let sr = connect(&mut hub, &mut reader);

    // 30 periods of one reading a second; a counter of readings; a value written once.
    let seconds = 30 * PERIOD_SECS as i64;
    for i in 0..seconds {
        set_now(T0 + i * 1000);
        let mut ops = vec![
            put("temp", Value::Int(i)),
            Op::Increment {
                path: vec![PathElem::Key("readings".into())],
                by: 1,
            },
        ];
        if i == 0 {
            ops.push(put("unit", Value::Str("C".into())));
            ops.push(put("readings", Value::Counter(1)));
            ops.remove(1);
        }
        writer.change(&logical, &ops).unwrap();
        if i % 5 == 4 {
            reader.roll().unwrap();
            sync(&mut hub, &mut [(&mut writer, sw), (&mut reader, sr)]);
        }
        assert!(
            buckets_held(&writer, "sensors/temp").len() <= 3,
            "the writer keeps at most 3 buckets, at second {i}: {:?}",
            buckets_held(&writer, "sensors/temp")
        );
    }
    set_now(T0 + seconds * 1000);
    for r in [&mut writer, &mut reader] {
        r.roll().unwrap();
    }
    sync(&mut hub, &mut [(&mut writer, sw), (&mut reader, sr)]);

    let expected = json!({"temp": seconds - 1, "unit": "C", "readings": seconds});
    assert_eq!(
        writer.json(&logical).unwrap(),
        expected,
        "the writer's view"
    );
    assert_eq!(
        reader.json(&logical).unwrap(),
        expected,
        "the reader's view"
    );
    assert!(
        writer.retired() >= 27,
        "{} buckets forgotten",
        writer.retired()
    );
    assert!(
        reader.retired() >= 27,
        "{} buckets forgotten",
        reader.retired()
    );
    for r in [&writer, &reader] {
        let held = buckets_held(r, "sensors/temp");
        assert!(held.len() <= 3, "{held:?}");
        let subs = r.status().unwrap().subscriptions;
        assert!(subs.len() <= 5, "subscriptions stay bounded: {subs:?}");
    }

    // A fresh replica catches up the buckets a view can come from, not the whole history.
    let mut fresh = Replica::open_in_memory(Identity::generate(), options(3)).unwrap();
    fresh.subscribe(Target::Doc(logical.clone())).unwrap();
    let sf = connect(&mut hub, &mut fresh);
    sync(&mut hub, &mut [(&mut fresh, sf)]);
    assert!(fresh.is_synced());
    assert_eq!(fresh.json(&logical).unwrap(), expected);
    let held = buckets_held(&fresh, "sensors/temp");
    assert!(held.len() <= 3, "the 3 newest periods travelled: {held:?}");
    let changes: usize = held
        .iter()
        .map(|b| fresh.doc(b).unwrap().changes().len())
        .sum();
    assert!(
        changes <= 3 * PERIOD_SECS as usize,
        "{changes} changes: 3 periods' writes of {seconds}"
    );
}

#[test]
fn an_old_bucket_is_forgotten_only_once_the_hub_has_every_change_written_there() {
    set_now(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut writer = Replica::open(
        &dir.path().join("w.sqlite"),
        Identity::generate(),
        options(2),
    )
    .unwrap();
    let logical = DocId::new("sensors/door").unwrap();
    // Offline for 5 periods: nothing may be forgotten, nothing is acknowledged.
    for p in 0..5 {
        set_now(T0 + p * PERIOD_SECS as i64 * 1000);
        writer
            .change(&logical, &[put("open", Value::Int(p))])
            .unwrap();
    }
    let held = buckets_held(&writer, "sensors/door");
    assert_eq!(held.len(), 5, "unacknowledged buckets stay: {held:?}");
    assert_eq!(writer.retired(), 0);

    let mut hub = hub();
    let sw = connect(&mut hub, &mut writer);
    sync(&mut hub, &mut [(&mut writer, sw)]);
    assert_eq!(writer.status().unwrap().outbox, 0, "all acknowledged");
    set_now(T0 + 5 * PERIOD_SECS as i64 * 1000 - 1);
    writer.roll().unwrap();
    let held = buckets_held(&writer, "sensors/door");
    assert_eq!(held.len(), 2, "acknowledged, the 3 oldest go: {held:?}");
    assert_eq!(writer.json(&logical).unwrap(), json!({"open": 4}));

    // The hub still has the first bucket: a replica without the policy reads it by its id.
    let first = DocId::new(format!(
        "sensors/door@{PERIOD_SECS}s.{}",
        T0 / 1000 / PERIOD_SECS as i64
    ))
    .unwrap();
    assert!(!held.contains(&first));
    let mut auditor =
        Replica::open_in_memory(Identity::generate(), ReplicaOptions::default()).unwrap();
    auditor.subscribe(Target::Doc(first.clone())).unwrap();
    let sa = connect(&mut hub, &mut auditor);
    sync(&mut hub, &mut [(&mut auditor, sa), (&mut writer, sw)]);
    assert_eq!(auditor.json(&first).unwrap(), json!({"open": 0}));
    // The writer, still in the same session, did not take the forgotten bucket back.
    assert!(!buckets_held(&writer, "sensors/door").contains(&first));
}

#[test]
fn two_writers_that_start_the_same_bucket_at_once_converge() {
    set_now(T0 + 30_000);
    let mut hub = hub();
    let mut a = Replica::open_in_memory(Identity::generate(), options(3)).unwrap();
    let mut b = Replica::open_in_memory(Identity::generate(), options(3)).unwrap();
    let logical = DocId::new("sensors/fan").unwrap();
    a.change(
        &logical,
        &[
            put("speed", Value::Int(1)),
            put("mode", Value::Str("auto".into())),
        ],
    )
    .unwrap();
    b.subscribe(Target::Doc(logical.clone())).unwrap();
    let sa = connect(&mut hub, &mut a);
    let sb = connect(&mut hub, &mut b);
    sync(&mut hub, &mut [(&mut a, sa), (&mut b, sb)]);
    assert_eq!(
        b.json(&logical).unwrap(),
        json!({"speed": 1, "mode": "auto"})
    );

    // Next period: both write before either hears from the other; both copy the previous one.
    set_now(T0 + 90_000);
    a.change(&logical, &[put("speed", Value::Int(2))]).unwrap();
    b.change(&logical, &[put("mode", Value::Str("manual".into()))])
        .unwrap();
    sync(&mut hub, &mut [(&mut a, sa), (&mut b, sb)]);
    let (ja, jb) = (a.json(&logical).unwrap(), b.json(&logical).unwrap());
    assert_eq!(ja, jb, "converged");
    let heads_a = a.doc(&logical).unwrap().heads();
    assert_eq!(heads_a, b.doc(&logical).unwrap().heads());
    // The copies both writers made have the same shape, so the values written in the new
    // bucket come after either copy in Automerge's order and win: nobody's write is lost.
    assert_eq!(ja, json!({"speed": 2, "mode": "manual"}));
}

#[test]
fn the_hub_drops_buckets_past_retention_and_refuses_writes_into_them() {
    use syncline_core::replica::Event;
    use syncline_core::rolling::Retention;
    use syncline_core::wire::ErrorCode;

    set_now(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub();
    let keep_secs = 3 * PERIOD_SECS;
    hub.set_retention(vec![Retention::new(DocPrefix::all(), keep_secs).unwrap()]);
    let secs = |ms: i64| (ms / 1000) as u64;
    let mut writer = Replica::open(
        &dir.path().join("w.sqlite"),
        Identity::generate(),
        options(2),
    )
    .unwrap();
    // A device that went offline at T0 with one reading, for longer than the retention.
    let mut offline = Replica::open(
        &dir.path().join("o.sqlite"),
        Identity::generate(),
        options(2),
    )
    .unwrap();
    let logical = DocId::new("sensors/temp").unwrap();
    // Not a rolling document: under the retention's prefix (all) but never dropped.
    let plain = DocId::new("config/unit").unwrap();
    offline
        .change(&logical, &[put("temp", Value::Int(-1))])
        .unwrap();
    writer
        .change(&plain, &[put("unit", Value::Str("C".into()))])
        .unwrap();
    let sw = connect(&mut hub, &mut writer);

    // 20 periods of one reading a second; the hub sweeps at each sync, 50 changes at most
    // a sweep (a bucket holds 60), so a bucket takes more than one sweep to go.
    let periods = 20;
    let mut most = 0;
    for i in 0..periods * PERIOD_SECS as i64 {
        set_now(T0 + i * 1000);
        writer
            .change(&logical, &[put("temp", Value::Int(i))])
            .unwrap();
        if i % 5 == 4 {
            sync(&mut hub, &mut [(&mut writer, sw)]);
            hub.expire(secs(now()), 50).unwrap();
            let held = hub
                .store()
                .read_log(
                    &Target::Prefix(DocPrefix::all()),
                    Default::default(),
                    100_000,
                )
                .unwrap()
                .entries
                .len();
            most = most.max(held);
        }
    }
    // A bucket lives one period, then the retention, then up to a few sweeps more.
    let bound = (1 + 3 + 1) * PERIOD_SECS as usize + 1;
    assert!(
        most <= bound,
        "the hub held {most} changes at most, over {bound}"
    );
    let docs = hub
        .store()
        .docs_page(&Target::Prefix(DocPrefix::all()), None, 100)
        .unwrap();
    assert!(
        docs.contains(&plain),
        "a document that is not a bucket stays: {docs:?}"
    );
    assert!(docs.len() <= 1 + 5, "{docs:?}");
    assert!(hub.metrics().expired_docs >= 14, "{:?}", hub.metrics());
    assert!(hub.metrics().expired_changes >= 14 * PERIOD_SECS);

    // The device back online: its write into a bucket long expired is refused, typed, and
    // no longer keeps that bucket on the device once it holds a newer one.
    let so = connect(&mut hub, &mut offline);
    sync(&mut hub, &mut [(&mut offline, so), (&mut writer, sw)]);
    let status = offline.status().unwrap();
    assert_eq!((status.outbox, status.rejected), (1, 1));
    offline
        .change(&logical, &[put("temp", Value::Int(99))])
        .unwrap();
    sync(&mut hub, &mut [(&mut offline, so), (&mut writer, sw)]);
    set_now(now() + PERIOD_SECS as i64 * 1000 / 4); // Rolls are throttled to a quarter period.
    offline.roll().unwrap();
    assert_eq!(
        offline.status().unwrap().outbox,
        0,
        "the new write acknowledged, the old gone"
    );
    assert_eq!(buckets_held(&offline, "sensors/temp").len(), 1);
    let mut expired = 0;
    while let Some(e) = offline.poll_event() {
        if let Event::Rejected { code, message, .. } = e {
            assert_eq!(code, ErrorCode::Expired, "{message}");
            assert!(message.contains("retention"), "{message}");
            expired += 1;
        }
    }
    assert_eq!(expired, 1, "told once");
    let first = DocId::new(format!(
        "sensors/temp@{PERIOD_SECS}s.{}",
        T0 / 1000 / PERIOD_SECS as i64
    ))
    .unwrap();
    let kept = hub
        .store()
        .docs_page(&Target::Doc(first.clone()), None, 1)
        .unwrap();
    assert!(
        kept.is_empty(),
        "the refused write was not stored: {kept:?}"
    );
    assert_eq!(hub.metrics().rejects.get("expired"), Some(&1));

    // A fresh replica still catches up the current view.
    let mut fresh = Replica::open_in_memory(Identity::generate(), options(2)).unwrap();
    fresh.subscribe(Target::Doc(logical.clone())).unwrap();
    let sf = connect(&mut hub, &mut fresh);
    sync(&mut hub, &mut [(&mut fresh, sf)]);
    // The returning device wrote into the current bucket concurrently with the writer: one
    // of the two values shows, the same everywhere.
    sync(
        &mut hub,
        &mut [(&mut offline, so), (&mut writer, sw), (&mut fresh, sf)],
    );
    let view = fresh.json(&logical).unwrap();
    assert!(
        view == json!({"temp": 99}) || view == json!({"temp": 1199}),
        "{view}"
    );
    assert_eq!(offline.json(&logical).unwrap(), view);
    assert_eq!(writer.json(&logical).unwrap(), view);
}
