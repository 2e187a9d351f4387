//! The HTTP API of a daemon with no hub reachable.

use serde_json::json;

use crate::harness::*;

#[test]
fn offline_writes_are_acknowledged_read_back_and_wait_in_the_outbox() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);

    let (status, v) = d.get("/v1/docs");
    assert_eq!((status, v), (200, json!({"docs": []})));

    let (status, v) = d.post(
        "/v1/docs/sites%2Fberlin/changes",
        r#"{"ops":[
            {"op":"put","path":["stock"],"value":{"$counter":10}},
            {"op":"put","path":["name"],"value":{"$text":"Berlin"}},
            {"op":"put","path":["items"],"value":[]},
            {"op":"insert","path":["items",-1],"value":"bolt"},
            {"op":"put","path":["at"],"value":{"$timestamp":1700000000000}},
            {"op":"put","path":["raw"],"value":{"$bytes":"AAE="}}
        ]}"#,
    );
    assert_eq!(status, 200, "{v}");
    let heads = v["heads"].as_array().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].as_str().unwrap().len(), 64);

    let (status, v) = d.post(
        "/v1/docs/sites%2Fberlin/changes",
        r#"{"ops":[
            {"op":"increment","path":["stock"],"by":-3},
            {"op":"splice","path":["name"],"index":6,"delete":0,"text":" Mitte"},
            {"op":"delete","path":["raw"]}
        ]}"#,
    );
    assert_eq!(status, 200, "{v}");
    let heads = v["heads"].clone();

    let (status, v) = d.get("/v1/docs/sites%2Fberlin");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["doc"],
        json!({"stock": 7, "name": "Berlin Mitte", "items": ["bolt"], "at": 1700000000000i64})
    );
    assert_eq!(v["heads"], heads);
    assert_eq!(d.get("/v1/docs").1, json!({"docs": ["sites/berlin"]}));

    let (status, v) = d.get("/v1/status");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["public_key"], json!(d.key));
    assert_eq!(v["outbox"], json!(2));
    assert_eq!(v["rejected"], json!(0));
    assert_eq!(v["connected"], json!(false));
    assert_eq!(v["hub"], json!(null));
    assert!(
        v["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("sites/berlin")),
        "a replica follows what it writes: {v}"
    );
    until("a failed connection attempt to be reported", || {
        !d.get("/v1/status").1["last_error"].is_null()
    });
}

/// Method, path, body (content type, text), expected status and error code.
type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, u16, &'a str);

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let (status, _) = d.post(
        "/v1/docs/doc/changes",
        r#"{"ops":[{"op":"put","path":["n"],"value":{"$counter":1}}]}"#,
    );
    assert_eq!(status, 200);
    let before = d.get("/v1/docs/doc").1;

    let cases: Vec<Case> = vec![
        ("GET", "/v1/docs/a%2F%2Fb", None, 400, "invalid_doc_id"),
        ("GET", "/v1/docs/..", None, 400, "invalid_doc_id"),
        ("GET", "/v1/docs/a%20b", None, 400, "invalid_doc_id"),
        ("GET", "/v1/docs/bad%FFutf8", None, 400, "invalid_doc_id"),
        ("GET", "/v1/docs/bad%zzpct", None, 400, "invalid_doc_id"),
        (
            "GET",
            "/v1/docs/nothing%2Fhere",
            None,
            404,
            "unknown_document",
        ),
        ("GET", "/v1/docs/sites/berlin", None, 404, "not_found"),
        ("DELETE", "/v1/docs/doc", None, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/docs/doc/changes",
            Some(("application/json", "{\"ops\": [")),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/docs/doc/changes",
            Some((
                "application/json",
                r#"{"ops":[{"op":"frobnicate","path":["n"]}]}"#,
            )),
            400,
            "invalid_operation",
        ),
        (
            "POST",
            "/v1/docs/doc/changes",
            Some((
                "application/json",
                r#"{"ops":[{"op":"put","path":["n"],"value":{"$nope":1}}]}"#,
            )),
            400,
            "invalid_operation",
        ),
        (
            "POST",
            "/v1/docs/doc/changes",
            Some(("application/json", r#"{"ops":[]}"#)),
            400,
            "invalid_operation",
        ),
        (
            // The first op is fine, the second fails: nothing is applied.
            "POST",
            "/v1/docs/doc/changes",
            Some((
                "application/json",
                r#"{"ops":[{"op":"increment","path":["n"],"by":5},
                          {"op":"increment","path":["missing","deep"],"by":1}]}"#,
            )),
            400,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/docs/doc/changes",
            Some((
                "text/plain",
                r#"{"ops":[{"op":"increment","path":["n"],"by":5}]}"#,
            )),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/docs/a%2F/changes",
            Some((
                "application/json",
                r#"{"ops":[{"op":"put","path":["x"],"value":1}]}"#,
            )),
            400,
            "invalid_doc_id",
        ),
        (
            "POST",
            "/v1/subscriptions",
            Some(("application/json", r#"{"prefix":"a","doc":"b"}"#)),
            400,
            "invalid_subscription",
        ),
        (
            "POST",
            "/v1/subscriptions",
            Some(("application/json", r#"{"topic":"a"}"#)),
            400,
            "invalid_subscription",
        ),
        (
            "POST",
            "/v1/subscriptions",
            Some(("application/json", r#"{"prefix":"a//"}"#)),
            400,
            "invalid_doc_id",
        ),
    ];
    for (method, path, body, want_status, want_code) in cases {
        let (status, v) = http(&d.addr, method, path, body);
        assert_eq!(status, want_status, "{method} {path}: {v}");
        assert_eq!(v["code"], json!(want_code), "{method} {path}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {v}"
        );
    }
    assert_eq!(d.get("/v1/docs/doc").1, before, "nothing was half-applied");
    assert_eq!(d.get("/v1/status").1["outbox"], json!(1));
    assert_eq!(d.get("/v1/docs").1, json!({"docs": ["doc"]}));
}

#[test]
fn subscriptions_are_recorded() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let (status, v) = d.post("/v1/subscriptions", r#"{"prefix":"sites/"}"#);
    assert_eq!(
        (status, v),
        (200, json!({"subscribed": {"prefix": "sites/"}}))
    );
    let (status, v) = d.post("/v1/subscriptions", r#"{"prefix":""}"#);
    assert_eq!((status, v), (200, json!({"subscribed": {"prefix": ""}})));
    let (status, v) = d.post("/v1/subscriptions", r#"{"doc":"x/y"}"#);
    assert_eq!((status, v), (200, json!({"subscribed": {"doc": "x/y"}})));
    let subs = d.get("/v1/status").1["subscriptions"].clone();
    assert_eq!(subs.as_array().unwrap().len(), 3, "{subs}");
}

#[test]
fn the_event_stream_delivers_a_local_change() {
    let (_tmp, dir) = offline_dir();
    let d = Daemon::start(&dir);
    let mut events = EventStream::open(&d.addr, "/v1/docs/sites%2Foslo/events");
    // A change to another document is not sent on this stream.
    let (status, _) = d.post(
        "/v1/docs/other/changes",
        r#"{"ops":[{"op":"put","path":["a"],"value":1}]}"#,
    );
    assert_eq!(status, 200);
    let (status, v) = d.post(
        "/v1/docs/sites%2Foslo/changes",
        r#"{"ops":[{"op":"put","path":["temp"],"value":21.5}]}"#,
    );
    assert_eq!(status, 200);
    let head = v["heads"][0].as_str().unwrap().to_owned();
    events.wait_for(&head);
    let data = events
        .text
        .lines()
        .find(|l| l.starts_with("data:") && l.contains(&head))
        .unwrap();
    let event: serde_json::Value =
        serde_json::from_str(data.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(event["doc"], json!("sites/oslo"));
    assert_eq!(event["origin"], json!("local"));
    assert_eq!(event["heads"], json!([head]));
    assert_eq!(
        event["patches"],
        json!([{"path": ["temp"], "action": "put"}])
    );
    assert!(events.text.contains("event: change"), "{}", events.text);
    assert!(!events.text.contains("\"other\""), "{}", events.text);
}
