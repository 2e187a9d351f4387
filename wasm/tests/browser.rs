//! The browser package, built and tested as a web developer gets it: `wasm/build.sh` builds
//! it (WebAssembly, wasm-bindgen glue, wasm-opt), then the JS suites run with node's test
//! runner against real `syncline-hub` and `syncline-edge` processes: `test/api.test.mjs`
//! outside a browser, `test/browser.test.mjs` in a real headless Chromium (Debian's
//! `chromium`, installed here if missing).
//!
//! One test binary for the crate; it needs node and npm, and the hub and edge binaries of
//! the workspace (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test: a panic is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ensure_chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        eprintln!("installing Debian's chromium for the browser tests");
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("running apt-get");
        assert!(
            status.success() && path.exists(),
            "chromium is missing and could not be installed: `apt-get install chromium` as root"
        );
    }
    path
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(status.success(), "{what} failed ({status})");
}

fn suites(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the test folder")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    files
}

#[test]
fn js_suites_pass_in_node_and_in_chromium() {
    let chromium = ensure_chromium();
    let hub = syncline_e2e::bin("syncline-hub");
    let edge = syncline_e2e::bin("syncline-edge");
    let dir = crate_dir();
    run(&mut Command::new(dir.join("build.sh")), "wasm/build.sh");
    let files = suites(&dir.join("test"));
    assert!(files.len() >= 2, "the JS suites are missing: {files:?}");
    run(
        Command::new("node")
            .args(["--experimental-websocket", "--test", "--test-concurrency=1"])
            .args(&files)
            .current_dir(&dir)
            .env("SYNCLINE_HUB_BIN", hub)
            .env("SYNCLINE_EDGE_BIN", edge)
            .env("SYNCLINE_CHROMIUM", chromium),
        "the JS suites (node --test wasm/test/)",
    );
}
