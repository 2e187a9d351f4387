//! The Automerge reference sync server (automerge-repo over WebSocket, Node clients), run by
//! `bench/reference/run.mjs` on the same workloads; and a tiny HTTP GET for status pages.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Runs `node run.mjs ARGS` in `dir` and returns the JSON line it prints. A reference run
/// that fails (the reference server gives up at high client counts) is recorded as such, not
/// as an error of the whole suite.
pub fn run(dir: &Path, args: &[&str], within: Duration) -> Result<Value> {
    if !dir.join("node_modules").exists() {
        bail!(
            "{}/node_modules is missing: run `npm ci --prefix {}` first",
            dir.display(),
            dir.display()
        );
    }
    // Its progress (stderr) shows live; its one JSON line (stdout) is the result.
    let out = Command::new("node")
        .arg("run.mjs")
        .args(args)
        .args(["--timeout", &within.as_secs().to_string()])
        .current_dir(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running node (is Node.js installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match (out.status.success(), last) {
        (true, Some(line)) => Ok(serde_json::from_str(line)?),
        (_, line) => Ok(serde_json::json!({
            "failed": true,
            "exit": out.status.code(),
            "output": line,
        })),
    }
}

/// `GET path` on `addr` (HTTP/1.1, connection closed after); returns the body.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .context("no HTTP body")?;
    Ok(body)
}

/// The result of several runs of the reference on one workload: a failed run if there is one
/// (the workload failed), otherwise the run of the median `seconds`, with every run's seconds
/// in `runs_seconds`.
pub fn median_run(runs: Vec<Value>) -> Value {
    let seconds: Vec<Value> = runs.iter().map(|r| r["seconds"].clone()).collect();
    let failed = runs
        .iter()
        .position(|r| r["converged"] != Value::Bool(true));
    let mut pick = match failed {
        Some(i) => runs.into_iter().nth(i),
        None => {
            let mut sorted: Vec<Value> = runs;
            sorted.sort_by(|a, b| {
                let s = |v: &Value| v["seconds"].as_f64().unwrap_or(f64::INFINITY);
                s(a).total_cmp(&s(b))
            });
            let mid = sorted.len().saturating_sub(1) / 2;
            sorted.into_iter().nth(mid)
        }
    }
    .unwrap_or(Value::Null);
    if pick.is_object() {
        pick["runs_seconds"] = Value::Array(seconds);
    }
    pick
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_median_run_is_kept_with_every_runs_seconds_and_a_failure_wins() {
        let ok = |s: f64| json!({"seconds": s, "converged": true});
        let m = median_run(vec![ok(2.5), ok(6.1), ok(2.4), ok(2.7), ok(4.0)]);
        assert_eq!(m["seconds"], 2.7);
        assert_eq!(m["runs_seconds"], json!([2.5, 6.1, 2.4, 2.7, 4.0]));
        let failed = json!({"seconds": 9.0, "converged": false, "error": "unavailable"});
        let m = median_run(vec![ok(2.5), failed]);
        assert_eq!(m["converged"], false);
        assert_eq!(m["error"], "unavailable");
        assert_eq!(m["runs_seconds"], json!([2.5, 9.0]));
        assert_eq!(median_run(Vec::new()), Value::Null);
    }
}
