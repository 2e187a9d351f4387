//! The hub's HTTP endpoint for operators: `GET /healthz` and `GET /metrics` (Prometheus text
//! format 0.0.4, written by hand). Both ask the hub thread through its handle, so a stuck hub
//! thread shows as unhealthy.

use std::fmt::Write;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use syncline_core::hub::{Grants, HubMetrics};
use syncline_core::store::HubStore;
use syncline_net::server::HubHandle;

/// How long `/healthz` and `/metrics` wait for the hub thread.
pub const HUB_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// The hub handle the service drives.
pub type Handle = HubHandle<Box<dyn HubStore + Send>, Grants>;

/// One reading of the hub's counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Open sessions.
    pub sessions: usize,
    /// The hub machine's counters.
    pub hub: HubMetrics,
    /// Changes in the log.
    pub log_changes: u64,
    /// Each replica session's lag (log positions still to receive, an upper bound).
    pub lags: Vec<(String, u64)>,
    /// Bytes read from and written to peers.
    pub bytes: (u64, u64),
    /// The store's grants version this instance last applied.
    pub grants_version: u64,
}

/// Reads a snapshot on the hub thread. `log_base` is the log's size when the hub started:
/// counting the log on every scrape would scan the whole table on the hub thread, and only
/// this process writes the log, so the size is `log_base` plus what it stored since, minus
/// what its retention dropped (positions are never reused, so after a restart that dropped
/// buckets before, `log_base`, the last position, counts them still: an upper bound).
pub async fn snapshot(handle: &Handle, log_base: u64, grants: &GrantsApplied) -> Option<Snapshot> {
    let grants_version = grants.load(std::sync::atomic::Ordering::Relaxed);
    let traffic = handle.traffic();
    let bytes = (
        traffic.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        traffic.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
    );
    let read = handle.call(move |hub| Snapshot {
        sessions: hub.session_count(),
        hub: hub.metrics().clone(),
        log_changes: (log_base + hub.metrics().changes_stored)
            .saturating_sub(hub.metrics().expired_changes),
        lags: hub
            .replica_lags()
            .unwrap_or_default()
            .into_iter()
            .map(|(peer, lag)| (peer.to_string(), lag))
            .collect(),
        bytes,
        grants_version,
    });
    match tokio::time::timeout(HUB_ANSWER_TIMEOUT, read).await {
        Ok(Ok(s)) => Some(s),
        _ => None,
    }
}

/// The Prometheus text of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: u64| [(String::new(), v)];
    let m = &s.hub;
    family(
        "syncline_hub_sessions",
        "gauge",
        "Open sessions, authenticated or not.",
        &one(s.sessions as u64),
    );
    family(
        "syncline_hub_sessions_opened_total",
        "counter",
        "Sessions authenticated since the hub started.",
        &one(m.sessions_opened),
    );
    family(
        "syncline_hub_changes_stored_total",
        "counter",
        "Changes committed to the log.",
        &one(m.changes_stored),
    );
    family(
        "syncline_hub_changes_duplicate_total",
        "counter",
        "Changes received that the log already held.",
        &one(m.changes_duplicate),
    );
    family(
        "syncline_hub_changes_sent_total",
        "counter",
        "Changes sent to replicas and peer hubs (catch-up, live and repair).",
        &one(m.changes_sent),
    );
    family(
        "syncline_hub_commits_total",
        "counter",
        "Group commits of the log.",
        &one(m.commits),
    );
    let rejects: Vec<(String, u64)> = m
        .rejects
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{}\"}}", escape_label(reason)), *n))
        .collect();
    family(
        "syncline_hub_rejects_total",
        "counter",
        "Refused pushes and sessions, by reason.",
        &rejects,
    );
    family(
        "syncline_hub_slow_fallbacks_total",
        "counter",
        "Live subscriptions sent back to the log because their session read too slowly.",
        &one(m.slow_fallbacks),
    );
    family(
        "syncline_hub_expired_docs_total",
        "counter",
        "Rolling buckets dropped past their retention.",
        &one(m.expired_docs),
    );
    family(
        "syncline_hub_expired_changes_total",
        "counter",
        "Changes dropped with rolling buckets past their retention.",
        &one(m.expired_changes),
    );
    family(
        "syncline_hub_snapshots_built_total",
        "counter",
        "Documents compacted into a snapshot.",
        &one(m.snapshots_built),
    );
    family(
        "syncline_hub_snapshots_sent_total",
        "counter",
        "Snapshots sent to replicas far behind, in place of the changes they cover.",
        &one(m.snapshots_sent),
    );
    family(
        "syncline_hub_cursor_ahead_total",
        "counter",
        "Subscriptions whose cursor (or newest acknowledged write) was past the highest position the log ever gave (the store was rolled back), repaired by heads.",
        &one(m.cursors_ahead),
    );
    family(
        "syncline_hub_cursor_rewritten_total",
        "counter",
        "Subscriptions whose cursor's change was not the one the replica received there (the store was rolled back and has grown again), repaired by heads.",
        &one(m.cursors_rewritten),
    );
    family(
        "syncline_hub_grants_version",
        "gauge",
        "The store's grants version this instance applies: equal on every instance of a shared store once a grant or revocation holds on all of them.",
        &one(s.grants_version),
    );
    family(
        "syncline_hub_log_changes",
        "gauge",
        "Changes held in the hub's log.",
        &one(s.log_changes),
    );
    family(
        "syncline_hub_bytes_received_total",
        "counter",
        "Bytes read from replicas and peer hubs.",
        &one(s.bytes.0),
    );
    family(
        "syncline_hub_bytes_sent_total",
        "counter",
        "Bytes written to replicas and peer hubs.",
        &one(s.bytes.1),
    );
    let lags: Vec<(String, u64)> = s
        .lags
        .iter()
        .map(|(peer, lag)| (format!("{{peer=\"{}\"}}", escape_label(peer)), *lag))
        .collect();
    family(
        "syncline_hub_replica_lag",
        "gauge",
        "Log positions each connected replica has still to receive (an upper bound; 0 when \
         live and its queue is empty).",
        &lags,
    );
    family(
        "syncline_hub_replica_lag_max",
        "gauge",
        "The largest replica lag.",
        &one(s.lags.iter().map(|(_, l)| *l).max().unwrap_or(0)),
    );
    let h = &m.commit_seconds;
    let name = "syncline_hub_commit_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time of one group commit of the log (fsync included)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, count) in h.cumulative() {
        let le = if bound.is_infinite() {
            "+Inf".to_owned()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
    out
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The grants version the hub applies, set by the grants poller: shared with the metrics.
pub type GrantsApplied = std::sync::Arc<std::sync::atomic::AtomicU64>;

#[derive(Clone)]
struct AppState {
    handle: Handle,
    log_base: u64,
    grants: GrantsApplied,
}

/// The HTTP routes: `/healthz` and `/metrics`.
pub fn router(handle: Handle, log_base: u64, grants: GrantsApplied) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            handle,
            log_base,
            grants,
        })
}

async fn healthz(State(st): State<AppState>) -> Response {
    let answered = tokio::time::timeout(HUB_ANSWER_TIMEOUT, st.handle.call(|_| ())).await;
    let (status, body) = match answered {
        Ok(Ok(())) => (StatusCode::OK, r#"{"status":"ok"}"#),
        Ok(Err(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"stopped","reason":"the hub thread has stopped"}"#,
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"busy","reason":"the hub thread did not answer within 1 s"}"#,
        ),
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    match snapshot(&st.handle, st.log_base, &st.grants).await {
        Some(s) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render(&s),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub thread did not answer within 1 s\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_and_labels_are_escaped() {
        let mut s = Snapshot::default();
        s.hub.rejects.insert("unknown_peer", 2);
        s.hub.rejects.insert("we\"ird", 1);
        let text = render(&s);
        for name in [
            "syncline_hub_sessions",
            "syncline_hub_rejects_total",
            "syncline_hub_log_changes",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
        }
        assert!(text.contains("syncline_hub_rejects_total{reason=\"unknown_peer\"} 2\n"));
        assert!(text.contains("{reason=\"we\\\"ird\"} 1\n"));
        assert!(text.ends_with('\n'));
    }
}
