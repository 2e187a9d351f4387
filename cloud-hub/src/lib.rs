//! The hub service (syncline-hub): QUIC and WebSocket servers, grants, metrics. Not built yet: see issue 4.
//!
//! Nothing here yet: this crate only reserves its place in the workspace, and claims no
//! feature. The engine it will wrap is `syncline-core`.
