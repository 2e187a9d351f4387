//! Signed changes: an Automerge change plus its author's signature, and the only way to turn
//! one into a [`VerifiedChange`] that may be stored or applied.
//!
//! The author is not a separate field: a change's Automerge actor is
//! `author public key (32 bytes) || store instance (8 bytes)`, so the key that must have
//! signed it is named by the change itself and cannot be swapped without changing the hash.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::ChangeError;
use crate::identity::Identity;
use crate::ids::{ChangeHash, DocId, PeerId};

/// Length of a Syncline actor id: public key plus store-instance suffix.
pub const ACTOR_LEN: usize = 40;

const SIGNING_DOMAIN: &[u8] = b"syncline/change/v1\0";

/// The Automerge actor a store instance of `peer` writes with.
pub fn actor_for(peer: &PeerId, instance: [u8; 8]) -> automerge::ActorId {
    let mut bytes = Vec::with_capacity(ACTOR_LEN);
    bytes.extend_from_slice(peer.as_bytes());
    bytes.extend_from_slice(&instance);
    automerge::ActorId::from(bytes)
}

/// The author a change's actor names, if the actor has the Syncline shape.
pub fn author_of(actor: &automerge::ActorId) -> Option<PeerId> {
    let bytes = actor.to_bytes();
    if bytes.len() != ACTOR_LEN {
        return None;
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[..32]);
    Some(PeerId(key))
}

/// The message an author signs for a change: a domain tag, then the document id (length
/// prefixed) and the change hash. Binding the document stops a change from being replayed
/// into another document.
pub fn signing_message(doc: &DocId, hash: &ChangeHash) -> Vec<u8> {
    let id = doc.as_str().as_bytes();
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + 2 + id.len() + 32);
    m.extend_from_slice(SIGNING_DOMAIN);
    // DocIds are at most 256 bytes, so this fits.
    m.extend_from_slice(&(id.len() as u16).to_be_bytes());
    m.extend_from_slice(id);
    m.extend_from_slice(&hash.0);
    m
}

/// An Automerge change and its author's signature, as sent on the wire. Not trusted until
/// [`verify`] turns it into a [`VerifiedChange`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    /// The Automerge change, exactly as its author encoded it.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// ed25519 signature over [`signing_message`].
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedChange({} bytes)", self.bytes.len())
    }
}

/// A change proven to be its author's for its document. Only [`verify`], [`verify_batch`],
/// [`verify_docs_covered`] and [`sign`] make one.
#[derive(Clone)]
pub struct VerifiedChange {
    doc: DocId,
    signed: SignedChange,
    change: automerge::Change,
    author: PeerId,
    hash: ChangeHash,
    /// Whether its own signature was checked; if not, a checked signature of a later change
    /// of its author covers it (see [`verify_docs_covered`]).
    signature_checked: bool,
}

impl std::fmt::Debug for VerifiedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VerifiedChange({}, {:?}, by {:?})",
            self.doc, self.hash, self.author
        )
    }
}

impl VerifiedChange {
    /// The document it was verified for.
    pub fn doc(&self) -> &DocId {
        &self.doc
    }
    /// The author (the key that signed it).
    pub fn author(&self) -> PeerId {
        self.author
    }
    /// The change hash.
    pub fn hash(&self) -> ChangeHash {
        self.hash
    }
    /// The hashes it depends on.
    pub fn deps(&self) -> Vec<ChangeHash> {
        self.change.deps().iter().map(|h| ChangeHash(h.0)).collect()
    }
    /// Whether its own signature was checked. `false` for a change that
    /// [`verify_docs_covered`] accepted on a later change's signature: its bytes are its
    /// author's, but the signature beside them is only what the hub relayed, so it is checked
    /// before the change is uploaded again.
    pub fn signature_checked(&self) -> bool {
        self.signature_checked
    }
    /// The author's bytes and signature, to store or relay unchanged.
    pub fn signed(&self) -> &SignedChange {
        &self.signed
    }
    /// The parsed Automerge change.
    pub fn automerge(&self) -> &automerge::Change {
        &self.change
    }
    /// Consumes it into the author's bytes and signature.
    pub fn into_signed(self) -> SignedChange {
        self.signed
    }

    /// Consumes it into the parsed change.
    pub fn into_automerge(self) -> automerge::Change {
        self.change
    }
    /// Milliseconds since the epoch, as the author's clock said.
    pub fn timestamp(&self) -> i64 {
        self.change.timestamp()
    }
}

struct Parsed {
    change: automerge::Change,
    author: PeerId,
    key: ed25519_dalek::VerifyingKey,
    hash: ChangeHash,
}

fn parse(signed: &SignedChange) -> Result<Parsed, ChangeError> {
    let (change, author, hash) = parse_unkeyed(signed)?;
    let key = author
        .verifying_key()
        .ok_or(ChangeError::ActorNotBound { hash })?;
    Ok(Parsed {
        change,
        author,
        key,
        hash,
    })
}

/// [`parse`] without decompressing the author's key (a third of a verification's cost),
/// for changes whose key is looked up once per author.
fn parse_unkeyed(
    signed: &SignedChange,
) -> Result<(automerge::Change, PeerId, ChangeHash), ChangeError> {
    let change = automerge::Change::try_from(&signed.bytes[..])
        .map_err(|e| ChangeError::Malformed(e.to_string()))?;
    let hash = ChangeHash(change.hash().0);
    // One encoding per change: the uncompressed chunk whose checksum (bytes 4..8) is the
    // start of its hash, as `sign` makes it. Automerge's change parser accepts a wrong
    // checksum and a compressed chunk of the same hash; the signature covers the hash, not
    // the bytes, so either would let a relay store bytes the author never sent, and a wrong
    // checksum makes Automerge's document load fail later (found by the `verify` fuzzer).
    if signed.bytes.get(4..8) != Some(&hash.0[..4]) || change.raw_bytes() != &signed.bytes[..] {
        return Err(ChangeError::Malformed(format!(
            "change {hash} is not in its canonical encoding (wrong checksum, or compressed)"
        )));
    }
    let author = author_of(change.actor_id()).ok_or(ChangeError::ActorNotBound { hash })?;
    Ok((change, author, hash))
}

/// Verifies one change for `doc`.
pub fn verify(doc: &DocId, signed: SignedChange) -> Result<VerifiedChange, ChangeError> {
    let p = parse(&signed)?;
    let sig = ed25519_dalek::Signature::from_bytes(&signed.signature);
    p.key
        .verify_strict(&signing_message(doc, &p.hash), &sig)
        .map_err(|_| ChangeError::BadSignature {
            doc: doc.clone(),
            hash: p.hash,
        })?;
    Ok(VerifiedChange {
        doc: doc.clone(),
        signed,
        change: p.change,
        author: p.author,
        hash: p.hash,
        signature_checked: true,
    })
}

/// Verifies many changes of one document at once (ed25519 batch verification, about twice
/// the speed of one at a time). All or nothing: the first bad change is named in the error.
pub fn verify_batch(
    doc: &DocId,
    changes: Vec<SignedChange>,
) -> Result<Vec<VerifiedChange>, ChangeError> {
    let docs = vec![doc; changes.len()];
    verify_batch_of(&docs, changes)
}

/// [`verify_batch`] of changes of several documents: `docs[i]` is the document of
/// `changes[i]`.
fn verify_batch_of(
    docs: &[&DocId],
    changes: Vec<SignedChange>,
) -> Result<Vec<VerifiedChange>, ChangeError> {
    if changes.len() < 4 {
        return changes
            .into_iter()
            .zip(docs)
            .map(|(c, doc)| verify(doc, c))
            .collect();
    }
    let parsed = changes.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    let messages: Vec<Vec<u8>> = parsed
        .iter()
        .zip(docs)
        .map(|(p, doc)| signing_message(doc, &p.hash))
        .collect();
    let message_refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
    let signatures: Vec<ed25519_dalek::Signature> = changes
        .iter()
        .map(|c| ed25519_dalek::Signature::from_bytes(&c.signature))
        .collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = parsed.iter().map(|p| p.key).collect();
    if let Some(i) = first_bad(&message_refs, &signatures, &keys) {
        return Err(ChangeError::BadSignature {
            doc: docs[i].clone(),
            hash: parsed[i].hash,
        });
    }
    Ok(changes
        .into_iter()
        .zip(parsed)
        .zip(docs)
        .map(|((signed, p), doc)| VerifiedChange {
            doc: (*doc).clone(),
            signed,
            change: p.change,
            author: p.author,
            hash: p.hash,
            signature_checked: true,
        })
        .collect())
}

/// Verifies signatures of change hashes for `doc` by the given authors (one batch): a
/// snapshot's signed heads, whose changes the caller holds already parsed.
pub(crate) fn verify_signed_hashes(
    doc: &DocId,
    heads: &[(ChangeHash, PeerId, [u8; 64])],
) -> Result<(), ChangeError> {
    let mut keys = Vec::with_capacity(heads.len());
    for (hash, author, _) in heads {
        keys.push(
            author
                .verifying_key()
                .ok_or(ChangeError::ActorNotBound { hash: *hash })?,
        );
    }
    let messages: Vec<Vec<u8>> = heads
        .iter()
        .map(|(hash, _, _)| signing_message(doc, hash))
        .collect();
    let signatures: Vec<ed25519_dalek::Signature> = heads
        .iter()
        .map(|(_, _, s)| ed25519_dalek::Signature::from_bytes(s))
        .collect();
    // One at a time: `verify_strict` refuses the weak keys and non-canonical signatures that
    // batch verification lets through, and a snapshot has one head per actor.
    for (i, key) in keys.iter().enumerate() {
        if key.verify_strict(&messages[i], &signatures[i]).is_err() {
            return Err(ChangeError::BadSignature {
                doc: doc.clone(),
                hash: heads[i].0,
            });
        }
    }
    Ok(())
}

/// [`verify_batch`] split over up to `threads` threads (scoped, joined before this returns).
/// Each thread verifies a contiguous part as one batch; the result (or the first bad change,
/// in input order) is the same as [`verify_batch`]'s. Batches under 128 changes, one thread,
/// or a platform without threads (wasm) verify on the calling thread.
pub fn verify_batch_parallel(
    doc: &DocId,
    changes: Vec<SignedChange>,
    threads: usize,
) -> Result<Vec<VerifiedChange>, ChangeError> {
    let docs = vec![doc; changes.len()];
    verify_parallel_of(&docs, changes, threads)
}

fn verify_parallel_of(
    docs: &[&DocId],
    mut changes: Vec<SignedChange>,
    threads: usize,
) -> Result<Vec<VerifiedChange>, ChangeError> {
    let threads = threads.min(changes.len() / MIN_PER_THREAD);
    if threads <= 1 {
        return verify_batch_of(docs, changes);
    }
    let per = changes.len().div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut start = 0;
    while changes.len() > per {
        let rest = changes.split_off(per);
        let part = std::mem::replace(&mut changes, rest);
        parts.push((&docs[start..start + part.len()], part));
        start += per;
    }
    parts.push((&docs[start..], changes));
    let mut all = Vec::new();
    for r in crate::parallel::run(parts, threads, |(d, c)| verify_batch_of(d, c)) {
        all.extend(r.unwrap_or_else(|| Err(thread_failed()))?);
    }
    Ok(all)
}

/// Changes per verification thread at least: below it a thread costs more than it saves.
const MIN_PER_THREAD: usize = 64;

fn thread_failed() -> ChangeError {
    ChangeError::Malformed("a verification thread failed".into())
}

/// Verifies the changes of several documents as a replica receives them from its hub,
/// checking one signature per author and document where the hash links allow it.
///
/// A change is accepted when its own signature verifies, or when a later change of the same
/// actor in the same document's batch, itself accepted, holds it in its hash-linked history.
/// The author signed that later change's hash for this document; the hash commits to the
/// hashes of its dependencies, and so on down to this change, so its bytes are the ones the
/// author built on (the argument of a snapshot's signed heads, `docs/PROTOCOL.md`, resting on
/// SHA-256 as change hashes do). Only changes of the signer's own actor are covered (as in a
/// snapshot, and in the store audit): an author vouches for nothing of another key's. A
/// catch-up of a document written by one device checks one signature per message instead of
/// one per change.
///
/// A covered change has [`VerifiedChange::signature_checked`] `false`: the signature beside
/// it is only what the hub relayed. Returns the changes per document in input order, each
/// hash once per document. Documents are split over up to `threads` threads (scoped, joined
/// before this returns). All or nothing: the first change that fails is named in the error.
pub fn verify_docs_covered(
    batches: Vec<(DocId, Vec<SignedChange>)>,
    threads: usize,
) -> Result<VerifiedDocs, ChangeError> {
    verify_docs_covered_beside(batches, threads, || ()).0
}

/// Changes verified per document, in input order.
pub type VerifiedDocs = Vec<(DocId, Vec<VerifiedChange>)>;

/// [`verify_docs_covered`] on up to `threads - 1` threads of its own while `beside` runs on
/// the calling thread, which then verifies with them (`parallel::run_beside`).
pub(crate) fn verify_docs_covered_beside<B>(
    batches: Vec<(DocId, Vec<SignedChange>)>,
    threads: usize,
    beside: impl FnOnce() -> B,
) -> (Result<VerifiedDocs, ChangeError>, B) {
    let total: usize = batches.iter().map(|(_, c)| c.len()).sum();
    let threads = threads.min(total / MIN_PER_THREAD).max(1);
    let parts = if threads > 1 {
        crate::parallel::split_by(batches, threads * crate::parallel::PARTS_PER_THREAD, |b| {
            b.1.len()
        })
    } else {
        vec![batches]
    };
    let (results, b) = crate::parallel::run_beside(parts, threads - 1, verify_covered_part, beside);
    let mut all = Vec::new();
    for r in results {
        match r.unwrap_or_else(|| Err(thread_failed())) {
            Ok(part) => all.extend(part),
            Err(e) => return (Err(e), b),
        }
    }
    (Ok(all), b)
}

/// [`verify_docs_covered`] of one part, on one thread: one key decompression per author (the
/// thread's key cache), one batch verification of the signatures that must be checked.
fn verify_covered_part(
    batches: Vec<(DocId, Vec<SignedChange>)>,
) -> Result<Vec<(DocId, Vec<VerifiedChange>)>, ChangeError> {
    let mut out: Vec<(DocId, Vec<VerifiedChange>)> = Vec::with_capacity(batches.len());
    // (document in `out`, change in it, key) of each signature to check.
    let mut checks: Vec<(usize, usize, ed25519_dalek::VerifyingKey)> = Vec::new();
    for (doc, signed) in batches {
        let mut seen = HashSet::with_capacity(signed.len());
        let mut changes = Vec::with_capacity(signed.len());
        for s in signed {
            let (change, author, hash) = parse_unkeyed(&s)?;
            if seen.insert(hash) {
                changes.push(VerifiedChange {
                    doc: doc.clone(),
                    signed: s,
                    change,
                    author,
                    hash,
                    signature_checked: false,
                });
            }
        }
        let own = own_signature_needed(&changes);
        for (i, c) in changes.iter_mut().enumerate() {
            if own[i] {
                // Decompressed once per author and thread (`PeerId::verifying_key` keeps it).
                let key = c
                    .author
                    .verifying_key()
                    .ok_or(ChangeError::ActorNotBound { hash: c.hash })?;
                c.signature_checked = true;
                checks.push((out.len(), i, key));
            }
        }
        out.push((doc, changes));
    }
    let messages: Vec<Vec<u8>> = checks
        .iter()
        .map(|&(d, i, _)| signing_message(&out[d].0, &out[d].1[i].hash))
        .collect();
    let signatures: Vec<ed25519_dalek::Signature> = checks
        .iter()
        .map(|&(d, i, _)| ed25519_dalek::Signature::from_bytes(&out[d].1[i].signed.signature))
        .collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = checks.iter().map(|c| c.2).collect();
    let refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
    if let Some(n) = first_bad(&refs, &signatures, &keys) {
        let (d, i, _) = checks[n];
        return Err(ChangeError::BadSignature {
            doc: out[d].0.clone(),
            hash: out[d].1[i].hash,
        });
    }
    Ok(out)
}

/// The index of the first signature that does not verify, if any: four or more as one batch
/// (about twice the speed), then one at a time (`verify_strict`) only to name the culprit;
/// fewer one at a time. Where batch and single verification disagree (non-canonical
/// encodings only), the first is named: refused either way.
fn first_bad(
    messages: &[&[u8]],
    signatures: &[ed25519_dalek::Signature],
    keys: &[ed25519_dalek::VerifyingKey],
) -> Option<usize> {
    let batched = messages.len() >= 4;
    if batched && ed25519_dalek::verify_batch(messages, signatures, keys).is_ok() {
        return None;
    }
    let single =
        (0..messages.len()).find(|&i| keys[i].verify_strict(messages[i], &signatures[i]).is_err());
    match single {
        None if batched => Some(0),
        found => found,
    }
}

/// For each change of one document's batch, whether its own signature must be checked:
/// `false` when a later change of the same actor in the batch holds it in its history
/// through the batch's own hash links. Children are visited before their dependencies
/// (Kahn's order), each carrying the set of actors with a change above it. Only the first
/// 64 actors of a batch can cover (a bit each); the others' changes are all checked.
fn own_signature_needed(changes: &[VerifiedChange]) -> Vec<bool> {
    let n = changes.len();
    let index: HashMap<ChangeHash, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash, i))
        .collect();
    let mut actors: HashMap<&automerge::ActorId, usize> = HashMap::new();
    let mut own: Vec<u64> = Vec::with_capacity(n);
    for c in changes {
        let next = actors.len();
        let i = *actors.entry(c.change.actor_id()).or_insert(next);
        own.push(if i < 64 { 1 << i } else { 0 });
    }
    let deps: Vec<Vec<usize>> = changes
        .iter()
        .map(|c| {
            c.change
                .deps()
                .iter()
                .filter_map(|h| index.get(&ChangeHash(h.0)).copied())
                .collect()
        })
        .collect();
    let mut children = vec![0usize; n];
    for d in deps.iter().flatten() {
        children[*d] += 1;
    }
    let mut above = vec![0u64; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| children[i] == 0).collect();
    while let Some(i) = ready.pop() {
        let carry = above[i] | own[i];
        for &d in &deps[i] {
            above[d] |= carry;
            children[d] -= 1;
            if children[d] == 0 {
                ready.push(d);
            }
        }
    }
    (0..n)
        .map(|i| own[i] == 0 || above[i] & own[i] == 0)
        .collect()
}

/// Signs a change this replica made. The change's actor must name `identity`'s key.
pub fn sign(
    identity: &Identity,
    doc: &DocId,
    change: automerge::Change,
) -> Result<VerifiedChange, ChangeError> {
    let hash = ChangeHash(change.hash().0);
    let author = author_of(change.actor_id()).ok_or(ChangeError::ActorNotBound { hash })?;
    if author != identity.peer_id() {
        return Err(ChangeError::ActorNotBound { hash });
    }
    let signature = identity.sign(&signing_message(doc, &hash));
    let signed = SignedChange {
        bytes: change.raw_bytes().to_vec(),
        signature,
    };
    Ok(VerifiedChange {
        doc: doc.clone(),
        signed,
        change,
        author,
        hash,
        signature_checked: true,
    })
}

/// `change` re-encoded under another sequence number, with a valid checksum and hash: what a
/// damaged store or a hostile author could sign. For tests of what refuses it.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn renumbered(change: &automerge::Change, seq: u64) -> automerge::Change {
    fn uleb(b: &[u8]) -> (u64, usize) {
        let (mut v, mut i) = (0u64, 0);
        loop {
            v |= u64::from(b[i] & 0x7f) << (7 * i);
            i += 1;
            if b[i - 1] & 0x80 == 0 {
                return (v, i);
            }
        }
    }
    // The body starts with the dependencies, the actor and the sequence number.
    let body = crate::fuzzing::change_body(change.raw_bytes()).expect("an uncompressed change");
    let (deps, n) = uleb(body);
    let mut at = n + 32 * deps as usize;
    let (actor_len, n) = uleb(&body[at..]);
    at += n + actor_len as usize;
    let (_, n) = uleb(&body[at..]);
    assert!(seq < 0x80, "a one-byte sequence number");
    let mut new_body = body[..at].to_vec();
    new_body.push(seq as u8);
    new_body.extend_from_slice(&body[at + n..]);
    let c = automerge::Change::from_bytes(crate::fuzzing::change_chunk(&new_body))
        .expect("a well-formed change");
    assert_eq!(c.seq(), seq);
    c
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use super::*;

    fn make_change(id: &Identity, key: &str) -> automerge::Change {
        let mut doc = automerge::Automerge::new();
        doc.set_actor(actor_for(&id.peer_id(), [1; 8]));
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, key, 1).unwrap();
        tx.commit();
        doc.get_last_local_change().unwrap()
    }

    #[test]
    fn only_the_canonical_encoding_of_a_signed_change_verifies() {
        let alice = Identity::generate();
        let doc = DocId::new("a/b").unwrap();
        let v = sign(&alice, &doc, make_change(&alice, "x")).unwrap();
        let good = v.signed().clone();
        // The checksum changed: the hash, and so the signature, stay the same.
        let mut bad = good.clone();
        bad.bytes[4] ^= 0xff;
        assert!(
            matches!(verify(&doc, bad.clone()), Err(ChangeError::Malformed(m)) if m.contains("canonical"))
        );
        assert!(verify_batch(&doc, vec![good.clone(), good.clone(), good.clone(), bad]).is_err());
        // The same change compressed.
        let mut big = make_change(&alice, &"k".repeat(600));
        let compressed = big.bytes().to_vec();
        assert_ne!(compressed, big.raw_bytes());
        let v = sign(&alice, &doc, big.clone()).unwrap();
        let zipped = SignedChange {
            bytes: compressed,
            signature: v.signed().signature,
        };
        assert!(verify(&doc, zipped).is_err());
        assert!(verify(&doc, v.signed().clone()).is_ok());
        assert!(verify(&doc, good).is_ok());
    }

    #[test]
    fn a_signed_change_verifies_for_its_document_only() {
        let alice = Identity::generate();
        let doc = DocId::new("a/b").unwrap();
        let other = DocId::new("a/c").unwrap();
        let v = sign(&alice, &doc, make_change(&alice, "x")).unwrap();
        assert_eq!(v.author(), alice.peer_id());
        let ok = verify(&doc, v.signed().clone()).unwrap();
        assert_eq!(ok.hash(), v.hash());
        // Replayed into another document.
        assert!(matches!(
            verify(&other, v.signed().clone()),
            Err(ChangeError::BadSignature { .. })
        ));
    }

    #[test]
    fn forged_altered_and_spoofed_changes_are_refused() {
        let alice = Identity::generate();
        let mallory = Identity::generate();
        let doc = DocId::new("d").unwrap();
        let v = sign(&alice, &doc, make_change(&alice, "x")).unwrap();

        // Altered signature.
        let mut forged = v.signed().clone();
        forged.signature[0] ^= 1;
        assert!(matches!(
            verify(&doc, forged),
            Err(ChangeError::BadSignature { .. })
        ));

        // Altered bytes: Automerge's checksum or our signature catches it.
        let mut altered = v.signed().clone();
        let last = altered.bytes.len() - 1;
        altered.bytes[last] ^= 0x55;
        assert!(verify(&doc, altered).is_err());

        // Mallory writes a change with Alice's actor and signs it with her own key.
        let spoof = make_change(&alice, "evil");
        let hash = ChangeHash(spoof.hash().0);
        let sig = mallory.sign(&signing_message(&doc, &hash));
        let spoofed = SignedChange {
            bytes: spoof.raw_bytes().to_vec(),
            signature: sig,
        };
        assert!(matches!(
            verify(&doc, spoofed),
            Err(ChangeError::BadSignature { .. })
        ));
        // And our own signer refuses to sign a change whose actor is not ours.
        assert!(matches!(
            sign(&mallory, &doc, make_change(&alice, "y")),
            Err(ChangeError::ActorNotBound { .. })
        ));

        // A change with a plain random actor is not bound to any key.
        let mut d = automerge::Automerge::new();
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        let unbound = d.get_last_local_change().unwrap();
        let s = SignedChange {
            bytes: unbound.raw_bytes().to_vec(),
            signature: [0; 64],
        };
        assert!(matches!(
            verify(&doc, s),
            Err(ChangeError::ActorNotBound { .. })
        ));

        // Garbage.
        let g = SignedChange {
            bytes: vec![1, 2, 3],
            signature: [0; 64],
        };
        assert!(matches!(verify(&doc, g), Err(ChangeError::Malformed(_))));
    }

    #[test]
    fn batch_verification_names_the_bad_change() {
        let alice = Identity::generate();
        let doc = DocId::new("d").unwrap();
        let mut changes: Vec<SignedChange> = (0..10)
            .map(|i| {
                sign(&alice, &doc, make_change(&alice, &format!("k{i}")))
                    .unwrap()
                    .signed()
                    .clone()
            })
            .collect();
        assert_eq!(verify_batch(&doc, changes.clone()).unwrap().len(), 10);
        changes[7].signature[3] ^= 1;
        let bad = verify(&doc, changes[7].clone()).unwrap_err();
        assert_eq!(verify_batch(&doc, changes).unwrap_err(), bad);
    }

    #[test]
    fn parallel_verification_keeps_the_order_and_finds_a_forgery_in_any_part() {
        let alice = Identity::generate();
        let doc = DocId::new("p/q").unwrap();
        let mut am = automerge::Automerge::new();
        am.set_actor(actor_for(&alice.peer_id(), [2; 8]));
        let mut signed = Vec::new();
        for i in 0..300 {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, format!("k{}", i % 7), i).unwrap();
            tx.commit();
            let c = am.get_last_local_change().unwrap();
            signed.push(sign(&alice, &doc, c).unwrap().signed().clone());
        }
        for threads in [1, 2, 3, 4] {
            let got = verify_batch_parallel(&doc, signed.clone(), threads).unwrap();
            let want = verify_batch(&doc, signed.clone()).unwrap();
            let hashes = |v: &[VerifiedChange]| v.iter().map(|c| c.hash()).collect::<Vec<_>>();
            assert_eq!(hashes(&got), hashes(&want), "{threads} threads");
            // A forgery in the first, a middle and the last part is refused.
            for bad in [0, 150, 299] {
                let mut forged = signed.clone();
                forged[bad].signature[5] ^= 0x40;
                match verify_batch_parallel(&doc, forged, threads) {
                    Err(ChangeError::BadSignature { hash, .. }) => {
                        assert_eq!(hash, want[bad].hash(), "{threads} threads, forged {bad}")
                    }
                    other => panic!("{threads} threads, forged {bad}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn many_documents_verify_as_one_batch_and_each_change_is_bound_to_its_own_document() {
        let alice = Identity::generate();
        // 40 documents of 5 changes: 200 changes, split across threads mid-document.
        let mut batches = Vec::new();
        for d in 0..40 {
            let doc = DocId::new(format!("many/{d}")).unwrap();
            let mut am = automerge::Automerge::new();
            am.set_actor(actor_for(&alice.peer_id(), [3; 8]));
            let mut changes = Vec::new();
            for i in 0..5 {
                let mut tx = am.transaction();
                tx.put(automerge::ROOT, "k", d * 10 + i).unwrap();
                tx.commit();
                let c = am.get_last_local_change().unwrap();
                changes.push(sign(&alice, &doc, c).unwrap().signed().clone());
            }
            batches.push((doc, changes));
        }
        for threads in [1, 2, 3] {
            let got = verify_docs_covered(batches.clone(), threads).unwrap();
            assert_eq!(got.len(), 40);
            for ((doc, want), (got_doc, got)) in batches.iter().zip(&got) {
                assert_eq!(doc, got_doc);
                let hashes: Vec<_> = got.iter().map(|c| c.hash()).collect();
                let want: Vec<_> = verify_batch(doc, want.clone())
                    .unwrap()
                    .iter()
                    .map(|c| c.hash())
                    .collect();
                assert_eq!(hashes, want, "{threads} threads, {doc}");
                assert!(got.iter().all(|c| c.doc() == doc));
            }
            // A change signed for one document, presented as another's, is refused there.
            let mut moved = batches.clone();
            let stolen = moved[3].1[2].clone();
            moved[30].1[4] = stolen;
            match verify_docs_covered(moved, threads) {
                Err(ChangeError::BadSignature { doc, .. }) => {
                    assert_eq!(doc.as_str(), "many/30", "{threads} threads")
                }
                other => panic!("{threads} threads: {other:?}"),
            }
        }
    }

    /// `n` changes of `doc` by one actor of `who`, each on top of the one before.
    fn chain(who: &Identity, instance: u8, doc: &DocId, n: usize) -> Vec<SignedChange> {
        let mut am = automerge::Automerge::new();
        am.set_actor(actor_for(&who.peer_id(), [instance; 8]));
        (0..n)
            .map(|i| {
                let mut tx = am.transaction();
                tx.put(automerge::ROOT, "k", i as i64).unwrap();
                tx.commit();
                let c = am.get_last_local_change().unwrap();
                sign(who, doc, c).unwrap().signed().clone()
            })
            .collect()
    }

    fn checked(v: &[VerifiedChange]) -> Vec<bool> {
        v.iter().map(|c| c.signature_checked()).collect()
    }

    #[test]
    fn a_chain_of_one_actor_checks_only_its_newest_signature() {
        let alice = Identity::generate();
        let doc = DocId::new("cover/a").unwrap();
        let mut changes = chain(&alice, 1, &doc, 10);
        // Sent newest first: the order does not matter, only the hash links.
        changes.reverse();
        let got = verify_docs_covered(vec![(doc.clone(), changes.clone())], 1).unwrap();
        let (got_doc, got) = &got[0];
        assert_eq!(got_doc, &doc);
        let want: Vec<_> = changes
            .iter()
            .map(|c| verify(&doc, c.clone()).unwrap().hash())
            .collect();
        assert_eq!(got.iter().map(|c| c.hash()).collect::<Vec<_>>(), want);
        let mut flags = vec![false; 10];
        flags[0] = true;
        assert_eq!(
            checked(got),
            flags,
            "only the newest (sent first) is checked"
        );
        // A covered change's relayed signature is not what makes it authentic.
        let mut relayed = changes.clone();
        relayed[5].signature = [7; 64];
        let got = verify_docs_covered(vec![(doc.clone(), relayed)], 1).unwrap();
        assert!(!got[0].1[5].signature_checked());
        // The newest signature is: damaged, the batch is refused, naming that change.
        let mut forged = changes.clone();
        forged[0].signature[9] ^= 1;
        match verify_docs_covered(vec![(doc.clone(), forged)], 1) {
            Err(ChangeError::BadSignature { hash, .. }) => assert_eq!(hash, want[0]),
            other => panic!("{other:?}"),
        }
        // Each hash once.
        let mut twice = changes.clone();
        twice.extend(changes[3..6].iter().cloned());
        let got = verify_docs_covered(vec![(doc, twice)], 1).unwrap();
        assert_eq!(got[0].1.len(), 10);
    }

    #[test]
    fn a_change_is_covered_only_by_its_own_actor_and_only_through_hash_links() {
        let alice = Identity::generate();
        let bob = Identity::generate();
        let doc = DocId::new("cover/b").unwrap();
        // alice 1, bob 1 on top of it, alice 2 on top of bob's: bob's change is in alice's
        // history, but alice cannot vouch for bob.
        let mut a = automerge::Automerge::new();
        a.set_actor(actor_for(&alice.peer_id(), [1; 8]));
        let mut b = automerge::Automerge::new();
        b.set_actor(actor_for(&bob.peer_id(), [1; 8]));
        let step = |am: &mut automerge::Automerge, who: &Identity, v: i64| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "k", v).unwrap();
            tx.commit();
            sign(who, &doc, am.get_last_local_change().unwrap())
                .unwrap()
                .signed()
                .clone()
        };
        let a1 = step(&mut a, &alice, 1);
        b.apply_changes([automerge::Change::try_from(&a1.bytes[..]).unwrap()])
            .unwrap();
        let b1 = step(&mut b, &bob, 2);
        a.apply_changes([automerge::Change::try_from(&b1.bytes[..]).unwrap()])
            .unwrap();
        let a2 = step(&mut a, &alice, 3);
        let batch = vec![a1.clone(), b1.clone(), a2.clone()];
        let got = verify_docs_covered(vec![(doc.clone(), batch)], 1).unwrap();
        assert_eq!(
            checked(&got[0].1),
            [false, true, true],
            "a1 covered by a2, b1 checked"
        );
        let mut forged_b = b1.clone();
        forged_b.signature[0] ^= 1;
        assert!(matches!(
            verify_docs_covered(
                vec![(doc.clone(), vec![a1.clone(), forged_b, a2.clone()])],
                1
            ),
            Err(ChangeError::BadSignature { .. })
        ));
        // Another instance of the same key is another actor: not covered either.
        let mut a_other = automerge::Automerge::new();
        a_other.set_actor(actor_for(&alice.peer_id(), [2; 8]));
        a_other
            .apply_changes([automerge::Change::try_from(&a1.bytes[..]).unwrap()])
            .unwrap();
        let mut x = step(&mut a_other, &alice, 4);
        a.apply_changes([automerge::Change::try_from(&x.bytes[..]).unwrap()])
            .unwrap();
        let a3 = step(&mut a, &alice, 5);
        x.signature = [1; 64];
        assert!(verify_docs_covered(vec![(doc.clone(), vec![x, a3])], 1).is_err());
        // A change of alice's actor that no checked change of hers holds (a relay's forgery
        // beside her real chain) is checked on its own, and refused.
        let mut fake = automerge::Automerge::new();
        fake.set_actor(actor_for(&alice.peer_id(), [1; 8]));
        let mut tx = fake.transaction();
        tx.put(automerge::ROOT, "forged", 1).unwrap();
        tx.commit();
        let forged = SignedChange {
            bytes: fake.get_last_local_change().unwrap().raw_bytes().to_vec(),
            signature: a2.signature,
        };
        assert!(matches!(
            verify_docs_covered(vec![(doc, vec![a1, b1, a2, forged])], 1),
            Err(ChangeError::BadSignature { .. })
        ));
    }

    #[test]
    fn past_64_actors_in_a_batch_every_change_is_checked() {
        let doc = DocId::new("cover/many").unwrap();
        let mut batch = Vec::new();
        for _ in 0..70 {
            batch.extend(chain(&Identity::generate(), 1, &doc, 2));
        }
        let got = verify_docs_covered(vec![(doc, batch)], 2).unwrap();
        let flags = checked(&got[0].1);
        // The first 64 actors: one of two checked; the last 6: both.
        assert_eq!(flags[..128].iter().filter(|c| **c).count(), 64);
        assert!(flags[128..].iter().all(|c| *c));
    }
}
