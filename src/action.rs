//! Actions: what `watch` does after outputs changed. A signal to a process
//! found by a pid file or by name, a command, or an HTTP POST; parsed from
//! flags and `on_change` tables, labelled for logs and metrics without
//! their arguments, and run with retries.

use std::path::PathBuf;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::output::{self, FileWrite, Status};
use crate::problem::ConfigError;

/// What to do after outputs changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a signal to the processes found by a PID file or by name.
    Signal {
        /// The signal sent.
        signal: nix::sys::signal::Signal,
        /// Whom it is sent to.
        target: Target,
    },
    /// Run a command (argv, no shell), killed after the timeout.
    Exec {
        /// The program and its arguments.
        argv: Vec<String>,
        /// How long it may run before it is killed.
        timeout: Duration,
    },
    /// POST to a URL; any 2xx is success.
    Http {
        /// The URL, which may carry credentials (never logged).
        url: String,
    },
}

/// Whom a signal action signals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The process whose id a file holds.
    PidFile(PathBuf),
    /// Every process of this name (`/proc/PID/comm` or its program).
    ProcessName(String),
}

impl Action {
    /// For a signal action, whether a process it would signal runs now;
    /// `None` for other actions (they say nothing about the app).
    pub fn target_running(&self) -> Option<bool> {
        let Action::Signal { target, .. } = self else {
            return None;
        };
        let pids = match target {
            Target::PidFile(path) => read_pid_file(path)
                .ok()
                .and_then(|text| pid_of(&text).ok())
                .into_iter()
                .collect(),
            Target::ProcessName(name) => processes_named(name),
        };
        // Signal 0 checks without sending; EPERM: it runs, as another user.
        Some(pids.into_iter().any(|pid| {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
                Ok(()) => true,
                Err(e) => e == nix::errno::Errno::EPERM,
            }
        }))
    }
}

/// Sends `signal` to each of `pids`, all of them whatever fails: a retry
/// of the action would signal again those already signalled. A process
/// that exited since it was found is no failure, unless none was left.
fn signal_each(pids: &[i32], signal: nix::sys::signal::Signal) -> Result<(), String> {
    let mut errors = Vec::new();
    let mut gone = Vec::new();
    for &pid in pids {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) => {}
            Err(nix::errno::Errno::ESRCH) => gone.push(pid),
            Err(e) => errors.push(format!("cannot signal process {pid}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    if !pids.is_empty() && gone.len() == pids.len() {
        let list: Vec<String> = gone.iter().map(i32::to_string).collect();
        return Err(format!(
            "no process left to signal: {} exited",
            list.join(", ")
        ));
    }
    Ok(())
}

/// Runs a command (argv, no shell) with envrender's credentials removed
/// from its environment, in a process group of its own, killed with its
/// children after `timeout`. `quiet`: its output is dropped (it may quote
/// a file holding secrets).
async fn exec(
    argv: &[String],
    timeout: Duration,
    keep_env: &[String],
    quiet: bool,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut command = tokio::process::Command::new(program);
    // A reload command needs none of envrender's credentials.
    for name in crate::environment::scrubbed_for_commands(keep_env) {
        command.env_remove(name);
    }
    if quiet {
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
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
        Some(child) => tokio::time::timeout(timeout, child.wait()).await,
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
            humantime::format_duration(timeout)
        )),
    }
}

/// Writes `writes` all or nothing (see [`output::commit`]) once each file
/// that would change and has a check command has passed its check, run
/// against the staged file (`{file}`) before anything is in place. A file
/// refused leaves every output as it was.
pub async fn commit_checked(writes: &[FileWrite]) -> Result<Vec<Status>, Error> {
    let prepared = output::Prepared::new(writes).map_err(Error::Output)?;
    let mut refused = Vec::new();
    for (w, staged) in prepared.changed() {
        let Some(check) = &w.check else { continue };
        let file = staged.to_string_lossy();
        let argv: Vec<String> = check.iter().map(|a| a.replace("{file}", &file)).collect();
        if let Err(e) = exec(&argv, DEFAULT_EXEC_TIMEOUT, &[], true).await {
            refused.push(
                ConfigError::new(
                    w.path.display().to_string(),
                    format!("check `{}` refused the new content: {e}", check.join(" ")),
                )
                .hint(format!(
                    "the file in place was kept; its output is not shown (it may quote secrets): render {} elsewhere and run the check on it",
                    w.origin
                )),
            );
        }
    }
    if !refused.is_empty() {
        return Err(Error::Refused(refused));
    }
    prepared.finish().map_err(Error::Output)
}

/// Between the attempts of a failing action: 1 s, then 2 s.
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));

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

/// Runs each action once, retrying a failing one twice (1 s, then 2 s
/// later); a failure is reported, never fatal. `done` hears how each
/// ended.
pub async fn run_all(actions: &[Action], keep_env: &[String], mut done: impl FnMut(&Action, bool)) {
    for action in actions {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match run(action, keep_env).await {
                Ok(()) => {
                    tracing::info!(action = %action, "action done");
                    done(action, true);
                    break;
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(action = %action, error = %e, attempt, "action failed; retrying");
                    tokio::time::sleep(RETRY.delay(attempt - 1)).await;
                }
                Err(e) => {
                    tracing::error!(action = %action, error = %e, "action failed");
                    done(action, false);
                    break;
                }
            }
        }
    }
}

/// Runs one action once.
pub async fn run(action: &Action, keep_env: &[String]) -> Result<(), String> {
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
            signal_each(&pids, *signal)
        }
        Action::Exec { argv, timeout } => exec(argv, *timeout, keep_env, false).await,
        Action::Http { url } => {
            let response = reqwest::Client::new()
                .post(url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                // reqwest names the URL in its errors, query and all; the
                // query may carry a token.
                .map_err(|e| crate::backend::error_chain(&e.without_url()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A process of the name that exits between the look and the signal
    /// is no failure, and the others are signalled once: a retry would
    /// signal them twice.
    #[test]
    fn a_process_gone_before_its_signal_does_not_fail_the_others() {
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id() as i32;
        gone.wait().unwrap();
        let mut alive = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let result = signal_each(
            &[gone_pid, alive.id() as i32],
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = alive.wait().unwrap();
        assert_eq!(result, Ok(()));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
    }

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

    #[tokio::test]
    async fn a_failed_post_does_not_print_its_url() {
        // Nothing listens on port 1: the error is reqwest's, which names
        // the URL, query and all, unless told not to.
        let action = http_action("http://127.0.0.1:1/-/reload?token=s3cret").unwrap();
        let e = run(&action, &[]).await.unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
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
}
