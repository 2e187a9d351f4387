//! A deterministic simulation of one hub and several replicas built from the real state
//! machines and real SQLite files, over a simulated network, driven by a seed.
//!
//! The network models what QUIC streams and WebSockets give: per connection, messages arrive
//! in order after a random delay, or the connection breaks and everything in flight is lost.
//! On top of that the simulation injects faults the protocol must absorb: broken connections
//! at random moments, duplicated pushes and change messages, replicas and the hub crashing
//! (their in-memory state dropped, their files reopened), the hub restored from an older
//! backup (a new epoch: the repair path) or put back under its old epoch (a raw copy: the
//! replicas' marks find it), pushes from many replicas interleaved in random
//! order, and group commits of random size. After the faults stop and every link heals, every
//! replica must reach the same heads and JSON, hold every acknowledged write, and the counters
//! must equal the sum of acknowledged increments.
//!
//! The hub's log is a [`SimStore`]: a SQLite file here; `syncline-hub`'s tests run the same
//! seeds on PostgreSQL.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::hub::{AllowAll, Hub, SessionId};
use crate::identity::Identity;
use crate::ids::{ChangeHash, DocId, DocPrefix, PeerId};
use crate::ops::{Op, PathElem, Value};
use crate::replica::{Replica, ReplicaOptions};
use crate::store::{HubStore, SqliteHubStore};

use crate::wire::{Message, Target};

/// Shape of one simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Replicas.
    pub replicas: usize,
    /// Documents written.
    pub docs: usize,
    /// Steps of the fault phase.
    pub steps: usize,
    /// Steps allowed to converge after healing.
    pub heal_steps: usize,
    /// Hub instances sharing the one store; each replica connects to one of them at random,
    /// a crash takes one down, a restore all of them.
    pub hubs: usize,
    /// Half the restores put the backup back under its own epoch (a raw copy of the data
    /// directory), for the replicas' marks (the chain of the log at their positions) to
    /// find.
    pub rollbacks: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            replicas: 3,
            docs: 3,
            steps: 300,
            heal_steps: 20_000,
            hubs: 1,
            rollbacks: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToHub,
    ToReplica,
}

struct InFlight {
    at: u64,
    order: u64,
    conn: u64,
    dir: Dir,
    msg: Message,
}

struct Conn {
    replica: usize,
    hub: usize,
    session: SessionId,
    last_at: [u64; 2],
}

struct SimReplica {
    identity: Identity,
    path: PathBuf,
    replica: Option<Replica>,
    conn: Option<u64>,
    options: ReplicaOptions,
    restarts: u64,
}

/// What a run did, for reports.
#[derive(Debug, Default, Clone)]
pub struct SimStats {
    /// Writes acknowledged to the app.
    pub acked: usize,
    /// Messages delivered.
    pub delivered: u64,
    /// Faults by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Steps taken to converge after healing.
    pub heal_steps: usize,
}

/// Where a simulated hub keeps its log: opened at the start and after every crash, copied
/// aside by an online backup, and replaced by the last backup: restored under a new epoch,
/// or put back as it was (a raw copy of the data directory, a disk snapshot).
pub trait SimStore {
    /// The hub store.
    type Store: HubStore;
    /// The store as the last commit left it (empty at the start).
    fn open(&mut self) -> Self::Store;
    /// Takes an online backup of `store` (replacing the previous one).
    fn backup(&mut self, store: &mut Self::Store);
    /// The store put back from the last backup, with a new epoch as `syncline-hub restore`
    /// gives it, or else with the backup's own; `None` if no backup was taken yet. The
    /// previous store is dropped before this is called.
    fn restore(&mut self, new_epoch: bool) -> Option<Self::Store>;
}

/// A SQLite file in the world's temp dir; a backup is SQLite's online backup, a restore a copy
/// of it over the file.
pub struct SqliteSim {
    path: PathBuf,
    backup: PathBuf,
    has_backup: bool,
}

impl SimStore for SqliteSim {
    type Store = SqliteHubStore;

    fn open(&mut self) -> SqliteHubStore {
        SqliteHubStore::open(&self.path).expect("hub store opens")
    }

    fn backup(&mut self, store: &mut SqliteHubStore) {
        let _ = std::fs::remove_file(&self.backup);
        store.backup_to(&self.backup).expect("backup");
        self.has_backup = true;
    }

    fn restore(&mut self, new_epoch: bool) -> Option<SqliteHubStore> {
        if !self.has_backup {
            return None;
        }
        std::fs::copy(&self.backup, &self.path).expect("restore copy");
        for ext in ["db-wal", "db-shm"] {
            let _ = std::fs::remove_file(self.path.with_extension(ext));
        }
        let mut s = SqliteHubStore::open(&self.path).expect("restored hub store");
        if new_epoch {
            s.new_epoch().expect("new epoch");
        }
        Some(s)
    }
}

/// One hub instance: its key, and its state machine unless it is down.
struct Instance<S: HubStore> {
    identity: Identity,
    hub: Option<Hub<S, AllowAll>>,
}

/// One simulated world.
pub struct Sim<B: SimStore = SqliteSim> {
    rng: StdRng,
    cfg: SimConfig,
    /// Holds the replicas' files (removed with the world).
    _dir: tempfile::TempDir,
    now: u64,
    order: u64,
    hubs: Vec<Instance<B::Store>>,
    hub_store: B,
    replicas: Vec<SimReplica>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    net: VecDeque<InFlight>,
    recent: VecDeque<(u64, Dir, Message)>,
    /// (doc, hash) of every write acknowledged to an app.
    acked: Vec<(DocId, ChangeHash)>,
    /// Sum of acknowledged increments per (doc, counter key).
    counters: HashMap<(DocId, String), i64>,
    docs: Vec<DocId>,
    stats: SimStats,
    trace: Vec<String>,
}

/// A temp dir for a world's files: on tmpfs where there is one.
pub fn temp_root() -> tempfile::TempDir {
    // tmpfs makes fsync free, which keeps hundreds of seeds fast; the crash test uses a disk.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("syncline-sim")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("a temp dir")
}

impl Sim<SqliteSim> {
    /// A world for `seed`, its hub on a SQLite file.
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let dir = temp_root();
        let hub_store = SqliteSim {
            path: dir.path().join("hub.db"),
            backup: dir.path().join("hub-backup.db"),
            has_backup: false,
        };
        Sim::with_store(seed, cfg, dir, hub_store)
    }
}

impl<B: SimStore> Sim<B> {
    /// A world for `seed` whose hub keeps its log in `hub_store` (empty), the replicas'
    /// files in `dir`.
    pub fn with_store(seed: u64, cfg: SimConfig, dir: tempfile::TempDir, mut hub_store: B) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let hub_identity = Identity::from_seed(rng.r#gen());
        let hub = Hub::new(
            hub_identity.clone(),
            hub_store.open(),
            AllowAll,
            Some(rng.r#gen()),
        );
        let first = Instance {
            identity: hub_identity,
            hub: Some(hub),
        };
        let replicas = (0..cfg.replicas)
            .map(|i| {
                let options = ReplicaOptions {
                    instance: Some(rng.r#gen()),
                    rng_seed: Some(rng.r#gen()),
                    // Some replicas compact often, to exercise snapshots and compacted uploads.
                    compact_after_bytes: if rng.gen_bool(0.5) { 1500 } else { 1 << 20 },
                    patch_events: rng.gen_bool(0.3),
                    // Change hashes include the time: a wall clock would make seeds replay
                    // differently.
                    clock: || 0,
                    ..ReplicaOptions::default()
                };
                let path = dir.path().join(format!("replica{i}.db"));
                let identity = Identity::from_seed(rng.r#gen());
                let replica =
                    Replica::open(&path, identity.clone(), options.clone()).expect("replica store");
                SimReplica {
                    identity,
                    path,
                    replica: Some(replica),
                    conn: None,
                    options,
                    restarts: 0,
                }
            })
            .collect();
        let docs = (0..cfg.docs)
            .map(|i| DocId::new(format!("sim/doc{i}")).expect("valid"))
            .collect();
        let mut sim = Sim {
            rng,
            cfg,
            _dir: dir,
            now: 0,
            order: 0,
            hubs: vec![first],
            hub_store,
            replicas,
            conns: HashMap::new(),
            next_conn: 1,
            net: VecDeque::new(),
            recent: VecDeque::new(),
            acked: Vec::new(),
            counters: HashMap::new(),
            docs,
            stats: SimStats::default(),
            trace: Vec::new(),
        };
        // Half the replicas follow everything, the others follow one document or a prefix.
        for i in 0..sim.replicas.len() {
            let target = match sim.rng.gen_range(0..3) {
                0 => Target::Prefix(DocPrefix::all()),
                1 => Target::Prefix(DocPrefix::new("sim/").expect("valid")),
                _ => Target::Doc(sim.docs[sim.rng.gen_range(0..sim.docs.len())].clone()),
            };
            if let Some(r) = sim.replicas[i].replica.as_mut() {
                r.subscribe(target).expect("subscribe");
            }
        }
        // Further instances draw last, so that a world of one hub replays as it always did.
        for _ in 1..sim.cfg.hubs {
            let identity = Identity::from_seed(sim.rng.r#gen());
            sim.hubs.push(Instance {
                identity,
                hub: None,
            });
            let h = sim.hubs.len() - 1;
            sim.start_instance(h, None);
        }
        if sim.hubs.len() > 1
            && let Some(hub) = sim.hubs[0].hub.as_mut()
        {
            hub.share_store().expect("reading the log end");
        }
        sim
    }

    /// Starts instance `h` on `store`, or on the store reopened.
    fn start_instance(&mut self, h: usize, store: Option<B::Store>) {
        let store = store.unwrap_or_else(|| self.hub_store.open());
        let seed = self.rng.r#gen();
        let mut hub = Hub::new(self.hubs[h].identity.clone(), store, AllowAll, Some(seed));
        if self.hubs.len() > 1 {
            hub.share_store().expect("reading the log end");
        }
        self.hubs[h].hub = Some(hub);
    }

    fn fault(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
        self.trace.push(format!("t={} fault {kind}", self.now));
    }

    fn hub_key(&self, h: usize) -> PeerId {
        self.hubs[h].identity.peer_id()
    }

    fn send(&mut self, conn: u64, dir: Dir, msg: Message, latency: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let slot = match dir {
            Dir::ToHub => 0,
            Dir::ToReplica => 1,
        };
        // In order per direction: never before the previous message of the same stream.
        let at = (self.now + latency).max(c.last_at[slot]);
        c.last_at[slot] = at;
        self.order += 1;
        let item = InFlight {
            at,
            order: self.order,
            conn,
            dir,
            msg,
        };
        let pos = self
            .net
            .iter()
            .position(|m| (m.at, m.order) > (item.at, item.order))
            .unwrap_or(self.net.len());
        self.net.insert(pos, item);
    }

    fn latency(&mut self, faulty: bool) -> u64 {
        if faulty {
            self.rng.gen_range(1..50)
        } else {
            self.rng.gen_range(1..5)
        }
    }

    /// Sends everything the replica has to say.
    fn pump_replica(&mut self, i: usize, faulty: bool) {
        let Some(conn) = self.replicas[i].conn else {
            return;
        };
        loop {
            let Some(r) = self.replicas[i].replica.as_mut() else {
                return;
            };
            match r.poll_transmit() {
                Ok(Some(m)) => {
                    let l = self.latency(faulty);
                    self.send(conn, Dir::ToHub, m, l);
                }
                Ok(None) => break,
                Err(e) => {
                    self.trace.push(format!("replica {i} poll error: {e}"));
                    self.drop_conn(conn);
                    return;
                }
            }
        }
    }

    /// Sends everything the hub has to say to every session that has something.
    fn pump_hub(&mut self, faulty: bool) {
        for (h, inst) in self.hubs.iter_mut().enumerate() {
            let Some(hub) = inst.hub.as_mut() else {
                continue;
            };
            if let Err(e) = hub.flush() {
                self.trace.push(format!("hub {h} flush error: {e}"));
            }
            // What the other instances committed.
            if let Err(e) = hub.poll_store() {
                self.trace.push(format!("hub {h} poll_store error: {e}"));
            }
        }
        let conns: Vec<(u64, usize, SessionId)> = {
            let mut v: Vec<_> = self
                .conns
                .iter()
                .map(|(k, c)| (*k, c.hub, c.session))
                .collect();
            v.sort();
            v
        };
        for (conn, h, session) in conns {
            // A slow reader: sometimes a connection takes only a few messages this round.
            let budget = if faulty && self.rng.gen_bool(0.2) {
                self.rng.gen_range(0..4)
            } else {
                usize::MAX
            };
            let mut sent = 0;
            while sent < budget {
                let Some(hub) = self.hubs[h].hub.as_mut() else {
                    break;
                };
                match hub.poll_transmit(session) {
                    Ok(Some(m)) => {
                        let l = self.latency(faulty);
                        self.send(conn, Dir::ToReplica, m, l);
                        sent += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.trace.push(format!("hub poll error: {e}"));
                        self.drop_conn(conn);
                        break;
                    }
                }
            }
            if let Some(hub) = self.hubs[h].hub.as_ref()
                && hub.is_failed(session)
                && hub.is_idle(session)
            {
                self.drop_conn(conn);
            }
        }
    }

    fn connect(&mut self, i: usize) {
        if self.replicas[i].conn.is_some() || self.replicas[i].replica.is_none() {
            return;
        }
        // Any instance that is up (the draw only where there is a choice).
        let h = if self.hubs.len() > 1 {
            self.rng.gen_range(0..self.hubs.len())
        } else {
            0
        };
        let Some(hub) = self.hubs[h].hub.as_mut() else {
            return;
        };
        let session = hub.accept();
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                replica: i,
                hub: h,
                session,
                last_at: [self.now; 2],
            },
        );
        self.replicas[i].conn = Some(conn);
        let key = self.hub_key(h);
        if let Some(r) = self.replicas[i].replica.as_mut() {
            r.connect(Some(key));
        }
        self.trace.push(format!(
            "t={} connect replica {i} conn {conn} hub {h} session {session}",
            self.now
        ));
    }

    fn drop_conn(&mut self, conn: u64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.net.retain(|m| m.conn != conn);
        if let Some(hub) = self.hubs[c.hub].hub.as_mut() {
            hub.close(c.session);
        }
        let r = &mut self.replicas[c.replica];
        r.conn = None;
        if let Some(rep) = r.replica.as_mut() {
            rep.disconnect();
        }
        self.trace.push(format!(
            "t={} drop conn {conn} (replica {})",
            self.now, c.replica
        ));
    }

    fn write(&mut self, i: usize) {
        let doc = self.docs[self.rng.gen_range(0..self.docs.len())].clone();
        let counter_key = format!("c{i}");
        let list_key = format!("l{i}");
        let text_key = format!("t{i}");
        let Some(r) = self.replicas[i].replica.as_mut() else {
            return;
        };
        let existing = r.doc(&doc).ok().map(|d| d.to_json()).unwrap_or(json!({}));
        let mut ops = Vec::new();
        let has = |k: &str| existing.get(k).is_some();
        if !has(&counter_key) {
            ops.push(Op::Put {
                path: vec![PathElem::Key(counter_key.clone())],
                value: Value::Counter(0),
            });
            ops.push(Op::Put {
                path: vec![PathElem::Key(list_key.clone())],
                value: Value::List(vec![]),
            });
            ops.push(Op::Put {
                path: vec![PathElem::Key(text_key.clone())],
                value: Value::Text(String::new()),
            });
        }
        let by = self.rng.gen_range(-3..10);
        ops.push(Op::Increment {
            path: vec![PathElem::Key(counter_key.clone())],
            by,
        });
        match self.rng.gen_range(0..4) {
            0 => ops.push(Op::Put {
                path: vec!["shared".into()],
                value: Value::Int(self.rng.r#gen()),
            }),
            1 => ops.push(Op::Insert {
                path: vec![PathElem::Key(list_key), PathElem::Index(-1)],
                value: Value::Int(self.now as i64),
            }),
            2 => {
                let len = existing
                    .get(&text_key)
                    .and_then(|t| t.as_str())
                    .map_or(0, |t| t.chars().count());
                let index = if len == 0 {
                    0
                } else {
                    self.rng.gen_range(0..=len)
                };
                ops.push(Op::Splice {
                    path: vec![PathElem::Key(text_key)],
                    index,
                    delete: 0,
                    text: "ab".into(),
                });
            }
            _ => ops.push(Op::Put {
                path: vec!["m".into()],
                value: Value::Map(BTreeMap::from([(format!("k{i}"), Value::Bool(true))])),
            }),
        }
        let Some(r) = self.replicas[i].replica.as_mut() else {
            return;
        };
        match r.change(&doc, &ops) {
            Ok(_) => {
                let heads = r.doc(&doc).map(|d| d.heads()).unwrap_or_default();
                // The change just made is one of the heads: the one authored by this replica's
                // actor with the highest sequence number.
                let mine = r.doc(&doc).ok().and_then(|d| {
                    d.automerge()
                        .get_last_local_change()
                        .map(|c| ChangeHash::from(c.hash()))
                });
                if let Some(h) = mine {
                    debug_assert!(heads.contains(&h));
                    self.trace.push(format!(
                        "t={} replica {i} acked write {h} to {doc}",
                        self.now
                    ));
                    self.acked.push((doc.clone(), h));
                    *self.counters.entry((doc.clone(), counter_key)).or_default() += by;
                    self.stats.acked += 1;
                }
            }
            Err(e) => self.trace.push(format!("replica {i} write refused: {e}")),
        }
    }

    fn restart_replica(&mut self, i: usize) {
        if let Some(conn) = self.replicas[i].conn {
            self.drop_conn(conn);
        }
        let r = &mut self.replicas[i];
        r.replica = None; // crash: everything in memory is gone
        r.restarts += 1;
        let mut options = r.options.clone();
        // A fresh store instance gets a fresh actor, as in production.
        options.instance = options.instance.map(|mut inst| {
            inst[7] = inst[7].wrapping_add(r.restarts as u8);
            inst[6] = inst[6].wrapping_add((r.restarts >> 8) as u8);
            inst
        });
        r.replica =
            Some(Replica::open(&r.path, r.identity.clone(), options).expect("replica reopens"));
    }

    /// A crash (`put_back` `None`), or the last backup put back, under a new epoch or not.
    fn restart_hub(&mut self, put_back: Option<bool>) {
        let from_backup = put_back.is_some();
        // A restore stops every instance; a crash takes one down (and it restarts at once).
        let down: Vec<usize> = if from_backup || self.hubs.len() == 1 {
            (0..self.hubs.len()).collect()
        } else {
            vec![self.rng.gen_range(0..self.hubs.len())]
        };
        let mut conns: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| down.contains(&c.hub))
            .map(|(k, _)| *k)
            .collect();
        conns.sort();
        for c in conns {
            self.drop_conn(c);
        }
        for &h in &down {
            self.hubs[h].hub = None;
        }
        let mut restored = put_back.and_then(|new_epoch| self.hub_store.restore(new_epoch));
        if let Some(new_epoch) = put_back {
            self.fault(match (restored.is_some(), new_epoch) {
                (false, _) => "hub_crash",
                (true, true) => "hub_restored_from_backup",
                (true, false) => "hub_rolled_back",
            });
        }
        for h in down {
            let store = restored.take();
            self.start_instance(h, store);
        }
        if let Some(hub) = self.hubs[0].hub.as_mut() {
            let end = hub.store().last_cursor().map(|c| c.0).unwrap_or(0);
            let epoch = hub.store().epoch();
            self.trace.push(format!(
                "t={} hub log ends at {end}, epoch {epoch:?}",
                self.now
            ));
        }
    }

    fn take_backup(&mut self) {
        if let Some(hub) = self.hubs[0].hub.as_mut() {
            self.hub_store.backup(hub.store());
            let end = hub.store().last_cursor().map(|c| c.0).unwrap_or(0);
            self.trace
                .push(format!("t={} backup up to position {end}", self.now));
        }
    }

    fn deliver_next(&mut self) -> bool {
        let Some(m) = self.net.pop_front() else {
            return false;
        };
        self.now = self.now.max(m.at);
        self.stats.delivered += 1;
        let Some(c) = self.conns.get(&m.conn) else {
            return true;
        };
        let (replica, h, session) = (c.replica, c.hub, c.session);
        if matches!(m.msg, Message::Push(_)) || m.msg.as_changes().is_some() {
            self.recent.push_back((m.conn, m.dir, m.msg.clone()));
            if self.recent.len() > 16 {
                self.recent.pop_front();
            }
        }
        if std::env::var_os("SYNCLINE_SIM_TRACE").is_some() {
            let what = match &m.msg {
                Message::Changes(c) => format!(
                    "Changes {} n={} cursor={:?} {}",
                    c.doc,
                    c.changes.len(),
                    c.cursor,
                    short_hashes(&c.changes)
                ),
                Message::ChangesAt(c) => format!(
                    "ChangesAt {} n={} cursor={:?} mark={:?} {}",
                    c.changes.doc,
                    c.changes.changes.len(),
                    c.changes.cursor,
                    c.mark,
                    short_hashes(&c.changes.changes)
                ),
                Message::Push(p) => {
                    format!(
                        "Push {} id={} n={} {}",
                        p.doc,
                        p.push_id,
                        p.changes.len(),
                        short_hashes(&p.changes)
                    )
                }
                Message::Subscribe(s) => {
                    format!("Subscribe {:?} {:?} {:?}", s.target, s.epoch, s.cursor)
                }
                Message::CaughtUp(c) => {
                    format!("CaughtUp {:?} {:?} {:?}", c.target, c.epoch, c.cursor)
                }
                Message::Heads(h) => {
                    format!("Heads {} {:?} complete={}", h.doc, h.heads, h.complete)
                }
                Message::Reconcile(h) => format!("Reconcile {} {:?}", h.doc, h.heads),
                Message::Reconciled(h) => format!("Reconciled {}", h.doc),
                Message::Resume(r) => format!(
                    "Resume {:?} {:?} {:?} mark={} written={:?}",
                    r.target,
                    r.epoch,
                    r.cursor,
                    r.mark.is_some(),
                    r.written.as_ref().map(|w| w.cursor)
                ),
                Message::CaughtUpAt(c) => format!(
                    "CaughtUpAt {:?} {:?} {:?} rolled_back={}",
                    c.target, c.epoch, c.cursor, c.rolled_back
                ),
                Message::AckAt(a) => format!(
                    "AckAt {} at={:?}",
                    a.push_id,
                    a.at.as_ref().map(|p| p.cursor)
                ),
                other => other.kind().to_string(),
            };
            eprintln!(
                "t={} conn {} replica {replica} {:?}: {what}",
                self.now, m.conn, m.dir
            );
        }
        match m.dir {
            Dir::ToHub => {
                let Some(hub) = self.hubs[h].hub.as_mut() else {
                    return true;
                };
                if let Err(e) = hub.handle_message(session, m.msg) {
                    self.trace
                        .push(format!("hub refused from replica {replica}: {e}"));
                }
            }
            Dir::ToReplica => {
                let Some(r) = self.replicas[replica].replica.as_mut() else {
                    return true;
                };
                if let Err(e) = r.handle_message(m.msg) {
                    self.trace.push(format!("replica {replica} refused: {e}"));
                }
                if self.replicas[replica]
                    .replica
                    .as_ref()
                    .is_some_and(|r| !r.is_connected())
                {
                    self.drop_conn(m.conn);
                }
            }
        }
        true
    }

    fn step(&mut self, faulty: bool) {
        let n = self.replicas.len();
        let roll: u32 = self.rng.gen_range(0..1000);
        match roll {
            0..=249 if faulty => {
                let i = self.rng.gen_range(0..n);
                self.write(i);
                self.pump_replica(i, faulty);
            }
            250..=279 if faulty => {
                let i = self.rng.gen_range(0..n);
                if let Some(conn) = self.replicas[i].conn {
                    self.fault("connection_lost");
                    self.drop_conn(conn);
                }
            }
            280..=289 if faulty => {
                let i = self.rng.gen_range(0..n);
                self.fault("replica_crash");
                self.restart_replica(i);
            }
            290..=293 if faulty => {
                self.fault("hub_crash");
                self.restart_hub(None);
            }
            // Counted as a restore only if a backup was there to restore. With `rollbacks`,
            // half the time under the backup's own epoch: found by the replicas' marks.
            294..=295 if faulty => {
                let new_epoch = !self.cfg.rollbacks || self.rng.gen_bool(0.5);
                self.restart_hub(Some(new_epoch));
            }
            296..=305 if faulty => self.take_backup(),
            306..=329 if faulty => {
                // Re-deliver a recent push or change message on its connection, if still open.
                if !self.recent.is_empty() {
                    let k = self.rng.gen_range(0..self.recent.len());
                    let (conn, dir, msg) = self.recent[k].clone();
                    if self.conns.contains_key(&conn) {
                        self.fault("duplicate_message");
                        let l = self.latency(true);
                        self.send(conn, dir, msg, l);
                    }
                }
            }
            330..=359 => {
                // Hold back the hub's group commit for a while.
                if !self.net.is_empty() {
                    self.deliver_next();
                }
            }
            _ => {
                for i in 0..n {
                    if self.replicas[i].conn.is_none() && (!faulty || self.rng.gen_bool(0.3)) {
                        self.connect(i);
                    }
                }
                self.deliver_next();
                self.pump_hub(faulty);
                let order: Vec<usize> = (0..n).collect();
                for i in order {
                    self.pump_replica(i, faulty);
                }
            }
        }
        self.now += 1;
    }

    fn converged(&mut self) -> bool {
        if !self.net.is_empty() {
            return false;
        }
        for inst in &mut self.hubs {
            let Some(hub) = inst.hub.as_mut() else {
                return false;
            };
            // Nothing left to commit, nor to relay of the other instances' commits.
            if hub.has_queued() || !matches!(hub.poll_store(), Ok(0)) {
                return false;
            }
        }
        for r in &self.replicas {
            let Some(rep) = r.replica.as_ref() else {
                return false;
            };
            let Some(conn) = r.conn else { return false };
            let Some(c) = self.conns.get(&conn) else {
                return false;
            };
            let Some(hub) = self.hubs[c.hub].hub.as_ref() else {
                return false;
            };
            if !rep.is_synced() || rep.has_unapplied() || !hub.is_idle(c.session) {
                return false;
            }
            match rep.status() {
                Ok(s) if s.outbox == 0 => {}
                _ => return false,
            }
        }
        true
    }

    /// Runs the fault phase, heals, waits for convergence and checks every invariant.
    pub fn run(mut self) -> Result<SimStats, String> {
        for _ in 0..self.cfg.steps {
            self.step(true);
        }
        self.trace.push(format!("t={} heal", self.now));
        let mut healed = false;
        for k in 0..self.cfg.heal_steps {
            self.step(false);
            if k % 8 == 0 && self.converged() {
                self.stats.heal_steps = k;
                healed = true;
                break;
            }
        }
        if !healed {
            return Err(self.report("did not converge after healing"));
        }
        self.check()
    }

    fn report(&self, what: &str) -> String {
        let tail: Vec<&String> = self.trace.iter().rev().take(40).collect();
        let status: Vec<String> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "replica {i}: conn {:?} status {:?} synced {:?}",
                    r.conn,
                    r.replica.as_ref().map(|x| x.status()),
                    r.replica.as_ref().map(|x| x.is_synced())
                )
            })
            .collect();
        format!(
            "{what}\n{}\nlast events (newest first):\n{}",
            status.join("\n"),
            tail.iter()
                .map(|s| format!("  {s}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    fn holders(&mut self, doc: &DocId, hash: &ChangeHash) -> String {
        let mut out = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if let Some(rep) = r.replica.as_mut() {
                let in_doc = rep.doc(doc).map(|d| d.has_change(hash)).unwrap_or(false);
                let in_store = rep.store().has_change(doc, hash).unwrap_or(false);
                out.push(format!("replica {i}: doc {in_doc} store {in_store}"));
            }
        }
        if let Some(hub) = self.hubs[0].hub.as_mut() {
            let all = hub
                .store()
                .changes_not_covered(doc, &[])
                .unwrap_or_default();
            let has = all.iter().any(|c| {
                automerge::Change::try_from(&c.bytes[..])
                    .map(|c| ChangeHash::from(c.hash()) == *hash)
                    .unwrap_or(false)
            });
            out.push(format!("hub: {has}"));
        }
        let author = self
            .trace
            .iter()
            .find(|l| l.contains(&hash.to_string()))
            .cloned()
            .unwrap_or_default();
        format!("{} {author}", out.join(", "))
    }

    fn check(mut self) -> Result<SimStats, String> {
        // Every replica follows different targets; compare on the documents each one holds
        // against the union, and require full agreement for the ones following everything.
        let mut views: Vec<BTreeMap<DocId, (Vec<ChangeHash>, serde_json::Value)>> = Vec::new();
        for r in self.replicas.iter_mut() {
            let rep = r.replica.as_mut().ok_or("replica missing")?;
            let mut view = BTreeMap::new();
            for d in rep.doc_ids().map_err(|e| e.to_string())? {
                let doc = rep.doc(&d).map_err(|e| e.to_string())?;
                let mut heads = doc.heads();
                heads.sort();
                view.insert(d, (heads, doc.to_json()));
            }
            // Every stored change verifies against its author's signature.
            rep.verify_stored()
                .map_err(|e| format!("stored change fails verification: {e}"))?;
            views.push(view);
        }
        for (doc, hash) in &self.acked.clone() {
            for (i, r) in self.replicas.iter_mut().enumerate() {
                let rep = r.replica.as_mut().ok_or("replica missing")?;
                let follows = rep
                    .status()
                    .map_err(|e| e.to_string())?
                    .subscriptions
                    .iter()
                    .any(|t| Target::from_key(t).is_some_and(|t| t.covers(doc)));
                if !follows {
                    continue;
                }
                let d = rep
                    .doc(doc)
                    .map_err(|e| format!("replica {i} lacks {doc}: {e}"))?;
                if !d.has_change(hash) {
                    let holders = self.holders(doc, hash);
                    return Err(self.report(&format!(
                        "replica {i} lost acknowledged change {hash} of {doc}; held by {holders}"
                    )));
                }
            }
        }
        let docs: Vec<DocId> = views
            .iter()
            .flat_map(|v| v.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for doc in &docs {
            let holders: Vec<(usize, &(Vec<ChangeHash>, serde_json::Value))> = views
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.get(doc).map(|x| (i, x)))
                .collect();
            let (first_i, first) = holders[0];
            for (i, v) in &holders[1..] {
                if v.0 != first.0 || v.1 != first.1 {
                    return Err(self.report(&format!(
                        "replica {i} and {first_i} diverge on {doc}:\n{}\n{}",
                        v.1, first.1
                    )));
                }
            }
            for ((d, key), sum) in &self.counters {
                if d == doc {
                    let got = first.1.get(key).and_then(|v| v.as_i64()).unwrap_or(0);
                    if got != *sum {
                        return Err(self.report(&format!(
                            "{doc} counter {key} is {got}, acknowledged increments sum to {sum}"
                        )));
                    }
                }
            }
        }
        Ok(self.stats)
    }
}

/// The first bytes of each change's hash, for traces.
fn short_hashes(changes: &[crate::change::SignedChange]) -> String {
    changes
        .iter()
        .map(|c| match automerge::Change::try_from(&c.bytes[..]) {
            Ok(c) => c.hash().to_string()[..8].to_owned(),
            Err(_) => "?".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `seeds` worlds from seed `first` on (each built by `world`), panicking at the first
/// that fails with the seed and `replay` (its `{seed}` replaced) to replay it, and checks that
/// the run exercised every kind of fault. Returns the totals.
pub fn run_seeds<B: SimStore>(
    first: u64,
    seeds: u64,
    replay: &str,
    mut world: impl FnMut(u64) -> Sim<B>,
) -> SimStats {
    let mut rollbacks = false;
    let mut totals = SimStats::default();
    for seed in first..first + seeds {
        let sim = world(seed);
        rollbacks |= sim.cfg.rollbacks;
        let stats = sim.run().unwrap_or_else(|e| {
            let replay = replay.replace("{seed}", &seed.to_string());
            panic!("seed {seed} failed: {e}\nreplay: {replay}")
        });
        totals.acked += stats.acked;
        totals.delivered += stats.delivered;
        totals.heal_steps = totals.heal_steps.max(stats.heal_steps);
        for (k, v) in stats.faults {
            *totals.faults.entry(k).or_default() += v;
        }
    }
    eprintln!(
        "{seeds} seeds: {} writes acknowledged, {} messages, faults {:?}, worst heal {} steps",
        totals.acked, totals.delivered, totals.faults, totals.heal_steps
    );
    // The run must really have exercised the faults it claims to.
    if seeds >= 20 {
        for kind in [
            "connection_lost",
            "replica_crash",
            "hub_crash",
            "hub_restored_from_backup",
            "duplicate_message",
        ]
        .into_iter()
        .chain(rollbacks.then_some("hub_rolled_back"))
        {
            assert!(
                totals.faults.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} fault was injected"
            );
        }
    }
    assert!(
        totals.acked > seeds as usize * 20,
        "too few writes: {}",
        totals.acked
    );
    totals
}

/// A number from the environment variable `name`, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The default world with `hubs` instances; `SYNCLINE_SIM_ROLLBACKS=0` turns raw rollbacks
/// off (every restore then gives a new epoch, as `syncline-hub restore` does).
pub fn sim_config(hubs: usize) -> SimConfig {
    SimConfig {
        hubs,
        rollbacks: std::env::var("SYNCLINE_SIM_ROLLBACKS").map_or(true, |v| v != "0"),
        ..SimConfig::default()
    }
}

#[test]
fn simulated_faults_never_lose_an_acknowledged_write() {
    const REPLAY: &str =
        "SYNCLINE_SIM_SEED={seed} cargo test -p syncline-core --lib sim::simulated";
    if let Ok(seed) = std::env::var("SYNCLINE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("SYNCLINE_SIM_SEED is a number");
        let stats = Sim::new(seed, sim_config(1))
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {stats:?}");
        return;
    }
    // SYNCLINE_SIM_FIRST shifts the window, for long runs over fresh seeds.
    run_seeds(
        env_number("SYNCLINE_SIM_FIRST", 0),
        env_number("SYNCLINE_SIM_SEEDS", 500),
        REPLAY,
        |seed| Sim::new(seed, sim_config(1)),
    );
}

#[test]
fn two_hub_instances_on_one_store_lose_no_acknowledged_write() {
    // Replicas connect to either instance, one instance crashes while the other serves, a
    // restore stops both; each relays what the other commits (`Hub::poll_store`).
    const REPLAY: &str = "SYNCLINE_SIM_HUBS_FIRST={seed} SYNCLINE_SIM_HUBS_SEEDS=1 \
                          cargo test -p syncline-core --lib sim::two";
    let cfg = sim_config(2);
    run_seeds(
        env_number("SYNCLINE_SIM_HUBS_FIRST", 0),
        env_number("SYNCLINE_SIM_HUBS_SEEDS", 200),
        REPLAY,
        |seed| Sim::new(seed, cfg.clone()),
    );
}
