//! A harness for end-to-end tests over real processes: it starts `syncline-hub` and
//! `syncline-edge` binaries from the workspace's target directory on 127.0.0.1 with free
//! ports and temp dirs, talks to the edge API over HTTP, and ends the processes it started.
//! Every wait is on a condition with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: a panic is a failed test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

pub mod nemesis;
pub mod proxy;

/// Where the workspace's binaries are: next to the running executable (a binary of this
/// crate), or next to its `deps` folder (a test).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let here = exe.parent().expect("target/<profile>");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target/<profile>")
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` builds it)",
        path.display()
    );
    path
}

/// Waits until `f` returns `Some`, polling, for at most `secs` seconds.
pub fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion; returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("running a command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process whose stdout lines are read on a thread.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines seen so far.
    pub seen: Vec<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        // Warnings and errors only: the test output stays readable.
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .env("SYNCLINE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting a process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (seen or coming) that starts with `prefix`.
    pub fn line_starting(&mut self, prefix: &str, secs: u64) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line starting with {prefix:?} within {secs}s; saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`KILL`, `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{sig} failed");
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit code.
    pub fn terminate(mut self, secs: u64) -> i32 {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {secs}s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running hub.
pub struct Hub {
    /// Its process.
    pub proc: Proc,
    /// Its data dir.
    pub data: PathBuf,
    /// QUIC address.
    pub addr: String,
    /// Certificate fingerprint.
    pub fingerprint: String,
    /// Public key.
    pub key: String,
    /// Metrics address.
    pub metrics: String,
    /// The PostgreSQL store it runs on (`--store`), if not its data directory's SQLite file.
    pub store: Option<String>,
}

impl Hub {
    /// Starts a hub on `listen` (use `127.0.0.1:0` for a free port) with data in `data`.
    pub fn start(data: &Path, listen: &str) -> Hub {
        Hub::start_with(data, listen, &[])
    }

    /// Like [`Hub::start`], with more arguments for `run` (`--peer`...).
    pub fn start_with(data: &Path, listen: &str, extra: &[&str]) -> Hub {
        let mut proc = Proc::spawn(
            Command::new(bin("syncline-hub"))
                .args(["run", "--data"])
                .arg(data)
                .args(["--listen", listen, "--metrics", "127.0.0.1:0"])
                .args(extra),
        );
        let line = proc.line_starting("listening on ", 30);
        let words: Vec<&str> = line.split_whitespace().collect();
        // listening on ADDR fingerprint FP key KEY
        let (addr, fingerprint, key) = (
            words[2].to_string(),
            words[4].to_string(),
            words[6].to_string(),
        );
        let metrics = proc.line_starting("metrics on ", 10)["metrics on ".len()..]
            .trim()
            .to_string();
        let store = extra
            .iter()
            .position(|a| *a == "--store")
            .and_then(|i| extra.get(i + 1))
            .map(|s| (*s).to_owned());
        Hub {
            proc,
            data: data.to_path_buf(),
            addr,
            fingerprint,
            key,
            metrics,
            store,
        }
    }

    /// Grants `key` on `prefix` (`read`, `write` or `rw`).
    pub fn grant(&self, key: &str, prefix: &str, mode: &str) {
        let mut cmd = Command::new(bin("syncline-hub"));
        cmd.args(["grant", "--data"]).arg(&self.data);
        if let Some(url) = &self.store {
            cmd.args(["--store", url]);
        }
        let (code, _, err) = run(cmd.args([key, prefix, mode]));
        assert_eq!(code, 0, "grant failed: {err}");
    }

    /// GET on the metrics port.
    pub fn http(&self, path: &str) -> Result<(u16, String)> {
        http(&self.metrics, "GET", path, None)
    }

    /// The value of one metric sample, `name` with its labels as the text format writes
    /// them (`syncline_hub_rejects_total{reason="wire"}`); `None` if it is absent.
    pub fn metric(&self, sample: &str) -> Option<u64> {
        let (_, text) = self.http("/metrics").ok()?;
        let prefix = format!("{sample} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// A new edge in `data` for this hub alone, granted rw on everything, running, and
    /// following everything.
    pub fn follower(&self, data: &Path) -> Edge {
        let key = Edge::init(data, &[(&self.addr, &self.fingerprint)]);
        self.grant(&key, "", "rw");
        let e = Edge::start(data);
        e.subscribe("").expect("subscribing to everything");
        e
    }
}

/// Initializes a hub's data directory; returns (public key, fingerprint).
pub fn hub_init(data: &Path) -> (String, String) {
    let (code, out, err) = run(Command::new(bin("syncline-hub"))
        .args(["init", "--json", "--data"])
        .arg(data));
    assert_eq!(code, 0, "hub init failed: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("init --json prints JSON");
    (
        v["public_key"].as_str().expect("key").to_string(),
        v["fingerprint"].as_str().expect("fp").to_string(),
    )
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_addr() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    s.local_addr().expect("its address").to_string()
}

/// A running edge daemon.
pub struct Edge {
    /// Its process.
    pub proc: Option<Proc>,
    /// Its data dir.
    pub data: PathBuf,
    /// API address.
    pub api: String,
    /// Public key.
    pub key: String,
}

impl Edge {
    /// Initializes an edge for `hubs` (address, fingerprint), in failover order.
    pub fn init(data: &Path, hubs: &[(&str, &str)]) -> String {
        let mut cmd = Command::new(bin("syncline-edge"));
        cmd.args(["init", "--json", "--data"]).arg(data);
        for (addr, fp) in hubs {
            cmd.args(["--hub", addr, "--hub-fingerprint", fp]);
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "edge init failed: {err}");
        let v: Value = serde_json::from_str(out.trim()).expect("init --json prints JSON");
        v["public_key"].as_str().expect("public_key").to_string()
    }

    /// Starts the daemon on a free API port.
    pub fn start(data: &Path) -> Edge {
        let mut proc = Proc::spawn(
            Command::new(bin("syncline-edge"))
                .args(["run", "--api", "127.0.0.1:0", "--data"])
                .arg(data),
        );
        let line = proc.line_starting("api on ", 30);
        let words: Vec<&str> = line.split_whitespace().collect();
        Edge {
            api: words[2].to_string(),
            key: words[4].to_string(),
            proc: Some(proc),
            data: data.to_path_buf(),
        }
    }

    /// Restarts the daemon (after a kill or stop).
    pub fn restart(&mut self) {
        let fresh = Edge::start(&self.data);
        self.api = fresh.api;
        self.proc = fresh.proc;
    }

    /// SIGKILLs the daemon.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Applies ops to a document; returns the HTTP status and body.
    pub fn change(&self, doc: &str, ops: Value) -> Result<(u16, Value)> {
        let body = serde_json::json!({ "ops": ops }).to_string();
        let (status, text) = http(
            &self.api,
            "POST",
            &format!("/v1/docs/{}/changes", enc(doc)),
            Some(&body),
        )?;
        Ok((
            status,
            serde_json::from_str(&text).with_context(|| format!("body {text:?}"))?,
        ))
    }

    /// The document and its heads, or `None` on 404.
    pub fn get(&self, doc: &str) -> Result<Option<Value>> {
        let (status, text) = http(&self.api, "GET", &format!("/v1/docs/{}", enc(doc)), None)?;
        match status {
            200 => Ok(Some(serde_json::from_str(&text)?)),
            404 => Ok(None),
            s => bail!("GET {doc}: {s} {text}"),
        }
    }

    /// The status document.
    pub fn status(&self) -> Result<Value> {
        let (status, text) = http(&self.api, "GET", "/v1/status", None)?;
        if status != 200 {
            bail!("status: {status} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Subscribes to a prefix.
    pub fn subscribe(&self, prefix: &str) -> Result<()> {
        let body = serde_json::json!({ "prefix": prefix }).to_string();
        let (status, text) = http(&self.api, "POST", "/v1/subscriptions", Some(&body))?;
        if status != 200 {
            bail!("subscribe: {status} {text}");
        }
        Ok(())
    }
}

/// Percent-encodes a document id as one path segment.
pub fn enc(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal HTTP/1.1 client (one request per connection), enough for the tests.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A test server's TLS files: its certificate and key, and the CA its clients' certificates
/// must chain to (if it asks for them).
struct ServerTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

/// A real PostgreSQL server of its own, in a temp dir, on a free port of 127.0.0.1, stopped
/// when dropped. Debian's `postgresql` package provides the binaries (`.ci/run` installs it);
/// as root, the server runs as the `postgres` user, which PostgreSQL requires.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<String>,
    /// `postgres://USER@127.0.0.1:PORT/syncline`: a database made for the test.
    pub url: String,
}

impl Postgres {
    /// Makes a cluster (`initdb`), starts it and creates the database `syncline`.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// The same with TLS on (`ssl = on`), its certificate for `127.0.0.1` and `localhost`
    /// signed by a CA made for the test; returns the CA's PEM file. Plain connections are
    /// still accepted (`host` lines of the default `pg_hba.conf`).
    pub fn start_tls() -> (Postgres, PathBuf) {
        let (pg, ca, _) = Postgres::start_tls_with(false);
        (pg, ca)
    }

    /// [`start_tls`](Self::start_tls) where TCP connections must be TLS and show a client
    /// certificate of the test CA naming the database user (`hostssl ... cert` in
    /// `pg_hba.conf`, `ssl_ca_file`); returns the CA and the client's certificate and key
    /// files, for user `syncline`.
    pub fn start_mutual_tls() -> (Postgres, PathBuf, (PathBuf, PathBuf)) {
        let (pg, ca, client) = Postgres::start_tls_with(true);
        (pg, ca, client.expect("a client certificate"))
    }

    fn start_tls_with(clients: bool) -> (Postgres, PathBuf, Option<(PathBuf, PathBuf)>) {
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "syncline test CA");
        let ca = ca_params.self_signed(&ca_key).expect("a CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("a server key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server parameters")
            .signed_by(&key, &issuer)
            .expect("a server certificate");
        let pg = Postgres::start_with(Some(ServerTls {
            cert: cert.pem(),
            key: key.serialize_pem(),
            client_ca: clients.then(|| ca.pem()),
        }));
        let ca_file = pg.dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("writing the CA");
        let client = clients.then(|| {
            let key = rcgen::KeyPair::generate().expect("a client key");
            let mut params =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("client parameters");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "syncline");
            let cert = params
                .signed_by(&key, &issuer)
                .expect("a client certificate");
            let (cert_file, key_file) = (
                pg.dir.path().join("client.crt"),
                pg.dir.path().join("client.key"),
            );
            std::fs::write(&cert_file, cert.pem()).expect("writing the client certificate");
            std::fs::write(&key_file, key.serialize_pem()).expect("writing the client key");
            (cert_file, key_file)
        });
        (pg, ca_file, client)
    }

    fn start_with(tls: Option<ServerTls>) -> Postgres {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("a temp dir for PostgreSQL");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        let user = root.then(|| "postgres".to_owned());
        if root {
            // The cluster's files must belong to the user the server runs as.
            let (code, _, err) = run(Command::new("chown").arg("postgres:").arg(dir.path()));
            assert_eq!(code, 0, "chown of the PostgreSQL dir failed: {err}");
        }
        let mut pg = Postgres {
            dir,
            bin,
            user,
            url: String::new(),
        };
        let data = pg.dir.path().join("data");
        let (code, _, err) = run(pg
            .command("initdb")
            .args([
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "syncline",
                "-D",
            ])
            .arg(&data));
        assert_eq!(code, 0, "initdb failed: {err}");
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=on -c max_connections=50",
            pg.dir.path().display()
        );
        let mut mutual = false;
        if let Some(tls) = tls {
            // The server reads them as its own user; the key must not be readable by others.
            let (cert_file, key_file, ca_file) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
                pg.dir.path().join("client-ca.pem"),
            );
            std::fs::write(&cert_file, tls.cert).expect("writing the server certificate");
            std::fs::write(&key_file, tls.key).expect("writing the server key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                .expect("the key's mode");
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert_file.display(),
                key_file.display()
            ));
            if let Some(ca) = tls.client_ca {
                std::fs::write(&ca_file, ca).expect("writing the client CA");
                opts.push_str(&format!(" -c ssl_ca_file={}", ca_file.display()));
                // TCP only over TLS with a certificate naming the user; the socket for the
                // harness's own createdb.
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
                )
                .expect("writing pg_hba.conf");
                mutual = true;
            }
            if pg.user.is_some() {
                let (code, _, err) = run(Command::new("chown")
                    .arg("postgres:")
                    .arg(&cert_file)
                    .arg(&key_file)
                    .arg(data.join("pg_hba.conf"))
                    .args(mutual.then_some(&ca_file)));
                assert_eq!(code, 0, "chown of the TLS files failed: {err}");
            }
        }
        // A free port, taken by another server between this choice and the start (tests start
        // servers in parallel), is chosen again.
        let mut port;
        let mut attempt = 0;
        loop {
            attempt += 1;
            port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free TCP port")
                .port();
            let (code, _, err) = run(pg
                .command("pg_ctl")
                .args(["start", "-w", "-t", "60", "-l"])
                .arg(pg.dir.path().join("server.log"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &format!("{opts} -c port={port}")]));
            if code == 0 {
                break;
            }
            let log = pg.log();
            let taken = log.contains("could not bind") || log.contains("already in use");
            assert!(
                taken && attempt < 5,
                "pg_ctl start failed: {err} (log: {log})"
            );
        }
        // Over the socket when TCP asks for a client certificate.
        let host = match mutual {
            true => pg.dir.path().display().to_string(),
            false => "127.0.0.1".to_owned(),
        };
        let (code, _, err) = run(pg.command("createdb").args([
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-U",
            "syncline",
            "syncline",
        ]));
        assert_eq!(code, 0, "createdb failed: {err}");
        pg.url = format!("postgres://syncline@127.0.0.1:{port}/syncline");
        pg
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// Connection parameters over the server's Unix socket (user `syncline`, database
    /// `syncline`): an admin session that needs no certificate.
    pub fn socket_params(&self) -> String {
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next());
        format!(
            "host={} port={} user=syncline dbname=syncline",
            self.dir.path().display(),
            port.unwrap_or("5432")
        )
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .output();
    }
}

/// The folder of PostgreSQL's server binaries: `initdb` on the PATH, else Debian's
/// `/usr/lib/postgresql/VERSION/bin`. On a machine without them, as root with apt, the
/// test setup installs Debian's `postgresql` package once; otherwise the test fails with what
/// to do.
fn postgres_bin() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if let Some(dir) = find_postgres_bin() {
        return dir;
    }
    INSTALLED.get_or_init(|| {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        if root && Path::new("/usr/bin/apt-get").exists() {
            eprintln!("installing Debian's postgresql package for the PostgreSQL store tests");
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "postgresql"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
        }
    });
    find_postgres_bin().expect(
        "PostgreSQL's server binaries are missing: install Debian's `postgresql` package \
         (`apt-get install -y postgresql`, as .ci/run does)",
    )
}

fn find_postgres_bin() -> Option<PathBuf> {
    let on_path = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = on_path
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        return Some(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().filter(|b| b.join("initdb").exists())
}
