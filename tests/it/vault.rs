//! The Vault test server: its fidelity, checked with hvac, and the rules of
//! Vault's API it reproduces (envelopes, token expiry, lease arithmetic,
//! KV v2 deletions, mount detection, PKI).

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::aws::block_on;
use support::vault::{Role, VaultServer};

/// One request; the status and the JSON body (null when empty).
fn call(
    server: &VaultServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    block_on(async {
        let client = reqwest::Client::new();
        let mut r = client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}/v1/{path}", server.url),
        );
        if let Some(t) = token {
            r = r.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        let response = r.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap()
            },
        )
    })
}

fn app_server() -> (VaultServer, String, String) {
    let server = VaultServer::start();
    server.policy(
        "app",
        &[
            ("database/creds/app", &["read"]),
            ("secret/data/app/*", &["read"]),
        ],
    );
    server.database_role("app", 3600, 7200);
    let role_id = server.approle(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 20_000,
            max_ttl: 86_400,
            ..Role::default()
        },
    );
    let secret_id = server.secret_id("app", 0);
    (server, role_id, secret_id)
}

#[test]
fn the_test_server_satisfies_hvac() {
    let (server, role_id, secret_id) = app_server();
    let lib = support::pip_install("hvac==2.4.0", "hvac-2.4.0", "ENVRENDER_TEST_HVAC_DIR");
    let out = std::process::Command::new("python3")
        .arg("-s")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/support/vault_fidelity.py"
        ))
        .args([&server.url, &server.root_token, &role_id, &secret_id])
        .env("PYTHONPATH", lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hvac disagrees with the test server:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(server.count("logins"), 1);
    assert_eq!(server.count("leases_issued"), 1);
    assert_eq!(server.count("leases_renewed"), 1);
}

#[test]
fn a_start_makes_one_login_one_mount_lookup_and_one_read_per_path() {
    let (server, role_id, secret_id) = app_server();
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    let mut template = String::new();
    for i in 0..20 {
        server.kv2_put(
            "secret/",
            &format!("app/s{i}"),
            json!({"v": format!("{i}")}),
        );
        template.push_str(&format!("{{{{vault \"secret/app/s{i}#v\"}}}},"));
    }
    d.write("t.hbs", &template);
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    let before = server.count("requests");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .success();
    let expected: Vec<String> = (0..20).map(|i| format!("{i},")).collect();
    assert_eq!(d.read("t.out"), expected.concat());
    // The twenty reads start together; they wait for one login and one
    // lookup of the mount (KV v1 or v2) instead of each making its own.
    assert_eq!(server.count("logins"), 1);
    assert_eq!(server.count("requests") - before, 1 + 1 + 20);
}

#[test]
fn declared_kv_mounts_are_read_without_a_lookup() {
    let server = VaultServer::start();
    server.policy(
        "app",
        &[("secret/data/app/*", &["read"]), ("kv/app/*", &["read"])],
    );
    let token = server.token(&["app"], 600, 3600);
    server.kv2_put("secret/", "app/db", json!({"password": "two"}));
    server.kv1_put("kv/", "app/legacy", json!({"password": "one"}));
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{vault \"secret/app/db#password\"}} {{vault \"kv/app/legacy#password\"}}",
    );
    let render = |config: &str| {
        d.write("envrender.toml", config);
        let _ = std::fs::remove_file(d.join("t.out"));
        with_token(
            &d,
            &server,
            &token,
            &["render", "--template", "t.hbs:t.out"],
        )
        .run()
    };
    let requests = |config: &str| {
        let before = server.count("requests");
        render(config).success();
        assert_eq!(d.read("t.out"), "two one");
        server.count("requests") - before
    };
    // The token's lookup-self, a lookup of each of the two mounts, two reads;
    // `check` plans the lookups.
    assert_eq!(requests(""), 1 + 2 + 2);
    with_token(&d, &server, &token, &["check", "--template", "t.hbs:t.out"])
        .run()
        .success()
        .stdout_has("sys/internal/ui/mounts");
    // Declared: no mount lookup.
    assert_eq!(
        requests("[vault]\nkv_mounts = { secret = 2, \"kv/\" = 1 }\n"),
        1 + 2
    );
    // `check` plans no lookup for a declared mount.
    let plan = with_token(&d, &server, &token, &["check", "--template", "t.hbs:t.out"])
        .run()
        .success()
        .stdout_has("secret/app/db");
    assert!(
        !plan.stdout.contains("sys/internal/ui/mounts"),
        "{}",
        plan.stdout
    );

    // Declared with the wrong version: Vault's refusal (a 403 here: the
    // policy grants the KV v2 data path) comes with the fix.
    d.write("t.hbs", "{{vault \"secret/app/db#password\"}}");
    render("[vault]\nkv_mounts = { secret = 1 }\n")
        .code(1)
        .stderr_has("kv_mounts declares secret/ as KV v1");

    // A version that does not exist is a configuration error, before any
    // request.
    let before = server.count("requests");
    render("[vault]\nkv_mounts = { secret = 3 }\n")
        .code(2)
        .stderr_has("envrender.toml:2")
        .stderr_has("KV version 3 does not exist");
    assert_eq!(server.count("requests"), before);
}

#[test]
fn envelopes_and_errors_are_vaults() {
    let server = VaultServer::start();
    let root = server.root_token.clone();
    let (status, body) = call(&server, "GET", "secret/data/missing", Some(&root), None);
    assert_eq!((status, body), (404, json!({"errors": []})));
    let (status, body) = call(&server, "GET", "secret/data/x", None, None);
    assert_eq!(
        (status, body),
        (403, json!({"errors": ["permission denied"]}))
    );
    let (status, body) = call(&server, "GET", "nomount/x", Some(&root), None);
    assert_eq!(status, 404);
    assert_eq!(
        body["errors"][0],
        "no handler for route \"nomount/x\". route entry not found."
    );
    assert_eq!(
        call(&server, "GET", "kv/x?list=maybe", Some(&root), None).0,
        400
    );
    assert_eq!(call(&server, "PATCH", "kv/x", Some(&root), None).0, 405);
    let (status, body) = call(
        &server,
        "POST",
        "kv/x",
        Some(&root),
        Some(json!({"k": "v"})),
    );
    assert_eq!((status, body), (204, Value::Null));
    let (status, body) = call(&server, "GET", "kv/x", Some(&root), None);
    assert_eq!(status, 200);
    assert_eq!(body["lease_duration"], 2_764_800);
    assert_eq!(body["lease_id"], "");
    assert_eq!(
        (
            body["wrap_info"].clone(),
            body["warnings"].clone(),
            body["auth"].clone()
        ),
        (Value::Null, Value::Null, Value::Null)
    );
    // LIST and GET ?list=true are the same.
    assert_eq!(
        call(&server, "LIST", "kv/", Some(&root), None).1["data"]["keys"],
        json!(["x"])
    );
    assert_eq!(
        call(&server, "GET", "kv?list=true", Some(&root), None).1["data"]["keys"],
        json!(["x"])
    );
    server.seal(true);
    assert_eq!(
        call(&server, "GET", "kv/x", Some(&root), None),
        (503, json!({"errors": ["Vault is sealed"]}))
    );
    server.seal(false);
    server.fail(
        1,
        429,
        Some("2"),
        "request path \"kv/x\": rate limit quota exceeded",
    );
    assert_eq!(call(&server, "GET", "kv/x", Some(&root), None).0, 429);
}

#[test]
fn kv2_deletions_versions_and_the_wrong_path() {
    let server = VaultServer::start();
    let root = server.root_token.clone();
    server.kv2_put("secret/", "app", json!({"p": "1"}));
    server.kv2_put("secret/", "app", json!({"p": "2"}));
    assert_eq!(
        call(
            &server,
            "GET",
            "secret/data/app?version=1",
            Some(&root),
            None
        )
        .1["data"]["data"],
        json!({"p": "1"})
    );
    assert_eq!(
        call(
            &server,
            "GET",
            "secret/data/app?version=9",
            Some(&root),
            None
        ),
        (404, json!({"errors": []}))
    );
    assert_eq!(
        call(&server, "DELETE", "secret/data/app", Some(&root), None).0,
        204
    );
    let (status, body) = call(&server, "GET", "secret/data/app", Some(&root), None);
    assert_eq!(status, 404);
    assert!(body.get("errors").is_none());
    assert_eq!(body["data"]["data"], Value::Null);
    assert_ne!(body["data"]["metadata"]["deletion_time"], "");
    let (status, body) = call(&server, "GET", "secret/app", Some(&root), None);
    assert_eq!(status, 404);
    assert!(
        body["warnings"][0]
            .as_str()
            .unwrap()
            .contains("Invalid path for a versioned K/V secrets engine")
    );
}

#[test]
fn mount_detection_answers_like_vault() {
    let server = VaultServer::start();
    server.policy("reader", &[("secret/data/app/*", &["read"])]);
    let token = server.token(&["reader"], 600, 3600);
    let (status, body) = call(
        &server,
        "GET",
        "sys/internal/ui/mounts/secret/app/db",
        Some(&token),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(body["data"]["type"], "kv");
    assert_eq!(body["data"]["options"]["version"], "2");
    assert_eq!(body["data"]["path"], "secret/");
    let (status, body) = call(
        &server,
        "GET",
        "sys/internal/ui/mounts/kv/x",
        Some(&token),
        None,
    );
    assert_eq!(status, 403);
    assert_eq!(
        body["errors"][0],
        "preflight capability check returned 403, please ensure client's policies grant access to path \"kv/x/\""
    );
    let root = server.root_token.clone();
    assert_eq!(
        call(
            &server,
            "GET",
            "sys/internal/ui/mounts/kv/x",
            Some(&root),
            None
        )
        .1["data"]["options"]["version"],
        "1"
    );
}

#[test]
fn tokens_expire_and_renewals_are_capped_at_the_max_ttl() {
    let server = VaultServer::start();
    server.freeze();
    let token = server.token(&[], 600, 900);
    server.advance(Duration::from_secs(100));
    let (status, body) = call(
        &server,
        "POST",
        "auth/token/renew-self",
        Some(&token),
        Some(json!({"increment": "1h"})),
    );
    assert_eq!(status, 200);
    assert_eq!(body["auth"]["lease_duration"], 800);
    assert_eq!(
        body["warnings"][0],
        "TTL of \"1h\" exceeded the effective max_ttl of \"13m20s\"; TTL value is capped accordingly"
    );
    // It works through its last second, then stops.
    server.advance(Duration::from_secs(800));
    assert_eq!(
        call(&server, "GET", "auth/token/lookup-self", Some(&token), None).0,
        200
    );
    server.advance(Duration::from_secs(1));
    let (status, body) = call(&server, "GET", "auth/token/lookup-self", Some(&token), None);
    assert_eq!(status, 403);
    let text = body["errors"][0].as_str().unwrap();
    assert!(
        text.contains("permission denied") && text.contains("invalid token"),
        "{text}"
    );
}

#[test]
fn leases_renew_until_their_max_and_die_with_their_token() {
    let (server, role_id, secret_id) = app_server();
    server.freeze();
    let (_, login) = call(
        &server,
        "POST",
        "auth/approle/login",
        None,
        Some(json!({"role_id": role_id, "secret_id": secret_id})),
    );
    let token = login["auth"]["client_token"].as_str().unwrap().to_string();
    let (_, creds) = call(&server, "GET", "database/creds/app", Some(&token), None);
    let lease = creds["lease_id"].as_str().unwrap().to_string();
    let user = creds["data"]["username"].as_str().unwrap().to_string();
    assert_eq!(server.valid_credentials(), [user]);
    server.advance(Duration::from_secs(2000));
    let (_, renewed) = call(
        &server,
        "PUT",
        "sys/leases/renew",
        Some(&token),
        Some(json!({"lease_id": lease, "increment": 3600})),
    );
    assert_eq!(
        (
            renewed["lease_duration"].clone(),
            renewed["warnings"].clone()
        ),
        (json!(3600), Value::Null)
    );
    // Near the max TTL (7200 s from issue) the renewal is capped, with Vault's warning.
    server.advance(Duration::from_secs(3000));
    let (_, renewed) = call(
        &server,
        "PUT",
        "sys/leases/renew",
        Some(&token),
        Some(json!({"lease_id": lease, "increment": 3600})),
    );
    assert_eq!(renewed["lease_duration"], 2200);
    assert_eq!(
        renewed["warnings"][0],
        "TTL of \"1h\" exceeded the effective max_ttl of \"36m40s\"; TTL value is capped accordingly"
    );
    assert_eq!(renewed["data"], Value::Null);
    server.advance(Duration::from_secs(2300));
    let (status, body) = call(
        &server,
        "PUT",
        "sys/leases/renew",
        Some(&token),
        Some(json!({"lease_id": lease})),
    );
    assert_eq!(
        (status, body),
        (400, json!({"errors": ["lease not found"]}))
    );
    assert!(server.valid_credentials().is_empty());
    // A second credential dies with the token that read it.
    let (_, creds) = call(&server, "GET", "database/creds/app", Some(&token), None);
    let lease = creds["lease_id"].as_str().unwrap().to_string();
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/token/revoke-self",
            Some(&token),
            None
        )
        .0,
        204
    );
    let root = server.root_token.clone();
    assert_eq!(
        call(
            &server,
            "PUT",
            "sys/leases/lookup",
            Some(&root),
            Some(json!({"lease_id": lease}))
        ),
        (400, json!({"errors": ["invalid lease"]}))
    );
    assert!(server.valid_credentials().is_empty());
    assert_eq!(server.count("leases_revoked"), 2);
}

#[test]
fn logins_fail_the_way_vault_says() {
    let (server, role_id, _) = app_server();
    let once = server.secret_id("app", 1);
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": once}))
        )
        .0,
        200
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": once}))
        ),
        (400, json!({"errors": ["invalid role or secret ID"]}))
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/approle/login",
            None,
            Some(json!({"secret_id": once}))
        ),
        (400, json!({"errors": ["missing role_id"]}))
    );
    server.kubernetes_role(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 600,
            jwts: vec!["jwt-ok".into()],
            ..Role::default()
        },
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/kubernetes/login",
            None,
            Some(json!({"role": "app", "jwt": "jwt-ok"}))
        )
        .0,
        200
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/kubernetes/login",
            None,
            Some(json!({"role": "app", "jwt": "forged"}))
        )
        .0,
        403
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "auth/kubernetes/login",
            None,
            Some(json!({"role": "nope", "jwt": "jwt-ok"}))
        ),
        (400, json!({"errors": ["invalid role name \"nope\""]}))
    );
}

#[test]
fn pki_issues_real_certificates() {
    let server = VaultServer::start();
    server.pki_role("web", 3600, false);
    let root = server.root_token.clone();
    let (status, body) = call(
        &server,
        "POST",
        "pki/issue/web",
        Some(&root),
        Some(json!({"common_name": "web.internal", "ttl": "10m"})),
    );
    assert_eq!(status, 200);
    assert!(
        body["data"]["certificate"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        body["data"]["private_key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert_eq!(body["data"]["issuing_ca"], server.ca_pem());
    assert!(body["data"].get("ca_chain").is_none());
    let expiration = body["data"]["expiration"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (595..=605).contains(&(expiration - now)),
        "{}",
        expiration - now
    );
    assert_eq!(
        (body["lease_id"].as_str(), body["renewable"].as_bool()),
        (Some(""), Some(false))
    );
}

// ---- the vault: backend, through the binary and the library ------------

use envrender::backend::vault::{AuthConfig, RoleId, Vault, VaultConfig};
use envrender::backend::{Backend, Watching};
use envrender::environment::MapEnv;
use support::{CANARY, Dir};

/// A project dir pointed at `server`, with `token` as VAULT_TOKEN.
fn with_token(d: &Dir, server: &VaultServer, token: &str, args: &[&str]) -> support::Cmd {
    d.cmd(args)
        .env("VAULT_ADDR", &server.url)
        .env("VAULT_TOKEN", token)
}

fn source(r: &str) -> envrender::reference::Source {
    envrender::reference::parse(r).unwrap().source
}

#[test]
fn kv_v1_and_v2_by_logical_path_with_versions_and_fields() {
    let server = VaultServer::start();
    server.policy(
        "app",
        &[
            ("secret/data/app/*", &["read"]),
            ("secret/metadata/app/*", &["list"]),
            ("kv/legacy", &["read"]),
        ],
    );
    let token = server.token(&["app"], 3600, 7200);
    server.kv2_put(
        "secret/",
        "app/db",
        json!({"password": "old", "user": "u1"}),
    );
    server.kv2_put(
        "secret/",
        "app/db",
        json!({"password": CANARY, "user": "u2", "nested": {"port": 5432}}),
    );
    server.kv2_put("secret/", "app/api", json!({"key": "k"}));
    server.kv1_put("kv/", "legacy", json!({"user": "legacy-user", "ttl": "1h"}));
    let d = Dir::new();
    d.write(
        "app.conf.hbs",
        "user={{vault \"secret/app/db#user\"}}\nold={{vault \"secret/app/db@1#password\"}}\nport={{vault \"secret/app/db#nested.port\"}}\nlegacy={{vault \"kv/legacy#user\"}}\nsecret={{vault \"secret/app/db#password\"}}\n{{#each (secret \"vault:secret/app/\")}}{{@key}} {{/each}}\n",
    );
    with_token(
        &d,
        &server,
        &token,
        &["render", "--template", "app.conf.hbs:out/app.conf"],
    )
    .run()
    .success()
    .no_canary();
    assert_eq!(
        d.read("out/app.conf"),
        format!("user=u2\nold=old\nport=5432\nlegacy=legacy-user\nsecret={CANARY}\napi db \n")
    );
    assert_eq!(d.mode("out/app.conf"), 0o600);
    // A version that does not exist, and @N on KV v1, are errors naming the path.
    with_token(&d, &server, &token, &["get", "vault:secret/app/db@7#user"])
        .run()
        .code(1)
        .stderr_has("secret/data/app/db")
        .stderr_has("no version 7");
    with_token(&d, &server, &token, &["get", "vault:kv/legacy@2#user"])
        .run()
        .code(1)
        .stderr_has("KV v1");
}

#[test]
fn permission_denied_names_the_path_the_policy_and_the_login() {
    let (server, role_id, secret_id) = app_server();
    server.kv2_put("secret/", "other/db", json!({"password": CANARY}));
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &format!("{secret_id}\n"));
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    let run = d
        .cmd(&["get", "vault:secret/other/db#password"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("GET /v1/secret/data/other/db")
        .stderr_has("HTTP 403: permission denied")
        .stderr_has("approle login at auth/approle")
        .stderr_has("policies [app, default]")
        .stderr_has("path \"secret/data/other/db\" { capabilities = [\"read\"] }")
        .no_canary();
    assert!(!run.stderr.contains(&secret_id), "{}", run.stderr);
    // No access at all to a mount: the preflight names both paths to grant.
    let token = server.token(&["nothing"], 600, 600);
    with_token(&d, &server, &token, &["get", "vault:secret/x/y#z"])
        .env("ENVRENDER_CONFIG", "/dev/null")
        .run()
        .code(1)
        .stderr_has("no access under the mount of secret/x/y")
        .stderr_has("secret/data/x/y");
    // A wrong secret_id: Vault's one answer, and what to check.
    d.write("secret-id", "not-the-secret-id");
    d.cmd(&["get", "vault:secret/app/db#password"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("POST /v1/auth/approle/login")
        .stderr_has("invalid role or secret ID")
        .stderr_has("secret_id_num_uses");
}

#[test]
fn approle_and_kubernetes_logins() {
    let (server, role_id, secret_id) = app_server();
    server.kv2_put("secret/", "app/db", json!({"password": "from-approle"}));
    server.kubernetes_role(
        "web",
        Role {
            policies: vec!["app".into()],
            ttl: 600,
            jwts: vec!["eyJ.service-account.jwt".into()],
            ..Role::default()
        },
    );
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "approle.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    d.cmd(&[
        "--config",
        "approle.toml",
        "get",
        "vault:secret/app/db#password",
    ])
    .env("VAULT_ADDR", &server.url)
    .run()
    .success()
    .stdout_has("from-approle");
    assert_eq!(server.count("logins"), 1);
    d.write("sa-token", "eyJ.service-account.jwt\n");
    d.write(
        "k8s.toml",
        "[vault.auth]\nmethod = \"kubernetes\"\nrole = \"web\"\ntoken_file = \"sa-token\"\n",
    );
    d.cmd(&[
        "--config",
        "k8s.toml",
        "get",
        "vault:secret/app/db#password",
    ])
    .env("VAULT_ADDR", &server.url)
    .run()
    .success()
    .stdout_has("from-approle");
    assert_eq!(server.count("logins"), 2);
    d.write("sa-token", "eyJ.someone-else\n");
    d.cmd(&[
        "--config",
        "k8s.toml",
        "get",
        "vault:secret/app/db#password",
    ])
    .env("VAULT_ADDR", &server.url)
    .run()
    .code(1)
    .stderr_has("kubernetes login at auth/kubernetes as role \"web\"")
    .stderr_has("HTTP 403: permission denied");
    // A method's stray keys are configuration errors, before any request.
    d.write(
        "bad.toml",
        "[vault.auth]\nmethod = \"kubernetes\"\nrole = \"web\"\nrole_id = \"x\"\n",
    );
    d.cmd(&[
        "--config",
        "bad.toml",
        "get",
        "vault:secret/app/db#password",
    ])
    .env("VAULT_ADDR", &server.url)
    .run()
    .code(2)
    .stderr_has("role_id not used by method \"kubernetes\"");
    assert_eq!(server.count("logins"), 2);
}

#[test]
fn init_to_sidecar_handoff_issues_one_credential() {
    let (server, role_id, secret_id) = app_server();
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "envrender.toml",
        "[vault]\nstate_file = \"shared/vault-state.json\"\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n\n[[template]]\nsource = \"db.hbs\"\ndestination = \"out/db.conf\"\n",
    );
    std::fs::create_dir_all(d.join("shared")).unwrap();
    d.write(
        "db.hbs",
        "user={{vault \"database/creds/app#username\"}}\npassword={{vault \"database/creds/app#password\"}}\n",
    );
    let render = || {
        d.cmd(&["render"])
            .env("VAULT_ADDR", &server.url)
            .run()
            .success()
    };
    // The init container issues one credential and records it.
    let init = render();
    let first = d.read("out/db.conf");
    assert!(first.starts_with("user=v-"), "{first}");
    assert_eq!(d.mode("shared/vault-state.json"), 0o600);
    assert_eq!(
        (server.count("logins"), server.count("leases_issued")),
        (1, 1)
    );
    let password = first
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("password=");
    assert!(!init.stderr.contains(password), "{}", init.stderr);
    // The sidecar, and a restarted sidecar, adopt it: no login, no new lease.
    for _ in 0..2 {
        render().stderr_has("unchanged");
        assert_eq!(d.read("out/db.conf"), first);
    }
    assert_eq!(
        (server.count("logins"), server.count("leases_issued")),
        (1, 1)
    );
    // Revoked behind envrender's back: re-issued, once.
    server.revoke_leases();
    render();
    let second = d.read("out/db.conf");
    assert_ne!(second, first);
    render().stderr_has("unchanged");
    assert_eq!(server.count("leases_issued"), 2);
    assert_eq!(server.valid_credentials().len(), 1);
    assert!(second.contains(&server.valid_credentials()[0]));
}

/// The backend as watch mode holds it, logged in with `auth` (or the root
/// token), its scheduler running.
fn maintained(
    server: &VaultServer,
    auth: Option<AuthConfig>,
) -> (Vault, tokio::task::JoinHandle<()>) {
    let vault = Vault::new(
        VaultConfig {
            address: Some(server.url.clone()),
            auth,
            ..VaultConfig::default()
        },
        &MapEnv::new([("VAULT_TOKEN", server.root_token.clone())]),
        None,
    )
    .unwrap();
    let keeper = vault.clone();
    let task = tokio::spawn(async move { keeper.maintain().await });
    (vault, task)
}

/// The username of the credential the backend holds now.
async fn current_user(vault: &Vault) -> String {
    let got = vault.fetch(&[source("vault:database/creds/app")]).await;
    got[0].as_ref().unwrap().value.expose()["username"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Looks at the credential in use every 200 ms until `until` after
/// `start`, asserting Vault still takes it each time; returns each
/// credential seen, in order.
async fn credentials_over_time(
    vault: &Vault,
    server: &VaultServer,
    first: String,
    start: std::time::Instant,
    until: Duration,
) -> Vec<String> {
    let mut users = vec![first];
    while start.elapsed() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let user = current_user(vault).await;
        assert!(
            server.valid_credentials().contains(&user),
            "{user} is not valid at {:?} (seen: {users:?})",
            start.elapsed()
        );
        if users.last() != Some(&user) {
            users.push(user);
        }
    }
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lease_is_kept_valid_by_renewals_then_reissued_at_its_max_ttl() {
    let server = VaultServer::start();
    server.database_role("app", 2, 10);
    let (vault, task) = maintained(&server, None);
    let mut changes = vault.changes();
    let first = current_user(&vault).await;
    let start = std::time::Instant::now();
    let users =
        credentials_over_time(&vault, &server, first, start, Duration::from_millis(13_500)).await;
    task.abort();
    // Renewed (about every 1.3 s) until the max TTL, then re-issued once.
    assert_eq!(users.len(), 2, "{users:?}");
    assert_eq!(server.count("leases_issued"), 2);
    assert!(
        server.count("leases_renewed") >= 5,
        "{}",
        server.count("leases_renewed")
    );
    // Announced: each renewal (a new end) and the re-issue.
    assert!(changes.has_changed().unwrap());
    assert!(*changes.borrow_and_update() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_login_does_not_reissue_what_the_old_token_still_keeps() {
    let (server, _, _) = app_server();
    // Tokens live 6 s, at most 12 s; the lease renews every ~2 s.
    let short_role = server.approle(
        "short",
        Role {
            policies: vec!["app".into()],
            ttl: 6,
            max_ttl: 12,
            ..Role::default()
        },
    );
    let short_secret = server.secret_id("short", 0);
    server.database_role("app", 3, 600);
    let d = Dir::new();
    let auth = AuthConfig::AppRole {
        mount: "approle".into(),
        role_id: RoleId::Value(short_role),
        secret_id_file: Some(d.write("secret-id", &short_secret)),
    };
    let (vault, task) = maintained(&server, Some(auth));
    let first = current_user(&vault).await;
    let start = std::time::Instant::now();
    // Wait for the second login (the first token reached its max TTL).
    while server.count("logins") < 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "no new login");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relogin = start.elapsed();
    assert_eq!(server.count("leases_issued"), 1, "re-issued on login");
    assert_eq!(current_user(&vault).await, first);
    // The old token ends at 12 s and its lease with it: re-issued once before.
    let users = credentials_over_time(&vault, &server, first, start, Duration::from_secs(16)).await;
    task.abort();
    assert_eq!(users.len(), 2, "{users:?} (new login at {relogin:?})");
    assert_eq!(server.count("leases_issued"), 2);
    assert_eq!(server.count("logins"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reissued_before_they_expire() {
    let server = VaultServer::start();
    server.pki_role("web", 4, false);
    let vault = Vault::new(
        VaultConfig {
            address: Some(server.url.clone()),
            pki_reissue_at: 0.5,
            ..VaultConfig::default()
        },
        &MapEnv::new([("VAULT_TOKEN", server.root_token.clone())]),
        None,
    )
    .unwrap();
    let keeper = vault.clone();
    let task = tokio::spawn(async move { keeper.maintain().await });
    let cert = source("vault:pki/issue/web?common_name=app.example.com&ttl=4s");
    let serial = |f: &envrender::backend::Fetched| {
        f.value.expose()["serial_number"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = vault
        .fetch(std::slice::from_ref(&cert))
        .await
        .remove(0)
        .unwrap();
    let expiration = first.value.expose()["expiration"].as_u64().unwrap();
    assert!(
        first.value.expose()["certificate"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    // Asked again within its lifetime: the same certificate, not a new one.
    let again = vault
        .fetch(std::slice::from_ref(&cert))
        .await
        .remove(0)
        .unwrap();
    assert_eq!(serial(&again), serial(&first));
    let mut changes = vault.changes();
    tokio::time::timeout(Duration::from_secs(4), changes.changed())
        .await
        .expect("re-issued within the certificate's lifetime")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now < expiration, "re-issued only after the old one expired");
    let renewed = vault
        .fetch(std::slice::from_ref(&cert))
        .await
        .remove(0)
        .unwrap();
    assert_ne!(serial(&renewed), serial(&first));
    let known = [(cert.clone(), Some(first))];
    assert!(matches!(
        vault.observe(&known).await[0],
        envrender::backend::Observation::Changed(_)
    ));
    task.abort();
}

#[test]
fn aws_iam_login_signs_get_caller_identity_for_vault_to_replay() {
    let (server, _, _) = app_server();
    server.kv2_put("secret/", "app/db", json!({"password": "via-iam"}));
    // An emulator that checks signatures and IAM: the user, its policy and
    // its key are the 3 requests made before enforcement starts.
    let moto = support::aws::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let allow = r#"{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}]}"#;
    let (key, secret) = support::aws::auth_setup(&moto.url, allow, &[]);
    server.aws_role(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 600,
            arns: vec![format!(
                "arn:aws:iam::{}:user/envrender-test",
                support::aws::ACCOUNT
            )],
            ..Role::default()
        },
    );
    server.aws_server_id("vault.example.com");
    let d = Dir::new();
    d.write(
        "envrender.toml",
        "[vault.auth]\nmethod = \"aws\"\nrole = \"app\"\nheader_value = \"vault.example.com\"\n",
    );
    let login = |secret: &str| {
        d.cmd(&["get", "vault:secret/app/db#password"])
            .aws(&moto.url)
            .env("AWS_ACCESS_KEY_ID", &key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("VAULT_ADDR", &server.url)
            .run()
    };
    login(&secret).success().stdout_has("via-iam");
    assert_eq!(server.count("logins"), 1);
    // A wrong secret key: STS rejects the signature Vault replays.
    let run = login("wrong-secret-key").code(1);
    let run = run
        .stderr_has("aws iam login at auth/aws as role \"app\"")
        .stderr_has("error code 403 from STS");
    assert!(!run.stderr.contains("wrong-secret-key"));
    // Without the server-ID header the mount asks for, Vault refuses.
    d.write(
        "envrender.toml",
        "[vault.auth]\nmethod = \"aws\"\nrole = \"app\"\n",
    );
    login(&secret)
        .code(1)
        .stderr_has("X-Vault-AWS-IAM-Server-ID");
    assert_eq!(server.count("logins"), 1);
}

#[test]
fn vault_over_tls_with_a_private_ca() {
    let server = VaultServer::start();
    server.kv2_put("secret/", "app", json!({"password": "over-tls"}));
    let (url, ca) = support::tls_front(server.url.trim_start_matches("http://"));
    let d = Dir::new();
    d.write("ca.pem", &ca);
    let get = || {
        d.cmd(&["get", "vault:secret/app#password"])
            .env("VAULT_ADDR", &url)
            .env("VAULT_TOKEN", &server.root_token)
    };
    get()
        .env("VAULT_CACERT", "ca.pem")
        .run()
        .success()
        .stdout_has("over-tls");
    // Without the CA the certificate is not trusted, and the error says where to look.
    get().run().code(1).stderr_has("VAULT_CACERT");
}

#[test]
fn vault_over_mutual_tls() {
    let server = VaultServer::start();
    server.kv2_put("secret/", "app", json!({"password": "over-mtls"}));
    let front = support::mtls_front(server.url.trim_start_matches("http://"));
    let d = Dir::new();
    front.write_files(&d);
    let get = || {
        d.cmd(&["get", "--timeout", "2s", "vault:secret/app#password"])
            .env("VAULT_ADDR", &front.url)
            .env("VAULT_TOKEN", &server.root_token)
            .env("VAULT_CACERT", "ca.pem")
    };
    get()
        .env("VAULT_CLIENT_CERT", "client.pem")
        .env("VAULT_CLIENT_KEY", "client-key.pem")
        .run()
        .success()
        .stdout_has("over-mtls");
    // Without a client certificate, or with one from another CA, the
    // server ends the handshake.
    for (cert, key) in [
        (None, None),
        (Some("stranger.pem"), Some("stranger-key.pem")),
    ] {
        let mut cmd = get();
        if let (Some(cert), Some(key)) = (cert, key) {
            cmd = cmd
                .env("VAULT_CLIENT_CERT", cert)
                .env("VAULT_CLIENT_KEY", key);
        }
        cmd.run()
            .code(1)
            .stderr_has("cannot reach Vault")
            .stderr_has(&front.url)
            .stderr_has("give one with VAULT_CLIENT_CERT and VAULT_CLIENT_KEY");
    }
    // From the configuration (paths, as everywhere, from the working directory).
    d.write(
        "conf/envrender.toml",
        "[vault]\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client-key.pem\"\n",
    );
    d.cmd(&[
        "get",
        "--config",
        "conf/envrender.toml",
        "vault:secret/app#password",
    ])
    .env("VAULT_ADDR", &front.url)
    .env("VAULT_TOKEN", &server.root_token)
    .run()
    .success()
    .stdout_has("over-mtls");
    // One without the other is a configuration error, before any request.
    d.write("half.toml", "[vault]\nclient_cert = \"client.pem\"\n");
    d.cmd(&["get", "--config", "half.toml", "vault:secret/app#password"])
        .env("VAULT_ADDR", &front.url)
        .run()
        .code(2)
        .stderr_has("half.toml")
        .stderr_has("vault.client_cert is set but vault.client_key is not");
    get()
        .env("VAULT_CLIENT_CERT", "client.pem")
        .run()
        .code(1)
        .stderr_has("VAULT_CLIENT_CERT and VAULT_CLIENT_KEY");
    // A key that is not PEM is named, its content never printed.
    d.write("bad-key.pem", support::CANARY);
    let run = get()
        .env("VAULT_CLIENT_CERT", "client.pem")
        .env("VAULT_CLIENT_KEY", "bad-key.pem")
        .run()
        .code(1)
        .stderr_has("bad-key.pem");
    assert!(!run.stderr.contains(support::CANARY), "{}", run.stderr);
    // A file that is not there, and a key that is not the certificate's.
    get()
        .env("VAULT_CLIENT_CERT", "client.pem")
        .env("VAULT_CLIENT_KEY", "missing-key.pem")
        .run()
        .code(1)
        .stderr_has("cannot read the Vault client key missing-key.pem");
    get()
        .env("VAULT_CLIENT_CERT", "client.pem")
        .env("VAULT_CLIENT_KEY", "stranger-key.pem")
        .run()
        .code(1)
        .stderr_has("client certificate client.pem, key stranger-key.pem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_secrets_are_looked_at_again_by_version() {
    let server = VaultServer::start();
    server.kv2_put("secret/", "app", json!({"password": "one"}));
    server.kv1_put("kv/", "legacy", json!({"user": "a"}));
    let vault = Vault::new(
        VaultConfig {
            address: Some(server.url.clone()),
            ..VaultConfig::default()
        },
        &MapEnv::new([("VAULT_TOKEN", server.root_token.clone())]),
        None,
    )
    .unwrap();
    assert_eq!(vault.poll_interval(), Duration::from_secs(300));
    let sources = [source("vault:secret/app"), source("vault:kv/legacy")];
    let first: Vec<_> = vault
        .fetch(&sources)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(first[0].version.as_deref(), Some("1"));
    let known: Vec<_> = sources
        .iter()
        .cloned()
        .zip(first.into_iter().map(Some))
        .collect();
    let unchanged = |o: &envrender::backend::Observation| {
        matches!(o, envrender::backend::Observation::Unchanged)
    };
    assert!(vault.observe(&known).await.iter().all(unchanged));
    server.kv2_put("secret/", "app", json!({"password": "two"}));
    server.kv1_put("kv/", "legacy", json!({"user": "b"}));
    let seen = vault.observe(&known).await;
    for o in &seen {
        match o {
            envrender::backend::Observation::Changed(f) => {
                assert!(
                    f.value.expose() == &json!({"password": "two"})
                        || f.value.expose() == &json!({"user": "b"})
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn namespaces_go_in_every_request() {
    let (server, role_id, secret_id) = app_server();
    server.namespace("team-a");
    server.kv2_put("secret/", "app/db", json!({"password": "in-team-a"}));
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    let get = || {
        d.cmd(&["get", "vault:secret/app/db#password"])
            .env("VAULT_ADDR", &server.url)
    };
    get()
        .env("VAULT_NAMESPACE", "team-a/")
        .run()
        .success()
        .stdout_has("in-team-a");
    get()
        .run()
        .code(1)
        .stderr_has("POST /v1/auth/approle/login")
        .stderr_has("no handler for route");
    // A token is only good in its namespace.
    let token = server.token(&["app"], 600, 600);
    d.cmd(&["get", "vault:secret/app/db#password"])
        .env("ENVRENDER_CONFIG", "/dev/null")
        .env("VAULT_ADDR", &server.url)
        .env("VAULT_TOKEN", &token)
        .run()
        .code(1)
        .stderr_has("invalid token");
}

#[test]
fn plain_http_across_the_network_warns_and_loopback_does_not() {
    let d = Dir::new();
    d.write("t.hbs", "{{vault \"secret/x#a\"}}{{consul \"k\"}}");
    d.cmd(&["render", "--timeout", "1s", "--template", "t.hbs:o"])
        .env("VAULT_ADDR", "http://vault.invalid:8200")
        .env("VAULT_TOKEN", "t")
        .env("CONSUL_HTTP_ADDR", "consul.invalid:8500")
        .run()
        .code(1)
        .stderr_has("Vault at http://vault.invalid:8200/ is plain HTTP: the token and every value it answers cross the network unencrypted; use an https:// address")
        .stderr_has("Consul at http://consul.invalid:8500/ is plain HTTP");
    // A local agent on loopback is not warned about.
    let server = VaultServer::start();
    server.kv2_put("secret/", "x", json!({"a": "1"}));
    let run = d
        .cmd(&["render", "--timeout", "1s", "--template", "t.hbs:o"])
        .env("VAULT_ADDR", &server.url)
        .env("VAULT_TOKEN", &server.root_token)
        .env("CONSUL_HTTP_ADDR", "localhost:1")
        .run()
        .code(1);
    assert!(!run.stderr.contains("plain HTTP"), "{}", run.stderr);
}

/// A render that fails writes nothing, so the credential it obtained
/// reaches no one: it is revoked, not left to live out its TTL. A token
/// that may not revoke leases one by one (the default policy) revokes
/// itself, and its leases with it, when envrender logged in for it.
#[test]
fn a_failed_render_revokes_what_it_obtained() {
    let (server, role_id, secret_id) = app_server();
    let d = Dir::new();
    d.write(
        "t.hbs",
        "user={{vault \"database/creds/app#username\"}}\nkey={{vault \"secret/app/missing#key\"}}\n",
    );
    // The root token may revoke the lease itself.
    d.cmd(&["render", "--template", "t.hbs:out.conf"])
        .env("VAULT_ADDR", &server.url)
        .env("VAULT_TOKEN", &server.root_token)
        .run()
        .code(1)
        .stderr_has("secret/app/missing")
        .stderr_has("revoked the Vault leases that the failed render obtained");
    assert!(!d.join("out.conf").exists());
    assert_eq!(server.count("leases_issued"), 1);
    assert_eq!(server.valid_credentials(), Vec::<String>::new());
    // An AppRole login whose policies lack sys/leases/revoke.
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    d.cmd(&["render", "--template", "t.hbs:out.conf"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("revoked the Vault token envrender logged in for");
    assert_eq!(server.count("leases_issued"), 2);
    assert_eq!(server.valid_credentials(), Vec::<String>::new());
    // A token envrender was given (a file, an agent's sink) is not its own
    // to revoke: the lease it may not revoke is left to its TTL.
    let token = server.token(&["app"], 3600, 7200);
    d.write("token", &token);
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"token\", token_file = \"token\" }\n",
    );
    d.cmd(&["render", "--template", "t.hbs:out.conf"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .code(1)
        .stderr_has("sys/leases/revoke");
    assert_eq!(server.valid_credentials().len(), 1);
    d.write("t.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    d.cmd(&["render", "--template", "t.hbs:out.conf"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .success();
    assert_eq!(server.valid_credentials().len(), 2);
    d.write(
        "envrender.toml",
        "[vault]\nauth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }\n",
    );
    // A render that succeeds keeps its credential: it is in the output.
    d.write("t.hbs", "user={{vault \"database/creds/app#username\"}}\n");
    d.cmd(&["render", "--template", "t.hbs:out.conf"])
        .env("VAULT_ADDR", &server.url)
        .run()
        .success();
    assert_eq!(server.valid_credentials().len(), 3);
}

/// With `revoke_on_stop`, a wrapper that ends (its command exited) revokes
/// the leases it held and the token it logged in for; without it, they live
/// out their TTLs.
#[test]
fn a_wrapper_that_ends_revokes_its_leases_and_token_when_asked() {
    let (server, role_id, secret_id) = app_server();
    server.policy(
        "app",
        &[
            ("database/creds/app", &["read"]),
            ("sys/leases/revoke", &["update"]),
        ],
    );
    let d = Dir::new();
    d.write("role-id", &role_id);
    d.write("secret-id", &secret_id);
    let config = |extra: &str| {
        format!(
            "[vault]\nauth = {{ method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }}\n{extra}\n[env]\nDB_USER = \"vault:database/creds/app#username\"\n"
        )
    };
    d.write("envrender.toml", &config(""));
    let run = |d: &Dir| {
        d.cmd(&["run", "--", "sh", "-c", "test -n \"$DB_USER\" && exit 3"])
            .env("VAULT_ADDR", &server.url)
            .run()
    };
    run(&d).code(3);
    assert_eq!(server.valid_credentials().len(), 1);
    d.write("envrender.toml", &config("revoke_on_stop = true"));
    let before = server.valid_credentials();
    run(&d)
        .code(3)
        .stderr_has("revoked the Vault token envrender logged in for");
    assert_eq!(server.valid_credentials(), before, "{:?}", before);
    assert_eq!(server.count("leases_issued"), 2);
}
