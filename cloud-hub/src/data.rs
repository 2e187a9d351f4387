//! The hub's data directory: `identity` (the hub's ed25519 key), `cert.der` and `key.der`
//! (its self-signed TLS certificate, pinned by replicas through its fingerprint) and `hub.db`
//! (the store: log, documents, grants). [`DataDir::init`] makes what is missing and never
//! replaces what exists, so it is safe to run on every start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use syncline_core::PeerId;
use syncline_core::identity::Identity;
use syncline_core::store::SqliteHubStore;
use syncline_net::tls::{self, CertifiedKey};

use crate::usage;

/// Certificate names when `init` is given none.
pub const DEFAULT_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// What a replica needs to trust a hub.
#[derive(Debug, Clone)]
pub struct HubInfo {
    /// The hub's public key (64 hex characters when printed).
    pub public_key: PeerId,
    /// The SHA-256 fingerprint of its TLS certificate (64 hex characters).
    pub fingerprint: String,
}

impl HubInfo {
    /// `{"public_key": "...", "fingerprint": "..."}` on one line (both values are hex).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"public_key\": \"{}\", \"fingerprint\": \"{}\"}}",
            self.public_key, self.fingerprint
        )
    }
}

/// The files of one hub.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (nothing is read or made yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// An existing, initialized data directory (the grants CLI uses this: it never creates
    /// a store by mistake in a mistyped directory).
    pub fn existing(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = DataDir::new(root);
        if !dir.store_path().is_file() {
            return Err(usage(format!(
                "{} is not a hub data directory (no hub.db in it): check --data, or create \
                 one with `syncline-hub init --data {}`",
                dir.root.display(),
                dir.root.display()
            )));
        }
        Ok(dir)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The hub's identity file.
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// The self-signed certificate (DER).
    pub fn cert_path(&self) -> PathBuf {
        self.root.join("cert.der")
    }

    /// Its private key (PKCS#8 DER, mode 0600).
    pub fn key_path(&self) -> PathBuf {
        self.root.join("key.der")
    }

    /// The SQLite store.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("hub.db")
    }

    /// Makes the directory, the identity and the store if missing, and the self-signed
    /// certificate for `names` if `self_signed` and it is missing. Returns the identity and,
    /// with `self_signed`, the certificate.
    pub fn init(
        &self,
        names: &[String],
        self_signed: bool,
    ) -> anyhow::Result<(Identity, Option<CertifiedKey>)> {
        if !self.root.exists() {
            create_private_dir(&self.root)?;
            tracing::info!(dir = %self.root.display(), "created the data directory");
        } else if !self.root.is_dir() {
            return Err(usage(format!(
                "{} exists and is not a directory: choose another --data",
                self.root.display()
            )));
        }
        let identity = Identity::load_or_generate(&self.identity_path())
            .with_context(|| format!("the hub identity in {}", self.root.display()))?;
        let cert = if self_signed {
            Some(self.self_signed(names)?)
        } else {
            None
        };
        SqliteHubStore::open(&self.store_path())
            .with_context(|| format!("opening {}", self.store_path().display()))?;
        Ok((identity, cert))
    }

    /// Loads the self-signed certificate, or makes it (key first, then the certificate: the
    /// certificate is written last, so a crash between the two leaves no certificate and the
    /// next start makes both again).
    fn self_signed(&self, names: &[String]) -> anyhow::Result<CertifiedKey> {
        let (cert_path, key_path) = (self.cert_path(), self.key_path());
        if cert_path.exists() {
            if !key_path.exists() {
                return Err(usage(format!(
                    "{} exists without {}: restore the key from a backup, or delete the \
                     certificate to make a new one (replicas pinned to the old fingerprint \
                     must then be given the new one)",
                    cert_path.display(),
                    key_path.display()
                )));
            }
            let cert_der = read(&cert_path)?;
            let key_der = read(&key_path)?;
            if !names.is_empty() {
                tracing::warn!(
                    cert = %cert_path.display(),
                    "the certificate exists: --name is ignored (delete cert.der and key.der \
                     to make a new one)"
                );
            }
            return Ok(CertifiedKey { cert_der, key_der });
        }
        let names: Vec<String> = if names.is_empty() {
            DEFAULT_NAMES.iter().map(|s| (*s).to_owned()).collect()
        } else {
            names.to_vec()
        };
        let ck = tls::self_signed(names.clone())
            .map_err(|e| usage(format!("cannot make a certificate for {names:?}: {e}")))?;
        write_private(&key_path, &ck.key_der)?;
        write_private(&cert_path, &ck.cert_der)?;
        tracing::info!(
            ?names,
            fingerprint = %tls::fingerprint(&ck.cert_der),
            "made a self-signed certificate"
        );
        Ok(ck)
    }
}

/// Loads an operator's certificate and key, PEM or DER. Only the first certificate of a PEM
/// chain is served (replicas pin its fingerprint, not a CA). The key must be PKCS#8.
pub fn load_tls_files(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let cert_bytes = read(cert).map_err(|e| usage(format!("{e:#}: check `cert`")))?;
    let key_bytes = read(key).map_err(|e| usage(format!("{e:#}: check `key`")))?;
    let cert_der = if is_pem(&cert_bytes) {
        match CertificateDer::pem_slice_iter(&cert_bytes).next() {
            Some(Ok(c)) => c.as_ref().to_vec(),
            Some(Err(e)) => {
                return Err(usage(format!("{}: bad PEM: {e}", cert.display())));
            }
            None => {
                return Err(usage(format!(
                    "{} holds no CERTIFICATE section",
                    cert.display()
                )));
            }
        }
    } else {
        cert_bytes
    };
    let key_der = if is_pem(&key_bytes) {
        match PrivateKeyDer::from_pem_slice(&key_bytes) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            Ok(_) => {
                return Err(usage(format!(
                    "{} is not a PKCS#8 key (BEGIN PRIVATE KEY); convert it with \
                     `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`",
                    key.display()
                )));
            }
            Err(e) => {
                return Err(usage(format!(
                    "{}: no private key found in the PEM: {e}",
                    key.display()
                )));
            }
        }
    } else {
        key_bytes
    };
    let ck = CertifiedKey { cert_der, key_der };
    // Refuse a mismatched or unreadable pair now, with the file names, rather than at the
    // first connection.
    tls::server_config(&ck).map_err(|e| {
        usage(format!(
            "the certificate {} and key {} cannot be used: {e} (the key must be PKCS#8 and \
             belong to the certificate)",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(ck)
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Writes `bytes` whole to `path` with mode 0600: a temporary file, fsync, rename, fsync of
/// the folder, so a crash leaves either no file or the whole file.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let write = || -> std::io::Result<()> {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// The hub's identity and certificate in `dir`, made if missing: what `init` prints.
pub fn init_info(dir: &DataDir, names: &[String]) -> anyhow::Result<HubInfo> {
    let (identity, cert) = dir.init(names, true)?;
    let cert = cert.context("the certificate was not made")?;
    Ok(HubInfo {
        public_key: identity.peer_id(),
        fingerprint: tls::fingerprint(&cert.cert_der),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test with its message.

    use super::*;

    #[test]
    fn init_makes_everything_once_and_then_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("hub"));
        let a = init_info(&dir, &[]).unwrap();
        let b = init_info(&dir, &["example.org".into()]).unwrap();
        assert_eq!(a.public_key, b.public_key);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(dir.store_path().is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.key_path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let json: serde_json::Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(json["public_key"], a.public_key.to_string());
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        init_info(&dir, &[]).unwrap();
        fs::remove_file(dir.key_path()).unwrap();
        let err = init_info(&dir, &[]).unwrap_err();
        assert!(err.is::<crate::Usage>(), "{err:#}");
        assert!(dir.cert_path().exists());
    }

    #[test]
    fn existing_refuses_a_folder_without_a_store() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            DataDir::existing(tmp.path())
                .unwrap_err()
                .is::<crate::Usage>()
        );
    }
}
