//! The resolver: from references to values.
//!
//! It takes every reference a run needs, reduces them to distinct sources,
//! groups the sources by backend, and fetches the groups concurrently, each
//! backend batching as its API allows. Transient failures are retried with
//! backoff until the deadline. Then each reference takes its value from its
//! source: the `#field` selector is applied and `|optional` / `|default=`
//! decide what a missing value becomes. Every failure is kept, so a run
//! reports all of them at once rather than the first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backend::{Backends, ErrorKind, FetchError, Fetched};
use crate::backoff::Backoff;
use crate::local_values::LocalValues;
use crate::reference::{Field, Reference, Scheme, Source};
use crate::secret::Secret;

/// Between retries of transient failures: 200 ms doubling to 5 s, each in
/// the second half of its step.
pub const RETRY: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).jitter(0.5, 1.0);

/// The least time left worth one more attempt.
const LAST_ATTEMPT: Duration = Duration::from_millis(100);

/// How long one attempt may take: a third of the time left, at least 5 s
/// (and never past the deadline), so an answer that never comes still
/// leaves time to ask again. Returns the cut-off and the patience.
fn attempt_cutoff(now: Instant, deadline: Instant) -> (Instant, Duration) {
    let left = deadline.saturating_duration_since(now);
    let patience = (left / 3).max(Duration::from_secs(5));
    if patience >= left {
        (deadline, left)
    } else {
        (now + patience, Duration::from_secs(patience.as_secs()))
    }
}

/// A reference that could not be resolved.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The reference as parsed.
    pub reference: Reference,
    /// Why: its source's fetch error, or why its `#field` cannot be selected.
    pub error: FetchError,
}

/// The outcome of each distinct source fetched, by source.
pub type FetchResults = HashMap<Source, Result<Fetched, FetchError>>;

/// Keeps of `results` what is worth holding between renders: values, and
/// absences (an absent value is an answer too); other failures are asked
/// again.
pub fn keep_answers(results: &mut FetchResults) {
    results.retain(|_, r| match r {
        Ok(_) => true,
        Err(e) => e.kind == ErrorKind::NotFound,
    });
}

/// Resolves references through a run's backends, retrying transient
/// failures, optionally answering from a local values file first.
#[derive(Clone)]
pub struct Resolver {
    backends: Backends,
    backoff: Backoff,
    /// The local values file, replaced whole when it is read again.
    local: Option<Arc<RwLock<Arc<LocalValues>>>>,
}

impl Resolver {
    /// A resolver on `backends`, with the default retry backoff
    /// ([`RETRY`]) and no local values file.
    pub fn new(backends: Backends) -> Self {
        Resolver {
            backends,
            backoff: RETRY,
            local: None,
        }
    }

    /// Serves the sources found in a local values file from it, before any
    /// backend is asked.
    pub fn with_local_values(mut self, local: LocalValues) -> Self {
        self.local = Some(Arc::new(RwLock::new(Arc::new(local))));
        self
    }

    /// The local values file in use.
    fn local(&self) -> Option<Arc<LocalValues>> {
        let local = self.local.as_ref()?;
        Some(
            local
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    /// The local values file's path, when there is one.
    pub fn local_values_file(&self) -> Option<std::path::PathBuf> {
        self.local().map(|l| l.path.clone())
    }

    /// Reads the local values file again (watch mode: it changed, or
    /// SIGHUP), and drops from `held` what it answered before or answers
    /// now, to be answered afresh. On an error the values in use stay.
    pub fn reload_local_values(
        &self,
        held: &mut FetchResults,
    ) -> Result<(), crate::problem::ConfigError> {
        let (Some(slot), Some(old)) = (self.local.as_ref(), self.local()) else {
            return Ok(());
        };
        let mut new = LocalValues::load(&old.path)?;
        new.fallthrough = old.fallthrough;
        let before: Vec<Source> = held
            .keys()
            .filter(|s| self.answers_locally(s))
            .cloned()
            .collect();
        *slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        held.retain(|s, _| !before.contains(s) && !self.answers_locally(s));
        Ok(())
    }

    /// Whether a source is served from the local values file.
    pub fn serves_locally(&self, source: &Source) -> bool {
        self.local().is_some_and(|l| l.lookup(source).is_some())
    }

    /// Whether a source is answered by the local values file, found or not:
    /// in airplane mode a network source never reaches its backend.
    pub fn answers_locally(&self, source: &Source) -> bool {
        self.local().is_some_and(|l| {
            l.lookup(source).is_some() || (!l.fallthrough && !source.scheme.is_local())
        })
    }

    /// The backends it fetches from.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Fetches every source not already in `results`, adding the outcome
    /// there. Sources of one backend go to it in one call; backends run
    /// concurrently. Transient failures are retried until `deadline`.
    pub async fn fetch(
        &self,
        sources: impl IntoIterator<Item = Source>,
        results: &mut FetchResults,
        deadline: Instant,
    ) {
        let mut pending: Vec<Source> = sources
            .into_iter()
            .filter(|s| !results.contains_key(s))
            .collect();
        pending.sort();
        pending.dedup();
        let mine = pending.clone();
        // The error of the previous attempt, kept for when the last attempt
        // is cut off by the deadline: it says more than "no answer".
        let mut previous: HashMap<Source, FetchError> = HashMap::new();
        let mut attempt = 0;
        while !pending.is_empty() {
            for (source, mut result) in self
                .fetch_once(std::mem::take(&mut pending), deadline)
                .await
            {
                if matches!(&result, Err(e) if e.is_deadline())
                    && let Some(before) = previous.remove(&source)
                {
                    result = Err(before);
                }
                if let Err(e) = &result {
                    tracing::debug!(reference = %source, backend = e.backend, error = %e, "fetch failed");
                } else {
                    tracing::debug!(reference = %source, "fetched");
                }
                results.insert(source, result);
            }
            let retry: Vec<Source> = mine
                .iter()
                .filter(|s| matches!(results.get(*s), Some(Err(e)) if e.kind.is_retryable()))
                .cloned()
                .collect();
            if retry.is_empty() {
                break;
            }
            // A server that said when to come back (`Retry-After`, clamped
            // by the backend) is not asked sooner.
            let asked = retry
                .iter()
                .filter_map(|s| match results.get(s) {
                    Some(Err(e)) => e.retry_after,
                    _ => None,
                })
                .max()
                .unwrap_or_default();
            // The timeout is the time allowed: a backoff step that would
            // pass the deadline is cut short, for one last attempt just
            // before it. A server's own `Retry-After` is never cut short: one
            // that leaves no time for that attempt, or too little time
            // left, ends the retries early.
            let left = deadline.saturating_duration_since(Instant::now());
            if asked + LAST_ATTEMPT > left || left <= LAST_ATTEMPT {
                break;
            }
            let delay = self
                .backoff
                .delay(attempt)
                .max(asked)
                .min(left - LAST_ATTEMPT);
            tracing::info!(
                count = retry.len(),
                retry_in_ms = delay.as_millis() as u64,
                "transient failures, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
            for s in &retry {
                if let Some(Err(e)) = results.remove(s) {
                    previous.insert(s.clone(), e);
                }
            }
            pending = retry;
        }
    }

    async fn fetch_once(
        &self,
        sources: Vec<Source>,
        deadline: Instant,
    ) -> Vec<(Source, Result<Fetched, FetchError>)> {
        let mut groups: BTreeMap<_, Vec<Source>> = BTreeMap::new();
        let mut out = Vec::new();
        for s in sources {
            if let Some(local) = self.local().filter(|_| self.answers_locally(&s)) {
                let answer = local.lookup(&s).ok_or_else(|| local.missing(&s));
                out.push((s, answer));
                continue;
            }
            groups.entry(s.scheme).or_default().push(s);
        }
        let mut tasks = JoinSet::new();
        let (cutoff, patience) = attempt_cutoff(Instant::now(), deadline);
        for (scheme, group) in groups {
            match self.backends.get(scheme) {
                Ok(backend) => {
                    tasks.spawn(async move {
                        // No backend call outlives the deadline, whatever
                        // retries the backend does inside; and a call that
                        // hangs is given up early enough to be asked again.
                        match tokio::time::timeout_at(cutoff, backend.fetch(&group)).await {
                            Ok(results) => {
                                debug_assert_eq!(results.len(), group.len());
                                group.into_iter().zip(results).collect::<Vec<_>>()
                            }
                            Err(_) if cutoff < deadline => {
                                let e = FetchError::new(
                                    ErrorKind::Transient,
                                    backend.name(),
                                    "fetch",
                                    format!(
                                        "no answer within {}",
                                        humantime::format_duration(patience)
                                    ),
                                );
                                group.into_iter().map(|s| (s, Err(e.clone()))).collect()
                            }
                            Err(_) => {
                                let e = FetchError::deadline(backend.name());
                                group.into_iter().map(|s| (s, Err(e.clone()))).collect()
                            }
                        }
                    });
                }
                Err(e) => out.extend(group.into_iter().map(|s| (s, Err(e.clone())))),
            }
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(results) => out.extend(results),
                // A backend task that panicked: its sources stay unresolved
                // and are reported as such below.
                Err(e) => tracing::error!(error = %e, "backend task failed"),
            }
        }
        out
    }

    /// Resolves references against fetched results. Returns the value of
    /// every reference that resolved and a failure for every one that did not.
    pub fn select_all<'r>(
        refs: impl IntoIterator<Item = &'r Reference>,
        results: &FetchResults,
    ) -> (HashMap<Reference, Secret>, Vec<Failure>) {
        let mut values = HashMap::new();
        let mut failures = Vec::new();
        for r in refs {
            if values.contains_key(r) || failures.iter().any(|f: &Failure| &f.reference == r) {
                continue;
            }
            let result = match results.get(&r.source) {
                Some(result) => select(r, result.as_ref()),
                None => Err(FetchError::new(
                    ErrorKind::Transient,
                    r.source.scheme.prefix(),
                    "fetch",
                    "no answer from the backend",
                )),
            };
            match result {
                Ok(v) => {
                    values.insert(r.clone(), v);
                }
                Err(error) => failures.push(Failure {
                    reference: r.clone(),
                    error,
                }),
            }
        }
        (values, failures)
    }
}

/// The value of one reference, given what its source fetched.
pub fn select(r: &Reference, fetched: Result<&Fetched, &FetchError>) -> Result<Secret, FetchError> {
    select_value(r, fetched).map(Secret::new)
}

fn select_value(
    r: &Reference,
    fetched: Result<&Fetched, &FetchError>,
) -> Result<Value, FetchError> {
    let missing = || match &r.default {
        Some(d) => Value::String(d.clone()),
        None if r.source.scheme == Scheme::Service && r.field.is_none() => Value::Array(Vec::new()),
        None if r.source.is_prefix() && r.field.is_none() => Value::Object(Default::default()),
        None => Value::String(String::new()),
    };
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) if e.kind == ErrorKind::NotFound && r.tolerates_missing() => return Ok(missing()),
        Err(e) => return Err(e.clone()),
    };
    let whole = fetched.value.expose();
    let empty = match whole {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if r.source.is_collection() && r.field.is_none() && empty {
        if r.tolerates_missing() {
            return Ok(missing());
        }
        // An empty answer for a prefix or a service is how files get wiped;
        // refuse it.
        return Err(FetchError::new(
            ErrorKind::NotFound,
            r.source.scheme.prefix(),
            "select",
            if r.source.is_prefix() {
                "nothing found under the prefix"
            } else {
                "no healthy instances"
            },
        )
        .hint(format!(
            "mark it optional if an empty answer is expected ({r}|optional)"
        )));
    }
    let Some(field) = &r.field else {
        return Ok(whole.clone());
    };
    match select_field(whole, field) {
        Ok(v) => Ok(v),
        Err(e) if e.kind == ErrorKind::NotFound && r.tolerates_missing() => Ok(missing()),
        Err(mut e) => {
            e.backend = r.source.scheme.prefix();
            Err(e)
        }
    }
}

/// Walks `#a.b.c` into a value. A string holding JSON is parsed first, so
/// fields work on JSON stored in any backend.
pub fn select_field(value: &Value, field: &Field) -> Result<Value, FetchError> {
    let parsed;
    let mut current = match value {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|_| {
                FetchError::new(
                    ErrorKind::Invalid,
                    "",
                    "select",
                    format!("cannot select #{field}: the value is text, not JSON or a structured document"),
                )
                .hint("drop the #field to use the whole value")
            })?;
            &parsed
        }
        v => v,
    };
    for (depth, key) in field.0.iter().enumerate() {
        let at = Field(field.0[..depth].to_vec());
        let place = if depth == 0 {
            "the top level".to_string()
        } else {
            format!("#{at}")
        };
        current = match current {
            Value::Object(map) => map.get(key).ok_or_else(|| {
                let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
                keys.truncate(20);
                FetchError::new(
                    ErrorKind::NotFound,
                    "",
                    "select",
                    format!("no key \"{key}\" at {place}"),
                )
                .hint(if keys.is_empty() {
                    "the map there is empty".to_string()
                } else {
                    format!("keys there: {}", keys.join(", "))
                })
            })?,
            Value::Array(items) => key
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .ok_or_else(|| {
                    FetchError::new(
                        ErrorKind::NotFound,
                        "",
                        "select",
                        format!(
                            "no item \"{key}\" at {place}: a list of {} items",
                            items.len()
                        ),
                    )
                })?,
            other => {
                return Err(FetchError::new(
                    ErrorKind::Invalid,
                    "",
                    "select",
                    format!(
                        "cannot select \"{key}\" at {place}: it is a {}",
                        crate::secret::describe(other)
                    ),
                ));
            }
        };
    }
    Ok(current.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;
    use crate::backend::{Backend, BoxFuture, PlannedCall};
    use crate::environment::MapEnv;
    use crate::reference::parse;

    fn r(s: &str) -> Reference {
        parse(s).unwrap()
    }

    fn ok(v: Value) -> Fetched {
        Fetched::new(Secret::new(v))
    }

    fn select(r: &Reference, fetched: Result<&Fetched, &FetchError>) -> Result<Value, FetchError> {
        super::select(r, fetched).map(Secret::into_exposed)
    }

    #[test]
    fn fields_select_into_documents_and_json_strings() {
        let doc = ok(json!({"db": {"password": "p", "hosts": ["a", "b"]}}));
        assert_eq!(
            select(&r("file:x.yaml#db.password"), Ok(&doc)).unwrap(),
            "p"
        );
        assert_eq!(select(&r("file:x.yaml#db.hosts.1"), Ok(&doc)).unwrap(), "b");
        let text = ok(json!(r#"{"user": "app"}"#));
        assert_eq!(select(&r("env:J#user"), Ok(&text)).unwrap(), "app");
        let e = select(&r("file:x.yaml#db.pasword"), Ok(&doc)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("no key \"pasword\" at #db"), "{e}");
        assert_eq!(e.hint.as_deref(), Some("keys there: hosts, password"));
        let e = select(&r("file:x.yaml#db.password.x"), Ok(&doc)).unwrap_err();
        assert!(e.message.contains("it is a string, 1 chars"), "{e}");
        assert!(!e.to_string().contains("\"p\""));
        let e = select(&r("env:J#user"), Ok(&ok(json!("plain")))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(!e.to_string().contains("plain"));
    }

    #[test]
    fn optional_and_defaults() {
        let missing = FetchError::new(ErrorKind::NotFound, "env", "read variable", "X is not set");
        assert_eq!(select(&r("env:X|optional"), Err(&missing)).unwrap(), "");
        assert_eq!(select(&r("env:X|default=7"), Err(&missing)).unwrap(), "7");
        assert!(select(&r("env:X"), Err(&missing)).is_err());
        assert_eq!(
            select(&r("file:d/|optional"), Err(&missing)).unwrap(),
            json!({})
        );
        // A missing field is missing too.
        let doc = ok(json!({"a": 1}));
        assert_eq!(
            select(&r("file:x.json#b|default=2"), Ok(&doc)).unwrap(),
            "2"
        );
        // Access errors are never papered over by a default.
        let denied = FetchError::new(ErrorKind::Denied, "ssm", "GetParameters", "denied");
        assert_eq!(
            select(&r("ssm:/x|default=1"), Err(&denied))
                .unwrap_err()
                .kind,
            ErrorKind::Denied
        );
    }

    #[test]
    fn empty_prefix_is_an_error_unless_optional() {
        let empty = ok(json!({}));
        let e = select(&r("file:dir/"), Ok(&empty)).unwrap_err();
        assert!(e.message.contains("nothing found under the prefix"));
        assert_eq!(
            select(&r("file:dir/|optional"), Ok(&empty)).unwrap(),
            json!({})
        );
    }

    /// A backend that fails transiently a set number of times per source,
    /// counting calls, to exercise the retry loop.
    struct Flaky {
        failures_left: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Backend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn plan(&self, _: &[Source]) -> Vec<PlannedCall> {
            Vec::new()
        }
        fn fetch<'a>(
            &'a self,
            sources: &'a [Source],
        ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let fail = self
                    .failures_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                sources
                    .iter()
                    .map(|s| {
                        if fail {
                            Err(FetchError::new(ErrorKind::Transient, "flaky", "GET", "503"))
                        } else {
                            Ok(ok(json!(s.path.clone())))
                        }
                    })
                    .collect()
            })
        }
    }

    fn flaky_resolver(failures: usize) -> (Resolver, Arc<Flaky>) {
        let flaky = Arc::new(Flaky {
            failures_left: AtomicUsize::new(failures),
            calls: AtomicUsize::new(0),
        });
        let mut backends = Backends::local(Arc::new(MapEnv::new([("A", "a")])));
        backends.insert(Scheme::Consul, flaky.clone());
        (Resolver::new(backends), flaky)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_until_they_pass() {
        let (resolver, flaky) = flaky_resolver(3);
        let refs = [
            r("consul:a"),
            r("consul:b"),
            r("env:A"),
            r("consul:a#x|optional"),
        ];
        let mut results = FetchResults::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        resolver
            .fetch(
                refs.iter().map(|r| r.source.clone()),
                &mut results,
                deadline,
            )
            .await;
        // One call per attempt for both consul sources: batched, deduped.
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);
        let (values, failures) = Resolver::select_all(&refs[..3], &results);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(values[&r("consul:b")].expose(), "b");
        assert_eq!(values[&r("env:A")].expose(), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_and_reports_every_failure() {
        let (resolver, flaky) = flaky_resolver(usize::MAX);
        let refs = [r("consul:a"), r("consul:b"), r("env:A"), r("vault:x#y")];
        let mut results = FetchResults::new();
        let start = Instant::now();
        resolver
            .fetch(
                refs.iter().map(|r| r.source.clone()),
                &mut results,
                start + Duration::from_secs(10),
            )
            .await;
        assert!(Instant::now() - start <= Duration::from_secs(10));
        assert!(flaky.calls.load(Ordering::SeqCst) > 2);
        let (values, failures) = Resolver::select_all(&refs, &results);
        assert_eq!(values.len(), 1);
        let failed: Vec<String> = failures.iter().map(|f| f.reference.to_string()).collect();
        assert_eq!(failed.len(), 3);
        assert!(failed.contains(&"consul:a".to_string()));
        let vault = failures
            .iter()
            .find(|f| f.reference.source.scheme == Scheme::Vault)
            .unwrap();
        assert_eq!(vault.error.kind, ErrorKind::Unsupported);
    }

    #[test]
    fn an_attempt_gets_a_third_of_the_time_left_but_at_least_five_seconds() {
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(attempt_cutoff(now, now + s(30)), (now + s(10), s(10)));
        assert_eq!(attempt_cutoff(now, now + s(9)), (now + s(5), s(5)));
        // Less than five seconds left: the deadline is the cut-off.
        assert_eq!(attempt_cutoff(now, now + s(4)), (now + s(4), s(4)));
        assert_eq!(attempt_cutoff(now, now), (now, s(0)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = RETRY;
        assert!(b.delay(0) <= Duration::from_millis(200));
        assert!(b.delay(0) >= Duration::from_millis(100));
        assert!(b.delay(20) <= Duration::from_secs(5));
        assert!(b.delay(20) >= Duration::from_millis(2500));
    }
}
