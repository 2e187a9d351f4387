//! Real QUIC sockets on 127.0.0.1 between the hub driver and replica drivers.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is a failed test with its message.

mod quic;
