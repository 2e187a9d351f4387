//! Exponential backoff with jitter, so a fleet that lost its hub does not reconnect in
//! lockstep.

use std::time::Duration;

use rand::Rng;

/// Waits that double from `min` to `max`, each scaled by a random factor in [0.5, 1.5).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next wait (jittered); the one after it is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        let d = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest wait (after a session that lasted).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bases = [100, 200, 400, 800, 800, 800];
        for (w, base) in waits.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *w >= base.mul_f64(0.5) && *w < base.mul_f64(1.5),
                "{w:?} vs {base:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(150));
    }
}
