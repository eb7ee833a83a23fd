//! The [`Refresher`]: what `watch` and a refreshing `run` share. It holds
//! the plan, the values last fetched, their [`Sources`] and the
//! [`Debounce`]; [`Refresher::due`] takes in changes until a render falls
//! due, and [`Refresher::render`] renders from the values held and commits
//! what changed. What to do with the changed files is the caller's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::debounce::Debounce;
use super::sources::{Event, Sources};
use crate::backend::Fetched;
use crate::backoff::Backoff;
use crate::engine::{Plan, Settings};
use crate::error::Error;
use crate::health::Health;
use crate::output::Status;
use crate::reference::Scheme;
use crate::resolve::{FetchResults, Resolver};

/// Between renders that failed: 2 s doubling to 32 s.
const RENDER_BACKOFF: Backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(32));

/// Renders again when what the outputs use changes.
pub struct Refresher<'a> {
    resolver: &'a Resolver,
    settings: Settings,
    plan: Plan,
    /// The values last fetched, by source.
    cache: FetchResults,
    health: Arc<Health>,
    debounce: Debounce,
    sources: Sources,
    /// Renders that failed in a row.
    failures: u32,
}

impl<'a> Refresher<'a> {
    /// A refresher of `plan` (built from `settings`) whose values so far
    /// are `cache`; `wait` is the quiet period and its bound, `splay` a
    /// random extra delay before each render after changes. Nothing is
    /// watched until [`Refresher::follow`] or the first render.
    pub fn new(
        resolver: &'a Resolver,
        settings: Settings,
        plan: Plan,
        cache: FetchResults,
        health: Arc<Health>,
        wait: (Duration, Duration),
        splay: Duration,
    ) -> Self {
        Refresher {
            resolver,
            settings,
            plan,
            cache,
            health,
            debounce: Debounce::new(wait).with_splay(splay),
            sources: Sources::default(),
            failures: 0,
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The plan in use.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Render as soon as possible.
    pub fn render_now(&mut self) {
        self.debounce.now();
    }

    /// Watches the sources of the values held, and the files.
    pub fn follow(&mut self) {
        let n = self
            .sources
            .follow(self.resolver, &self.settings, &self.cache);
        self.health.set_watched(n);
    }

    /// New settings (SIGHUP): in use, and rendered at once, when their
    /// templates compile; otherwise the running ones stay.
    pub fn reload(&mut self, settings: Settings) -> Result<(), Error> {
        self.plan = Plan::new(&settings)?;
        self.settings = settings;
        reread_values(self.resolver, &mut self.cache, &self.health);
        self.debounce.now();
        Ok(())
    }

    /// Takes in changes until a render is due. Cancel-safe: dropped, it
    /// loses nothing.
    pub async fn due(&mut self) {
        loop {
            let due = self.debounce.due();
            tokio::select! {
                event = self.sources.next() => apply(event, self.resolver, &mut self.cache, &mut self.debounce, &self.health),
                _ = crate::backoff::sleep_until(due) => return,
            }
        }
    }

    /// Renders from the values held, fetching only what is missing, and
    /// commits what changed. `None`: nothing was rendered (a template no
    /// longer compiles, or the render failed: the last good outputs stay,
    /// the health says why, and it is tried again after a backoff).
    /// Dropped, it abandons the render: outputs are committed whole or
    /// not at all.
    pub async fn render(&mut self) -> Option<Cycle> {
        if self.debounce.done() && !self.reload_plan() {
            return None;
        }
        let outcome = render_cycle(
            &self.plan,
            self.resolver,
            &self.settings,
            &mut self.cache,
            &self.health,
        )
        .await;
        release_freed_memory();
        match outcome {
            Ok(mut cycle) => {
                self.failures = 0;
                self.health.problem("render", None);
                self.health.problem("templates", None);
                if !self.health.set_ready() {
                    tracing::info!("first complete render done; watching");
                    // A file created now is one no app has read yet (a
                    // native sidecar renders before the app starts): only a
                    // file replaced under a running app (a restarted
                    // sidecar) calls for its actions.
                    cycle.written = cycle.replaced.clone();
                }
                self.follow();
                Some(cycle)
            }
            Err(e) => {
                let backoff = RENDER_BACKOFF.delay(self.failures);
                self.failures = self.failures.saturating_add(1);
                tracing::error!(
                    retry_in_s = backoff.as_secs(),
                    "render failed; the outputs were left as they were:\n{e}"
                );
                self.health.problem("render", Some(e.to_string()));
                self.health.render_failed();
                self.debounce.retry(backoff);
                None
            }
        }
    }

    /// Reads and compiles the templates again; when one no longer
    /// compiles, the plan in use stays, the health says why, and false says
    /// not to render.
    fn reload_plan(&mut self) -> bool {
        match Plan::new(&self.settings) {
            Ok(p) => {
                self.plan = p;
                true
            }
            Err(e) => {
                tracing::error!(
                    "a template no longer compiles; keeping the last good outputs:\n{e}"
                );
                self.health.problem("templates", Some(e.to_string()));
                false
            }
        }
    }
}

/// Takes in one event: changed values into `cache` and failures into
/// `health`; a render falls due in `debounce` when something changed.
fn apply(
    event: Event,
    resolver: &Resolver,
    cache: &mut FetchResults,
    debounce: &mut Debounce,
    health: &Health,
) {
    match event {
        Event::Observed {
            backend,
            watcher,
            changed,
            renewed,
            failed,
        } => {
            // Each watcher's trouble is its own: one that is fine does not
            // clear another's. Readiness shows the part before '#'.
            let key = format!("{backend}#{watcher}");
            health.observed(backend, failed.is_empty());
            if let Some((source, e)) = failed.first() {
                tracing::warn!(backend, reference = %source, error = %e, "cannot look for changes; keeping the last good outputs");
                health.problem(&key, Some(format!("{source}: {e}")));
            } else {
                health.problem(&key, None);
            }
            if !changed.is_empty() {
                debounce.changed();
            }
            for (source, fetched) in renewed {
                if let Some(lease) = &fetched.lease {
                    health.lease_renewed(&source.to_string(), lease.expires);
                }
                cache.insert(source, Ok(fetched));
            }
            for (source, fetched) in changed {
                if fetched.is_ok() {
                    tracing::info!(backend, reference = %source, "changed");
                } else {
                    tracing::info!(backend, reference = %source, "gone");
                }
                cache.insert(source, fetched);
            }
        }
        Event::Files => {
            tracing::debug!("watched files changed");
            cache.retain(|s, _| s.scheme != Scheme::File);
            reread_values(resolver, cache, health);
            debounce.files_changed();
        }
    }
}

/// Reads the local values file again, if there is one, so that what it
/// answers is answered afresh; one that no longer loads leaves the values
/// in use, and the health says why.
fn reread_values(resolver: &Resolver, cache: &mut FetchResults, health: &Health) {
    match resolver.reload_local_values(cache) {
        Ok(()) => health.problem("values", None),
        Err(e) => {
            tracing::error!(
                "the local values file no longer loads; keeping the values in use:\n{e}"
            );
            health.problem("values", Some(e.to_string()));
        }
    }
}

/// What one render did.
pub struct Cycle {
    /// The files written because their content or attributes changed.
    pub written: Vec<PathBuf>,
    /// Of `written`, the files that existed before (not created).
    pub replaced: Vec<PathBuf>,
    /// The `[env]` values, for `run`.
    pub env: Vec<(String, String)>,
}

/// Hands the memory a render freed (answers, rendered text) back to the
/// system. glibc's allocator keeps freed pages for reuse, so a sidecar
/// would otherwise idle holding its render's peak (36.3 MB anonymous memory
/// before, 33.8 MB after, with 10,000 watched values in the benchmark
/// suite); the pages returned are zeroed, so no value lingers in them.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is
    // safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// One render from the values held (fetching only what is missing), and
/// a commit of what changed.
async fn render_cycle(
    plan: &Plan,
    resolver: &Resolver,
    settings: &Settings,
    cache: &mut FetchResults,
    health: &Health,
) -> Result<Cycle, Error> {
    let started = Instant::now();
    let resolution = plan
        .resolve_with(resolver, started + settings.timeout, cache.clone())
        .await?;
    let writes = plan.outputs(&resolution)?;
    let statuses = crate::action::commit_checked(&writes).await?;
    let env = plan.env_vars(&resolution);
    *cache = resolution.fetched;
    crate::resolve::keep_answers(cache);
    let mut leases = BTreeMap::new();
    for (source, r) in cache.iter() {
        if let Ok(Fetched {
            lease: Some(lease), ..
        }) = r
        {
            leases.insert(source.to_string(), lease.expires);
        }
    }
    let mut written = Vec::new();
    let mut replaced = Vec::new();
    for (w, status) in writes.iter().zip(&statuses) {
        if *status != Status::Unchanged {
            written.push(w.path.clone());
            if *status != Status::Created {
                replaced.push(w.path.clone());
            }
            tracing::info!(path = %w.path.display(), from = %w.origin, bytes = w.contents.len(), "{status}");
        }
    }
    health.rendered(written.len(), leases);
    tracing::info!(
        outputs = writes.len(),
        written = written.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "render complete"
    );
    Ok(Cycle {
        written,
        replaced,
        env,
    })
}
