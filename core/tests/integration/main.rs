//! The crate's one integration-test binary (one binary keeps link times down).

mod covered;
mod crash;
mod fuzz_corpus;
mod power_cut;
mod rollback;
mod rolling;
mod snapshots;
mod support;
