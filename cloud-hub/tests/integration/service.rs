//! `syncline-hub run`: startup, settings, health, metrics and shutdown.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;

use crate::support::{HubProcess, STARTUP, Start, http_get, wait_for};

const FAMILIES: [(&str, &str); 14] = [
    ("syncline_hub_sessions", "gauge"),
    ("syncline_hub_sessions_opened_total", "counter"),
    ("syncline_hub_changes_stored_total", "counter"),
    ("syncline_hub_changes_duplicate_total", "counter"),
    ("syncline_hub_changes_sent_total", "counter"),
    ("syncline_hub_commits_total", "counter"),
    ("syncline_hub_rejects_total", "counter"),
    ("syncline_hub_slow_fallbacks_total", "counter"),
    ("syncline_hub_log_changes", "gauge"),
    ("syncline_hub_bytes_received_total", "counter"),
    ("syncline_hub_bytes_sent_total", "counter"),
    ("syncline_hub_replica_lag", "gauge"),
    ("syncline_hub_replica_lag_max", "gauge"),
    ("syncline_hub_commit_seconds", "histogram"),
];

#[test]
fn run_on_an_empty_dir_starts_answers_healthz_and_exits_0_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fresh");
    let mut p = HubProcess::run(&data, true);
    assert!(
        p.addr.starts_with("127.0.0.1:") && !p.addr.ends_with(":0"),
        "{}",
        p.addr
    );
    assert_eq!(p.fingerprint.len(), 64);
    assert_eq!(p.key.len(), 64);
    for f in ["identity", "cert.der", "key.der", "hub.db"] {
        assert!(data.join(f).is_file(), "{f} missing");
    }
    // The same values as `init` prints on that directory.
    let o = crate::support::hub(&["init", "--data", data.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["public_key"], p.key.as_str());
    assert_eq!(v["fingerprint"], p.fingerprint.as_str());

    let (status, body) = p.get("/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "ok"})
    );
    assert_eq!(p.get("/nothing").0, 404);

    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", p.logs());
    let logs = p.logs();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("hub stopped"), "{logs}");
}

#[test]
fn sigint_also_stops_it_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = HubProcess::run(&tmp.path().join("d"), false);
    p.signal("-INT");
    assert_eq!(p.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// Checks the text strictly, line by line (the parser below skips lines it does not know),
/// then parses it with `prometheus-parse` and checks names, types and values.
#[test]
fn metrics_are_valid_prometheus_text() {
    let tmp = tempfile::tempdir().unwrap();
    let p = HubProcess::run(&tmp.path().join("d"), true);
    let (status, body) = p.get("/metrics");
    assert_eq!(status, 200, "{body}");
    let sample_lines = strict_check(&body);

    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "every sample line parsed"
    );
    let values: HashMap<&str, &prometheus_parse::Value> = scrape
        .samples
        .iter()
        .map(|s| (s.metric.as_str(), &s.value))
        .collect();
    for (name, kind) in FAMILIES {
        assert!(scrape.docs.contains_key(name), "no HELP for {name}");
        if name == "syncline_hub_rejects_total" || name == "syncline_hub_replica_lag" {
            continue; // no refusal and no replica yet: the family has no sample
        }
        if kind == "histogram" {
            // No commit yet: every bucket, the sum and the count are zero.
            match scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| &s.value)
            {
                Some(prometheus_parse::Value::Histogram(buckets)) => {
                    assert!(
                        buckets.iter().any(|b| b.less_than.is_infinite()),
                        "{name}: +Inf"
                    );
                    assert!(
                        buckets.iter().all(|b| b.count == 0.0),
                        "{name} on a fresh hub"
                    );
                }
                other => panic!("{name}: {other:?}"),
            }
            continue;
        }
        match (kind, values.get(name)) {
            ("gauge", Some(prometheus_parse::Value::Gauge(v)))
            | ("counter", Some(prometheus_parse::Value::Counter(v))) => {
                assert_eq!(*v, 0.0, "{name} on a fresh hub")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Every line is a HELP, a TYPE or a sample of a family already described; returns the
/// number of samples.
fn strict_check(body: &str) -> usize {
    assert!(body.ends_with('\n'), "the text must end with a newline");
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut help = HashSet::new();
    let mut typed = HashMap::new();
    let mut samples = 0;
    // The parser folds a histogram's bucket lines into one sample: count them once.
    let mut bucketed = HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            assert!(name_ok(name) && !text.is_empty(), "{line}");
            assert!(help.insert(name.to_owned()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = match series.split_once('{') {
                Some((n, labels)) => {
                    let labels = labels.strip_suffix('}').unwrap();
                    for pair in labels.split(',') {
                        let (k, v) = pair.split_once('=').unwrap();
                        assert!(name_ok(k), "{line}");
                        assert!(
                            v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                    n
                }
                None => series,
            };
            assert!(name_ok(name), "{line}");
            // A histogram's samples are NAME_bucket, NAME_sum and NAME_count.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| typed.get(*base).is_some_and(|k| k == "histogram"))
                .unwrap_or(name);
            assert!(
                help.contains(family) && typed.contains_key(family),
                "undescribed: {line}"
            );
            let v: f64 = value.parse().unwrap();
            assert!(v >= 0.0, "{line}");
            if !name.ends_with("_bucket") || bucketed.insert(family.to_owned()) {
                samples += 1;
            }
        }
    }
    for (name, kind) in FAMILIES {
        assert_eq!(typed.get(name).map(String::as_str), Some(kind), "{name}");
    }
    samples
}

#[test]
fn the_config_file_env_and_flags_combine_in_that_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    // The file names a data directory (relative to itself), a metrics address and a port
    // that the environment overrides; a flag overrides the environment's log filter.
    std::fs::write(
        &cfg,
        "data = \"state\"\nlisten = \"127.0.0.1:1\"\nmetrics = \"127.0.0.1:0\"\nlog = \"off\"\n",
    )
    .unwrap();
    let mut p = HubProcess::start(
        &tmp.path().join("stderr"),
        Start {
            args: vec![
                "--config".into(),
                cfg.display().to_string(),
                "--log".into(),
                "info".into(),
            ],
            env: vec![
                ("SYNCLINE_LISTEN", "127.0.0.1:0".into()),
                ("SYNCLINE_LOG", "off".into()),
            ],
            metrics: true,
            ..Start::default()
        },
    );
    assert!(tmp.path().join("state").join("hub.db").is_file());
    assert_ne!(p.addr, "127.0.0.1:1");
    assert_eq!(p.get("/healthz").0, 200);
    p.signal("-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(
        p.logs().contains("QUIC server started"),
        "--log info was not used"
    );

    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let o = crate::support::hub(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lisen"));
}

#[test]
fn a_pem_certificate_and_key_replace_the_self_signed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = syncline_net::tls::self_signed(vec!["hub.example".into()]).unwrap();
    let pem = |label: &str, der: &[u8]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            body.join("\n")
        )
    };
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    std::fs::write(&cert, pem("CERTIFICATE", &ck.cert_der)).unwrap();
    std::fs::write(&key, pem("PRIVATE KEY", &ck.key_der)).unwrap();
    let data = tmp.path().join("d");
    let p = HubProcess::start(
        &tmp.path().join("stderr"),
        Start {
            args: vec![
                "--data".into(),
                data.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            env: vec![
                ("SYNCLINE_CERT", cert.display().to_string()),
                ("SYNCLINE_KEY", key.display().to_string()),
            ],
            ..Start::default()
        },
    );
    assert_eq!(p.fingerprint, syncline_net::tls::fingerprint(&ck.cert_der));
    assert!(
        !data.join("cert.der").exists(),
        "no self-signed certificate is made"
    );
    drop(p);

    // A key that does not belong to the certificate is refused before serving.
    let other = syncline_net::tls::self_signed(vec!["x".into()]).unwrap();
    std::fs::write(&key, pem("PRIVATE KEY", &other.key_der)).unwrap();
    let o = crate::support::hub(&[
        "run",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn healthz_is_served_until_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = HubProcess::run(&tmp.path().join("d"), true);
    let addr = p.metrics.clone().unwrap();
    wait_for("healthz", STARTUP, || http_get(&addr, "/healthz").0 == 200);
    p.signal("-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "metrics still served"
    );
}
