//! `run` figures: the start overhead of `envrender -- true` against `true`
//! alone, and a start with 20 SSM references (against the AWS emulator,
//! behind a proxy that counts the requests).
//!
//! `cargo bench --bench run` (builds the release profile). Prints figures;
//! asserts nothing about speed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 50;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(mut command: impl FnMut() -> Command) -> Duration {
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let mut c = command();
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let start = Instant::now();
        let status = c.status().unwrap();
        samples.push(start.elapsed());
        assert!(status.success());
    }
    median(samples)
}

fn main() {
    let envrender = env!("CARGO_BIN_EXE_envrender");
    let dir = tempfile::tempdir().unwrap();
    let clean = |c: &mut Command| {
        c.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
    };
    let bare = time(|| {
        let mut c = Command::new("true");
        clean(&mut c);
        c
    });
    let wrapped = time(|| {
        let mut c = Command::new(envrender);
        clean(&mut c);
        c.args(["--", "true"]);
        c
    });
    println!("start overhead, median of {RUNS} runs:");
    println!(
        "  true {:.2} ms   envrender -- true {:.2} ms   overhead {:.2} ms",
        bare.as_secs_f64() * 1000.0,
        wrapped.as_secs_f64() * 1000.0,
        (wrapped.saturating_sub(bare)).as_secs_f64() * 1000.0
    );

    let moto = support::aws::moto();
    let names: Vec<String> = (0..20).map(|i| format!("/bench/run/p{i}")).collect();
    let params: Vec<(&str, &str, bool)> = names.iter().map(|n| (n.as_str(), "v", true)).collect();
    support::aws::put_parameters(&moto.url, &params);
    let proxy = support::aws::Proxy::start(&moto.url);
    let with_refs = |c: &mut Command| {
        clean(c);
        c.env("AWS_ENDPOINT_URL", &proxy.url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", support::aws::REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for (i, n) in names.iter().enumerate() {
            c.env(format!("P{i}"), format!("ssm:{n}"));
        }
        c.args(["--", "true"]);
    };
    proxy.reset_counts();
    let mut once = Command::new(envrender);
    with_refs(&mut once);
    assert!(
        once.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let requests = proxy.counts();
    let referenced = time(|| {
        let mut c = Command::new(envrender);
        with_refs(&mut c);
        c
    });
    println!(
        "with 20 SSM references: {:.2} ms (median of {RUNS}, local emulator); requests per start: {:?}",
        referenced.as_secs_f64() * 1000.0,
        requests
    );
}
