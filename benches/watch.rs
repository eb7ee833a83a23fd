//! Watch-mode figures: change latency (Consul PUT → file rewritten → signal
//! received) over 200 changes, and the resident memory of an idle
//! `envrender watch` holding 100 watched values.
//!
//! `cargo bench --bench watch` (builds the release profile). Prints figures;
//! asserts nothing about speed.

#[path = "../tests/support/consul.rs"]
#[allow(dead_code)]
mod consul;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHANGES: usize = 200;

fn main() {
    let server = consul::ConsulServer::start();
    let mut template = String::new();
    for p in 0..5 {
        for k in 0..20 {
            server.put(&format!("cfg/p{p}/k{k}"), &format!("v{p}-{k}"));
            template.push_str(&format!("p{p}k{k}={{{{consul \"cfg/p{p}/k{k}\"}}}}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.hbs"), &template).unwrap();
    std::fs::write(dir.path().join("me.pid"), std::process::id().to_string()).unwrap();

    // This process is "the app": it is sent SIGUSR1 after each rewrite.
    let (signals, received) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let mut usr1 = signal(SignalKind::user_defined1()).unwrap();
                while usr1.recv().await.is_some() {
                    if signals.send(Instant::now()).is_err() {
                        return;
                    }
                }
            })
    });
    std::thread::sleep(Duration::from_millis(100));

    let out = dir.path().join("out.conf");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_envrender"))
        .current_dir(dir.path())
        .env("CONSUL_HTTP_ADDR", server.url.trim_start_matches("http://"))
        .args([
            "--log-level",
            "warn",
            "watch",
            "--template",
            "t.hbs:out.conf",
            "--signal",
            "SIGUSR1",
            "--pid-file",
            "me.pid",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The first render writes the file and signals once.
    received
        .recv_timeout(Duration::from_secs(30))
        .expect("first render");
    std::thread::sleep(Duration::from_secs(2));
    let rss_kb = std::fs::read_to_string(format!("/proc/{}/status", watch.id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .map(|v| v.parse::<u64>().unwrap())
        })
        .unwrap();

    let mut latencies = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let value = format!("changed-{i}");
        let start = Instant::now();
        server.put("cfg/p0/k0", &value);
        let at = received
            .recv_timeout(Duration::from_secs(10))
            .expect("a signal after the change");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(
            text.contains(&value),
            "the file was not rewritten before the signal"
        );
        latencies.push(at - start);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).min(latencies.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "change latency (Consul PUT -> file rewritten -> signal received), {CHANGES} changes, no --wait:"
    );
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(latencies[latencies.len() - 1])
    );
    println!(
        "idle RSS with 100 watched values (5 prefixes): {:.1} MB ({rss_kb} kB)",
        rss_kb as f64 / 1024.0
    );
}
