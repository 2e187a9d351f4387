//! Work split over scoped threads, for the CPU-bound parts of a replica's commit (verifying
//! signatures, applying changes to independent documents). Where threads cannot be spawned
//! (browsers), every part runs on the calling thread.

use std::sync::Mutex;

/// Runs `work` on each part: the first on the calling thread, the others on scoped threads
/// named `syncline-work`, joined before this returns. A part whose thread could not be
/// spawned runs on the calling thread. Results in part order; `None` for a part whose thread
/// panicked (its part is lost with it).
pub(crate) fn run<T: Send, R: Send>(
    mut parts: Vec<T>,
    work: impl Fn(T) -> R + Sync,
) -> Vec<Option<R>> {
    if parts.is_empty() {
        return Vec::new();
    }
    let first = parts.remove(0);
    let (mut out, first) = run_beside(parts, &work, || work(first));
    out.insert(0, Some(first));
    out
}

/// Runs `work` on each part on a scoped thread of its own while `beside` runs on the calling
/// thread (work of another kind, such as writing to a store only this thread may use). Parts
/// whose thread could not be spawned run on the calling thread after `beside`. Results in
/// part order, `None` for a part whose thread panicked, and what `beside` returned.
pub(crate) fn run_beside<T: Send, R: Send, B>(
    parts: Vec<T>,
    work: impl Fn(T) -> R + Sync,
    beside: impl FnOnce() -> B,
) -> (Vec<Option<R>>, B) {
    // One slot per part: a thread takes its part out of its slot; a part left in its slot
    // is done here.
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let take = |slot: &Mutex<Option<T>>| slot.lock().ok().and_then(|mut p| p.take()).map(&work);
    std::thread::scope(|scope| {
        let handles: Vec<_> = slots
            .iter()
            .map(|slot| {
                std::thread::Builder::new()
                    .name("syncline-work".into())
                    .spawn_scoped(scope, || take(slot))
                    .ok()
            })
            .collect();
        let b = beside();
        let out = slots
            .iter()
            .zip(handles)
            .map(|(slot, handle)| {
                let joined = handle.and_then(|h| h.join().ok()).flatten();
                joined.or_else(|| take(slot))
            })
            .collect();
        (out, b)
    })
}

/// Splits `items` into at most `parts` contiguous runs of about equal `weight`: a run ends
/// once it holds its share, or before an item that would take it past its share.
pub(crate) fn split_by<T>(
    items: Vec<T>,
    parts: usize,
    weight: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let parts = parts.max(1);
    let total: usize = items.iter().map(&weight).sum();
    let per = total.div_ceil(parts).max(1);
    let mut out: Vec<Vec<T>> = vec![Vec::new()];
    let mut in_part = 0;
    for item in items {
        let w = weight(&item);
        if w > 0 && in_part > 0 && in_part + w > per && out.len() < parts {
            out.push(Vec::new());
            in_part = 0;
        }
        in_part += w;
        if let Some(p) = out.last_mut() {
            p.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_contiguous_balanced_and_never_more_than_asked() {
        let split = |w: Vec<usize>, n| split_by(w, n, |x| *x);
        assert_eq!(split(vec![3, 150], 2), vec![vec![3], vec![150]]);
        assert_eq!(split(vec![150, 3], 2), vec![vec![150], vec![3]]);
        assert_eq!(split(vec![1; 10], 2), vec![vec![1; 5], vec![1; 5]]);
        assert_eq!(split(vec![0, 0, 5, 0], 3).len(), 1);
        assert_eq!(split(vec![4, 4, 4, 4, 4], 2).len(), 2);
        assert!(split(Vec::new(), 2).iter().all(Vec::is_empty));
        let order: Vec<usize> = split((0..20).collect(), 3).concat();
        assert_eq!(order, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn every_part_runs_once_and_results_keep_their_order() {
        let out = run((0..5).collect(), |i: i32| i * 10);
        assert_eq!(out, vec![Some(0), Some(10), Some(20), Some(30), Some(40)]);
        let (out, beside) = run_beside(vec![1, 2], |i: i32| i + 1, || "store");
        assert_eq!(out, vec![Some(2), Some(3)]);
        assert_eq!(beside, "store");
    }
}
