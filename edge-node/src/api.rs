//! The local HTTP+JSON API (documented in `docs/API.md`): a thin layer that converts requests
//! into calls on the replica thread and core errors into HTTP answers.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::{Value, json};
use syncline_core::audit::At;
use syncline_core::ops::Op;
use syncline_core::replica::{Event, Replica};
use syncline_core::rolling;
use syncline_core::wire::Target;
use syncline_core::{ChangeHash, DocId, DocPrefix};
use syncline_net::NetError;
use syncline_net::client::ReplicaHandle;
use tokio::sync::{broadcast, watch};

/// Largest request body accepted (a change is at most 1 MiB once encoded; its JSON form is
/// larger).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    replica: ReplicaHandle,
    public_key: String,
    shutdown: watch::Receiver<bool>,
}

impl ApiState {
    /// State over a running replica thread. Event streams end when `shutdown` turns true (or
    /// its sender is dropped), so that a graceful shutdown is not held up by open streams.
    pub fn new(
        replica: ReplicaHandle,
        public_key: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ApiState {
            replica,
            public_key,
            shutdown,
        }
    }

    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Replica) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        self.replica.call(f).await.map_err(|e| match e {
            // The write is committed but its fsync failed: the disk is at fault.
            NetError::NotDurable(_) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "not_durable",
                message: e.to_string(),
            },
            e => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "stopped",
                message: format!("the store is not available: {e}"),
            },
        })
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/docs", get(list_docs))
        .route("/v1/docs/{id}", get(get_doc))
        .route("/v1/docs/{id}/changes", post(post_changes))
        .route("/v1/docs/{id}/history", get(doc_history))
        .route("/v1/docs/{id}/events", get(doc_events))
        .route("/v1/subscriptions", post(subscribe))
        .route("/v1/status", get(status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error answer: `{"error": message, "code": code}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, error = %self.message, "API request failed");
        }
        (
            self.status,
            Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response()
    }
}

impl From<syncline_core::Error> for ApiError {
    fn from(e: syncline_core::Error) -> Self {
        use syncline_core::Error as E;
        let (status, code) = match &e {
            E::InvalidDocId { .. } => (StatusCode::BAD_REQUEST, "invalid_doc_id"),
            E::InvalidPath { .. } => (StatusCode::BAD_REQUEST, "invalid_path"),
            E::InvalidOperation { .. } => (StatusCode::BAD_REQUEST, "invalid_operation"),
            E::UnknownDocument(_) => (StatusCode::NOT_FOUND, "unknown_document"),
            E::StorageFull => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// The `{id}` path segment: percent-decoded, then validated as a [`DocId`].
pub struct DocPath(pub DocId);

impl<S: Send + Sync> FromRequestParts<S> for DocPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_doc_id",
                    format!(
                        "the document id in the path is not percent-encoded UTF-8 ({e}); \
                         encode it as one path segment, '/' as %2F"
                    ),
                )
            })?;
        Ok(DocPath(DocId::new(raw)?))
    }
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(ToString::to_string).collect()
}

/// Refuses a body declared as something other than JSON (a missing type is taken as JSON).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: format!(
                "the body is declared as {essence:?}; send JSON with Content-Type: application/json"
            ),
        })
    }
}

/// The body as UTF-8 JSON text.
fn json_text(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    require_json(headers)?;
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        code: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        },
        message: e.body_text(),
    })?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("bad_json", "the body is not UTF-8 text"))?;
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        return Err(ApiError::bad_request(
            "bad_json",
            format!("the body is not JSON: {e}"),
        ));
    }
    Ok(text)
}

async fn list_docs(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let ids = s.call(|r| r.doc_ids()).await??;
    let ids: Vec<&str> = ids.iter().map(DocId::as_str).collect();
    Ok(Json(json!({ "docs": ids })))
}

/// The query string as key/value pairs; a malformed one is a 400 with what to write.
type QueryPairs = Result<Query<HashMap<String, String>>, QueryRejection>;

fn query(q: QueryPairs) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m).map_err(|e| {
        ApiError::bad_request("bad_query", format!("the query string is not valid: {e}"))
    })
}

fn parse_at(v: &str) -> Result<At, ApiError> {
    v.parse::<At>()
        .map_err(|e| ApiError::bad_request("bad_at", format!("?at={v:?}: {e}")))
}

async fn get_doc(
    State(s): State<ApiState>,
    DocPath(id): DocPath,
    q: QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let at = query(q)?.get("at").map(|v| parse_at(v)).transpose()?;
    let (doc, heads) = s
        .call(move |r| -> syncline_core::Result<_> {
            let d = r.doc(&id)?;
            let Some(at) = at else {
                return Ok((d.to_json(), d.heads()));
            };
            let past = at.view(d)?;
            Ok((past.to_json(), past.heads()))
        })
        .await??;
    Ok(Json(json!({ "doc": doc, "heads": hex_heads(&heads) })))
}

/// Changes listed per page at most.
const MAX_HISTORY_PAGE: usize = 1000;

/// Who changed the document (public key), when (the author's clock) and what (the
/// operations), in causal order; `?after=N` skips the first N, `?limit=M` (default 100, at most
/// 1000) bounds the page.
async fn doc_history(
    State(s): State<ApiState>,
    DocPath(id): DocPath,
    q: QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let number = |key: &str, default: usize| -> Result<usize, ApiError> {
        q.get(key).map_or(Ok(default), |v| {
            v.parse().map_err(|_| {
                ApiError::bad_request("bad_query", format!("?{key}={v:?} is not a count"))
            })
        })
    };
    let after = number("after", 0)?;
    let limit = number("limit", 100)?.min(MAX_HISTORY_PAGE);
    let doc_id = id.clone();
    let (changes, total) = s
        .call(move |r| -> syncline_core::Result<_> {
            let all = r.doc(&id)?.changes();
            let total = all.len();
            let mut page: Vec<Value> = Vec::with_capacity(limit.min(total));
            for (i, c) in all.iter().enumerate().skip(after).take(limit) {
                let mut v = syncline_core::audit::describe(c);
                v["index"] = json!(i + 1);
                // The signed log behind the document: the author's signature as stored.
                let signed = r
                    .store()
                    .signature(&id, &syncline_core::ChangeHash(c.hash().0))?;
                v["signature"] = json!(signed.map(|(s, _)| hex::encode(s)));
                v["signature_checked"] = json!(signed.is_some_and(|(_, checked)| checked));
                page.push(v);
            }
            Ok((page, total))
        })
        .await??;
    let next = after + changes.len();
    Ok(Json(json!({
        "doc": doc_id.as_str(),
        "changes": changes,
        "next": next,
        "total": total,
    })))
}

async fn post_changes(
    State(s): State<ApiState>,
    DocPath(id): DocPath,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let text = json_text(&headers, body)?;
    let ops = Op::list_from_json(&text).map_err(|e| {
        ApiError::bad_request(
            "invalid_operation",
            format!("the body is not {{\"ops\": [...]}} with valid operations: {e}"),
        )
    })?;
    if ops.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_operation",
            "the change has no operations",
        ));
    }
    let heads = s
        .call(move |r| r.change(&id, &ops))
        .await?
        .map_err(|e| match e {
            // Automerge refusing an operation is the request's fault, not the store's.
            syncline_core::Error::Automerge { .. } => {
                ApiError::bad_request("invalid_operation", e.to_string())
            }
            e => ApiError::from(e),
        })?;
    Ok(Json(json!({ "heads": hex_heads(&heads) })))
}

async fn doc_events(
    State(s): State<ApiState>,
    DocPath(id): DocPath,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Subscribe before answering: every change committed after the headers arrive is sent.
    let rx = s.replica.events();
    let hello = SseEvent::default().comment(format!("events of {id}"));
    let start = (rx, s.shutdown.clone(), id, Some(hello));
    let stream = futures_util::stream::unfold(start, |(mut rx, mut stop, id, hello)| async move {
        if let Some(hello) = hello {
            return Some((Ok(hello), (rx, stop, id, None)));
        }
        if *stop.borrow() {
            return None;
        }
        loop {
            let received = tokio::select! {
                r = rx.recv() => r,
                _ = stop.changed() => return None,
            };
            let event = match received {
                Ok(Event::DocChanged {
                    doc,
                    origin,
                    heads,
                    patches,
                }) if doc == id || rolling::logical_of(&doc).as_ref() == Some(&id) => {
                    let mut data = json!({
                        "doc": id,
                        "origin": origin,
                        "heads": hex_heads(&heads),
                        "patches": patches,
                    });
                    if doc != id {
                        // A rolling document: which bucket changed.
                        data["bucket"] = json!(doc);
                    }
                    SseEvent::default().event("change").data(data.to_string())
                }
                Ok(Event::Lagged { dropped }) => lagged(&id, dropped),
                Err(broadcast::error::RecvError::Lagged(missed)) => lagged(&id, missed),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok(event), (rx, stop, id, None)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn lagged(doc: &DocId, missed: u64) -> SseEvent {
    SseEvent::default()
        .event("lagged")
        .data(json!({ "doc": doc, "lagged": missed }).to_string())
}

async fn subscribe(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        prefix: Option<String>,
        doc: Option<String>,
    }
    let text = json_text(&headers, body)?;
    let bad = |m: String| ApiError::bad_request("invalid_subscription", m);
    let body: Body = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "the body is not {{\"prefix\": P}} or {{\"doc\": ID}}: {e}"
        ))
    })?;
    let (target, echo) = match (body.prefix, body.doc) {
        (Some(p), None) => (
            Target::Prefix(DocPrefix::new(p.clone())?),
            json!({ "prefix": p }),
        ),
        (None, Some(d)) => (Target::Doc(DocId::new(d.clone())?), json!({ "doc": d })),
        _ => {
            return Err(bad(
                "give exactly one of \"prefix\" (\"\" for everything) or \"doc\"".into(),
            ));
        }
    };
    s.call(move |r| r.subscribe(target)).await??;
    Ok(Json(json!({ "subscribed": echo })))
}

async fn status(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let (st, cached) = s
        .call(|r| r.status().map(|st| (st, r.cached_docs())))
        .await??;
    let link = s.replica.link();
    let connected = link.connected && st.hub.is_some();
    Ok(Json(json!({
        "public_key": s.public_key,
        "hub": if connected { link.hub.clone() } else { None },
        "hub_key": st.hub,
        "connected": connected,
        "last_error": link.last_error,
        "last_connected_ms": link.last_connected_ms,
        "attempts": link.attempts,
        "outbox": st.outbox,
        "rejected": st.rejected,
        "refused": st.refused,
        "subscriptions": st.subscriptions,
        "synced": st.synced,
        "cached_docs": cached,
    })))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!(
            "no endpoint {method} {}; see docs/API.md (a document id is one path segment: \
             percent-encode '/' as %2F)",
            uri.path()
        ),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!("{} does not accept {method}; see docs/API.md", uri.path()),
    }
}
