//! `sm:` — AWS Secrets Manager, and the ECS `valueFrom` ARN form.
//!
//! Secrets read at their current version are fetched together with
//! `BatchGetSecretValue`, twenty to a call (the API's limit), per region; a
//! secret named with a stage (`@AWSPREVIOUS`) or a version id goes through
//! `GetSecretValue`. Errors the batch reports for one secret are reported
//! against that secret only. To notice a new version, `DescribeSecret` is
//! compared before anything is fetched again.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata as _;
use tokio::task::JoinSet;

use super::{Aws, RegionClients, sdk_error};
use crate::backend::{
    Backend, BoxFuture, ErrorKind, FetchError, Fetched, Observation, PlannedCall, Seen, Watching,
};
use crate::reference::{Source, is_version_id};
use crate::secret::Secret;

/// `BatchGetSecretValue` takes at most this many secret ids.
pub const BATCH: usize = 20;

/// The `sm:` backend, with one client per region.
pub struct SecretsManager {
    aws: Arc<Aws>,
    clients: RegionClients<Client>,
}

/// Whether a returned secret (name, ARN) answers a request by `id`: its name,
/// its full ARN, or its ARN without the six random characters AWS appends.
fn answers(name: Option<&str>, arn: Option<&str>, id: &str) -> bool {
    if name == Some(id) || arn == Some(id) {
        return true;
    }
    arn.is_some_and(|a| {
        a.len() == id.len() + 7 && a.starts_with(id) && a.as_bytes()[id.len()] == b'-'
    })
}

/// The secret name an ARN id names (`arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-AbCdEf`,
/// or without the random suffix); `None` for a name.
fn arn_name(id: &str) -> Option<&str> {
    let (_, name) = id.strip_prefix("arn:")?.split_once(":secret:")?;
    let suffixed = name
        .rsplit_once('-')
        .filter(|(_, tail)| tail.len() == 6 && tail.chars().all(|c| c.is_ascii_alphanumeric()));
    Some(suffixed.map_or(name, |(name, _)| name))
}

/// Whether `id` is an ARN of a secret `ids` also names by name: asked for
/// once, by name, since the answer carries both.
fn named_by_name_too(id: &str, ids: &[impl AsRef<str>]) -> bool {
    arn_name(id).is_some_and(|name| ids.iter().any(|n| n.as_ref() == name))
}

/// A secret a batch returned: its name, its ARN, its value.
type Found = (Option<String>, Option<String>, Result<Fetched, FetchError>);

/// What `BatchGetSecretValue` calls answered: each secret returned, and the
/// errors by secret id.
#[derive(Default)]
struct Answered {
    found: Vec<Found>,
    errors: HashMap<String, FetchError>,
}

impl Answered {
    /// Asks for `ids`, page after page.
    async fn ask(&mut self, aws: &Aws, client: &Client, region: &str, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut token = None;
        loop {
            aws.permit("secretsmanager", region).await;
            tracing::debug!(
                region,
                secrets = ids.len(),
                "secretsmanager:BatchGetSecretValue"
            );
            let out = client
                .batch_get_secret_value()
                .set_secret_id_list(Some(ids.clone()))
                .set_next_token(token)
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    let err = sdk_error("sm", "secretsmanager:BatchGetSecretValue", &e);
                    for id in ids {
                        self.errors.insert(id, err.clone());
                    }
                    return;
                }
            };
            for v in out.secret_values() {
                let id = v.name().or(v.arn()).unwrap_or("?");
                let value =
                    secret_value(v.secret_string(), v.secret_binary().map(|b| b.as_ref()), id).map(
                        |value| Fetched {
                            value,
                            version: v.version_id().map(str::to_string),
                            lease: None,
                        },
                    );
                self.found.push((
                    v.name().map(str::to_string),
                    v.arn().map(str::to_string),
                    value,
                ));
            }
            for e in out.errors() {
                let Some(id) = e.secret_id() else { continue };
                let code = e.error_code().unwrap_or("Error");
                let kind = match code {
                    "ResourceNotFoundException" => ErrorKind::NotFound,
                    "AccessDeniedException" => ErrorKind::Denied,
                    "ThrottlingException" | "InternalServiceError" => ErrorKind::Transient,
                    _ => ErrorKind::Invalid,
                };
                let message = match e.message() {
                    Some(m) if !m.is_empty() => format!("{code}: {m}"),
                    _ => code.to_string(),
                };
                self.errors.insert(
                    id.to_string(),
                    FetchError::new(kind, "sm", "secretsmanager:BatchGetSecretValue", message),
                );
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    }

    /// Whether a secret returned is the one `id` names.
    fn covers(&self, id: &str) -> bool {
        self.found
            .iter()
            .any(|(n, a, _)| answers(n.as_deref(), a.as_deref(), id))
    }

    /// The answer for `id`: its secret, its error, or "no such secret".
    fn take(&mut self, id: &str) -> Result<Fetched, FetchError> {
        match self
            .found
            .iter()
            .find(|(n, a, _)| answers(n.as_deref(), a.as_deref(), id))
        {
            Some((_, _, r)) => r.clone(),
            None => Err(self
                .errors
                .remove(id)
                .unwrap_or_else(|| not_found(id, None))),
        }
    }
}

fn secret_value(
    string: Option<&str>,
    binary: Option<&[u8]>,
    id: &str,
) -> Result<Secret, FetchError> {
    if let Some(s) = string {
        return Ok(Secret::string(s));
    }
    match binary.map(|b| String::from_utf8(b.to_vec())) {
        Some(Ok(text)) => Ok(Secret::string(text)),
        Some(Err(_)) => Err(FetchError::new(
            ErrorKind::Invalid,
            "sm",
            "secretsmanager:GetSecretValue",
            format!("{id} holds binary data that is not UTF-8 text"),
        )
        .hint(
            "store text (SecretString), or base64 text and decode it with the base64_decode helper",
        )),
        None => Err(FetchError::new(
            ErrorKind::NotFound,
            "sm",
            "secretsmanager:GetSecretValue",
            format!("{id} has no value"),
        )),
    }
}

impl SecretsManager {
    /// The backend, on the shared AWS context.
    pub fn new(aws: Arc<Aws>) -> Self {
        SecretsManager {
            aws,
            clients: RegionClients::new(),
        }
    }

    async fn client(&self, region: &str) -> Client {
        self.clients
            .get(&self.aws, region, |sdk, region| {
                Client::from_conf(
                    aws_sdk_secretsmanager::config::Builder::from(sdk)
                        .region(aws_sdk_secretsmanager::config::Region::new(region))
                        .build(),
                )
            })
            .await
    }

    /// One `BatchGetSecretValue` (page after page) for `ids`, answering
    /// also for `also`: ARNs of secrets `ids` names by name, covered by the
    /// same answers (asked for after all when they turn out not to be).
    async fn batch(
        aws: Arc<Aws>,
        client: Client,
        region: String,
        ids: Vec<String>,
        also: Vec<String>,
    ) -> Vec<(String, Result<Fetched, FetchError>)> {
        let mut answered = Answered::default();
        answered.ask(&aws, &client, &region, ids.clone()).await;
        let missed: Vec<String> = also
            .iter()
            .filter(|id| !answered.covers(id))
            .cloned()
            .collect();
        answered.ask(&aws, &client, &region, missed).await;
        ids.into_iter()
            .chain(also)
            .map(|id| {
                let result = answered.take(&id);
                (id, result)
            })
            .collect()
    }

    async fn get(
        aws: Arc<Aws>,
        client: Client,
        region: String,
        id: String,
        version: Option<String>,
    ) -> Result<Fetched, FetchError> {
        aws.permit("secretsmanager", &region).await;
        tracing::debug!(region, "secretsmanager:GetSecretValue");
        let mut request = client.get_secret_value().secret_id(&id);
        request = match &version {
            Some(v) if is_version_id(v) => request.version_id(v),
            Some(stage) => request.version_stage(stage),
            None => request,
        };
        match request.send().await {
            Ok(out) => Ok(Fetched {
                value: secret_value(
                    out.secret_string(),
                    out.secret_binary().map(|b| b.as_ref()),
                    &id,
                )?,
                version: out.version_id().map(str::to_string),
                lease: None,
            }),
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                Err(not_found(&id, version.as_deref()))
            }
            Err(e) => Err(sdk_error("sm", "secretsmanager:GetSecretValue", &e)),
        }
    }

    /// The version id that carries `stage` now, from `DescribeSecret`.
    async fn current_version(
        aws: &Aws,
        client: &Client,
        region: &str,
        id: &str,
        stage: &str,
    ) -> Result<Option<String>, FetchError> {
        aws.permit("secretsmanager", region).await;
        let out = client
            .describe_secret()
            .secret_id(id)
            .send()
            .await
            .map_err(|e| sdk_error("sm", "secretsmanager:DescribeSecret", &e))?;
        Ok(out
            .version_ids_to_stages()
            .and_then(|m| {
                m.iter()
                    .find(|(_, stages)| stages.iter().any(|s| s == stage))
            })
            .map(|(id, _)| id.clone()))
    }

    async fn regions(&self, sources: &[Source]) -> Vec<Option<String>> {
        let mut regions = Vec::with_capacity(sources.len());
        for s in sources {
            regions.push(self.aws.region(s.region()).await);
        }
        regions
    }

    async fn finish(
        &self,
        sources: &[Source],
        regions: &[Option<String>],
        out: &mut [Result<Fetched, FetchError>],
    ) {
        let mut denied: Vec<&mut FetchError> =
            out.iter_mut().filter_map(|r| r.as_mut().err()).collect();
        let identity = self.aws.annotate(&mut denied).await;
        for ((s, region), r) in sources.iter().zip(regions).zip(out.iter_mut()) {
            let Err(e) = r else { continue };
            let resource = if s.path.starts_with("arn:") {
                format!("{}*", s.path)
            } else {
                format!(
                    "arn:aws:secretsmanager:{}:{}:secret:{}-*",
                    region.as_deref().unwrap_or("REGION"),
                    identity
                        .as_ref()
                        .map(|i| i.account.as_str())
                        .unwrap_or("ACCOUNT"),
                    s.path
                )
            };
            if e.kind == ErrorKind::Denied {
                e.hint = Some(format!(
                    "allow secretsmanager:GetSecretValue on {resource}; for a secret under a customer managed key, also kms:Decrypt on that key"
                ));
            }
            e.resource = Some(resource);
        }
    }
}

fn not_found(id: &str, version: Option<&str>) -> FetchError {
    let message = match version {
        Some(v) => format!("no secret {id} with version or stage {v}"),
        None => format!("no secret {id}"),
    };
    FetchError::new(
        ErrorKind::NotFound,
        "sm",
        "secretsmanager:GetSecretValue",
        message,
    )
    .hint("check the name, the region and the stage; secret names are case-sensitive")
}

impl Backend for SecretsManager {
    fn name(&self) -> &'static str {
        "sm"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        let mut batched: HashMap<String, Vec<&str>> = HashMap::new();
        let mut calls = Vec::new();
        for s in sources {
            let region = self.aws.region_label(s.region());
            match &s.version {
                None => batched.entry(region).or_default().push(&s.path),
                Some(v) => calls.push(PlannedCall {
                    target: Some(region),
                    action: "GetSecretValue".to_string(),
                    detail: format!("{} at {v}", s.path),
                }),
            }
        }
        for (region, mut ids) in batched {
            ids.sort();
            ids.dedup();
            let n = ids.iter().filter(|id| !named_by_name_too(id, &ids)).count();
            for start in (0..n).step_by(BATCH) {
                calls.push(PlannedCall {
                    target: Some(region.clone()),
                    action: "BatchGetSecretValue".to_string(),
                    detail: format!("{} secrets", (n - start).min(BATCH)),
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
            let regions = self.regions(sources).await;
            let mut tasks = JoinSet::new();
            let mut batched: HashMap<String, Vec<String>> = HashMap::new();
            for (i, (s, region)) in sources.iter().zip(&regions).enumerate() {
                let Some(region) = region else { continue };
                match &s.version {
                    None => batched
                        .entry(region.clone())
                        .or_default()
                        .push(s.path.clone()),
                    Some(v) => {
                        let (aws, client, region, id, v) = (
                            self.aws.clone(),
                            self.client(region).await,
                            region.clone(),
                            s.path.clone(),
                            v.clone(),
                        );
                        tasks.spawn(async move {
                            vec![(
                                Key::One(i),
                                SecretsManager::get(aws, client, region, id, Some(v)).await,
                            )]
                        });
                    }
                }
            }
            for (region, mut ids) in batched {
                ids.sort();
                ids.dedup();
                let (mut same, asked): (Vec<String>, Vec<String>) = ids
                    .iter()
                    .cloned()
                    .partition(|id| named_by_name_too(id, &ids));
                let client = self.client(&region).await;
                for chunk in asked.chunks(BATCH) {
                    let also: Vec<String>;
                    (also, same) = same
                        .into_iter()
                        .partition(|arn| named_by_name_too(arn, chunk));
                    let (aws, client, region, chunk) = (
                        self.aws.clone(),
                        client.clone(),
                        region.clone(),
                        chunk.to_vec(),
                    );
                    tasks.spawn(async move {
                        SecretsManager::batch(aws, client, region.clone(), chunk, also)
                            .await
                            .into_iter()
                            .map(|(id, r)| (Key::Batched(region.clone(), id), r))
                            .collect()
                    });
                }
            }
            let mut answers: HashMap<Key, Result<Fetched, FetchError>> = HashMap::new();
            while let Some(done) = tasks.join_next().await {
                if let Ok(results) = done {
                    answers.extend(results);
                }
            }
            let mut out: Vec<Result<Fetched, FetchError>> = sources
                .iter()
                .zip(&regions)
                .enumerate()
                .map(|(i, (s, region))| {
                    let Some(region) = region else {
                        return Err(FetchError::new(
                            ErrorKind::Invalid,
                            "sm",
                            "resolve region",
                            "no AWS region is configured",
                        )
                        .hint("set AWS_REGION, region under [aws], or use the secret's ARN"));
                    };
                    let key = match s.version {
                        None => Key::Batched(region.clone(), s.path.clone()),
                        Some(_) => Key::One(i),
                    };
                    answers.get(&key).cloned().unwrap_or_else(|| {
                        Err(FetchError::new(
                            ErrorKind::Transient,
                            "sm",
                            "secretsmanager:GetSecretValue",
                            "the request did not complete",
                        ))
                    })
                })
                .collect();
            self.finish(sources, &regions, &mut out).await;
            out
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for SecretsManager {
    fn poll_interval(&self) -> std::time::Duration {
        self.aws.poll_interval()
    }

    /// `DescribeSecret` first; the value is fetched again only when the
    /// version carrying the stage has changed.
    fn observe<'a>(&'a self, known: &'a [(Source, Seen)]) -> BoxFuture<'a, Vec<Observation>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(known.len());
            for (s, old) in known {
                let by_id = s.version.as_deref().filter(|v| is_version_id(v));
                if by_id.is_some() && old.is_some() {
                    // A version id names one immutable version.
                    out.push(Observation::Unchanged);
                    continue;
                }
                let Some(region) = self.aws.region(s.region()).await else {
                    out.push(Observation::Unchanged);
                    continue;
                };
                let client = self.client(&region).await;
                if let Some(id) = by_id {
                    // Absent so far: asked for by its id, not as a stage.
                    let fresh = SecretsManager::get(
                        self.aws.clone(),
                        client,
                        region,
                        s.path.clone(),
                        Some(id.to_string()),
                    )
                    .await;
                    out.push(Observation::compare(None, fresh, Fetched::differs_from));
                    continue;
                }
                let stage = s.version.as_deref().unwrap_or("AWSCURRENT");
                let current =
                    SecretsManager::current_version(&self.aws, &client, &region, &s.path, stage)
                        .await;
                let fresh = match current {
                    Ok(current)
                        if current.is_some()
                            && current == old.as_ref().and_then(|o| o.version.clone()) =>
                    {
                        out.push(Observation::Unchanged);
                        continue;
                    }
                    Ok(Some(id)) => {
                        SecretsManager::get(
                            self.aws.clone(),
                            client,
                            region,
                            s.path.clone(),
                            Some(id),
                        )
                        .await
                    }
                    Ok(None) => Err(not_found(&s.path, Some(stage))),
                    Err(e) => Err(e),
                };
                let observation = Observation::compare(old.as_ref(), fresh, Fetched::differs_from);
                out.push(observation);
            }
            out
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Batched(String, String),
    One(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_name_their_secret() {
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:app/db-AbC123";
        assert_eq!(arn_name(arn), Some("app/db"));
        assert_eq!(
            arn_name("arn:aws:secretsmanager:eu-west-1:123456789012:secret:app/db"),
            Some("app/db")
        );
        assert_eq!(arn_name("app/db-AbC123"), None);
    }

    #[test]
    fn answers_by_name_full_arn_or_partial_arn() {
        let arn = "arn:aws:secretsmanager:us-east-1:1:secret:prod/db-AbCdEf";
        assert!(answers(Some("prod/db"), Some(arn), "prod/db"));
        assert!(answers(Some("prod/db"), Some(arn), arn));
        assert!(answers(
            Some("prod/db"),
            Some(arn),
            "arn:aws:secretsmanager:us-east-1:1:secret:prod/db"
        ));
        assert!(!answers(Some("prod/db"), Some(arn), "prod"));
        assert!(!answers(
            Some("prod/db"),
            Some(arn),
            "arn:aws:secretsmanager:us-east-1:1:secret:prod"
        ));
    }
}
