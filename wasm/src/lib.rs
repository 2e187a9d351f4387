//! Syncline for browsers (`syncline-wasm`): the same engine as the edge-node and the mobile
//! library, compiled to WebAssembly.
//!
//! [`Engine`] wraps one [`Replica`]: its documents, its durable outbox and its sync session,
//! as a sans-IO machine. The JavaScript package (`wasm/js/`) owns the WebSocket and the
//! timers and moves frames in and out (`handleFrame`, `pollTransmit`); apps use its `Repo`
//! API, not this class.
//!
//! Storage: `"opfs"` keeps the replica's SQLite store (and its identity) in the Origin Private
//! File System through SQLite's `opfs-sahpool` VFS, whose writes are durable when a commit
//! returns, as on disk. It needs a dedicated worker (the package runs the engine in one).
//! `"memory"` keeps everything in memory (tests, Node, throwaway sessions).
//!
//! Every JS-facing error is a thrown `Error` whose message says what was wrong; nothing here
//! panics on input.

use std::fmt::Display;
use std::path::Path;

use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Event, Origin, Replica, ReplicaOptions};
use syncline_core::wire::{Message, Target};
use syncline_core::{DocId, PeerId};
use wasm_bindgen::prelude::*;

fn js_err(context: &str, e: impl Display) -> JsError {
    JsError::new(&format!("{context}: {e}"))
}

/// The browser's clock (the standard library has none on wasm).
#[cfg(target_arch = "wasm32")]
fn clock_ms() -> i64 {
    js_sys::Date::now() as i64
}

#[cfg(not(target_arch = "wasm32"))]
fn clock_ms() -> i64 {
    syncline_core::replica::system_clock_ms()
}

/// A storage name: letters, digits, `-` and `_`, 1 to 64 of them (it names files in OPFS).
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_name(name: &str) -> Result<(), JsError> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(JsError::new(&format!(
            "the storage name {name:?} is not valid: use 1 to 64 letters, digits, '-' or '_'"
        )))
    }
}

fn doc_id(id: &str) -> Result<DocId, JsError> {
    DocId::new(id).map_err(|e| js_err("bad document id", e))
}

fn hex_heads(heads: &[syncline_core::ChangeHash]) -> Vec<String> {
    heads.iter().map(ToString::to_string).collect()
}

/// The identity kept next to the store: one row in its own small SQLite file.
fn load_or_create_identity(conn: &rusqlite::Connection) -> Result<Identity, JsError> {
    let sql = |e| js_err("the identity store", e);
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS identity (id INTEGER PRIMARY KEY CHECK (id = 1), seed BLOB NOT NULL)",
    )
    .map_err(sql)?;
    let stored: Option<Vec<u8>> =
        match conn.query_row("SELECT seed FROM identity", [], |r| r.get(0)) {
            Ok(seed) => Some(seed),
            Err(rusqlite::Error::QueryReturnedNoRows) => None,
            Err(e) => return Err(sql(e)),
        };
    match stored {
        Some(seed) => {
            let seed: [u8; 32] = seed.try_into().map_err(|_| {
                JsError::new(
                    "the stored identity is damaged (not 32 bytes): clear this site's storage \
                     to start over with a new identity",
                )
            })?;
            Ok(Identity::from_seed(seed))
        }
        None => {
            let id = Identity::generate();
            conn.execute(
                "INSERT INTO identity (id, seed) VALUES (1, ?1)",
                [&id.to_seed()[..]],
            )
            .map_err(sql)?;
            Ok(id)
        }
    }
}

/// Installs the OPFS VFS of one storage name (a pool of files in its own OPFS folder) and
/// returns the VFS's name.
#[cfg(target_arch = "wasm32")]
async fn install_opfs(name: &str) -> Result<String, JsError> {
    use sqlite_wasm_vfs::sahpool::{OpfsSAHPoolCfgBuilder, install};
    let vfs = format!("syncline-{name}");
    let cfg = OpfsSAHPoolCfgBuilder::new()
        .vfs_name(&vfs)
        .directory(&format!(".syncline/{name}"))
        .build();
    install::<sqlite_wasm_rs::WasmOsCallback>(&cfg, false)
        .await
        .map_err(|e| match e {
            sqlite_wasm_vfs::sahpool::OpfsSAHError::NotSupported => {
                JsError::new("OPFS storage works only in a dedicated worker (Repo.open starts one)")
            }
            e => JsError::new(&format!(
                "cannot open the storage {name:?}: another tab or worker has it open; close \
                 it there, or use another name ({e})"
            )),
        })?;
    Ok(vfs)
}

#[cfg(not(target_arch = "wasm32"))]
async fn install_opfs(_name: &str) -> Result<String, JsError> {
    Err(JsError::new(
        "OPFS storage exists only in browsers: use the \"memory\" storage here",
    ))
}

fn open_conn(path: &str, vfs: &str) -> Result<rusqlite::Connection, JsError> {
    rusqlite::Connection::open_with_flags_and_vfs(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE,
        vfs,
    )
    .map_err(|e| js_err("opening the identity store", e))
}

/// One replica in the browser. See the crate docs.
#[wasm_bindgen]
pub struct Engine {
    replica: Replica,
}

#[wasm_bindgen]
impl Engine {
    /// Opens (or creates) the replica stored under `name`: `storage` is `"opfs"` (durable,
    /// in a dedicated worker) or `"memory"`. The identity is generated on first open and kept
    /// with the store.
    pub async fn open(name: String, storage: String) -> Result<Engine, JsError> {
        check_name(&name)?;
        let options = ReplicaOptions {
            clock: clock_ms,
            verify_threads: 1,
            ..ReplicaOptions::default()
        };
        let replica = match storage.as_str() {
            "memory" => Replica::open_in_memory(Identity::generate(), options),
            "opfs" => {
                let vfs = install_opfs(&name).await?;
                let identity = load_or_create_identity(&open_conn("/identity.db", &vfs)?)?;
                // The store's files go through this VFS: SQLite picks the default one, so
                // open by URI naming it.
                let path = format!("file:/replica.db?vfs={vfs}");
                Replica::open(Path::new(&path), identity, options)
            }
            other => {
                return Err(JsError::new(&format!(
                    "unknown storage {other:?}: use \"opfs\" or \"memory\""
                )));
            }
        }
        .map_err(|e| js_err("opening the replica", e))?;
        Ok(Engine { replica })
    }

    /// This replica's public key (hex): what the hub operator grants.
    #[wasm_bindgen(js_name = peerId)]
    pub fn peer_id(&self) -> String {
        self.replica.peer_id().to_string()
    }

    /// Applies operations (a JSON array, the shared operation set of docs/API.md) to a
    /// document, durably; returns its new heads as a JSON array of hex hashes.
    pub fn change(&mut self, doc: &str, ops: &str) -> Result<String, JsError> {
        let id = doc_id(doc)?;
        let ops = Op::list_from_json(ops).map_err(|e| js_err("bad operations", e))?;
        let heads = self
            .replica
            .change(&id, &ops)
            .map_err(|e| js_err("the change was refused", e))?;
        Ok(serde_json::json!(hex_heads(&heads)).to_string())
    }

    /// Applies several writes in one transaction (group commit): `writes` is a JSON array of
    /// `[docId, ops]` pairs. All are durable when this returns, or none is (then the error
    /// names the first bad write, by its index). Returns each write's document heads after
    /// the commit, a JSON array in the same order.
    #[wasm_bindgen(js_name = changeMany)]
    pub fn change_many(&mut self, writes: &str) -> Result<String, JsError> {
        let items: Vec<(String, serde_json::Value)> = serde_json::from_str(writes)
            .map_err(|e| js_err("bad writes (want [[docId, ops], ...])", e))?;
        let mut batch = Vec::with_capacity(items.len());
        for (i, (doc, ops)) in items.iter().enumerate() {
            let id = doc_id(doc)
                .map_err(|_| JsError::new(&format!("write {i}: bad document id {doc:?}")))?;
            let ops = Op::list_from_json(&ops.to_string())
                .map_err(|e| js_err(&format!("write {i}: bad operations"), e))?;
            batch.push((id, ops));
        }
        self.replica
            .change_many(&batch)
            .map_err(|e| js_err("the changes were refused", e))?;
        let mut out = Vec::with_capacity(batch.len());
        for (id, _) in &batch {
            let heads = self
                .replica
                .doc(id)
                .map(|d| hex_heads(&d.heads()))
                .map_err(|e| js_err("reading the document", e))?;
            out.push(heads);
        }
        Ok(serde_json::json!(out).to_string())
    }

    /// The document as JSON text: `null` for a document this replica does not hold (yet).
    pub fn json(&mut self, doc: &str) -> Result<String, JsError> {
        let id = doc_id(doc)?;
        match self.replica.json(&id) {
            Ok(value) => Ok(value.to_string()),
            Err(syncline_core::Error::UnknownDocument(_)) => Ok("null".into()),
            Err(e) => Err(js_err("reading the document", e)),
        }
    }

    /// The document's heads, a JSON array of hex hashes (empty for a document not held).
    pub fn heads(&mut self, doc: &str) -> Result<String, JsError> {
        let id = doc_id(doc)?;
        match self.replica.doc(&id) {
            Ok(d) => Ok(serde_json::json!(hex_heads(&d.heads())).to_string()),
            Err(syncline_core::Error::UnknownDocument(_)) => Ok("[]".into()),
            Err(e) => Err(js_err("reading the document", e)),
        }
    }

    /// The ids of the stored documents, a JSON array.
    #[wasm_bindgen(js_name = docIds)]
    pub fn doc_ids(&self) -> Result<String, JsError> {
        let ids = self
            .replica
            .doc_ids()
            .map_err(|e| js_err("listing documents", e))?;
        let ids: Vec<&str> = ids.iter().map(DocId::as_str).collect();
        Ok(serde_json::json!(ids).to_string())
    }

    /// Subscribes to `doc:ID` or `prefix:P` (kept in the store, sent at every session).
    pub fn subscribe(&mut self, target: &str) -> Result<(), JsError> {
        if let Some(id) = target.strip_prefix("doc:") {
            doc_id(id)?;
        }
        let t = Target::from_key(target).ok_or_else(|| {
            JsError::new(&format!(
                "bad subscription {target:?}: give doc:ID or prefix:PREFIX"
            ))
        })?;
        self.replica
            .subscribe(t)
            .map_err(|e| js_err("subscribing", e))
    }

    /// Starts a session over a transport that just opened; `hub` pins the hub's key (hex)
    /// if given.
    pub fn connect(&mut self, hub: Option<String>) -> Result<(), JsError> {
        let expected = match hub.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => Some(PeerId::from_hex(h).map_err(|e| js_err("bad hub key", e))?),
        };
        self.replica.connect(expected);
        Ok(())
    }

    /// Ends the session (the transport closed). Unacknowledged writes stay in the outbox.
    pub fn disconnect(&mut self) {
        self.replica.disconnect();
    }

    /// Takes one frame the hub sent (one WebSocket binary message). A bad frame or a change
    /// whose signature does not verify is refused with an error, and the session fails
    /// (see `sessionFailed`): nothing of it is stored.
    #[wasm_bindgen(js_name = handleFrame)]
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), JsError> {
        let msg = Message::from_frame(frame).map_err(|e| {
            // Bytes that are not a frame leave the session out of step: end it.
            self.replica.disconnect();
            js_err("the hub sent a bad frame", e)
        })?;
        self.replica
            .handle_message(msg)
            .map_err(|e| js_err("refused from the hub", e))?;
        // Verify and store what came now, so that a refusal (a forged signature) is this
        // call's error rather than a log line (the event loop gives no later moment to ask).
        self.replica
            .flush()
            .map_err(|e| js_err("refused changes from the hub", e))
    }

    /// The next frame to send to the hub, if any.
    #[wasm_bindgen(js_name = pollTransmit)]
    pub fn poll_transmit(&mut self) -> Result<Option<Vec<u8>>, JsError> {
        Ok(self
            .replica
            .poll_transmit()
            .map_err(|e| js_err("reading the outbox", e))?
            .map(|m| m.to_frame()))
    }

    /// Whether the session failed (its last frame, an error for the hub, is queued): send
    /// what `pollTransmit` gives, then close the transport and reconnect later.
    #[wasm_bindgen(js_name = sessionFailed)]
    pub fn session_failed(&self) -> bool {
        self.replica.session_failed()
    }

    /// The next event as JSON text, if any: `{"type":"change","doc",...}`, `"rejected"`,
    /// `"synced"`, `"connected"`, `"acknowledged"`, `"lagged"`.
    #[wasm_bindgen(js_name = pollEvent)]
    pub fn poll_event(&mut self) -> Option<String> {
        let event = self.replica.poll_event()?;
        Some(event_json(&event).to_string())
    }

    /// The sync state as JSON text: `connected`, `hub`, `outbox` (writes not yet
    /// acknowledged), `rejected`, `synced`, `subscriptions`.
    pub fn status(&self) -> Result<String, JsError> {
        let s = self
            .replica
            .status()
            .map_err(|e| js_err("reading the status", e))?;
        Ok(serde_json::json!({
            "connected": self.replica.is_connected(),
            "hub": s.hub,
            "outbox": s.outbox,
            "rejected": s.rejected,
            "refused": s.refused,
            "synced": s.synced,
            "subscriptions": s.subscriptions,
        })
        .to_string())
    }
}

fn event_json(event: &Event) -> serde_json::Value {
    use serde_json::json;
    match event {
        Event::DocChanged {
            doc,
            origin,
            heads,
            patches,
        } => json!({
            "type": "change",
            "doc": doc.as_str(),
            "origin": match origin { Origin::Local => "local", Origin::Remote => "remote" },
            "heads": hex_heads(heads),
            "patches": patches.iter().map(|p| json!({"path": p.path, "action": p.action})).collect::<Vec<_>>(),
        }),
        Event::Rejected { doc, code, message } => json!({
            "type": "rejected", "doc": doc.as_str(), "code": format!("{code:?}"), "message": message,
        }),
        Event::Synced { target } => json!({"type": "synced", "target": target.key()}),
        Event::Connected { hub } => json!({"type": "connected", "hub": hub.to_string()}),
        Event::Acknowledged { doc, changes } => {
            json!({"type": "acknowledged", "doc": doc.as_str(), "changes": changes})
        }
        Event::Lagged { dropped } => json!({"type": "lagged", "dropped": dropped}),
        _ => json!({"type": "other"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_names_are_checked() {
        // (`check_name`'s error is a JsError, which exists only on wasm; the rule is here.)
        for good in ["a", "inventory-board_2", &"x".repeat(64)] {
            assert!(name_ok(good), "{good}");
        }
        for bad in ["", "a/b", "../x", "has space", "é", &"x".repeat(65)] {
            assert!(!name_ok(bad), "{bad}");
        }
    }
}
