//! The process environment, read through a trait.
//!
//! envrender reads its settings (`ENVRENDER_*`), the standard variables of each
//! ecosystem (`VAULT_ADDR`, `CONSUL_HTTP_ADDR`, …) and `env:` references from
//! the environment. Going through [`Environment`] lets tests give a map instead
//! of mutating the real process environment, which is racy across threads.

use std::collections::BTreeMap;

pub trait Environment: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment. Variables that are not valid UTF-8 are
/// treated as unset.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A fixed set of variables.
#[derive(Clone, Debug, Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl MapEnv {
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
}
