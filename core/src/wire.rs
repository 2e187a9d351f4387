//! The wire format: length-prefixed frames, each holding one [`Message`] encoded with
//! postcard (see `docs/PROTOCOL.md` for the byte layout and golden vectors).
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. A frame longer
//! than [`MAX_FRAME`] is refused before any of it is buffered. Every message is checked
//! against the limits below after decoding ([`Message::check_limits`]).

use serde::{Deserialize, Serialize};

use crate::change::SignedChange;
use crate::error::WireError;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};

/// The protocol version this build speaks (and the only one so far).
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame payload accepted, in bytes.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Largest number of changes in one [`Changes`] or [`Push`] message.
pub const MAX_CHANGES_PER_DELTA: usize = 1024;
/// Largest size of one change, in bytes.
pub const MAX_CHANGE_BYTES: usize = 1024 * 1024;
/// Largest number of heads in one message.
pub const MAX_HEADS: usize = 1024;
/// Largest error message carried in an [`ErrorMessage`], in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Which side of a session a peer plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A replica (edge-node, browser, phone) or a hub acting as one towards another hub.
    Replica,
    /// A hub.
    Hub,
}

/// What a subscription covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    /// One document.
    Doc(DocId),
    /// Every document whose id starts with the prefix.
    Prefix(DocPrefix),
}

impl Target {
    /// Whether `doc` falls under this target.
    pub fn covers(&self, doc: &DocId) -> bool {
        match self {
            Target::Doc(d) => d == doc,
            Target::Prefix(p) => doc.matches(p),
        }
    }

    /// A stable string key for storage (`doc:ID` or `prefix:P`).
    pub fn key(&self) -> String {
        match self {
            Target::Doc(d) => format!("doc:{d}"),
            Target::Prefix(p) => format!("prefix:{p}"),
        }
    }

    /// Inverse of [`Target::key`].
    pub fn from_key(key: &str) -> Option<Target> {
        if let Some(d) = key.strip_prefix("doc:") {
            DocId::new(d).ok().map(Target::Doc)
        } else {
            key.strip_prefix("prefix:")
                .and_then(|p| DocPrefix::new(p).ok())
                .map(Target::Prefix)
        }
    }
}

/// Opens a session. Both sides send one first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u16,
    /// Highest protocol version the sender speaks.
    pub max_version: u16,
    /// The sender's role.
    pub role: Role,
    /// The sender's public key.
    pub peer: PeerId,
    /// A fresh random challenge the other side must sign.
    pub nonce: [u8; 32],
}

/// Proves the sender holds the key it announced: a signature over
/// [`handshake_message`](crate::protocol::handshake_message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The signature.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

/// Replica to hub: send me the changes of `target` after `cursor` (if `epoch` is the hub's),
/// then live changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// What to follow.
    pub target: Target,
    /// The hub log the cursor belongs to ([`Epoch::none`] for a first sync).
    pub epoch: Epoch,
    /// The last position already received.
    pub cursor: Cursor,
}

/// Changes of one document, hub to replica (catch-up and live) or in answer to a
/// [`Reconcile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The document.
    pub doc: DocId,
    /// The authors' signed changes, in an order where dependencies come first when known.
    pub changes: Vec<SignedChange>,
    /// Hub log position reached for the subscription `target`, to store with these changes.
    pub cursor: Option<(Target, Cursor)>,
}

/// Hub to replica: the subscription has received everything up to `cursor` of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaughtUp {
    /// The subscription.
    pub target: Target,
    /// The hub's log epoch.
    pub epoch: Epoch,
    /// Position reached.
    pub cursor: Cursor,
}

/// Replica to hub: store these changes; answered by [`Ack`] once committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    /// Chosen by the sender, echoed in the answer.
    pub push_id: u64,
    /// The document.
    pub doc: DocId,
    /// The changes.
    pub changes: Vec<SignedChange>,
}

/// Hub to replica: the push is durably committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The push.
    pub push_id: u64,
}

/// Codes for refusals and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A change's signature does not verify (forged, altered, replayed, spoofed).
    BadSignature,
    /// A change is not a valid Automerge change or its actor is not bound to a key.
    MalformedChange,
    /// The author may not write this document.
    NotAuthorized,
    /// The peer may not read this document or prefix.
    ReadDenied,
    /// The peer is unknown to the hub.
    UnknownPeer,
    /// No common protocol version.
    VersionMismatch,
    /// The peer broke the protocol or sent unreadable bytes.
    ProtocolViolation,
    /// A limit was exceeded.
    LimitExceeded,
    /// The hub failed to store (disk full, database down); retry later.
    StorageUnavailable,
}

/// Hub to replica: the push was refused; nothing of it was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The push.
    pub push_id: u64,
    /// The document.
    pub doc: DocId,
    /// Why.
    pub code: ErrorCode,
    /// In words.
    pub message: String,
}

/// Hub to replica during a repair: the hub's heads for a document under the subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heads {
    /// The document.
    pub doc: DocId,
    /// The hub's heads for it.
    pub heads: Vec<ChangeHash>,
}

/// Replica to hub: these are my heads for `doc`; send what I lack (the repair path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconcile {
    /// The document.
    pub doc: DocId,
    /// The replica's heads.
    pub heads: Vec<ChangeHash>,
}

/// Either side: a fatal error; the session closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Why.
    pub code: ErrorCode,
    /// In words.
    pub message: String,
}

/// Every message of the protocol. The variant order is the wire tag: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // Messages are built and consumed one at a time.
pub enum Message {
    /// Tag 0. Must stay first and unchanged across versions.
    Hello(Hello),
    /// Tag 1.
    Auth(Auth),
    /// Tag 2.
    Subscribe(Subscribe),
    /// Tag 3.
    Changes(Changes),
    /// Tag 4.
    CaughtUp(CaughtUp),
    /// Tag 5.
    Push(Push),
    /// Tag 6.
    Ack(Ack),
    /// Tag 7.
    Reject(Reject),
    /// Tag 8.
    Heads(Heads),
    /// Tag 9.
    Reconcile(Reconcile),
    /// Tag 10.
    Error(ErrorMessage),
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Auth(_) => "Auth",
            Message::Subscribe(_) => "Subscribe",
            Message::Changes(_) => "Changes",
            Message::CaughtUp(_) => "CaughtUp",
            Message::Push(_) => "Push",
            Message::Ack(_) => "Ack",
            Message::Reject(_) => "Reject",
            Message::Heads(_) => "Heads",
            Message::Reconcile(_) => "Reconcile",
            Message::Error(_) => "Error",
        }
    }

    /// Checks the per-message limits.
    pub fn check_limits(&self) -> Result<(), WireError> {
        let changes = |c: &[SignedChange]| {
            if c.len() > MAX_CHANGES_PER_DELTA {
                return Err(WireError::OverLimit(format!(
                    "{} changes in one message, over the limit of {MAX_CHANGES_PER_DELTA}",
                    c.len()
                )));
            }
            if let Some(big) = c.iter().find(|c| c.bytes.len() > MAX_CHANGE_BYTES) {
                return Err(WireError::OverLimit(format!(
                    "a change of {} bytes, over the limit of {MAX_CHANGE_BYTES}",
                    big.bytes.len()
                )));
            }
            Ok(())
        };
        let heads = |h: &[ChangeHash]| {
            if h.len() > MAX_HEADS {
                return Err(WireError::OverLimit(format!(
                    "{} heads, over the limit of {MAX_HEADS}",
                    h.len()
                )));
            }
            Ok(())
        };
        let text = |t: &str| {
            if t.len() > MAX_ERROR_TEXT {
                return Err(WireError::OverLimit(format!(
                    "error text of {} bytes",
                    t.len()
                )));
            }
            Ok(())
        };
        match self {
            Message::Changes(m) => changes(&m.changes),
            Message::Push(m) => changes(&m.changes),
            Message::Heads(m) => heads(&m.heads),
            Message::Reconcile(m) => heads(&m.heads),
            Message::Reject(m) => text(&m.message),
            Message::Error(m) => text(&m.message),
            _ => Ok(()),
        }
    }

    /// Encodes the message as one frame (length prefix included).
    pub fn to_frame(&self) -> Vec<u8> {
        // Every field has a known length, so serializing into a Vec cannot fail.
        let mut out =
            postcard::to_extend(self, vec![0u8; 4]).expect("Message serializes into a Vec");
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Decodes one frame payload (without the length prefix).
    pub fn from_payload(payload: &[u8]) -> Result<Message, WireError> {
        if payload.len() > MAX_FRAME {
            return Err(WireError::FrameTooLarge {
                len: payload.len(),
                max: MAX_FRAME,
            });
        }
        let (msg, rest): (Message, &[u8]) =
            postcard::take_from_bytes(payload).map_err(|e| match e {
                postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated(e.to_string()),
                _ => WireError::Garbage(e.to_string()),
            })?;
        if !rest.is_empty() {
            return Err(WireError::Garbage(format!(
                "{} bytes after the message",
                rest.len()
            )));
        }
        msg.check_limits()?;
        Ok(msg)
    }
}

/// Splits a byte stream into frames. Feed it what the transport reads; take messages out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is unusable: close the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.failed {
            return Err(WireError::Garbage("the stream failed earlier".into()));
        }
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            self.failed = true;
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = Message::from_payload(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        if result.is_err() {
            self.failed = true;
        }
        result.map(Some)
    }

    /// Called when the transport closed: an incomplete frame is an error.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated(format!(
                "stream closed inside a frame ({} bytes buffered)",
                self.buf.len()
            )))
        }
    }
}
