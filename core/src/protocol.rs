//! The handshake both sides run: exchange [`Hello`]s, agree on a version, and prove each
//! holds the key it announced by signing the other's fresh nonce.

use crate::error::ProtocolError;
use crate::identity::Identity;
use crate::ids::{Epoch, PeerId};
use crate::wire::{Auth, Hello, Message, PROTOCOL_VERSION, Role};

const HANDSHAKE_DOMAIN: &[u8] = b"syncline/handshake/v1\0";

/// The lowest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// What a peer signs to prove its identity: a domain tag, the agreed version, the signer's
/// key, nonce and announced epoch, the other side's key and nonce, and the channel binding.
///
/// Binding both keys stops a relay from reusing the proof on another session; the other
/// side's fresh nonce stops replays; the signer's epoch cannot be changed in transit; and
/// the channel binding (a TLS exporter value both ends of one TLS connection compute the
/// same, or zeros where the transport gives none) stops a relay that terminates TLS on both
/// sides from splicing two sessions together.
#[allow(clippy::too_many_arguments)] // Each field of the transcript is named at the call.
pub fn handshake_message(
    version: u16,
    signer: &PeerId,
    signer_nonce: &[u8; 32],
    signer_epoch: &Epoch,
    other: &PeerId,
    other_nonce: &[u8; 32],
    binding: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(HANDSHAKE_DOMAIN.len() + 2 + 32 * 5 + 16);
    m.extend_from_slice(HANDSHAKE_DOMAIN);
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(signer.as_bytes());
    m.extend_from_slice(signer_nonce);
    m.extend_from_slice(&signer_epoch.0);
    m.extend_from_slice(other.as_bytes());
    m.extend_from_slice(other_nonce);
    m.extend_from_slice(binding);
    m
}

/// One side of a handshake.
#[derive(Debug)]
pub(crate) struct Handshake {
    identity: Identity,
    expected_role: Role,
    expected_peer: Option<PeerId>,
    nonce: [u8; 32],
    epoch: Epoch,
    binding: [u8; 32],
    their: Option<(Hello, u16)>,
    peer: Option<PeerId>,
    max_version: u16,
}

impl Handshake {
    /// Starts a handshake offering versions up to `max_version`; the returned Hello goes out
    /// first.
    #[allow(clippy::too_many_arguments)] // Each part of the Hello is named at the call.
    pub(crate) fn start(
        max_version: u16,
        identity: Identity,
        role: Role,
        expected_role: Role,
        expected_peer: Option<PeerId>,
        nonce: [u8; 32],
        epoch: Epoch,
        binding: [u8; 32],
    ) -> (Self, Message) {
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: max_version.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            role,
            peer: identity.peer_id(),
            nonce,
            epoch,
        };
        (
            Handshake {
                identity,
                expected_role,
                expected_peer,
                nonce,
                epoch,
                binding,
                their: None,
                peer: None,
                max_version: max_version.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            },
            Message::Hello(hello),
        )
    }

    /// The version agreed on, once the peer's Hello is in.
    pub(crate) fn version(&self) -> Option<u16> {
        self.their.as_ref().map(|(_, v)| *v)
    }

    /// Whether the session speaks version `v` or later (version 1 before the peer's Hello).
    pub(crate) fn speaks(&self, v: u16) -> bool {
        self.version().unwrap_or(1) >= v
    }

    /// Refuses a message of version `version` in a session of an older one.
    pub(crate) fn require(&self, version: u16, message: &'static str) -> Result<(), ProtocolError> {
        if self.speaks(version) {
            return Ok(());
        }
        Err(ProtocolError::Unexpected {
            message,
            state: match version {
                3 => "in a session before version 3",
                _ => "in a session before version 4",
            },
        })
    }

    /// The epoch the peer announced in its Hello.
    pub(crate) fn their_epoch(&self) -> Option<crate::ids::Epoch> {
        self.their.as_ref().map(|(h, _)| h.epoch)
    }

    /// Handles the peer's Hello; returns our Auth.
    pub(crate) fn on_hello(&mut self, hello: Hello) -> Result<Message, ProtocolError> {
        if self.their.is_some() {
            return Err(ProtocolError::Unexpected {
                message: "Hello",
                state: "after the handshake started",
            });
        }
        let version = self.max_version.min(hello.max_version);
        if version < MIN_PROTOCOL_VERSION.max(hello.min_version) {
            return Err(ProtocolError::VersionMismatch {
                ours_min: MIN_PROTOCOL_VERSION,
                ours_max: self.max_version,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            });
        }
        if hello.role != self.expected_role {
            return Err(ProtocolError::Unexpected {
                message: "Hello",
                state: "from a peer in the wrong role",
            });
        }
        if let Some(expected) = self.expected_peer
            && expected != hello.peer
        {
            return Err(ProtocolError::WrongPeer {
                expected: expected.to_string(),
                actual: hello.peer.to_string(),
            });
        }
        if hello.peer == self.identity.peer_id() {
            return Err(ProtocolError::Unexpected {
                message: "Hello",
                state: "from our own key",
            });
        }
        let signature = self.identity.sign(&handshake_message(
            version,
            &self.identity.peer_id(),
            &self.nonce,
            &self.epoch,
            &hello.peer,
            &hello.nonce,
            &self.binding,
        ));
        self.their = Some((hello, version));
        Ok(Message::Auth(Auth { signature }))
    }

    /// Handles the peer's Auth; returns the peer's proven identity.
    pub(crate) fn on_auth(&mut self, auth: Auth) -> Result<PeerId, ProtocolError> {
        let Some((hello, version)) = &self.their else {
            return Err(ProtocolError::Unexpected {
                message: "Auth",
                state: "before Hello",
            });
        };
        if self.peer.is_some() {
            return Err(ProtocolError::Unexpected {
                message: "Auth",
                state: "after the handshake",
            });
        }
        let key = hello
            .peer
            .verifying_key()
            .ok_or(ProtocolError::BadHandshake)?;
        let message = handshake_message(
            *version,
            &hello.peer,
            &hello.nonce,
            &hello.epoch,
            &self.identity.peer_id(),
            &self.nonce,
            &self.binding,
        );
        key.verify_strict(
            &message,
            &ed25519_dalek::Signature::from_bytes(&auth.signature),
        )
        .map_err(|_| ProtocolError::BadHandshake)?;
        self.peer = Some(hello.peer);
        Ok(hello.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Handshake, Message, Handshake, Message) {
        let (a, ha) = Handshake::start(
            PROTOCOL_VERSION,
            Identity::generate(),
            Role::Replica,
            Role::Hub,
            None,
            [1; 32],
            Epoch::none(),
            [0; 32],
        );
        let (b, hb) = Handshake::start(
            PROTOCOL_VERSION,
            Identity::generate(),
            Role::Hub,
            Role::Replica,
            None,
            [2; 32],
            Epoch::none(),
            [0; 32],
        );
        (a, ha, b, hb)
    }

    fn hello(m: Message) -> Hello {
        match m {
            Message::Hello(h) => h,
            other => panic!("{other:?}"),
        }
    }

    fn auth(m: Message) -> Auth {
        match m {
            Message::Auth(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn both_sides_prove_their_keys() {
        let (mut a, ha, mut b, hb) = pair();
        let aa = auth(a.on_hello(hello(hb.clone())).unwrap());
        let ab = auth(b.on_hello(hello(ha.clone())).unwrap());
        assert_eq!(a.on_auth(ab).unwrap(), hello(hb).peer);
        assert_eq!(b.on_auth(aa).unwrap(), hello(ha).peer);
    }

    #[test]
    fn a_replayed_or_forged_proof_is_refused() {
        let (mut a, ha, mut b, hb) = pair();
        a.on_hello(hello(hb.clone())).unwrap();
        let ab = auth(b.on_hello(hello(ha.clone())).unwrap());
        // A proof made for another nonce (a replay from an old session) fails.
        let (mut a2, _, _, _) = pair();
        a2.on_hello(hello(hb)).unwrap();
        assert_eq!(
            a2.on_auth(ab.clone()).unwrap_err(),
            ProtocolError::BadHandshake
        );
        let mut forged = ab;
        forged.signature[5] ^= 1;
        assert_eq!(a.on_auth(forged).unwrap_err(), ProtocolError::BadHandshake);
    }

    #[test]
    fn a_spliced_session_or_a_changed_epoch_fails() {
        let id_a = Identity::generate();
        let id_b = Identity::generate();
        let start = |id: &Identity, role, other, nonce, binding| {
            Handshake::start(
                PROTOCOL_VERSION,
                id.clone(),
                role,
                other,
                None,
                nonce,
                Epoch([7; 16]),
                binding,
            )
        };
        // Different channel bindings: each side sits on another TLS connection.
        let (mut a, ha) = start(&id_a, Role::Replica, Role::Hub, [1; 32], [1; 32]);
        let (mut b, hb) = start(&id_b, Role::Hub, Role::Replica, [2; 32], [2; 32]);
        let aa = auth(a.on_hello(hello(hb)).unwrap());
        let ab = auth(b.on_hello(hello(ha)).unwrap());
        assert_eq!(a.on_auth(ab).unwrap_err(), ProtocolError::BadHandshake);
        assert_eq!(b.on_auth(aa).unwrap_err(), ProtocolError::BadHandshake);
        // The hub's announced epoch changed in transit.
        let (mut a, ha) = start(&id_a, Role::Replica, Role::Hub, [1; 32], [0; 32]);
        let (mut b, hb) = start(&id_b, Role::Hub, Role::Replica, [2; 32], [0; 32]);
        let mut tampered = hello(hb);
        tampered.epoch = Epoch([8; 16]);
        a.on_hello(tampered).unwrap();
        let ab = auth(b.on_hello(hello(ha)).unwrap());
        assert_eq!(a.on_auth(ab).unwrap_err(), ProtocolError::BadHandshake);
    }

    #[test]
    fn versions_roles_and_pinned_keys_are_checked() {
        let (mut a, _, _, hb) = pair();
        let mut h = hello(hb.clone());
        h.min_version = 7;
        h.max_version = 9;
        assert!(matches!(
            a.on_hello(h).unwrap_err(),
            ProtocolError::VersionMismatch { theirs_min: 7, .. }
        ));
        let (mut a, ha, _, _) = pair();
        assert!(matches!(
            a.on_hello(hello(ha)).unwrap_err(),
            ProtocolError::Unexpected { .. }
        ));
        let (mut pinned, _) = Handshake::start(
            PROTOCOL_VERSION,
            Identity::generate(),
            Role::Replica,
            Role::Hub,
            Some(PeerId([9; 32])),
            [0; 32],
            Epoch::none(),
            [0; 32],
        );
        assert!(matches!(
            pinned.on_hello(hello(hb)).unwrap_err(),
            ProtocolError::WrongPeer { .. }
        ));
        let (mut a, _, _, _) = pair();
        assert!(matches!(
            a.on_auth(Auth { signature: [0; 64] }).unwrap_err(),
            ProtocolError::Unexpected { .. }
        ));
    }
}
