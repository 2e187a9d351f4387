//! Signed snapshots: a whole document as one compressed Automerge document chunk, with the
//! signature of the newest change of each of its actors.
//!
//! A replica that misses thousands of changes of one document catches up from a snapshot in
//! one message: loading a saved document costs a fraction of applying its changes one by one
//! (`docs/BENCHMARKS.md`), and it carries one signature per actor instead of one per change.
//!
//! Why one signature per actor authenticates every change: a change's hash covers its
//! dependencies' hashes, so the newest signed change of an actor fixes, byte for byte, every
//! change in its history. [`verify`] checks that every change of each actor is in the history
//! of that actor's signed change (or is it), and that no actor has two changes with one
//! sequence number: a change the hub made up under an author's actor is either outside that
//! history (refused: [`ChangeError::NotCovered`]) or replaces a change inside it (then the
//! signed change's hash no longer matches its signature). What this rests on, beyond what a
//! per-change signature rests on, is SHA-256's collision resistance.

use std::collections::HashMap;

use automerge::Automerge;
use serde::{Deserialize, Serialize};

use crate::change::author_of;
use crate::error::ChangeError;
use crate::ids::{ChangeHash, DocId, PeerId};

/// The most steps (actors x (changes + dependency edges)) [`verify`] walks to check
/// coverage: about 0.1 s. A document past it is sent as changes instead.
pub const MAX_COVERAGE_STEPS: u64 = 1 << 25;

/// The most a snapshot's columns may take once inflated. Automerge inflates a document's
/// deflated columns with no bound, so a snapshot of a few MB could otherwise ask for gigabytes;
/// a real one inflates 5 to 10 times (a 6 MiB snapshot to about 60 MiB).
pub const MAX_INFLATED_BYTES: u64 = 128 * 1024 * 1024;

/// The first bytes of every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// One actor's newest change in a snapshot and its author's signature of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// The change hash.
    pub hash: ChangeHash,
    /// ed25519 signature over [`signing_message`](crate::change::signing_message) for the snapshot's document.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedHead({})", self.hash)
    }
}

/// A document as sent in one piece: `Automerge::save` output and the newest signed change of
/// every actor in it. Not trusted until [`verify`] checks it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// One Automerge document chunk, nothing after it.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// One per actor of the document.
    pub signed: Vec<SignedHead>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Snapshot({} bytes, {} signed heads)",
            self.data.len(),
            self.signed.len()
        )
    }
}

/// A snapshot whose every change is covered by its author's signature, for one document.
pub struct VerifiedSnapshot {
    doc: DocId,
    automerge: Automerge,
    snapshot: Snapshot,
    changes: usize,
}

impl std::fmt::Debug for VerifiedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VerifiedSnapshot({}, {} changes)",
            self.doc, self.changes
        )
    }
}

impl VerifiedSnapshot {
    /// The document it was verified for.
    pub fn doc(&self) -> &DocId {
        &self.doc
    }
    /// The loaded document.
    pub fn automerge(&self) -> &Automerge {
        &self.automerge
    }
    /// How many changes it holds.
    pub fn changes(&self) -> usize {
        self.changes
    }
    /// The bytes and signatures as received, to store.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
    /// Consumes it into the loaded document and what was received.
    pub fn into_parts(self) -> (Automerge, Snapshot) {
        (self.automerge, self.snapshot)
    }
}

/// Why a snapshot cannot be made of a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MakeError {
    /// The newest change of an actor has no known signature.
    #[error("no signature is known for change {0}, the newest of its actor")]
    Unsigned(ChangeHash),
    /// Checking it would take more than [`MAX_COVERAGE_STEPS`].
    #[error("{actors} actors x {changes} changes is over the snapshot bound")]
    TooLarge {
        /// Actors in the document.
        actors: usize,
        /// Changes in the document.
        changes: usize,
    },
}

/// What the coverage walk costs at most: one pass over every change and dependency edge per
/// actor.
fn walk_cost(actors: usize, metas: &[automerge::ChangeMetadata<'_>]) -> u64 {
    let edges: u64 = metas.iter().map(|m| m.deps.len() as u64).sum();
    (actors as u64).saturating_mul((metas.len() as u64).saturating_add(edges))
}

/// The newest change of every actor of a document, in the order actors first appear.
fn newest_per_actor(am: &Automerge) -> (Vec<ChangeHash>, usize, u64) {
    let metas = am.get_changes_meta(&[]);
    let mut at: HashMap<&[u8], usize> = HashMap::new();
    let mut newest: Vec<(u64, ChangeHash)> = Vec::new();
    for m in &metas {
        let slot = *at.entry(m.actor.to_bytes()).or_insert_with(|| {
            newest.push((0, ChangeHash([0; 32])));
            newest.len() - 1
        });
        if m.seq > newest[slot].0 {
            newest[slot] = (m.seq, m.hash.into());
        }
    }
    let cost = walk_cost(newest.len(), &metas);
    (
        newest.into_iter().map(|(_, h)| h).collect(),
        metas.len(),
        cost,
    )
}

/// A snapshot of `am` for `doc`: its saved bytes and, for every actor, the signature of its
/// newest change as `signature_of` knows it (the hub's log holds every change's).
pub fn make(
    am: &Automerge,
    mut signature_of: impl FnMut(&ChangeHash) -> Option<[u8; 64]>,
) -> Result<Snapshot, MakeError> {
    let (newest, changes, cost) = newest_per_actor(am);
    if cost > MAX_COVERAGE_STEPS {
        return Err(MakeError::TooLarge {
            actors: newest.len(),
            changes,
        });
    }
    let signed = newest
        .into_iter()
        .map(|hash| {
            signature_of(&hash)
                .map(|signature| SignedHead { hash, signature })
                .ok_or(MakeError::Unsigned(hash))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot {
        data: am.save(),
        signed,
    })
}

/// Signed heads as stored: 32 hash bytes and 64 signature bytes each.
pub fn encode_heads(heads: &[SignedHead]) -> Vec<u8> {
    let mut out = Vec::with_capacity(heads.len() * 96);
    for h in heads {
        out.extend_from_slice(&h.hash.0);
        out.extend_from_slice(&h.signature);
    }
    out
}

/// The inverse of [`encode_heads`]; `None` if the length is not a multiple of 96.
pub fn decode_heads(bytes: &[u8]) -> Option<Vec<SignedHead>> {
    if !bytes.len().is_multiple_of(96) {
        return None;
    }
    bytes
        .chunks_exact(96)
        .map(|c| {
            Some(SignedHead {
                hash: ChangeHash(c[..32].try_into().ok()?),
                signature: c[32..].try_into().ok()?,
            })
        })
        .collect()
}

/// Whether `data` is exactly one Automerge document chunk (a chunk after it would be applied
/// as changes, unchecked).
fn one_document_chunk(data: &[u8]) -> bool {
    if data.len() < 10 || data[..4] != MAGIC || data[8] != 0 {
        return false;
    }
    let mut len = 0u64;
    for (i, b) in data[9..].iter().take(10).enumerate() {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return ((9 + i + 1) as u64).checked_add(len) == Some(data.len() as u64);
        }
    }
    false
}

/// Checks, before Automerge inflates them, that the columns of a document chunk (one, as
/// [`one_document_chunk`] found) take at most [`MAX_INFLATED_BYTES`] inflated. Each deflated
/// column is inflated here into nothing, stopping at the bound.
fn inflated_within_bound(data: &[u8]) -> Result<(), String> {
    use std::io::Read;
    // Deflate packs at most 1,032 bytes into one: a snapshot this small cannot pass the bound.
    if (data.len() as u64).saturating_mul(1032) <= MAX_INFLATED_BYTES {
        return Ok(());
    }
    let mut r = crate::document::objects::Reader {
        bytes: data.get(9..).unwrap_or_default(),
    };
    r.uleb()?; // the chunk's length, checked already
    let actors = r.uleb()?;
    for _ in 0..actors {
        r.skip_prefixed()?;
    }
    let heads = r.uleb()?;
    r.take(heads.saturating_mul(32))?;
    let mut columns = Vec::new();
    for _ in 0..2 {
        // Change columns, then operation columns: (specification, length) each.
        let n = r.uleb()?;
        for _ in 0..n {
            columns.push((r.uleb()?, r.uleb()?));
        }
    }
    let mut total = 0u64;
    for (spec, len) in columns {
        let body = r.take(len)?;
        if spec & 0b1000 != 0 {
            let left = MAX_INFLATED_BYTES.saturating_sub(total);
            let mut inflater = flate2::read::DeflateDecoder::new(body).take(left + 1);
            let n = std::io::copy(&mut inflater, &mut std::io::sink())
                .map_err(|e| format!("a column does not inflate: {e}"))?;
            total = total.saturating_add(n);
        } else {
            total = total.saturating_add(len);
        }
        if total > MAX_INFLATED_BYTES {
            return Err(format!(
                "its columns inflate to more than {MAX_INFLATED_BYTES} bytes"
            ));
        }
    }
    Ok(())
}

/// Loads a document from bytes a peer sent. Automerge's loader asserts on some malformed
/// documents; where panics unwind, such a panic is caught here and the bytes refused, and
/// nothing else was touched (the document is new). Builds that abort on panic (wasm) never
/// load a peer's document: they do not ask for snapshots.
fn load_untrusted(data: &[u8]) -> Result<Automerge, ChangeError> {
    if !cfg!(panic = "unwind") {
        return Err(ChangeError::Malformed(
            "this build does not load snapshots (it aborts on panic)".into(),
        ));
    }
    load_guarded(data).map_err(|e| ChangeError::Malformed(format!("snapshot: {e}")))
}

/// `Automerge::load`, with an assertion inside it caught where panics unwind (a document read
/// from disk is input too: a damaged file must not panic the process). Builds that abort on
/// panic load unguarded.
pub(crate) fn load_guarded(data: &[u8]) -> Result<Automerge, String> {
    if !cfg!(panic = "unwind") {
        return Automerge::load(data).map_err(|e| e.to_string());
    }
    match std::panic::catch_unwind(|| Automerge::load(data)) {
        Ok(Ok(am)) => Ok(am),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the document does not load (Automerge asserted)".into()),
    }
}

/// Whether this build can load snapshots from peers (it unwinds on panic).
pub fn supported() -> bool {
    cfg!(panic = "unwind")
}

/// Checks a snapshot for `doc`: one document chunk that loads, every actor bound to a key,
/// one signed head per actor that is its newest change and verifies for `doc`, and every
/// change of an actor in the history of its signed head.
pub fn verify(doc: &DocId, snapshot: Snapshot) -> Result<VerifiedSnapshot, ChangeError> {
    if !one_document_chunk(&snapshot.data) {
        return Err(ChangeError::Malformed(
            "a snapshot must be exactly one Automerge document chunk".into(),
        ));
    }
    inflated_within_bound(&snapshot.data)
        .map_err(|e| ChangeError::Malformed(format!("snapshot: {e}")))?;
    let am = load_untrusted(&snapshot.data)?;
    let covered = check_coverage(doc, &am, &snapshot.signed)?;
    let heads: Vec<(ChangeHash, PeerId, [u8; 64])> = snapshot
        .signed
        .iter()
        .zip(&covered.authors)
        .map(|(h, a)| (h.hash, *a, h.signature))
        .collect();
    crate::change::verify_signed_hashes(doc, &heads)?;
    let changes = covered.changes;
    Ok(VerifiedSnapshot {
        doc: doc.clone(),
        automerge: am,
        snapshot,
        changes,
    })
}

/// The first change that is in the history of none of its actor's `sources` (indexes into
/// `metas`, per actor number of `of_actor`), if any: one walk per actor.
fn stray(
    metas: &[automerge::ChangeMetadata<'_>],
    index: &HashMap<automerge::ChangeHash, usize>,
    of_actor: &[usize],
    sources: &[Vec<usize>],
) -> Option<usize> {
    let mut seen = vec![usize::MAX; metas.len()];
    let mut stack = Vec::new();
    for (a, from) in sources.iter().enumerate() {
        for &i in from {
            if seen[i] != a {
                seen[i] = a;
                stack.push(i);
            }
        }
        while let Some(i) = stack.pop() {
            for d in &metas[i].deps {
                // Automerge loaded the document, so every dependency is in it.
                let Some(&j) = index.get(d) else { continue };
                if seen[j] != a {
                    seen[j] = a;
                    stack.push(j);
                }
            }
        }
        if let Some(i) = (0..metas.len()).find(|&i| of_actor[i] == a && seen[i] != a) {
            return Some(i);
        }
    }
    None
}

/// The first change of `am` that no signature in `signed` covers: neither signed itself nor
/// in the history of a signed change of its actor (an audit of a replica's store, where
/// changes inside a snapshot from the hub have no signature of their own). Bounded like
/// [`verify`]: past [`MAX_COVERAGE_STEPS`] it is an error.
pub fn uncovered(
    am: &Automerge,
    signed: &std::collections::HashSet<ChangeHash>,
) -> Result<Option<ChangeHash>, ChangeError> {
    let metas = am.get_changes_meta(&[]);
    let index: HashMap<automerge::ChangeHash, usize> =
        metas.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();
    let mut actor_no: HashMap<&[u8], usize> = HashMap::new();
    let mut of_actor = Vec::with_capacity(metas.len());
    let mut sources: Vec<Vec<usize>> = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        let a = *actor_no.entry(m.actor.to_bytes()).or_insert_with(|| {
            sources.push(Vec::new());
            sources.len() - 1
        });
        of_actor.push(a);
        if signed.contains(&ChangeHash::from(m.hash)) {
            sources[a].push(i);
        }
    }
    if walk_cost(sources.len(), &metas) > MAX_COVERAGE_STEPS {
        return Err(ChangeError::Malformed(format!(
            "{} actors x {} changes is over the verification bound",
            sources.len(),
            metas.len()
        )));
    }
    Ok(stray(&metas, &index, &of_actor, &sources).map(|i| metas[i].hash.into()))
}

/// What [`check_coverage`] found.
#[derive(Debug)]
pub struct Coverage {
    /// How many changes the document holds.
    pub changes: usize,
    /// The author of each signed head, in the order given.
    pub authors: Vec<PeerId>,
}

/// Checks that `signed` holds exactly the newest change of every actor of `am`, and that each
/// actor's changes are all in the history of its newest. Signatures are not checked here.
pub fn check_coverage(
    doc: &DocId,
    am: &Automerge,
    signed: &[SignedHead],
) -> Result<Coverage, ChangeError> {
    let metas = am.get_changes_meta(&[]);
    let index: HashMap<automerge::ChangeHash, usize> =
        metas.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();
    // Actors as small numbers; per actor its change count and highest sequence number.
    let mut actor_no: HashMap<&[u8], usize> = HashMap::new();
    let mut of_actor = Vec::with_capacity(metas.len());
    let mut counts: Vec<(u64, u64)> = Vec::new();
    for m in &metas {
        let a = match actor_no.get(m.actor.to_bytes()) {
            Some(&a) => a,
            None => {
                // Once per actor: a key's decompression costs microseconds.
                if author_of(&m.actor)
                    .and_then(|a| a.verifying_key())
                    .is_none()
                {
                    return Err(ChangeError::ActorNotBound {
                        hash: m.hash.into(),
                    });
                }
                counts.push((0, 0));
                actor_no.insert(m.actor.to_bytes(), counts.len() - 1);
                counts.len() - 1
            }
        };
        counts[a].0 += 1;
        counts[a].1 = counts[a].1.max(m.seq);
        of_actor.push(a);
    }
    let actors = counts.len();
    if walk_cost(actors, &metas) > MAX_COVERAGE_STEPS {
        return Err(ChangeError::Malformed(format!(
            "snapshot of {actors} actors x {} changes is over the verification bound",
            metas.len()
        )));
    }
    // Sequence numbers 1..=n, each once: n changes whose highest number is n, none twice
    // (Automerge indexes an actor's changes by number, so a repeat cannot load twice).
    if let Some(a) = counts.iter().position(|&(n, max)| n != max) {
        return Err(ChangeError::Malformed(format!(
            "snapshot: actor {a} has {} changes numbered up to {}",
            counts[a].0, counts[a].1
        )));
    }
    // Operation numbering per actor, as `Document` checks it for changes one by one (where
    // Automerge asserts instead of refusing): each change's first operation number above its
    // actor's previous change's last.
    let mut numbering: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); actors];
    for (m, &a) in metas.iter().zip(&of_actor) {
        numbering[a].push((m.seq, m.start_op, m.max_op));
    }
    for (a, mut ops) in numbering.into_iter().enumerate() {
        ops.sort_unstable();
        if let Some(w) = ops.windows(2).find(|w| w[1].1 <= w[0].2) {
            return Err(ChangeError::Malformed(format!(
                "snapshot: actor {a}'s change {} starts at operation {}, not above {}",
                w[1].0, w[1].1, w[0].2
            )));
        }
    }
    if signed.len() != actors {
        return Err(ChangeError::Malformed(format!(
            "snapshot: {} signed heads for {actors} actors",
            signed.len()
        )));
    }
    let mut head_of = vec![usize::MAX; actors];
    let mut authors = Vec::with_capacity(actors);
    for h in signed {
        let Some(&i) = index.get(&automerge::ChangeHash::from(h.hash)) else {
            return Err(ChangeError::Malformed(format!(
                "snapshot: signed head {} is not in the document",
                h.hash
            )));
        };
        let a = of_actor[i];
        if metas[i].seq != counts[a].1 || head_of[a] != usize::MAX {
            return Err(ChangeError::Malformed(format!(
                "snapshot: signed head {} is not the one newest change of its actor",
                h.hash
            )));
        }
        head_of[a] = i;
        authors
            .push(author_of(&metas[i].actor).ok_or(ChangeError::ActorNotBound { hash: h.hash })?);
    }
    let sources: Vec<Vec<usize>> = head_of.iter().map(|&i| vec![i]).collect();
    if let Some(i) = stray(&metas, &index, &of_actor, &sources) {
        return Err(ChangeError::NotCovered {
            doc: doc.clone(),
            hash: metas[i].hash.into(),
        });
    }
    Ok(Coverage {
        changes: metas.len(),
        authors,
    })
}

#[cfg(test)]
mod tests {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;

    use super::*;
    use crate::change::{actor_for, signing_message};
    use crate::identity::Identity;

    /// Alice and Bob take turns on one document; every change's signature by its author.
    fn two_writers(n: usize) -> (DocId, Automerge, HashMap<ChangeHash, [u8; 64]>) {
        let doc = DocId::new("snap/test").expect("an id");
        let people = [Identity::from_seed([1; 32]), Identity::from_seed([2; 32])];
        let mut am = Automerge::new();
        let mut sigs = HashMap::new();
        for i in 0..n {
            let who = &people[i % 2];
            am.set_actor(actor_for(&who.peer_id(), [7; 8]));
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, format!("k{}", i % 5), i as i64)
                .expect("a put");
            let (hash, _) = tx.commit();
            let hash = ChangeHash::from(hash.expect("a change"));
            sigs.insert(hash, who.sign(&signing_message(&doc, &hash)));
        }
        (doc, am, sigs)
    }

    #[test]
    fn a_snapshot_verifies_with_one_signature_per_actor_and_loads_the_same_document() {
        let (doc, am, sigs) = two_writers(40);
        let snap = make(&am, |h| sigs.get(h).copied()).expect("a snapshot");
        assert_eq!(snap.signed.len(), 2, "one signed head per actor");
        let v = verify(&doc, snap).expect("it verifies");
        assert_eq!(v.changes(), 40);
        assert_eq!(v.automerge().get_heads(), am.get_heads());
        assert_eq!(v.automerge().hydrate(None), am.hydrate(None));
    }

    #[test]
    fn a_snapshot_for_another_document_or_with_an_altered_signature_is_refused() {
        let (doc, am, sigs) = two_writers(10);
        let snap = make(&am, |h| sigs.get(h).copied()).expect("a snapshot");
        let other = DocId::new("snap/other").expect("an id");
        assert!(matches!(
            verify(&other, snap.clone()),
            Err(ChangeError::BadSignature { .. })
        ));
        let mut bad = snap.clone();
        bad.signed[1].signature[3] ^= 1;
        assert!(matches!(
            verify(&doc, bad),
            Err(ChangeError::BadSignature { .. })
        ));
        let mut short = snap.clone();
        short.signed.pop();
        assert!(matches!(
            verify(&doc, short),
            Err(ChangeError::Malformed(_))
        ));
        let mut twice = snap;
        twice.signed[1] = twice.signed[0].clone();
        assert!(matches!(
            verify(&doc, twice),
            Err(ChangeError::Malformed(_))
        ));
    }

    #[test]
    fn a_change_the_hub_adds_under_an_authors_actor_is_refused() {
        let (doc, mut am, sigs) = two_writers(6);
        let heads_before = make(&am, |h| sigs.get(h).copied())
            .expect("a snapshot")
            .signed;
        // Mallory writes one more change as Alice's actor: Alice's newest change is then one
        // no signature covers, and passing her old head as the signed one is refused.
        am.set_actor(actor_for(&Identity::from_seed([1; 32]).peer_id(), [7; 8]));
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "forged", 1).expect("a put");
        tx.commit();
        assert!(make(&am, |h| sigs.get(h).copied()).is_err(), "unsigned");
        let forged = Snapshot {
            data: am.save(),
            signed: heads_before,
        };
        assert!(matches!(
            verify(&doc, forged),
            Err(ChangeError::Malformed(_))
        ));
    }

    #[test]
    fn a_change_outside_its_actors_signed_history_is_not_covered() {
        // Alice's second change is made on top of Bob's change alone, not on her first, then
        // renumbered as her second (only crafted bytes do this) and signed: her first change is
        // then in no signed history of hers.
        let doc = DocId::new("snap/test").expect("an id");
        let alice = Identity::from_seed([1; 32]);
        let bob = Identity::from_seed([2; 32]);
        let one_change = |am: &mut Automerge, who: &Identity, keys: &[&str]| {
            am.set_actor(actor_for(&who.peer_id(), [7; 8]));
            let mut tx = am.transaction();
            for k in keys {
                tx.put(automerge::ROOT, *k, 1).expect("a put");
            }
            let hash = tx.commit().0.expect("a change");
            am.get_change_by_hash(&hash).expect("held")
        };
        let a1 = one_change(&mut Automerge::new(), &alice, &["a"]);
        let b1 = one_change(&mut Automerge::new(), &bob, &["b0", "b1", "b2", "b3"]);
        let mut on_b = Automerge::new();
        on_b.apply_changes([b1.clone()]).expect("applies");
        let a2 = crate::change::renumbered(&one_change(&mut on_b, &alice, &["c"]), 2);
        let mut crafted = Automerge::new();
        crafted
            .apply_changes([a1.clone(), b1.clone(), a2.clone()])
            .expect("applies");
        let signed = [(&alice, &a2), (&bob, &b1)]
            .into_iter()
            .map(|(who, c)| {
                let hash = ChangeHash::from(c.hash());
                SignedHead {
                    hash,
                    signature: who.sign(&signing_message(&doc, &hash)),
                }
            })
            .collect();
        let snap = Snapshot {
            data: crafted.save(),
            signed,
        };
        let got = verify(&doc, snap);
        assert!(
            matches!(got, Err(ChangeError::NotCovered { hash, .. }) if hash == ChangeHash::from(a1.hash())),
            "{got:?}"
        );
    }

    #[test]
    fn a_snapshot_whose_columns_inflate_past_the_bound_is_refused_before_it_is_loaded() {
        use std::io::Write;
        let doc = DocId::new("snap/test").expect("an id");
        // One deflated change column of zeros, twice the bound, in about 260 KB.
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..2 * (MAX_INFLATED_BYTES >> 20) {
            enc.write_all(&zeros).expect("in memory");
        }
        let bomb = enc.finish().expect("in memory");
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let uleb = |n: u64, out: &mut Vec<u8>| crate::fuzzing::push_uleb(out, n);
        // No actors, no heads, one change column (id 1, deflated), no operation columns.
        let mut body = vec![0, 0, 1];
        uleb((1 << 4) | 0b1000, &mut body);
        uleb(bomb.len() as u64, &mut body);
        body.push(0);
        body.extend_from_slice(&bomb);
        let mut data = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 0];
        uleb(body.len() as u64, &mut data);
        data.extend_from_slice(&body);
        let got = verify(
            &doc,
            Snapshot {
                data,
                signed: Vec::new(),
            },
        );
        assert!(
            matches!(&got, Err(ChangeError::Malformed(m)) if m.contains("inflate to more than")),
            "{got:?}"
        );
        // A real snapshot is within it.
        let (_, am, sigs) = two_writers(30);
        let snap = make(&am, |h| sigs.get(h).copied()).expect("a snapshot");
        assert!(inflated_within_bound(&snap.data).is_ok());
    }

    #[test]
    fn damaged_snapshot_bytes_are_refused_never_a_panic() {
        let (doc, am, sigs) = two_writers(30);
        let snap = make(&am, |h| sigs.get(h).copied()).expect("a snapshot");
        // The damage a hostile hub can send: any bytes, under a correct checksum (bytes 4..8,
        // the start of the SHA-256 of what follows them), so the loader parses them.
        let reseal = |data: &mut Vec<u8>| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&data[8..]);
            data[4..8].copy_from_slice(&digest[..4]);
        };
        let mut refused = 0;
        for at in 8..snap.data.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = snap.clone();
                bad.data[at] ^= flip;
                reseal(&mut bad.data);
                if verify(&doc, bad).is_err() {
                    refused += 1;
                }
            }
        }
        assert!(
            refused > snap.data.len(),
            "most damage is refused: {refused}"
        );
        let mut trailing = snap.clone();
        trailing
            .data
            .extend_from_slice(am.get_changes(&[])[0].raw_bytes());
        assert!(matches!(
            verify(&doc, trailing),
            Err(ChangeError::Malformed(_))
        ));
        for len in 0..snap.data.len() {
            let mut cut = snap.clone();
            cut.data.truncate(len);
            assert!(verify(&doc, cut).is_err(), "cut at {len}");
        }
    }
}
