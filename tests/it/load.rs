//! Load: `envrender watch` over 10,000 Consul keys (100 prefixes of 100)
//! while 1,000 of them change every second. Memory stays bounded, renders
//! are coalesced by `--wait`, and when the changes stop the last value of
//! every key is what ends up on disk.
//!
//! `cargo test` runs 5 seconds of changes; `ENVRENDER_LOAD_SECONDS=30 cargo
//! test --test it load:: -- --nocapture` runs the full 30 and prints the figures
//! (`ENVRENDER_LOAD_BIN=target/release/envrender` for the release build; the
//! debug build is CPU-bound at this rate and catches up after the changes).

use crate::support;

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::consul::ConsulServer;
use support::{Dir, eventually};

const PREFIXES: usize = 100;
const PER_PREFIX: usize = 100;
const CHANGES_PER_SECOND: usize = 1000;

fn key(p: usize, k: usize) -> String {
    format!("load/p{p:02}/k{k:03}")
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process, from its `stat` file.
fn cpu_seconds(stat: &str) -> f64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let fields: Vec<&str> = text
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_keys_under_a_thousand_changes_a_second() {
    let seconds: u64 = std::env::var("ENVRENDER_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // This process's CPU time from here on: the other tests of the binary
    // ran in it before.
    let own_before = cpu_seconds("/proc/self/stat");
    let server = ConsulServer::start();
    let mut values = vec![vec![0u64; PER_PREFIX]; PREFIXES];
    let mut template = String::new();
    for (p, prefix) in values.iter().enumerate() {
        for k in 0..prefix.len() {
            server.put(&key(p, k), "0");
            let _ = writeln!(template, "{p}.{k}={{{{consul \"{}\"}}}}", key(p, k));
        }
    }
    let expected = |values: &Vec<Vec<u64>>| {
        let mut out = String::new();
        for (p, prefix) in values.iter().enumerate() {
            for (k, v) in prefix.iter().enumerate() {
                let _ = writeln!(out, "{p}.{k}={v}");
            }
        }
        out
    };
    let d = Dir::new();
    d.write("load.hbs", &template);
    let port = support::aws::free_port();
    let listen = format!("127.0.0.1:{port}");
    // ENVRENDER_LOAD_BIN: measure another build (e.g. target/release/envrender).
    let bin = std::env::var_os("ENVRENDER_LOAD_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_envrender").into());
    let mut watch = d
        .cmd_of(
            &bin,
            &[
                "watch",
                "--listen",
                &listen,
                "--wait",
                "200ms:1s",
                "--template",
                "load.hbs:load.conf",
            ],
        )
        .env("CONSUL_HTTP_ADDR", server.url.trim_start_matches("http://"))
        .command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("watch.log")).unwrap())
        .spawn()
        .unwrap();
    let metrics = || {
        support::aws::block_on(async {
            match reqwest::get(format!("http://{listen}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        })
    };
    eventually(Duration::from_secs(60), "the first render", || {
        d.join("load.conf").exists() && metric(&metrics(), "envrender_ready") == 1
    });
    assert_eq!(d.read("load.conf"), expected(&values));
    let pid = watch.id();
    let settled = rss_kb(pid);
    let renders_before = metric(&metrics(), "envrender_renders_total");

    // Changes: batches of ten every 10 ms, each to a random key, for
    // `seconds`; RSS sampled every 250 ms.
    let mut counter = 0u64;
    let mut change_for = |seconds: u64, values: &mut Vec<Vec<u64>>| {
        let start = Instant::now();
        let mut made = 0u64;
        let mut samples = Vec::new();
        let mut next_sample = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let batch_at = start + Duration::from_millis(10 * (made / 10));
            if let Some(wait) = batch_at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            for _ in 0..CHANGES_PER_SECOND / 100 {
                made += 1;
                counter += 1;
                let (p, k) = (fastrand::usize(..PREFIXES), fastrand::usize(..PER_PREFIX));
                values[p][k] = counter;
                server.put(&key(p, k), &counter.to_string());
            }
            if Instant::now() >= next_sample {
                samples.push(rss_kb(pid));
                next_sample += Duration::from_millis(250);
            }
        }
        (start.elapsed(), made, samples)
    };
    let (took, changes, samples) = change_for(seconds, &mut values);
    // The last value of every key reaches the file.
    let want = expected(&values);
    let caught_up = Instant::now();
    while d.read("load.conf") != want {
        if caught_up.elapsed() > Duration::from_secs(30) {
            // What is stale, and what the watcher said: enough to tell a
            // lost change from a slow one.
            let have = d.read("load.conf");
            let stale: Vec<String> = have
                .lines()
                .zip(want.lines())
                .filter(|(h, w)| h != w)
                .map(|(h, w)| format!("{h} (want {w})"))
                .collect();
            let log = d.read("watch.log");
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "the final state did not reach the file in 30 s: {} stale lines, first {:?}; \
                 metrics:\n{}\nwatch.log, last lines first:\n{}",
                stale.len(),
                &stale[..stale.len().min(5)],
                metrics(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lag = caught_up.elapsed();
    let m = metrics();
    let renders = metric(&m, "envrender_renders_total") - renders_before;
    let writes = metric(&m, "envrender_writes_total");
    let peak = samples.iter().copied().max().unwrap_or(0);
    // What the process holds once the changes have stopped and the last
    // render is done, after this round and after a second round of the same
    // changes: a render's working set is handed back (malloc_trim) and the
    // values held are the same size, so the two agree; what a leak keeps
    // grows with every round. (Samples taken while changes come in catch
    // renders at random points: too noisy to tell growth from a render's
    // peak in a 5 s run.)
    let idle = || {
        let renders_done = metric(&metrics(), "envrender_renders_total");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            metric(&metrics(), "envrender_renders_total"),
            renders_done,
            "still rendering 1.5 s after the final state was on disk"
        );
        rss_kb(pid)
    };
    let after = idle();
    change_for(seconds, &mut values);
    let want = expected(&values);
    eventually(
        Duration::from_secs(30),
        "the second round's final state on disk",
        || d.read("load.conf") == want,
    );
    let again = idle();
    let cpu = cpu_seconds(&format!("/proc/{pid}/stat"));
    let own = cpu_seconds("/proc/self/stat") - own_before;
    let _ = watch.kill();
    let _ = watch.wait();
    eprintln!(
        "{changes} changes in {took:.1?} ({:.0}/s) to 10,000 watched keys: {renders} renders, {writes} writes; RSS {settled} kB settled, peak {peak} kB (idle after the changes {after} kB, after a second round {again} kB); final state on disk {lag:.1?} after the last change; CPU {cpu:.1} s envrender, {own:.1} s the test server and writer (with any test running beside this one)",
        changes as f64 / took.as_secs_f64()
    );
    assert!(
        changes as f64 >= 0.9 * (seconds as usize * CHANGES_PER_SECOND) as f64,
        "only {changes} changes were made"
    );
    // Coalesced: at most one render per MAX wait (1 s) while changes come
    // in, plus the trailing ones.
    let busy = (took + lag).as_secs();
    assert!(
        renders <= busy + 3,
        "{renders} renders for {changes} changes over {busy} s"
    );
    assert!(renders >= 1);
    // Bounded: a second round of changes leaves what is held where the
    // first left it, give or take noise, and the peak stays within a fixed
    // budget of the settled size.
    assert!(
        again <= after + after / 4,
        "memory grew: {after} kB after the changes, {again} kB after as many again"
    );
    assert!(
        peak <= settled * 3 + 64 * 1024,
        "peak {peak} kB against {settled} kB settled"
    );
}
