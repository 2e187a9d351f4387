//! What an app configures: the hubs to sync with.

use syncline_core::PeerId;
use syncline_net::client::HubAddress;

use crate::SynclineError;

/// One hub to sync with.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HubConfig {
    /// `host:port` of the hub's QUIC endpoint, such as `hub.example.org:4433`.
    pub address: String,
    /// SHA-256 fingerprint of the hub's certificate, 64 hex characters (colons and case are
    /// tolerated), as `syncline-hub run` prints it. The certificate is pinned by it.
    pub fingerprint: String,
    /// The hub's public key (64 hex characters), pinned in the handshake too; `null`/`nil`
    /// to trust the certificate fingerprint alone.
    #[uniffi(default)]
    pub key: Option<String>,
}

/// How a replica syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct ReplicaConfig {
    /// Hubs in order of preference: the first is tried first, the next ones when it fails.
    /// Empty: the replica works offline until `set_hubs` names one.
    #[uniffi(default)]
    pub hubs: Vec<HubConfig>,
    /// Encrypt the store at rest with this 32-byte key (SQLCipher). Keep it in the platform's
    /// keystore (Android Keystore, iOS Keychain) and pass it at every open: a store made with
    /// a key opens only with it. `null`: the store is not encrypted.
    #[uniffi(default)]
    pub store_key: Option<Vec<u8>>,
}

/// The store key of a config, checked: 32 bytes.
pub(crate) fn store_key(
    config: &ReplicaConfig,
) -> Result<Option<syncline_core::store::StoreKey>, SynclineError> {
    let Some(bytes) = &config.store_key else {
        return Ok(None);
    };
    let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        SynclineError::InvalidConfig(format!(
            "the store key is {} bytes; give 32 random bytes, kept in the platform's keystore",
            bytes.len()
        ))
    })?;
    Ok(Some(syncline_core::store::StoreKey::from_bytes(bytes)))
}

/// Checks every hub and converts them for the sync task. Says which hub is wrong.
pub(crate) fn hub_addresses(hubs: &[HubConfig]) -> Result<Vec<HubAddress>, SynclineError> {
    hubs.iter()
        .enumerate()
        .map(|(i, h)| {
            hub_address(h).map_err(|reason| {
                SynclineError::InvalidConfig(format!("hub {} ({:?}): {reason}", i + 1, h.address))
            })
        })
        .collect()
}

fn hub_address(h: &HubConfig) -> Result<HubAddress, String> {
    let addr = h.address.trim();
    HubAddress::check_addr(addr).map_err(|e| e.to_string())?;
    let fingerprint = syncline_net::tls::parse_fingerprint(&h.fingerprint).map_err(|_| {
        format!(
            "the fingerprint {:?} is not a SHA-256 fingerprint (64 hex characters, as the hub \
             prints it)",
            h.fingerprint
        )
    })?;
    let key =
        match &h.key {
            Some(k) => Some(PeerId::from_hex(k.trim()).map_err(|_| {
                format!("the hub key {k:?} is not a public key (64 hex characters)")
            })?),
            None => None,
        };
    Ok(HubAddress {
        addr: addr.to_owned(),
        fingerprint,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(address: &str, fingerprint: &str, key: Option<&str>) -> HubConfig {
        HubConfig {
            address: address.into(),
            fingerprint: fingerprint.into(),
            key: key.map(Into::into),
        }
    }

    #[test]
    fn hubs_are_checked_and_the_wrong_one_is_named() {
        let fp = "AB:".repeat(31) + "AB";
        let ok = hub_addresses(&[hub("hub.example:4433", &fp, None)]);
        assert!(matches!(ok.as_deref(), Ok([h]) if h.fingerprint == [0xab; 32]));
        for (bad, needle) in [
            (hub("hub.example", &fp, None), "HOST:PORT"),
            (hub("hub:0", &fp, None), "HOST:PORT"),
            (hub("hub:1", "abc", None), "fingerprint"),
            (hub("hub:1", &fp, Some("zz")), "hub key"),
        ] {
            match hub_addresses(&[hub("a:1", &fp, None), bad]) {
                Err(SynclineError::InvalidConfig(m)) => {
                    assert!(m.starts_with("hub 2 ") && m.contains(needle), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
