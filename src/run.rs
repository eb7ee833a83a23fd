//! `envrender run -- app`: resolve the app's environment, render its files,
//! then hand over to the app.
//!
//! Environment variables whose values are references (`DB_PASSWORD=ssm:/app/db/password`,
//! an SSM or Secrets Manager ARN) and the `[env]` mapping are resolved; a
//! `*_FILE` name in `[env]` gets a path to a 0600 file holding the value
//! instead of the value. Any failure stops the run before the app starts,
//! listing every failure (fail closed). The references themselves and
//! envrender's own credentials (`VAULT_TOKEN`, `CONSUL_HTTP_TOKEN`) do not
//! reach the app unless `--keep-env` says so.
//!
//! When nothing needs keeping alive (no Vault lease) and envrender is not
//! PID 1 (nor asked to `--supervise`), it `exec`s the app: no process stays
//! behind. Otherwise it supervises it: the app runs in
//! its own process group; signals are forwarded to the group; SIGTERM stops
//! it with `--stop-signal`, then SIGKILL after `--grace`; as PID 1 (or with
//! `--subreaper`) envrender reaps orphaned descendants, and stops those
//! still running when the command exits (the stop signal, then SIGKILL
//! after `--grace`); and it exits with the app's code (128+N when the app
//! died of signal N). SIGTERM while values are being resolved ends the run
//! before the app starts (exit 143), and one during a refresh abandons the
//! render and stops the app.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::config::{ConfigError, EnvValue};
use crate::engine::{Plan, Settings};
use crate::error::Error;
use crate::output;
use crate::reference;
use crate::resolve::Resolver;

/// Variables that hold envrender's own credentials: not passed to the app
/// unless kept with `--keep-env`. The AWS ones are the app's too, and kept.
pub const CREDENTIALS: &[&str] = crate::environment::BACKEND_CREDENTIALS;

/// How the app is run.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub argv: Vec<String>,
    pub stop_signal: Signal,
    pub grace: Duration,
    /// Reap orphans even when not PID 1.
    pub subreaper: bool,
    /// Stay the command's parent even with nothing to keep alive.
    pub supervise: bool,
    /// Credential variables to pass to the app anyway.
    pub keep_env: Vec<String>,
    /// Where `*_FILE` values are written.
    pub secrets_dir: Option<PathBuf>,
    /// What a change does to the running command; `None`: changes are not
    /// watched.
    pub refresh: Option<Refresh>,
    /// Quiet period and bound before acting on changes.
    pub wait: (Duration, Duration),
    /// Serve `/healthz`, `/readyz` and `/metrics` here.
    pub listen: Option<std::net::SocketAddr>,
    /// Start the command again when it exits on its own.
    pub restart_on_exit: bool,
    /// A random extra delay before acting on changes.
    pub splay: Duration,
}

/// What a change does to the running command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Files are rewritten and the command's group gets this signal. The
    /// environment of a running process cannot change: a changed
    /// environment value is reported, and waits for a restart.
    Reload(Signal),
    /// The command is stopped (stop signal, grace, SIGKILL) and started
    /// again with the new environment.
    Restart,
}

/// The environment variables of this process that are references, as
/// `[env]` entries. Backend settings (`CONSUL_*`, `VAULT_*`, `AWS_*`,
/// `ENVRENDER_*`) and `host:port` values such as `consul:8500` are not
/// references; `file:` and `env:` are only taken from `[env]`, where they
/// cannot be mistaken for URLs.
pub fn env_references(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, EnvValue)>, Error> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in vars {
        if ["CONSUL_", "VAULT_", "AWS_", "ENVRENDER_"]
            .iter()
            .any(|p| name.starts_with(p))
            || !reference::looks_like_reference(&value)
        {
            continue;
        }
        let (scheme, rest) = value.split_once(':').unwrap_or_default();
        if matches!(scheme, "file" | "env")
            || (!rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
        {
            continue;
        }
        match reference::parse(&value) {
            Ok(r) => out.push((name, EnvValue::Reference(r))),
            Err(e) => errors.push(
                ConfigError::new(format!("environment variable {name}"), e.to_string())
                    .hint("fix the reference, or unset the variable"),
            ),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Error::Config(errors))
    }
}

/// Resolves and renders everything, then execs or supervises the app.
/// Returns the app's exit code (when supervised).
pub async fn run(
    resolver: &Resolver,
    settings: &Settings,
    run: &RunSettings,
    process_env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
) -> Result<u8, Error> {
    let started = Instant::now();
    let plan = Plan::new(settings)?;
    plan.remove_interrupted_writes();
    // As PID 1 a SIGTERM without a handler is never delivered: listen from
    // the start, and give up resolving when one comes.
    let mut stop = crate::shutdown::Stop::listen()?;
    let mut resolution = match stop
        .or_stop(plan.resolve(resolver, started + settings.timeout))
        .await
    {
        Ok(resolution) => resolution?,
        Err(sig) => {
            tracing::warn!(signal = %sig, "stopped before starting {}; nothing written", run.argv[0]);
            return Ok(crate::shutdown::exit_code(sig));
        }
    };

    if let Some(e) = resolution.failure_error() {
        tracing::error!("not starting {}: values are missing", run.argv[0]);
        return Err(e);
    }
    let writes = plan
        .outputs(&resolution)
        .map_err(|e| Error::NothingWritten(Box::new(e)))?;
    output::commit(&writes).map_err(Error::Output)?;

    let mut secrets = SecretFiles::new(run.secrets_dir.clone());
    let env = child_env(
        &process_env,
        plan.env_vars(&resolution),
        settings,
        run,
        &mut secrets,
    )?;
    let leases = resolution
        .fetched
        .values()
        .any(|r| matches!(r, Ok(f) if f.lease.is_some()));
    resolution.fetched.retain(|_, r| r.is_ok());
    tracing::info!(
        references = resolution.users.len(),
        outputs = writes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "starting {}",
        run.argv[0]
    );
    if !leases
        && !run.supervise
        && run.refresh.is_none()
        && run.listen.is_none()
        && !run.restart_on_exit
        && std::process::id() != 1
    {
        // Nothing to keep alive and no zombies to reap: become the app.
        // The `*_FILE` files stay: they are the app's now (only a failed
        // exec removes them, as `secrets` drops).
        if let Some(sig) = stop.pending().await {
            tracing::warn!(signal = %sig, "stopped before starting {}", run.argv[0]);
            return Ok(crate::shutdown::exit_code(sig));
        }
        let e = command(&run.argv, &env).exec();
        return Err(start_error(&run.argv[0], &e));
    }
    let mut state = Supervised {
        plan,
        cache: resolution.fetched,
        env,
        process_env,
        secrets,
    };
    // The `*_FILE` files are removed when `state` drops, after the command
    // has exited.
    supervise(resolver, settings, &mut state, run, stop).await
}

/// What supervision carries from one render to the next.
struct Supervised {
    plan: Plan,
    cache: crate::resolve::FetchResults,
    env: ChildEnv,
    process_env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    secrets: SecretFiles,
}

type ChildEnv = BTreeMap<std::ffi::OsString, std::ffi::OsString>;

fn command(argv: &[String], env: &ChildEnv) -> std::process::Command {
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..]).env_clear().envs(env);
    c
}

/// The command's environment: ours without references and credentials,
/// with the resolved values (`*_FILE` names pointing at written files).
fn child_env(
    process_env: &[(std::ffi::OsString, std::ffi::OsString)],
    resolved: Vec<(String, String)>,
    settings: &Settings,
    run: &RunSettings,
    secrets: &mut SecretFiles,
) -> Result<ChildEnv, Error> {
    let mut env: ChildEnv = process_env
        .iter()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !CREDENTIALS.contains(&k.as_ref()) || run.keep_env.iter().any(|x| *x == k)
        })
        .cloned()
        .collect();
    for (name, value) in resolved {
        if name.ends_with("_FILE")
            && settings
                .env
                .iter()
                .any(|(n, v)| *n == name && matches!(v, EnvValue::Reference(_)))
        {
            let path = secrets.write(&name, &value)?;
            env.insert(name.into(), path.into_os_string());
        } else {
            env.insert(name.into(), value.into());
        }
    }
    Ok(env)
}

fn start_error(program: &str, e: &std::io::Error) -> Error {
    Error::Config(vec![
        ConfigError::new("envrender run", format!("cannot start {program}: {e}")).hint(
            if e.kind() == std::io::ErrorKind::NotFound {
                "the command is not on PATH; give its full path"
            } else {
                "check that the command is executable"
            },
        ),
    ])
}

/// The files of `[env]` `*_FILE` values, and their cleaning up.
///
/// By default they go in a directory made for this run under `/dev/shm`
/// (else the temporary directory): a random name, mode 0700, created anew
/// (never one that exists, which another user could have made). In a
/// `--secrets-dir`, the directory is the operator's. Either way each file
/// is created anew, with O_EXCL at mode 0600 under a temporary name, and
/// renamed into place: a symlink or a file planted at the name is
/// replaced, never written through or reused with its mode.
///
/// Dropped, it removes the files it wrote (and the directory it made):
/// when a supervised command has exited, or when the command could not be
/// started. After a successful exec nothing is left to remove them.
pub(crate) struct SecretFiles {
    given: Option<PathBuf>,
    made: Option<tempfile::TempDir>,
    written: std::collections::BTreeSet<PathBuf>,
}

impl SecretFiles {
    pub(crate) fn new(given: Option<PathBuf>) -> SecretFiles {
        SecretFiles {
            given,
            made: None,
            written: Default::default(),
        }
    }

    /// Writes one `*_FILE` value to a new 0600 file; returns its path.
    fn write(&mut self, name: &str, value: &str) -> Result<PathBuf, Error> {
        use std::io::Write as _;
        use std::os::unix::fs::DirBuilderExt as _;
        let fail = |e: std::io::Error, what: &Path| {
            Error::Config(vec![
                ConfigError::new(
                    "envrender run",
                    format!(
                        "cannot write the value of {name} to {}: {e}",
                        what.display()
                    ),
                )
                .hint("give a writable directory with --secrets-dir"),
            ])
        };
        let dir = match (&self.given, &self.made) {
            (Some(given), _) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(given)
                    .map_err(|e| fail(e, given))?;
                given.clone()
            }
            (None, Some(made)) => made.path().to_path_buf(),
            (None, None) => {
                let shm = Path::new("/dev/shm");
                let base = if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                };
                let made = tempfile::Builder::new()
                    .prefix("envrender-")
                    .permissions(std::fs::Permissions::from_mode(0o700))
                    .tempdir_in(&base)
                    .map_err(|e| fail(e, &base))?;
                let dir = made.path().to_path_buf();
                self.made = Some(made);
                dir
            }
        };
        let path = dir.join(name.trim_end_matches("_FILE").to_ascii_lowercase());
        let mut file = tempfile::Builder::new()
            .prefix(".envrender-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(|e| fail(e, &dir))?;
        file.write_all(value.as_bytes())
            .and_then(|_| file.as_file().sync_all())
            .map_err(|e| fail(e, &path))?;
        file.persist(&path).map_err(|e| fail(e.error, &path))?;
        self.written.insert(path.clone());
        Ok(path)
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        // In the directory made for the run, its removal takes the files.
        if self.made.is_none() {
            for path in &self.written {
                if let Err(e) = std::fs::remove_file(path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a secret file");
                }
            }
        }
        if let Some(made) = self.made.take() {
            let path = made.path().to_path_buf();
            if let Err(e) = made.close() {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the secret files' directory");
            }
        }
    }
}

/// Runs the app as a child in its own process group until it exits; with
/// `refresh`, watches what it uses and reloads or restarts it on changes.
async fn supervise(
    resolver: &Resolver,
    settings: &Settings,
    state: &mut Supervised,
    run: &RunSettings,
    mut stop: crate::shutdown::Stop,
) -> Result<u8, Error> {
    use crate::watch::{self, Debounce, Health};
    use tokio::signal::unix::SignalKind;
    let mut reaps_orphans = std::process::id() == 1;
    if run.subreaper && !reaps_orphans {
        match nix::sys::prctl::set_child_subreaper(true) {
            Ok(()) => reaps_orphans = true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot become a subreaper; orphans go to PID 1")
            }
        }
    }
    // A stop signal that came while the outputs were being written: the
    // command is not started.
    if let Some(sig) = stop.pending().await {
        tracing::warn!(signal = %sig, "stopped before starting {}", run.argv[0]);
        return Ok(crate::shutdown::exit_code(sig));
    }
    let mut chld = crate::shutdown::listen(SignalKind::child())?;
    // Every signal to forward comes through one channel; SIGTERM and SIGINT
    // from the streams listened to since before resolving, so none is lost
    // in between.
    let (signals_tx, mut signals) = tokio::sync::mpsc::channel::<Signal>(16);
    {
        let tx = signals_tx.clone();
        tokio::spawn(async move {
            loop {
                let sig = stop.recv().await;
                if tx.send(sig).await.is_err() {
                    break;
                }
            }
        });
    }
    for (kind, sig) in [
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::quit(), Signal::SIGQUIT),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
        (SignalKind::window_change(), Signal::SIGWINCH),
    ] {
        let mut stream = crate::shutdown::listen(kind)?;
        let tx = signals_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() && tx.send(sig).await.is_ok() {}
        });
    }
    // Keep leases alive, and watch for changes when asked to.
    let health = std::sync::Arc::new(Health::default());
    if let Some(addr) = run.listen {
        watch::serve(addr, health.clone()).await?;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(watch::EVENT_QUEUE);
    let mut watchers = tokio::task::JoinSet::new();
    let mut background = tokio::task::JoinSet::new();
    let mut started = std::collections::BTreeSet::new();
    watch::start_watches(
        watch::watched(resolver, &state.cache),
        &mut watchers,
        &mut background,
        &mut started,
        &tx,
    );
    let _files = if run.refresh.is_some() {
        watch::watch_files(
            &watch::WatchedFiles::new(settings, &state.cache),
            tx.clone(),
        )
    } else {
        watchers.abort_all();
        None
    };
    let mut debounce = Debounce::new(run.wait).with_splay(run.splay);

    let terminal = Terminal::detect();
    let spawn = |env: &ChildEnv| -> Result<Pid, Error> {
        let mut c = command(&run.argv, env);
        c.process_group(0);
        terminal.hand_over_in(&mut c);
        let child = c.spawn().map_err(|e| start_error(&run.argv[0], &e))?;
        tracing::info!(pid = child.id(), "supervising {}", run.argv[0]);
        let pid = Pid::from_raw(child.id() as i32);
        terminal.give(pid);
        Ok(pid)
    };
    let mut pid = spawn(&state.env)?;
    health.set_ready();
    let mut kill_at: Option<Instant> = None;
    // Stopping the command to start it again, not to exit.
    let mut restarting = false;
    // SIGTERM received: the command's exit is envrender's.
    let mut stopping = false;
    let mut since = Instant::now();
    let mut exits = 0u32;
    loop {
        let received = {
            tokio::select! {
                _ = chld.recv() => None,
                sig = signals.recv() => sig,
                _ = watch::sleep_until_opt(kill_at) => {
                    tracing::warn!(grace = ?run.grace, "{} did not stop in time; killing its process group", run.argv[0]);
                    let _ = killpg(pid, Signal::SIGKILL);
                    kill_at = None;
                    None
                }
                Some(event) = rx.recv() => {
                    watch::apply(event, &mut state.cache, &mut debounce, &health);
                    None
                }
                _ = watch::sleep_until_opt(debounce.due()) => {
                    let mut stopped = None;
                    if !debounce.done() || watch::reload_plan(&mut state.plan, settings, &health) {
                        // Signals keep being forwarded during the render; a
                        // stop signal abandons it (committed whole or not
                        // at all).
                        let work = refresh(resolver, settings, state, run, &health, pid, &mut restarting, &mut kill_at);
                        tokio::pin!(work);
                        loop {
                            tokio::select! {
                                _ = &mut work => break,
                                Some(sig) = signals.recv() => {
                                    // SIGINT goes to the command, as it
                                    // does outside a refresh.
                                    if sig == Signal::SIGTERM {
                                        stopped = Some(sig);
                                        break;
                                    }
                                    let _ = killpg(pid, sig);
                                }
                            }
                        }
                    }
                    stopped
                }
            }
        };
        if let Some(sig) = received {
            let sent = if sig == Signal::SIGTERM {
                restarting = false;
                stopping = true;
                kill_at.get_or_insert(Instant::now() + run.grace);
                run.stop_signal
            } else {
                sig
            };
            tracing::debug!(signal = %sent, "forwarding");
            let _ = killpg(pid, sent);
        }
        // Reap: the app, and any orphan that was handed to us.
        loop {
            let exited = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => code as u8,
                Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => 128 + sig as u8,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            if restarting {
                restarting = false;
                kill_at = None;
                tracing::info!(code = exited, "{} stopped; starting it again", run.argv[0]);
                pid = spawn(&state.env)?;
                since = Instant::now();
                continue;
            }
            if run.restart_on_exit && !stopping {
                exits = if since.elapsed() > Duration::from_secs(600) {
                    1
                } else {
                    exits + 1
                };
                let backoff =
                    Duration::from_secs(1 << (exits - 1).min(6)).min(Duration::from_secs(60));
                tracing::warn!(
                    code = exited,
                    restart_in_s = backoff.as_secs(),
                    "{} exited; starting it again",
                    run.argv[0]
                );
                // Signals that arrive meanwhile stop the wait.
                let stop = tokio::select! {
                    _ = tokio::time::sleep(backoff) => None,
                    sig = signals.recv() => sig,
                };
                if matches!(stop, Some(Signal::SIGTERM | Signal::SIGINT)) {
                    terminal.restore();
                    watchers.abort_all();
                    background.abort_all();
                    if reaps_orphans {
                        crate::shutdown::stop_descendants(run.stop_signal, run.grace).await;
                    }
                    return Ok(exited);
                }
                pid = spawn(&state.env)?;
                since = Instant::now();
                continue;
            }
            terminal.restore();
            watchers.abort_all();
            background.abort_all();
            // Orphans handed to envrender (a daemon the command started,
            // in a session of its own) do not outlive it.
            if reaps_orphans {
                // Within what is left of the grace a SIGTERM started.
                let grace =
                    kill_at.map_or(run.grace, |at| at.saturating_duration_since(Instant::now()));
                crate::shutdown::stop_descendants(run.stop_signal, grace).await;
            }
            return Ok(exited);
        }
    }
}

/// The controlling terminal, when envrender was started in the foreground
/// of one: the command's process group is made the foreground group, so an
/// interactive command can read from it, and envrender's own group is put
/// back when the command ends.
struct Terminal {
    own: Option<Pid>,
}

impl Terminal {
    fn detect() -> Terminal {
        use std::io::IsTerminal as _;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Terminal { own: None };
        }
        Terminal {
            own: nix::unistd::tcgetpgrp(&stdin).ok(),
        }
    }

    /// The command takes the terminal itself, between entering its own
    /// process group and exec, as job-control shells do: were only
    /// envrender to hand it over after the spawn, a command that reads at
    /// once could be stopped by SIGTTIN first.
    fn hand_over_in(&self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt as _;
        if self.own.is_none() {
            return;
        }
        // SAFETY: the closure runs in the forked child before exec and makes
        // only async-signal-safe system calls (sigprocmask, getpgrp,
        // tcsetpgrp); it allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(|| {
                with_ttou_blocked(|| {
                    let _ = nix::unistd::tcsetpgrp(
                        std::os::fd::BorrowedFd::borrow_raw(0),
                        nix::unistd::getpgrp(),
                    );
                });
                Ok(())
            });
        }
    }

    fn give(&self, pgrp: Pid) {
        if self.own.is_some() {
            let _ = with_ttou_blocked(|| nix::unistd::tcsetpgrp(std::io::stdin(), pgrp));
        }
    }

    fn restore(&self) {
        if let Some(own) = self.own {
            let _ = with_ttou_blocked(|| nix::unistd::tcsetpgrp(std::io::stdin(), own));
        }
    }
}

/// Runs `f` with SIGTTOU blocked: a background process may then change the
/// terminal's foreground group without being stopped.
fn with_ttou_blocked<T>(f: impl FnOnce() -> T) -> T {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old));
    let out = f();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    out
}

/// After changes: render again, then reload or restart the command.
#[allow(clippy::too_many_arguments)]
async fn refresh(
    resolver: &Resolver,
    settings: &Settings,
    state: &mut Supervised,
    run: &RunSettings,
    health: &crate::watch::Health,
    pid: Pid,
    restarting: &mut bool,
    kill_at: &mut Option<Instant>,
) {
    let Some(mode) = run.refresh else { return };
    let cycle = match crate::watch::cycle(&state.plan, resolver, settings, &mut state.cache, health)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot render the changes; the command keeps running as it is:\n{e}");
            return;
        }
    };
    let env = match child_env(
        &state.process_env,
        cycle.env,
        settings,
        run,
        &mut state.secrets,
    ) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let env_changed = env != state.env;
    match mode {
        Refresh::Reload(sig) => {
            if env_changed {
                tracing::warn!(
                    "an environment value changed; the running command keeps the old one until it restarts (use --restart to restart on changes)"
                );
            }
            if !cycle.written.is_empty() {
                tracing::info!(signal = %sig, "files changed; signalling {}", run.argv[0]);
                let _ = killpg(pid, sig);
            }
        }
        Refresh::Restart => {
            if env_changed || !cycle.written.is_empty() {
                tracing::info!("changes: restarting {}", run.argv[0]);
                state.env = env;
                *restarting = true;
                kill_at.get_or_insert(Instant::now() + run.grace);
                let _ = killpg(pid, run.stop_signal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reference_values_of_the_apps_variables_are_resolved() {
        let vars = [
            ("DB_PASSWORD", "ssm:/app/db/password"),
            (
                "API",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:api",
            ),
            ("CONSUL_HTTP_ADDR", "consul:8500"),
            ("REDIS", "consul:6379"),
            ("DATA", "file:/data/db.sqlite"),
            ("HOME", "/root"),
            ("VAULT_TOKEN", "hvs.x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let refs = env_references(vars).unwrap();
        let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["DB_PASSWORD", "API"]);
        let bad = env_references([("X".to_string(), "vault:a?b".to_string())]).unwrap_err();
        assert!(bad.to_string().contains("environment variable X"), "{bad}");
    }
}
