//! `kms:` — a base64 KMS ciphertext, decrypted with `kms:Decrypt`.
//!
//! Parameters carry the encryption context (`context.NAME=VALUE`, which must
//! equal what `Encrypt` was given) and an optional `key_id`. Each distinct
//! ciphertext is decrypted once per process: a ciphertext never changes
//! meaning, and KMS requests count against an account-wide quota.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_kms::error::ProvideErrorMetadata as _;
use aws_sdk_kms::primitives::Blob;
use base64::Engine as _;
use tokio::task::JoinSet;

use super::{Aws, sdk_error};
use crate::backend::{Backend, BoxFuture, ErrorKind, FetchError, Fetched, PlannedCall, Watching};
use crate::reference::Source;
use crate::secret::Secret;

/// The `kms:` backend: decrypts each distinct ciphertext once and holds
/// the plaintext for the life of the process.
pub struct Kms {
    aws: Arc<Aws>,
    client: tokio::sync::OnceCell<aws_sdk_kms::Client>,
    decrypted: Mutex<HashMap<Source, Fetched>>,
}

impl Kms {
    /// The backend, on the shared AWS context; its client is made on first
    /// use.
    pub fn new(aws: Arc<Aws>) -> Self {
        Kms {
            aws,
            client: tokio::sync::OnceCell::new(),
            decrypted: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, s: &Source) -> Option<Fetched> {
        self.decrypted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(s)
            .cloned()
    }

    async fn decrypt(
        aws: Arc<Aws>,
        client: aws_sdk_kms::Client,
        source: Source,
    ) -> Result<Fetched, FetchError> {
        let Some(region) = aws.region(None).await else {
            return Err(FetchError::new(
                ErrorKind::Invalid,
                "kms",
                "resolve region",
                "no AWS region is configured",
            )
            .hint("set AWS_REGION or region under [aws]: the region of the key"));
        };
        let blob = base64::engine::general_purpose::STANDARD
            .decode(&source.path)
            .map_err(|_| {
                FetchError::new(
                    ErrorKind::Invalid,
                    "kms",
                    "kms:Decrypt",
                    "the ciphertext is not base64",
                )
            })?;
        let context: HashMap<String, String> = source
            .params
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("context.")?.to_string(), v.clone())))
            .collect();
        let key_id = source.params.get("key_id").cloned();
        aws.permit("kms", &region).await;
        tracing::debug!(region, context_keys = context.len(), "kms:Decrypt");
        let out = client
            .decrypt()
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context((!context.is_empty()).then_some(context.clone()))
            .set_key_id(key_id.clone())
            .send()
            .await;
        let key = key_id
            .clone()
            .unwrap_or_else(|| "the key that encrypted it".to_string());
        match out {
            Ok(out) => {
                let plaintext = out
                    .plaintext()
                    .map(|b| b.as_ref().to_vec())
                    .unwrap_or_default();
                let text = String::from_utf8(plaintext).map_err(|_| {
                    FetchError::new(
                        ErrorKind::Invalid,
                        "kms",
                        "kms:Decrypt",
                        "the plaintext is not UTF-8 text",
                    )
                    .hint("encrypt text, or base64-encode binary data before encrypting it")
                })?;
                tracing::debug!(key = out.key_id().unwrap_or("unknown"), "decrypted");
                Ok(Fetched::new(Secret::string(text)))
            }
            Err(e) => {
                let mut err = sdk_error("kms", "kms:Decrypt", &e);
                err.resource = key_id.clone();
                err.hint = match e.code() {
                    Some("InvalidCiphertextException") => Some(if context.is_empty() {
                        "the ciphertext does not decrypt: if it was encrypted with an encryption context, give the same one as context.NAME=VALUE parameters; otherwise it is corrupt or from another region or account".to_string()
                    } else {
                        format!(
                            "the ciphertext does not decrypt with encryption context {{{}}}: it must equal the context given to Encrypt",
                            context
                                .keys()
                                .map(|k| format!("{k}=…"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }),
                    Some("IncorrectKeyException") => Some(
                        "key_id does not name the key that encrypted this ciphertext".to_string(),
                    ),
                    Some("DisabledException" | "KMSInvalidStateException") => {
                        Some(format!("{key} is disabled or pending deletion"))
                    }
                    _ if err.kind == ErrorKind::Denied => {
                        Some(format!("allow kms:Decrypt on {key}"))
                    }
                    _ => err.hint.take(),
                };
                Err(err)
            }
        }
    }
}

impl Backend for Kms {
    fn name(&self) -> &'static str {
        "kms"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        sources
            .iter()
            .map(|s| PlannedCall {
                target: Some(self.aws.region_label(None)),
                action: "Decrypt".to_string(),
                detail: format!("{} bytes of ciphertext", s.path.len() * 3 / 4),
            })
            .collect()
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            let mut tasks = JoinSet::new();
            for (i, s) in sources.iter().enumerate() {
                if self.cached(s).is_none() {
                    let client = self
                        .client
                        .get_or_init(|| async { aws_sdk_kms::Client::new(self.aws.sdk().await) })
                        .await
                        .clone();
                    let (aws, source) = (self.aws.clone(), s.clone());
                    tasks.spawn(async move { (i, Kms::decrypt(aws, client, source).await) });
                }
            }
            let mut results: HashMap<usize, Result<Fetched, FetchError>> = HashMap::new();
            while let Some(done) = tasks.join_next().await {
                if let Ok((i, r)) = done {
                    if let Ok(f) = &r {
                        self.decrypted
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(sources[i].clone(), f.clone());
                    }
                    results.insert(i, r);
                }
            }
            let mut out: Vec<Result<Fetched, FetchError>> = sources
                .iter()
                .enumerate()
                .map(|(i, s)| match self.cached(s) {
                    Some(f) => Ok(f),
                    None => results.remove(&i).unwrap_or_else(|| {
                        Err(FetchError::new(
                            ErrorKind::Transient,
                            "kms",
                            "kms:Decrypt",
                            "the request did not complete",
                        ))
                    }),
                })
                .collect();
            let mut denied: Vec<&mut FetchError> =
                out.iter_mut().filter_map(|r| r.as_mut().err()).collect();
            self.aws.annotate(&mut denied).await;
            out
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for Kms {
    /// Nothing to watch: the value cannot change while envrender runs.
    fn watches(&self, _: &[Source]) -> Vec<String> {
        Vec::new()
    }

    /// A ciphertext's plaintext never changes.
    fn observe<'a>(
        &'a self,
        known: &'a [(Source, crate::backend::Seen)],
    ) -> BoxFuture<'a, Vec<crate::backend::Observation>> {
        Box::pin(async move {
            known
                .iter()
                .map(|_| crate::backend::Observation::Unchanged)
                .collect()
        })
    }
}
