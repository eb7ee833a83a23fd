//! `vault:` — HashiCorp Vault (and OpenBao): KV v1 and v2, dynamic secrets
//! under leases, PKI certificates.
//!
//! A reference names the *logical* path, as `vault kv get` takes it:
//! `vault:secret/app#password`. The mount's type and KV version are looked up
//! once per mount (`sys/internal/ui/mounts/<path>`) and KV v2 paths are
//! rewritten (`secret/app` → `secret/data/app`, lists under `metadata/`).
//! `@N` reads version N of a KV v2 secret. Any other path is read as it is
//! written (`vault:database/creds/app#username`); with `?params` the request
//! is a write whose body is the parameters
//! (`vault:pki/issue/web?common_name=app.example.com#certificate`).
//!
//! Reads that issue something — a dynamic secret with a lease, a PKI
//! certificate — are never repeated to "refresh": what they returned is held
//! in a [`lease::Ledger`], answered from there while it is valid, renewed by
//! [`Vault::maintain`] (the scheduler watch mode runs), re-issued only when it
//! cannot be renewed any more, and optionally written to a state file so that
//! a sidecar started after the init container adopts the same credentials.
//!
//! Every call, logins and token calls included, goes through one request
//! path ([`Inner::send`]) on envrender's HTTP client. A secret injector needs
//! the whole envelope client libraries strip (lease ids and durations, KV v2
//! metadata, the bodies of 404s for deleted versions, `sys/leases`), and it
//! must hold every answer to the same rules: a size limit, no redirect that
//! takes the token elsewhere, clamped durations ([`super::http`]).

mod auth;
pub mod lease;
pub mod ttl;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, Url};
use serde_json::{Map, Value};

use super::aws::Aws;
use super::{
    Backend, BoxFuture, ErrorKind, FetchError, Fetched, Observation, PlannedCall, Release, Seen,
    WatchGroup, Watching,
};
use crate::environment::Environment;
use crate::reference::Source;
use crate::secret::Secret;

pub use auth::Token;

/// Where Kubernetes mounts the pod's service-account token.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Settings from `[vault]`; unset ones come from the standard variables.
#[derive(Clone, Debug, PartialEq)]
pub struct VaultConfig {
    /// The server's URL; `None`: `VAULT_ADDR`, else
    /// `https://127.0.0.1:8200`.
    pub address: Option<String>,
    /// The Vault Enterprise namespace sent with every request
    /// (`X-Vault-Namespace`); `None`: `VAULT_NAMESPACE`.
    pub namespace: Option<String>,
    /// A PEM CA bundle trusted besides the system's roots; `None`:
    /// `VAULT_CACERT`.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS, with `client_key`;
    /// `None`: `VAULT_CLIENT_CERT`.
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (PEM); `None`: `VAULT_CLIENT_KEY`.
    pub client_key: Option<PathBuf>,
    /// How to get a token; `None`: `VAULT_TOKEN`, else `~/.vault-token`.
    pub auth: Option<AuthConfig>,
    /// The handoff file: token, leases and certificates, shared by the init
    /// container and the sidecar.
    pub state_file: Option<PathBuf>,
    /// How often watch mode re-reads KV secrets.
    pub kv_refresh: Duration,
    /// The fraction of a certificate's lifetime after which it is re-issued.
    pub pki_reissue_at: f64,
    /// The share of a lease's TTL the old secret still has left when its
    /// replacement is in place (default a third): an app's connection pool
    /// may keep old credentials that long.
    pub lease_overlap: f64,
    /// [`VaultConfig::lease_overlap`] for particular request paths
    /// (`database/creds/app`).
    pub lease_overlap_for: Vec<(String, f64)>,
    /// Revoke every lease held, and the token envrender logged in for,
    /// when the process stops for good (see [`crate::backend::Release`]).
    pub revoke_on_stop: bool,
    /// KV mounts declared in the configuration (path with its trailing
    /// slash, KV v2?): paths under them are read without asking Vault for
    /// the mount's version first.
    pub kv_mounts: Vec<(String, bool)>,
    /// The largest answer read, in bytes; a larger one is an error.
    pub max_answer_size: u64,
    /// Origins (`https://host:port`) besides the configured address that
    /// Vault may redirect to with the token: the cluster's other nodes.
    pub redirect_origins: Vec<String>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            address: None,
            namespace: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            auth: None,
            state_file: None,
            kv_refresh: Duration::from_secs(300),
            pki_reissue_at: 0.67,
            lease_overlap: DEFAULT_LEASE_OVERLAP,
            lease_overlap_for: Vec::new(),
            revoke_on_stop: false,
            kv_mounts: Vec::new(),
            max_answer_size: crate::backend::http::VAULT_MAX_ANSWER,
            redirect_origins: Vec::new(),
        }
    }
}

/// The default [`VaultConfig::lease_overlap`]: a third of the TTL.
pub const DEFAULT_LEASE_OVERLAP: f64 = 1.0 / 3.0;

/// The largest [`VaultConfig::lease_overlap`]: a renewal has to find the
/// max TTL near with time to spare.
pub const MAX_LEASE_OVERLAP: f64 = 0.8;

impl VaultConfig {
    /// The lease overlap for secrets read at `path`.
    pub fn lease_overlap_of(&self, path: &str) -> f64 {
        let path = path.trim_matches('/');
        self.lease_overlap_for
            .iter()
            .find(|(p, _)| p == path)
            .map_or(self.lease_overlap, |(_, share)| *share)
    }
}

/// How envrender logs in to Vault.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthConfig {
    /// A token from a file (re-read at each use), else `VAULT_TOKEN`, else
    /// `~/.vault-token`.
    Token {
        /// The token file; `None`: `VAULT_TOKEN`, else `~/.vault-token`.
        file: Option<PathBuf>,
    },
    /// An AppRole login with a role_id and (usually) a secret_id.
    AppRole {
        /// The auth mount, trimmed of slashes (default `approle`).
        mount: String,
        /// The role_id, given or read from a file.
        role_id: RoleId,
        /// Absent when the role does not bind a secret_id.
        secret_id_file: Option<PathBuf>,
    },
    /// A Kubernetes login with the pod's service-account token.
    Kubernetes {
        /// The auth mount, trimmed of slashes (default `kubernetes`).
        mount: String,
        /// The Vault role to log in as.
        role: String,
        /// The service-account JWT, re-read at each login (projected tokens
        /// rotate).
        jwt_file: PathBuf,
    },
    /// A signed `sts:GetCallerIdentity` request, which Vault replays to AWS.
    Aws {
        /// The auth mount, trimmed of slashes (default `aws`).
        mount: String,
        /// The Vault role to log in as; `None`: not sent, Vault picks its
        /// default for the IAM principal.
        role: Option<String>,
        /// The mount's `iam_server_id_header_value`, signed into the request.
        header_value: Option<String>,
        /// The STS region to sign for (default us-east-1, the global endpoint).
        region: Option<String>,
        /// The STS URL the request is signed for; `None`:
        /// `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else the
        /// region's public endpoint.
        sts_endpoint: Option<String>,
    },
}

/// Where an AppRole login's role_id comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum RoleId {
    /// Given in the configuration (`role_id`).
    Value(String),
    /// Read from this file at each login (`role_id_file`).
    File(PathBuf),
}

/// The backend: a handle on the shared state, so that reads, renewals and
/// logins can run as tasks of their own.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    /// The address as it may be printed (no `user:password@`).
    shown: String,
    namespace: Option<String>,
    auth: auth::Auth,
    /// The current token; the async lock makes concurrent reads wait for one
    /// login instead of each logging in.
    token: tokio::sync::Mutex<Option<Token>>,
    mounts: Mutex<Vec<Mount>>,
    /// Held while a mount is looked up: concurrent reads under one mount
    /// wait for one lookup instead of each making it.
    mount_lookup: tokio::sync::Mutex<()>,
    ledger: Mutex<lease::Ledger>,
    /// Held while the state file is written, so writes land in order.
    saving: Mutex<()>,
    config: VaultConfig,
    /// Bumped whenever a held value is re-issued, renewed or in trouble
    /// (for watch mode).
    changes: tokio::sync::watch::Sender<u64>,
    /// Wakes the scheduler when something new is held.
    wake: tokio::sync::Notify,
}

/// What a mount is, from `sys/internal/ui/mounts`.
#[derive(Clone, Debug, PartialEq)]
struct Mount {
    /// With its trailing slash.
    path: String,
    kind: String,
    kv2: bool,
    /// From `[vault] kv_mounts`, not from Vault.
    declared: bool,
}

impl Mount {
    /// `e`, with a hint at the `kv_mounts` entry when this mount's version
    /// was declared rather than asked of Vault: a wrong declaration shows as
    /// Vault's 404 or 403 for the path it makes.
    fn as_declared(&self, mut e: FetchError) -> FetchError {
        if self.declared && matches!(e.kind, ErrorKind::NotFound | ErrorKind::Denied) {
            let (said, other) = if self.kv2 { (2, 1) } else { (1, 2) };
            let declared = format!(
                "[vault] kv_mounts declares {} as KV v{said}: if the mount is KV v{other}, correct it there (or remove it, and envrender asks Vault)",
                self.path
            );
            e.hint = Some(match e.hint.take() {
                Some(h) => format!("{h}; {declared}"),
                None => declared,
            });
        }
        e
    }
}

/// One HTTP answer from Vault. Not `Debug`: its body holds secrets.
struct Answer {
    status: u16,
    /// The JSON body; `Null` when empty.
    body: Value,
    /// `Retry-After` of a 429 or 503.
    retry_after: Option<Duration>,
}

impl Answer {
    /// The `errors` of an error body, joined.
    fn errors(&self) -> String {
        match self.body.get("errors").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(Value::as_str)
                .map(clean_error)
                .collect::<Vec<_>>()
                .join("; "),
            None => String::new(),
        }
    }

    /// Its status and Vault's error text, for a message.
    fn summary(&self) -> String {
        super::http_status(self.status, &self.errors())
    }

    fn invalid_token(&self) -> bool {
        self.status == 403 && self.errors().contains("invalid token")
    }
}

/// One of Vault's error strings on one line: a Go multierror
/// (`1 error occurred:\n\t* permission denied\n\n`) as its messages.
pub(crate) fn clean_error(e: &str) -> String {
    let lines: Vec<&str> = e
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.ends_with("occurred:") && l.contains(" error")))
        .map(|l| l.trim_start_matches("* "))
        .collect();
    lines.join("; ")
}

impl Vault {
    /// The backend, from `[vault]` and `VAULT_ADDR`, `VAULT_NAMESPACE`,
    /// `VAULT_CACERT`, `VAULT_CLIENT_CERT`/`VAULT_CLIENT_KEY`, `VAULT_TOKEN`.
    /// `aws` signs AWS IAM logins.
    pub fn new(
        config: VaultConfig,
        env: &dyn Environment,
        aws: Option<Arc<Aws>>,
    ) -> Result<Vault, String> {
        let address = config
            .address
            .clone()
            .or_else(|| env.var("VAULT_ADDR"))
            .unwrap_or_else(|| "https://127.0.0.1:8200".to_string());
        let base = Url::parse(&address)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| {
                format!(
                    "Vault address \"{}\" is not an http(s) URL such as https://vault:8200",
                    super::http::redacted_text(&address)
                )
            })?;
        super::http::check_userinfo("Vault", &base)?;
        super::warn_if_plain_http("Vault", &base);
        let namespace = config
            .namespace
            .clone()
            .or_else(|| env.var("VAULT_NAMESPACE"))
            .map(|n| n.trim_matches('/').to_string())
            .filter(|n| !n.is_empty());
        let ca = config
            .ca_file
            .clone()
            .or_else(|| env.var("VAULT_CACERT").map(PathBuf::from));
        let http = super::http_client(&base, !super::is_loopback(&base), ca.as_deref(), "Vault")?
            .timeout(Duration::from_secs(60))
            .redirect(super::http::vault_redirects(
                &base,
                config.redirect_origins.clone(),
            ));
        let http = super::with_client_certificate(
            http,
            config
                .client_cert
                .clone()
                .or_else(|| env.var("VAULT_CLIENT_CERT").map(PathBuf::from)),
            config
                .client_key
                .clone()
                .or_else(|| env.var("VAULT_CLIENT_KEY").map(PathBuf::from)),
            "Vault",
            "client_cert and client_key under [vault], or VAULT_CLIENT_CERT and VAULT_CLIENT_KEY",
        )?;
        let auth = auth::Auth::new(config.auth.clone(), env, aws);
        let declared = config
            .kv_mounts
            .iter()
            .map(|(path, kv2)| Mount {
                path: path.clone(),
                kind: "kv".to_string(),
                kv2: *kv2,
                declared: true,
            })
            .collect();
        let ledger = match &config.state_file {
            Some(path) => {
                lease::Ledger::load(path, &super::http::redacted(&base), namespace.as_deref())
            }
            None => lease::Ledger::default(),
        };
        Ok(Vault {
            inner: Arc::new(Inner {
                http,
                shown: super::http::redacted(&base),
                base,
                namespace,
                auth,
                token: tokio::sync::Mutex::new(None),
                mounts: Mutex::new(declared),
                mount_lookup: tokio::sync::Mutex::new(()),
                ledger: Mutex::new(ledger),
                saving: Mutex::new(()),
                config,
                changes: tokio::sync::watch::Sender::new(0),
                wake: tokio::sync::Notify::new(),
            }),
        })
    }

    /// A receiver that sees a new number each time a held value (dynamic
    /// secret, certificate) is re-issued, renewed, or fails to be kept.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Keeps the token and every held lease and certificate alive: renews
    /// early enough to keep their overlap, re-issues what cannot be renewed,
    /// re-authenticates when the token cannot be renewed. Runs until
    /// dropped.
    pub async fn maintain(&self) {
        lease::maintain(&self.inner).await
    }
}

/// The KV v2 path of a logical path under mount `m` (`shimKVv2Path`):
/// `secret/app` → `secret/data/app`; paths already under `data/` or
/// `metadata/` are left alone.
fn kv2_path(m: &str, logical: &str, part: &str) -> String {
    if logical == m || format!("{logical}/") == m {
        return format!("{m}{part}");
    }
    let rest = logical.strip_prefix(m).unwrap_or(logical);
    if rest.starts_with(&format!("{part}/")) || (part == "data" && rest.starts_with("metadata/")) {
        return logical.to_string();
    }
    format!("{m}{part}/{rest}")
}

/// The request a non-KV source makes: a read, or a write with its
/// parameters as the body.
fn request_of(source: &Source) -> (Method, Option<Value>) {
    if source.params.is_empty() {
        (Method::GET, None)
    } else {
        let body: Map<String, Value> = source
            .params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        (Method::POST, Some(Value::Object(body)))
    }
}

/// The identity of an issuing request, the key of what it returned.
fn request_key(source: &Source) -> String {
    let (method, _) = request_of(source);
    let mut key = format!("{method} {}", source.path);
    if !source.params.is_empty() {
        let q: Vec<String> = source
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        key.push('?');
        key.push_str(&q.join("&"));
    }
    key
}

/// The error of a request that got no answer from Vault (`detail`, after
/// "cannot reach Vault": where, and why). A certificate Vault's CA does not
/// vouch for, or a client certificate Vault refuses, is not transient:
/// retrying cannot change it.
fn unreachable(action: impl Into<String>, detail: &str) -> FetchError {
    let refused = super::client_certificate_refused(detail);
    let untrusted = detail.contains("certificate");
    let mut err = FetchError::new(
        if untrusted || refused {
            ErrorKind::Invalid
        } else {
            ErrorKind::Transient
        },
        "vault",
        action,
        format!("cannot reach Vault{detail}"),
    );
    err.hint = Some(if refused {
        "Vault refused the TLS handshake for want of a client certificate it trusts (mutual TLS): give one with VAULT_CLIENT_CERT and VAULT_CLIENT_KEY, or client_cert and client_key under [vault]".into()
    } else if untrusted {
        "Vault's TLS certificate is not trusted: give its CA with VAULT_CACERT or [vault] ca_file"
            .into()
    } else {
        "check VAULT_ADDR (a URL such as https://vault:8200), VAULT_CACERT and that Vault is running".into()
    });
    err
}

/// The statuses Vault answers when it is busy, sealed, failing or behind
/// (412: a performance standby not caught up): asked again later.
fn transient(status: u16) -> bool {
    matches!(status, 412 | 429 | 500 | 502 | 503 | 504)
}

fn hcl(path: &str, caps: &str) -> String {
    format!("path \"{path}\" {{ capabilities = [{caps}] }}")
}

impl Inner {
    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        {
            let mut segments = url.path_segments_mut().expect("an http(s) URL has a path");
            segments.pop_if_empty().push("v1");
            let parts: Vec<&str> = path.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                // Keep a trailing slash (lists), drop empty inner segments.
                if !part.is_empty() || i == parts.len() - 1 && i > 0 {
                    segments.push(part);
                }
            }
        }
        url
    }

    /// One request with the given token (or none). Connection failures are
    /// transient; when `issuing` and the request may have reached Vault, the
    /// failure is not retried, because a second read would issue a second
    /// credential.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        token: Option<&str>,
        body: Option<&Value>,
        issuing: bool,
    ) -> Result<Answer, FetchError> {
        let mut url = self.url(path);
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        let mut request = self
            .http
            .request(method.clone(), url)
            .header("X-Vault-Request", "true");
        if let Some(t) = token {
            request = request.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let action = format!("{method} /v1/{path}");
        let response = request.send().await.map_err(|e| {
            let maybe_sent = !e.is_connect();
            let detail = format!(" at {}: {}", self.shown, super::error_chain(&e));
            if e.is_redirect() {
                return FetchError::new(ErrorKind::Invalid, "vault", action.clone(), format!("refused a redirect{detail}"))
                    .hint("envrender carries a Vault token only to the configured address (and [vault] redirect_origins), and never off https");
            }
            let mut err = unreachable(action.clone(), &detail);
            if err.kind == ErrorKind::Transient && issuing && maybe_sent {
                err.kind = ErrorKind::Invalid;
                err.hint = Some(
                    "not repeated: each read of this path issues new credentials, and the request may have reached Vault; run again".into(),
                );
            }
            err
        })?;
        let status = response.status().as_u16();
        let (retry_after, bytes) = super::http::read_answer(
            response,
            self.config.max_answer_size,
            "vault",
            &action,
            "[vault] max_answer_size",
        )
        .await?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                FetchError::new(
                    ErrorKind::Transient,
                    "vault",
                    action,
                    format!("HTTP {status}: the answer is not Vault's JSON"),
                )
                .hint("check that VAULT_ADDR points at Vault and not at a proxy or load balancer page")
            })?
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    /// A request with the current token. A 403 saying the token is invalid
    /// (expired, revoked) makes one new login and one replay.
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        issuing: bool,
    ) -> Result<(Answer, Token), FetchError> {
        let token = self.token().await?;
        let answer = self
            .send(method.clone(), path, query, Some(&token.id), body, issuing)
            .await?;
        if !answer.invalid_token() || !self.auth.can_login() {
            return Ok((answer, token));
        }
        tracing::info!(
            accessor = %token.accessor,
            "Vault says the token is no longer valid; logging in again"
        );
        let token = self.relogin(&token).await?;
        let answer = self
            .send(method, path, query, Some(&token.id), body, issuing)
            .await?;
        Ok((answer, token))
    }

    /// The error for a non-success answer to `action` on `path`.
    fn status_error(&self, action: &str, path: &str, answer: &Answer, token: &Token) -> FetchError {
        let text = answer.errors();
        let status = answer.status;
        let (kind, hint) = match status {
            403 if answer.invalid_token() => (
                ErrorKind::Denied,
                Some(if self.auth.can_login() {
                    "the token was rejected again right after a new login; check the auth method's role and Vault's logs".to_string()
                } else {
                    "the token has expired or was revoked; give a valid token (VAULT_TOKEN, ~/.vault-token) or configure [vault] auth so envrender can log in".to_string()
                }),
            ),
            403 => {
                let caps = if action.starts_with("GET") && path.ends_with('/') {
                    "\"list\""
                } else if action.starts_with("GET") {
                    "\"read\""
                } else {
                    "\"create\", \"update\""
                };
                (
                    ErrorKind::Denied,
                    Some(format!(
                        "the token's policies ({}) lack {caps} on {path}; add to one of them: {}",
                        token.policies.join(", "),
                        hcl(path, caps)
                    )),
                )
            }
            404 => (ErrorKind::NotFound, None),
            s if transient(s) => (
                ErrorKind::Transient,
                (status == 503 && text.contains("sealed"))
                    .then(|| "Vault is sealed; unseal it".to_string()),
            ),
            _ => (ErrorKind::Invalid, None),
        };
        let mut e = FetchError::new(kind, "vault", action, super::http_status(status, &text));
        e.hint = hint;
        e.retry_after = answer.retry_after;
        e.identity = Some(self.identity(token));
        e
    }

    /// Who asks, for messages: the auth method and the token's accessor
    /// and policies (never the token).
    fn identity(&self, token: &Token) -> String {
        format!("{} ({})", self.auth.describe(), token.who())
    }

    fn known_mount(&self, logical: &str) -> Option<Mount> {
        let mounts = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        mounts
            .iter()
            .filter(|m| logical.starts_with(&m.path) || format!("{logical}/") == m.path)
            .max_by_key(|m| m.path.len())
            .cloned()
    }

    /// The mount a logical path is under; looked up once per mount.
    async fn mount(&self, logical: &str) -> Result<Mount, FetchError> {
        if let Some(m) = self.known_mount(logical) {
            return Ok(m);
        }
        let _one_at_a_time = self.mount_lookup.lock().await;
        if let Some(m) = self.known_mount(logical) {
            return Ok(m);
        }
        let path = format!("sys/internal/ui/mounts/{}", logical.trim_end_matches('/'));
        let (answer, token) = self.request(Method::GET, &path, &[], None, false).await?;
        let mount = match answer.status {
            200 => {
                let data = &answer.body["data"];
                let mut mount_path = data["path"].as_str().unwrap_or_default().to_string();
                if let Some(ns) = &self.namespace {
                    mount_path = mount_path
                        .strip_prefix(&format!("{ns}/"))
                        .map(str::to_string)
                        .unwrap_or(mount_path);
                }
                let kind = data["type"].as_str().unwrap_or_default().to_string();
                let kv2 = kind == "kv" && data["options"]["version"].as_str() == Some("2");
                if mount_path.is_empty() {
                    // No path in the answer: the first segment is the mount.
                    mount_path = format!("{}/", logical.split('/').next().unwrap_or(logical));
                }
                Mount {
                    path: mount_path,
                    kind,
                    kv2,
                    declared: false,
                }
            }
            // Vault older than the endpoint: plain paths, as KV v1.
            404 => Mount {
                path: format!("{}/", logical.split('/').next().unwrap_or(logical)),
                kind: "kv".to_string(),
                kv2: false,
                declared: false,
            },
            403 if !answer.invalid_token() => {
                let first = logical.split('/').next().unwrap_or(logical);
                let rest = logical.strip_prefix(&format!("{first}/")).unwrap_or("");
                let mut e = self.status_error(&format!("GET /v1/{path}"), &path, &answer, &token);
                e.message = format!(
                    "HTTP 403: the token's policies give no access under the mount of {logical} (or no mount serves it)"
                );
                e.hint = Some(format!(
                    "grant read on the secret, e.g. for a KV v2 mount {}, and list on {first}/metadata/{} for prefixes; for KV v1 or other engines, {}",
                    hcl(&format!("{first}/data/{rest}"), "\"read\""),
                    rest.rsplit_once('/')
                        .map_or("*".to_string(), |(d, _)| format!("{d}/*")),
                    hcl(logical, "\"read\"")
                ));
                return Err(e);
            }
            _ => {
                return Err(self.status_error(&format!("GET /v1/{path}"), &path, &answer, &token));
            }
        };
        tracing::debug!(mount = %mount.path, kind = %mount.kind, kv2 = mount.kv2, "Vault mount detected");
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(mount.clone());
        Ok(mount)
    }

    async fn fetch_one(&self, source: &Source) -> Result<Fetched, FetchError> {
        let mount = self.mount(&source.path).await?;
        if mount.kind == "kv" || mount.kind == "generic" {
            return self
                .fetch_kv(source, &mount)
                .await
                .map_err(|e| mount.as_declared(e));
        }
        if source.version.is_some() {
            return Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                "read",
                format!(
                    "@{} asks for a version, but {} is a {} mount; only KV v2 has versions",
                    source.version.as_deref().unwrap_or_default(),
                    mount.path,
                    mount.kind
                ),
            ));
        }
        self.read_issued(source, &mount).await
    }

    /// A read under a KV mount: one secret, or a folder as a map.
    async fn fetch_kv(&self, source: &Source, mount: &Mount) -> Result<Fetched, FetchError> {
        if source.is_prefix() {
            return self.read_kv_prefix(source, mount).await;
        }
        if !source.params.is_empty() {
            return Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                "read",
                format!("{} is a KV mount; its reads take no parameters", mount.path),
            )
            .hint("remove the ?parameters; use @N for a KV v2 version"));
        }
        self.read_kv(source, mount)
            .await
            .map(|(value, version)| Fetched {
                value: Secret::new(value),
                version,
                lease: None,
            })
    }

    /// One KV secret: its data and, for KV v2, its version.
    async fn read_kv(
        &self,
        source: &Source,
        mount: &Mount,
    ) -> Result<(Value, Option<String>), FetchError> {
        let logical = source.path.as_str();
        if !mount.kv2 {
            if let Some(v) = &source.version {
                return Err(FetchError::new(
                    ErrorKind::Invalid,
                    "vault",
                    "read",
                    format!(
                        "@{v} asks for a version, but {} is a KV v1 mount, which keeps none",
                        mount.path
                    ),
                )
                .hint(format!("write vault:{logical} for the current value")));
            }
            let (answer, token) = self.request(Method::GET, logical, &[], None, false).await?;
            return match answer.status {
                200 => Ok((answer.body["data"].clone(), None)),
                _ => {
                    Err(self.status_error(&format!("GET /v1/{logical}"), logical, &answer, &token))
                }
            };
        }
        let path = kv2_path(&mount.path, logical, "data");
        let query: Vec<(&str, String)> = source
            .version
            .iter()
            .map(|v| ("version", v.clone()))
            .collect();
        let (answer, token) = self
            .request(Method::GET, &path, &query, None, false)
            .await?;
        let action = format!("GET /v1/{path}");
        match answer.status {
            200 => {
                let version = answer.body["data"]["metadata"]["version"]
                    .as_u64()
                    .map(|v| v.to_string());
                Ok((answer.body["data"]["data"].clone(), version))
            }
            404 => {
                let metadata = &answer.body["data"]["metadata"];
                let mut e = self.status_error(&action, &path, &answer, &token);
                if let Some(when) = metadata["deletion_time"].as_str().filter(|t| !t.is_empty()) {
                    e.message = format!(
                        "HTTP 404: version {} was deleted at {when}",
                        metadata["version"]
                    );
                    e.hint = Some(format!(
                        "undelete it (vault kv undelete -versions={} {logical}) or write a new version",
                        metadata["version"]
                    ));
                } else if metadata["destroyed"].as_bool() == Some(true) {
                    e.message = format!("HTTP 404: version {} was destroyed", metadata["version"]);
                } else if let Some(v) = &source.version {
                    e.message = format!("HTTP 404: {logical} has no version {v}");
                }
                Err(e)
            }
            _ => Err(self.status_error(&action, &path, &answer, &token)),
        }
    }

    /// Every secret directly under a KV folder, as a map by name.
    async fn read_kv_prefix(&self, source: &Source, mount: &Mount) -> Result<Fetched, FetchError> {
        let logical = source.path.as_str();
        let list_path = if mount.kv2 {
            kv2_path(&mount.path, logical, "metadata")
        } else {
            logical.to_string()
        };
        let list_path = if list_path.ends_with('/') {
            list_path
        } else {
            format!("{list_path}/")
        };
        let (answer, token) = self
            .request(
                Method::GET,
                &list_path,
                &[("list", "true".into())],
                None,
                false,
            )
            .await?;
        let keys: Vec<String> = match answer.status {
            200 => answer.body["data"]["keys"]
                .as_array()
                .map(|k| {
                    k.iter()
                        .filter_map(Value::as_str)
                        .filter(|k| !k.ends_with('/'))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            404 => Vec::new(),
            _ => {
                return Err(self.status_error(
                    &format!("LIST /v1/{list_path}"),
                    &list_path,
                    &answer,
                    &token,
                ));
            }
        };
        let mut map = Map::new();
        let mut versions = Vec::new();
        for k in keys {
            let child = Source {
                path: format!("{logical}{k}"),
                version: None,
                ..source.clone()
            };
            match self.read_kv(&child, mount).await {
                Ok((value, version)) => {
                    if let Some(v) = version {
                        versions.push(format!("{k}:{v}"));
                    }
                    map.insert(k, value);
                }
                // Deleted between the list and the read.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Fetched {
            value: Secret::new(Value::Object(map)),
            version: (mount.kv2).then(|| versions.join(",")),
            lease: None,
        })
    }

    /// A path of another engine: answered from what is held when that is
    /// still good, else read (or written, with parameters) once.
    async fn read_issued(&self, source: &Source, mount: &Mount) -> Result<Fetched, FetchError> {
        let key = request_key(source);
        if let Some(held) = self.adopt(&key).await? {
            return Ok(held.fetched());
        }
        let (method, body) = request_of(source);
        let path = source.path.as_str();
        let (answer, token) = self
            .request(method.clone(), path, &[], body.as_ref(), true)
            .await?;
        let action = format!("{method} /v1/{path}");
        if answer.status != 200 {
            let mut e = self.status_error(&action, path, &answer, &token);
            if answer.status == 204 {
                e.kind = ErrorKind::NotFound;
                e.message = "HTTP 204: Vault returned no data".into();
            }
            return Err(e);
        }
        let held = lease::Held::from_answer(
            key.clone(),
            method.as_str(),
            source,
            &mount.kind,
            &answer.body,
            &token.accessor,
            &self.config,
        );
        match held {
            Some(held) => {
                tracing::info!(
                    request = %held.key,
                    lease = %held.lease_id,
                    ttl_s = held.duration,
                    "Vault issued a new secret"
                );
                let fetched = held.fetched();
                self.hold(held);
                Ok(fetched)
            }
            None => Ok(Fetched::new(Secret::new(answer.body["data"].clone()))),
        }
    }

    fn hold(&self, held: lease::Held) {
        {
            let mut ledger = self
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ledger.held.insert(held.key.clone(), held);
        }
        self.save();
        self.wake.notify_one();
    }

    /// Writes the state file, when there is one.
    fn save(&self) {
        if let Some(path) = &self.config.state_file {
            let _serial = self
                .saving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let snapshot = self
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .snapshot(&self.shown, self.namespace.as_deref());
            if let Err(e) = lease::write_state(path, &snapshot) {
                tracing::warn!(file = %path.display(), error = %e, "cannot write the Vault state file");
            }
        }
    }
}

impl Backend for Vault {
    fn name(&self) -> &'static str {
        "vault"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        let target = Some(self.inner.shown.clone());
        let mut calls = vec![PlannedCall {
            target: target.clone(),
            action: "login".into(),
            detail: self.inner.auth.describe(),
        }];
        let mut mounts: Vec<&str> = sources
            .iter()
            // Declared mounts need no lookup; detected ones were (or will be)
            // looked up once.
            .filter(|s| !self.inner.known_mount(&s.path).is_some_and(|m| m.declared))
            .map(|s| s.path.split('/').next().unwrap_or_default())
            .collect();
        mounts.sort();
        mounts.dedup();
        for m in mounts {
            calls.push(PlannedCall {
                target: target.clone(),
                action: "GET sys/internal/ui/mounts".into(),
                detail: format!("{m}/ (type and KV version, once)"),
            });
        }
        for s in sources {
            let (method, _) = request_of(s);
            calls.push(PlannedCall {
                target: target.clone(),
                action: if s.is_prefix() {
                    "LIST + GET".into()
                } else {
                    method.to_string()
                },
                detail: format!(
                    "{}{}",
                    s.path,
                    s.version
                        .as_ref()
                        .map(|v| format!(" version {v}"))
                        .unwrap_or_default()
                ),
            });
        }
        calls
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(super::fetch_each("vault", sources, |s| {
            let inner = self.inner.clone();
            async move { inner.fetch_one(&s).await }
        }))
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }

    fn release(&self, why: Release) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.release(why))
    }
}

impl Watching for Vault {
    fn watches(&self, sources: &[Source]) -> Vec<String> {
        if sources.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "{} source{}: KV secrets re-read every {} (a change is a new version); leases renewed, and re-issued at their max TTL while the old one keeps {:.0}% of its TTL (lease_overlap); certificates re-issued at {:.0}% of their lifetime",
            sources.len(),
            if sources.len() == 1 { "" } else { "s" },
            humantime::format_duration(self.inner.config.kv_refresh),
            self.inner.config.lease_overlap * 100.0,
            self.inner.config.pki_reissue_at * 100.0,
        )]
    }

    fn poll_interval(&self) -> Duration {
        self.inner.config.kv_refresh
    }

    /// What the scheduler holds (leases, certificates) is one group,
    /// looked at when it announces a change; KV secrets are another, read
    /// again every `kv_refresh`. A re-issue never re-reads KV, and a KV
    /// read that fails never holds back a re-issued secret.
    fn watch_groups(&self, sources: &[Source]) -> Vec<WatchGroup> {
        let (held, read): (Vec<usize>, Vec<usize>) = {
            let ledger = self
                .inner
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (0..sources.len()).partition(|&i| ledger.held.contains_key(&request_key(&sources[i])))
        };
        [WatchGroup::pushed(held), WatchGroup::polled(read)]
            .into_iter()
            .filter(|g| !g.members.is_empty())
            .collect()
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(Vault::changes(self))
    }

    fn background(&self) -> Option<BoxFuture<'static, ()>> {
        let vault = self.clone();
        Some(Box::pin(async move { vault.maintain().await }))
    }

    /// Held values (leases, certificates) are compared with the ledger,
    /// which the scheduler keeps current, with no request; KV secrets are
    /// read again and compared by version.
    fn observe<'a>(&'a self, known: &'a [(Source, Seen)]) -> BoxFuture<'a, Vec<Observation>> {
        Box::pin(async move {
            // Held values from the ledger; the rest (KV) read again, concurrently.
            let held: Vec<Option<lease::Held>> = {
                let ledger = self
                    .inner
                    .ledger
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                known
                    .iter()
                    .map(|(s, _)| ledger.held.get(&request_key(s)).cloned())
                    .collect()
            };
            let reread: Vec<Source> = known
                .iter()
                .zip(&held)
                .filter(|(_, h)| h.is_none())
                .map(|((s, _), _)| s.clone())
                .collect();
            let mut fresh_reads = self.fetch(&reread).await.into_iter();
            let mut out = Vec::with_capacity(known.len());
            for ((_, old), held) in known.iter().zip(held) {
                let fresh = match held {
                    Some(h) => match &h.trouble {
                        Some(why) => Err(FetchError::new(
                            ErrorKind::Transient,
                            "vault",
                            if h.lease_id.is_empty() {
                                "re-issue"
                            } else {
                                "PUT /v1/sys/leases/renew"
                            },
                            why.clone(),
                        )),
                        None => Ok(h.fetched()),
                    },
                    None => fresh_reads.next().unwrap_or_else(|| {
                        Err(FetchError::new(
                            ErrorKind::Transient,
                            "vault",
                            "read",
                            "no answer",
                        ))
                    }),
                };
                out.push(Observation::compare(
                    old.as_ref(),
                    fresh,
                    Fetched::differs_from,
                ));
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn multierrors_read_as_their_messages() {
        assert_eq!(
            clean_error("1 error occurred:\n\t* permission denied\n\n"),
            "permission denied"
        );
        assert_eq!(clean_error("2 errors occurred:\n\t* a\n\t* b\n\n"), "a; b");
        assert_eq!(clean_error("lease not found"), "lease not found");
    }

    #[test]
    fn kv2_paths_are_rewritten_like_the_vault_cli() {
        assert_eq!(
            kv2_path("secret/", "secret/app/db", "data"),
            "secret/data/app/db"
        );
        assert_eq!(kv2_path("secret/", "secret", "data"), "secret/data");
        assert_eq!(
            kv2_path("secret/", "secret/data/app", "data"),
            "secret/data/app"
        );
        assert_eq!(
            kv2_path("secret/", "secret/app/", "metadata"),
            "secret/metadata/app/"
        );
        assert_eq!(kv2_path("team/kv/", "team/kv/x", "data"), "team/kv/data/x");
    }

    #[test]
    fn requests_with_parameters_are_writes() {
        let r = crate::reference::parse("vault:pki/issue/web?ttl=1h&common_name=a.example.com")
            .unwrap();
        let (method, body) = request_of(&r.source);
        assert_eq!(method, Method::POST);
        assert_eq!(
            body.unwrap(),
            json!({"common_name": "a.example.com", "ttl": "1h"})
        );
        assert_eq!(
            request_key(&r.source),
            "POST pki/issue/web?common_name=a.example.com&ttl=1h"
        );
        let r = crate::reference::parse("vault:database/creds/app#username").unwrap();
        assert_eq!(request_of(&r.source).0, Method::GET);
        assert_eq!(request_key(&r.source), "GET database/creds/app");
    }

    #[test]
    fn urls_keep_list_slashes() {
        let v = Vault::new(
            VaultConfig {
                address: Some("http://127.0.0.1:8200".into()),
                ..VaultConfig::default()
            },
            &crate::environment::MapEnv::default(),
            None,
        )
        .unwrap();
        assert_eq!(
            v.inner.url("secret/metadata/app/").as_str(),
            "http://127.0.0.1:8200/v1/secret/metadata/app/"
        );
        assert_eq!(
            v.inner.url("secret/data/a b").as_str(),
            "http://127.0.0.1:8200/v1/secret/data/a%20b"
        );
    }
}
