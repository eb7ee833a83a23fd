//! A fault-injecting HTTP proxy for loopback test servers: put it in front of
//! the Consul or Vault test server or the AWS emulator and it passes requests
//! on, or, while a fault is armed, answers them the way a failing network or
//! server would — late, cut off, with an error status, or not at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// What the proxy does to a request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Passes it on after a delay.
    Latency(Duration),
    /// Sends a status line and headers announcing a body, then closes the
    /// connection: the answer never comes.
    Reset,
    /// Passes it on and sends the status line, headers and half of the body,
    /// then closes the connection.
    Truncate,
    /// Answers with this status and a JSON error body every client here
    /// understands (AWS's `__type`, Vault's `errors`).
    Status(u16),
    /// A `200 OK` with an empty body: an answer that says nothing.
    Empty,
    /// Never answers; the connection stays open.
    Hang,
}

struct Armed {
    fault: Fault,
    /// `None`: until [`FaultProxy::clear`].
    remaining: Option<usize>,
    /// Requests whose path contains this, or every request.
    path: Option<String>,
}

struct ProxyState {
    target: String,
    client: reqwest::Client,
    armed: Mutex<Vec<Armed>>,
    requests: AtomicUsize,
    faulted: AtomicUsize,
}

pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<ProxyState>,
}

impl FaultProxy {
    /// A proxy to `target` (`http://host:port`).
    pub fn start(target: &str) -> FaultProxy {
        let state = Arc::new(ProxyState {
            target: target.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            armed: Mutex::new(Vec::new()),
            requests: AtomicUsize::new(0),
            faulted: AtomicUsize::new(0),
        });
        let url = super::serve_loopback(
            axum::Router::new()
                .fallback(handle)
                .with_state(state.clone()),
        );
        FaultProxy { url, state }
    }

    /// `host:port`, for clients that take an address without a scheme.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Applies `fault` to the next `times` requests (`None`: until cleared).
    pub fn inject(&self, fault: Fault, times: Option<usize>) {
        self.inject_on(fault, times, None);
    }

    /// Like [`inject`](Self::inject), for requests whose path contains `path`.
    pub fn inject_on(&self, fault: Fault, times: Option<usize>, path: Option<&str>) {
        self.state.armed.lock().unwrap().push(Armed {
            fault,
            remaining: times,
            path: path.map(str::to_string),
        });
    }

    /// Disarms every fault; requests pass again.
    pub fn clear(&self) {
        self.state.armed.lock().unwrap().clear();
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests a fault was applied to.
    pub fn faulted(&self) -> usize {
        self.state.faulted.load(Ordering::SeqCst)
    }
}

fn take_fault(st: &ProxyState, path: &str) -> Option<Fault> {
    let mut armed = st.armed.lock().unwrap();
    let a = armed
        .iter_mut()
        .find(|a| a.remaining != Some(0) && a.path.as_deref().is_none_or(|p| path.contains(p)))?;
    if let Some(n) = &mut a.remaining {
        *n -= 1;
    }
    Some(a.fault.clone())
}

async fn handle(
    State(st): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let fault = take_fault(&st, uri.path());
    if fault.is_some() {
        st.faulted.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        None => forward(&st.client, &st.target, method, &uri, &headers, body).await,
        Some(Fault::Latency(d)) => {
            tokio::time::sleep(d).await;
            forward(&st.client, &st.target, method, &uri, &headers, body).await
        }
        Some(Fault::Reset) => cut_off(StatusCode::OK, HeaderMap::new(), Bytes::new()),
        Some(Fault::Truncate) => {
            let full = forward(&st.client, &st.target, method, &uri, &headers, body).await;
            let (parts, body) = full.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let mut headers = parts.headers;
            headers.insert("content-length", bytes.len().into());
            cut_off(parts.status, headers, bytes.slice(..bytes.len() / 2))
        }
        Some(Fault::Status(code)) => {
            let error_type = match code {
                429 => "ThrottlingException",
                503 => "ServiceUnavailable",
                _ => "InternalFailure",
            };
            let message = "injected by the fault proxy";
            (
                StatusCode::from_u16(code).unwrap(),
                [("content-type", "application/json")],
                serde_json::json!({"__type": error_type, "message": message, "errors": [message]})
                    .to_string(),
            )
                .into_response()
        }
        Some(Fault::Empty) => (StatusCode::OK, "").into_response(),
        Some(Fault::Hang) => std::future::pending().await,
    }
}

/// A response that sends `head` and `sent`, then fails: the server closes
/// the connection before the message is complete.
fn cut_off(status: StatusCode, headers: HeaderMap, sent: Bytes) -> Response {
    let chunks: [Result<Bytes, std::io::Error>; 2] = [
        Ok(sent),
        Err(std::io::Error::other("cut off by the fault proxy")),
    ];
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if !response.headers().contains_key("content-length") {
        // Announce more than is sent, so even an empty body is short.
        response.headers_mut().insert("content-length", 1.into());
    }
    response
}

/// Passes a request on to `target` and returns its answer.
pub async fn forward(
    client: &reqwest::Client,
    target: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = client.request(method, format!("{target}{path}")).body(body);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            request = request.header(k, v);
        }
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            let body = r.bytes().await.unwrap_or_default();
            let mut response = (status, body).into_response();
            for (k, v) in headers.iter() {
                if k != "content-length" && k != "transfer-encoding" {
                    response.headers_mut().insert(k, v.clone());
                }
            }
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
