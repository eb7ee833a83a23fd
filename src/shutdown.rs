//! Stopping on SIGTERM and SIGINT, in every mode and at any moment.
//!
//! A container runtime sends SIGTERM and kills after its grace period; as
//! PID 1 (an init container, `run` as entrypoint) a signal without a
//! handler is not even delivered. So every mode listens for both from its
//! start, and what it is waiting on (a fetch, a render, a reload command)
//! is abandoned when one arrives ([`Stop::or_stop`]). Abandoning is safe:
//! outputs are committed by synchronous code between two awaits, so a
//! render is either committed whole or not at all, and a reload command is
//! killed with its future (`kill_on_drop`).

use std::future::Future;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::Error;
use crate::problem::ConfigError;

/// SIGTERM and SIGINT, listened for.
pub struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// A stream of one signal; from then on the signal no longer has its
/// default action.
pub fn listen(kind: SignalKind) -> Result<tokio::signal::unix::Signal, Error> {
    signal(kind).map_err(|e| {
        Error::Setup(ConfigError::new(
            "envrender",
            format!("cannot handle signals: {e}"),
        ))
    })
}

impl Stop {
    /// Starts listening for SIGTERM and SIGINT; from then on neither ends
    /// the process by itself.
    pub fn listen() -> Result<Stop, Error> {
        Ok(Stop {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }

    /// A stop signal that has arrived and not been received yet.
    pub async fn pending(&mut self) -> Option<Signal> {
        tokio::select! {
            biased;
            sig = self.recv() => Some(sig),
            _ = std::future::ready(()) => None,
        }
    }

    /// The next stop signal.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
        }
    }

    /// `work`, unless a stop signal comes first: then the signal, and
    /// `work` is dropped where it stood.
    pub async fn or_stop<F: Future>(&mut self, work: F) -> Result<F::Output, Signal> {
        tokio::select! {
            out = work => Ok(out),
            sig = self.recv() => Err(sig),
        }
    }
}

/// The exit code of a process stopped by `sig`, as a shell reports it.
pub fn exit_code(sig: Signal) -> u8 {
    128 + sig as u8
}

/// The processes whose parent is this one (`/proc/*/stat`).
pub fn children() -> Vec<Pid> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(me)
        })
        .map(Pid::from_raw)
        .collect()
}

/// The parent pid in the text of `/proc/PID/stat` (after the command
/// name, which may hold spaces and parentheses).
fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Stops every process still parented to envrender (orphans handed to it
/// as a subreaper or as PID 1, once the command has exited): `signal`,
/// then SIGKILL after `grace`, reaping as they go. Descendants that
/// become orphans meanwhile are stopped too.
pub async fn stop_descendants(signal: Signal, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    let mut signalled = std::collections::BTreeSet::new();
    let mut killed = false;
    loop {
        reap();
        let left = children();
        if left.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        // One that SIGKILL does not end (stuck in the kernel) is left.
        if now >= deadline + Duration::from_secs(2) {
            return;
        }
        let late = now >= deadline;
        if late && !killed {
            killed = true;
            tracing::warn!(grace = ?grace, "descendants of the command did not stop in time; killing them");
        }
        for pid in left {
            if late {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            } else if signalled.insert(pid) {
                tracing::info!(pid = pid.as_raw(), signal = %signal, "stopping a descendant that outlived the command");
                let _ = nix::sys::signal::kill(pid, signal);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reaps every child that has exited.
fn reap() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_read_past_odd_command_names() {
        assert_eq!(parent_of("42 (sh) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("42 (a) b (c) S 9 42"), Some(9));
        assert_eq!(parent_of("garbage"), None);
    }
}
