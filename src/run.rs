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

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::engine::{EnvValue, Plan, Settings};
use crate::error::Error;
use crate::health::Health;
use crate::resolve::Resolver;
use crate::shutdown::Stop;
use crate::supervise::env::{ChildEnv, SecretFiles, child_env};
use crate::supervise::{Control, Job, Spec, command, start_error};
use crate::watch::{Cycle, Refresher};

/// How the app is run.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// What stopping the command sends first (`--stop-signal`).
    pub stop_signal: Signal,
    /// How long the command may take to stop before SIGKILL (`--grace`).
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

/// Resolves and renders everything, then execs or supervises the app.
/// Returns the app's exit code (when supervised), or 128+N when stop
/// signal N came before it started.
pub async fn run(
    resolver: &Resolver,
    settings: Settings,
    run: &RunSettings,
    process_env: Vec<(OsString, OsString)>,
    mut stop: Stop,
) -> Result<u8, Error> {
    let started = Instant::now();
    let plan = Plan::new(&settings)?;
    plan.remove_interrupted_writes();
    // As PID 1 a SIGTERM without a handler is never delivered: `stop`
    // listens from the start, and resolving is given up when one comes.
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
    crate::action::commit_checked(&writes).await?;

    let mut secrets = SecretFiles::new(run.secrets_dir.clone());
    let env = child_env(
        &process_env,
        plan.env_vars(&resolution),
        &settings.env,
        &run.keep_env,
        &mut secrets,
    )?;
    let leases = resolution
        .fetched
        .values()
        .any(|r| matches!(r, Ok(f) if f.lease.is_some()));
    crate::resolve::keep_answers(&mut resolution.fetched);
    tracing::info!(
        references = resolution.users.len(),
        outputs = writes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "starting {}",
        run.argv[0]
    );
    // A stop signal that came while the outputs were being written: the
    // command is not started.
    if let Some(sig) = stop.pending().await {
        tracing::warn!(signal = %sig, "stopped before starting {}", run.argv[0]);
        return Ok(crate::shutdown::exit_code(sig));
    }
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
        let e = command(&run.argv, &env).exec();
        return Err(start_error(&run.argv[0], &e));
    }
    let health = Arc::new(Health::default());
    if let Some(addr) = run.listen {
        crate::health::serve(addr, health.clone()).await?;
    }
    let spec = Spec {
        argv: run.argv.clone(),
        stop_signal: run.stop_signal,
        grace: run.grace,
        restart_on_exit: run.restart_on_exit,
        subreaper: run.subreaper,
    };
    let mut job = Job::start(spec, env.clone())?;
    health.set_ready();
    let Some(mode) = run.refresh else {
        // Leases kept alive; nothing watched.
        let mut sources = crate::watch::Sources::default();
        sources.keep_alive(resolver, &resolution.fetched);
        loop {
            tokio::select! {
                code = job.wait() => return code,
                sig = stop.recv() => forward(&job, sig).await,
            }
        }
    };
    let mut refresher = Refresher::new(
        resolver,
        settings,
        plan,
        resolution.fetched,
        health,
        run.wait,
        run.splay,
    );
    refresher.follow();
    // The `*_FILE` files are removed when `supervised` drops, after the
    // command has exited.
    let mut supervised = Supervised {
        env,
        process_env,
        secrets,
    };
    loop {
        tokio::select! {
            code = job.wait() => return code,
            sig = stop.recv() => forward(&job, sig).await,
            _ = refresher.due() => {
                // Signals keep being forwarded during the render; SIGTERM
                // abandons it (committed whole or not at all).
                let cycle = {
                    let render = refresher.render();
                    tokio::pin!(render);
                    loop {
                        tokio::select! {
                            cycle = &mut render => break cycle,
                            sig = stop.recv() => {
                                forward(&job, sig).await;
                                if sig == Signal::SIGTERM {
                                    break None;
                                }
                            }
                        }
                    }
                };
                if let Some(cycle) = cycle {
                    let env = &refresher.settings().env;
                    supervised.changed(&job, run, mode, cycle, env).await;
                }
            }
        }
    }
}

/// A stop signal for the command: SIGTERM stops it (the stop signal, then
/// SIGKILL after the grace), SIGINT is passed on.
async fn forward(job: &Job, sig: Signal) {
    let control = if sig == Signal::SIGTERM {
        Control::Stop
    } else {
        Control::Signal(sig)
    };
    job.send(control).await;
}

/// What a refreshing run carries from one render to the next.
struct Supervised {
    env: ChildEnv,
    process_env: Vec<(OsString, OsString)>,
    secrets: SecretFiles,
}

impl Supervised {
    /// After a render: reload or restart the command, as `mode` says.
    async fn changed(
        &mut self,
        job: &Job,
        run: &RunSettings,
        mode: Refresh,
        cycle: Cycle,
        env: &[(String, EnvValue)],
    ) {
        let program = &run.argv[0];
        let new = match child_env(
            &self.process_env,
            cycle.env,
            env,
            &run.keep_env,
            &mut self.secrets,
        ) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let env_changed = new != self.env;
        match mode {
            Refresh::Reload(sig) => {
                if env_changed {
                    tracing::warn!(
                        "an environment value changed; the running command keeps the old one until it restarts (use --restart to restart on changes)"
                    );
                }
                if !cycle.written.is_empty() {
                    tracing::info!(signal = %sig, "files changed; signalling {program}");
                    job.send(Control::Signal(sig)).await;
                }
            }
            Refresh::Restart => {
                if env_changed || !cycle.written.is_empty() {
                    tracing::info!("changes: restarting {program}");
                    self.env = new.clone();
                    job.send(Control::Restart(new)).await;
                }
            }
        }
    }
}
