//! The `syncline-hub` binary as operators run it: real processes, real sockets on 127.0.0.1,
//! temporary data directories; every wait is on a condition with a deadline.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is a failed test with its message.

mod cli;
mod hub_suite;
mod postgres;
mod service;
mod support;
mod sync;
