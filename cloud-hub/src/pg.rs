//! The hub store on PostgreSQL (`--store postgres://...`): the same log, grants and peer
//! positions as the embedded SQLite store, in a database that several `syncline-hub`
//! instances share. Plain SQL and the PostgreSQL wire protocol only (no extensions), with
//! prepared statements, one schema version table, and group commits as on SQLite: a change is
//! acknowledged after the transaction that stores it commits.
//!
//! Positions (the cursors replicas keep) are one sequence for all instances, assigned in
//! commit order: every append transaction first takes one transaction-level advisory lock, so
//! appends from all instances commit one after the other and a reader that sees position `n`
//! sees every position before it. Without that, two instances committing at once could make
//! position 11 visible before 10, and a replica that read up to 11 would never get 10. The
//! lock is held for one group commit (a few milliseconds for hundreds of changes), not per
//! change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use postgres::{Client, Statement};
use syncline_core::change::{SignedChange, VerifiedChange};
use syncline_core::hub::Grant;
use syncline_core::store::backup;
use syncline_core::store::{
    Appended, DocHeads, Dropped, HubSnapshot, HubStore, LogBatch, LogEntry, PeerState,
    SnapshotMeta, actor_key, chain_from, chain_on, complete_heads, snapshot_epoch, stored_snapshot,
    unchained, uncovered_positions,
};
use syncline_core::wire::{Mark, Position, Target};
use syncline_core::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, Error, PeerId, Result};

/// The advisory lock every append takes (an arbitrary constant: "SYNCLINE" in ASCII).
const APPEND_LOCK: i64 = 0x5359_4E43_4C49_4E45;
/// The advisory lock held while the schema is migrated (two instances starting at once).
const MIGRATE_LOCK: i64 = APPEND_LOCK + 1;
/// The channel every append notifies in its transaction (PostgreSQL delivers it at commit):
/// the other instances read the log as soon as it grew instead of at their next poll.
const COMMITS_CHANNEL: &str = "syncline_commits";
/// The channel every change of the grants notifies in its transaction: every instance
/// reloads them at once instead of at its next poll.
const GRANTS_CHANNEL: &str = "syncline_grants";

/// The schema, one entry per version; `syncline_schema` holds how many are applied.
const MIGRATIONS: &[&str] = &[
    // Version 1: what the SQLite store holds at its version 4.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
     CREATE TABLE counters (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
     INSERT INTO counters (key, value) VALUES ('grants_version', 0);
     CREATE TABLE docs (doc TEXT PRIMARY KEY);
     CREATE TABLE log (
         seq BIGSERIAL PRIMARY KEY,
         doc TEXT NOT NULL,
         hash BYTEA NOT NULL,
         deps BYTEA NOT NULL,
         author BYTEA NOT NULL,
         signature BYTEA NOT NULL,
         bytes BYTEA NOT NULL,
         instance BYTEA NOT NULL,
         actor_seq BIGINT NOT NULL,
         UNIQUE (doc, author, instance, actor_seq)
     );
     CREATE INDEX log_doc_seq ON log (doc, seq);
     CREATE TABLE grants (
         peer BYTEA NOT NULL,
         prefix TEXT NOT NULL,
         can_read BOOLEAN NOT NULL,
         can_write BOOLEAN NOT NULL,
         can_relay BOOLEAN NOT NULL,
         PRIMARY KEY (peer, prefix)
     );
     CREATE TABLE peers (
         peer BYTEA PRIMARY KEY,
         recv_epoch BYTEA NOT NULL,
         recv_cursor BIGINT NOT NULL,
         push_epoch BYTEA NOT NULL,
         pushed BIGINT NOT NULL
     );",
    // Version 2: compacted documents (the SQLite store's version 5).
    "CREATE TABLE snapshots (
         doc TEXT PRIMARY KEY,
         epoch BYTEA NOT NULL,
         upto BIGINT NOT NULL,
         changes BIGINT NOT NULL,
         data BYTEA NOT NULL,
         heads BYTEA NOT NULL
     );",
    // Version 3: each change's place in the hash chain over the log
    // (`syncline_core::store::chain`); older rows are chained by `chain_log` in the same
    // transaction.
    "ALTER TABLE log ADD COLUMN chain BYTEA;",
    // Version 4: the highest position retention dropped a change at (`dropped_upto`); for an
    // older database, every position given so far may be a drop (a restore leaves the
    // sequence uncalled at the next position).
    "INSERT INTO counters (key, value)
     SELECT 'dropped_upto', CASE WHEN is_called THEN last_value ELSE last_value - 1 END
     FROM log_seq_seq ON CONFLICT DO NOTHING;",
];

/// The TLS words of libpq's URLs that the driver does not take, taken out of the URL:
/// `sslrootcert=FILE` (the CA the server's certificate must chain to, PEM), `sslcert=FILE` and
/// `sslkey=FILE` (the hub's client certificate chain and its private key, PEM, for servers
/// that ask for one), and `sslmode=verify-full` or `verify-ca`, given to the driver as
/// `require` (every TLS connection here verifies the chain and the host name).
/// `sslmode=disable` turns TLS off; `prefer` (the default) uses it when the server offers it;
/// `require` refuses a server without it.
#[derive(Debug, Default, PartialEq)]
struct TlsFiles {
    root_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

fn tls_settings(url: &str) -> (String, TlsFiles) {
    let mut files = TlsFiles::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), files);
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslrootcert", v)) => files.root_cert = Some(PathBuf::from(v)),
            Some(("sslcert", v)) => files.client_cert = Some(PathBuf::from(v)),
            Some(("sslkey", v)) => files.client_key = Some(PathBuf::from(v)),
            Some(("sslmode", "verify-full" | "verify-ca")) => kept.push("sslmode=require"),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, files)
}

/// TLS to PostgreSQL with rustls: the server's certificate must chain to `sslrootcert` (PEM)
/// or, without it, to a CA of the system's store, and name the host connected to; with
/// `sslcert` and `sslkey`, the hub shows that certificate when the server asks for one.
fn tls_connector(files: &TlsFiles) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &'static str, path: &Path, reason: String| Error::Database {
        context: what,
        reason: format!("{}: {reason}", path.display()),
    };
    let certs = |what: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(what, path, e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(what, path, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(what, path, "no PEM certificate in it".into()));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    match &files.root_cert {
        Some(path) => {
            for cert in certs("reading sslrootcert", path)? {
                roots
                    .add(cert)
                    .map_err(|e| bad("reading sslrootcert", path, e.to_string()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert); // one unusable system certificate is not fatal
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Database {
        context: "setting up TLS",
        reason: e.to_string(),
    })?
    .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certs("reading sslcert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                bad(
                    "reading sslkey",
                    key,
                    format!("{e} (a PEM private key: PKCS#8, PKCS#1 or SEC1)"),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Database {
                    context: "using sslcert and sslkey",
                    reason: format!("{e}: the key must be the certificate's"),
                })?
        }
        _ => {
            return Err(Error::Database {
                context: "reading the store URL",
                reason: "sslcert and sslkey go together: give both files, or neither".into(),
            });
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn db_error(context: &'static str) -> impl FnOnce(postgres::Error) -> Error {
    move |e| Error::Database {
        context,
        reason: e.to_string(),
    }
}

fn corrupt(what: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

/// The statements every call uses, prepared once per connection.
struct Statements {
    head: Statement,
    insert: Statement,
    existing: Statement,
    docs: Statement,
    log_end: Statement,
    log_doc: Statement,
    log_prefix: Statement,
    graph: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> std::result::Result<Self, postgres::Error> {
        Ok(Statements {
            // One round trip for a whole group commit; the arrays are in the batch's order,
            // and positions are drawn in that order.
            head: c.prepare("SELECT seq, chain FROM log ORDER BY seq DESC LIMIT 1")?,
            insert: c.prepare(
                "INSERT INTO log (doc, hash, deps, author, signature, bytes, instance, actor_seq,
                     chain)
                 SELECT doc, hash, deps, author, signature, bytes, instance, actor_seq, chain
                 FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[],
                             $6::bytea[], $7::bytea[], $8::bigint[], $9::bytea[])
                      WITH ORDINALITY
                      AS t (doc, hash, deps, author, signature, bytes, instance, actor_seq,
                            chain, n)
                 ORDER BY n
                 ON CONFLICT DO NOTHING
                 RETURNING seq, doc, hash",
            )?,
            existing: c.prepare(
                "SELECT hash, seq, chain FROM log
                 WHERE doc = $1 AND author = $2 AND instance = $3 AND actor_seq = $4",
            )?,
            docs: c.prepare(
                "INSERT INTO docs (doc) SELECT DISTINCT unnest($1::text[]) ON CONFLICT DO NOTHING",
            )?,
            // The end of the log and the log's epoch in one round trip: an instance notices a
            // restore made while it runs at its next read.
            log_end: c.prepare(
                "SELECT coalesce(max(seq), 0)::BIGINT,
                        (SELECT value FROM meta WHERE key = 'epoch') FROM log",
            )?,
            log_doc: c.prepare(
                "SELECT seq, doc, bytes, signature, chain FROM log
                 WHERE seq > $1 AND seq <= $2 AND doc = $3 ORDER BY seq LIMIT $4",
            )?,
            log_prefix: c.prepare(
                "SELECT seq, doc, bytes, signature, chain FROM log
                 WHERE seq > $1 AND seq <= $2 AND substr(doc, 1, length($3)) = $3
                 ORDER BY seq LIMIT $4",
            )?,
            graph: c.prepare("SELECT seq, hash, deps FROM log WHERE doc = $1 ORDER BY seq")?,
        })
    }
}

/// A hub store in a PostgreSQL database, shared by any number of hub instances.
pub struct PgHubStore {
    url: String,
    client: Client,
    statements: Statements,
    epoch: Epoch,
    /// Whether the server takes `NOTIFY` (PostgreSQL does; some engines that speak its
    /// protocol do not): without it, commits and grant changes reach the other instances at
    /// their polls.
    notifies: bool,
}

impl std::fmt::Debug for PgHubStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgHubStore({:?})", self.epoch)
    }
}

impl PgHubStore {
    /// Whether the database takes `NOTIFY` (found at connect): if not, instances see each
    /// other's commits and grant changes at their polls only.
    pub fn notifies(&self) -> bool {
        self.notifies
    }

    /// Connects to the database at `url` (`postgres://user@host:port/db`), creates or migrates
    /// the schema, and reads the log's epoch (making one if this is the first instance).
    pub fn connect(url: &str) -> Result<Self> {
        let mut client = Self::open(url)?;
        migrate(&mut client)?;
        let fresh = Epoch::random();
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT DO NOTHING",
                &[&&fresh.0[..]],
            )
            .map_err(db_error("writing the epoch"))?;
        let row = client
            .query_one("SELECT value FROM meta WHERE key = 'epoch'", &[])
            .map_err(db_error("reading the epoch"))?;
        let bytes: Vec<u8> = col(&row, 0)?;
        let epoch = Epoch(
            bytes
                .try_into()
                .map_err(|_| corrupt("epoch", "not 16 bytes"))?,
        );
        let statements = Statements::prepare(&mut client).map_err(db_error("preparing"))?;
        // Engines that speak PostgreSQL's protocol without NOTIFY refuse it as not supported;
        // any other failure is a failure.
        let notifies = match client.batch_execute("NOTIFY syncline_probe") {
            Ok(()) => true,
            Err(e) if e.code() == Some(&postgres::error::SqlState::FEATURE_NOT_SUPPORTED) => {
                tracing::debug!(error = %e, "this database does not take NOTIFY");
                false
            }
            Err(e) => return Err(db_error("checking that the database takes NOTIFY")(e)),
        };
        Ok(PgHubStore {
            url: url.to_owned(),
            client,
            statements,
            epoch,
            notifies,
        })
    }

    fn open(url: &str) -> Result<Client> {
        let (config, tls) = connect_config(url)?;
        postgres::Config::from(config)
            .connect(tls)
            .map_err(connect_error)
    }

    /// Reconnects if the connection was lost (the server restarted, or a failover): the
    /// call that found it lost has failed; the next one runs on a new connection.
    fn live(&mut self) -> Result<()> {
        if self.client.is_closed() {
            tracing::warn!("the PostgreSQL connection was lost: reconnecting");
            let mut client = Self::open(&self.url)?;
            self.statements = Statements::prepare(&mut client).map_err(db_error("preparing"))?;
            self.client = client;
        }
        Ok(())
    }
}

/// The connection settings of a store URL, and its TLS connector.
fn connect_config(
    url: &str,
) -> Result<(
    tokio_postgres::Config,
    tokio_postgres_rustls::MakeRustlsConnect,
)> {
    let (url, tls_files) = tls_settings(url);
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| Error::Database {
        context: "reading the store URL",
        reason: format!("{e}: write it as postgres://USER@HOST:PORT/DATABASE"),
    })?;
    config.connect_timeout(Duration::from_secs(10));
    // An instance that dies holding the append lock must not stall the others for the
    // OS's TCP keepalive (two hours): the server ends a session idle in a transaction, a
    // wait for the lock gives up (the commit fails, its pushes are refused and resent),
    // and a dead peer is noticed within a minute.
    config.options("-c idle_in_transaction_session_timeout=10s -c lock_timeout=20s");
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    config.application_name("syncline-hub");
    Ok((config, tls_connector(&tls_files)?))
}

/// A failed connection attempt, with its causes and what to do about the usual ones.
fn connect_error(e: tokio_postgres::Error) -> Error {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    let hint = if reason.contains("certificate") {
        "; if the server's certificate is not signed by a CA of this machine's \
         store, give its CA as sslrootcert=/path/ca.pem in the store URL"
    } else if reason.contains("TLS") || reason.contains("ssl") {
        "; sslmode=require needs a server with ssl = on"
    } else {
        ""
    };
    Error::Database {
        context: "connecting to PostgreSQL",
        reason: format!("{reason}{hint}"),
    }
}

/// What another instance (or the CLI) changed in a shared store, as [`follow_store`] hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreNews {
    /// The listening connection is up: what committed before it listened was not notified,
    /// so read the log and the grants now.
    Listening,
    /// An append committed: the log grew.
    Commit,
    /// A grant or revocation committed: the grants version moved.
    Grants,
}

/// Listens on a connection of its own for what every instance sharing the store at `url`
/// commits (appends notify [`COMMITS_CHANNEL`], grant changes [`GRANTS_CHANNEL`]; PostgreSQL
/// delivers both at commit), and calls `heard` for each, and with [`StoreNews::Listening`]
/// once it listens. Runs until that connection fails, and returns why: the caller retries,
/// and polls meanwhile.
pub async fn follow_store(
    url: &str,
    heard: impl Fn(StoreNews),
) -> Result<std::convert::Infallible> {
    let (config, tls) = connect_config(url)?;
    let (client, mut connection) = config.connect(tls).await.map_err(connect_error)?;
    let notifications = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    heard(if n.channel() == GRANTS_CHANNEL {
                        StoreNews::Grants
                    } else {
                        StoreNews::Commit
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    };
    let listen = async {
        client
            .batch_execute(&format!(
                "LISTEN {COMMITS_CHANNEL}; LISTEN {GRANTS_CHANNEL}"
            ))
            .await?;
        tracing::debug!("following the commits and grant changes of other instances");
        heard(StoreNews::Listening);
        std::future::pending::<std::result::Result<(), tokio_postgres::Error>>().await
    };
    let ended = tokio::select! {
        r = notifications => r,
        r = listen => r,
    };
    Err(Error::Database {
        context: "listening for the commits of other instances",
        reason: match ended {
            Ok(()) => "the server closed the connection".into(),
            Err(e) => e.to_string(),
        },
    })
}

impl PgHubStore {
    /// The last position of the log, checking that the log is still the one this store
    /// opened (a restore gives it a new epoch: [`Error::StoreReplaced`]).
    fn log_end(&mut self) -> Result<i64> {
        let row = self
            .client
            .query_one(&self.statements.log_end, &[])
            .map_err(db_error("reading the log"))?;
        let epoch: Option<Vec<u8>> = col(&row, 1)?;
        if epoch.as_deref() != Some(&self.epoch.0[..]) {
            return Err(Error::StoreReplaced);
        }
        col(&row, 0)
    }

    fn graph(&mut self, doc: &DocId) -> Result<Vec<(i64, ChangeHash, Vec<ChangeHash>)>> {
        self.live()?;
        let rows = self
            .client
            .query(&self.statements.graph, &[&doc.as_str()])
            .map_err(db_error("reading a change graph"))?;
        rows.iter()
            .map(|r| {
                let hash = hash_of(col(r, 1)?)?;
                let deps: Vec<u8> = col(r, 2)?;
                if !deps.len().is_multiple_of(32) {
                    return Err(corrupt("hash list", format!("{} bytes", deps.len())));
                }
                let deps = deps
                    .chunks_exact(32)
                    .map(|c| hash_of(c.to_vec()))
                    .collect::<Result<_>>()?;
                Ok((col::<i64>(r, 0)?, hash, deps))
            })
            .collect()
    }
}

impl PgHubStore {
    /// Replaces everything this database holds with a full backup and any incremental ones
    /// after it (files written by `syncline-hub backup`, from this store or the SQLite one),
    /// in one transaction, and gives the log a new epoch: replicas reconcile and upload what
    /// the backup lacks. Refused while a hub instance is connected to the database (each
    /// keeps the epoch it started with), and over a log that holds changes unless `force`.
    pub fn restore(
        &mut self,
        files: &[std::path::PathBuf],
        force: bool,
        progress: &mut dyn FnMut(backup::Progress),
    ) -> Result<backup::RestoreSummary> {
        let infos = backup::check_chain(files)?;
        let total: u64 = infos.iter().map(|i| i.changes).sum();
        self.live()?;
        // An instance stopped just before leaves the server's list of sessions a moment after
        // its connection closes (a test lost that race): a running one stays past this.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let others = loop {
            let others: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                     AND application_name = 'syncline-hub' AND pid <> pg_backend_pid()",
                    &[],
                )
                .map_err(db_error("looking for running hub instances"))?
                .try_get(0)
                .map_err(bad_column)?;
            if others == 0 || std::time::Instant::now() >= deadline {
                break others;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if others > 0 {
            return Err(Error::Database {
                context: "restoring",
                reason: format!(
                    "{others} other syncline-hub connection(s) use this database: stop every hub \
                     instance before restoring"
                ),
            });
        }
        if !force && self.last_cursor()? > Cursor(0) {
            return Err(Error::Database {
                context: "restoring",
                reason: "the database holds a log already: add --force to replace it (what it \
                         holds beyond the backup comes back only from replicas that still have \
                         it)"
                .into(),
            });
        }
        let epoch = Epoch::random();
        let mut tx = read_committed(&mut self.client).map_err(db_error("starting the restore"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
            .map_err(db_error("ordering the restore"))?;
        tx.batch_execute("TRUNCATE log, docs, grants, peers")
            .map_err(db_error("emptying the store"))?;
        let insert = tx
            .prepare(
                "INSERT INTO log (seq, doc, hash, deps, author, signature, bytes, instance,
                     actor_seq, chain)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[],
                     $5::bytea[], $6::bytea[], $7::bytea[], $8::bytea[], $9::bigint[],
                     $10::bytea[])",
            )
            .map_err(db_error("restoring"))?;
        let mut done = 0u64;
        // The restored log is chained anew, in order (its epoch is new: no mark of the old
        // one is compared with it).
        let mut head: Option<Mark> = None;
        let mut grants = Vec::new();
        progress(backup::Progress { done, total });
        for file in files {
            grants = backup::read_rows(file, 2000, &mut |rows| {
                let n = rows.len() as u64;
                let mut seq = Vec::with_capacity(rows.len());
                let mut doc = Vec::with_capacity(rows.len());
                let mut blobs: [Vec<Vec<u8>>; 6] = Default::default();
                let mut actor_seq = Vec::with_capacity(rows.len());
                let mut chains = Vec::with_capacity(rows.len());
                for r in rows {
                    chains.push(chain_on(&mut head, &r.signature).0.to_vec());
                    seq.push(r.seq);
                    doc.push(r.doc);
                    for (col, v) in blobs.iter_mut().zip([
                        r.hash,
                        r.deps,
                        r.author,
                        r.signature,
                        r.bytes,
                        r.instance,
                    ]) {
                        col.push(v);
                    }
                    actor_seq.push(r.actor_seq);
                }
                let [hash, deps, author, signature, bytes, instance] = &blobs;
                tx.execute(
                    &insert,
                    &[
                        &seq, &doc, hash, deps, author, signature, bytes, instance, &actor_seq,
                        &chains,
                    ],
                )
                .map_err(db_error("restoring changes"))?;
                done += n;
                progress(backup::Progress { done, total });
                Ok(())
            })?;
        }
        tx.batch_execute(
            "INSERT INTO docs (doc) SELECT DISTINCT doc FROM log;
             SELECT setval(pg_get_serial_sequence('log', 'seq'),
                           coalesce((SELECT max(seq) FROM log), 0) + 1, false);",
        )
        .map_err(db_error("restoring"))?;
        for g in &grants {
            tx.execute(
                "INSERT INTO grants (peer, prefix, can_read, can_write, can_relay)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &&g.peer.as_bytes()[..],
                    &g.prefix.as_str(),
                    &g.read,
                    &g.write,
                    &g.relay,
                ],
            )
            .map_err(db_error("restoring grants"))?;
        }
        bump_grants_version(&mut tx, self.notifies)?;
        tx.execute(
            "UPDATE meta SET value = $1 WHERE key = 'epoch'",
            &[&&epoch.0[..]],
        )
        .map_err(db_error("writing the epoch"))?;
        tx.commit().map_err(db_error("committing the restore"))?;
        self.epoch = epoch;
        Ok(backup::RestoreSummary {
            through: infos.last().map_or(Cursor(0), |i| i.through),
            changes: done,
            epoch,
        })
    }
}

/// Column `i` of a row as `T`: a value of another type (a schema altered by hand) is a typed
/// error, never a panic.
fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(bad_column)
}

fn bad_column(e: postgres::Error) -> Error {
    corrupt("PostgreSQL store", format!("unexpected column: {e}"))
}

fn hash_of(bytes: Vec<u8>) -> Result<ChangeHash> {
    let b: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| corrupt("change hash", format!("{} bytes", b.len())))?;
    Ok(ChangeHash(b))
}

fn signature_of(bytes: Vec<u8>, seq: i64) -> Result<[u8; 64]> {
    bytes
        .try_into()
        .map_err(|_| corrupt("signature in the hub log", format!("seq {seq}")))
}

/// A transaction that reads what committed before each statement, whatever the server's
/// default isolation: appends, restores and retention read the log's end (the chain's head,
/// the highest dropped position) after taking a lock, and must see the commits before it.
fn read_committed(
    client: &mut Client,
) -> std::result::Result<postgres::Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()
}

/// Chains the changes stored before schema version 3, in order, a page at a time, with
/// progress in the log.
fn chain_log(tx: &mut postgres::Transaction<'_>) -> std::result::Result<(), postgres::Error> {
    const PAGE: i64 = 10_000;
    let todo: i64 = tx.query_one("SELECT count(*) FROM log", &[])?.try_get(0)?;
    if todo == 0 {
        return Ok(());
    }
    tracing::info!(changes = todo, "chaining stored changes");
    let read = tx.prepare("SELECT seq, signature FROM log WHERE seq > $1 ORDER BY seq LIMIT $2")?;
    let write = tx.prepare(
        "UPDATE log SET chain = t.chain FROM unnest($1::bigint[], $2::bytea[]) AS t (seq, chain)
         WHERE log.seq = t.seq",
    )?;
    let mut head: Option<Mark> = None;
    let (mut after, mut done) = (0i64, 0i64);
    loop {
        let rows = tx.query(&read, &[&after, &PAGE])?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(rows.len());
        let mut chains = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            let sig: Vec<u8> = r.try_get(1)?;
            seqs.push(seq);
            chains.push(chain_on(&mut head, &sig).0.to_vec());
            after = seq;
        }
        tx.execute(&write, &[&seqs, &chains])?;
        done += rows.len() as i64;
        tracing::info!(done, of = todo, "chaining stored changes");
    }
}

fn migrate(client: &mut Client) -> Result<()> {
    let e = db_error("migrating the schema");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(db_error("migrating the schema"))?;
    let result = (|| -> std::result::Result<(), postgres::Error> {
        client.batch_execute(
            "CREATE TABLE IF NOT EXISTS syncline_schema (version INTEGER NOT NULL);
             INSERT INTO syncline_schema (version)
                 SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM syncline_schema);",
        )?;
        let current: i32 = client
            .query_one("SELECT version FROM syncline_schema", &[])?
            .try_get(0)?;
        let target = MIGRATIONS.len() as i32;
        if current > target {
            return Ok(()); // reported below, outside the closure
        }
        let mut tx = client.transaction()?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql)?;
            tracing::info!(version = i + 1, "migrated the PostgreSQL schema");
        }
        if current < 3 {
            chain_log(&mut tx)?;
            // An instance of an older version still running on the database fails to insert
            // (loudly, its pushes refused and sent elsewhere) rather than break the chain.
            tx.batch_execute("ALTER TABLE log ALTER COLUMN chain SET NOT NULL")?;
        }
        tx.execute("UPDATE syncline_schema SET version = $1", &[&target])?;
        tx.commit()
    })();
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]);
    result.map_err(e)?;
    unlock.map_err(db_error("migrating the schema"))?;
    let current: i32 = client
        .query_one("SELECT version FROM syncline_schema", &[])
        .map_err(db_error("reading the schema version"))?
        .try_get(0)
        .map_err(bad_column)?;
    if current != MIGRATIONS.len() as i32 {
        return Err(corrupt(
            "PostgreSQL schema",
            format!(
                "version {current} was written by a newer Syncline (this one knows {}); upgrade",
                MIGRATIONS.len()
            ),
        ));
    }
    Ok(())
}

impl HubStore for PgHubStore {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn append(&mut self, changes: &[VerifiedChange]) -> Result<Vec<Appended>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        self.live()?;
        let n = changes.len();
        let (
            mut docs,
            mut hashes,
            mut deps,
            mut authors,
            mut sigs,
            mut bytes,
            mut instances,
            mut seqs,
        ) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for c in changes {
            let (instance, actor_seq) = actor_key(c);
            docs.push(c.doc().as_str().to_owned());
            hashes.push(c.hash().0.to_vec());
            deps.push(c.deps().iter().flat_map(|h| h.0).collect::<Vec<u8>>());
            authors.push(c.author().as_bytes().to_vec());
            sigs.push(c.signed().signature.to_vec());
            bytes.push(c.signed().bytes.clone());
            instances.push(instance.to_vec());
            seqs.push(actor_seq);
        }
        let st = &self.statements;
        let mut tx = read_committed(&mut self.client).map_err(db_error("starting a commit"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
            .map_err(db_error("ordering the commit"))?;
        if self.notifies {
            tx.batch_execute(&format!("NOTIFY {COMMITS_CHANNEL}"))
                .map_err(db_error("appending to the log"))?;
        }
        tx.execute(&st.docs, &[&docs])
            .map_err(db_error("appending to the log"))?;
        // The chain goes on from the last change stored, under the append lock; every change
        // of the commit is chained in order, also those the insert passes over.
        let mut head = match tx
            .query_opt(&st.head, &[])
            .map_err(db_error("appending to the log"))?
        {
            Some(r) => {
                let seq: i64 = col(&r, 0)?;
                Some(chain_from(col(&r, 1)?, seq)?.ok_or_else(|| unchained(seq))?)
            }
            None => None,
        };
        let marks: Vec<Mark> = changes
            .iter()
            .map(|c| chain_on(&mut head, &c.signed().signature))
            .collect();
        let chains: Vec<&[u8]> = marks.iter().map(|m| &m.0[..]).collect();
        let rows = tx
            .query(
                &st.insert,
                &[
                    &docs, &hashes, &deps, &authors, &sigs, &bytes, &instances, &seqs, &chains,
                ],
            )
            .map_err(db_error("appending to the log"))?;
        // Which inputs were stored: by document and hash (a hash names a change's bytes; the
        // same bytes may be signed into several documents).
        let mut stored: std::collections::HashMap<(String, Vec<u8>), i64> = rows
            .iter()
            .map(|r| Ok(((col(r, 1)?, col(r, 2)?), col(r, 0)?)))
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(n);
        for (i, c) in changes.iter().enumerate() {
            if let Some(seq) = stored.remove(&(docs[i].clone(), hashes[i].clone())) {
                out.push(Appended::Stored(Position {
                    cursor: Cursor(seq as u64),
                    mark: marks[i],
                }));
                continue;
            }
            let row = tx
                .query_one(
                    &st.existing,
                    &[&docs[i], &authors[i], &instances[i], &seqs[i]],
                )
                .map_err(db_error("appending to the log"))?;
            let existing = hash_of(col(&row, 0)?)?;
            out.push(if existing == c.hash() {
                let seq: i64 = col(&row, 1)?;
                Appended::Duplicate(Position {
                    cursor: Cursor(seq as u64),
                    mark: chain_from(col(&row, 2)?, seq)?.ok_or_else(|| unchained(seq))?,
                })
            } else {
                Appended::Conflict { existing }
            });
        }
        tx.commit().map_err(db_error("committing to the log"))?;
        Ok(out)
    }

    fn read_log(&mut self, target: &Target, after: Cursor, limit: usize) -> Result<LogBatch> {
        self.live()?;
        // The end first: positions are visible in order, so every change up to it can be read.
        let end = self.log_end()?;
        let st = &self.statements;
        let (stmt, arg) = match target {
            Target::Doc(d) => (&st.log_doc, d.as_str()),
            Target::Prefix(p) => (&st.log_prefix, p.as_str()),
        };
        let rows = self
            .client
            .query(stmt, &[&(after.0 as i64), &end, &arg, &(limit as i64)])
            .map_err(db_error("reading the log"))?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = col(r, 0)?;
            let doc =
                DocId::new(col::<String>(r, 1)?).map_err(|e| corrupt("hub log", e.to_string()))?;
            entries.push(LogEntry {
                cursor: Cursor(seq as u64),
                doc,
                change: SignedChange {
                    bytes: col(r, 2)?,
                    signature: signature_of(col(r, 3)?, seq)?,
                },
                chain: chain_from(col(r, 4)?, seq)?,
            });
        }
        let full = entries.len() >= limit;
        let next = if full {
            entries.last().map_or(after, |e| e.cursor)
        } else {
            Cursor((end.max(0) as u64).max(after.0))
        };
        Ok(LogBatch {
            entries,
            next,
            at_end: !full,
        })
    }

    fn last_cursor(&mut self) -> Result<Cursor> {
        self.live()?;
        Ok(Cursor(self.log_end()?.max(0) as u64))
    }

    fn high_water(&mut self) -> Result<Cursor> {
        // The positions' sequence only moves forward (a restore sets it to what it restores).
        self.live()?;
        let row = self
            .client
            .query_one(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM log_seq_seq",
                &[],
            )
            .map_err(db_error("reading the log's highest position"))?;
        let given: i64 = col(&row, 0)?;
        Ok(Cursor(given.max(0) as u64))
    }

    fn dropped_upto(&mut self) -> Result<Cursor> {
        self.live()?;
        let row = self
            .client
            .query_opt("SELECT value FROM counters WHERE key = 'dropped_upto'", &[])
            .map_err(db_error("reading the highest dropped position"))?;
        match row {
            Some(r) => Ok(Cursor(col::<i64>(&r, 0)?.max(0) as u64)),
            None => self.high_water(),
        }
    }

    fn docs_page(
        &mut self,
        target: &Target,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<DocId>> {
        self.live()?;
        let after = after.map_or("", |d| d.as_str());
        let rows = match target {
            Target::Doc(d) => self.client.query(
                "SELECT doc FROM docs WHERE doc > $1 AND doc = $2 ORDER BY doc LIMIT $3",
                &[&after, &d.as_str(), &(limit as i64)],
            ),
            Target::Prefix(p) => self.client.query(
                "SELECT doc FROM docs WHERE doc > $1 AND substr(doc, 1, length($2)) = $2
                 ORDER BY doc LIMIT $3",
                &[&after, &p.as_str(), &(limit as i64)],
            ),
        }
        .map_err(db_error("listing documents"))?;
        rows.iter()
            .map(|r| {
                DocId::new(col::<String>(r, 0)?).map_err(|e| corrupt("hub docs", e.to_string()))
            })
            .collect()
    }

    fn heads(&mut self, doc: &DocId) -> Result<DocHeads> {
        let graph = self.graph(doc)?;
        Ok(complete_heads(
            graph.iter().map(|(_, h, d)| (*h, d.as_slice())),
        ))
    }

    fn grants(&mut self) -> Result<Vec<Grant>> {
        self.live()?;
        let rows = self
            .client
            .query(
                "SELECT peer, prefix, can_read, can_write, can_relay FROM grants
                 ORDER BY peer, prefix",
                &[],
            )
            .map_err(db_error("reading grants"))?;
        rows.iter()
            .map(|r| {
                let peer: [u8; 32] = col::<Vec<u8>>(r, 0)?
                    .try_into()
                    .map_err(|_| corrupt("grant", "key length"))?;
                Ok(Grant {
                    peer: PeerId::from_bytes(peer),
                    prefix: DocPrefix::new(col::<String>(r, 1)?)
                        .map_err(|e| corrupt("grant", e.to_string()))?,
                    read: col(r, 2)?,
                    write: col(r, 3)?,
                    relay: col(r, 4)?,
                })
            })
            .collect()
    }

    fn put_grant(&mut self, grant: &Grant) -> Result<()> {
        self.live()?;
        let mut tx = self.client.transaction().map_err(db_error("granting"))?;
        tx.execute(
            "INSERT INTO grants (peer, prefix, can_read, can_write, can_relay)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (peer, prefix) DO UPDATE SET can_read = $3, can_write = $4,
                 can_relay = $5",
            &[
                &&grant.peer.as_bytes()[..],
                &grant.prefix.as_str(),
                &grant.read,
                &grant.write,
                &grant.relay,
            ],
        )
        .map_err(db_error("granting"))?;
        bump_grants_version(&mut tx, self.notifies)?;
        tx.commit().map_err(db_error("granting"))
    }

    fn revoke(&mut self, peer: &PeerId, prefix: Option<&DocPrefix>) -> Result<usize> {
        self.live()?;
        let mut tx = self.client.transaction().map_err(db_error("revoking"))?;
        let key = &peer.as_bytes()[..];
        let n = match prefix {
            Some(p) => tx.execute(
                "DELETE FROM grants WHERE peer = $1 AND prefix = $2",
                &[&key, &p.as_str()],
            ),
            None => tx.execute("DELETE FROM grants WHERE peer = $1", &[&key]),
        }
        .map_err(db_error("revoking"))?;
        bump_grants_version(&mut tx, self.notifies)?;
        tx.commit().map_err(db_error("revoking"))?;
        Ok(n as usize)
    }

    fn grants_version(&mut self) -> Result<u64> {
        self.live()?;
        let v: i64 = self
            .client
            .query_one(
                "SELECT value FROM counters WHERE key = 'grants_version'",
                &[],
            )
            .map_err(db_error("reading the grants version"))?
            .try_get(0)
            .map_err(bad_column)?;
        Ok(v as u64)
    }

    fn peer_state(&mut self, peer: &PeerId) -> Result<PeerState> {
        self.live()?;
        let row = self
            .client
            .query_opt(
                "SELECT recv_epoch, recv_cursor, push_epoch, pushed FROM peers WHERE peer = $1",
                &[&&peer.as_bytes()[..]],
            )
            .map_err(db_error("reading a peer position"))?;
        let Some(r) = row else {
            return Ok(PeerState::default());
        };
        let epoch = |b: Vec<u8>| -> Result<Epoch> {
            Ok(Epoch(
                b.try_into()
                    .map_err(|_| corrupt("peer epoch", "not 16 bytes"))?,
            ))
        };
        Ok(PeerState {
            recv_epoch: epoch(col(&r, 0)?)?,
            recv_cursor: Cursor(col::<i64>(&r, 1)? as u64),
            push_epoch: epoch(col(&r, 2)?)?,
            pushed: Cursor(col::<i64>(&r, 3)? as u64),
        })
    }

    fn set_peer_state(&mut self, peer: &PeerId, state: &PeerState) -> Result<()> {
        self.live()?;
        self.client
            .execute(
                "INSERT INTO peers (peer, recv_epoch, recv_cursor, push_epoch, pushed)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (peer) DO UPDATE SET recv_epoch = $2, recv_cursor = $3,
                     push_epoch = $4, pushed = $5",
                &[
                    &&peer.as_bytes()[..],
                    &&state.recv_epoch.0[..],
                    &(state.recv_cursor.0 as i64),
                    &&state.push_epoch.0[..],
                    &(state.pushed.0 as i64),
                ],
            )
            .map_err(db_error("recording a peer position"))?;
        Ok(())
    }

    fn changes_not_covered(
        &mut self,
        doc: &DocId,
        have: &[ChangeHash],
    ) -> Result<Vec<SignedChange>> {
        let graph = self.graph(doc)?;
        let wanted = uncovered_positions(&graph, have);
        let rows = self
            .client
            .query(
                "SELECT seq, bytes, signature FROM log WHERE seq = ANY($1) ORDER BY seq",
                &[&wanted],
            )
            .map_err(db_error("reading changes"))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = col(r, 0)?;
                Ok(SignedChange {
                    bytes: col(r, 1)?,
                    signature: signature_of(col(r, 2)?, seq)?,
                })
            })
            .collect()
    }

    fn drop_doc(&mut self, doc: &DocId, limit: usize) -> Result<Dropped> {
        const WHAT: &str = "dropping an expired document";
        self.live()?;
        // (Instances sweeping at once then raise the one `dropped_upto` row in turn instead of
        // failing to serialize.)
        let mut tx = read_committed(&mut self.client).map_err(db_error(WHAT))?;
        let row = tx
            .query_one(
                "WITH d AS (DELETE FROM log WHERE seq IN
                     (SELECT seq FROM log WHERE doc = $1 ORDER BY seq LIMIT $2)
                     RETURNING seq)
                 SELECT count(*), coalesce(max(seq), 0)::BIGINT FROM d",
                &[&doc.as_str(), &(limit.min(i64::MAX as usize) as i64)],
            )
            .map_err(db_error(WHAT))?;
        let changes = col::<i64>(&row, 0)?.max(0) as u64;
        let upto: i64 = col(&row, 1)?;
        if changes > 0 {
            tx.execute(
                "INSERT INTO counters (key, value) VALUES ('dropped_upto', $1)
                 ON CONFLICT (key) DO UPDATE SET value = greatest(counters.value, excluded.value)",
                &[&upto],
            )
            .map_err(db_error(WHAT))?;
        }
        let left: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM log WHERE doc = $1)",
                &[&doc.as_str()],
            )
            .map_err(db_error(WHAT))?
            .try_get(0)
            .map_err(bad_column)?;
        if !left {
            tx.execute("DELETE FROM docs WHERE doc = $1", &[&doc.as_str()])
                .map_err(db_error(WHAT))?;
        }
        // A snapshot would still hold the dropped changes.
        tx.execute("DELETE FROM snapshots WHERE doc = $1", &[&doc.as_str()])
            .map_err(db_error(WHAT))?;
        tx.commit().map_err(db_error(WHAT))?;
        Ok(Dropped {
            changes,
            gone: !left,
        })
    }

    fn put_snapshot(&mut self, doc: &DocId, snap: &HubSnapshot) -> Result<()> {
        self.live()?;
        self.client
            .execute(
                "INSERT INTO snapshots (doc, epoch, upto, changes, data, heads)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (doc) DO UPDATE SET epoch = excluded.epoch, upto = excluded.upto,
                   changes = excluded.changes, data = excluded.data, heads = excluded.heads",
                &[
                    &doc.as_str(),
                    &&snap.epoch.0[..],
                    &(snap.upto.0 as i64),
                    &(snap.changes as i64),
                    &snap.snapshot.data,
                    &syncline_core::snapshot::encode_heads(&snap.snapshot.signed),
                ],
            )
            .map_err(db_error("storing a snapshot"))?;
        Ok(())
    }

    fn snapshot(&mut self, doc: &DocId) -> Result<Option<HubSnapshot>> {
        self.live()?;
        let row = self
            .client
            .query_opt(
                "SELECT epoch, upto, changes, data, heads FROM snapshots WHERE doc = $1",
                &[&doc.as_str()],
            )
            .map_err(db_error("reading a snapshot"))?;
        row.map(|r| {
            stored_snapshot(
                doc,
                &col::<Vec<u8>>(&r, 0)?,
                col(&r, 1)?,
                col(&r, 2)?,
                col(&r, 3)?,
                &col::<Vec<u8>>(&r, 4)?,
            )
        })
        .transpose()
    }

    fn snapshot_meta(&mut self, doc: &DocId) -> Result<Option<SnapshotMeta>> {
        self.live()?;
        let row = self
            .client
            .query_opt(
                "SELECT epoch, upto, changes, length(data)::BIGINT FROM snapshots WHERE doc = $1",
                &[&doc.as_str()],
            )
            .map_err(db_error("reading a snapshot"))?;
        row.map(|r| {
            Ok(SnapshotMeta {
                epoch: snapshot_epoch(doc, &col::<Vec<u8>>(&r, 0)?)?,
                upto: Cursor(col::<i64>(&r, 1)?.max(0) as u64),
                changes: col::<i64>(&r, 2)?.max(0) as u64,
                bytes: col::<i64>(&r, 3)?.max(0) as u64,
            })
        })
        .transpose()
    }

    fn count_changes(&mut self, doc: &DocId, after: Cursor, upto: Cursor) -> Result<u64> {
        self.live()?;
        let n: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM log WHERE doc = $1 AND seq > $2 AND seq <= $3",
                &[&doc.as_str(), &(after.0 as i64), &(upto.0 as i64)],
            )
            .map_err(db_error("counting changes"))?
            .try_get(0)
            .map_err(bad_column)?;
        Ok(n.max(0) as u64)
    }
}

fn bump_grants_version(tx: &mut postgres::Transaction<'_>, notify: bool) -> Result<()> {
    tx.execute(
        "UPDATE counters SET value = value + 1 WHERE key = 'grants_version'",
        &[],
    )
    .map_err(db_error("bumping the grants version"))?;
    if notify {
        tx.batch_execute(&format!("NOTIFY {GRANTS_CHANNEL}"))
            .map_err(db_error("notifying the grants change"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_words_the_driver_does_not_take_are_taken_out_of_the_url() {
        let (url, files) = tls_settings(
            "postgres://hub@db:5432/s?sslmode=verify-full&sslrootcert=/ca.pem\
             &sslcert=/c.crt&sslkey=/c.key&application_name=x",
        );
        assert_eq!(
            url,
            "postgres://hub@db:5432/s?sslmode=require&application_name=x"
        );
        assert_eq!(
            files,
            TlsFiles {
                root_cert: Some("/ca.pem".into()),
                client_cert: Some("/c.crt".into()),
                client_key: Some("/c.key".into()),
            }
        );
        let (url, files) = tls_settings("postgres://hub@db/s");
        assert_eq!(url, "postgres://hub@db/s");
        assert_eq!(files, TlsFiles::default());
    }
}
