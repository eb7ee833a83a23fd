//! Vault's durations as envrender believes them: clamped, with the clock
//! and jitter that schedule renewals and logins.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::time::Instant;

use crate::backoff::Backoff;

/// Unix time in seconds, as the lease scheduler reads it: tokio's clock,
/// anchored to the wall clock once per process. Times are kept as Unix
/// seconds because they cross a process boundary (the state file handed
/// from the init container to the sidecar); they move with tokio's clock,
/// so the scheduler runs under paused time in tests, and a wall clock that
/// jumps (NTP, a VM resumed) does not reschedule every lease.
pub fn now() -> f64 {
    static ANCHOR: OnceLock<(f64, Instant)> = OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        (wall, Instant::now())
    });
    let now = Instant::now();
    match now.checked_duration_since(at) {
        Some(after) => wall + after.as_secs_f64(),
        None => wall - at.duration_since(now).as_secs_f64(),
    }
}

/// The longest lease or token TTL envrender believes: Vault's default
/// `max_lease_ttl` (768h). A longer one is renewed or re-read as if it
/// were this long, so a server that sends 2^64 - 1 still gets its lease
/// renewed, and no arithmetic on it can overflow.
pub const MAX_TTL: u64 = 768 * 3600;

/// The shortest: a TTL of 0 or less than a second (with a lease to keep)
/// counts as one second, and answers that keep coming back this short are
/// re-issued with exponential backoff ([`Held::short_answers`]).
pub const MIN_TTL: u64 = 1;

/// The longest certificate lifetime believed (ten years): a NotAfter
/// further out is treated as this far.
pub const MAX_CERT_LIFETIME: u64 = 10 * 365 * 24 * 3600;

/// The least wait before the next renewal, re-issue or token refresh after
/// `short` short answers in a row: 0, then 1 s, 2 s, 4 s … up to 5 minutes.
pub fn short_backoff(short: u32) -> f64 {
    match short {
        0 => 0.0,
        n => SHORT_BACKOFF.delay(n - 1).as_secs_f64(),
    }
}

/// A TTL under this many seconds is "short" ([`Held::short_answers`]).
pub const SHORT_TTL: u64 = 2;

/// Those waits: 1 s doubling to 5 minutes.
const SHORT_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// A duration in seconds as Vault sent it (a number, or a string of
/// digits), clamped to `0..=MAX_TTL`; anything else is 0.
pub fn seconds(v: &Value) -> u64 {
    let n = v
        .as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
        .unwrap_or(0.0);
    if n.is_nan() || n <= 0.0 {
        0
    } else {
        n.min(MAX_TTL as f64) as u64
    }
}

/// A random number in `[lo, hi)`.
pub fn jitter(lo: f64, hi: f64) -> f64 {
    lo + fastrand::f64() * (hi - lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_schedulers_clock_is_tokios() {
        let before = now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = now();
        assert!((after - before - 3600.0).abs() < 1.0, "{}", after - before);
        // And it is Unix time: within a day of the wall clock's.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((after - wall).abs() < 86_400.0);
    }

    #[test]
    fn durations_are_clamped_and_backoffs_double() {
        assert_eq!(seconds(&serde_json::json!(u64::MAX)), MAX_TTL);
        assert_eq!(seconds(&serde_json::json!("-5")), 0);
        assert_eq!(seconds(&serde_json::json!("42")), 42);
        assert_eq!(short_backoff(0), 0.0);
        assert_eq!(short_backoff(1), 1.0);
        assert_eq!(short_backoff(4), 8.0);
        assert_eq!(short_backoff(100), 300.0);
    }
}
