//! What a render's values come from, watched: one task per group of a
//! backend's sources (blocking queries, polls, lease changes), each
//! backend's background work (Vault's lease scheduler), and a file watcher
//! on the templates and `file:` sources, all as one stream of [`Event`]s.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::files::{WatchedFiles, watch_files};
use crate::backend::{
    Backend, ErrorKind, FetchError, Fetched, Observation, Seen, WatchGroup, poll_delay,
};
use crate::backoff::Backoff;
use crate::engine::Settings;
use crate::reference::{Scheme, Source};
use crate::resolve::{FetchResults, Resolver};

/// How many events may wait for the main loop. Watchers wait for room, so a
/// burst of changes slows the looks at backends rather than growing a queue.
const EVENT_QUEUE: usize = 64;

/// Between looks at a backend that failed: 1 s doubling to 30 s, ±20 %.
const WATCH_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(0.8, 1.2);

/// Something a render may need to know.
pub enum Event {
    /// A backend looked at its sources.
    Observed {
        /// The backend's name.
        backend: &'static str,
        /// Which of the backend's watchers looked (see [`crate::backend::Watching::watch_groups`]).
        watcher: usize,
        /// The sources whose values changed, with the new values (a
        /// `NotFound` error: the value is gone).
        changed: Vec<(Source, Result<Fetched, FetchError>)>,
        /// The sources whose leases were extended, value unchanged.
        renewed: Vec<(Source, Fetched)>,
        /// The sources that could not be looked at, and why.
        failed: Vec<(Source, FetchError)>,
    },
    /// Something changed in a watched directory.
    Files,
}

/// The watches of one render's sources; dropped, every task stops.
pub struct Sources {
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    watchers: JoinSet<()>,
    /// Background work of the backends (Vault's lease scheduler), once per
    /// backend.
    background: JoinSet<()>,
    started: BTreeSet<&'static str>,
    /// The sources watched, and whether each is pushed.
    watching: BTreeSet<(Source, bool)>,
    files: Option<(WatchedFiles, notify::RecommendedWatcher)>,
}

impl Default for Sources {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        Sources {
            tx,
            rx,
            watchers: JoinSet::new(),
            background: JoinSet::new(),
            started: BTreeSet::new(),
            watching: BTreeSet::new(),
            files: None,
        }
    }
}

impl Sources {
    /// Watches what `cache` holds (backend watches restarted only when the
    /// set of sources changed) and the files of `settings`. Returns how
    /// many sources are watched.
    pub fn follow(
        &mut self,
        resolver: &Resolver,
        settings: &Settings,
        cache: &FetchResults,
    ) -> usize {
        let layout: Layout = watched(resolver, cache)
            .into_iter()
            .map(|(backend, sources)| {
                let groups = backend
                    .watching()
                    .map(|w| w.watch_groups(&sources))
                    .unwrap_or_default();
                (backend, sources, groups)
            })
            .collect();
        // Restarted when a source comes or goes, or moves between pushed
        // and polled (a Vault source that turned out to be a lease); the
        // values are copied for the watchers only then.
        let now_watched: BTreeSet<(Source, bool)> = layout
            .iter()
            .flat_map(|(_, sources, groups)| {
                groups.iter().flat_map(move |g| {
                    g.members
                        .iter()
                        .filter_map(move |&i| Some((sources.get(i)?.clone(), g.pushed)))
                })
            })
            .collect();
        if now_watched != self.watching {
            self.start_watches(layout, cache);
            self.watching = now_watched;
        }
        let inputs = WatchedFiles::new(settings, cache, resolver.local_values_file());
        if self.files.as_ref().is_none_or(|(w, _)| *w != inputs) {
            let tx = self.tx.clone();
            // notify's own thread: waiting for room is fine there.
            self.files = watch_files(&inputs, move || {
                let _ = tx.blocking_send(Event::Files);
            })
            .map(|w| (inputs, w));
        }
        self.watching.len()
    }

    /// Only the backends' background work for what `cache` holds: leases
    /// kept alive, nothing watched.
    pub fn keep_alive(&mut self, resolver: &Resolver, cache: &FetchResults) {
        let fetched = cache.iter().filter(|(_, r)| r.is_ok());
        for backend in fetched.filter_map(|(s, _)| watcher_of(resolver, s)) {
            self.start_background(&backend);
        }
    }

    /// The next event. Cancel-safe: an event is either returned or left
    /// queued.
    pub async fn next(&mut self) -> Event {
        match self.rx.recv().await {
            Some(event) => event,
            // `self` holds a sender: the channel never closes.
            None => std::future::pending().await,
        }
    }

    fn start_background(&mut self, backend: &Arc<dyn Backend>) {
        if self.started.insert(backend.name())
            && let Some(work) = backend.watching().and_then(|w| w.background())
        {
            self.background.spawn(work);
        }
    }

    /// One task per watch group of each backend, replacing those running.
    fn start_watches(&mut self, layout: Layout, cache: &FetchResults) {
        self.watchers.abort_all();
        for (backend, sources, groups) in layout {
            self.start_background(&backend);
            for (watcher, group) in groups.into_iter().enumerate() {
                let known: Vec<(Source, Seen)> = group
                    .members
                    .iter()
                    .filter_map(|&i| {
                        let source = sources.get(i)?;
                        Some((source.clone(), cache.get(source)?.as_ref().ok().cloned()))
                    })
                    .collect();
                if known.is_empty() {
                    continue;
                }
                let watch = Watcher {
                    backend: backend.clone(),
                    watcher,
                    known,
                    tx: self.tx.clone(),
                };
                if group.pushed {
                    self.watchers.spawn(watch.pushed());
                } else {
                    self.watchers.spawn(watch.polled());
                }
            }
        }
    }
}

/// Each watching backend's sources, and how its watchers group them.
type Layout = Vec<(Arc<dyn Backend>, Vec<Source>, Vec<WatchGroup>)>;

/// The sources held (fetched, or found absent), by the backend that watches
/// them, sorted; local ones (`file:` sources are watched through the file
/// system, the local values file likewise) are left out.
fn watched(resolver: &Resolver, cache: &FetchResults) -> Vec<(Arc<dyn Backend>, Vec<Source>)> {
    let mut by_backend: HashMap<&'static str, (Arc<dyn Backend>, Vec<Source>)> = HashMap::new();
    for (source, r) in cache {
        if matches!(r, Err(e) if e.kind != ErrorKind::NotFound) {
            continue;
        }
        let Some(backend) = watcher_of(resolver, source) else {
            continue;
        };
        by_backend
            .entry(backend.name())
            .or_insert_with(|| (backend.clone(), Vec::new()))
            .1
            .push(source.clone());
    }
    let mut out: Vec<_> = by_backend.into_values().collect();
    for (_, sources) in &mut out {
        sources.sort();
    }
    out
}

/// The backend that follows `source` in watch mode: none for `file:`
/// sources (the file watcher sees them), sources the local values file
/// answers, found or not (the file is watched; in airplane mode nothing goes
/// to the network), and backends that cannot watch.
fn watcher_of(resolver: &Resolver, source: &Source) -> Option<Arc<dyn Backend>> {
    if source.scheme == Scheme::File || resolver.answers_locally(source) {
        return None;
    }
    let backend = resolver.backends().get(source.scheme).ok()?;
    backend.watching().is_some().then_some(backend)
}

/// One watch group of one backend: its sources, what was last seen of
/// them, and where to report.
struct Watcher {
    backend: Arc<dyn Backend>,
    watcher: usize,
    known: Vec<(Source, Seen)>,
    tx: mpsc::Sender<Event>,
}

impl Watcher {
    /// Looks at the sources again and again: at once for backends whose
    /// queries block until a change (they pace their own retries), else
    /// every poll interval (jittered), after errors with exponential
    /// backoff.
    async fn polled(mut self) {
        let backend = self.backend.clone();
        let Some(watching) = backend.watching() else {
            return;
        };
        let mut errors = 0u32;
        loop {
            if watching.blocks() {
                // Blocking queries pace themselves, errors included.
            } else if errors > 0 {
                tokio::time::sleep(WATCH_BACKOFF.delay(errors - 1)).await;
            } else {
                tokio::time::sleep(poll_delay(watching.poll_interval())).await;
            }
            let observations = watching.observe(&self.known).await;
            let failed = self.report(observations).await;
            let Some(failed) = failed else { return };
            errors = if failed { errors + 1 } else { 0 };
        }
    }

    /// Looks at sources the backend keeps itself each time it announces a
    /// change: no request, so no backoff; a value it re-issued is reported
    /// the moment it is announced.
    async fn pushed(mut self) {
        let backend = self.backend.clone();
        let Some(watching) = backend.watching() else {
            return;
        };
        let Some(mut changes) = watching.changes() else {
            return;
        };
        loop {
            changes.borrow_and_update();
            let observations = watching.observe(&self.known).await;
            if self.report(observations).await.is_none() || changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Keeps what changed and sends what was observed; whether anything
    /// failed, or `None` when the receiver is gone.
    async fn report(&mut self, observations: Vec<Observation>) -> Option<bool> {
        let mut changed = Vec::new();
        let mut renewed = Vec::new();
        let mut failed = Vec::new();
        for ((source, seen), o) in self.known.iter_mut().zip(observations) {
            match o {
                Observation::Unchanged => {}
                Observation::Renewed(new) => {
                    *seen = Some(new.clone());
                    renewed.push((source.clone(), new));
                }
                Observation::Changed(new) => {
                    *seen = Some(new.clone());
                    changed.push((source.clone(), Ok(new)));
                }
                Observation::Gone(e) => {
                    *seen = None;
                    changed.push((source.clone(), Err(e)));
                }
                Observation::Failed(e) => failed.push((source.clone(), e)),
            }
        }
        let any_failed = !failed.is_empty();
        let event = Event::Observed {
            backend: self.backend.name(),
            watcher: self.watcher,
            changed,
            renewed,
            failed,
        };
        self.tx.send(event).await.ok().map(|()| any_failed)
    }
}
