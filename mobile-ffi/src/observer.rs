//! What the app observes: document changes and the sync status, pushed to a
//! [`ReplicaObserver`] it implements. Nothing polls: a task on the runtime waits on the
//! replica's events and on the link's state, and hands notices to one thread of the replica's
//! own that calls the app (so that the app's code never runs on the network thread, and may
//! call the replica back).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use syncline_core::ChangeHash;
use syncline_core::ops::path_to_string;
use syncline_core::replica::{Event, Origin};
use syncline_net::client::ReplicaHandle;
use tokio::sync::{broadcast, mpsc};

use crate::SynclineError;

/// Implemented by the app to learn what changes. Calls come on a background thread of the
/// replica's, one at a time, in order; they may call the replica. They should return quickly
/// (hand work to the app's own queue); an exception thrown from one is logged and dropped.
#[uniffi::export(foreign)]
pub trait ReplicaObserver: Send + Sync {
    /// A document changed: a local write, or a change from another replica through the hub.
    fn on_change(&self, change: DocChange);
    /// The sync status changed (connected, disconnected, uploads acknowledged, caught up...).
    /// Also called once with the current status when the observer is set.
    fn on_status(&self, status: SyncStatus);
    /// The observer fell behind and `missed` notices were dropped: read the documents (and
    /// the status) again.
    fn on_lagged(&self, missed: u64);
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ChangeOrigin {
    /// This replica's app.
    Local,
    /// Another replica, through the hub.
    Remote,
}

/// What changed in a document.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct DocChange {
    /// The document.
    pub doc_id: String,
    /// A local write or a remote change.
    pub origin: ChangeOrigin,
    /// The document's heads now (hex hashes).
    pub heads: Vec<String>,
    /// The properties that changed.
    pub patches: Vec<Patch>,
}

/// One property that changed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Patch {
    /// Its path as a JSON array of map keys and list indexes, as in operations: `["stock"]`.
    pub path: String,
    /// `put`, `delete`, `insert`, `splice`, `increment`, `conflict` or `mark`.
    pub action: String,
}

/// The state of sync.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncStatus {
    /// Sync is started (`start_sync`) and not stopped.
    pub syncing: bool,
    /// A session with a hub is up and authenticated.
    pub connected: bool,
    /// That hub's address, when connected.
    pub hub: Option<String>,
    /// That hub's public key, when connected.
    pub hub_key: Option<String>,
    /// Local changes the hub has not acknowledged yet (they wait in the outbox, durably).
    pub pending_uploads: u64,
    /// Of those, how many the hub refused (no write grant...); offered again next session.
    pub rejected_uploads: u64,
    /// Changes from the hub this replica refused (signed, but breaking a rule Automerge
    /// asserts, such as their author's sequence numbering: a damaged or copied store, or a
    /// hostile author); not applied.
    pub refused_changes: u64,
    /// Connected, nothing pending, and every subscription caught up with the hub.
    pub caught_up: bool,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// When the current or last session started (ms since the Unix epoch).
    pub last_connected_ms: Option<u64>,
    /// Connection attempts since the replica opened.
    pub attempts: u64,
    /// What this replica follows from the hub (`doc:ID`, `prefix:P`).
    pub subscriptions: Vec<String>,
    /// Those caught up in the current session.
    pub synced: Vec<String>,
}

/// The sync status as the replica thread and the link see it now.
pub(crate) async fn status(
    handle: &ReplicaHandle,
    syncing: bool,
) -> Result<SyncStatus, SynclineError> {
    let st = handle.call(|r| r.status()).await??;
    let link = handle.link();
    let connected = link.connected && st.hub.is_some();
    let caught_up =
        connected && st.outbox == 0 && st.subscriptions.iter().all(|s| st.synced.contains(s));
    Ok(SyncStatus {
        syncing,
        connected,
        hub: if connected { link.hub } else { None },
        hub_key: st.hub,
        pending_uploads: st.outbox,
        rejected_uploads: st.rejected,
        refused_changes: st.refused,
        caught_up,
        last_error: link.last_error,
        last_connected_ms: link.last_connected_ms,
        attempts: link.attempts,
        subscriptions: st.subscriptions,
        synced: st.synced,
    })
}

pub(crate) fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(ToString::to_string).collect()
}

/// What the pump hands to the observer thread.
pub(crate) enum Notice {
    Change(DocChange),
    Status(SyncStatus),
    Lagged(u64),
}

/// Asks the pump for something besides events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poke {
    /// The status may have changed (sync started or stopped).
    Status,
    /// Send the status even if unchanged (a new observer).
    Resend,
}

/// The app's observer, if any, shared by the replica object and the observer thread.
pub(crate) type ObserverSlot = Arc<Mutex<Option<Arc<dyn ReplicaObserver>>>>;

/// Events in one batch before the status is computed again (a burst of writes gives one
/// status, not one per write).
const BATCH: usize = 256;
/// Notices waiting for a slow observer, at most; beyond, they are counted and the observer is
/// told how many it missed (`on_lagged`).
pub(crate) const MAX_NOTICES: usize = 1024;

/// The pump's side of the bounded queue to the observer thread. Never blocks the runtime.
pub(crate) struct Notices {
    tx: std::sync::mpsc::SyncSender<Notice>,
    dropped: u64,
}

/// The observer thread is gone (the replica is closing).
struct Gone;

impl Notices {
    pub(crate) fn new(tx: std::sync::mpsc::SyncSender<Notice>) -> Self {
        Notices { tx, dropped: 0 }
    }

    /// Queues `n`; counts it as dropped if the queue is full. Returns whether it was queued.
    fn send(&mut self, n: Notice) -> Result<bool, Gone> {
        use std::sync::mpsc::TrySendError;
        if self.dropped > 0 {
            match self.tx.try_send(Notice::Lagged(self.dropped)) {
                Ok(()) => self.dropped = 0,
                Err(TrySendError::Full(_)) => {
                    self.dropped += 1;
                    return Ok(false);
                }
                Err(TrySendError::Disconnected(_)) => return Err(Gone),
            }
        }
        match self.tx.try_send(n) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                Ok(false)
            }
            Err(TrySendError::Disconnected(_)) => Err(Gone),
        }
    }
}

/// Waits on the replica's events, the link and pokes; sends notices until the replica closes
/// or the observer thread is gone.
pub(crate) async fn pump(
    handle: ReplicaHandle,
    syncing: Arc<std::sync::atomic::AtomicBool>,
    mut pokes: mpsc::Receiver<Poke>,
    mut notices: Notices,
) {
    let mut events = handle.events();
    let mut link = handle.link_changes();
    let mut last: Option<SyncStatus> = None;
    loop {
        let mut due = false;
        let first = tokio::select! {
            e = events.recv() => Some(e),
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                due = true;
                None
            }
            poke = pokes.recv() => {
                match poke {
                    Some(Poke::Resend) => last = None,
                    Some(Poke::Status) => {}
                    None => return,
                }
                due = true;
                None
            }
        };
        let mut next = first;
        let mut taken = 0;
        while let Some(received) = next.take() {
            let notice = match received {
                Ok(Event::DocChanged {
                    doc,
                    origin,
                    heads,
                    patches,
                }) => {
                    // A local write adds to the outbox.
                    due |= origin == Origin::Local;
                    Some(Notice::Change(DocChange {
                        doc_id: doc.to_string(),
                        origin: match origin {
                            Origin::Local => ChangeOrigin::Local,
                            Origin::Remote => ChangeOrigin::Remote,
                        },
                        heads: hex_heads(&heads),
                        patches: patches
                            .into_iter()
                            .map(|p| Patch {
                                path: path_to_string(&p.path),
                                action: p.action.to_owned(),
                            })
                            .collect(),
                    }))
                }
                Ok(Event::Lagged { dropped }) => {
                    due = true;
                    Some(Notice::Lagged(dropped))
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    due = true;
                    Some(Notice::Lagged(missed))
                }
                Err(broadcast::error::RecvError::Closed) => return,
                // Connected, Synced, Rejected, Acknowledged: the status moved.
                Ok(_) => {
                    due = true;
                    None
                }
            };
            if let Some(n) = notice
                && notices.send(n).is_err()
            {
                return;
            }
            taken += 1;
            if taken < BATCH {
                next = match events.try_recv() {
                    Err(broadcast::error::TryRecvError::Empty) => None,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(broadcast::error::TryRecvError::Closed) => return,
                    Ok(e) => Some(Ok(e)),
                };
            }
        }
        if due {
            let on = syncing.load(std::sync::atomic::Ordering::SeqCst);
            match status(&handle, on).await {
                Ok(s) if last.as_ref() != Some(&s) => match notices.send(Notice::Status(s.clone()))
                {
                    Ok(true) => last = Some(s),
                    // Dropped: send it again at the next chance, even if unchanged.
                    Ok(false) => last = None,
                    Err(Gone) => return,
                },
                Ok(_) => {}
                Err(SynclineError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "reading the sync status failed"),
            }
        }
    }
}

/// The observer thread: calls the app's observer with each notice, in order.
pub(crate) fn deliver(slot: ObserverSlot, notices: std::sync::mpsc::Receiver<Notice>) {
    while let Ok(notice) = notices.recv() {
        let observer = slot.lock().ok().and_then(|o| o.clone());
        let Some(observer) = observer else {
            continue;
        };
        // An exception thrown by the app's callback reaches Rust as a panic of the generated
        // code; it must not end this thread (or reach the host as a crash).
        let delivered = std::panic::catch_unwind(AssertUnwindSafe(|| match notice {
            Notice::Change(c) => observer.on_change(c),
            Notice::Status(s) => observer.on_status(s),
            Notice::Lagged(n) => observer.on_lagged(n),
        }));
        if delivered.is_err() {
            tracing::warn!("the app's observer threw; the notice is dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_observer_is_told_how_many_notices_it_missed() {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let mut notices = Notices::new(tx);
        let queued: Vec<bool> = (0..5)
            .map(|n| matches!(notices.send(Notice::Lagged(n)), Ok(true)))
            .collect();
        assert_eq!(queued, [true, true, false, false, false]);
        let drained: Vec<Notice> = rx.try_iter().collect();
        assert_eq!(drained.len(), 2);
        assert!(matches!(notices.send(Notice::Lagged(99)), Ok(true)));
        let next: Vec<u64> = rx
            .try_iter()
            .map(|n| match n {
                Notice::Lagged(k) => k,
                _ => u64::MAX,
            })
            .collect();
        assert_eq!(
            next,
            [3, 99],
            "first how many were missed, then the new notice"
        );
        drop(rx);
        assert!(notices.send(Notice::Lagged(0)).is_err());
    }
}
