//! `init` and the grants commands.

use syncline_core::identity::Identity;

use crate::support::{hub, stderr, stdout};

#[test]
fn init_prints_one_json_line_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hub");
    let d = dir.to_str().unwrap();
    let first = hub(&["init", "--data", d, "--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let text = stdout(&first);
    assert_eq!(text.lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = json.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{text}");
    for k in ["public_key", "fingerprint"] {
        let v = obj[k].as_str().unwrap();
        assert_eq!(v.len(), 64, "{k} = {v}");
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()), "{k} = {v}");
    }
    for f in ["identity", "cert.der", "key.der", "hub.db"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let cert = std::fs::read(dir.join("cert.der")).unwrap();
    assert_eq!(
        obj["fingerprint"].as_str().unwrap(),
        syncline_net::tls::fingerprint(&cert)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["cert.der", "key.der"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    let again = hub(&["init", "--data", d, "--json", "--name", "example.org"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stdout(&again),
        text,
        "a second init changed the hub's identity"
    );
    let plain = hub(&["init", "--data", d]);
    assert!(stdout(&plain).contains(obj["public_key"].as_str().unwrap()));
    assert!(stdout(&plain).contains(obj["fingerprint"].as_str().unwrap()));
}

#[test]
fn grant_revoke_and_list_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    assert!(hub(&["init", "--data", d]).status.success());
    grant_revoke_and_list(&["--data", d]);
}

#[test]
fn grant_revoke_and_list_round_trip_on_postgres() {
    let pg = syncline_e2e::Postgres::start();
    grant_revoke_and_list(&["--store", &pg.url]);
}

/// Grants, lists, replaces and revokes through the CLI on the store `at` names.
fn grant_revoke_and_list(at: &[&str]) {
    let run = |command: &str, rest: &[&str]| {
        let mut args = vec![command];
        args.extend(at);
        args.extend(rest);
        hub(&args)
    };
    let a = Identity::generate().peer_id().to_string();
    let b = Identity::generate().peer_id().to_string();
    for (key, prefix, mode) in [(&a, "sites/", "rw"), (&a, "", "read"), (&b, "x", "write")] {
        let o = run("grant", &[key, prefix, mode]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let list = || -> Vec<(String, String, String)> {
        let o = run("grants", &["--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let mut out: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["public_key"].as_str().unwrap().to_owned(),
                    g["prefix"].as_str().unwrap().to_owned(),
                    g["mode"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let mut want = vec![
        (a.clone(), String::new(), "read".to_owned()),
        (a.clone(), "sites/".to_owned(), "rw".to_owned()),
        (b.clone(), "x".to_owned(), "write".to_owned()),
    ];
    want.sort();
    assert_eq!(list(), want);

    // The same key and prefix again replaces the grant.
    assert!(run("grant", &[&b, "x", "read"]).status.success());
    let table = stdout(&run("grants", &[]));
    assert!(table.contains(&b) && table.contains("read"), "{table}");

    let o = run("revoke", &[&a, "sites/"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("revoke", &[&b]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(list(), vec![(a.clone(), String::new(), "read".to_owned())]);
}

#[test]
fn bad_input_exits_2_with_a_message_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    assert!(hub(&["init", "--data", d]).status.success());
    let key = Identity::generate().peer_id().to_string();
    let missing = tmp.path().join("nope");
    let m = missing.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["grant", "--data", d, "abc", "", "rw"], "public key"),
        (
            vec!["grant", "--data", d, &key[..63], "", "rw"],
            "public key",
        ),
        (vec!["grant", "--data", d, &key, "a//b", "rw"], "prefix"),
        (vec!["grant", "--data", d, &key, "../etc", "rw"], "prefix"),
        (vec!["grant", "--data", d, &key, "", "admin"], "admin"),
        (vec!["grant", "--data", m, &key, "", "rw"], "init"),
        (vec!["revoke", "--data", d, "zz"], "public key"),
        (vec!["revoke", "--data", m, &key], "init"),
        (vec!["grants", "--data", m], "init"),
        (vec!["grant", "--data", d, &key], "required"),
    ];
    for (args, says) in cases {
        let o = hub(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(says),
            "{args:?}: the message should say {says:?}: {}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
    assert!(
        !missing.exists(),
        "a grant command created a data directory"
    );
    let o = hub(&["grants", "--data", d, "--json"]);
    assert_eq!(stdout(&o).trim(), "[]");
}
