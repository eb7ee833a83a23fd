//! `envrender watch` end to end: the binary against the Consul and Vault test
//! servers, the AWS emulator and the file system, with a process that counts
//! the signals it receives.

use crate::support;

use std::os::unix::fs::MetadataExt as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::aws::block_on;
use support::consul::ConsulServer;
use support::vault::{APPROLE_AUTH, Role, VaultServer};
use support::{Dir, eventually};

/// A stand-in for the app: writes its pid to `app.pid` and a line to
/// `hups` for each SIGHUP.
struct App {
    child: Child,
}

impl App {
    fn start(d: &Dir) -> App {
        let script = "import os, signal, sys, time\n\
            def hup(*_):\n    open(sys.argv[1], 'a').write('hup\\n')\n\
            signal.signal(signal.SIGHUP, hup)\n\
            open(sys.argv[2] + '.tmp', 'w').write(str(os.getpid()))\n\
            os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n\
            while True:\n    time.sleep(1)\n";
        let child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(d.join("hups"))
            .arg(d.join("app.pid"))
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(10), "the app to start", || {
            d.join("app.pid").exists()
        });
        App { child }
    }

    fn hups(d: &Dir) -> usize {
        std::fs::read_to_string(d.join("hups"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `envrender watch`, stopped with SIGTERM (and checked to exit 0)
/// by [`Watch::stop`].
struct Watch {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Watch {
    fn start(cmd: support::Cmd, d: &Dir) -> Watch {
        let port = support::aws::free_port();
        let log = d.join("watch.log");
        let mut command = cmd.command;
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().unwrap();
        let w = Watch { child, port, log };
        eventually(Duration::from_secs(20), "readiness", || w.ready().0 == 200);
        w
    }

    fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        block_on(async {
            match reqwest::get(&url).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        })
    }

    fn ready(&self) -> (u16, String) {
        self.get("/readyz")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; asserts a clean exit 0 within 5 s.
    fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0), "{}", self.log());
                return self.log();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn consul_addr(server: &ConsulServer) -> String {
    server.url.trim_start_matches("http://").to_string()
}

/// A sidecar as deployed after an init container: `t.hbs` rendered to
/// `out` first (so the sidecar has nothing to write), the app started, then
/// `watch` with `flags`, signalling the app through its pid file.
fn consul_sidecar(server: &ConsulServer, d: &Dir, out: &str, flags: &[&str]) -> (App, Watch) {
    let template = format!("t.hbs:{out}");
    let cmd = |args: &[&str]| d.cmd(args).env("CONSUL_HTTP_ADDR", &consul_addr(server));
    cmd(&["render", "--template", &template]).run().success();
    let app = App::start(d);
    let mut args = vec!["watch", "--template", &template, "--pid-file", "app.pid"];
    args.extend(flags);
    (app, Watch::start(cmd(&args), d))
}

/// The file's identity and modification time: unchanged when not rewritten.
fn stamp(d: &Dir, rel: &str) -> (u64, i64, i64) {
    let m = std::fs::metadata(d.join(rel)).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[test]
fn a_consul_change_rewrites_the_file_and_signals_the_app_once() {
    let server = ConsulServer::start();
    server.put("app/db_host", "one");
    server.put("app/other", "x");
    let d = Dir::new();
    d.write("t.hbs", "host={{consul \"app/db_host\"}}\n");
    let (_app, w) = consul_sidecar(&server, &d, "out/app.conf", &["--signal", "SIGHUP"]);
    assert_eq!(App::hups(&d), 0, "signalled with nothing changed");
    server.put("app/db_host", "two");
    eventually(Duration::from_secs(5), "the rewrite", || {
        d.read("out/app.conf") == "host=two\n"
    });
    eventually(Duration::from_secs(5), "the signal", || App::hups(&d) == 1);
    // An unrelated key under the same prefix: no write, no signal.
    let before = stamp(&d, "out/app.conf");
    server.put("app/other", "y");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(stamp(&d, "out/app.conf"), before);
    assert_eq!(App::hups(&d), 1);
    let metrics = w.get("/metrics").1;
    assert!(metrics.contains("envrender_writes_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("envrender_watched_references 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "envrender_actions_total{action=\"SIGHUP to the pid in app.pid\",result=\"ok\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(w.get("/healthz"), (200, "ok\n".to_string()));
    w.stop();
}

#[test]
fn a_change_under_one_prefix_leaves_the_other_long_polls_open() {
    let server = ConsulServer::start();
    let mut template = String::new();
    for p in 0..20 {
        server.put(&format!("p{p}/k"), "0");
        template.push_str(&format!("{{{{consul \"p{p}/k\"}}}}\n"));
    }
    let d = Dir::new();
    d.write("t.hbs", &template);
    let w = Watch::start(
        d.cmd(&["watch", "--template", "t.hbs:out.conf"])
            .env("CONSUL_HTTP_ADDR", &consul_addr(&server)),
        &d,
    );
    eventually(Duration::from_secs(10), "20 long polls", || {
        server.blocking_now() == 20
    });
    let before = server.requests();
    for i in 1..=10 {
        server.put("p0/k", &i.to_string());
        eventually(Duration::from_secs(10), "the change", || {
            d.read("out.conf").starts_with(&format!("{i}\n"))
        });
    }
    eventually(Duration::from_secs(10), "20 long polls again", || {
        server.blocking_now() == 20
    });
    // One re-armed query per change; the 19 others stayed open (before,
    // every change cut and re-opened all 20: about 200 requests).
    let made = server.requests() - before;
    assert!(made <= 15, "{made} requests for 10 changes");
    w.stop();
}

#[test]
fn a_burst_of_changes_within_the_wait_is_one_render_and_one_signal() {
    let server = ConsulServer::start();
    server.put("cfg/n", "0");
    let d = Dir::new();
    d.write("t.hbs", "n={{consul \"cfg/n\"}}\n");
    let (_app, w) = consul_sidecar(
        &server,
        &d,
        "out.conf",
        &["--signal", "HUP", "--wait", "500ms:5s"],
    );
    for i in 1..=50 {
        server.put("cfg/n", &i.to_string());
    }
    eventually(Duration::from_secs(8), "the last value", || {
        d.read("out.conf") == "n=50\n"
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(App::hups(&d), 1);
    let metrics = w.get("/metrics").1;
    assert!(metrics.contains("envrender_writes_total 1\n"), "{metrics}");
    w.stop();
}

#[test]
fn a_backend_that_goes_away_leaves_the_outputs_and_is_recovered_from() {
    let server = ConsulServer::start();
    server.put("app/db_host", "one");
    let mut gate = support::Gate::open(&consul_addr(&server));
    let d = Dir::new();
    d.write("envrender.toml", "[consul]\nwait = \"2s\"\n");
    d.write("t.hbs", "host={{consul \"app/db_host\"}}\n");
    let w = Watch::start(
        d.cmd(&["watch", "--template", "t.hbs:out.conf"])
            .env("CONSUL_HTTP_ADDR", &gate.addr),
        &d,
    );
    assert_eq!(d.read("out.conf"), "host=one\n");
    let before = stamp(&d, "out.conf");
    // Consul goes away: the open blocking query is cut, new ones refused.
    gate.shut();
    eventually(Duration::from_secs(10), "degraded readiness", || {
        let (status, text) = w.ready();
        status == 503 && text.contains("consul") && text.contains("cannot reach Consul")
    });
    server.put("app/db_host", "two");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stamp(&d, "out.conf"),
        before,
        "rewritten while Consul was away"
    );
    // Back: the watch recovers by itself and catches up.
    gate.reopen();
    eventually(
        Duration::from_secs(40),
        "the rewrite after recovery",
        || d.read("out.conf") == "host=two\n",
    );
    eventually(Duration::from_secs(10), "readiness", || w.ready().0 == 200);
    let log = w.stop();
    assert!(log.contains("keeping the last good outputs"), "{log}");
}

#[test]
fn a_new_ssm_version_rewrites_the_file() {
    let moto = support::aws::moto();
    support::aws::put_parameters(&moto.url, &[("/t/watch/level", "info", false)]);
    let d = Dir::new();
    d.write("envrender.toml", "[aws]\npoll_interval = \"1s\"\n");
    d.write("t.hbs", "level={{ssm \"/t/watch/level\"}}\n");
    let w = Watch::start(
        d.cmd(&["watch", "--template", "t.hbs:out.conf"])
            .aws(&moto.url),
        &d,
    );
    assert_eq!(d.read("out.conf"), "level=info\n");
    let client = aws_sdk_ssm::Client::new(&support::aws::sdk(&moto.url));
    block_on(async {
        client
            .put_parameter()
            .name("/t/watch/level")
            .value("debug")
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .unwrap();
    });
    eventually(Duration::from_secs(10), "the new version", || {
        d.read("out.conf") == "level=debug\n"
    });
    w.stop();
}

#[test]
fn vault_renewals_rewrite_nothing_and_the_max_ttl_reissue_signals_once() {
    let server = VaultServer::start();
    server.policy("app", &[("database/creds/app", &["read"])]);
    server.database_role("app", 2, 7);
    let role_id = server.approle(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 600,
            ..Role::default()
        },
    );
    let secret_id = server.secret_id("app", 0);
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "envrender.toml",
        "[vault]\nstate_file = \"vault-state.json\"\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n\n[[template]]\nsource = \"db.hbs\"\ndestination = \"out/db.conf\"\n",
    );
    d.write("db.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    let cmd = |args: &[&str]| d.cmd(args).env("VAULT_ADDR", &server.url);
    cmd(&["render"]).run().success();
    let first = d.read("out/db.conf");
    let _app = App::start(&d);
    let start = Instant::now();
    let w = Watch::start(
        cmd(&["watch", "--signal", "SIGHUP", "--pid-file", "app.pid"]),
        &d,
    );
    // Renewals (every ~1.3 s) keep the credential the sidecar adopted; the
    // max TTL (7 s) makes one re-issue, one rewrite, one signal.
    let mut seen = vec![first.clone()];
    while start.elapsed() < Duration::from_secs(10) {
        let now = d.read("out/db.conf");
        let user = now.trim().trim_start_matches("user=").to_string();
        assert!(
            server.valid_credentials().contains(&user),
            "{user} no longer valid at {:?}",
            start.elapsed()
        );
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(App::hups(&d), 1);
    assert_eq!(server.count("leases_issued"), 2);
    assert_eq!(server.count("logins"), 1);
    assert!(server.count("leases_renewed") >= 2);
    let metrics = w.get("/metrics").1;
    assert!(
        metrics.contains(
            "envrender_lease_expiry_timestamp_seconds{reference=\"vault:database/creds/app\"}"
        ),
        "{metrics}"
    );
    w.stop();
}

/// `envrender_lease_expiry_timestamp_seconds` moves with each renewal, so
/// an alert on it does not fire while the lease is kept alive.
#[test]
fn the_lease_expiry_metric_follows_renewals() {
    let server = VaultServer::start();
    server.database_role("app", 4, 600);
    let d = Dir::new();
    d.write("db.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    let w = Watch::start(
        d.cmd(&["watch", "--template", "db.hbs:db.conf"])
            .env("VAULT_ADDR", &server.url)
            .env("VAULT_TOKEN", &server.root_token),
        &d,
    );
    let expiry = || -> f64 {
        let metrics = w.get("/metrics").1;
        metrics
            .lines()
            .find(|l| l.starts_with("envrender_lease_expiry_timestamp_seconds{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no lease expiry in\n{metrics}"))
    };
    let first = expiry();
    eventually(Duration::from_secs(15), "two renewals", || {
        server.count("leases_renewed") >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let later = expiry();
    assert!(
        later > first + 1.0 && later > now,
        "expiry {later} (first {first}) at {now}\n{}",
        w.log()
    );
    assert_eq!(server.count("leases_issued"), 1);
    w.stop();
}

/// New credentials are written while the old ones still have their
/// overlap left: a third of the TTL by default, half for a path configured
/// so (an app's connection pool keeps old credentials that long).
#[test]
fn new_credentials_arrive_while_the_old_ones_keep_their_overlap() {
    let server = VaultServer::start();
    server.database_role("app", 6, 18);
    server.database_role("pool", 6, 18);
    let d = Dir::new();
    d.write(
        "envrender.toml",
        "[vault.lease_overlap_for]\n\"database/creds/pool\" = 0.5\n",
    );
    d.write("app.hbs", "{{vault \"database/creds/app#username\"}}");
    d.write("pool.hbs", "{{vault \"database/creds/pool#username\"}}");
    let w = Watch::start(
        d.cmd(&[
            "watch",
            "--template",
            "app.hbs:app.conf",
            "--template",
            "pool.hbs:pool.conf",
        ])
        .env("VAULT_ADDR", &server.url)
        .env("VAULT_TOKEN", &server.root_token),
        &d,
    );
    let mut files = [("app.conf", 1.0 / 3.0), ("pool.conf", 0.5)]
        .map(|(file, share)| (file, share, d.read(file), None));
    let give_up = Instant::now() + Duration::from_secs(30);
    while files.iter().any(|f| f.3.is_none()) {
        assert!(Instant::now() < give_up, "no new credentials\n{}", w.log());
        for (file, _, first, written) in &mut files {
            if written.is_none() && d.read(file) != *first {
                *written = Some(std::time::SystemTime::now());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (file, share, first, written) in files {
        let left = server
            .ends_at(&first)
            .duration_since(written.unwrap())
            .unwrap_or_default();
        assert!(
            left >= Duration::from_secs_f64(6.0 * share),
            "{file}: written {left:?} before the old credential ended\n{}",
            w.log()
        );
    }
    assert_eq!(server.count("leases_issued"), 4);
    w.stop();
}

/// With `revoke_on_stop` and a state file, a sidecar stopped while the app
/// it signals still runs (a restart) leaves its lease to the next one; once
/// the app is gone (the pod is), it revokes the lease and its token.
#[test]
fn a_sidecar_revokes_its_lease_when_the_app_is_gone_not_on_a_restart() {
    let server = {
        let server = VaultServer::start();
        server.policy("app", &[("database/creds/app", &["read"])]);
        server.database_role("app", 3600, 7200);
        server
    };
    let d = Dir::new();
    server.approle_files(d.path(), &["app"], 3600);
    d.write(
        "envrender.toml",
        &format!(
            "[vault]\nstate_file = \"vault-state.json\"\nrevoke_on_stop = true\n{APPROLE_AUTH}\n"
        ),
    );
    d.write("db.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    let cmd = || {
        d.cmd(&[
            "watch",
            "--template",
            "db.hbs:db.conf",
            "--signal",
            "SIGHUP",
            "--pid-file",
            "app.pid",
        ])
        .env("VAULT_ADDR", &server.url)
    };
    // With no signal action there is no telling the app's state: the stop
    // is taken for a restart.
    let unsignalled = d
        .cmd(&["watch", "--template", "db.hbs:db.conf"])
        .env("VAULT_ADDR", &server.url);
    let log = Watch::start(unsignalled, &d).stop();
    assert!(log.contains("stay in the state file"), "{log}");
    assert_eq!(server.valid_credentials().len(), 1);
    let app = App::start(&d);
    let log = Watch::start(cmd(), &d).stop();
    assert!(log.contains("stay in the state file"), "{log}");
    assert_eq!(server.valid_credentials().len(), 1);
    // The restarted sidecar adopts the lease; then the app goes away.
    let w = Watch::start(cmd(), &d);
    drop(app);
    let log = w.stop();
    assert!(log.contains("revoked the Vault token"), "{log}");
    assert_eq!(server.valid_credentials(), Vec::<String>::new());
    assert_eq!(server.count("leases_issued"), 1);
    assert_eq!(server.count("logins"), 1);
}

/// `watch` of `t.hbs` into `out.conf` with values from `values.yaml`.
fn values_watch(d: &Dir) -> support::Cmd {
    d.cmd(&[
        "--values",
        "values.yaml",
        "watch",
        "--template",
        "t.hbs:out.conf",
    ])
}

/// `watch --values` reads the values file again when it changes; one that
/// no longer loads leaves the outputs as they are and says so in readiness.
#[test]
fn watch_reads_the_local_values_file_again_when_it_changes() {
    let d = Dir::new();
    d.write("values.yaml", "\"ssm:/app/level\": one\n");
    d.write("t.hbs", "level={{ssm \"/app/level\"}}\n");
    let w = Watch::start(values_watch(&d), &d);
    assert_eq!(d.read("out.conf"), "level=one\n");
    d.write("values.yaml", "\"ssm:/app/level\": two\n");
    eventually(Duration::from_secs(10), "the new value", || {
        d.read("out.conf") == "level=two\n"
    });
    d.write("values.yaml", "\"ssm:/app/level\": [unclosed\n");
    eventually(Duration::from_secs(10), "degraded readiness", || {
        let (status, text) = w.ready();
        status == 503 && text.contains("values.yaml")
    });
    assert_eq!(d.read("out.conf"), "level=two\n");
    d.write("values.yaml", "\"ssm:/app/level\": three\n");
    eventually(Duration::from_secs(10), "the value after the fix", || {
        d.read("out.conf") == "level=three\n"
    });
    eventually(Duration::from_secs(10), "readiness", || w.ready().0 == 200);
    w.stop();
}

/// `watch --splay` puts off the render of a change (and its actions) by a
/// random time up to the splay; the first render is not put off.
#[test]
fn watch_splay_puts_off_the_render_of_a_change() {
    let d = Dir::new();
    d.write("v.txt", "one");
    d.write("t.hbs", "{{file \"v.txt\"}}");
    let w = Watch::start(
        d.cmd(&["watch", "--splay", "1000h", "--template", "t.hbs:out"]),
        &d,
    );
    assert_eq!(d.read("out"), "one");
    d.write("v.txt", "two");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.read("out"), "one");
    let log = w.stop();
    assert!(
        log.contains("rendering after a random delay (splay)"),
        "{log}"
    );
}

/// A template's check command runs against the staged file before it goes
/// live: a file it refuses leaves the one in place, readiness and metrics
/// say so, and the app is not signalled; `render` exits 1 writing nothing.
#[test]
fn a_check_command_keeps_a_refused_file_out() {
    let d = Dir::new();
    d.write("v.txt", "good one");
    d.write("t.hbs", "{{file \"v.txt\"}}\n");
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"t.hbs\"\ndestination = \"out.conf\"\ncheck = \"grep -q good {file}\"\n",
    );
    let _app = App::start(&d);
    let w = Watch::start(
        d.cmd(&["watch", "--signal", "SIGHUP", "--pid-file", "app.pid"]),
        &d,
    );
    assert_eq!(d.read("out.conf"), "good one\n");
    d.write("v.txt", "bad two");
    eventually(Duration::from_secs(10), "degraded readiness", || {
        let (status, text) = w.ready();
        status == 503 && text.contains("refused the new content")
    });
    assert_eq!(d.read("out.conf"), "good one\n");
    assert_eq!(App::hups(&d), 0);
    let metrics = w.get("/metrics").1;
    assert!(
        !metrics.contains("envrender_render_errors_total 0"),
        "{metrics}"
    );
    d.write("v.txt", "good three");
    eventually(Duration::from_secs(40), "the accepted file", || {
        d.read("out.conf") == "good three\n"
    });
    eventually(Duration::from_secs(10), "one signal", || App::hups(&d) == 1);
    eventually(Duration::from_secs(10), "readiness", || w.ready().0 == 200);
    let log = w.stop();
    assert!(!log.contains("bad two"), "{log}");
    // render: nothing written.
    d.write("v.txt", "bad four");
    let out = d.cmd(&["render", "--output-root", "root"]).run();
    out.code(1)
        .stderr_has("refused by its check")
        .stderr_has("grep -q good {file}");
    assert!(!d.join("root/out.conf").exists());
}

/// The outputs of a linked directory change together: a certificate and
/// its key are seen through `..data`, swapped in one step, so a reader
/// that resolves `..data` once never sees the new certificate with the old
/// key; the files of the render before are removed.
#[test]
fn a_linked_directory_changes_in_one_step() {
    let d = Dir::new();
    d.write("values.yaml", "\"ssm:/tls\": { crt: crt-0, key: key-0 }\n");
    d.write("crt.hbs", "{{ssm \"/tls#crt\"}}");
    d.write("key.hbs", "{{ssm \"/tls#key\"}}");
    d.write(
        "envrender.toml",
        "[local]\nvalues = \"values.yaml\"\n\n[render]\nlinked_dirs = [\"tls\"]\n\n\
         [[template]]\nsource = \"crt.hbs\"\ndestination = \"tls/tls.crt\"\n\n\
         [[template]]\nsource = \"key.hbs\"\ndestination = \"tls/tls.key\"\n",
    );
    let w = Watch::start(d.cmd(&["watch"]), &d);
    let link = |name: &str| std::fs::read_link(d.join("tls").join(name)).unwrap();
    assert_eq!(link("tls.crt"), std::path::Path::new("..data/tls.crt"));
    assert_eq!(link("tls.key"), std::path::Path::new("..data/tls.key"));
    assert_eq!(d.read("tls/tls.crt"), "crt-0");
    assert_eq!(d.read("tls/tls.key"), "key-0");
    let mode = std::fs::metadata(d.join("tls/tls.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // A reader that resolves ..data once, again and again, while the pair
    // changes.
    let dir = d.join("tls");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(target) = std::fs::read_link(dir.join("..data")) else {
                    continue;
                };
                let data = dir.join(target);
                let (Ok(crt), Ok(key)) = (
                    std::fs::read_to_string(data.join("tls.crt")),
                    std::fs::read_to_string(data.join("tls.key")),
                ) else {
                    continue;
                };
                assert_eq!(crt.trim_start_matches("crt"), key.trim_start_matches("key"));
                seen += 1;
            }
            seen
        })
    };
    for i in 1..=5 {
        d.write(
            "values.yaml",
            &format!("\"ssm:/tls\": {{ crt: crt-{i}, key: key-{i} }}\n"),
        );
        eventually(Duration::from_secs(10), "the new pair", || {
            d.read("tls/tls.crt") == format!("crt-{i}")
        });
        assert_eq!(d.read("tls/tls.key"), format!("key-{i}"));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
    // One directory of files: the current render's.
    let dirs: Vec<String> = std::fs::read_dir(d.join("tls"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..envrender-"))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    w.stop();
}

/// In airplane mode (a values file, no fallthrough) a reference the file
/// lacks is absent, answered by the file: `watch` holds it without asking
/// its backend, then or later.
#[test]
fn airplane_mode_watch_never_asks_the_network_for_an_absent_value() {
    let consul = ConsulServer::start();
    let d = Dir::new();
    d.write("values.yaml", "\"ssm:/app/level\": one\n");
    d.write(
        "t.hbs",
        "level={{ssm \"/app/level\"}} conns={{consul \"app/max_conns\" default=\"1024\"}}\n",
    );
    let w = Watch::start(values_watch(&d).env("CONSUL_HTTP_ADDR", &consul.url), &d);
    assert_eq!(d.read("out.conf"), "level=one conns=1024\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(consul.requests(), 0, "{}", w.log());
    w.stop();
}

#[test]
fn template_edits_and_configmap_swaps_rerender() {
    let d = Dir::new();
    // A Kubernetes ConfigMap volume: files are links through ..data.
    d.write("cm/..2026_01/app.hbs", "v1 {{file \"values.yaml#name\"}}\n");
    std::os::unix::fs::symlink("..2026_01", d.join("cm/..data")).unwrap();
    std::os::unix::fs::symlink("..data/app.hbs", d.join("cm/app.hbs")).unwrap();
    d.write("values.yaml", "name: a\n");
    d.write("local.hbs", "local {{file \"values.yaml#name\"}}\n");
    let w = Watch::start(
        d.cmd(&[
            "watch",
            "--template",
            "cm/app.hbs:out/app.conf",
            "--template",
            "local.hbs:out/local.conf",
        ]),
        &d,
    );
    assert_eq!(d.read("out/app.conf"), "v1 a\n");
    // The kubelet's atomic swap: a new directory, then ..data replaced.
    d.write("cm/..2026_02/app.hbs", "v2 {{file \"values.yaml#name\"}}\n");
    std::os::unix::fs::symlink("..2026_02", d.join("cm/..data_tmp")).unwrap();
    std::fs::rename(d.join("cm/..data_tmp"), d.join("cm/..data")).unwrap();
    eventually(Duration::from_secs(5), "the swapped template", || {
        d.read("out/app.conf") == "v2 a\n"
    });
    // A template edited in place, and a file: source changed.
    d.write("local.hbs", "LOCAL {{file \"values.yaml#name\"}}\n");
    eventually(Duration::from_secs(5), "the edited template", || {
        d.read("out/local.conf") == "LOCAL a\n"
    });
    d.write("values.yaml", "name: b\n");
    eventually(Duration::from_secs(5), "the new value", || {
        d.read("out/app.conf") == "v2 b\n" && d.read("out/local.conf") == "LOCAL b\n"
    });
    // A template that stops compiling leaves the outputs as they were.
    d.write("local.hbs", "{{#if}}\n");
    eventually(Duration::from_secs(5), "degraded readiness", || {
        w.ready().0 == 503
    });
    assert_eq!(d.read("out/local.conf"), "LOCAL b\n");
    w.stop();
}

#[test]
fn actions_run_commands_and_call_urls_and_failures_are_reported() {
    let d = Dir::new();
    d.write("values.yaml", "name: a\n");
    d.write("t.hbs", "{{file \"values.yaml#name\"}}\n");
    // A file from before (a restarted sidecar): replacing it calls for the
    // actions even on the first render.
    d.write("out.conf", "old\n");
    let w = Watch::start(
        d.cmd(&[
            "watch",
            "--template",
            "t.hbs:out.conf",
            "--exec",
            "sh -c 'echo \"$0\" >> ran' reloaded",
            "--http",
            "http://127.0.0.1:9/-/reload",
        ]),
        &d,
    );
    // The first render replaced the file: the actions ran once.
    eventually(Duration::from_secs(5), "the command", || {
        std::fs::read_to_string(d.join("ran")).unwrap_or_default() == "reloaded\n"
    });
    d.write("values.yaml", "name: b\n");
    eventually(Duration::from_secs(5), "the second run", || {
        std::fs::read_to_string(d.join("ran")).unwrap_or_default() == "reloaded\nreloaded\n"
    });
    // Nothing listens on port 9: reported (after retries), never fatal.
    eventually(
        Duration::from_secs(10),
        "the failed call in the metrics",
        || {
            w.get("/metrics")
                .1
                .contains("action=\"POST http://127.0.0.1:9/-/reload\",result=\"error\"")
        },
    );
    assert_eq!(w.ready().0, 200);
    let log = w.stop();
    assert!(log.contains("action failed"), "{log}");
}

#[test]
fn watch_flags_are_checked_before_anything_runs() {
    let d = Dir::new();
    d.write("t.hbs", "x\n");
    d.cmd(&[
        "watch",
        "--template",
        "t.hbs:out.conf",
        "--signal",
        "SIGHUP",
    ])
    .run()
    .code(2)
    .stderr_has("a signal needs a pid file or a process name");
    d.cmd(&[
        "watch",
        "--template",
        "t.hbs:out.conf",
        "--signal",
        "SIGNOPE",
        "--pid-file",
        "p",
    ])
    .run()
    .code(2)
    .stderr_has("not a signal name");
    d.cmd(&["watch", "--template", "t.hbs:out.conf", "--wait", "5s:1s"])
        .run()
        .code(2)
        .stderr_has("shorter than its MIN");
    assert!(!d.join("out.conf").exists());
}

#[test]
fn processes_are_found_by_name_and_sighup_reloads_the_configuration() {
    let d = Dir::new();
    // An app with a name of its own: a copy of sh that counts SIGHUPs.
    let name = format!("hup{}", std::process::id() % 100_000);
    std::fs::copy("/bin/sh", d.join(&name)).unwrap();
    let mut app = std::process::Command::new(d.join(&name))
        .args([
            "-c",
            "trap 'echo hup >> hups' HUP; while :; do sleep 0.05; done",
        ])
        .current_dir(d.path())
        .spawn()
        .unwrap();
    d.write("values.yaml", "name: a\n");
    d.write("a.hbs", "a={{file \"values.yaml#name\"}}\n");
    d.write("b.hbs", "b={{file \"values.yaml#name\"}}\n");
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"a.hbs\"\ndestination = \"out/a.conf\"\n",
    );
    let w = Watch::start(
        d.cmd(&["watch", "--signal", "SIGHUP", "--process-name", &name]),
        &d,
    );
    // The first render created the file: no app has read an older one, so
    // nobody is told.
    eventually(Duration::from_secs(5), "the first render", || {
        w.ready().0 == 200
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(App::hups(&d), 0);
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"a.hbs\"\ndestination = \"out/a.conf\"\n\n[[template]]\nsource = \"b.hbs\"\ndestination = \"out/b.conf\"\n",
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the new template", || {
        d.join("out/b.conf").exists() && d.read("out/b.conf") == "b=a\n"
    });
    eventually(Duration::from_secs(5), "the signal", || App::hups(&d) == 1);
    // A broken configuration on SIGHUP keeps the running one.
    d.write("envrender.toml", "[[template]]\nsourc = 1\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    d.write("values.yaml", "name: z\n");
    eventually(
        Duration::from_secs(5),
        "renders with the running configuration",
        || d.read("out/b.conf") == "b=z\n",
    );
    let log = w.stop();
    assert!(
        log.contains("reload failed; keeping the running configuration"),
        "{log}"
    );
    let _ = app.kill();
    let _ = app.wait();
}

#[test]
fn each_template_runs_its_own_actions_when_its_output_changes() {
    let d = Dir::new();
    d.write("a.yaml", "v: 1\n");
    d.write("b.yaml", "v: 1\n");
    d.write("a.hbs", "{{file \"a.yaml#v\"}}\n");
    d.write("b.hbs", "{{file \"b.yaml#v\"}}\n");
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"a.hbs\"\ndestination = \"out/a\"\non_change = { exec = [\"sh\", \"-c\", \"echo a >> ran\"] }\n\n\
         [[template]]\nsource = \"b.hbs\"\ndestination = \"out/b\"\non_change = { exec = \"sh -c 'echo b >> ran'\", timeout = \"5s\" }\n",
    );
    let ran = || std::fs::read_to_string(d.join("ran")).unwrap_or_default();
    // out/a is there from before (a restarted sidecar), out/b is new: the
    // first render tells only a's reader.
    d.write("out/a", "0\n");
    let w = Watch::start(d.cmd(&["watch"]), &d);
    eventually(Duration::from_secs(5), "the first actions", || {
        ran() == "a\n"
    });
    d.write("a.yaml", "v: 2\n");
    eventually(Duration::from_secs(5), "a's action", || {
        ran().lines().count() == 2
    });
    d.write("b.yaml", "v: 2\n");
    eventually(Duration::from_secs(5), "b's action", || {
        ran().lines().count() == 3
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ran(), "a\na\nb\n");
    w.stop();
    // A signal with no one to send it to is a configuration error, with its line.
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"a.hbs\"\ndestination = \"out/a\"\non_change = { signal = \"SIGHUP\" }\n",
    );
    d.cmd(&["watch"])
        .run()
        .code(2)
        .stderr_has("envrender.toml:4")
        .stderr_has("needs a pid file or a process name");
}
