//! One exponential backoff for every retry: fetches within a deadline,
//! watches of backends, failed renders, lease and token renewals, and a
//! command started again after it exited.

use std::time::Duration;

/// Delays that double from `first` up to `max`, each drawn at random from
/// a share of its step, so a fleet that failed together does not retry in
/// step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    low: f64,
    high: f64,
}

impl Backoff {
    /// `first`, doubling up to `max`, without jitter.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            low: 1.0,
            high: 1.0,
        }
    }

    /// Each delay drawn between `low` and `high` times its step (0.5 and
    /// 1.0: somewhere in its second half).
    pub const fn jitter(mut self, low: f64, high: f64) -> Backoff {
        self.low = low;
        self.high = high;
        self
    }

    /// The delay before retry number `attempt`, counted from 0.
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        if self.low == self.high {
            return step.mul_f64(self.low);
        }
        step.mul_f64(self.low + fastrand::f64() * (self.high - self.low))
    }
}

/// Sleeps until `at`; with `None`, for ever (a branch of `select!` that is
/// off).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_bound_within_their_jitter() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let secs: Vec<u64> = (0..8).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
        let j = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).jitter(0.5, 1.0);
        for attempt in 0..10 {
            let step = Duration::from_millis(200 << attempt).min(Duration::from_secs(5));
            let d = j.delay(attempt);
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?}");
        }
    }
}
