//! Backup, verify and restore of a hub store with many changes, through the real
//! `syncline-hub` commands, beside two baselines measured in the same run: copying the store
//! file (the disk's rate) and batch-verifying the same signatures in this process (the
//! verifier's rate on one core).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use automerge::transaction::Transactable;
use serde::Serialize;
use syncline_core::DocId;
use syncline_core::change::{self, SignedChange, VerifiedChange};
use syncline_core::identity::Identity;
use syncline_core::store::{HubStore, SqliteHubStore};

use crate::procs::Bins;

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct BackupResult {
    pub changes: u64,
    pub docs: u64,
    pub store_bytes: u64,
    pub backup_bytes: u64,
    pub backup_seconds: f64,
    pub verify_seconds: f64,
    pub restore_seconds: f64,
    /// The same restore from the backup as hub schema 5 wrote it (no chains): every change is
    /// chained as the store opens, as at the upgrade of a hub of that schema.
    pub restore_unchained_seconds: f64,
    /// Baseline: `std::fs::copy` of the store plus fsync, in the same run.
    pub copy_seconds: f64,
    /// Baseline: `verify_batch` of 256 changes at a time of the same signatures, one core.
    pub raw_verify_per_sec: f64,
    pub backup_changes_per_sec: f64,
    pub verify_changes_per_sec: f64,
    pub restore_changes_per_sec: f64,
    /// One document's signed log, exported and checked offline (`export`, `verify-export`).
    pub export_changes: u64,
    pub export_bytes: u64,
    pub export_seconds: f64,
    pub verify_export_seconds: f64,
    pub verify_export_changes_per_sec: f64,
    /// The same backup restored into PostgreSQL, then backed up from it.
    pub postgres: Option<PgBackup>,
}

/// The backup's round trip through a PostgreSQL store (`restore --store`, `backup --store`).
#[derive(Debug, Serialize)]
pub struct PgBackup {
    pub restore_seconds: f64,
    pub restore_changes_per_sec: f64,
    pub backup_seconds: f64,
    pub backup_changes_per_sec: f64,
    pub backup_bytes: u64,
    /// Changes `verify` found (every signature checked) in the backup taken from PostgreSQL.
    pub verified_changes: u64,
}

/// Builds a hub store of `docs` x `per_doc` signed changes in `dir`, then times the commands.
pub fn measure(
    bins: &Bins,
    dir: &Path,
    docs: usize,
    per_doc: usize,
    export_changes: usize,
    postgres: Option<&str>,
) -> Result<BackupResult> {
    let data = dir.join("hub");
    let hub = bins.path("syncline-hub")?;
    let out = Command::new(&hub)
        .args(["init", "--data"])
        .arg(&data)
        .output()?;
    ensure!(
        out.status.success(),
        "hub init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_path = data.join("hub.db");
    let author = Identity::generate();
    let ids = (0..docs)
        .map(|d| DocId::new(format!("bench/backup/{d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let sample = build_store(&store_path, &author, &ids, per_doc)?.sample;
    let changes = (docs * per_doc) as u64;
    let store_bytes = std::fs::metadata(&store_path)?.len();

    let t = Instant::now();
    let copy = dir.join("copy.db");
    std::fs::copy(&store_path, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let copy_seconds = t.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;

    let t = Instant::now();
    let doc = DocId::new("bench/backup/0").context("doc id")?;
    let mut verified = 0usize;
    for part in sample.chunks(256) {
        verified += change::verify_batch(&doc, part.to_vec())?.len();
    }
    let raw_verify_per_sec = verified as f64 / t.elapsed().as_secs_f64();

    let file = dir.join("full.bak");
    let backup_seconds = timed(
        Command::new(&hub)
            .args(["backup", "--data"])
            .arg(&data)
            .arg("--to")
            .arg(&file),
    )?;
    let backup_bytes = std::fs::metadata(&file)?.len();
    let verify_seconds = timed(Command::new(&hub).args(["verify", "--from"]).arg(&file))?;
    let restore = |from: &Path, into: &str| {
        timed(
            Command::new(&hub)
                .args(["restore", "--from"])
                .arg(from)
                .arg("--data")
                .arg(dir.join(into)),
        )
    };
    let restore_seconds = restore(&file, "restored")?;
    // The same backup as schema 5 (before the log's chain) wrote it.
    let unchained = dir.join("unchained.bak");
    std::fs::copy(&file, &unchained)?;
    rusqlite::Connection::open(&unchained)?
        .execute_batch("ALTER TABLE log DROP COLUMN chain; PRAGMA user_version = 5; VACUUM;")?;
    let restore_unchained_seconds = restore(&unchained, "restored-unchained")?;
    // The same backup into a PostgreSQL store, and backed up from there.
    let postgres = match postgres {
        Some(url) => {
            let restore_seconds = timed(
                Command::new(&hub)
                    .args(["restore", "--force", "--from"])
                    .arg(&file)
                    .args(["--store", url]),
            )?;
            let pg_file = dir.join("pg.bak");
            let backup_seconds = timed(
                Command::new(&hub)
                    .args(["backup", "--store", url, "--to"])
                    .arg(&pg_file),
            )?;
            let backup_bytes = std::fs::metadata(&pg_file)?.len();
            let out = Command::new(&hub)
                .args(["verify", "--json", "--from"])
                .arg(&pg_file)
                .env("SYNCLINE_LOG", "warn")
                .output()?;
            ensure!(
                out.status.success(),
                "verify of the backup from PostgreSQL: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let verified_changes = report["changes"]
                .as_u64()
                .context("verify --json gives the changes it checked")?;
            std::fs::remove_file(&pg_file)?;
            Some(PgBackup {
                restore_seconds,
                restore_changes_per_sec: changes as f64 / restore_seconds,
                backup_seconds,
                backup_changes_per_sec: changes as f64 / backup_seconds,
                backup_bytes,
                verified_changes,
            })
        }
        None => None,
    };
    // One more document with a long history of its own, for the audit export.
    let export_doc = DocId::new("bench/export").context("doc id")?;
    {
        let mut store = SqliteHubStore::open(&store_path)?;
        let mut am = automerge::Automerge::new();
        am.set_actor(change::actor_for(&author.peer_id(), rand::random()));
        let mut batch = Vec::with_capacity(256);
        for i in 0..export_changes {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, format!("sensor-{}", i % 1000), i as i64)?;
            tx.commit();
            let c = am.get_last_local_change().context("the change just made")?;
            batch.push(change::sign(&author, &export_doc, c)?);
            if batch.len() == 256 {
                store.append(&batch)?;
                batch.clear();
            }
        }
        store.append(&batch)?;
    }
    let export_file = dir.join("export.jsonl");
    let export_seconds = timed(
        Command::new(&hub)
            .args(["export", "--data"])
            .arg(&data)
            .arg(export_doc.as_str())
            .arg("--to")
            .arg(&export_file),
    )?;
    let export_bytes = std::fs::metadata(&export_file)?.len();
    let verify_export_seconds = timed(Command::new(&hub).arg("verify-export").arg(&export_file))?;

    let rate = |s: f64| changes as f64 / s;
    Ok(BackupResult {
        export_changes: export_changes as u64,
        export_bytes,
        export_seconds,
        verify_export_seconds,
        verify_export_changes_per_sec: export_changes as f64 / verify_export_seconds,
        changes,
        docs: docs as u64,
        store_bytes,
        backup_bytes,
        backup_seconds,
        verify_seconds,
        restore_seconds,
        restore_unchained_seconds,
        copy_seconds,
        raw_verify_per_sec,
        backup_changes_per_sec: rate(backup_seconds),
        verify_changes_per_sec: rate(verify_seconds),
        restore_changes_per_sec: rate(restore_seconds),
        postgres,
    })
}

/// Runs a command to its end (stdout and stderr discarded); returns its wall time.
fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.env("SYNCLINE_LOG", "warn").output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t.elapsed().as_secs_f64())
}

/// A hub store built by [`build_store`].
pub struct Built {
    /// The first document's changes.
    pub sample: Vec<SignedChange>,
    /// Time spent appending (signing left out).
    pub append_secs: f64,
}

/// `per_doc` changes (one key put each, 1,000 keys) made once, then signed for each of the
/// documents and appended in group commits of 256.
pub fn build_store(
    path: &Path,
    author: &Identity,
    docs: &[DocId],
    per_doc: usize,
) -> Result<Built> {
    let mut am = automerge::Automerge::new();
    am.set_actor(change::actor_for(&author.peer_id(), rand::random()));
    let made: Vec<automerge::Change> = (0..per_doc)
        .map(|i| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, format!("sensor-{}", i % 1000), i as i64)?;
            tx.commit();
            am.get_last_local_change().context("the change just made")
        })
        .collect::<Result<_>>()?;
    let mut store = SqliteHubStore::open(path)?;
    let mut sample = Vec::new();
    let mut append_secs = 0.0;
    let t = Instant::now();
    for (d, doc) in docs.iter().enumerate() {
        let signed: Vec<VerifiedChange> = made
            .iter()
            .map(|c| change::sign(author, doc, c.clone()))
            .collect::<Result<_, _>>()?;
        let appending = Instant::now();
        for part in signed.chunks(256) {
            store.append(part)?;
        }
        append_secs += appending.elapsed().as_secs_f64();
        if d == 0 {
            sample = signed
                .into_iter()
                .map(VerifiedChange::into_signed)
                .collect();
        }
        if (d + 1) % 100 == 0 {
            crate::say(format!(
                "   built {} of {} changes ({:.0} s)",
                (d + 1) * per_doc,
                docs.len() * per_doc,
                t.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(Built {
        sample,
        append_secs,
    })
}
