//! TLS for QUIC: a hub's self-signed certificate, pinned by its SHA-256 fingerprint on the
//! replica side (no certificate authority needed on a closed fleet), and the channel binding
//! that ties the Syncline handshake to one TLS connection.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::NetError;

/// The ALPN protocol id of Syncline over QUIC.
pub const ALPN: &[u8] = b"syncline/1";
/// The TLS exporter label of the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-syncline-v1";

/// A certificate and its private key, both DER.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertifiedKey({})", fingerprint(&self.cert_der))
    }
}

/// A fresh self-signed certificate for `names` (DNS names or IP addresses).
pub fn self_signed(names: Vec<String>) -> Result<CertifiedKey, NetError> {
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| NetError::Tls(e.to_string()))?;
    Ok(CertifiedKey {
        cert_der: ck.cert.der().to_vec(),
        key_der: ck.signing_key.serialize_der(),
    })
}

/// The SHA-256 fingerprint of a DER certificate, as 64 lowercase hex characters.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Parses a fingerprint as printed by [`fingerprint`] (colons and case are tolerated).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], NetError> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean.trim(), &mut out).map_err(|_| {
        NetError::Config(format!(
            "{s:?} is not a SHA-256 fingerprint (64 hex characters)"
        ))
    })?;
    Ok(out)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_server(key: &CertifiedKey) -> Result<rustls::ServerConfig, NetError> {
    let tls = |e: rustls::Error| NetError::Tls(e.to_string());
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(key.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_der.clone())),
        )
        .map_err(tls)
}

/// TLS 1.3 settings for the hub's `wss://` endpoint (HTTP/1.1 over TCP, for browsers).
pub fn https_server_config(key: &CertifiedKey) -> Result<Arc<rustls::ServerConfig>, NetError> {
    let mut cfg = rustls_server(key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// QUIC server settings for a hub with this certificate.
pub fn server_config(key: &CertifiedKey) -> Result<quinn::ServerConfig, NetError> {
    let mut cfg = rustls_server(key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    Ok(server)
}

/// QUIC endpoint settings for a hub whose stateless-reset key is derived from its TLS private
/// key, so that it is the same in every run of the hub. A restarted hub (a crash, SIGKILL, a
/// new machine with the same key) then answers the packets of connections from its previous
/// run with a valid stateless reset, and their peers reconnect at once instead of waiting out
/// the 30 s idle timeout. The key never leaves the process: the reset tokens are HMACs of
/// connection ids under it.
/// The connection ids it hands out carry a check value under a key derived the same way, so
/// that the restarted hub recognizes them as its own (quinn drops packets whose connection id
/// fails the check without an answer).
pub fn endpoint_config(key: &CertifiedKey) -> quinn::EndpointConfig {
    let derive = |tag: &[u8]| {
        Sha256::new()
            .chain_update(tag)
            .chain_update(&key.key_der)
            .finalize()
    };
    let reset = derive(b"syncline quic stateless reset key v1");
    let mut cid = [0u8; 8];
    cid.copy_from_slice(&derive(b"syncline quic connection id key v1")[..8]);
    let cid = u64::from_le_bytes(cid);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset,
    )));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
    config
}

/// QUIC client settings that accept only a server whose certificate has one of `pinned`
/// fingerprints.
pub fn client_config(pinned: Vec<[u8; 32]>) -> Result<quinn::ClientConfig, NetError> {
    let tls = |e: rustls::Error| NetError::Tls(e.to_string());
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport());
    Ok(client)
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Keep idle sessions alive through NATs, and notice a dead peer within half a minute.
    t.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(std::time::Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    // One bidirectional stream per session; refuse more.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

/// The channel binding of a QUIC connection: 32 bytes of TLS exporter output that both ends
/// compute alike, passed to the Syncline handshake.
pub fn channel_binding(conn: &quinn::Connection) -> Result<[u8; 32], NetError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| NetError::Tls("the TLS exporter is unavailable".into()))?;
    Ok(out)
}

#[derive(Debug)]
struct PinnedVerifier {
    pinned: Vec<[u8; 32]>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.pinned.contains(&fp) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the hub's certificate fingerprint {} is not the pinned one; check --hub-fingerprint",
                hex::encode(fp)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The pinned certificate's own key must have signed this handshake.
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
