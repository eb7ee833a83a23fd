//! The controlling terminal, handed to the supervised command and back.

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The controlling terminal, when envrender was started in the foreground
/// of one: the command's process group is made the foreground group, so an
/// interactive command can read from it, and envrender's own group is put
/// back when the command ends.
pub struct Terminal {
    own: Option<Pid>,
}

impl Terminal {
    /// The terminal envrender was started in the foreground of, if any.
    pub fn detect() -> Terminal {
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
    #[allow(unsafe_code)]
    pub fn hand_over_in(&self, command: &mut std::process::Command) {
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

    /// Makes `pgrp` the terminal's foreground group.
    pub fn give(&self, pgrp: Pid) {
        if self.own.is_some() {
            let _ = with_ttou_blocked(|| nix::unistd::tcsetpgrp(std::io::stdin(), pgrp));
        }
    }

    /// Gives the terminal back to envrender's own group.
    pub fn restore(&self) {
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
