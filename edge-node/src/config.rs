//! The data directory of an edge node: its identity, its configuration (`edge.toml`), its
//! store, and the address of the running daemon's API.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use syncline_net::client::HubAddress;

/// The API address used when neither the command line nor the configuration names one.
pub const DEFAULT_API: &str = "127.0.0.1:7070";

/// The files of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (nothing is read or created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's key pair (mode 0600).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// The configuration.
    pub fn config(&self) -> PathBuf {
        self.root.join("edge.toml")
    }

    /// The SQLite store of the replica.
    pub fn store(&self) -> PathBuf {
        self.root.join("edge.db")
    }

    /// Where `run` writes the address its API is bound to, for the CLI commands.
    pub fn api_addr(&self) -> PathBuf {
        self.root.join("api.addr")
    }

    /// Creates the directory (mode 0700 on Unix: it holds the secret key).
    pub fn create(&self) -> anyhow::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder
            .create(&self.root)
            .with_context(|| format!("creating the data directory {}", self.root.display()))
    }

    /// Reads `edge.toml`.
    pub fn load_config(&self) -> anyhow::Result<EdgeConfig> {
        let path = self.config();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} does not exist; run `syncline-edge init --data {} --hub ...` first",
                path.display(),
                self.root.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let config: EdgeConfig =
            toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        for hub in &config.hub {
            hub.validate()
                .with_context(|| format!("in {}", path.display()))?;
        }
        for r in &config.rolling {
            r.to_policy()
                .with_context(|| format!("in {}", path.display()))?;
        }
        if config.max_cached_docs == Some(0) {
            bail!(
                "in {}: max_cached_docs = 0 would hold no document in memory; give at least 1, \
                 or leave it out for 1,024",
                path.display()
            );
        }
        Ok(config)
    }

    /// Writes `edge.toml` whole, then renames it into place (a crash leaves the old or the new
    /// file, never half of one).
    pub fn save_config(&self, config: &EdgeConfig) -> anyhow::Result<()> {
        let body = format!(
            "# syncline-edge configuration, written by `syncline-edge init`.\n\
             # Hubs are tried in this order (failover order).\n\n{}",
            toml::to_string(config).context("writing the configuration")?
        );
        write_atomically(&self.config(), body.as_bytes())
    }
}

/// Writes `path` through a temporary file, synced, then renamed into place.
pub fn write_atomically(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// The contents of `edge.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Where `run` serves the local API when `--api` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The hubs, in failover order.
    #[serde(default)]
    pub hub: Vec<HubConfig>,
    /// The key file that encrypts the store (64 hex characters; SQLCipher). Absent: the store
    /// is not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_key_file: Option<PathBuf>,
    /// The most the store may take on disk, in MiB: past it, writes are refused with
    /// `507 storage_full` and nothing stored is lost. Absent: the disk is the limit. The WAL
    /// is outside it (checkpointed at a quarter of it; docs/API.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_store_mb: Option<u64>,
    /// The most documents held in memory at once (at least 1; 1,024 when absent): past it,
    /// the least recently used are dropped and read from the store again when next used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cached_docs: Option<usize>,
    /// Rolling documents: each logical document under a prefix is kept as one bucket document
    /// per period, so its history stays bounded (`docs/API.md`, "Rolling documents").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolling: Vec<RollingConfig>,
}

/// One `[[rolling]]` table of `edge.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollingConfig {
    /// Documents whose id starts with this roll (`sensors/`).
    pub prefix: String,
    /// Seconds per bucket (3600: a new bucket every hour).
    pub period_secs: u64,
    /// Buckets kept on this device per logical document (at least 2); older ones are dropped
    /// once the hub holds them.
    pub keep: u32,
}

impl RollingConfig {
    /// The policy the replica takes.
    pub fn to_policy(&self) -> anyhow::Result<syncline_core::rolling::Rolling> {
        let prefix = syncline_core::ids::DocPrefix::new(self.prefix.clone())?;
        syncline_core::rolling::Rolling::new(prefix, self.period_secs, self.keep)
            .map_err(|e| anyhow::anyhow!("[[rolling]] prefix {:?}: {e}", self.prefix))
    }
}

/// One hub of `edge.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `host:port` of the hub's QUIC endpoint.
    pub addr: String,
    /// SHA-256 fingerprint of the hub's TLS certificate (64 hex characters).
    pub fingerprint: String,
    /// The hub's Syncline public key, if it should be pinned too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl HubConfig {
    /// Checks and normalizes a hub given on the command line.
    pub fn new(addr: &str, fingerprint: &str) -> anyhow::Result<Self> {
        let fp = syncline_net::tls::parse_fingerprint(fingerprint)?;
        let hub = HubConfig {
            addr: addr.trim().to_owned(),
            fingerprint: hex::encode(fp),
            key: None,
        };
        hub.validate()?;
        Ok(hub)
    }

    fn validate(&self) -> anyhow::Result<()> {
        HubAddress::check_addr(&self.addr)?;
        syncline_net::tls::parse_fingerprint(&self.fingerprint)?;
        if let Some(key) = &self.key {
            syncline_core::PeerId::from_hex(key)?;
        }
        Ok(())
    }

    /// The address as the sync task takes it.
    pub fn to_address(&self) -> anyhow::Result<HubAddress> {
        Ok(HubAddress {
            addr: self.addr.clone(),
            fingerprint: syncline_net::tls::parse_fingerprint(&self.fingerprint)?,
            key: self
                .key
                .as_deref()
                .map(syncline_core::PeerId::from_hex)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_addresses_and_fingerprints_are_checked() {
        let fp = "AB".repeat(32);
        let hub = HubConfig::new("hub.example:7443", &fp).unwrap();
        assert_eq!(hub.fingerprint, "ab".repeat(32));
        assert!(HubConfig::new("[::1]:7443", &fp).is_ok());
        for addr in ["hub.example", ":7443", "hub:0", "hub:port", "hub:99999"] {
            assert!(HubConfig::new(addr, &fp).is_err(), "{addr}");
        }
        assert!(HubConfig::new("hub:1", "abc").is_err());
    }

    #[test]
    fn the_config_round_trips_through_toml() {
        let config = EdgeConfig {
            api: None,
            hub: vec![
                HubConfig::new("a:1", &"1".repeat(64)).unwrap(),
                HubConfig::new("b:2", &"2".repeat(64)).unwrap(),
            ],
            db_key_file: Some("/run/keys/edge.key".into()),
            max_store_mb: Some(512),
            max_cached_docs: Some(64),
            rolling: vec![RollingConfig {
                prefix: "sensors/".into(),
                period_secs: 3600,
                keep: 24,
            }],
        };
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<EdgeConfig>(&text).unwrap(), config);
    }

    #[test]
    fn a_bad_rolling_policy_is_refused_with_its_prefix_and_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().to_path_buf());
        std::fs::write(
            data.config(),
            "[[rolling]]\nprefix = \"sensors/\"\nperiod_secs = 3600\nkeep = 1\n",
        )
        .unwrap();
        let e = format!("{:#}", data.load_config().unwrap_err());
        assert!(e.contains("sensors/") && e.contains("at least 2"), "{e}");
        std::fs::write(data.config(), "[[rolling]]\nprefix = \"sensors/\"\n").unwrap();
        let e = format!("{:#}", data.load_config().unwrap_err());
        assert!(e.contains("period_secs"), "{e}");
    }

    #[test]
    fn a_document_cache_of_none_is_refused_with_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().to_path_buf());
        std::fs::write(data.config(), "max_cached_docs = 0\n").unwrap();
        let e = format!("{:#}", data.load_config().unwrap_err());
        assert!(
            e.contains("max_cached_docs") && e.contains("at least 1"),
            "{e}"
        );
        std::fs::write(data.config(), "max_cached_docs = 3\n").unwrap();
        assert_eq!(data.load_config().unwrap().max_cached_docs, Some(3));
    }
}
