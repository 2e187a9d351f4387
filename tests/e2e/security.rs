use serde_json::json;
use syncline_e2e::{Edge, Hub, until};

use crate::converged;

#[test]
fn grants_decide_who_connects_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub"), "127.0.0.1:0");
    let mk = |name: &str| {
        let data = dir.path().join(name);
        let key = Edge::init(&data, &[(&hub.addr, &hub.fingerprint)]);
        (data, key)
    };
    let (w_data, w_key) = mk("writer");
    let (ro_data, ro_key) = mk("reader-only");
    let (pub_data, pub_key) = mk("public-only");
    let (unk_data, _unknown) = mk("unknown");
    hub.grant(&w_key, "", "rw");
    hub.grant(&ro_key, "", "read");
    hub.grant(&pub_key, "public/", "rw");
    let writer = Edge::start(&w_data);
    let read_only = Edge::start(&ro_data);
    let public_only = Edge::start(&pub_data);
    let unknown = Edge::start(&unk_data);
    for e in [&writer, &read_only, &public_only, &unknown] {
        e.subscribe("").unwrap();
    }
    writer
        .change("secret/plans", json!([{"op":"put","path":["x"],"value":1}]))
        .unwrap();
    writer
        .change("public/news", json!([{"op":"put","path":["y"],"value":2}]))
        .unwrap();
    converged(&[&writer, &read_only, &public_only], "public/news", 30);
    converged(&[&writer, &read_only], "secret/plans", 30);
    // A key without read rights never receives the document.
    assert_eq!(public_only.get("secret/plans").unwrap(), None);
    // A read-only key's write is refused by the hub, and its app is told (status).
    read_only
        .change("public/news", json!([{"op":"put","path":["z"],"value":3}]))
        .unwrap();
    until("the refusal to reach the read-only edge", 30, || {
        (read_only.status().ok()?["rejected"].as_u64()? >= 1).then_some(())
    });
    // An unknown key is refused at the handshake: nothing reaches it.
    unknown
        .change("mine", json!([{"op":"put","path":["u"],"value":1}]))
        .unwrap();
    until("the hub to count the unknown key", 30, || {
        let (_, text) = hub.http("/metrics").ok()?;
        text.lines()
            .any(|l| l.starts_with("syncline_hub_rejects_total{reason=\"unknown_peer\"}"))
            .then_some(())
    });
    assert_eq!(unknown.get("public/news").unwrap(), None);
    assert_eq!(writer.get("mine").unwrap(), None);
}

#[test]
fn a_wrong_hub_fingerprint_makes_the_edge_refuse_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub"), "127.0.0.1:0");
    let mut fp = hub.fingerprint.clone();
    let flipped = if fp.starts_with('0') { "1" } else { "0" };
    fp.replace_range(0..1, flipped);
    let data = dir.path().join("edge");
    let key = Edge::init(&data, &[(&hub.addr, &fp)]);
    hub.grant(&key, "", "rw");
    let edge = Edge::start(&data);
    edge.change("d", json!([{"op":"put","path":["x"],"value":1}]))
        .unwrap();
    until("the edge to report the refused certificate", 30, || {
        let s = edge.status().ok()?;
        s["last_error"]
            .as_str()?
            .contains("fingerprint")
            .then_some(())
    });
    let s = edge.status().unwrap();
    assert_eq!(s["connected"], json!(false));
    assert_eq!(s["outbox"], json!(1));
}

#[test]
fn metrics_are_valid_prometheus_text_and_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub"), "127.0.0.1:0");
    let (code, _) = hub.http("/healthz").unwrap();
    assert_eq!(code, 200);
    let (code, text) = hub.http("/metrics").unwrap();
    assert_eq!(code, 200);
    let mut typed = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (name, kind) = (w.next().unwrap(), w.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {line:?}"));
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                typed.contains(name) || typed.contains(base),
                "sample before its TYPE: {line}"
            );
        }
    }
    assert!(typed.contains("syncline_hub_changes_stored_total"));
}

/// Starts `args` and waits (bounded) for it to exit; returns its code and stderr.
fn exits(bin: &str, args: &[&std::ffi::OsStr]) -> (i32, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(syncline_e2e::bin(bin))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = until(&format!("a second {bin} to give up"), 20, || {
        child.try_wait().ok().flatten()
    });
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code.code().unwrap_or(-1), err)
}

#[test]
fn a_second_process_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub"), "127.0.0.1:0");
    let (code, err) = exits(
        "syncline-hub",
        &[
            "run".as_ref(),
            "--data".as_ref(),
            hub.data.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("in use by another process"), "{err}");
    let data = dir.path().join("edge");
    Edge::init(&data, &[(&hub.addr, &hub.fingerprint)]);
    let edge = Edge::start(&data);
    let (code, err) = exits(
        "syncline-edge",
        &[
            "run".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--api".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("in use by another process"), "{err}");
    // The first ones still serve.
    assert_eq!(hub.http("/healthz").unwrap().0, 200);
    assert!(edge.status().is_ok());
}
