//! Two replicas edit one document while offline, then sync through a hub and converge.
//!
//! Run it with `cargo run -p syncline-examples --bin two-replicas`.
//!
//! Everything runs in this one process: the hub and the replicas are Syncline's sans-IO state
//! machines, and a small loop (`sync`) carries their messages where a real deployment would
//! use QUIC or WebSocket. The stores are real SQLite files in a temporary directory.

use std::error::Error;

use syncline_core::DocId;
use syncline_core::hub::{AllowAll, Hub, SessionId};
use syncline_core::identity::Identity;
use syncline_core::ops::Op;
use syncline_core::replica::{Replica, ReplicaOptions};
use syncline_core::store::SqliteHubStore;
use syncline_core::wire::{Message, Target};

type AnyResult<T> = Result<T, Box<dyn Error>>;
type MemoryHub = Hub<SqliteHubStore, AllowAll>;

fn main() -> AnyResult<()> {
    let dir = tempfile::tempdir()?;

    // A hub that lets every key read and write everything, and two devices. Each has its own
    // ed25519 identity: every change it writes is signed, and everyone verifies it.
    let hub_store = SqliteHubStore::open(&dir.path().join("hub.sqlite"))?;
    let mut hub = Hub::new(Identity::generate(), hub_store, AllowAll, None);
    let mut alice = Replica::open(
        &dir.path().join("alice.sqlite"),
        Identity::generate(),
        ReplicaOptions::default(),
    )?;
    let mut bob = Replica::open(
        &dir.path().join("bob.sqlite"),
        Identity::generate(),
        ReplicaOptions::default(),
    )?;
    let doc = DocId::new("shops/berlin/inventory")?;

    // 1. Alice creates the document's structure and shares it. Create a counter, list or text
    //    once, on one replica: if two replicas each created `visits` offline, they would make
    //    two different counters and only one would survive the merge.
    alice.change(
        &doc,
        &ops(r#"[
            {"op":"put","path":["visits"],"value":{"$counter":0}},
            {"op":"put","path":["items"],"value":["bread"]},
            {"op":"put","path":["notes"],"value":{"$text":"open daily"}}
        ]"#)?,
    )?;
    // Bob follows the document (a replica also follows every document it writes to).
    bob.subscribe(Target::Doc(doc.clone()))?;
    let mut sessions = connect(&mut hub, [&mut alice, &mut bob]);
    sync(&mut hub, [&mut alice, &mut bob], sessions)?;

    // 2. Both go offline and write concurrently. Each `change` is committed to the replica's
    //    SQLite file before it returns, and kept in its outbox until the hub acknowledges it.
    disconnect(&mut hub, [&mut alice, &mut bob], sessions);
    alice.change(
        &doc,
        &ops(r#"[
            {"op":"increment","path":["visits"],"by":3},
            {"op":"insert","path":["items",-1],"value":"apples"},
            {"op":"splice","path":["notes"],"index":10,"text":", 8-20h"}
        ]"#)?,
    )?;
    bob.change(
        &doc,
        &ops(r#"[
            {"op":"increment","path":["visits"],"by":4},
            {"op":"insert","path":["items",0],"value":"pears"},
            {"op":"splice","path":["notes"],"index":0,"text":"Bakery: "}
        ]"#)?,
    )?;
    println!("Offline, each replica sees only its own edits:");
    println!("  alice: {}", alice.json(&doc)?);
    println!("  bob:   {}", bob.json(&doc)?);

    // 3. Both reconnect. They upload their outboxes, the hub stores and relays the changes,
    //    and each replica merges what it receives.
    sessions = connect(&mut hub, [&mut alice, &mut bob]);
    let moved = sync(&mut hub, [&mut alice, &mut bob], sessions)?;
    println!("\nBack online: {moved} messages exchanged through the hub.\n");

    let mut states = Vec::new();
    for (name, replica) in [("alice", &mut alice), ("bob", &mut bob)] {
        let json = replica.json(&doc)?;
        let mut heads: Vec<String> = replica
            .doc(&doc)?
            .heads()
            .iter()
            .map(|h| h.to_string())
            .collect();
        heads.sort();
        let outbox = replica.status()?.outbox;
        // Heads are the hashes of the latest changes; the first 12 hex digits are plenty here.
        let short: Vec<&str> = heads.iter().map(|h| &h[..12]).collect();
        println!("{name}: {json:#}");
        println!("{name}: heads {short:?}, {outbox} changes waiting in the outbox");
        states.push((json, heads, outbox));
    }

    // Exit non-zero unless both replicas hold the same state, counted every increment, and
    // had every change acknowledged by the hub.
    let (a, b) = (&states[0], &states[1]);
    if a.0 != b.0 || a.1 != b.1 {
        return Err("the replicas did not converge".into());
    }
    if a.0["visits"] != 7 {
        return Err(format!("visits is {}, expected 3 + 4 = 7", a.0["visits"]).into());
    }
    if a.2 != 0 || b.2 != 0 {
        return Err("some changes were not acknowledged by the hub".into());
    }

    println!(
        "\nWhat happened:
- Alice and Bob wrote to the same document while disconnected; neither waited for the other.
- Each change was signed by its author and committed to the author's SQLite file at once.
- On reconnect, each replica pushed its outbox; the hub verified the signatures, stored the
  changes and acknowledged them, then relayed them to the other replica.
- Automerge merged the edits: the counter added both increments (3 + 4 = 7), both list
  inserts were kept, and both text splices were woven together. Same changes, same heads,
  same state on both replicas.
- The document has two heads, one per concurrent change; the next change written on either
  replica depends on both and merges them into one."
    );
    Ok(())
}

/// Parses operations in their JSON form (the same form the edge HTTP API and the bindings
/// accept).
fn ops(json: &str) -> AnyResult<Vec<Op>> {
    Op::list_from_json(json).map_err(|e| e.0.into())
}

/// Opens one session per replica, as a transport's connect would.
fn connect(hub: &mut MemoryHub, replicas: [&mut Replica; 2]) -> [SessionId; 2] {
    replicas.map(|replica| {
        let session = hub.accept();
        // Pinning the hub's key means a replica talks only to the hub it expects.
        replica.connect(Some(hub.peer_id()));
        session
    })
}

/// Closes the sessions, as a lost connection would. Unacknowledged changes stay in the outbox.
fn disconnect(hub: &mut MemoryHub, replicas: [&mut Replica; 2], sessions: [SessionId; 2]) {
    for (replica, session) in replicas.into_iter().zip(sessions) {
        replica.disconnect();
        hub.close(session);
    }
}

/// Carries messages both ways until none moves, and returns how many moved. This is all a
/// transport driver does: `poll_transmit` gives what to send, `handle_message` takes what
/// arrived, and `Hub::flush` commits the received changes in one transaction before the hub
/// acknowledges and relays them.
fn sync(
    hub: &mut MemoryHub,
    mut replicas: [&mut Replica; 2],
    sessions: [SessionId; 2],
) -> AnyResult<usize> {
    let mut total = 0;
    // Two replicas settle in a few rounds; the bound turns a protocol bug into an error.
    for _ in 0..100 {
        let mut moved = 0;
        for (replica, &session) in replicas.iter_mut().zip(&sessions) {
            while let Some(msg) = replica.poll_transmit()? {
                hub.handle_message(session, over_the_wire(msg)?)?;
                moved += 1;
            }
        }
        hub.flush()?;
        for (replica, &session) in replicas.iter_mut().zip(&sessions) {
            while let Some(msg) = hub.poll_transmit(session)? {
                replica.handle_message(over_the_wire(msg)?)?;
                moved += 1;
            }
        }
        if moved == 0 {
            return Ok(total);
        }
        total += moved;
    }
    Err("the replicas and the hub were still talking after 100 rounds".into())
}

/// Encodes a message as the frame a transport would send, and decodes it back, so that this
/// example goes through the real wire format.
fn over_the_wire(msg: Message) -> AnyResult<Message> {
    let frame = msg.to_frame();
    // The first 4 bytes are the big-endian length prefix.
    Ok(Message::from_payload(&frame[4..])?)
}
