//! A Consul or Vault that misbehaves on purpose: redirects that would take
//! the token elsewhere or off https, answers too large to hold, lease
//! durations at the edges of u64, `Retry-After`, blocking queries answered
//! at once with an index that never moves forward, and addresses carrying
//! `user:password@`. Each test failed before envrender guarded against it.
//!
//! The servers here are hostile on purpose: small axum routers that answer
//! what an attacker would, in front of (or instead of) the protocol-faithful
//! test servers of `support`.

use crate::support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use support::consul::ConsulServer;
use support::vault::{Role, VaultServer};
use support::{Dir, KillOnDrop, serve_loopback};

/// Every request a server received, as `METHOD path`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn record(&self, req: &Request) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri().path()));
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A server that records every request and answers 200 `{}`: where a
/// redirect would take the token.
fn recorder() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .fallback(|State(seen): State<Seen>, req: Request| async move {
            seen.record(&req);
            (StatusCode::OK, "{}")
        })
        .with_state(seen.clone());
    (serve_loopback(app), seen)
}

/// A server that answers every request with a 307 to `to` + the same path.
fn redirector(to: String) -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .fallback(
            |State((seen, to)): State<(Seen, String)>, req: Request| async move {
                seen.record(&req);
                let location = format!("{to}{}", req.uri());
                (StatusCode::TEMPORARY_REDIRECT, [("location", location)], "")
            },
        )
        .with_state((seen.clone(), to));
    (serve_loopback(app), seen)
}

/// Runs `cmd` (a watch) for `secs` seconds, its stderr dropped, then
/// stops it; whether it was still running then.
fn run_for(cmd: support::Cmd, secs: u64) -> bool {
    let mut command = cmd.command;
    let mut child = KillOnDrop(command.stderr(std::process::Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_secs(secs));
    child.0.try_wait().unwrap().is_none()
}

fn template(d: &Dir, text: &str) -> String {
    d.write("t.hbs", text);
    "t.hbs:out.txt".to_string()
}

#[test]
fn consul_redirects_are_never_followed() {
    let d = Dir::new();
    let (elsewhere, seen_elsewhere) = recorder();
    let (consul, seen) = redirector(elsewhere.clone());
    let t = template(&d, "{{consul \"app/host\"}}");
    let run = d
        .cmd(&["render", "--template", &t, "--timeout", "5s"])
        .env("CONSUL_HTTP_ADDR", &consul)
        .env("CONSUL_HTTP_TOKEN", "consul-token-not-for-elsewhere")
        .run()
        .code(1)
        .stderr_has("not followed")
        .stderr_has(&format!("{elsewhere}/v1/kv/app/host"));
    assert!(seen.count() >= 1);
    assert_eq!(seen_elsewhere.count(), 0, "{}", run.stderr);
    assert!(!d.join("out.txt").exists());
    // Not retried until the deadline: a redirect is not a transient failure.
    assert_eq!(seen.count(), 1, "{}", run.stderr);
}

#[test]
fn vault_redirects_stay_on_the_configured_origin_unless_allowed() {
    let vault = VaultServer::start();
    vault.kv2_put("secret/", "app", json!({"password": "from-the-real-vault"}));
    let (front, seen) = redirector(vault.url.trim_end_matches('/').to_string());
    let d = Dir::new();
    let t = template(&d, "{{vault \"secret/app#password\"}}");

    // A standby-style redirect to another host:port is refused, naming the
    // Location and the setting; the token never reaches it.
    let before = vault.count("requests");
    d.cmd(&["render", "--template", &t, "--timeout", "5s"])
        .env("VAULT_ADDR", &front)
        .env("VAULT_TOKEN", &vault.root_token)
        .run()
        .code(1)
        .stderr_has("another origin")
        .stderr_has(vault.url.trim_end_matches('/'))
        .stderr_has("redirect_origins");
    assert_eq!(
        vault.count("requests"),
        before,
        "the token reached the other origin"
    );
    assert!(seen.count() >= 1);

    // An AppRole login is redirected the same way: the secret_id stays.
    let role_id = vault.approle("app", Role::default());
    let secret_id = vault.secret_id("app", 5);
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "login.toml",
        &format!(
            "[vault]\naddress = \"{front}\"\nauth = {{ method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }}\n"
        ),
    );
    d.cmd(&["render", "--config", "login.toml", "--template", &t])
        .run()
        .code(1)
        .stderr_has("POST /v1/auth/approle/login")
        .stderr_has("redirect_origins");
    assert_eq!(
        vault.count("logins"),
        0,
        "the secret_id reached the other origin"
    );

    // Listed in redirect_origins, the other node gets the request.
    d.write(
        "allowed.toml",
        &format!(
            "[vault]\naddress = \"{front}\"\nredirect_origins = [\"{}\"]\n",
            vault.url.trim_end_matches('/')
        ),
    );
    d.cmd(&["render", "--config", "allowed.toml", "--template", &t])
        .env("VAULT_TOKEN", &vault.root_token)
        .run()
        .success();
    assert_eq!(d.read("out.txt"), "from-the-real-vault");
}

#[test]
fn vault_never_follows_a_redirect_off_https() {
    let (plain, seen_plain) = recorder();
    let (redirect, _) = redirector(plain.clone());
    let (https, ca) = support::tls_front(redirect.trim_start_matches("http://"));
    let d = Dir::new();
    d.write("ca.pem", &ca);
    // Even an origin listed as allowed is not reached over plain HTTP from
    // an https address.
    d.write(
        "envrender.toml",
        &format!(
            "[vault]\naddress = \"{https}\"\nca_file = \"ca.pem\"\nredirect_origins = [\"{plain}\"]\n"
        ),
    );
    let t = template(&d, "{{vault \"secret/app#password\"}}");
    d.cmd(&["render", "--template", &t, "--timeout", "5s"])
        .env("VAULT_TOKEN", "vault-token-not-for-plain-http")
        .run()
        .code(1)
        .stderr_has("not https");
    assert_eq!(seen_plain.count(), 0);
}

/// A server whose every answer is `size` bytes of JSON-looking text, sent
/// in 64 KiB chunks without a length (`chunked`), or with its length.
fn huge(size: usize, announce: bool) -> String {
    let app = Router::new().fallback(move || async move {
        let chunk = vec![b' '; 64 << 10];
        let n = size / chunk.len();
        let stream =
            futures_util::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
        let mut response = Response::new(Body::from_stream(stream));
        response
            .headers_mut()
            .insert("x-consul-index", "5".parse().unwrap());
        if announce {
            response
                .headers_mut()
                .insert("content-length", (n * (64 << 10)).into());
        }
        response
    });
    serve_loopback(app)
}

/// Runs envrender to the end; its exit code and peak resident memory (kB).
fn run_measured(cmd: support::Cmd) -> (i32, String, u64) {
    let mut command = cmd.command;
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    std::mem::forget(child);
    (libc::WEXITSTATUS(status), stderr, usage.ru_maxrss as u64)
}

/// Renders `template` with `env`; asserts exit 1 with an error naming
/// `limit` and `setting`, and a peak RSS under `peak_kb`.
fn refused_within(
    d: &Dir,
    template: &str,
    env: &[(&str, &str)],
    limit: &str,
    setting: &str,
    peak_kb: u64,
) {
    let mut cmd = d.cmd(&["render", "--template", template, "--timeout", "5s"]);
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    let (code, stderr, peak) = run_measured(cmd);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("larger than the limit of {limit}")),
        "{stderr}"
    );
    assert!(stderr.contains(setting), "{stderr}");
    println!("{template}: refused at {limit}, peak RSS {peak} kB");
    assert!(peak < peak_kb, "peak RSS {peak} kB\n{stderr}");
}

#[test]
fn answers_are_read_up_to_a_limit() {
    let d = Dir::new();
    d.write("t.hbs", "{{consul \"app/host\"}}");
    d.write("v.hbs", "{{vault \"secret/app#x\"}}");
    // 100 MB streamed without a length: Consul's default limit (64 MiB)
    // stops it, and memory stays near the limit (it reached 469 MB).
    let consul = huge(100 << 20, false);
    let env = [("CONSUL_HTTP_ADDR", consul.as_str())];
    refused_within(
        &d,
        "t.hbs:c.txt",
        &env,
        "64 MiB",
        "[consul] max_answer_size",
        200_000,
    );
    // Vault: 100 MB with its length announced is refused before reading.
    let vault = huge(100 << 20, true);
    let env = [("VAULT_ADDR", vault.as_str()), ("VAULT_TOKEN", "t")];
    refused_within(
        &d,
        "v.hbs:v.txt",
        &env,
        "16 MiB",
        "[vault] max_answer_size",
        100_000,
    );

    // The limit is a setting: a smaller one stops a smaller answer.
    let small = huge(4 << 20, false);
    d.write(
        "envrender.toml",
        &format!("[consul]\naddress = \"{small}\"\nmax_answer_size = \"1MiB\"\n"),
    );
    d.cmd(&["render", "--template", "t.hbs:c.txt", "--timeout", "5s"])
        .run()
        .code(1)
        .stderr_has("larger than the limit of 1 MiB");
    assert!(!d.join("c.txt").exists() && !d.join("v.txt").exists());
}

/// A hostile Vault: a token that looks up fine, a `database` mount, and
/// dynamic credentials whose lease lasts `lease_duration` (a JSON number,
/// whatever it is). Counts issues.
#[derive(Clone)]
struct LeaseVault {
    lease_duration: Value,
    renewable: bool,
    issued: Arc<AtomicUsize>,
    renewed: Arc<AtomicUsize>,
    logins: Arc<AtomicUsize>,
}

async fn lease_vault(State(v): State<LeaseVault>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let body = match path.as_str() {
        // An AppRole login grants a token of 1 s, renewals of 0 s.
        "/v1/auth/approle/login" => {
            let n = v.logins.fetch_add(1, Ordering::SeqCst);
            json!({"auth": {"client_token": format!("t{n}"), "accessor": format!("a{n}"),
                "policies": ["default"], "lease_duration": 1, "renewable": true}})
        }
        "/v1/auth/token/renew-self" => json!({"auth": {"client_token": "t", "accessor": "a",
            "policies": ["default"], "lease_duration": 0, "renewable": true}}),
        "/v1/auth/token/lookup-self" => json!({"data": {
            "accessor": "acc", "policies": ["default"], "ttl": 0, "creation_ttl": 0,
            "renewable": false}}),
        p if p.starts_with("/v1/sys/internal/ui/mounts/") => json!({"data": {
            "type": "database", "path": "database/", "options": null}}),
        "/v1/database/creds/app" => {
            let n = v.issued.fetch_add(1, Ordering::SeqCst);
            json!({"lease_id": format!("database/creds/app/{n}"),
                "lease_duration": v.lease_duration, "renewable": v.renewable,
                "data": {"username": format!("user-{n}"), "password": "pw"}})
        }
        "/v1/sys/leases/renew" => {
            v.renewed.fetch_add(1, Ordering::SeqCst);
            json!({"lease_id": "x", "lease_duration": v.lease_duration, "renewable": true})
        }
        _ => return (StatusCode::NOT_FOUND, "{\"errors\":[]}").into_response(),
    };
    (StatusCode::OK, body.to_string()).into_response()
}

/// The server's address, and its counts of credentials issued and renewals.
fn start_lease_vault(
    lease_duration: Value,
    renewable: bool,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (url, v) = lease_vault_state(lease_duration, renewable);
    (url, v.issued, v.renewed)
}

fn lease_vault_state(lease_duration: Value, renewable: bool) -> (String, LeaseVault) {
    let v = LeaseVault {
        lease_duration,
        renewable,
        issued: Arc::default(),
        renewed: Arc::default(),
        logins: Arc::default(),
    };
    let app = Router::new().fallback(lease_vault).with_state(v.clone());
    (serve_loopback(app), v)
}

#[test]
fn tokens_of_a_second_do_not_make_a_login_loop() {
    // Each login grants 1 s and each renewal 0 s: before, envrender logged
    // in about twice a second and re-issued what it held after each login.
    let (vault, v) = lease_vault_state(json!(3600), true);
    let d = Dir::new();
    d.write("t.hbs", "{{vault \"database/creds/app#username\"}}");
    d.write(
        "envrender.toml",
        &format!(
            "[vault]\naddress = \"{vault}\"\nauth = {{ method = \"approle\", role_id = \"r\" }}\n"
        ),
    );
    run_for(d.cmd(&["watch", "--template", "t.hbs:out.txt"]), 8);
    let logins = v.logins.load(Ordering::SeqCst);
    let issued = v.issued.load(Ordering::SeqCst);
    println!("tokens of 1 s, 8 s: {logins} logins, {issued} credentials issued");
    assert!(
        (1..=10).contains(&logins) && issued <= 10,
        "{logins} logins and {issued} credentials in 8 s"
    );
    assert!(!d.read("out.txt").is_empty());
}

#[test]
fn absurd_lease_durations_neither_abort_nor_spin() {
    let d = Dir::new();
    let t = template(&d, "{{vault \"database/creds/app#username\"}}");
    // u64::MAX and 2^63 seconds: rendered, no abort.
    for lease in [
        json!(18446744073709551615u64),
        json!(9223372036854775808u64),
        json!(1e300),
    ] {
        let (vault, _, _) = start_lease_vault(lease.clone(), true);
        d.cmd(&["render", "--template", &t])
            .env("VAULT_ADDR", &vault)
            .env("VAULT_TOKEN", "t")
            .run()
            .success();
        assert_eq!(d.read("out.txt"), "user-0", "{lease}");
    }

    // A watch under u64::MAX leases keeps running (it aborted).
    let (vault, _, _) = start_lease_vault(json!(18446744073709551615u64), true);
    let running = run_for(
        d.cmd(&["watch", "--template", &t, "--listen", "127.0.0.1:0"])
            .env("VAULT_ADDR", &vault)
            .env("VAULT_TOKEN", "t"),
        2,
    );
    assert!(running, "watch exited");

    // Leases of 0 s: a handful of re-issues and reloads in 8 s, not
    // thousands (2,831 in 10 s before); renewable ones, a handful of
    // renewals.
    for renewable in [false, true] {
        let (issues, renewals, reloads) = zero_ttl_watch(&d, &t, renewable);
        println!(
            "leases of 0 s, renewable {renewable}, 8 s: {issues} issued, {renewals} renewals, {reloads} reloads"
        );
        assert!(
            (1..=10).contains(&issues) && renewals <= 10 && reloads <= 10,
            "renewable {renewable}: {issues} credentials issued, {renewals} renewals, {reloads} reloads in 8 s"
        );
        if !renewable {
            assert!(issues >= 2, "a lease of 0 s was never re-issued");
        }
    }
}

/// A watch of 8 s against leases of 0 s: credentials issued, renewals,
/// reloads.
fn zero_ttl_watch(d: &Dir, t: &str, renewable: bool) -> (usize, usize, usize) {
    let (vault, issued, renewed) = start_lease_vault(json!(0), renewable);
    d.write("reloads", "");
    let watch = d
        .cmd(&[
            "watch",
            "--template",
            t,
            "--exec",
            "sh -c 'echo reload >> reloads'",
            "--wait",
            "0s",
        ])
        .env("VAULT_ADDR", &vault)
        .env("VAULT_TOKEN", "t");
    run_for(watch, 8);
    (
        issued.load(Ordering::SeqCst),
        renewed.load(Ordering::SeqCst),
        d.read("reloads").lines().count(),
    )
}

#[test]
fn retry_after_is_honoured_within_the_deadline() {
    let vault = VaultServer::start();
    vault.kv2_put("secret/", "app", json!({"password": "p"}));
    let d = Dir::new();
    let t = template(&d, "{{vault \"secret/app#password\"}}");
    vault.fail(1, 503, Some("2"), "busy");
    let start = Instant::now();
    d.cmd(&["render", "--template", &t, "--timeout", "20s"])
        .env("VAULT_ADDR", &vault.url)
        .env("VAULT_TOKEN", &vault.root_token)
        .run()
        .success();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "retried after {took:?}"
    );
    assert_eq!(d.read("out.txt"), "p");

    // A Retry-After longer than the time left ends the render at once,
    // instead of retrying until the deadline.
    vault.fail(100, 429, Some("60"), "slow down");
    let start = Instant::now();
    d.cmd(&["render", "--template", &t, "--timeout", "30s"])
        .env("VAULT_ADDR", &vault.url)
        .env("VAULT_TOKEN", &vault.root_token)
        .run()
        .code(1)
        .stderr_has("HTTP 429");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );

    // Nor is a Retry-After cut short to fit the deadline: 2 s asked with
    // 2.05 s left leaves no time for that attempt, so the render ends
    // instead of asking again after 1.95 s.
    let fresh = VaultServer::start();
    fresh.kv2_put("secret/", "app", json!({"password": "p"}));
    fresh.fail(1, 503, Some("2"), "busy");
    d.cmd(&["render", "--template", &t, "--timeout", "2050ms"])
        .env("VAULT_ADDR", &fresh.url)
        .env("VAULT_TOKEN", &fresh.root_token)
        .run()
        .code(1)
        .stderr_has("HTTP 503");
}

#[test]
fn consul_does_not_retry_an_untrusted_certificate() {
    let consul = ConsulServer::start();
    consul.put("app/host", "db");
    let (https, _ca) = support::tls_front(consul.url.trim_start_matches("http://"));
    let d = Dir::new();
    let t = template(&d, "{{consul \"app/host\"}}");
    let start = Instant::now();
    d.cmd(&["render", "--template", &t, "--timeout", "30s"])
        .env("CONSUL_HTTP_ADDR", &https)
        .run()
        .code(1)
        .stderr_has("CONSUL_CACERT");
    // It gave up at once instead of retrying for 30 s.
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

/// A Consul whose blocking queries come back at once with `index`.
fn instant_consul(index: &'static str) -> (String, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .fallback(
            |State((count, index)): State<(Arc<AtomicUsize>, &'static str)>,
             headers: HeaderMap| async move {
                let _ = headers;
                let n = count.fetch_add(1, Ordering::SeqCst);
                let index = match index {
                    // Going backwards every time.
                    "backwards" => (1_000_000 - n).to_string(),
                    other => other.to_string(),
                };
                (
                    StatusCode::OK,
                    [("x-consul-index", index)],
                    r#"[{"Key":"app/host","Value":"ZGI=","ModifyIndex":1,"CreateIndex":1,"Flags":0,"LockIndex":0}]"#,
                )
            },
        )
        .with_state((count.clone(), index));
    (serve_loopback(app), count)
}

#[test]
fn blocking_queries_answered_at_once_keep_to_the_query_rate() {
    let d = Dir::new();
    let t = template(&d, "{{consul \"app/host\"}}");
    let mut counts = BTreeMap::new();
    for index in ["0", "backwards", "not-a-number"] {
        let (consul, count) = instant_consul(index);
        run_for(
            d.cmd(&["watch", "--template", &t])
                .env("CONSUL_HTTP_ADDR", &consul),
            3,
        );
        counts.insert(index, count.load(Ordering::SeqCst));
    }
    println!("queries in 3 s: {counts:?}");
    // A burst of 2, then at most 10 a second: about 32 in 3 s.
    for (index, n) in &counts {
        assert!(*n <= 45, "index {index}: {n} queries in 3 s ({counts:?})");
        assert!(
            *n >= 5,
            "index {index}: the watch stopped asking ({counts:?})"
        );
    }
}

#[test]
fn credentials_in_addresses_are_never_printed() {
    let d = Dir::new();
    let t = template(&d, "{{consul \"app/host\"}}{{vault \"secret/app#x\"}}");
    let run = d
        .cmd(&["render", "--template", &t, "--timeout", "2s"])
        .env(
            "CONSUL_HTTP_ADDR",
            "http://consul-user:consul-pass-1@127.0.0.1:1",
        )
        .env("VAULT_ADDR", "http://vault-user:vault-pass-2@127.0.0.1:1")
        .env("VAULT_TOKEN", "t")
        .run()
        .code(1)
        .stderr_has("***@127.0.0.1:1");
    for secret in ["consul-pass-1", "vault-pass-2", "consul-user", "vault-user"] {
        assert!(!run.stderr.contains(secret), "{secret} in\n{}", run.stderr);
    }
    // check takes its deadline from the configuration.
    d.write("envrender.toml", "[render]\ntimeout = \"2s\"\n");
    let check = d
        .cmd(&["check", "--template", &t])
        .env(
            "CONSUL_HTTP_ADDR",
            "http://consul-user:consul-pass-1@127.0.0.1:1",
        )
        .env("VAULT_ADDR", "http://vault-user:vault-pass-2@127.0.0.1:1")
        .env("VAULT_TOKEN", "t")
        .run();
    for secret in ["consul-pass-1", "vault-pass-2"] {
        assert!(
            !check.stdout.contains(secret) && !check.stderr.contains(secret),
            "{secret} in check:\n{}\n{}",
            check.stdout,
            check.stderr
        );
    }
    // A password holding `#`, `/` or `@` is hidden whole, parsed or not.
    for address in [
        "u:pa#ss-3@127.0.0.1:1",
        "http://u:p@127.0.0.1/w0rd-4@127.0.0.1:1",
    ] {
        let run = d
            .cmd(&["render", "--template", &t, "--timeout", "1s"])
            .env("CONSUL_HTTP_ADDR", address)
            .env("VAULT_ADDR", "http://127.0.0.1:1")
            .env("VAULT_TOKEN", "t")
            .run();
        assert!(run.code != 0);
        for secret in ["ss-3", "w0rd-4"] {
            assert!(!run.stderr.contains(secret), "{secret} in\n{}", run.stderr);
        }
    }
    // A malformed address is echoed without its credentials too.
    let bad = d
        .cmd(&["render", "--template", &t])
        .env("VAULT_ADDR", "ftp://vault-user:vault-pass-2@127.0.0.1:1")
        .env("VAULT_TOKEN", "t")
        .run();
    assert!(bad.code != 0);
    assert!(!bad.stderr.contains("vault-pass-2"), "{}", bad.stderr);
}
