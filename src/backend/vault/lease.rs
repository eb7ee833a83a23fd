//! What Vault issued and envrender holds: dynamic secrets under leases and
//! PKI certificates; when each needs renewing or re-issuing; the state file
//! that hands them (and the token) from the init container to the sidecar;
//! and the scheduler that keeps them alive.
//!
//! Timing, in the spirit of Vault's own `LifetimeWatcher`, around the
//! lease overlap `s` (`lease_overlap`, a third of the TTL by default): the
//! share of its TTL an old secret still has when its replacement is in
//! place.
//! - a renewable lease is renewed when `s` + 12–17% of its TTL is left (at
//!   60–70% of it for a small overlap), asking for its original TTL again;
//! - a renewal that comes back shorter than asked means the max TTL is near:
//!   the lease is then re-issued, once, when `s` + 5–10% of its TTL is left
//!   (at once if less is left already);
//! - a non-renewable lease is re-read when `s` + 5–10% of its TTL is left;
//! - a certificate is re-issued at `pki_reissue_at` (±3%) of its lifetime;
//! - a lease whose renewal fails for good (revoked, expired, not found) is
//!   re-issued at once; transient failures back off exponentially, always
//!   inside the lease's remaining life;
//! - everything a token issued goes with that token: when the token is
//!   replaced by a new login, what it issued is kept until shortly before
//!   the old token ends, then re-issued — not on the login itself.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ttl::{MAX_CERT_LIFETIME, MIN_TTL, SHORT_TTL, jitter, now, seconds, short_backoff};
use super::{Inner, Token, VaultConfig};
use crate::backend::{ErrorKind, FetchError, Fetched, Lease, Release};
use crate::backoff::Backoff;
use crate::reference::Source;
use crate::secret::Secret;

/// Between failed renewals of a lease or the token: 1 s doubling to a
/// minute (jittered where it is used, and within what is left of a lease).
const RENEW_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// One answer that issued something: a leased secret or a certificate.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Held {
    /// The request that issued it (`GET database/creds/app`).
    pub key: String,
    /// The HTTP method of that request: `GET`, or `POST` with parameters.
    pub method: String,
    /// The request's logical path (`database/creds/app`).
    pub path: String,
    /// The reference's `?params`, sent as the body of a write; empty for
    /// a read.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// What Vault returned: secret, never logged.
    pub data: Value,
    /// Empty for a certificate issued without a lease.
    pub lease_id: String,
    /// Whether Vault allows the lease to be renewed; never for a
    /// certificate.
    pub renewable: bool,
    /// The TTL first granted (for a certificate, its lifetime), seconds.
    pub duration: u64,
    /// Unix seconds.
    pub issued: f64,
    /// When it stops working as far as is known (lease end, certificate
    /// NotAfter, the end of the token that issued it).
    pub expires: f64,
    /// A PKI certificate: re-issued at `pki_reissue_at` of its lifetime,
    /// never renewed.
    pub certificate: bool,
    /// The accessor of the token that issued it.
    pub token_accessor: String,
    /// It cannot be extended any more: the next action is a re-issue.
    #[serde(default)]
    pub capped: bool,
    /// When the token that issued it ends, once that token has been
    /// replaced: Vault revokes the lease then.
    #[serde(default)]
    pub parent_end: Option<f64>,
    /// How many answers in a row for this request came with a TTL under
    /// [`SHORT_TTL`] seconds: each one doubles the least wait before the
    /// next renewal or re-issue, so a server that keeps granting nothing is
    /// not asked (and the app not reloaded) in a loop.
    #[serde(default)]
    pub short_answers: u32,
    /// The TTL Vault granted in the last answer, before the floor.
    #[serde(default)]
    pub granted: u64,
    /// When the next renewal or re-issue is due (unix seconds).
    pub due: f64,
    /// Counts re-issues of this request.
    #[serde(default)]
    pub generation: u64,
    /// Confirmed valid by this process (issued here, or looked up).
    #[serde(skip)]
    pub verified: bool,
    /// Issued by this process (not handed over).
    #[serde(skip)]
    pub issued_here: bool,
    #[serde(skip)]
    failures: u32,
    /// Why the last renewal or re-issue failed, until one succeeds: watch
    /// mode reports it in readiness.
    #[serde(skip)]
    pub trouble: Option<String>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.key)
            .field("lease_id", &self.lease_id)
            .field("data", &"[redacted]")
            .field("expires", &self.expires)
            .field("due", &self.due)
            .finish()
    }
}

impl Held {
    /// What a read answered, when it issued something; `None` for plain
    /// values (nothing to renew, reading again is harmless).
    pub(super) fn from_answer(
        key: String,
        method: &str,
        source: &Source,
        mount_kind: &str,
        body: &Value,
        accessor: &str,
        config: &VaultConfig,
    ) -> Option<Held> {
        let lease_id = body["lease_id"].as_str().unwrap_or_default().to_string();
        let granted = seconds(&body["lease_duration"]);
        let lease_duration = granted.max(MIN_TTL);
        let data = body["data"].clone();
        let now = now();
        // A certificate's NotAfter, within the same sane range as a TTL.
        let expiration = data["expiration"]
            .as_f64()
            .filter(|e| e.is_finite())
            .map(|e| e.clamp(now, now + MAX_CERT_LIFETIME as f64));
        let certificate = data.get("certificate").is_some() && expiration.is_some();
        if lease_id.is_empty() && !certificate {
            return None;
        }
        // What this answer granted, for the count of short answers: a
        // certificate's lifetime, else the lease's TTL as sent.
        let granted = match (certificate, expiration) {
            (true, Some(exp)) => (exp - now).max(0.0) as u64,
            _ => granted,
        };
        let (duration, expires) = match (certificate, expiration) {
            (true, Some(exp)) => (
                (exp - now).max(MIN_TTL as f64) as u64,
                exp.max(now + MIN_TTL as f64),
            ),
            _ => (lease_duration, now + lease_duration as f64),
        };
        let mut held = Held {
            key,
            method: method.to_string(),
            path: source.path.clone(),
            params: source.params.clone(),
            data,
            lease_id,
            renewable: body["renewable"].as_bool().unwrap_or(false) && !certificate,
            duration,
            issued: now,
            expires,
            certificate: certificate || mount_kind == "pki" && expiration.is_some(),
            token_accessor: accessor.to_string(),
            capped: false,
            parent_end: None,
            due: now,
            generation: 0,
            verified: true,
            issued_here: true,
            failures: 0,
            trouble: None,
            short_answers: 0,
            granted,
        };
        held.schedule(now, config);
        Some(held)
    }

    /// The version watch mode compares: the lease id, else the
    /// certificate's serial number.
    pub fn version(&self) -> String {
        if !self.lease_id.is_empty() {
            self.lease_id.clone()
        } else {
            self.data["serial_number"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("issue {}", self.generation))
        }
    }

    /// The value to answer from what is held: versioned by
    /// [`Held::version`], with the lease and when it ends.
    pub fn fetched(&self) -> Fetched {
        Fetched {
            value: Secret::new(self.data.clone()),
            version: Some(self.version()),
            lease: (!self.lease_id.is_empty()).then(|| Lease {
                id: self.lease_id.clone(),
                expires: self.expires,
                renewable: self.renewable,
            }),
        }
    }

    /// The next renewal or re-issue, from what is known at `now`.
    ///
    /// A secret that will not be extended (capped by its max TTL, or not
    /// renewable) is re-issued while it still has its overlap (a share of
    /// its TTL, `lease_overlap`) and a little more left: the new one is in
    /// place while the old one still works for that long. A renewable
    /// lease is renewed when a little more than that is left (and at most
    /// at 70% of its TTL), so that the renewal that finds the max TTL near
    /// still leaves time for the re-issue.
    fn schedule(&mut self, now: f64, config: &VaultConfig) {
        let left = (self.expires - now).max(0.0);
        let ttl = self.duration as f64;
        let overlap = config.lease_overlap_of(&self.path);
        self.due = if self.certificate {
            let at = config.pki_reissue_at;
            let at = jitter(at - 0.03, at + 0.03).clamp(0.05, 0.95);
            (self.issued + ttl * at).min(now + left * 0.95)
        } else if self.capped || !self.renewable {
            self.expires - ttl * (overlap + jitter(0.05, 0.1))
        } else {
            let share = jitter((overlap + 0.12).max(0.3), (overlap + 0.17).max(0.4));
            self.expires - ttl * share
        };
        self.due = self
            .due
            .max(now)
            .max(now + short_backoff(self.short_answers));
    }

    /// Counts this answer's TTL after `before` (the answer it replaces):
    /// another short one in a row, or the end of a run of them.
    fn count_short(&mut self, before: u32, granted: u64) {
        self.short_answers = if granted < SHORT_TTL { before + 1 } else { 0 };
    }

    /// The token that issued this ends at `end`: so does this. It is still
    /// renewed up to then, and re-issued shortly before.
    pub(super) fn bound_by_token(&mut self, end: f64, now: f64) {
        self.parent_end = Some(end);
        if self.expires > end {
            self.expires = end;
            self.capped = true;
            self.due = now + (end - now).max(0.0) * jitter(0.4, 0.5);
        }
    }

    fn renews(&self) -> bool {
        self.renewable && !self.capped && !self.certificate
    }
}

/// Everything held, and the latest token.
#[derive(Default)]
pub struct Ledger {
    /// What is held, by the key of the request that issued it
    /// ([`Held::key`]).
    pub held: BTreeMap<String, Held>,
    /// The current token (after the last login or renewal), handed to the
    /// next process in the state file.
    pub token: Option<Token>,
}

/// The state file: what one envrender process hands to the next.
#[derive(Serialize, Deserialize)]
pub struct State {
    version: u32,
    address: String,
    namespace: Option<String>,
    token: Option<Token>,
    held: Vec<Held>,
}

impl Ledger {
    /// What a state file holds, when it is for this Vault; an absent,
    /// unreadable or foreign file is an empty ledger (it only saves work).
    pub fn load(path: &Path, address: &str, namespace: Option<&str>) -> Ledger {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ledger::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the Vault state file; starting afresh");
                return Ledger::default();
            }
        };
        match serde_json::from_str::<State>(&text) {
            Ok(state)
                if state.version == 1
                    && state.address == address
                    && state.namespace.as_deref() == namespace =>
            {
                tracing::debug!(file = %path.display(), held = state.held.len(), "Vault state loaded");
                Ledger {
                    held: state.held.into_iter().map(|h| (h.key.clone(), h)).collect(),
                    token: state.token,
                }
            }
            Ok(_) => {
                tracing::warn!(file = %path.display(), "the Vault state file is for another Vault address or namespace; ignoring it");
                Ledger::default()
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), line = e.line(), "the Vault state file is not valid; ignoring it");
                Ledger::default()
            }
        }
    }

    /// The state file's content for the Vault at `address` (as it may be
    /// printed) and `namespace`.
    pub fn snapshot(&self, address: &str, namespace: Option<&str>) -> State {
        State {
            version: 1,
            address: address.to_string(),
            namespace: namespace.map(str::to_string),
            token: self.token.clone(),
            held: self.held.values().cloned().collect(),
        }
    }
}

/// Writes the state file atomically (a temporary file in the same
/// directory, fsync, rename), mode 0600: it holds a token and credentials.
pub fn write_state(path: &Path, state: &State) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".envrender-vault-")
        .tempfile_in(dir)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    serde_json::to_writer(&mut file, state)?;
    file.flush()?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Inner {
    /// What is held for `key`, when it can be used as it is: issued by this
    /// process and still valid, or handed over and confirmed by Vault.
    /// Dropped (so that the caller issues a new one) when it is not.
    pub(super) async fn adopt(&self, key: &str) -> Result<Option<Held>, FetchError> {
        let Some(held) = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .get(key)
            .cloned()
        else {
            return Ok(None);
        };
        let now = now();
        // Still valid (with a margin of a tenth of its TTL, at most 1 s), and
        // either renewable or not yet due for re-issue.
        let margin = (held.duration as f64 * 0.1).min(1.0);
        let usable = held.expires - now > margin && (held.renews() || held.due > now);
        if held.verified {
            return Ok(usable.then_some(held));
        }
        let mut confirmed = None;
        if usable {
            if held.lease_id.is_empty() {
                confirmed = Some(held.clone());
            } else {
                let (answer, _) = self
                    .request(
                        Method::PUT,
                        "sys/leases/lookup",
                        &[],
                        Some(&json!({ "lease_id": held.lease_id })),
                        false,
                    )
                    .await?;
                let ttl = seconds(&answer.body["data"]["ttl"]) as f64;
                if answer.status == 200 && ttl > margin {
                    let mut h = held.clone();
                    h.expires = h.expires.min(now + ttl);
                    confirmed = Some(h);
                } else if matches!(answer.status, 412 | 429 | 500..=599) {
                    return Err(FetchError::new(
                        ErrorKind::Transient,
                        "vault",
                        "PUT /v1/sys/leases/lookup",
                        answer.summary(),
                    ));
                }
            }
        }
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match confirmed {
            Some(mut h) => {
                h.verified = true;
                tracing::info!(request = %h.key, lease = %h.lease_id, "adopted a secret from the Vault state file");
                ledger.held.insert(key.to_string(), h.clone());
                Ok(Some(h))
            }
            None => {
                tracing::info!(request = %held.key, lease = %held.lease_id, "the secret in the Vault state file is no longer valid; issuing a new one");
                ledger.held.remove(key);
                Ok(None)
            }
        }
    }

    /// Renews one held lease; on a definite refusal, re-issues it.
    async fn renew(&self, held: Held) {
        let asked = held.duration.max(1);
        let result = self
            .request(
                Method::PUT,
                "sys/leases/renew",
                &[],
                Some(&json!({ "lease_id": held.lease_id, "increment": asked })),
                false,
            )
            .await;
        let now = now();
        match result {
            Ok((answer, _)) if answer.status == 200 => {
                let granted = seconds(&answer.body["lease_duration"]);
                let got = granted.max(MIN_TTL);
                let mut ledger = self
                    .ledger
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(h) = ledger.held.get_mut(&held.key)
                    && h.lease_id == held.lease_id
                {
                    h.expires = now + got as f64;
                    h.capped = got < asked;
                    // A renewal cut short by the max TTL is Vault keeping
                    // its word, not a short answer; one that grants all
                    // that was asked, and that is next to nothing, is.
                    h.count_short(
                        held.short_answers,
                        if got < asked { SHORT_TTL } else { granted },
                    );
                    // The token that issued it may end first.
                    if let Some(end) = h.parent_end
                        && end < h.expires
                    {
                        h.expires = end;
                        h.capped = true;
                    }
                    h.failures = 0;
                    h.schedule(now, &self.config);
                    tracing::debug!(request = %h.key, lease = %h.lease_id, ttl_s = got, capped = h.capped, "Vault lease renewed");
                    if h.trouble.take().is_some() {
                        tracing::info!(request = %h.key, lease = %h.lease_id, "Vault lease renewed again after failures");
                    }
                    // Watch mode follows the new end (its expiry metric).
                    self.changes.send_modify(|n| *n += 1);
                }
            }
            Ok((answer, _)) if matches!(answer.status, 400 | 403 | 404) => {
                tracing::warn!(
                    request = %held.key,
                    lease = %held.lease_id,
                    status = answer.status,
                    error = %answer.errors(),
                    "Vault refused to renew the lease; issuing a new secret"
                );
                self.reissue(held).await;
            }
            Ok((answer, _)) => self.retry_later(&held, &answer.summary(), answer.retry_after),
            Err(e) => self.retry_later(&held, &e.to_string(), e.retry_after),
        }
    }

    /// Reads the request of `held` again: a new lease or certificate
    /// replaces the old, and watchers are told.
    async fn reissue(&self, held: Held) {
        let method = Method::from_bytes(held.method.as_bytes()).unwrap_or(Method::GET);
        let body = (!held.params.is_empty()).then(|| {
            Value::Object(
                held.params
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
        });
        let result = self
            .request(method, &held.path, &[], body.as_ref(), true)
            .await;
        match result {
            Ok((answer, token)) if answer.status == 200 => {
                let source = Source {
                    scheme: crate::reference::Scheme::Vault,
                    path: held.path.clone(),
                    version: None,
                    params: held.params.clone(),
                    form: crate::reference::Form::Scheme,
                };
                let kind = if held.certificate { "pki" } else { "" };
                match Held::from_answer(
                    held.key.clone(),
                    &held.method,
                    &source,
                    kind,
                    &answer.body,
                    &token.accessor,
                    &self.config,
                ) {
                    Some(mut new) => {
                        new.generation = held.generation + 1;
                        new.count_short(held.short_answers, new.granted);
                        new.schedule(now(), &self.config);
                        tracing::info!(
                            request = %new.key,
                            lease = %new.lease_id,
                            ttl_s = new.duration,
                            "Vault issued a new secret in place of one that could not be kept"
                        );
                        self.ledger
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .held
                            .insert(new.key.clone(), new);
                        self.changes.send_modify(|n| *n += 1);
                    }
                    None => {
                        tracing::warn!(request = %held.key, "Vault's new answer carries no lease or certificate; keeping the old one");
                        self.ledger
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .held
                            .remove(&held.key);
                        self.changes.send_modify(|n| *n += 1);
                    }
                }
            }
            Ok((answer, _)) => self.retry_later(&held, &answer.summary(), answer.retry_after),
            Err(e) => self.retry_later(&held, &e.to_string(), e.retry_after),
        }
    }

    /// Backs off after a failure, exponentially from 1 s up to a minute,
    /// but always inside what is left of the lease. Once the lease has run
    /// out, the wait grows with how long ago that was (half of it, from
    /// 1 s up to 30 s): a value that no longer works is recovered quickly
    /// after a short outage, and a long one is not hammered. The first
    /// failure is announced so that watch mode reports it. A `Retry-After`
    /// the server sent is waited for at least.
    fn retry_later(&self, held: &Held, why: &str, asked: Option<Duration>) {
        let now = now();
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = ledger.held.get_mut(&held.key) {
            h.failures += 1;
            let left = h.expires - now;
            let wait = if left > 0.0 {
                let backoff = RENEW_BACKOFF.delay(h.failures - 1).as_secs_f64();
                backoff.min((left / 2.0).max(0.5))
            } else {
                (-left / 2.0).clamp(1.0, 30.0)
            };
            h.due = now + (wait * jitter(0.8, 1.2)).max(asked.unwrap_or_default().as_secs_f64());
            tracing::warn!(request = %h.key, lease = %h.lease_id, error = %why, retry_in_s = h.due - now, "cannot renew or re-issue a Vault secret; will retry");
            let first = h.trouble.is_none();
            h.trouble = Some(format!(
                "cannot renew or re-issue {} (lease {}): {why}",
                h.key,
                if left > 0.0 {
                    format!("ends in {left:.0}s")
                } else {
                    format!("ended {:.0}s ago", -left)
                }
            ));
            if first {
                self.changes.send_modify(|n| *n += 1);
            }
        }
    }
}

impl Inner {
    /// Gives back what this process obtained, as `why` says (see
    /// [`Release`]): leases revoked one by one (`sys/leases/revoke`); the
    /// token, when envrender logged in for it, revoked with everything it
    /// created (`auth/token/revoke-self`, which every token may call).
    pub(super) async fn release(&self, why: Release) {
        let everything = match why {
            Release::Failed => false,
            _ if !self.config.revoke_on_stop => return,
            Release::Restarting if self.config.state_file.is_some() => {
                tracing::info!(
                    "the app still runs: the Vault leases and token stay in the state file for the next envrender"
                );
                return;
            }
            Release::Stopped | Release::Restarting => true,
        };
        let leases: Vec<Held> = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .values()
            .filter(|h| !h.lease_id.is_empty() && (everything || h.issued_here))
            .cloned()
            .collect();
        // Only a token envrender logged in for is its own to revoke (never
        // one given to it, or an agent's); after a failed render, only one
        // this process logged in for, with nothing handed over under it.
        let logs_in = self.auth.logs_in();
        if leases.is_empty() && !(everything && logs_in) {
            return;
        }
        let Ok(slot) = self.token.try_lock() else {
            tracing::warn!("a Vault login is under way; leases are left to end with their TTL");
            return;
        };
        let Some(token) = slot.clone() else {
            return;
        };
        drop(slot);
        let handed_over = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .values()
            .any(|h| !h.issued_here);
        let ours = logs_in && (everything || (token.obtained_here && !handed_over));
        let mut denied = Vec::new();
        let mut revoked = 0;
        for held in leases {
            let answer = self
                .send(
                    Method::PUT,
                    "sys/leases/revoke",
                    &[],
                    Some(&token.id),
                    Some(&json!({ "lease_id": held.lease_id, "sync": true })),
                    false,
                )
                .await;
            match answer {
                Ok(a) if matches!(a.status, 200 | 204) => {
                    revoked += 1;
                    self.forget(&held.key);
                    self.save();
                }
                // Gone already: nothing to give back.
                Ok(a) if a.status == 400 => {
                    self.forget(&held.key);
                    self.save();
                }
                Ok(a) if a.status == 403 => denied.push(held),
                Ok(a) => {
                    tracing::warn!(lease = %held.lease_id, error = %a.summary(), "cannot revoke a Vault lease; it ends with its TTL")
                }
                Err(e) => {
                    tracing::warn!(lease = %held.lease_id, error = %e, "cannot revoke a Vault lease; it ends with its TTL")
                }
            }
        }
        // A token envrender logged in for goes with everything it created,
        // the leases it may not revoke one by one included.
        if ours && (everything || !denied.is_empty()) {
            let answer = self
                .send(
                    Method::POST,
                    "auth/token/revoke-self",
                    &[],
                    Some(&token.id),
                    None,
                    false,
                )
                .await;
            match answer {
                Ok(a) if matches!(a.status, 200 | 204) => {
                    tracing::info!(accessor = %token.accessor, "revoked the Vault token envrender logged in for, and its leases");
                    denied.retain(|held| {
                        let went = held.token_accessor == token.accessor;
                        if went {
                            revoked += 1;
                            self.forget(&held.key);
                        }
                        !went
                    });
                    *self.token.lock().await = None;
                    self.ledger
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .token = None;
                }
                Ok(a) => {
                    tracing::warn!(accessor = %token.accessor, error = %a.summary(), "cannot revoke the Vault token; it ends with its TTL")
                }
                Err(e) => {
                    tracing::warn!(accessor = %token.accessor, error = %e, "cannot revoke the Vault token; it ends with its TTL")
                }
            }
        }
        for held in denied {
            tracing::warn!(
                lease = %held.lease_id,
                identity = %self.identity(&token),
                "cannot revoke a Vault lease: HTTP 403 permission denied on PUT /v1/sys/leases/revoke; it ends with its TTL\nhint: add to one of the token's policies ({}): path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}",
                token.policies.join(", ")
            );
        }
        if revoked > 0 {
            let when = if why == Release::Failed {
                "that the failed render obtained"
            } else {
                "on the way out"
            };
            tracing::info!(revoked, "revoked the Vault leases {when}");
        }
        self.save();
    }

    /// Drops a held secret from the ledger.
    fn forget(&self, key: &str) {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .remove(key);
    }
}

/// The scheduler: sleeps until the token or a held secret needs attention,
/// renews or re-issues it, writes the state file, and again.
pub(super) async fn maintain(inner: &Arc<Inner>) {
    // The token's next action: (accessor, refreshed, due).
    let mut token_plan: Option<(String, f64, f64)> = None;
    let mut token_failures = 0u32;
    // Tokens in a row that came with a TTL under SHORT_TTL: each doubles the
    // least wait before the next refresh, so a Vault that grants nothing
    // does not make envrender log in (and re-issue what it holds) in a loop.
    let mut short_tokens = 0u32;
    loop {
        let now = now();
        let token = inner.token.lock().await.clone();
        if let Some(t) = &token {
            let same = token_plan
                .as_ref()
                .is_some_and(|(a, r, _)| *a == t.accessor && *r == t.refreshed);
            if !same {
                let life = t.expires.map(|e| e - t.refreshed);
                short_tokens = match life {
                    Some(life) if life < SHORT_TTL as f64 => short_tokens + 1,
                    _ => 0,
                };
                token_plan = super::auth::token_due(t, inner.auth.can_login()).map(|due| {
                    let due = due.max(t.refreshed + short_backoff(short_tokens));
                    (t.accessor.clone(), t.refreshed, due)
                });
            }
        }
        let token_due = token_plan.as_ref().map_or(f64::INFINITY, |p| p.2);
        let held_due = inner
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .values()
            .map(|h| h.due)
            .fold(f64::INFINITY, f64::min);
        let next = token_due.min(held_due);
        if next > now {
            let wait = if next.is_finite() {
                Duration::from_secs_f64((next - now).min(3600.0))
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inner.wake.notified() => {}
            }
            continue;
        }
        if token_due <= now {
            match inner.refresh_token().await {
                Ok(()) => {
                    token_failures = 0;
                    token_plan = None;
                }
                Err(e) => {
                    token_failures += 1;
                    let backoff = RENEW_BACKOFF.delay(token_failures - 1).as_secs_f64();
                    tracing::warn!(error = %e, retry_in_s = backoff, "cannot renew the Vault token");
                    if let Some(p) = token_plan.as_mut() {
                        p.2 = now + backoff * jitter(0.8, 1.2);
                    }
                }
            }
        }
        let due: Vec<Held> = inner
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held
            .values()
            .filter(|h| h.due <= now)
            .cloned()
            .collect();
        for held in due {
            if held.renews() && !held.lease_id.is_empty() {
                inner.renew(held).await;
            } else {
                inner.reissue(held).await;
            }
        }
        inner.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewable: bool, duration: u64) -> Held {
        let source = crate::reference::parse("vault:database/creds/app")
            .unwrap()
            .source;
        Held::from_answer(
            "GET database/creds/app".into(),
            "GET",
            &source,
            "database",
            &json!({"lease_id": "database/creds/app/x", "lease_duration": duration, "renewable": renewable, "data": {"username": "u"}}),
            "acc",
            &VaultConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn renewable_leases_are_renewed_with_time_for_a_reissue_to_keep_the_overlap() {
        for _ in 0..100 {
            // The default overlap (a third): renewed at 50-55% of the TTL.
            let h = lease(true, 300);
            let at = (h.due - h.issued) / 300.0;
            assert!((0.49..0.56).contains(&at), "{at}");
            assert!(h.renews());
        }
        let config = VaultConfig {
            lease_overlap: 0.1,
            ..VaultConfig::default()
        };
        let mut h = lease(true, 300);
        // A small overlap: renewed at 60-70%, as Vault's own watcher does.
        h.schedule(h.issued, &config);
        let at = (h.due - h.issued) / 300.0;
        assert!((0.6..0.7).contains(&at), "{at}");
    }

    #[test]
    fn capped_and_non_renewable_leases_are_reissued_before_they_end() {
        // Not renewable: re-issued with the overlap and 5-10% left.
        let mut h = lease(false, 100);
        assert!(!h.renews());
        let left = (h.expires - h.due) / 100.0;
        assert!((0.38..0.44).contains(&left), "{left}");
        // Capped by the max TTL at 40 s left: the same.
        let now = h.issued;
        h.renewable = true;
        h.capped = true;
        h.expires = now + 40.0;
        h.schedule(now, &VaultConfig::default());
        let left = h.expires - h.due;
        assert!((38.0..44.0).contains(&left), "{left}");
        // With less left than that: at once.
        h.expires = now + 20.0;
        h.schedule(now, &VaultConfig::default());
        assert_eq!(h.due, now);
        h.bound_by_token(now + 10.0, now);
        assert!(h.capped && h.due >= now + 4.0 && h.due < now + 5.0);
        assert_eq!((h.expires, h.parent_end), (now + 10.0, Some(now + 10.0)));
    }

    #[test]
    fn certificates_are_reissued_at_the_configured_fraction() {
        let source = crate::reference::parse("vault:pki/issue/web?common_name=a")
            .unwrap()
            .source;
        let expiration = now() + 1000.0;
        let h = Held::from_answer(
            "POST pki/issue/web?common_name=a".into(),
            "POST",
            &source,
            "pki",
            &json!({"lease_id": "", "lease_duration": 0, "renewable": false, "data": {"certificate": "c", "expiration": expiration, "serial_number": "01:02"}}),
            "acc",
            &VaultConfig {
                pki_reissue_at: 0.5,
                ..VaultConfig::default()
            },
        )
        .unwrap();
        assert!(h.certificate && !h.renews());
        let at = (h.due - h.issued) / 1000.0;
        assert!((0.46..0.54).contains(&at), "{at}");
        assert_eq!(h.version(), "01:02");
        assert!(
            Held::from_answer(
                "GET secret/x".into(),
                "GET",
                &source,
                "kv",
                &json!({"lease_id": "", "data": {"a": 1}}),
                "acc",
                &VaultConfig::default()
            )
            .is_none()
        );
    }

    #[test]
    fn the_state_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.json");
        let mut ledger = Ledger::default();
        let h = lease(true, 60);
        ledger.held.insert(h.key.clone(), h.clone());
        write_state(&path, &ledger.snapshot("http://v:8200/", None)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Ledger::load(&path, "http://v:8200/", None);
        let got = &back.held["GET database/creds/app"];
        assert_eq!(got.lease_id, h.lease_id);
        assert!(!got.verified, "a handed-over lease is confirmed before use");
        assert!(
            Ledger::load(&path, "http://other:8200/", None)
                .held
                .is_empty()
        );
        assert!(format!("{got:?}").contains("[redacted]"));
    }
}
