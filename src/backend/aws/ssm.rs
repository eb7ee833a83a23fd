//! `ssm:` — SSM Parameter Store.
//!
//! Names are batched into `GetParameters` calls of at most ten (the API's
//! limit), per region, always `WithDecryption`; `@3` and `@label` become the
//! API's `name:3` / `name:label` selectors. Prefix references use
//! `GetParametersByPath`, recursive and paged, which has its own lower quota
//! and is used for nothing else. A name the service lists in
//! `InvalidParameters` is reported against its own reference; the rest of the
//! batch resolves. `StringList` values become lists. Change detection
//! compares versions (for a prefix, the versions of everything under it).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use aws_sdk_ssm::Client;
use aws_sdk_ssm::types::{Parameter, ParameterType};
use serde_json::Value;
use tokio::task::JoinSet;

use super::{Aws, RegionClients, parameter_arn, sdk_error};
use crate::backend::{Backend, BoxFuture, ErrorKind, FetchError, Fetched, PlannedCall, Watching};
use crate::reference::Source;
use crate::secret::Secret;

/// `GetParameters` takes at most this many names.
pub const BATCH: usize = 10;

/// The `ssm:` backend, with one client per region.
pub struct Ssm {
    aws: Arc<Aws>,
    clients: RegionClients<Client>,
}

impl Ssm {
    /// The backend, on the shared AWS context.
    pub fn new(aws: Arc<Aws>) -> Self {
        Ssm {
            aws,
            clients: RegionClients::new(),
        }
    }

    async fn client(&self, region: &str) -> Client {
        self.clients
            .get(&self.aws, region, |sdk, region| {
                Client::from_conf(
                    aws_sdk_ssm::config::Builder::from(sdk)
                        .region(aws_sdk_ssm::config::Region::new(region))
                        .build(),
                )
            })
            .await
    }
}

/// The name as the API takes it: with its version or label selector.
fn api_name(s: &Source) -> String {
    match &s.version {
        Some(v) => format!("{}:{v}", s.path),
        None => s.path.clone(),
    }
}

/// Whether `p` is the answer to the request for `requested` (`name`,
/// `name:selector`, or an ARN). The service reports the bare name, and an ARN
/// request by name; `Selector` is not always reported. Batches never hold two
/// requests for one parameter (see [`batches`]), so the name decides.
fn answers(p: &Parameter, requested: &str) -> bool {
    let (bare, selector) = split_selector(requested);
    let same = p.name() == Some(bare) || p.arn() == Some(bare);
    let selector_agrees = match (p.selector(), selector) {
        (Some(reported), Some(asked)) => reported.trim_start_matches(':') == asked,
        (Some(_), None) => false,
        (None, _) => true,
    };
    same && selector_agrees
}

/// Splits names into `GetParameters` batches of at most [`BATCH`], with no
/// parameter twice in one batch (two versions of it go to different calls,
/// so each answer can be told apart).
pub fn batches(mut names: Vec<String>) -> Vec<Vec<String>> {
    names.sort();
    names.dedup();
    let mut batches: Vec<Vec<String>> = Vec::new();
    for name in names {
        let bare = split_selector(&name).0.to_string();
        let fits = batches
            .iter()
            .position(|b| b.len() < BATCH && !b.iter().any(|n| split_selector(n).0 == bare));
        match fits {
            Some(i) => batches[i].push(name),
            None => batches.push(vec![name]),
        }
    }
    batches
}

fn value_of(p: &Parameter) -> Value {
    let text = p.value().unwrap_or_default();
    match p.r#type() {
        Some(ParameterType::StringList) => Value::Array(
            text.split(',')
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => Value::String(text.to_string()),
    }
}

impl Ssm {
    async fn get_parameters(
        aws: Arc<Aws>,
        client: Client,
        region: String,
        names: Vec<String>,
    ) -> Vec<(String, Result<Fetched, FetchError>)> {
        aws.permit("ssm", &region).await;
        tracing::debug!(region, names = names.len(), "ssm:GetParameters");
        let result = client
            .get_parameters()
            .set_names(Some(names.clone()))
            .with_decryption(true)
            .send()
            .await;
        match result {
            Ok(out) => names
                .into_iter()
                .map(|name| {
                    let found = out.parameters().iter().find(|p| answers(p, &name));
                    let result = match found {
                        Some(p) => Ok(Fetched {
                            value: Secret::new(value_of(p)),
                            version: Some(p.version().to_string()),
                            lease: None,
                        }),
                        // SSM names every name it has no value for; an
                        // answer that names it nowhere is cut short.
                        None if out.invalid_parameters().contains(&name) => Err(not_found(&name)),
                        None => Err(FetchError::new(
                            ErrorKind::Transient,
                            "ssm",
                            "ssm:GetParameters",
                            format!(
                                "the answer lists {name} neither among the parameters nor among the invalid ones (incomplete answer)"
                            ),
                        )),
                    };
                    (name, result)
                })
                .collect(),
            Err(e) => {
                let err = sdk_error("ssm", "ssm:GetParameters", &e);
                names.into_iter().map(|n| (n, Err(err.clone()))).collect()
            }
        }
    }

    async fn get_parameters_by_path(
        aws: Arc<Aws>,
        client: Client,
        region: String,
        path: String,
    ) -> Result<Fetched, FetchError> {
        let mut map = serde_json::Map::new();
        let mut versions: BTreeMap<String, i64> = BTreeMap::new();
        let mut token = None;
        loop {
            aws.permit("ssm", &region).await;
            tracing::debug!(region, path, "ssm:GetParametersByPath");
            let out = client
                .get_parameters_by_path()
                .path(&path)
                .recursive(true)
                .with_decryption(true)
                .max_results(10)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| sdk_error("ssm", "ssm:GetParametersByPath", &e))?;
            for p in out.parameters() {
                let Some(name) = p.name() else { continue };
                let key = name.strip_prefix(path.as_str()).unwrap_or(name).to_string();
                versions.insert(name.to_string(), p.version());
                map.insert(key, value_of(p));
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        // One version for the whole prefix: any added, removed or updated
        // parameter changes it.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        versions.hash(&mut hasher);
        Ok(Fetched {
            value: Secret::new(Value::Object(map)),
            version: Some(format!("{:016x}", hasher.finish())),
            lease: None,
        })
    }
}

/// Splits `name:selector`. Parameter names cannot contain ':', so in a plain
/// name any colon starts the selector; an ARN has five colons of its own.
fn split_selector(name: &str) -> (&str, Option<&str>) {
    let own = if name.starts_with("arn:") { 5 } else { 0 };
    match name.match_indices(':').nth(own) {
        Some((i, _)) => (&name[..i], Some(&name[i + 1..])),
        None => (name, None),
    }
}

fn not_found(name: &str) -> FetchError {
    let (bare, selector) = split_selector(name);
    let mut e = FetchError::new(
        ErrorKind::NotFound,
        "ssm",
        "ssm:GetParameters",
        match selector {
            Some(s) => format!("no parameter {bare} with version or label \"{s}\""),
            None => format!("no parameter {name}"),
        },
    );
    e.hint = Some(match selector {
        Some(_) => {
            "check the version or label (aws ssm get-parameter-history --name NAME)".to_string()
        }
        None => "check the name and the region; names are case-sensitive".to_string(),
    });
    e
}

impl Backend for Ssm {
    fn name(&self) -> &'static str {
        "ssm"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut calls = Vec::new();
        for s in sources {
            let region = self.aws.region_label(s.region());
            if s.is_prefix() {
                calls.push(PlannedCall {
                    target: Some(region),
                    action: "GetParametersByPath".to_string(),
                    detail: s.path.clone(),
                });
            } else {
                names.entry(region).or_default().push(api_name(s));
            }
        }
        for (region, names) in names {
            for chunk in batches(names) {
                calls.push(PlannedCall {
                    target: Some(region.clone()),
                    action: "GetParameters".to_string(),
                    detail: format!("{} names", chunk.len()),
                });
            }
        }
        calls
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            // Which region each source goes to.
            let mut regions = Vec::with_capacity(sources.len());
            for s in sources {
                regions.push(self.aws.region(s.region()).await);
            }
            let mut tasks = JoinSet::new();
            let mut by_region: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (s, region) in sources.iter().zip(&regions) {
                let Some(region) = region else { continue };
                if s.is_prefix() {
                    let (aws, region, path) = (self.aws.clone(), region.clone(), s.path.clone());
                    let client = self.client(&region).await;
                    tasks.spawn(async move {
                        let key = (region.clone(), path.clone(), true);
                        vec![(
                            key,
                            Ssm::get_parameters_by_path(aws, client, region, path).await,
                        )]
                    });
                } else {
                    by_region
                        .entry(region.clone())
                        .or_default()
                        .push(api_name(s));
                }
            }
            for (region, names) in by_region {
                let client = self.client(&region).await;
                for chunk in batches(names) {
                    let (aws, region) = (self.aws.clone(), region.clone());
                    let client = client.clone();
                    tasks.spawn(async move {
                        Ssm::get_parameters(aws, client, region.clone(), chunk)
                            .await
                            .into_iter()
                            .map(|(name, r)| ((region.clone(), name, false), r))
                            .collect()
                    });
                }
            }
            let mut answers: HashMap<(String, String, bool), Result<Fetched, FetchError>> =
                HashMap::new();
            while let Some(done) = tasks.join_next().await {
                if let Ok(results) = done {
                    answers.extend(results);
                }
            }
            let mut out: Vec<Result<Fetched, FetchError>> = sources
                .iter()
                .zip(&regions)
                .map(|(s, region)| {
                    let Some(region) = region else {
                        return Err(FetchError::new(
                            ErrorKind::Invalid,
                            "ssm",
                            "resolve region",
                            "no AWS region is configured",
                        )
                        .hint("set AWS_REGION, region under [aws], or use the parameter's ARN"));
                    };
                    let key = if s.is_prefix() {
                        (region.clone(), s.path.clone(), true)
                    } else {
                        (region.clone(), api_name(s), false)
                    };
                    answers.get(&key).cloned().unwrap_or_else(|| {
                        Err(FetchError::new(
                            ErrorKind::Transient,
                            "ssm",
                            "ssm:GetParameters",
                            "the request did not complete",
                        ))
                    })
                })
                .collect();
            // Access errors: say who was denied, on which parameter, and what
            // permission would allow it.
            let mut denied: Vec<&mut FetchError> = out
                .iter_mut()
                .filter_map(|r| r.as_mut().err())
                .filter(|e| e.kind == ErrorKind::Denied)
                .collect();
            let identity = self.aws.annotate(&mut denied).await;
            for ((s, region), r) in sources.iter().zip(&regions).zip(out.iter_mut()) {
                let (Err(e), Some(region)) = (r, region) else {
                    continue;
                };
                let account = identity.as_ref().map(|i| i.account.as_str());
                let arn = parameter_arn(region, account, &s.path);
                if e.kind == ErrorKind::Denied {
                    let (action, resource) = if s.is_prefix() {
                        (
                            "ssm:GetParametersByPath",
                            arn.trim_end_matches('/').to_string(),
                        )
                    } else {
                        ("ssm:GetParameters", arn.clone())
                    };
                    let kms = e.message.contains("KMS") || e.message.contains("kms:");
                    e.hint = Some(if kms {
                        format!(
                            "allow kms:Decrypt on the KMS key that encrypts {arn} (a SecureString under a customer managed key)"
                        )
                    } else {
                        format!(
                            "allow {action} on {resource}; for a SecureString under a customer managed key, also kms:Decrypt on that key"
                        )
                    });
                }
                e.resource = Some(arn);
            }
            out
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for Ssm {
    fn poll_interval(&self) -> std::time::Duration {
        self.aws.poll_interval()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_ten_names_and_one_request_per_parameter() {
        let mut names: Vec<String> = (0..25).map(|i| format!("/p{i:02}")).collect();
        names.extend([
            "/p00:1".to_string(),
            "/p00:live".to_string(),
            "/p01".to_string(),
        ]);
        let b = batches(names);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 7]);
        for batch in &b {
            let mut bare: Vec<&str> = batch.iter().map(|n| split_selector(n).0).collect();
            bare.sort();
            let before = bare.len();
            bare.dedup();
            assert_eq!(bare.len(), before, "{batch:?}");
        }
    }

    #[test]
    fn selectors_split_off_names_and_arns() {
        assert_eq!(split_selector("/a/b:3"), ("/a/b", Some("3")));
        assert_eq!(split_selector("/a/b"), ("/a/b", None));
        assert_eq!(
            split_selector("arn:aws:ssm:r:1:parameter/a:live"),
            ("arn:aws:ssm:r:1:parameter/a", Some("live"))
        );
        assert_eq!(
            split_selector("arn:aws:ssm:r:1:parameter/a"),
            ("arn:aws:ssm:r:1:parameter/a", None)
        );
    }
}
