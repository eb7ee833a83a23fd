//! A Consul test server: the subset of Consul's HTTP API envrender uses, on
//! loopback, written from `shared/protocols/consul.md` — KV reads (single,
//! `recurse`, `keys` with `separator`, `raw`), writes (`flags`, `cas`),
//! deletes (`recurse`, tombstones), `X-Consul-Index` rules, blocking queries
//! (`index`, `wait` plus jitter, the same index on timeout, missing-key watches
//! that keep blocking), `stale`/`consistent`, ACL tokens (`?token=`,
//! `X-Consul-Token`, `Authorization: Bearer`) with Consul's 403 texts, and
//! catalog and health service reads. Controls let tests force the index
//! backwards, inject errors and latency, and read request counts and the
//! number of blocking queries open at once.
//!
//! Used in-process by the tests and as a process of its own by
//! `cargo run --example consul_test_server`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

pub const DATACENTER: &str = "dc1";
const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";

#[derive(Clone, Debug)]
struct Entry {
    value: Option<Vec<u8>>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
}

/// One service instance on one node, with its checks' statuses.
#[derive(Clone, Debug)]
pub struct Instance {
    pub node: String,
    pub node_address: String,
    pub id: String,
    pub service: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// Check statuses: "passing", "warning" or "critical".
    pub checks: Vec<String>,
}

/// An ACL token: a list of key prefixes it may read.
#[derive(Clone, Debug)]
struct Token {
    accessor: String,
    read_prefixes: Vec<String>,
}

#[derive(Default)]
struct Store {
    index: u64,
    kv: BTreeMap<String, Entry>,
    tombstones: BTreeMap<String, u64>,
    instances: Vec<Instance>,
    services_index: u64,
    /// With ACLs on, unknown and anonymous tokens read nothing.
    acl: Option<HashMap<String, Token>>,
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// The KV table's index: the highest of entries and tombstones.
    fn kv_index(&self) -> u64 {
        let entries = self.kv.values().map(|e| e.modify_index).max().unwrap_or(0);
        let tombs = self.tombstones.values().copied().max().unwrap_or(0);
        entries.max(tombs)
    }

    fn prefix_index(&self, prefix: &str) -> u64 {
        let entries = self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let tombs = self
            .tombstones
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        match entries.max(tombs) {
            0 => self.kv_index(),
            i => i,
        }
    }
}

#[derive(Clone, Debug)]
struct Fault {
    status: u16,
    body: String,
}

struct Inner {
    store: Mutex<Store>,
    changes: tokio::sync::watch::Sender<u64>,
    requests: AtomicUsize,
    kv_requests: Mutex<BTreeMap<String, usize>>,
    blocking_now: AtomicUsize,
    blocking_max: AtomicUsize,
    faults: Mutex<VecDeque<Fault>>,
    latency: Mutex<Duration>,
    last_contact_ms: AtomicUsize,
    /// Answer blocking queries at once, as a misbehaving proxy would.
    ignore_index: std::sync::atomic::AtomicBool,
    stale_reads: AtomicUsize,
    consistent_reads: AtomicUsize,
}

/// A running Consul test server.
#[derive(Clone)]
pub struct ConsulServer {
    pub url: String,
    inner: Arc<Inner>,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// Query parameters as Consul reads them: `?recurse` with no value is set.
fn query(raw: Option<String>) -> HashMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The request's token: `?token=`, then `X-Consul-Token`, then
/// `Authorization: Bearer`.
fn token(q: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = q.get("token").filter(|t| !t.is_empty()) {
        return Some(t.clone());
    }
    if let Some(t) = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    {
        return Some(t.to_string());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    let mut words = auth.split_whitespace();
    let scheme = words.next()?;
    if scheme.eq_ignore_ascii_case("bearer") {
        words.next().map(str::to_string)
    } else {
        None
    }
}

/// Parses Go duration syntax as Consul's `wait` takes it.
fn go_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s).ok()
}

enum Access {
    All,
    Prefixes {
        accessor: String,
        prefixes: Vec<String>,
    },
    UnknownToken,
}

impl Access {
    fn can_read(&self, key: &str) -> bool {
        match self {
            Access::All => true,
            Access::Prefixes { prefixes, .. } => {
                prefixes.iter().any(|p| key.starts_with(p.as_str()))
            }
            Access::UnknownToken => false,
        }
    }
}

struct Read {
    status: StatusCode,
    body: Vec<u8>,
    content_type: &'static str,
    index: u64,
    missing: bool,
    filtered: bool,
}

impl Read {
    /// A 200 answer with a JSON body.
    fn json(body: &impl serde::Serialize, index: u64) -> Read {
        Read {
            status: StatusCode::OK,
            body: serde_json::to_vec(body).unwrap(),
            content_type: "application/json",
            index,
            missing: false,
            filtered: false,
        }
    }
}

impl ConsulServer {
    /// Starts a server on a free loopback port, on a thread of its own.
    pub fn start() -> ConsulServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener)
    }

    pub fn serve(listener: std::net::TcpListener) -> ConsulServer {
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (changes, _) = tokio::sync::watch::channel(0);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changes,
            requests: AtomicUsize::new(0),
            kv_requests: Mutex::new(BTreeMap::new()),
            blocking_now: AtomicUsize::new(0),
            blocking_max: AtomicUsize::new(0),
            faults: Mutex::new(VecDeque::new()),
            latency: Mutex::new(Duration::ZERO),
            last_contact_ms: AtomicUsize::new(0),
            ignore_index: std::sync::atomic::AtomicBool::new(false),
            stale_reads: AtomicUsize::new(0),
            consistent_reads: AtomicUsize::new(0),
        });
        let server = ConsulServer { url, inner };
        let app = axum::Router::new()
            .route("/v1/kv/", axum::routing::any(kv_root))
            .route("/v1/kv/{*key}", axum::routing::any(kv))
            .route(
                "/v1/health/service/{name}",
                axum::routing::get(health_service),
            )
            .route(
                "/v1/catalog/service/{name}",
                axum::routing::get(catalog_service),
            )
            .route("/v1/catalog/services", axum::routing::get(catalog_services))
            .route(
                "/v1/status/leader",
                axum::routing::get(|| async { axum::Json("127.0.0.1:8300") }),
            )
            .with_state(server.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
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

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap()
    }

    fn changed(&self, index: u64) {
        self.inner.changes.send_replace(index);
    }

    // ---- controls -------------------------------------------------------

    /// Writes a key; returns its new ModifyIndex.
    pub fn put(&self, key: &str, value: &str) -> u64 {
        let index = {
            let mut st = self.store();
            let index = st.bump();
            let create_index = st.kv.get(key).map_or(index, |e| e.create_index);
            st.kv.insert(
                key.to_string(),
                Entry {
                    value: Some(value.as_bytes().to_vec()),
                    flags: 0,
                    create_index,
                    modify_index: index,
                },
            );
            st.tombstones.remove(key);
            index
        };
        self.changed(index);
        index
    }

    pub fn delete(&self, key: &str) {
        let index = {
            let mut st = self.store();
            let index = st.bump();
            st.kv.remove(key);
            st.tombstones.insert(key.to_string(), index);
            index
        };
        self.changed(index);
    }

    /// Registers a service instance (its checks as given).
    pub fn register(&self, instance: Instance) {
        let index = {
            let mut st = self.store();
            let index = st.bump();
            st.instances
                .retain(|i| !(i.id == instance.id && i.node == instance.node));
            st.instances.push(instance);
            st.services_index = index;
            index
        };
        self.changed(index);
    }

    /// Sets every check of one instance to `status`.
    pub fn set_health(&self, id: &str, status: &str) {
        let index = {
            let mut st = self.store();
            let index = st.bump();
            for i in st.instances.iter_mut().filter(|i| i.id == id) {
                for c in i.checks.iter_mut() {
                    *c = status.to_string();
                }
            }
            st.services_index = index;
            index
        };
        self.changed(index);
    }

    /// Turns ACLs on (default deny) with a token that may read `prefixes`.
    pub fn acl_token(&self, secret: &str, accessor: &str, prefixes: &[&str]) {
        let mut st = self.store();
        st.acl.get_or_insert_with(HashMap::new).insert(
            secret.to_string(),
            Token {
                accessor: accessor.to_string(),
                read_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            },
        );
    }

    /// Moves the whole index backwards (a snapshot restore): every entry's
    /// indexes are lowered, and blocked readers wake.
    pub fn regress_index(&self, to: u64) {
        {
            let mut st = self.store();
            st.index = to;
            for e in st.kv.values_mut() {
                e.modify_index = e.modify_index.min(to);
                e.create_index = e.create_index.min(to);
            }
            for i in st.tombstones.values_mut() {
                *i = (*i).min(to);
            }
            st.services_index = st.services_index.min(to);
        }
        self.changed(u64::MAX);
    }

    /// Answers the next `times` requests with `status` and `body`.
    pub fn fail(&self, times: usize, status: u16, body: &str) {
        let mut faults = self.inner.faults.lock().unwrap();
        for _ in 0..times {
            faults.push_back(Fault {
                status,
                body: body.to_string(),
            });
        }
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.lock().unwrap() = latency;
    }

    /// The `X-Consul-LastContact` the server reports on stale reads.
    pub fn set_last_contact(&self, ms: usize) {
        self.inner.last_contact_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes blocking queries return at once with the current data.
    pub fn ignore_index(&self, on: bool) {
        self.inner.ignore_index.store(on, Ordering::SeqCst);
    }

    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// KV requests per path (`app/db/host`, `app/?recurse`).
    pub fn kv_requests(&self) -> BTreeMap<String, usize> {
        self.inner.kv_requests.lock().unwrap().clone()
    }

    pub fn blocking_now(&self) -> usize {
        self.inner.blocking_now.load(Ordering::SeqCst)
    }

    pub fn blocking_max(&self) -> usize {
        self.inner.blocking_max.load(Ordering::SeqCst)
    }

    pub fn stale_reads(&self) -> usize {
        self.inner.stale_reads.load(Ordering::SeqCst)
    }

    pub fn consistent_reads(&self) -> usize {
        self.inner.consistent_reads.load(Ordering::SeqCst)
    }

    // ---- request handling -----------------------------------------------

    /// What every request goes through: counting, latency, faults, `dc`,
    /// consistency flags, `index`/`wait` parsing.
    async fn common(&self, q: &HashMap<String, String>) -> Result<(u64, Duration), Response> {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        let latency = *self.inner.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(f) = self.inner.faults.lock().unwrap().pop_front() {
            return Err(text(StatusCode::from_u16(f.status).unwrap(), f.body));
        }
        if let Some(dc) = q.get("dc")
            && !dc.is_empty()
            && dc != DATACENTER
        {
            return Err(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No path to datacenter",
            ));
        }
        if q.contains_key("stale") && q.contains_key("consistent") {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if q.contains_key("stale") {
            self.inner.stale_reads.fetch_add(1, Ordering::SeqCst);
        } else if q.contains_key("consistent") {
            self.inner.consistent_reads.fetch_add(1, Ordering::SeqCst);
        }
        let index = match q.get("index") {
            None => 0,
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| text(StatusCode::BAD_REQUEST, "Invalid index"))?,
        };
        let wait = match q.get("wait") {
            None => Duration::ZERO,
            Some(s) => {
                go_duration(s).ok_or_else(|| text(StatusCode::BAD_REQUEST, "Invalid wait time"))?
            }
        };
        Ok((index, wait))
    }

    fn access(&self, q: &HashMap<String, String>, headers: &HeaderMap) -> Access {
        let st = self.store();
        let Some(tokens) = &st.acl else {
            return Access::All;
        };
        match token(q, headers) {
            None => Access::Prefixes {
                accessor: ANONYMOUS_ACCESSOR.to_string(),
                prefixes: Vec::new(),
            },
            Some(t) => match tokens.get(&t) {
                Some(tok) => Access::Prefixes {
                    accessor: tok.accessor.clone(),
                    prefixes: tok.read_prefixes.clone(),
                },
                None => Access::UnknownToken,
            },
        }
    }

    /// Runs `read` as a blocking query: returns at once without `index`, or
    /// when the result's index passes it, or at the timeout with the same
    /// index. A read that finds nothing twice in a row raises the minimum
    /// index, so unrelated writes do not wake it.
    async fn blocking(&self, index: u64, wait: Duration, read: impl Fn(&Store) -> Read) -> Read {
        let mut changes = self.inner.changes.subscribe();
        let first = read(&self.store());
        if index == 0
            || first.index > index
            || first.status.is_client_error() && first.status != StatusCode::NOT_FOUND
            || self.inner.ignore_index.load(Ordering::SeqCst)
        {
            return first;
        }
        let wait = if wait.is_zero() {
            Duration::from_secs(300)
        } else {
            wait.min(Duration::from_secs(600))
        };
        let jitter = wait.mul_f64(fastrand::f64() / 16.0);
        let deadline = tokio::time::Instant::now() + wait + jitter;
        // Counted while open; the guard also counts a query whose client
        // went away (its future is dropped).
        let _open = OpenQuery::new(&self.inner);
        let mut min_index = index;
        let mut missing_before = first.missing;
        let mut result = first;
        loop {
            changes.borrow_and_update();
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                break;
            }
            let regressed = *changes.borrow() == u64::MAX;
            result = read(&self.store());
            if regressed || result.index > min_index {
                if result.missing && missing_before && !regressed {
                    // Still missing: keep waiting, from the current index.
                    min_index = result.index;
                    continue;
                }
                break;
            }
            missing_before = result.missing;
        }
        result
    }
}

struct OpenQuery<'a>(&'a Inner);

impl<'a> OpenQuery<'a> {
    fn new(inner: &'a Inner) -> Self {
        let now = inner.blocking_now.fetch_add(1, Ordering::SeqCst) + 1;
        inner.blocking_max.fetch_max(now, Ordering::SeqCst);
        OpenQuery(inner)
    }
}

impl Drop for OpenQuery<'_> {
    fn drop(&mut self) {
        self.0.blocking_now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn respond(r: Read, q: &HashMap<String, String>) -> Response {
    let mut response = (r.status, r.body).into_response();
    let h = response.headers_mut();
    h.insert("content-type", HeaderValue::from_static(r.content_type));
    h.insert("x-consul-index", HeaderValue::from(r.index.max(1)));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    if r.filtered && token_given(q) {
        h.insert(
            "x-consul-results-filtered-by-acls",
            HeaderValue::from_static("true"),
        );
    }
    if q.contains_key("stale") {
        h.insert(
            "x-consul-effective-consistency",
            HeaderValue::from_static("stale"),
        );
    } else if q.contains_key("consistent") {
        h.insert(
            "x-consul-effective-consistency",
            HeaderValue::from_static("consistent"),
        );
    }
    response
}

fn token_given(q: &HashMap<String, String>) -> bool {
    q.contains_key("token")
}

fn entry_json(key: &str, e: &Entry) -> Value {
    json!({
        "LockIndex": 0,
        "Key": key,
        "Flags": e.flags,
        "Value": e.value.as_ref().map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    })
}

async fn kv_root(
    State(s): State<ConsulServer>,
    method: Method,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kv_any(s, String::new(), method, raw, headers, body).await
}

async fn kv(
    State(s): State<ConsulServer>,
    Path(key): Path<String>,
    method: Method,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kv_any(s, key, method, raw, headers, body).await
}

async fn kv_any(
    s: ConsulServer,
    key: String,
    method: Method,
    raw: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = query(raw);
    let (index, wait) = match s.common(&q).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match method {
        Method::GET => {}
        Method::PUT => return kv_put(&s, &key, &q, body),
        Method::DELETE => return kv_delete(&s, &key, &q),
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut()
                .insert("allow", HeaderValue::from_static("GET,PUT,DELETE"));
            return r;
        }
    }
    let recurse = q.contains_key("recurse");
    let keys = q.contains_key("keys");
    if key.is_empty() && !recurse && !keys {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    {
        let label = if recurse {
            format!("{key}?recurse")
        } else if keys {
            format!("{key}?keys")
        } else {
            key.clone()
        };
        *s.inner
            .kv_requests
            .lock()
            .unwrap()
            .entry(label)
            .or_default() += 1;
    }
    let access = s.access(&q, &headers);
    if let Access::UnknownToken = access {
        return text(StatusCode::FORBIDDEN, "ACL not found");
    }
    if !recurse && !keys && !access.can_read(&key) {
        let Access::Prefixes { accessor, .. } = &access else {
            unreachable!()
        };
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Permission denied: token with AccessorID '{accessor}' lacks permission 'key:read' on \"{key}\""
            ),
        );
    }
    let separator = q.get("separator").or(q.get("seperator")).cloned();
    let raw_value = q.contains_key("raw");
    let read = |st: &Store| -> Read {
        let not_found = |index: u64| Read {
            status: StatusCode::NOT_FOUND,
            body: Vec::new(),
            content_type: "text/plain",
            index,
            missing: true,
            filtered: false,
        };
        if recurse || keys {
            let all: Vec<(&String, &Entry)> = st
                .kv
                .range(key.clone()..)
                .take_while(|(k, _)| k.starts_with(key.as_str()))
                .collect();
            let visible: Vec<(&String, &Entry)> = all
                .iter()
                .copied()
                .filter(|(k, _)| access.can_read(k))
                .collect();
            let filtered = visible.len() < all.len();
            let index = st.prefix_index(&key);
            if keys {
                let mut names: Vec<String> = Vec::new();
                for (k, _) in &visible {
                    let name = match &separator {
                        Some(sep) if !sep.is_empty() => match k[key.len()..].find(sep.as_str()) {
                            Some(i) => k[..key.len() + i + sep.len()].to_string(),
                            None => k.to_string(),
                        },
                        _ => k.to_string(),
                    };
                    if names.last() != Some(&name) {
                        names.push(name);
                    }
                }
                if names.is_empty() && !key.is_empty() {
                    return not_found(index);
                }
                return Read {
                    status: StatusCode::OK,
                    body: serde_json::to_vec(&names).unwrap(),
                    content_type: "application/json",
                    index,
                    missing: false,
                    filtered,
                };
            }
            if visible.is_empty() {
                return Read {
                    filtered,
                    ..not_found(index)
                };
            }
            let body: Vec<Value> = visible.iter().map(|(k, e)| entry_json(k, e)).collect();
            return Read {
                status: StatusCode::OK,
                body: serde_json::to_vec(&body).unwrap(),
                content_type: "application/json",
                index,
                missing: false,
                filtered,
            };
        }
        match st.kv.get(&key) {
            None => not_found(st.kv_index()),
            Some(e) if raw_value => Read {
                status: StatusCode::OK,
                body: e.value.clone().unwrap_or_default(),
                content_type: "text/plain",
                index: e.modify_index,
                missing: false,
                filtered: false,
            },
            Some(e) => Read {
                status: StatusCode::OK,
                body: serde_json::to_vec(&vec![entry_json(&key, e)]).unwrap(),
                content_type: "application/json",
                index: e.modify_index,
                missing: false,
                filtered: false,
            },
        }
    };
    let result = s.blocking(index, wait, read).await;
    let mut response = respond(result, &q);
    if raw_value {
        response.headers_mut().insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        response.headers_mut().insert(
            "content-security-policy",
            HeaderValue::from_static("sandbox"),
        );
    }
    if q.contains_key("stale") {
        let ms = s.inner.last_contact_ms.load(Ordering::SeqCst);
        response
            .headers_mut()
            .insert("x-consul-lastcontact", HeaderValue::from(ms as u64));
    }
    response
}

fn kv_put(s: &ConsulServer, key: &str, q: &HashMap<String, String>, body: Bytes) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if body.len() > 512 * 1024 {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Value exceeds 524288 byte limit",
        );
    }
    let flags = match q.get("flags").map(|f| f.parse::<u64>()) {
        None => 0,
        Some(Ok(f)) => f,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid flags"),
    };
    let index = {
        let mut st = s.store();
        if let Some(cas) = q.get("cas") {
            let Ok(cas) = cas.parse::<u64>() else {
                return text(StatusCode::BAD_REQUEST, "Invalid cas index");
            };
            let current = st.kv.get(key).map(|e| e.modify_index);
            let ok = match (cas, current) {
                (0, None) => true,
                (0, Some(_)) => false,
                (c, Some(m)) => c == m,
                (_, None) => false,
            };
            if !ok {
                return json_bool(false);
            }
        }
        let index = st.bump();
        let create_index = st.kv.get(key).map_or(index, |e| e.create_index);
        let value = if body.is_empty() {
            None
        } else {
            Some(body.to_vec())
        };
        st.kv.insert(
            key.to_string(),
            Entry {
                value,
                flags,
                create_index,
                modify_index: index,
            },
        );
        st.tombstones.remove(key);
        index
    };
    s.changed(index);
    json_bool(true)
}

/// The `true`/`false` answer of KV writes and deletes.
fn json_bool(ok: bool) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        if ok { "true" } else { "false" },
    )
        .into_response()
}

fn kv_delete(s: &ConsulServer, key: &str, q: &HashMap<String, String>) -> Response {
    let index = {
        let mut st = s.store();
        if let Some(cas) = q.get("cas") {
            let current = st.kv.get(key).map(|e| e.modify_index);
            if cas.parse::<u64>().ok() != current {
                return json_bool(false);
            }
        }
        let index = st.bump();
        let doomed: Vec<String> = if q.contains_key("recurse") {
            st.kv
                .keys()
                .filter(|k| k.starts_with(key))
                .cloned()
                .collect()
        } else {
            vec![key.to_string()]
        };
        for k in doomed {
            if st.kv.remove(&k).is_some() {
                st.tombstones.insert(k, index);
            }
        }
        index
    };
    s.changed(index);
    json_bool(true)
}

fn instance_passing(i: &Instance) -> bool {
    i.checks.iter().all(|c| c == "passing")
}

async fn health_service(
    State(s): State<ConsulServer>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = query(raw);
    let (index, wait) = match s.common(&q).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let passing = q.contains_key("passing");
    let tag = q.get("tag").cloned();
    let read = |st: &Store| -> Read {
        let list: Vec<Value> = st
            .instances
            .iter()
            .filter(|i| i.service == name)
            .filter(|i| !passing || instance_passing(i))
            .filter(|i| tag.as_ref().is_none_or(|t| i.tags.contains(t)))
            .map(|i| {
                json!({
                    "Node": {"ID": format!("node-{}", i.node), "Node": i.node, "Address": i.node_address, "Datacenter": DATACENTER, "TaggedAddresses": {}, "Meta": {}},
                    "Service": {"ID": i.id, "Service": i.service, "Tags": i.tags, "Address": i.address, "TaggedAddresses": {}, "Meta": i.meta, "Port": i.port, "Weights": {"Passing": 1, "Warning": 1}},
                    "Checks": i.checks.iter().enumerate().map(|(n, status)| json!({
                        "Node": i.node, "CheckID": format!("service:{}:{n}", i.id), "Name": "check", "Status": status,
                        "Notes": "", "Output": "", "ServiceID": i.id, "ServiceName": i.service, "ServiceTags": i.tags,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Read::json(&list, st.services_index.max(1))
    };
    respond(s.blocking(index, wait, read).await, &q)
}

async fn catalog_service(
    State(s): State<ConsulServer>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = query(raw);
    let (index, wait) = match s.common(&q).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let read = |st: &Store| -> Read {
        let list: Vec<Value> = st
            .instances
            .iter()
            .filter(|i| i.service == name)
            .map(|i| {
                json!({
                    "ID": format!("node-{}", i.node), "Node": i.node, "Address": i.node_address, "Datacenter": DATACENTER,
                    "TaggedAddresses": {}, "NodeMeta": {}, "ServiceID": i.id, "ServiceName": i.service,
                    "ServiceAddress": i.address, "ServiceTags": i.tags, "ServicePort": i.port, "ServiceMeta": i.meta,
                    "ServiceWeights": {"Passing": 1, "Warning": 1}, "ServiceEnableTagOverride": false,
                    "CreateIndex": st.services_index, "ModifyIndex": st.services_index,
                })
            })
            .collect();
        Read::json(&list, st.services_index.max(1))
    };
    respond(s.blocking(index, wait, read).await, &q)
}

async fn catalog_services(State(s): State<ConsulServer>, RawQuery(raw): RawQuery) -> Response {
    let q = query(raw);
    let (index, wait) = match s.common(&q).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let read = |st: &Store| -> Read {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in &st.instances {
            let tags = map.entry(i.service.clone()).or_default();
            for t in &i.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        Read::json(&map, st.services_index.max(1))
    };
    respond(s.blocking(index, wait, read).await, &q)
}
