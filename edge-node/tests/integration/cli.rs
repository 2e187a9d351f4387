//! The CLI front against a running daemon.

use serde_json::{Value, json};

use crate::harness::*;

fn ok(args: &[&str]) -> Value {
    let out = edge(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn get_put_status_subscribe_and_docs_work_against_the_daemon() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let data = dir.to_str().unwrap();
    let api = d.addr.as_str();

    let v = ok(&[
        "put",
        "sites/berlin",
        "--api",
        api,
        "--ops",
        r#"[{"op":"put","path":["stock"],"value":{"$counter":3}}]"#,
    ]);
    assert_eq!(v["heads"].as_array().unwrap().len(), 1);
    // The address is read from the data directory.
    ok(&[
        "put",
        "sites/berlin",
        "--data",
        data,
        "site",
        r#"{"name":"Berlin"}"#,
    ]);
    ok(&["put", "sites/berlin", "--data", data, "site.city", "Berlin"]);
    ok(&["put", "sites/berlin", "--data", data, r#"["temp"]"#, "21.5"]);
    let v = ok(&["get", "sites/berlin", "--data", data]);
    assert_eq!(
        v["doc"],
        json!({"stock": 3, "site": {"name": "Berlin", "city": "Berlin"}, "temp": 21.5})
    );
    let v = ok(&["status", "--api", api]);
    assert_eq!(v["outbox"], json!(4));
    assert_eq!(v["public_key"], json!(d.key));
    let v = ok(&["subscribe", "sites/", "--api", api]);
    assert_eq!(v, json!({"subscribed": {"prefix": "sites/"}}));
    let v = ok(&["docs", "--api", api]);
    assert_eq!(v, json!({"docs": ["sites/berlin"]}));

    // Errors: a message on stderr and a failure status.
    let out = edge(&["get", "sites/none", "--api", api]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not held"),
        "{out:?}"
    );
    let out = edge(&["put", "bad//id", "--api", api, "a", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid document id"),
        "{out:?}"
    );
    let out = edge(&["status", "--api", &closed_port_tcp()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{out:?}"
    );
}

#[test]
fn watch_prints_events_as_json_lines() {
    use std::io::{BufRead as _, BufReader};

    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let mut watch = std::process::Command::new(BIN)
        .args(["watch", "w", "--api", &d.addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream may not be open yet when the first write lands: write until one arrives.
    // Each write puts a new value: writing the same value again is no change, and no event.
    let mut line = None;
    let mut n = 0;
    until("watch to print an event", || {
        n += 1;
        let (status, _) = d.post(
            "/v1/docs/w/changes",
            &format!(r#"{{"ops":[{{"op":"put","path":["x"],"value":{n}}}]}}"#),
        );
        assert_eq!(status, 200);
        line = rx.recv_timeout(std::time::Duration::from_millis(200)).ok();
        line.is_some()
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(event["doc"], json!("w"));
    assert_eq!(event["origin"], json!("local"));
}

fn closed_port_tcp() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}
