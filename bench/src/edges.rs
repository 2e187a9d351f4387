//! Fan-out through real `syncline-edge` processes: each replica is a gateway daemon, written
//! to through its HTTP API (`POST /v1/docs/{id}/changes`) and watched through its event
//! stream (`GET /v1/docs/{id}/events`, server-sent events), as an app on the gateway would.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::fleet::now_us;
use crate::procs::{Bins, CpuClock, Hub, Proc, request};
use crate::workloads::{Fanout, Latency};

struct Edge {
    proc: Proc,
    api: String,
}

/// Initializes, grants and starts `n` edges connected to `hub`, subscribed to `doc`.
fn start_edges(bins: &Bins, hub: &Hub, dir: &Path, n: usize, doc: &str) -> Result<Vec<Edge>> {
    let edge_bin = bins.path("syncline-edge")?;
    let hub_bin = bins.path("syncline-hub")?;
    let mut edges = Vec::with_capacity(n);
    for i in 0..n {
        let data = dir.join(format!("edge-{i}"));
        let out = Command::new(&edge_bin)
            .args(["init", "--json", "--data"])
            .arg(&data)
            .args(["--hub", &hub.addr, "--hub-fingerprint", &hub.fingerprint])
            .output()?;
        ensure!(
            out.status.success(),
            "edge init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let key = v["public_key"].as_str().context("edge key")?;
        let ok = Command::new(&hub_bin)
            .args(["grant", "--data"])
            .arg(&hub.data)
            .args([key, "", "rw"])
            .stdout(std::process::Stdio::null())
            .status()?;
        ensure!(ok.success(), "granting edge {i}");
        let mut proc = Proc::spawn(
            Command::new(&edge_bin)
                .args(["run", "--api", "127.0.0.1:0", "--data"])
                .arg(&data),
        )?;
        let line = proc.line_starting("api on ", Duration::from_secs(30))?;
        let api = line
            .split_whitespace()
            .nth(2)
            .context("api address")?
            .to_string();
        let (code, body) = request(
            &api,
            "POST",
            "/v1/subscriptions",
            Some(&json!({ "doc": doc }).to_string()),
        )?;
        ensure!(code == 200, "subscribing edge {i}: {code} {body}");
        edges.push(Edge { proc, api });
    }
    Ok(edges)
}

/// Follows an edge's event stream on a thread; every remote put's latency goes to `samples`.
fn watch(api: String, doc: &str, samples: Arc<Mutex<Vec<f64>>>) -> Result<()> {
    let mut s = TcpStream::connect(&api)?;
    let path = format!("/v1/docs/{}/events", doc.replace('/', "%2F"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut lines = BufReader::new(s);
    // Wait for the stream's first comment: from then on every change is sent.
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            bail!("the event stream of {api} ended before it started");
        }
        if line.starts_with(':') {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some(data) = line.strip_prefix("data:")
                && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                && v["origin"] == "remote"
            {
                let now = now_us();
                let got: Vec<f64> = v["patches"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["path"][0].as_str())
                    .filter_map(|k| k.rsplit('_').next()?.parse::<u64>().ok())
                    .map(|t| now.saturating_sub(t) as f64 / 1000.0)
                    .collect();
                if let Ok(mut s) = samples.lock() {
                    s.extend(got);
                }
            }
            line.clear();
        }
    });
    Ok(())
}

/// C `syncline-edge` processes on one document, each written to M times through its API,
/// at `rate` changes/s each (spread over the period) or as fast as the API answers.
pub fn fanout(
    bins: &Bins,
    hub: &Hub,
    dir: &Path,
    clients: usize,
    per_client: usize,
    rate: Option<f64>,
    within: Duration,
) -> Result<Fanout> {
    let doc = "bench/edges";
    let edges = start_edges(bins, hub, dir, clients, doc)?;
    let deadline = Instant::now() + within;
    for e in &edges {
        loop {
            let (_, body) = request(&e.api, "GET", "/v1/status", None)?;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["connected"] == json!(true)
                && v["synced"].as_array().is_some_and(|s| !s.is_empty())
            {
                break;
            }
            ensure!(Instant::now() < deadline, "edge {} did not connect", e.api);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    for e in &edges {
        watch(e.api.clone(), doc, samples.clone())?;
    }
    let path = format!("/v1/docs/{}/changes", doc.replace('/', "%2F"));
    let mut pids: Vec<u32> = edges.iter().map(|e| e.proc.pid()).collect();
    pids.push(hub.proc.pid());
    let cpu = CpuClock::new(pids);
    let cpu_before = cpu.seconds()?;
    let start = Instant::now();
    let writers: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(c, e)| {
            let (api, path) = (e.api.clone(), path.clone());
            std::thread::spawn(move || -> Result<()> {
                for i in 0..per_client {
                    if let Some(rate) = rate {
                        let offset = c as f64 / clients as f64;
                        let at = start + Duration::from_secs_f64((i as f64 + offset) / rate);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    }
                    let key = format!("w{c}_{i}_{}", now_us());
                    let body = json!({"ops": [{"op": "put", "path": [key], "value": 1}]});
                    let (code, resp) = request(&api, "POST", &path, Some(&body.to_string()))?;
                    ensure!(code == 200, "write refused: {code} {resp}");
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let total = clients * per_client;
    let doc_path = format!("/v1/docs/{}", doc.replace('/', "%2F"));
    for e in &edges {
        loop {
            let (_, body) = request(&e.api, "GET", &doc_path, None)?;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let keys = v
                .get("doc")
                .or(Some(&v))
                .and_then(Value::as_object)
                .map_or(0, |o| o.keys().filter(|k| k.starts_with('w')).count());
            if keys == total {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "edge {} holds {keys} of {total}",
                e.api
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = cpu.seconds()? - cpu_before;
    // The last events may still be on their way to the watchers: wait for them, bounded.
    let expected = total * (clients - 1);
    while samples.lock().map_or(0, |s| s.len()) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let latency = Latency::of(samples.lock().map(|s| s.clone()).unwrap_or_default());
    Ok(Fanout {
        clients,
        changes: total,
        rate,
        seconds,
        changes_per_sec: total as f64 / seconds,
        latency,
        wire_bytes_per_change: f64::NAN,
        cpu_ms_per_change: cpu_seconds * 1000.0 / total as f64,
    })
}
