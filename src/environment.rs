//! The process environment, read through a trait.
//!
//! envrender reads its settings (`ENVRENDER_*`), the standard variables of each
//! ecosystem (`VAULT_ADDR`, `CONSUL_HTTP_ADDR`, …) and `env:` references from
//! the environment. Going through [`Environment`] lets tests give a map instead
//! of mutating the real process environment, which is racy across threads.

use std::collections::BTreeMap;
use std::ffi::OsString;

/// Where variables are read from.
pub trait Environment: Send + Sync {
    /// The variable's value, if it is set (and UTF-8).
    fn var(&self, name: &str) -> Option<String>;

    /// Every variable, as the process has them (`run` hands them on).
    fn vars_os(&self) -> Vec<(OsString, OsString)>;
}

/// The real process environment. Variables that are not valid UTF-8 are
/// treated as unset.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn vars_os(&self) -> Vec<(OsString, OsString)> {
        std::env::vars_os().collect()
    }
}

/// A fixed set of variables.
#[derive(Clone, Debug, Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl MapEnv {
    /// The variables given.
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        MapEnv(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl Environment for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn vars_os(&self) -> Vec<(OsString, OsString)> {
        self.0.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }
}

/// envrender's own credentials for Vault and Consul, and the variables
/// that say where they are. No command envrender starts gets them — not
/// `run`'s app, not a reload command — unless kept by name
/// (`--keep-env NAME`).
pub const BACKEND_CREDENTIALS: &[&str] = &[
    "VAULT_TOKEN",
    "VAULT_TOKEN_FILE",
    "VAULT_CLIENT_KEY",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_AUTH",
    "CONSUL_CLIENT_KEY",
];

/// AWS credentials, and the variables that say where to get them: the
/// container credentials endpoint and its token, the web identity token
/// and the role it is for, the shared credentials file. Reload commands do
/// not get them unless kept by name; `run`'s app does (see docs/run.md: the
/// container's AWS identity is the app's too).
pub const AWS_CREDENTIALS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_SHARED_CREDENTIALS_FILE",
];

/// envrender's own settings that may hold a secret: the `--http` action's
/// URL, whose query or userinfo may carry a token.
pub const SETTINGS_WITH_SECRETS: &[&str] = &["ENVRENDER_HTTP"];

/// The credential variables a reload command (`watch --exec`, an
/// `on_change` `exec`) does not get: every one above, but those in `keep`.
pub fn scrubbed_for_commands(keep: &[String]) -> impl Iterator<Item = &'static str> + '_ {
    BACKEND_CREDENTIALS
        .iter()
        .chain(AWS_CREDENTIALS)
        .chain(SETTINGS_WITH_SECRETS)
        .copied()
        .filter(move |name| !keep.iter().any(|k| k == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_commands_lose_the_http_actions_url() {
        assert!(scrubbed_for_commands(&[]).any(|n| n == "ENVRENDER_HTTP"));
        assert!(scrubbed_for_commands(&[]).any(|n| n == "VAULT_TOKEN"));
        let keep = ["ENVRENDER_HTTP".to_string()];
        assert!(!scrubbed_for_commands(&keep).any(|n| n == "ENVRENDER_HTTP"));
    }
}
