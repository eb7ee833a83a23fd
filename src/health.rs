//! Health: `/healthz`, `/readyz` and `/metrics`, for `watch` and a
//! supervising `run`. Ready after the first complete render while nothing
//! fails; the metrics count renders, writes, looks at backends and actions,
//! and show when each lease expires.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::problem::ConfigError;

/// What `/readyz` and `/metrics` report.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Backends (or "render") currently failing, with why.
    problems: Mutex<BTreeMap<String, String>>,
    renders: AtomicU64,
    render_errors: AtomicU64,
    writes: AtomicU64,
    last_success: AtomicU64,
    watched: AtomicU64,
    observations: Mutex<BTreeMap<(String, &'static str), u64>>,
    actions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Unix seconds at which each leased reference expires.
    leases: Mutex<BTreeMap<String, f64>>,
}

impl Health {
    /// The first complete render is done; true when it was done before.
    pub fn set_ready(&self) -> bool {
        self.ready.swap(true, Ordering::SeqCst)
    }

    /// `what` (a backend's watcher, `render`, `templates`) fails, and why;
    /// `None`: it no longer does.
    pub fn problem(&self, what: &str, why: Option<String>) {
        let mut p = lock(&self.problems);
        match why {
            Some(why) => {
                p.insert(what.to_string(), why);
            }
            None => {
                p.remove(what);
            }
        }
    }

    /// A render was committed: `written` files changed; `leases` says when
    /// each leased source expires (Unix seconds).
    pub fn rendered(&self, written: usize, leases: BTreeMap<String, f64>) {
        *lock(&self.leases) = leases;
        self.renders.fetch_add(1, Ordering::SeqCst);
        self.writes.fetch_add(written as u64, Ordering::SeqCst);
        self.last_success.store(unix_now(), Ordering::SeqCst);
    }

    /// A lease was renewed: it now ends at `expires` (Unix seconds).
    pub fn lease_renewed(&self, reference: &str, expires: f64) {
        if let Some(at) = lock(&self.leases).get_mut(reference) {
            *at = expires;
        }
    }

    /// A render failed; the last good outputs stay.
    pub fn render_failed(&self) {
        self.render_errors.fetch_add(1, Ordering::SeqCst);
    }

    /// How many sources are watched.
    pub fn set_watched(&self, sources: usize) {
        self.watched.store(sources as u64, Ordering::SeqCst);
    }

    /// A backend looked at its sources for changes.
    pub fn observed(&self, backend: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        *lock(&self.observations)
            .entry((backend.to_string(), result))
            .or_default() += 1;
    }

    /// An action ran (`label` as [`crate::action::Action`] displays it).
    pub fn action_done(&self, label: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        *lock(&self.actions)
            .entry((label.to_string(), result))
            .or_default() += 1;
    }

    /// `/readyz`: ready after the first complete render, while nothing fails.
    pub fn readiness(&self) -> (bool, String) {
        if !self.ready.load(Ordering::SeqCst) {
            return (false, "waiting for the first complete render\n".into());
        }
        let p = lock(&self.problems);
        if p.is_empty() {
            (true, "ready\n".into())
        } else {
            let mut text = String::from("degraded (serving the last good outputs):\n");
            for (what, why) in p.iter() {
                let what = what.split_once('#').map_or(what.as_str(), |(w, _)| w);
                text.push_str(&format!("  {what}: {}\n", why.replace('\n', "; ")));
            }
            (false, text)
        }
    }

    /// `/metrics`, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "envrender_renders_total",
            "Renders completed.",
            self.renders.load(Ordering::SeqCst),
        );
        counter(
            "envrender_render_errors_total",
            "Renders that failed; the last good outputs were kept.",
            self.render_errors.load(Ordering::SeqCst),
        );
        counter(
            "envrender_writes_total",
            "Output files written because their content changed.",
            self.writes.load(Ordering::SeqCst),
        );
        let gauge = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        gauge(
            &mut out,
            "envrender_last_success_timestamp_seconds",
            "When the last render succeeded.",
        );
        let _ = writeln!(
            out,
            "envrender_last_success_timestamp_seconds {}",
            self.last_success.load(Ordering::SeqCst)
        );
        gauge(
            &mut out,
            "envrender_ready",
            "1 when the outputs are complete and current.",
        );
        let _ = writeln!(out, "envrender_ready {}", u8::from(self.readiness().0));
        gauge(
            &mut out,
            "envrender_watched_references",
            "Sources being watched.",
        );
        let _ = writeln!(
            out,
            "envrender_watched_references {}",
            self.watched.load(Ordering::SeqCst)
        );
        let _ = writeln!(
            out,
            "# HELP envrender_backend_observations_total Looks at backends for changes, by result.\n# TYPE envrender_backend_observations_total counter"
        );
        for ((backend, result), n) in lock(&self.observations).iter() {
            let _ = writeln!(
                out,
                "envrender_backend_observations_total{{backend=\"{backend}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP envrender_actions_total Actions run after changes, by result.\n# TYPE envrender_actions_total counter"
        );
        for ((action, result), n) in lock(&self.actions).iter() {
            let _ = writeln!(
                out,
                "envrender_actions_total{{action=\"{}\",result=\"{result}\"}} {n}",
                action.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        let _ = writeln!(
            out,
            "# HELP envrender_lease_expiry_timestamp_seconds When each leased Vault secret expires unless renewed.\n# TYPE envrender_lease_expiry_timestamp_seconds gauge"
        );
        for (reference, at) in lock(&self.leases).iter() {
            let _ = writeln!(
                out,
                "envrender_lease_expiry_timestamp_seconds{{reference=\"{}\"}} {at:.0}",
                reference.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        out
    }
}

/// A lock whose holder never leaves the data half-changed: a panic while
/// holding it does not make the counts unreadable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<(), Error> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Setup(
            ConfigError::new("--listen", format!("cannot listen on {addr}: {e}"))
                .hint("give a free address, e.g. --listen 127.0.0.1:8080"),
        )
    })?;
    tracing::info!(address = %addr, "serving /healthz, /readyz and /metrics");
    let ready = health.clone();
    let metrics = health.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = ready.clone();
                async move {
                    let (ok, text) = health.readiness();
                    let status = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, text)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let health = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        health.metrics(),
                    )
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the health server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_first_render_and_failures() {
        let h = Health::default();
        assert!(!h.readiness().0);
        h.ready.store(true, Ordering::SeqCst);
        assert_eq!(h.readiness(), (true, "ready\n".to_string()));
        h.problem("consul", Some("GET /v1/kv/x: connection refused".into()));
        let (ok, text) = h.readiness();
        assert!(!ok && text.contains("consul: GET /v1/kv/x"), "{text}");
        h.problem("consul", None);
        assert!(h.readiness().0);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let h = Health::default();
        h.renders.fetch_add(2, Ordering::SeqCst);
        h.actions
            .lock()
            .unwrap()
            .insert(("SIGHUP to processes named \"app\"".into(), "ok"), 1);
        let text = h.metrics();
        assert!(
            text.contains("# TYPE envrender_renders_total counter\nenvrender_renders_total 2\n")
        );
        assert!(text.contains(
            "envrender_actions_total{action=\"SIGHUP to processes named \\\"app\\\"\",result=\"ok\"} 1"
        ));
        assert!(text.contains("envrender_ready 0"));
    }
}
