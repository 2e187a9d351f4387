//! What the operator commands `backup`, `restore`, `verify`, `history` and `verify-export`
//! print: one JSON object with `--json`, else a few lines of text, and progress lines on
//! stderr.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use syncline_core::DocId;
use syncline_core::audit::{ExportReport, HistoryEntry};
use syncline_core::store::backup::{
    BackupInfo, BackupKind, Progress, RestoreSummary, VerifyReport,
};

/// A document id from the command line.
pub fn parse_doc(s: &str) -> Result<DocId, String> {
    DocId::new(s).map_err(|e| e.to_string())
}

/// An instant in milliseconds since the Unix epoch, as RFC 3339 in UTC (or the number, if it
/// is out of range: an author's clock can say anything).
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// One change of `history`: `#12 2026-12-01T18:00:00.123Z author 1391de7e... hash ab12...:
/// set temp = 21.5`.
pub fn history_line(e: &HistoryEntry) -> String {
    let ops: Vec<String> = e
        .ops
        .as_array()
        .map(|a| a.iter().map(op_text).collect())
        .unwrap_or_default();
    format!(
        "#{} {} author {} hash {}: {}",
        e.cursor.0,
        rfc3339_ms(e.time_ms),
        e.author,
        e.hash,
        ops.join("; ")
    )
}

/// An Automerge operation in a few words: `set temp = 21.5`, `del 2@ab12`, `inc n = 2`.
fn op_text(op: &Value) -> String {
    let action = op["action"].as_str().unwrap_or("?");
    let at = op
        .get("key")
        .or_else(|| op.get("elemId"))
        .map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_owned))
        .unwrap_or_default();
    let at = short_ids(&at);
    let obj = short_ids(op["obj"].as_str().unwrap_or("?"));
    let place = if obj == "_root" {
        at
    } else {
        format!("{obj}/{at}")
    };
    match op.get("value") {
        Some(v) => format!("{action} {place} = {v}"),
        None => format!("{action} {place}"),
    }
}

/// Automerge op ids (`COUNTER@ACTOR`, the actor 80 hex characters here) with the actor cut
/// to its first 8 characters, for reading.
fn short_ids(s: &str) -> String {
    match s.split_once('@') {
        Some((n, actor)) => format!("{n}@{}", actor.get(..8).unwrap_or(actor)),
        _ => s.to_owned(),
    }
}

/// `verify-export --json`.
pub fn export_report_json(r: &ExportReport) -> Value {
    json!({
        "ok": true,
        "doc": r.doc.as_str(),
        "changes": r.changes,
        "authors": r.authors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "heads": r.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "state": r.state,
    })
}

/// `verify-export` without `--json`.
pub fn export_report_text(r: &ExportReport) -> String {
    let mut out = format!(
        "ok: {} changes of {} by {} authors; every signature and hash link holds\n",
        r.changes,
        r.doc,
        r.authors.len()
    );
    for a in &r.authors {
        out.push_str(&format!("author {a}\n"));
    }
    for h in &r.heads {
        out.push_str(&format!("head {h}\n"));
    }
    out.push_str(&format!("state {}\n", r.state));
    out
}

/// `backup: 120000 of 1000000 changes (12%)`.
pub fn progress_line(what: &str, p: Progress) -> String {
    let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
    format!("{what}: {} of {} changes ({pct}%)", p.done, p.total)
}

fn kind(k: BackupKind) -> &'static str {
    match k {
        BackupKind::Full => "full",
        BackupKind::Incremental => "incremental",
    }
}

fn info_json(info: &BackupInfo) -> Value {
    json!({
        "kind": kind(info.kind),
        "epoch": hex::encode(info.epoch.0),
        "after": info.after.0,
        "through": info.through.0,
        "changes": info.changes,
        "created_ms": info.created_ms,
    })
}

/// `backup --json`.
pub fn backup_json(file: &Path, info: &BackupInfo) -> Value {
    let mut v = info_json(info);
    v["file"] = json!(file.display().to_string());
    v
}

/// `backup` without `--json`.
pub fn backup_text(file: &Path, info: &BackupInfo) -> String {
    let held = if info.changes == 0 {
        format!("no change after log position {}", info.after.0)
    } else {
        format!(
            "{} changes, log positions {}..={}",
            info.changes,
            info.after.0 + 1,
            info.through.0
        )
    };
    format!(
        "wrote {} backup to {}: {held} of epoch {}\n\
         restore it with `syncline-hub restore --from {}{} --data DIR`\n",
        match info.kind {
            BackupKind::Full => "a full",
            BackupKind::Incremental => "an incremental",
        },
        file.display(),
        hex::encode(info.epoch.0),
        if info.kind == BackupKind::Incremental {
            "FULL [INCREMENTAL...] "
        } else {
            ""
        },
        file.display(),
    )
}

/// `restore --json`.
pub fn restore_json(data: &Path, s: &RestoreSummary) -> Value {
    json!({
        "data": data.display().to_string(),
        "changes": s.changes,
        "through": s.through.0,
        "epoch": hex::encode(s.epoch.0),
    })
}

/// `restore` without `--json`.
pub fn restore_text(data: &Path, s: &RestoreSummary) -> String {
    format!(
        "restored {} changes (log through position {}) into {}\n\
         new log epoch {}: replicas reconcile with it and upload what the backup lacks\n",
        s.changes,
        s.through.0,
        data.display(),
        hex::encode(s.epoch.0),
    )
}

/// `verify --json`.
pub fn verify_json(files: &[PathBuf], r: &VerifyReport) -> Value {
    json!({
        "ok": true,
        "files": files.iter().zip(&r.files).map(|(f, i)| {
            let mut v = info_json(i);
            v["file"] = json!(f.display().to_string());
            v
        }).collect::<Vec<_>>(),
        "changes": r.changes,
        "docs": r.docs,
        "authors": r.authors,
    })
}

/// `verify` without `--json`.
pub fn verify_text(files: &[PathBuf], r: &VerifyReport) -> String {
    let mut out = String::new();
    for (f, i) in files.iter().zip(&r.files) {
        out.push_str(&format!(
            "{}: {} backup, {} changes, positions {}..={}\n",
            f.display(),
            kind(i.kind),
            i.changes,
            i.after.0 + 1,
            i.through.0
        ));
    }
    out.push_str(&format!(
        "ok: {} changes of {} documents by {} authors; every hash and signature holds\n",
        r.changes, r.docs, r.authors
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_never_divide_by_zero() {
        let p = |done, total| progress_line("backup", Progress { done, total });
        assert_eq!(p(0, 0), "backup: 0 of 0 changes (100%)");
        assert_eq!(p(120, 1000), "backup: 120 of 1000 changes (12%)");
    }
}
