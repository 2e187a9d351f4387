//! The PostgreSQL store against a real PostgreSQL server started for each test.

use std::sync::atomic::{AtomicUsize, Ordering};

use syncline_core::identity::Identity;
use syncline_core::store::{HubStore, chain, contract};
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
    // One chain through the commits of all three, in log order: each took the head of the
    // one before it under the append lock.
    let log = reader.read_log(&all(), Cursor(0), 100_000).unwrap().entries;
    let mut head = None;
    for e in &log {
        let c = chain(head.as_ref(), &e.change.signature);
        assert_eq!(e.chain, Some(c), "the chain at {}", e.cursor.0);
        head = Some(c);
    }
}

#[test]
fn a_schema_2_database_is_chained_at_connect_and_refuses_unchained_inserts_after() {
    let pg = Postgres::start();
    let who = Identity::generate();
    let doc = DocId::new("sites/a").unwrap();
    let made = contract::changes(&who, &doc, [1; 8], 7);
    let chains = |s: &mut PgHubStore| -> Vec<_> {
        let log = s.read_log(&all(), Cursor(0), 100).unwrap().entries;
        log.into_iter().map(|e| e.chain).collect::<Vec<_>>()
    };
    let appended = {
        let mut store = PgHubStore::connect(&pg.url).unwrap();
        for part in made.chunks(3) {
            store.append(part).unwrap();
        }
        chains(&mut store)
    };
    assert_eq!(appended.len(), 7);
    // The database as schema version 2 left it: no chain column.
    let mut admin = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    admin
        .batch_execute("ALTER TABLE log DROP COLUMN chain; UPDATE syncline_schema SET version = 2;")
        .unwrap();
    let mut store = PgHubStore::connect(&pg.url).unwrap();
    assert_eq!(
        chains(&mut store),
        appended,
        "chained at connect, in log order"
    );
    // A hub of the older version still running inserts no chain: refused, not stored.
    let err = admin
        .batch_execute(
            "INSERT INTO log (doc, hash, deps, author, signature, bytes, instance, actor_seq)
             SELECT doc, hash, deps, author, signature, bytes, instance, actor_seq + 100
             FROM log ORDER BY seq LIMIT 1",
        )
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::NOT_NULL_VIOLATION),
        "{err:?}"
    );
    assert_eq!(store.last_cursor().unwrap(), Cursor(7));
}

#[test]
fn a_postgres_store_backs_up_online_restores_under_a_new_epoch_and_into_sqlite() {
    use syncline_core::hub::Grant;
    use syncline_core::store::backup;
    let pg = Postgres::start();
    let mut store = PgHubStore::connect(&pg.url).unwrap();
    let who = Identity::generate();
    let doc = DocId::new("pg/backup").unwrap();
    let all_changes = contract::changes(&who, &doc, [4; 8], 300);
    for part in all_changes[..200].chunks(50) {
        store.append(part).unwrap();
    }
    store
        .put_grant(&Grant {
            peer: who.peer_id(),
            prefix: DocPrefix::all(),
            read: true,
            write: true,
            relay: false,
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.bak");
    let info = backup::backup_store(&mut store, &full, None, &mut |_| {}).unwrap();
    assert_eq!(info.changes, 200);
    store.append(&all_changes[200..]).unwrap();
    let inc = dir.path().join("inc.bak");
    let info = backup::backup_store(&mut store, &inc, Some(&full), &mut |_| {}).unwrap();
    assert_eq!(info.changes, 100);
    let report = backup::verify(&[full.clone(), inc.clone()], &mut |_| {}).unwrap();
    assert_eq!(report.changes, 300);

    // Restoring needs every instance stopped: this test's second connection counts as one.
    let before = store.read_log(&all(), Cursor(0), 1000).unwrap().entries;
    let old_epoch = store.epoch();
    let mut other = PgHubStore::connect(&pg.url).unwrap();
    let e = other
        .restore(std::slice::from_ref(&full), true, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("stop every hub instance"), "{e}");
    drop(store);
    let e = other
        .restore(std::slice::from_ref(&full), false, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    // Back to the full backup alone: 200 changes, a new epoch, the grant, appends go on.
    let summary = other
        .restore(std::slice::from_ref(&full), true, &mut |_| {})
        .unwrap();
    assert_eq!(summary.changes, 200);
    assert_ne!(other.epoch(), old_epoch);
    assert_eq!(PgHubStore::connect(&pg.url).unwrap().epoch(), other.epoch());
    let after = other.read_log(&all(), Cursor(0), 1000).unwrap().entries;
    assert_eq!(after.len(), 200);
    assert!(
        after
            .iter()
            .zip(&before)
            .all(|(a, b)| a.cursor == b.cursor && a.change.bytes == b.change.bytes)
    );
    assert_eq!(other.grants().unwrap().len(), 1);
    let next = other.append(&all_changes[200..201]).unwrap();
    assert!(
        matches!(next[0], syncline_core::store::Appended::Stored(c) if c.cursor > after[199].cursor)
    );
    // Both files restore the whole log; a PostgreSQL backup restores into SQLite too.
    assert_eq!(
        other
            .restore(&[full.clone(), inc.clone()], true, &mut |_| {})
            .unwrap()
            .changes,
        300
    );
    let sqlite = dir.path().join("hub.db");
    assert_eq!(
        backup::restore(&[full, inc], &sqlite, &mut |_| {})
            .unwrap()
            .changes,
        300
    );
}

#[test]
fn an_instance_notices_a_restore_made_under_it() {
    let pg = Postgres::start();
    let mut store = PgHubStore::connect(&pg.url).unwrap();
    assert_eq!(store.last_cursor().unwrap(), Cursor(0));
    // A restore with PostgreSQL's own tools, then a new epoch, as OPERATIONS says.
    let mut admin = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    admin
        .execute(
            "UPDATE meta SET value = decode(md5(random()::text), 'hex') WHERE key = 'epoch'",
            &[],
        )
        .unwrap();
    let e = store.last_cursor().unwrap_err();
    assert!(matches!(e, syncline_core::Error::StoreReplaced), "{e}");
    let e = store.read_log(&all(), Cursor(0), 10).unwrap_err();
    assert!(e.to_string().contains("restart the hub"), "{e}");
}

#[test]
fn appends_and_grant_changes_through_one_instance_notify_the_others_at_commit() {
    use syncline_hub::pg::StoreNews;
    let pg = Postgres::start();
    let mut writer = PgHubStore::connect(&pg.url).unwrap();
    let who = Identity::generate();
    let doc = DocId::new("notified/1").unwrap();
    writer
        .append(&contract::changes(&who, &doc, [7; 8], 1))
        .unwrap();
    // The listener on a runtime of its own (the store's client blocks: it runs outside one).
    let (notified, notifications) = std::sync::mpsc::channel::<StoreNews>();
    let url = pg.url.clone();
    let listener = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(syncline_hub::pg::follow_store(&url, |news| {
                let _ = notified.send(news);
            }))
    });
    let wait = std::time::Duration::from_secs(10);
    // Once it listens, it says so (what committed before it listened is read then).
    assert_eq!(notifications.recv_timeout(wait), Ok(StoreNews::Listening));
    let store = PgHubStore::connect(&pg.url).unwrap();
    assert!(store.notifies(), "PostgreSQL takes NOTIFY");
    drop(store);
    // A grant, then a revocation: each is notified as a grants change, nothing else.
    let peer = Identity::generate().peer_id();
    writer
        .put_grant(&syncline_core::hub::Grant {
            peer,
            prefix: DocPrefix::all(),
            read: true,
            write: true,
            relay: false,
        })
        .unwrap();
    assert_eq!(notifications.recv_timeout(wait), Ok(StoreNews::Grants));
    assert_eq!(writer.revoke(&peer, None).unwrap(), 1);
    assert_eq!(notifications.recv_timeout(wait), Ok(StoreNews::Grants));
    // An append is a commit again.
    writer
        .append(&contract::changes(&who, &doc, [8; 8], 1))
        .unwrap();
    assert_eq!(notifications.recv_timeout(wait), Ok(StoreNews::Commit));
    // A lost connection ends it with an error, for the hub to retry (and poll meanwhile).
    drop(writer);
    drop(pg);
    let Err(e) = listener.join().unwrap();
    assert!(e.to_string().contains("listening for the commits"), "{e}");
}

/// Whether the hub's connection (`application_name = 'syncline-hub'`) is encrypted, as the
/// server sees it, asked over a plain connection of the test's own.
fn hub_sessions_over_tls(url: &str) -> Vec<bool> {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
    admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'syncline-hub'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn the_store_connects_over_verified_tls_when_the_url_asks_and_refuses_what_it_cannot_verify() {
    let (pg, ca) = Postgres::start_tls();
    let tls = format!("{}?sslmode=require&sslrootcert={}", pg.url, ca.display());
    let mut store = PgHubStore::connect(&tls).unwrap();
    let alice = Identity::from_seed([1; 32]);
    let doc = DocId::new("sites/tls").unwrap();
    store
        .append(&contract::changes(&alice, &doc, [1; 8], 3))
        .unwrap();
    assert_eq!(store.last_cursor().unwrap(), Cursor(3));
    assert_eq!(hub_sessions_over_tls(&pg.url), vec![true], "encrypted");
    drop(store);

    // libpq's verify-full means the same here (the chain and the host name are always
    // checked); without the CA, the test CA is in no system store: refused, saying what to do.
    let full = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url,
        ca.display()
    );
    assert!(PgHubStore::connect(&full).is_ok());
    let err = PgHubStore::connect(&format!("{}?sslmode=require", pg.url))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sslrootcert"), "{err}");
    // A CA file that holds no certificate is refused by name.
    let empty = ca.with_file_name("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = PgHubStore::connect(&format!("{}?sslrootcert={}", pg.url, empty.display()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.pem"), "{err}");
    // sslmode=disable stays in the clear, on purpose.
    let plain = PgHubStore::connect(&format!("{}?sslmode=disable", pg.url)).unwrap();
    assert_eq!(hub_sessions_over_tls(&pg.url), vec![false]);
    drop(plain);
}

#[test]
fn a_server_that_asks_for_a_client_certificate_takes_the_hubs_and_refuses_a_hub_without() {
    let (pg, ca, (cert, key)) = Postgres::start_mutual_tls();
    let base = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url,
        ca.display()
    );
    // No certificate: the server refuses the session.
    let err = PgHubStore::connect(&base).unwrap_err().to_string();
    assert!(err.contains("connecting to PostgreSQL"), "{err}");
    // With the hub's certificate and key: connected, encrypted, known by its certificate.
    let url = format!("{base}&sslcert={}&sslkey={}", cert.display(), key.display());
    let mut store = PgHubStore::connect(&url).unwrap();
    let alice = Identity::from_seed([1; 32]);
    let doc = DocId::new("sites/mtls").unwrap();
    store
        .append(&contract::changes(&alice, &doc, [1; 8], 2))
        .unwrap();
    assert_eq!(store.last_cursor().unwrap(), Cursor(2));
    let mut admin = postgres::Client::connect(&pg.socket_params(), postgres::NoTls).unwrap();
    let sessions: Vec<(bool, Option<String>)> = admin
        .query(
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'syncline-hub'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(sessions, vec![(true, Some("/CN=syncline".to_owned()))]);
    drop(store);
    // Half a pair, or a key file that holds no key, is refused saying which.
    let err = PgHubStore::connect(&format!("{base}&sslcert={}", cert.display()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sslcert and sslkey go together"), "{err}");
    let err = PgHubStore::connect(&format!(
        "{base}&sslcert={}&sslkey={}",
        cert.display(),
        cert.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("sslkey") && err.contains("client.crt"),
        "{err}"
    );
}

#[test]
fn sslmode_require_refuses_a_server_without_tls() {
    let pg = Postgres::start();
    let err = PgHubStore::connect(&format!("{}?sslmode=require", pg.url))
        .unwrap_err()
        .to_string();
    assert!(err.contains("connecting to PostgreSQL"), "{err}");
    // The default (prefer) still connects to it, in the clear.
    assert!(PgHubStore::connect(&pg.url).is_ok());
}

/// The hub's log in a PostgreSQL database of its own: a crashed hub reconnects; a backup is
/// `syncline-hub backup`'s logical one, and a copy of every table beside it (schema `snap`);
/// a restore is `PgHubStore::restore` (a new epoch), a rollback puts the copied tables back as
/// they were, chains and position sequence included (a disk snapshot of the database, a
/// point-in-time recovery).
struct PgSim {
    url: String,
    backup: std::path::PathBuf,
    /// Whether a backup was taken.
    backed_up: bool,
}

/// The tables of the hub's store, all put back by a rollback.
const TABLES: [&str; 7] = [
    "meta",
    "counters",
    "docs",
    "log",
    "grants",
    "peers",
    "snapshots",
];

impl PgSim {
    fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl syncline_core::sim::SimStore for PgSim {
    type Store = PgHubStore;

    fn open(&mut self) -> PgHubStore {
        PgHubStore::connect(&self.url).unwrap()
    }

    fn backup(&mut self, store: &mut PgHubStore) {
        let _ = std::fs::remove_file(&self.backup);
        syncline_core::store::backup::backup_store(store, &self.backup, None, &mut |_| {}).unwrap();
        // The simulation takes backups between steps: nothing commits in between.
        let mut copy = String::from("DROP SCHEMA IF EXISTS snap CASCADE; CREATE SCHEMA snap;");
        for t in TABLES {
            copy.push_str(&format!("CREATE TABLE snap.{t} AS SELECT * FROM {t};"));
        }
        copy.push_str("CREATE TABLE snap.seq AS SELECT last_value, is_called FROM log_seq_seq;");
        self.admin().batch_execute(&copy).unwrap();
        self.backed_up = true;
    }

    fn restore(&mut self, new_epoch: bool) -> Option<PgHubStore> {
        if !self.backed_up {
            return None;
        }
        if new_epoch {
            let mut store = self.open();
            // (The restore waits for the crashed instances' connections to leave the server's
            // list of sessions.)
            store
                .restore(std::slice::from_ref(&self.backup), true, &mut |_| {})
                .unwrap();
            return Some(store);
        }
        // Put back as it was, its own epoch and chains included.
        let mut put = format!("BEGIN; TRUNCATE {};", TABLES.join(", "));
        for t in TABLES {
            put.push_str(&format!("INSERT INTO {t} SELECT * FROM snap.{t};"));
        }
        put.push_str("SELECT setval('log_seq_seq', last_value, is_called) FROM snap.seq; COMMIT;");
        self.admin().batch_execute(&put).unwrap();
        Some(self.open())
    }
}

/// The fault simulation's seeds with the hub's log on PostgreSQL, a database each: one hub
/// instance on even seeds, two on odd ones.
#[test]
fn the_simulated_faults_lose_no_acknowledged_write_on_postgres_either() {
    use syncline_core::sim::{Sim, env_number, run_seeds, sim_config, temp_root};
    let pg = Postgres::start();
    let mut admin = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    let base = pg.url.rsplit_once('/').unwrap().0.to_owned();
    let files = tempfile::tempdir().unwrap();
    run_seeds(
        env_number("SYNCLINE_PG_SIM_FIRST", 0),
        env_number("SYNCLINE_PG_SIM_SEEDS", 20),
        "SYNCLINE_PG_SIM_FIRST={seed} SYNCLINE_PG_SIM_SEEDS=1 \
         cargo test -p syncline-hub --test integration simulated",
        |seed| {
            let db = format!("sim{seed}");
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
            let store = PgSim {
                url: format!("{base}/{db}"),
                backup: files.path().join(format!("{db}.bak")),
                backed_up: false,
            };
            // Odd seeds: two hub instances on the database (a crash takes one down).
            let cfg = sim_config(1 + (seed % 2) as usize);
            Sim::with_store(seed, cfg, temp_root(), store)
        },
    );
}
