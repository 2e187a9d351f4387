//! The daemon's life: durability across kill -9, graceful stop on SIGTERM.

use serde_json::json;

use crate::harness::*;

#[test]
fn an_acknowledged_write_survives_kill_9() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let mut heads = Vec::new();
    for i in 0..5 {
        let (status, v) = d.post(
            "/v1/docs/sensors%2Ft1/changes",
            &format!(r#"{{"ops":[{{"op":"put","path":["v{i}"],"value":{i}}}]}}"#),
        );
        assert_eq!(status, 200, "{v}");
        heads = v["heads"].as_array().unwrap().clone();
    }
    d.kill_hard();

    let d = Daemon::start(&dir);
    let (status, v) = d.get("/v1/docs/sensors%2Ft1");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["doc"],
        json!({"v0": 0, "v1": 1, "v2": 2, "v3": 3, "v4": 4})
    );
    assert_eq!(v["heads"], json!(heads));
    assert_eq!(d.get("/v1/status").1["outbox"], json!(5), "still to upload");
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_daemon_cleanly_even_with_an_open_event_stream() {
    let (_tmp, dir) = offline_dir();
    let mut d = Daemon::start(&dir);
    let _events = EventStream::open(&d.addr, "/v1/docs/x/events");
    assert!(dir.join("api.addr").exists());
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = d.wait_exit();
    assert!(status.success(), "{status:?}; log:\n{}", log_of(&dir));
    assert!(!dir.join("api.addr").exists());
    assert!(log_of(&dir).contains("stopped"));
}

#[test]
#[cfg(feature = "encryption")] // the default; a build without it refuses db_key_file
fn an_encrypted_store_is_unreadable_on_disk_and_the_daemon_needs_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("edge");
    let key_file = tmp.path().join("keys").join("edge.key");
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    // `init` of an offline node with a store key file.
    let init_keyed = |key: &std::path::Path| {
        edge(&[
            "init",
            "--data",
            dir.to_str().unwrap(),
            "--hub",
            &closed_port(),
            "--hub-fingerprint",
            &some_fingerprint(),
            "--db-key-file",
            key.to_str().unwrap(),
        ])
    };
    let out = init_keyed(&key_file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim().len(), 64);
    let marker = "gateway-secret-7d41";
    let d = Daemon::start(&dir);
    let (status, v) = d.post(
        "/v1/docs/vault/changes",
        &format!(r#"{{"ops":[{{"op":"put","path":["pin"],"value":"{marker}"}}]}}"#),
    );
    assert_eq!(status, 200, "{v}");
    d.kill_hard();
    for f in ["edge.db", "edge.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{f} holds the plaintext"
            );
        }
    }
    // With its key the store reopens with the write.
    let d = Daemon::start(&dir);
    assert_eq!(d.get("/v1/docs/vault").1["doc"], json!({"pin": marker}));
    d.kill_hard();
    // Another key does not open it: the daemon exits with what is wrong.
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
    let out = edge(&[
        "run",
        "--data",
        dir.to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open the store"), "{err}");
    // An existing store is not re-keyed by init.
    let out = init_keyed(&tmp.path().join("other.key"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!tmp.path().join("other.key").exists(), "nothing written");
}

#[test]
fn a_bounded_store_refuses_writes_when_full_keeps_what_it_has_and_resumes_when_raised() {
    let (_tmp, dir) = offline_dir();
    let config = dir.join("edge.toml");
    let with_limit = |mb: u64| {
        let text = std::fs::read_to_string(&config).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("max_store_mb"))
            .collect();
        std::fs::write(
            &config,
            format!("max_store_mb = {mb}\n{}\n", kept.join("\n")),
        )
        .unwrap();
    };
    with_limit(1);
    let d = Daemon::start(&dir);
    let big = "x".repeat(50_000);
    let mut acked = 0;
    let mut full = None;
    for i in 0..200 {
        let (status, v) = d.post(
            "/v1/docs/bulk/changes",
            &format!(r#"{{"ops":[{{"op":"put","path":["k{i}"],"value":"{big}"}}]}}"#),
        );
        match status {
            200 => acked += 1,
            507 => {
                full = Some(v);
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let v = full.expect("the 1 MiB store filled up within 200 writes of 50 KB");
    assert_eq!(v["code"], json!("storage_full"), "{v}");
    assert!(acked > 3, "some writes fit: {acked}");
    // Everything acknowledged is there; reads still work.
    let (status, doc) = d.get("/v1/docs/bulk");
    assert_eq!(status, 200);
    assert_eq!(doc["doc"].as_object().unwrap().len(), acked);
    d.kill_hard();
    // A larger bound: the store opens with every acknowledged write, and writing resumes.
    with_limit(16);
    let d = Daemon::start(&dir);
    assert_eq!(
        d.get("/v1/docs/bulk").1["doc"].as_object().unwrap().len(),
        acked
    );
    let (status, v) = d.post(
        "/v1/docs/bulk/changes",
        r#"{"ops":[{"op":"put","path":["after"],"value":1}]}"#,
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn the_document_cache_holds_at_most_max_cached_docs_and_every_document_reads_back_whole() {
    let (_tmp, dir) = offline_dir();
    let config = dir.join("edge.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("max_cached_docs = 3\n{text}")).unwrap();
    let d = Daemon::start(&dir);
    for i in 0..8 {
        let (status, v) = d.post(
            &format!("/v1/docs/cache{i}/changes"),
            &format!(r#"{{"ops":[{{"op":"put","path":["n"],"value":{i}}}]}}"#),
        );
        assert_eq!(status, 200, "{v}");
        let (_, st) = d.get("/v1/status");
        assert!(st["cached_docs"].as_u64().unwrap() <= 3, "{st}");
    }
    // Dropped documents load again from the store, whole; a write to one goes on from it.
    for i in 0..8 {
        let (status, v) = d.get(&format!("/v1/docs/cache{i}"));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["doc"]["n"], serde_json::json!(i), "{v}");
        let (_, st) = d.get("/v1/status");
        assert!(
            st["cached_docs"].as_u64().unwrap() <= 3,
            "reads alone: {st}"
        );
    }
    let (status, v) = d.post(
        "/v1/docs/cache0/changes",
        r#"{"ops":[{"op":"put","path":["m"],"value":1}]}"#,
    );
    assert_eq!(status, 200, "{v}");
    let (_, v) = d.get("/v1/docs/cache0");
    assert_eq!(v["doc"], serde_json::json!({"n": 0, "m": 1}));
    let (_, st) = d.get("/v1/status");
    assert!(st["cached_docs"].as_u64().unwrap() <= 3, "{st}");
}
