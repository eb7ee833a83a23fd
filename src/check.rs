//! `envrender check`: what a render would do, without writing anything —
//! every reference with its state and users, the requests each backend
//! would make, the watches of watch mode, and what would become of each
//! output.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use tokio::time::Instant;

use crate::engine::{EnvValue, Plan, Resolution, Settings};
use crate::error::Error;
use crate::output::{self, Status};
use crate::reference::Source;
use crate::resolve::Resolver;

/// `envrender check`: the report for stdout, and the run's outcome.
/// `overridden`: the names of `[env]` the environment sets to values of
/// its own.
pub async fn check(
    resolver: &Resolver,
    settings: &Settings,
    overridden: &[String],
    config_file: Option<&Path>,
) -> Result<(String, Result<(), Error>), Error> {
    let plan = Plan::new(settings)?;
    let resolution = plan
        .resolve(resolver, Instant::now() + settings.timeout)
        .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration: {}",
        config_file
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "none (flags only)".into())
    );
    references_report(&mut out, resolver, &resolution);
    environment_report(&mut out, settings, overridden);
    let result = match plan.outputs(&resolution) {
        Ok(writes) => match output::preview(&writes) {
            Ok(statuses) => {
                let _ = writeln!(out, "\noutputs (nothing written):");
                for (w, status) in writes.iter().zip(statuses) {
                    let verb = match status {
                        Status::Created => "would create",
                        Status::Updated => "would update",
                        Status::Attributes => "would fix mode/owner of",
                        Status::Unchanged => "unchanged",
                    };
                    let _ = writeln!(
                        out,
                        "  {verb:<24} {}  (from {}, mode {:04o}, {} bytes)",
                        w.path.display(),
                        w.origin,
                        w.mode,
                        w.contents.len()
                    );
                }
                Ok(())
            }
            Err(e) => Err(Error::Output(e)),
        },
        Err(e) => Err(e),
    };
    Ok((out, result))
}

/// The variables `run` would set for its command, and where each comes
/// from; no value is shown.
fn environment_report(out: &mut String, settings: &Settings, overridden: &[String]) {
    if settings.env.is_empty() && overridden.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nenvironment (as run would give it to its command):");
    let mut lines: Vec<(String, String)> = settings
        .env
        .iter()
        .map(|(name, value)| {
            let from = match value {
                EnvValue::Literal(_) => "set in [env]".to_string(),
                EnvValue::Reference(r) => format!("= {r}"),
            };
            (name.clone(), from)
        })
        .chain(overridden.iter().map(|name| {
            (
                name.clone(),
                "set in the environment (wins over [env])".to_string(),
            )
        }))
        .collect();
    lines.sort();
    for (name, from) in lines {
        let _ = writeln!(out, "  {name}  {from}");
    }
}

fn references_report(out: &mut String, resolver: &Resolver, resolution: &Resolution) {
    let failed: BTreeMap<_, _> = resolution
        .failures
        .iter()
        .map(|f| (&f.reference, &f.error))
        .collect();
    let _ = writeln!(out, "\nreferences ({}):", resolution.users.len());
    for (r, users) in &resolution.users {
        let fetched = resolution.fetched.get(&r.source);
        // Missing: the source, or the field inside it.
        let missing = match fetched {
            Some(Err(_)) => true,
            Some(Ok(f)) => r.field.as_ref().is_some_and(|field| {
                crate::resolve::select_field(f.value.expose(), field)
                    .is_err_and(|e| e.kind == crate::backend::ErrorKind::NotFound)
            }),
            None => false,
        };
        let state = match (resolution.values.get(r), failed.get(r), fetched) {
            (Some(_), _, _) if missing && r.default.is_some() => {
                "missing, default used".to_string()
            }
            (Some(_), _, _) if missing => "missing, optional".to_string(),
            (Some(v), _, fetched) => {
                let mut s = format!("ok      {}", v.describe());
                if resolver.serves_locally(&r.source) {
                    s.push_str(" (local values)");
                } else if let Some(Ok(crate::backend::Fetched {
                    version: Some(version),
                    ..
                })) = fetched
                {
                    let _ = write!(s, " (version {version})");
                }
                s
            }
            (None, Some(e), _) => format!("FAILED  {}", e.to_string().replace('\n', "; ")),
            (None, None, _) => "not fetched".to_string(),
        };
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "  {r}\n      {state}\n      used by {}",
            users.join(", ")
        );
    }
    // The requests, per backend, as the backends would batch them.
    let mut by_scheme: BTreeMap<_, Vec<_>> = BTreeMap::new();
    let (mut local, mut missing) = (0, 0);
    for source in resolution.fetched.keys() {
        if resolver.serves_locally(source) {
            local += 1;
        } else if resolver.answers_locally(source) {
            missing += 1;
        } else {
            by_scheme
                .entry(source.scheme)
                .or_default()
                .push(source.clone());
        }
    }
    let _ = writeln!(out, "\nrequests:");
    if local + missing > 0 {
        let _ = writeln!(
            out,
            "  local values file: {local} value{}{}",
            if local == 1 { "" } else { "s" },
            if missing > 0 {
                format!(", {missing} not in it")
            } else {
                String::new()
            }
        );
    }
    let mut watches: Vec<String> = Vec::new();
    for (scheme, mut sources) in by_scheme {
        sources.sort();
        let Ok(backend) = resolver.backends().get(scheme) else {
            let _ = writeln!(
                out,
                "  {scheme}: no backend configured ({} source{} not fetched)",
                sources.len(),
                if sources.len() == 1 { "" } else { "s" }
            );
            continue;
        };
        let mut counts: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
        let absent: Vec<Source> = sources
            .iter()
            .filter(|s| {
                matches!(resolution.fetched.get(*s), Some(Err(e)) if e.kind == crate::backend::ErrorKind::NotFound)
            })
            .cloned()
            .collect();
        for call in backend.plan_known(&sources, &absent) {
            *counts.entry((call.target, call.action)).or_default() += 1;
        }
        let calls: Vec<String> = counts
            .into_iter()
            .map(|((target, action), n)| match target {
                Some(t) => format!("{n} × {action} ({t})"),
                None => format!("{n} × {action}"),
            })
            .collect();
        let _ = writeln!(out, "  {}: {}", backend.name(), calls.join(", "));
        watches.extend(
            backend
                .watching()
                .map(|w| w.watches(&sources))
                .unwrap_or_default()
                .into_iter()
                .map(|w| format!("{}: {w}", backend.name())),
        );
    }
    if !watches.is_empty() {
        let _ = writeln!(out, "\nwatches (in watch mode):");
        for w in watches {
            let _ = writeln!(out, "  {w}");
        }
    }
}
