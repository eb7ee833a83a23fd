//! The supervised command: one task owns the process and obeys messages.
//!
//! The command runs in a process group of its own, with the terminal handed
//! over when envrender was started in the foreground of one. The task
//! forwards SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to the group,
//! and does what it is told ([`Control`]): send a signal, stop (the stop
//! signal, then SIGKILL after the grace), or restart with a new
//! environment. As PID 1 (or a subreaper) it reaps every orphan handed to
//! it, and when the command has exited it stops the descendants still
//! running. A command that exits on its own is started again, with a
//! backoff, when asked to; otherwise its exit code (128+N when it died of
//! signal N) is the job's.

pub mod env;
mod terminal;

use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::SignalKind;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::{Backoff, sleep_until};
use crate::error::Error;
use crate::problem::ConfigError;
use env::ChildEnv;
pub use terminal::Terminal;

/// Before starting again a command that exited on its own: 1 s doubling
/// to 60 s; the count starts over after ten minutes of running.
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// How long a command must have run for its exits to count from one again.
const STABLE: Duration = Duration::from_secs(600);

/// How the command is run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// What stopping the command sends first.
    pub stop_signal: Signal,
    /// How long the command may take to stop before SIGKILL.
    pub grace: Duration,
    /// Start the command again when it exits on its own.
    pub restart_on_exit: bool,
    /// Reap orphans even when not PID 1 (become a subreaper).
    pub subreaper: bool,
}

/// What the job is told to do.
#[derive(Debug)]
pub enum Control {
    /// Send this signal to the command's process group.
    Signal(Signal),
    /// Stop the command (the stop signal, SIGKILL after the grace); the job
    /// ends with its exit code.
    Stop,
    /// Stop the command and start it again with this environment.
    Restart(ChildEnv),
}

/// The running job: a handle to the task that owns the command.
pub struct Job {
    control: mpsc::Sender<Control>,
    task: JoinHandle<Result<u8, Error>>,
}

impl Job {
    /// Starts the command with `env`; fails when it cannot be started.
    pub fn start(spec: Spec, env: ChildEnv) -> Result<Job, Error> {
        let reaps_orphans = reap_orphans(spec.subreaper);
        // Listened to before the first start, so no exit goes unseen.
        let chld = crate::shutdown::listen(SignalKind::child())?;
        let mut forwarded = Vec::new();
        for (kind, sig) in [
            (SignalKind::hangup(), Signal::SIGHUP),
            (SignalKind::quit(), Signal::SIGQUIT),
            (SignalKind::user_defined1(), Signal::SIGUSR1),
            (SignalKind::user_defined2(), Signal::SIGUSR2),
            (SignalKind::window_change(), Signal::SIGWINCH),
        ] {
            forwarded.push((crate::shutdown::listen(kind)?, sig));
        }
        let terminal = Terminal::detect();
        let pid = spawn(&spec.argv, &env, &terminal)?;
        let (control, rx) = mpsc::channel(16);
        let task = Task {
            spec,
            env,
            terminal,
            reaps_orphans,
            state: State::Running {
                pid,
                since: Instant::now(),
            },
            exits: 0,
            last_code: 0,
        };
        let task = tokio::spawn(task.run(rx, chld, forwarded));
        Ok(Job { control, task })
    }

    /// Tells the job what to do; nothing when it has ended.
    pub async fn send(&self, control: Control) {
        let _ = self.control.send(control).await;
    }

    /// The job's end: the command's exit code. Cancel-safe.
    pub async fn wait(&mut self) -> Result<u8, Error> {
        match (&mut self.task).await {
            Ok(outcome) => outcome,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// Whether orphans come to envrender: as PID 1, or as a subreaper when
/// asked.
fn reap_orphans(subreaper: bool) -> bool {
    if std::process::id() == 1 {
        return true;
    }
    if !subreaper {
        return false;
    }
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot become a subreaper; orphans go to PID 1");
            false
        }
    }
}

/// Where the command stands.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Running since then.
    Running { pid: Pid, since: Instant },
    /// Told to stop; SIGKILL at `kill_at` (once), then `then`.
    Stopping {
        pid: Pid,
        kill_at: Option<Instant>,
        then: Then,
    },
    /// Exited on its own; started again at `until`.
    Waiting { until: Instant },
}

/// What follows a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Exit,
    Restart,
}

struct Task {
    spec: Spec,
    env: ChildEnv,
    terminal: Terminal,
    reaps_orphans: bool,
    state: State,
    /// Exits on its own in a row, for the restart backoff.
    exits: u32,
    /// The last exit code, the job's if it ends while waiting to restart.
    last_code: u8,
}

impl Task {
    async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        mut chld: tokio::signal::unix::Signal,
        forwarded: Vec<(tokio::signal::unix::Signal, Signal)>,
    ) -> Result<u8, Error> {
        let (signals_tx, mut signals) = mpsc::channel::<Signal>(16);
        let mut forwarders = tokio::task::JoinSet::new();
        for (mut stream, sig) in forwarded {
            let tx = signals_tx.clone();
            forwarders.spawn(async move {
                while stream.recv().await.is_some() && tx.send(sig).await.is_ok() {}
            });
        }
        loop {
            let (kill_at, until) = match self.state {
                State::Stopping { kill_at, .. } => (kill_at, None),
                State::Waiting { until } => (None, Some(until)),
                State::Running { .. } => (None, None),
            };
            let done = tokio::select! {
                _ = chld.recv() => self.reap()?,
                Some(sig) = signals.recv() => {
                    self.signal(sig);
                    None
                }
                message = control.recv() => match message {
                    Some(Control::Signal(sig)) => self.signal_or_end(sig),
                    Some(Control::Stop) | None => self.stop(),
                    Some(Control::Restart(env)) => {
                        self.restart(env);
                        None
                    }
                },
                _ = sleep_until(kill_at) => {
                    if let State::Stopping { pid, then, .. } = self.state {
                        tracing::warn!(grace = ?self.spec.grace, "{} did not stop in time; killing its process group", self.spec.argv[0]);
                        let _ = killpg(pid, Signal::SIGKILL);
                        self.state = State::Stopping { pid, kill_at: None, then };
                    }
                    None
                }
                _ = sleep_until(until) => {
                    self.start()?;
                    None
                }
            };
            if let Some(code) = done {
                return Ok(self.finish(code, kill_at).await);
            }
        }
    }

    /// A signal forwarded to the running command.
    fn signal(&self, sig: Signal) {
        if let State::Running { pid, .. } | State::Stopping { pid, .. } = self.state {
            tracing::debug!(signal = %sig, "forwarding");
            let _ = killpg(pid, sig);
        }
    }

    /// A signal from envrender's caller: forwarded; SIGINT while waiting to
    /// start the command again ends the job.
    fn signal_or_end(&self, sig: Signal) -> Option<u8> {
        match self.state {
            State::Waiting { .. } if sig == Signal::SIGINT => Some(self.last_code),
            _ => {
                self.signal(sig);
                None
            }
        }
    }

    fn stop(&mut self) -> Option<u8> {
        match self.state {
            State::Running { pid, .. } => {
                self.state = State::Stopping {
                    pid,
                    kill_at: Some(Instant::now() + self.spec.grace),
                    then: Then::Exit,
                };
            }
            State::Stopping { pid, kill_at, .. } => {
                self.state = State::Stopping {
                    pid,
                    kill_at,
                    then: Then::Exit,
                };
            }
            State::Waiting { .. } => return Some(self.last_code),
        }
        self.signal(self.spec.stop_signal);
        None
    }

    fn restart(&mut self, env: ChildEnv) {
        self.env = env;
        match self.state {
            State::Running { pid, .. } => {
                self.state = State::Stopping {
                    pid,
                    kill_at: Some(Instant::now() + self.spec.grace),
                    then: Then::Restart,
                };
                self.signal(self.spec.stop_signal);
            }
            State::Stopping {
                then: Then::Restart,
                ..
            } => self.signal(self.spec.stop_signal),
            // Stopping to exit, or about to start with the new environment.
            State::Stopping { .. } | State::Waiting { .. } => {}
        }
    }

    fn start(&mut self) -> Result<(), Error> {
        let pid = spawn(&self.spec.argv, &self.env, &self.terminal)?;
        self.state = State::Running {
            pid,
            since: Instant::now(),
        };
        Ok(())
    }

    /// Reaps the command and any orphan handed to envrender; `Some(code)`
    /// when the job ends.
    fn reap(&mut self) -> Result<Option<u8>, Error> {
        loop {
            let status = waitpid(None, Some(WaitPidFlag::WNOHANG));
            let (pid, code) = match status {
                Ok(WaitStatus::Exited(p, code)) => (p, code as u8),
                Ok(WaitStatus::Signaled(p, sig, _)) => (p, 128 + sig as u8),
                Ok(WaitStatus::StillAlive) | Err(_) => return Ok(None),
                Ok(_) => continue,
            };
            let (ours, since, then) = match self.state {
                State::Running { pid, since } => (pid, Some(since), None),
                State::Stopping { pid, then, .. } => (pid, None, Some(then)),
                State::Waiting { .. } => continue,
            };
            if pid != ours {
                continue;
            }
            self.last_code = code;
            match (then, since) {
                (Some(Then::Restart), _) => {
                    tracing::info!(code, "{} stopped; starting it again", self.spec.argv[0]);
                    self.start()?;
                }
                (Some(Then::Exit), _) => return Ok(Some(code)),
                (None, Some(since)) if self.spec.restart_on_exit => {
                    self.exits = if since.elapsed() > STABLE {
                        1
                    } else {
                        self.exits.saturating_add(1)
                    };
                    let backoff = RESTART_BACKOFF.delay(self.exits - 1);
                    tracing::warn!(
                        code,
                        restart_in_s = backoff.as_secs(),
                        "{} exited; starting it again",
                        self.spec.argv[0]
                    );
                    self.state = State::Waiting {
                        until: Instant::now() + backoff,
                    };
                }
                (None, _) => return Ok(Some(code)),
            }
        }
    }

    /// The terminal back, and the descendants that outlived the command
    /// stopped: orphans handed to envrender (a daemon the command started,
    /// in a session of its own) do not outlive it. Within what is left of
    /// the grace a stop started.
    async fn finish(&self, code: u8, kill_at: Option<Instant>) -> u8 {
        self.terminal.restore();
        if self.reaps_orphans {
            let grace = kill_at.map_or(self.spec.grace, |at| {
                at.saturating_duration_since(Instant::now())
            });
            crate::shutdown::stop_descendants(self.spec.stop_signal, grace).await;
        }
        code
    }
}

/// Starts the command in a process group of its own, with the terminal.
fn spawn(argv: &[String], env: &ChildEnv, terminal: &Terminal) -> Result<Pid, Error> {
    let mut c = command(argv, env);
    c.process_group(0);
    terminal.hand_over_in(&mut c);
    let child = c.spawn().map_err(|e| start_error(&argv[0], &e))?;
    tracing::info!(pid = child.id(), "supervising {}", argv[0]);
    let pid = Pid::from_raw(child.id() as i32);
    terminal.give(pid);
    Ok(pid)
}

/// The command with exactly `env` as its environment.
pub fn command(argv: &[String], env: &ChildEnv) -> std::process::Command {
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..]).env_clear().envs(env);
    c
}

/// Why the command could not be started, and what to do.
pub fn start_error(program: &str, e: &std::io::Error) -> Error {
    Error::Setup(
        ConfigError::new("envrender run", format!("cannot start {program}: {e}")).hint(
            if e.kind() == std::io::ErrorKind::NotFound {
                "the command is not on PATH; give its full path"
            } else {
                "check that the command is executable"
            },
        ),
    )
}
