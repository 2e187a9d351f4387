//! Replays the fuzzers' corpora (`fuzz/corpus/TARGET/*`: the seeds, and every input that
//! once failed, kept under `fuzz/corpus/TARGET/regressions/`) through the same target bodies
//! the `cargo fuzz` targets run, on the stable toolchain: what fuzzing found stays fixed.
//!
//! `SYNCLINE_WRITE_FUZZ_SEEDS=1 cargo test -p syncline-core --test integration fuzz` writes
//! the generated seed files again.

use std::path::{Path, PathBuf};

use syncline_core::fuzzing;
use syncline_core::wire::FrameDecoder;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("wire", fuzzing::wire),
    ("verify", fuzzing::verify),
    ("hub_session", fuzzing::hub_session),
    ("replica_session", fuzzing::replica_session),
    ("ops", fuzzing::ops),
    ("apply", fuzzing::apply),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A generated seed: target, name, bytes, and whether every run makes the same bytes (the
/// hub's side of a session carries its new store's random epoch).
type Seed = (&'static str, &'static str, Vec<u8>, bool);

/// The generated seeds: what an honest session sends each way, and small valid inputs.
fn seeds() -> Vec<Seed> {
    let (to_hub, to_replica) = fuzzing::session_seeds();
    let after_handshake = |s: &[u8]| {
        let mut v = s.to_vec();
        v[0] = 1;
        v
    };
    let mut wire_whole = vec![7u8];
    wire_whole.extend_from_slice(&to_hub[1..]);
    let ops: &[&str] = &[
        r#"[{"op":"put","path":["t"],"value":21.5}]"#,
        r#"{"ops":[{"op":"put","path":["c"],"value":{"$counter":0}},{"op":"increment","path":["c"],"by":2}]}"#,
        r#"[{"op":"put","path":["l"],"value":[]},{"op":"insert","path":["l",-1],"value":"a"},{"op":"delete","path":["l",0]}]"#,
        r#"[{"op":"put","path":["s"],"value":{"$text":"hi"}},{"op":"splice","path":["s"],"index":1,"delete":1,"text":"ey"}]"#,
        r#"[{"op":"put","path":["m","k"],"value":{"$bytes":"AAE="}},{"op":"put","path":["ts"],"value":{"$timestamp":1}}]"#,
    ];
    let mut out = vec![
        ("hub_session", "honest-from-hello", to_hub.clone(), true),
        (
            "hub_session",
            "honest-after-handshake",
            after_handshake(&to_hub),
            true,
        ),
        (
            "replica_session",
            "honest-from-hello",
            to_replica.clone(),
            false,
        ),
        (
            "replica_session",
            "honest-after-handshake",
            after_handshake(&to_replica),
            false,
        ),
        ("wire", "session-to-hub", wire_whole, true),
        (
            "wire",
            "session-to-replica",
            to_replica[1..].to_vec(),
            false,
        ),
        ("verify", "valid-change", vec![1], true),
        ("verify", "flipped-signature", vec![1, 0x80], true),
        ("verify", "other-document", vec![3], true),
        ("apply", "honest-next-changes", fuzzing::apply_seed(), true),
    ];
    for (i, o) in ops.iter().enumerate() {
        let name = ["put", "counter", "list", "text", "bytes"][i];
        out.push(("ops", name, o.as_bytes().to_vec(), true));
    }
    out
}

#[test]
fn the_seed_sessions_hold_a_whole_honest_sync() {
    let (to_hub, to_replica) = fuzzing::session_seeds();
    let kinds = |bytes: &[u8]| {
        let mut d = FrameDecoder::new();
        d.extend(bytes);
        let mut k = Vec::new();
        while let Ok(Some(m)) = d.next_message() {
            k.push(m.kind());
        }
        k
    };
    let up = kinds(&to_hub[1..]);
    for want in ["Hello", "Auth", "Subscribe", "Push"] {
        assert!(up.contains(&want), "{want} missing from {up:?}");
    }
    let down = kinds(&to_replica[1..]);
    for want in ["Hello", "Auth", "AckAt"] {
        assert!(down.contains(&want), "{want} missing from {down:?}");
    }
    // The replica's side of the recording is exact: the same bytes every time (identities,
    // nonces and clocks are fixed), so the committed seed stays a valid handshake. The hub's
    // side carries the epoch of its new store, drawn at random; the recording is a valid
    // session all the same.
    assert_eq!(fuzzing::session_seeds().0, to_hub);
}

#[test]
fn fuzz_corpora_and_regressions_replay_without_a_failure() {
    let write = std::env::var_os("SYNCLINE_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes, exact) in seeds() {
        let path = corpus(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(corpus(target)).unwrap();
            if exact || !path.exists() {
                std::fs::write(&path, &bytes).unwrap();
            }
        } else if exact {
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert_eq!(
                on_disk,
                bytes,
                "{} is stale: regenerate with SYNCLINE_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        } else {
            assert!(path.exists(), "{} is missing", path.display());
        }
    }
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let inputs = files(&corpus(target));
        assert!(!inputs.is_empty(), "no corpus for {target}");
        for input in inputs {
            let bytes = std::fs::read(&input).unwrap();
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                panic!("{target} fails on {}", input.display());
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} corpus inputs");
}
