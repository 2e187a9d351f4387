//! The generated bindings, checked against the library as built:
//!
//! - the committed Kotlin and Swift sources are what `uniffi-bindgen` generates now (so they
//!   never drift from the Rust surface);
//! - the Python bindings drive the library through its UniFFI surface against real
//!   `syncline-hub` and `syncline-edge` processes (`tests/python/test_replica.py`, pytest).
//!
//! One test binary for the crate; it needs `python3` with `pytest`, and the hub and edge
//! binaries of the workspace (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test: a panic is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

const LIBRARY: &str = "libsyncline_ffi.so";

/// The crate's folder.
fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bindings generator, built by cargo for this test.
fn bindgen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen"))
}

/// `target/<profile>`: where cargo put the generator, the workspace's binaries and the library.
fn profile_dir() -> PathBuf {
    bindgen()
        .parent()
        .expect("the generator is in target/<profile>")
        .to_path_buf()
}

/// The cdylib built with this test: cargo writes it to `target/<profile>/deps/` and copies it
/// up to `target/<profile>/`; the newer of the two is the one just built.
fn library() -> PathBuf {
    let dir = profile_dir();
    let newest = [dir.join(LIBRARY), dir.join("deps").join(LIBRARY)]
        .into_iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max();
    match newest {
        Some((_, p)) => p,
        None => panic!(
            "{LIBRARY} is not in {} or its deps/ folder: build the crate's cdylib first \
             (`cargo build -p syncline-ffi`)",
            dir.display()
        ),
    }
}

/// A binary of the workspace (`syncline-hub`, `syncline-edge`) in `target/<profile>`.
fn workspace_bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` builds it, or \
         `cargo build -p syncline-hub -p syncline-edge`)",
        path.display()
    );
    path
}

/// Runs the generator for `language` into `out`.
fn generate(language: &str, out: &Path) {
    let output = Command::new(bindgen())
        .arg("generate")
        .arg("--library")
        .arg(library())
        .args(["--language", language, "--no-format", "--out-dir"])
        .arg(out)
        .output()
        .expect("running uniffi-bindgen");
    assert!(
        output.status.success(),
        "uniffi-bindgen generate --language {language} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file under `dir`, as (path relative to `dir`, contents).
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_path_buf();
                out.push((rel, std::fs::read(&path).expect("reading a file")));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn committed_kotlin_and_swift_bindings_match_the_library() {
    let fresh = tempfile::tempdir().unwrap();
    for language in ["kotlin", "swift"] {
        let out = fresh.path().join(language);
        generate(language, &out);
        let committed_dir = crate_dir().join("bindings").join(language);
        let generated = files(&out);
        let committed = files(&committed_dir);
        assert!(!generated.is_empty(), "no {language} sources generated");
        let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&committed),
            names(&generated),
            "the committed {language} bindings ({}) are not the files the library generates \
             now: run mobile-ffi/generate.sh and commit mobile-ffi/bindings/",
            committed_dir.display()
        );
        for ((path, now), (_, kept)) in generated.iter().zip(&committed) {
            assert!(
                now == kept,
                "mobile-ffi/bindings/{language}/{} differs from what the library generates \
                 now: run mobile-ffi/generate.sh and commit mobile-ffi/bindings/",
                path.display()
            );
        }
    }
}

#[test]
fn python_suite_drives_the_library_against_real_processes() {
    let pytest = Command::new("python3")
        .args(["-m", "pytest", "--version"])
        .output();
    match pytest {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "pytest is missing: `python3 -m pip install pytest` (the mobile-ffi suite runs \
             with it)\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("python3 is missing ({e}): install Python 3 and `pip install pytest`"),
    }
    let hub = workspace_bin("syncline-hub");
    let edge = workspace_bin("syncline-edge");

    let bindings = tempfile::tempdir().unwrap();
    generate("python", bindings.path());
    std::fs::copy(library(), bindings.path().join(LIBRARY)).expect("copying the library");

    let suite = crate_dir().join("tests").join("python");
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("SYNCLINE_FFI_BINDINGS", bindings.path())
        .env("SYNCLINE_HUB_BIN", hub)
        .env("SYNCLINE_EDGE_BIN", edge)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .expect("running pytest");
    assert!(
        status.success(),
        "the Python suite {} failed (its output is above)",
        suite.display()
    );
}
