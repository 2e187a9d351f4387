//! The real processes a run drives: `syncline-hub` and `syncline-edge` from the binary
//! directory, on 127.0.0.1 with free ports and temp dirs, ended by PID when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// A child process whose stdout lines are read on a thread; killed when dropped.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Proc> {
        let mut child = cmd
            .env("SYNCLINE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, lines })
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn line_starting(&mut self, prefix: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => bail!("no line starting with {prefix:?} within {within:?}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss(&self) -> Result<u64> {
        rss_of(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in bytes.
pub fn rss_of(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib * 1024)
}

/// CPU time (user and system) of this process and of other processes, read from
/// `/proc/PID/stat` in the kernel's clock ticks (`USER_HZ`, 100 per second on Linux): good to
/// 10 ms, for runs that last seconds.
pub struct CpuClock {
    pids: Vec<u32>,
}

impl CpuClock {
    /// This process and `pids`.
    pub fn new(pids: Vec<u32>) -> CpuClock {
        CpuClock { pids }
    }

    /// Seconds of CPU used so far, all processes together.
    pub fn seconds(&self) -> Result<f64> {
        let mut total = cpu_of("self")?;
        for pid in &self.pids {
            total += cpu_of(&pid.to_string())?;
        }
        Ok(total)
    }
}

fn cpu_of(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name's closing parenthesis come the fields from the third on; utime
    // and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no field {i} in /proc/{pid}/stat"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

/// Where the release binaries are.
#[derive(Clone, Debug)]
pub struct Bins(pub PathBuf);

impl Bins {
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let p = self.0.join(name);
        if !p.exists() {
            bail!(
                "{} is missing: build it first with \
                 `cargo build --release -p syncline-hub -p syncline-edge -p syncline-bench`",
                p.display()
            );
        }
        Ok(p)
    }
}

/// A running hub.
pub struct Hub {
    pub proc: Proc,
    pub data: PathBuf,
    pub addr: String,
    pub fingerprint: String,
    /// Its metrics HTTP address.
    pub metrics: String,
}

/// One HTTP/1.1 request with the connection closed after; returns (status, body).
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

impl Hub {
    /// Starts a hub on a free port with its data in `data`, and grants `key` read and write
    /// on every document.
    /// With `store`, the hub keeps its store in that PostgreSQL database (`--store`).
    pub fn start_on(bins: &Bins, data: &Path, key: &str, store: Option<&str>) -> Result<Hub> {
        let hub = bins.path("syncline-hub")?;
        let store_args: Vec<&str> = store.map(|s| vec!["--store", s]).unwrap_or_default();
        let out = Command::new(&hub)
            .args(["init", "--data"])
            .arg(data)
            .output()?;
        if !out.status.success() {
            bail!("hub init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new(&hub)
            .args(["grant", "--data"])
            .arg(data)
            .args(&store_args)
            .args([key, "", "rw"])
            .output()?;
        if !out.status.success() {
            bail!("hub grant: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut proc = Proc::spawn(
            Command::new(&hub)
                .args(["run", "--data"])
                .arg(data)
                .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
                .args(&store_args),
        )?;
        // listening on ADDR fingerprint FP key KEY
        let line = proc.line_starting("listening on ", Duration::from_secs(30))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(fp)) = (words.get(2), words.get(4)) else {
            bail!("unexpected hub output: {line}");
        };
        let (addr, fingerprint) = (addr.to_string(), fp.to_string());
        let line = proc.line_starting("metrics on ", Duration::from_secs(30))?;
        let metrics = line.trim_start_matches("metrics on ").trim().to_string();
        Ok(Hub {
            addr,
            fingerprint,
            metrics,
            data: data.to_path_buf(),
            proc,
        })
    }

    /// The value of one metric without labels, from the hub's `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (status, body) = request(&self.metrics, "GET", "/metrics", None)?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no metric {name} in /metrics"))
    }
}

/// Size of a file in bytes, and of a stripped copy of it (`strip` from binutils).
pub fn binary_sizes(path: &Path, scratch: &Path) -> Result<(u64, Option<u64>)> {
    let size = std::fs::metadata(path)?.len();
    let copy = scratch.join("stripped");
    std::fs::copy(path, &copy)?;
    let stripped = Command::new("strip")
        .arg(&copy)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&copy).ok())
        .map(|m| m.len());
    Ok((size, stripped))
}
