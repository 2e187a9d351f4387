//! Work split over scoped threads, for the CPU-bound parts of a replica's commit (verifying
//! signatures, applying changes to independent documents). Where threads cannot be spawned
//! (browsers), every part runs on the calling thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Parts per thread that a caller splits its work into: threads take parts one at a time,
/// so that one finishing early takes the next part instead of waiting for the others.
pub(crate) const PARTS_PER_THREAD: usize = 4;

/// Runs `work` on each part on `threads` threads: the calling thread and up to `threads - 1`
/// scoped threads named `syncline-work`, joined before this returns. Each thread takes the
/// next part as it finishes one. Results in part order; `None` for a part whose work
/// panicked, on any thread (its part is lost with it; the other parts still run).
pub(crate) fn run<T: Send, R: Send>(
    parts: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> R + Sync,
) -> Vec<Option<R>> {
    run_beside(parts, threads.saturating_sub(1), work, || ()).0
}

/// Runs `work` on each part on up to `threads` scoped threads named `syncline-work` while
/// `beside` runs on the calling thread (work of another kind, such as writing to a store
/// only this thread may use); once `beside` is done, the calling thread takes parts too.
/// Each thread takes the next part as it finishes one, so a thread that finishes early
/// takes on what is left instead of waiting. Threads that cannot be spawned leave their
/// parts to the others (at worst, all to the calling thread after `beside`). Results in part
/// order, `None` for a part whose work panicked, and what `beside` returned.
pub(crate) fn run_beside<T: Send, R: Send, B>(
    parts: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> R + Sync,
    beside: impl FnOnce() -> B,
) -> (Vec<Option<R>>, B) {
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let results: Vec<Mutex<Option<R>>> = slots.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    // Takes parts in order until none is left. No lock is held while a part runs.
    let take_parts = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let (Some(slot), Some(result)) = (slots.get(i), results.get(i)) else {
            break;
        };
        if let Some(part) = slot.lock().ok().and_then(|mut p| p.take()) {
            // A part that panics is lost alone: its result stays empty, and this thread
            // goes on to the next part.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(part)));
            if let (Ok(r), Ok(mut out)) = (r, result.lock()) {
                *out = Some(r);
            }
        }
    };
    let b = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(slots.len()))
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("syncline-work".into())
                    .spawn_scoped(scope, take_parts)
                    .ok()
            })
            .collect();
        let b = beside();
        take_parts();
        for h in handles {
            let _ = h.join();
        }
        b
    });
    let out = results
        .into_iter()
        .map(|r| r.into_inner().ok().flatten())
        .collect();
    (out, b)
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
        for threads in [0, 1, 2, 8] {
            let out = run((0..5).collect(), threads, |i: i32| i * 10);
            assert_eq!(out, vec![Some(0), Some(10), Some(20), Some(30), Some(40)]);
            let (out, beside) = run_beside(vec![1, 2], threads, |i: i32| i + 1, || "store");
            assert_eq!(out, vec![Some(2), Some(3)]);
            assert_eq!(beside, "store");
        }
        assert!(run(Vec::<i32>::new(), 2, |i| i).is_empty());
    }

    #[test]
    fn parts_run_on_no_more_threads_than_asked() {
        use std::collections::HashSet;
        for threads in [1, 2, 3] {
            let seen = Mutex::new(HashSet::new());
            let slow = |_: usize| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                if let Ok(mut s) = seen.lock() {
                    s.insert(std::thread::current().id());
                }
            };
            run((0..24).collect(), threads, slow);
            let ran = seen.lock().map(|s| s.len()).unwrap_or(usize::MAX);
            assert!((1..=threads).contains(&ran), "{ran} threads for {threads}");
            let seen_beside = Mutex::new(HashSet::new());
            let (_, ()) = run_beside(
                (0..24).collect(),
                threads,
                |_: usize| {
                    if let Ok(mut s) = seen_beside.lock() {
                        s.insert(std::thread::current().id());
                    }
                },
                || {},
            );
            let ran = seen_beside.lock().map(|s| s.len()).unwrap_or(usize::MAX);
            assert!(
                (1..=threads + 1).contains(&ran),
                "{ran} threads beside {threads}"
            );
        }
    }

    /// The first part waits until every other part is done. With parts dealt out to threads
    /// ahead of time, the parts dealt to its thread could not run before it: it would wait
    /// in vain. Taken one at a time, the other thread takes them all meanwhile.
    #[test]
    fn a_thread_held_up_by_one_part_leaves_the_others_to_the_rest() {
        use std::sync::{Condvar, Mutex};
        use std::time::Duration;
        let parts = 12;
        let done = (Mutex::new(0usize), Condvar::new());
        let work = |i: usize| {
            let (count, cv) = &done;
            let Ok(mut n) = count.lock() else {
                return false;
            };
            if i > 0 {
                *n += 1;
                cv.notify_all();
                return true;
            }
            let waited = cv.wait_timeout_while(n, Duration::from_secs(20), |n| *n < parts - 1);
            waited.is_ok_and(|(_, timeout)| !timeout.timed_out())
        };
        let out = run((0..parts).collect(), 2, work);
        assert_eq!(out, vec![Some(true); parts]);
        // Beside: the spawned thread holds up on the first part while the calling thread,
        // once its own work is done, takes the rest.
        if let Ok(mut n) = done.0.lock() {
            *n = 0;
        }
        let (out, beside) = run_beside((0..parts).collect(), 1, work, || "stored");
        assert_eq!(out, vec![Some(true); parts]);
        assert_eq!(beside, "stored");
    }

    #[test]
    fn a_part_that_panics_is_lost_alone_on_any_thread() {
        for threads in [1, 2, 3] {
            let out = run((0..8).collect(), threads, |i: i32| {
                assert!(i % 3 != 1, "part {i} fails");
                i
            });
            let want: Vec<Option<i32>> = (0..8).map(|i| (i % 3 != 1).then_some(i)).collect();
            assert_eq!(out, want, "with {threads} threads");
        }
    }
}
