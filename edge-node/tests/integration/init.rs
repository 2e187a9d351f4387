//! `syncline-edge init`.

use crate::harness::*;

#[test]
fn init_writes_the_identity_and_the_hubs_in_order_and_prints_the_key_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let fp1 = "AB:".repeat(31) + "AB";
    let fp2 = "cd".repeat(32);
    let out = edge(&[
        "init",
        "--data",
        dir.to_str().unwrap(),
        "--hub",
        "hub-a.example:7443",
        "--hub-fingerprint",
        &fp1,
        "--hub",
        "127.0.0.1:7444",
        "--hub-fingerprint",
        &fp2,
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let key = v["public_key"].as_str().unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1);
    assert_eq!(key.len(), 64);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));

    let config = std::fs::read_to_string(dir.join("edge.toml")).unwrap();
    let a = config.find("hub-a.example:7443").unwrap();
    let b = config.find("127.0.0.1:7444").unwrap();
    assert!(a < b, "failover order kept: {config}");
    assert!(config.contains(&"ab".repeat(32)), "normalized: {config}");
    assert!(config.contains(&fp2));
    let identity = std::fs::read_to_string(dir.join("identity")).unwrap();
    assert!(identity.contains(key));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("identity"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Again: the identity stays, the hubs change.
    let again = init(&dir, &[("hub-c.example:1", &fp2)]);
    assert_eq!(again, key);
    let config = std::fs::read_to_string(dir.join("edge.toml")).unwrap();
    assert!(config.contains("hub-c.example:1") && !config.contains("hub-a.example"));
}

#[test]
fn init_refuses_bad_input_with_exit_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let d = dir.to_str().unwrap();
    let fp = some_fingerprint();
    let zz = "zz".repeat(32);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--hub", "h:1", "--hub-fingerprint", "abc"],
            "fingerprint",
        ),
        (
            vec!["--hub", "h:1", "--hub-fingerprint", &zz],
            "fingerprint",
        ),
        (vec!["--hub", "h:1"], "--hub-fingerprint"),
        (
            vec!["--hub", "h:1", "--hub", "h:2", "--hub-fingerprint", &fp],
            "--hub-fingerprint",
        ),
        (
            vec!["--hub", "no-port", "--hub-fingerprint", &fp],
            "HOST:PORT",
        ),
        (vec!["--hub-fingerprint", &fp], "--hub"),
    ];
    for (extra, says) in cases {
        let mut args = vec!["init", "--data", d];
        args.extend(&extra);
        let out = edge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        assert!(out.stdout.is_empty());
        assert!(!dir.exists(), "{extra:?} wrote something");
    }
}
