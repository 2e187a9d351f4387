//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` (nightly, libFuzzer)
//! and by the test that replays their corpora on the stable toolchain
//! (`core/tests/integration/fuzz_corpus.rs`), so that every input fuzzing found or was
//! seeded with stays a regression test of the normal test command.
//!
//! Each function takes arbitrary bytes and must neither panic nor hang: input from the
//! network or the local API gets a typed error. Where a property holds for every input, the
//! function asserts it (a failed assertion is a finding too):
//!
//! - [`wire`]: a frame that decodes re-encodes to a frame that decodes to the same message;
//!   the stream decoder splits the same bytes alike whatever the read sizes.
//! - [`verify`]: a change or signature changed in any byte is refused.
//! - [`hub_session`] and [`replica_session`]: the hub and the replica state machines fed an
//!   arbitrary sequence of messages, before or after an honest handshake; the hub keeps
//!   serving an honest replica afterwards.
//! - [`ops`]: the edge API's operation list (`POST /v1/docs/{id}/changes`), parsed and
//!   applied to a document.
//! - [`apply`]: remote changes a hostile author made and signed (any change body, in a
//!   well-formed chunk), applied to a document with history: applied or refused, never a
//!   panic.

use std::sync::OnceLock;

use crate::change::{self, SignedChange};
use crate::document::Document;
use crate::hub::{AllowAll, Hub, SessionId};
use crate::identity::Identity;
use crate::ids::DocId;
use crate::ops::Op;
use crate::replica::{Replica, ReplicaOptions};
use crate::store::SqliteHubStore;
use crate::wire::{FrameDecoder, Message};

/// Most messages one input may carry: bounds the time per input.
const MAX_MESSAGES: usize = 64;

/// Frame decoding: whole frames and byte streams cut at arbitrary points.
pub fn wire(data: &[u8]) {
    if let Ok(m) = Message::from_frame(data) {
        round_trip(&m);
    }
    // The first byte picks the read size; the stream decoder must see the same messages as
    // one big read.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let whole = decode_all(rest, rest.len().max(1));
    let pieces = decode_all(rest, step);
    assert_eq!(whole, pieces, "the read size changed what was decoded");
}

fn decode_all(bytes: &[u8], step: usize) -> Vec<Result<Message, String>> {
    let mut d = FrameDecoder::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(step) {
        d.extend(chunk);
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    round_trip(&m);
                    out.push(Ok(m));
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }
    if let Err(e) = d.finish() {
        out.push(Err(e.to_string()));
    }
    out
}

fn round_trip(m: &Message) {
    let again = Message::from_frame(&m.to_frame());
    assert_eq!(
        again.as_ref().ok(),
        Some(m),
        "a decoded message did not round-trip"
    );
}

/// A valid signed change of a fixed document by a fixed key.
fn valid_change() -> &'static (DocId, SignedChange) {
    static CHANGE: OnceLock<(DocId, SignedChange)> = OnceLock::new();
    CHANGE.get_or_init(|| {
        let identity = Identity::from_seed([7; 32]);
        let mut r = replica(identity);
        let doc = doc("fuzz/doc");
        let ops = Op::list_from_json(r#"[{"op":"put","path":["a"],"value":1}]"#);
        if let Ok(ops) = ops {
            let _ = r.change(&doc, &ops);
        }
        let signed = r
            .store()
            .all_changes()
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|c| {
                Some(SignedChange {
                    bytes: c.bytes?,
                    signature: c.signature,
                })
            })
            .unwrap_or(SignedChange {
                bytes: Vec::new(),
                signature: [0; 64],
            });
        (doc, signed)
    })
}

fn doc(id: &str) -> DocId {
    DocId::new(id).unwrap_or_else(|_| unreachable!("a valid document id"))
}

/// Signature verification: arbitrary changes, and a valid one with bytes changed.
pub fn verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw: a document id, a signature, change bytes.
        let Some((&n, rest)) = rest.split_first() else {
            return;
        };
        let n = usize::from(n % 32).min(rest.len());
        let (id, rest) = rest.split_at(n);
        let Ok(doc) = DocId::new(String::from_utf8_lossy(id)) else {
            return;
        };
        let Some((sig, bytes)) = rest.split_first_chunk::<64>() else {
            return;
        };
        let signed = SignedChange {
            bytes: bytes.to_vec(),
            signature: *sig,
        };
        let one = change::verify(&doc, signed.clone()).is_ok();
        let batch = change::verify_batch(&doc, vec![signed.clone(), signed]).is_ok();
        assert_eq!(one, batch, "verify and verify_batch disagree");
        return;
    }
    // Mutated: XOR the input into the valid change (signature, then bytes), or move it to
    // another document; anything but the original must be refused.
    let (doc, valid) = valid_change();
    assert!(
        change::verify(doc, valid.clone()).is_ok(),
        "the valid change is refused"
    );
    let mut sig = valid.signature;
    let mut bytes = valid.bytes.clone();
    for (i, &b) in rest.iter().enumerate() {
        match i.checked_sub(64) {
            None => sig[i] ^= b,
            Some(j) if j < bytes.len() => bytes[j] ^= b,
            Some(_) => bytes.push(b),
        }
    }
    let target = if mode & 2 == 0 {
        doc.clone()
    } else {
        crate::fuzzing::doc("fuzz/other")
    };
    let unchanged = sig == valid.signature && bytes == valid.bytes && &target == doc;
    let ok = change::verify(
        &target,
        SignedChange {
            bytes,
            signature: sig,
        },
    )
    .is_ok();
    assert_eq!(
        ok, unchanged,
        "a changed change was accepted (or the original refused)"
    );
}

fn replica(identity: Identity) -> Replica {
    let options = ReplicaOptions {
        instance: Some([1; 8]),
        rng_seed: Some(1),
        verify_threads: 1,
        clock: || 1_700_000_000_000,
        ..ReplicaOptions::default()
    };
    Replica::open_in_memory(identity, options)
        .unwrap_or_else(|e| unreachable!("an in-memory replica opens: {e}"))
}

fn hub() -> Hub<SqliteHubStore, AllowAll> {
    let store = SqliteHubStore::open_in_memory()
        .unwrap_or_else(|e| unreachable!("an in-memory hub store opens: {e}"));
    Hub::new(Identity::from_seed([9; 32]), store, AllowAll, Some(1))
}

/// Moves messages both ways until nothing moves (bounded); `tap` sees each message.
fn pump(
    hub: &mut Hub<SqliteHubStore, AllowAll>,
    r: &mut Replica,
    sid: SessionId,
    tap: &mut dyn FnMut(bool, &Message),
) {
    for _ in 0..100 {
        let mut moved = false;
        while let Ok(Some(m)) = r.poll_transmit() {
            moved = true;
            tap(true, &m);
            let _ = hub.handle_message(sid, m);
        }
        let _ = hub.flush();
        while let Ok(Some(m)) = hub.poll_transmit(sid) {
            moved = true;
            tap(false, &m);
            let _ = r.handle_message(m);
        }
        let _ = r.flush();
        if !moved {
            return;
        }
    }
}

/// Messages encoded for a session input: the first byte is the mode, then frames.
fn messages(data: &[u8]) -> impl Iterator<Item = Message> + '_ {
    let mut d = FrameDecoder::new();
    d.extend(data);
    std::iter::from_fn(move || d.next_message().ok().flatten()).take(MAX_MESSAGES)
}

/// An honest session: the replica subscribes to everything and writes once.
fn honest(hub: &mut Hub<SqliteHubStore, AllowAll>, tap: &mut dyn FnMut(bool, &Message)) -> Replica {
    let mut r = replica(Identity::from_seed([3; 32]));
    let sid = hub.accept();
    r.connect(Some(hub.peer_id()));
    let _ = r.subscribe(crate::wire::Target::Prefix(
        crate::ids::DocPrefix::new("").unwrap_or_else(|_| unreachable!("the empty prefix")),
    ));
    if let Ok(ops) = Op::list_from_json(r#"[{"op":"put","path":["x"],"value":1}]"#) {
        let _ = r.change(&doc("fuzz/honest"), &ops);
    }
    pump(hub, &mut r, sid, tap);
    r
}

/// The hub fed a peer's messages: from the first message (mode bit 0 clear), or after an
/// honest handshake and sync on the same session (set). Afterwards an honest replica on a
/// session of its own still syncs a write.
pub fn hub_session(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut h = hub();
    let sid = if mode & 1 == 0 {
        h.accept()
    } else {
        let mut r = replica(Identity::from_seed([5; 32]));
        let sid = h.accept();
        r.connect(Some(h.peer_id()));
        pump(&mut h, &mut r, sid, &mut |_, _| {});
        sid
    };
    for m in messages(rest) {
        if h.handle_message(sid, m).is_err() {
            break;
        }
        let _ = h.flush();
        while let Ok(Some(_)) = h.poll_transmit(sid) {}
    }
    let _ = h.flush();
    // The hub still serves others.
    let r = honest(&mut h, &mut |_, _| {});
    assert!(
        r.status().is_ok_and(|s| s.outbox == 0),
        "an honest replica could not sync after a hostile session"
    );
}

/// A replica fed a hub's messages, from the first one or after an honest sync.
pub fn replica_session(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = if mode & 1 == 0 {
        let mut r = replica(Identity::from_seed([3; 32]));
        r.connect(Some(Identity::from_seed([9; 32]).peer_id()));
        while let Ok(Some(_)) = r.poll_transmit() {}
        r
    } else {
        honest(&mut hub(), &mut |_, _| {})
    };
    for m in messages(rest) {
        if r.handle_message(m).is_err() {
            break;
        }
        let _ = r.flush();
        while let Ok(Some(_)) = r.poll_transmit() {}
    }
    // Whatever came, the store is sound and every change in it verifies.
    let _ = r.flush();
    if let Err(e) = r.verify_stored() {
        panic!("the replica stored something that does not verify: {e}");
    }
}

/// The edge API's operations: parsed from JSON text and applied to a document.
pub fn ops(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ops) = Op::list_from_json(text) else {
        return;
    };
    let mut r = replica(Identity::from_seed([4; 32]));
    let d = doc("fuzz/ops");
    let _ = r.change(&d, &ops);
    let _ = r.json(&d);
}

/// Seed inputs for the session targets, recorded from an honest session: `(to_hub,
/// to_replica)`, each as mode byte 0 followed by the frames one side sent. They replay
/// exactly: identities, nonces, clocks and actors are fixed.
pub fn session_seeds() -> (Vec<u8>, Vec<u8>) {
    let mut to_hub = vec![0u8];
    let mut to_replica = vec![0u8];
    let mut h = hub();
    honest(&mut h, &mut |up, m| {
        let frame = m.to_frame();
        if up {
            to_hub.extend_from_slice(&frame);
        } else {
            to_replica.extend_from_slice(&frame);
        }
    });
    (to_hub, to_replica)
}

/// Appends `n` as unsigned LEB128, as Automerge's chunks write numbers.
pub(crate) fn push_uleb(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The chunk around a change body, as Automerge encodes it: magic bytes, checksum (the first
/// 4 bytes of the SHA-256 of the rest), type 1 (change), length, body.
pub fn change_chunk(body: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut hashed = vec![1u8];
    push_uleb(&mut hashed, body.len() as u64);
    hashed.extend_from_slice(body);
    let digest = sha2::Sha256::digest(&hashed);
    let mut out = vec![0x85, 0x6f, 0x4a, 0x83];
    out.extend_from_slice(&digest[..4]);
    out.extend_from_slice(&hashed);
    out
}

/// The body of an uncompressed change chunk (what [`change_chunk`] wraps), if it is one.
pub fn change_body(chunk: &[u8]) -> Option<&[u8]> {
    if chunk.len() < 10 || chunk[8] != 1 {
        return None;
    }
    let len_bytes = chunk[9..].iter().position(|b| b & 0x80 == 0)? + 1;
    chunk.get(9 + len_bytes..)
}

/// [`Document`]'s checked apply of remote changes (causal order, numbering, actors, objects,
/// then Automerge), for benches that set it beside raw Automerge. Returns how many it refused.
pub fn document_apply(d: &mut Document, changes: Vec<automerge::Change>) -> usize {
    d.apply_changes(changes)
        .map_or(usize::MAX, |refused| refused.len())
}

const APPLY_DOC: &str = "fuzz/apply";

fn apply_actor(n: u8) -> automerge::ActorId {
    automerge::ActorId::from(&[n; 16][..])
}

/// The document [`apply`] starts from: three changes by actor 1.
fn apply_base() -> Document {
    let mut d = Document::new(doc(APPLY_DOC), apply_actor(1));
    for ops in [
        r#"[{"op":"put","path":["t"],"value":21.5},{"op":"put","path":["l"],"value":[]}]"#,
        r#"[{"op":"insert","path":["l",-1],"value":"a"},{"op":"put","path":["c"],"value":{"$counter":0}}]"#,
        r#"[{"op":"put","path":["s"],"value":{"$text":"hi"}}]"#,
    ] {
        let _ = d.apply_ops_at(&Op::list_from_json(ops).unwrap_or_default(), 1);
    }
    d
}

/// A seed for [`apply`]: what follows the base honestly, by its actor and by a concurrent
/// second one, as [`apply`] reads it.
pub fn apply_seed() -> Vec<u8> {
    let mut next = Vec::new();
    let mut a = apply_base();
    let mut b = Document::new(doc(APPLY_DOC), apply_actor(2));
    let _ = b.apply_changes(a.changes());
    for (second, ops) in [
        (
            false,
            r#"[{"op":"increment","path":["c"],"by":2},{"op":"delete","path":["l",0]}]"#,
        ),
        (
            false,
            r#"[{"op":"splice","path":["s"],"index":1,"delete":1,"text":"ey"}]"#,
        ),
        (
            true,
            r#"[{"op":"put","path":["t"],"value":"x"},{"op":"insert","path":["l",0],"value":{"$bytes":"AAE="}}]"#,
        ),
        (
            true,
            r#"[{"op":"put","path":["m"],"value":{"k":{"$timestamp":1}}}]"#,
        ),
    ] {
        let d = if second { &mut b } else { &mut a };
        if let Ok(Some(c)) = d.apply_ops_at(&Op::list_from_json(ops).unwrap_or_default(), 2) {
            next.push(c);
        }
    }
    let mut out = Vec::new();
    for c in &next {
        if let Some(body) = change_body(c.raw_bytes()) {
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(body);
        }
    }
    out
}

/// Remote changes as a document applies them. The input is change bodies, each after its
/// 2-byte length; each is put in a chunk with a correct checksum (a hostile author signs
/// whatever chunk it makes, so the body is what is in question), parsed, and the changes are
/// applied to a document with history in two batches. Each is applied or refused; the
/// document then reads back as JSON and saves.
pub fn apply(data: &[u8]) {
    let mut changes = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && changes.len() < MAX_MESSAGES {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..][..n.min(rest.len() - 2)];
        rest = &rest[2 + body.len()..];
        if let Ok(c) = automerge::Change::from_bytes(change_chunk(body)) {
            changes.push(c);
        }
    }
    let mut d = apply_base();
    let later = changes.split_off(changes.len() / 2);
    let _ = d.apply_changes(changes);
    let _ = d.apply_changes(later);
    let _ = d.to_json();
    let _ = d.save();
}
