//! Mobile bindings via UniFFI (syncline-ffi). Not built yet: see issue 6.
//!
//! Nothing here yet: this crate only reserves its place in the workspace, and claims no
//! feature. The engine it will wrap is `syncline-core`.
