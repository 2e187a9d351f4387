//! The wire format: length-prefixed frames, each holding one [`Message`] encoded with
//! postcard (see `docs/PROTOCOL.md` for the byte layout and golden vectors).
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. A frame longer
//! than [`MAX_FRAME`] is refused as soon as its length prefix is read, without waiting for
//! the rest. Every message is checked
//! against the limits below after decoding ([`Message::check_limits`]).

use serde::{Deserialize, Serialize};

use crate::change::SignedChange;
use crate::error::WireError;
use crate::ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};

/// The newest protocol version this build speaks: 2 added snapshots, 3 the log marks that
/// let a hub notice its log was rolled back and has grown again ([`Resume`]), 4 the hub's
/// marks with the changes that move a cursor ([`ChangesAt`]).
pub const PROTOCOL_VERSION: u16 = 4;
/// Largest frame payload accepted, in bytes.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Largest number of changes in one [`Changes`] or [`Push`] message.
pub const MAX_CHANGES_PER_DELTA: usize = 1024;
/// Largest size of one change, in bytes.
pub const MAX_CHANGE_BYTES: usize = 1024 * 1024;
/// Largest number of heads in one message.
pub const MAX_HEADS: usize = 1024;
/// Largest number of signed heads (actors) in one snapshot.
pub const MAX_SNAPSHOT_HEADS: usize = 4096;
/// Largest snapshot a hub sends, in bytes of saved document: the frame must hold it.
pub const MAX_SNAPSHOT_BYTES: usize = 6 * 1024 * 1024;
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
    /// A hub's log epoch ([`Epoch::none`] from a replica): a replica that exchanged changes
    /// with another epoch knows the hub lost or replaced its log and repairs by heads.
    pub epoch: Epoch,
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

/// Hub to replica (version 4, in place of a [`Changes`] that moves a cursor): the same, and
/// the hub's mark of the log at the position reached (the chain of the log up to it), which
/// the replica keeps with its cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesAt {
    /// The changes and the position reached (always with a cursor from a hub of this build;
    /// a replica ignores the mark of one without).
    pub changes: Changes,
    /// The log's mark at the position reached.
    pub mark: Mark,
}

/// Hub to replica (version 2): the whole document `doc` in one piece, in place of its changes
/// up to some position of the log, for a replica far behind ([`crate::snapshot`]). It moves
/// no cursor: the `Changes` and `CaughtUp` after it do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMessage {
    /// The document.
    pub doc: DocId,
    /// The saved document and the signed newest change of each of its actors.
    pub snapshot: crate::snapshot::Snapshot,
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

/// What a replica keeps beside a cursor to tell the hub's log up to that position from
/// another (version 3). Hubs of this build mark a position with the chain of the log up to
/// it ([`crate::store::chain`]): a hash over the signatures of every change before it and of
/// its own. A replica takes a mark from the hub's [`ChangesAt`], [`CaughtUpAt`] and
/// [`AckAt`]; from a version-3 [`Changes`] it keeps the signature of its last change, the
/// mark of version 3, which hubs still take.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl std::fmt::Debug for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mark({})", hex::encode(&self.0[..8]))
    }
}

/// Hub to replica (version 3, in place of [`CaughtUp`]): the same, with the mark of the
/// change at `cursor` (`None` when no change is there: an empty log, or retention dropped it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaughtUpAt {
    /// The subscription.
    pub target: Target,
    /// The hub's log epoch.
    pub epoch: Epoch,
    /// Position reached.
    pub cursor: Cursor,
    /// The log's mark at `cursor`.
    pub mark: Option<Mark>,
    /// The hub compared heads for this subscription in this session, its log having been
    /// rolled back under the replica's cursor: the replica uploads every document under
    /// `target` that no `Heads` named, as for a log of another epoch.
    pub rolled_back: bool,
}

/// A position of the hub's log and the log's mark there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The position.
    pub cursor: Cursor,
    /// The log's mark at it.
    pub mark: Mark,
}

/// Replica to hub (version 3, in place of [`Subscribe`] when the replica holds a mark of
/// the log `epoch`): the same, and the changes at these positions were the ones marked.
/// A hub that holds another change at either (or whose log ends before `written`) was rolled
/// back: it repairs the subscription by heads instead of reading on from `cursor`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// What to follow.
    pub target: Target,
    /// The hub log the cursor belongs to.
    pub epoch: Epoch,
    /// The last position already received.
    pub cursor: Cursor,
    /// The signature of the change the replica received at `cursor`, if it knows it.
    pub mark: Option<Mark>,
    /// The highest position of the replica's own changes that the hub acknowledged (an
    /// [`AckAt`]) in `epoch`: a writer is not sent its own changes, so its cursor says
    /// nothing of them.
    pub written: Option<Position>,
}

/// Hub to replica (version 3, in place of [`Ack`]): the same, with the highest position of
/// the push's changes in the log and the mark there, whether this commit stored them or they
/// were stored before (`None` from older hubs when all were stored before).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckAt {
    /// The push.
    pub push_id: u64,
    /// Where its highest change is.
    pub at: Option<Position>,
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
    /// The document is a rolling bucket past the hub's retention: the write is not kept.
    Expired,
}

/// Hub to replica: the push was refused. Nothing of it was stored, but with
/// [`ErrorCode::MalformedChange`] for a change that reuses another's actor and sequence
/// number, where the push's other changes may have been.
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
    /// The heads of the part of the document whose whole history the hub holds.
    pub heads: Vec<ChangeHash>,
    /// Whether the hub holds every change it knows of with its whole history. `false` (it
    /// holds changes whose dependencies it lacks, or too many heads to list) asks the replica
    /// to reconcile even if its heads equal `heads`.
    pub complete: bool,
}

/// Replica to hub: these are my heads for `doc`; send what I lack (the repair path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconcile {
    /// The document.
    pub doc: DocId,
    /// The replica's heads.
    pub heads: Vec<ChangeHash>,
}

/// Hub to replica: every change answering the replica's [`Reconcile`] for `doc` has been sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciled {
    /// The document.
    pub doc: DocId,
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
    /// Tag 11.
    Reconciled(Reconciled),
    /// Tag 12 (version 2).
    Snapshot(SnapshotMessage),
    /// Tag 13 (version 3). Boxed, as `Resume`: their marks would double every message's size.
    CaughtUpAt(Box<CaughtUpAt>),
    /// Tag 14 (version 3).
    Resume(Box<Resume>),
    /// Tag 15 (version 3).
    AckAt(AckAt),
    /// Tag 16 (version 4). Boxed: its mark would make every message larger.
    ChangesAt(Box<ChangesAt>),
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
            Message::Reconciled(_) => "Reconciled",
            Message::Snapshot(_) => "Snapshot",
            Message::CaughtUpAt(_) => "CaughtUpAt",
            Message::Resume(_) => "Resume",
            Message::AckAt(_) => "AckAt",
            Message::ChangesAt(_) => "ChangesAt",
        }
    }

    /// The changes a `Changes` or `ChangesAt` carries.
    pub fn as_changes(&self) -> Option<&Changes> {
        match self {
            Message::Changes(c) => Some(c),
            Message::ChangesAt(c) => Some(&c.changes),
            _ => None,
        }
    }

    /// [`Message::as_changes`], to change them.
    pub fn as_changes_mut(&mut self) -> Option<&mut Changes> {
        match self {
            Message::Changes(c) => Some(c),
            Message::ChangesAt(c) => Some(&mut c.changes),
            _ => None,
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
            Message::ChangesAt(m) => changes(&m.changes.changes),
            Message::Push(m) => changes(&m.changes),
            Message::Heads(m) => heads(&m.heads),
            Message::Reconcile(m) => heads(&m.heads),
            Message::Reject(m) => text(&m.message),
            Message::Error(m) => text(&m.message),
            Message::Snapshot(m) if m.snapshot.signed.len() > MAX_SNAPSHOT_HEADS => {
                Err(WireError::OverLimit(format!(
                    "{} signed heads in a snapshot, over the limit of {MAX_SNAPSHOT_HEADS}",
                    m.snapshot.signed.len()
                )))
            }
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

    /// Decodes exactly one whole frame, length prefix included: the unit of message-based
    /// transports (one WebSocket binary message per frame). A length that disagrees with the
    /// bytes given is `Truncated` (too few) or `Garbage` (too many).
    pub fn from_frame(frame: &[u8]) -> Result<Message, WireError> {
        let Some((prefix, payload)) = frame.split_first_chunk::<4>() else {
            return Err(WireError::Truncated(format!(
                "{} bytes, shorter than the length prefix",
                frame.len()
            )));
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME {
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        match payload.len().cmp(&len) {
            std::cmp::Ordering::Less => Err(WireError::Truncated(format!(
                "the frame says {len} bytes, {} came",
                payload.len()
            ))),
            std::cmp::Ordering::Greater => Err(WireError::Garbage(format!(
                "{} bytes after the frame",
                payload.len() - len
            ))),
            std::cmp::Ordering::Equal => Message::from_payload(payload),
        }
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
    /// Bytes of `buf` already returned as frames; dropped once per `extend`, so many small
    /// frames in one read cost linear time, not quadratic.
    start: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the transport (ignored once the stream has failed).
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is unusable: close the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.failed {
            return Err(WireError::Garbage("the stream failed earlier".into()));
        }
        let rest = &self.buf[self.start..];
        if rest.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_FRAME {
            self.failed = true;
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        if rest.len() < 4 + len {
            return Ok(None);
        }
        let result = Message::from_payload(&rest[4..4 + len]);
        self.start += 4 + len;
        if result.is_err() {
            self.failed = true;
        }
        result.map(Some)
    }

    /// Called when the transport closed: an incomplete frame is an error.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buffered() == 0 {
            Ok(())
        } else {
            Err(WireError::Truncated(format!(
                "stream closed inside a frame ({} bytes buffered)",
                self.buffered()
            )))
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary (a peer's text can hold
/// multi-byte characters anywhere).
pub fn truncate_text(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    //! Round trips, hostile input and golden vectors.
    //!
    //! The golden vectors live in `core/tests/vectors/*.hex` (one frame per file, hex, 32 bytes
    //! a line). After an intended change of the wire format, regenerate them with
    //! `SYNCLINE_BLESS=1 cargo test -p syncline-core --lib wire::tests::golden`, review the
    //! diff, and say in `docs/PROTOCOL.md` and the changelog what changed.

    use std::path::PathBuf;

    use automerge::transaction::{CommitOptions, Transactable};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    use super::*;
    use crate::change;
    use crate::identity::Identity;
    use crate::protocol::handshake_message;

    const ALL_CODES: [ErrorCode; 10] = [
        ErrorCode::BadSignature,
        ErrorCode::MalformedChange,
        ErrorCode::NotAuthorized,
        ErrorCode::ReadDenied,
        ErrorCode::UnknownPeer,
        ErrorCode::VersionMismatch,
        ErrorCode::ProtocolViolation,
        ErrorCode::LimitExceeded,
        ErrorCode::StorageUnavailable,
        ErrorCode::Expired,
    ];

    // ---- generators ----

    fn doc_id() -> impl Strategy<Value = DocId> {
        "[a-z]{1,8}(/[a-z0-9]{1,8}){0,3}"
            .prop_map(|s| DocId::new(s).expect("the pattern only makes valid ids"))
    }

    fn prefix() -> impl Strategy<Value = DocPrefix> {
        prop_oneof![
            Just(DocPrefix::all()),
            "[a-z]{1,8}(/[a-z0-9]{1,8}){0,2}/?"
                .prop_map(|s| DocPrefix::new(s).expect("the pattern only makes valid prefixes")),
        ]
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            doc_id().prop_map(Target::Doc),
            prefix().prop_map(Target::Prefix)
        ]
    }

    fn epoch() -> impl Strategy<Value = Epoch> {
        any::<[u8; 16]>().prop_map(Epoch)
    }

    fn cursor() -> impl Strategy<Value = Cursor> {
        any::<u64>().prop_map(Cursor)
    }

    fn signature() -> impl Strategy<Value = [u8; 64]> {
        prop::array::uniform::<_, 64>(any::<u8>())
    }

    fn signed_change() -> impl Strategy<Value = SignedChange> {
        (vec(any::<u8>(), 0..300), signature())
            .prop_map(|(bytes, signature)| SignedChange { bytes, signature })
    }

    fn heads() -> impl Strategy<Value = Vec<ChangeHash>> {
        vec(any::<[u8; 32]>().prop_map(ChangeHash), 0..6)
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        prop::sample::select(ALL_CODES.to_vec())
    }

    fn text() -> impl Strategy<Value = String> {
        // Any characters, multi-byte ones included; at most 4 * 64 bytes, under the limit.
        ".{0,64}"
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Replica), Just(Role::Hub)]
    }

    /// Every variant, every field arbitrary (within the types' own validity).
    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u16>(),
                any::<u16>(),
                role(),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                epoch()
            )
                .prop_map(|(min_version, max_version, role, peer, nonce, epoch)| {
                    Message::Hello(Hello {
                        min_version,
                        max_version,
                        role,
                        peer: PeerId::from_bytes(peer),
                        nonce,
                        epoch,
                    })
                }),
            signature().prop_map(|signature| Message::Auth(Auth { signature })),
            (target(), epoch(), cursor()).prop_map(|(target, epoch, cursor)| {
                Message::Subscribe(Subscribe {
                    target,
                    epoch,
                    cursor,
                })
            }),
            (
                doc_id(),
                vec(signed_change(), 0..4),
                prop::option::of((target(), cursor()))
            )
                .prop_map(|(doc, changes, cursor)| Message::Changes(Changes {
                    doc,
                    changes,
                    cursor
                })),
            (target(), epoch(), cursor()).prop_map(|(target, epoch, cursor)| {
                Message::CaughtUp(CaughtUp {
                    target,
                    epoch,
                    cursor,
                })
            }),
            (any::<u64>(), doc_id(), vec(signed_change(), 0..4)).prop_map(
                |(push_id, doc, changes)| Message::Push(Push {
                    push_id,
                    doc,
                    changes
                })
            ),
            any::<u64>().prop_map(|push_id| Message::Ack(Ack { push_id })),
            (any::<u64>(), doc_id(), code(), text()).prop_map(|(push_id, doc, code, message)| {
                Message::Reject(Reject {
                    push_id,
                    doc,
                    code,
                    message,
                })
            }),
            (doc_id(), heads(), any::<bool>()).prop_map(|(doc, heads, complete)| {
                Message::Heads(Heads {
                    doc,
                    heads,
                    complete,
                })
            }),
            (doc_id(), heads())
                .prop_map(|(doc, heads)| Message::Reconcile(Reconcile { doc, heads })),
            (code(), text())
                .prop_map(|(code, message)| Message::Error(ErrorMessage { code, message })),
            doc_id().prop_map(|doc| Message::Reconciled(Reconciled { doc })),
            (
                doc_id(),
                vec(any::<u8>(), 0..64),
                vec((any::<[u8; 32]>(), signature()), 0..3)
            )
                .prop_map(|(doc, data, heads)| Message::Snapshot(SnapshotMessage {
                    doc,
                    snapshot: crate::snapshot::Snapshot {
                        data,
                        signed: heads
                            .into_iter()
                            .map(|(h, signature)| crate::snapshot::SignedHead {
                                hash: ChangeHash(h),
                                signature,
                            })
                            .collect(),
                    },
                })),
            (
                target(),
                epoch(),
                cursor(),
                prop::option::of(signature()),
                any::<bool>()
            )
                .prop_map(|(target, epoch, cursor, mark, rolled_back)| {
                    Message::CaughtUpAt(Box::new(CaughtUpAt {
                        target,
                        epoch,
                        cursor,
                        mark: mark.map(Mark),
                        rolled_back,
                    }))
                }),
            (
                target(),
                epoch(),
                cursor(),
                prop::option::of(signature()),
                prop::option::of((cursor(), signature()))
            )
                .prop_map(|(target, epoch, cursor, mark, written)| {
                    Message::Resume(Box::new(Resume {
                        target,
                        epoch,
                        cursor,
                        mark: mark.map(Mark),
                        written: written.map(|(cursor, m)| Position {
                            cursor,
                            mark: Mark(m),
                        }),
                    }))
                }),
            (any::<u64>(), prop::option::of((cursor(), signature()))).prop_map(|(push_id, at)| {
                Message::AckAt(AckAt {
                    push_id,
                    at: at.map(|(cursor, m)| Position {
                        cursor,
                        mark: Mark(m),
                    }),
                })
            }),
            (
                doc_id(),
                vec(signed_change(), 0..4),
                target(),
                cursor(),
                signature()
            )
                .prop_map(|(doc, changes, target, cursor, m)| {
                    Message::ChangesAt(Box::new(ChangesAt {
                        changes: Changes {
                            doc,
                            changes,
                            cursor: Some((target, cursor)),
                        },
                        mark: Mark(m),
                    }))
                }),
        ]
    }

    /// A stream made of valid frames, frames holding random payloads, and raw random bytes.
    fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            message().prop_map(|m| m.to_frame()),
            vec(any::<u8>(), 0..64).prop_map(|p| framed(&p)),
            vec(any::<u8>(), 0..16),
        ];
        vec(piece, 1..8).prop_map(|pieces| pieces.concat())
    }

    // ---- helpers ----

    /// A frame around any payload.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn payload(msg: &Message) -> Vec<u8> {
        msg.to_frame()[4..].to_vec()
    }

    /// Feeds `stream` to a decoder in pieces of the sizes in `cuts` (cycled), taking out every
    /// message as soon as it is whole.
    fn decode_in_chunks(stream: &[u8], cuts: &[usize]) -> Result<Vec<Message>, WireError> {
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for &cut in cuts.iter().cycle() {
            if pos >= stream.len() {
                break;
            }
            let end = (pos + cut.max(1)).min(stream.len());
            decoder.extend(&stream[pos..end]);
            pos = end;
            while let Some(m) = decoder.next_message()? {
                out.push(m);
            }
        }
        decoder.finish()?;
        Ok(out)
    }

    /// Postcard's unsigned varint: 7 bits a byte, low bits first, high bit set on all but the
    /// last byte.
    fn varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// A postcard string: varint length, then the bytes (not checked here, on purpose).
    fn str_bytes(s: &[u8]) -> Vec<u8> {
        let mut out = varint(s.len() as u64);
        out.extend_from_slice(s);
        out
    }

    fn decode(payload: &[u8]) -> Result<Message, WireError> {
        Message::from_payload(payload)
    }

    fn assert_garbage(payload: &[u8], what: &str) {
        match decode(payload) {
            Err(WireError::Garbage(_)) => {}
            other => panic!("{what}: expected Garbage, got {other:?}"),
        }
    }

    fn assert_over_limit(msg: &Message, what: &str) {
        match decode(&payload(msg)) {
            Err(WireError::OverLimit(_)) => {}
            other => panic!("{what}: expected OverLimit, got {other:?}"),
        }
        // The stream decoder refuses it the same way.
        let mut decoder = FrameDecoder::new();
        decoder.extend(&msg.to_frame());
        assert!(
            matches!(decoder.next_message(), Err(WireError::OverLimit(_))),
            "{what}: the frame decoder let it through"
        );
    }

    fn empty_change() -> SignedChange {
        SignedChange {
            bytes: Vec::new(),
            signature: [0; 64],
        }
    }

    fn doc(s: &str) -> DocId {
        DocId::new(s).expect("a valid test id")
    }

    // ---- properties ----

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_message_round_trips(msg in message()) {
            let frame = msg.to_frame();
            let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
            prop_assert_eq!(len, frame.len() - 4);
            prop_assert_eq!(Message::from_payload(&frame[4..]), Ok(msg));
        }

        #[test]
        fn the_decoder_reassembles_frames_cut_anywhere(
            msgs in vec(message(), 1..6),
            cuts in vec(1usize..96, 1..16),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(Message::to_frame).collect();
            prop_assert_eq!(decode_in_chunks(&stream, &cuts), Ok(msgs));
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in vec(any::<u8>(), 0..512)) {
            // Whatever decodes must be a well-formed message that survives a round trip.
            if let Ok(msg) = Message::from_payload(&bytes) {
                prop_assert_eq!(Message::from_payload(&payload(&msg)), Ok(msg));
            }
        }

        #[test]
        fn altered_frames_never_panic(
            msg in message(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = payload(&msg);
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok(msg) = Message::from_payload(&bytes) {
                prop_assert_eq!(Message::from_payload(&payload(&msg)), Ok(msg));
            }
        }

        #[test]
        fn arbitrary_streams_never_panic(
            stream in hostile_stream(),
            cuts in vec(1usize..64, 1..8),
        ) {
            let mut decoder = FrameDecoder::new();
            let mut failed = false;
            let mut pos = 0;
            for &cut in cuts.iter().cycle() {
                if pos >= stream.len() {
                    break;
                }
                let end = (pos + cut).min(stream.len());
                decoder.extend(&stream[pos..end]);
                pos = end;
                loop {
                    match decoder.next_message() {
                        Ok(Some(_)) => prop_assert!(!failed, "a message after an error"),
                        Ok(None) => {
                            prop_assert!(!failed, "the decoder recovered after an error");
                            break;
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
            let _ = decoder.finish();
        }
    }

    // ---- truncation ----

    #[test]
    fn a_frame_comes_out_only_when_complete() {
        for (name, msg) in golden_messages() {
            let frame = msg.to_frame();
            let mut decoder = FrameDecoder::new();
            assert_eq!(decoder.finish(), Ok(()), "{name}: nothing buffered yet");
            for (i, byte) in frame.iter().enumerate() {
                decoder.extend(&[*byte]);
                if i + 1 < frame.len() {
                    assert_eq!(decoder.next_message(), Ok(None), "{name}: byte {i}");
                    assert!(
                        matches!(decoder.finish(), Err(WireError::Truncated(_))),
                        "{name}: the stream closed after {} of {} bytes",
                        i + 1,
                        frame.len()
                    );
                }
            }
            assert_eq!(decoder.next_message(), Ok(Some(msg)), "{name}");
            assert_eq!(decoder.next_message(), Ok(None), "{name}");
            assert_eq!(decoder.buffered(), 0, "{name}");
            assert_eq!(decoder.finish(), Ok(()), "{name}");
        }
    }

    #[test]
    fn a_payload_cut_short_is_truncated() {
        for (name, msg) in golden_messages() {
            let bytes = payload(&msg);
            for cut in 0..bytes.len() {
                assert!(
                    matches!(decode(&bytes[..cut]), Err(WireError::Truncated(_))),
                    "{name} cut to {cut} bytes of {}: {:?}",
                    bytes.len(),
                    decode(&bytes[..cut])
                );
            }
            // A length prefix shorter than the message: the frame ends inside it.
            let mut decoder = FrameDecoder::new();
            decoder.extend(&framed(&bytes[..bytes.len() - 1]));
            assert!(
                matches!(decoder.next_message(), Err(WireError::Truncated(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn a_whole_frame_decodes_and_anything_else_is_refused() {
        for (name, msg) in golden_messages() {
            let frame = msg.to_frame();
            assert_eq!(Message::from_frame(&frame), Ok(msg), "{name}");
            for cut in 0..frame.len() {
                assert!(
                    matches!(
                        Message::from_frame(&frame[..cut]),
                        Err(WireError::Truncated(_))
                    ),
                    "{name} cut to {cut} bytes"
                );
            }
            let mut two = frame.clone();
            two.extend_from_slice(&frame);
            assert!(
                matches!(Message::from_frame(&two), Err(WireError::Garbage(_))),
                "{name}: two frames in one message"
            );
        }
        let mut huge = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        huge.push(0);
        assert!(matches!(
            Message::from_frame(&huge),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn an_empty_frame_is_truncated() {
        let mut decoder = FrameDecoder::new();
        decoder.extend(&[0, 0, 0, 0]);
        assert!(matches!(
            decoder.next_message(),
            Err(WireError::Truncated(_))
        ));
    }

    // ---- frame size ----

    #[test]
    fn an_oversized_frame_is_refused_from_its_length_alone() {
        for len in [MAX_FRAME as u32 + 1, u32::MAX] {
            let mut decoder = FrameDecoder::new();
            decoder.extend(&len.to_be_bytes());
            assert_eq!(decoder.buffered(), 4);
            assert_eq!(
                decoder.next_message(),
                Err(WireError::FrameTooLarge {
                    len: len as usize,
                    max: MAX_FRAME
                })
            );
            // The stream is unusable afterwards, whatever follows.
            decoder.extend(&Message::Ack(Ack { push_id: 1 }).to_frame());
            assert!(decoder.next_message().is_err());
        }
        // A frame of exactly MAX_FRAME bytes is waited for.
        let mut decoder = FrameDecoder::new();
        decoder.extend(&(MAX_FRAME as u32).to_be_bytes());
        assert_eq!(decoder.next_message(), Ok(None));
        // And a payload handed over whole is checked too.
        assert!(matches!(
            decode(&vec![0u8; MAX_FRAME + 1]),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    // ---- undecodable bytes ----

    #[test]
    fn an_unknown_tag_is_refused() {
        let first_unknown = variant_names().len() as u64;
        for tag in [
            first_unknown,
            first_unknown + 1,
            127,
            128,
            300,
            u32::MAX as u64,
        ] {
            let mut bytes = varint(tag);
            // Enough bytes after it for any variant, so the tag alone decides.
            bytes.extend_from_slice(&[0; 128]);
            assert_garbage(&bytes, &format!("tag {tag}"));
        }
    }

    #[test]
    fn garbage_is_refused() {
        let hello_prefix = [0u8, 1, 1]; // Hello, min_version 1, max_version 1
        let mut bad_role = hello_prefix.to_vec();
        bad_role.push(2); // Role has two variants
        bad_role.extend_from_slice(&[0; 32 + 32 + 16]);

        let mut bad_option = vec![3u8]; // Changes
        bad_option.extend(str_bytes(b"d"));
        bad_option.push(0); // no changes
        bad_option.push(2); // Option tag must be 0 or 1

        let mut bad_utf8 = vec![10u8, 0]; // Error, BadSignature
        bad_utf8.extend(str_bytes(&[0xff, 0xfe]));

        let mut short_signature = vec![1u8]; // Auth
        short_signature.extend(str_bytes(&[0; 63]));

        let mut long_signature = vec![1u8];
        long_signature.extend(str_bytes(&[0; 65]));

        let mut bad_bool = vec![8u8]; // Heads
        bad_bool.extend(str_bytes(b"d"));
        bad_bool.extend_from_slice(&[0, 2]); // no heads, `complete` neither 0 nor 1

        let mut bad_code = vec![10u8, ALL_CODES.len() as u8]; // one past the last ErrorCode
        bad_code.extend(str_bytes(b""));

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a tag varint longer than a u32", vec![0x80; 6]),
            ("a u64 varint overflowing", {
                let mut b = vec![6u8]; // Ack
                b.extend_from_slice(&[0xff; 10]);
                b
            }),
            ("a u16 varint overflowing", vec![0, 0xff, 0xff, 0x04]),
            ("a role tag out of range", bad_role),
            ("an option tag out of range", bad_option),
            ("a string that is not UTF-8", bad_utf8),
            ("a 63-byte signature", short_signature),
            ("a 65-byte signature", long_signature),
            ("an error code out of range", bad_code),
            ("a bool that is neither 0 nor 1", bad_bool),
        ];
        for (what, bytes) in cases {
            assert_garbage(&bytes, what);
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for (name, msg) in golden_messages() {
            let mut bytes = payload(&msg);
            bytes.push(0);
            assert_garbage(&bytes, name);
        }
    }

    #[test]
    fn an_invalid_doc_id_is_refused_at_decode() {
        let long = "a".repeat(crate::ids::MAX_DOC_ID_LEN + 1);
        let bad_ids: [&[u8]; 7] = [
            b"a//b",
            b"",
            b"/a",
            b"a/../b",
            b"a b",
            b"a/",
            long.as_bytes(),
        ];
        // Each message kind that carries a DocId, hand-encoded around `id`.
        type Encode = fn(&[u8]) -> Vec<u8>;
        let encodings: [(&str, Encode); 7] = [
            ("Reconcile", |id| {
                [&[9u8][..], &str_bytes(id), &[0]].concat()
            }),
            ("Heads", |id| [&[8u8][..], &str_bytes(id), &[0, 1]].concat()),
            ("Reconciled", |id| [&[11u8][..], &str_bytes(id)].concat()),
            ("Push", |id| [&[5u8, 1][..], &str_bytes(id), &[0]].concat()),
            ("Changes", |id| {
                [&[3u8][..], &str_bytes(id), &[0, 0]].concat()
            }),
            ("Reject", |id| {
                [&[7u8, 1][..], &str_bytes(id), &[2], &str_bytes(b"")].concat()
            }),
            // Subscribe to Target::Doc(id), epoch none, cursor 0.
            ("Subscribe", |id| {
                [&[2u8, 0][..], &str_bytes(id), &[0; 16], &[0]].concat()
            }),
        ];
        for (kind, encode) in encodings {
            // The hand encoding is right: a valid id decodes.
            assert!(decode(&encode(b"a/b")).is_ok(), "{kind}");
            for id in bad_ids {
                assert_garbage(
                    &encode(id),
                    &format!("{kind} of {:?}", String::from_utf8_lossy(id)),
                );
            }
        }
        // Prefixes are validated too (Subscribe to Target::Prefix).
        let subscribe_prefix = |p: &[u8]| [&[2u8, 1][..], &str_bytes(p), &[0; 16], &[0]].concat();
        assert!(decode(&subscribe_prefix(b"")).is_ok());
        assert!(decode(&subscribe_prefix(b"a/")).is_ok());
        for bad in [&b"a//"[..], b"/", b"../", b"a b"] {
            assert_garbage(&subscribe_prefix(bad), &format!("prefix {bad:?}"));
        }
        // And the target inside a Changes cursor.
        let changes_cursor = |id: &[u8]| {
            [
                &[3u8][..],
                &str_bytes(b"d"),
                &[0, 1, 0],
                &str_bytes(id),
                &[7],
            ]
            .concat()
        };
        assert!(decode(&changes_cursor(b"d")).is_ok());
        assert_garbage(&changes_cursor(b"a//b"), "Changes cursor target");
    }

    // ---- limits ----

    #[test]
    fn too_many_changes_are_over_the_limit() {
        for n in [MAX_CHANGES_PER_DELTA, MAX_CHANGES_PER_DELTA + 1] {
            let changes = vec![empty_change(); n];
            let msgs = [
                Message::Changes(Changes {
                    doc: doc("d"),
                    changes: changes.clone(),
                    cursor: None,
                }),
                Message::Push(Push {
                    push_id: 1,
                    doc: doc("d"),
                    changes,
                }),
            ];
            for msg in msgs {
                if n > MAX_CHANGES_PER_DELTA {
                    assert_over_limit(&msg, &format!("{} with {n} changes", msg.kind()));
                } else {
                    assert_eq!(decode(&payload(&msg)), Ok(msg));
                }
            }
        }
    }

    #[test]
    fn an_oversized_change_is_over_the_limit() {
        for n in [MAX_CHANGE_BYTES, MAX_CHANGE_BYTES + 1] {
            let big = SignedChange {
                bytes: vec![0x55; n],
                signature: [1; 64],
            };
            let msgs = [
                Message::Changes(Changes {
                    doc: doc("d"),
                    changes: vec![empty_change(), big.clone()],
                    cursor: None,
                }),
                Message::Push(Push {
                    push_id: 1,
                    doc: doc("d"),
                    changes: vec![big],
                }),
            ];
            for msg in msgs {
                if n > MAX_CHANGE_BYTES {
                    assert_over_limit(&msg, &format!("{} with a change of {n} bytes", msg.kind()));
                } else {
                    assert_eq!(decode(&payload(&msg)), Ok(msg));
                }
            }
        }
    }

    #[test]
    fn too_many_heads_are_over_the_limit() {
        for n in [MAX_HEADS, MAX_HEADS + 1] {
            let heads = vec![ChangeHash([3; 32]); n];
            let msgs = [
                Message::Heads(Heads {
                    doc: doc("d"),
                    heads: heads.clone(),
                    complete: true,
                }),
                Message::Reconcile(Reconcile {
                    doc: doc("d"),
                    heads,
                }),
            ];
            for msg in msgs {
                if n > MAX_HEADS {
                    assert_over_limit(&msg, &format!("{} with {n} heads", msg.kind()));
                } else {
                    assert_eq!(decode(&payload(&msg)), Ok(msg));
                }
            }
        }
    }

    #[test]
    fn too_long_error_text_is_over_the_limit() {
        for n in [MAX_ERROR_TEXT, MAX_ERROR_TEXT + 1] {
            let message = "x".repeat(n);
            let msgs = [
                Message::Reject(Reject {
                    push_id: 1,
                    doc: doc("d"),
                    code: ErrorCode::NotAuthorized,
                    message: message.clone(),
                }),
                Message::Error(ErrorMessage {
                    code: ErrorCode::ProtocolViolation,
                    message,
                }),
            ];
            for msg in msgs {
                if n > MAX_ERROR_TEXT {
                    assert_over_limit(&msg, &format!("{} with {n} bytes of text", msg.kind()));
                } else {
                    assert_eq!(decode(&payload(&msg)), Ok(msg));
                }
            }
        }
    }

    #[test]
    fn the_decoder_stays_failed_after_an_error() {
        let good = Message::Ack(Ack { push_id: 1 }).to_frame();
        let mut decoder = FrameDecoder::new();
        decoder.extend(&good);
        decoder.extend(&framed(&[0x7f])); // unknown tag
        decoder.extend(&good);
        assert_eq!(
            decoder.next_message(),
            Ok(Some(Message::Ack(Ack { push_id: 1 })))
        );
        assert!(matches!(decoder.next_message(), Err(WireError::Garbage(_))));
        // The good frame after the bad one is not handed out: the stream is out of sync.
        assert!(decoder.next_message().is_err());
        assert!(decoder.next_message().is_err());
    }

    // ---- every variant is covered ----

    /// What [`VariantProbe`] brings back.
    #[derive(Debug)]
    struct Found(&'static [&'static str]);

    impl std::fmt::Display for Found {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl std::error::Error for Found {}

    impl serde::de::Error for Found {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Found(&[])
        }
    }

    /// A deserializer that only records the variant list serde's derive hands to
    /// `deserialize_enum`, so the tests learn of a new `Message` variant without a `match`
    /// that would stop the crate's tests from compiling while it is being added.
    struct VariantProbe;

    impl<'de> serde::Deserializer<'de> for VariantProbe {
        type Error = Found;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }

        fn deserialize_enum<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Found> {
            Err(Found(variants))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
            identifier ignored_any
        }
    }

    /// `Message`'s variant names in tag order.
    fn variant_names() -> &'static [&'static str] {
        match Message::deserialize(VariantProbe) {
            Err(Found(names)) => names,
            Ok(m) => panic!("the probe produced a message: {m:?}"),
        }
    }

    #[test]
    fn every_variant_has_a_generator_and_a_golden_vector() {
        let names = variant_names();
        assert!(names.len() >= 12, "{names:?}");
        let golden: Vec<&str> = golden_messages().iter().map(|(_, m)| m.kind()).collect();
        assert_eq!(
            golden, names,
            "a Message variant was added or moved: give it a golden vector (in tag order), a \
             generator in message(), and a section in docs/PROTOCOL.md"
        );
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = message();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4000 {
            let tree = strategy.new_tree(&mut runner).expect("a generated message");
            seen.insert(tree.current().kind());
        }
        let all: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(seen, all, "message() does not generate every variant");
    }

    // ---- golden vectors ----

    const REPLICA_SEED: [u8; 32] = [1; 32];
    const HUB_SEED: [u8; 32] = [2; 32];
    /// The nonce of the replica whose Auth the golden vector holds.
    const REPLICA_NONCE: [u8; 32] = [0x11; 32];
    const HUB_NONCE: [u8; 32] = [0x22; 32];
    const DOC: &str = "sites/berlin/inventory";
    const PREFIX: &str = "sites/berlin/";

    fn golden_epoch() -> Epoch {
        Epoch(std::array::from_fn(|i| 0xe0 + i as u8))
    }

    /// A real change, made the same way every time: the replica's actor with store instance
    /// `[1; 8]`, one key set, committed at time 0, signed for [`DOC`].
    fn golden_change() -> change::VerifiedChange {
        let replica = Identity::from_seed(REPLICA_SEED);
        let mut am = automerge::Automerge::new();
        am.set_actor(change::actor_for(&replica.peer_id(), [1; 8]));
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "temperature", 21_i64)
            .expect("a put on the root map");
        tx.commit_with(CommitOptions::default().with_time(0));
        let made = am
            .get_last_local_change()
            .expect("the change just committed");
        change::sign(&replica, &doc(DOC), made).expect("the actor is the replica's")
    }

    /// One fixed message of each kind, in tag order, with the name of its vector file.
    fn golden_messages() -> Vec<(&'static str, Message)> {
        let replica = Identity::from_seed(REPLICA_SEED);
        let hub = Identity::from_seed(HUB_SEED);
        let prefix = Target::Prefix(DocPrefix::new(PREFIX).expect("a valid prefix"));
        let signed = golden_change();
        vec![
            (
                "hello",
                Message::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    role: Role::Hub,
                    peer: hub.peer_id(),
                    nonce: HUB_NONCE,
                    epoch: golden_epoch(),
                }),
            ),
            (
                "auth",
                // The replica's answer to the hub's Hello above.
                Message::Auth(Auth {
                    signature: replica.sign(&handshake_message(
                        1,
                        &replica.peer_id(),
                        &REPLICA_NONCE,
                        &Epoch::none(),
                        &hub.peer_id(),
                        &HUB_NONCE,
                        &[0; 32],
                    )),
                }),
            ),
            (
                "subscribe",
                Message::Subscribe(Subscribe {
                    target: prefix.clone(),
                    epoch: golden_epoch(),
                    cursor: Cursor(300),
                }),
            ),
            (
                "changes",
                Message::Changes(Changes {
                    doc: doc(DOC),
                    changes: vec![signed.signed().clone()],
                    cursor: Some((prefix.clone(), Cursor(301))),
                }),
            ),
            (
                "caught_up",
                Message::CaughtUp(CaughtUp {
                    target: prefix.clone(),
                    epoch: golden_epoch(),
                    cursor: Cursor(301),
                }),
            ),
            (
                "push",
                Message::Push(Push {
                    push_id: 1,
                    doc: doc(DOC),
                    changes: vec![signed.signed().clone()],
                }),
            ),
            ("ack", Message::Ack(Ack { push_id: 1 })),
            (
                "reject",
                Message::Reject(Reject {
                    push_id: 2,
                    doc: doc(DOC),
                    code: ErrorCode::NotAuthorized,
                    message: "no write grant".into(),
                }),
            ),
            (
                "heads",
                Message::Heads(Heads {
                    doc: doc(DOC),
                    heads: vec![signed.hash()],
                    complete: true,
                }),
            ),
            (
                "reconcile",
                Message::Reconcile(Reconcile {
                    doc: doc(DOC),
                    heads: Vec::new(),
                }),
            ),
            (
                "error",
                Message::Error(ErrorMessage {
                    code: ErrorCode::ProtocolViolation,
                    message: "unexpected Ack message from a replica".into(),
                }),
            ),
            (
                "reconciled",
                Message::Reconciled(Reconciled { doc: doc(DOC) }),
            ),
            (
                "snapshot",
                // The document holding the golden change, and that change's signature.
                Message::Snapshot(SnapshotMessage {
                    doc: doc(DOC),
                    snapshot: crate::snapshot::Snapshot {
                        data: automerge::Automerge::load(&signed.signed().bytes)
                            .expect("the golden change loads")
                            .save(),
                        signed: vec![crate::snapshot::SignedHead {
                            hash: signed.hash(),
                            signature: signed.signed().signature,
                        }],
                    },
                }),
            ),
            (
                "caught_up_at",
                // Caught up at the golden change's position, marked with its signature.
                Message::CaughtUpAt(Box::new(CaughtUpAt {
                    target: prefix.clone(),
                    epoch: golden_epoch(),
                    cursor: Cursor(301),
                    mark: Some(Mark(signed.signed().signature)),
                    rolled_back: false,
                })),
            ),
            (
                "resume",
                // Received up to 301, and its own change acknowledged at 300.
                Message::Resume(Box::new(Resume {
                    target: prefix,
                    epoch: golden_epoch(),
                    cursor: Cursor(301),
                    mark: Some(Mark(signed.signed().signature)),
                    written: Some(Position {
                        cursor: Cursor(300),
                        mark: Mark(signed.signed().signature),
                    }),
                })),
            ),
            (
                "ack_at",
                Message::AckAt(AckAt {
                    push_id: 1,
                    at: Some(Position {
                        cursor: Cursor(301),
                        mark: Mark(signed.signed().signature),
                    }),
                }),
            ),
            (
                "changes_at",
                // The golden change at 301, the first of a log: its chain is the mark.
                Message::ChangesAt(Box::new(ChangesAt {
                    changes: Changes {
                        doc: doc(DOC),
                        changes: vec![signed.signed().clone()],
                        cursor: Some((
                            Target::Prefix(DocPrefix::new(PREFIX).expect("a valid prefix")),
                            Cursor(301),
                        )),
                    },
                    mark: crate::store::chain(None, &signed.signed().signature),
                })),
            ),
        ]
    }

    fn vectors_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("vectors")
    }

    /// 32 bytes a line, so a diff shows where a vector changed.
    fn to_hex_lines(bytes: &[u8]) -> String {
        let mut out: String = bytes
            .chunks(32)
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join("\n");
        out.push('\n');
        out
    }

    #[test]
    fn golden_inputs_are_genuine() {
        // The signed change verifies for its document and names the replica as author; the
        // Auth signature verifies under the replica's key: the vectors show real signatures.
        let replica = Identity::from_seed(REPLICA_SEED);
        let hub = Identity::from_seed(HUB_SEED);
        let signed = golden_change();
        let verified = change::verify(&doc(DOC), signed.signed().clone()).expect("it verifies");
        assert_eq!(verified.author(), replica.peer_id());
        assert_eq!(verified.timestamp(), 0);
        // Deterministic: made twice, the same bytes.
        assert_eq!(golden_change().signed(), signed.signed());
        let auth = golden_messages()
            .into_iter()
            .find_map(|(_, m)| match m {
                Message::Auth(a) => Some(a),
                _ => None,
            })
            .expect("an Auth vector");
        let key = replica.peer_id().verifying_key().expect("a valid key");
        let message = handshake_message(
            1,
            &replica.peer_id(),
            &REPLICA_NONCE,
            &Epoch::none(),
            &hub.peer_id(),
            &HUB_NONCE,
            &[0; 32],
        );
        key.verify_strict(
            &message,
            &ed25519_dalek::Signature::from_bytes(&auth.signature),
        )
        .expect("the handshake signature verifies");
    }

    #[test]
    fn golden_tags_are_the_variant_order() {
        for (tag, (name, msg)) in golden_messages().into_iter().enumerate() {
            assert_eq!(payload(&msg)[0] as usize, tag, "{name}");
        }
    }

    /// Set `SYNCLINE_BLESS=1` to rewrite the files instead of checking them.
    #[test]
    fn golden_vectors() {
        let bless = std::env::var("SYNCLINE_BLESS").is_ok_and(|v| v == "1");
        let dir = vectors_dir();
        let messages = golden_messages();
        if bless {
            std::fs::create_dir_all(&dir).expect("creating the vectors directory");
        }
        for (name, msg) in &messages {
            let path = dir.join(format!("{name}.hex"));
            let frame = msg.to_frame();
            if bless {
                std::fs::write(&path, to_hex_lines(&frame)).expect("writing a vector");
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; create it with SYNCLINE_BLESS=1 cargo test -p syncline-core \
                     --lib wire::tests::golden",
                    path.display()
                )
            });
            let stored = hex::decode(text.split_whitespace().collect::<String>())
                .unwrap_or_else(|e| panic!("{}: not hex: {e}", path.display()));
            assert_eq!(
                to_hex_lines(&frame),
                to_hex_lines(&stored),
                "{name}: the encoding no longer matches {}; if the wire format changed on \
                 purpose, bless the vectors and document the change",
                path.display()
            );
            assert_eq!(
                decode(&stored[4..]).as_ref(),
                Ok(msg),
                "{name}: decoding the stored vector"
            );
            let mut decoder = FrameDecoder::new();
            decoder.extend(&stored);
            assert_eq!(decoder.next_message(), Ok(Some(msg.clone())), "{name}");
        }
        // No stale vector lies around: every file is one of the messages above.
        let known: Vec<String> = messages.iter().map(|(n, _)| format!("{n}.hex")).collect();
        for entry in std::fs::read_dir(&dir).expect("the vectors directory") {
            let file = entry.expect("a directory entry").file_name();
            let file = file.to_string_lossy();
            assert!(
                known.iter().any(|k| *k == file),
                "{file} in {} is not a golden vector",
                dir.display()
            );
        }
    }
}
