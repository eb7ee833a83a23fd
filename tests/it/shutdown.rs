//! SIGTERM ends every mode at once, whatever it is waiting on: a reload
//! command that hangs, a render whose backend never answers, `run`
//! resolving as PID 1 (where a signal without a handler is never
//! delivered); and `run --subreaper` leaves no descendant of its command
//! behind. Each of these waited for its deadline (19-92 s) before.

use crate::support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{Dir, KillOnDrop, eventually};

/// A loopback port that accepts connections and never answers.
fn silent_server() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

fn spawn(cmd: support::Cmd) -> KillOnDrop {
    let mut command = cmd.command;
    command.stdout(Stdio::null()).stderr(Stdio::null());
    KillOnDrop(command.spawn().unwrap())
}

/// Sends SIGTERM to `pid` and waits for `child` to end; how long it took
/// and its exit code, `None` when a signal killed it (no handler: the
/// signal's default action).
fn term_and_wait(child: &mut Child, pid: u32) -> (Duration, Option<i32>) {
    let start = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (start.elapsed(), status.code());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_stops_during_a_hanging_reload_command() {
    let d = Dir::new();
    d.write("value.txt", "one");
    d.write("t.hbs", "{{secret \"file:value.txt\"}}");
    let mut watch = spawn(d.cmd(&[
        "watch",
        "--template",
        "t.hbs:out.txt",
        "--exec",
        "sh -c 'touch started; exec sleep 100'",
        "--exec-timeout",
        "90s",
    ]));
    eventually(Duration::from_secs(20), "the first render", || {
        d.join("out.txt").exists()
    });
    d.write("value.txt", "two");
    eventually(Duration::from_secs(20), "the reload command", || {
        d.join("started").exists()
    });
    let pid = watch.0.id();
    let (took, code) = term_and_wait(&mut watch.0, pid);
    assert!(
        took < Duration::from_secs(5),
        "watch stopped after {took:?}"
    );
    // Stopped by its own handler (exit 0), not by the signal's default.
    assert_eq!(code, Some(0));
}

/// Starts `mode` rendering a value from a Consul that never answers,
/// sends it SIGTERM two seconds later; asserts it stopped within 5 s with
/// `code` (an exit of its own, not the signal's default action, which as
/// PID 1 would never come), and wrote nothing.
fn stops_while_waiting_on_a_server(mode: &str, code: i32) {
    let (_listener, consul) = silent_server();
    let d = Dir::new();
    d.write("t.hbs", "{{consul \"app/host\"}}");
    let mut child = spawn(
        d.cmd(&[mode, "--template", "t.hbs:out.txt", "--timeout", "60s"])
            .env("CONSUL_HTTP_ADDR", &consul),
    );
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.0.id();
    let (took, exited) = term_and_wait(&mut child.0, pid);
    assert!(
        took < Duration::from_secs(5),
        "{mode} stopped after {took:?}"
    );
    assert_eq!(exited, Some(code), "{mode}");
    assert!(!d.join("out.txt").exists());
}

#[test]
fn watch_stops_during_a_render_that_gets_no_answer() {
    stops_while_waiting_on_a_server("watch", 0);
}

#[test]
fn render_stops_on_sigterm_with_nothing_written() {
    stops_while_waiting_on_a_server("render", 143);
}

/// The pid of the only child of `parent`.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s[s.rfind(')')? + 1..].to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
}

#[test]
fn run_as_pid_1_stops_while_resolving() {
    let (_listener, consul) = silent_server();
    let d = Dir::new();
    // envrender as PID 1 of a PID namespace of its own, resolving a value
    // from a server that never answers.
    let command = d
        .cmd(&["run", "--timeout", "60s", "--", "true"])
        .env("CONSUL_HTTP_ADDR", &consul)
        .env("APP_HOST", "consul:app/host")
        .command;
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let mut unshare = std::process::Command::new("unshare");
    unshare
        .args(["--pid", "--fork", "--kill-child"])
        .arg(program)
        .args(args)
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => unshare.env(k, v),
            None => unshare.env_remove(k),
        };
    }
    let mut outer = KillOnDrop(unshare.spawn().unwrap());
    let start = Instant::now();
    let pid = loop {
        if let Some(pid) = child_of(outer.0.id()) {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no envrender");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_secs(1));
    let (took, code) = term_and_wait(&mut outer.0, pid);
    assert!(took < Duration::from_secs(5), "run stopped after {took:?}");
    // An exit of its own with 128+15, not death by the signal's default
    // action (which, as PID 1, would never come).
    assert_eq!(code, Some(143));
}

#[test]
fn a_subreaper_run_leaves_no_descendant_behind() {
    let d = Dir::new();
    // The command leaves a daemon in a session of its own, then exits.
    d.cmd(&[
        "run",
        "--subreaper",
        "--grace",
        "2s",
        "--",
        "sh",
        "-c",
        "setsid sleep 1000 >/dev/null 2>&1 & echo $! > daemon.pid",
    ])
    .run()
    .success();
    let pid: i32 = d.read("daemon.pid").trim().parse().unwrap();
    let alive = kill(Pid::from_raw(pid), None).is_ok();
    if alive {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    assert!(!alive, "the command's daemon {pid} outlived envrender");
}
