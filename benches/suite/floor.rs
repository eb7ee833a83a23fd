//! The floor: the least a program must do for the init-render workload. It
//! knows everything in advance (which keys share a prefix, that the Vault
//! mount is KV v2), issues exactly the batched requests, all at once, on one
//! HTTP client, and writes one file per template with `name=value` lines,
//! each to a temporary file renamed into place. No templates, no
//! configuration, no error reporting worth the name: what envrender is
//! compared against.
//!
//! It runs as a child process of the suite (the suite's own binary, with
//! `ENVRENDER_BENCH_FLOOR` naming the plan file), so process start counts
//! for both sides alike.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// What to fetch and where to write it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub aws_url: String,
    pub region: String,
    pub consul_url: String,
    pub vault_url: String,
    pub role_id: String,
    pub secret_id: String,
    /// SSM names read with `GetParameters`, ten at a time.
    pub ssm_names: Vec<String>,
    /// An SSM path read with `GetParametersByPath` (into the first file).
    pub ssm_path: String,
    /// Consul prefixes, each one recursive read.
    pub consul_prefixes: Vec<String>,
    /// KV v2 secrets under `secret/`, field `value`.
    pub vault_paths: Vec<String>,
    /// The files: for each, the names whose values go in it.
    pub files: Vec<(PathBuf, Vec<String>)>,
}

pub fn main(plan_file: &str) {
    let plan: Plan = serde_json::from_slice(&std::fs::read(plan_file).unwrap()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(Arc::new(plan)));
}

async fn run(plan: Arc<Plan>) {
    let http = reqwest::Client::new();
    let (ssm, consul, vault) =
        tokio::join!(ssm(&http, &plan), consul(&http, &plan), vault(&http, &plan));
    let mut values = ssm;
    values.extend(consul);
    values.extend(vault);
    for (i, (path, names)) in plan.files.iter().enumerate() {
        let mut text = String::new();
        for n in names {
            text.push_str(&format!("{n}={}\n", values[n]));
        }
        if i == 0 {
            for (n, v) in values.range(plan.ssm_path.clone()..) {
                if !n.starts_with(&plan.ssm_path) {
                    break;
                }
                text.push_str(&format!("{n}={v}\n"));
            }
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// One SSM JSON-protocol call, signed with SigV4.
async fn ssm_call(http: &reqwest::Client, plan: &Plan, action: &str, body: Value) -> Value {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;
    let body = body.to_string();
    let url = format!("{}/", plan.aws_url);
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let target = format!("AmazonSSM.{action}");
    let mut headers = vec![
        ("host".to_string(), host),
        (
            "content-type".to_string(),
            "application/x-amz-json-1.1".to_string(),
        ),
        ("x-amz-target".to_string(), target),
    ];
    let identity =
        aws_sdk_ssm::config::Credentials::new("test", "test", None, None, "floor").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&plan.region)
        .name("ssm")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body.as_bytes()),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    for (k, v) in instructions.headers() {
        headers.push((k.to_string(), v.to_string()));
    }
    let mut request = http.post(&url).body(body);
    for (k, v) in &headers {
        if k != "host" {
            request = request.header(k, v);
        }
    }
    json_of(request).await
}

/// Sends a request and reads its JSON answer.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn parameters(answer: &Value, out: &mut BTreeMap<String, String>) {
    for p in answer["Parameters"].as_array().unwrap() {
        out.insert(
            p["Name"].as_str().unwrap().to_string(),
            p["Value"].as_str().unwrap().to_string(),
        );
    }
}

/// Each answer of requests started together, as they come.
async fn all<T: 'static>(mut calls: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(done) = calls.join_next().await {
        out.push(done.unwrap());
    }
    out
}

async fn ssm(http: &reqwest::Client, plan: &Arc<Plan>) -> BTreeMap<String, String> {
    let by_name = async {
        let mut calls = JoinSet::new();
        for names in plan.ssm_names.chunks(10) {
            let (http, plan) = (http.clone(), plan.clone());
            let body = json!({"Names": names, "WithDecryption": true});
            calls.spawn(async move { ssm_call(&http, &plan, "GetParameters", body).await });
        }
        let mut out = BTreeMap::new();
        for answer in all(calls).await {
            parameters(&answer, &mut out);
        }
        out
    };
    let by_path = async {
        let mut out = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let mut body = json!({"Path": plan.ssm_path, "Recursive": true, "WithDecryption": true, "MaxResults": 10});
            if let Some(t) = &token {
                body["NextToken"] = json!(t);
            }
            let answer = ssm_call(http, plan, "GetParametersByPath", body).await;
            parameters(&answer, &mut out);
            match answer["NextToken"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return out,
            }
        }
    };
    let (mut a, b) = tokio::join!(by_name, by_path);
    a.extend(b);
    a
}

async fn consul(http: &reqwest::Client, plan: &Plan) -> BTreeMap<String, String> {
    let mut calls = JoinSet::new();
    for p in &plan.consul_prefixes {
        let request = http.get(format!("{}/v1/kv/{p}?recurse", plan.consul_url));
        calls.spawn(async move { json_of(request).await });
    }
    let mut out = BTreeMap::new();
    for entries in all(calls).await {
        for e in entries.as_array().unwrap() {
            let value = base64::engine::general_purpose::STANDARD
                .decode(e["Value"].as_str().unwrap_or_default())
                .unwrap();
            out.insert(
                e["Key"].as_str().unwrap().to_string(),
                String::from_utf8(value).unwrap(),
            );
        }
    }
    out
}

async fn vault(http: &reqwest::Client, plan: &Plan) -> BTreeMap<String, String> {
    if plan.vault_paths.is_empty() {
        return BTreeMap::new();
    }
    let login = json_of(
        http.post(format!("{}/v1/auth/approle/login", plan.vault_url))
            .body(json!({"role_id": plan.role_id, "secret_id": plan.secret_id}).to_string()),
    )
    .await;
    let token = login["auth"]["client_token"].as_str().unwrap().to_string();
    let mut calls = JoinSet::new();
    for p in &plan.vault_paths {
        let request = http
            .get(format!("{}/v1/secret/data/{p}", plan.vault_url))
            .header("X-Vault-Token", &token);
        let path = p.clone();
        calls.spawn(async move {
            let answer = json_of(request).await;
            let value = answer["data"]["data"]["value"]
                .as_str()
                .unwrap()
                .to_string();
            (path, value)
        });
    }
    all(calls).await.into_iter().collect()
}
