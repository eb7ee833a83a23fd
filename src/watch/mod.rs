//! `envrender watch`: render, then keep the outputs fresh.
//!
//! After a first complete render, one task per backend watches the values the
//! outputs use — Consul through blocking queries, Vault through its lease
//! scheduler and KV re-reads, SSM and Secrets Manager by polling — and a
//! notify watcher looks at the directories of the template files and `file:`
//! sources (a directory, so Kubernetes' `..data` symlink swaps are seen).
//! Changes are debounced (`--wait MIN[:MAX]`), the outputs are rendered again
//! from the values held, changed ones are committed together, and then the
//! actions run once. A backend that fails leaves the last good outputs in
//! place, marks the process degraded (`/readyz`), and is retried; it recovers
//! by itself.

mod debounce;
mod files;
mod refresher;
mod sources;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::action::{self, Action};
use crate::backend::Release;
use crate::engine::{Plan, Settings};
use crate::error::Error;
use crate::health::Health;
use crate::resolve::{FetchResults, Resolver};
use crate::shutdown::Stop;

pub use refresher::{Cycle, Refresher};
pub use sources::{Event, Sources};

/// What watch mode does besides rendering.
#[derive(Clone, Debug, Default)]
pub struct WatchSettings {
    /// Quiet period after a change before rendering, and the longest a
    /// stream of changes can put a render off.
    pub wait: (Duration, Duration),
    /// What to do after any output changed.
    pub actions: Vec<Action>,
    /// Serve `/healthz`, `/readyz` and `/metrics` here.
    pub listen: Option<std::net::SocketAddr>,
    /// A random extra delay, up to this, before rendering changes.
    pub splay: Duration,
    /// Credential variables the commands of actions get anyway (see
    /// [`crate::environment::scrubbed_for_commands`]).
    pub keep_env: Vec<String>,
}

/// Runs watch mode until `stop` says. `reload` builds the settings again
/// for SIGHUP.
pub async fn watch(
    resolver: &Resolver,
    settings: Settings,
    options: WatchSettings,
    reload: impl Fn() -> Result<Settings, Error>,
    mut stop: Stop,
) -> Result<(), Error> {
    let plan = Plan::new(&settings)?;
    plan.remove_interrupted_writes();
    let health = Arc::new(Health::default());
    if let Some(addr) = options.listen {
        crate::health::serve(addr, health.clone()).await?;
    }
    let mut hup = crate::shutdown::listen(tokio::signal::unix::SignalKind::hangup())?;
    let mut refresher = Refresher::new(
        resolver,
        settings,
        plan,
        FetchResults::new(),
        health.clone(),
        options.wait,
        options.splay,
    );
    refresher.render_now();
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration and templates");
                if let Err(e) = reload().and_then(|s| refresher.reload(s)) {
                    tracing::error!("reload failed; keeping the running configuration:\n{e}");
                }
            }
            _ = refresher.due() => {
                // A stop signal abandons the render where it stands (it is
                // committed whole or not at all) and any reload command.
                let Ok(cycle) = stop.or_stop(refresher.render()).await else {
                    break;
                };
                let Some(cycle) = cycle.filter(|c| !c.written.is_empty()) else {
                    continue;
                };
                let actions = actions_for(refresher.settings(), refresher.plan(), &cycle.written, &options.actions);
                let done = |a: &Action, ok| health.action_done(&a.to_string(), ok);
                if stop.or_stop(action::run_all(&actions, &options.keep_env, done)).await.is_err() {
                    break;
                }
            }
        }
    }
    tracing::info!("stopping");
    // A sidecar stopped while the app it signals still runs is being
    // restarted; once the app is gone, the pod or task is. With no signal
    // action it cannot be told: a restart is assumed.
    let app_runs = refresher
        .settings()
        .templates
        .iter()
        .flat_map(|t| t.on_change.iter())
        .chain(&options.actions)
        .filter_map(Action::target_running)
        .reduce(|a, b| a || b)
        .unwrap_or(true);
    let why = if app_runs {
        Release::Restarting
    } else {
        Release::Stopped
    };
    resolver.backends().release(why).await;
    Ok(())
}

/// The actions to run after `written` changed: those of each template
/// written, then the global ones, each once.
fn actions_for(
    settings: &Settings,
    plan: &Plan,
    written: &[PathBuf],
    global: &[Action],
) -> Vec<Action> {
    let mut actions: Vec<Action> = Vec::new();
    let per_template = settings
        .templates
        .iter()
        .filter(|t| written.contains(&plan.destination(&t.destination)))
        .flat_map(|t| t.on_change.iter());
    for a in per_template.chain(global) {
        if !actions.contains(a) {
            actions.push(a.clone());
        }
    }
    actions
}
