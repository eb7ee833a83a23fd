//! Consul KV and services against the Consul test server: renders through the
//! binary, and the blocking-query watch primitive through the library.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envrender::backend::consul::{Consul, ConsulConfig, WatchPolicy};
use envrender::backend::{Backend, Observation, Watching};
use envrender::environment::MapEnv;
use envrender::reference::{Source, parse};
use support::Dir;
use support::aws::block_on;
use support::consul::{ConsulServer, Instance};

fn host_port(server: &ConsulServer) -> String {
    server.url.trim_start_matches("http://").to_string()
}

fn web(id: &str, port: u16, status: &str, tags: &[&str]) -> Instance {
    Instance {
        node: format!("node-{id}"),
        node_address: "10.0.0.9".into(),
        id: id.into(),
        service: "web".into(),
        address: if id == "web-2" {
            String::new()
        } else {
            format!("10.0.1.{port}")
        },
        port,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        meta: BTreeMap::from([("version".to_string(), "1.2".to_string())]),
        checks: vec![status.into(), "passing".into()],
    }
}

fn backend(server: &ConsulServer, config: ConsulConfig) -> Consul {
    Consul::new(
        config,
        &MapEnv::new([("CONSUL_HTTP_ADDR", host_port(server))]),
    )
    .unwrap()
}

/// A backend for watch tests: long waits, so a return means a change.
fn watching(server: &ConsulServer) -> Arc<Consul> {
    Arc::new(backend(
        server,
        ConsulConfig {
            wait: Duration::from_secs(30),
            ..ConsulConfig::default()
        },
    ))
}

fn source(r: &str) -> Source {
    parse(r).unwrap().source
}

#[test]
fn renders_keys_prefixes_json_fields_and_services() {
    let server = ConsulServer::start();
    server.put("app/db/host", "db.internal");
    server.put("app/db/conf", r#"{"pool": {"size": 12}}"#);
    server.put("app/features/a", "on");
    server.put("app/features/b", "off");
    server.register(web("web-1", 8080, "passing", &["primary"]));
    server.register(web("web-2", 8081, "passing", &[]));
    server.register(web("web-3", 8082, "critical", &["primary"]));
    let d = Dir::new();
    d.write(
        "t.hbs",
        "host={{consul \"app/db/host\"}} pool={{consul \"app/db/conf\" \"pool.size\"}}\n\
         {{#each (consul \"app/features/\")}}{{@key}}={{this}};{{/each}}\n\
         {{#each (service \"web\")}}{{ID}}@{{Address}}:{{Port}} {{/each}}\n\
         {{#each (secret \"service:web?tag=primary&passing=false\")}}{{ID}} {{/each}}\n",
    );
    // CONSUL_HTTP_ADDR as host:port, the way the consul CLI takes it.
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &host_port(&server))
        .run()
        .success();
    assert_eq!(
        d.read("t.out"),
        "host=db.internal pool=12\na=on;b=off;\nweb-1@10.0.1.8080:8080 web-2@10.0.0.9:8081 \nweb-1 web-3 \n"
    );
}

#[test]
fn a_missing_key_fails_at_once_naming_it() {
    let server = ConsulServer::start();
    server.put("app/present", "x");
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{consul \"app/present\"}}{{consul \"app/absent\"}}{{consul \"app/opt\" default=\"d\"}}",
    );
    let start = Instant::now();
    d.cmd(&["render", "--timeout", "20s", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("consul:app/absent  (used by t.hbs)")
        .stderr_has("consul: GET /v1/kv/app/absent: no key app/absent");
    // Missing is not transient: no waiting for the deadline.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    d.cmd(&["render", "--timeout", "1s", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &unreachable.to_string())
        .run()
        .code(1)
        .stderr_has(&format!("cannot reach Consul at http://{unreachable}/"))
        .stderr_has("check CONSUL_HTTP_ADDR");
}

#[test]
fn acl_denial_names_the_key_and_where_the_token_came_from() {
    let server = ConsulServer::start();
    server.put("app/public/x", "ok");
    server.put("app/private/y", "secret");
    server.acl_token("s3cr3t-token", "acc-0001", &["app/public/"]);
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{consul \"app/public/x\"}}{{consul \"app/private/y\"}}",
    );
    let run = d
        .cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .env("CONSUL_HTTP_TOKEN", "s3cr3t-token")
        .run()
        .code(1)
        .stderr_has("consul:app/private/y  (used by t.hbs)")
        .stderr_has("HTTP 403: Permission denied: token with AccessorID 'acc-0001' lacks permission 'key:read' on \"app/private/y\"")
        .stderr_has("(as token from CONSUL_HTTP_TOKEN)")
        .stderr_has("hint: give the token read access, e.g. key_prefix \"app/private/y\"");
    assert!(!run.stderr.contains("s3cr3t-token"));
    assert!(!run.stderr.contains("app/public/x "));
    // A token file named in the configuration; a token with the access.
    server.acl_token("reader", "acc-0002", &["app/"]);
    d.write("token", "reader\n");
    d.write("envrender.toml", "[consul]\ntoken_file = \"token\"\n");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "oksecret");
    d.write("token", "wrong\n");
    d.cmd(&["render", "--template", "t.hbs:t2.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("HTTP 403: ACL not found")
        .stderr_has("(as token from token)");
}

#[test]
fn an_empty_prefix_never_wipes_an_output() {
    let server = ConsulServer::start();
    server.put("lb/backends/a", "10.0.0.1");
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{#each (consul \"lb/backends/\")}}server {{this}}\n{{/each}}",
    );
    let run = |d: &Dir| {
        d.cmd(&["render", "--template", "t.hbs:lb.conf"])
            .env("CONSUL_HTTP_ADDR", &server.url)
            .run()
    };
    run(&d).success();
    assert_eq!(d.read("lb.conf"), "server 10.0.0.1\n");
    server.delete("lb/backends/a");
    run(&d)
        .code(1)
        .stderr_has("consul:lb/backends/")
        .stderr_has("nothing found under the prefix")
        .stderr_has("nothing was written");
    assert_eq!(d.read("lb.conf"), "server 10.0.0.1\n");
    // Unless the template says an empty list is fine.
    d.write(
        "t.hbs",
        "{{#each (secret \"consul:lb/backends/|optional\")}}server {{this}}\n{{/each}}",
    );
    run(&d).success();
    assert_eq!(d.read("lb.conf"), "");
}

#[test]
fn check_reports_the_watches_it_would_open() {
    let server = ConsulServer::start();
    let d = Dir::new();
    let mut args = vec!["check".to_string()];
    // 100 templates, each reading one key; the keys spread over 5 prefixes.
    for p in 0..5 {
        for k in 0..20 {
            server.put(&format!("cfg/p{p}/k{k:02}"), &format!("{p}.{k}"));
            let name = format!("t{p}-{k:02}.hbs");
            d.write(&name, &format!("{{{{consul \"cfg/p{p}/k{k:02}\"}}}}"));
            args.extend(["--template".to_string(), format!("{name}:out/{name}.conf")]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = d
        .cmd(&args)
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success()
        .stdout_has("consul: 5 × GET /v1/kv ?recurse")
        .stdout_has("watches (in watch mode):\n  consul: blocking query: kv cfg/p0/* (recurse) (20 references)");
    assert_eq!(
        run.stdout.matches("blocking query:").count(),
        5,
        "{}",
        run.stdout
    );
}

#[test]
fn keys_sharing_a_prefix_are_read_with_one_request() {
    let server = ConsulServer::start();
    let d = Dir::new();
    let mut template = String::new();
    for k in 0..20 {
        server.put(&format!("cfg/k{k:02}"), &format!("v{k}"));
        template.push_str(&format!("{{{{consul \"cfg/k{k:02}\"}}}},"));
    }
    server.put("solo/one", "1");
    server.put("cfg/hidden", "h");
    template.push_str("{{consul \"solo/one\"}}");
    d.write("t.hbs", &template);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success();
    let expected: Vec<String> = (0..20).map(|k| format!("v{k},")).collect();
    assert_eq!(d.read("t.out"), format!("{}1", expected.concat()));
    // One recursive read for the twenty, one plain read for the key alone.
    let requests = server.kv_requests();
    assert_eq!(requests.values().sum::<usize>(), 2, "{requests:?}");
    assert_eq!(requests.get("cfg/?recurse"), Some(&1), "{requests:?}");
    assert_eq!(requests.get("solo/one"), Some(&1), "{requests:?}");

    // A key the token may not read is filtered out of the recursive answer;
    // it is then asked for on its own, so the error is Consul's exact one.
    server.acl_token("narrow", "acc-0003", &["cfg/k"]);
    d.write("t.hbs", "{{consul \"cfg/k01\"}}{{consul \"cfg/k02\"}}{{consul \"cfg/hidden\"}}{{consul \"cfg/k99|default=d\"}}");
    d.cmd(&["render", "--template", "t.hbs:t2.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .env("CONSUL_HTTP_TOKEN", "narrow")
        .run()
        .code(1)
        .stderr_has("consul:cfg/hidden  (used by t.hbs)")
        .stderr_has("lacks permission 'key:read' on \"cfg/hidden\"")
        .stderr_has("hint: give the token read access");
    assert!(!d.join("t2.out").exists());
    d.write(
        "t.hbs",
        "{{consul \"cfg/k01\"}}{{consul \"cfg/k02\"}}{{consul \"cfg/k99|default=d\"}}",
    );
    d.cmd(&["render", "--template", "t.hbs:t2.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .env("CONSUL_HTTP_TOKEN", "narrow")
        .run()
        .success();
    assert_eq!(d.read("t2.out"), "v1v2d");
}

#[test]
fn keys_in_another_datacenter() {
    let server = ConsulServer::start();
    server.put("app/x", "here");
    let d = Dir::new();
    d.write("t.hbs", "{{secret \"consul:app/x?dc=dc1\"}}");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "here");
    d.write("t.hbs", "{{secret \"consul:app/x?dc=dc9\"}}");
    d.cmd(&["render", "--timeout", "1s", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("consul:app/x?dc=dc9")
        .stderr_has("HTTP 500: No path to datacenter");
}

#[test]
fn stale_reads_are_repeated_against_the_leader_when_too_old() {
    let server = ConsulServer::start();
    server.put("k", "v");
    let consul = backend(&server, ConsulConfig::default());
    let before = server.requests();
    block_on(consul.fetch(&[source("consul:k")]))
        .remove(0)
        .unwrap();
    assert_eq!((server.requests() - before, server.stale_reads()), (1, 1));
    server.set_last_contact(5_000);
    let before = server.requests();
    let value = block_on(consul.fetch(&[source("consul:k")]))
        .remove(0)
        .unwrap();
    assert_eq!(value.value.expose(), "v");
    assert_eq!((server.requests() - before, server.stale_reads()), (2, 2));
}

/// Observes `known` on a thread of its own; the result arrives on the channel.
fn observe_in_background(
    consul: Arc<Consul>,
    known: Vec<(Source, envrender::backend::Seen)>,
) -> std::sync::mpsc::Receiver<Vec<Observation>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let seen = block_on(consul.observe(&known));
        let _ = tx.send(seen);
    });
    rx
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until_or(what: &str, f: impl Fn() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            show()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn known(consul: &Consul, refs: &[&str]) -> Vec<(Source, envrender::backend::Seen)> {
    let sources: Vec<Source> = refs.iter().map(|r| source(r)).collect();
    let fetched = block_on(consul.fetch(&sources));
    sources
        .into_iter()
        .zip(fetched.into_iter().map(|f| Some(f.unwrap())))
        .collect()
}

/// What the watch in the background returned, within 5 s.
fn returned(rx: &std::sync::mpsc::Receiver<Vec<Observation>>) -> Vec<Observation> {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the watch returned")
}

fn changed_values(seen: &[Observation]) -> Vec<Option<String>> {
    seen.iter()
        .map(|o| match o {
            Observation::Changed(f) => Some(f.value.to_text()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_watch_sees_a_put_within_the_blocking_round_trip() {
    let server = ConsulServer::start();
    server.put("app/a", "1");
    server.put("app/b", "2");
    let consul = watching(&server);
    let known = known(&consul, &["consul:app/a", "consul:app/b"]);
    let rx = observe_in_background(consul.clone(), known.clone());
    wait_until("the blocking query", || server.blocking_now() == 1);
    let put = Instant::now();
    server.put("app/b", "3");
    let seen = returned(&rx);
    assert!(
        put.elapsed() < Duration::from_secs(2),
        "{:?}",
        put.elapsed()
    );
    assert_eq!(changed_values(&seen), [None, Some("3".to_string())]);
}

#[test]
fn unrelated_writes_and_rewrites_of_the_same_value_are_not_changes() {
    let server = ConsulServer::start();
    server.put("app/a", "1");
    let consul = watching(&server);
    let known = known(&consul, &["consul:app/a"]);
    let rx = observe_in_background(consul.clone(), known);
    wait_until("the blocking query", || server.blocking_now() == 1);
    server.put("app/unrelated", "x");
    server.put("app/a", "1");
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "an index change with the same data woke the watch"
    );
    // The watch re-armed each time: still one query open.
    wait_until("the re-armed query", || server.blocking_now() == 1);
    server.put("app/a", "2");
    let seen = returned(&rx);
    assert_eq!(changed_values(&seen), [Some("2".to_string())]);
}

#[test]
fn an_index_that_goes_backwards_resets_the_watch() {
    let server = ConsulServer::start();
    for i in 0..5 {
        server.put(&format!("app/k{i}"), "v");
    }
    let consul = watching(&server);
    let known = known(&consul, &["consul:app/k0"]);
    let rx = observe_in_background(consul.clone(), known);
    wait_until("the blocking query", || server.blocking_now() == 1);
    let before = server.requests();
    server.regress_index(2);
    // The watch saw a lower index, read again from 0, found the same data
    // and blocked again (with the lower index).
    wait_until("a re-read after the reset", || {
        server.requests() >= before + 2 && server.blocking_now() == 1
    });
    assert!(rx.try_recv().is_err());
    server.put("app/k0", "after-restore");
    let seen = returned(&rx);
    assert_eq!(changed_values(&seen), [Some("after-restore".to_string())]);
}

#[test]
fn a_hundred_templates_over_five_prefixes_hold_five_blocking_queries() {
    let server = ConsulServer::start();
    let mut refs = Vec::new();
    for p in 0..5 {
        for k in 0..20 {
            server.put(&format!("cfg/p{p}/k{k:02}"), "v");
            refs.push(format!("consul:cfg/p{p}/k{k:02}"));
        }
    }
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    for (policy, expected) in [(WatchPolicy::Prefix, 5), (WatchPolicy::Root, 1)] {
        let consul = Arc::new(backend(
            &server,
            ConsulConfig {
                wait: Duration::from_secs(30),
                watch: policy,
                ..ConsulConfig::default()
            },
        ));
        let known = known(&consul, &refs);
        let rx = observe_in_background(consul.clone(), known);
        wait_until_or(
            &format!("{expected} blocking queries ({policy:?})"),
            || server.blocking_now() == expected,
            || format!("{} open, {:?}", server.blocking_now(), server.kv_requests()),
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.blocking_now(), expected, "{policy:?}");
        server.put("cfg/p3/k07", &format!("changed-{expected}"));
        let seen = returned(&rx);
        let changed: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Observation::Changed(_)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(changed, [67], "{policy:?}");
        wait_until("the queries to close", || server.blocking_now() == 0);
    }
    assert_eq!(server.blocking_max(), 5);
}

#[test]
fn a_service_watch_sees_health_changes() {
    let server = ConsulServer::start();
    server.register(web("web-1", 8080, "passing", &[]));
    server.register(web("web-2", 8081, "passing", &[]));
    let consul = watching(&server);
    let known = known(&consul, &["service:web"]);
    let rx = observe_in_background(consul.clone(), known);
    wait_until("the blocking query", || server.blocking_now() == 1);
    server.set_health("web-2", "critical");
    let seen = returned(&rx);
    match &seen[0] {
        Observation::Changed(f) => {
            let ids: Vec<&str> = f
                .value
                .expose()
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["ID"].as_str().unwrap())
                .collect();
            assert_eq!(ids, ["web-1"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn watch_errors_are_reported_and_backed_off() {
    let server = ConsulServer::start();
    server.put("app/a", "1");
    let consul = watching(&server);
    let known = known(&consul, &["consul:app/a"]);
    server.fail(1, 500, "rpc error: No cluster leader");
    let seen = block_on(consul.observe(&known));
    match &seen[0] {
        Observation::Failed(e) => assert!(
            e.to_string()
                .contains("HTTP 500: rpc error: No cluster leader"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    // The next observation waits before asking again, and reports the
    // recovery at once, unchanged; the one after blocks for changes.
    let started = std::time::Instant::now();
    let seen = block_on(consul.observe(&known));
    assert!(matches!(seen[0], Observation::Unchanged), "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    let rx = observe_in_background(consul.clone(), known);
    wait_until("the blocking query", || server.blocking_now() == 1);
    server.put("app/a", "2");
    let seen = returned(&rx);
    assert_eq!(changed_values(&seen), [Some("2".to_string())]);
}

#[test]
fn the_watch_loop_does_not_spin_when_answers_come_back_at_once() {
    let server = ConsulServer::start();
    server.put("app/a", "1");
    let consul = watching(&server);
    let known = known(&consul, &["consul:app/a"]);
    server.ignore_index(true);
    let before = server.requests();
    let rx = observe_in_background(consul.clone(), known);
    std::thread::sleep(Duration::from_secs(1));
    let queries = server.requests() - before;
    // At most one query per 100 ms, plus the first two.
    assert!(
        (5..=13).contains(&queries),
        "{queries} queries in one second"
    );
    server.ignore_index(false);
    server.put("app/a", "2");
    let seen = returned(&rx);
    assert_eq!(changed_values(&seen), [Some("2".to_string())]);
}

/// The test server's fidelity, checked with a client nobody here wrote.
#[test]
fn the_test_server_satisfies_py_consul() {
    let server = ConsulServer::start();
    server.register(web("web-1", 8080, "passing", &[]));
    server.register(web("web-2", 8080, "passing", &[]));
    server.register(web("web-3", 8080, "critical", &[]));
    let lib = support::pip_install(
        "py-consul==1.8.0",
        "py-consul-1.8.0",
        "ENVRENDER_TEST_PY_CONSUL_DIR",
    );
    let (host, port) = host_port(&server)
        .split_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let out = std::process::Command::new("python3")
        .arg("-s")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/support/consul_fidelity.py"
        ))
        .args([&host, &port])
        .env("PYTHONPATH", lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-consul disagrees with the test server:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn the_test_server_speaks_consuls_http_rules() {
    let server = ConsulServer::start();
    server.put("a/b", "1");
    block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let url = format!("{}{path}", server.url);
            let http = http.clone();
            async move { http.get(url).send().await.unwrap() }
        };
        let r = get("/v1/kv/missing").await;
        assert_eq!(r.status(), 404);
        assert!(
            r.headers()["x-consul-index"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        assert_eq!(get("/v1/kv/a/b?stale&consistent").await.status(), 400);
        assert_eq!(
            get("/v1/kv/a/b?index=x").await.text().await.unwrap(),
            "Invalid index"
        );
        assert_eq!(
            get("/v1/kv/a/b?index=1&wait=soon")
                .await
                .text()
                .await
                .unwrap(),
            "Invalid wait time"
        );
        assert_eq!(
            get("/v1/kv/a/b?dc=elsewhere").await.text().await.unwrap(),
            "No path to datacenter"
        );
        assert_eq!(
            get("/v1/kv/").await.text().await.unwrap(),
            "Missing key name"
        );
        let raw = get("/v1/kv/a/b?raw").await;
        assert_eq!(raw.headers()["content-type"], "text/plain");
        assert_eq!(raw.text().await.unwrap(), "1");
        assert_eq!(
            get("/v1/health/service/nothing")
                .await
                .text()
                .await
                .unwrap(),
            "[]"
        );
    });
    // Deleting a key raises its prefix's index through the tombstone.
    let index = |path: &str| {
        block_on(async {
            reqwest::get(format!("{}{path}", server.url))
                .await
                .unwrap()
                .headers()["x-consul-index"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
    };
    server.put("p/x", "1");
    server.put("p/y", "1");
    let before = index("/v1/kv/p/?recurse");
    server.delete("p/y");
    assert!(index("/v1/kv/p/?recurse") > before);
}

#[test]
fn a_broken_consul_configuration_fails_only_what_uses_consul() {
    let d = Dir::new();
    d.write("t.hbs", "{{env \"ENVRENDER_TEST_X\"}}");
    let run = d
        .cmd(&["get", "env:ENVRENDER_TEST_X"])
        .env("ENVRENDER_TEST_X", "fine")
        .env("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/consul-token")
        .run()
        .success();
    assert_eq!(run.stdout, "fine\n");
    d.cmd(&["get", "consul:app/x"])
        .env("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/consul-token")
        .run()
        .code(1)
        .stderr_has(
            "consul: configure: cannot read the Consul token file /nonexistent/consul-token",
        );
}

#[test]
fn consul_over_mutual_tls() {
    let server = ConsulServer::start();
    server.put("app/x", "over-mtls");
    let front = support::mtls_front(&host_port(&server));
    let d = Dir::new();
    front.write_files(&d);
    let get = || {
        d.cmd(&["get", "--timeout", "2s", "consul:app/x"])
            .env("CONSUL_HTTP_ADDR", &front.url)
            .env("CONSUL_CACERT", "ca.pem")
    };
    get()
        .env("CONSUL_CLIENT_CERT", "client.pem")
        .env("CONSUL_CLIENT_KEY", "client-key.pem")
        .run()
        .success()
        .stdout_has("over-mtls");
    for (cert, key) in [
        (None, None),
        (Some("stranger.pem"), Some("stranger-key.pem")),
    ] {
        let mut cmd = get();
        if let (Some(cert), Some(key)) = (cert, key) {
            cmd = cmd
                .env("CONSUL_CLIENT_CERT", cert)
                .env("CONSUL_CLIENT_KEY", key);
        }
        cmd.run()
            .code(1)
            .stderr_has(&format!("cannot reach Consul at {}", front.url))
            .stderr_has("give one with CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY");
    }
    d.write(
        "conf/envrender.toml",
        "[consul]\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client-key.pem\"\n",
    );
    d.cmd(&["get", "--config", "conf/envrender.toml", "consul:app/x"])
        .env("CONSUL_HTTP_ADDR", &front.url)
        .run()
        .success()
        .stdout_has("over-mtls");
    d.write("half.toml", "[consul]\nclient_key = \"client-key.pem\"\n");
    d.cmd(&["get", "--config", "half.toml", "consul:app/x"])
        .env("CONSUL_HTTP_ADDR", &front.url)
        .run()
        .code(2)
        .stderr_has("half.toml")
        .stderr_has("consul.client_key is set but consul.client_cert is not");
    get()
        .env("CONSUL_CLIENT_KEY", "client-key.pem")
        .run()
        .code(1)
        .stderr_has("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY");
    // Files that are not there, or not PEM, or not a pair, are named; their
    // content is never printed.
    get()
        .env("CONSUL_CLIENT_CERT", "missing.pem")
        .env("CONSUL_CLIENT_KEY", "client-key.pem")
        .run()
        .code(1)
        .stderr_has("cannot read the Consul client certificate missing.pem");
    d.write("bad-key.pem", support::CANARY);
    let run = get()
        .env("CONSUL_CLIENT_CERT", "client.pem")
        .env("CONSUL_CLIENT_KEY", "bad-key.pem")
        .run()
        .code(1)
        .stderr_has("bad-key.pem");
    assert!(!run.stderr.contains(support::CANARY), "{}", run.stderr);
    get()
        .env("CONSUL_CLIENT_CERT", "client.pem")
        .env("CONSUL_CLIENT_KEY", "stranger-key.pem")
        .run()
        .code(1)
        .stderr_has("client certificate client.pem, key stranger-key.pem");
}

#[test]
fn consul_over_tls_with_a_private_ca() {
    let server = ConsulServer::start();
    server.put("app/x", "over-tls");
    let (url, ca) = support::tls_front(&host_port(&server));
    let d = Dir::new();
    let ca_file = d.write("consul-ca.pem", &ca);
    d.write("t.hbs", "{{consul \"app/x\"}}");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &url)
        .env("CONSUL_CACERT", ca_file.to_str().unwrap())
        .run()
        .success();
    assert_eq!(d.read("t.out"), "over-tls");
    // Without the CA the server is not trusted.
    d.cmd(&["render", "--timeout", "1s", "--template", "t.hbs:t2.out"])
        .env("CONSUL_HTTP_ADDR", &url)
        .run()
        .code(1)
        .stderr_has("cannot reach Consul at https://localhost:")
        .stderr_has("certificate");
    // The host:port form with CONSUL_HTTP_SSL, and the CA from the configuration.
    d.write("envrender.toml", "[consul]\nca_file = \"consul-ca.pem\"\n");
    d.cmd(&["render", "--template", "t.hbs:t3.out"])
        .env("CONSUL_HTTP_ADDR", url.trim_start_matches("https://"))
        .env("CONSUL_HTTP_SSL", "true")
        .run()
        .success();
    assert_eq!(d.read("t3.out"), "over-tls");

    // A system with no CA store: the private CA alone is trusted; without
    // it the error says what the image lacks; plain HTTP needs no CA store.
    std::fs::remove_file(d.join("envrender.toml")).unwrap();
    let empty = d.write("no-store/empty.pem", "");
    let no_store = |cmd: support::Cmd| {
        cmd.env("SSL_CERT_FILE", empty.to_str().unwrap())
            .env("SSL_CERT_DIR", d.join("no-store").to_str().unwrap())
    };
    no_store(d.cmd(&["render", "--template", "t.hbs:t4.out"]))
        .env("CONSUL_HTTP_ADDR", &url)
        .env("CONSUL_CACERT", ca_file.to_str().unwrap())
        .run()
        .success();
    assert_eq!(d.read("t4.out"), "over-tls");
    no_store(d.cmd(&["render", "--timeout", "1s", "--template", "t.hbs:t5.out"]))
        .env("CONSUL_HTTP_ADDR", &url)
        .run()
        .code(1)
        .stderr_has("no CA certificates were found on this system")
        .stderr_has("SSL_CERT_FILE");
    no_store(d.cmd(&["render", "--template", "t.hbs:t6.out"]))
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success();
    assert_eq!(d.read("t6.out"), "over-tls");
}

/// The requests `check` says a render makes are the requests it made: a
/// key absent from a recursive answer is read again on its own (for the
/// exact error: absent, or hidden by the token's ACL), and the plan counts
/// that read.
#[test]
fn check_counts_the_follow_up_read_of_a_key_absent_from_a_recursive_answer() {
    let server = ConsulServer::start();
    server.put("app/a", "1");
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{consul \"app/a\"}} {{consul \"app/b\" default=\"2\"}} {{consul \"app/c\" default=\"3\"}}\n",
    );
    let before = server.requests();
    let out = d
        .cmd(&["check", "--template", "t.hbs:t.out"])
        .env("CONSUL_HTTP_ADDR", &server.url)
        .run()
        .success();
    let made = server.requests() - before;
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("consul:") && l.contains('×'))
        .unwrap_or_else(|| panic!("no consul requests in\n{}", out.stdout));
    let planned: usize = line
        .split(", ")
        .filter_map(|call| {
            call.trim()
                .trim_start_matches("consul:")
                .trim()
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(planned, made, "{line}");
    assert_eq!(made, 3, "{line}");
}
