//! `consul:` and `service:` — Consul KV and the health of catalog services.
//!
//! Reads: keys are read through the recursive query their watch would use
//! (below), so keys sharing a parent prefix cost one request: `consul:app/a`
//! and `consul:app/b` are one `GET /v1/kv/app/?recurse`. A key alone under
//! its prefix (or every key, with `watch = "key"`) is one `GET /v1/kv/key`;
//! a key missing from a recursive answer (absent, or filtered out by the
//! token's ACL) is asked for on its own, so its error is exact. Requests run
//! concurrently, a bounded number at a time. `consul:prefix/` is one
//! recursive read, `service:name` one `GET /v1/health/service/name?passing`.
//! Values are UTF-8 text; `#field` selects inside JSON values. With
//! `max_stale` set, reads may be answered by any server, and are repeated
//! against the leader when that server's last contact with it is older than
//! the bound.
//!
//! Watches ([`Watching::observe`]) use blocking queries, shared: under the
//! default policy every key is watched through the recursive query of its
//! parent prefix, and prefixes inside another watched prefix are folded into
//! it, so the number of long polls is the number of distinct prefixes, not
//! of keys. A returned index that went backwards resets the watch; an index
//! that moved with the watched data unchanged is not a change. Errors back
//! off exponentially before the next query.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    Backend, BoxFuture, ErrorKind, FetchError, Fetched, Observation, PlannedCall, Seen, WatchGroup,
    Watching, error_chain, http,
};
use crate::backoff::Backoff;
use crate::environment::Environment;
use crate::reference::{Scheme, Source};
use crate::secret::Secret;

/// Between blocking queries after errors: 500 ms doubling to 4 s, each in
/// the second half of its step. Consul is usually an agent on the node: a
/// query every few seconds costs it nothing, and an agent that is back is
/// seen (and readiness restored) within seconds.
const WATCH_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(4)).jitter(0.5, 1.0);

/// How reads and watches group keys into requests (recursive reads and
/// blocking queries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchPolicy {
    /// One blocking query per key.
    Key,
    /// One recursive query per parent prefix (the default).
    Prefix,
    /// One recursive query for all of KV.
    Root,
}

/// Settings from `[consul]`; unset ones come from the standard variables.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsulConfig {
    /// The agent, `host:port` or a URL; `None`: `CONSUL_HTTP_ADDR`, else
    /// `127.0.0.1:8500`.
    pub address: Option<String>,
    /// The ACL token; wins over `token_file`. `None` with no `token_file`:
    /// `CONSUL_HTTP_TOKEN`, else `CONSUL_HTTP_TOKEN_FILE`, else anonymous.
    pub token: Option<String>,
    /// A file holding the ACL token, read once when the backend is built.
    pub token_file: Option<PathBuf>,
    /// The datacenter asked (`?dc=`) unless a reference names its own;
    /// `None`: the agent's.
    pub datacenter: Option<String>,
    /// A PEM CA bundle trusted besides the system's roots; `None`:
    /// `CONSUL_CACERT`.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for agents that verify
    /// incoming TLS connections (`verify_incoming`).
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (PEM).
    pub client_key: Option<PathBuf>,
    /// Allow reads from any server when its data is at most this old.
    pub max_stale: Duration,
    /// How long one blocking query waits for a change.
    pub wait: Duration,
    /// How keys are grouped into requests (default [`WatchPolicy::Prefix`]).
    pub watch: WatchPolicy,
    /// The largest answer read, in bytes; a larger one is an error.
    pub max_answer_size: u64,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: None,
            token: None,
            token_file: None,
            datacenter: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            max_stale: Duration::from_secs(2),
            wait: Duration::from_secs(60),
            watch: WatchPolicy::Prefix,
            max_answer_size: http::CONSUL_MAX_ANSWER,
        }
    }
}

/// Keys fetched at once by one run.
const CONCURRENT_READS: usize = 16;

/// The backend: a handle on the shared client, so that concurrent reads and
/// blocking queries can run as tasks of their own.
pub struct Consul {
    client: Arc<Client>,
}

struct Client {
    http: reqwest::Client,
    base: Url,
    /// The address as it may be printed (no `user:password@`).
    shown: String,
    max_answer_size: u64,
    token: Option<String>,
    /// Where the token came from, for access errors.
    token_source: String,
    datacenter: Option<String>,
    max_stale: Duration,
    wait: Duration,
    policy: WatchPolicy,
    reads: Arc<Semaphore>,
    /// Last index and consecutive errors of each watch, between observations.
    watches: Mutex<HashMap<Watch, WatchState>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct WatchState {
    index: u64,
    errors: u32,
    /// The query rate limit: tokens left (negative: owed) when last
    /// counted, and when that was.
    tokens: f64,
    counted: Option<tokio::time::Instant>,
    /// What the server's last `Retry-After` asked for.
    retry_after: Duration,
}

/// The blocking loop of one watch is rate-limited as Consul's
/// documentation advises, with a token bucket: bursts of
/// [`QUERY_BURST`], then one query per [`QUERY_INTERVAL`]. A server (or
/// proxy) that answers blocking queries at once, with an index of 0, one
/// that goes backwards or one that is not a number, cannot make the loop
/// spin; a real change after a quiet spell is still read at once.
const QUERY_INTERVAL: Duration = Duration::from_millis(100);
const QUERY_BURST: f64 = 2.0;

impl WatchState {
    /// Takes a token for a query starting at `now`; returns how long to
    /// wait for it.
    fn take_token(&mut self, now: tokio::time::Instant) -> Duration {
        let per = QUERY_INTERVAL.as_secs_f64();
        let tokens = match self.counted {
            Some(at) => (self.tokens + now.saturating_duration_since(at).as_secs_f64() / per)
                .min(QUERY_BURST),
            None => QUERY_BURST,
        };
        self.counted = Some(now);
        self.tokens = tokens - 1.0;
        if tokens >= 1.0 {
            Duration::ZERO
        } else {
            QUERY_INTERVAL.mul_f64(1.0 - tokens)
        }
    }
}

/// One blocking query.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Watch {
    Key { key: String, dc: Option<String> },
    Prefix { prefix: String, dc: Option<String> },
    Service(Source),
}

impl std::fmt::Display for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dc = |dc: &Option<String>| dc.as_ref().map(|d| format!(" in {d}")).unwrap_or_default();
        match self {
            Watch::Key { key, dc: d } => write!(f, "kv {key}{}", dc(d)),
            Watch::Prefix { prefix, dc: d } => write!(f, "kv {prefix}* (recurse){}", dc(d)),
            Watch::Service(s) => write!(f, "health of {s}"),
        }
    }
}

/// One HTTP answer from Consul.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
    index: u64,
    /// `Retry-After` of a 429 or 503.
    retry_after: Option<Duration>,
}

impl Consul {
    /// The backend, from `[consul]` and `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_SSL`,
    /// `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_CACERT` and
    /// `CONSUL_CLIENT_CERT`/`CONSUL_CLIENT_KEY`.
    pub fn new(config: ConsulConfig, env: &dyn Environment) -> Result<Consul, String> {
        let address = config
            .address
            .clone()
            .or_else(|| env.var("CONSUL_HTTP_ADDR"))
            .unwrap_or_else(|| "127.0.0.1:8500".to_string());
        let ssl = env
            .var("CONSUL_HTTP_SSL")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"));
        let base = base_url(&address, ssl)?;
        super::warn_if_plain_http("Consul", &base);
        let (token, token_source) = match (&config.token, &config.token_file) {
            (Some(t), _) => (Some(t.clone()), "token from [consul] token".to_string()),
            (None, Some(f)) => (Some(read_token(f)?), format!("token from {}", f.display())),
            (None, None) => match (
                env.var("CONSUL_HTTP_TOKEN"),
                env.var("CONSUL_HTTP_TOKEN_FILE"),
            ) {
                (Some(t), _) if !t.is_empty() => {
                    (Some(t), "token from CONSUL_HTTP_TOKEN".to_string())
                }
                (_, Some(f)) => {
                    let path = PathBuf::from(&f);
                    (
                        Some(read_token(&path)?),
                        format!("token from CONSUL_HTTP_TOKEN_FILE {f}"),
                    )
                }
                _ => (None, "no token (anonymous)".to_string()),
            },
        };
        let ca = config
            .ca_file
            .clone()
            .or_else(|| env.var("CONSUL_CACERT").map(PathBuf::from));
        // Consul never redirects: a redirect is someone else's answer, and
        // the token would follow it.
        let http = super::http_client(&base, false, ca.as_deref(), "Consul")?
            .redirect(reqwest::redirect::Policy::none());
        let http = super::with_client_certificate(
            http,
            config
                .client_cert
                .clone()
                .or_else(|| env.var("CONSUL_CLIENT_CERT").map(PathBuf::from)),
            config
                .client_key
                .clone()
                .or_else(|| env.var("CONSUL_CLIENT_KEY").map(PathBuf::from)),
            "Consul",
            "client_cert and client_key under [consul], or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY",
        )?;
        Ok(Consul {
            client: Arc::new(Client {
                http,
                shown: http::redacted(&base),
                base,
                max_answer_size: config.max_answer_size,
                token,
                token_source,
                datacenter: config.datacenter.clone(),
                max_stale: config.max_stale,
                wait: config.wait,
                policy: config.watch,
                reads: Arc::new(Semaphore::new(CONCURRENT_READS)),
                watches: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Client {
    fn dc<'a>(&'a self, source: &'a Source) -> Option<&'a str> {
        source
            .params
            .get("dc")
            .map(String::as_str)
            .or(self.datacenter.as_deref())
    }

    fn url(&self, segments: &[&str], trailing_slash: bool) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("an http(s) URL has a path");
            path.pop_if_empty().push("v1");
            for s in segments {
                for part in s.split('/').filter(|p| !p.is_empty()) {
                    path.push(part);
                }
            }
            if trailing_slash {
                path.push("");
            }
        }
        url
    }

    /// One GET. `index` > 0 makes it a blocking query.
    async fn get(
        &self,
        url: Url,
        query: &[(&str, String)],
        index: u64,
    ) -> Result<Answer, FetchError> {
        let stale = !self.max_stale.is_zero();
        let mut answer = self.send(url.clone(), query, index, stale).await?;
        if stale && answer.1 > self.max_stale {
            tracing::debug!(
                last_contact_ms = answer.1.as_millis() as u64,
                "stale answer too old; asking the leader"
            );
            answer = self.send(url, query, index, false).await?;
        }
        Ok(answer.0)
    }

    async fn send(
        &self,
        mut url: Url,
        query: &[(&str, String)],
        index: u64,
        stale: bool,
    ) -> Result<(Answer, Duration), FetchError> {
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                if v.is_empty() {
                    q.append_key_only(k);
                } else {
                    q.append_pair(k, v);
                }
            }
            if stale {
                q.append_key_only("stale");
            }
            if index > 0 {
                let wait = self.wait.mul_f64(0.9 + fastrand::f64() * 0.2);
                q.append_pair("index", &index.to_string());
                q.append_pair("wait", &format!("{}ms", wait.as_millis()));
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let mut request = self.http.get(url.clone());
        if let Some(t) = &self.token {
            request = request.header("X-Consul-Token", t);
        }
        if index > 0 {
            // Consul adds up to wait/16 of jitter; allow for it and a margin.
            request = request.timeout(self.wait.mul_f64(1.2) + Duration::from_secs(10));
        } else {
            request = request.timeout(Duration::from_secs(30));
        }
        let action = || format!("GET {}", url.path());
        let response = request.send().await.map_err(|e| {
            let why = error_chain(&e);
            // A certificate problem does not go away by asking again.
            let (kind, hint) = if super::client_certificate_refused(&why) {
                (
                    ErrorKind::Invalid,
                    "Consul refused the TLS handshake for want of a client certificate it trusts (mutual TLS): give one with CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY, or client_cert and client_key under [consul]",
                )
            } else if why.contains("certificate") {
                (
                    ErrorKind::Invalid,
                    "Consul's TLS certificate is not trusted: give its CA with CONSUL_CACERT or [consul] ca_file",
                )
            } else {
                (
                    ErrorKind::Transient,
                    "check CONSUL_HTTP_ADDR (host:port or URL) and that the agent is running",
                )
            };
            FetchError::new(
                kind,
                "consul",
                action(),
                format!("cannot reach Consul at {}: {why}", self.shown),
            )
            .hint(hint)
        })?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(http::redacted_text)
                .unwrap_or_else(|| "nowhere".to_string());
            return Err(FetchError::new(
                ErrorKind::Invalid,
                "consul",
                action(),
                format!(
                    "Consul at {} answered HTTP {} redirecting to {location}; not followed (Consul never redirects, and the token would go with it)",
                    self.shown,
                    status.as_u16()
                ),
            )
            .hint("set CONSUL_HTTP_ADDR (or [consul] address) to the agent itself, not to something that redirects"));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let index = header("x-consul-index").unwrap_or(0);
        let last_contact = Duration::from_millis(
            header("x-consul-lastcontact")
                .unwrap_or(0)
                .min(u64::from(u32::MAX)),
        );
        let (retry_after, body) = http::read_answer(
            response,
            self.max_answer_size,
            "consul",
            &action(),
            "[consul] max_answer_size",
        )
        .await?;
        Ok((
            Answer {
                status,
                body,
                index,
                retry_after,
            },
            last_contact,
        ))
    }

    /// The error for a non-success answer.
    fn status_error(&self, action: String, what: &str, answer: &Answer) -> FetchError {
        let text: String = String::from_utf8_lossy(&answer.body)
            .chars()
            .take(300)
            .collect();
        let text = text.trim();
        let status = answer.status.as_u16();
        let (kind, hint) = match status {
            403 => (
                ErrorKind::Denied,
                Some(format!(
                    "give the token read access, e.g. key_prefix \"{what}\" {{ policy = \"read\" }} (or service_prefix for services)"
                )),
            ),
            404 => (
                ErrorKind::NotFound,
                Some("check the key and the datacenter".to_string()),
            ),
            429 => (ErrorKind::Transient, None),
            s if s >= 500 => (ErrorKind::Transient, None),
            _ => (ErrorKind::Invalid, None),
        };
        let mut e = FetchError::new(kind, "consul", action, super::http_status(status, text));
        e.hint = hint;
        e.retry_after = answer.retry_after;
        if kind == ErrorKind::Denied {
            e.identity = Some(self.token_source.clone());
        }
        e
    }

    fn dc_query(&self, dc: Option<&str>) -> Vec<(&'static str, String)> {
        dc.map(|d| vec![("dc", d.to_string())]).unwrap_or_default()
    }

    async fn read_key(
        &self,
        key: &str,
        dc: Option<&str>,
        index: u64,
    ) -> Result<(Option<Value>, u64), FetchError> {
        let url = self.url(&["kv", key], false);
        let answer = self.get(url, &self.dc_query(dc), index).await?;
        match answer.status {
            StatusCode::OK => {
                let entries: Vec<KvEntry> =
                    serde_json::from_slice(&answer.body).map_err(|_| bad_answer(key))?;
                let entry = entries
                    .into_iter()
                    .find(|e| e.key == key)
                    .ok_or_else(|| bad_answer(key))?;
                Ok((Some(entry.text(key)?), answer.index))
            }
            StatusCode::NOT_FOUND => Ok((None, answer.index)),
            _ => Err(self.status_error(format!("GET /v1/kv/{key}"), key, &answer)),
        }
    }

    /// Every key under a prefix, by full key.
    async fn read_prefix(
        &self,
        prefix: &str,
        dc: Option<&str>,
        index: u64,
    ) -> Result<(BTreeMap<String, Value>, u64), FetchError> {
        let url = self.url(&["kv", prefix], prefix.is_empty() || prefix.ends_with('/'));
        let mut query = self.dc_query(dc);
        query.push(("recurse", String::new()));
        let answer = self.get(url, &query, index).await?;
        match answer.status {
            StatusCode::OK => {
                let entries: Vec<KvEntry> =
                    serde_json::from_slice(&answer.body).map_err(|_| bad_answer(prefix))?;
                let mut out = BTreeMap::new();
                for e in entries {
                    // Folder markers ("a/b/" with no value) are not values.
                    if e.key.ends_with('/') && e.value.is_none() {
                        continue;
                    }
                    let text = e.text(&e.key)?;
                    out.insert(e.key, text);
                }
                Ok((out, answer.index))
            }
            StatusCode::NOT_FOUND => Ok((BTreeMap::new(), answer.index)),
            _ => Err(self.status_error(format!("GET /v1/kv/{prefix}?recurse"), prefix, &answer)),
        }
    }

    async fn read_service(&self, source: &Source, index: u64) -> Result<(Value, u64), FetchError> {
        let url = self.url(&["health", "service", &source.path], false);
        let mut query = self.dc_query(self.dc(source));
        if source.params.get("passing").map(String::as_str) != Some("false") {
            query.push(("passing", String::new()));
        }
        if let Some(tag) = source.params.get("tag") {
            query.push(("tag", tag.clone()));
        }
        let answer = self.get(url, &query, index).await?;
        if answer.status != StatusCode::OK {
            return Err(self.status_error(
                format!("GET /v1/health/service/{}", source.path),
                &source.path,
                &answer,
            ));
        }
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&answer.body).map_err(|_| bad_answer(&source.path))?;
        let instances = entries
            .into_iter()
            .map(|e| {
                let address = if e.service.address.is_empty() {
                    e.node.address.clone()
                } else {
                    e.service.address.clone()
                };
                serde_json::json!({
                    "ID": e.service.id,
                    "Name": e.service.service,
                    "Node": e.node.node,
                    "Address": address,
                    "Port": e.service.port,
                    "Tags": e.service.tags,
                    "Meta": e.service.meta,
                })
            })
            .collect();
        Ok((Value::Array(instances), answer.index))
    }

    async fn fetch_one(&self, source: &Source) -> Result<Fetched, FetchError> {
        let _permit = self.reads.acquire().await.expect("never closed");
        let dc = self.dc(source);
        match source.scheme {
            Scheme::Service => {
                let (value, index) = self.read_service(source, 0).await?;
                Ok(versioned(value, index))
            }
            _ if source.is_prefix() => {
                let (map, index) = self.read_prefix(&source.path, dc, 0).await?;
                Ok(versioned(under(&map, &source.path), index))
            }
            _ => match self.read_key(&source.path, dc, 0).await? {
                (Some(value), index) => Ok(versioned(value, index)),
                (None, _) => Err(gone(&source.path).hint(format!(
                    "check the key and the datacenter ({}); mark it |optional or give |default= if it may be absent",
                    dc.unwrap_or("the agent's")
                ))),
            },
        }
    }

    /// The requests of one fetch: the sources that share a recursive query
    /// (two or more under one watched prefix), and each other source alone.
    fn read_groups(&self, sources: &[Source]) -> Vec<(Option<Watch>, Vec<usize>)> {
        let mut groups = Vec::new();
        for (watch, served) in self.watches_for(sources) {
            if matches!(watch, Watch::Prefix { .. }) && served.len() > 1 {
                groups.push((Some(watch), served));
            } else {
                groups.extend(served.into_iter().map(|i| (None, vec![i])));
            }
        }
        groups
    }

    /// Fetches one group of [`Client::read_groups`]: one recursive read for
    /// all of them, then each key the answer lacks on its own (for the exact
    /// error: absent, or hidden by the token's ACL). A recursive read the
    /// token may not make falls back to reading each source on its own.
    async fn fetch_group(
        self: Arc<Self>,
        watch: Option<Watch>,
        sources: Vec<Source>,
    ) -> Vec<Result<Fetched, FetchError>> {
        let Some(watch) = watch else {
            return self.each_alone(&sources).await;
        };
        let refs: Vec<&Source> = sources.iter().collect();
        let answer = {
            let _permit = self.reads.acquire().await.expect("never closed");
            self.poll(&watch, &refs, 0).await
        };
        match answer {
            Ok((mut values, _)) => {
                let missing: Vec<usize> = (0..values.len())
                    .filter(|&i| matches!(&values[i], Err(e) if e.kind == ErrorKind::NotFound))
                    .collect();
                let alone: Vec<Source> = missing.iter().map(|&i| sources[i].clone()).collect();
                for (i, v) in missing.into_iter().zip(self.each_alone(&alone).await) {
                    values[i] = v;
                }
                values
            }
            Err(e) if e.kind == ErrorKind::Denied => self.each_alone(&sources).await,
            Err(e) => vec![Err(e); sources.len()],
        }
    }

    /// Reads each source with a request of its own, concurrently.
    async fn each_alone(self: &Arc<Self>, sources: &[Source]) -> Vec<Result<Fetched, FetchError>> {
        super::fetch_each("consul", sources, |s| {
            let client = self.clone();
            async move { client.fetch_one(&s).await }
        })
        .await
    }

    /// The blocking queries that watch these sources, and which sources each
    /// one serves.
    fn watches_for(&self, sources: &[Source]) -> BTreeMap<Watch, Vec<usize>> {
        let mut prefixes: BTreeSet<(Option<String>, String)> = BTreeSet::new();
        let mut keyed: Vec<(usize, Watch)> = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            let dc = self.dc(s).map(str::to_string);
            match (s.scheme, self.policy) {
                (Scheme::Service, _) => keyed.push((i, Watch::Service(s.clone()))),
                (_, WatchPolicy::Key) if !s.is_prefix() => keyed.push((
                    i,
                    Watch::Key {
                        key: s.path.clone(),
                        dc,
                    },
                )),
                (_, WatchPolicy::Root) => {
                    prefixes.insert((dc, String::new()));
                }
                _ => {
                    let prefix = if s.is_prefix() {
                        s.path.clone()
                    } else {
                        s.path
                            .rsplit_once('/')
                            .map(|(p, _)| format!("{p}/"))
                            .unwrap_or_default()
                    };
                    prefixes.insert((dc, prefix));
                }
            }
        }
        // Fold prefixes into any watched prefix that contains them.
        let outer: Vec<(Option<String>, String)> = prefixes
            .iter()
            .filter(|(dc, p)| {
                !prefixes
                    .iter()
                    .any(|(dc2, q)| dc2 == dc && q != p && p.starts_with(q.as_str()))
            })
            .cloned()
            .collect();
        let mut out: BTreeMap<Watch, Vec<usize>> = BTreeMap::new();
        for (i, w) in keyed {
            out.entry(w).or_default().push(i);
        }
        for (i, s) in sources.iter().enumerate() {
            if s.scheme == Scheme::Service || (self.policy == WatchPolicy::Key && !s.is_prefix()) {
                continue;
            }
            let dc = self.dc(s).map(str::to_string);
            if let Some((dc, prefix)) = outer
                .iter()
                .find(|(d, p)| *d == dc && s.path.starts_with(p.as_str()))
            {
                out.entry(Watch::Prefix {
                    prefix: prefix.clone(),
                    dc: dc.clone(),
                })
                .or_default()
                .push(i);
            }
        }
        out
    }

    /// Runs one blocking query; returns the new value of each source it
    /// serves (`None` for a key that is gone) and the new index.
    async fn poll(
        &self,
        watch: &Watch,
        sources: &[&Source],
        index: u64,
    ) -> Result<(Vec<Result<Fetched, FetchError>>, u64), FetchError> {
        match watch {
            Watch::Service(s) => {
                let (value, index) = self.read_service(s, index).await?;
                Ok((vec![Ok(versioned(value, index))], index))
            }
            Watch::Key { key, dc } => {
                let (value, index) = self.read_key(key, dc.as_deref(), index).await?;
                let result = value.map(|v| versioned(v, index)).ok_or_else(|| gone(key));
                Ok((vec![result], index))
            }
            Watch::Prefix { prefix, dc } => {
                let (map, index) = self.read_prefix(prefix, dc.as_deref(), index).await?;
                let values = sources
                    .iter()
                    .map(|s| {
                        if s.is_prefix() {
                            Ok(versioned(under(&map, &s.path), index))
                        } else {
                            map.get(&s.path)
                                .map(|v| versioned(v.clone(), index))
                                .ok_or_else(|| gone(&s.path))
                        }
                    })
                    .collect();
                Ok((values, index))
            }
        }
    }

    fn state(&self, w: &Watch) -> WatchState {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(w)
            .copied()
            .unwrap_or_default()
    }

    fn set_state(&self, w: &Watch, state: WatchState) {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(w.clone(), state);
    }
}

fn versioned(value: Value, index: u64) -> Fetched {
    Fetched {
        value: Secret::new(value),
        version: Some(index.to_string()),
        lease: None,
    }
}

/// The keys below `prefix`, relative to it.
fn under(map: &BTreeMap<String, Value>, prefix: &str) -> Value {
    Value::Object(
        map.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| k.len() > prefix.len())
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
            .collect::<Map<String, Value>>(),
    )
}

fn gone(key: &str) -> FetchError {
    FetchError::new(
        ErrorKind::NotFound,
        "consul",
        format!("GET /v1/kv/{key}"),
        format!("no key {key}"),
    )
}

fn bad_answer(what: &str) -> FetchError {
    FetchError::new(
        ErrorKind::Transient,
        "consul",
        format!("GET {what}"),
        "the answer is not Consul's JSON",
    )
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("cannot read the Consul token file {}: {e}", path.display()))
}

/// `CONSUL_HTTP_ADDR` as the consul CLI takes it: `host:port` or a URL.
pub fn base_url(address: &str, ssl: bool) -> Result<Url, String> {
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else if ssl {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| {
        format!(
            "Consul address \"{}\" is not host:port or a URL: {e}",
            http::redacted_text(address)
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "Consul address \"{}\": only http and https are supported",
            http::redacted_text(address)
        ));
    }
    http::check_userinfo("Consul", &url)?;
    Ok(url)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    value: Option<String>,
}

impl KvEntry {
    fn text(&self, key: &str) -> Result<Value, FetchError> {
        let Some(b64) = &self.value else {
            return Ok(Value::String(String::new()));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad_answer(key))?;
        String::from_utf8(bytes).map(Value::String).map_err(|_| {
            FetchError::new(
                ErrorKind::Invalid,
                "consul",
                format!("GET /v1/kv/{key}"),
                format!("{key} is not UTF-8 text"),
            )
            .hint("store text, or base64 text decoded with the base64_decode helper")
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    node: String,
    address: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

impl Backend for Consul {
    fn name(&self) -> &'static str {
        "consul"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        self.plan_known(sources, &[])
    }

    /// A key absent from a recursive answer is read again on its own, for
    /// the exact error (absent, or hidden by the token's ACL).
    fn plan_known(&self, sources: &[Source], absent: &[Source]) -> Vec<PlannedCall> {
        let mut calls = Vec::new();
        for (watch, served) in self.client.read_groups(sources) {
            match watch {
                Some(Watch::Prefix { prefix, dc }) => {
                    calls.push(PlannedCall {
                        target: dc,
                        action: "GET /v1/kv ?recurse".to_string(),
                        detail: format!("{prefix} ({} keys)", served.len()),
                    });
                    let again = served
                        .iter()
                        .map(|&i| &sources[i])
                        .filter(|s| !s.is_prefix() && absent.contains(s));
                    calls.extend(again.map(|s| PlannedCall {
                        target: self.client.dc(s).map(str::to_string),
                        action: "GET /v1/kv".to_string(),
                        detail: format!("{} (absent from the recursive answer)", s.path),
                    }));
                }
                _ => {
                    let s = &sources[served[0]];
                    calls.push(PlannedCall {
                        target: self.client.dc(s).map(str::to_string),
                        action: match s.scheme {
                            Scheme::Service => "GET /v1/health/service".to_string(),
                            _ if s.is_prefix() => "GET /v1/kv ?recurse".to_string(),
                            _ => "GET /v1/kv".to_string(),
                        },
                        detail: s.path.clone(),
                    });
                }
            }
        }
        calls
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            let (watches, groups): (Vec<_>, Vec<_>) =
                self.client.read_groups(sources).into_iter().unzip();
            let mut watches = watches.into_iter();
            super::fetch_groups("consul", sources, groups, |members| {
                self.client
                    .clone()
                    .fetch_group(watches.next().flatten(), members)
            })
            .await
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for Consul {
    fn watches(&self, sources: &[Source]) -> Vec<String> {
        self.client
            .watches_for(sources)
            .into_iter()
            .map(|(w, served)| {
                format!(
                    "blocking query: {w} ({} reference{})",
                    served.len(),
                    if served.len() == 1 { "" } else { "s" }
                )
            })
            .collect()
    }

    fn blocks(&self) -> bool {
        true
    }

    fn poll_interval(&self) -> Duration {
        // Watches block; this only paces retries after errors.
        Duration::from_secs(1)
    }

    /// One watcher per blocking query (a key, a prefix, a service).
    fn watch_groups(&self, sources: &[Source]) -> Vec<WatchGroup> {
        let mut groups: Vec<Vec<usize>> = self.client.watches_for(sources).into_values().collect();
        let mut seen = vec![false; sources.len()];
        for &i in groups.iter().flatten() {
            seen[i] = true;
        }
        let rest: Vec<usize> = (0..sources.len()).filter(|&i| !seen[i]).collect();
        if !rest.is_empty() {
            groups.push(rest);
        }
        groups.into_iter().map(WatchGroup::polled).collect()
    }

    fn observe<'a>(&'a self, known: &'a [(Source, Seen)]) -> BoxFuture<'a, Vec<Observation>> {
        Box::pin(async move {
            let sources: Vec<Source> = known.iter().map(|(s, _)| s.clone()).collect();
            let client = &self.client;
            let watches: Vec<(Watch, Vec<usize>)> =
                client.watches_for(&sources).into_iter().collect();
            let mut pending = Pending::start(client.clone(), &watches, &sources);
            let mut out: Vec<Observation> = vec![Observation::Unchanged; known.len()];
            while let Some((w, result)) = pending.next().await {
                let (watch, served) = &watches[w];
                let mut state = client.state(watch);
                match result {
                    Err(e) => {
                        state.errors += 1;
                        state.retry_after = e.retry_after.unwrap_or_default();
                        client.set_state(watch, state);
                        for &i in served {
                            out[i] = Observation::Failed(e.clone());
                        }
                        return out;
                    }
                    Ok((values, index)) => {
                        // The first answer after errors is reported even
                        // when nothing changed: the watch is healthy again.
                        let recovered = state.errors > 0;
                        state.errors = 0;
                        // An index that went backwards (a snapshot restore):
                        // start over; below 1 counts as 1.
                        state.index = if index < state.index { 0 } else { index.max(1) };
                        client.set_state(watch, state);
                        let mut changed = false;
                        for (&i, value) in served.iter().zip(values) {
                            // By value: a key's index moves with its
                            // neighbours under a watched prefix.
                            let o = Observation::compare(known[i].1.as_ref(), value, |a, b| {
                                a.value != b.value
                            });
                            if o != Observation::Unchanged {
                                out[i] = o;
                                changed = true;
                            }
                        }
                        if changed || recovered {
                            return out;
                        }
                        pending.again(w);
                    }
                }
            }
            out
        })
    }
}

/// The blocking queries of one observation, each re-issued as it returns
/// without a change. Dropping it aborts the queries still open.
struct Pending<'a> {
    client: Arc<Client>,
    watches: &'a [(Watch, Vec<usize>)],
    sources: &'a [Source],
    tasks: JoinSet<PollResult>,
}

type PollResult = (
    usize,
    Result<(Vec<Result<Fetched, FetchError>>, u64), FetchError>,
);

impl<'a> Pending<'a> {
    fn start(
        client: Arc<Client>,
        watches: &'a [(Watch, Vec<usize>)],
        sources: &'a [Source],
    ) -> Self {
        let mut p = Pending {
            client,
            watches,
            sources,
            tasks: JoinSet::new(),
        };
        for w in 0..watches.len() {
            p.again(w);
        }
        p
    }

    fn again(&mut self, w: usize) {
        let (watch, served) = &self.watches[w];
        let mut state = self.client.state(watch);
        let spacing = state.take_token(tokio::time::Instant::now());
        self.client.set_state(watch, state);
        let client = self.client.clone();
        let watch = watch.clone();
        let served: Vec<Source> = served.iter().map(|&i| self.sources[i].clone()).collect();
        self.tasks.spawn(async move {
            if state.errors > 0 {
                let backoff = WATCH_BACKOFF.delay(state.errors - 1);
                // A server that said when to come back is believed, within
                // the clamp.
                tokio::time::sleep(backoff.max(state.retry_after)).await;
            } else if !spacing.is_zero() {
                tokio::time::sleep(spacing).await;
            }
            // After errors, a query that answers at once: the values are
            // the same or not, and either way the watch is healthy again
            // now, not when a blocking query with the old index returns.
            let index = if state.errors > 0 { 0 } else { state.index };
            let refs: Vec<&Source> = served.iter().collect();
            (w, client.poll(&watch, &refs, index).await)
        });
    }

    async fn next(&mut self) -> Option<PollResult> {
        loop {
            if let Ok(done) = self.tasks.join_next().await? {
                return Some(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environment::MapEnv;
    use crate::reference::parse;

    fn consul(policy: WatchPolicy) -> Consul {
        Consul::new(
            ConsulConfig {
                watch: policy,
                ..ConsulConfig::default()
            },
            &MapEnv::default(),
        )
        .unwrap()
    }

    fn sources(refs: &[&str]) -> Vec<Source> {
        refs.iter().map(|r| parse(r).unwrap().source).collect()
    }

    #[test]
    fn addresses_as_the_consul_cli_takes_them() {
        assert_eq!(
            base_url("127.0.0.1:8500", false).unwrap().as_str(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(
            base_url("consul.service:8501", true).unwrap().as_str(),
            "https://consul.service:8501/"
        );
        assert_eq!(
            base_url("https://c:8501", false).unwrap().as_str(),
            "https://c:8501/"
        );
        assert!(base_url("unix:///tmp/consul.sock", false).is_err());
    }

    #[test]
    fn keys_share_the_query_of_their_prefix() {
        let s = sources(&[
            "consul:app/db/host",
            "consul:app/db/port",
            "consul:app/web/",
            "consul:app/web/x/y",
            "consul:app/",
            "consul:other/key",
            "consul:top",
            "consul:app/db/host?dc=dc2",
            "service:web",
        ]);
        let w: Vec<String> = consul(WatchPolicy::Prefix)
            .client
            .watches_for(&s)
            .keys()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(
            w,
            [
                "kv * (recurse)",
                "kv app/db/* (recurse) in dc2",
                "health of service:web"
            ]
        );
        let w: Vec<String> = consul(WatchPolicy::Key)
            .client
            .watches_for(&s[..3])
            .keys()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(
            w,
            ["kv app/db/host", "kv app/db/port", "kv app/web/* (recurse)"]
        );
        let spread = sources(&["consul:a/1", "consul:a/2", "consul:b/1", "consul:b/c/1"]);
        let w: Vec<String> = consul(WatchPolicy::Prefix)
            .client
            .watches_for(&spread)
            .keys()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(w, ["kv a/* (recurse)", "kv b/* (recurse)"]);
    }

    #[test]
    fn configuration_from_the_standard_variables() {
        let env = MapEnv::new([
            ("CONSUL_HTTP_ADDR", "consul:8501"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_HTTP_TOKEN", "t"),
        ]);
        let c = Consul::new(ConsulConfig::default(), &env).unwrap();
        assert_eq!(c.client.base.as_str(), "https://consul:8501/");
        assert_eq!(c.client.token.as_deref(), Some("t"));
        assert_eq!(c.client.token_source, "token from CONSUL_HTTP_TOKEN");
        let c = Consul::new(
            ConsulConfig {
                address: Some("10.0.0.1:8500".into()),
                ..ConsulConfig::default()
            },
            &env,
        )
        .unwrap();
        assert_eq!(c.client.base.as_str(), "https://10.0.0.1:8500/");
        assert!(
            Consul::new(
                ConsulConfig::default(),
                &MapEnv::new([("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/t")])
            )
            .err()
            .unwrap()
            .contains("/nonexistent/t")
        );
    }
}
