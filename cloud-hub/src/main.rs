//! `syncline-hub`: the Syncline hub service and its operator CLI. See docs/OPERATIONS.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use syncline_core::audit;
use syncline_core::hub::Grant;
use syncline_core::store::HubStore;
use syncline_core::store::backup;
use syncline_core::{Cursor, DocId, DocPrefix, PeerId};
use syncline_hub::config::{self, FileConfig, Overrides, StoreLocation};
use syncline_hub::data::{self, DataDir};
use syncline_hub::grants::{self, Mode};
use syncline_hub::{Usage, ops, service, usage};
use tracing_subscriber::EnvFilter;

/// The Syncline hub: verifies, stores and relays the signed changes of Syncline replicas
/// over QUIC, with grants per public key and document prefix.
///
/// Start one with `syncline-hub run --data DIR`, give each replica a grant with
/// `syncline-hub grant --data DIR KEY PREFIX rw`, and give the replicas the fingerprint and
/// key that `run` (or `init`) prints. Exit codes: 0 success, 1 failure, 2 bad input.
#[derive(Debug, Parser)]
#[command(name = "syncline-hub", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data directory (identity, self-signed TLS certificate, store) and print the
    /// hub's public key and certificate fingerprint. On an existing directory it makes nothing
    /// new and prints the same values.
    Init {
        /// The data directory (created if missing).
        #[arg(long, env = "SYNCLINE_DATA", value_name = "DIR")]
        data: PathBuf,
        /// Print `{"public_key": "...", "fingerprint": "..."}` on one line.
        #[arg(long)]
        json: bool,
        /// A DNS name or IP address for the certificate; repeat for more
        /// [default: localhost and 127.0.0.1]. Ignored if the certificate exists.
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
    },
    /// Run the hub: initialize the data directory if needed, serve QUIC, and serve
    /// /healthz and /metrics if --metrics is set. Prints
    /// `listening on ADDR fingerprint FP key KEY` (and `metrics on ADDR`) on stdout once
    /// ready. Stops cleanly on SIGTERM or SIGINT.
    ///
    /// Each setting comes from its flag, else its SYNCLINE_* variable, else the config file,
    /// else the default.
    Run(RunArgs),
    /// Allow a replica's public key to read and/or write the documents under a prefix
    /// (replacing its grant on that prefix). A running hub applies it within 250 ms.
    Grant {
        #[command(flatten)]
        hub: StoreArgs,
        /// The replica's public key: 64 hex characters, as `syncline-edge init --json`
        /// prints it.
        #[arg(value_parser = grants::parse_key)]
        key: PeerId,
        /// The documents: "" for all, `sites/` for a folder, or a document id (a plain
        /// string prefix: `sites/berlin` also matches `sites/berlin2`).
        #[arg(value_parser = grants::parse_prefix)]
        prefix: DocPrefix,
        /// read, write, rw, or hub (a peer hub: rw plus relaying other authors' changes).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(["read", "write", "rw", "hub"])
            .try_map(|s| s.parse::<Mode>()))]
        mode: Mode,
    },
    /// Remove a key's grant on PREFIX, or all its grants. A running hub applies it within
    /// 250 ms, to live sessions too.
    Revoke {
        #[command(flatten)]
        hub: StoreArgs,
        /// The replica's public key (64 hex characters).
        #[arg(value_parser = grants::parse_key)]
        key: PeerId,
        /// Only the grant on this exact prefix (default: every grant of the key).
        #[arg(value_parser = grants::parse_prefix)]
        prefix: Option<DocPrefix>,
    },
    /// Take a consistent backup of the hub's store into FILE while the hub serves (or not).
    /// With --since, an incremental backup: the changes after that earlier backup. Grants are
    /// in every backup; the data directory's identity, cert.der and key.der are not (copy them
    /// once, they never change). Progress goes to stderr.
    Backup {
        /// The hub's store; a PostgreSQL one is read in pages while the instances serve, into
        /// a file of the same format.
        #[command(flatten)]
        hub: StoreArgs,
        /// The backup file to write (it must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// An earlier backup (full or incremental) of this hub: write only what came after it.
        #[arg(long, value_name = "BACKUP")]
        since: Option<PathBuf>,
        /// Print what was written as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Restore the hub's store from a full backup and any incremental ones after it, in the
    /// order they were taken. The hub must be stopped. The restored log gets a new epoch:
    /// replicas that hold changes the backup lacks notice and upload them again.
    Restore {
        /// The backup files: the full one first, then the incremental ones in order.
        #[arg(long = "from", value_name = "FILE", num_args = 1.., required = true)]
        from: Vec<PathBuf>,
        /// Where to restore: a data directory (created, with a new identity and certificate,
        /// if missing), or a PostgreSQL store on which every hub instance is stopped.
        #[command(flatten)]
        hub: StoreArgs,
        /// Replace the store the data directory (or the database) holds.
        #[arg(long)]
        force: bool,
        /// Print what was restored as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Check backup files offline: SQLite integrity, the order of the files, and every
    /// change's bytes, hash and author's signature. Exits 1 naming the first change that
    /// fails.
    Verify {
        /// The backup files (one, or a full one then incremental ones in order).
        #[arg(long = "from", value_name = "FILE", num_args = 1.., required = true)]
        from: Vec<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show who changed a document (public key), when (the author's clock) and what (the
    /// operations), from the hub's signed change log; every change is verified as it is read.
    History {
        #[command(flatten)]
        hub: StoreArgs,
        /// The document id.
        #[arg(value_parser = ops::parse_doc)]
        doc: DocId,
        /// Start after this log position (the `cursor` of the last change shown).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Show at most this many changes.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print one JSON object per change, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a document as JSON (`{"doc": ..., "heads": [...]}`), built from the hub's verified
    /// log, now or as it was `--at` given heads or a past time.
    Show {
        #[command(flatten)]
        hub: StoreArgs,
        /// The document id.
        #[arg(value_parser = ops::parse_doc)]
        doc: DocId,
        /// Heads (comma-separated change hashes), milliseconds since 1970, or an RFC 3339 time
        /// (`2026-12-01T18:00:00Z`).
        #[arg(long, value_parser = |s: &str| s.parse::<audit::At>())]
        at: Option<audit::At>,
    },
    /// Write a document's signed change log to FILE (JSON lines, docs/OPERATIONS.md), for
    /// anyone to check with `verify-export` without access to the hub.
    Export {
        #[command(flatten)]
        hub: StoreArgs,
        /// The document id.
        #[arg(value_parser = ops::parse_doc)]
        doc: DocId,
        /// The file to write (it must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Check an export offline: every change's signature, hash and author, that the history
    /// is complete (every dependency is in the file), and the resulting state. Exits 1
    /// naming the line that fails.
    VerifyExport {
        /// The export file.
        file: PathBuf,
        /// Print the report (with the resulting document) as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the grants.
    Grants {
        #[command(flatten)]
        hub: StoreArgs,
        /// Print a JSON array of {"public_key", "prefix", "mode"}.
        #[arg(long)]
        json: bool,
    },
}

/// Where a hub's store is, for the commands that read or change it.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The data directory of the hub.
    #[arg(
        long,
        env = "SYNCLINE_DATA",
        value_name = "DIR",
        required_unless_present = "store"
    )]
    data: Option<PathBuf>,
    /// The hub's PostgreSQL store, if it runs on one (`postgres://...`, as `run --store`).
    #[arg(long, env = "SYNCLINE_STORE", value_name = "URL")]
    store: Option<String>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Box<dyn HubStore + Send>> {
        open_store(self.data.as_deref(), self.store.as_deref())
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// A TOML config file with any of the keys listen, metrics, ws, ws_tls, max_connections,
    /// data, cert, key, log, store, compact_after, grants_poll_ms, and `[[retention]]` tables (relative paths are taken from
    /// the file's folder).
    #[arg(long, env = "SYNCLINE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The data directory (created and initialized if missing or empty).
    #[arg(long, env = "SYNCLINE_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// The QUIC (UDP) address to serve replicas on; port 0 picks a free port
    /// [default: 127.0.0.1:4433].
    #[arg(long, env = "SYNCLINE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// The HTTP address of /healthz and /metrics [default: none, no metrics server].
    #[arg(long, env = "SYNCLINE_METRICS", value_name = "ADDR")]
    metrics: Option<String>,
    /// The TCP address of the WebSocket endpoint for browsers (`ws://ADDR/v1/sync`, the same
    /// protocol as QUIC); port 0 picks a free port [default: none, no WebSocket endpoint].
    #[arg(long, env = "SYNCLINE_WS", value_name = "ADDR")]
    ws: Option<String>,
    /// Serve the WebSocket endpoint as wss:// with the hub's certificate (--cert/--key: one
    /// that browsers trust) instead of ws://.
    #[arg(long, env = "SYNCLINE_WS_TLS")]
    ws_tls: bool,
    /// A TLS certificate (PEM or DER) to serve instead of the self-signed one in the data
    /// directory; replicas pin its fingerprint, printed on start.
    #[arg(long, env = "SYNCLINE_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The certificate's private key (PKCS#8, PEM or DER).
    #[arg(long, env = "SYNCLINE_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// The log filter, tracing's syntax (`info`, `debug`, `syncline_net=debug,info`); else
    /// RUST_LOG, else the config file [default: info]. Logs go to stderr.
    #[arg(long, env = "SYNCLINE_LOG", value_name = "FILTER")]
    log: Option<String>,
    /// Another hub to sync every document with, both ways (repeat for more), as
    /// `HOST:PORT`; pair each with a --peer-fingerprint. The other hub must grant this hub's
    /// key the `hub` mode (`syncline-hub grant --data DIR KEY "" hub`), and this hub the
    /// other's, so that two hubs serve the same data set without shared storage.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// The SHA-256 fingerprint of each --peer's certificate, in the same order.
    #[arg(long = "peer-fingerprint", value_name = "FP")]
    peer_fingerprints: Vec<String>,
    /// Keep the store in PostgreSQL instead of the data directory's SQLite file:
    /// `postgres://USER@HOST:PORT/DATABASE`. Several hub instances may share one database;
    /// each still needs its own data directory (identity, certificate) [default: SQLite].
    #[arg(long, env = "SYNCLINE_STORE", value_name = "URL")]
    store: Option<String>,
    /// QUIC connections served at once; more are refused before their TLS handshake (and
    /// counted in syncline_hub_rejects_total{reason="connection_limit"}); their replicas
    /// retry with backoff [default: 10000].
    #[arg(long, env = "SYNCLINE_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// How often to look for grants changed by `syncline-hub grant`/`revoke` or another
    /// instance, when nothing told this one: a shared PostgreSQL store notifies every change
    /// at once, and this poll is the fallback [default: 250].
    #[arg(long, env = "SYNCLINE_GRANTS_POLL_MS", value_name = "MS")]
    grants_poll_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncline-hub: error: {e:#}");
            if e.is::<Usage>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { data, json, names } => {
            cli_logs()?;
            let info = data::init_info(&DataDir::new(&data), &names)?;
            if json {
                println!("{}", info.to_json());
            } else {
                println!("data directory  {}", data.display());
                println!("public key      {}", info.public_key);
                println!("fingerprint     {}", info.fingerprint);
            }
            Ok(())
        }
        Command::Run(args) => {
            let file = match &args.config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let over = Overrides {
                listen: args.listen,
                metrics: args.metrics,
                ws: args.ws,
                ws_tls: args.ws_tls.then_some(true),
                data: args.data,
                cert: args.cert,
                key: args.key,
                log: args.log.or_else(|| std::env::var("RUST_LOG").ok()),
                store: args.store,
                max_connections: args.max_connections,
                grants_poll_ms: args.grants_poll_ms,
            };
            let mut settings = config::resolve(over, file)?;
            settings.peers = config::peers(&args.peers, &args.peer_fingerprints)?;
            if !settings.peers.is_empty() && settings.store != StoreLocation::Sqlite {
                return Err(usage(
                    "--peer with a PostgreSQL --store is not supported yet: instances on one \
                     database share the data set already; peer a SQLite hub instead",
                ));
            }
            init_logs(&settings.log)?;
            service::run(settings)
        }
        Command::Grant {
            hub,
            key,
            prefix,
            mode,
        } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let (read, write, relay) = mode.rights();
            store
                .put_grant(&Grant {
                    peer: key,
                    prefix: prefix.clone(),
                    read,
                    write,
                    relay,
                })
                .context("writing the grant")?;
            println!("granted {key} {mode} on {:?}", prefix.as_str());
            Ok(())
        }
        Command::Revoke { hub, key, prefix } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let n = store
                .revoke(&key, prefix.as_ref())
                .context("removing the grant")?;
            match (&prefix, n) {
                (_, 0) => println!("{key} had no matching grant; nothing revoked"),
                (Some(p), _) => println!("revoked {key} on {:?}", p.as_str()),
                (None, n) => println!("revoked {n} grant(s) of {key}"),
            }
            Ok(())
        }
        Command::Backup {
            hub,
            to,
            since,
            json,
        } => {
            cli_logs()?;
            let info = match (StoreLocation::parse(hub.store.as_deref())?, hub.data) {
                (StoreLocation::Sqlite, Some(data)) => {
                    let dir = DataDir::existing(&data)?;
                    backup::backup(
                        &dir.store_path(),
                        &to,
                        since.as_deref(),
                        &mut progress("backup"),
                    )?
                }
                (location, data) => {
                    let mut store =
                        service::open_store(&DataDir::new(data.unwrap_or_default()), &location)?;
                    backup::backup_store(
                        &mut store,
                        &to,
                        since.as_deref(),
                        &mut progress("backup"),
                    )?
                }
            };
            print_report(json, &ops::backup_json(&to, &info), || {
                ops::backup_text(&to, &info)
            });
            Ok(())
        }
        Command::Restore {
            from,
            hub,
            force,
            json,
        } => {
            cli_logs()?;
            if let StoreLocation::Postgres(url) = StoreLocation::parse(hub.store.as_deref())? {
                backup::check_chain(&from)?;
                let mut pg = syncline_hub::pg::PgHubStore::connect(&url)?;
                let summary = pg
                    .restore(&from, force, &mut progress("restore"))
                    .map_err(|e| usage(e.to_string()))?;
                let shown = std::path::PathBuf::from(service::redact(&url));
                print_report(json, &ops::restore_json(&shown, &summary), || {
                    ops::restore_text(&shown, &summary)
                });
                return Ok(());
            }
            let data = hub.data.context("give --data DIR (or --store URL)")?;
            let dir = DataDir::new(&data);
            if dir.store_path().exists() && !force {
                return Err(usage(format!(
                    "{} already holds a hub store: add --force to replace it (what it holds \
                     beyond the backup comes back only from replicas that still have it)",
                    data.display()
                )));
            }
            // Refuse bad files before anything is made in the data directory.
            backup::check_chain(&from)?;
            let fresh = !dir.identity_path().exists();
            let info = data::init_info(&dir, &[])?;
            let _lock = syncline_core::store::lock_dir(dir.root())
                .map_err(|e| usage(format!("{e}: stop the hub before restoring")))?;
            let summary = backup::restore(&from, &dir.store_path(), &mut progress("restore"))?;
            if fresh {
                eprintln!(
                    "syncline-hub: made a new identity and certificate in {}: replicas pinned \
                     to the old hub need the new fingerprint {} (or copy identity, cert.der \
                     and key.der from the old data directory before `run`)",
                    data.display(),
                    info.fingerprint
                );
            }
            print_report(json, &ops::restore_json(&data, &summary), || {
                ops::restore_text(&data, &summary)
            });
            Ok(())
        }
        Command::Verify { from, json } => {
            cli_logs()?;
            let report = backup::verify(&from, &mut progress("verify"))?;
            print_report(json, &ops::verify_json(&from, &report), || {
                ops::verify_text(&from, &report)
            });
            Ok(())
        }
        Command::History {
            hub,
            doc,
            after,
            limit,
            json,
        } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let entries = audit::history(&mut store, &doc, Cursor(after), limit)?;
            if entries.is_empty() {
                eprintln!("syncline-hub: no change of {doc} after position {after}");
            }
            for e in &entries {
                if json {
                    println!("{}", e.to_json());
                } else {
                    println!("{}", ops::history_line(e));
                }
            }
            Ok(())
        }
        Command::Show { hub, doc, at } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let changes = audit::read_verified(&mut store, &doc, Cursor(0), usize::MAX)?;
            if changes.is_empty() {
                return Err(usage(format!(
                    "the hub holds no change of {doc}: check the document id"
                )));
            }
            let now = syncline_core::document::Document::from_changes(
                doc.clone(),
                changes.into_iter().map(|(_, c)| c).collect(),
            )?;
            let shown = match &at {
                Some(at) => at.view(&now)?,
                None => now,
            };
            let heads: Vec<String> = shown.heads().iter().map(ToString::to_string).collect();
            println!(
                "{}",
                serde_json::json!({"doc": shown.to_json(), "heads": heads})
            );
            Ok(())
        }
        Command::Export { hub, doc, to } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let summary = audit::export(&mut store, &doc, &to, &mut |n| {
                eprintln!("export: {n} changes written");
            })?;
            println!(
                "exported {} changes of {doc} to {}; check it with `syncline-hub verify-export {}`",
                summary.changes,
                to.display(),
                to.display()
            );
            Ok(())
        }
        Command::VerifyExport { file, json } => {
            cli_logs()?;
            let report = audit::verify_export(&file, &mut |n| {
                eprintln!("verify-export: {n} changes verified");
            })?;
            print_report(json, &ops::export_report_json(&report), || {
                ops::export_report_text(&report)
            });
            Ok(())
        }
        Command::Grants { hub, json } => {
            cli_logs()?;
            let mut store = hub.open()?;
            let list = store.grants().context("reading the grants")?;
            if json {
                println!("{}", grants::to_json(&list));
            } else {
                print!("{}", grants::to_table(&list));
            }
            Ok(())
        }
    }
}

/// Opens the store of an existing data directory (never creates one), or the PostgreSQL
/// store given with `--store`.
fn open_store(
    dir: Option<&std::path::Path>,
    store: Option<&str>,
) -> anyhow::Result<Box<dyn HubStore + Send>> {
    let location = StoreLocation::parse(store)?;
    let dir = match (&location, dir) {
        (StoreLocation::Sqlite, Some(d)) => DataDir::existing(d)?,
        (StoreLocation::Sqlite, None) => {
            return Err(usage(
                "give --data DIR (or --store URL for a PostgreSQL store)",
            ));
        }
        (StoreLocation::Postgres(_), _) => DataDir::new(dir.unwrap_or(std::path::Path::new("."))),
    };
    service::open_store(&dir, &location)
}

/// Prints a command's result: one JSON line, or text.
fn print_report(json: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        print!("{}", text());
    }
}

/// A progress reporter on stderr for `what`: a line when it starts, then at most one every
/// half second, and one at the end.
fn progress(what: &'static str) -> impl FnMut(backup::Progress) {
    let mut last: Option<std::time::Instant> = None;
    move |p: backup::Progress| {
        let now = std::time::Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t).as_millis() >= 500);
        if due || p.done == p.total {
            last = Some(now);
            eprintln!("{}", ops::progress_line(what, p));
        }
    }
}

/// Logs of the one-shot commands: warnings only, unless RUST_LOG says otherwise.
fn cli_logs() -> anyhow::Result<()> {
    init_logs(&std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
}

/// Structured logs on stderr.
fn init_logs(filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        usage(format!(
            "the log filter {filter:?} is not valid: {e}; write e.g. info or \
             syncline_net=debug,info"
        ))
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .map_err(|e| anyhow::anyhow!("starting the logger: {e}"))
}
