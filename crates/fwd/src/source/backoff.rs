//! Retry delays for a failing source: exponential, capped, with jitter, reset on success.
//!
//! The jitter is "equal jitter": half of the exponential step is fixed and half is random. Many
//! hosts that lost the same remote at the same moment then spread their retries out instead of
//! arriving together, while each host still waits at least half the step (full jitter could
//! retry at once, which a remote that is down does not need). The random numbers come from a
//! small xorshift generator seeded per instance; the delays need spreading, not secrecy, and a
//! seed given by a test makes the sequence reproducible.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with jitter: `next_delay` grows from `base` by doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    rng: u64,
}

impl Default for Backoff {
    /// 1 s doubling up to 5 min.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    /// A backoff from `base` up to `max` (`max` below `base` is raised to `base`), seeded from
    /// the process's random hasher keys.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Backoff::with_seed(base, max, hasher.finish())
    }

    /// As [`Backoff::new`], with a fixed seed: the same seed gives the same delays.
    pub fn with_seed(base: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff { base, max: max.max(base), failures: 0, rng: seed | 1 }
    }

    /// The delay before the next retry after one more failure: between half and all of
    /// `min(base * 2^failures, max)`, never more than `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step(self.failures);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 { 0 } else { self.next_random() % (spread + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// Forgets the failures after a success: the next delay starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// `min(base * 2^n, max)`, without overflow.
    fn step(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// xorshift64.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn delays_grow_exponentially_within_half_and_all_of_the_step() {
        let mut b = Backoff::with_seed(S, Duration::from_secs(3600), 7);
        for n in 0..10 {
            let step = S * (1 << n);
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "failure {n}: {d:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        assert_eq!(b.failures(), 10);
    }

    #[test]
    fn delays_are_capped_at_max() {
        let max = Duration::from_secs(30);
        let mut b = Backoff::with_seed(S, max, 42);
        let delays: Vec<_> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        assert!(delays[10..].iter().all(|d| *d >= max / 2), "{delays:?}");
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut a = Backoff::with_seed(S, S * 1000, 1);
        let mut b = Backoff::with_seed(S, S * 1000, 2);
        let da: Vec<_> = (0..8).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(da, db);
        let mut same = Backoff::with_seed(S, S * 1000, 1);
        assert_eq!(da, (0..8).map(|_| same.next_delay()).collect::<Vec<_>>());
    }

    #[test]
    fn reset_starts_over_from_base() {
        let mut b = Backoff::with_seed(S, Duration::from_secs(300), 3);
        for _ in 0..6 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        let d = b.next_delay();
        assert!(d >= S / 2 && d <= S, "{d:?}");
    }

    #[test]
    fn max_below_base_and_zero_base_are_sane() {
        let mut b = Backoff::with_seed(S * 10, S, 5);
        let d = b.next_delay();
        assert!(d >= S * 5 && d <= S * 10, "{d:?}");
        let mut z = Backoff::with_seed(Duration::ZERO, S, 5);
        assert_eq!(z.next_delay(), Duration::ZERO);
    }
}
