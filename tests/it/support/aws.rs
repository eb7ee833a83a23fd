//! AWS test bed: the moto server (pinned, installed on first use) and a
//! loopback proxy in front of it that counts requests by API action and can
//! answer with AWS-shaped faults (throttling, JSON AccessDeniedException),
//! which the emulator cannot produce.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

pub const MOTO_VERSION: &str = "5.2.5";
pub const REGION: &str = "us-east-1";
/// The account moto reports.
pub const ACCOUNT: &str = "123456789012";

/// Runs a future to completion on a fresh single-threaded runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Where moto is installed (once, in the test scratch directory).
fn install() -> PathBuf {
    super::pip_install(
        &format!("moto[server]=={MOTO_VERSION}"),
        &format!("moto-{MOTO_VERSION}"),
        "ENVRENDER_TEST_MOTO_DIR",
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Moto {
    pub url: String,
}

static SHARED: OnceLock<Moto> = OnceLock::new();

/// The moto server shared by every test of the binary, whatever its module.
/// Tests keep apart by using their own names (`/t/<test>/…`), distinct across
/// modules too.
pub fn moto() -> &'static Moto {
    SHARED.get_or_init(|| Moto::start(&[]))
}

impl Moto {
    /// Starts a moto server on a free loopback port. It is killed when the
    /// test process exits.
    pub fn start(env: &[(&str, &str)]) -> Moto {
        let dir = install();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for _ in 0..5 {
            let port = free_port();
            let (dir, env) = (dir.clone(), env.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            // The child gets SIGKILL when the thread that spawned it exits, so
            // spawn it from a thread that lives as long as the process.
            std::thread::spawn(move || {
                let mut cmd = Command::new("python3");
                cmd.args([
                    "-s",
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .env("PYTHONPATH", &dir)
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
                unsafe {
                    cmd.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                            .map_err(std::io::Error::from)
                    });
                }
                let child = cmd.spawn();
                let _ = tx.send(child.is_ok());
                if let Ok(mut child) = child {
                    let _ = child.wait();
                }
                loop {
                    std::thread::park();
                }
            });
            assert!(rx.recv().unwrap(), "could not start moto");
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let ready = block_on(async {
                    reqwest::get(format!("{url}/moto-api/"))
                        .await
                        .is_ok_and(|r| r.status().is_success())
                });
                if ready {
                    return Moto { url };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto did not start");
    }
}

/// SDK configuration for test setup, talking to `url` directly.
pub fn sdk(url: &str) -> aws_config::SdkConfig {
    sdk_with(url, "test", "test", REGION)
}

pub fn sdk_with(url: &str, key: &str, secret: &str, region: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ssm::config::SharedCredentialsProvider::new(
            aws_sdk_ssm::config::Credentials::new(key, secret, None, None, "test"),
        ))
        .build()
}

/// Writes parameters (String, or SecureString when `secure`).
pub fn put_parameters(url: &str, params: &[(&str, &str, bool)]) {
    put_parameters_in(url, REGION, params)
}

pub fn put_parameters_in(url: &str, region: &str, params: &[(&str, &str, bool)]) {
    let client = aws_sdk_ssm::Client::new(&sdk_with(url, "test", "test", region));
    block_on(async {
        for (name, value, secure) in params {
            client
                .put_parameter()
                .name(*name)
                .value(*value)
                .r#type(if *secure {
                    aws_sdk_ssm::types::ParameterType::SecureString
                } else {
                    aws_sdk_ssm::types::ParameterType::String
                })
                .overwrite(true)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!("put {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(e))
                });
        }
    });
}

/// One request the proxy should answer itself instead of forwarding.
#[derive(Clone, Debug)]
struct Fault {
    action: String,
    remaining: usize,
    status: u16,
    body: String,
}

struct ProxyState {
    target: String,
    client: reqwest::Client,
    counts: Mutex<BTreeMap<String, usize>>,
    faults: Mutex<Vec<Fault>>,
}

/// A loopback HTTP proxy in front of moto.
pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
}

/// The API action of a request: from `X-Amz-Target` (JSON protocols) or the
/// `Action=` form field (query protocols such as STS).
fn action(headers: &HeaderMap, body: &[u8]) -> String {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return target.rsplit('.').next().unwrap_or(target).to_string();
    }
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("unknown")
        .to_string()
}

async fn forward(
    State(st): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let action = action(&headers, &body);
    *st.counts.lock().unwrap().entry(action.clone()).or_default() += 1;
    let fault = {
        let mut faults = st.faults.lock().unwrap();
        faults
            .iter_mut()
            .find(|f| f.action == action && f.remaining > 0)
            .map(|f| {
                f.remaining -= 1;
                f.clone()
            })
    };
    if let Some(f) = fault {
        return (
            StatusCode::from_u16(f.status).unwrap(),
            [("content-type", "application/x-amz-json-1.1")],
            f.body,
        )
            .into_response();
    }
    super::fault::forward(&st.client, &st.target, method, &uri, &headers, body).await
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let state = Arc::new(ProxyState {
            target: target.to_string(),
            client: reqwest::Client::new(),
            counts: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Vec::new()),
        });
        let url = super::serve_loopback(
            axum::Router::new()
                .fallback(forward)
                .with_state(state.clone()),
        );
        Proxy { url, state }
    }

    /// Requests seen for one action (`GetParameters`, `Decrypt`, …).
    pub fn count(&self, action: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.state.counts.lock().unwrap().clone()
    }

    pub fn reset_counts(&self) {
        self.state.counts.lock().unwrap().clear();
    }

    /// Answers the next `times` requests for `action` with an AWS JSON error.
    pub fn fail(&self, action: &str, times: usize, status: u16, error_type: &str, message: &str) {
        self.state.faults.lock().unwrap().push(Fault {
            action: action.to_string(),
            remaining: times,
            status,
            body: serde_json::json!({"__type": error_type, "message": message}).to_string(),
        });
    }
}

/// Creates an IAM user with `policy` and the given parameters on a moto
/// server started with `INITIAL_NO_AUTH_ACTION_COUNT`; returns its access key.
pub fn auth_setup(url: &str, policy: &str, params: &[(&str, &str)]) -> (String, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/moto_auth_setup.py"
    );
    let out = Command::new("python3")
        .arg("-s")
        .arg(script)
        .arg(url)
        .arg(policy)
        .args(params.iter().map(|(k, v)| format!("{k}={v}")))
        .env("PYTHONPATH", install())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    )
}

/// A container credentials endpoint (ECS task role, EKS Pod Identity) on
/// loopback. Records the Authorization header of each request.
pub struct CredentialsServer {
    pub url: String,
    pub seen_tokens: Arc<Mutex<Vec<String>>>,
}

impl CredentialsServer {
    pub fn start() -> CredentialsServer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = seen.clone();
        let app = axum::Router::new()
            .fallback(
                |State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap| async move {
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push(token);
                    let body = serde_json::json!({
                        "AccessKeyId": "ASIACONTAINERCREDS01",
                        "SecretAccessKey": "container-secret",
                        "Token": "container-session-token",
                        "Expiration": "2100-01-01T00:00:00Z",
                    });
                    ([("content-type", "application/json")], body.to_string())
                },
            )
            .with_state(state);
        CredentialsServer {
            url: format!("{}/v1/credentials", super::serve_loopback(app)),
            seen_tokens: seen,
        }
    }
}
