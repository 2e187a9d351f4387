//! Syncline's hot paths measured next to the raw cost of their parts, in one run, so that each
//! result reads as a ratio. See `docs/BENCHMARKS.md` for the results and how to read them.
//!
//! Groups:
//! - `base/*`: the parts alone (ed25519, Automerge, SQLite, postcard).
//! - `sync/local`: `Replica::change` and `Replica::change_many` (change + sign + group commit).
//! - `sync/hub`: hub-side ingest of signed pushes (parse + `verify_batch` + `append`), directly
//!   on `SqliteHubStore` and through the `Hub` machine.
//! - `sync/replica`: replica-side ingest of `Changes` messages (parse + verify + store + apply).
//! - `sync/wire`: frame encode and decode.
//!
//! `fresh` benches start every sample on an empty document (it grows within the sample);
//! `history` benches run on a document that already holds `SYNCLINE_BENCH_HISTORY` changes
//! (100,000 by default), built once per run. Every durable store is a real file under the
//! system temporary directory (set `TMPDIR` to move it; it must not be a tmpfs).

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use ed25519_dalek::{Signer, SigningKey};
use rusqlite::Connection;
use tempfile::TempDir;

use syncline_core::change::{self, SignedChange, VerifiedChange};
use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::store::{HubStore, SqliteHubStore};
use syncline_core::wire::{Changes, Message, Push, Target};
use syncline_core::{Cursor, DocId};

/// Distinct map keys the writers cycle through ("spread keys": a gateway's sensors).
const KEYS: usize = 1000;
/// Changes per ingest message (one hub push or one `Changes` message).
const INGEST_BATCH: usize = 256;
/// Changes per grouped local write.
const LOCAL_GROUP: usize = 64;
/// Changes the offline-outbox bench writes before it measures (about 1.1 MB of outbox).
const OFFLINE_OUTBOX: usize = 10_240;

fn history_len() -> usize {
    std::env::var("SYNCLINE_BENCH_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A directory on the system temporary file system for durable stores.
fn bench_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("syncline-bench-")
        .tempdir()
        .expect("a temporary directory")
}

fn doc_id(s: &str) -> DocId {
    DocId::new(s).expect("a valid document id")
}

fn key(i: usize) -> String {
    format!("s{}", i % KEYS)
}

fn put_op(i: usize) -> Vec<Op> {
    vec![Op::Put {
        path: vec![PathElem::Key(key(i))],
        value: Value::Int(i as i64),
    }]
}

/// One local change on a raw Automerge document, as `Document::apply_ops` makes it.
fn local_change(doc: &mut Automerge, i: usize) -> automerge::Change {
    let mut tx = doc.transaction();
    tx.put(ROOT, key(i), i as i64)
        .expect("a put on the root map");
    tx.commit();
    doc.get_last_local_change().expect("the change just made")
}

fn bench_options() -> ReplicaOptions {
    ReplicaOptions {
        patch_events: false,
        ..ReplicaOptions::default()
    }
}

fn no_compaction() -> ReplicaOptions {
    ReplicaOptions {
        compact_after_bytes: u64::MAX,
        ..bench_options()
    }
}

/// The changes of one remote author to one document, made on demand and kept, so that every
/// bench that consumes them sees the same sequence (each from its own position).
struct Stream {
    author: Identity,
    doc: DocId,
    writer: Automerge,
    made: Vec<VerifiedChange>,
    /// The writer when it held exactly `history` changes.
    history_writer: Option<Automerge>,
    history: usize,
}

impl Stream {
    fn new(doc: DocId, history: usize) -> Self {
        let author = Identity::from_seed([7; 32]);
        let writer = Automerge::new().with_actor(change::actor_for(&author.peer_id(), [1; 8]));
        Stream {
            author,
            doc,
            writer,
            made: Vec::new(),
            history_writer: None,
            history,
        }
    }

    fn ensure(&mut self, n: usize) {
        while self.made.len() < n {
            let c = local_change(&mut self.writer, self.made.len());
            let v = change::sign(&self.author, &self.doc, c).expect("the author's own actor");
            self.made.push(v);
            if self.made.len() == self.history {
                self.history_writer = Some(self.writer.clone());
            }
        }
    }

    fn verified(&mut self, r: Range<usize>) -> &[VerifiedChange] {
        self.ensure(r.end);
        &self.made[r]
    }

    fn signed(&mut self, r: Range<usize>) -> Vec<SignedChange> {
        self.verified(r)
            .iter()
            .map(|c| c.signed().clone())
            .collect()
    }

    fn automerge(&mut self, r: Range<usize>) -> Vec<automerge::Change> {
        self.verified(r)
            .iter()
            // Parsed from the author's bytes, as a replica receives them.
            .map(|c| automerge::Change::from_bytes(c.signed().bytes.clone()).expect("valid bytes"))
            .collect()
    }

    /// The writer's document at the history mark (built by `history` local changes), writing
    /// as another actor.
    fn history_writer(&mut self, actor_seed: u8) -> Automerge {
        self.ensure(self.history);
        let mut doc = self
            .history_writer
            .clone()
            .expect("kept at the history mark");
        doc.set_actor(automerge::ActorId::from(vec![actor_seed; 16]));
        doc
    }

    /// A document holding the first `history` changes, built as a replica builds it: remote
    /// changes applied in batches.
    fn history_applied(&mut self) -> Automerge {
        let mut doc = Automerge::new();
        for first in (0..self.history).step_by(INGEST_BATCH) {
            let end = (first + INGEST_BATCH).min(self.history);
            doc.apply_changes(self.automerge(first..end))
                .expect("valid changes");
        }
        doc
    }

    /// The same document saved and loaded again, as a replica reopens a compacted document.
    fn history_loaded(&mut self) -> Automerge {
        let bytes = self.history_writer(6).save();
        eprintln!(
            "a {}-change document saves to {} bytes",
            self.history,
            bytes.len()
        );
        Automerge::load(&bytes).expect("a document's own save")
    }

    fn push_frame(&mut self, r: Range<usize>, push_id: u64) -> Vec<u8> {
        let changes = self.signed(r);
        Message::Push(Push {
            push_id,
            doc: self.doc.clone(),
            changes,
        })
        .to_frame()
    }

    fn changes_frame(&mut self, r: Range<usize>) -> Vec<u8> {
        let cursor = Cursor(r.end as u64);
        let changes = self.signed(r);
        Message::Changes(Changes {
            doc: self.doc.clone(),
            changes,
            cursor: Some((Target::Doc(self.doc.clone()), cursor)),
        })
        .to_frame()
    }
}

fn payload(frame: &[u8]) -> &[u8] {
    &frame[4..]
}

type MemHub = Hub<SqliteHubStore, AllowAll>;

fn hub_with(store: SqliteHubStore) -> MemHub {
    Hub::new(Identity::from_seed([200; 32]), store, AllowAll, Some(1))
}

/// Runs the in-memory message pump between a replica and a hub session until both are idle.
fn pump(hub: &mut MemHub, session: SessionId, replica: &mut Replica) {
    loop {
        let mut moved = false;
        while let Some(m) = replica.poll_transmit().expect("the replica polls") {
            hub.handle_message(session, m).expect("the hub accepts");
            moved = true;
        }
        hub.flush().expect("the hub commits");
        while let Some(m) = hub.poll_transmit(session).expect("the hub polls") {
            replica.handle_message(m).expect("the replica accepts");
            moved = true;
        }
        if !moved {
            break;
        }
    }
    while replica.poll_event().is_some() {}
}

/// Connects a replica to a hub: handshake, subscriptions caught up.
fn connect(hub: &mut MemHub, replica: &mut Replica) -> SessionId {
    let session = hub.accept();
    replica.connect(Some(hub.peer_id()));
    pump(hub, session, replica);
    assert!(
        replica.is_synced(),
        "the replica should be authenticated and caught up"
    );
    session
}

/// A replica with a durable store on disk, connected to a hub (whose store is in memory: the
/// hub only serves to authenticate the replica and acknowledge its uploads).
struct Link {
    replica: Replica,
    hub: MemHub,
    session: SessionId,
    _dir: TempDir,
}

impl Link {
    fn open(seed: u8, options: ReplicaOptions, doc: &DocId) -> Self {
        let dir = bench_dir();
        let mut replica = Replica::open(
            &dir.path().join("replica.sqlite"),
            Identity::from_seed([seed; 32]),
            options,
        )
        .expect("a replica store");
        replica
            .subscribe(Target::Doc(doc.clone()))
            .expect("a subscription");
        let mut hub = hub_with(SqliteHubStore::open_in_memory().expect("a hub store"));
        let session = connect(&mut hub, &mut replica);
        Link {
            replica,
            hub,
            session,
            _dir: dir,
        }
    }

    fn pump(&mut self) {
        pump(&mut self.hub, self.session, &mut self.replica);
    }

    /// Feeds one `Changes` frame: parse, verify, store, apply.
    fn ingest(&mut self, frame: &[u8]) {
        let msg = Message::from_payload(payload(frame)).expect("a valid frame");
        self.replica
            .handle_message(msg)
            .expect("the replica accepts");
        self.replica.flush().expect("the replica commits");
    }
}

/// A hub store on disk and the directory holding it.
struct DiskHubStore {
    store: SqliteHubStore,
    _dir: TempDir,
}

fn disk_hub_store() -> DiskHubStore {
    let dir = bench_dir();
    let store = SqliteHubStore::open(&dir.path().join("hub.sqlite")).expect("a hub store");
    DiskHubStore { store, _dir: dir }
}

/// Hub-side ingest of one push frame straight into the store.
fn hub_store_ingest(store: &mut SqliteHubStore, frame: &[u8]) {
    let Message::Push(p) = Message::from_payload(payload(frame)).expect("a valid frame") else {
        panic!("a push frame");
    };
    let verified = change::verify_batch(&p.doc, p.changes).expect("valid signatures");
    let cursors = store.append(&verified).expect("a commit");
    assert!(
        cursors
            .iter()
            .all(|a| matches!(a, syncline_core::store::Appended::Stored(_))),
        "fresh changes only"
    );
}

/// A hub on disk with one authenticated session that pushes.
struct DiskHub {
    hub: MemHub,
    session: SessionId,
    next_push: u64,
    _dir: TempDir,
}

fn disk_hub() -> DiskHub {
    let dir = bench_dir();
    let store = SqliteHubStore::open(&dir.path().join("hub.sqlite")).expect("a hub store");
    let mut hub = hub_with(store);
    let mut pusher =
        Replica::open_in_memory(Identity::from_seed([9; 32]), bench_options()).expect("replica");
    let session = connect(&mut hub, &mut pusher);
    DiskHub {
        hub,
        session,
        next_push: 1,
        _dir: dir,
    }
}

impl DiskHub {
    /// One push through the machine: parse, verify, queue, group commit, acknowledgement.
    fn ingest(&mut self, frame: &[u8]) {
        let msg = Message::from_payload(payload(frame)).expect("a valid frame");
        self.hub
            .handle_message(self.session, msg)
            .expect("the hub accepts");
        self.hub.flush().expect("the hub commits");
        while let Some(m) = self.hub.poll_transmit(self.session).expect("the hub polls") {
            assert!(
                matches!(m, Message::Ack(_) | Message::AckAt(_)),
                "an acknowledgement, not {m:?}"
            );
        }
    }
}

/// Times `work` over inputs made by `prepare` outside the timed section.
fn timed<S, I>(
    iters: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S) -> I,
    mut work: impl FnMut(&mut S, I),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let input = prepare(state);
        let start = Instant::now();
        work(state, input);
        total += start.elapsed();
    }
    total
}

struct Ctx {
    history: usize,
    stream: Stream,
}

fn group<'a>(c: &'a mut Criterion, name: &str, flat: bool) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    if flat {
        // Each iteration is milliseconds long and stateful: same count per sample.
        g.sampling_mode(SamplingMode::Flat);
    }
    g
}

fn base_ed25519(c: &mut Criterion, ctx: &mut Ctx) {
    let doc = ctx.stream.doc.clone();
    let made = ctx.stream.verified(0..64).to_vec();
    let messages: Vec<Vec<u8>> = made
        .iter()
        .map(|c| change::signing_message(&doc, &c.hash()))
        .collect();
    let key = SigningKey::from_bytes(&[7; 32]);
    let vk = key.verifying_key();
    let sigs: Vec<ed25519_dalek::Signature> = messages.iter().map(|m| key.sign(m)).collect();
    let mut g = group(c, "base/ed25519", false);
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| key.sign(&messages[0])));
    g.bench_function("verify_one", |b| {
        b.iter(|| vk.verify_strict(&messages[0], &sigs[0]).expect("valid"))
    });
    g.throughput(Throughput::Elements(64));
    let refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
    let keys = vec![vk; 64];
    g.bench_function("verify_batch_64", |b| {
        b.iter(|| ed25519_dalek::verify_batch(&refs, &sigs, &keys).expect("valid"))
    });
    g.finish();

    // Syncline's verify_batch: parse (Automerge hash) plus batch verification.
    let signed: Vec<SignedChange> = made.iter().map(|c| c.signed().clone()).collect();
    let mut g = group(c, "sync/verify", false);
    g.throughput(Throughput::Elements(64));
    g.bench_function("verify_batch_64", |b| {
        b.iter_batched(
            || signed.clone(),
            |s| change::verify_batch(&doc, s).expect("valid"),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn base_automerge(c: &mut Criterion, ctx: &mut Ctx) {
    let mut g = group(c, "base/automerge", true);
    g.throughput(Throughput::Elements(1));
    g.bench_function("local_change/fresh", |b| {
        b.iter_custom(|iters| {
            let mut doc = Automerge::new().with_actor(automerge::ActorId::from(vec![3u8; 16]));
            let start = Instant::now();
            for i in 0..iters as usize {
                std::hint::black_box(local_change(&mut doc, i));
            }
            start.elapsed()
        })
    });
    let mut history_doc: Option<(Automerge, usize)> = None;
    let history = ctx.history;
    g.bench_function("local_change/history", |b| {
        let (doc, at) = history_doc.get_or_insert_with(|| (ctx.stream.history_writer(4), history));
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(local_change(doc, *at));
                *at += 1;
            }
            start.elapsed()
        })
    });
    drop(history_doc);

    g.throughput(Throughput::Elements(INGEST_BATCH as u64));
    let stream = &mut ctx.stream;
    g.bench_function("apply_256/fresh", |b| {
        b.iter_custom(|iters| {
            let mut doc = Automerge::new();
            let mut at = 0;
            timed(
                iters,
                &mut doc,
                |_| {
                    at += INGEST_BATCH;
                    stream.automerge(at - INGEST_BATCH..at)
                },
                |doc, batch| doc.apply_changes(batch).expect("valid changes"),
            )
        })
    });
    // The same stream through `Document`'s checked apply (causal sort, numbering, actor and
    // object checks before Automerge): the ratio to `apply_256/fresh` is their cost.
    g.bench_function("apply_256/fresh_checked", |b| {
        b.iter_custom(|iters| {
            let mut doc = syncline_core::document::Document::new(
                DocId::new("bench").expect("an id"),
                automerge::ActorId::random(),
            );
            let mut at = 0;
            timed(
                iters,
                &mut doc,
                |_| {
                    at += INGEST_BATCH;
                    stream.automerge(at - INGEST_BATCH..at)
                },
                |doc, batch| {
                    let refused = syncline_core::fuzzing::document_apply(doc, batch);
                    assert_eq!(refused, 0, "valid changes");
                },
            )
        })
    });
    for (name, loaded) in [
        ("apply_256/history", false),
        ("apply_256/history_loaded", true),
    ] {
        let mut slot: Option<(Automerge, usize)> = None;
        g.bench_function(name, |b| {
            let (doc, at) = slot.get_or_insert_with(|| {
                let doc = if loaded {
                    stream.history_loaded()
                } else {
                    stream.history_applied()
                };
                (doc, history)
            });
            b.iter_custom(|iters| {
                timed(
                    iters,
                    doc,
                    |_| {
                        *at += INGEST_BATCH;
                        stream.automerge(*at - INGEST_BATCH..*at)
                    },
                    |doc, batch| doc.apply_changes(batch).expect("valid changes"),
                )
            })
        });
    }
    g.finish();
}

fn sqlite_base(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("a SQLite file");
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .expect("WAL");
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("synchronous=FULL");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        .expect("a table");
    conn
}

fn base_sqlite(c: &mut Criterion) {
    let mut g = group(c, "base/sqlite", false);
    for rows in [1usize, 64, 256] {
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_function(format!("insert_{rows}_per_txn"), |b| {
            let dir = bench_dir();
            let mut conn = sqlite_base(&dir.path().join("base.sqlite"));
            let mut blob = [0u8; 110];
            let mut n = 0u64;
            b.iter(|| {
                let tx = conn.transaction().expect("a transaction");
                {
                    let mut st = tx
                        .prepare_cached("INSERT INTO t (data) VALUES (?1)")
                        .expect("a statement");
                    for _ in 0..rows {
                        n += 1;
                        blob[..8].copy_from_slice(&n.to_le_bytes());
                        st.execute([&blob[..]]).expect("an insert");
                    }
                }
                tx.commit().expect("a durable commit");
            });
        });
    }
    g.finish();
}

fn base_postcard_and_wire(c: &mut Criterion, ctx: &mut Ctx) {
    let doc = ctx.stream.doc.clone();
    let message = |changes: Vec<SignedChange>| {
        Message::Changes(Changes {
            doc: doc.clone(),
            changes,
            cursor: Some((Target::Doc(doc.clone()), Cursor(1))),
        })
    };
    let m64 = message(ctx.stream.signed(0..64));
    let m256 = message(ctx.stream.signed(0..256));

    let mut g = group(c, "base/postcard", false);
    g.throughput(Throughput::Elements(64));
    g.bench_function("encode_changes_64", |b| {
        b.iter(|| postcard::to_allocvec(&m64).expect("encodes"))
    });
    let bytes = postcard::to_allocvec(&m64).expect("encodes");
    g.bench_function("decode_changes_64", |b| {
        b.iter(|| postcard::from_bytes::<Message>(&bytes).expect("decodes"))
    });
    g.finish();

    let mut g = group(c, "sync/wire", false);
    for (n, m) in [(64u64, &m64), (256, &m256)] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("to_frame_changes_{n}"), |b| b.iter(|| m.to_frame()));
        let frame = m.to_frame();
        g.bench_function(format!("from_payload_changes_{n}"), |b| {
            b.iter(|| Message::from_payload(payload(&frame)).expect("decodes"))
        });
    }
    g.finish();
}

fn sync_local(c: &mut Criterion, ctx: &mut Ctx) {
    let doc = doc_id("bench/local");
    // Acknowledgements are pumped outside the timed section every this many writes, as a
    // connected gateway would receive them, so that the outbox stays small.
    const ACK_EVERY: usize = 256;

    let mut g = group(c, "sync/local", true);
    // One history for both write shapes: building it takes most of a minute.
    let mut local_history: Option<(Link, usize)> = None;
    for (name, per_call) in [("change_1", 1usize), ("change_many_64", LOCAL_GROUP)] {
        g.throughput(Throughput::Elements(per_call as u64));
        let write = |link: &mut Link, at: &mut usize| {
            if per_call == 1 {
                link.replica
                    .change(&doc, &put_op(*at))
                    .expect("a local write");
            } else {
                let group: Vec<(DocId, Vec<Op>)> = (*at..*at + per_call)
                    .map(|i| (doc.clone(), put_op(i)))
                    .collect();
                link.replica
                    .change_many(&group)
                    .expect("a grouped local write");
            }
            *at += per_call;
        };
        g.bench_function(format!("{name}/fresh"), |b| {
            b.iter_custom(|iters| {
                let mut link = Link::open(20, bench_options(), &doc);
                let mut at = 0usize;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    write(&mut link, &mut at);
                    total += start.elapsed();
                    if at % ACK_EVERY < per_call {
                        link.pump();
                    }
                }
                total
            })
        });
        let history = ctx.history;
        g.bench_function(format!("{name}/history"), |b| {
            let (link, at) = local_history.get_or_insert_with(|| {
                let start = Instant::now();
                let mut link = Link::open(21, bench_options(), &doc);
                let mut at = 0usize;
                while at < history {
                    let n = ACK_EVERY.min(history - at);
                    let group: Vec<(DocId, Vec<Op>)> =
                        (at..at + n).map(|i| (doc.clone(), put_op(i))).collect();
                    link.replica
                        .change_many(&group)
                        .expect("a grouped local write");
                    at += n;
                    link.pump();
                }
                eprintln!(
                    "built a local history of {history} changes in {:.1?}",
                    start.elapsed()
                );
                (link, at)
            });
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    write(link, at);
                    total += start.elapsed();
                    if *at % ACK_EVERY < per_call {
                        link.pump();
                    }
                }
                total
            })
        });
    }

    // An offline replica whose outbox holds more than `compact_after_bytes` (1 MiB). Before
    // da51c46 every local change then compacted the whole document (11-15 writes/s, see
    // docs/BENCHMARKS.md); this keeps it from coming back. The outbox is written with
    // compaction off, then the store is reopened with the defaults.
    g.throughput(Throughput::Elements(1));
    let mut offline: Option<(Replica, TempDir, usize)> = None;
    g.bench_function("change_1/offline_outbox_1.1MB", |b| {
        let (replica, _, at) = offline.get_or_insert_with(|| {
            let start = Instant::now();
            let dir = bench_dir();
            let path = dir.path().join("offline.sqlite");
            let identity = Identity::from_seed([22; 32]);
            let mut replica =
                Replica::open(&path, identity.clone(), no_compaction()).expect("a replica");
            for first in (0..OFFLINE_OUTBOX).step_by(256) {
                let group: Vec<(DocId, Vec<Op>)> = (first..first + 256)
                    .map(|i| (doc.clone(), put_op(i)))
                    .collect();
                replica.change_many(&group).expect("a grouped local write");
            }
            drop(replica);
            let replica = Replica::open(&path, identity, bench_options()).expect("a replica");
            eprintln!(
                "wrote {OFFLINE_OUTBOX} offline changes in {:.1?}",
                start.elapsed()
            );
            (replica, dir, OFFLINE_OUTBOX)
        });
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                replica.change(&doc, &put_op(*at)).expect("a local write");
                *at += 1;
            }
            start.elapsed()
        })
    });
    drop(local_history);
    g.finish();
}

fn sync_hub(c: &mut Criterion, ctx: &mut Ctx) {
    let history = ctx.history;
    let stream = &mut ctx.stream;
    let mut g = group(c, "sync/hub", true);
    g.throughput(Throughput::Elements(INGEST_BATCH as u64));

    g.bench_function("store_256/fresh", |b| {
        b.iter_custom(|iters| {
            let mut hub = disk_hub_store();
            let mut at = 0;
            timed(
                iters,
                &mut hub,
                |_| {
                    at += INGEST_BATCH;
                    stream.push_frame(at - INGEST_BATCH..at, 1)
                },
                |hub, frame| hub_store_ingest(&mut hub.store, &frame),
            )
        })
    });
    let mut hub_store_history: Option<(DiskHubStore, usize)> = None;
    g.bench_function("store_256/history", |b| {
        let (hub, at) = hub_store_history.get_or_insert_with(|| {
            let mut hub = disk_hub_store();
            for first in (0..history).step_by(INGEST_BATCH) {
                let end = (first + INGEST_BATCH).min(history);
                hub.store
                    .append(stream.verified(first..end))
                    .expect("a commit");
            }
            (hub, history)
        });
        b.iter_custom(|iters| {
            timed(
                iters,
                hub,
                |_| {
                    *at += INGEST_BATCH;
                    stream.push_frame(*at - INGEST_BATCH..*at, 1)
                },
                |hub, frame| hub_store_ingest(&mut hub.store, &frame),
            )
        })
    });
    drop(hub_store_history);

    g.bench_function("machine_256/fresh", |b| {
        b.iter_custom(|iters| {
            let mut hub = disk_hub();
            let mut at = 0;
            timed(
                iters,
                &mut hub,
                |hub| {
                    at += INGEST_BATCH;
                    hub.next_push += 1;
                    stream.push_frame(at - INGEST_BATCH..at, hub.next_push)
                },
                |hub, frame| hub.ingest(&frame),
            )
        })
    });
    let mut hub_history: Option<(DiskHub, usize)> = None;
    g.bench_function("machine_256/history", |b| {
        let (hub, at) = hub_history.get_or_insert_with(|| {
            let mut hub = disk_hub();
            for first in (0..history).step_by(INGEST_BATCH) {
                let end = (first + INGEST_BATCH).min(history);
                hub.hub
                    .store()
                    .append(stream.verified(first..end))
                    .expect("a commit");
            }
            (hub, history)
        });
        b.iter_custom(|iters| {
            timed(
                iters,
                hub,
                |hub| {
                    *at += INGEST_BATCH;
                    hub.next_push += 1;
                    stream.push_frame(*at - INGEST_BATCH..*at, hub.next_push)
                },
                |hub, frame| hub.ingest(&frame),
            )
        })
    });
    g.finish();
}

fn sync_replica(c: &mut Criterion, ctx: &mut Ctx) {
    let history = ctx.history;
    let doc = ctx.stream.doc.clone();
    let stream = &mut ctx.stream;
    let mut g = group(c, "sync/replica", true);
    g.throughput(Throughput::Elements(INGEST_BATCH as u64));

    g.bench_function("ingest_256/fresh", |b| {
        b.iter_custom(|iters| {
            let mut link = Link::open(30, bench_options(), &doc);
            let mut at = 0;
            timed(
                iters,
                &mut link,
                |link| {
                    while link.replica.poll_event().is_some() {}
                    at += INGEST_BATCH;
                    stream.changes_frame(at - INGEST_BATCH..at)
                },
                |link, frame| link.ingest(&frame),
            )
        })
    });

    for (name, compaction, seed) in [
        ("ingest_256/history", true, 31),
        ("ingest_256/history_no_compaction", false, 32),
    ] {
        let options = if compaction {
            bench_options
        } else {
            no_compaction
        };
        // Dropped after its bench: two histories at once would double the memory.
        let mut slot: Option<(Link, usize)> = None;
        g.bench_function(name, |b| {
            let (link, at) = slot.get_or_insert_with(|| {
                let start = Instant::now();
                let mut link = Link::open(seed, options(), &doc);
                for first in (0..history).step_by(INGEST_BATCH) {
                    let end = (first + INGEST_BATCH).min(history);
                    let frame = stream.changes_frame(first..end);
                    link.ingest(&frame);
                    while link.replica.poll_event().is_some() {}
                }
                eprintln!(
                    "ingested a history of {history} changes in {:.1?}",
                    start.elapsed()
                );
                (link, history)
            });
            b.iter_custom(|iters| {
                timed(
                    iters,
                    link,
                    |link| {
                        while link.replica.poll_event().is_some() {}
                        *at += INGEST_BATCH;
                        stream.changes_frame(*at - INGEST_BATCH..*at)
                    },
                    |link, frame| link.ingest(&frame),
                )
            })
        });
    }
    g.finish();
}

/// A replica catching up 10,000 changes of one author: verified and applied by changes, in
/// batches of 256 (verify in parallel, then the checked apply), beside verifying and loading
/// the same document as one snapshot (`snapshot::verify`: load, coverage walk, one signature).
fn sync_catch_up(c: &mut Criterion, ctx: &mut Ctx) {
    const N: usize = 10_000;
    let doc = ctx.stream.doc.clone();
    let signed = ctx.stream.signed(0..N);
    let parsed = ctx.stream.automerge(0..N);
    let mut full = Automerge::new();
    full.apply_changes(parsed).expect("valid changes");
    let last = ctx.stream.verified(N - 1..N)[0].clone();
    let snap = syncline_core::snapshot::make(&full, |h| {
        (*h == last.hash()).then_some(last.signed().signature)
    })
    .expect("one actor, its newest change signed");
    eprintln!(
        "catch-up of {N} changes: {} bytes as changes, {} bytes as a snapshot",
        signed.iter().map(|c| c.bytes.len() + 64).sum::<usize>(),
        snap.data.len() + 96
    );
    let mut g = group(c, "sync/catch_up", true);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("10k/changes", |b| {
        b.iter(|| {
            let mut d =
                syncline_core::document::Document::new(doc.clone(), automerge::ActorId::random());
            for batch in signed.chunks(INGEST_BATCH) {
                let verified = change::verify_batch_parallel(&doc, batch.to_vec(), 2)
                    .expect("valid signatures");
                let changes = verified
                    .into_iter()
                    .map(change::VerifiedChange::into_automerge)
                    .collect();
                assert_eq!(syncline_core::fuzzing::document_apply(&mut d, changes), 0);
            }
        })
    });
    g.bench_function("10k/snapshot", |b| {
        b.iter(|| syncline_core::snapshot::verify(&doc, snap.clone()).expect("it verifies"))
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let history = history_len();
    let mut ctx = Ctx {
        history,
        stream: Stream::new(doc_id("bench/remote"), history),
    };
    eprintln!(
        "history: {history} changes; stores under {}",
        std::env::temp_dir().display()
    );
    let start = Instant::now();
    ctx.stream.ensure(history);
    let bytes: usize = ctx.stream.made.iter().map(|c| c.signed().bytes.len()).sum();
    eprintln!(
        "made {history} signed changes (mean {} bytes) in {:.1?}",
        bytes / history.max(1),
        start.elapsed()
    );
    base_ed25519(&mut c, &mut ctx);
    base_automerge(&mut c, &mut ctx);
    base_sqlite(&mut c);
    base_postcard_and_wire(&mut c, &mut ctx);
    sync_local(&mut c, &mut ctx);
    sync_hub(&mut c, &mut ctx);
    sync_replica(&mut c, &mut ctx);
    sync_catch_up(&mut c, &mut ctx);
    c.final_summary();
}
