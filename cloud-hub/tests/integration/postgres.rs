//! The PostgreSQL store against a real PostgreSQL server started for each test.

use std::sync::atomic::{AtomicUsize, Ordering};

use syncline_core::identity::Identity;
use syncline_core::store::{HubStore, contract};
use syncline_core::wire::Target;
use syncline_core::{Cursor, DocId, DocPrefix};
use syncline_e2e::Postgres;
use syncline_hub::pg::PgHubStore;

#[test]
fn the_postgres_store_keeps_the_store_contract() {
    let pg = Postgres::start();
    let mut store = PgHubStore::connect(&pg.url).unwrap();
    contract::check(&mut store);
    // A second instance on the same database: same schema (no migration twice), same epoch.
    let again = PgHubStore::connect(&pg.url).unwrap();
    assert_eq!(again.epoch(), store.epoch());
}

fn all() -> Target {
    Target::Prefix(DocPrefix::all())
}

#[test]
fn positions_become_visible_in_order_while_instances_append_at_once() {
    let pg = Postgres::start();
    let done = AtomicUsize::new(0);
    let snapshots = std::thread::scope(|s| {
        for w in 0..3u8 {
            let url = pg.url.clone();
            let done = &done;
            s.spawn(move || {
                let who = Identity::generate();
                let doc = DocId::new(format!("w/{w}")).unwrap();
                let all = contract::changes(&who, &doc, [w + 1; 8], 400);
                let mut store = PgHubStore::connect(&url).unwrap();
                for part in all.chunks(4) {
                    store.append(part).unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        // A reader: every snapshot up to a position must hold every change before it.
        let mut reader = PgHubStore::connect(&pg.url).unwrap();
        let mut snapshots = Vec::new();
        while done.load(Ordering::SeqCst) < 3 {
            let b = reader.read_log(&all(), Cursor(0), 100_000).unwrap();
            snapshots.push((
                b.next,
                b.entries.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            ));
        }
        snapshots
    });
    let mut reader = PgHubStore::connect(&pg.url).unwrap();
    let end = reader.last_cursor().unwrap();
    let fin: Vec<_> = reader
        .read_log(
            &Target::Prefix(syncline_core::DocPrefix::all()),
            syncline_core::Cursor(0),
            100_000,
        )
        .unwrap()
        .entries
        .iter()
        .map(|e| e.cursor)
        .collect();
    assert_eq!(fin.len(), 1200, "every change stored ({end:?})");
    let mut grew = 0;
    for (next, seen) in &snapshots {
        let expected: Vec<_> = fin.iter().filter(|c| *c <= next).copied().collect();
        assert_eq!(
            seen, &expected,
            "a snapshot up to {next:?} missed a change before it"
        );
        grew += usize::from(seen.len() < fin.len());
    }
    assert!(
        grew > 0,
        "some snapshots were taken while the writers wrote"
    );
}
