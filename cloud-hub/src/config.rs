//! The settings of `syncline-hub run`. Each key comes from, in this order: a flag, its
//! `SYNCLINE_*` environment variable (clap reads both), the TOML config file, the default.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::usage;

/// Where the QUIC server listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
/// The log filter when nothing says otherwise.
pub const DEFAULT_LOG: &str = "info";

/// The config file: every key is optional. Relative paths are taken from the file's folder.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// QUIC listen address.
    pub listen: Option<String>,
    /// Metrics HTTP listen address (no metrics server if absent).
    pub metrics: Option<String>,
    /// WebSocket listen address for browsers (no WebSocket endpoint if absent).
    pub ws: Option<String>,
    /// Serve the WebSocket endpoint as `wss://`, with the hub's certificate.
    pub ws_tls: Option<bool>,
    /// The data directory.
    pub data: Option<PathBuf>,
    /// A certificate file (PEM or DER) to use instead of the self-signed one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM or DER, PKCS#8).
    pub key: Option<PathBuf>,
    /// The log filter (`info`, `syncline_hub=debug,info`...).
    pub log: Option<String>,
    /// A PostgreSQL URL for the store instead of the data directory's SQLite file.
    pub store: Option<String>,
    /// QUIC connections served at once.
    pub max_connections: Option<usize>,
    /// Retention of rolling buckets, one `[[retention]]` table per prefix.
    #[serde(default)]
    pub retention: Vec<RetentionConfig>,
    /// Compact a document once it gained this many changes (0: never).
    pub compact_after: Option<u64>,
    /// Milliseconds between two checks for grants changed elsewhere.
    pub grants_poll_ms: Option<u64>,
}

/// One `[[retention]]` table of the hub's config file: the rolling buckets under `prefix`
/// (ids `LOGICAL@{period}s.{N}`, see the edge's `[[rolling]]`) are dropped from the store
/// `max_age_secs` after their period ends, and writes into them are refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Buckets of the logical documents under this prefix (`sensors/`).
    pub prefix: String,
    /// Seconds a bucket is kept after its period ends (2592000: 30 days).
    pub max_age_secs: u64,
}

impl RetentionConfig {
    /// The rule the hub takes; a bad prefix or age is a usage error naming the table.
    pub fn to_rule(&self) -> anyhow::Result<syncline_core::rolling::Retention> {
        let bad = |e: String| usage(format!("[[retention]] prefix {:?}: {e}", self.prefix));
        let prefix =
            syncline_core::DocPrefix::new(self.prefix.clone()).map_err(|e| bad(e.to_string()))?;
        syncline_core::rolling::Retention::new(prefix, self.max_age_secs).map_err(bad)
    }
}

impl FileConfig {
    /// Reads and parses a config file; an unknown key or a bad value is a [`crate::Usage`]
    /// error naming the file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read the config file {}: {e}; check --config / SYNCLINE_CONFIG",
                path.display()
            ))
        })?;
        let mut cfg: FileConfig = toml::from_str(&text).map_err(|e| {
            usage(format!(
                "the config file {} is not valid: {e}\nknown keys: listen, metrics, ws, \
                 ws_tls, max_connections, data, cert, key, log, store, compact_after, \
                 grants_poll_ms, [[retention]]",
                path.display()
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [&mut cfg.data, &mut cfg.cert, &mut cfg.key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }
}

/// What the flags and the environment gave (clap has already merged these two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `SYNCLINE_LISTEN`.
    pub listen: Option<String>,
    /// `--metrics` / `SYNCLINE_METRICS`.
    pub metrics: Option<String>,
    /// `--ws` / `SYNCLINE_WS`.
    pub ws: Option<String>,
    /// `--ws-tls` / `SYNCLINE_WS_TLS`.
    pub ws_tls: Option<bool>,
    /// `--data` / `SYNCLINE_DATA`.
    pub data: Option<PathBuf>,
    /// `--cert` / `SYNCLINE_CERT`.
    pub cert: Option<PathBuf>,
    /// `--key` / `SYNCLINE_KEY`.
    pub key: Option<PathBuf>,
    /// `--log` / `SYNCLINE_LOG`, else `RUST_LOG`.
    pub log: Option<String>,
    /// `--store` / `SYNCLINE_STORE`.
    pub store: Option<String>,
    /// `--max-connections` / `SYNCLINE_MAX_CONNECTIONS`.
    pub max_connections: Option<usize>,
    /// `--grants-poll-ms` / `SYNCLINE_GRANTS_POLL_MS`.
    pub grants_poll_ms: Option<u64>,
}

/// Where the hub's TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// The self-signed certificate in the data directory (made on first start).
    SelfSigned,
    /// Operator-provided files.
    Files {
        /// The certificate (PEM or DER).
        cert: PathBuf,
        /// The private key (PEM or DER).
        key: PathBuf,
    },
}

/// The resolved settings of a running hub.
#[derive(Debug, Clone)]
pub struct Settings {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Metrics listen address.
    pub metrics: Option<SocketAddr>,
    /// WebSocket listen address (browsers).
    pub ws: Option<SocketAddr>,
    /// Whether the WebSocket endpoint is `wss://` (TLS with the hub's certificate).
    pub ws_tls: bool,
    /// The data directory.
    pub data: PathBuf,
    /// The certificate.
    pub tls: TlsSource,
    /// The log filter.
    pub log: String,
    /// Peer hubs to sync with.
    pub peers: Vec<syncline_net::client::HubAddress>,
    /// Where the store is.
    pub store: StoreLocation,
    /// QUIC connections served at once.
    pub max_connections: usize,
    /// Retention of rolling buckets (config file only).
    pub retention: Vec<syncline_core::rolling::Retention>,
    /// Compaction: after how many new changes a document is snapshotted (`None`: never;
    /// config file only).
    pub compact_after: Option<u64>,
    /// How often the hub looks for grants changed by the CLI or another instance, when no
    /// notification told it (a shared PostgreSQL store notifies every change at once).
    pub grants_poll: std::time::Duration,
}

/// Where a hub's store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `hub.db` in the data directory (embedded SQLite, the default).
    Sqlite,
    /// A PostgreSQL database, which several hub instances may share.
    Postgres(String),
}

impl StoreLocation {
    /// `--store` as given: absent or empty is SQLite; `postgres://` or `postgresql://` is
    /// PostgreSQL; anything else is refused.
    pub fn parse(store: Option<&str>) -> anyhow::Result<Self> {
        match store.map(str::trim) {
            None | Some("") | Some("sqlite") => Ok(StoreLocation::Sqlite),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreLocation::Postgres(url.to_owned()))
            }
            Some(other) => Err(usage(format!(
                "`store` = {other:?} is not a store: give postgres://USER@HOST:PORT/DATABASE, \
                 or leave it out for the data directory's SQLite file"
            ))),
        }
    }
}

/// Merges flags and environment over the file over the defaults.
pub fn resolve(over: Overrides, file: FileConfig) -> anyhow::Result<Settings> {
    let data = over.data.or(file.data).ok_or_else(|| {
        usage(
            "no data directory: pass --data DIR, set SYNCLINE_DATA, or put `data = \"DIR\"` \
             in the config file",
        )
    })?;
    let listen = over
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = socket_addr("listen", &listen)?;
    let metrics = match over.metrics.or(file.metrics) {
        Some(m) if !m.trim().is_empty() => Some(socket_addr("metrics", &m)?),
        _ => None,
    };
    let ws = match over.ws.or(file.ws) {
        Some(w) if !w.trim().is_empty() => Some(socket_addr("ws", &w)?),
        _ => None,
    };
    let tls = match (over.cert.or(file.cert), over.key.or(file.key)) {
        (None, None) => TlsSource::SelfSigned,
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        (Some(_), None) => {
            return Err(usage(
                "a certificate was given without its key: set both `cert` and `key` \
                 (--cert/--key, SYNCLINE_CERT/SYNCLINE_KEY) or neither",
            ));
        }
        (None, Some(_)) => {
            return Err(usage(
                "a key was given without its certificate: set both `cert` and `key` \
                 (--cert/--key, SYNCLINE_CERT/SYNCLINE_KEY) or neither",
            ));
        }
    };
    let log = over
        .log
        .or(file.log)
        .unwrap_or_else(|| DEFAULT_LOG.to_owned());
    let store = StoreLocation::parse(over.store.or(file.store).as_deref())?;
    let max_connections = over
        .max_connections
        .or(file.max_connections)
        .unwrap_or_else(|| syncline_net::server::Limits::default().max_connections);
    if max_connections == 0 {
        return Err(usage(
            "max_connections is 0: no replica could connect; give at least 1",
        ));
    }
    let retention = file
        .retention
        .iter()
        .map(RetentionConfig::to_rule)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let grants_poll = match over.grants_poll_ms.or(file.grants_poll_ms) {
        Some(0) => {
            return Err(usage(
                "grants_poll_ms is 0: give the milliseconds between two checks of the grants \
                 (at least 1; default 250)",
            ));
        }
        Some(ms) => std::time::Duration::from_millis(ms),
        None => crate::GRANTS_POLL,
    };
    let compact_after = match file.compact_after {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some(syncline_core::hub::COMPACT_AFTER),
    };
    Ok(Settings {
        retention,
        compact_after,
        grants_poll,
        listen,
        metrics,
        ws,
        ws_tls: over.ws_tls.or(file.ws_tls).unwrap_or(false),
        data,
        tls,
        log,
        peers: Vec::new(),
        store,
        max_connections,
    })
}

/// Pairs `--peer` addresses with their `--peer-fingerprint`s.
pub fn peers(
    addrs: &[String],
    fingerprints: &[String],
) -> anyhow::Result<Vec<syncline_net::client::HubAddress>> {
    if addrs.len() != fingerprints.len() {
        return Err(usage(format!(
            "{} --peer but {} --peer-fingerprint: give one fingerprint per peer, in order",
            addrs.len(),
            fingerprints.len()
        )));
    }
    addrs
        .iter()
        .zip(fingerprints)
        .map(|(addr, fp)| {
            if !addr.contains(':') {
                return Err(usage(format!("--peer {addr:?} is not HOST:PORT")));
            }
            let fingerprint = syncline_net::tls::parse_fingerprint(fp)
                .map_err(|e| usage(format!("--peer-fingerprint {fp:?}: {e}")))?;
            Ok(syncline_net::client::HubAddress {
                addr: addr.clone(),
                fingerprint,
                key: None,
            })
        })
        .collect()
}

/// Parses `host:port` (an IP address or a name that resolves).
fn socket_addr(key: &str, s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.trim().parse() {
        return Ok(a);
    }
    s.trim()
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| {
            usage(format!(
                "`{key}` = {s:?} is not an address: write HOST:PORT, such as 127.0.0.1:4433, \
                 0.0.0.0:4433 or [::]:4433"
            ))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test with its message.

    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = FileConfig {
            listen: Some("127.0.0.1:5000".into()),
            metrics: Some("127.0.0.1:9100".into()),
            ws: Some("127.0.0.1:9200".into()),
            data: Some("/from/file".into()),
            log: Some("debug".into()),
            max_connections: Some(500),
            store: Some("postgres://hub@db:5432/syncline".into()),
            grants_poll_ms: Some(1_000),
            ..FileConfig::default()
        };
        let over = Overrides {
            listen: Some("127.0.0.1:6000".into()),
            grants_poll_ms: Some(60_000),
            ..Overrides::default()
        };
        let s = resolve(over, file).unwrap();
        assert_eq!(s.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(s.ws, Some("127.0.0.1:9200".parse().unwrap()));
        assert_eq!(s.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(s.data, PathBuf::from("/from/file"));
        assert_eq!(s.log, "debug");
        assert_eq!(s.tls, TlsSource::SelfSigned);
        assert_eq!(s.max_connections, 500);
        assert_eq!(
            s.store,
            StoreLocation::Postgres("postgres://hub@db:5432/syncline".into())
        );
        assert_eq!(s.grants_poll, std::time::Duration::from_secs(60));

        let s = resolve(
            Overrides {
                data: Some("d".into()),
                ..Overrides::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(s.metrics, None);
        assert_eq!(s.log, DEFAULT_LOG);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.store, StoreLocation::Sqlite);
        assert_eq!(s.grants_poll, crate::GRANTS_POLL);
    }

    #[test]
    fn missing_data_half_a_certificate_and_bad_addresses_are_usage_errors() {
        let is_usage = |r: anyhow::Result<Settings>| r.unwrap_err().is::<crate::Usage>();
        assert!(is_usage(resolve(
            Overrides::default(),
            FileConfig::default()
        )));
        let with = |o: Overrides| {
            resolve(
                Overrides {
                    data: Some("d".into()),
                    ..o
                },
                FileConfig::default(),
            )
        };
        assert!(is_usage(with(Overrides {
            cert: Some("c.pem".into()),
            ..Overrides::default()
        })));
        assert!(is_usage(with(Overrides {
            listen: Some("nowhere".into()),
            ..Overrides::default()
        })));
        assert!(is_usage(with(Overrides {
            max_connections: Some(0),
            ..Overrides::default()
        })));
        assert!(is_usage(with(Overrides {
            grants_poll_ms: Some(0),
            ..Overrides::default()
        })));
        assert!(is_usage(with(Overrides {
            store: Some("mysql://db/syncline".into()),
            ..Overrides::default()
        })));
    }

    #[test]
    fn the_file_refuses_unknown_keys_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, "data = \"state\"\ncert = \"/abs/cert.pem\"\n").unwrap();
        let cfg = FileConfig::load(&path).unwrap();
        assert_eq!(cfg.data, Some(dir.path().join("state")));
        assert_eq!(cfg.cert, Some(PathBuf::from("/abs/cert.pem")));
        std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
        assert!(FileConfig::load(&path).unwrap_err().is::<crate::Usage>());
    }

    #[test]
    fn retention_tables_become_rules_and_a_zero_age_is_refused_by_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.toml");
        let table = |age: u64| {
            format!("data = \"d\"\n[[retention]]\nprefix = \"sensors/\"\nmax_age_secs = {age}\n")
        };
        std::fs::write(&path, table(2_592_000)).unwrap();
        let s = resolve(Overrides::default(), FileConfig::load(&path).unwrap()).unwrap();
        assert_eq!(s.retention.len(), 1);
        assert_eq!(s.retention[0].prefix().as_str(), "sensors/");
        assert_eq!(s.retention[0].max_age_secs(), 2_592_000);
        std::fs::write(&path, table(0)).unwrap();
        let err = resolve(Overrides::default(), FileConfig::load(&path).unwrap()).unwrap_err();
        assert!(err.is::<crate::Usage>());
        assert!(err.to_string().contains("\"sensors/\""), "{err}");
        std::fs::write(&path, "[[retention]]\nprefix = \"s/\"\nmax_age = 1\n").unwrap();
        assert!(FileConfig::load(&path).unwrap_err().is::<crate::Usage>());
    }
}
