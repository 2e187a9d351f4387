//! The hub's suite (`syncline_core::hub::suite`) on PostgreSQL: the same cases the core runs
//! on SQLite, each on a server of its own with a fresh database for every store it asks for.

use std::cell::RefCell;

use syncline_core::hub::suite::TestStore;
use syncline_e2e::Postgres;
use syncline_hub::pg::PgHubStore;

thread_local! {
    /// The running case's server and the databases made on it so far; stopped when the
    /// case's thread ends.
    static SERVER: RefCell<Option<(Postgres, usize)>> = const { RefCell::new(None) };
}

fn pg_store() -> TestStore {
    SERVER.with(|server| {
        let mut server = server.borrow_mut();
        let (pg, made) = server.get_or_insert_with(|| (Postgres::start(), 0));
        *made += 1;
        let db = format!("suite{made}");
        // An admin connection for the moment (a client kept in the thread-local would be
        // dropped after the async runtime it relies on).
        postgres::Client::connect(&pg.url, postgres::NoTls)
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
        let base = pg.url.rsplit_once('/').unwrap().0;
        Box::new(PgHubStore::connect(&format!("{base}/{db}")).unwrap())
    })
}

syncline_core::hub_suite!(pg_store);
