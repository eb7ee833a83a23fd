//! The run: settings → plan → resolution → outputs.
//!
//! [`Plan::new`] reads and compiles every template and checks every reference
//! written in the configuration, so bad input fails before any network call.
//! [`Plan::resolve`] alternates template discovery with fetching until no new
//! reference appears. [`Plan::outputs`] renders the files and env values from
//! what was resolved. `render`, `check`, and later `watch` and `run` are all
//! compositions of these three steps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::action::Action;
use crate::error::Error;
use crate::output::{self, FileWrite};
use crate::output::{EnvFormat, Owner};
use crate::problem::ConfigError;
use crate::reference::{Reference, Scheme};
use crate::resolve::{Failure, FetchResults, Resolver};
use crate::secret::Secret;
use crate::template::{TemplateError, Templates};

/// How many times discovery may run. Each round after the first exists only
/// because a template computes references from fetched data.
pub const MAX_ROUNDS: usize = 5;

/// A template and where it is rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateOutput {
    /// The template file.
    pub source: PathBuf,
    /// Where it is rendered to.
    pub destination: PathBuf,
    /// The mode of the written file.
    pub mode: u32,
    /// Who owns the written file, if not the process.
    pub owner: Option<Owner>,
    /// Actions after this output changed (watch mode).
    pub on_change: Vec<Action>,
    /// A command that must accept the staged file before it goes live
    /// (`nginx -t -c {file}`): argv, `{file}` standing for the file.
    pub check: Option<Vec<String>>,
}

/// An env file of the `[env]` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvFileOutput {
    /// Where the file is written.
    pub destination: PathBuf,
    /// dotenv or JSON.
    pub format: EnvFormat,
    /// The mode of the written file.
    pub mode: u32,
    /// Who owns the written file, if not the process.
    pub owner: Option<Owner>,
}

/// The value of an environment variable envrender produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    /// A value to resolve.
    Reference(Reference),
    /// Text that is not a reference, passed through as it is.
    Literal(String),
}

/// Everything a run does, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The templates and where each is rendered.
    pub templates: Vec<TemplateOutput>,
    /// The `[env]` variables: for env files, and `run`'s command.
    pub env: Vec<(String, EnvValue)>,
    /// The env files written from `env`.
    pub env_files: Vec<EnvFileOutput>,
    /// Write every destination under this directory instead of `/`.
    pub output_root: Option<PathBuf>,
    /// How long fetching may retry transient failures (`--timeout`).
    pub timeout: Duration,
    /// Limits on what templates may do (`render.max_output`).
    pub limits: crate::template::Limits,
    /// Directories whose outputs change together (`render.linked_dirs`).
    pub linked_dirs: Vec<PathBuf>,
}

/// What a run will do, checked: the templates compiled, the destinations
/// told apart. Built before any network call.
pub struct Plan {
    templates: Templates,
    template_outputs: Vec<TemplateOutput>,
    env: Vec<(String, EnvValue)>,
    env_files: Vec<EnvFileOutput>,
    output_root: Option<PathBuf>,
    linked_dirs: Vec<PathBuf>,
}

/// The values of a run, and what could not be had.
pub struct Resolution {
    /// Each reference's value (its field selected, its default applied).
    pub values: Arc<HashMap<Reference, Secret>>,
    /// What each source's fetch gave, kept between renders in watch mode.
    pub fetched: FetchResults,
    /// Every reference asked for, with who asked (a template, `env NAME`).
    pub users: BTreeMap<Reference, BTreeSet<String>>,
    /// The references that could not be resolved, and why.
    pub failures: Vec<Failure>,
    /// Template errors that appeared once data was known.
    pub render_errors: Vec<TemplateError>,
}

impl Resolution {
    /// The failures as an error, each with its users; `None` when all resolved.
    pub fn failure_error(&self) -> Option<Error> {
        if self.failures.is_empty() {
            return None;
        }
        let failures = self
            .failures
            .iter()
            .map(|f| {
                let users = self
                    .users
                    .get(&f.reference)
                    .map(|u| u.iter().cloned().collect())
                    .unwrap_or_default();
                (f.clone(), users)
            })
            .collect();
        Some(Error::Unresolved(failures))
    }
}

impl Plan {
    /// Reads and compiles every template and checks every destination;
    /// every problem found is in the error.
    pub fn new(settings: &Settings) -> Result<Plan, Error> {
        let mut sources: Vec<(String, String)> = Vec::new();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for t in &settings.templates {
            let name = t.source.display().to_string();
            if !seen.insert(name.clone()) {
                continue;
            }
            match std::fs::read_to_string(&t.source) {
                Ok(text) => sources.push((name, text)),
                Err(e) => errors.push(
                    ConfigError::new(&name, format!("cannot read the template: {e}")).hint(match e
                        .kind()
                    {
                        std::io::ErrorKind::InvalidData => {
                            "the template is not UTF-8 text; save it as UTF-8"
                        }
                        _ => "template paths are relative to the working directory",
                    }),
                ),
            }
        }
        // Each destination once, however it is spelled (`x`, `./x`,
        // `a/../x`; `/etc/x` and `etc/x` under an output root).
        let mut destinations: BTreeMap<PathBuf, &PathBuf> = BTreeMap::new();
        let all_destinations = settings
            .templates
            .iter()
            .map(|t| &t.destination)
            .chain(settings.env_files.iter().map(|f| &f.destination));
        let root = settings.output_root.as_deref();
        for d in all_destinations {
            if let Some(root) = root
                && d.components().any(|c| c == Component::ParentDir)
            {
                errors.push(
                    ConfigError::new(
                        d.display().to_string(),
                        format!(
                            "\"..\" could leave --output-root {}: a destination under an output root may not have \"..\" in it",
                            root.display()
                        ),
                    )
                    .hint("write the destination without \"..\", e.g. /etc/app/app.conf"),
                );
                continue;
            }
            let key = lexically_normal(&destination_under(root, d));
            if let Some(first) = destinations.insert(key, d) {
                let also = if first == d {
                    String::new()
                } else {
                    format!(" (also written as {})", first.display())
                };
                errors.push(
                    ConfigError::new(
                        d.display().to_string(),
                        format!("two outputs write this destination{also}"),
                    )
                    .hint("give each template and env file its own destination"),
                );
            }
        }
        if !errors.is_empty() {
            return Err(Error::Config(errors));
        }
        let templates = Templates::compile_with(&sources, settings.limits).map_err(Error::Input)?;
        Ok(Plan {
            templates,
            template_outputs: settings.templates.clone(),
            env: settings.env.clone(),
            env_files: settings.env_files.clone(),
            output_root: settings.output_root.clone(),
            linked_dirs: settings.linked_dirs.clone(),
        })
    }

    /// Finds and fetches every value the plan needs. Returns an error only for
    /// bad input found before anything was fetched; failures to resolve are
    /// in the [`Resolution`], so `check` can still show the plan.
    pub async fn resolve(
        &self,
        resolver: &Resolver,
        deadline: Instant,
    ) -> Result<Resolution, Error> {
        self.resolve_with(resolver, deadline, FetchResults::new())
            .await
    }

    /// [`Plan::resolve`], starting from values already fetched (watch mode
    /// keeps them between renders): only what `known` lacks, or failed to
    /// get, is fetched; a value known to be absent is an answer, and is not
    /// asked for again.
    pub async fn resolve_with(
        &self,
        resolver: &Resolver,
        deadline: Instant,
        known: FetchResults,
    ) -> Result<Resolution, Error> {
        let mut prior = known;
        crate::resolve::keep_answers(&mut prior);
        let mut users: BTreeMap<Reference, BTreeSet<String>> = BTreeMap::new();
        for (name, value) in &self.env {
            if let EnvValue::Reference(r) = value {
                users
                    .entry(r.clone())
                    .or_default()
                    .insert(format!("env {name}"));
            }
        }
        let mut known: HashMap<Reference, Secret> = HashMap::new();
        let first = self.templates.discover(&Arc::new(known.clone()));
        if !first.bad_references.is_empty() || !first.errors.is_empty() {
            let mut errors = first.bad_references;
            errors.extend(first.errors);
            return Err(Error::Input(errors));
        }
        merge_users(&mut users, first.unknown);
        let mut fetched = prior;
        let mut failures: Vec<Failure> = Vec::new();
        let mut render_errors = Vec::new();
        for round in 1..=MAX_ROUNDS {
            let failed: BTreeSet<&Reference> = failures.iter().map(|f| &f.reference).collect();
            let new: Vec<Reference> = users
                .keys()
                .filter(|r| !known.contains_key(*r) && !failed.contains(r))
                .cloned()
                .collect();
            if new.is_empty() {
                break;
            }
            if round == MAX_ROUNDS {
                render_errors.push(TemplateError {
                    template: "templates".into(),
                    line: None,
                    column: None,
                    message: format!(
                        "references were still being computed from fetched data after {MAX_ROUNDS} rounds ({} left, e.g. {})",
                        new.len(),
                        new[0]
                    ),
                });
                break;
            }
            tracing::debug!(round, references = new.len(), "fetching");
            resolver
                .fetch(new.iter().map(|r| r.source.clone()), &mut fetched, deadline)
                .await;
            let (values, failed) = Resolver::select_all(&new, &fetched);
            known.extend(values);
            failures.extend(failed);
            let d = self.templates.discover(&Arc::new(known.clone()));
            render_errors = d.bad_references;
            render_errors.extend(d.errors);
            merge_users(&mut users, d.unknown);
        }
        Ok(Resolution {
            values: Arc::new(known),
            fetched,
            users,
            failures,
            render_errors,
        })
    }

    /// Removes what an interrupted earlier run left of staged writes
    /// beside this plan's destinations.
    pub fn remove_interrupted_writes(&self) -> usize {
        let destinations: Vec<PathBuf> = self
            .template_outputs
            .iter()
            .map(|t| &t.destination)
            .chain(self.env_files.iter().map(|f| &f.destination))
            .map(|d| self.destination(d))
            .collect();
        for dir in &self.linked_dirs {
            crate::output::linked::remove_stale(&self.destination(dir));
        }
        crate::output::remove_interrupted_writes(destinations.iter().map(PathBuf::as_path))
    }

    /// Where a destination is written, under `--output-root` if given.
    pub fn destination(&self, path: &Path) -> PathBuf {
        destination_under(self.output_root.as_deref(), path)
    }

    /// Whether the output at `path` is in one of the linked directories.
    fn linked(&self, path: &Path) -> bool {
        let parent = self.destination(path).parent().map(Path::to_path_buf);
        self.linked_dirs
            .iter()
            .any(|d| Some(self.destination(d)) == parent)
    }

    /// The environment variables of the plan, resolved.
    pub fn env_vars(&self, resolution: &Resolution) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(name, value)| {
                let text = match value {
                    EnvValue::Literal(s) => s.clone(),
                    EnvValue::Reference(r) => resolution
                        .values
                        .get(r)
                        .map(|v| env_text(r, v))
                        .unwrap_or_default(),
                };
                (name.clone(), text)
            })
            .collect()
    }

    /// Renders every output from a complete resolution.
    pub fn outputs(&self, resolution: &Resolution) -> Result<Vec<FileWrite>, Error> {
        if let Some(e) = resolution.failure_error() {
            return Err(e);
        }
        if !resolution.render_errors.is_empty() {
            return Err(Error::Render(resolution.render_errors.clone()));
        }
        let mut outputs = Vec::new();
        let mut errors = Vec::new();
        for t in &self.template_outputs {
            let name = t.source.display().to_string();
            match self.templates.render(&name, &resolution.values) {
                Ok(text) => outputs.push(FileWrite {
                    path: self.destination(&t.destination),
                    contents: text.into_bytes(),
                    mode: t.mode,
                    owner: t.owner,
                    origin: name,
                    check: t.check.clone(),
                    linked: self.linked(&t.destination),
                }),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(Error::Render(errors));
        }
        let vars = self.env_vars(resolution);
        for f in &self.env_files {
            outputs.push(FileWrite {
                path: self.destination(&f.destination),
                contents: output::env_file(&vars, f.format),
                mode: f.mode,
                owner: f.owner,
                check: None,
                linked: self.linked(&f.destination),
                origin: match f.format {
                    EnvFormat::Dotenv => "env file (dotenv)",
                    EnvFormat::Json => "env file (json)",
                }
                .to_string(),
            });
        }
        Ok(outputs)
    }
}

/// A variable's text: as a template writes the value, except that an SSM
/// `StringList` is its items joined by commas, as ECS gives it to a task
/// (`valueFrom`); a template still gets a list.
fn env_text(r: &Reference, value: &Secret) -> String {
    match value.expose() {
        serde_json::Value::Array(items) if r.source.scheme == Scheme::Ssm && r.field.is_none() => {
            items
                .iter()
                .map(crate::secret::to_text)
                .collect::<Vec<_>>()
                .join(",")
        }
        _ => value.to_text(),
    }
}

/// Where a destination is written, under `root` if given. (Under a root,
/// [`Plan::new`] has refused destinations with `..`.)
fn destination_under(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        None => path.to_path_buf(),
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
    }
}

/// `path` with `.` components dropped and each `..` taking away the name
/// before it, without looking at the file system: the key that tells two
/// spellings of one destination apart.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            c => out.push(c),
        }
    }
    out
}

fn merge_users(
    users: &mut BTreeMap<Reference, BTreeSet<String>>,
    found: BTreeMap<Reference, BTreeSet<String>>,
) {
    for (r, who) in found {
        users.entry(r).or_default().extend(who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_destination_normalise_alike() {
        for (a, b) in [
            ("x", "./x"),
            ("d/x", "d/./x"),
            ("d/x", "d//x"),
            ("d/x", "d/e/../x"),
            ("/x", "/../x"),
            ("../x", "./../x"),
        ] {
            assert_eq!(
                lexically_normal(Path::new(a)),
                lexically_normal(Path::new(b))
            );
        }
        assert_ne!(
            lexically_normal(Path::new("x")),
            lexically_normal(Path::new("../x"))
        );
        assert_ne!(
            lexically_normal(Path::new("/x")),
            lexically_normal(Path::new("x"))
        );
    }
}
