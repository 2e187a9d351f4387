#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! What several of these tests share.

use std::path::Path;

use syncline_core::DocId;
use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::store::SqliteHubStore;
use syncline_core::wire::{Message, Target};

/// A hub machine on a SQLite file, letting every key read and write.
pub type TestHub = Hub<SqliteHubStore, AllowAll>;

/// A hub on `dir/hub.db`.
pub fn hub(dir: &Path) -> TestHub {
    Hub::new(
        Identity::from_seed([9; 32]),
        SqliteHubStore::open(&dir.join("hub.db")).unwrap(),
        AllowAll,
        None,
    )
}

/// A session of `r` with `hub`.
pub fn connect(hub: &mut TestHub, r: &mut Replica) -> SessionId {
    let s = hub.accept();
    r.connect(Some(hub.peer_id()));
    s
}

/// Moves messages both ways until nothing moves; the first error a replica meets is
/// returned (its session has failed).
pub fn sync(
    hub: &mut TestHub,
    reps: &mut [(&mut Replica, SessionId)],
) -> syncline_core::Result<()> {
    sync_through(hub, reps, |_| {})
}

/// `r` syncs with a new, empty hub (another log, as after a hub lost its data: `r` repairs
/// it with what it holds) until nothing moves; returns the hub's folder and the hub.
pub fn sync_with_empty_hub(r: &mut Replica) -> (tempfile::TempDir, TestHub) {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = hub(dir.path());
    let s = connect(&mut hub, r);
    sync(&mut hub, &mut [(r, s)]).unwrap();
    (dir, hub)
}

/// [`sync`], with every message from the hub passed through `relay` first (a hostile hub).
pub fn sync_through(
    hub: &mut TestHub,
    reps: &mut [(&mut Replica, SessionId)],
    relay: impl FnMut(&mut Message),
) -> syncline_core::Result<()> {
    sync_as(hub, reps, relay, true)
}

/// [`sync`] with a hub that defers its syncs ([`Hub::set_deferred_sync`]) and never syncs,
/// as before a power cut: the relays go out, the acknowledgements stay held.
pub fn sync_unsynced(hub: &mut TestHub, reps: &mut [(&mut Replica, SessionId)]) {
    sync_as(hub, reps, |_| {}, false).unwrap();
}

/// Moves messages both ways until nothing moves; after each group commit, syncs the hub if
/// `synced` (nothing to do unless it defers its syncs).
fn sync_as(
    hub: &mut TestHub,
    reps: &mut [(&mut Replica, SessionId)],
    mut relay: impl FnMut(&mut Message),
    synced: bool,
) -> syncline_core::Result<()> {
    loop {
        let mut moved = false;
        for (r, s) in reps.iter_mut() {
            while let Some(m) = r.poll_transmit()? {
                hub.handle_message(*s, m).unwrap();
                moved = true;
            }
        }
        hub.flush().unwrap();
        if synced {
            hub.sync().unwrap();
        }
        for (r, s) in reps.iter_mut() {
            while let Some(mut m) = hub.poll_transmit(*s).unwrap() {
                relay(&mut m);
                r.handle_message(m)?;
                moved = true;
            }
        }
        if !moved {
            return Ok(());
        }
    }
}

/// A replica on `dir/NAME.db` with the key of `seed`, subscribed to `doc`.
pub fn replica_of(dir: &Path, name: &str, seed: u8, doc: DocId) -> Replica {
    let mut r = bare_replica(dir, name, seed);
    r.subscribe(Target::Doc(doc)).unwrap();
    r
}

/// A replica on `DIR/NAME.db` with key seed `seed`, subscribed to nothing.
pub fn bare_replica(dir: &Path, name: &str, seed: u8) -> Replica {
    Replica::open(
        &dir.join(format!("{name}.db")),
        Identity::from_seed([seed; 32]),
        ReplicaOptions::default(),
    )
    .unwrap()
}

/// `r` puts the integer `n` at `key` of `doc` (a local, durable write).
pub fn put_in(r: &mut Replica, doc: &DocId, key: &str, n: i64) {
    r.change(
        doc,
        &[Op::Put {
            path: vec![PathElem::Key(key.into())],
            value: Value::Int(n),
        }],
    )
    .unwrap();
}
