//! Acknowledged means durable: a writer process is killed with SIGKILL at random moments
//! (between commits, mid-commit, mid-compaction), and every write it reported as acknowledged
//! must be in the store, which must pass `PRAGMA integrity_check` and keep working.
//!
//! The writer is `src/bin/syncline-crash-writer.rs`; its stdout lines are the acknowledgements.
//! Rerun a failing schedule with `SYNCLINE_CRASH_SEED=<seed>` (the writer's own choices follow
//! the seed; the instants the kills land at depend on timing and never repeat exactly).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use syncline_core::DocId;
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::{Replica, ReplicaOptions};

const WRITER: &str = env!("CARGO_BIN_EXE_syncline-crash-writer");
const ROUNDS: usize = 8;
/// Most acknowledgements read in one round before the kill.
const MAX_ACKS_PER_ROUND: usize = 120;
/// How long one line may take to arrive (opening a grown store, a compaction, a slow disk).
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest jitter before a kill, in units of the writer's observed time per line.
const MAX_JITTER_LINES: f64 = 3.0;
const SIGKILL: i32 = 9;

/// What the writer acknowledged for one document, over every round.
#[derive(Debug, Default)]
struct Acked {
    created: bool,
    /// `(n, appended to items, appended to text)` per acknowledged change.
    writes: Vec<(i64, bool, bool)>,
}

impl Acked {
    fn last_counter(&self) -> i64 {
        self.writes.iter().map(|w| w.0).max().unwrap_or(0)
    }
}

#[test]
fn a_killed_writer_loses_nothing_it_acknowledged() -> Result<()> {
    let seed = match std::env::var("SYNCLINE_CRASH_SEED") {
        Ok(s) => s.parse().context("SYNCLINE_CRASH_SEED must be a u64")?,
        Err(_) => rand::random(),
    };
    println!("crash test seed {seed} (rerun with SYNCLINE_CRASH_SEED={seed})");
    run(seed).with_context(|| format!("crash test failed; seed {seed}"))
}

fn run(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    // On the real disk (the target dir), not a tmpfs: fsync must mean something.
    let dir = tempfile::Builder::new()
        .prefix("crash-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let store = dir.path().join("replica.sqlite");
    let key = dir.path().join("identity.key");
    Identity::generate().save(&key)?;

    let mut acked: BTreeMap<String, Acked> = BTreeMap::new();
    let mut seen_counters: BTreeMap<String, i64> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let target = rng.gen_range(1..=MAX_ACKS_PER_ROUND);
        // Half the kills land right after an acknowledgement (the writer is then starting its
        // next commit), half after a busy wait of 0 to 3 times the time one write takes.
        let jitter = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.0..MAX_JITTER_LINES)
        };
        let lines = kill_writer_after(&store, &key, rng.r#gen(), target, jitter)
            .with_context(|| format!("round {round}: running the writer"))?;
        for line in &lines {
            record(&mut acked, line).with_context(|| format!("round {round}"))?;
        }
        let unreported = check_store(&store, &key, &acked, &mut seen_counters)
            .with_context(|| format!("round {round}: after the kill (acks {})", lines.len()))?;
        println!(
            "round {round}: killed after {} acks (target {target}, jitter {jitter:.2} lines), \
             {unreported} committed but unreported; counters {seen_counters:?}",
            lines.len()
        );
    }
    write_after_the_last_kill(&store, &key, &seen_counters)?;
    println!("{ROUNDS} rounds in {:?}", started.elapsed());
    Ok(())
}

/// The store left by the last kill still takes writes, and keeps them across a reopen.
fn write_after_the_last_kill(
    store: &Path,
    key: &Path,
    counters: &BTreeMap<String, i64>,
) -> Result<()> {
    let (name, &counter) = counters.iter().next().context("no document was written")?;
    let doc = DocId::new(name.clone())?;
    let n = counter + 1;
    let ops = vec![
        Op::Increment {
            path: vec!["counter".into()],
            by: 1,
        },
        Op::Put {
            path: vec!["keys".into(), PathElem::Key(format!("k{n}"))],
            value: Value::Int(n),
        },
    ];
    Replica::open(store, Identity::load(key)?, ReplicaOptions::default())?
        .change(&doc, &ops)
        .context("writing after the last kill")?;
    let mut reopened = Replica::open(store, Identity::load(key)?, ReplicaOptions::default())?;
    reopened.store().integrity_check()?;
    let json = reopened.json(&doc)?;
    ensure!(
        json["counter"] == n && json["keys"][format!("k{n}")] == n,
        "the write after the last kill is missing: {json}"
    );
    Ok(())
}

/// Runs the writer until it has acknowledged `target` lines, waits `jitter` times its time per
/// line, kills it with SIGKILL, and returns every complete line it printed.
fn kill_writer_after(
    store: &Path,
    key: &Path,
    writer_seed: u64,
    target: usize,
    jitter: f64,
) -> Result<Vec<String>> {
    let mut child = Command::new(WRITER)
        .arg(store)
        .arg(key)
        .arg(writer_seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the writer")?;
    let stdout = child.stdout.take().context("the writer's stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || read_lines(stdout, tx));

    let mut lines = Vec::new();
    let mut first_at = None;
    while lines.len() < target {
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => {
                first_at.get_or_insert_with(Instant::now);
                lines.push(line);
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!(
                    "the writer stopped acknowledging after {} lines ({e}); {status}; stderr: {}",
                    lines.len(),
                    stderr_of(&mut child)
                );
            }
        }
    }
    if jitter > 0.0 {
        // A busy wait, not a sleep: a sleep's granularity would bunch the kills together.
        let per_line = match (first_at, lines.len()) {
            (Some(t), n) if n > 1 => t.elapsed() / (n as u32 - 1),
            _ => Duration::from_millis(2),
        };
        let until = Instant::now() + per_line.mul_f64(jitter).min(Duration::from_millis(100));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    child.kill().context("killing the writer")?;
    let status = child.wait()?;
    ensure!(
        status.signal() == Some(SIGKILL),
        "the writer ended by itself before the kill: {status}; stderr: {}",
        stderr_of(&mut child)
    );
    // Lines printed between the target and the kill were acknowledged too: the pipe closed
    // with the process, so the reader ends.
    loop {
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => bail!("the writer's stdout stayed open after the kill: {e}"),
        }
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))??;
    Ok(lines)
}

/// Sends every complete line; a last line without its newline was cut by the kill and is not
/// an acknowledgement.
fn read_lines(stdout: impl Read, tx: mpsc::Sender<String>) -> Result<()> {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || !line.ends_with('\n') {
            return Ok(());
        }
        if tx.send(line.trim_end().to_owned()).is_err() {
            return Ok(());
        }
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    text
}

fn record(acked: &mut BTreeMap<String, Acked>, line: &str) -> Result<()> {
    let fields: Vec<&str> = line.split(' ').collect();
    match fields[..] {
        ["INIT", doc] => acked.entry(doc.to_owned()).or_default().created = true,
        ["ACK", doc, n, list, text] => {
            let entry = acked.entry(doc.to_owned()).or_default();
            ensure!(entry.created, "{doc} written before it was created: {line}");
            let n: i64 = n.parse().with_context(|| format!("line {line:?}"))?;
            entry.writes.push((n, list == "1", text == "1"));
        }
        _ => bail!("unexpected line from the writer: {line:?}"),
    }
    Ok(())
}

/// Reopens the store and checks it against everything acknowledged so far. Returns how many
/// changes were committed but not reported (the kill landed between commit and print).
fn check_store(
    store: &Path,
    key: &Path,
    acked: &BTreeMap<String, Acked>,
    seen_counters: &mut BTreeMap<String, i64>,
) -> Result<i64> {
    let mut replica = Replica::open(store, Identity::load(key)?, ReplicaOptions::default())
        .context("reopening the store")?;
    replica
        .store()
        .integrity_check()
        .context("PRAGMA integrity_check")?;
    let held = replica.doc_ids()?;
    for name in acked.keys() {
        let doc = DocId::new(name.clone())?;
        ensure!(
            held.contains(&doc),
            "{doc} was acknowledged but is not in the store"
        );
    }
    let no_acks = Acked::default();
    let mut changes = 0u64;
    let mut unreported = 0;
    // Every document held, acknowledged or not (its creation may have committed unreported).
    for doc in &held {
        let acks = acked.get(doc.as_str()).unwrap_or(&no_acks);
        let json = replica.json(doc)?;
        let counter = json["counter"]
            .as_i64()
            .with_context(|| format!("{doc} has no counter: {json}"))?;
        let keys = json["keys"]
            .as_object()
            .with_context(|| format!("{doc} has no keys map"))?;
        let items: Vec<i64> = json["items"]
            .as_array()
            .with_context(|| format!("{doc} has no items list"))?
            .iter()
            .map(|v| v.as_i64().context("an item is not an integer"))
            .collect::<Result<_>>()?;
        let text = json["text"]
            .as_str()
            .with_context(|| format!("{doc} has no text"))?;

        ensure!(
            counter >= acks.last_counter(),
            "{doc}: counter {counter} is behind the last acknowledged {}",
            acks.last_counter()
        );
        let before = seen_counters.insert(doc.to_string(), counter).unwrap_or(0);
        ensure!(
            counter >= before,
            "{doc}: counter went back from {before} to {counter}"
        );
        // Each change increments once and adds one key, atomically.
        ensure!(
            keys.len() as i64 == counter,
            "{doc}: {} keys for counter {counter}: a change was stored in part",
            keys.len()
        );
        ensure!(
            items.windows(2).all(|w| w[0] < w[1]),
            "{doc}: items out of order: {items:?}"
        );
        for &(n, list, in_text) in &acks.writes {
            ensure!(
                keys.get(&format!("k{n}")).and_then(|v| v.as_i64()) == Some(n),
                "{doc}: acknowledged key k{n} is missing"
            );
            ensure!(
                !list || items.binary_search(&n).is_ok(),
                "{doc}: acknowledged item {n} is missing"
            );
            ensure!(
                !in_text || text.contains(&format!("[{n}]")),
                "{doc}: acknowledged text [{n}] is missing"
            );
        }
        unreported += counter - acks.last_counter();
        // The creating change plus one per increment, none of them acknowledged by a hub.
        changes += counter as u64 + 1;
    }
    let status = replica.status()?;
    ensure!(
        status.outbox == changes,
        "the outbox holds {} changes, the documents {changes}",
        status.outbox
    );
    Ok(unreported)
}
