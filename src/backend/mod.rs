//! Backends: where values come from.
//!
//! A [`Backend`] serves every [`Source`] of one scheme. It is handed all the
//! sources of a run at once, so it can batch them (SSM `GetParameters` takes
//! ten names, Secrets Manager `BatchGetSecretValue` twenty) and fetch them
//! concurrently; it answers one result per source, in order, so that one
//! missing value never hides the others. [`Backend::plan`] describes the
//! requests a fetch would make without making them (`envrender check`), and
//! [`Watching::observe`] reports later changes (`envrender watch`).

pub mod aws;
pub mod consul;
pub mod http;
pub mod local;
pub mod vault;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::environment::Environment;
use crate::reference::{Scheme, Source};
use crate::secret::Secret;

/// A boxed, `Send` future: what [`Backend`]'s methods return, so that the
/// trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A value as a backend returned it, with what is known about its version.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetched {
    /// The value itself, never logged.
    pub value: Secret,
    /// The backend's own version (SSM version, Vault KV version, Consul
    /// modify index…), when it has one. Compared to detect changes.
    pub version: Option<String>,
    /// A Vault lease that must be renewed before it expires.
    pub lease: Option<Lease>,
}

impl Fetched {
    /// A value with no version and no lease.
    pub fn new(value: Secret) -> Self {
        Fetched {
            value,
            version: None,
            lease: None,
        }
    }

    /// Whether `newer` differs from this value: by version when both have one,
    /// otherwise by content.
    pub fn differs_from(&self, newer: &Fetched) -> bool {
        match (&self.version, &newer.version) {
            (Some(a), Some(b)) => a != b,
            _ => self.value != newer.value,
        }
    }
}

/// A Vault lease on a fetched value.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// Vault's lease id (`database/creds/app/…`).
    pub id: String,
    /// When it ends unless renewed, in Unix seconds, as last known:
    /// renewals move it (the TTLs it comes from are clamped to Vault's
    /// default max TTL, 768h).
    pub expires: f64,
    /// Whether Vault allows the lease to be renewed.
    pub renewable: bool,
}

/// Why a value could not be had, in classes that decide what happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The value does not exist. Not retried; tolerated by `|optional` and
    /// `|default=`.
    NotFound,
    /// The caller is not allowed to read it. Not retried.
    Denied,
    /// The value exists but cannot be used as asked (not JSON, no such field,
    /// not UTF-8…). Not retried.
    Invalid,
    /// The backend could not be reached or asked us to slow down. Retried with
    /// backoff until the deadline.
    Transient,
    /// No backend serves this scheme.
    Unsupported,
    /// No answer came before the run's deadline (`--timeout`): the time to
    /// retry is up.
    Deadline,
}

impl ErrorKind {
    /// Whether asking again may help before the deadline.
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }
}

/// A failure to fetch one source, with what a person needs to fix it. It never
/// carries a value: messages are built from names, paths and statuses only.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchError {
    /// The class of failure: decides whether it is retried or tolerated.
    pub kind: ErrorKind,
    /// `file`, `env`, `ssm`, `vault`, …
    pub backend: &'static str,
    /// The call that failed: `read file`, `ssm:GetParameters`, `GET /v1/kv/…`.
    pub action: String,
    /// The resource the call was about (ARN, URL, path), when not obvious from
    /// the reference.
    pub resource: Option<String>,
    /// Who asked (AWS caller ARN, Vault token accessor and policies…).
    pub identity: Option<String>,
    /// What went wrong, in a few words (`HTTP 403: permission denied`).
    pub message: String,
    /// What to do about it, printed on a line of its own.
    pub hint: Option<String>,
    /// How long the server asked us to wait before asking again
    /// (`Retry-After` on a 429 or 503), already clamped to a sane range.
    pub retry_after: Option<Duration>,
}

impl FetchError {
    /// An error with no resource, identity, hint or `Retry-After`; the
    /// builder methods below add them.
    pub fn new(
        kind: ErrorKind,
        backend: &'static str,
        action: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        FetchError {
            kind,
            backend,
            action: action.into(),
            resource: None,
            identity: None,
            message: message.into(),
            hint: None,
            retry_after: None,
        }
    }

    /// The error of a call cut off by the run's deadline.
    pub fn deadline(backend: &'static str) -> Self {
        FetchError::new(
            ErrorKind::Deadline,
            backend,
            "fetch",
            "no answer before the deadline",
        )
        .hint("the backend is slow or unreachable; raise --timeout or check the network")
    }

    /// Whether this is [`FetchError::deadline`]'s error.
    pub fn is_deadline(&self) -> bool {
        self.kind == ErrorKind::Deadline
    }

    /// With the resource the call was about.
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// With a hint on how to fix it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// With the wait the server asked for, if any (already clamped).
    pub fn retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.backend, self.action)?;
        if let Some(resource) = &self.resource {
            write!(f, " {resource}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(identity) = &self.identity {
            write!(f, " (as {identity})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FetchError {}

/// One request a fetch would make, for `envrender check`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedCall {
    /// AWS region, Consul datacenter…, when requests go to different places.
    pub target: Option<String>,
    /// `read file`, `GetParameters`, …
    pub action: String,
    /// What this one request covers: a path, "10 names".
    pub detail: String,
}

/// What watch mode last saw of a source: its value, or `None` when the
/// source was absent (absent is an answer, held like a value).
pub type Seen = Option<Fetched>;

/// What a later look at a source found.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// Same version (or content) as before, or still absent.
    Unchanged,
    /// A new value (or a value where there was none), to render again with.
    Changed(Fetched),
    /// The same value, its lease extended: held, not rendered again.
    Renewed(Fetched),
    /// The value is gone: render again without it (a default, or a render
    /// that fails and keeps the last good outputs).
    Gone(FetchError),
    /// The look failed; watch mode reports it and backs off.
    Failed(FetchError),
}

impl Observation {
    /// What a fresh answer says of a source last seen as `old`, with
    /// `differs` telling two values apart.
    pub fn compare(
        old: Option<&Fetched>,
        new: Result<Fetched, FetchError>,
        differs: impl Fn(&Fetched, &Fetched) -> bool,
    ) -> Observation {
        let extended = |old: &Fetched, new: &Fetched| match (&old.lease, &new.lease) {
            (Some(a), Some(b)) => b.expires - a.expires >= 1.0,
            _ => false,
        };
        match (old, new) {
            (Some(old), Ok(new)) if differs(old, &new) => Observation::Changed(new),
            (Some(old), Ok(new)) if extended(old, &new) => Observation::Renewed(new),
            (Some(_), Ok(_)) => Observation::Unchanged,
            (None, Ok(new)) => Observation::Changed(new),
            (None, Err(e)) if e.kind == ErrorKind::NotFound => Observation::Unchanged,
            (Some(_), Err(e)) if e.kind == ErrorKind::NotFound => Observation::Gone(e),
            (_, Err(e)) => Observation::Failed(e),
        }
    }
}

/// Serves every source of one scheme: names itself, plans and fetches them,
/// and says whether (and how) watch mode can follow them.
pub trait Backend: Send + Sync {
    /// The backend's name in messages: `file`, `ssm`, …
    fn name(&self) -> &'static str;

    /// The requests [`Backend::fetch`] would make for these sources.
    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall>;

    /// [`Backend::plan`] once a fetch has shown which of `sources` are
    /// `absent`: a backend that asks again about those says so.
    fn plan_known(&self, sources: &[Source], absent: &[Source]) -> Vec<PlannedCall> {
        let _ = absent;
        self.plan(sources)
    }

    /// Fetches every source; one result per source, in the same order.
    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>>;

    /// How watch mode follows this backend's values; `None`: it does not.
    fn watching(&self) -> Option<&dyn Watching> {
        None
    }

    /// Gives back what this process obtained and nobody will use (Vault's
    /// leases and token), as `why` says; nothing for most backends.
    fn release(&self, why: Release) -> BoxFuture<'_, ()> {
        let _ = why;
        Box::pin(async {})
    }
}

/// Why a process gives back what it obtained ([`Backend::release`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// A render failed: the secrets it issued reach no output, so they are
    /// revoked (always).
    Failed,
    /// The process stops for good, with the app gone: with `[vault]
    /// revoke_on_stop`, every lease held and the token it logged in for
    /// are revoked.
    Stopped,
    /// The process stops while the app it serves still runs: a sidecar
    /// being restarted. With a state file, what it holds is handed to the
    /// next process, not revoked; without one, as [`Release::Stopped`].
    Restarting,
}

/// A backend's way of following its values in watch mode: blocking
/// queries, polling, or a change feed of its own.
pub trait Watching: Backend {
    /// The long-lived queries watch mode would hold open for these sources,
    /// described for `check`. Backends that are polled describe the polling.
    fn watches(&self, sources: &[Source]) -> Vec<String> {
        if sources.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "polled every {} ({} source{})",
            humantime::format_duration(self.poll_interval()),
            sources.len(),
            if sources.len() == 1 { "" } else { "s" }
        )]
    }

    /// How often [`Watching::observe`] should be called when the backend
    /// has no way to push changes.
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Whether [`Watching::observe`] itself waits for a change (blocking
    /// queries) and paces its own retries after errors, so that watch mode
    /// calls it again at once instead of sleeping first.
    fn blocks(&self) -> bool {
        false
    }

    /// The sources watch mode looks at together: one watcher per group, so
    /// that a change one group sees does not cut and re-open the long polls
    /// of the others, and values the backend pushes are not polled.
    fn watch_groups(&self, sources: &[Source]) -> Vec<WatchGroup> {
        vec![WatchGroup::polled((0..sources.len()).collect())]
    }

    /// A channel that moves when the backend's values change on their own
    /// (Vault re-issuing a lease); watch mode looks at the
    /// [`WatchGroup::pushed`] groups when it does, at once.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Work that must run while watch mode runs (Vault's lease scheduler).
    fn background(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Looks at each known source again (`known` holds what was last seen
    /// of each, absent included) and reports whether it changed. The
    /// default fetches again and compares versions (or content, when the
    /// backend has no versions); backends with change feeds override it.
    fn observe<'a>(&'a self, known: &'a [(Source, Seen)]) -> BoxFuture<'a, Vec<Observation>> {
        Box::pin(async move {
            let sources: Vec<Source> = known.iter().map(|(s, _)| s.clone()).collect();
            let fresh = self.fetch(&sources).await;
            known
                .iter()
                .zip(fresh)
                .map(|((_, old), new)| {
                    Observation::compare(old.as_ref(), new, Fetched::differs_from)
                })
                .collect()
        })
    }
}

/// Sources that watch mode looks at together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchGroup {
    /// Indices into the sources handed to [`Watching::watch_groups`].
    pub members: Vec<usize>,
    /// The backend keeps these values itself (Vault's leases): they are
    /// looked at, with no request, each time [`Watching::changes`] moves,
    /// and never polled; a failure among them is no reason to wait.
    pub pushed: bool,
}

impl WatchGroup {
    /// Sources looked at by blocking queries or polls.
    pub fn polled(members: Vec<usize>) -> Self {
        WatchGroup {
            members,
            pushed: false,
        }
    }

    /// Sources whose changes the backend announces.
    pub fn pushed(members: Vec<usize>) -> Self {
        WatchGroup {
            members,
            pushed: true,
        }
    }
}

/// Fetches each source as a task of its own (for backends whose requests
/// take one source each) and answers in the sources' order.
pub async fn fetch_each<F, Fut>(
    name: &'static str,
    sources: &[Source],
    fetch_one: F,
) -> Vec<Result<Fetched, FetchError>>
where
    F: Fn(Source) -> Fut,
    Fut: Future<Output = Result<Fetched, FetchError>> + Send + 'static,
{
    let groups = (0..sources.len()).map(|i| vec![i]).collect();
    fetch_groups(name, sources, groups, |mut group| {
        let fetch = fetch_one(group.remove(0));
        async move { vec![fetch.await] }
    })
    .await
}

/// Fetches groups of sources (indexes into `sources`), each group as a task
/// of its own that answers for its members in order, and answers in the
/// sources' order. For backends where one request serves several sources.
pub async fn fetch_groups<F, Fut>(
    name: &'static str,
    sources: &[Source],
    groups: Vec<Vec<usize>>,
    mut fetch_group: F,
) -> Vec<Result<Fetched, FetchError>>
where
    F: FnMut(Vec<Source>) -> Fut,
    Fut: Future<Output = Vec<Result<Fetched, FetchError>>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for members in groups {
        let fetch = fetch_group(members.iter().map(|&i| sources[i].clone()).collect());
        tasks.spawn(async move { (members, fetch.await) });
    }
    let mut out: Vec<Option<Result<Fetched, FetchError>>> = vec![None; sources.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((members, results)) = done {
            for (i, r) in members.into_iter().zip(results) {
                out[i] = Some(r);
            }
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(FetchError::new(
                    ErrorKind::Transient,
                    name,
                    "fetch",
                    "the request did not complete",
                ))
            })
        })
        .collect()
}

/// A server's status with its error text, for a message: `HTTP 403` or
/// `HTTP 403: permission denied`.
pub fn http_status(status: u16, text: &str) -> String {
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

/// Warns when a secret store is reached over plain HTTP across a network:
/// its token and every value it answers travel unencrypted. A loopback
/// address (a local agent) is not warned about.
pub fn warn_if_plain_http(what: &str, url: &reqwest::Url) {
    if url.scheme() == "http" && !is_loopback(url) {
        let url = http::redacted(url);
        tracing::warn!(
            "{what} at {url} is plain HTTP: the token and every value it answers cross the network unencrypted; use an https:// address"
        );
    }
}

/// Whether `url` names this machine (`localhost`, 127.0.0.0/8, `[::1]`).
pub fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An HTTP client builder for a backend at `url`: envrender's user agent, a
/// connect timeout, and the CA bundle in `ca` (if any) trusted in addition to
/// the system's roots. `what` names the backend in errors.
///
/// The system's CA certificates are read once per process, and only when
/// the client may speak TLS: for an `https://` address, or when
/// `redirected_to_https` (a Vault standby across the network sends clients
/// to the active node's address, which may be https). A Consul agent on the
/// node, a Vault agent or dev server on loopback, or a health check over
/// plain HTTP never loads or parses them.
pub fn http_client(
    url: &reqwest::Url,
    redirected_to_https: bool,
    ca: Option<&std::path::Path>,
    what: &str,
) -> Result<reqwest::ClientBuilder, String> {
    let https = url.scheme() == "https";
    let mut roots: Vec<reqwest::Certificate> = if https || redirected_to_https {
        match system_roots() {
            Ok(roots) => roots.clone(),
            // A private CA given for the backend is enough on its own, and
            // a plain-HTTP address works without any.
            Err(e) if https && ca.is_none() => return Err(e.clone()),
            Err(_) => Vec::new(),
        }
    } else {
        Vec::new()
    };
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read the {what} CA file {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", ca.display()))?;
        roots.extend(certs);
    }
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("envrender/", env!("CARGO_PKG_VERSION")))
        .tls_certs_only(roots))
}

/// The system's CA certificates (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the
/// distribution's bundle), read and decoded on first use; every client
/// after it shares them, or the reason there are none.
fn system_roots() -> &'static Result<Vec<reqwest::Certificate>, String> {
    static ROOTS: OnceLock<Result<Vec<reqwest::Certificate>, String>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let roots: Vec<reqwest::Certificate> = found
            .certs
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der).ok())
            .collect();
        if roots.is_empty() {
            let why = found
                .errors
                .first()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            return Err(format!(
                "cannot build the HTTP client: no CA certificates were found on this system{why} (an image needs a CA bundle at /etc/ssl/certs/ca-certificates.crt, or SSL_CERT_FILE naming one)"
            ));
        }
        Ok(roots)
    })
}

/// Builds a backend's client with the client certificate and key (mutual
/// TLS), if given. A key that is not the certificate's is found only when
/// the client is built: the error then names both files.
pub fn with_client_certificate(
    http: reqwest::ClientBuilder,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    what: &str,
    names: &str,
) -> Result<reqwest::Client, String> {
    let pair = cert
        .as_ref()
        .zip(key.as_ref())
        .map(|(c, k)| format!(" (client certificate {}, key {})", c.display(), k.display()));
    let http = client_identity(http, cert, key, what, names)?;
    build_client(http).map_err(|e| e + pair.as_deref().unwrap_or(""))
}

/// Adds a client certificate (mutual TLS) to a backend's client builder.
/// `names` says where the two settings come from, for the error when only
/// one is given. Errors name the files, never their content.
fn client_identity(
    http: reqwest::ClientBuilder,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    what: &str,
    names: &str,
) -> Result<reqwest::ClientBuilder, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let mut pem = std::fs::read(&cert).map_err(|e| {
                format!(
                    "cannot read the {what} client certificate {}: {e}",
                    cert.display()
                )
            })?;
            pem.push(b'\n');
            pem.extend(std::fs::read(&key).map_err(|e| {
                format!("cannot read the {what} client key {}: {e}", key.display())
            })?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                format!(
                    "{} and {} are not a PEM certificate and key: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
            Ok(http.identity(identity))
        }
        (None, None) => Ok(http),
        _ => Err(format!(
            "a {what} client certificate needs both a certificate and a key ({names})"
        )),
    }
}

/// Whether `detail` says the server ended the handshake over our client
/// certificate (mutual TLS): none given, or one it does not trust.
pub fn client_certificate_refused(detail: &str) -> bool {
    const ALERTS: [&str; 7] = [
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "CertificateExpired",
        "CertificateRevoked",
        "UnsupportedCertificate",
    ];
    detail
        .split("received fatal alert: ")
        .skip(1)
        .any(|rest| ALERTS.iter().any(|a| rest.starts_with(a)))
}

/// Builds a client from [`http_client`]'s builder; the error says why.
pub fn build_client(http: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
    http.build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// An error and its sources, by their `Display`, each once.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// How long to wait before the next [`Watching::observe`] of a polled
/// backend: its interval, spread by ±10% so a fleet does not poll in step.
pub fn poll_delay(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// A backend whose configuration is broken (an unreadable token or CA
/// file): every source it would serve fails with the reason, and runs that
/// do not use it are not affected.
pub struct Unavailable {
    /// The backend's name in messages (`consul`, `vault`).
    pub name: &'static str,
    /// Why it cannot be built, the message of every source's error.
    pub reason: String,
}

impl Backend for Unavailable {
    fn name(&self) -> &'static str {
        self.name
    }

    fn plan(&self, _: &[Source]) -> Vec<PlannedCall> {
        Vec::new()
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            let e = FetchError::new(
                ErrorKind::Invalid,
                self.name,
                "configure",
                self.reason.clone(),
            );
            sources.iter().map(|_| Err(e.clone())).collect()
        })
    }
}

/// A backend built the first time it is asked for anything, so that runs
/// that never use it do not pay for it (an HTTP client parses the system's
/// CA store). A configuration it cannot be built from fails only the
/// sources it would serve, as [`Unavailable`] does.
pub struct OnFirstUse {
    name: &'static str,
    build: Mutex<Option<Builder>>,
    built: OnceLock<Arc<dyn Backend>>,
}

type Builder = Box<dyn FnOnce() -> Result<Arc<dyn Backend>, String> + Send>;

impl OnFirstUse {
    /// A backend named `name` that `build` makes on first use; `build`'s
    /// error makes it [`Unavailable`] with that reason.
    pub fn new(
        name: &'static str,
        build: impl FnOnce() -> Result<Arc<dyn Backend>, String> + Send + 'static,
    ) -> Self {
        OnFirstUse {
            name,
            build: Mutex::new(Some(Box::new(build))),
            built: OnceLock::new(),
        }
    }

    fn get(&self) -> &Arc<dyn Backend> {
        self.built.get_or_init(|| {
            let build = self.build.lock().unwrap_or_else(|p| p.into_inner()).take();
            match build.map(|f| f()) {
                Some(Ok(backend)) => backend,
                Some(Err(reason)) => Arc::new(Unavailable {
                    name: self.name,
                    reason,
                }),
                None => Arc::new(Unavailable {
                    name: self.name,
                    reason: "the backend could not be built".into(),
                }),
            }
        })
    }
}

impl Backend for OnFirstUse {
    fn name(&self) -> &'static str {
        self.name
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        self.get().plan(sources)
    }

    fn plan_known(&self, sources: &[Source], absent: &[Source]) -> Vec<PlannedCall> {
        self.get().plan_known(sources, absent)
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        self.get().fetch(sources)
    }

    fn watching(&self) -> Option<&dyn Watching> {
        self.get().watching()
    }

    /// Only a backend that was built can have obtained anything.
    fn release(&self, why: Release) -> BoxFuture<'_, ()> {
        match self.built.get() {
            Some(backend) => backend.release(why),
            None => Box::pin(async {}),
        }
    }
}

/// The backends of one run, by scheme.
#[derive(Clone)]
pub struct Backends {
    by_scheme: BTreeMap<Scheme, Arc<dyn Backend>>,
}

impl Backends {
    /// The local backends, which need no configuration: `file:` and `env:`.
    pub fn local(env: Arc<dyn Environment>) -> Self {
        let mut by_scheme: BTreeMap<Scheme, Arc<dyn Backend>> = BTreeMap::new();
        by_scheme.insert(Scheme::File, Arc::new(local::FileBackend));
        by_scheme.insert(Scheme::Env, Arc::new(local::EnvBackend::new(env)));
        Backends { by_scheme }
    }

    /// Every backend of a run, from their settings: `file:` and `env:`, the
    /// AWS ones, and Consul and Vault built on first use, so that a run
    /// with no Consul or Vault reference never builds their HTTP clients.
    pub fn build(
        aws: aws::AwsConfig,
        consul: consul::ConsulConfig,
        vault: vault::VaultConfig,
        env: Arc<dyn Environment>,
    ) -> Self {
        let mut backends = Backends::local(env.clone());
        let aws = aws::register(&mut backends, aws, env.as_ref());
        let consul: Arc<dyn Backend> = {
            let env = env.clone();
            Arc::new(OnFirstUse::new("consul", move || {
                consul::Consul::new(consul, env.as_ref()).map(|c| Arc::new(c) as Arc<dyn Backend>)
            }))
        };
        backends.insert(Scheme::Consul, consul.clone());
        backends.insert(Scheme::Service, consul);
        let vault: Arc<dyn Backend> = Arc::new(OnFirstUse::new("vault", move || {
            vault::Vault::new(vault, env.as_ref(), Some(aws))
                .map(|v| Arc::new(v) as Arc<dyn Backend>)
        }));
        backends.insert(Scheme::Vault, vault);
        backends
    }

    /// Has every backend give back what it obtained (see [`Release`]).
    pub async fn release(&self, why: Release) {
        let mut seen = std::collections::BTreeSet::new();
        for backend in self.by_scheme.values() {
            // Consul serves two schemes through one backend.
            // A backend that does not answer does not hold up the exit.
            if seen.insert(backend.name())
                && tokio::time::timeout(Duration::from_secs(10), backend.release(why))
                    .await
                    .is_err()
            {
                tracing::warn!(
                    backend = backend.name(),
                    "giving back leases took over 10 s; the rest end with their TTL"
                );
            }
        }
    }

    /// Serves `scheme` with `backend`, in place of any other.
    pub fn insert(&mut self, scheme: Scheme, backend: Arc<dyn Backend>) {
        self.by_scheme.insert(scheme, backend);
    }

    /// The backend serving `scheme`; an [`ErrorKind::Unsupported`] error
    /// listing the schemes served when there is none.
    pub fn get(&self, scheme: Scheme) -> Result<Arc<dyn Backend>, FetchError> {
        self.by_scheme.get(&scheme).cloned().ok_or_else(|| {
            FetchError::new(
                ErrorKind::Unsupported,
                scheme.prefix(),
                "resolve",
                format!(
                    "this build of envrender {} has no {scheme}: backend",
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .hint(format!(
                "backends available: {}; to run without servers, answer references from a local values file (--values FILE)",
                self.by_scheme
                    .keys()
                    .map(|s| format!("{s}:"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificate_refusals_are_told_from_other_tls_failures() {
        let sent = "error sending request: client error (SendRequest): connection error: ";
        for alert in ["CertificateRequired", "UnknownCA", "BadCertificate"] {
            assert!(client_certificate_refused(&format!(
                "{sent}received fatal alert: {alert}"
            )));
        }
        for other in [
            "received fatal alert: HandshakeFailure",
            "invalid peer certificate: UnknownIssuer",
            "Connection refused (os error 111)",
        ] {
            assert!(!client_certificate_refused(&format!("{sent}{other}")));
        }
    }

    #[test]
    fn poll_delays_spread_around_the_interval() {
        let interval = Duration::from_secs(60);
        let delays: Vec<Duration> = (0..200).map(|_| poll_delay(interval)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_secs(54) && *d <= Duration::from_secs(66))
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100);
    }

    #[test]
    fn changes_by_version_when_known_else_by_value() {
        let a = Fetched {
            version: Some("1".into()),
            ..Fetched::new(Secret::string("x"))
        };
        let b = Fetched {
            version: Some("2".into()),
            ..Fetched::new(Secret::string("x"))
        };
        assert!(a.differs_from(&b));
        assert!(!a.differs_from(&a.clone()));
        assert!(Fetched::new(Secret::string("x")).differs_from(&Fetched::new(Secret::string("y"))));
    }
}
