//! envrender's benchmark suite: start-up against a floor program and the AWS
//! CLI, requests per start, footprint, change latency, scale, and a fleet
//! model computed from the measured figures. Prints a table; asserts only
//! that every run did its job (right files, right contents), never a speed.
//!
//! `cargo bench --bench suite` builds the release binary and runs the full
//! sizes (about 100 s on 2 cores, after the build). `cargo test`
//! runs the same code at small sizes against the debug binary, so the suite
//! cannot rot. `ENVRENDER_BENCH_BIN` measures another build of envrender
//! (a different release profile, say); `ENVRENDER_BENCH_SMOKE=1` gives the
//! small sizes under `cargo bench`.
//!
//! The servers: the Consul and Vault test servers in this process, and
//! moto (the AWS emulator) as a child, all on loopback.

// Harness code: a panic is a failed run with its line.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/it/support/mod.rs"]
#[allow(unsafe_code)]
mod support;

mod fleet;
mod floor;
// ptrace, wait4 and sysconf: the figures std cannot give.
#[allow(unsafe_code)]
mod measure;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::consul::ConsulServer;
use support::vault::{Role, VaultServer};

use measure::{Running, Sample, mb, median, ms, quantile, wait_for};

/// How much of everything: the figures, or a smoke run's.
struct Sizes {
    full: bool,
    ssm_named: usize,
    ssm_tree: usize,
    consul_prefixes: usize,
    consul_per_prefix: usize,
    vault: usize,
    templates: usize,
    runs: usize,
    cli_runs: usize,
    wrapper_runs: usize,
    watch_small: (usize, usize),
    watch_large: (usize, usize),
    idle: Duration,
    consul_changes: usize,
    ssm_changes: usize,
    ssm_poll: Duration,
    scale: &'static [usize],
    scale_runs: usize,
}

const FULL: Sizes = Sizes {
    full: true,
    ssm_named: 100,
    ssm_tree: 100,
    consul_prefixes: 10,
    consul_per_prefix: 20,
    vault: 20,
    templates: 10,
    runs: 9,
    cli_runs: 5,
    wrapper_runs: 50,
    watch_small: (5, 20),
    watch_large: (100, 100),
    idle: Duration::from_secs(60),
    consul_changes: 200,
    ssm_changes: 10,
    ssm_poll: Duration::from_secs(2),
    scale: &[1_000, 10_000, 100_000],
    scale_runs: 3,
};

const SMOKE: Sizes = Sizes {
    full: false,
    ssm_named: 12,
    ssm_tree: 12,
    consul_prefixes: 2,
    consul_per_prefix: 3,
    vault: 2,
    templates: 2,
    runs: 1,
    cli_runs: 1,
    wrapper_runs: 3,
    watch_small: (2, 3),
    watch_large: (4, 5),
    idle: Duration::from_secs(2),
    consul_changes: 3,
    ssm_changes: 1,
    ssm_poll: Duration::from_secs(1),
    scale: &[10, 100],
    scale_runs: 1,
};

/// The printed result: one row per figure.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, figure: &str, measured: String, target: &str, verdict: String) {
        eprintln!("  {figure}: {measured}  [{target}] {verdict}");
        self.rows
            .push([figure.to_string(), measured, target.to_string(), verdict]);
    }

    fn print(&self) {
        println!("| figure | measured | target | |");
        println!("|---|---|---|---|");
        for [a, b, c, d] in &self.rows {
            println!("| {a} | {b} | {c} | {d} |");
        }
    }
}

fn verdict(ok: bool) -> String {
    if ok { "met".into() } else { "NOT MET".into() }
}

fn main() {
    if let Ok(plan) = std::env::var("ENVRENDER_BENCH_FLOOR") {
        floor::main(&plan);
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes = if bench && std::env::var_os("ENVRENDER_BENCH_SMOKE").is_none() {
        FULL
    } else {
        SMOKE
    };
    let bin = std::env::var("ENVRENDER_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_envrender")));
    let started = Instant::now();
    eprintln!(
        "envrender benchmark suite ({} sizes), binary {}",
        if sizes.full { "full" } else { "smoke" },
        bin.display()
    );
    let mut table = Table::default();
    let workload = Workload::start(&sizes);
    let start = init_render(&bin, &sizes, &workload, &mut table);
    let polls = footprint_and_latency(&bin, &sizes, &mut table);
    ssm_change(&bin, &sizes, &workload, &mut table);
    run_overhead(&bin, &sizes, &mut table);
    scale(&bin, &sizes, &mut table);
    let long_polls = workload.long_polls(&bin);
    println!();
    println!(
        "envrender benchmark suite, {} sizes, {} ({}), finished in {:.0} s",
        if sizes.full { "full" } else { "smoke" },
        bin.display(),
        std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    println!();
    table.print();
    println!();
    fleet::model(&fleet::PerPod {
        ssm_calls: start.ssm_calls,
        by_path_calls: start.by_path_calls,
        consul_long_polls: long_polls,
        vault_reads: start.vault_reads,
        vault_token_ttl: Duration::from_secs(TOKEN_TTL),
        idle_consul_requests_per_min: polls,
    });
}

const TOKEN_TTL: u64 = 3600;

/// The init-render workload: its servers, values, templates and configs.
struct Workload {
    dir: support::Dir,
    consul: ConsulServer,
    vault: VaultServer,
    moto: &'static support::aws::Moto,
    named: Vec<String>,
    tree: Vec<String>,
    consul_keys: Vec<String>,
    vault_paths: Vec<String>,
    role_id: String,
    secret_id: String,
    templates: usize,
}

impl Workload {
    fn start(sizes: &Sizes) -> Workload {
        let dir = support::Dir::new();
        let consul = ConsulServer::start();
        let mut consul_keys = Vec::new();
        for p in 0..sizes.consul_prefixes {
            for k in 0..sizes.consul_per_prefix {
                let key = format!("bench/svc{p}/k{k}");
                consul.put(&key, &format!("c-{p}-{k}"));
                consul_keys.push(key);
            }
        }
        let vault = VaultServer::start();
        vault.policy("bench", &[("secret/data/bench/*", &["read"])]);
        let role_id = vault.approle(
            "bench",
            Role {
                policies: vec!["bench".into()],
                ttl: TOKEN_TTL,
                max_ttl: 86_400,
                ..Role::default()
            },
        );
        let secret_id = vault.secret_id("bench", 0);
        let vault_paths: Vec<String> = (0..sizes.vault).map(|i| format!("bench/s{i}")).collect();
        for (i, p) in vault_paths.iter().enumerate() {
            vault.kv2_put("secret/", p, json!({ "value": format!("v-{i}") }));
        }
        eprintln!(
            "starting moto and writing {} parameters",
            sizes.ssm_named + sizes.ssm_tree
        );
        let moto = support::aws::moto();
        let named: Vec<String> = (0..sizes.ssm_named)
            .map(|i| format!("/bench/named/p{i}"))
            .collect();
        let tree: Vec<String> = (0..sizes.ssm_tree)
            .map(|i| format!("/bench/tree/p{i}"))
            .collect();
        let values: Vec<(String, String)> = named
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), format!("n-{i}")))
            .chain(
                tree.iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), format!("t-{i}"))),
            )
            .collect();
        let params: Vec<(&str, &str, bool)> = values
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str(), true))
            .collect();
        support::aws::put_parameters(&moto.url, &params);
        let w = Workload {
            dir,
            consul,
            vault,
            moto,
            named,
            tree,
            consul_keys,
            vault_paths,
            role_id,
            secret_id,
            templates: sizes.templates,
        };
        w.write_files();
        w
    }

    /// What goes into template `j`: every `templates`-th name of each kind.
    fn share<'a>(&self, all: &'a [String], j: usize) -> impl Iterator<Item = &'a String> {
        all.iter().skip(j).step_by(self.templates)
    }

    fn write_files(&self) {
        let d = &self.dir;
        d.write("secret_id", &self.secret_id);
        let mut config = format!(
            "[consul]\naddress = \"{}\"\n\n[vault]\naddress = \"{}\"\nauth = {{ method = \"approle\", role_id = \"{}\", secret_id_file = \"secret_id\" }}\n\n[aws]\nregion = \"{}\"\n",
            self.consul.url,
            self.vault.url,
            self.role_id,
            support::aws::REGION
        );
        let mut ssm_only = format!("[aws]\nregion = \"{}\"\n", support::aws::REGION);
        let mut ssm_template = String::new();
        for j in 0..self.templates {
            let mut t = String::new();
            for n in self.share(&self.named, j) {
                t.push_str(&format!("{n}={{{{secret \"ssm:{n}\"}}}}\n"));
            }
            ssm_template.push_str(&t);
            if j == 0 {
                let each = "{{#each (secret \"ssm:/bench/tree/\")}}/bench/tree/{{@key}}={{this}}\n{{/each}}";
                t.push_str(each);
                ssm_template.push_str(each);
            }
            for k in self.share(&self.consul_keys, j) {
                t.push_str(&format!("{k}={{{{consul \"{k}\"}}}}\n"));
            }
            for p in self.share(&self.vault_paths, j) {
                t.push_str(&format!("{p}={{{{vault \"secret/{p}#value\"}}}}\n"));
            }
            d.write(&format!("t{j}.hbs"), &t);
            config.push_str(&format!(
                "\n[[template]]\nsource = \"t{j}.hbs\"\ndestination = \"out/t{j}.conf\"\n"
            ));
        }
        d.write("ssm.hbs", &ssm_template);
        let by_name: String = self
            .named
            .iter()
            .chain(&self.tree)
            .map(|n| format!("{n}={{{{secret \"ssm:{n}\"}}}}\n"))
            .collect();
        d.write("ssm-names.hbs", &by_name);
        d.write(
            "ssm-names.toml",
            &format!(
                "[aws]\nregion = \"{}\"\n\n[[template]]\nsource = \"ssm-names.hbs\"\ndestination = \"out/ssm.conf\"\n",
                support::aws::REGION
            ),
        );
        ssm_only.push_str("\n[[template]]\nsource = \"ssm.hbs\"\ndestination = \"out/ssm.conf\"\n");
        d.write("envrender.toml", &config);
        // The same, with the KV mount's version declared (no lookup).
        d.write(
            "envrender-kv.toml",
            &config.replacen("[vault]\n", "[vault]\nkv_mounts = { secret = 2 }\n", 1),
        );
        d.write("ssm.toml", &ssm_only);
        d.write(
            "floor.json",
            &serde_json::to_string(&self.plan(&self.moto.url)).unwrap(),
        );
        // The floor of the SSM part alone: the same calls, one file.
        let mut ssm_plan = self.plan(&self.moto.url);
        ssm_plan.consul_prefixes.clear();
        ssm_plan.vault_paths.clear();
        ssm_plan.files = vec![(self.dir.join("out/ssm.conf"), self.named.clone())];
        d.write("floor-ssm.json", &serde_json::to_string(&ssm_plan).unwrap());
    }

    fn plan(&self, aws_url: &str) -> floor::Plan {
        let files = (0..self.templates)
            .map(|j| {
                let names = self
                    .share(&self.named, j)
                    .chain(self.share(&self.consul_keys, j))
                    .chain(self.share(&self.vault_paths, j))
                    .cloned()
                    .collect();
                (self.dir.join(&format!("out/t{j}.conf")), names)
            })
            .collect();
        let mut prefixes: Vec<String> = self
            .consul_keys
            .iter()
            .map(|k| format!("{}/", k.rsplit_once('/').unwrap().0))
            .collect();
        prefixes.dedup();
        floor::Plan {
            aws_url: aws_url.to_string(),
            region: support::aws::REGION.to_string(),
            consul_url: self.consul.url.clone(),
            vault_url: self.vault.url.clone(),
            role_id: self.role_id.clone(),
            secret_id: self.secret_id.clone(),
            ssm_names: self.named.clone(),
            ssm_path: "/bench/tree/".to_string(),
            consul_prefixes: prefixes,
            vault_paths: self.vault_paths.clone(),
            files,
        }
    }

    /// envrender with the emulator's credentials and nothing else of ours.
    fn envrender(&self, bin: &Path, aws_url: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        aws_env(&mut c, self.dir.path(), aws_url);
        c.args(args);
        c
    }

    fn floor(&self, plan_file: &str) -> Command {
        let mut c = Command::new(std::env::current_exe().unwrap());
        clean_env(&mut c, self.dir.path());
        c.env("ENVRENDER_BENCH_FLOOR", self.dir.join(plan_file));
        c
    }

    fn fresh_out(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("out"));
        std::fs::create_dir_all(self.dir.join("out")).unwrap();
    }

    /// The lines of each output file, for comparing two runs.
    fn outputs(&self) -> Vec<BTreeSet<String>> {
        (0..self.templates)
            .map(|j| {
                self.dir
                    .read(&format!("out/t{j}.conf"))
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }

    /// How many blocking queries `watch` would hold for this workload, from
    /// `envrender check`.
    fn long_polls(&self, bin: &Path) -> usize {
        let out = self
            .envrender(
                bin,
                &self.moto.url,
                &["check", "--config", "envrender.toml"],
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("consul: blocking query:"))
            .count()
    }
}

fn clean_env(c: &mut Command, dir: &Path) {
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir);
}

fn aws_env(c: &mut Command, dir: &Path, aws_url: &str) {
    clean_env(c, dir);
    c.env("AWS_ENDPOINT_URL", aws_url)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", support::aws::REGION)
        // The AWS CLI v1 reads only this one.
        .env("AWS_DEFAULT_REGION", support::aws::REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

/// Requests one start made, per backend.
struct StartRequests {
    ssm_calls: usize,
    by_path_calls: usize,
    vault_reads: usize,
}

/// Sections 1 and 2: the init render against the floor and the AWS CLI,
/// and the requests each start makes.
fn init_render(bin: &Path, sizes: &Sizes, w: &Workload, table: &mut Table) -> StartRequests {
    let d = &w.dir;
    let log = d.join("run.log");
    let aws = &w.moto.url;
    let cli = aws_cli();
    // Correctness first: envrender and the floor write the same lines.
    w.fresh_out();
    measure::run(
        &mut w.envrender(bin, aws, &["render", "--config", "envrender.toml"]),
        &log,
    );
    let rendered = w.outputs();
    w.fresh_out();
    measure::run(&mut w.floor("floor.json"), &log);
    assert_eq!(
        rendered,
        w.outputs(),
        "envrender and the floor wrote different values"
    );
    let values: usize = rendered.iter().map(BTreeSet::len).sum();
    let expected = sizes.ssm_named + sizes.ssm_tree + w.consul_keys.len() + w.vault_paths.len();
    assert_eq!(values, expected, "not every value was rendered");

    let mut envrender = Vec::new();
    let mut floor = Vec::new();
    let mut ssm = Vec::new();
    let mut ssm_names = Vec::new();
    let mut ssm_floor = Vec::new();
    let mut script = Vec::new();
    // One timed run into an empty output folder.
    let timed = |samples: &mut Vec<Sample>, mut cmd: Command| {
        w.fresh_out();
        samples.push(measure::run(&mut cmd, &log));
    };
    let render = |config: &str| w.envrender(bin, aws, &["render", "--config", config]);
    for r in 0..sizes.runs {
        timed(&mut envrender, render("envrender.toml"));
        timed(&mut floor, w.floor("floor.json"));
        timed(&mut ssm, render("ssm.toml"));
        timed(&mut ssm_floor, w.floor("floor-ssm.json"));
        timed(&mut ssm_names, render("ssm-names.toml"));
        if r < sizes.cli_runs {
            timed(&mut script, cli.command(d.path(), aws));
            let lines = d.read("out/ssm.env").lines().count();
            assert_eq!(
                lines,
                sizes.ssm_named + sizes.ssm_tree,
                "the CLI script missed parameters"
            );
        }
    }
    let wall = |v: &[Sample]| median(v.iter().map(|s| s.wall).collect());
    let (e, f, s, c) = (wall(&envrender), wall(&floor), wall(&ssm), wall(&script));
    let by_name = wall(&ssm_names);
    let ssm_floor = wall(&ssm_floor);
    let ratio = e.as_secs_f64() / f.as_secs_f64();
    let what = format!(
        "{} SSM + {} Consul + {} Vault values into {} templates",
        sizes.ssm_named + sizes.ssm_tree,
        w.consul_keys.len(),
        w.vault_paths.len(),
        sizes.templates
    );
    eprintln!("1. init render: {what}, median of {} runs", sizes.runs);
    table.row(
        &format!("init render ({what}), median of {}", sizes.runs),
        format!("envrender {}, floor {}: {ratio:.2} × floor", ms(e), ms(f)),
        "≤ 1.3 × floor",
        verdict(ratio <= 1.3),
    );
    let ssm_count = sizes.ssm_named + sizes.ssm_tree;
    let script = format!(
        "`aws ssm get-parameters-by-path` script {} (median of {})",
        ms(c),
        sizes.cli_runs
    );
    for (how, time, floor) in [
        (
            format!("{} by name + {} by path", sizes.ssm_named, sizes.ssm_tree),
            s,
            format!(" (the floor, same calls: {})", ms(ssm_floor)),
        ),
        (format!("all {ssm_count} by name"), by_name, String::new()),
    ] {
        let speedup = c.as_secs_f64() / time.as_secs_f64();
        table.row(
            &format!("SSM part ({how}) vs an AWS CLI script"),
            format!(
                "envrender {}{floor}, {script}: {speedup:.1} × faster",
                ms(time)
            ),
            "≥ 10 × faster",
            verdict(speedup >= 10.0),
        );
    }
    let cpu = |v: &[Sample]| median(v.iter().map(|s| s.cpu).collect());
    let rss = |v: &[Sample]| v.iter().map(|s| s.max_rss_kb).max().unwrap_or(0);
    table.row(
        "init render CPU time and peak RSS",
        format!(
            "envrender {} CPU, {}; floor {} CPU, {}",
            ms(cpu(&envrender)),
            mb(rss(&envrender)),
            ms(cpu(&floor)),
            mb(rss(&floor))
        ),
        "",
        String::new(),
    );

    // 2. Requests per start, through counting proxies.
    let proxy = support::aws::Proxy::start(aws);
    let counted = |cmd: &mut Command| {
        proxy.reset_counts();
        let (consul, vault, logins) = (
            w.consul.requests(),
            w.vault.count("requests"),
            w.vault.count("logins"),
        );
        w.fresh_out();
        measure::run(cmd, &log);
        (
            proxy.counts(),
            w.consul.requests() - consul,
            w.vault.count("requests") - vault,
            w.vault.count("logins") - logins,
        )
    };
    let (aws_counts, consul, vault, logins) =
        counted(&mut w.envrender(bin, &proxy.url, &["render", "--config", "envrender.toml"]));
    d.write(
        "floor-proxied.json",
        &serde_json::to_string(&w.plan(&proxy.url)).unwrap(),
    );
    let (floor_aws, floor_consul, floor_vault, _) = counted(&mut w.floor("floor-proxied.json"));
    let get =
        |m: &std::collections::BTreeMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
    let names_target = sizes.ssm_named.div_ceil(10);
    // The pages are whatever the service hands out (the emulator, like SSM,
    // may end with an empty page): the floor's count.
    let pages_target = get(&floor_aws, "GetParametersByPath");
    let (gp, bp) = (
        get(&aws_counts, "GetParameters"),
        get(&aws_counts, "GetParametersByPath"),
    );
    let other_aws: usize = aws_counts.values().sum::<usize>() - gp - bp;
    eprintln!("2. requests per start");
    table.row(
        "SSM requests per start",
        format!(
            "{gp} GetParameters + {bp} GetParametersByPath pages{} (floor {})",
            if other_aws > 0 {
                format!(" + {other_aws} other: {aws_counts:?}")
            } else {
                String::new()
            },
            floor_aws.values().sum::<usize>()
        ),
        &format!(
            "ceil({}/10) + {pages_target} pages (the floor's) = {}",
            sizes.ssm_named,
            names_target + pages_target
        ),
        verdict(gp == names_target && bp == pages_target && other_aws == 0),
    );
    table.row(
        "Consul requests per start",
        format!("{consul} (floor {floor_consul})"),
        &format!("{} (one per distinct prefix)", sizes.consul_prefixes),
        verdict(consul == sizes.consul_prefixes),
    );
    let (_, _, declared, declared_logins) = counted(&mut w.envrender(
        bin,
        &proxy.url,
        &["render", "--config", "envrender-kv.toml"],
    ));
    let paths = w.vault_paths.len();
    let target = format!("{} (one per path + one login)", paths + 1);
    table.row(
        "Vault requests per start, the KV mount's version declared (`kv_mounts`)",
        format!(
            "{declared}: {declared_logins} login + {} reads (floor {floor_vault})",
            declared - declared_logins
        ),
        &target,
        verdict(declared == paths + 1 && declared_logins == 1),
    );
    let mount_lookups = vault - logins - paths;
    table.row(
        "Vault requests per start, the KV version detected (no `kv_mounts`)",
        format!(
            "{vault}: {logins} login + {paths} reads + {mount_lookups} mount lookup (one per mount)"
        ),
        &target,
        if vault == paths + 1 {
            verdict(true)
        } else {
            format!("{} over: the mount's KV v1/v2 lookup", vault - paths - 1)
        },
    );
    StartRequests {
        ssm_calls: gp + bp,
        by_path_calls: bp,
        vault_reads: w.vault_paths.len(),
    }
}

/// The AWS CLI (v1, from PyPI) and the entrypoint script users write with it.
struct AwsCli {
    python_path: PathBuf,
}

const AWSCLI: &str = "awscli==1.45.11";

fn aws_cli() -> AwsCli {
    AwsCli {
        python_path: support::pip_install(AWSCLI, "awscli-1.45.11", "ENVRENDER_AWSCLI_DIR"),
    }
}

impl AwsCli {
    fn command(&self, dir: &Path, aws_url: &str) -> Command {
        let mut c = Command::new("sh");
        aws_env(&mut c, dir, aws_url);
        c.env("PYTHONPATH", &self.python_path)
            .env("AWS", self.python_path.join("bin/aws"))
            .args([
                "-ec",
                "python3 \"$AWS\" ssm get-parameters-by-path --path /bench/ --recursive --with-decryption \
                 --query 'Parameters[].[Name,Value]' --output text > out/ssm.env.tmp\n\
                 chmod 600 out/ssm.env.tmp\nmv out/ssm.env.tmp out/ssm.env",
            ]);
        c
    }
}

/// A `watch` over Consul keys: `prefixes` × `per` keys, one reference each,
/// spread over up to ten templates; this process is the app it signals.
fn consul_watch(
    bin: &Path,
    server: &ConsulServer,
    dir: &support::Dir,
    name: &str,
    (prefixes, per): (usize, usize),
) -> Running {
    let files = prefixes.min(10);
    let mut templates = vec![String::new(); files];
    for p in 0..prefixes {
        for k in 0..per {
            let key = format!("{name}/p{p}/k{k}");
            server.put(&key, &format!("v{p}-{k}"));
            templates[(p * per + k) % files].push_str(&format!("{key}={{{{consul \"{key}\"}}}}\n"));
        }
    }
    let mut args = vec![
        "--log-level".to_string(),
        "warn".to_string(),
        "watch".to_string(),
        "--signal".to_string(),
        "SIGUSR1".to_string(),
        "--pid-file".to_string(),
        "app.pid".to_string(),
    ];
    for (i, t) in templates.iter().enumerate() {
        dir.write(&format!("{name}{i}.hbs"), t);
        args.push("--template".into());
        args.push(format!("{name}{i}.hbs:{name}/{i}.conf"));
    }
    dir.write("app.pid", &std::process::id().to_string());
    let mut c = Command::new(bin);
    clean_env(&mut c, dir.path());
    c.env("CONSUL_HTTP_ADDR", server.url.trim_start_matches("http://"))
        .args(&args);
    let mut watch = Running::start(&mut c, dir.join(&format!("{name}.log")));
    wait_for("the first render", Duration::from_secs(120), || {
        dir.join(&format!("{name}/{}.conf", files - 1)).exists()
            && (0..files).all(|i| dir.join(&format!("{name}/{i}.conf")).exists())
    });
    watch.assert_alive();
    watch
}

/// Sections 3 and 4 (Consul): footprint of an idle `watch` at two sizes, then
/// change latency on the small one. Returns the requests per minute one idle
/// blocking query makes (from the large watcher), for the fleet model.
fn footprint_and_latency(bin: &Path, sizes: &Sizes, table: &mut Table) -> f64 {
    eprintln!("3. footprint");
    let size = std::fs::metadata(bin).unwrap().len();
    table.row(
        "binary size (the binary measured: stripped release)",
        format!("{:.1} MB", size as f64 / 1e6),
        "≤ 12 MB",
        verdict(size <= 12_000_000),
    );
    let dir = support::Dir::new();
    // This process is the app: SIGUSR1 after each rewrite.
    let (signals, received) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        support::aws::block_on(async move {
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
    let small_server = ConsulServer::start();
    let large_server = ConsulServer::start();
    let small = consul_watch(bin, &small_server, &dir, "small", sizes.watch_small);
    let large = consul_watch(bin, &large_server, &dir, "large", sizes.watch_large);
    std::thread::sleep(Duration::from_secs(2));
    let mut idle = Vec::new();
    for (watch, (p, k)) in [(&small, sizes.watch_small), (&large, sizes.watch_large)] {
        idle.push((watch, p * k, watch.memory(), watch.cpu()));
    }
    let (small_requests, large_requests) = (small_server.requests(), large_server.requests());
    std::thread::sleep(sizes.idle);
    let idle_s = sizes.idle.as_secs_f64();
    for (watch, values, memory, cpu0) in idle {
        let cpu = watch.cpu() - cpu0;
        let target = if values == sizes.watch_small.0 * sizes.watch_small.1 {
            "≤ 8 MB"
        } else {
            ""
        };
        table.row(
            &format!("idle RSS of watch, {values} watched values"),
            format!(
                "{} ({} anonymous, the rest pages of the binary and libc; its own pages with the other watcher of the same binary running: {})",
                mb(memory.rss_kb),
                mb(memory.anon_kb),
                mb(memory.uss_kb)
            ),
            target,
            if target.is_empty() {
                String::new()
            } else {
                verdict(memory.rss_kb <= 8 * 1024)
            },
        );
        table.row(
            &format!("CPU over {idle_s:.0} idle s, {values} watched values"),
            format!("{:.3} s", cpu.as_secs_f64()),
            "≈ 0",
            verdict(cpu.as_secs_f64() <= 0.01 * idle_s),
        );
    }
    let per_min = |n: usize| n as f64 * 60.0 / idle_s;
    let large_polls = large_server.blocking_now();
    let idle_rate = per_min(large_server.requests() - large_requests);
    eprintln!(
        "  idle Consul requests: small {:.1}/min, large {idle_rate:.1}/min ({large_polls} blocking queries open)",
        per_min(small_server.requests() - small_requests)
    );
    drop(large);

    eprintln!("4. change latency");
    let mut latencies = Vec::with_capacity(sizes.consul_changes);
    for i in 0..sizes.consul_changes {
        let value = format!("changed-{i}");
        let start = Instant::now();
        small_server.put("small/p0/k0", &value);
        let at = received
            .recv_timeout(Duration::from_secs(10))
            .expect("a signal after the change");
        let text = std::fs::read_to_string(dir.join("small/0.conf")).unwrap();
        assert!(
            text.contains(&value),
            "the file was not rewritten before the signal"
        );
        latencies.push(at - start);
        // Changes a quiet spell apart: a watch reads at most 10 changes a
        // second after a burst of 2 (the blocking queries' rate limit), so
        // changes 20 ms apart would measure the limit, not the path.
        std::thread::sleep(Duration::from_millis(120));
    }
    latencies.sort();
    let p99 = quantile(&latencies, 0.99);
    table.row(
        &format!(
            "Consul change → file rewritten → app signalled, {} changes 120 ms apart",
            sizes.consul_changes
        ),
        format!(
            "p50 {}, p99 {}, max {}",
            ms(quantile(&latencies, 0.5)),
            ms(p99),
            ms(latencies[latencies.len() - 1])
        ),
        "p99 ≤ 50 ms",
        verdict(p99 <= Duration::from_millis(50)),
    );
    drop(small);
    idle_rate / large_polls.max(1) as f64
}

/// Section 4 (SSM): a new version is on disk within one poll interval.
fn ssm_change(bin: &Path, sizes: &Sizes, w: &Workload, table: &mut Table) {
    let d = support::Dir::new();
    let name = &w.named[0];
    d.write("t.hbs", &format!("{{{{secret \"ssm:{name}\"}}}}"));
    d.write(
        "envrender.toml",
        &format!(
            "[aws]\nregion = \"{}\"\npoll_interval = \"{}ms\"\n\n[[template]]\nsource = \"t.hbs\"\ndestination = \"out.conf\"\n",
            support::aws::REGION,
            sizes.ssm_poll.as_millis()
        ),
    );
    let mut c = Command::new(bin);
    aws_env(&mut c, d.path(), &w.moto.url);
    c.args(["--log-level", "warn", "watch", "--config", "envrender.toml"]);
    let mut watch = Running::start(&mut c, d.join("watch.log"));
    wait_for("the first render", Duration::from_secs(60), || {
        d.join("out.conf").exists()
    });
    let mut latencies = Vec::new();
    for i in 0..sizes.ssm_changes {
        let value = format!("n-changed-{i}");
        let start = Instant::now();
        support::aws::put_parameters(&w.moto.url, &[(name, &value, true)]);
        wait_for("the new version on disk", sizes.ssm_poll * 5, || {
            std::fs::read_to_string(d.join("out.conf")).is_ok_and(|t| t == value)
        });
        latencies.push(start.elapsed());
    }
    watch.assert_alive();
    support::aws::put_parameters(&w.moto.url, &[(name, "n-0", true)]);
    latencies.sort();
    let max = latencies[latencies.len() - 1];
    // Polls are spread by ±10%, and the request takes its time.
    let bound = sizes.ssm_poll.mul_f64(1.1) + Duration::from_millis(200);
    table.row(
        &format!(
            "SSM new version → file rewritten, poll interval {:.0} s, {} changes",
            sizes.ssm_poll.as_secs_f64(),
            sizes.ssm_changes
        ),
        format!("p50 {}, max {}", ms(quantile(&latencies, 0.5)), ms(max)),
        "within one poll interval (+10% jitter, +0.2 s)",
        verdict(max <= bound),
    );
}

/// What `envrender -- CMD` adds to a start with nothing to resolve.
fn run_overhead(bin: &Path, sizes: &Sizes, table: &mut Table) {
    let d = support::Dir::new();
    let log = d.join("run.log");
    let mut bare = Vec::new();
    let mut wrapped = Vec::new();
    for _ in 0..sizes.wrapper_runs {
        let mut c = Command::new("true");
        clean_env(&mut c, d.path());
        bare.push(measure::run(&mut c, &log).wall);
        let mut c = Command::new(bin);
        clean_env(&mut c, d.path());
        c.args(["--", "true"]);
        wrapped.push(measure::run(&mut c, &log).wall);
    }
    let (bare, wrapped) = (median(bare), median(wrapped));
    let overhead = wrapped.saturating_sub(bare);
    table.row(
        &format!(
            "`envrender -- true` vs `true`, median of {}",
            sizes.wrapper_runs
        ),
        format!("{} vs {}: {} overhead", ms(wrapped), ms(bare), ms(overhead)),
        "≤ 5 ms",
        verdict(overhead <= Duration::from_millis(5)),
    );
}

/// Section 5: render time and peak RSS at growing sizes, from Consul and from
/// a local values file.
fn scale(bin: &Path, sizes: &Sizes, table: &mut Table) {
    eprintln!("5. scale");
    let server = ConsulServer::start();
    let d = support::Dir::new();
    let log = d.join("run.log");
    let mut curves: Vec<(&str, Vec<(usize, Duration)>)> =
        vec![("Consul", Vec::new()), ("local file", Vec::new())];
    for &n in sizes.scale {
        let prefix = format!("scale{n}/");
        let mut values = String::new();
        for i in 0..n {
            let key = format!("{prefix}k{i:06}");
            server.put(&key, &format!("value-{i}"));
            values.push_str(&format!("\"consul:{key}\": value-{i}\n"));
        }
        d.write(&format!("values{n}.yaml"), &values);
        d.write(
            &format!("t{n}.hbs"),
            &format!("{{{{#each (consul \"{prefix}\")}}}}{{{{@key}}}}={{{{this}}}}\n{{{{/each}}}}"),
        );
        d.write(
            &format!("consul{n}.toml"),
            &format!("[consul]\naddress = \"{}\"\n", server.url),
        );
        d.write(
            &format!("local{n}.toml"),
            &format!("[local]\nvalues = \"values{n}.yaml\"\n"),
        );
        for (source, curve) in curves.iter_mut() {
            let config = if *source == "Consul" {
                format!("consul{n}.toml")
            } else {
                format!("local{n}.toml")
            };
            let out = format!("out{n}.conf");
            let mut samples = Vec::new();
            for _ in 0..sizes.scale_runs {
                let _ = std::fs::remove_file(d.join(&out));
                let mut c = Command::new(bin);
                clean_env(&mut c, d.path());
                c.args([
                    "render",
                    "--config",
                    &config,
                    "--template",
                    &format!("t{n}.hbs:{out}"),
                ]);
                samples.push(measure::run(&mut c, &log));
                assert_eq!(
                    d.read(&out).lines().count(),
                    n,
                    "{source}: not every key rendered"
                );
            }
            let wall = median(samples.iter().map(|s| s.wall).collect());
            let rss = samples.iter().map(|s| s.max_rss_kb).max().unwrap();
            curve.push((n, wall));
            table.row(
                &format!("render {n} keys from {source}"),
                format!("{}, peak RSS {}", ms(wall), mb(rss)),
                "",
                String::new(),
            );
        }
    }
    for (source, curve) in curves {
        let [.., (n1, t1), (n2, t2)] = curve[..] else {
            continue;
        };
        let exponent = (t2.as_secs_f64() / t1.as_secs_f64()).ln() / (n2 as f64 / n1 as f64).ln();
        table.row(
            &format!("growth from {n1} to {n2} keys, {source}"),
            format!("time ∝ n^{exponent:.2}"),
            "linear or better (exponent ≤ 1, +0.1 for noise)",
            verdict(exponent <= 1.1),
        );
    }
    // One large template: compile time once grew with the square of the
    // number of expressions (20,000: 18 s).
    let mut curve = Vec::new();
    for n in if sizes.full {
        [5_000, 20_000]
    } else {
        [500, 2_000]
    } {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!("k{i}={{{{env \"ENVRENDER_BENCH_V\"}}}}\n"));
        }
        d.write(&format!("expressions{n}.hbs"), &text);
        let out = format!("expressions{n}.out");
        let mut samples = Vec::new();
        for _ in 0..sizes.scale_runs {
            let _ = std::fs::remove_file(d.join(&out));
            let mut c = Command::new(bin);
            clean_env(&mut c, d.path());
            c.env("ENVRENDER_BENCH_V", "v").args([
                "render",
                "--template",
                &format!("expressions{n}.hbs:{out}"),
            ]);
            samples.push(measure::run(&mut c, &log));
            assert_eq!(
                d.read(&out).lines().count(),
                n,
                "not every expression rendered"
            );
        }
        let wall = median(samples.iter().map(|s| s.wall).collect());
        curve.push((n, wall));
        table.row(
            &format!("compile and render a template of {n} expressions"),
            ms(wall),
            if n >= 20_000 { "well under 1 s" } else { "" },
            if n >= 20_000 {
                verdict(wall < Duration::from_secs(1))
            } else {
                String::new()
            },
        );
    }
    let [(n1, t1), (n2, t2)] = curve[..] else {
        return;
    };
    let exponent = (t2.as_secs_f64() / t1.as_secs_f64()).ln() / (n2 as f64 / n1 as f64).ln();
    table.row(
        &format!("growth from {n1} to {n2} expressions"),
        format!("time ∝ n^{exponent:.2}"),
        "",
        String::new(),
    );
}
