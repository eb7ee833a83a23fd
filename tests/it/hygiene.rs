//! Process hygiene: no file descriptor or child process outlives its use
//! across many reloads and restarts. `watch` runs a command and calls a URL
//! on every change; `run` signals its command, or restarts it, on every
//! change. envrender's open descriptors and its children are counted before
//! and after.
//!
//! `cargo test` runs 200 changes per mode; `ENVRENDER_HYGIENE_CYCLES=1000
//! cargo test --test it hygiene:: -- --nocapture` runs the full thousand.

use crate::support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::consul::ConsulServer;
use support::fault::{Fault, FaultProxy};
use support::{Dir, KillOnDrop, eventually};

fn cycles() -> usize {
    std::env::var("ENVRENDER_HYGIENE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// envrender's open file descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The processes whose parent is `pid`, zombies included: (pid, state).
fn children(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push((child, state));
        }
    }
    out
}

fn lines(d: &Dir, file: &str) -> usize {
    std::fs::read_to_string(d.join(file))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn spawn(cmd: support::Cmd, d: &Dir) -> KillOnDrop {
    let mut command = cmd.command;
    command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("envrender.log")).unwrap());
    KillOnDrop(command.spawn().unwrap())
}

/// What [`churn`] saw.
struct Churned {
    /// envrender's descriptors after the first change.
    first_fds: usize,
    /// ... and after the last.
    last_fds: usize,
    /// Its children after the last.
    left: Vec<(u32, char)>,
    took: Duration,
}

/// Makes `n` changes to `app/n`, each waited for with `done(i)`, counting
/// envrender's descriptors and children.
fn churn(server: &ConsulServer, pid: u32, n: usize, done: impl Fn(usize) -> bool) -> Churned {
    let start = Instant::now();
    let mut first_fds = 0;
    for i in 1..=n {
        server.put("app/n", &i.to_string());
        eventually(Duration::from_secs(20), &format!("change {i}"), || done(i));
        if i == 1 {
            first_fds = fds(pid);
        }
    }
    // Let the last action or restart finish.
    std::thread::sleep(Duration::from_millis(300));
    Churned {
        first_fds,
        last_fds: fds(pid),
        left: children(pid),
        took: start.elapsed(),
    }
}

#[test]
fn watch_actions_leak_no_descriptors_or_processes() {
    let n = cycles();
    let server = ConsulServer::start();
    server.put("app/n", "0");
    let hook = FaultProxy::start("http://127.0.0.1:9");
    hook.inject(Fault::Status(200), None);
    let d = Dir::new();
    d.write("t.hbs", "n={{consul \"app/n\"}}\n");
    let w = spawn(
        d.cmd(&[
            "watch",
            "--template",
            "t.hbs:out.conf",
            "--exec",
            "sh -c 'echo x >> actions'",
            "--http",
            &format!("{}/reload", hook.url),
        ])
        .env("CONSUL_HTTP_ADDR", server.url.trim_start_matches("http://")),
        &d,
    );
    let pid = w.0.id();
    eventually(Duration::from_secs(20), "the first render", || {
        d.join("out.conf").exists()
    });
    let Churned {
        first_fds,
        last_fds,
        left,
        took,
    } = churn(&server, pid, n, |i| {
        lines(&d, "actions") >= i && hook.requests() >= i
    });
    eprintln!(
        "watch: {n} changes in {took:.1?}, {} commands run, {} URL calls; descriptors {} after the first, {last_fds} after the last; children {left:?}",
        lines(&d, "actions"),
        hook.requests(),
        first_fds
    );
    assert_eq!(lines(&d, "actions"), n);
    assert!(
        last_fds <= first_fds,
        "descriptors grew from {} to {last_fds}",
        first_fds
    );
    assert!(left.is_empty(), "children left: {left:?}");
}

#[test]
fn run_reloads_and_restarts_leak_no_descriptors_or_processes() {
    let n = cycles();
    for mode in ["--reload-signal", "--restart"] {
        let server = ConsulServer::start();
        server.put("app/n", "0");
        let d = Dir::new();
        d.write("t.hbs", "n={{consul \"app/n\"}}\n");
        let script = "echo start >> starts; trap 'echo hup >> hups' HUP; trap 'exit 0' TERM; \
                      while :; do sleep 1 & wait $!; done";
        let mut args = vec!["run", mode];
        if mode == "--reload-signal" {
            args.push("SIGHUP");
        }
        args.extend(["--template", "t.hbs:out.conf", "--", "sh", "-c", script]);
        let r = spawn(
            d.cmd(&args)
                .env("CONSUL_HTTP_ADDR", server.url.trim_start_matches("http://")),
            &d,
        );
        let pid = r.0.id();
        eventually(Duration::from_secs(20), "the command", || {
            lines(&d, "starts") == 1
        });
        let Churned {
            first_fds,
            last_fds,
            left,
            took,
        } = churn(&server, pid, n, |i| {
            if mode == "--restart" {
                lines(&d, "starts") > i
            } else {
                lines(&d, "hups") >= i
            }
        });
        eprintln!(
            "run {mode}: {n} changes in {took:.1?}, {} starts, {} reloads; descriptors {} after the first, {last_fds} after the last; children {left:?}",
            lines(&d, "starts"),
            lines(&d, "hups"),
            first_fds
        );
        assert!(
            last_fds <= first_fds,
            "{mode}: descriptors grew from {} to {last_fds}",
            first_fds
        );
        // The command, and nothing else: no zombie, no earlier command.
        assert_eq!(left.len(), 1, "{mode}: children {left:?}");
        assert_ne!(left[0].1, 'Z', "{mode}: {left:?}");
        if mode == "--restart" {
            assert_eq!(lines(&d, "starts"), n + 1);
        } else {
            assert_eq!(lines(&d, "starts"), 1);
            assert_eq!(lines(&d, "hups"), n);
        }
    }
}
