//! `envrender watch`: render, then keep the outputs fresh.
//!
//! After a first complete render, one task per backend watches the values the
//! outputs use — Consul through blocking queries, Vault through its lease
//! scheduler and KV re-reads, SSM and Secrets Manager by polling — and a
//! notify watcher looks at the directories of the template files and `file:`
//! sources (a directory, so Kubernetes' `..data` symlink swaps are seen).
//! Changes are debounced (`--wait MIN[:MAX]`), the outputs are rendered again
//! from the values held, changed ones are committed together, and then the
//! actions run once. A backend that fails leaves the last good outputs in
//! place, marks the process degraded (`/readyz`), and is retried; it recovers
//! by itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backend::{Backend, FetchError, Fetched, Observation, poll_delay};
use crate::engine::{Plan, Settings};
use crate::error::Error;
use crate::output::{self, Status};
use crate::reference::{Scheme, Source};
use crate::resolve::{FetchResults, Resolver};

/// What watch mode does besides rendering.
#[derive(Clone, Debug, Default)]
pub struct WatchSettings {
    /// Quiet period after a change before rendering, and the longest a
    /// stream of changes can put a render off.
    pub wait: (Duration, Duration),
    pub actions: Vec<Action>,
    pub listen: Option<SocketAddr>,
    /// Credential variables the commands of actions get anyway (see
    /// [`crate::environment::scrubbed_for_commands`]).
    pub keep_env: Vec<String>,
}

/// What to do after outputs changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a signal to the processes found by a PID file or by name.
    Signal {
        signal: nix::sys::signal::Signal,
        target: Target,
    },
    /// Run a command (argv, no shell), killed after the timeout.
    Exec {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// POST to a URL; any 2xx is success.
    Http { url: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    PidFile(PathBuf),
    ProcessName(String),
}

/// How long an `exec` action may run when nothing says.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// `SIGHUP`, `HUP` or a number.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use std::str::FromStr as _;
    let upper = s.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).map_err(|_| format!("{n} is not a signal"));
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name)
        .map_err(|_| format!("\"{s}\" is not a signal name; e.g. SIGHUP, HUP, SIGUSR1 or 1"))
}

/// A signal action from its parts: a signal needs exactly one target, and a
/// target needs a signal.
pub fn signal_action(
    signal: Option<nix::sys::signal::Signal>,
    pid_file: Option<PathBuf>,
    process_name: Option<String>,
) -> Result<Option<Action>, String> {
    match (signal, pid_file, process_name) {
        (Some(signal), Some(f), None) => Ok(Some(Action::Signal {
            signal,
            target: Target::PidFile(f),
        })),
        (Some(signal), None, Some(n)) => Ok(Some(Action::Signal {
            signal,
            target: Target::ProcessName(n),
        })),
        (Some(_), Some(_), Some(_)) => {
            Err("give a pid file or a process name to signal, not both".into())
        }
        (Some(_), None, None) => {
            Err("a signal needs a pid file or a process name to know whom to signal".into())
        }
        (None, None, None) => Ok(None),
        (None, _, _) => {
            Err("a pid file or process name says whom to signal, but no signal was given".into())
        }
    }
}

/// An HTTP action, its URL checked.
pub fn http_action(url: &str) -> Result<Action, String> {
    reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|_| Action::Http {
            url: url.to_string(),
        })
        .ok_or_else(|| format!("\"{url}\" is not an http(s) URL"))
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Signal { signal, target } => match target {
                Target::PidFile(p) => write!(f, "{signal} to the pid in {}", p.display()),
                Target::ProcessName(n) => write!(f, "{signal} to processes named {n}"),
            },
            // Labels for logs and metrics: the program, not its arguments;
            // the URL without credentials or query. Either may carry a token.
            Action::Exec { argv, .. } => {
                write!(f, "run {}", argv.first().map_or("", String::as_str))
            }
            Action::Http { url } => match reqwest::Url::parse(url) {
                Ok(mut u) => {
                    let _ = u.set_username("");
                    let _ = u.set_password(None);
                    u.set_query(None);
                    u.set_fragment(None);
                    write!(f, "POST {u}")
                }
                Err(_) => write!(f, "POST (invalid URL)"),
            },
        }
    }
}

/// How many events may wait for the main loop. Watchers wait for room, so a
/// burst of changes slows the looks at backends rather than growing a queue.
pub(crate) const EVENT_QUEUE: usize = 64;

/// What `/readyz` and `/metrics` report.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Backends (or "render") currently failing, with why.
    problems: Mutex<BTreeMap<String, String>>,
    renders: AtomicU64,
    render_errors: AtomicU64,
    writes: AtomicU64,
    last_success: AtomicU64,
    watched: AtomicU64,
    observations: Mutex<BTreeMap<(String, &'static str), u64>>,
    actions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Unix seconds at which each leased reference expires.
    leases: Mutex<BTreeMap<String, f64>>,
}

impl Health {
    /// The first complete render is done.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    fn problem(&self, what: &str, why: Option<String>) {
        let mut p = self.problems.lock().unwrap();
        match why {
            Some(why) => {
                p.insert(what.to_string(), why);
            }
            None => {
                p.remove(what);
            }
        }
    }

    /// `/readyz`: ready after the first complete render, while nothing fails.
    pub fn readiness(&self) -> (bool, String) {
        if !self.ready.load(Ordering::SeqCst) {
            return (false, "waiting for the first complete render\n".into());
        }
        let p = self.problems.lock().unwrap();
        if p.is_empty() {
            (true, "ready\n".into())
        } else {
            let mut text = String::from("degraded (serving the last good outputs):\n");
            for (what, why) in p.iter() {
                let what = what.split_once('#').map_or(what.as_str(), |(w, _)| w);
                text.push_str(&format!("  {what}: {}\n", why.replace('\n', "; ")));
            }
            (false, text)
        }
    }

    /// `/metrics`, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "envrender_renders_total",
            "Renders completed.",
            self.renders.load(Ordering::SeqCst),
        );
        counter(
            "envrender_render_errors_total",
            "Renders that failed; the last good outputs were kept.",
            self.render_errors.load(Ordering::SeqCst),
        );
        counter(
            "envrender_writes_total",
            "Output files written because their content changed.",
            self.writes.load(Ordering::SeqCst),
        );
        let gauge = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        gauge(
            &mut out,
            "envrender_last_success_timestamp_seconds",
            "When the last render succeeded.",
        );
        let _ = writeln!(
            out,
            "envrender_last_success_timestamp_seconds {}",
            self.last_success.load(Ordering::SeqCst)
        );
        gauge(
            &mut out,
            "envrender_ready",
            "1 when the outputs are complete and current.",
        );
        let _ = writeln!(out, "envrender_ready {}", u8::from(self.readiness().0));
        gauge(
            &mut out,
            "envrender_watched_references",
            "Sources being watched.",
        );
        let _ = writeln!(
            out,
            "envrender_watched_references {}",
            self.watched.load(Ordering::SeqCst)
        );
        let _ = writeln!(
            out,
            "# HELP envrender_backend_observations_total Looks at backends for changes, by result.\n# TYPE envrender_backend_observations_total counter"
        );
        for ((backend, result), n) in self.observations.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "envrender_backend_observations_total{{backend=\"{backend}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP envrender_actions_total Actions run after changes, by result.\n# TYPE envrender_actions_total counter"
        );
        for ((action, result), n) in self.actions.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "envrender_actions_total{{action=\"{}\",result=\"{result}\"}} {n}",
                action.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        let _ = writeln!(
            out,
            "# HELP envrender_lease_expiry_timestamp_seconds When each leased Vault secret expires unless renewed.\n# TYPE envrender_lease_expiry_timestamp_seconds gauge"
        );
        for (reference, at) in self.leases.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "envrender_lease_expiry_timestamp_seconds{{reference=\"{}\"}} {at:.0}",
                reference.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        out
    }
}

pub(crate) enum Event {
    /// A backend looked at its sources.
    Observed {
        backend: &'static str,
        /// Which of the backend's watchers looked (see [`Backend::watch_groups`]).
        watcher: usize,
        changed: Vec<(Source, Fetched)>,
        failed: Vec<(Source, FetchError)>,
    },
    /// Something changed in a watched directory.
    Files,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs watch mode until SIGTERM or SIGINT. `reload` builds the settings
/// again for SIGHUP.
pub async fn watch(
    resolver: &Resolver,
    mut settings: Settings,
    options: WatchSettings,
    reload: impl Fn() -> Result<Settings, Error>,
) -> Result<(), Error> {
    use tokio::signal::unix::SignalKind;
    let mut plan = Plan::new(&settings)?;
    plan.remove_interrupted_writes();
    let health = Arc::new(Health::default());
    if let Some(addr) = options.listen {
        serve(addr, health.clone()).await?;
    }
    let mut stop = crate::shutdown::Stop::listen()?;
    let mut hup = crate::shutdown::listen(SignalKind::hangup())?;

    // Background work of the backends (Vault's lease scheduler).
    let mut background = JoinSet::new();
    let mut started: BTreeSet<&'static str> = BTreeSet::new();

    let (tx, mut rx) = mpsc::channel::<Event>(EVENT_QUEUE);
    let mut cache = FetchResults::new();
    let mut watchers = JoinSet::new();
    let mut watching: BTreeSet<Source> = BTreeSet::new();
    let mut files: Option<(WatchedFiles, notify::RecommendedWatcher)> = None;
    let mut debounce = Debounce::new(options.wait);
    debounce.now();
    let mut failures = 0u32;
    loop {
        let due = debounce.due();
        tokio::select! {
            _ = stop.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration and templates");
                match reload().and_then(|s| Plan::new(&s).map(|p| (s, p))) {
                    Ok((s, p)) => {
                        settings = s;
                        plan = p;
                        debounce.now();
                    }
                    Err(e) => tracing::error!("reload failed; keeping the running configuration:\n{e}"),
                }
            }
            Some(event) = rx.recv() => {
                apply(event, &mut cache, &mut debounce, &health);
            }
            _ = sleep_until_opt(due) => {
                if debounce.done() && !reload_plan(&mut plan, &settings, &health) {
                    continue;
                }
                // A stop signal abandons the render where it stands (it is
                // committed whole or not at all) and any reload command.
                let Ok(outcome) = stop.or_stop(cycle(&plan, resolver, &settings, &mut cache, &health)).await else {
                    break;
                };
                match outcome {
                    Ok(Cycle { mut written, replaced, .. }) => {
                        failures = 0;
                        health.problem("render", None);
                        health.problem("templates", None);
                        if !health.ready.swap(true, Ordering::SeqCst) {
                            tracing::info!("first complete render done; watching");
                            // A file created now is one no app has read yet
                            // (a native sidecar renders before the app
                            // starts): only a file replaced under a running
                            // app (a restarted sidecar) calls for its actions.
                            written = replaced;
                        }
                        // (Re)start the watches when what the outputs use changed.
                        let known = watched(resolver, &cache);
                        let now_watched: BTreeSet<Source> = known
                            .iter()
                            .flat_map(|(_, v)| v.iter().map(|(s, _)| s.clone()))
                            .collect();
                        if now_watched != watching {
                            start_watches(known, &mut watchers, &mut background, &mut started, &tx);
                            health.watched.store(now_watched.len() as u64, Ordering::SeqCst);
                            watching = now_watched;
                        }
                        let inputs = WatchedFiles::new(&settings, &cache);
                        if files.as_ref().is_none_or(|(w, _)| *w != inputs) {
                            files = watch_files(&inputs, tx.clone()).map(|w| (inputs, w));
                        }
                        if !written.is_empty() {
                            let actions = actions_for(&settings, &plan, &written, &options.actions);
                            if stop.or_stop(run_actions(&actions, &health, &options.keep_env)).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        let backoff = Duration::from_secs(1 << failures.min(5));
                        tracing::error!(retry_in_s = backoff.as_secs(), "render failed; the outputs were left as they were:\n{e}");
                        health.problem("render", Some(e.to_string()));
                        health.render_errors.fetch_add(1, Ordering::SeqCst);
                        debounce.retry(backoff);
                    }
                }
            }
        }
    }
    tracing::info!("stopping");
    watchers.abort_all();
    background.abort_all();
    Ok(())
}

/// How long files must be quiet before they are read: a file written in
/// place (truncated, then written) must not be read half-way.
const FILES_SETTLE: Duration = Duration::from_millis(100);

/// When the next render is due: at once (start, reload), after a quiet
/// period following changes but never later than the bound, or after a
/// backoff following a failure.
pub(crate) struct Debounce {
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
    pub(crate) fn new(wait: (Duration, Duration)) -> Self {
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

    pub(crate) fn with_splay(mut self, splay: Duration) -> Self {
        self.splay = splay;
        self
    }

    /// Render as soon as possible.
    pub(crate) fn now(&mut self) {
        self.pending = true;
        self.first = None;
        self.retry_at = None;
    }

    /// Something changed.
    pub(crate) fn changed(&mut self) {
        if !self.pending {
            self.first = Some(Instant::now());
            self.offset = self.splay.mul_f64(fastrand::f64());
        }
        self.last = Instant::now();
        self.pending = true;
    }

    /// The render failed: again after `backoff`.
    pub(crate) fn retry(&mut self, backoff: Duration) {
        self.pending = true;
        self.retry_at = Some(Instant::now() + backoff);
    }

    /// Files changed (see [`Debounce::files`]).
    pub(crate) fn files_changed(&mut self) {
        self.changed();
        self.files = true;
    }

    /// The render is starting; true when files must be read again.
    pub(crate) fn done(&mut self) -> bool {
        self.pending = false;
        self.first = None;
        self.retry_at = None;
        std::mem::take(&mut self.files)
    }

    pub(crate) fn due(&self) -> Option<Instant> {
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

/// Takes in one event: changed values into `cache` and failures into
/// `health`; a render falls due in `debounce` when something changed.
pub(crate) fn apply(
    event: Event,
    cache: &mut FetchResults,
    debounce: &mut Debounce,
    health: &Health,
) {
    match event {
        Event::Observed {
            backend,
            watcher,
            changed,
            failed,
        } => {
            // Each watcher's trouble is its own: one that is fine does not
            // clear another's. Readiness shows the part before '#'.
            let key = format!("{backend}#{watcher}");
            let result = if failed.is_empty() { "ok" } else { "error" };
            *health
                .observations
                .lock()
                .unwrap()
                .entry((backend.to_string(), result))
                .or_default() += 1;
            if let Some((source, e)) = failed.first() {
                tracing::warn!(backend, reference = %source, error = %e, "cannot look for changes; keeping the last good outputs");
                health.problem(&key, Some(format!("{source}: {e}")));
            } else {
                health.problem(&key, None);
            }
            if !changed.is_empty() {
                debounce.changed();
            }
            for (source, fetched) in changed {
                tracing::info!(backend, reference = %source, "changed");
                cache.insert(source, Ok(fetched));
            }
        }
        Event::Files => {
            tracing::debug!("watched files changed");
            cache.retain(|s, _| s.scheme != Scheme::File);
            debounce.files_changed();
        }
    }
}

/// Reads and compiles the templates again; when one no longer compiles,
/// the plan in use stays, `health` says why, and false says not to render.
pub(crate) fn reload_plan(plan: &mut Plan, settings: &Settings, health: &Health) -> bool {
    match Plan::new(settings) {
        Ok(p) => {
            *plan = p;
            true
        }
        Err(e) => {
            tracing::error!("a template no longer compiles; keeping the last good outputs:\n{e}");
            health.problem("templates", Some(e.to_string()));
            false
        }
    }
}

/// Starts watching `known` (from [`watched`]): one task per backend into
/// `watchers`, replacing those there, and each backend's background work
/// (once per backend name) into `background`.
pub(crate) fn start_watches(
    known: Vec<(Arc<dyn Backend>, Known)>,
    watchers: &mut JoinSet<()>,
    background: &mut JoinSet<()>,
    started: &mut BTreeSet<&'static str>,
    tx: &mpsc::Sender<Event>,
) {
    watchers.abort_all();
    for (backend, sources) in known {
        if started.insert(backend.name())
            && let Some(work) = backend.background()
        {
            background.spawn(work);
        }
        let groups =
            backend.watch_groups(&sources.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>());
        let mut sources: Vec<Option<(Source, Fetched)>> = sources.into_iter().map(Some).collect();
        for (watcher, group) in groups.into_iter().enumerate() {
            let known: Vec<(Source, Fetched)> = group
                .iter()
                .filter_map(|&i| sources.get_mut(i)?.take())
                .collect();
            if !known.is_empty() {
                watchers.spawn(watch_backend(backend.clone(), watcher, known, tx.clone()));
            }
        }
    }
}

pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The actions to run after `written` changed: those of each template
/// written, then the global ones, each once.
fn actions_for(
    settings: &Settings,
    plan: &Plan,
    written: &[PathBuf],
    global: &[Action],
) -> Vec<Action> {
    let mut actions: Vec<Action> = Vec::new();
    let per_template = settings
        .templates
        .iter()
        .filter(|t| written.contains(&plan.destination(&t.destination)))
        .flat_map(|t| t.on_change.iter());
    for a in per_template.chain(global) {
        if !actions.contains(a) {
            actions.push(a.clone());
        }
    }
    actions
}

/// What one render did.
pub(crate) struct Cycle {
    pub written: Vec<PathBuf>,
    /// Of `written`, the files that existed before (not created).
    pub replaced: Vec<PathBuf>,
    /// The `[env]` values, for `run`.
    pub env: Vec<(String, String)>,
}

/// One render from the values held (fetching only what is missing), and
/// a commit of what changed.
pub(crate) async fn cycle(
    plan: &Plan,
    resolver: &Resolver,
    settings: &Settings,
    cache: &mut FetchResults,
    health: &Health,
) -> Result<Cycle, Error> {
    let outcome = render_cycle(plan, resolver, settings, cache, health).await;
    release_freed_memory();
    outcome
}

/// Hands the memory a render freed (answers, rendered text) back to the
/// system. glibc's allocator keeps freed pages for reuse, so a sidecar
/// would otherwise idle holding its render's peak (36.3 MB anonymous memory
/// before, 33.8 MB after, with 10,000 watched values in the benchmark
/// suite); the pages returned are zeroed, so no value lingers in them.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is
    // safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

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
    let statuses = output::commit(&writes).map_err(Error::Output)?;
    let env = plan.env_vars(&resolution);
    *cache = resolution.fetched;
    cache.retain(|_, r| r.is_ok());
    let mut leases = BTreeMap::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    for (source, r) in cache.iter() {
        if let Ok(Fetched {
            lease: Some(lease), ..
        }) = r
        {
            leases.insert(source.to_string(), now + lease.duration.as_secs_f64());
        }
    }
    *health.leases.lock().unwrap() = leases;
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
    health.renders.fetch_add(1, Ordering::SeqCst);
    health
        .writes
        .fetch_add(written.len() as u64, Ordering::SeqCst);
    health.last_success.store(unix_now(), Ordering::SeqCst);
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

/// Sources and what was last fetched for each.
pub(crate) type Known = Vec<(Source, Fetched)>;

/// The fetched sources, by the backend that watches them; local ones
/// (`file:` sources are watched through the file system, values answered
/// by a local values file do not change) are left out.
pub(crate) fn watched(resolver: &Resolver, cache: &FetchResults) -> Vec<(Arc<dyn Backend>, Known)> {
    let mut by_backend: HashMap<&'static str, (Arc<dyn Backend>, Known)> = HashMap::new();
    for (source, r) in cache {
        let Ok(fetched) = r else { continue };
        if source.scheme == Scheme::File || resolver.serves_locally(source) {
            continue;
        }
        let Ok(backend) = resolver.backends().get(source.scheme) else {
            continue;
        };
        by_backend
            .entry(backend.name())
            .or_insert_with(|| (backend.clone(), Vec::new()))
            .1
            .push((source.clone(), fetched.clone()));
    }
    let mut out: Vec<_> = by_backend.into_values().collect();
    for (_, sources) in &mut out {
        sources.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out
}

/// Looks at one backend's sources again and again: at once for backends
/// whose queries block until a change, else every poll interval (jittered)
/// or when the backend says its values moved; after errors, with
/// exponential backoff.
async fn watch_backend(
    backend: Arc<dyn Backend>,
    watcher: usize,
    mut known: Vec<(Source, Fetched)>,
    tx: mpsc::Sender<Event>,
) {
    let mut changes = backend.changes();
    let mut errors = 0u32;
    loop {
        if errors > 0 {
            let backoff =
                Duration::from_millis(500 * (1 << errors.min(6))).min(Duration::from_secs(30));
            tokio::time::sleep(backoff.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
        } else if !backend.blocks() {
            let delay = poll_delay(backend.poll_interval());
            match changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        r = rx.changed() => if r.is_err() { changes = None; },
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
        let observations = backend.observe(&known).await;
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        for ((source, fetched), o) in known.iter_mut().zip(observations) {
            match o {
                Observation::Unchanged => {}
                Observation::Changed(new) => {
                    *fetched = new.clone();
                    changed.push((source.clone(), new));
                }
                Observation::Failed(e) => failed.push((source.clone(), e)),
            }
        }
        errors = if failed.is_empty() { 0 } else { errors + 1 };
        let event = Event::Observed {
            backend: backend.name(),
            watcher,
            changed,
            failed,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// What the file watcher looks at: the template files and `file:` sources,
/// by path, and the directories they are in (watched, since editors and
/// Kubernetes replace files rather than write them).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct WatchedFiles {
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    /// `file:DIR/` sources: anything in them counts.
    trees: BTreeSet<PathBuf>,
}

impl WatchedFiles {
    pub(crate) fn new(settings: &Settings, cache: &FetchResults) -> Self {
        let mut w = WatchedFiles::default();
        let mut files: Vec<PathBuf> = settings
            .templates
            .iter()
            .map(|t| t.source.clone())
            .collect();
        for source in cache.keys().filter(|s| s.scheme == Scheme::File) {
            if source.is_prefix() {
                let dir = absolute(Path::new(source.path.trim_end_matches('/')));
                w.dirs.insert(dir.clone());
                w.trees.insert(dir);
            } else {
                files.push(PathBuf::from(&source.path));
            }
        }
        for p in files {
            let p = absolute(&p);
            if let Some(dir) = p.parent() {
                w.dirs.insert(dir.to_path_buf());
            }
            w.files.insert(p);
        }
        w
    }

    /// Whether an event on `path` may change an input: the file itself,
    /// anything in a directory source, or a Kubernetes volume's `..data`
    /// swap.
    fn concerns(&self, path: &Path) -> bool {
        self.files.contains(path)
            || path.parent().is_some_and(|d| self.trees.contains(d))
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".."))
    }
}

/// Watches the directories of `watched`; an event that concerns an input
/// is an [`Event::Files`].
pub(crate) fn watch_files(
    watched: &WatchedFiles,
    tx: mpsc::Sender<Event>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let filter = watched.clone();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() || !event.paths.iter().any(|p| filter.concerns(p)) {
                return;
            }
            tracing::debug!(kind = ?event.kind, paths = ?event.paths, "file event");
            // notify's own thread: waiting for room is fine here.
            let _ = tx.blocking_send(Event::Files);
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; template and file: changes need a SIGHUP");
            return None;
        }
    };
    for dir in &watched.dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this directory");
        }
    }
    Some(watcher)
}

/// `p` from the root, its directory resolved but not the file itself (a
/// template that is a symlink, as in Kubernetes volumes, is watched where
/// the link is), so paths from different spellings compare equal.
fn absolute(p: &Path) -> PathBuf {
    let (dir, name) = match (p.parent(), p.file_name()) {
        (Some(d), Some(n)) if !d.as_os_str().is_empty() => (d, n),
        (_, Some(n)) => (Path::new("."), n),
        _ => return std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
    };
    std::fs::canonicalize(dir)
        .map(|d| d.join(name))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Runs each action once, retrying a failing one twice (1 s, then 2 s
/// later); a failure is reported, never fatal.
async fn run_actions(actions: &[Action], health: &Health, keep_env: &[String]) {
    for action in actions {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match run_action(action, keep_env).await {
                Ok(()) => {
                    tracing::info!(action = %action, "action done");
                    *health
                        .actions
                        .lock()
                        .unwrap()
                        .entry((action.to_string(), "ok"))
                        .or_default() += 1;
                    break;
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(action = %action, error = %e, attempt, "action failed; retrying");
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                }
                Err(e) => {
                    tracing::error!(action = %action, error = %e, "action failed");
                    *health
                        .actions
                        .lock()
                        .unwrap()
                        .entry((action.to_string(), "error"))
                        .or_default() += 1;
                    break;
                }
            }
        }
    }
}

async fn run_action(action: &Action, keep_env: &[String]) -> Result<(), String> {
    match action {
        Action::Signal { signal, target } => {
            let pids = match target {
                Target::PidFile(path) => {
                    let text = read_pid_file(path)?;
                    vec![pid_of(&text).map_err(|e| format!("{}: {e}", path.display()))?]
                }
                Target::ProcessName(name) => {
                    let pids = processes_named(name);
                    if pids.is_empty() {
                        return Err(format!(
                            "no process named {name} (is the PID namespace shared? shareProcessNamespace: true in Kubernetes, pidMode: task in ECS)"
                        ));
                    }
                    pids
                }
            };
            for pid in pids {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), *signal)
                    .map_err(|e| format!("cannot signal process {pid}: {e}"))?;
            }
            Ok(())
        }
        Action::Exec { argv, timeout } => {
            let Some((program, args)) = argv.split_first() else {
                return Err("empty command".into());
            };
            let mut command = tokio::process::Command::new(program);
            // A reload command needs none of envrender's credentials.
            for name in crate::environment::scrubbed_for_commands(keep_env) {
                command.env_remove(name);
            }
            // In a process group of its own, so that a command cut off (by
            // its timeout, or by a stop signal dropping this future) takes
            // its children with it: `sh -c 'a; b'` leaves no `b` behind.
            let child = command
                .args(args)
                .stdin(std::process::Stdio::null())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start {program}: {e}"))?;
            let mut group = KillGroup(Some(child));
            let finished = match group.0.as_mut() {
                Some(child) => tokio::time::timeout(*timeout, child.wait()).await,
                None => unreachable!("set just above"),
            };
            if finished.is_ok() {
                // It ended by itself: what it started on purpose may stay.
                group.0 = None;
            }
            match finished {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
                Ok(Err(e)) => Err(format!("{program}: {e}")),
                Err(_) => Err(format!(
                    "{program} did not finish within {}; killed",
                    humantime::format_duration(*timeout)
                )),
            }
        }
        Action::Http { url } => {
            let response = reqwest::Client::new()
                .post(url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| crate::backend::error_chain(&e))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", response.status()))
            }
        }
    }
}

/// The process id a pid file holds: a whole number from 1 up, and not
/// envrender's own. Anything else is refused: kill(2) takes 0 for the
/// caller's process group and -1 for every process it may signal, and a
/// sign, a fraction or a number too large is not a pid either. PID 1 is
/// taken: in the app's own PID namespace the app may well be PID 1.
pub(crate) fn pid_of(text: &str) -> Result<i32, String> {
    let text = text.trim();
    let refuse = |why: &str| {
        let shown: String = text.chars().take(24).collect();
        let ellipsis = if text.chars().count() > 24 { "…" } else { "" };
        format!("{shown:?}{ellipsis} is not a process id ({why})")
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse("a whole number from 1 up is expected"));
    }
    let pid: i32 = text.parse().map_err(|_| refuse("too large"))?;
    if pid == 0 {
        return Err(refuse("0 would signal envrender's own process group"));
    }
    if pid as u32 == std::process::id() {
        return Err(refuse("it is envrender's own"));
    }
    Ok(pid)
}

/// A pid file's first bytes. The app may have written it, or put a FIFO,
/// a symlink to `/dev/zero` or a huge file in its place: it is opened
/// without following a symlink or blocking, must be a regular file, and at
/// most 32 bytes are read.
fn read_pid_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// A reload command whose whole process group is killed when this is
/// dropped before the command ended.
struct KillGroup(Option<tokio::process::Child>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.as_ref().and_then(|c| c.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The processes whose name (`/proc/PID/comm`) or program (the first word
/// of `/proc/PID/cmdline`, without its directory) is `name`.
fn processes_named(name: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let program = cmdline
            .split(|b| *b == 0)
            .next()
            .map(|p| {
                String::from_utf8_lossy(p)
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        if comm.trim() == name || program == name {
            pids.push(pid);
        }
    }
    pids
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr`.
pub(crate) async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<(), Error> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Config(vec![
            crate::config::ConfigError::new("--listen", format!("cannot listen on {addr}: {e}"))
                .hint("give a free address, e.g. --listen 127.0.0.1:8080"),
        ])
    })?;
    tracing::info!(address = %addr, "serving /healthz, /readyz and /metrics");
    let ready = health.clone();
    let metrics = health.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = ready.clone();
                async move {
                    let (ok, text) = health.readiness();
                    let status = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, text)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let health = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        health.metrics(),
                    )
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the health server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_are_read_safely() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        // A FIFO planted as the pid file: reading it by name blocked the
        // watch for good.
        assert!(
            read_pid_file(&fifo)
                .unwrap_err()
                .contains("not a regular file")
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_pid_file(&link).is_err());
        let big = dir.path().join("big");
        std::fs::write(&big, format!("42{}", " ".repeat(100_000))).unwrap();
        assert_eq!(read_pid_file(&big).unwrap().len(), 32);
    }

    #[test]
    fn readiness_follows_the_first_render_and_failures() {
        let h = Health::default();
        assert!(!h.readiness().0);
        h.ready.store(true, Ordering::SeqCst);
        assert_eq!(h.readiness(), (true, "ready\n".to_string()));
        h.problem("consul", Some("GET /v1/kv/x: connection refused".into()));
        let (ok, text) = h.readiness();
        assert!(!ok && text.contains("consul: GET /v1/kv/x"), "{text}");
        h.problem("consul", None);
        assert!(h.readiness().0);
    }

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

    #[test]
    fn action_labels_leave_out_arguments_and_url_credentials() {
        let exec = Action::Exec {
            argv: vec![
                "curl".into(),
                "-H".into(),
                "Authorization: Bearer s3cret".into(),
            ],
            timeout: DEFAULT_EXEC_TIMEOUT,
        };
        assert_eq!(exec.to_string(), "run curl");
        let http = http_action("http://admin:s3cret@127.0.0.1:9090/-/reload?token=s3cret").unwrap();
        assert_eq!(http.to_string(), "POST http://127.0.0.1:9090/-/reload");
    }

    #[test]
    fn a_pid_file_holds_one_positive_process_id() {
        assert_eq!(pid_of("1234\n"), Ok(1234));
        assert_eq!(pid_of(" 1 "), Ok(1));
        for bad in [
            "-1",
            "0",
            "00",
            "+5",
            "-5",
            "",
            "abc",
            "12 34",
            "1.5",
            "99999999999",
            "2147483648",
        ] {
            let e = pid_of(bad).unwrap_err();
            assert!(e.contains("is not a process id"), "{bad}: {e}");
        }
        assert!(pid_of(&std::process::id().to_string()).is_err());
        assert!(pid_of(&"9".repeat(100)).unwrap_err().contains('…'));
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let h = Health::default();
        h.renders.fetch_add(2, Ordering::SeqCst);
        h.actions
            .lock()
            .unwrap()
            .insert(("SIGHUP to processes named \"app\"".into(), "ok"), 1);
        let text = h.metrics();
        assert!(
            text.contains("# TYPE envrender_renders_total counter\nenvrender_renders_total 2\n")
        );
        assert!(text.contains(
            "envrender_actions_total{action=\"SIGHUP to processes named \\\"app\\\"\",result=\"ok\"} 1"
        ));
        assert!(text.contains("envrender_ready 0"));
    }
}
