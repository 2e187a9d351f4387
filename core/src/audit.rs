//! The audit trail of a document, from the hub's signed change log: who changed it (the
//! author's public key), when (the change's timestamp, as its author's clock gave it), and
//! what (the change's operations). And an export of a document's log that anyone can check
//! offline, with nothing but the file: every signature, the hash links, the resulting state.
//!
//! The export format (version 1) is JSON lines. The first line describes the file:
//! `{"syncline_export": 1, "doc": ID, "changes": N, "exported_ms": MS}`; then one line per
//! change, in the hub's log order: `{"hash": HEX, "author": HEX, "signature": HEX,
//! "change": BASE64}`, where `change` is the author's Automerge change bytes and `signature`
//! their ed25519 signature over `syncline/change/v1\0 ‖ len ‖ doc id ‖ hash`
//! (`change::signing_message`). `hash` and `author` are there for readers; the verifier
//! recomputes both from the bytes and refuses a line where they differ.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::change::{self, SignedChange, VerifiedChange};
use crate::document::Document;
use crate::error::{Error, Result};
use crate::ids::{ChangeHash, Cursor, DocId, PeerId};
use crate::store::{HubStore, LogEntry};
use crate::wire::Target;

/// A point in a document's past: heads (change hashes) or an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The document as these changes and their ancestors make it.
    Heads(Vec<ChangeHash>),
    /// The document as its authors' changes stamped at or before this instant (milliseconds
    /// since the Unix epoch) make it.
    Time(i64),
}

impl std::str::FromStr for At {
    type Err = String;

    /// Comma-separated 64-hex change hashes, milliseconds since 1970, or an RFC 3339 time
    /// such as `2026-12-01T18:00:00Z`.
    fn from_str(v: &str) -> std::result::Result<Self, String> {
        let v = v.trim();
        if let Ok(ms) = v.parse::<i64>() {
            return Ok(At::Time(ms));
        }
        if let Ok(t) =
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        {
            return Ok(At::Time((t.unix_timestamp_nanos() / 1_000_000) as i64));
        }
        let heads: Option<Vec<ChangeHash>> = v
            .split(',')
            .map(|h| ChangeHash::from_hex(h.trim()))
            .collect();
        match heads {
            Some(h) if !h.is_empty() => Ok(At::Heads(h)),
            _ => Err(
                "neither heads (comma-separated 64-hex change hashes), milliseconds \
                      since 1970, nor an RFC 3339 time such as 2026-12-01T18:00:00Z"
                    .to_owned(),
            ),
        }
    }
}

impl At {
    /// `doc` as it was then.
    pub fn view(&self, doc: &Document) -> Result<Document> {
        match self {
            At::Heads(h) => doc.at(h),
            At::Time(t) => doc.at(&doc.heads_at_time(*t)),
        }
    }
}

/// The export format this version writes and reads.
pub const EXPORT_FORMAT: u64 = 1;

/// Changes read from the log per page.
const PAGE: usize = 1024;

/// One change of a document's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// Its position in the hub's log.
    pub cursor: Cursor,
    /// Its hash.
    pub hash: ChangeHash,
    /// Who signed it.
    pub author: PeerId,
    /// Its sequence number among its actor's changes.
    pub seq: u64,
    /// When its author made it (milliseconds since the Unix epoch, by the author's clock).
    pub time_ms: i64,
    /// The changes it follows.
    pub deps: Vec<ChangeHash>,
    /// Its operations, as Automerge describes them (action, object, key, value...).
    pub ops: Value,
}

impl HistoryEntry {
    fn of(cursor: Cursor, c: &VerifiedChange) -> Self {
        HistoryEntry {
            cursor,
            hash: c.hash(),
            author: c.author(),
            seq: c.automerge().seq(),
            time_ms: c.timestamp(),
            deps: c.deps(),
            ops: ops_of(c.automerge()),
        }
    }

    /// As JSON: `{"cursor", "hash", "author", "seq", "time_ms", "deps", "ops"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "cursor": self.cursor.0,
            "hash": self.hash.to_string(),
            "author": self.author.to_string(),
            "seq": self.seq,
            "time_ms": self.time_ms,
            "deps": self.deps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ops": self.ops,
        })
    }
}

/// A change's operations as Automerge describes them (action, obj, key or elemId, value...).
fn ops_of(c: &automerge::Change) -> Value {
    serde_json::to_value(&c.decode().operations).unwrap_or(Value::Null)
}

/// A change of a replica's document, for its history: `{"hash", "author", "seq", "time_ms",
/// "deps", "ops"}`, with `author` the public key its actor names (`null` for a change whose
/// actor names none, which a replica never stores: every change it holds was verified).
pub fn describe(c: &automerge::Change) -> Value {
    json!({
        "hash": ChangeHash(c.hash().0).to_string(),
        "author": change::author_of(c.actor_id()).map(|a| a.to_string()),
        "seq": c.seq(),
        "time_ms": c.timestamp(),
        "deps": c.deps().iter().map(|d| ChangeHash(d.0).to_string()).collect::<Vec<_>>(),
        "ops": ops_of(c),
    })
}

/// Reads the changes of `doc` from a hub store in log order, after `after`, at most `limit`,
/// each verified (a change whose signature fails is an error: the log was altered).
pub fn read_verified(
    store: &mut dyn HubStore,
    doc: &DocId,
    after: Cursor,
    limit: usize,
) -> Result<Vec<(Cursor, VerifiedChange)>> {
    let target = Target::Doc(doc.clone());
    let mut out = Vec::new();
    let mut at = after;
    while out.len() < limit {
        let batch = store.read_log(&target, at, PAGE.min(limit - out.len()))?;
        let (cursors, signed): (Vec<Cursor>, Vec<SignedChange>) = batch
            .entries
            .into_iter()
            .map(|LogEntry { cursor, change, .. }| (cursor, change))
            .unzip();
        let verified = change::verify_batch_parallel(doc, signed, 2)?;
        out.extend(cursors.into_iter().zip(verified));
        if batch.at_end || batch.next == at {
            break;
        }
        at = batch.next;
    }
    Ok(out)
}

/// The history of `doc` in the hub's log: up to `limit` changes after `after`.
pub fn history(
    store: &mut dyn HubStore,
    doc: &DocId,
    after: Cursor,
    limit: usize,
) -> Result<Vec<HistoryEntry>> {
    Ok(read_verified(store, doc, after, limit)?
        .iter()
        .map(|(cursor, c)| HistoryEntry::of(*cursor, c))
        .collect())
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Changes written.
    pub changes: u64,
    /// The document's heads after them.
    pub heads: Vec<ChangeHash>,
}

/// What [`verify_export`] found: every change in the file is authentic, and the history it
/// holds is closed (every change's dependencies are in it).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// The document.
    pub doc: DocId,
    /// Changes verified.
    pub changes: u64,
    /// Distinct authors.
    pub authors: Vec<PeerId>,
    /// The heads of the resulting document.
    pub heads: Vec<ChangeHash>,
    /// The resulting document as JSON.
    pub state: Value,
}

fn export_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Export {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Writes the signed change log of `doc` to `to` (which must not exist; written to
/// `to.partial`, synced, renamed). Every change is verified as it is read. `progress` gets the
/// count written so far.
pub fn export(
    store: &mut dyn HubStore,
    doc: &DocId,
    to: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary> {
    if to.exists() {
        return Err(export_error(to, "already exists: choose another file name"));
    }
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let io = |e: std::io::Error| export_error(to, format!("cannot write it: {e}"));
    // Read everything first: the header carries the count, and a document that does not exist
    // writes no file.
    let changes = read_verified(store, doc, Cursor(0), usize::MAX)?;
    if changes.is_empty() {
        return Err(export_error(
            to,
            format!("the hub holds no change of {doc}: check the document id"),
        ));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    let header = json!({
        "syncline_export": EXPORT_FORMAT,
        "doc": doc.as_str(),
        "changes": changes.len(),
        "exported_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    });
    writeln!(out, "{header}").map_err(io)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (i, (_, c)) in changes.iter().enumerate() {
        let line = json!({
            "hash": c.hash().to_string(),
            "author": c.author().to_string(),
            "signature": hex::encode(c.signed().signature),
            "change": b64.encode(&c.signed().bytes),
        });
        writeln!(out, "{line}").map_err(io)?;
        if (i + 1) % 10_000 == 0 {
            progress(i as u64 + 1);
        }
    }
    // Synced and closed (the block ends the file) before it is renamed into place.
    {
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&partial, to).map_err(io)?;
    progress(changes.len() as u64);
    let graph: Vec<(ChangeHash, Vec<ChangeHash>)> =
        changes.iter().map(|(_, c)| (c.hash(), c.deps())).collect();
    let heads = crate::store::complete_heads(graph.iter().map(|(h, d)| (*h, &d[..]))).heads;
    Ok(ExportSummary {
        changes: changes.len() as u64,
        heads,
    })
}

/// Checks an export offline: the header, every line's signature for the document, that its
/// hash and author are the ones its bytes give, that every change's dependencies are in the
/// file (the history is closed), and builds the resulting document. A tampered line, a
/// change cut out from the middle, or a count that differs from the header is an error naming
/// the line that fails. The header is not signed: a file cut after its last line with the
/// count edited to match still verifies, as the history of an earlier moment (heads and state
/// say which).
pub fn verify_export(path: &Path, progress: &mut dyn FnMut(u64)) -> Result<ExportReport> {
    let file = std::fs::File::open(path)
        .map_err(|e| export_error(path, format!("cannot read it: {e}")))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let read = |n: usize, l: Option<std::io::Result<String>>| -> Result<Option<Value>> {
        match l {
            None => Ok(None),
            Some(Err(e)) => Err(export_error(path, format!("line {n}: cannot read it: {e}"))),
            Some(Ok(s)) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| export_error(path, format!("line {n} is not JSON: {e}"))),
        }
    };
    let header = read(1, lines.next())?
        .ok_or_else(|| export_error(path, "is empty: not a Syncline export"))?;
    if header["syncline_export"] != json!(EXPORT_FORMAT) {
        return Err(export_error(
            path,
            "line 1 is not a Syncline export header (format 1): give a file written by \
             `syncline-hub export`",
        ));
    }
    let doc = header["doc"]
        .as_str()
        .ok_or_else(|| export_error(path, "line 1: no document id"))
        .and_then(|d| DocId::new(d).map_err(|e| export_error(path, format!("line 1: {e}"))))?;
    let announced = header["changes"]
        .as_u64()
        .ok_or_else(|| export_error(path, "line 1: no change count"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Lines are parsed as they are read and verified in batches on every core; a batch that
    // fails is verified line by line to name the line.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut verified: Vec<VerifiedChange> = Vec::new();
    let mut pending: Vec<(usize, SignedChange, String, String)> = Vec::new();
    let mut flush = |pending: &mut Vec<(usize, SignedChange, String, String)>,
                     verified: &mut Vec<VerifiedChange>|
     -> Result<()> {
        let batch = std::mem::take(pending);
        let signed: Vec<SignedChange> = batch.iter().map(|(_, c, _, _)| c.clone()).collect();
        let checked = match change::verify_batch_parallel(&doc, signed, threads) {
            Ok(v) => v,
            Err(_) => {
                for (line, c, _, _) in &batch {
                    change::verify(&doc, c.clone())
                        .map_err(|e| export_error(path, format!("line {line}: refused: {e}")))?;
                }
                return Err(export_error(path, "a batch failed verification"));
            }
        };
        for ((line, _, hash, author), c) in batch.into_iter().zip(checked) {
            if hash != c.hash().to_string() {
                return Err(export_error(
                    path,
                    format!(
                        "line {line}: says hash {hash} but its bytes hash to {}",
                        c.hash()
                    ),
                ));
            }
            if author != c.author().to_string() {
                return Err(export_error(
                    path,
                    format!(
                        "line {line}: says author {author} but it is signed by {}",
                        c.author()
                    ),
                ));
            }
            verified.push(c);
        }
        progress(verified.len() as u64);
        Ok(())
    };
    let mut n = 1;
    while let Some(v) = read(n + 1, lines.next())? {
        n += 1;
        let bad = |what: &str| export_error(path, format!("line {n}: {what}"));
        let field = |k: &str| v[k].as_str().ok_or_else(|| bad(&format!("no {k:?}")));
        let bytes = b64
            .decode(field("change")?)
            .map_err(|e| bad(&format!("\"change\" is not base64: {e}")))?;
        let signature: [u8; 64] = hex::decode(field("signature")?)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("\"signature\" is not 64 bytes of hex"))?;
        pending.push((
            n,
            SignedChange { bytes, signature },
            field("hash")?.to_owned(),
            field("author")?.to_owned(),
        ));
        if pending.len() >= 4096 {
            flush(&mut pending, &mut verified)?;
        }
    }
    flush(&mut pending, &mut verified)?;
    if verified.len() as u64 != announced {
        return Err(export_error(
            path,
            format!(
                "holds {} changes but its header says {announced}: it was cut or altered",
                verified.len()
            ),
        ));
    }
    let hashes: HashSet<ChangeHash> = verified.iter().map(VerifiedChange::hash).collect();
    for (i, c) in verified.iter().enumerate() {
        if let Some(missing) = c.deps().iter().find(|d| !hashes.contains(d)) {
            return Err(export_error(
                path,
                format!(
                    "line {}: change {} depends on {missing}, which is not in the file: the \
                     history is incomplete",
                    i + 2,
                    c.hash()
                ),
            ));
        }
    }
    let mut authors: Vec<PeerId> = verified
        .iter()
        .map(VerifiedChange::author)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    authors.sort_by_key(|a| a.to_string());
    let changes = verified.len() as u64;
    let document = Document::from_changes(doc.clone(), verified)?;
    progress(changes);
    Ok(ExportReport {
        doc,
        changes,
        authors,
        heads: document.heads(),
        state: document.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::store::SqliteHubStore;
    use crate::store::signed_changes;

    fn store_with(doc: &DocId, who: &[&Identity]) -> SqliteHubStore {
        let mut s = SqliteHubStore::open_in_memory().unwrap();
        for (i, w) in who.iter().enumerate() {
            s.append(&signed_changes(w, doc, [i as u8 + 1; 8], i as i64, 30))
                .unwrap();
        }
        s
    }

    #[test]
    fn at_reads_heads_milliseconds_and_rfc3339() {
        let h = ChangeHash([0xab; 32]);
        assert_eq!(format!("{h},{h}").parse::<At>(), Ok(At::Heads(vec![h, h])));
        assert_eq!(
            "1700000000123".parse::<At>(),
            Ok(At::Time(1_700_000_000_123))
        );
        assert_eq!(
            "2023-11-14T22:13:20.123Z".parse::<At>(),
            Ok(At::Time(1_700_000_000_123))
        );
        for bad in ["", "yesterday", "abc,", &"a".repeat(63)] {
            assert!(bad.parse::<At>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn history_says_who_when_and_what() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let doc = DocId::new("sites/a").unwrap();
        let mut s = store_with(&doc, &[&alice, &bob]);
        let h = history(&mut s, &doc, Cursor(0), usize::MAX).unwrap();
        assert_eq!(h.len(), 60);
        assert_eq!(h[0].author, alice.peer_id());
        assert_eq!(h[59].author, bob.peer_id());
        assert_eq!((h[0].cursor, h[0].seq), (Cursor(1), 1));
        let op = &h[31].ops[0];
        assert_eq!(
            (op["action"].as_str(), op["key"].as_str()),
            (Some("set"), Some("k1")),
            "{op}"
        );
        // Pages: after a cursor, at most a limit.
        let page = history(&mut s, &doc, Cursor(10), 5).unwrap();
        assert_eq!(
            page.iter().map(|e| e.cursor.0).collect::<Vec<_>>(),
            [11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn an_export_verifies_offline_and_tampering_is_named() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let doc = DocId::new("sites/a").unwrap();
        let mut s = store_with(&doc, &[&alice, &bob]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.jsonl");
        let summary = export(&mut s, &doc, &file, &mut |_| {}).unwrap();
        assert_eq!(summary.changes, 60);
        let report = verify_export(&file, &mut |_| {}).unwrap();
        assert_eq!((report.changes, report.authors.len()), (60, 2));
        assert_eq!(report.heads.len(), 2, "two concurrent authors");
        assert_eq!(
            report.state.as_object().unwrap().len(),
            30,
            "{}",
            report.state
        );
        let mut sorted = summary.heads.clone();
        sorted.sort();
        let mut got = report.heads.clone();
        got.sort();
        assert_eq!(sorted, got);

        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let tampered = |name: &str, lines: Vec<String>| {
            let p = dir.path().join(name);
            std::fs::write(&p, lines.join("\n")).unwrap();
            verify_export(&p, &mut |_| {}).unwrap_err().to_string()
        };
        let own = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // A signature from another change.
        let mut l = own(&lines);
        let sig_of = |s: &str| serde_json::from_str::<Value>(s).unwrap()["signature"].clone();
        let mut v: Value = serde_json::from_str(&l[5]).unwrap();
        v["signature"] = sig_of(&l[6]);
        l[5] = v.to_string();
        let e = tampered("sig", l);
        assert!(e.contains("line 6") && e.contains("refused"), "{e}");
        // A change dropped: the count and the links fail.
        let mut l = own(&lines);
        l.remove(10);
        assert!(tampered("cut", l).contains("header says 60"));
        let mut l = own(&lines);
        l.remove(10);
        let mut h: Value = serde_json::from_str(&l[0]).unwrap();
        h["changes"] = json!(59);
        l[0] = h.to_string();
        let e = tampered("cut2", l);
        assert!(e.contains("not in the file"), "{e}");
        // Replayed into another document.
        let mut l = own(&lines);
        let mut h: Value = serde_json::from_str(&l[0]).unwrap();
        h["doc"] = json!("sites/b");
        l[0] = h.to_string();
        assert!(tampered("doc", l).contains("line 2"));
        // Not an export.
        assert!(tampered("junk", vec!["{}".into()]).contains("not a Syncline export"));
        // An existing file is not overwritten, an unknown document writes nothing.
        assert!(export(&mut s, &doc, &file, &mut |_| {}).is_err());
        let none = dir.path().join("none.jsonl");
        let e = export(&mut s, &DocId::new("nope").unwrap(), &none, &mut |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("no change of nope") && !none.exists(),
            "{e}"
        );
    }
}
