//! The errors a command ends with, and their exit codes.
//!
//! Exit codes are part of the CLI contract: 1 when a value could not be
//! resolved, rendered or written, or something envrender needs could not be
//! set up; 2 for invalid usage or input (configuration, template or
//! reference syntax), which is always found before any network call. Each
//! error lists every problem of its kind, not only the first.

use std::fmt;

use crate::output::OutputError;
use crate::problem::ConfigError;
use crate::resolve::Failure;
use crate::template::TemplateError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration or flags.
    #[error("invalid configuration ({}):{}", count(.0.len(), "problem"), List(.0))]
    Config(Vec<ConfigError>),
    /// Templates that do not compile, reference syntax errors, and template
    /// errors found before anything was fetched.
    #[error("invalid template input ({}):{}", count(.0.len(), "problem"), List(.0))]
    Input(Vec<TemplateError>),
    /// References that could not be resolved, each with the places that use it.
    #[error("{} could not be resolved:{}", count(.0.len(), "reference"), Unresolved(.0))]
    Unresolved(Vec<(Failure, Vec<String>)>),
    /// Templates that failed to render once their values were known.
    #[error("{} could not be rendered:{}", count(.0.len(), "template"), List(.0))]
    Render(Vec<TemplateError>),
    /// A file that could not be written, and what became of the others.
    #[error(transparent)]
    Output(OutputError),
    /// New outputs their check commands refused: nothing was written.
    #[error("{} refused by {}:{}\nnothing was written", count(.0.len(), "output"), if .0.len() == 1 { "its check" } else { "their checks" }, List(.0))]
    Refused(Vec<ConfigError>),
    /// A run that stopped before writing anything, and why.
    #[error("{0}\nnothing was written")]
    NothingWritten(Box<Error>),
    /// Something envrender needs could not be set up: signal handling, the
    /// command's start, a `*_FILE` secret, the health server's address.
    #[error("{0}")]
    Setup(ConfigError),
    /// `probe`: the endpoint did not answer 2xx, and why.
    #[error("not ready: {0}")]
    Unhealthy(String),
}

impl Error {
    /// The exit code the CLI contract gives this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Input(_) => 2,
            Error::Unresolved(_)
            | Error::Render(_)
            | Error::Output(_)
            | Error::Refused(_)
            | Error::Setup(_)
            | Error::Unhealthy(_) => 1,
            Error::NothingWritten(e) => e.exit_code(),
        }
    }
}

/// "1 problem", "2 problems".
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Items, one indented line each (an item's own lines indented alike).
struct List<'a, T>(&'a [T]);

impl<T: fmt::Display> fmt::Display for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in self.0 {
            for line in item.to_string().lines() {
                write!(f, "\n  {line}")?;
            }
        }
        Ok(())
    }
}

/// Each failure with its users and its error's lines.
struct Unresolved<'a>(&'a [(Failure, Vec<String>)]);

impl fmt::Display for Unresolved<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (failure, users) in self.0 {
            write!(f, "\n  {}", failure.reference)?;
            if !users.is_empty() {
                write!(f, "  (used by {})", users.join(", "))?;
            }
            for line in failure.error.to_string().lines() {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_lists_read_as_before() {
        let one = Error::Config(vec![ConfigError::new("a.toml", "bad").hint("fix it")]);
        assert_eq!(
            one.to_string(),
            "invalid configuration (1 problem):\n  a.toml: bad\n      hint: fix it"
        );
        let two = Error::Config(vec![ConfigError::new("a", "x"), ConfigError::new("b", "y")]);
        assert!(
            two.to_string()
                .starts_with("invalid configuration (2 problems):")
        );
        assert_eq!(one.exit_code(), 2);
        let setup = Error::Setup(ConfigError::new("envrender run", "cannot start x"));
        assert_eq!(setup.exit_code(), 1);
        assert_eq!(
            Error::NothingWritten(Box::new(setup)).to_string(),
            "envrender run: cannot start x\nnothing was written"
        );
    }
}
