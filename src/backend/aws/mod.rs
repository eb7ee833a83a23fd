//! AWS backends: SSM Parameter Store (`ssm:`), Secrets Manager (`sm:`) and
//! KMS (`kms:`), through aws-sdk-rust.
//!
//! One [`Aws`] context is shared by the three: the SDK configuration (the
//! standard credential chain: environment, profile, web identity / IRSA, ECS
//! and EKS Pod Identity container credentials, IMDS; `AWS_ENDPOINT_URL`),
//! loaded on first use so that runs with no AWS reference never touch it;
//! one client per service and region; a client-side rate limit per service
//! and region; an optional start-up jitter; and the caller's identity, looked
//! up once with `sts:GetCallerIdentity` and only after an access error, so a
//! denied request can say who was denied.
//!
//! The SDK retries throttling and 5xx answers a few times within a call;
//! the resolver retries what is still transient, backing off exponentially
//! with jitter, until the render deadline; and the client-side rate limit
//! keeps one instance well under the account's quota to begin with.

pub mod kms;
pub mod secretsmanager;
pub mod ssm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ssm::config::http::HttpResponse;
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{Backends, ErrorKind, FetchError};
use crate::environment::Environment;
use crate::reference::Scheme;

/// Settings of the AWS backends (`ssm:`, `sm:`, `kms:`).
#[derive(Clone, Debug, PartialEq)]
pub struct AwsConfig {
    /// The region for references that do not name one (ARNs do); otherwise
    /// the SDK's chain: `AWS_REGION`, the profile, IMDS.
    pub region: Option<String>,
    /// Requests per second per service and region. SSM's default quota is
    /// 40 per second for the whole account and region, shared by every
    /// instance, so one instance stays well below it.
    pub rate_limit: f64,
    /// Wait a random time up to this long before the first request, so a
    /// fleet that starts together does not call in step.
    pub startup_jitter: Duration,
    /// How often watch mode looks for new versions.
    pub poll_interval: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            rate_limit: 10.0,
            startup_jitter: Duration::ZERO,
            poll_interval: Duration::from_secs(60),
        }
    }
}

/// Registers the `ssm:`, `sm:` and `kms:` backends; returns their shared
/// context (Vault's AWS IAM login signs with it too).
pub fn register(backends: &mut Backends, config: AwsConfig, env: &dyn Environment) -> Arc<Aws> {
    let aws = Arc::new(Aws::new(config, env));
    backends.insert(Scheme::Ssm, Arc::new(ssm::Ssm::new(aws.clone())));
    backends.insert(
        Scheme::SecretsManager,
        Arc::new(secretsmanager::SecretsManager::new(aws.clone())),
    );
    backends.insert(Scheme::Kms, Arc::new(kms::Kms::new(aws.clone())));
    aws
}

/// Who the calls are made as, from `sts:GetCallerIdentity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The caller's ARN (user, or assumed role with its session name);
    /// `unknown` when STS did not say.
    pub arn: String,
    /// The 12-digit account id; empty when STS did not say.
    pub account: String,
}

/// What the `ssm:`, `sm:` and `kms:` backends share: settings, the SDK
/// configuration, the caller's identity and the rate limiters, each loaded
/// or made on first use.
pub struct Aws {
    config: AwsConfig,
    /// The region references without one use, as far as it can be known
    /// without loading the SDK configuration (for `check`).
    region_hint: Option<String>,
    sdk: OnceCell<aws_config::SdkConfig>,
    identity: OnceCell<Option<Identity>>,
    limiters: Mutex<HashMap<(&'static str, String), Arc<RateLimiter>>>,
    started: OnceCell<()>,
}

impl Aws {
    /// A context from the settings; the region for plans falls back to
    /// `AWS_REGION`, then `AWS_DEFAULT_REGION`. Loads nothing yet.
    pub fn new(config: AwsConfig, env: &dyn Environment) -> Self {
        let region_hint = config
            .region
            .clone()
            .or_else(|| env.var("AWS_REGION"))
            .or_else(|| env.var("AWS_DEFAULT_REGION"));
        Aws {
            config,
            region_hint,
            sdk: OnceCell::new(),
            identity: OnceCell::new(),
            limiters: Mutex::new(HashMap::new()),
            started: OnceCell::new(),
        }
    }

    /// A context with an SDK configuration given rather than loaded from the
    /// environment (embedding, tests).
    pub fn with_sdk(config: AwsConfig, sdk: aws_config::SdkConfig) -> Self {
        let aws = Aws {
            region_hint: sdk.region().map(|r| r.to_string()),
            ..Aws::new(config, &crate::environment::MapEnv::default())
        };
        let _ = aws.sdk.set(sdk);
        aws
    }

    /// How often watch mode polls SSM and Secrets Manager
    /// ([`AwsConfig::poll_interval`]).
    pub fn poll_interval(&self) -> Duration {
        self.config.poll_interval
    }

    /// The SDK configuration, loaded once.
    pub async fn sdk(&self) -> &aws_config::SdkConfig {
        self.sdk
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    // A few quick retries inside each call; the resolver
                    // retries what is still transient, with jittered
                    // exponential backoff, until the render deadline.
                    .retry_config(
                        RetryConfig::standard()
                            .with_max_attempts(3)
                            .with_initial_backoff(Duration::from_millis(100))
                            .with_max_backoff(Duration::from_secs(2)),
                    )
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_attempt_timeout(Duration::from_secs(10))
                            .build(),
                    );
                if let Some(region) = &self.config.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                loader.load().await
            })
            .await
    }

    /// The region of a reference: the one its ARN names, else the default.
    pub async fn region(&self, named: Option<&str>) -> Option<String> {
        match named {
            Some(r) => Some(r.to_string()),
            None => self.sdk().await.region().map(|r| r.to_string()),
        }
    }

    /// For plans: the region name, or a description when it is not known yet.
    pub fn region_label(&self, named: Option<&str>) -> String {
        named
            .map(str::to_string)
            .or_else(|| self.region_hint.clone())
            .unwrap_or_else(|| "default region".to_string())
    }

    /// Waits for the start-up jitter (once) and a rate-limit slot.
    pub async fn permit(&self, service: &'static str, region: &str) {
        self.started
            .get_or_init(|| async {
                let jitter = self.config.startup_jitter;
                if !jitter.is_zero() {
                    let wait = jitter.mul_f64(fastrand::f64());
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "start-up jitter");
                    tokio::time::sleep(wait).await;
                }
            })
            .await;
        let limiter = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            limiters
                .entry((service, region.to_string()))
                .or_insert_with(|| Arc::new(RateLimiter::new(self.config.rate_limit)))
                .clone()
        };
        limiter.acquire().await;
    }

    /// The caller, looked up once. `None` when the lookup itself fails.
    pub async fn identity(&self) -> Option<Identity> {
        self.identity
            .get_or_init(|| async {
                let client = aws_sdk_sts::Client::new(self.sdk().await);
                match client.get_caller_identity().send().await {
                    Ok(out) => Some(Identity {
                        arn: out.arn().unwrap_or("unknown").to_string(),
                        account: out.account().unwrap_or("").to_string(),
                    }),
                    Err(e) => {
                        tracing::debug!(error = %DisplayErrorContext(&e), "sts:GetCallerIdentity failed");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Adds the caller's identity to access errors. Resource ARNs that need
    /// the account are built by the caller from the returned identity.
    pub async fn annotate(&self, errors: &mut [&mut FetchError]) -> Option<Identity> {
        if !errors.iter().any(|e| e.kind == ErrorKind::Denied) {
            return None;
        }
        let identity = self.identity().await;
        for e in errors.iter_mut().filter(|e| e.kind == ErrorKind::Denied) {
            e.identity = Some(match &identity {
                Some(id) => id.arn.clone(),
                None => "an identity sts:GetCallerIdentity could not name".to_string(),
            });
        }
        identity
    }
}

/// One SDK client per region, made on first use.
pub struct RegionClients<C> {
    clients: Mutex<HashMap<String, C>>,
}

impl<C: Clone> RegionClients<C> {
    /// No clients yet.
    pub fn new() -> Self {
        RegionClients {
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `region`, made from the shared SDK configuration.
    pub async fn get(
        &self,
        aws: &Aws,
        region: &str,
        make: impl FnOnce(&aws_config::SdkConfig, String) -> C,
    ) -> C {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(region)
        {
            return c.clone();
        }
        let client = make(aws.sdk().await, region.to_string());
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(region.to_string())
            .or_insert(client)
            .clone()
    }
}

impl<C: Clone> Default for RegionClients<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Spaces requests evenly at a fixed rate, allowing a burst of two seconds'
/// worth: a start's calls (twenty at the default rate: 200 names, or 100
/// names and ten pages) go out together instead of waiting their turn, and
/// a steady stream stays at the rate. Runs on tokio's clock, so tests can
/// pause time.
pub struct RateLimiter {
    interval: Duration,
    burst: Duration,
    next: tokio::sync::Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter of `per_second` requests per second (at least one per
    /// 1000 seconds).
    pub fn new(per_second: f64) -> Self {
        let per_second = per_second.max(0.001);
        RateLimiter {
            interval: Duration::from_secs_f64(1.0 / per_second),
            burst: Duration::from_secs(2),
            next: tokio::sync::Mutex::new(None),
        }
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            // Unused capacity accumulates for at most `burst`.
            let floor = now.checked_sub(self.burst).unwrap_or(now);
            let at = next.map_or(floor, |n| n.max(floor));
            *next = Some(at + self.interval);
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Turns an SDK error into a [`FetchError`] for `backend:action`. Access
/// errors get a hint from the caller; this knows only the class.
pub fn sdk_error<E>(
    backend: &'static str,
    action: &str,
    err: &SdkError<E, HttpResponse>,
) -> FetchError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string);
    let kind = match (code.as_deref(), err) {
        (_, SdkError::TimeoutError(_) | SdkError::DispatchFailure(_)) => ErrorKind::Transient,
        (_, SdkError::ConstructionFailure(_)) => ErrorKind::Invalid,
        (
            Some(
                "AccessDeniedException"
                | "AccessDenied"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredTokenException"
                | "ExpiredToken"
                | "KMSAccessDeniedException",
            ),
            _,
        ) => ErrorKind::Denied,
        (
            Some(
                "ThrottlingException"
                | "Throttling"
                | "TooManyRequestsException"
                | "RequestLimitExceeded"
                | "InternalServerError"
                | "InternalServiceError"
                | "InternalFailure"
                | "ServiceUnavailable"
                | "KMSInternalException"
                | "DependencyTimeoutException",
            ),
            _,
        ) => ErrorKind::Transient,
        (
            Some("ParameterNotFound" | "ParameterVersionNotFound" | "ResourceNotFoundException"),
            _,
        ) => ErrorKind::NotFound,
        _ => match status {
            Some(401 | 403) => ErrorKind::Denied,
            Some(429) => ErrorKind::Transient,
            Some(s) if s >= 500 => ErrorKind::Transient,
            _ => ErrorKind::Invalid,
        },
    };
    let mut message = match (&code, err.message()) {
        (Some(code), Some(m)) if !m.is_empty() => format!("{code}: {m}"),
        (Some(code), _) => code.clone(),
        (None, _) => match err {
            // The body of an unmodelled error is not shown: it is the
            // service's, and not always shaped like an AWS error.
            SdkError::ResponseError(_) | SdkError::ServiceError(_) => {
                "unrecognised error response".to_string()
            }
            other => super::error_chain(other),
        },
    };
    if let Some(status) = status {
        message.push_str(&format!(" (HTTP {status})"));
    }
    let mut e = FetchError::new(kind, backend, action, message);
    if kind == ErrorKind::Transient {
        e.hint = Some("retried with backoff until the render deadline (--timeout)".to_string());
    }
    if matches!(
        code.as_deref(),
        Some("UnrecognizedClientException" | "InvalidClientTokenId")
    ) {
        e.hint = Some("the access key is not known to AWS: check the credentials envrender finds (AWS_ACCESS_KEY_ID, profile, role)".to_string());
    } else if matches!(
        code.as_deref(),
        Some("ExpiredTokenException" | "ExpiredToken")
    ) {
        e.hint = Some(
            "the session credentials have expired: refresh them or let the role be assumed again"
                .to_string(),
        );
    } else if matches!(
        err,
        SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
    ) && e.message.contains("credentials")
    {
        // A configuration problem, not a denial: there is nobody to name.
        e.kind = ErrorKind::Invalid;
        e.hint = Some("no AWS credentials were found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, a web identity token (IRSA) or container credentials (ECS, EKS Pod Identity)".to_string());
    }
    e
}

/// The ARN of an SSM parameter, for messages and hints.
pub fn parameter_arn(region: &str, account: Option<&str>, name: &str) -> String {
    if name.starts_with("arn:") {
        return name.to_string();
    }
    let name = name.split(':').next().unwrap_or(name);
    format!(
        "arn:aws:ssm:{region}:{}:parameter/{}",
        account.unwrap_or("ACCOUNT"),
        name.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_requests_after_a_burst() {
        let limiter = RateLimiter::new(10.0);
        // The first request waits for nothing.
        let start = Instant::now();
        limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::ZERO);
        // After two seconds idle, a burst of 20 passes at once, then 10/s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let start = Instant::now();
        for _ in 0..20 {
            limiter.acquire().await;
        }
        assert!(
            Instant::now() - start <= Duration::from_millis(100),
            "{:?}",
            Instant::now() - start
        );
        let start = Instant::now();
        for _ in 0..20 {
            limiter.acquire().await;
        }
        let took = Instant::now() - start;
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn startup_jitter_delays_only_the_first_request() {
        let config = AwsConfig {
            startup_jitter: Duration::from_secs(2),
            rate_limit: 1000.0,
            ..AwsConfig::default()
        };
        let aws = Aws::new(config, &crate::environment::MapEnv::default());
        let start = Instant::now();
        aws.permit("ssm", "r").await;
        let first = Instant::now() - start;
        assert!(first <= Duration::from_secs(2), "{first:?}");
        let start = Instant::now();
        aws.permit("ssm", "r").await;
        aws.permit("kms", "r").await;
        assert_eq!(Instant::now() - start, Duration::ZERO);
    }

    #[test]
    fn parameter_arns() {
        assert_eq!(
            parameter_arn("eu-west-1", Some("123"), "/app/db:3"),
            "arn:aws:ssm:eu-west-1:123:parameter/app/db"
        );
        assert_eq!(
            parameter_arn("r", None, "plain"),
            "arn:aws:ssm:r:ACCOUNT:parameter/plain"
        );
        assert_eq!(
            parameter_arn("r", None, "arn:aws:ssm:x:1:parameter/p"),
            "arn:aws:ssm:x:1:parameter/p"
        );
    }
}
