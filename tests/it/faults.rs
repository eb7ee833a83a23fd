//! Faults between envrender and its backends: a fault-injecting proxy
//! (`support::fault`) in front of the Consul and Vault test servers and the
//! AWS emulator adds latency, cuts answers off, answers 429/500/503 or an
//! empty 200, or never answers. `render` rides out transient faults within
//! its deadline and names every reference when they persist; `watch` and
//! `run` keep the last good outputs through an outage of each backend,
//! report it in readiness, and recover by themselves.

use crate::support;

use std::os::unix::fs::MetadataExt as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::aws::block_on;
use support::consul::ConsulServer;
use support::fault::{Fault, FaultProxy};
use support::vault::{APPROLE_AUTH, VaultServer};
use support::{Dir, eventually};

/// The three backends, each behind its own fault proxy, with one value in
/// each: `app/<name>/host` in Consul, `secret/<name>#password` in Vault,
/// `/t/faults/<name>/level` in SSM.
struct Backends {
    name: String,
    consul: ConsulServer,
    vault: VaultServer,
    moto: &'static str,
    consul_proxy: FaultProxy,
    vault_proxy: FaultProxy,
    aws_proxy: FaultProxy,
}

impl Backends {
    fn start(name: &str) -> Backends {
        let consul = ConsulServer::start();
        let vault = VaultServer::start();
        let moto = &support::aws::moto().url;
        let b = Backends {
            name: name.to_string(),
            consul_proxy: FaultProxy::start(&consul.url),
            vault_proxy: FaultProxy::start(&vault.url),
            aws_proxy: FaultProxy::start(moto),
            consul,
            vault,
            moto,
        };
        b.set("one");
        b
    }

    /// Sets all three values to `<backend>-<v>`.
    fn set(&self, v: &str) {
        for backend in ["consul", "vault", "ssm"] {
            self.set_one(backend, v);
        }
    }

    /// Sets one backend's value to `<backend>-<v>`.
    fn set_one(&self, backend: &str, v: &str) {
        let value = format!("{backend}-{v}");
        match backend {
            "consul" => {
                self.consul.put(&format!("app/{}/host", self.name), &value);
            }
            "vault" => {
                self.vault
                    .kv2_put("secret/", &self.name, json!({ "password": value }));
            }
            _ => {
                let client = aws_sdk_ssm::Client::new(&support::aws::sdk(self.moto));
                let name = format!("/t/faults/{}/level", self.name);
                block_on(async {
                    client
                        .put_parameter()
                        .name(name)
                        .value(value)
                        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
                        .overwrite(true)
                        .send()
                        .await
                        .unwrap();
                });
            }
        }
    }

    fn references(&self) -> [String; 3] {
        [
            format!("consul:app/{}/host", self.name),
            format!("vault:secret/{}#password", self.name),
            format!("ssm:/t/faults/{}/level", self.name),
        ]
    }

    /// A template using all three values.
    fn template(&self, d: &Dir) {
        d.write(
            "t.hbs",
            &format!(
                "host={{{{consul \"app/{n}/host\"}}}}\npassword={{{{vault \"secret/{n}#password\"}}}}\nlevel={{{{ssm \"/t/faults/{n}/level\"}}}}\n",
                n = self.name
            ),
        );
    }

    fn expected(v: &str) -> String {
        Backends::expected_each([v, v, v])
    }

    /// The output for the Consul, Vault and SSM values' versions.
    fn expected_each([c, v, s]: [&str; 3]) -> String {
        format!("host=consul-{c}\npassword=vault-{v}\nlevel=ssm-{s}\n")
    }

    /// envrender with the three backends behind their proxies.
    fn cmd(&self, d: &Dir, args: &[&str]) -> support::Cmd {
        d.cmd(args)
            .env("CONSUL_HTTP_ADDR", self.consul_proxy.addr())
            .env("VAULT_ADDR", &self.vault_proxy.url)
            .env("VAULT_TOKEN", &self.vault.root_token)
            .aws(&self.aws_proxy.url)
    }

    fn proxies(&self) -> [(&'static str, &FaultProxy); 3] {
        [
            ("consul", &self.consul_proxy),
            ("vault", &self.vault_proxy),
            ("ssm", &self.aws_proxy),
        ]
    }

    fn clear(&self) {
        for (_, p) in self.proxies() {
            p.clear();
        }
    }
}

/// The file's identity and modification time: unchanged when not rewritten.
fn stamp(d: &Dir, rel: &str) -> (u64, i64, i64) {
    let m = std::fs::metadata(d.join(rel)).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn transient_faults() -> Vec<(Fault, usize)> {
    vec![
        (Fault::Latency(Duration::from_millis(300)), 2),
        (Fault::Reset, 2),
        (Fault::Truncate, 2),
        (Fault::Status(429), 2),
        (Fault::Status(500), 2),
        (Fault::Status(503), 2),
        (Fault::Empty, 1),
        (Fault::Hang, 1),
    ]
}

#[test]
fn render_rides_out_transient_faults_of_every_backend() {
    let b = Backends::start("transient");
    let d = Dir::new();
    b.template(&d);
    for (fault, times) in transient_faults() {
        for (backend, proxy) in b.proxies() {
            let _ = std::fs::remove_file(d.join("out.conf"));
            let faulted = proxy.faulted();
            proxy.inject(fault.clone(), Some(times));
            let start = Instant::now();
            let run = b
                .cmd(
                    &d,
                    &["render", "--timeout", "20s", "--template", "t.hbs:out.conf"],
                )
                .run();
            let took = start.elapsed();
            assert_eq!(
                run.code, 0,
                "{fault:?} on {backend}: exit {}\n{}",
                run.code, run.stderr
            );
            assert_eq!(d.read("out.conf"), Backends::expected("one"));
            assert!(
                proxy.faulted() > faulted,
                "{fault:?} on {backend} was never hit"
            );
            assert!(
                took < Duration::from_secs(20),
                "{fault:?} on {backend}: {took:?}"
            );
            eprintln!("{fault:?} x{times} on {backend}: rendered in {took:.1?}");
            b.clear();
        }
    }
}

#[test]
fn render_names_every_reference_when_faults_persist() {
    let b = Backends::start("persistent");
    let d = Dir::new();
    b.template(&d);
    for fault in [Fault::Status(503), Fault::Reset, Fault::Hang] {
        for (_, proxy) in b.proxies() {
            proxy.inject(fault.clone(), None);
        }
        let start = Instant::now();
        let run = b
            .cmd(
                &d,
                &["render", "--timeout", "4s", "--template", "t.hbs:out.conf"],
            )
            .run();
        let took = start.elapsed();
        assert_eq!(run.code, 1, "{fault:?}: {}", run.stderr);
        for reference in b.references() {
            assert!(
                run.stderr.contains(&reference),
                "{fault:?}: {reference} not named:\n{}",
                run.stderr
            );
        }
        for backend in ["consul", "vault", "ssm"] {
            assert!(
                run.stderr.contains(&format!("{backend}: ")),
                "{fault:?}: {backend} not named:\n{}",
                run.stderr
            );
        }
        assert!(
            !d.join("out.conf").exists(),
            "{fault:?}: an output was written"
        );
        assert!(took < Duration::from_secs(8), "{fault:?}: {took:?}");
        eprintln!("{fault:?} everywhere: failed in {took:.1?}\n{}", run.stderr);
        b.clear();
    }
}

/// A loopback address for the health listener.
fn listen() -> String {
    format!("127.0.0.1:{}", support::aws::free_port())
}

/// A running `watch` or `run` with a health listener; killed when dropped.
struct Running {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Running {
    /// Starts `cmd`, which listens on `listen` (from [`listen`]).
    fn start(cmd: support::Cmd, d: &Dir, listen: &str) -> Running {
        let port = listen.rsplit(':').next().unwrap().parse().unwrap();
        let log = d.join("envrender.log");
        let mut command = cmd.command;
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().unwrap();
        let r = Running { child, port, log };
        eventually(Duration::from_secs(20), "readiness", || r.ready().0 == 200);
        r
    }

    fn ready(&self) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        block_on(async {
            match reqwest::get(&url).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Takes each backend away in turn (a persistent `fault`), changes its
/// value meanwhile, and checks the output stays as it was, readiness names
/// the backend, and the output catches up once it is back.
fn outages(b: &Backends, d: &Dir, r: &Running, fault: Fault, out: &str) {
    let mut versions = ["one", "one", "one"];
    for (i, (backend, proxy)) in b.proxies().into_iter().enumerate() {
        let before = stamp(d, out);
        let was = std::fs::read_to_string(d.join(out)).unwrap();
        proxy.inject(fault.clone(), None);
        eventually(
            Duration::from_secs(20),
            &format!("degraded readiness naming {backend}"),
            || {
                let (status, text) = r.ready();
                status == 503 && text.contains(backend)
            },
        );
        b.set_one(backend, "two");
        versions[i] = "two";
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            stamp(d, out),
            before,
            "{out} rewritten during the {backend} outage\n{}",
            r.log()
        );
        assert_eq!(std::fs::read_to_string(d.join(out)).unwrap(), was);
        proxy.clear();
        eventually(
            Duration::from_secs(30),
            &format!("the catch-up after the {backend} outage"),
            || std::fs::read_to_string(d.join(out)).unwrap() == Backends::expected_each(versions),
        );
        eventually(Duration::from_secs(20), "readiness", || r.ready().0 == 200);
    }
}

const QUICK_POLLS: &str =
    "[consul]\nwait = \"2s\"\n\n[vault]\nkv_refresh = \"1s\"\n\n[aws]\npoll_interval = \"1s\"\n";

#[test]
fn watch_keeps_the_last_good_outputs_through_each_backend_outage() {
    let b = Backends::start("watch");
    let d = Dir::new();
    b.template(&d);
    d.write("envrender.toml", QUICK_POLLS);
    let listen = listen();
    let r = Running::start(
        b.cmd(
            &d,
            &["watch", "--listen", &listen, "--template", "t.hbs:out.conf"],
        ),
        &d,
        &listen,
    );
    assert_eq!(d.read("out.conf"), Backends::expected("one"));
    outages(&b, &d, &r, Fault::Status(503), "out.conf");
    let log = r.log();
    assert!(log.contains("keeping the last good outputs"), "{log}");
}

#[test]
fn run_keeps_the_command_and_its_files_through_each_backend_outage() {
    let b = Backends::start("run");
    let d = Dir::new();
    b.template(&d);
    d.write("envrender.toml", QUICK_POLLS);
    let script = "echo start >> log; trap 'echo HUP >> log' HUP; \
                  trap 'exit 0' TERM; while :; do sleep 0.05; done";
    let listen = listen();
    let r = Running::start(
        b.cmd(
            &d,
            &[
                "run",
                "--listen",
                &listen,
                "--reload-signal",
                "SIGHUP",
                "--template",
                "t.hbs:out.conf",
                "--",
                "sh",
                "-c",
                script,
            ],
        ),
        &d,
        &listen,
    );
    assert_eq!(d.read("out.conf"), Backends::expected("one"));
    outages(&b, &d, &r, Fault::Reset, "out.conf");
    // Never restarted; told once per catch-up.
    let log = std::fs::read_to_string(d.join("log")).unwrap();
    assert_eq!(log.lines().filter(|l| *l == "start").count(), 1, "{log}");
    assert_eq!(log.lines().filter(|l| *l == "HUP").count(), 3, "{log}");
}

#[test]
fn a_vault_outage_longer_than_a_lease_reissues_once_on_recovery() {
    let server = VaultServer::start();
    server.policy("app", &[("database/creds/app", &["read"])]);
    // Leases of 2 s, renewable for up to a minute.
    server.database_role("app", 2, 60);
    let proxy = FaultProxy::start(&server.url);
    let d = Dir::new();
    server.approle_files(d.path(), &["app"], 600);
    d.write("envrender.toml", &format!("[vault]\n{APPROLE_AUTH}\n"));
    d.write("db.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    let listen = listen();
    let r = Running::start(
        d.cmd(&["watch", "--listen", &listen, "--template", "db.hbs:db.conf"])
            .env("VAULT_ADDR", &proxy.url),
        &d,
        &listen,
    );
    let first = d.read("db.conf");
    assert_eq!(server.count("leases_issued"), 1);
    // Vault is away for twice the lease's TTL: the lease runs out.
    proxy.inject(Fault::Status(503), None);
    eventually(Duration::from_secs(10), "degraded readiness", || {
        let (status, text) = r.ready();
        status == 503 && text.contains("database/creds/app")
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(d.read("db.conf"), first, "rewritten during the outage");
    let user = first.trim().trim_start_matches("user=").to_string();
    assert!(!server.valid_credentials().contains(&user));
    proxy.clear();
    eventually(Duration::from_secs(20), "a new credential", || {
        d.read("db.conf") != first
    });
    eventually(Duration::from_secs(10), "readiness", || r.ready().0 == 200);
    // Renewals carry the new lease on; exactly one re-issue.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(server.count("leases_issued"), 2);
    let now = d.read("db.conf");
    let user = now.trim().trim_start_matches("user=").to_string();
    assert!(server.valid_credentials().contains(&user));
    assert_eq!(server.count("logins"), 1);
}

/// A pod's Vault: a KV secret and database credentials that live 6 s,
/// renewable up to 30 s, behind a fault proxy; `watch` renders both into one
/// file, logged in with AppRole.
struct DynamicPod {
    server: VaultServer,
    proxy: FaultProxy,
    d: Dir,
    r: Running,
}

impl DynamicPod {
    fn start(vault_config: &str) -> DynamicPod {
        let server = VaultServer::start();
        server.policy(
            "app",
            &[
                ("database/creds/app", &["read"]),
                ("secret/data/app", &["read"]),
            ],
        );
        server.database_role("app", 6, 30);
        server.kv2_put("secret/", "app", json!({ "password": "kv-one" }));
        let proxy = FaultProxy::start(&server.url);
        let d = Dir::new();
        server.approle_files(d.path(), &["app"], 600);
        d.write(
            "envrender.toml",
            &format!("[vault]\n{APPROLE_AUTH}\n{vault_config}"),
        );
        d.write(
            "db.hbs",
            "user={{vault \"database/creds/app#username\"}}\npassword={{vault \"secret/app#password\"}}\n",
        );
        let listen = listen();
        let r = Running::start(
            d.cmd(&["watch", "--listen", &listen, "--template", "db.hbs:db.conf"])
                .env("VAULT_ADDR", &proxy.url),
            &d,
            &listen,
        );
        DynamicPod {
            server,
            proxy,
            d,
            r,
        }
    }

    /// The database user in the output.
    fn user(&self) -> String {
        let text = self.d.read("db.conf");
        let line = text.lines().next().unwrap_or_default();
        line.trim_start_matches("user=").to_string()
    }

    /// Waits for the output to name another user than `was`; returns the
    /// new user and when the file first showed it.
    fn next_user(&self, was: &str, within: Duration) -> (String, Instant) {
        let give_up = Instant::now() + within;
        loop {
            let user = self.user();
            if !user.is_empty() && user != was {
                return (user, Instant::now());
            }
            assert!(
                Instant::now() < give_up,
                "no new credential within {within:?}\n{}",
                self.r.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// After an outage: the next credential is written within 2 s of
    /// Vault issuing it, and it is the only one issued (the first was one).
    fn delivered_once(&self, first: &str) {
        let (user, written) = self.next_user(first, Duration::from_secs(30));
        let delay = written.duration_since(self.issued_at(&user));
        assert!(
            delay < Duration::from_secs(2),
            "written {delay:?} after Vault issued it\n{}",
            self.r.log()
        );
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(self.server.count("leases_issued"), 2, "{}", self.r.log());
        assert_eq!(self.user(), user);
        assert!(self.server.valid_credentials().contains(&user));
    }

    /// When Vault issued the credential of `user`.
    fn issued_at(&self, user: &str) -> Instant {
        self.server
            .issued()
            .into_iter()
            .find(|(_, u)| u == user)
            .map(|(at, _)| at)
            .unwrap_or_else(|| panic!("Vault never issued {user}"))
    }
}

/// Vault answers 503 for longer than the credentials live, keeping its
/// state; once it is back, the credentials it issues again reach the file
/// within about a second, whatever the backoff of the watch on the KV
/// secret that failed beside them, and one recovery issues one credential.
#[test]
fn after_a_vault_outage_the_new_credential_is_delivered_at_once() {
    let pod = DynamicPod::start("kv_refresh = \"1s\"\n");
    let first = pod.user();
    assert!(!first.is_empty());
    pod.proxy.inject(Fault::Status(503), None);
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(pod.user(), first, "rewritten during the outage");
    assert!(!pod.server.valid_credentials().contains(&first));
    pod.proxy.clear();
    pod.delivered_once(&first);
}

/// The same through a restart that loses Vault's tokens and leases: a new
/// login, one new credential, delivered at once.
#[test]
fn after_a_vault_restart_that_loses_its_leases_one_new_credential_is_delivered_at_once() {
    let pod = DynamicPod::start("kv_refresh = \"1s\"\n");
    let first = pod.user();
    pod.proxy.inject(Fault::Status(503), None);
    std::thread::sleep(Duration::from_secs(3));
    pod.server.lose_sessions();
    std::thread::sleep(Duration::from_secs(9));
    pod.proxy.clear();
    pod.delivered_once(&first);
    assert_eq!(pod.server.count("logins"), 2, "{}", pod.r.log());
}

/// A lease re-issued (its renewal refused) is the only thing fetched:
/// the KV secrets beside it are read on `kv_refresh`, not with it.
#[test]
fn a_reissued_lease_does_not_re_read_the_kv_secrets() {
    let pod = DynamicPod::start("kv_refresh = \"1h\"\n");
    let first = pod.user();
    let reads = pod.server.count("kv_reads");
    pod.server.revoke_leases();
    let (user, _) = pod.next_user(&first, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    assert!(pod.server.valid_credentials().contains(&user));
    assert_eq!(
        pod.server.count("kv_reads"),
        reads,
        "KV secrets read again with the re-issue\n{}",
        pod.r.log()
    );
}

/// A key that is absent (its template gives a default) is held like a
/// value: during a Consul outage a credential Vault re-issues is still
/// written, because nothing asks Consul for the absent key again; and the
/// key is watched, so it comes through once it exists.
#[test]
fn an_absent_value_is_held_so_a_consul_outage_does_not_hold_back_a_new_credential() {
    let consul = ConsulServer::start();
    let consul_proxy = FaultProxy::start(&consul.url);
    let vault = VaultServer::start();
    vault.database_role("app", 4, 600);
    let d = Dir::new();
    d.write("envrender.toml", "[consul]\nwait = \"2s\"\n");
    d.write(
        "http.hbs",
        "max_conns={{consul \"app/prod/http/max_conns\" default=\"1024\"}}\n",
    );
    d.write("db.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    let listen = listen();
    let r = Running::start(
        d.cmd(&[
            "watch",
            "--listen",
            &listen,
            "--template",
            "http.hbs:http.conf",
            "--template",
            "db.hbs:db.conf",
        ])
        .env("CONSUL_HTTP_ADDR", consul_proxy.addr())
        .env("VAULT_ADDR", &vault.url)
        .env("VAULT_TOKEN", &vault.root_token),
        &d,
        &listen,
    );
    assert_eq!(d.read("http.conf"), "max_conns=1024\n");
    let first = d.read("db.conf");
    consul_proxy.inject(Fault::Status(503), None);
    eventually(
        Duration::from_secs(20),
        "degraded readiness naming consul",
        || {
            let (status, text) = r.ready();
            status == 503 && text.contains("consul")
        },
    );
    // Vault refuses the next renewal: a new credential is issued.
    vault.revoke_leases();
    eventually(
        Duration::from_secs(15),
        "the new credential written",
        || d.read("db.conf") != first,
    );
    let user = d
        .read("db.conf")
        .trim()
        .trim_start_matches("user=")
        .to_string();
    assert!(vault.valid_credentials().contains(&user), "{}", r.log());
    assert_eq!(d.read("http.conf"), "max_conns=1024\n");
    consul_proxy.clear();
    consul.put("app/prod/http/max_conns", "2048");
    eventually(Duration::from_secs(20), "the key, once it exists", || {
        d.read("http.conf") == "max_conns=2048\n"
    });
    // And once it is gone again, the default.
    consul.delete("app/prod/http/max_conns");
    eventually(
        Duration::from_secs(20),
        "the default, once the key is gone",
        || d.read("http.conf") == "max_conns=1024\n",
    );
}

/// After a Consul outage, readiness is back within seconds of Consul
/// answering again with the same data, not when the next blocking query
/// returns (up to its `wait`: 20 s here, a minute by default).
#[test]
fn readiness_returns_within_seconds_of_consul_answering_again() {
    let consul = ConsulServer::start();
    consul.put("app/k", "v");
    let proxy = FaultProxy::start(&consul.url);
    let d = Dir::new();
    d.write("envrender.toml", "[consul]\nwait = \"20s\"\n");
    d.write("t.hbs", "k={{consul \"app/k\"}}\n");
    let listen = listen();
    let r = Running::start(
        d.cmd(&["watch", "--listen", &listen, "--template", "t.hbs:out.conf"])
            .env("CONSUL_HTTP_ADDR", proxy.addr()),
        &d,
        &listen,
    );
    // The blocking query is open when Consul goes away.
    std::thread::sleep(Duration::from_millis(500));
    proxy.inject(Fault::Status(503), None);
    eventually(
        Duration::from_secs(30),
        "degraded readiness naming consul",
        || {
            let (status, text) = r.ready();
            status == 503 && text.contains("consul")
        },
    );
    std::thread::sleep(Duration::from_secs(12));
    proxy.clear();
    let back = Instant::now();
    eventually(Duration::from_secs(20), "readiness", || r.ready().0 == 200);
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "ready {took:?} after Consul answered again\n{}",
        r.log()
    );
    let (_, text) = r.ready();
    assert!(!text.contains("503"), "{text}");
    assert_eq!(d.read("out.conf"), "k=v\n");
}

#[test]
fn consul_empty_answers_and_index_regressions_never_wipe_outputs() {
    let server = ConsulServer::start();
    server.put("lb/backends/a", "10.0.0.1");
    server.put("lb/backends/b", "10.0.0.2");
    let proxy = FaultProxy::start(&server.url);
    let d = Dir::new();
    d.write("envrender.toml", "[consul]\nwait = \"1s\"\n");
    d.write(
        "t.hbs",
        "{{#each (consul \"lb/backends/\")}}server {{this}}\n{{/each}}",
    );
    let listen = listen();
    let r = Running::start(
        d.cmd(&["watch", "--listen", &listen, "--template", "t.hbs:lb.conf"])
            .env("CONSUL_HTTP_ADDR", proxy.addr()),
        &d,
        &listen,
    );
    let good = "server 10.0.0.1\nserver 10.0.0.2\n";
    assert_eq!(d.read("lb.conf"), good);
    let before = stamp(&d, "lb.conf");
    // 200 OK with nothing in it, again and again.
    proxy.inject(Fault::Empty, None);
    eventually(Duration::from_secs(10), "degraded readiness", || {
        r.ready().0 == 503
    });
    std::thread::sleep(Duration::from_millis(1500));
    proxy.clear();
    eventually(Duration::from_secs(10), "readiness", || r.ready().0 == 200);
    // The index goes back (a restored snapshot): read again, same data.
    server.regress_index(1);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(stamp(&d, "lb.conf"), before, "rewritten without a change");
    assert_eq!(d.read("lb.conf"), good);
    // A real change still comes through.
    server.put("lb/backends/c", "10.0.0.3");
    eventually(Duration::from_secs(10), "the change", || {
        d.read("lb.conf").contains("server 10.0.0.3")
    });
}
