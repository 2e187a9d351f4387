//! The nemesis suite: a real hub and real edges on 127.0.0.1, each edge behind a
//! [`FaultProxy`], under a workload of concurrent writers, while a nemesis driven by a seed
//! breaks the network and the processes; then every fault is healed and a checker that can
//! fail decides whether the run kept Syncline's promises:
//!
//! - every replica reaches identical heads and JSON for every document within a bound, and a
//!   fresh replica catching up from the hub reaches the same state;
//! - every acknowledged write is present, exactly once; no refused write is;
//! - each counter equals the sum of its acknowledged increments (plus at most the increments
//!   whose answer was lost when a process died);
//! - every change stored by every replica and by the hub verifies against its author's
//!   signature.
//!
//! The nemeses, combined at random: partitions (one edge, half of the edges, all of them
//! from the hub), lossy links (loss, delay and jitter, duplication, reordering, per
//! direction), SIGKILL and restart of the hub and of edges (under load, so also mid-commit),
//! SIGSTOP/SIGCONT pauses, the hub restored from an older online backup (it lost its latest
//! changes: the edges must upload them again), and an edge's disk filling up (a small tmpfs
//! filled to the last byte: writes are refused with `507 storage_full`, nothing stored is
//! lost, writing resumes when space is freed).
//!
//! The seed fixes the schedule of faults, the workload's choices and the proxies' random
//! draws; the timing of real processes is not fixed, so a replay repeats the same faults at
//! the same moments, not the same interleaving.
//!
//! [`FaultProxy`]: crate::proxy::FaultProxy

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::proxy::{Dir, FaultProxy, Faults, ProxyStats};
use crate::{Edge, Hub, bin, run};

/// The shape of one scenario.
#[derive(Clone, Debug)]
pub struct Config {
    /// Seeds the nemesis schedule, the workload and the proxies.
    pub seed: u64,
    /// Edges (at least 2).
    pub edges: usize,
    /// Documents written.
    pub docs: usize,
    /// How long faults are injected.
    pub fault_time: Duration,
    /// How long the replicas may take to converge once every fault is healed.
    pub converge_within: Duration,
}

impl Config {
    /// The scenario of `seed` with the defaults: 4 edges, 3 documents.
    pub fn new(seed: u64, fault_time: Duration) -> Config {
        Config {
            seed,
            edges: 4,
            docs: 3,
            fault_time,
            converge_within: Duration::from_secs(120),
        }
    }
}

/// What a scenario did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Seconds of faults.
    pub fault_secs: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Writes acknowledged (200).
    pub acked: u64,
    /// Writes refused (507 storage_full; any other answer is also a failure).
    pub refused: u64,
    /// Writes whose answer never came (the edge was killed, paused or restarting).
    pub unknown: u64,
    /// Acknowledged writes missing from the converged state (must be 0).
    pub lost: u64,
    /// Documents on which the replicas disagreed at the deadline (must be 0).
    pub divergences: u64,
    /// From the moment every fault was healed to identical state everywhere.
    pub converge: Duration,
    /// Changes whose signatures the checker verified, replicas and hub together.
    pub verified: u64,
    /// Datagrams through the proxies.
    pub network: ProxyStats,
    /// Everything the checker found wrong, in words.
    pub failures: Vec<String>,
    /// Answers other than 200 and 507 (status and code), by count.
    pub other_answers: BTreeMap<String, u64>,
}

impl Report {
    /// True if the checker found nothing wrong.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// How to run this scenario again.
    pub fn replay(&self) -> String {
        format!(
            "cargo build -p syncline-hub -p syncline-edge && cargo run -p syncline-e2e --bin \
             syncline-nemesis -- --seed {} --fault-secs {}",
            self.seed, self.fault_secs
        )
    }

    /// One paragraph for a person.
    pub fn summary(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let mut s = format!(
            "seed {}: {} s of faults ({}); writes acknowledged {}, refused (storage full) {}, \
             answer lost {}; lost {}, divergences {}; converged {:.1} s after heal; {} \
             signatures verified; datagrams forwarded {}, dropped {}, duplicated {}, \
             reordered {}",
            self.seed,
            self.fault_secs,
            faults.join(", "),
            self.acked,
            self.refused,
            self.unknown,
            self.lost,
            self.divergences,
            self.converge.as_secs_f64(),
            self.verified,
            self.network.forwarded,
            self.network.dropped,
            self.network.duplicated,
            self.network.reordered,
        );
        if !self.other_answers.is_empty() {
            let _ = write!(s, "; other answers {:?}", self.other_answers);
        }
        for f in &self.failures {
            let _ = write!(s, "\n  FAILED: {f}");
        }
        if !self.passed() {
            let _ = write!(s, "\n  replay: {}", self.replay());
        }
        s
    }
}

/// Runs one scenario in a temp dir and checks it. Setup failures (a process that does not
/// start) are failures of the report too, not panics, so that a long run goes on.
pub fn run_scenario(config: &Config) -> Report {
    let mut report = Report {
        seed: config.seed,
        fault_secs: config.fault_time.as_secs(),
        ..Report::default()
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            report.failures.push(format!("no temp dir: {e}"));
            return report;
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Scenario::run(config, dir.path(), &mut report)
    }));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.failures.push(format!("{e:#}")),
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            report.failures.push(format!("the harness failed: {what}"));
        }
    }
    report
}

/// One write of the workload.
#[derive(Clone, Debug)]
struct Write {
    doc: usize,
    kind: Kind,
    tag: String,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Map,
    List,
    Text,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Acked,
    Refused,
    Unknown,
}

type WriterLog = (Vec<Write>, BTreeMap<String, u64>);

struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<WriterLog>>,
}

impl Writer {
    fn join(mut self) -> anyhow::Result<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .ok_or_else(|| anyhow::anyhow!("a writer joined twice"))?
            .join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))
    }
}

impl Drop for Writer {
    /// A scenario that fails half-way stops its writers too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn doc_id(d: usize) -> String {
    format!("nemesis/{d}")
}

/// Writes to random documents through one edge's API until stopped; the API address
/// changes when the edge restarts.
fn start_writer(edge: usize, api: Arc<Mutex<String>>, docs: usize, seed: u64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut log = Vec::new();
        let mut other = BTreeMap::new();
        let mut seq = 0u64;
        while !s.load(Ordering::Relaxed) {
            seq += 1;
            let doc = rng.gen_range(0..docs);
            let kind = *[Kind::Counter, Kind::Map, Kind::List, Kind::Text]
                .choose(&mut rng)
                .unwrap_or(&Kind::Counter);
            let tag = format!("e{edge}-{seq}");
            let ops = match kind {
                Kind::Counter => json!([{"op":"increment","path":["total"],"by":1}]),
                Kind::Map => json!([{"op":"put","path":["m", &tag],"value":seq}]),
                Kind::List => json!([{"op":"insert","path":["l", -1],"value":&tag}]),
                Kind::Text => json!([{"op":"splice","path":["t"],"index":0,"delete":0,
                    "text":format!("<{tag}>")}]),
            };
            let addr = api.lock().map(|a| a.clone()).unwrap_or_default();
            let body = json!({ "ops": ops }).to_string();
            let path = format!("/v1/docs/{}/changes", crate::enc(&doc_id(doc)));
            let outcome = match crate::http(&addr, "POST", &path, Some(&body)) {
                Ok((200, _)) => Outcome::Acked,
                Ok((507, _)) => Outcome::Refused,
                Ok((status, text)) => {
                    let code = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    *other.entry(format!("{status} {code}")).or_insert(0) += 1;
                    // A refusal with a typed error: the write did not happen (and the
                    // checker reports the answer: only 507 is expected).
                    Outcome::Refused
                }
                Err(_) => Outcome::Unknown,
            };
            log.push(Write {
                doc,
                kind,
                tag,
                outcome,
            });
            if outcome == Outcome::Unknown {
                // The edge is down or paused: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            } else {
                std::thread::sleep(Duration::from_millis(rng.gen_range(2..15)));
            }
        }
        (log, other)
    });
    Writer {
        stop,
        thread: Some(thread),
    }
}

/// A tmpfs mounted on an edge's data directory, so that its disk can fill up for real;
/// unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    const SIZE_MB: u64 = 64;

    /// Mounts it; `None` where tmpfs cannot be mounted (not root, no mount namespace).
    fn mount(dir: &Path) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let (code, _, _) = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}m,mode=0700", Self::SIZE_MB))
            .arg("tmpfs")
            .arg(dir));
        (code == 0).then(|| SmallDisk {
            dir: dir.to_path_buf(),
        })
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Fills the disk to the last block.
    fn fill(&self) {
        let Ok(mut f) = std::fs::File::create(self.filler()) else {
            return;
        };
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
            let buf = vec![0xAAu8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
    }

    /// Frees the space again.
    fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

struct Node {
    edge: Edge,
    api: Arc<Mutex<String>>,
    proxy: FaultProxy,
    down: bool,
    paused: bool,
}

impl Node {
    fn restart(&mut self) {
        self.edge.restart();
        if let Ok(mut a) = self.api.lock() {
            a.clone_from(&self.edge.api);
        }
        self.down = false;
    }
}

/// The faults a step can inject; one per category at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nemesis {
    PartitionOne,
    PartitionHalf,
    PartitionAll,
    LossyLinks,
    KillHub,
    PauseHub,
    RestoreHub,
    KillEdge,
    PauseEdge,
    DiskFull,
}

impl Nemesis {
    fn name(self) -> &'static str {
        match self {
            Nemesis::PartitionOne => "partition one edge",
            Nemesis::PartitionHalf => "partition half the edges",
            Nemesis::PartitionAll => "partition the hub",
            Nemesis::LossyLinks => "lossy links",
            Nemesis::KillHub => "SIGKILL hub",
            Nemesis::PauseHub => "SIGSTOP hub",
            Nemesis::RestoreHub => "hub restored from an older backup",
            Nemesis::KillEdge => "SIGKILL edge",
            Nemesis::PauseEdge => "SIGSTOP edge",
            Nemesis::DiskFull => "edge disk full",
        }
    }

    fn category(self) -> u8 {
        match self {
            Nemesis::PartitionOne
            | Nemesis::PartitionHalf
            | Nemesis::PartitionAll
            | Nemesis::LossyLinks => 0,
            Nemesis::KillHub | Nemesis::PauseHub | Nemesis::RestoreHub => 1,
            Nemesis::KillEdge | Nemesis::PauseEdge | Nemesis::DiskFull => 2,
        }
    }
}

/// What a step did, to undo it.
enum Undo {
    Heal(Vec<usize>),
    RestartHub,
    ContinueHub,
    RestartEdge(usize),
    ContinueEdge(usize),
    FreeDisk,
}

struct Scenario<'a> {
    config: &'a Config,
    root: PathBuf,
    hub: Option<Hub>,
    hub_data: PathBuf,
    hub_addr: String,
    hub_fp: String,
    hub_paused: bool,
    nodes: Vec<Node>,
    disk: Option<SmallDisk>,
    backup: Option<PathBuf>,
    backups: u64,
    probe_writes: Vec<Write>,
    report: &'a mut Report,
}

impl Scenario<'_> {
    fn run(config: &Config, root: &Path, report: &mut Report) -> anyhow::Result<()> {
        anyhow::ensure!(config.edges >= 2, "a scenario needs 2 edges or more");
        let hub_data = root.join("hub");
        let hub = Hub::start(&hub_data, "127.0.0.1:0");
        let mut s = Scenario {
            config,
            root: root.to_path_buf(),
            hub_addr: hub.addr.clone(),
            hub_fp: hub.fingerprint.clone(),
            hub: Some(hub),
            hub_data,
            hub_paused: false,
            nodes: Vec::new(),
            disk: None,
            backup: None,
            backups: 0,
            probe_writes: Vec::new(),
            report,
        };
        let result = s.run_inner();
        // Leave nothing paused or full behind, also after a failure.
        s.heal_all();
        result
    }

    fn run_inner(&mut self) -> anyhow::Result<()> {
        let config = self.config;
        // The last edge keeps its data on a disk of its own that can fill up.
        let small = self.root.join(format!("edge{}", config.edges - 1));
        self.disk = SmallDisk::mount(&small);
        for i in 0..config.edges {
            let proxy = FaultProxy::start(&self.hub_addr, config.seed ^ (0x9E37 + i as u64))?;
            let data = self.root.join(format!("edge{i}"));
            let key = Edge::init(&data, &[(&proxy.addr, &self.hub_fp)]);
            self.hub()?.grant(&key, "", "rw");
            let edge = Edge::start(&data);
            edge.subscribe("")?;
            self.nodes.push(Node {
                api: Arc::new(Mutex::new(edge.api.clone())),
                edge,
                proxy,
                down: false,
                paused: false,
            });
        }
        // The documents exist everywhere before the faults: one replica makes each counter,
        // so that every increment adds to the same one.
        for d in 0..config.docs {
            let (status, body) = self.nodes[0].edge.change(
                &doc_id(d),
                json!([{"op":"put","path":["total"],"value":{"$counter":0}},
                       {"op":"put","path":["m"],"value":{}},
                       {"op":"put","path":["l"],"value":[]},
                       {"op":"put","path":["t"],"value":{"$text":""}}]),
            )?;
            anyhow::ensure!(status == 200, "creating {}: {status} {body}", doc_id(d));
        }
        let edges: Vec<&Edge> = self.nodes.iter().map(|n| &n.edge).collect();
        wait_converged(&edges, config.docs, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("before the faults: {e}"))?;

        let writers: Vec<Writer> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                start_writer(
                    i,
                    n.api.clone(),
                    config.docs,
                    config.seed.wrapping_mul(31).wrapping_add(i as u64),
                )
            })
            .collect();
        let nemesis = self.nemesis();
        for w in &writers {
            w.stop.store(true, Ordering::Relaxed);
        }
        // Healing before joining: a writer blocked on a paused edge returns once it
        // continues.
        self.heal_all();
        let healed = Instant::now();
        let mut writes = Vec::new();
        for w in writers {
            let (log, other) = w.join()?;
            writes.extend(log);
            for (k, n) in other {
                *self.report.other_answers.entry(k).or_insert(0) += n;
            }
        }
        nemesis?;
        writes.append(&mut self.probe_writes);
        for (answer, n) in &self.report.other_answers {
            self.report.failures.push(format!(
                "the edge API answered {answer} to {n} writes (only 200, or 507 when the disk \
                 is full, are expected)"
            ));
        }
        self.check(&writes, healed)
    }

    fn hub(&self) -> anyhow::Result<&Hub> {
        self.hub
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the hub is down"))
    }

    fn count(&mut self, what: &'static str) {
        *self.report.faults.entry(what).or_insert(0) += 1;
    }

    /// Steps of one or two faults from different categories, held for 1 to 6 s, then undone.
    fn nemesis(&mut self) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let end = Instant::now() + self.config.fault_time;
        let mut kinds = vec![
            Nemesis::PartitionOne,
            Nemesis::PartitionHalf,
            Nemesis::PartitionAll,
            Nemesis::LossyLinks,
            Nemesis::KillHub,
            Nemesis::PauseHub,
            Nemesis::RestoreHub,
            Nemesis::KillEdge,
            Nemesis::PauseEdge,
        ];
        if self.disk.is_some() {
            kinds.push(Nemesis::DiskFull);
        }
        while Instant::now() < end {
            // An online backup now and then, for a later restore to go back to.
            if self.backup.is_none() || rng.gen_bool(0.3) {
                self.take_backup()?;
            }
            let n = if rng.gen_bool(0.5) { 2 } else { 1 };
            let mut chosen: Vec<Nemesis> = Vec::new();
            while chosen.len() < n {
                let k = *kinds.choose(&mut rng).unwrap_or(&Nemesis::PartitionOne);
                if chosen.iter().all(|c| c.category() != k.category()) {
                    chosen.push(k);
                }
            }
            let mut undo = Vec::new();
            for k in chosen {
                self.count(k.name());
                undo.push(self.apply(k, &mut rng)?);
            }
            let left = end.saturating_duration_since(Instant::now());
            let hold = Duration::from_millis(rng.gen_range(1000..6000)).min(left);
            std::thread::sleep(hold);
            for u in undo {
                self.undo(u)?;
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        }
        Ok(())
    }

    fn take_backup(&mut self) -> anyhow::Result<()> {
        if self.hub.is_none() || self.hub_paused {
            return Ok(());
        }
        self.backups += 1;
        let file = self.root.join(format!("backup-{}.bak", self.backups));
        self.backup_to(&file)?;
        self.backup = Some(file);
        Ok(())
    }

    /// `syncline-hub backup` of the hub's store into `file`, online.
    fn backup_to(&self, file: &Path) -> anyhow::Result<()> {
        let (code, _, err) = run(Command::new(bin("syncline-hub"))
            .args(["backup", "--data"])
            .arg(&self.hub_data)
            .arg("--to")
            .arg(file));
        anyhow::ensure!(
            code == 0,
            "an online backup of the hub into {} failed: {err}",
            file.display()
        );
        Ok(())
    }

    fn apply(&mut self, k: Nemesis, rng: &mut StdRng) -> anyhow::Result<Undo> {
        let n = self.nodes.len();
        Ok(match k {
            Nemesis::PartitionOne | Nemesis::PartitionHalf | Nemesis::PartitionAll => {
                let mut which: Vec<usize> = (0..n).collect();
                which.shuffle(rng);
                which.truncate(match k {
                    Nemesis::PartitionOne => 1,
                    Nemesis::PartitionHalf => n / 2,
                    _ => n,
                });
                for &i in &which {
                    // Both ways, or one way only (the other side still hears).
                    match rng.gen_range(0..4) {
                        0 => self.nodes[i].proxy.set(Dir::Up, Faults::PARTITION),
                        1 => self.nodes[i].proxy.set(Dir::Down, Faults::PARTITION),
                        _ => self.nodes[i].proxy.set_both(Faults::PARTITION),
                    }
                }
                Undo::Heal(which)
            }
            Nemesis::LossyLinks => {
                let mut which: Vec<usize> = (0..n).collect();
                which.shuffle(rng);
                which.truncate(rng.gen_range(1..=n));
                for &i in &which {
                    for dir in [Dir::Up, Dir::Down] {
                        let f = Faults {
                            partitioned: false,
                            loss: rng.gen_range(0.0..0.3),
                            duplicate: rng.gen_range(0.0..0.2),
                            reorder: rng.gen_range(0.0..0.2),
                            delay: Duration::from_millis(rng.gen_range(0..40)),
                            jitter: Duration::from_millis(rng.gen_range(0..30)),
                        };
                        self.nodes[i].proxy.set(dir, f);
                    }
                }
                Undo::Heal(which)
            }
            Nemesis::KillHub => {
                if let Some(h) = self.hub.take() {
                    h.proc.kill9();
                }
                Undo::RestartHub
            }
            Nemesis::PauseHub => {
                self.hub()?.proc.signal("STOP");
                self.hub_paused = true;
                Undo::ContinueHub
            }
            Nemesis::RestoreHub => {
                // A crash, then the operator restores the latest backup: what the hub
                // acknowledged after it is gone from the hub, and only the edges have it.
                if let Some(h) = self.hub.take() {
                    h.proc.kill9();
                }
                let backup = self
                    .backup
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("no backup to restore"))?;
                let (code, _, err) = run(Command::new(bin("syncline-hub"))
                    .args(["restore", "--force", "--from"])
                    .arg(&backup)
                    .arg("--data")
                    .arg(&self.hub_data));
                anyhow::ensure!(code == 0, "restoring {} failed: {err}", backup.display());
                Undo::RestartHub
            }
            Nemesis::KillEdge => {
                let i = rng.gen_range(0..n);
                self.nodes[i].edge.kill9();
                self.nodes[i].down = true;
                Undo::RestartEdge(i)
            }
            Nemesis::PauseEdge => {
                let i = rng.gen_range(0..n);
                if let Some(p) = &self.nodes[i].edge.proc {
                    p.signal("STOP");
                }
                self.nodes[i].paused = true;
                Undo::ContinueEdge(i)
            }
            Nemesis::DiskFull => {
                if let Some(d) = &self.disk {
                    d.fill();
                }
                Undo::FreeDisk
            }
        })
    }

    fn undo(&mut self, u: Undo) -> anyhow::Result<()> {
        match u {
            Undo::Heal(which) => {
                for i in which {
                    self.nodes[i].proxy.heal();
                }
            }
            Undo::RestartHub => {
                if self.hub.is_none() {
                    self.hub = Some(Hub::start(&self.hub_data, &self.hub_addr));
                }
            }
            Undo::ContinueHub => {
                if let Some(h) = &self.hub {
                    h.proc.signal("CONT");
                }
                self.hub_paused = false;
            }
            Undo::RestartEdge(i) => {
                if self.nodes[i].down {
                    self.nodes[i].restart();
                }
            }
            Undo::ContinueEdge(i) => {
                if let Some(p) = &self.nodes[i].edge.proc {
                    p.signal("CONT");
                }
                self.nodes[i].paused = false;
            }
            Undo::FreeDisk => {
                if let Some(d) = &self.disk {
                    d.free();
                }
                self.probe_after_disk_full()?;
            }
        }
        Ok(())
    }

    /// Once space is freed, the edge whose disk was full takes writes again (SQLite may have
    /// had room left in its files, so writes during the fault may have passed as well).
    fn probe_after_disk_full(&mut self) -> anyhow::Result<()> {
        let i = self.nodes.len() - 1;
        if self.nodes[i].down || self.nodes[i].paused {
            return Ok(());
        }
        let tag = format!("probe-{}", self.probe_writes.len() + 1);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ops = json!([{"op":"put","path":["m", &tag],"value":0}]);
            if let Ok((200, _)) = self.nodes[i].edge.change(&doc_id(0), ops) {
                self.probe_writes.push(Write {
                    doc: 0,
                    kind: Kind::Map,
                    tag,
                    outcome: Outcome::Acked,
                });
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "writing did not resume within 15 s after the disk space was freed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Undoes every fault that may still hold; never fails (it also runs after errors).
    fn heal_all(&mut self) {
        if let Some(d) = &self.disk {
            d.free();
        }
        if self.hub_paused {
            if let Some(h) = &self.hub {
                h.proc.signal("CONT");
            }
            self.hub_paused = false;
        }
        if self.hub.is_none() {
            self.hub = Some(Hub::start(&self.hub_data, &self.hub_addr));
        }
        for n in &mut self.nodes {
            n.proxy.heal();
            if n.paused {
                if let Some(p) = &n.edge.proc {
                    p.signal("CONT");
                }
                n.paused = false;
            }
            if n.down {
                n.restart();
            }
        }
    }

    /// The checker.
    fn check(&mut self, writes: &[Write], healed: Instant) -> anyhow::Result<()> {
        let config = self.config;
        for w in writes {
            match w.outcome {
                Outcome::Acked => self.report.acked += 1,
                Outcome::Refused => self.report.refused += 1,
                Outcome::Unknown => self.report.unknown += 1,
            }
        }
        for n in &self.nodes {
            let s = n.proxy.stats();
            let t = &mut self.report.network;
            t.forwarded += s.forwarded;
            t.dropped += s.dropped;
            t.duplicated += s.duplicated;
            t.reordered += s.reordered;
        }
        // 1. Convergence within the bound, counted from the heal.
        let edges: Vec<&Edge> = self.nodes.iter().map(|n| &n.edge).collect();
        match wait_converged(&edges, config.docs, config.converge_within) {
            Ok(_) => self.report.converge = healed.elapsed(),
            Err(e) => {
                self.report.divergences = diverged(&edges, config.docs).len() as u64;
                self.report.failures.push(e);
                return Ok(());
            }
        }

        // 2. A fresh replica catching up from the hub alone reaches the same state: the hub
        //    holds everything too.
        let fresh = self.hub()?.follower(&self.root.join("fresh"));
        let mut all = edges.clone();
        all.push(&fresh);
        if let Err(e) = wait_converged(&all, config.docs, config.converge_within) {
            self.report.divergences = diverged(&all, config.docs).len() as u64;
            self.report
                .failures
                .push(format!("a fresh replica of the hub: {e}"));
            return Ok(());
        }

        // 3. Every acknowledged write is there, once; no refused one is; counters add up.
        let mut states = Vec::new();
        for d in 0..config.docs {
            states.push(
                fresh
                    .get(&doc_id(d))?
                    .map(|v| v["doc"].clone())
                    .unwrap_or(Value::Null),
            );
        }
        let mut increments: HashMap<usize, (i64, i64)> = HashMap::new();
        for w in writes {
            let state = &states[w.doc];
            if w.kind == Kind::Counter {
                let e = increments.entry(w.doc).or_default();
                match w.outcome {
                    Outcome::Acked => e.0 += 1,
                    Outcome::Unknown => e.1 += 1,
                    Outcome::Refused => {}
                }
                continue;
            }
            let times = match w.kind {
                Kind::Map => usize::from(state["m"].get(&w.tag).is_some()),
                Kind::List => state["l"].as_array().map_or(0, |l| {
                    l.iter().filter(|v| v.as_str() == Some(&w.tag)).count()
                }),
                _ => state["t"]
                    .as_str()
                    .map_or(0, |t| t.matches(&format!("<{}>", w.tag)).count()),
            };
            match (w.outcome, times) {
                (Outcome::Acked, 1) | (Outcome::Refused, 0) | (Outcome::Unknown, 0 | 1) => {}
                (Outcome::Acked, 0) => {
                    self.report.lost += 1;
                    if self.report.lost <= 5 {
                        self.report.failures.push(format!(
                            "acknowledged write {} ({:?}) of {} is lost",
                            w.tag,
                            w.kind,
                            doc_id(w.doc)
                        ));
                    }
                }
                (o, t) => self.report.failures.push(format!(
                    "write {} ({:?}, {o:?}) of {} is present {t} times",
                    w.tag,
                    w.kind,
                    doc_id(w.doc)
                )),
            }
        }
        for (d, state) in states.iter().enumerate() {
            let (acked, unknown) = increments.get(&d).copied().unwrap_or_default();
            let total = state["total"].as_i64().unwrap_or(-1);
            if total < acked || total > acked + unknown {
                if total < acked {
                    self.report.lost += (acked - total) as u64;
                }
                self.report.failures.push(format!(
                    "counter of {} is {total}: {acked} increments acknowledged, {unknown}                      unanswered",
                    doc_id(d)
                ));
            }
        }
        if self.report.lost > 5 {
            self.report.failures.push(format!(
                "{} acknowledged writes lost in all",
                self.report.lost
            ));
        }

        // 4. Every stored change verifies: the edges' stores (the daemons stopped), and the
        //    hub's store through a backup and `syncline-hub verify`.
        drop(fresh);
        for n in &mut self.nodes {
            if let Some(p) = n.edge.proc.take() {
                let code = p.terminate(30);
                if code != 0 {
                    self.report
                        .failures
                        .push(format!("an edge exited with {code} on SIGTERM"));
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let path = n.edge.data.join("edge.db");
            let verified = syncline_core::replica::Replica::open(
                &path,
                syncline_core::identity::Identity::generate(),
                syncline_core::replica::ReplicaOptions::default(),
            )
            .and_then(|mut r| r.verify_stored());
            match verified {
                Ok(count) => self.report.verified += count as u64,
                Err(e) => self
                    .report
                    .failures
                    .push(format!("edge {i}'s store fails verification: {e}")),
            }
        }
        let file = self.root.join("final.bak");
        self.backup_to(&file)?;
        let (code, out, err) = run(Command::new(bin("syncline-hub"))
            .args(["verify", "--json", "--from"])
            .arg(&file));
        match serde_json::from_str::<Value>(out.trim()) {
            Ok(v) if code == 0 && v["ok"] == json!(true) => {
                self.report.verified += v["changes"].as_u64().unwrap_or(0);
            }
            _ => self
                .report
                .failures
                .push(format!("the hub's store fails verification: {out} {err}")),
        }
        Ok(())
    }
}

/// The documents not held by every edge with the same heads and JSON.
fn diverged(edges: &[&Edge], docs: usize) -> Vec<String> {
    (0..docs)
        .map(doc_id)
        .filter(|id| {
            let views: Vec<Option<Value>> =
                edges.iter().map(|e| e.get(id).ok().flatten()).collect();
            !(views.iter().all(Option::is_some) && views.windows(2).all(|w| w[0] == w[1]))
        })
        .collect()
}

/// Waits until every edge holds every document with the same heads and JSON.
fn wait_converged(edges: &[&Edge], docs: usize, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let diverged = diverged(edges, docs);
        if diverged.is_empty() {
            return Ok(start.elapsed());
        }
        if std::env::var_os("SYNCLINE_NEMESIS_DEBUG").is_some() {
            let st: Vec<String> = edges
                .iter()
                .map(|e| {
                    e.status().map_or_else(
                        |e| format!("({e})"),
                        |s| {
                            format!(
                                "{} outbox {} err {}",
                                s["connected"], s["outbox"], s["last_error"]
                            )
                        },
                    )
                })
                .collect();
            let sizes: Vec<String> = diverged
                .iter()
                .map(|id| {
                    let v: Vec<String> = edges
                        .iter()
                        .map(|e| match e.get(id).ok().flatten() {
                            Some(v) => format!(
                                "h{}:l{}:m{}:c{}",
                                v["heads"].as_array().map_or(0, Vec::len),
                                v["doc"]["l"].as_array().map_or(0, Vec::len),
                                v["doc"]["m"].as_object().map_or(0, |m| m.len()),
                                v["doc"]["total"]
                            ),
                            None => "none".into(),
                        })
                        .collect();
                    format!("{id} {v:?}")
                })
                .collect();
            eprintln!(
                "{:.1}s diverged {sizes:?}: {st:?}",
                start.elapsed().as_secs_f64()
            );
        }
        if start.elapsed() > within {
            return Err(format!(
                "{} not identical on all {} replicas after {} s: {}",
                diverged.len(),
                edges.len(),
                within.as_secs(),
                diverged.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
