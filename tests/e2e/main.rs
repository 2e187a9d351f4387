//! End-to-end: the real `syncline-hub` and `syncline-edge` processes on 127.0.0.1, killed and
//! restarted with real signals.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

mod backup;
mod faults;
mod hostile;
mod nemesis;
mod peering;
mod postgres;
mod replication;
mod rolling;
mod security;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread::JoinHandle;

use serde_json::{Value, json};
use syncline_e2e::{Edge, Hub, until};

/// A writer thread: increments `key` of `doc` through an edge's API until stopped, a few
/// milliseconds apart; counts the acknowledged increments.
pub fn writer(
    api: String,
    doc: &'static str,
    key: String,
) -> (Arc<AtomicBool>, Arc<AtomicI64>, JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI64::new(0));
    let (s, a) = (stop.clone(), acked.clone());
    let t = std::thread::spawn(move || {
        let e = Edge {
            proc: None,
            data: Default::default(),
            api,
            key: String::new(),
        };
        while !s.load(Ordering::Relaxed) {
            if let Ok((200, _)) = e.change(doc, json!([{"op":"increment","path":[&key],"by":1}])) {
                a.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    (stop, acked, t)
}

/// A hub and `n` edges granted rw on everything and following everything.
pub fn cluster(dir: &std::path::Path, n: usize) -> (Hub, Vec<Edge>) {
    let hub = Hub::start(&dir.join("hub"), "127.0.0.1:0");
    let edges = (0..n)
        .map(|i| hub.follower(&dir.join(format!("edge{i}"))))
        .collect();
    (hub, edges)
}

/// Waits until every edge holds `doc` with the same heads and JSON; returns the JSON.
pub fn converged(edges: &[&Edge], doc: &str, secs: u64) -> Value {
    until(
        &format!("{doc} to converge on {} edges", edges.len()),
        secs,
        || {
            let views: Vec<Value> = edges
                .iter()
                .filter_map(|e| e.get(doc).ok().flatten())
                .collect();
            (views.len() == edges.len() && views.windows(2).all(|w| w[0] == w[1]))
                .then(|| views[0]["doc"].clone())
        },
    )
}
