//! Tokens: where they come from (a variable, a file, a login), and the
//! calls that log in, look up and renew them. These go through the same
//! request path as every read ([`Inner::send`]): one redirect policy, one
//! limit on answers, one way of naming failures. A login carries a
//! `secret_id` or a JWT, so it is held to the same rules as the token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AuthConfig, Inner, RoleId};
use crate::backend::aws::Aws;
use crate::backend::{ErrorKind, FetchError};
use crate::environment::Environment;

/// A Vault token and what is known of its life. The token itself never
/// appears in `Debug` output.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Token {
    /// The token itself (`X-Vault-Token`): secret, never logged.
    pub id: String,
    /// The token's accessor: names it in messages without giving it away.
    pub accessor: String,
    /// The policies attached to it, for access errors.
    pub policies: Vec<String>,
    /// The TTL asked for at each renewal (the login's), seconds.
    pub ttl: u64,
    /// Whether Vault allows it to be renewed; one that is not is replaced
    /// by a new login, when the auth method can log in.
    pub renewable: bool,
    /// Unix seconds when it stops working; `None`: never (root tokens).
    pub expires: Option<f64>,
    /// Unix seconds of the login or last renewal.
    pub refreshed: f64,
    /// A renewal came back shorter than asked: the token is at its max TTL
    /// and will be replaced by a new login, not renewed.
    #[serde(default)]
    pub capped: bool,
    /// How it was obtained ([`Auth::describe`]).
    pub method: String,
    /// This process logged in for it (not given, not handed over).
    #[serde(skip)]
    pub obtained_here: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("id", &"[redacted]")
            .field("accessor", &self.accessor)
            .field("policies", &self.policies)
            .field("ttl", &self.ttl)
            .field("renewable", &self.renewable)
            .field("expires", &self.expires)
            .field("capped", &self.capped)
            .finish()
    }
}

impl Token {
    /// Who the token is, for errors: never the token itself.
    pub fn who(&self) -> String {
        format!(
            "token accessor {}, policies [{}]",
            self.accessor,
            self.policies.join(", ")
        )
    }

    /// Seconds of life left, `None` for tokens that do not expire.
    pub fn left(&self, now: f64) -> Option<f64> {
        self.expires.map(|e| e - now)
    }

    /// The token of a login's `auth` block. Its TTL is clamped like every
    /// duration Vault sends ([`super::ttl::seconds`]).
    fn from_auth(body: &Value, action: &str, method: String) -> Result<Token, FetchError> {
        let auth = &body["auth"];
        let Some(id) = auth["client_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                action,
                "Vault's answer to the login carries no auth.client_token",
            )
            .hint("check that VAULT_ADDR points at Vault and the mount is an auth method"));
        };
        let now = super::ttl::now();
        let ttl = super::ttl::seconds(&auth["lease_duration"]);
        Ok(Token {
            id: id.to_string(),
            accessor: text(&auth["accessor"]),
            policies: strings(&auth["policies"]),
            ttl,
            renewable: auth["renewable"].as_bool().unwrap_or(false),
            expires: (ttl > 0).then_some(now + ttl as f64),
            refreshed: now,
            capped: false,
            method,
            obtained_here: true,
        })
    }
}

/// How tokens are obtained.
pub(super) enum Auth {
    /// A token given once (`VAULT_TOKEN`), or none at all.
    Static {
        token: Option<String>,
        source: String,
    },
    /// A token file, re-read whenever a new token is needed (a sink written
    /// by another agent); `home`: the CLI's `~/.vault-token`, used when
    /// nothing else is configured.
    File { path: PathBuf, home: bool },
    /// A login with the configured method (approle, kubernetes, aws);
    /// `aws` signs AWS IAM logins.
    Login {
        config: AuthConfig,
        aws: Option<Arc<Aws>>,
    },
}

impl Auth {
    pub(super) fn new(
        config: Option<AuthConfig>,
        env: &dyn Environment,
        aws: Option<Arc<Aws>>,
    ) -> Auth {
        match config {
            Some(AuthConfig::Token { file: Some(f) }) => Auth::File {
                path: f,
                home: false,
            },
            None | Some(AuthConfig::Token { file: None }) => {
                match env.var("VAULT_TOKEN").filter(|t| !t.trim().is_empty()) {
                    Some(t) => Auth::Static {
                        token: Some(t.trim().to_string()),
                        source: "VAULT_TOKEN".into(),
                    },
                    None => match env.var("HOME") {
                        Some(home) => Auth::File {
                            path: PathBuf::from(home).join(".vault-token"),
                            home: true,
                        },
                        None => Auth::Static {
                            token: None,
                            source: "no token".into(),
                        },
                    },
                }
            }
            Some(AuthConfig::Aws {
                mount,
                role,
                header_value,
                region,
                sts_endpoint,
            }) => Auth::Login {
                config: AuthConfig::Aws {
                    mount,
                    role,
                    header_value,
                    region,
                    sts_endpoint: sts_endpoint
                        .or_else(|| env.var("AWS_ENDPOINT_URL_STS"))
                        .or_else(|| env.var("AWS_ENDPOINT_URL")),
                },
                aws,
            },
            Some(config) => Auth::Login { config, aws },
        }
    }

    /// The method, for messages: never a credential.
    pub(super) fn describe(&self) -> String {
        match self {
            Auth::Static { source, .. } if source == "no token" => "no Vault token".into(),
            Auth::Static { source, .. } => format!("token from {source}"),
            Auth::File { path, .. } => format!("token from {}", path.display()),
            Auth::Login {
                config: AuthConfig::Token { .. },
                ..
            } => "token".into(),
            Auth::Login {
                config: AuthConfig::AppRole { mount, role_id, .. },
                ..
            } => format!(
                "approle login at auth/{mount} (role_id {})",
                match role_id {
                    RoleId::Value(_) => "from the configuration".to_string(),
                    RoleId::File(f) => format!("from {}", f.display()),
                }
            ),
            Auth::Login {
                config: AuthConfig::Kubernetes { mount, role, .. },
                ..
            } => {
                format!("kubernetes login at auth/{mount} as role \"{role}\"")
            }
            Auth::Login {
                config: AuthConfig::Aws { mount, role, .. },
                ..
            } => format!(
                "aws iam login at auth/{mount}{}",
                role.as_ref()
                    .map(|r| format!(" as role \"{r}\""))
                    .unwrap_or_default()
            ),
        }
    }

    /// Whether a new token can be had when the current one is rejected.
    pub(super) fn can_login(&self) -> bool {
        !matches!(self, Auth::Static { .. })
    }

    /// Whether envrender logs in itself (approle, kubernetes, aws): its
    /// tokens are its own, not a user's or an agent's.
    pub(super) fn logs_in(&self) -> bool {
        matches!(self, Auth::Login { config, .. } if !matches!(config, AuthConfig::Token { .. }))
    }

    /// A new token: a login, or the token given, looked up so that its
    /// accessor, policies and TTL are known.
    pub(super) async fn login(&self, inner: &Inner) -> Result<Token, FetchError> {
        let method = self.describe();
        let login = |mount: &str, body: Value, hint: String| {
            let method = method.clone();
            let path = format!("auth/{mount}/login");
            async move {
                let action = format!("POST /v1/{path}");
                let answer = call(
                    inner,
                    Method::POST,
                    &path,
                    None,
                    Some(&body),
                    &hint,
                    &method,
                )
                .await?;
                Token::from_auth(&answer, &action, method)
            }
        };
        match self {
            Auth::Static { token: None, .. } => Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                "login",
                "no Vault token: VAULT_TOKEN is not set and there is no ~/.vault-token",
            )
            .hint(
                "set VAULT_TOKEN, or configure [vault] auth (approle, kubernetes, aws, token_file)",
            )),
            Auth::Static { token: Some(t), .. } => lookup(inner, t.clone(), method).await,
            Auth::File { path, home: true } if !path.exists() => Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                "login",
                format!(
                    "no Vault token: VAULT_TOKEN is not set and there is no {}",
                    path.display()
                ),
            )
            .hint(
                "set VAULT_TOKEN, or configure [vault] auth (approle, kubernetes, aws, token_file)",
            )),
            Auth::File { path, .. } => {
                let t = read_secret_file(path, "token")?;
                lookup(inner, t, method).await
            }
            Auth::Login {
                config: AuthConfig::Token { .. },
                ..
            } => Err(FetchError::new(
                ErrorKind::Invalid,
                "vault",
                "login",
                "the token method has no login; give VAULT_TOKEN or a token_file",
            )),
            Auth::Login {
                config:
                    AuthConfig::AppRole {
                        mount,
                        role_id,
                        secret_id_file,
                    },
                ..
            } => {
                let role_id = match role_id {
                    RoleId::Value(v) => v.clone(),
                    RoleId::File(f) => read_secret_file(f, "role_id")?,
                };
                let secret_id = match secret_id_file {
                    Some(f) => read_secret_file(f, "secret_id")?,
                    None => String::new(),
                };
                login(
                    mount,
                    json!({ "role_id": role_id, "secret_id": secret_id }),
                    "Vault gives the same answer for an unknown role_id and a wrong, used-up or expired secret_id: check both, and the role's secret_id_num_uses and secret_id_ttl".into(),
                )
                .await
            }
            Auth::Login {
                config:
                    AuthConfig::Kubernetes {
                        mount,
                        role,
                        jwt_file,
                    },
                ..
            } => {
                let jwt = read_secret_file(jwt_file, "service-account token")?;
                login(
                    mount,
                    json!({ "role": role, "jwt": jwt }),
                    format!("check that role \"{role}\" exists on auth/{mount} and binds this pod's service account and namespace, and that the token's audience is one Vault accepts"),
                )
                .await
            }
            Auth::Login {
                config:
                    AuthConfig::Aws {
                        mount,
                        role,
                        header_value,
                        region,
                        sts_endpoint,
                    },
                aws,
            } => {
                let Some(aws) = aws else {
                    return Err(FetchError::new(
                        ErrorKind::Invalid,
                        "vault",
                        "login",
                        "AWS IAM login needs AWS credentials, and none are configured",
                    ));
                };
                let signed = sign_get_caller_identity(
                    aws,
                    region.as_deref(),
                    sts_endpoint.as_deref(),
                    header_value.as_deref(),
                )
                .await?;
                let mut body = json!({
                    "iam_http_request_method": "POST",
                    "iam_request_url": signed.url,
                    "iam_request_headers": signed.headers,
                    "iam_request_body": signed.body,
                });
                if let Some(role) = role {
                    body["role"] = json!(role);
                }
                login(
                    mount,
                    body,
                    "check that the role's bound_iam_principal_arn matches this AWS identity, and that header_value matches the mount's iam_server_id_header_value".into(),
                )
                .await
            }
        }
    }

    /// Renews the token for its TTL again; marks it capped when Vault gave
    /// less (its max TTL is near).
    pub(super) async fn renew(&self, inner: &Inner, token: &Token) -> Result<Token, FetchError> {
        let asked = token.ttl.max(1);
        let answer = call(
            inner,
            Method::POST,
            "auth/token/renew-self",
            Some(&token.id),
            Some(&json!({ "increment": format!("{asked}s") })),
            "the token cannot be renewed; envrender logs in again when it can",
            &self.describe(),
        )
        .await?;
        let got = super::ttl::seconds(&answer["auth"]["lease_duration"]).max(super::ttl::MIN_TTL);
        let now = super::ttl::now();
        let mut renewed = token.clone();
        renewed.expires = Some(now + got as f64);
        renewed.refreshed = now;
        renewed.capped = got < asked;
        Ok(renewed)
    }
}

/// A given token, looked up: it must work, and its accessor, policies and
/// TTL name it in errors and schedule its renewal.
async fn lookup(inner: &Inner, id: String, method: String) -> Result<Token, FetchError> {
    let answer = call(
        inner,
        Method::GET,
        "auth/token/lookup-self",
        Some(&id),
        None,
        "the token has expired, was revoked or is not a token of this Vault (or namespace)",
        &method,
    )
    .await?;
    let data = &answer["data"];
    let now = super::ttl::now();
    let left = super::ttl::seconds(&data["ttl"]);
    Ok(Token {
        id,
        accessor: text(&data["accessor"]),
        policies: strings(&data["policies"]),
        ttl: super::ttl::seconds(&data["creation_ttl"]),
        renewable: data["renewable"].as_bool().unwrap_or(false),
        expires: (left > 0).then_some(now + left as f64),
        refreshed: now,
        capped: false,
        method,
        obtained_here: false,
    })
}

fn read_secret_file(path: &std::path::Path, what: &str) -> Result<String, FetchError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        FetchError::new(
            ErrorKind::Invalid,
            "vault",
            "login",
            format!("cannot read the {what} file {}: {e}", path.display()),
        )
        .hint("check the path in [vault] auth and the file's permissions")
    })?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(FetchError::new(
            ErrorKind::Invalid,
            "vault",
            "login",
            format!("the {what} file {} is empty", path.display()),
        ));
    }
    Ok(text)
}

/// One call of the token API with `token` (or none, for a login): the
/// answer's body on success; otherwise Vault's status and error text, the
/// method that failed, and `hint` when the failure is about the
/// credentials. Never a credential.
async fn call(
    inner: &Inner,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    hint: &str,
    identity: &str,
) -> Result<Value, FetchError> {
    let action = format!("{method} /v1/{path}");
    let answer = inner
        .send(method, path, &[], token, body, false)
        .await
        .map_err(|mut e| {
            e.identity = Some(identity.to_string());
            e
        })?;
    if (200..300).contains(&answer.status) {
        return Ok(answer.body);
    }
    let kind = match answer.status {
        400 | 401 | 403 => ErrorKind::Denied,
        s if super::transient(s) => ErrorKind::Transient,
        _ => ErrorKind::Invalid,
    };
    // The caller's hint is about the credentials; a server that is busy,
    // sealed or failing says nothing about them.
    let hint = if kind == ErrorKind::Transient {
        "Vault is unavailable, sealed or overloaded; retried with backoff until the deadline"
    } else {
        hint
    };
    let mut err = FetchError::new(kind, "vault", action, answer.summary()).hint(hint);
    err.retry_after = answer.retry_after;
    err.identity = Some(identity.to_string());
    Err(err)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A signed `sts:GetCallerIdentity` request, as Vault's AWS auth wants it:
/// URL, body and headers, base64.
struct SignedRequest {
    url: String,
    body: String,
    headers: String,
}

async fn sign_get_caller_identity(
    aws: &Aws,
    region: Option<&str>,
    endpoint: Option<&str>,
    header_value: Option<&str>,
) -> Result<SignedRequest, FetchError> {
    use aws_sdk_sts::config::ProvideCredentials as _;
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;

    let failed = |message: String| {
        FetchError::new(ErrorKind::Invalid, "vault", "sign sts:GetCallerIdentity", message)
            .hint("AWS IAM login signs with the standard AWS credential chain (env, profile, web identity, container credentials, IMDS)")
    };
    let region = region.unwrap_or("us-east-1");
    let url = match endpoint {
        Some(e) => e.to_string(),
        None if region == "us-east-1" => "https://sts.amazonaws.com/".to_string(),
        None => format!("https://sts.{region}.amazonaws.com/"),
    };
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
        })
        .ok_or_else(|| failed(format!("the STS endpoint \"{url}\" is not a URL")))?;
    let provider = aws
        .sdk()
        .await
        .credentials_provider()
        .ok_or_else(|| failed("no AWS credentials provider is configured".into()))?;
    let credentials = provider.provide_credentials().await.map_err(|e| {
        failed(format!(
            "no AWS credentials: {}",
            crate::backend::error_chain(&e)
        ))
    })?;
    let identity = credentials.into();
    let body = "Action=GetCallerIdentity&Version=2011-06-15";
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host),
        (
            "content-type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        ),
    ];
    if let Some(v) = header_value {
        headers.push(("x-vault-aws-iam-server-id".into(), v.to_string()));
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| failed(format!("cannot sign: {e}")))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| failed(format!("cannot sign: {e}")))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| failed(format!("cannot sign: {e}")))?
        .into_parts();
    for (name, value) in instructions.headers() {
        headers.push((name.to_string(), value.to_string()));
    }
    let map: serde_json::Map<String, serde_json::Value> = headers
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::Array(vec![v.into()])))
        .collect();
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(SignedRequest {
        url: b64(url.as_bytes()),
        body: b64(body.as_bytes()),
        headers: b64(serde_json::Value::Object(map).to_string().as_bytes()),
    })
}

impl Inner {
    /// The current token: the one in use, else one handed over in the state
    /// file (if Vault still takes it), else a new login.
    pub(super) async fn token(&self) -> Result<Token, FetchError> {
        let mut slot = self.token.lock().await;
        let now = super::ttl::now();
        if let Some(t) = slot.as_ref()
            && t.left(now).is_none_or(|l| l > 1.0)
        {
            return Ok(t.clone());
        }
        if slot.is_none() {
            let handed = self
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .token
                .clone();
            if let Some(t) = handed
                .filter(|t| t.method == self.auth.describe() && t.left(now).is_none_or(|l| l > 2.0))
            {
                match lookup(self, t.id.clone(), t.method.clone()).await {
                    Ok(mut found) => {
                        tracing::info!(accessor = %found.accessor, "adopted the Vault token from the state file");
                        found.ttl = t.ttl.max(1);
                        found.capped = t.capped;
                        self.ledger
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .token = Some(found.clone());
                        *slot = Some(found.clone());
                        return Ok(found);
                    }
                    Err(e) if e.kind == ErrorKind::Transient => return Err(e),
                    Err(_) => {
                        tracing::info!(accessor = %t.accessor, "the Vault token in the state file is no longer valid; logging in");
                    }
                }
            }
        }
        let new = self.auth.login(self).await?;
        tracing::info!(
            method = %self.auth.describe(),
            accessor = %new.accessor,
            ttl_s = new.expires.map_or(0.0, |e| (e - now).max(0.0)) as u64,
            "{}",
            if self.auth.can_login() { "logged in to Vault" } else { "Vault token accepted" }
        );
        self.replace_token(&mut slot, new.clone(), false);
        Ok(new)
    }

    /// A new login after `stale` was rejected; when another task has
    /// already replaced it, that token.
    pub(super) async fn relogin(&self, stale: &Token) -> Result<Token, FetchError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && t.id != stale.id
        {
            return Ok(t.clone());
        }
        let new = self.auth.login(self).await?;
        tracing::info!(method = %self.auth.describe(), accessor = %new.accessor, "logged in to Vault again");
        if slot.is_none() {
            *slot = Some(stale.clone());
        }
        self.replace_token(&mut slot, new.clone(), true);
        Ok(new)
    }

    /// Puts `new` in use. What the old token issued stays in use — a new
    /// login is no reason to issue credentials again — but Vault revokes it
    /// with its token, so it is re-issued before the old token ends (at once
    /// when the old token was `revoked`).
    pub(super) fn replace_token(&self, slot: &mut Option<Token>, new: Token, revoked: bool) {
        let old = slot.replace(new.clone());
        let now = super::ttl::now();
        {
            let mut ledger = self
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let old = old.or_else(|| ledger.token.clone());
            if let Some(old) = old.filter(|o| o.accessor != new.accessor) {
                let end = if revoked { Some(now) } else { old.expires };
                if let Some(end) = end {
                    for h in ledger
                        .held
                        .values_mut()
                        .filter(|h| h.token_accessor == old.accessor)
                    {
                        h.bound_by_token(end, now);
                    }
                }
            }
            ledger.token = Some(new);
        }
        self.save();
        self.wake.notify_one();
    }

    /// Renews the token or logs in again, as its life requires.
    pub(super) async fn refresh_token(&self) -> Result<(), FetchError> {
        let current = self.token.lock().await.clone();
        let Some(current) = current else {
            return Ok(());
        };
        if current.renewable && !current.capped {
            let renewed = self.auth.renew(self, &current).await?;
            tracing::debug!(accessor = %renewed.accessor, capped = renewed.capped, "Vault token renewed");
            let mut slot = self.token.lock().await;
            if slot.as_ref().is_some_and(|t| t.id == current.id) {
                *slot = Some(renewed.clone());
                self.ledger
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .token = Some(renewed);
                drop(slot);
                self.save();
            }
            return Ok(());
        }
        if self.auth.can_login() {
            let new = self.auth.login(self).await?;
            tracing::info!(method = %self.auth.describe(), accessor = %new.accessor, "Vault token at its max TTL; logged in again");
            let mut slot = self.token.lock().await;
            self.replace_token(&mut slot, new, false);
        }
        Ok(())
    }
}

/// When the token needs attention next (renewal, or a new login), in unix
/// seconds; `None` when nothing can or need be done.
pub(super) fn token_due(t: &Token, can_login: bool) -> Option<f64> {
    let expires = t.expires?;
    let life = (expires - t.refreshed).max(0.0);
    if t.renewable && !t.capped {
        Some(t.refreshed + life * super::ttl::jitter(0.6, 0.7))
    } else if can_login {
        Some(t.refreshed + life * super::ttl::jitter(0.45, 0.55))
    } else {
        None
    }
}
