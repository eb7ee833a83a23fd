//! When the next render is due: at once, after a quiet period following
//! changes (never later than a bound), or after a backoff following a
//! failure.

use std::time::Duration;

use tokio::time::Instant;

/// How long files must be quiet before they are read: a file written in
/// place (truncated, then written) must not be read half-way.
const FILES_SETTLE: Duration = Duration::from_millis(100);

/// When the next render is due: at once (start, reload), after a quiet
/// period following changes but never later than the bound, or after a
/// backoff following a failure.
pub struct Debounce {
    wait: (Duration, Duration),
    /// A random extra delay up to this, drawn for each batch of changes, so
    /// a fleet does not act in step.
    splay: Duration,
    offset: Duration,
    pending: bool,
    /// Template or `file:` sources changed: read them again before the
    /// render, and only once they have been quiet for [`FILES_SETTLE`].
    files: bool,
    first: Option<Instant>,
    last: Instant,
    retry_at: Option<Instant>,
}

impl Debounce {
    pub fn new(wait: (Duration, Duration)) -> Self {
        Debounce {
            wait,
            splay: Duration::ZERO,
            offset: Duration::ZERO,
            pending: false,
            files: false,
            first: None,
            last: Instant::now(),
            retry_at: None,
        }
    }

    pub fn with_splay(mut self, splay: Duration) -> Self {
        self.splay = splay;
        self
    }

    /// Render as soon as possible.
    pub fn now(&mut self) {
        self.pending = true;
        self.first = None;
        self.retry_at = None;
    }

    /// Something changed.
    pub fn changed(&mut self) {
        if !self.pending {
            self.first = Some(Instant::now());
            self.offset = self.splay.mul_f64(fastrand::f64());
            if !self.splay.is_zero() {
                tracing::info!(
                    splay_ms = self.offset.as_millis() as u64,
                    "changes: rendering after a random delay (splay)"
                );
            }
        }
        self.last = Instant::now();
        self.pending = true;
    }

    /// The render failed: again after `backoff`.
    pub fn retry(&mut self, backoff: Duration) {
        self.pending = true;
        self.retry_at = Some(Instant::now() + backoff);
    }

    /// Files changed (see [`Debounce::files`]).
    pub fn files_changed(&mut self) {
        self.changed();
        self.files = true;
    }

    /// The render is starting; true when files must be read again.
    pub fn done(&mut self) -> bool {
        self.pending = false;
        self.first = None;
        self.retry_at = None;
        std::mem::take(&mut self.files)
    }

    pub fn due(&self) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        let mut settled = match self.first {
            Some(first) => (self.last + self.wait.0).min(first + self.wait.1) + self.offset,
            None => Instant::now(),
        };
        if self.files {
            settled = settled.max(self.last + FILES_SETTLE);
        }
        Some(self.retry_at.map_or(settled, |r| r.max(settled)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debounce_waits_for_quiet_but_not_forever() {
        let mut d = Debounce::new((Duration::from_secs(2), Duration::from_secs(5)));
        assert_eq!(d.due(), None);
        let start = Instant::now();
        d.changed();
        assert_eq!(d.due(), Some(start + Duration::from_secs(2)));
        // Changes every second keep putting it off, up to the bound.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            d.changed();
        }
        assert_eq!(d.due(), Some(start + Duration::from_secs(5)));
        d.done();
        assert_eq!(d.due(), None);
        // A splay adds at most its length.
        let mut d =
            Debounce::new((Duration::ZERO, Duration::ZERO)).with_splay(Duration::from_secs(10));
        d.changed();
        let due = d.due().unwrap();
        assert!(due >= Instant::now() && due <= Instant::now() + Duration::from_secs(10));
        d.retry(Duration::from_secs(30));
        assert!(d.due().unwrap() >= Instant::now() + Duration::from_secs(30));
        // Files are read only once quiet, and the render is told to read them.
        let mut d = Debounce::new((Duration::ZERO, Duration::ZERO));
        d.files_changed();
        assert_eq!(d.due(), Some(Instant::now() + FILES_SETTLE));
        assert!(d.done());
        d.changed();
        assert!(!d.done());
    }
}
