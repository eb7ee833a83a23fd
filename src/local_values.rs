//! A local values file: production references served from a file.
//!
//! With `--values FILE` (or `[local] values`), every reference whose source is
//! a key of the file is answered from it, before any backend is asked:
//!
//! ```yaml
//! "ssm:/app/prod/db/password": local-password
//! "vault:secret/app": { api_key: dev-key }
//! "consul:app/prod/db_host": localhost
//! ```
//!
//! So the same templates, written against Consul, Vault and SSM, render on a
//! laptop or in CI with no server at all. A prefix reference is answered by a
//! key for the prefix itself, or else by collecting the keys below it.
//!
//! With a values file nothing goes to the network: a Consul, Vault or AWS
//! reference that is not in the file is missing (so `|optional` and
//! `|default=` apply), unless `[local] fallthrough = true` sends it on to its
//! backend. `file:` and `env:` references are read as usual.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::backend::{ErrorKind, FetchError, Fetched};
use crate::problem::ConfigError;
use crate::reference::{self, Source};
use crate::secret::Secret;

/// A values file, loaded: its values by source.
#[derive(Debug)]
pub struct LocalValues {
    /// The file, as given; named in errors.
    pub path: PathBuf,
    /// Ask the backends for network sources the file does not have.
    pub fallthrough: bool,
    values: BTreeMap<Source, Secret>,
}

impl LocalValues {
    /// Reads and checks the file: every key must be a reference to a source
    /// (no `#field` or modifiers). Errors name the file and key, never a value.
    pub fn load(path: &Path) -> Result<LocalValues, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&origin, format!("cannot read the values file: {e}")))?;
        let document = crate::backend::local::parse_document(path, text)
            .map_err(|m| ConfigError::new(&origin, m))?;
        let Value::Object(entries) = document else {
            return Err(ConfigError::new(&origin, "a values file is a map of references to values")
                .hint("use a .yaml, .json or .toml file whose keys are references, e.g. \"ssm:/app/db/password\": dev-password"));
        };
        let mut values = BTreeMap::new();
        for (key, value) in entries {
            let r = reference::parse(&key)
                .map_err(|e| ConfigError::new(&origin, format!("key \"{key}\": {e}")))?;
            if r.field.is_some() || r.optional || r.default.is_some() {
                return Err(ConfigError::new(
                    &origin,
                    format!("key \"{key}\" selects a field or has modifiers"),
                )
                .hint(format!(
                    "key the whole value by its source, \"{}\", and give a map for its fields",
                    r.source
                )));
            }
            values.insert(r.source, Secret::new(value));
        }
        Ok(LocalValues {
            path: path.to_path_buf(),
            fallthrough: false,
            values,
        })
    }

    /// How many sources the file answers (its keys).
    pub fn count(&self) -> usize {
        self.values.len()
    }

    /// The error for a network source the file does not have.
    pub fn missing(&self, source: &Source) -> FetchError {
        let file = self.path.display();
        FetchError::new(
            ErrorKind::NotFound,
            source.scheme.prefix(),
            "read local values",
            format!("not in {file}"),
        )
        .hint(format!(
            "add a key \"{source}\" to {file}, or set fallthrough = true under [local] to ask the {} backend",
            source.scheme
        ))
    }

    /// The value for a source, if the file has it.
    pub fn lookup(&self, source: &Source) -> Option<Fetched> {
        if let Some(v) = self.values.get(source) {
            return Some(Fetched::new(v.clone()));
        }
        if !source.is_prefix() || source.version.is_some() {
            return None;
        }
        let below: Map<String, Value> = self
            .values
            .iter()
            .filter(|(s, _)| {
                s.scheme == source.scheme
                    && s.version.is_none()
                    && s.params == source.params
                    && s.form == source.form
                    && s.path.len() > source.path.len()
                    && s.path.starts_with(&source.path)
            })
            .map(|(s, v)| (s.path[source.path.len()..].to_string(), v.expose().clone()))
            .collect();
        (!below.is_empty()).then(|| Fetched::new(Secret::new(Value::Object(below))))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn load(name: &str, text: &str) -> Result<LocalValues, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        LocalValues::load(&path)
    }

    fn source(s: &str) -> Source {
        reference::parse(s).unwrap().source
    }

    #[test]
    fn serves_sources_and_prefixes() {
        let v = load(
            "values.yaml",
            "\"ssm:/app/db/password\": pw\n\"consul:app/a\": 1\n\"consul:app/b/c\": x\n\"vault:secret/app\":\n  key: k\n",
        )
        .unwrap();
        assert_eq!(v.count(), 4);
        assert_eq!(
            v.lookup(&source("ssm:/app/db/password"))
                .unwrap()
                .value
                .expose(),
            "pw"
        );
        assert_eq!(
            v.lookup(&source("vault:secret/app"))
                .unwrap()
                .value
                .expose(),
            &json!({"key": "k"})
        );
        assert_eq!(
            v.lookup(&source("consul:app/")).unwrap().value.expose(),
            &json!({"a": 1, "b/c": "x"})
        );
        assert!(v.lookup(&source("ssm:/other")).is_none());
        assert!(v.lookup(&source("ssm:/app/db/password@2")).is_none());
        assert!(v.lookup(&source("consul:none/")).is_none());
    }

    #[test]
    fn bad_keys_are_named() {
        let e = load("v.yaml", "\"smm:/x\": 1\n").unwrap_err();
        assert!(e.message.contains("key \"smm:/x\""), "{e}");
        let e = load("v.yaml", "\"ssm:/x#f\": 1\n").unwrap_err();
        assert!(e.hint.unwrap().contains("\"ssm:/x\""));
        let e = load("v.yaml", "- a\n").unwrap_err();
        assert!(e.message.contains("map of references"));
        let e = load("v.json", "{\"ssm:/x\": \"CANARY\",,}").unwrap_err();
        assert!(!e.to_string().contains("CANARY"));
    }
}
