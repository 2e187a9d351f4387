#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.
//! What several of these tests share.

use std::path::Path;

use syncline_core::DocId;
use syncline_core::identity::Identity;
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::wire::Target;

/// A replica on `dir/NAME.db` with the key of `seed`, subscribed to `doc`.
pub fn replica_of(dir: &Path, name: &str, seed: u8, doc: DocId) -> Replica {
    let mut r = Replica::open(
        &dir.join(format!("{name}.db")),
        Identity::from_seed([seed; 32]),
        ReplicaOptions::default(),
    )
    .unwrap();
    r.subscribe(Target::Doc(doc)).unwrap();
    r
}
