use std::process::Command;

use serde_json::{Value, json};
use syncline_e2e::{Edge, Hub, bin, run, until};

use crate::{cluster, converged};

fn hub_cmd(args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin("syncline-hub")).args(args))
}

fn acknowledged(edge: &Edge) {
    until("the hub to acknowledge the edge's writes", 30, || {
        let st = edge.status().ok()?;
        (st["outbox"] == json!(0)).then_some(())
    });
}

#[test]
fn a_hub_restored_from_an_older_backup_gets_the_later_writes_back_from_the_edges() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edges) = cluster(dir.path(), 3);
    let doc = "backup/restore";
    let write = |i: usize, key: &str| {
        let (code, body) = edges[i]
            .change(doc, json!([{"op":"put","path":[key],"value":i}]))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        acknowledged(&edges[i]);
    };
    write(0, "before");
    let data_dir = hub.data.clone();
    let data = data_dir.to_str().unwrap().to_owned();
    let full = dir.path().join("full.bak");
    let full = full.to_str().unwrap();

    // Online: the hub keeps serving.
    let (code, out, err) = hub_cmd(&["backup", "--data", &data, "--to", full]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote a full backup"), "{out}");
    assert!(
        err.contains("backup: ") && err.contains("(100%)"),
        "progress: {err}"
    );

    write(1, "between");
    let inc = dir.path().join("inc.bak");
    let inc = inc.to_str().unwrap();
    let (code, out, err) = hub_cmd(&[
        "backup", "--data", &data, "--to", inc, "--since", full, "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let info: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(info["kind"], json!("incremental"));
    assert!(info["changes"].as_u64().unwrap() >= 1, "{info}");
    // The last write is in no backup: only the edges hold it once the hub is restored.
    write(2, "after");

    let (code, out, err) = hub_cmd(&["verify", "--from", full, inc, "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["ok"], json!(true));
    assert!(report["changes"].as_u64().unwrap() >= 2, "{report}");

    // A running hub's store is not replaced.
    let (code, _, err) = hub_cmd(&["restore", "--from", full, "--data", &data, "--force"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stop the hub"), "{err}");

    // Stop the hub and go back to the backups: the full one and its increment hold the
    // first two writes, and the third is gone from the hub.
    let addr = hub.addr.clone();
    assert_eq!(hub.proc.terminate(30), 0);
    let (code, _, err) = hub_cmd(&["restore", "--from", full, inc, "--data", &data]);
    assert_eq!(code, 2, "without --force: {err}");
    assert!(err.contains("--force"), "{err}");
    let (code, out, err) = hub_cmd(&["restore", "--from", full, inc, "--data", &data, "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("new log epoch"), "{out}");
    let (code, out, err) = hub_cmd(&["show", "--data", &data, doc]);
    assert_eq!(code, 0, "{err}");
    let restored: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(restored["doc"], json!({"before": 0, "between": 1}));
    let hub = Hub::start(&data_dir, &addr);

    // The edges notice the new epoch and upload what the backups lack; a fresh edge then
    // finds every write at the hub. The edges' grants came back with the backup.
    let fresh = hub.follower(&dir.path().join("fresh"));
    let all: Vec<&Edge> = edges.iter().chain([&fresh]).collect();
    let state = converged(&all, doc, 60);
    assert_eq!(state, json!({"before": 0, "between": 1, "after": 2}));
}

#[test]
fn restore_and_verify_refuse_bad_files_with_exit_codes_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bak");
    std::fs::write(&junk, b"not a backup").unwrap();
    let junk = junk.to_str().unwrap();
    let (code, _, err) = hub_cmd(&["verify", "--from", junk]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a Syncline backup"), "{err}");
    let target = dir.path().join("hub");
    let (code, _, err) = hub_cmd(&[
        "restore",
        "--from",
        junk,
        "--data",
        target.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        !target.join("hub.db").exists(),
        "a refused restore leaves no store"
    );
    let (code, _, err) = hub_cmd(&["backup", "--data", target.to_str().unwrap(), "--to", junk]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn history_and_an_offline_checked_export_say_who_changed_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edges) = cluster(dir.path(), 1);
    let doc = "audit/board";
    for v in [1, 2, 3] {
        edges[0]
            .change(doc, json!([{"op":"put","path":["temp"],"value":v}]))
            .unwrap();
    }
    acknowledged(&edges[0]);
    let data = hub.data.to_str().unwrap().to_owned();

    let (code, out, err) = hub_cmd(&["history", "--data", &data, doc, "--json"]);
    assert_eq!(code, 0, "{err}");
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 3, "{out}");
    for (e, v) in entries.iter().zip([1, 2, 3]) {
        assert_eq!(e["author"], json!(edges[0].key), "{e}");
        assert_eq!(e["ops"][0]["key"], json!("temp"), "{e}");
        assert_eq!(e["ops"][0]["value"], json!(v), "{e}");
        // Stamped by the edge's clock when it was made (after 2020).
        assert!(e["time_ms"].as_i64().unwrap() > 1_577_836_800_000, "{e}");
    }
    let (code, out, _) = hub_cmd(&[
        "history", "--data", &data, doc, "--after", "0", "--limit", "1",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with('#') && out.contains("set temp = 1") && out.lines().count() == 1,
        "{out}"
    );

    let file = dir.path().join("board.jsonl");
    let file = file.to_str().unwrap();
    let (code, _, err) = hub_cmd(&["export", "--data", &data, doc, "--to", file]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = hub_cmd(&["verify-export", file, "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    let at_edge = edges[0].get(doc).unwrap().unwrap();
    assert_eq!(report["state"], at_edge["doc"]);
    assert_eq!(report["heads"], at_edge["heads"]);

    // One byte of one change altered: the line is named.
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
    let sig = v["signature"].as_str().unwrap();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    v["signature"] = json!(format!("{flipped}{}", &sig[1..]));
    lines[2] = v.to_string();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let (code, _, err) = hub_cmd(&["verify-export", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 3"), "{err}");
    // A bad document id is a usage error.
    let (code, _, err) = hub_cmd(&["history", "--data", &data, "bad//id"]);
    assert_eq!(code, 2, "{err}");

    // Time travel at the hub: at the first change's hash, and at its time.
    let first = entries[0]["hash"].as_str().unwrap();
    let (code, out, err) = hub_cmd(&["show", "--data", &data, doc, "--at", first]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["doc"], json!({"temp": 1}));
    assert_eq!(shown["heads"], json!([first]));
    let (_, out, _) = hub_cmd(&["show", "--data", &data, doc]);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["doc"],
        json!({"temp": 3})
    );
    let (code, _, err) = hub_cmd(&["show", "--data", &data, doc, "--at", "yesterday"]);
    assert_eq!(code, 2, "{err}");

    // The edge's own history and time travel, from its store.
    let path = format!(
        "/v1/docs/{}/history?after=1&limit=1",
        syncline_e2e::enc(doc)
    );
    let (status, body) = syncline_e2e::http(&edges[0].api, "GET", &path, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&h["total"], &h["next"]), (&json!(3), &json!(2)), "{h}");
    let change = &h["changes"][0];
    assert_eq!(change["index"], json!(2));
    assert_eq!(change["author"], json!(edges[0].key));
    assert_eq!(change["ops"][0]["value"], json!(2));
    assert_eq!(change["hash"], entries[1]["hash"]);
    // With the author's signature as the edge stores it: the one the hub holds (and
    // exported) for that change, checked when the edge signed it.
    let exported = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["hash"] == change["hash"])
        .unwrap();
    assert_eq!(change["signature"], exported["signature"], "{change}");
    assert_eq!(change["signature_checked"], json!(true), "{change}");
    let at = |q: &str| {
        let path = format!("/v1/docs/{}?at={q}", syncline_e2e::enc(doc));
        let (status, body) = syncline_e2e::http(&edges[0].api, "GET", &path, None).unwrap();
        (status, serde_json::from_str::<Value>(&body).unwrap())
    };
    assert_eq!(at(first).1["doc"], json!({"temp": 1}));
    let time = |i: usize| entries[i]["time_ms"].as_i64().unwrap();
    assert_eq!(
        at(&(time(0) - 1).to_string()).1["doc"],
        json!({}),
        "before the first"
    );
    // Writes in the same millisecond share a time: at the second's time, the third is there
    // too only if it was made in the same millisecond.
    let expected = if time(2) == time(1) { 3 } else { 2 };
    let (status, v) = at(&time(1).to_string());
    assert_eq!(
        (status, &v["doc"]),
        (200, &json!({"temp": expected})),
        "{v}"
    );
    let (status, v) = at("not-a-time");
    assert_eq!((status, v["code"].as_str()), (400, Some("bad_at")), "{v}");
    let (status, v) = at(&"ab".repeat(32));
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_operation")),
        "{v}"
    );
}

/// A hub's data directory put back by hand (copied with the hub stopped, as a disk snapshot
/// would be): same epoch, a shorter log, and a new edge's writes grow it past where the
/// other edges had read before they reconnect. The writer notices (the change at the
/// position of its last acknowledged write is another one), repairs by heads, and gives the
/// lost write back; every edge gets the new writes.
#[test]
fn edges_notice_a_data_directory_put_back_by_hand_after_the_log_grew_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut edges) = cluster(dir.path(), 2);
    let doc = "rollback/by-hand";
    edges[0]
        .change(doc, json!([{"op":"put","path":["before"],"value":1}]))
        .unwrap();
    acknowledged(&edges[0]);
    converged(&[&edges[0], &edges[1]], doc, 60);

    let (addr, data) = (hub.addr.clone(), hub.data.clone());
    let copy = dir.path().join("hub-copy");
    assert_eq!(hub.proc.terminate(30), 0);
    let (code, _, err) = run(Command::new("cp").arg("-a").arg(&data).arg(&copy));
    assert_eq!(code, 0, "{err}");
    let hub = Hub::start(&data, &addr);

    // The reader stops; the writer writes again and the hub acknowledges it: only the
    // writer holds that write when the directory goes back (the hub never sends a writer
    // its own changes, so the writer's cursor says nothing of it).
    edges[1].kill9();
    edges[0]
        .change(doc, json!([{"op":"put","path":["lost"],"value":2}]))
        .unwrap();
    acknowledged(&edges[0]);
    edges[0].kill9();
    assert_eq!(hub.proc.terminate(30), 0);
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&copy, &data).unwrap();
    let hub = Hub::start(&data, &addr);

    // A new edge writes while the others are away: the log grows past their cursors.
    let third = hub.follower(&dir.path().join("edge2"));
    for i in 0..5 {
        third
            .change(
                doc,
                json!([{"op":"put","path":[format!("after{i}")],"value":i}]),
            )
            .unwrap();
    }
    acknowledged(&third);
    for e in &mut edges {
        e.restart();
    }
    let state = converged(&[&edges[0], &edges[1], &third], doc, 60);
    assert_eq!(
        state,
        json!({"before": 1, "lost": 2, "after0": 0, "after1": 1, "after2": 2, "after3": 3, "after4": 4})
    );
    let rewritten = hub
        .metric("syncline_hub_cursor_rewritten_total")
        .unwrap_or(0);
    assert!(rewritten >= 1, "{rewritten}");
}
