//! Browser bindings (syncline-wasm). Not built yet: see issue 5.
//!
//! Nothing here yet: this crate only reserves its place in the workspace, and claims no
//! feature. The engine it will wrap is `syncline-core`.
