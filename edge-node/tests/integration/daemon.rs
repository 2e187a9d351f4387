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
