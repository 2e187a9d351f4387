//! The real `syncline-edge` binary, started in temporary directories, driven over HTTP on
//! 127.0.0.1 and through its CLI; one test runs two daemons against an in-process hub.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is a failed test with its message.

mod api;
mod cli;
mod daemon;
mod harness;
mod hub;
mod init;
