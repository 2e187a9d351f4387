//! Hostile peers against a live `syncline-hub` process over real QUIC: garbage, oversized
//! frames, a wrong version, forged, replayed and spoofed changes, writes outside the grants,
//! floods of subscriptions and connections, and a peer that never reads. Each is refused
//! with the right error and counted in the metrics; the hub stays up, and good edges keep
//! syncing.

use std::time::{Duration, Instant};

use serde_json::json;
use syncline_core::change::{self, SignedChange};
use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::wire::{
    ErrorCode, FrameDecoder, Hello, MAX_FRAME, Message, Push, Role, Subscribe, Target,
};
use syncline_core::{Cursor, DocId, DocPrefix, Epoch, PeerId};
use syncline_e2e::{Edge, Hub, until};

use crate::cluster;

/// A raw QUIC peer of the hub: it sends what it likes and reads what comes back.
struct Peer {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    _endpoint: quinn::Endpoint,
}

/// Where a hub is, for tasks that cannot borrow the [`Hub`].
#[derive(Clone)]
struct HubAddr {
    addr: String,
    fingerprint: String,
    key: String,
}

impl From<&Hub> for HubAddr {
    fn from(h: &Hub) -> Self {
        HubAddr {
            addr: h.addr.clone(),
            fingerprint: h.fingerprint.clone(),
            key: h.key.clone(),
        }
    }
}

impl Peer {
    async fn dial(hub: &Hub) -> anyhow::Result<Peer> {
        Peer::dial_at(&hub.into()).await
    }

    /// A QUIC connection to the hub, its certificate pinned, within 5 s.
    async fn connect(hub: &HubAddr) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let fp = syncline_net::tls::parse_fingerprint(&hub.fingerprint)?;
        let config = syncline_net::tls::client_config(vec![fp])?;
        let connecting = endpoint.connect_with(config, hub.addr.parse()?, "syncline")?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting).await??;
        Ok((endpoint, conn))
    }

    async fn dial_at(hub: &HubAddr) -> anyhow::Result<Peer> {
        let (endpoint, conn) = Peer::connect(hub).await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Peer {
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(),
            _endpoint: endpoint,
        })
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }

    async fn send(&mut self, m: &Message) {
        self.send_raw(&m.to_frame()).await;
    }

    /// The next message from the hub; `None` once the hub closed the stream, or after
    /// `secs` without one.
    async fn next(&mut self, secs: u64) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Ok(Some(m)) = self.decoder.next_message() {
                return Some(m);
            }
            let read = tokio::time::timeout_at(deadline, self.recv.read(&mut buf)).await;
            match read {
                Ok(Ok(Some(n))) => self.decoder.extend(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until a message matches `f`.
    async fn expect<T>(&mut self, secs: u64, mut f: impl FnMut(&Message) -> Option<T>) -> T {
        let mut seen = Vec::new();
        while let Some(m) = self.next(secs).await {
            if let Some(t) = f(&m) {
                return t;
            }
            seen.push(format!("{m:?}"));
        }
        panic!("the expected message did not come within {secs}s; saw {seen:?}");
    }

    /// Runs the real handshake with a replica state machine of `identity`, on a new
    /// connection each time until the hub accepts the key (a grant reaches a running hub
    /// within 250 ms); returns the peer and its replica (it makes validly signed changes).
    async fn authenticated(hub: &Hub, identity: &Identity) -> (Peer, Replica) {
        Peer::authenticated_at(&hub.into(), identity).await
    }

    async fn authenticated_at(hub: &HubAddr, identity: &Identity) -> (Peer, Replica) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the hub never accepted the key");
            let mut p = Peer::dial_at(hub).await.unwrap();
            let options = ReplicaOptions {
                verify_threads: 1,
                ..ReplicaOptions::default()
            };
            let mut r = Replica::open_in_memory(identity.clone(), options).unwrap();
            let binding = syncline_net::tls::channel_binding(&p.conn).unwrap();
            r.connect_bound(Some(PeerId::from_hex(&hub.key).unwrap()), binding);
            let deadline = Instant::now() + Duration::from_secs(10);
            while r.status().unwrap().hub.is_none() && Instant::now() < deadline {
                while let Ok(Some(m)) = r.poll_transmit() {
                    p.send(&m).await;
                }
                if let Some(m) = p.next(1).await {
                    let _ = r.handle_message(m);
                }
            }
            // Probe: a key the hub accepts gets CaughtUp (CaughtUpAt since version 3) for a
            // subscription, an unknown one Error(UnknownPeer) right after its Auth.
            let probe = Target::Doc(DocId::new("probe/accepted").unwrap());
            p.send(&subscribe(probe)).await;
            loop {
                match p.next(5).await {
                    Some(Message::CaughtUp(_) | Message::CaughtUpAt(_)) => return (p, r),
                    Some(Message::Error(_)) | None => break,
                    Some(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The replica's next push (of the change it just made).
fn push_of(r: &mut Replica, doc: &str, ops: serde_json::Value) -> Push {
    let doc = DocId::new(doc).unwrap();
    let ops = Op::list_from_json(&ops.to_string()).unwrap();
    r.change(&doc, &ops).unwrap();
    r.flush().unwrap();
    loop {
        match r.poll_transmit().unwrap() {
            Some(Message::Push(p)) => return p,
            Some(_) => continue,
            None => panic!("the replica made no push"),
        }
    }
}

fn rejects(hub: &Hub, reason: &str) -> u64 {
    hub.metric(&format!(
        "syncline_hub_rejects_total{{reason=\"{reason}\"}}"
    ))
    .unwrap_or(0)
}

/// A `Hello` of a fresh key for the versions `min..=max`.
fn hello(min: u16, max: u16) -> Message {
    Message::Hello(Hello {
        min_version: min,
        max_version: max,
        role: Role::Replica,
        peer: Identity::generate().peer_id(),
        nonce: [1; 32],
        epoch: Epoch::none(),
    })
}

/// A first subscription (no cursor yet) to `target`.
fn subscribe(target: Target) -> Message {
    Message::Subscribe(Subscribe {
        target,
        epoch: Epoch::none(),
        cursor: Cursor(0),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn error_code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn garbage_oversized_frames_and_a_wrong_version_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edges) = cluster(dir.path(), 1);
    runtime().block_on(async {
        // A peer that says Hello and never authenticates: refused at the deadline.
        let mut silent = Peer::dial(&hub).await.unwrap();
        silent.send(&hello(1, 1)).await;
        let silent = tokio::spawn(async move {
            silent
                .expect(30, |m| match m {
                    Message::Error(e) if e.message.contains("no authenticated handshake") => {
                        Some(e.code)
                    }
                    _ => None,
                })
                .await
        });

        // Garbage: a frame whose payload is no message.
        let mut p = Peer::dial(&hub).await.unwrap();
        p.send_raw(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await;
        let code = p.expect(10, error_code).await;
        assert_eq!(code, ErrorCode::ProtocolViolation);
        assert!(
            p.next(5).await.is_none(),
            "the session goes on after garbage"
        );

        // Oversized: a length prefix past the limit; the hub does not wait for the bytes.
        let mut p = Peer::dial(&hub).await.unwrap();
        p.send_raw(&(MAX_FRAME as u32 + 1).to_be_bytes()).await;
        assert_eq!(p.expect(10, error_code).await, ErrorCode::ProtocolViolation);

        // A version the hub does not speak.
        let mut p = Peer::dial(&hub).await.unwrap();
        p.send(&hello(90, 99)).await;
        assert_eq!(p.expect(10, error_code).await, ErrorCode::VersionMismatch);
        assert_eq!(silent.await.unwrap(), ErrorCode::ProtocolViolation);
    });
    until("the refusals to be counted", 10, || {
        (rejects(&hub, "wire") >= 2
            && rejects(&hub, "version") >= 1
            && rejects(&hub, "handshake_timeout") >= 1)
            .then_some(())
    });
    // The hub is up and serves the edge.
    let (status, _) = edges[0]
        .change(
            "after/garbage",
            json!([{"op":"put","path":["ok"],"value":true}]),
        )
        .unwrap();
    assert_eq!(status, 200);
    until("the edge's write to be acknowledged", 20, || {
        (edges[0].status().ok()?["outbox"] == json!(0)).then_some(())
    });
}

#[test]
fn forged_replayed_spoofed_and_ungranted_changes_are_refused_and_stored_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edges) = cluster(dir.path(), 1);
    let attacker = Identity::generate();
    let victim = Identity::from_seed([42; 32]);
    hub.grant(&attacker.peer_id().to_string(), "mine/", "rw");
    hub.grant(&victim.peer_id().to_string(), "", "rw");
    runtime().block_on(async {
        let (mut p, mut r) = Peer::authenticated(&hub, &attacker).await;
        let reject = |want: u64| {
            move |m: &Message| match m {
                Message::Reject(j) if j.push_id == want => Some(j.code),
                _ => None,
            }
        };

        // A forged signature.
        let mut push = push_of(
            &mut r,
            "mine/forged",
            json!([{"op":"put","path":["x"],"value":1}]),
        );
        push.changes[0].signature[0] ^= 1;
        let id = push.push_id;
        p.send(&Message::Push(push)).await;
        assert_eq!(p.expect(10, reject(id)).await, ErrorCode::BadSignature);

        // A valid change replayed into another document.
        let mut push = push_of(
            &mut r,
            "mine/a",
            json!([{"op":"put","path":["x"],"value":2}]),
        );
        push.doc = DocId::new("mine/replayed").unwrap();
        let id = push.push_id;
        p.send(&Message::Push(push)).await;
        assert_eq!(p.expect(10, reject(id)).await, ErrorCode::BadSignature);

        // An actor that names the victim's key, signed with the attacker's.
        let doc = DocId::new("mine/spoofed").unwrap();
        let mut am = automerge::Automerge::new();
        am.set_actor(change::actor_for(&victim.peer_id(), [9; 8]));
        {
            use automerge::transaction::Transactable;
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "owner", "victim").unwrap();
            tx.commit();
        }
        let c = am.get_last_local_change().unwrap();
        let hash = syncline_core::ChangeHash(c.hash().0);
        let spoofed = SignedChange {
            bytes: c.raw_bytes().to_vec(),
            signature: attacker.sign(&change::signing_message(&doc, &hash)),
        };
        p.send(&Message::Push(Push {
            push_id: 1_000,
            doc: doc.clone(),
            changes: vec![spoofed],
        }))
        .await;
        assert_eq!(p.expect(10, reject(1_000)).await, ErrorCode::BadSignature);

        // A valid change outside the attacker's grant.
        let push = push_of(
            &mut r,
            "theirs/x",
            json!([{"op":"put","path":["x"],"value":3}]),
        );
        let id = push.push_id;
        p.send(&Message::Push(push)).await;
        assert_eq!(p.expect(10, reject(id)).await, ErrorCode::NotAuthorized);
    });
    until("the refusals to be counted", 10, || {
        (rejects(&hub, "bad_signature") >= 3 && rejects(&hub, "not_authorized") >= 1).then_some(())
    });
    // The edge follows everything and gets a later write, but none of the refused documents.
    edges[0]
        .change(
            "after/attack",
            json!([{"op":"put","path":["ok"],"value":true}]),
        )
        .unwrap();
    let fresh = hub.follower(&dir.path().join("fresh"));
    until("the later write to reach a fresh edge", 30, || {
        fresh.get("after/attack").ok()?.map(|_| ())
    });
    for doc in ["mine/forged", "mine/replayed", "mine/spoofed", "theirs/x"] {
        assert_eq!(fresh.get(doc).unwrap(), None, "{doc} was stored");
    }
}

/// Write-to-visible latency between two edges, median of `n` writes, in milliseconds.
fn latency_ms(a: &Edge, b: &Edge, tag: &str, n: usize) -> f64 {
    let mut samples = Vec::new();
    for i in 0..n {
        let doc = format!("latency/{tag}-{i}");
        let started = Instant::now();
        let (status, _) = a
            .change(&doc, json!([{"op":"put","path":["i"],"value":i}]))
            .unwrap();
        assert_eq!(status, 200);
        // Polled every 2 ms (the harness's `until` polls every 50 ms: too coarse here).
        while !b.get(&doc).is_ok_and(|d| d.is_some()) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "a write was not visible on the other edge within 30 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[n / 2]
}

#[test]
fn floods_and_a_peer_that_never_reads_leave_good_edges_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        "127.0.0.1:0",
        &["--max-connections", "40"],
    );
    let edges: Vec<Edge> = (0..2)
        .map(|i| hub.follower(&dir.path().join(format!("edge{i}"))))
        .collect();
    let unloaded = latency_ms(&edges[0], &edges[1], "unloaded", 15);

    let rt = runtime();
    let flooder = Identity::generate();
    let reader = Identity::generate();
    hub.grant(&flooder.peer_id().to_string(), "", "rw");
    hub.grant(&reader.peer_id().to_string(), "", "rw");
    // Connections that never open a stream, past the limit: refused at once beyond it,
    // closed at the handshake deadline (10 s) within it. And a peer that subscribes to
    // everything and never reads again.
    let (slow, refused, served) = rt.block_on(async {
        let (mut slow, _r) = Peer::authenticated(&hub, &reader).await;
        slow.send(&subscribe(Target::Prefix(DocPrefix::new("").unwrap())))
            .await;
        let mut idle = Vec::new();
        let mut refused = 0u64;
        for _ in 0..60 {
            match Peer::dial_idle(&hub).await {
                Some(c) => idle.push(c),
                None => refused += 1,
            }
        }
        let served = idle.len() as u64;
        // Held until the hub closes them.
        for (_, conn) in &idle {
            let _ = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
        }
        (slow, refused, served)
    });
    // 40 slots: 2 edges and the slow reader hold 3.
    assert!(
        refused >= 20,
        "only {refused} of 60 extra connections were refused"
    );
    assert!(served <= 37, "{served} idle connections were served");
    until("the refusals and the deadline to be counted", 10, || {
        (rejects(&hub, "connection_limit") >= refused
            && rejects(&hub, "handshake_timeout") >= served)
            .then_some(())
    });

    // Now, while floods go on without a pause (a peer sending 70,000 subscriptions, garbage
    // connections) and the slow reader's subscription backs up behind a bulk of writes, the
    // good edges' write-to-visible latency is measured again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        let target = HubAddr::from(&hub);
        rt.spawn(async move {
            let mut floods = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (mut p, _r) = Peer::authenticated_at(&target, &flooder).await;
                let mut frames = Vec::new();
                for i in 0..70_000u32 {
                    let target = Target::Doc(DocId::new(format!("flood/{i}")).unwrap());
                    frames.extend(subscribe(target).to_frame());
                }
                p.send_raw(&frames).await;
                assert_eq!(p.expect(60, error_code).await, ErrorCode::LimitExceeded);
                for _ in 0..5 {
                    if let Ok(mut g) = Peer::dial_at(&target).await {
                        g.send_raw(b"\0\0\0\x08not a message").await;
                        assert_eq!(g.expect(10, error_code).await, ErrorCode::ProtocolViolation);
                    }
                }
                floods += 1;
            }
            floods
        })
    };
    until("the first flood to be refused", 60, || {
        (rejects(&hub, "limit") >= 1).then_some(())
    });
    // 1,200 writes of 4 KB: more than the slow reader's QUIC window (1.25 MB), its session
    // channel and its queue hold, so its subscription must fall back to the log.
    for i in 0..1200 {
        let (status, _) = edges[0]
            .change(
                &format!("bulk/{i}"),
                json!([{"op":"put","path":["blob"],"value":"x".repeat(4000)}]),
            )
            .unwrap();
        assert_eq!(status, 200);
    }
    let loaded = latency_ms(&edges[0], &edges[1], "loaded", 15);
    until(
        "the slow reader's subscription to fall back to the log",
        30,
        || {
            hub.metric("syncline_hub_slow_fallbacks_total")
                .filter(|n| *n >= 1)
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let floods = rt.block_on(attack).unwrap();
    drop(slow);
    until("every flood to be counted", 10, || {
        (rejects(&hub, "limit") >= floods && rejects(&hub, "wire") >= 5 * floods).then_some(())
    });
    eprintln!(
        "write-to-visible p50: unloaded {unloaded:.1} ms, under attack {loaded:.1} ms \
         ({floods} subscription floods)"
    );
    // The good edges are not starved: their median stays within a small multiple of the
    // unloaded one. The bound is loose on purpose (10x plus 250 ms): the attacker, the hub,
    // the edges and the suite's other tests share 2 cores, and a run next to other tests
    // measured 100.9 ms against 7.2 ms unloaded (alone: 5 to 26 ms). Starvation (a slow
    // reader or a flood holding the hub) shows as seconds; the ratio itself belongs to the
    // benchmarks, not to a timed test.
    assert!(
        loaded <= 10.0 * unloaded + 250.0,
        "latency under attack {loaded:.1} ms, unloaded {unloaded:.1} ms: the attack starves \
         good edges"
    );
    // A new edge can still connect once the idle connections are gone.
    let late = hub.follower(&dir.path().join("late"));
    until("a late edge to catch up", 60, || {
        late.get("bulk/1199").ok()?.map(|_| ())
    });
}

impl Peer {
    /// A QUIC connection that never opens a stream; `None` if the hub refused it.
    async fn dial_idle(hub: &Hub) -> Option<(quinn::Endpoint, quinn::Connection)> {
        Peer::connect(&hub.into()).await.ok()
    }
}
