//! Starting daemons, raw HTTP requests, waiting on conditions.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any awaited condition may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub const BIN: &str = env!("CARGO_BIN_EXE_syncline-edge");

/// A fingerprint that no hub has.
pub fn some_fingerprint() -> String {
    "ab".repeat(32)
}

/// A UDP port on loopback where nothing listens.
pub fn closed_port() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

/// Runs the binary to completion.
pub fn edge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `init` a data directory with these hubs; returns the public key.
pub fn init(dir: &Path, hubs: &[(&str, &str)]) -> String {
    let mut args = vec!["init", "--data", dir.to_str().unwrap(), "--json"];
    for (addr, fp) in hubs {
        args.extend(["--hub", addr, "--hub-fingerprint", fp]);
    }
    let out = edge(&args);
    assert!(out.status.success(), "init failed: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["public_key"].as_str().unwrap().to_owned()
}

/// A running `syncline-edge run`.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub key: String,
}

impl Daemon {
    /// Starts the daemon on an initialized directory, with the API on a free port, and waits
    /// for its start line.
    pub fn start(dir: &Path) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--data",
                dir.to_str().unwrap(),
                "--api",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("no start line; log:\n{}", log_of(dir));
            }
        };
        // `api on ADDR key KEY`
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            matches!(words.as_slice(), ["api", "on", _, "key", _]),
            "unexpected start line {line:?}; log:\n{}",
            log_of(dir)
        );
        Daemon {
            child,
            addr: words[2].to_owned(),
            key: words[4].to_owned(),
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http(&self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        http(&self.addr, "POST", path, Some(("application/json", body)))
    }

    /// Kills the process at once (SIGKILL), as a power cut would.
    pub fn kill_hard(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

/// One HTTP/1.1 request over a fresh connection, as any client would send it; returns the
/// status and the JSON body.
pub fn http(addr: &str, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, Value) {
    let (status, body) = http_raw(addr, method, path, body);
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: {status} answer is not JSON ({e}): {body}"));
    (status, value)
}

pub fn http_raw(addr: &str, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let content = body.map_or("", |(_, b)| b);
    if let Some((ct, _)) = body {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\n\r\n{content}",
        content.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Polls `f` until it holds, up to [`TIMEOUT`].
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An open event stream: reads until its text contains what is wanted.
pub struct EventStream {
    stream: TcpStream,
    pub text: String,
}

impl EventStream {
    /// Opens `GET path` and waits for the headers and the stream's first comment, so that
    /// every change made afterwards is delivered.
    pub fn open(addr: &str, path: &str) -> EventStream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        let mut es = EventStream {
            stream,
            text: String::new(),
        };
        es.wait_for(": events of");
        assert!(es.text.starts_with("HTTP/1.1 200"), "{}", es.text);
        assert!(es.text.contains("text/event-stream"), "{}", es.text);
        es
    }

    pub fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        while !self.text.contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in the event stream: {}",
                self.text
            );
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the event stream closed: {}", self.text),
                Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the event stream: {e}"),
            }
        }
    }
}

/// An initialized directory whose only hub is a closed port (the node is offline).
pub fn offline_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("edge");
    init(&dir, &[(&closed_port(), &some_fingerprint())]);
    (tmp, dir)
}
