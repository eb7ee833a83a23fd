//! The fleet model: what 1,000 and 10,000 pods running the init-render
//! workload put on Consul, Vault and SSM, from the requests one pod was
//! measured to make. Printed as a table after the suite's figures.

use std::time::Duration;

/// What one pod does, as measured (and the settings it ran with).
pub struct PerPod {
    /// SSM calls at start (`GetParameters` + `GetParametersByPath` pages);
    /// watch mode repeats them every poll interval.
    pub ssm_calls: usize,
    /// Of those, `GetParametersByPath` pages (a quota of their own).
    pub by_path_calls: usize,
    /// Blocking queries `watch` holds open (from `envrender check`).
    pub consul_long_polls: usize,
    /// Vault reads at start, repeated every `kv_refresh`.
    pub vault_reads: usize,
    /// The Vault token's TTL; renewed at 60–70% of it.
    pub vault_token_ttl: Duration,
    /// Measured: requests per minute one idle long poll makes (it returns
    /// after Consul's `wait` with nothing new, and is asked again).
    pub idle_consul_requests_per_min: f64,
}

/// SSM's default throughput: 40 transactions per second for GetParameter,
/// GetParameters and GetParametersByPath together, per account and region.
const SSM_TPS: f64 = 40.0;
/// With higher throughput enabled: GetParameters rises (3,000 TPS in the
/// documented figure), GetParametersByPath stays at 100.
const SSM_HIGH_TPS: f64 = 3000.0;
const SSM_BY_PATH_HIGH_TPS: f64 = 100.0;
/// envrender's defaults.
const SSM_POLL: Duration = Duration::from_secs(60);
const KV_REFRESH: Duration = Duration::from_secs(300);

pub fn model(pod: &PerPod) {
    println!(
        "fleet model, per pod as measured: {} SSM calls at start ({} of them GetParametersByPath pages), \
         {} Consul long polls ({:.2} requests/min each while idle), {} Vault reads per KV refresh, \
         token TTL {} s",
        pod.ssm_calls,
        pod.by_path_calls,
        pod.consul_long_polls,
        pod.idle_consul_requests_per_min,
        pod.vault_reads,
        pod.vault_token_ttl.as_secs()
    );
    println!();
    println!(
        "| pods | Consul long polls open | Consul requests/s idle | Consul requests per KV change | Vault requests/min | SSM calls at start | at 40 TPS, all at once | start-up jitter for ≤ 40 TPS | with higher throughput | SSM polling (60 s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for pods in [1_000usize, 10_000] {
        let n = pods as f64;
        let long_polls = pods * pod.consul_long_polls;
        let consul_idle = long_polls as f64 * pod.idle_consul_requests_per_min / 60.0;
        // Each KV refresh re-reads every path; the token is renewed at ~65%
        // of its TTL.
        let vault_per_min = n
            * (pod.vault_reads as f64 * 60.0 / KV_REFRESH.as_secs_f64()
                + 60.0 / (0.65 * pod.vault_token_ttl.as_secs_f64()));
        let ssm_calls = n * pod.ssm_calls as f64;
        let drain = ssm_calls / SSM_TPS;
        let jitter = drain;
        let high = (n * (pod.ssm_calls - pod.by_path_calls) as f64 / SSM_HIGH_TPS)
            .max(n * pod.by_path_calls as f64 / SSM_BY_PATH_HIGH_TPS);
        let polling = ssm_calls / SSM_POLL.as_secs_f64();
        println!(
            "| {pods} | {long_polls} | {consul_idle:.0} | {pods} (each pod watching the prefix asks again) | {vault_per_min:.0} | {ssm_calls:.0} | {} to serve; most calls throttled and retried | `startup_jitter` ≥ {} | {} to serve with no jitter | {polling:.0} TPS ({:.0} × the default quota) |",
            duration(drain),
            duration(jitter),
            duration(high),
            polling / SSM_TPS,
        );
    }
    println!();
    println!(
        "Formulas: Consul idle = pods × long polls × measured idle rate; Vault = pods × (reads / {} s KV refresh + 1 / (0.65 × token TTL)); \
         SSM at start = pods × calls, served at {SSM_TPS:.0} TPS; jitter spreads starts evenly, so ≤ {SSM_TPS:.0} TPS needs jitter ≥ calls / {SSM_TPS:.0}; \
         higher throughput: GetParameters {SSM_HIGH_TPS:.0} TPS, GetParametersByPath {SSM_BY_PATH_HIGH_TPS:.0} TPS; polling = pods × calls / {} s.",
        KV_REFRESH.as_secs(),
        SSM_POLL.as_secs()
    );
}

fn duration(seconds: f64) -> String {
    if seconds >= 120.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{seconds:.0} s")
    }
}
