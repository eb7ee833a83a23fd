//! The Vault test server: its fidelity, checked with hvac, and the rules of
//! Vault's API it reproduces (envelopes, token expiry, lease arithmetic,
//! KV v2 deletions, mount detection, PKI).

mod support;

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
            "/tests/support/vault_fidelity.py"
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
    server.advance(Duration::from_secs(800));
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
