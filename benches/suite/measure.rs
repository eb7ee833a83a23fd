//! Running processes and reading what they cost: wall time and CPU time of
//! a child (from `wait4`), its peak resident memory (from `/proc` as it
//! exits), and the memory and CPU of a running one (from `/proc`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one run of a command cost.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kb: u64,
}

/// Runs `cmd` to completion with its stderr in `log`; panics, showing the
/// log, unless it exits 0.
///
/// The peak memory is the child's own `VmHWM`, read as it exits (the child
/// runs under ptrace, stopped at its exit): `wait4`'s `ru_maxrss` would
/// also count the pages of this process, whose memory the child shares
/// between fork and exec.
pub fn run(cmd: &mut Command, log: &Path) -> Sample {
    use std::os::unix::process::CommandExt as _;
    let file = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe; it only marks
    // the child as traced by this process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}")).id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut peak_kb = 0;
    let mut options_set = false;
    let pid = loop {
        // SAFETY: waits for our own child, into buffers on this stack; the
        // ptrace calls act on that child only, while it is stopped.
        let pid = unsafe { libc::wait4(child, &mut status, 0, &mut usage) };
        if pid != child || !libc::WIFSTOPPED(status) {
            break pid;
        }
        let mut deliver = 0;
        if !options_set {
            // The stop after its exec: from here on, stop at its exit and
            // at later execs (envrender run exec's its command) as events.
            let options =
                libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL;
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, child, 0, options) };
            options_set = true;
        } else if status >> 8 == libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8) {
            let status = std::fs::read_to_string(format!("/proc/{child}/status"));
            peak_kb = kb_field(&status.unwrap_or_default(), "VmHWM:");
        } else if status >> 16 == 0 {
            // A signal for the child, not a ptrace event: let it through.
            deliver = libc::WSTOPSIG(status);
        }
        unsafe { libc::ptrace(libc::PTRACE_CONT, child, 0, deliver) };
    };
    let wall = start.elapsed();
    assert_eq!(pid, child, "wait4 failed");
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    assert!(
        exited_ok,
        "{cmd:?} failed (wait status {status}):\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Sample {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: peak_kb,
    }
}

/// A `kB` field (`VmHWM:`, `Rss:`, …) of a `/proc/PID/…` file's text, 0
/// when absent.
fn kb_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The `p` quantile (0 < p ≤ 1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// A process's memory, in kB.
#[derive(Clone, Copy)]
pub struct Memory {
    /// Resident pages: its own, and file pages (the binary, libc) counted
    /// in full even when other processes map them too.
    pub rss_kb: u64,
    /// Of which anonymous (heap, stacks, relocated data).
    pub anon_kb: u64,
    /// Pages no other process maps (USS): what one more such process adds.
    pub uss_kb: u64,
}

/// A long-running child, killed when dropped.
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Running {
    pub fn start(cmd: &mut Command, log: PathBuf) -> Running {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Running { child, log }
    }

    /// Its memory now, from `/proc/PID/smaps_rollup`.
    pub fn memory(&self) -> Memory {
        let rollup =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap();
        let field = |name: &str| kb_field(&rollup, name);
        Memory {
            rss_kb: field("Rss:"),
            anon_kb: field("Anonymous:"),
            uss_kb: field("Private_Clean:") + field("Private_Dirty:"),
        }
    }

    /// User + system CPU time used so far.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Panics with the log if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "exited early ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` holds, up to `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
