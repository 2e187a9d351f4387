#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! A hub whose data directory is rolled back under its replicas (a raw copy of `hub.db` put
//! back, a disk snapshot restored): same epoch, an older log, and new changes numbered again
//! from the old end. A replica whose cursor is past the log's end must not skip them.

use std::path::Path;

use syncline_core::DocId;
use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::Replica;
use syncline_core::store::SqliteHubStore;

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
    let s: SessionId = hub.accept();
    r.connect(Some(hub.peer_id()));
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
            break;
        }
    }
    r.disconnect();
    hub.close(s);
}

fn write(r: &mut Replica, key: &str, n: i64) {
    r.change(
        &doc(),
        &[Op::Put {
            path: vec![PathElem::Key(key.into())],
            value: Value::Int(n),
        }],
    )
    .unwrap();
}

#[test]
fn a_replica_whose_cursor_is_past_a_rolled_back_log_repairs_instead_of_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let copy = dir.path().join("hub-copy.db");
    let (mut a, mut b) = (replica(dir.path(), "a", 1), replica(dir.path(), "b", 2));
    let mut h = hub(&file);
    for i in 0..5 {
        write(&mut a, &format!("early{i}"), i);
    }
    sync(&mut h, &mut a);
    drop(h); // closes the file (its WAL is checkpointed): a whole copy
    std::fs::copy(&file, &copy).unwrap();

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
    std::fs::rename(&copy, &file).unwrap();
    let mut h = hub(&file);
    let mut c = replica(dir.path(), "c", 3);
    sync(&mut h, &mut c);
    for i in 0..3 {
        write(&mut c, &format!("after{i}"), i);
    }
    sync(&mut h, &mut c);

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
