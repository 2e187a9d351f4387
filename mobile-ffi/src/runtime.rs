//! The library's one tokio runtime: quinn's sockets and timers, the sync tasks and the
//! observers' event pumps of every open replica run on it. It is small (one worker thread: a
//! phone talks to one hub at a time) and lives as long as the process. The store itself runs
//! on each replica's own thread, never on the runtime.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

use crate::SynclineError;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime, started on first use.
pub(crate) fn runtime() -> Result<&'static Runtime, SynclineError> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(2)
                .thread_name("syncline-net")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| SynclineError::Runtime(format!("cannot start the network threads: {e}")))
}
