//! The supervised command's environment: this process's, without
//! references and envrender's credentials, with the resolved values; a
//! `*_FILE` value written to a private file whose path the variable holds.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::engine::EnvValue;
use crate::error::Error;
use crate::problem::ConfigError;
use crate::reference;

/// Variables that hold envrender's own credentials: not passed to the app
/// unless kept with `--keep-env`. The AWS ones are the app's too, and kept.
pub const CREDENTIALS: &[&str] = crate::environment::BACKEND_CREDENTIALS;

/// The environment variables of this process that are references, as
/// `[env]` entries. Backend settings (`CONSUL_*`, `VAULT_*`, `AWS_*`,
/// `ENVRENDER_*`) and `host:port` values such as `consul:8500` are not
/// references; `file:` and `env:` are only taken from `[env]`, where they
/// cannot be mistaken for URLs.
pub fn env_references(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, EnvValue)>, Error> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in vars {
        if ["CONSUL_", "VAULT_", "AWS_", "ENVRENDER_"]
            .iter()
            .any(|p| name.starts_with(p))
            || !reference::looks_like_reference(&value)
        {
            continue;
        }
        let (scheme, rest) = value.split_once(':').unwrap_or_default();
        if matches!(scheme, "file" | "env")
            || (!rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
        {
            continue;
        }
        match reference::parse(&value) {
            Ok(r) => out.push((name, EnvValue::Reference(r))),
            Err(e) => errors.push(
                ConfigError::new(format!("environment variable {name}"), e.to_string())
                    .hint("fix the reference, or unset the variable"),
            ),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Error::Config(errors))
    }
}

/// The environment a command is started with.
pub type ChildEnv = BTreeMap<std::ffi::OsString, std::ffi::OsString>;

/// The command's environment: ours without references and credentials,
/// with the resolved values (`*_FILE` names pointing at written files).
pub fn child_env(
    process_env: &[(OsString, OsString)],
    resolved: Vec<(String, String)>,
    declared: &[(String, EnvValue)],
    keep_env: &[String],
    secrets: &mut SecretFiles,
) -> Result<ChildEnv, Error> {
    let mut env: ChildEnv = process_env
        .iter()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !CREDENTIALS.contains(&k.as_ref()) || keep_env.iter().any(|x| *x == k)
        })
        .cloned()
        .collect();
    for (name, value) in resolved {
        if name.ends_with("_FILE")
            && declared
                .iter()
                .any(|(n, v)| *n == name && matches!(v, EnvValue::Reference(_)))
        {
            let path = secrets.write(&name, &value)?;
            env.insert(name.into(), path.into_os_string());
        } else {
            env.insert(name.into(), value.into());
        }
    }
    Ok(env)
}

/// The files of `[env]` `*_FILE` values, and their cleaning up.
///
/// By default they go in a directory made for this run under `/dev/shm`
/// (else the temporary directory): a random name, mode 0700, created anew
/// (never one that exists, which another user could have made). In a
/// `--secrets-dir`, the directory is the operator's. Either way each file
/// is created anew, with O_EXCL at mode 0600 under a temporary name, and
/// renamed into place: a symlink or a file planted at the name is
/// replaced, never written through or reused with its mode.
///
/// Dropped, it removes the files it wrote (and the directory it made):
/// when a supervised command has exited, or when the command could not be
/// started. After a successful exec nothing is left to remove them.
pub struct SecretFiles {
    given: Option<PathBuf>,
    made: Option<tempfile::TempDir>,
    written: std::collections::BTreeSet<PathBuf>,
}

impl SecretFiles {
    /// Files in `given`, or in a directory made for the run.
    pub fn new(given: Option<PathBuf>) -> SecretFiles {
        SecretFiles {
            given,
            made: None,
            written: Default::default(),
        }
    }

    /// Writes one `*_FILE` value to a new 0600 file; returns its path.
    fn write(&mut self, name: &str, value: &str) -> Result<PathBuf, Error> {
        use std::io::Write as _;
        use std::os::unix::fs::DirBuilderExt as _;
        let fail = |e: std::io::Error, what: &Path| {
            Error::Setup(
                ConfigError::new(
                    "envrender run",
                    format!(
                        "cannot write the value of {name} to {}: {e}",
                        what.display()
                    ),
                )
                .hint("give a writable directory with --secrets-dir"),
            )
        };
        let dir = match (&self.given, &self.made) {
            (Some(given), _) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(given)
                    .map_err(|e| fail(e, given))?;
                given.clone()
            }
            (None, Some(made)) => made.path().to_path_buf(),
            (None, None) => {
                let shm = Path::new("/dev/shm");
                let base = if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                };
                let made = tempfile::Builder::new()
                    .prefix("envrender-")
                    .permissions(std::fs::Permissions::from_mode(0o700))
                    .tempdir_in(&base)
                    .map_err(|e| fail(e, &base))?;
                let dir = made.path().to_path_buf();
                self.made = Some(made);
                dir
            }
        };
        let path = dir.join(name.trim_end_matches("_FILE").to_ascii_lowercase());
        let mut file = tempfile::Builder::new()
            .prefix(".envrender-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(|e| fail(e, &dir))?;
        file.write_all(value.as_bytes())
            .and_then(|_| file.as_file().sync_all())
            .map_err(|e| fail(e, &path))?;
        file.persist(&path).map_err(|e| fail(e.error, &path))?;
        self.written.insert(path.clone());
        Ok(path)
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        // In the directory made for the run, its removal takes the files.
        if self.made.is_none() {
            for path in &self.written {
                if let Err(e) = std::fs::remove_file(path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a secret file");
                }
            }
        }
        if let Some(made) = self.made.take() {
            let path = made.path().to_path_buf();
            if let Err(e) = made.close() {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the secret files' directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reference_values_of_the_apps_variables_are_resolved() {
        let vars = [
            ("DB_PASSWORD", "ssm:/app/db/password"),
            (
                "API",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:api",
            ),
            ("CONSUL_HTTP_ADDR", "consul:8500"),
            ("REDIS", "consul:6379"),
            ("DATA", "file:/data/db.sqlite"),
            ("HOME", "/root"),
            ("VAULT_TOKEN", "hvs.x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let refs = env_references(vars).unwrap();
        let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["DB_PASSWORD", "API"]);
        let bad = env_references([("X".to_string(), "vault:a?b".to_string())]).unwrap_err();
        assert!(bad.to_string().contains("environment variable X"), "{bad}");
    }
}
