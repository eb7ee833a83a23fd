//! A Vault test server: the subset of Vault's HTTP API a secret injector
//! uses, on loopback, written from `shared/protocols/vault.md` — the success
//! and `{"errors":[…]}` envelopes with Vault's status codes; a token store
//! (lookup-self, renew-self capped at the max TTL with Vault's warning,
//! revoke-self; expiry → 403 `permission denied` + `invalid token`); path-glob
//! ACL policies; mount detection (`sys/internal/ui/mounts`); KV v1 and KV v2
//! (versions, `?version=`, CAS, metadata, soft delete, destroy, list); AppRole
//! Kubernetes and AWS IAM logins (the signed `sts:GetCallerIdentity` is
//! replayed to the URL it was signed for); a database engine issuing credentials under leases
//! with TTL and max TTL; `sys/leases/renew|lookup|revoke`; leases revoked with
//! their token; PKI issue returning a real certificate with its expiration.
//!
//! Time runs on a clock tests can move forward, so TTLs expire without
//! sleeping. Controls inject faults (sealed, 429, 500) and report logins,
//! leases issued/renewed/revoked, and which database credentials are valid.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{RawQuery, State as Shared};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The system default lease TTL: 768h.
const SYSTEM_TTL: u64 = 2_764_800;

#[derive(Clone, Debug)]
struct Token {
    id: String,
    accessor: String,
    policies: Vec<String>,
    issue_time: u64,
    /// When it stops working; `None` never (root).
    expire_time: Option<u64>,
    /// The TTL asked for on renewal when no increment is given.
    ttl: u64,
    max_ttl: Option<u64>,
    renewable: bool,
    path: String,
    meta: BTreeMap<String, String>,
    revoked: bool,
    last_renewal: Option<u64>,
}

#[derive(Clone, Debug)]
struct Lease {
    path: String,
    issue_time: u64,
    expire_time: u64,
    max_ttl: u64,
    default_ttl: u64,
    renewable: bool,
    token: String,
    username: Option<String>,
    last_renewal: Option<u64>,
    revoked: bool,
}

#[derive(Clone, Debug)]
struct KvVersion {
    data: Option<Value>,
    created: u64,
    deletion_time: Option<u64>,
    destroyed: bool,
}

#[derive(Clone, Debug, Default)]
struct KvSecret {
    versions: BTreeMap<u64, KvVersion>,
    current: u64,
    cas_required: bool,
    custom_metadata: Option<Value>,
}

#[derive(Clone, Debug)]
struct Mount {
    kind: &'static str,
    version: Option<&'static str>,
    max_lease_ttl: u64,
}

/// A role: for AppRole, Kubernetes, the database engine or PKI.
#[derive(Clone, Debug, Default)]
pub struct Role {
    pub policies: Vec<String>,
    /// Token or lease TTL (seconds).
    pub ttl: u64,
    /// Token or lease max TTL (seconds); 0: the mount's.
    pub max_ttl: u64,
    /// Kubernetes: the service-account JWTs this role accepts.
    pub jwts: Vec<String>,
    /// PKI: register a lease for each certificate.
    pub generate_lease: bool,
    /// AWS: the IAM principal ARNs this role accepts (`bound_iam_principal_arn`).
    pub arns: Vec<String>,
}

#[derive(Default)]
struct State {
    clock_offset: u64,
    /// A stopped clock: real time does not move it, only [`VaultServer::advance`].
    frozen: Option<u64>,
    sealed: bool,
    tokens: HashMap<String, Token>,
    policies: HashMap<String, Vec<(String, Vec<String>)>>,
    mounts: BTreeMap<String, Mount>,
    kv1: BTreeMap<String, Value>,
    kv2: BTreeMap<String, KvSecret>,
    approle: HashMap<String, (Role, String)>,
    secret_ids: HashMap<String, (String, u32)>,
    k8s: HashMap<String, Role>,
    aws_roles: HashMap<String, Role>,
    /// The (Enterprise) namespace everything lives in, when set.
    namespace: Option<String>,
    /// The AWS mount's `iam_server_id_header_value`.
    aws_header: Option<String>,
    db_roles: HashMap<String, Role>,
    pki_roles: HashMap<String, Role>,
    leases: HashMap<String, Lease>,
    faults: Vec<(u16, Option<String>, String)>,
    counters: BTreeMap<&'static str, usize>,
    /// When each database credential was issued (real time), and its user.
    issued: Vec<(std::time::Instant, String)>,
    next_id: u64,
}

pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

struct Inner {
    state: Mutex<State>,
    ca: Ca,
}

/// A running Vault test server.
#[derive(Clone)]
pub struct VaultServer {
    pub url: String,
    /// A root token: every capability, never expires.
    pub root_token: String,
    inner: Arc<Inner>,
}

fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rfc3339(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Go's duration formatting with zero units dropped: "1h", "2h30m", "45s".
fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

fn parse_seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s.is_empty() => Some(0),
        Value::String(s) => s
            .parse::<u64>()
            .ok()
            .or_else(|| humantime::parse_duration(s).ok().map(|d| d.as_secs())),
        _ => None,
    }
}

fn errors(status: StatusCode, messages: &[&str]) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"errors": messages}).to_string(),
    )
        .into_response()
}

fn envelope(
    data: Value,
    lease_id: &str,
    lease_duration: u64,
    renewable: bool,
    auth: Value,
    warnings: Value,
) -> Value {
    json!({
        "request_id": uuid_like(),
        "lease_id": lease_id,
        "renewable": renewable,
        "lease_duration": lease_duration,
        "data": data,
        "wrap_info": null,
        "warnings": warnings,
        "auth": auth,
    })
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn uuid_like() -> String {
    let r = || fastrand::u64(..);
    let (a, b) = (r(), r());
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn base62(n: usize) -> String {
    const CHARS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..n)
        .map(|_| CHARS[fastrand::usize(..CHARS.len())] as char)
        .collect()
}

/// Whether a policy path pattern matches: exact, a trailing `*` glob, and
/// `+` for one segment.
fn glob(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        return glob_segments(prefix, &path[..path.len().min(prefix.len())])
            && path.len() >= prefix.len();
    }
    glob_segments(pattern, path)
}

fn glob_segments(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let q: Vec<&str> = path.split('/').collect();
    p.len() == q.len() && p.iter().zip(&q).all(|(a, b)| *a == "+" || a == b)
}

impl State {
    fn now(&self) -> u64 {
        self.frozen.unwrap_or_else(real_now) + self.clock_offset
    }

    fn count(&mut self, what: &'static str) {
        *self.counters.entry(what).or_default() += 1;
    }

    fn mount_of(&self, path: &str) -> Option<(String, Mount)> {
        self.mounts
            .iter()
            .filter(|(m, _)| path.starts_with(m.as_str()) || format!("{path}/") == **m)
            .max_by_key(|(m, _)| m.len())
            .map(|(m, mount)| (m.clone(), mount.clone()))
    }

    fn capabilities(&self, token: &Token, path: &str) -> Vec<String> {
        if token.policies.iter().any(|p| p == "root") {
            return ["read", "list", "create", "update", "delete", "sudo"]
                .map(String::from)
                .to_vec();
        }
        // The most specific matching rule of each policy wins; deny beats all.
        let mut caps = Vec::new();
        for name in &token.policies {
            let Some(rules) = self.policies.get(name) else {
                continue;
            };
            if let Some((_, c)) = rules
                .iter()
                .filter(|(pattern, _)| glob(pattern, path))
                .max_by_key(|(pattern, _)| pattern.len())
            {
                if c.iter().any(|c| c == "deny") {
                    return Vec::new();
                }
                caps.extend(c.iter().cloned());
            }
        }
        caps
    }

    fn revoke_token(&mut self, id: &str) {
        if let Some(t) = self.tokens.get_mut(id) {
            t.revoked = true;
        }
        let now = self.now();
        let mut revoked = 0;
        for lease in self
            .leases
            .values_mut()
            .filter(|l| l.token == id && !l.revoked)
        {
            lease.revoked = true;
            lease.expire_time = lease.expire_time.min(now);
            revoked += 1;
        }
        for _ in 0..revoked {
            self.count("leases_revoked");
        }
    }

    /// Expires what is past its time: tokens stop working, and their leases
    /// and leases past their own expiry are revoked. Times are whole seconds
    /// and a token or lease works through the second it expires in, so
    /// nothing lives shorter than the TTL it was given.
    fn reap(&mut self) {
        let now = self.now();
        let expired: Vec<String> = self
            .tokens
            .values()
            .filter(|t| !t.revoked && t.expire_time.is_some_and(|e| e < now))
            .map(|t| t.id.clone())
            .collect();
        for id in expired {
            self.revoke_token(&id);
        }
        let mut revoked = 0;
        for lease in self
            .leases
            .values_mut()
            .filter(|l| !l.revoked && l.expire_time < now)
        {
            lease.revoked = true;
            revoked += 1;
        }
        for _ in 0..revoked {
            self.count("leases_revoked");
        }
    }

    fn issue_token(
        &mut self,
        policies: Vec<String>,
        ttl: u64,
        max_ttl: Option<u64>,
        path: &str,
        meta: BTreeMap<String, String>,
    ) -> Token {
        self.next_id += 1;
        let now = self.now();
        let token = Token {
            id: format!("hvs.{}", base62(24)),
            accessor: base62(24),
            policies,
            issue_time: now,
            expire_time: Some(now + ttl),
            ttl,
            max_ttl,
            renewable: true,
            path: path.to_string(),
            meta,
            revoked: false,
            last_renewal: None,
        };
        self.tokens.insert(token.id.clone(), token.clone());
        token
    }
}

fn auth_block(t: &Token, now: u64) -> Value {
    let mut policies = t.policies.clone();
    if !policies.iter().any(|p| p == "default" || p == "root") {
        policies.push("default".into());
    }
    json!({
        "client_token": t.id,
        "accessor": t.accessor,
        "policies": policies,
        "token_policies": policies,
        "metadata": if t.meta.is_empty() { Value::Null } else { json!(t.meta) },
        "lease_duration": t.expire_time.map_or(0, |e| e.saturating_sub(now)),
        "renewable": t.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": true,
        "mfa_requirement": null,
        "num_uses": 0,
    })
}

/// Vault's TTL arithmetic for renewals: the increment counts from now,
/// capped at issue time + max, with Vault's warning text when capped.
fn renew_ttl(now: u64, issue: u64, max: u64, increment: u64) -> Result<(u64, Value), &'static str> {
    let end = issue + max;
    if end <= now {
        return Err("past the max TTL, cannot renew");
    }
    let left = end - now;
    if increment > left {
        let warning = format!(
            "TTL of \"{}\" exceeded the effective max_ttl of \"{}\"; TTL value is capped accordingly",
            go_duration(increment),
            go_duration(left)
        );
        return Ok((left, json!([warning])));
    }
    Ok((increment, Value::Null))
}

/// The `[vault]` `auth` line of an AppRole login with the files
/// [`VaultServer::approle_files`] writes.
pub const APPROLE_AUTH: &str =
    "auth = { method = \"approle\", role_id_file = \"role-id\", secret_id_file = \"secret-id\" }";

impl VaultServer {
    pub fn start() -> VaultServer {
        VaultServer::start_on("127.0.0.1:0")
    }

    /// A server listening on `addr` (`127.0.0.1:8200`).
    pub fn start_on(addr: &str) -> VaultServer {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "envrender test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let ca = Ca {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        };
        let mut state = State::default();
        let root = Token {
            id: format!("hvs.root{}", base62(20)),
            accessor: base62(24),
            policies: vec!["root".into()],
            issue_time: real_now(),
            expire_time: None,
            ttl: 0,
            max_ttl: None,
            renewable: false,
            path: "auth/token/root".into(),
            meta: BTreeMap::new(),
            revoked: false,
            last_renewal: None,
        };
        let root_token = root.id.clone();
        state.tokens.insert(root.id.clone(), root);
        for (path, kind, version) in [
            ("secret/", "kv", Some("2")),
            ("kv/", "kv", Some("1")),
            ("database/", "database", None),
            ("pki/", "pki", None),
        ] {
            state.mounts.insert(
                path.to_string(),
                Mount {
                    kind,
                    version,
                    max_lease_ttl: SYSTEM_TTL,
                },
            );
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            ca,
        });
        let server = VaultServer {
            url,
            root_token,
            inner,
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(server.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    axum::serve(listener, app).await.unwrap();
                })
        });
        server
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap()
    }

    // ---- controls -------------------------------------------------------

    /// Stops the server's clock: from now on only [`VaultServer::advance`]
    /// moves it, so tests of exact TTL arithmetic do not race real time.
    pub fn freeze(&self) {
        let mut st = self.state();
        st.frozen = Some(real_now());
    }

    /// Moves the server's clock forward; expired tokens and leases are revoked.
    pub fn advance(&self, by: Duration) {
        let mut st = self.state();
        st.clock_offset += by.as_secs();
        st.reap();
    }

    pub fn policy(&self, name: &str, rules: &[(&str, &[&str])]) {
        self.state().policies.insert(
            name.to_string(),
            rules
                .iter()
                .map(|(p, c)| (p.to_string(), c.iter().map(|c| c.to_string()).collect()))
                .collect(),
        );
    }

    /// A token with these policies, `ttl` seconds to live and a max TTL.
    pub fn token(&self, policies: &[&str], ttl: u64, max_ttl: u64) -> String {
        self.state()
            .issue_token(
                policies.iter().map(|p| p.to_string()).collect(),
                ttl,
                Some(max_ttl),
                "auth/token/create",
                BTreeMap::new(),
            )
            .id
    }

    pub fn mount(&self, path: &str, kind: &'static str, version: Option<&'static str>) {
        self.state().mounts.insert(
            path.to_string(),
            Mount {
                kind,
                version,
                max_lease_ttl: SYSTEM_TTL,
            },
        );
    }

    /// An AppRole role; returns its role_id.
    pub fn approle(&self, name: &str, role: Role) -> String {
        let role_id = uuid_like();
        self.state()
            .approle
            .insert(name.to_string(), (role, role_id.clone()));
        role_id
    }

    /// An AppRole role `app` with `policies` and tokens of `ttl` seconds,
    /// for envrender to log in with: its role_id and an unlimited
    /// secret_id written to `role-id` and `secret-id` in `dir`, which
    /// [`APPROLE_AUTH`] reads.
    pub fn approle_files(&self, dir: &std::path::Path, policies: &[&str], ttl: u64) {
        let role_id = self.approle(
            "app",
            Role {
                policies: policies.iter().map(|p| p.to_string()).collect(),
                ttl,
                ..Role::default()
            },
        );
        std::fs::write(dir.join("role-id"), role_id).unwrap();
        std::fs::write(dir.join("secret-id"), self.secret_id("app", 0)).unwrap();
    }

    /// A secret_id for an AppRole role, usable `uses` times (0: unlimited).
    pub fn secret_id(&self, role: &str, uses: u32) -> String {
        let id = uuid_like();
        self.state()
            .secret_ids
            .insert(id.clone(), (role.to_string(), uses));
        id
    }

    pub fn kubernetes_role(&self, name: &str, role: Role) {
        self.state().k8s.insert(name.to_string(), role);
    }

    /// An AWS IAM auth role; logins replay the signed `sts:GetCallerIdentity`
    /// to the URL the client signed for (the AWS emulator in tests).
    pub fn aws_role(&self, name: &str, role: Role) {
        self.state().aws_roles.insert(name.to_string(), role);
    }

    /// Sets the AWS mount's `iam_server_id_header_value`.
    pub fn aws_server_id(&self, value: &str) {
        self.state().aws_header = Some(value.to_string());
    }

    /// Puts every mount, token and role in namespace `ns`: requests must
    /// name it (`X-Vault-Namespace` or a path prefix).
    pub fn namespace(&self, ns: &str) {
        self.state().namespace = Some(ns.to_string());
    }

    /// Revokes every lease (as `vault lease revoke -prefix` would).
    pub fn revoke_leases(&self) {
        let mut st = self.state();
        let ids: Vec<String> = st.leases.keys().cloned().collect();
        for id in ids {
            if let Some(l) = st.leases.get_mut(&id)
                && !l.revoked
            {
                l.revoked = true;
                st.count("leases_revoked");
            }
        }
    }

    /// What a dev-mode Vault loses when it restarts: every token but the
    /// root token, and every lease (gone, not revoked: renewing one answers
    /// "lease not found"). Mounts, roles, policies and KV data stay, as a
    /// setup script would put them back.
    pub fn lose_sessions(&self) {
        let mut st = self.state();
        st.tokens
            .retain(|_, t| t.policies.iter().any(|p| p == "root"));
        st.leases.clear();
    }

    pub fn database_role(&self, name: &str, ttl: u64, max_ttl: u64) {
        self.state().db_roles.insert(
            name.to_string(),
            Role {
                ttl,
                max_ttl,
                ..Role::default()
            },
        );
    }

    pub fn pki_role(&self, name: &str, max_ttl: u64, generate_lease: bool) {
        self.state().pki_roles.insert(
            name.to_string(),
            Role {
                max_ttl,
                generate_lease,
                ..Role::default()
            },
        );
    }

    /// Writes a KV v2 secret at `path` under `mount` (as a root client would).
    pub fn kv2_put(&self, mount: &str, path: &str, data: Value) -> u64 {
        let mut st = self.state();
        let now = st.now();
        let secret = st.kv2.entry(format!("{mount}{path}")).or_default();
        secret.current += 1;
        let v = secret.current;
        secret.versions.insert(
            v,
            KvVersion {
                data: Some(data),
                created: now,
                deletion_time: None,
                destroyed: false,
            },
        );
        v
    }

    pub fn kv1_put(&self, mount: &str, path: &str, data: Value) {
        self.state().kv1.insert(format!("{mount}{path}"), data);
    }

    pub fn seal(&self, sealed: bool) {
        self.state().sealed = sealed;
    }

    /// Answers the next `times` requests with `status`, `{"errors":[message]}`
    /// and an optional `Retry-After`.
    pub fn fail(&self, times: usize, status: u16, retry_after: Option<&str>, message: &str) {
        let mut st = self.state();
        for _ in 0..times {
            st.faults
                .push((status, retry_after.map(str::to_string), message.to_string()));
        }
    }

    /// When each database credential was issued (real time), with its
    /// username, oldest first.
    pub fn issued(&self) -> Vec<(std::time::Instant, String)> {
        self.state().issued.clone()
    }

    /// When the credential of `user` stops working: its lease works through
    /// the second it expires in.
    pub fn ends_at(&self, user: &str) -> std::time::SystemTime {
        let st = self.state();
        let lease = st
            .leases
            .values()
            .find(|l| l.username.as_deref() == Some(user))
            .unwrap_or_else(|| panic!("no lease for {user}"));
        std::time::UNIX_EPOCH + Duration::from_secs(lease.expire_time + 1 - st.clock_offset)
    }

    /// Counters: `logins`, `leases_issued`, `leases_renewed`, `leases_revoked`,
    /// `kv_reads`, `requests`.
    pub fn count(&self, what: &str) -> usize {
        self.state()
            .counters
            .iter()
            .find(|(k, _)| **k == what)
            .map_or(0, |(_, n)| *n)
    }

    /// Database usernames whose lease is still valid.
    pub fn valid_credentials(&self) -> Vec<String> {
        let mut st = self.state();
        st.reap();
        let mut names: Vec<String> = st
            .leases
            .values()
            .filter(|l| !l.revoked)
            .filter_map(|l| l.username.clone())
            .collect();
        names.sort();
        names
    }

    pub fn ca_pem(&self) -> String {
        self.inner.ca.pem.clone()
    }

    // ---- request handling -----------------------------------------------

    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &BTreeMap<String, String>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let mut st = self.state();
        st.count("requests");
        st.reap();
        if !st.faults.is_empty() {
            let (status, retry_after, message) = st.faults.remove(0);
            let mut r = errors(StatusCode::from_u16(status).unwrap(), &[&message]);
            if let Some(ra) = retry_after {
                r.headers_mut().insert("retry-after", ra.parse().unwrap());
            }
            return r;
        }
        if path == "sys/health" {
            return if st.sealed {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("content-type", "application/json")],
                    json!({"initialized": true, "sealed": true}).to_string(),
                )
                    .into_response()
            } else {
                ok(
                    json!({"initialized": true, "sealed": false, "standby": false, "version": "1.17.0", "server_time_utc": st.now()}),
                )
            };
        }
        if st.sealed {
            return errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is sealed"]);
        }
        // Everything lives in the namespace, when one is set: a request
        // names it in X-Vault-Namespace or in front of the path.
        let path = match &st.namespace {
            None => path,
            Some(ns) => {
                let header = headers
                    .get("x-vault-namespace")
                    .and_then(|v| v.to_str().ok())
                    .map(|h| h.trim_matches('/'));
                match (
                    header == Some(ns.as_str()),
                    path.strip_prefix(&format!("{ns}/")),
                ) {
                    (true, _) => path,
                    (false, Some(inner)) => inner,
                    (false, None) if path.starts_with("auth/") && path.ends_with("/login") => {
                        return errors(
                            StatusCode::NOT_FOUND,
                            &[&format!(
                                "no handler for route \"{path}\". route entry not found."
                            )],
                        );
                    }
                    (false, None) => {
                        return errors(
                            StatusCode::FORBIDDEN,
                            &["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"],
                        );
                    }
                }
            }
        };
        let data: Value = if body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => return errors(StatusCode::BAD_REQUEST, &["error parsing JSON"]),
            }
        };
        // Method → operation; `?list=true` and LIST are lists.
        let list = match query.get("list").map(String::as_str) {
            None => method.as_str() == "LIST",
            Some("true") => true,
            Some("false") => false,
            Some(_) => return errors(StatusCode::BAD_REQUEST, &[]),
        };
        let op = match (method.as_str(), list) {
            ("GET" | "LIST", true) => "list",
            ("GET", false) => "read",
            ("POST" | "PUT", _) => "update",
            ("DELETE", _) => "delete",
            _ => return errors(StatusCode::METHOD_NOT_ALLOWED, &[]),
        };
        // Logins need no token.
        if let Some(rest) = path.strip_prefix("auth/")
            && let Some(r) = login(&mut st, rest, &data)
        {
            return r;
        }
        let token_id = headers
            .get("x-vault-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
            });
        let Some(token_id) = token_id else {
            return errors(StatusCode::FORBIDDEN, &["permission denied"]);
        };
        let token = match st.tokens.get(&token_id) {
            Some(t) if !t.revoked => t.clone(),
            _ => {
                return errors(
                    StatusCode::FORBIDDEN,
                    &["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"],
                );
            }
        };
        let now = st.now();
        // Token self-service is in every token's default policy.
        match path {
            "auth/token/lookup-self" => {
                return ok(envelope(
                    json!({
                        "accessor": token.accessor, "creation_time": token.issue_time, "creation_ttl": token.ttl,
                        "display_name": "token", "entity_id": "", "expire_time": token.expire_time.map(rfc3339),
                        "explicit_max_ttl": 0, "id": token.id, "issue_time": rfc3339(token.issue_time),
                        "meta": if token.meta.is_empty() { Value::Null } else { json!(token.meta) },
                        "num_uses": 0, "orphan": true, "path": token.path, "policies": token.policies,
                        "renewable": token.renewable, "ttl": token.expire_time.map_or(0, |e| e.saturating_sub(now)), "type": "service",
                    }),
                    "",
                    0,
                    false,
                    Value::Null,
                    Value::Null,
                ));
            }
            "auth/token/renew-self" => {
                if !token.renewable {
                    return errors(StatusCode::BAD_REQUEST, &["lease is not renewable"]);
                }
                let increment = data
                    .get("increment")
                    .and_then(parse_seconds)
                    .filter(|i| *i > 0)
                    .unwrap_or(token.ttl);
                let max = token.max_ttl.unwrap_or(SYSTEM_TTL);
                match renew_ttl(now, token.issue_time, max, increment) {
                    Err(e) => return errors(StatusCode::BAD_REQUEST, &[e]),
                    Ok((ttl, warnings)) => {
                        let t = st.tokens.get_mut(&token_id).unwrap();
                        t.expire_time = Some(now + ttl);
                        t.last_renewal = Some(now);
                        let t = t.clone();
                        return ok(envelope(
                            Value::Null,
                            "",
                            0,
                            false,
                            auth_block(&t, now),
                            warnings,
                        ));
                    }
                }
            }
            "auth/token/revoke-self" => {
                st.revoke_token(&token_id);
                return no_content();
            }
            _ => {}
        }
        if path.starts_with("sys/leases/") || path.starts_with("sys/renew") {
            return leases(&mut st, &token, path, &data);
        }
        if let Some(rest) = path.strip_prefix("sys/internal/ui/mounts/") {
            return ui_mounts(&st, &token, rest);
        }
        let Some((mount_path, mount)) = st.mount_of(path) else {
            return errors(
                StatusCode::NOT_FOUND,
                &[&format!(
                    "no handler for route \"{path}\". route entry not found."
                )],
            );
        };
        let acl_path = if list && !path.ends_with('/') {
            format!("{path}/")
        } else {
            path.to_string()
        };
        let caps = st.capabilities(&token, &acl_path);
        let allowed = match op {
            "update" => caps.iter().any(|c| c == "update" || c == "create"),
            op => caps.iter().any(|c| c == op),
        };
        if !allowed {
            return errors(
                StatusCode::FORBIDDEN,
                &["1 error occurred:\n\t* permission denied\n\n"],
            );
        }
        let rest = &path[mount_path.len().min(path.len())..];
        if mount.kind == "kv" && op == "read" {
            st.count("kv_reads");
        }
        match (mount.kind, mount.version) {
            ("kv", Some("2")) => kv2(&mut st, &mount_path, rest, op, query, &data),
            ("kv", _) => kv1(&mut st, path, op, &data),
            ("database", _) => database(&mut st, &token_id, path, rest, op),
            ("pki", _) => pki(&mut st, &self.inner.ca, &token_id, path, rest, op, &data),
            _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
        }
    }
}

async fn handle(
    Shared(s): Shared<VaultServer>,
    method: Method,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(path) = uri.path().strip_prefix("/v1/") else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    if path == "auth/aws/login" && method == Method::POST {
        return aws_login(&s, &body).await;
    }
    s.handle(method, path, &query, &headers, &body)
}

/// `auth/aws/login` (IAM): decodes the signed `sts:GetCallerIdentity`
/// request, checks the server-ID header was signed, replays the request to
/// the URL it was signed for, and logs in as the ARN STS answers with.
async fn aws_login(s: &VaultServer, body: &[u8]) -> Response {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let field = |k: &str| {
        data.get(k)
            .and_then(Value::as_str)
            .and_then(|v| b64.decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok())
    };
    let (Some(url), Some(request_body), Some(header_json)) = (
        field("iam_request_url"),
        field("iam_request_body"),
        field("iam_request_headers"),
    ) else {
        return errors(
            StatusCode::BAD_REQUEST,
            &["missing iam_request_url, iam_request_body or iam_request_headers"],
        );
    };
    if data["iam_http_request_method"].as_str() != Some("POST")
        || !request_body.contains("Action=GetCallerIdentity")
    {
        return errors(
            StatusCode::BAD_REQUEST,
            &["invalid request: only sts:GetCallerIdentity is accepted"],
        );
    }
    let headers: BTreeMap<String, Value> = serde_json::from_str(&header_json).unwrap_or_default();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| match v {
                Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("").to_string(),
                v => v.as_str().unwrap_or("").to_string(),
            })
    };
    let expected = s.state().aws_header.clone();
    if let Some(expected) = expected {
        let signed = header("authorization")
            .is_some_and(|a| a.to_ascii_lowercase().contains("x-vault-aws-iam-server-id"));
        if header("x-vault-aws-iam-server-id").as_deref() != Some(expected.as_str()) || !signed {
            return errors(
                StatusCode::BAD_REQUEST,
                &["error validating X-Vault-AWS-IAM-Server-ID header: missing or unsigned header"],
            );
        }
    }
    let mut replay = reqwest::Client::new().post(&url).body(request_body);
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if let Some(v) = v.as_array().and_then(|a| a.first()).and_then(Value::as_str) {
            replay = replay.header(k.as_str(), v);
        }
    }
    let answer = match replay.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => {
            return errors(
                StatusCode::BAD_REQUEST,
                &[&format!("error making upstream request: {e}")],
            );
        }
    };
    let arn = answer
        .1
        .split_once("<Arn>")
        .and_then(|(_, rest)| rest.split_once("</Arn>"))
        .map(|(arn, _)| arn.to_string());
    let (200, Some(arn)) = (answer.0, arn) else {
        return errors(
            StatusCode::BAD_REQUEST,
            &[&format!(
                "error making upstream request: received error code {} from STS",
                answer.0
            )],
        );
    };
    let role_name = data["role"]
        .as_str()
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| arn.rsplit('/').next().unwrap_or_default().to_string());
    let mut st = s.state();
    let Some(role) = st.aws_roles.get(&role_name).cloned() else {
        return errors(
            StatusCode::BAD_REQUEST,
            &[&format!("entry for role {role_name} not found")],
        );
    };
    if !role.arns.contains(&arn) {
        return errors(
            StatusCode::BAD_REQUEST,
            &[&format!(
                "IAM Principal \"{arn}\" does not belong to the role \"{role_name}\""
            )],
        );
    }
    let meta = BTreeMap::from([
        ("auth_type".to_string(), "iam".to_string()),
        ("canonical_arn".to_string(), arn.clone()),
        ("client_arn".to_string(), arn),
    ]);
    login_answer(&mut st, &role, "auth/aws/login", meta)
}

/// A successful login: a token for `role`, in Vault's login envelope.
fn login_answer(
    st: &mut State,
    role: &Role,
    path: &str,
    meta: BTreeMap<String, String>,
) -> Response {
    st.count("logins");
    let token = st.issue_token(
        role.policies.clone(),
        role.ttl.max(1),
        Some(if role.max_ttl == 0 {
            SYSTEM_TTL
        } else {
            role.max_ttl
        }),
        path,
        meta,
    );
    let now = st.now();
    ok(envelope(
        Value::Null,
        "",
        0,
        false,
        auth_block(&token, now),
        Value::Null,
    ))
}

fn login(st: &mut State, rest: &str, data: &Value) -> Option<Response> {
    let field = |k: &str| {
        data.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    match rest {
        "approle/login" => {
            let Some(role_id) = field("role_id") else {
                return Some(errors(StatusCode::BAD_REQUEST, &["missing role_id"]));
            };
            let Some(secret_id) = field("secret_id") else {
                return Some(errors(StatusCode::BAD_REQUEST, &["missing secret_id"]));
            };
            let found = st
                .approle
                .iter()
                .find(|(_, (_, id))| *id == role_id)
                .map(|(n, (r, _))| (n.clone(), r.clone()));
            let valid = match (&found, st.secret_ids.get(&secret_id)) {
                (Some((name, _)), Some((role, uses))) => role == name && *uses != u32::MAX,
                _ => false,
            };
            let (Some((name, role)), true) = (found, valid) else {
                return Some(errors(
                    StatusCode::BAD_REQUEST,
                    &["invalid role or secret ID"],
                ));
            };
            if let Some(entry) = st.secret_ids.get_mut(&secret_id) {
                match entry.1 {
                    0 => {}
                    1 => entry.1 = u32::MAX,
                    n => entry.1 = n - 1,
                }
            }
            let meta = BTreeMap::from([("role_name".to_string(), name)]);
            Some(login_answer(st, &role, "auth/approle/login", meta))
        }
        "kubernetes/login" => {
            let Some(role_name) = field("role") else {
                return Some(errors(StatusCode::BAD_REQUEST, &["missing role"]));
            };
            let Some(jwt) = field("jwt") else {
                return Some(errors(StatusCode::BAD_REQUEST, &["missing jwt"]));
            };
            let Some(role) = st.k8s.get(&role_name).cloned() else {
                return Some(errors(
                    StatusCode::BAD_REQUEST,
                    &[&format!("invalid role name \"{role_name}\"")],
                ));
            };
            if !role.jwts.contains(&jwt) {
                return Some(errors(StatusCode::FORBIDDEN, &["permission denied"]));
            }
            let meta = BTreeMap::from([
                ("role".to_string(), role_name),
                ("service_account_name".to_string(), "app".to_string()),
            ]);
            Some(login_answer(st, &role, "auth/kubernetes/login", meta))
        }
        _ => None,
    }
}

fn leases(st: &mut State, token: &Token, path: &str, data: &Value) -> Response {
    let op = path
        .trim_start_matches("sys/leases/")
        .trim_start_matches("sys/");
    let (op, id_in_path) = match op.split_once('/') {
        Some((op, id)) => (op, Some(id.to_string())),
        None => (op, None),
    };
    // Vault's default policy, which every token has, grants renew and
    // lookup; revoke needs update on its path.
    if op == "revoke"
        && !st
            .capabilities(token, "sys/leases/revoke")
            .iter()
            .any(|c| c == "update")
    {
        return errors(
            StatusCode::FORBIDDEN,
            &["1 error occurred:\n\t* permission denied\n\n"],
        );
    }
    let lease_id = data
        .get("lease_id")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or(id_in_path);
    let Some(lease_id) = lease_id.filter(|l| !l.is_empty()) else {
        return errors(StatusCode::BAD_REQUEST, &["lease_id must be specified"]);
    };
    let now = st.now();
    match op {
        "renew" => {
            if lease_id.starts_with("auth/") {
                return errors(
                    StatusCode::BAD_REQUEST,
                    &["tokens cannot be renewed through this endpoint"],
                );
            }
            let Some(lease) = st.leases.get(&lease_id).filter(|l| !l.revoked).cloned() else {
                return errors(StatusCode::BAD_REQUEST, &["lease not found"]);
            };
            if !lease.renewable {
                return errors(StatusCode::BAD_REQUEST, &["lease is not renewable"]);
            }
            let increment = data
                .get("increment")
                .and_then(parse_seconds)
                .filter(|i| *i > 0)
                .unwrap_or(lease.default_ttl);
            match renew_ttl(now, lease.issue_time, lease.max_ttl, increment) {
                Err(e) => errors(StatusCode::BAD_REQUEST, &[e]),
                Ok((ttl, warnings)) => {
                    let l = st.leases.get_mut(&lease_id).unwrap();
                    l.expire_time = now + ttl;
                    l.last_renewal = Some(now);
                    st.count("leases_renewed");
                    ok(envelope(
                        Value::Null,
                        &lease_id,
                        ttl,
                        true,
                        Value::Null,
                        warnings,
                    ))
                }
            }
        }
        "lookup" => match st.leases.get(&lease_id).filter(|l| !l.revoked) {
            None => errors(StatusCode::BAD_REQUEST, &["invalid lease"]),
            Some(l) => ok(envelope(
                json!({"id": lease_id, "issue_time": rfc3339(l.issue_time), "expire_time": rfc3339(l.expire_time),
                       "last_renewal": l.last_renewal.map(rfc3339), "renewable": l.renewable, "ttl": l.expire_time.saturating_sub(now)}),
                "",
                0,
                false,
                Value::Null,
                Value::Null,
            )),
        },
        "revoke" => {
            let sync = data.get("sync").and_then(|v| v.as_bool()).unwrap_or(true);
            if let Some(l) = st.leases.get_mut(&lease_id).filter(|l| !l.revoked) {
                l.revoked = true;
                st.count("leases_revoked");
            }
            if sync {
                no_content()
            } else {
                StatusCode::ACCEPTED.into_response()
            }
        }
        _ => errors(StatusCode::NOT_FOUND, &[]),
    }
}

fn ui_mounts(st: &State, token: &Token, rest: &str) -> Response {
    let cleaned = format!("{}/", rest.trim_matches('/'));
    let denied = || {
        errors(
            StatusCode::FORBIDDEN,
            &[&format!(
                "preflight capability check returned 403, please ensure client's policies grant access to path \"{cleaned}\""
            )],
        )
    };
    let Some((path, mount)) = st.mount_of(&cleaned) else {
        return denied();
    };
    let root = token.policies.iter().any(|p| p == "root");
    let any_access = root
        || token
            .policies
            .iter()
            .filter_map(|p| st.policies.get(p))
            .flatten()
            .any(|(pattern, caps)| {
                (pattern.starts_with(path.as_str()) || glob(pattern, &path))
                    && !caps.iter().any(|c| c == "deny")
            });
    if !any_access {
        return denied();
    }
    let options = match mount.version {
        Some(v) => json!({"version": v}),
        None => Value::Null,
    };
    ok(envelope(
        json!({"type": mount.kind, "options": options, "path": path, "accessor": format!("{}_{}", mount.kind, "1a2b3c4d"),
               "description": "", "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": false},
               "local": false, "seal_wrap": false, "external_entropy_access": false, "uuid": "00000000-0000-0000-0000-000000000001"}),
        "",
        0,
        false,
        Value::Null,
        Value::Null,
    ))
}

fn kv1(st: &mut State, path: &str, op: &str, data: &Value) -> Response {
    match op {
        "read" => match st.kv1.get(path) {
            None => errors(StatusCode::NOT_FOUND, &[]),
            Some(v) => {
                let ttl = v
                    .get("ttl")
                    .or(v.get("lease"))
                    .and_then(parse_seconds)
                    .unwrap_or(SYSTEM_TTL);
                ok(envelope(
                    v.clone(),
                    "",
                    ttl,
                    false,
                    Value::Null,
                    Value::Null,
                ))
            }
        },
        "list" => list_keys(st.kv1.keys(), path),
        "update" => {
            if data.as_object().is_none_or(|m| m.is_empty()) {
                return errors(StatusCode::BAD_REQUEST, &["missing data fields"]);
            }
            st.kv1.insert(path.to_string(), data.clone());
            no_content()
        }
        _ => {
            st.kv1.remove(path);
            no_content()
        }
    }
}

/// A list answer: the names directly under `dir`, folders with a trailing
/// `/`; 404 `{"errors":[]}` when there are none.
fn list_keys<'a>(all: impl Iterator<Item = &'a String>, dir: &str) -> Response {
    let dir = format!("{}/", dir.trim_end_matches('/'));
    let mut keys: Vec<String> = all
        .filter_map(|k| k.strip_prefix(dir.as_str()))
        .map(|k| match k.split_once('/') {
            Some((d, _)) => format!("{d}/"),
            None => k.to_string(),
        })
        .collect();
    keys.dedup();
    if keys.is_empty() {
        errors(StatusCode::NOT_FOUND, &[])
    } else {
        ok(envelope(
            json!({"keys": keys}),
            "",
            0,
            false,
            Value::Null,
            Value::Null,
        ))
    }
}

fn version_metadata(v: u64, kv: &KvVersion, custom: &Option<Value>) -> Value {
    json!({"created_time": rfc3339(kv.created), "custom_metadata": custom, "deletion_time": kv.deletion_time.map(rfc3339).unwrap_or_default(),
           "destroyed": kv.destroyed, "version": v})
}

fn kv2(
    st: &mut State,
    mount: &str,
    rest: &str,
    op: &str,
    query: &BTreeMap<String, String>,
    data: &Value,
) -> Response {
    let now = st.now();
    let (kind, p) = match rest.split_once('/') {
        Some((k @ ("data" | "metadata" | "delete" | "undelete" | "destroy"), p)) => (k, p),
        None if rest == "metadata" => ("metadata", ""),
        _ => {
            let verb = match op {
                "read" => "get",
                "list" => "list",
                "delete" => "delete",
                _ => "put",
            };
            let body = envelope(
                Value::Null,
                "",
                0,
                false,
                Value::Null,
                json!([format!(
                    "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the Vault CLI, use 'vault kv {verb}' for this operation."
                )]),
            );
            return (
                StatusCode::NOT_FOUND,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response();
        }
    };
    let key = format!("{mount}{p}");
    match (kind, op) {
        ("data", "read") => {
            let Some(secret) = st.kv2.get(&key) else {
                return errors(StatusCode::NOT_FOUND, &[]);
            };
            let want = query
                .get("version")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(secret.current);
            let Some(version) = secret.versions.get(&want) else {
                return errors(StatusCode::NOT_FOUND, &[]);
            };
            let meta = version_metadata(want, version, &secret.custom_metadata);
            let deleted = version.destroyed || version.deletion_time.is_some_and(|d| d <= now);
            let body = envelope(
                json!({"data": if deleted { Value::Null } else { version.data.clone().unwrap_or(Value::Null) }, "metadata": meta}),
                "",
                0,
                false,
                Value::Null,
                Value::Null,
            );
            let status = if deleted {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            (
                status,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        ("data", "update") => {
            let Some(new) = data.get("data").filter(|d| d.is_object()).cloned() else {
                return errors(StatusCode::BAD_REQUEST, &["no data provided"]);
            };
            let secret = st.kv2.entry(key).or_default();
            let cas = data.pointer("/options/cas");
            match cas {
                None if secret.cas_required => {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        &["check-and-set parameter required for this call"],
                    );
                }
                Some(c) => match c.as_u64() {
                    None => {
                        return errors(
                            StatusCode::BAD_REQUEST,
                            &["error parsing check-and-set parameter"],
                        );
                    }
                    Some(c) if c != secret.current => {
                        return errors(
                            StatusCode::BAD_REQUEST,
                            &["check-and-set parameter did not match the current version"],
                        );
                    }
                    Some(_) => {}
                },
                None => {}
            }
            secret.current += 1;
            let v = secret.current;
            let version = KvVersion {
                data: Some(new),
                created: now,
                deletion_time: None,
                destroyed: false,
            };
            let meta = version_metadata(v, &version, &secret.custom_metadata);
            secret.versions.insert(v, version);
            while secret.versions.len() > 10 {
                let oldest = *secret.versions.keys().next().unwrap();
                secret.versions.remove(&oldest);
            }
            ok(envelope(meta, "", 0, false, Value::Null, Value::Null))
        }
        ("data", "delete") => {
            if let Some(secret) = st.kv2.get_mut(&key) {
                let current = secret.current;
                if let Some(v) = secret.versions.get_mut(&current) {
                    v.deletion_time = Some(now);
                }
            }
            no_content()
        }
        ("delete" | "undelete" | "destroy", _) => {
            let versions: Vec<u64> = data
                .get("versions")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                .unwrap_or_default();
            if let Some(secret) = st.kv2.get_mut(&key) {
                for v in versions {
                    if let Some(version) = secret.versions.get_mut(&v) {
                        match kind {
                            "delete" => version.deletion_time = Some(now),
                            "undelete" => version.deletion_time = None,
                            _ => {
                                version.destroyed = true;
                                version.data = None;
                            }
                        }
                    }
                }
            }
            no_content()
        }
        ("metadata", "read") => {
            let Some(secret) = st.kv2.get(&key) else {
                return errors(StatusCode::NOT_FOUND, &[]);
            };
            let versions: serde_json::Map<String, Value> = secret
                .versions
                .iter()
                .map(|(v, kv)| (v.to_string(), json!({"created_time": rfc3339(kv.created), "deletion_time": kv.deletion_time.map(rfc3339).unwrap_or_default(), "destroyed": kv.destroyed})))
                .collect();
            let first = secret.versions.values().next().map_or(now, |v| v.created);
            let last = secret.versions.values().last().map_or(now, |v| v.created);
            ok(envelope(
                json!({"cas_required": secret.cas_required, "created_time": rfc3339(first), "current_version": secret.current,
                       "delete_version_after": "0s", "max_versions": 0, "oldest_version": secret.versions.keys().next().copied().unwrap_or(0),
                       "updated_time": rfc3339(last), "custom_metadata": secret.custom_metadata, "versions": versions}),
                "",
                0,
                false,
                Value::Null,
                Value::Null,
            ))
        }
        ("metadata", "list") => list_keys(st.kv2.keys(), &key),
        ("metadata", "update") => {
            let secret = st.kv2.entry(key).or_default();
            if let Some(c) = data.get("cas_required").and_then(|v| v.as_bool()) {
                secret.cas_required = c;
            }
            if let Some(m) = data.get("custom_metadata") {
                secret.custom_metadata = Some(m.clone());
            }
            no_content()
        }
        ("metadata", "delete") => {
            st.kv2.remove(&key);
            no_content()
        }
        _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
    }
}

fn database(st: &mut State, token: &str, path: &str, rest: &str, op: &str) -> Response {
    let Some(role_name) = rest.strip_prefix("creds/") else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    if op != "read" {
        return errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]);
    }
    let Some(role) = st.db_roles.get(role_name).cloned() else {
        return errors(
            StatusCode::BAD_REQUEST,
            &[&format!("unknown role: {role_name}")],
        );
    };
    let now = st.now();
    let lease_id = format!("{path}/{}", base62(24));
    let username = format!("v-token-{role_name}-{}", base62(20));
    let password = base62(20);
    st.leases.insert(
        lease_id.clone(),
        Lease {
            path: path.to_string(),
            issue_time: now,
            expire_time: now + role.ttl,
            max_ttl: role.max_ttl,
            default_ttl: role.ttl,
            renewable: true,
            token: token.to_string(),
            username: Some(username.clone()),
            last_renewal: None,
            revoked: false,
        },
    );
    st.issued
        .push((std::time::Instant::now(), username.clone()));
    st.count("leases_issued");
    ok(envelope(
        json!({"username": username, "password": password}),
        &lease_id,
        role.ttl,
        true,
        Value::Null,
        Value::Null,
    ))
}

fn pki(
    st: &mut State,
    ca: &Ca,
    token: &str,
    path: &str,
    rest: &str,
    op: &str,
    data: &Value,
) -> Response {
    let Some(role_name) = rest.strip_prefix("issue/") else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    if op != "update" {
        return errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]);
    }
    let Some(role) = st.pki_roles.get(role_name).cloned() else {
        return errors(
            StatusCode::BAD_REQUEST,
            &[&format!("unknown role: {role_name}")],
        );
    };
    let Some(cn) = data
        .get("common_name")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
    else {
        return errors(
            StatusCode::BAD_REQUEST,
            &[
                "the common_name field is required, or must be provided in a CSR with \"use_csr_common_name\" set to true, unless \"require_cn\" is set to false",
            ],
        );
    };
    let ttl = data
        .get("ttl")
        .and_then(parse_seconds)
        .filter(|t| *t > 0)
        .unwrap_or(role.max_ttl)
        .min(role.max_ttl);
    let now = st.now();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut sans = vec![cn.to_string()];
    if let Some(alt) = data.get("alt_names").and_then(|v| v.as_str()) {
        sans.extend(
            alt.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
    }
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now as i64 - 30).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp((now + ttl) as i64).unwrap();
    let serial: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (lease_id, lease_duration) = if role.generate_lease {
        let id = format!("{path}/{}", base62(24));
        st.leases.insert(
            id.clone(),
            Lease {
                path: path.to_string(),
                issue_time: now,
                expire_time: now + ttl,
                max_ttl: ttl,
                default_ttl: ttl,
                renewable: false,
                token: token.to_string(),
                username: None,
                last_renewal: None,
                revoked: false,
            },
        );
        st.count("leases_issued");
        (id, ttl)
    } else {
        (String::new(), 0)
    };
    let serial_hex: Vec<String> = serial.iter().map(|b| format!("{b:02x}")).collect();
    ok(envelope(
        json!({"certificate": cert.pem(), "issuing_ca": ca.pem, "private_key": key.serialize_pem(), "private_key_type": "ec",
               "serial_number": serial_hex.join(":"), "expiration": now + ttl}),
        &lease_id,
        lease_duration,
        false,
        Value::Null,
        Value::Null,
    ))
}
