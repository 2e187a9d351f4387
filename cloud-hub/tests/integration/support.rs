//! Running the real `syncline-hub` binary: one-shot commands, and a hub process whose stdout
//! lines are read as they come and whose stderr goes to a file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_syncline-hub");

/// Generous: the machine has 2 cores and others build on it.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Runs a one-shot command (with no SYNCLINE_* variables from the caller's environment).
pub fn hub(args: &[&str]) -> Output {
    clean(Command::new(BIN)).args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn clean(mut c: Command) -> Command {
    for var in [
        "SYNCLINE_DATA",
        "SYNCLINE_LISTEN",
        "SYNCLINE_METRICS",
        "SYNCLINE_CONFIG",
        "SYNCLINE_CERT",
        "SYNCLINE_KEY",
        "SYNCLINE_LOG",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

/// Polls `f` until it is true; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `syncline-hub run`.
pub struct HubProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub stderr_path: PathBuf,
    /// The QUIC address it printed.
    pub addr: String,
    /// Its certificate fingerprint (hex).
    pub fingerprint: String,
    /// Its public key (hex).
    pub key: String,
    /// The metrics address, if it serves metrics.
    pub metrics: Option<String>,
}

/// Options of [`HubProcess::start`].
#[derive(Default)]
pub struct Start<'a> {
    pub args: Vec<String>,
    pub env: Vec<(&'a str, String)>,
    pub current_dir: Option<&'a Path>,
    /// Wait for a `metrics on` line too.
    pub metrics: bool,
}

impl HubProcess {
    /// `syncline-hub run --data DIR --listen 127.0.0.1:0 [--metrics 127.0.0.1:0]`.
    pub fn run(data: &Path, metrics: bool) -> Self {
        Self::run_with(data, metrics, &[])
    }

    /// [`HubProcess::run`] with more arguments (`--store URL`).
    pub fn run_with(data: &Path, metrics: bool, more: &[String]) -> Self {
        let mut args = vec![
            "--data".to_owned(),
            data.display().to_string(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend_from_slice(more);
        if metrics {
            args.extend(["--metrics".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        Self::start(
            &data.with_extension("stderr"),
            Start {
                args,
                metrics,
                ..Start::default()
            },
        )
    }

    /// Starts `syncline-hub run ARGS` and waits for its address lines.
    pub fn start(stderr_path: &Path, opts: Start<'_>) -> Self {
        let err = std::fs::File::create(stderr_path).unwrap();
        let mut cmd = clean(Command::new(BIN));
        cmd.arg("run")
            .args(&opts.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(d) = opts.current_dir {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = HubProcess {
            child,
            lines,
            stderr_path: stderr_path.to_owned(),
            addr: String::new(),
            fingerprint: String::new(),
            key: String::new(),
            metrics: None,
        };
        let deadline = Instant::now() + STARTUP;
        while p.addr.is_empty() || (opts.metrics && p.metrics.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match p.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!("the hub printed no address; stderr:\n{}", p.logs()),
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["listening", "on", addr, "fingerprint", fp, "key", key] => {
                    p.addr = (*addr).to_owned();
                    p.fingerprint = (*fp).to_owned();
                    p.key = (*key).to_owned();
                }
                ["metrics", "on", addr] => p.metrics = Some((*addr).to_owned()),
                _ => panic!("unexpected stdout line {line:?}"),
            }
        }
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for it to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not exit within {limit:?}; stderr:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the metrics server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let addr = self.metrics.as_deref().expect("started without --metrics");
        http_get(addr, path)
    }

    /// The value of one sample in `/metrics` (`name` with its labels, as printed), 0 if absent.
    pub fn metric(&self, sample: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}
