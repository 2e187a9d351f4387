//! Syncline's engine.
#![warn(missing_docs)]

pub mod change;
pub mod document;
pub mod error;
pub mod hub;
pub mod identity;
pub mod ids;
pub mod ops;
pub mod protocol;
pub mod replica;
pub mod store;

#[cfg(test)]
mod sim;
pub mod wire;

pub use error::{Error, Result};
pub use ids::{ChangeHash, Cursor, DocId, DocPrefix, Epoch, PeerId};
