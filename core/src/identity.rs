//! A replica's ed25519 key pair, persisted in a file readable by its owner only.

use std::fs;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};

use crate::error::{Error, Result};
use crate::ids::PeerId;

const FILE_HEADER: &str = "syncline-identity-v1";

/// A replica's key pair. Its public key is its [`PeerId`].
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.peer_id())
    }
}

impl Identity {
    /// A fresh key pair from the OS random source.
    pub fn generate() -> Self {
        Identity {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A key pair from a 32-byte seed (tests and simulations use this to be reproducible).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The secret seed, for stores that keep the identity somewhere other than a key file
    /// (a browser's storage). Zeroed when dropped.
    pub fn to_seed(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.key.to_bytes())
    }

    /// This identity's public key.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.key.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Loads the identity at `path`, or generates one and writes it there (mode 0600) if the
    /// file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self> {
        match fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                id.save(path)?;
                Ok(id)
            }
            Err(e) => Err(io_error(path, e)),
        }
    }

    /// Loads an identity file written by [`Identity::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
        let bad = |reason: &str| Error::Identity {
            path: path.to_owned(),
            reason: format!("{reason}; restore the file from a backup or create a new identity"),
        };
        let mut lines = text.lines();
        if lines.next() != Some(FILE_HEADER) {
            return Err(bad("not a Syncline identity file (bad header)"));
        }
        let secret = lines
            .next()
            .ok_or_else(|| bad("the secret key line is missing"))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(secret.trim(), &mut seed)
            .map_err(|_| bad("the secret key is not 64 hex characters"))?;
        let id = Identity::from_seed(seed);
        if let Some(public) = lines.next()
            && public.trim() != id.peer_id().to_string()
        {
            return Err(bad("the public key does not match the secret key"));
        }
        Ok(id)
    }

    /// Writes the key to `path`, readable and writable by the owner only (mode 0600), with
    /// the public key on the last line for people to read. The file is written whole and
    /// renamed into place, so a crash never leaves half a key.
    pub fn save(&self, path: &Path) -> Result<()> {
        let body = format!(
            "{FILE_HEADER}\n{}\n{}\n",
            hex::encode(self.key.to_bytes()),
            self.peer_id()
        );
        write_private(path, body.as_bytes()).map_err(|e| io_error(path, e))
    }
}

/// Writes a secret file readable and writable by its owner only (mode 0600): a temporary
/// file, synced, renamed into place, then the folder synced, so a crash never leaves half of
/// it.
pub(crate) fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename durable too.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Identity {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_private_and_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        let a = Identity::load_or_generate(&path).unwrap();
        let b = Identity::load_or_generate(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        for body in [
            "",
            "hello\n",
            "syncline-identity-v1\nnothex\n",
            "syncline-identity-v1\n00\n",
        ] {
            fs::write(&path, body).unwrap();
            let err = Identity::load(&path).unwrap_err();
            assert!(matches!(err, Error::Identity { .. }), "{body:?}: {err}");
        }
        let a = Identity::generate();
        let b = Identity::generate();
        fs::write(
            &path,
            format!(
                "{FILE_HEADER}\n{}\n{}\n",
                hex::encode(a.key.to_bytes()),
                b.peer_id()
            ),
        )
        .unwrap();
        assert!(
            Identity::load(&path)
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
    }
}
