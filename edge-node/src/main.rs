//! `syncline-edge`: the gateway daemon (`init`, `run`) and a command-line front for its local
//! API (`get`, `put`, `watch`, `status`, `subscribe`, `docs`).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{Value, json};
use syncline_core::identity::Identity;
use syncline_core::store::StoreKey;
use syncline_edge::api_client::{ApiClient, encode_segment};
use syncline_edge::config::{DEFAULT_API, DataDir, EdgeConfig, HubConfig};

#[derive(Parser)]
#[command(
    name = "syncline-edge",
    version,
    about = "Syncline edge node: local store, sync, API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the data directory, the device identity and the configuration; prints the
    /// device's public key (grant it on the hub).
    Init {
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
        /// A hub's QUIC address HOST:PORT; repeat for failover, in order of preference.
        #[arg(long = "hub", required = true)]
        hubs: Vec<String>,
        /// The SHA-256 fingerprint of each hub's certificate, in the same order as --hub.
        #[arg(long = "hub-fingerprint")]
        fingerprints: Vec<String>,
        /// Print `{"public_key": "..."}`.
        #[arg(long)]
        json: bool,
        /// Encrypt the store at rest with the key in FILE (64 hex characters), made with a
        /// fresh random key if missing (mode 0600). Keep it on another medium than the data
        /// directory, or have the platform's keystore write it at boot. Only a new store can
        /// be encrypted.
        #[arg(long, value_name = "FILE")]
        db_key_file: Option<PathBuf>,
    },
    /// Runs the daemon: store, sync with the hubs, local API. Stops on SIGTERM or SIGINT.
    Run {
        /// The data directory made by `init`.
        #[arg(long)]
        data: PathBuf,
        /// Where to serve the API (default: `api` in edge.toml, else 127.0.0.1:7070).
        #[arg(long)]
        api: Option<String>,
    },
    /// Prints a document as JSON with its heads.
    Get {
        /// The document id.
        doc: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Writes to a document: `put DOC --ops JSON`, or `put DOC PATH VALUE`.
    Put {
        /// The document id.
        doc: String,
        /// The operations: `[...]` or `{"ops": [...]}` (`-` reads them from stdin).
        #[arg(long, conflicts_with_all = ["path", "value"])]
        ops: Option<String>,
        /// Where to put VALUE: dot-separated map keys (`a.b`) or a JSON path (`["a", 0]`).
        #[arg(required_unless_present = "ops", requires = "value")]
        path: Option<String>,
        /// The value: JSON (`21.5`, `{"$counter": 0}`), or else taken as a string.
        value: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Prints a document's changes as they happen, one JSON line per event.
    Watch {
        /// The document id.
        doc: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Prints the daemon's sync status.
    Status {
        #[command(flatten)]
        remote: Remote,
    },
    /// Follows the documents under a prefix from the hub ("" for everything it may read).
    Subscribe {
        /// The prefix (or, with --doc, one document id).
        prefix: String,
        /// Subscribe to the one document named, not to a prefix.
        #[arg(long)]
        doc: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Lists the documents held.
    Docs {
        #[command(flatten)]
        remote: Remote,
    },
}

/// Where the CLI finds the daemon's API.
#[derive(Args)]
struct Remote {
    /// The daemon's API address [default: the address in DIR/api.addr with --data, else
    /// 127.0.0.1:7070].
    #[arg(long, env = "SYNCLINE_API")]
    api: Option<String>,
    /// The daemon's data directory (its running API address is read from DIR/api.addr).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl Remote {
    fn client(&self) -> anyhow::Result<ApiClient> {
        if let Some(api) = &self.api {
            return Ok(ApiClient::new(api));
        }
        if let Some(dir) = &self.data {
            let path = DataDir::new(dir).api_addr();
            let addr = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {}; is `syncline-edge run` running?",
                    path.display()
                )
            })?;
            return Ok(ApiClient::new(addr.trim()));
        }
        Ok(ApiClient::new(DEFAULT_API))
    }
}

/// Bad command-line input: exit status 2, like clap's own usage errors.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<UsageError>() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            data,
            hubs,
            fingerprints,
            json,
            db_key_file,
        } => init(&DataDir::new(data), &hubs, &fingerprints, json, db_key_file),
        Command::Run { data, api } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(syncline_edge::daemon::run(&DataDir::new(data), api))
        }
        command => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(remote(command))
        }
    }
}

fn init(
    data: &DataDir,
    hubs: &[String],
    fingerprints: &[String],
    json: bool,
    db_key_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    // Check everything before writing anything.
    if hubs.len() != fingerprints.len() {
        return Err(UsageError(format!(
            "{} --hub but {} --hub-fingerprint: give one fingerprint per hub, in the same order",
            hubs.len(),
            fingerprints.len()
        ))
        .into());
    }
    let hub = hubs
        .iter()
        .zip(fingerprints)
        .map(|(h, fp)| HubConfig::new(h, fp))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| UsageError(format!("{e:#}")))?;
    let old = match data.load_config() {
        // Re-running init changes the hubs and keeps the identity and the other settings.
        Ok(old) => old,
        Err(_) if !data.config().exists() => EdgeConfig::default(),
        Err(e) => return Err(e),
    };
    let (api, old_key_file, max_store_mb) = (old.api, old.db_key_file, old.max_store_mb);
    let db_key_file = match (db_key_file, old_key_file) {
        (Some(new), old) => {
            let new = std::path::absolute(&new)
                .map_err(|e| UsageError(format!("--db-key-file {}: {e}", new.display())))?;
            if old.as_ref() != Some(&new) && data.store().exists() {
                return Err(UsageError(format!(
                    "{} holds a store already: only a new store can be encrypted (or given \
                     another key); use a new data directory",
                    data.root().display()
                ))
                .into());
            }
            if !new.exists() {
                StoreKey::generate()
                    .save_new(&new)
                    .map_err(|e| UsageError(e.to_string()))?;
                eprintln!(
                    "made a new store key in {}: without it the store cannot be read, keep a \
                     copy somewhere safe",
                    new.display()
                );
            }
            StoreKey::load(&new).map_err(|e| UsageError(e.to_string()))?;
            Some(new)
        }
        (None, old) => old,
    };
    data.create()?;
    let identity = Identity::load_or_generate(&data.identity())?;
    data.save_config(&EdgeConfig {
        api,
        hub,
        db_key_file,
        max_store_mb,
        max_cached_docs: old.max_cached_docs,
        rolling: old.rolling,
    })?;
    let key = identity.peer_id().to_string();
    if json {
        println!("{{\"public_key\": \"{key}\"}}");
    } else {
        println!("{key}");
        eprintln!(
            "initialized {}: grant this public key on the hub (syncline-hub grant), then run \
             `syncline-edge run --data {}`",
            data.root().display(),
            data.root().display()
        );
    }
    Ok(())
}

async fn remote(command: Command) -> anyhow::Result<()> {
    let print = |v: &Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    };
    match command {
        Command::Get { doc, remote } => {
            let path = format!("/v1/docs/{}", encode_segment(&doc));
            print(&remote.client()?.json(Method::GET, &path, None).await?)
        }
        Command::Put {
            doc,
            ops,
            path,
            value,
            remote,
        } => {
            let body = match (ops, path, value) {
                (Some(ops), _, _) => ops_body(&ops)?,
                (None, Some(path), Some(value)) => {
                    let (path, value) = (parse_path(&path)?, parse_value(&value));
                    json!({"ops": [{"op": "put", "path": path, "value": value}]})
                }
                _ => return Err(UsageError("give --ops JSON, or PATH and VALUE".into()).into()),
            };
            let path = format!("/v1/docs/{}/changes", encode_segment(&doc));
            print(
                &remote
                    .client()?
                    .json(Method::POST, &path, Some(&body))
                    .await?,
            )
        }
        Command::Watch { doc, remote } => {
            let path = format!("/v1/docs/{}/events", encode_segment(&doc));
            let stdout = std::io::stdout();
            remote
                .client()?
                .events(&path, |_name, data| {
                    let mut out = stdout.lock();
                    writeln!(out, "{data}")?;
                    out.flush()?;
                    Ok(())
                })
                .await?;
            anyhow::bail!("the daemon closed the event stream (it is shutting down?)")
        }
        Command::Status { remote } => print(
            &remote
                .client()?
                .json(Method::GET, "/v1/status", None)
                .await?,
        ),
        Command::Subscribe {
            prefix,
            doc,
            remote,
        } => {
            let body = if doc {
                json!({ "doc": prefix })
            } else {
                json!({ "prefix": prefix })
            };
            let answer = remote
                .client()?
                .json(Method::POST, "/v1/subscriptions", Some(&body))
                .await?;
            print(&answer)
        }
        Command::Docs { remote } => {
            print(&remote.client()?.json(Method::GET, "/v1/docs", None).await?)
        }
        Command::Init { .. } | Command::Run { .. } => Ok(()),
    }
}

/// `--ops`: a JSON array of operations or `{"ops": [...]}`, or `-` for stdin.
fn ops_body(arg: &str) -> anyhow::Result<Value> {
    let text = if arg == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the operations from stdin")?
    } else {
        arg.to_owned()
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|e| UsageError(format!("--ops is not JSON: {e}")))?;
    Ok(match value {
        Value::Array(_) => json!({ "ops": value }),
        other => other,
    })
}

/// `a.b.c` (map keys) or a JSON array such as `["items", 0]`.
fn parse_path(arg: &str) -> anyhow::Result<Value> {
    if arg.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(arg)
            .map_err(|e| UsageError(format!("PATH {arg:?} is not a JSON array: {e}")))?;
        return Ok(v);
    }
    Ok(Value::Array(
        arg.split('.')
            .map(|k| Value::String(k.to_owned()))
            .collect(),
    ))
}

/// JSON if it parses, else the text as a string.
fn parse_value(arg: &str) -> Value {
    serde_json::from_str(arg).unwrap_or_else(|_| Value::String(arg.to_owned()))
}
