//! The IoT gateway daemon (syncline-edge): QUIC client, local HTTP API, CLI. Not built yet: see issue 4.
//!
//! Nothing here yet: this crate only reserves its place in the workspace, and claims no
//! feature. The engine it will wrap is `syncline-core`.
