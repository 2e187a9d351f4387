//! Writes to a replica store forever and reports every acknowledged write, one line each, so
//! that the crash test (`tests/integration/crash.rs`) can kill it with SIGKILL at any moment and
//! then check that everything reported is in the store.
//!
//! Usage: `syncline-crash-writer <store.sqlite> <identity.key> [seed]`
//!
//! Lines printed to stdout, each only after the call that made the write returned `Ok` (so the
//! write is committed):
//!
//! - `INIT <doc>`: the document exists, with `counter` (a `$counter` at 0), `keys` (a map),
//!   `items` (a list) and `text` (collaborative text);
//! - `ACK <doc> <n> <list> <text>`: one change that incremented `counter` to `n`, put
//!   `keys/k<n> = n`, and, if `<list>` is 1, appended `n` to `items`, and if `<text>` is 1,
//!   appended `[n]` to `text`.
//!
//! Every change increments the counter by one and adds one key, so in a consistent store
//! `counter == len(keys)` for each document.

use std::error::Error;
use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use syncline_core::DocId;
use syncline_core::identity::Identity;
use syncline_core::ops::{Op, PathElem, Value};
use syncline_core::replica::{Replica, ReplicaOptions};

/// The documents written.
const DOCS: [&str; 3] = ["crash/alpha", "crash/beta", "crash/gamma"];

/// Compact early, so that kills also land in compactions (snapshot plus dropped bytes).
const COMPACT_AFTER_BYTES: u64 = 8 * 1024;

type BoxResult<T> = Result<T, Box<dyn Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("syncline-crash-writer: {e}");
        std::process::exit(1);
    }
}

fn run() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 || args.len() > 4 {
        return Err("usage: syncline-crash-writer <store.sqlite> <identity.key> [seed]".into());
    }
    let seed: u64 = match args.get(3) {
        Some(s) => s.parse()?,
        None => rand::random(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let identity = Identity::load_or_generate(Path::new(&args[2]))?;
    let options = ReplicaOptions {
        compact_after_bytes: COMPACT_AFTER_BYTES,
        ..ReplicaOptions::default()
    };
    let mut replica = Replica::open(Path::new(&args[1]), identity, options)?;
    let docs: Vec<DocId> = DOCS
        .iter()
        .map(|d| Ok(DocId::new(*d)?))
        .collect::<BoxResult<_>>()?;
    let mut out = std::io::stdout().lock();

    // First run: create the documents, all in one group commit.
    let held = replica.doc_ids()?;
    let missing: Vec<(DocId, Vec<Op>)> = docs
        .iter()
        .filter(|d| !held.contains(d))
        .map(|d| Ok((d.clone(), init_ops()?)))
        .collect::<BoxResult<_>>()?;
    if !missing.is_empty() {
        replica.change_many(&missing)?;
        for (doc, _) in &missing {
            writeln!(out, "INIT {doc}")?;
        }
        out.flush()?;
    }

    loop {
        // One document at a time (`change`), or several in one group commit (`change_many`).
        let group = if rng.gen_bool(0.3) {
            rng.gen_range(2..=docs.len())
        } else {
            1
        };
        let first = rng.gen_range(0..docs.len());
        let mut batch = Vec::with_capacity(group);
        let mut acks = Vec::with_capacity(group);
        for i in 0..group {
            let doc = &docs[(first + i) % docs.len()];
            let n = counter(&mut replica, doc)? + 1;
            let list = rng.gen_bool(0.5);
            let text = rng.gen_bool(0.5);
            let len = text_len(&mut replica, doc)?;
            batch.push((doc.clone(), write_ops(n, list, text, len)));
            acks.push(format!(
                "ACK {doc} {n} {} {}",
                u8::from(list),
                u8::from(text)
            ));
        }
        if let [(doc, ops)] = &batch[..] {
            replica.change(doc, ops)?;
        } else {
            replica.change_many(&batch)?;
        }
        for line in &acks {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
}

fn init_ops() -> BoxResult<Vec<Op>> {
    let ops = Op::list_from_json(
        r#"[{"op":"put","path":["counter"],"value":{"$counter":0}},
            {"op":"put","path":["keys"],"value":{}},
            {"op":"put","path":["items"],"value":[]},
            {"op":"put","path":["text"],"value":{"$text":""}}]"#,
    )
    // `ValueError` is not a `std::error::Error`: keep its message.
    .map_err(|e| e.0)?;
    Ok(ops)
}

/// The change that takes the counter to `n`.
fn write_ops(n: i64, list: bool, text: bool, text_len: usize) -> Vec<Op> {
    let mut ops = vec![
        Op::Increment {
            path: vec!["counter".into()],
            by: 1,
        },
        Op::Put {
            path: vec!["keys".into(), PathElem::Key(format!("k{n}"))],
            value: Value::Int(n),
        },
    ];
    if list {
        ops.push(Op::Insert {
            path: vec!["items".into(), PathElem::Index(-1)],
            value: Value::Int(n),
        });
    }
    if text {
        ops.push(Op::Splice {
            path: vec!["text".into()],
            index: text_len,
            delete: 0,
            text: format!("[{n}]"),
        });
    }
    ops
}

fn counter(replica: &mut Replica, doc: &DocId) -> BoxResult<i64> {
    replica
        .doc(doc)?
        .get_json(&["counter".into()])
        .and_then(|v| v.as_i64())
        .ok_or_else(|| format!("{doc} has no counter").into())
}

fn text_len(replica: &mut Replica, doc: &DocId) -> BoxResult<usize> {
    let text = replica.doc(doc)?.get_json(&["text".into()]);
    match text.as_ref().and_then(|v| v.as_str()) {
        Some(t) => Ok(t.chars().count()),
        None => Err(format!("{doc} has no text").into()),
    }
}
