//! Work split over scoped threads, for the CPU-bound parts of a replica's commit (verifying
//! signatures, applying changes to independent documents). Where threads cannot be spawned
//! (browsers), every part runs on the calling thread.

use std::sync::Mutex;

/// Runs `work` on each part: the first on the calling thread, the others on scoped threads
/// named `syncline-work`, joined before this returns. A part whose thread could not be
/// spawned runs on the calling thread. Results in part order; `None` for a part whose thread
/// panicked (its part is lost with it).
pub(crate) fn run<T: Send, R: Send>(parts: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<Option<R>> {
    // One slot per part: a thread takes its part out of its slot; a part left in its slot
    // is done here.
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let take = |slot: &Mutex<Option<T>>| slot.lock().ok().and_then(|mut p| p.take()).map(&work);
    let Some((first, rest)) = slots.split_first() else {
        return Vec::new();
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = rest
            .iter()
            .map(|slot| {
                std::thread::Builder::new()
                    .name("syncline-work".into())
                    .spawn_scoped(scope, || take(slot))
                    .ok()
            })
            .collect();
        let mut out = vec![take(first)];
        for (slot, handle) in rest.iter().zip(handles) {
            let joined = handle.and_then(|h| h.join().ok()).flatten();
            out.push(joined.or_else(|| take(slot)));
        }
        out
    })
}

/// Splits `items` into at most `parts` contiguous runs of about equal `weight`.
pub(crate) fn split_by<T>(
    items: Vec<T>,
    parts: usize,
    weight: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let total: usize = items.iter().map(&weight).sum();
    let per = total.div_ceil(parts.max(1)).max(1);
    let mut out: Vec<Vec<T>> = vec![Vec::new()];
    let mut in_part = 0;
    for item in items {
        if in_part >= per {
            out.push(Vec::new());
            in_part = 0;
        }
        in_part += weight(&item);
        if let Some(p) = out.last_mut() {
            p.push(item);
        }
    }
    out
}
