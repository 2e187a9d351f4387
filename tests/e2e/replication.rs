use serde_json::json;
use syncline_e2e::{Edge, until};

use crate::{cluster, converged};

#[test]
fn three_edges_writing_concurrently_converge_and_counters_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, edges) = cluster(dir.path(), 3);
    let doc = "sites/berlin/inventory";
    // Each edge owns its counter (concurrent creation of one counter key would conflict).
    for (i, e) in edges.iter().enumerate() {
        let (code, body) = e
            .change(
                doc,
                json!([{"op":"put","path":[format!("c{i}")],"value":{"$counter":0}}]),
            )
            .unwrap();
        assert_eq!(code, 200, "{body}");
    }
    let threads: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let api = e.api.clone();
            std::thread::spawn(move || {
                let e = Edge {
                    proc: None,
                    data: Default::default(),
                    api,
                    key: String::new(),
                };
                let mut acked = 0;
                for n in 0..30 {
                    let ops = json!([
                        {"op":"increment","path":[format!("c{i}")],"by":2},
                        {"op":"put","path":[format!("k{i}_{n}")],"value":n}
                    ]);
                    if let Ok((200, _)) = e.change(doc, ops) {
                        acked += 1;
                    }
                }
                acked
            })
        })
        .collect();
    let acked: Vec<i64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let refs: Vec<&Edge> = edges.iter().collect();
    let state = converged(&refs, doc, 60);
    for (i, a) in acked.iter().enumerate() {
        assert_eq!(
            state[format!("c{i}")],
            json!(a * 2),
            "counter c{i} in {state}"
        );
    }
    assert_eq!(state.as_object().unwrap().len(), 3 + 90);
}

#[test]
fn an_edge_that_was_offline_catches_up_and_uploads_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, mut edges) = cluster(dir.path(), 2);
    let doc = "plant/line1";
    edges[0]
        .change(
            doc,
            json!([{"op":"put","path":["a"],"value":{"$counter":0}}]),
        )
        .unwrap();
    converged(&[&edges[0], &edges[1]], doc, 30);
    // Edge 1 goes down; both keep writing.
    edges[1].kill9();
    for _ in 0..10 {
        assert_eq!(
            edges[0]
                .change(doc, json!([{"op":"increment","path":["a"],"by":1}]))
                .unwrap()
                .0,
            200
        );
    }
    edges[1].restart();
    for _ in 0..5 {
        assert_eq!(
            edges[1]
                .change(doc, json!([{"op":"increment","path":["a"],"by":10}]))
                .unwrap()
                .0,
            200
        );
    }
    let state = converged(&[&edges[0], &edges[1]], doc, 30);
    assert_eq!(state["a"], json!(60));
    until("edge 1's outbox to drain", 30, || {
        (edges[1].status().ok()?["outbox"] == json!(0)).then_some(())
    });
}
