//! One Automerge document: apply the shared operation set in a transaction, apply remote
//! changes in batches, read it as JSON.

use automerge::transaction::Transactable;
use std::collections::{HashMap, HashSet, VecDeque};

use automerge::{ActorId, Automerge, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue};
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::ids::{ChangeHash, DocId};
use crate::ops::{MAX_DEPTH, Op, PathElem, Value, path_to_string};

pub(crate) mod objects;

/// A document held by a replica.
pub struct Document {
    id: DocId,
    doc: Automerge,
    /// Per actor, its last change in `doc` (built on first need).
    seqs: Option<HashMap<ActorId, Last>>,
    /// Changes whose dependencies have not all arrived. They are kept out of Automerge's own
    /// queue, which would apply them later without [`Document::apply_changes`]'s checks.
    waiting: Vec<automerge::Change>,
}

/// An actor's last change in a document: its sequence number and its last operation.
#[derive(Clone, Copy, Debug, Default)]
struct Last {
    seq: u64,
    max_op: u64,
}

/// A remote change [`Document::apply_changes`] will not apply. An actor's changes must be
/// numbered 1, 2, 3... in causal order, each with operations numbered after its previous
/// change's, and may refer only to actors whose changes came before. Only a damaged or
/// copied store, or a hostile author, signs a change that breaks this; Automerge asserts
/// these rules instead of returning errors (it would panic), so such a change is refused
/// before Automerge sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The change.
    pub hash: ChangeHash,
    /// The rule it breaks.
    pub reason: RefusedReason,
}

/// Why a change was [`Refused`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusedReason {
    /// Its sequence number is not its actor's next.
    Numbering {
        /// Its sequence number.
        seq: u64,
        /// The number its actor's next change must have.
        expected: u64,
    },
    /// Its operations are not numbered after its actor's previous change's.
    OpsReused {
        /// Its first operation's number.
        start_op: u64,
        /// The last operation number of its actor's previous change.
        previous_max_op: u64,
    },
    /// It refers to an actor (hex) none of whose changes came before it.
    UnknownActor(String),
    /// An operation acts on an object (`counter@actor`) that neither the document, nor the
    /// change, nor one applied before it in the same batch creates.
    UnknownObject(String),
    /// An operation's key is an element (`counter@actor`) of a list or text (`object`) that
    /// neither the document, nor the change, nor one before it in the batch inserts.
    UnknownElement {
        /// The list or text.
        object: String,
        /// The element named.
        element: String,
    },
    /// Its operations name what its columns cannot hold (an actor index past its actors, an
    /// object half named): what Automerge's parser does not check.
    Malformed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hash = self.hash;
        match &self.reason {
            RefusedReason::Numbering { seq, expected } => write!(
                f,
                "change {hash} has sequence number {seq} where its actor's next change is \
                 number {expected}"
            )?,
            RefusedReason::OpsReused {
                start_op,
                previous_max_op,
            } => write!(
                f,
                "change {hash} starts at operation {start_op}, not after its actor's previous \
                 change (which ends at {previous_max_op})"
            )?,
            RefusedReason::UnknownActor(actor) => write!(
                f,
                "change {hash} refers to actor {actor}, none of whose changes came before it"
            )?,
            RefusedReason::UnknownObject(obj) => write!(
                f,
                "change {hash} acts on object {obj}, which no change before it creates"
            )?,
            RefusedReason::UnknownElement { object, element } => write!(
                f,
                "change {hash} names element {element} of {object}, which no change before it \
                 inserts"
            )?,
            RefusedReason::Malformed(what) => write!(f, "change {hash} is malformed: {what}")?,
        }
        f.write_str(
            ": its author's store was damaged or copied, or the author is hostile; it is not \
             applied",
        )
    }
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Document({})", self.id)
    }
}

/// What one applied change did, as reported to observers.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PatchSummary {
    /// The path of the property that changed.
    pub path: Vec<PathElem>,
    /// `put`, `delete`, `insert`, `splice`, `increment`, `conflict` or `mark`.
    pub action: &'static str,
}

impl Document {
    /// An empty document that writes with `actor`.
    pub fn new(id: DocId, actor: automerge::ActorId) -> Self {
        Document::wrap(id, Automerge::new().with_actor(actor))
    }

    fn wrap(id: DocId, doc: Automerge) -> Self {
        Document {
            id,
            doc,
            seqs: None,
            waiting: Vec::new(),
        }
    }

    /// A document from a saved snapshot (or empty) plus changes not in the snapshot. Stored
    /// changes Automerge cannot take ([`Refused`]: only a store written before they were
    /// refused holds one) are left out, with a warning.
    pub(crate) fn load(
        id: DocId,
        actor: automerge::ActorId,
        snapshot: Option<&[u8]>,
        changes: Vec<automerge::Change>,
    ) -> Result<Self> {
        let mut doc = match snapshot {
            Some(bytes) => {
                crate::snapshot::load_guarded(bytes).map_err(|reason| Error::Corrupt {
                    what: format!("snapshot of {id}"),
                    reason,
                })?
            }
            None => Automerge::new(),
        };
        doc.set_actor(actor);
        let mut d = Document::wrap(id, doc);
        for r in d.apply_changes(changes)? {
            tracing::warn!(doc = %d.id, "a stored change is left out: {r}");
        }
        Ok(d)
    }

    /// A read-only document built from verified changes (an audit of a hub's log: the hub
    /// holds no materialized documents). A change that cannot be applied ([`Refused`]) is
    /// an error naming it.
    pub fn from_changes(id: DocId, changes: Vec<crate::change::VerifiedChange>) -> Result<Self> {
        let mut d = Document::wrap(id, Automerge::new());
        let changes = changes
            .into_iter()
            .map(crate::change::VerifiedChange::into_automerge)
            .collect();
        if let Some(r) = d.apply_changes(changes)?.into_iter().next() {
            return Err(Error::InvalidOperation {
                doc: d.id.clone(),
                reason: r.to_string(),
            });
        }
        Ok(d)
    }

    /// The document's id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The hashes of the changes no other change depends on.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc
            .get_heads()
            .into_iter()
            .map(ChangeHash::from)
            .collect()
    }

    /// The underlying Automerge document, for reads the JSON view does not give.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// Whether the document holds the change.
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        holds(&self.doc, &(*hash).into())
    }

    /// Hashes among `hashes` the document does not hold.
    pub fn missing(&self, hashes: &[ChangeHash]) -> Vec<ChangeHash> {
        hashes
            .iter()
            .filter(|h| !self.has_change(h))
            .copied()
            .collect()
    }

    /// The changes that are not ancestors of `have` (the hashes of `have` this document does not
    /// know are ignored, so the answer may hold changes the other side already has).
    pub fn changes_since(&self, have: &[ChangeHash]) -> Vec<automerge::Change> {
        let known: Vec<automerge::ChangeHash> = have
            .iter()
            .filter(|h| self.has_change(h))
            .map(|h| (*h).into())
            .collect();
        self.doc.get_changes(&known)
    }

    /// [`Document::apply_ops_at`] at time 0.
    #[cfg(test)]
    pub(crate) fn apply_ops(&mut self, ops: &[Op]) -> Result<Option<automerge::Change>> {
        self.apply_ops_at(ops, 0)
    }

    /// Applies `ops` as one transaction stamped `time_ms` (milliseconds since the Unix
    /// epoch). Nothing is applied if one op fails. Returns the new change, or `None` if the
    /// ops changed nothing.
    pub(crate) fn apply_ops_at(
        &mut self,
        ops: &[Op],
        time_ms: i64,
    ) -> Result<Option<automerge::Change>> {
        self.apply_ops_logged(ops, time_ms, None)
    }

    /// [`Document::apply_ops_at`], adding to `patches` what the change did: the patches of a
    /// [`diff`](Self::diff) from the heads before to the heads after. Where the ops touch
    /// distinct map keys (the common write: a few values set), they are logged while the
    /// change is made, at the cost of the ops; a diff walks the document, whose cost grows
    /// with it. Otherwise (a list edited, a key written twice) they come from a diff, since
    /// a log would report each step (a put, then another put of the same key) where the diff
    /// reports what the change did in all.
    pub(crate) fn apply_ops_logged(
        &mut self,
        ops: &[Op],
        time_ms: i64,
        patches: Option<&mut Vec<PatchSummary>>,
    ) -> Result<Option<automerge::Change>> {
        let id = self.id.clone();
        let before = self.doc.get_heads();
        let logged = patches.is_some() && distinct_keys(ops);
        let mut tx = self
            .doc
            .transaction_log_patches(automerge::PatchLog::new(logged));
        for op in ops {
            if let Err(e) = apply_op(&mut tx, &id, op) {
                tx.rollback();
                return Err(e);
            }
        }
        let (_, mut log) =
            tx.commit_with(automerge::transaction::CommitOptions::default().with_time(time_ms));
        if self.doc.get_heads() == before {
            return Ok(None);
        }
        if let Some(patches) = patches {
            if logged {
                patches.extend(self.doc.make_patches(&mut log).into_iter().map(summary));
            } else {
                let after = self.doc.get_heads();
                patches.extend(self.doc.diff(&before, &after).into_iter().map(summary));
            }
        }
        let change = self.doc.get_last_local_change();
        if let (Some(seqs), Some(c)) = (self.seqs.as_mut(), &change) {
            seqs.insert(
                c.actor_id().clone(),
                Last {
                    seq: c.seq(),
                    max_op: c.max_op(),
                },
            );
        }
        Ok(change)
    }

    /// Takes `loaded` (a verified snapshot's document) as this document's base. The changes
    /// this document holds that `loaded` lacks (unacknowledged writes, changes from
    /// elsewhere), and those waiting here, are applied on top of it, checked; returns those
    /// refused there.
    pub(crate) fn rebase_on(&mut self, mut loaded: Automerge) -> Result<Vec<Refused>> {
        let holds_all = self.doc.get_heads().iter().all(|h| holds(&loaded, h));
        let mut changes: Vec<automerge::Change> = if holds_all {
            Vec::new()
        } else {
            self.doc
                .get_changes(&[])
                .into_iter()
                .filter(|c| !holds(&loaded, &c.hash()))
                .collect()
        };
        changes.append(&mut self.waiting);
        loaded.set_actor(self.doc.get_actor().clone());
        self.doc = loaded;
        self.seqs = None;
        self.apply_changes(changes)
    }

    /// Applies remote changes (already verified) in one batch, in causal order. Changes whose
    /// dependencies are missing wait here until they arrive; changes whose actor's numbering
    /// they break are not applied and are returned (see [`Refused`]).
    pub(crate) fn apply_changes(
        &mut self,
        changes: Vec<automerge::Change>,
    ) -> Result<Vec<Refused>> {
        self.apply_changes_logged(changes, None)
    }

    /// [`apply_changes`](Self::apply_changes), adding to `patches` what the changes applied
    /// did, as [`diff`](Self::diff) from the heads before to the heads after would: logged
    /// while Automerge applies them, which costs a fraction of a diff afterwards (that walks
    /// the document between two clocks).
    pub(crate) fn apply_changes_patched(
        &mut self,
        changes: Vec<automerge::Change>,
        patches: &mut Vec<PatchSummary>,
    ) -> Result<Vec<Refused>> {
        self.apply_changes_logged(changes, Some(patches))
    }

    fn apply_changes_logged(
        &mut self,
        changes: Vec<automerge::Change>,
        patches: Option<&mut Vec<PatchSummary>>,
    ) -> Result<Vec<Refused>> {
        let mut candidates = std::mem::take(&mut self.waiting);
        candidates.extend(changes);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let doc = &self.doc;
        let seqs = self.seqs.get_or_insert_with(|| actor_seqs(doc));
        let (ready, waiting, refused) = causal_order(doc, seqs, candidates);
        self.waiting = waiting;
        if ready.is_empty() {
            return Ok(refused);
        }
        let mut log = automerge::PatchLog::new(patches.is_some());
        if let Err(source) = self.doc.apply_changes_log_patches(ready, &mut log) {
            // Some of the batch may be in: count again from the document at the next call.
            self.seqs = None;
            return Err(Error::Automerge {
                doc: self.id.clone(),
                source: Box::new(source),
            });
        }
        if let Some(patches) = patches {
            patches.extend(self.doc.make_patches(&mut log).into_iter().map(summary));
        }
        Ok(refused)
    }

    /// Every change of the document, in causal order (a change after those it depends on).
    pub fn changes(&self) -> Vec<automerge::Change> {
        self.doc.get_changes(&[])
    }

    /// The document as it was at `heads` (time travel: Automerge keeps the history). Every
    /// head must be a change of this document.
    pub fn at(&self, heads: &[ChangeHash]) -> Result<Document> {
        if let Some(unknown) = heads.iter().find(|h| !self.has_change(h)) {
            return Err(Error::InvalidOperation {
                doc: self.id.clone(),
                reason: format!("change {unknown} is not in this document: give heads it holds"),
            });
        }
        let heads: Vec<automerge::ChangeHash> = heads.iter().map(|h| (*h).into()).collect();
        let doc = self
            .doc
            .fork_at(&heads)
            .map_err(|source| Error::Automerge {
                doc: self.id.clone(),
                source: Box::new(source),
            })?;
        Ok(Document::wrap(self.id.clone(), doc))
    }

    /// The heads of the document as it was at `time_ms` (milliseconds since the Unix epoch):
    /// the changes their authors stamped at or before it, with what they depend on (an author
    /// whose clock ran behind brings its dependencies along).
    pub fn heads_at_time(&self, time_ms: i64) -> Vec<ChangeHash> {
        let changes = self.changes();
        let by_hash: std::collections::HashMap<automerge::ChangeHash, &automerge::Change> =
            changes.iter().map(|c| (c.hash(), c)).collect();
        let mut included: std::collections::HashSet<automerge::ChangeHash> =
            std::collections::HashSet::new();
        let mut stack: Vec<automerge::ChangeHash> = changes
            .iter()
            .filter(|c| c.timestamp() <= time_ms)
            .map(|c| c.hash())
            .collect();
        while let Some(h) = stack.pop() {
            if included.insert(h)
                && let Some(c) = by_hash.get(&h)
            {
                stack.extend(c.deps().iter().copied());
            }
        }
        let depended: std::collections::HashSet<automerge::ChangeHash> = included
            .iter()
            .filter_map(|h| by_hash.get(h))
            .flat_map(|c| c.deps().iter().copied())
            .collect();
        let mut heads: Vec<ChangeHash> = included
            .iter()
            .filter(|h| !depended.contains(h))
            .map(|h| ChangeHash::from(*h))
            .collect();
        heads.sort();
        heads
    }

    /// A compact snapshot of the whole document.
    pub(crate) fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// What changed between two sets of heads, for observers.
    pub fn diff(&self, before: &[ChangeHash], after: &[ChangeHash]) -> Vec<PatchSummary> {
        let b: Vec<automerge::ChangeHash> = before.iter().map(|h| (*h).into()).collect();
        let a: Vec<automerge::ChangeHash> = after.iter().map(|h| (*h).into()).collect();
        self.doc.diff(&b, &a).into_iter().map(summary).collect()
    }

    /// The document as plain JSON: counters as numbers, text as strings, timestamps as
    /// milliseconds, bytes as base64 strings.
    pub fn to_json(&self) -> serde_json::Value {
        render(&self.doc, &ROOT, ObjType::Map, 0)
    }

    /// The value at `path` as plain JSON, or `None` if nothing is there.
    pub fn get_json(&self, path: &[PathElem]) -> Option<serde_json::Value> {
        let mut obj = ROOT;
        let mut value: Option<(automerge::Value<'_>, ObjId)> = None;
        for elem in path {
            if let Some((v, id)) = &value {
                match v {
                    automerge::Value::Object(_) => obj = id.clone(),
                    automerge::Value::Scalar(_) => return None,
                }
            }
            let prop = match elem {
                PathElem::Key(k) => Prop::Map(k.clone()),
                PathElem::Index(i) => Prop::Seq(usize::try_from(*i).ok()?),
            };
            value = self.doc.get(&obj, prop).ok()?;
            value.as_ref()?;
        }
        match value {
            None => Some(self.to_json()),
            Some((automerge::Value::Object(t), id)) => Some(render(&self.doc, &id, t, 0)),
            Some((automerge::Value::Scalar(s), _)) => Some(scalar_json(&s)),
        }
    }

    /// The top-level entries of the document with their CRDT types (counters as counters,
    /// text as text, nested maps and lists as values): what a rolling document's next bucket
    /// starts from. Values nested deeper than [`MAX_DEPTH`] are cut there.
    pub fn root_values(&self) -> Vec<(String, Value)> {
        self.doc
            .map_range(&ROOT, ..)
            .map(|item| {
                let id = item.id();
                (
                    item.key.to_string(),
                    typed(&self.doc, item.value.into(), id, 0),
                )
            })
            .collect()
    }
}

fn typed(doc: &Automerge, v: automerge::Value<'_>, id: ObjId, depth: usize) -> Value {
    let t = match v {
        automerge::Value::Scalar(s) => return typed_scalar(&s),
        automerge::Value::Object(_) if depth >= MAX_DEPTH => return Value::Null,
        automerge::Value::Object(t) => t,
    };
    match t {
        ObjType::Map | ObjType::Table => Value::Map(
            doc.map_range(&id, ..)
                .map(|item| {
                    let child = item.id();
                    let v = typed(doc, item.value.into(), child, depth + 1);
                    (item.key.to_string(), v)
                })
                .collect(),
        ),
        ObjType::List => Value::List(
            doc.list_range(&id, ..)
                .map(|item| {
                    let child = item.id();
                    typed(doc, item.value.into(), child, depth + 1)
                })
                .collect(),
        ),
        ObjType::Text => Value::Text(doc.text(&id).unwrap_or_default()),
    }
}

fn typed_scalar(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Bytes(b) => Value::Bytes(b.clone()),
        ScalarValue::Str(s) => Value::Str(s.to_string()),
        ScalarValue::Int(i) => Value::Int(*i),
        ScalarValue::Uint(u) => i64::try_from(*u).map_or(Value::Float(*u as f64), Value::Int),
        ScalarValue::F64(f) => Value::Float(*f),
        ScalarValue::Counter(c) => Value::Counter(i64::from(c)),
        ScalarValue::Timestamp(t) => Value::Timestamp(*t),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
    }
}

/// What an Automerge patch did, for observers: the path to the value and the action.
fn summary(p: automerge::Patch) -> PatchSummary {
    use automerge::PatchAction as A;
    let mut path: Vec<PathElem> = p.path.iter().map(|(_, prop)| prop_elem(prop)).collect();
    let (last, action) = match &p.action {
        A::PutMap { key, .. } => (Some(PathElem::Key(key.clone())), "put"),
        A::PutSeq { index, .. } => (Some(PathElem::Index(*index as i64)), "put"),
        A::Insert { index, .. } => (Some(PathElem::Index(*index as i64)), "insert"),
        A::SpliceText { index, .. } => (Some(PathElem::Index(*index as i64)), "splice"),
        A::Increment { prop, .. } => (Some(prop_elem(prop)), "increment"),
        A::Conflict { prop } => (Some(prop_elem(prop)), "conflict"),
        A::DeleteMap { key } => (Some(PathElem::Key(key.clone())), "delete"),
        A::DeleteSeq { index, .. } => (Some(PathElem::Index(*index as i64)), "delete"),
        A::Mark { .. } => (None, "mark"),
    };
    path.extend(last);
    PatchSummary { path, action }
}

/// Whether `ops` only put, delete or increment map keys, none of them twice or inside another:
/// a change whose logged patches are those of a diff.
fn distinct_keys(ops: &[Op]) -> bool {
    let paths: Option<Vec<&[PathElem]>> = ops
        .iter()
        .map(|op| match op {
            Op::Put { path, .. } | Op::Delete { path } | Op::Increment { path, .. } => {
                Some(path.as_slice())
            }
            Op::Insert { .. } | Op::Splice { .. } => None,
        })
        .collect();
    let Some(paths) = paths else {
        return false;
    };
    paths.iter().enumerate().all(|(i, p)| {
        p.iter().all(|e| matches!(e, PathElem::Key(_)))
            && paths[..i]
                .iter()
                .all(|q| !p.starts_with(q) && !q.starts_with(p))
    })
}

fn prop_elem(prop: &Prop) -> PathElem {
    match prop {
        Prop::Map(k) => PathElem::Key(k.clone()),
        Prop::Seq(i) => PathElem::Index(*i as i64),
    }
}

fn render(doc: &Automerge, obj: &ObjId, t: ObjType, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return serde_json::json!({"$error": "nested too deep to render"});
    }
    let child = |v: automerge::Value<'_>, id: ObjId| match v {
        automerge::Value::Object(t) => render(doc, &id, t, depth + 1),
        automerge::Value::Scalar(s) => scalar_json(&s),
    };
    match t {
        ObjType::Map | ObjType::Table => J::Object(
            doc.map_range(obj, ..)
                .map(|item| {
                    let id = item.id();
                    (item.key.to_string(), child(item.value.into(), id))
                })
                .collect(),
        ),
        ObjType::List => J::Array(
            doc.list_range(obj, ..)
                .map(|item| {
                    let id = item.id();
                    child(item.value.into(), id)
                })
                .collect(),
        ),
        ObjType::Text => J::String(doc.text(obj).unwrap_or_default()),
    }
}

fn scalar_json(s: &ScalarValue) -> serde_json::Value {
    use serde_json::json;
    match s {
        ScalarValue::Bytes(b) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ScalarValue::Str(s) => json!(s.as_str()),
        ScalarValue::Int(i) => json!(i),
        ScalarValue::Uint(u) => json!(u),
        ScalarValue::F64(f) => json!(f),
        ScalarValue::Counter(c) => json!(i64::from(c)),
        ScalarValue::Timestamp(t) => json!(t),
        ScalarValue::Boolean(b) => json!(b),
        ScalarValue::Null | ScalarValue::Unknown { .. } => serde_json::Value::Null,
    }
}

fn path_error(doc: &DocId, path: &[PathElem], reason: impl Into<String>) -> Error {
    Error::InvalidPath {
        doc: doc.clone(),
        path: path_to_string(path),
        reason: reason.into(),
    }
}

/// Follows `path` from the root to an object; returns it and its type.
fn resolve<T: Transactable>(tx: &T, doc: &DocId, path: &[PathElem]) -> Result<(ObjId, ObjType)> {
    let mut obj = ROOT;
    let mut t = ObjType::Map;
    for (i, elem) in path.iter().enumerate() {
        let prop = prop_for(tx, doc, &path[..=i], &obj, t, elem, false)?;
        match tx.get(&obj, prop) {
            Ok(Some((automerge::Value::Object(ct), id))) => {
                obj = id;
                t = ct;
            }
            Ok(Some((automerge::Value::Scalar(_), _))) => {
                return Err(path_error(
                    doc,
                    &path[..=i],
                    "is a value, not a map, list or text",
                ));
            }
            Ok(None) => return Err(path_error(doc, &path[..=i], "does not exist")),
            Err(e) => return Err(path_error(doc, &path[..=i], e.to_string())),
        }
    }
    Ok((obj, t))
}

/// Checks that `elem` addresses `obj` (a key for a map, an in-range index for a list) and
/// turns it into a prop. `append_ok` allows `-1` and `len` (insert).
fn prop_for<T: Transactable>(
    tx: &T,
    doc: &DocId,
    path: &[PathElem],
    obj: &ObjId,
    t: ObjType,
    elem: &PathElem,
    append_ok: bool,
) -> Result<Prop> {
    match (t, elem) {
        (ObjType::Map | ObjType::Table, PathElem::Key(k)) => Ok(Prop::Map(k.clone())),
        (ObjType::Map | ObjType::Table, PathElem::Index(_)) => Err(path_error(
            doc,
            path,
            "indexes a map with a number; use a string key",
        )),
        (ObjType::List, PathElem::Index(i)) => {
            let len = tx.length(obj);
            let idx = if append_ok && *i == -1 {
                len
            } else {
                usize::try_from(*i).unwrap_or(usize::MAX)
            };
            let limit = if append_ok {
                len
            } else {
                len.saturating_sub(1)
            };
            if idx > limit || (!append_ok && len == 0) {
                return Err(path_error(
                    doc,
                    path,
                    format!("index {i} is out of range (length {len})"),
                ));
            }
            Ok(Prop::Seq(idx))
        }
        (ObjType::List, PathElem::Key(_)) => {
            Err(path_error(doc, path, "uses a string key on a list"))
        }
        (ObjType::Text, _) => Err(path_error(doc, path, "goes inside text; use splice")),
    }
}

fn apply_op<T: Transactable>(tx: &mut T, doc: &DocId, op: &Op) -> Result<()> {
    let path = op.path();
    let am = |e: automerge::AutomergeError| Error::Automerge {
        doc: doc.clone(),
        source: Box::new(e),
    };
    match op {
        Op::Splice {
            index,
            delete,
            text,
            ..
        } => {
            let (obj, t) = resolve(tx, doc, path)?;
            if t != ObjType::Text {
                return Err(path_error(
                    doc,
                    path,
                    "is not text; splice needs a {\"$text\": ...} value",
                ));
            }
            let len = tx.length(&obj);
            if *index > len || *delete > len - index {
                return Err(Error::InvalidOperation {
                    doc: doc.clone(),
                    reason: format!(
                        "splice at {index} deleting {delete} is out of range (text length {len})"
                    ),
                });
            }
            tx.splice_text(&obj, *index, *delete as isize, text)
                .map_err(am)?;
            Ok(())
        }
        _ => {
            let (last, parent_path) = path.split_last().ok_or_else(|| {
                path_error(doc, path, "is empty; an operation needs a key or index")
            })?;
            let (parent, t) = resolve(tx, doc, parent_path)?;
            match op {
                Op::Put { value, .. } => {
                    let prop = prop_for(tx, doc, path, &parent, t, last, false)?;
                    put_value(tx, doc, &parent, prop, value, false)
                }
                Op::Insert { value, .. } => {
                    if t != ObjType::List {
                        return Err(path_error(
                            doc,
                            parent_path,
                            "is not a list; insert needs a list",
                        ));
                    }
                    let prop = prop_for(tx, doc, path, &parent, t, last, true)?;
                    put_value(tx, doc, &parent, prop, value, true)
                }
                Op::Delete { .. } => {
                    let prop = prop_for(tx, doc, path, &parent, t, last, false)?;
                    if tx.get(&parent, prop.clone()).map_err(am)?.is_none() {
                        return Err(path_error(doc, path, "does not exist"));
                    }
                    tx.delete(&parent, prop).map_err(am)
                }
                Op::Increment { by, .. } => {
                    let prop = prop_for(tx, doc, path, &parent, t, last, false)?;
                    match tx.get(&parent, prop.clone()).map_err(am)? {
                        Some((automerge::Value::Scalar(s), _))
                            if matches!(s.as_ref(), ScalarValue::Counter(_)) =>
                        {
                            tx.increment(&parent, prop, *by).map_err(am)
                        }
                        Some(_) => Err(path_error(
                            doc,
                            path,
                            "is not a counter; put {\"$counter\": 0} first",
                        )),
                        None => Err(path_error(doc, path, "does not exist")),
                    }
                }
                Op::Splice { .. } => unreachable!("handled above"),
            }
        }
    }
}

fn scalar(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Int(i) => ScalarValue::Int(*i),
        Value::Float(f) => ScalarValue::F64(*f),
        Value::Str(s) => ScalarValue::Str(s.as_str().into()),
        Value::Bytes(b) => ScalarValue::Bytes(b.clone()),
        Value::Counter(c) => ScalarValue::counter(*c),
        Value::Timestamp(t) => ScalarValue::Timestamp(*t),
        Value::Map(_) | Value::List(_) | Value::Text(_) => return None,
    })
}

fn put_value<T: Transactable>(
    tx: &mut T,
    doc: &DocId,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
    insert: bool,
) -> Result<()> {
    let am = |e: automerge::AutomergeError| Error::Automerge {
        doc: doc.clone(),
        source: Box::new(e),
    };
    if let Some(s) = scalar(value) {
        return match (insert, prop) {
            (true, Prop::Seq(i)) => tx.insert(obj, i, s).map_err(am),
            (_, prop) => tx.put(obj, prop, s).map_err(am),
        };
    }
    let t = match value {
        Value::Map(_) => ObjType::Map,
        Value::List(_) => ObjType::List,
        _ => ObjType::Text,
    };
    let child = match (insert, prop) {
        (true, Prop::Seq(i)) => tx.insert_object(obj, i, t).map_err(am)?,
        (_, prop) => tx.put_object(obj, prop, t).map_err(am)?,
    };
    match value {
        Value::Map(m) => {
            for (k, v) in m {
                put_value(tx, doc, &child, Prop::Map(k.clone()), v, false)?;
            }
        }
        Value::List(l) => {
            for (i, v) in l.iter().enumerate() {
                put_value(tx, doc, &child, Prop::Seq(i), v, true)?;
            }
        }
        Value::Text(s) => {
            tx.splice_text(&child, 0, 0, s).map_err(am)?;
        }
        _ => {}
    }
    Ok(())
}

/// Whether `doc` holds the change `hash`: a lookup in its change graph. (Automerge's
/// `get_change_meta_by_hash` builds the change's metadata to answer the same, which showed in
/// profiles of live changes.) `get_missing_deps` also counts what Automerge's own queue of
/// changes waiting for dependencies lacks, so this is only right while that queue is empty:
/// it is, for documents apply only causally ready changes (waiting ones wait in
/// `Document::waiting`) and load only single document chunks.
fn holds(doc: &Automerge, hash: &automerge::ChangeHash) -> bool {
    debug_assert!(
        doc.get_missing_deps(&[]).is_empty(),
        "Automerge's queue is not empty"
    );
    doc.get_missing_deps(std::slice::from_ref(hash)).is_empty()
}

/// Per actor, its last change in `doc`.
fn actor_seqs(doc: &Automerge) -> HashMap<ActorId, Last> {
    let mut seqs: HashMap<ActorId, Last> = HashMap::new();
    for m in doc.get_changes_meta(&[]) {
        let last = seqs.entry(m.actor.into_owned()).or_default();
        if m.seq > last.seq {
            *last = Last {
                seq: m.seq,
                max_op: m.max_op,
            };
        }
    }
    seqs
}

type OpKey = (u64, ActorId);

/// What the changes placed so far in a batch create (Automerge indexes all of it before it
/// applies any operation of the batch), and what the document was asked.
#[derive(Default)]
struct Placed {
    objects: HashSet<OpKey>,
    /// (list or text, element) for each element inserted.
    elements: HashSet<(OpKey, OpKey)>,
    /// The document's heads, once asked for.
    heads: Option<Vec<automerge::ChangeHash>>,
    /// Elements asked of the document, and whether it holds them in that list.
    asked: HashMap<(OpKey, OpKey), bool>,
}

impl Placed {
    /// Whether `doc` holds `elem` in the list or text `obj`. Automerge's fast lookup
    /// (`get_cursor_position` without heads) asserts when the operation is in another
    /// object, so it is asked at its heads: the lookup that walks the object. Once per
    /// element and batch.
    fn doc_holds(&mut self, doc: &Automerge, obj: &OpKey, elem: &OpKey) -> bool {
        let key = (obj.clone(), elem.clone());
        if let Some(&held) = self.asked.get(&key) {
            return held;
        }
        let heads = self.heads.get_or_insert_with(|| doc.get_heads());
        let name = format!("{}@{}", elem.0, elem.1.to_hex_string());
        let held = automerge::Cursor::try_from(name.as_str()).is_ok_and(|cursor| {
            let obj = ObjId::Id(obj.0, obj.1.clone(), usize::MAX);
            doc.get_cursor_position(obj, &cursor, Some(heads)).is_ok()
        });
        self.asked.insert(key, held);
        held
    }
}

/// Checks that `c` acts only on objects and list elements that `doc` holds, that the
/// changes before it in the batch create (`placed`), or that it creates itself, and records
/// what it creates. Automerge assumes all of it and panics otherwise.
fn place_objects(
    doc: &Automerge,
    placed: &mut Placed,
    c: &automerge::Change,
) -> std::result::Result<(), RefusedReason> {
    let found = objects::read(c).map_err(RefusedReason::Malformed)?;
    let actor = |index: usize| {
        match index {
            0 => Some(c.actor_id()),
            k => c.other_actor_ids().get(k - 1),
        }
        .ok_or_else(|| RefusedReason::Malformed(format!("an operation names actor {index}")))
    };
    let id = |(ctr, index): (u64, usize)| actor(index).map(|a| (ctr, a.clone()));
    let name = |(ctr, a): &OpKey| format!("{ctr}@{}", a.to_hex_string());
    for &obj in &found.touched {
        if obj.1 == 0 && found.made.contains(&obj.0) {
            continue;
        }
        let obj = id(obj)?;
        let held = placed.objects.contains(&obj)
            || doc
                .object_type(ObjId::Id(obj.0, obj.1.clone(), usize::MAX))
                .is_ok();
        if !held {
            return Err(RefusedReason::UnknownObject(name(&obj)));
        }
    }
    for &(obj, elem) in &found.elements {
        if elem.1 == 0 && found.inserted.contains(&(obj, elem.0)) {
            continue;
        }
        let (obj, elem) = (id(obj)?, id(elem)?);
        let held = placed.elements.contains(&(obj.clone(), elem.clone()))
            || (!placed.objects.contains(&obj) && placed.doc_holds(doc, &obj, &elem));
        if !held {
            return Err(RefusedReason::UnknownElement {
                object: name(&obj),
                element: name(&elem),
            });
        }
    }
    let author = c.actor_id();
    placed
        .objects
        .extend(found.made.iter().map(|&ctr| (ctr, author.clone())));
    for (obj, ctr) in found.inserted {
        placed.elements.insert((id(obj)?, (ctr, author.clone())));
    }
    Ok(())
}

/// Sorts `candidates` for Automerge: the changes it can apply now, in an order where each
/// comes after its dependencies and after its actor's previous change (`seqs` is advanced
/// over them); those still missing a dependency; those that break their actor's numbering
/// or name what is not there ([`place_objects`]).
/// Work proportional to the candidates and their dependencies (Kahn's algorithm), not to the
/// document.
fn causal_order(
    doc: &Automerge,
    seqs: &mut HashMap<ActorId, Last>,
    candidates: Vec<automerge::Change>,
) -> (Vec<automerge::Change>, Vec<automerge::Change>, Vec<Refused>) {
    let mut slots: Vec<Option<automerge::Change>> = Vec::with_capacity(candidates.len());
    let mut index: HashMap<automerge::ChangeHash, usize> = HashMap::new();
    for c in candidates {
        let h = c.hash();
        if index.contains_key(&h) || holds(doc, &h) {
            continue; // a duplicate, or already in the document
        }
        index.insert(h, slots.len());
        slots.push(Some(c));
    }
    // For each candidate, how many of its dependencies are candidates not yet placed; a
    // dependency that is neither here nor in the document keeps it waiting.
    let mut unplaced = vec![0usize; slots.len()];
    let mut blocked = vec![false; slots.len()];
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, slot) in slots.iter().enumerate() {
        let Some(c) = slot else { continue };
        for d in c.deps() {
            match index.get(d) {
                Some(&j) => {
                    unplaced[i] += 1;
                    dependents.entry(j).or_default().push(i);
                }
                None if holds(doc, d) => {}
                None => blocked[i] = true,
            }
        }
    }
    let mut queue: VecDeque<usize> = (0..slots.len())
        .filter(|&i| unplaced[i] == 0 && !blocked[i])
        .collect();
    let mut ready = Vec::new();
    let mut refused = Vec::new();
    let mut placed = Placed::default();
    while let Some(i) = queue.pop_front() {
        let Some(c) = slots[i].take() else { continue };
        let last = seqs.get(c.actor_id()).copied().unwrap_or_default();
        let broken = if c.seq() != last.seq + 1 {
            Some(RefusedReason::Numbering {
                seq: c.seq(),
                expected: last.seq + 1,
            })
        } else if c.start_op().get() <= last.max_op {
            Some(RefusedReason::OpsReused {
                start_op: c.start_op().get(),
                previous_max_op: last.max_op,
            })
        } else if let Some(a) = c.other_actor_ids().iter().find(|a| !seqs.contains_key(*a)) {
            Some(RefusedReason::UnknownActor(a.to_hex_string()))
        } else {
            place_objects(doc, &mut placed, &c).err()
        };
        if let Some(reason) = broken {
            refused.push(Refused {
                hash: ChangeHash::from(c.hash()),
                reason,
            });
            continue; // what depends on it waits for good
        }
        seqs.insert(
            c.actor_id().clone(),
            Last {
                seq: c.seq(),
                max_op: c.max_op(),
            },
        );
        for &j in dependents.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            unplaced[j] -= 1;
            if unplaced[j] == 0 && !blocked[j] {
                queue.push_back(j);
            }
        }
        ready.push(c);
    }
    let waiting = slots.into_iter().flatten().collect();
    (ready, waiting, refused)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc() -> Document {
        Document::new(DocId::new("t").unwrap(), automerge::ActorId::random())
    }

    fn ops(j: serde_json::Value) -> Vec<Op> {
        Op::list_from_json(&j.to_string()).unwrap()
    }

    /// A document of `n` changes by one actor, and those changes.
    fn written(n: usize) -> (Document, Vec<automerge::Change>) {
        let mut a = doc();
        let changes = (0..n)
            .map(|i| {
                a.apply_ops(&ops(json!([{"op":"put","path":["v"],"value":i}])))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        (a, changes)
    }

    #[test]
    fn automerge_panics_on_a_sequence_gap_which_is_why_documents_check_first() {
        let (_, changes) = written(1);
        let gap = crate::change::renumbered(&changes[0], 3);
        let outcome = std::panic::catch_unwind(move || {
            let mut raw = Automerge::new();
            raw.apply_changes(vec![gap]).is_ok()
        });
        // If Automerge ever returns an error instead, the check in `causal_order` becomes a
        // second line of defence; this test then says so.
        assert!(outcome.is_err(), "Automerge no longer panics: {outcome:?}");
    }

    #[test]
    fn a_change_that_skips_or_reuses_its_actors_sequence_number_is_refused_not_applied() {
        let (_, changes) = written(2);
        let mut b = doc();
        // Number 3 from an actor this document has never seen: a gap.
        let gap = crate::change::renumbered(&changes[0], 3);
        let refused = b.apply_changes(vec![gap.clone()]).unwrap();
        assert_eq!(
            refused,
            vec![Refused {
                hash: ChangeHash::from(gap.hash()),
                reason: RefusedReason::Numbering {
                    seq: 3,
                    expected: 1
                },
            }]
        );
        assert!(!b.has_change(&ChangeHash::from(gap.hash())));
        assert_eq!(b.to_json(), json!({}));
        assert!(
            refused[0].to_string().contains("sequence number 3"),
            "{}",
            refused[0]
        );
        // The real history still applies.
        assert!(b.apply_changes(changes.clone()).unwrap().is_empty());
        assert_eq!(b.to_json(), json!({"v": 1}));
        // A second change numbered 2 (the first one's content, renumbered): a reuse.
        let reuse = crate::change::renumbered(&changes[0], 2);
        assert_ne!(reuse.hash(), changes[1].hash());
        let refused = b.apply_changes(vec![reuse]).unwrap();
        assert_eq!(
            refused[0].reason,
            RefusedReason::Numbering {
                seq: 2,
                expected: 3
            }
        );
        assert_eq!(b.to_json(), json!({"v": 1}));
        // A refused change read back from a store is left out, not fatal.
        let loaded = Document::load(
            DocId::new("t").unwrap(),
            automerge::ActorId::random(),
            None,
            vec![gap, changes[0].clone()],
        )
        .unwrap();
        assert_eq!(loaded.to_json(), json!({"v": 0}));
    }

    /// `change` re-encoded with no dependencies (a valid checksum and hash): what a hostile
    /// author could sign to act on an object before the change that creates it.
    fn without_deps(change: &automerge::Change) -> automerge::Change {
        let body = crate::fuzzing::change_body(change.raw_bytes()).unwrap();
        let deps = usize::from(body[0]);
        assert!(deps < 0x80);
        let mut new_body = vec![0u8];
        new_body.extend_from_slice(&body[1 + 32 * deps..]);
        automerge::Change::from_bytes(crate::fuzzing::change_chunk(&new_body)).unwrap()
    }

    /// Actor 01..01's first change: it makes its op 2 a map (`map`) or a number.
    fn first_change(map: bool) -> automerge::Change {
        let mut x = Document::new(DocId::new("t").unwrap(), ActorId::from(&[1u8; 16][..]));
        let second = if map { json!({}) } else { json!(2) };
        x.apply_ops(&ops(json!([
            {"op":"put","path":["v"],"value":1},
            {"op":"put","path":["m"],"value":second},
        ])))
        .unwrap()
        .unwrap()
    }

    /// [`first_change`], and a change by another actor that writes into the map 2@01..01,
    /// re-signed with no dependencies.
    fn into_object_two(map: bool) -> (automerge::Change, automerge::Change) {
        let mut y = Document::new(DocId::new("t").unwrap(), ActorId::from(&[2u8; 16][..]));
        assert!(
            y.apply_changes(vec![first_change(true)])
                .unwrap()
                .is_empty()
        );
        let into = y
            .apply_ops(&ops(json!([{"op":"put","path":["m","k"],"value":3}])))
            .unwrap()
            .unwrap();
        (first_change(map), without_deps(&into))
    }

    #[test]
    fn a_change_acting_on_an_object_the_document_does_not_hold_is_refused_not_a_panic() {
        // Where 2@a is a map, the change applies (the check refuses nothing honest)...
        let (first, into) = into_object_two(true);
        let mut d = doc();
        assert!(
            d.apply_changes(vec![first, into.clone()])
                .unwrap()
                .is_empty()
        );
        assert_eq!(d.to_json(), json!({"v": 1, "m": {"k": 3}}));
        // ...where it is a number, Automerge would panic ("Obj Missing from Index")...
        let (first, into) = into_object_two(false);
        let raw = (first.clone(), into.clone());
        let outcome = std::panic::catch_unwind(move || {
            let mut doc = Automerge::new();
            doc.apply_changes(vec![raw.0, raw.1]).is_ok()
        });
        assert!(outcome.is_err(), "Automerge no longer panics: {outcome:?}");
        // ...and the document refuses it, keeping the rest of the batch.
        let mut d = doc();
        let refused = d.apply_changes(vec![first, into.clone()]).unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].hash, ChangeHash::from(into.hash()));
        let RefusedReason::UnknownObject(obj) = &refused[0].reason else {
            panic!("{:?}", refused[0]);
        };
        assert_eq!(obj, &format!("2@{}", "01".repeat(16)));
        assert!(
            refused[0].to_string().contains("acts on object 2@"),
            "{}",
            refused[0]
        );
        assert_eq!(d.to_json(), json!({"v": 1, "m": 2}));
        assert!(!d.has_change(&ChangeHash::from(into.hash())));
    }

    #[test]
    fn a_change_naming_a_list_element_the_document_does_not_hold_is_refused_not_a_panic() {
        let actor = |n: u8| ActorId::from(&[n; 16][..]);
        // Actor 1 makes the list 1@01.., and inserts element 2@01.. or not.
        let first = |element: bool| {
            let mut x = Document::new(DocId::new("t").unwrap(), actor(1));
            let mut o = vec![json!({"op":"put","path":["l"],"value":[]})];
            if element {
                o.push(json!({"op":"insert","path":["l",0],"value":"x"}));
            }
            x.apply_ops(&ops(json!(o))).unwrap().unwrap()
        };
        // Actor 2 overwrites element 2@01.., re-signed with no dependencies.
        let mut y = Document::new(DocId::new("t").unwrap(), actor(2));
        assert!(y.apply_changes(vec![first(true)]).unwrap().is_empty());
        let over = y
            .apply_ops(&ops(json!([{"op":"put","path":["l",0],"value":"y"}])))
            .unwrap()
            .unwrap();
        let over = without_deps(&over);
        let mut d = doc();
        assert!(
            d.apply_changes(vec![first(true), over.clone()])
                .unwrap()
                .is_empty()
        );
        assert_eq!(d.to_json(), json!({"l": ["y"]}));
        // On this empty list Automerge lets it pass; where the list holds elements it can
        // panic (`batch.rs:146`, the input `fuzz/corpus/apply/regressions/
        // op-on-missing-list-element`, replayed by the test command). Refused either way.
        let mut d = doc();
        let refused = d.apply_changes(vec![first(false), over.clone()]).unwrap();
        let hex = |n: &str| format!("{n}@{}", "01".repeat(16));
        assert_eq!(
            refused,
            vec![Refused {
                hash: ChangeHash::from(over.hash()),
                reason: RefusedReason::UnknownElement {
                    object: hex("1"),
                    element: hex("2"),
                },
            }]
        );
        assert!(
            refused[0].to_string().contains("names element 2@"),
            "{}",
            refused[0]
        );
        assert_eq!(d.to_json(), json!({"l": []}));
    }

    #[test]
    fn objects_made_earlier_in_the_same_batch_are_held() {
        let mut a = doc();
        let changes: Vec<_> = [
            json!([{"op":"put","path":["m"],"value":{}}]),
            json!([{"op":"put","path":["m","l"],"value":[]}]),
            json!([{"op":"insert","path":["m","l",-1],"value":{"$text":"hi"}}]),
            json!([{"op":"put","path":["m","l",0],"value":{"$text":"ho"}}]),
        ]
        .into_iter()
        .map(|o| a.apply_ops(&ops(o)).unwrap().unwrap())
        .collect();
        // Large changes travel compressed: the check reads them as Automerge does.
        let big = "x".repeat(4000);
        let mut changes = changes;
        changes.push(
            a.apply_ops(&ops(
                json!([{"op":"put","path":["m","big"],"value":{"$text":big}}]),
            ))
            .unwrap()
            .unwrap(),
        );
        let mut last = changes.pop().unwrap();
        let wire = last.bytes().into_owned();
        assert_eq!(wire[8], 2, "a compressed chunk");
        changes.push(automerge::Change::from_bytes(wire).unwrap());
        let mut b = doc();
        let mut reversed = changes;
        reversed.reverse();
        assert!(b.apply_changes(reversed).unwrap().is_empty());
        assert_eq!(b.to_json(), a.to_json());
    }

    #[test]
    fn an_audit_of_a_log_with_a_renumbered_change_fails_naming_it() {
        let me = crate::identity::Identity::generate();
        let id = DocId::new("t").unwrap();
        let mut a = Document::new(id.clone(), crate::change::actor_for(&me.peer_id(), [1; 8]));
        let c = a
            .apply_ops(&ops(json!([{"op":"put","path":["v"],"value":1}])))
            .unwrap()
            .unwrap();
        let good = crate::change::sign(&me, &id, c.clone()).unwrap();
        let bad = crate::change::sign(&me, &id, crate::change::renumbered(&c, 2)).unwrap();
        let bad_hash = bad.hash();
        assert!(Document::from_changes(id.clone(), vec![good.clone()]).is_ok());
        let e = Document::from_changes(id, vec![good, bad]).unwrap_err();
        assert!(e.to_string().contains(&bad_hash.to_string()), "{e}");
    }

    #[test]
    fn changes_arriving_out_of_order_wait_and_apply_once_their_dependencies_arrive() {
        let (a, changes) = written(40);
        let mut b = doc();
        // Newest first, in batches: each batch waits for the next one.
        for batch in changes.rchunks(10) {
            let mut batch = batch.to_vec();
            batch.reverse();
            assert!(b.apply_changes(batch).unwrap().is_empty());
            assert!(b.heads().is_empty() || b.heads() == a.heads());
        }
        assert_eq!(b.heads(), a.heads());
        assert_eq!(b.to_json(), json!({"v": 39}));
        // Local writes after remote ones keep the numbering straight for what comes next.
        b.apply_ops(&ops(json!([{"op":"put","path":["w"],"value":1}])))
            .unwrap();
        let (_, more) = written(1);
        assert!(b.apply_changes(more).unwrap().is_empty());
    }

    #[test]
    fn every_op_and_type_reads_back_as_plain_json() {
        let mut d = doc();
        d.apply_ops(&ops(json!([
            {"op":"put","path":["n"],"value":null},
            {"op":"put","path":["b"],"value":true},
            {"op":"put","path":["i"],"value":-3},
            {"op":"put","path":["f"],"value":2.5},
            {"op":"put","path":["s"],"value":"str"},
            {"op":"put","path":["by"],"value":{"$bytes":"AAE="}},
            {"op":"put","path":["c"],"value":{"$counter":10}},
            {"op":"put","path":["ts"],"value":{"$timestamp":1700000000000i64}},
            {"op":"put","path":["m"],"value":{"k":{"deep":[1]}}},
            {"op":"put","path":["l"],"value":[1,2]},
            {"op":"put","path":["t"],"value":{"$text":"hello"}},
        ])))
        .unwrap()
        .unwrap();
        d.apply_ops(&ops(json!([
            {"op":"increment","path":["c"],"by":5},
            {"op":"insert","path":["l",-1],"value":3},
            {"op":"insert","path":["l",0],"value":0},
            {"op":"put","path":["l",1],"value":"one"},
            {"op":"delete","path":["l",2]},
            {"op":"splice","path":["t"],"index":5,"delete":0,"text":" world"},
            {"op":"splice","path":["t"],"index":0,"delete":1,"text":"H"},
            {"op":"delete","path":["n"]},
            {"op":"put","path":["m","k","deep",0],"value":{"$text":"x"}},
        ])))
        .unwrap();
        assert_eq!(
            d.to_json(),
            json!({"b":true,"i":-3,"f":2.5,"s":"str","by":"AAE=","c":15,"ts":1700000000000i64,
                   "m":{"k":{"deep":["x"]}},"l":[0,"one",3],"t":"Hello world"})
        );
        assert_eq!(
            d.get_json(&["m".into(), "k".into()]),
            Some(json!({"deep":["x"]}))
        );
        assert_eq!(d.get_json(&["zz".into()]), None);
    }

    #[test]
    fn a_failing_op_applies_nothing() {
        let mut d = doc();
        d.apply_ops(&ops(json!([{"op":"put","path":["a"],"value":1}])))
            .unwrap();
        let heads = d.heads();
        let cases = [
            (
                json!([{"op":"put","path":["x"],"value":1},{"op":"put","path":["no","such"],"value":1}]),
                "does not exist",
            ),
            (
                json!([{"op":"increment","path":["a"],"by":1}]),
                "not a counter",
            ),
            (
                json!([{"op":"insert","path":["a",0],"value":1}]),
                "is a value",
            ),
            (json!([{"op":"put","path":[],"value":1}]), "empty"),
            (
                json!([{"op":"put","path":[0],"value":1}]),
                "map with a number",
            ),
            (
                json!([{"op":"splice","path":["a"],"index":0,"text":"x"}]),
                "is a value",
            ),
            (json!([{"op":"delete","path":["zz"]}]), "does not exist"),
        ];
        for (body, needle) in cases {
            let err = d.apply_ops(&ops(body.clone())).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
            assert_eq!(d.heads(), heads, "{body} left a change behind");
        }
        d.apply_ops(&ops(json!([{"op":"put","path":["l"],"value":[1]},{"op":"put","path":["t"],"value":{"$text":"ab"}}])))
            .unwrap();
        let heads = d.heads();
        for body in [
            json!([{"op":"put","path":["l",1],"value":1}]),
            json!([{"op":"insert","path":["l",2],"value":1}]),
            json!([{"op":"insert","path":["l",-2],"value":1}]),
            json!([{"op":"delete","path":["l",5]}]),
            json!([{"op":"splice","path":["t"],"index":3,"text":"x"}]),
            json!([{"op":"splice","path":["t"],"index":1,"delete":2}]),
            json!([{"op":"put","path":["t",0],"value":"x"}]),
        ] {
            assert!(d.apply_ops(&ops(body.clone())).is_err(), "{body}");
            assert_eq!(d.heads(), heads, "{body}");
        }
        assert_eq!(d.to_json(), json!({"a":1,"l":[1],"t":"ab"}));
    }

    #[test]
    fn a_document_reads_as_it_was_at_past_heads_and_times() {
        let mut d = doc();
        let put = |d: &mut Document, v: i64, t: i64| {
            d.apply_ops_at(&ops(json!([{"op":"put","path":["v"],"value":v}])), t)
                .unwrap()
                .unwrap()
        };
        let first = put(&mut d, 1, 1_000);
        put(&mut d, 2, 2_000);
        put(&mut d, 3, 3_000);
        let at = d.at(&[ChangeHash(first.hash().0)]).unwrap();
        assert_eq!(at.to_json(), json!({"v": 1}));
        assert_eq!(
            d.to_json(),
            json!({"v": 3}),
            "the document itself is unchanged"
        );
        assert_eq!(
            d.at(&d.heads_at_time(2_500)).unwrap().to_json(),
            json!({"v": 2})
        );
        assert_eq!(d.heads_at_time(999), Vec::<ChangeHash>::new());
        assert_eq!(d.at(&[]).unwrap().to_json(), json!({}));
        assert_eq!(d.heads_at_time(i64::MAX), d.heads());
        assert_eq!(d.changes().len(), 3);
        let e = d.at(&[ChangeHash([7; 32])]).unwrap_err();
        assert!(e.to_string().contains("not in this document"), "{e}");
    }

    #[test]
    fn a_change_carries_the_time_it_was_made_at() {
        let mut d = doc();
        let c = d
            .apply_ops_at(
                &ops(json!([{"op":"put","path":["a"],"value":1}])),
                1_700_000_000_123,
            )
            .unwrap()
            .unwrap();
        assert_eq!(c.timestamp(), 1_700_000_000_123);
    }

    #[test]
    fn patches_logged_while_applying_are_those_a_diff_afterwards_gives() {
        let mut a = doc();
        a.apply_ops(&ops(json!([
            {"op":"put","path":["c"],"value":{"$counter":1}},
            {"op":"put","path":["l"],"value":[1,2,3]},
            {"op":"put","path":["t"],"value":{"$text":"hello"}},
            {"op":"put","path":["m"],"value":{"k":1}},
            {"op":"put","path":["gone"],"value":1},
        ])))
        .unwrap();
        let base = a.automerge().get_changes(&[]);
        let receiver = || {
            Document::load(
                DocId::new("t").unwrap(),
                automerge::ActorId::random(),
                None,
                base.clone(),
            )
            .unwrap()
        };
        let mut other = receiver();
        let mut batch = Vec::new();
        for (by_a, j) in [
            (
                true,
                json!([{"op":"increment","path":["c"],"by":2},
                          {"op":"insert","path":["l",0],"value":0},
                          {"op":"splice","path":["t"],"index":0,"delete":1,"text":"H"}]),
            ),
            (
                true,
                json!([{"op":"put","path":["m","k"],"value":2},
                          {"op":"delete","path":["l",3]},
                          {"op":"put","path":["new"],"value":"x"},
                          {"op":"delete","path":["gone"]}]),
            ),
            (
                true,
                json!([{"op":"put","path":["new"],"value":"y"},
                          {"op":"insert","path":["l",1],"value":"brief"}]),
            ),
            (true, json!([{"op":"delete","path":["l",1]}])),
            // Concurrent with all of them: a conflict on "new", another increment.
            (
                false,
                json!([{"op":"put","path":["new"],"value":"z"},
                           {"op":"increment","path":["c"],"by":5}]),
            ),
        ] {
            let d = if by_a { &mut a } else { &mut other };
            batch.push(d.apply_ops(&ops(j)).unwrap().unwrap());
        }
        let mut diffed = receiver();
        let before = diffed.heads();
        assert!(diffed.apply_changes(batch.clone()).unwrap().is_empty());
        let expected = diffed.diff(&before, &diffed.heads());
        let mut logged = receiver();
        let mut patches = Vec::new();
        assert!(
            logged
                .apply_changes_patched(batch, &mut patches)
                .unwrap()
                .is_empty()
        );
        assert_eq!(logged.heads(), diffed.heads());
        assert_eq!(logged.to_json(), diffed.to_json());
        let sorted = |mut p: Vec<PatchSummary>| {
            p.sort_by_key(|p| format!("{:?}", (&p.path, p.action)));
            p
        };
        assert!(!expected.is_empty());
        assert_eq!(sorted(patches), sorted(expected));
    }

    #[test]
    fn patches_logged_while_writing_are_those_a_diff_afterwards_gives() {
        let mut d = doc();
        for j in [
            json!([{"op":"put","path":["c"],"value":{"$counter":1}},
                   {"op":"put","path":["l"],"value":[1,2,3]},
                   {"op":"put","path":["t"],"value":{"$text":"hello"}},
                   {"op":"put","path":["m"],"value":{"k":1}},
                   {"op":"put","path":["gone"],"value":1}]),
            json!([{"op":"increment","path":["c"],"by":2},
                   {"op":"insert","path":["l",0],"value":0},
                   {"op":"splice","path":["t"],"index":0,"delete":1,"text":"H"}]),
            // Distinct keys (logged): a nested one, a new one, a deletion, a counter.
            json!([{"op":"put","path":["m","k"],"value":2},
                   {"op":"put","path":["new"],"value":"x"},
                   {"op":"delete","path":["gone"]},
                   {"op":"increment","path":["c"],"by":3}]),
            json!([{"op":"delete","path":["l",3]}]),
            // Twice the same key in one change, and an insert then a delete of it.
            json!([{"op":"put","path":["new"],"value":"y"},
                   {"op":"put","path":["new"],"value":"w"},
                   {"op":"insert","path":["l",1],"value":"brief"},
                   {"op":"delete","path":["l",1]}]),
        ] {
            let before = d.heads();
            let mut logged = Vec::new();
            d.apply_ops_logged(&ops(j), 0, Some(&mut logged))
                .unwrap()
                .unwrap();
            let diffed = d.diff(&before, &d.heads());
            let sorted = |mut p: Vec<PatchSummary>| {
                p.sort_by_key(|p| format!("{:?}", (&p.path, p.action)));
                p
            };
            assert!(!diffed.is_empty());
            assert_eq!(sorted(logged), sorted(diffed));
        }
    }

    #[test]
    fn concurrent_counters_add_up_and_patches_say_what_changed() {
        let mut a = doc();
        a.apply_ops(&ops(
            json!([{"op":"put","path":["c"],"value":{"$counter":0}}]),
        ))
        .unwrap();
        let base = a.automerge().get_changes(&[]);
        let mut b = Document::load(
            DocId::new("t").unwrap(),
            automerge::ActorId::random(),
            None,
            base,
        )
        .unwrap();
        let before = b.heads();
        let ca = a
            .apply_ops(&ops(json!([{"op":"increment","path":["c"],"by":2}])))
            .unwrap()
            .unwrap();
        let cb = b
            .apply_ops(&ops(json!([{"op":"increment","path":["c"],"by":3}])))
            .unwrap()
            .unwrap();
        a.apply_changes(vec![cb]).unwrap();
        b.apply_changes(vec![ca]).unwrap();
        assert_eq!(a.to_json(), json!({"c":5}));
        assert_eq!(a.heads(), b.heads());
        let patches = b.diff(&before, &b.heads());
        assert!(
            patches.iter().all(|p| p.path == vec![PathElem::from("c")]),
            "{patches:?}"
        );
        assert!(!patches.is_empty());
    }
}
