//! The errors a command ends with, and their exit codes.
//!
//! Exit codes are part of the CLI contract: 1 when a value could not be
//! resolved, rendered or written; 2 for invalid usage or input (configuration,
//! template or reference syntax), which is always found before any network
//! call. Each error lists every problem of its kind, not only the first.

use std::fmt;

use crate::config::ConfigError;
use crate::output::OutputError;
use crate::resolve::Failure;
use crate::template::TemplateError;

#[derive(Debug)]
pub enum Error {
    /// Invalid configuration or flags.
    Config(Vec<ConfigError>),
    /// Templates that do not compile, reference syntax errors, and template
    /// errors found before anything was fetched.
    Input(Vec<TemplateError>),
    /// References that could not be resolved, each with the places that use it.
    Unresolved(Vec<(Failure, Vec<String>)>),
    /// Templates that failed to render once their values were known.
    Render(Vec<TemplateError>),
    /// A file that could not be written, and what became of the others.
    Output(OutputError),
    /// A run that stopped before writing anything, and why.
    NothingWritten(Box<Error>),
    /// `run`: the app exited with this code (128+N when killed by signal N).
    Exit(u8),
    /// `probe`: the endpoint did not answer 2xx, and why.
    Unhealthy(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Input(_) => 2,
            Error::Unresolved(_) | Error::Render(_) | Error::Output(_) | Error::Unhealthy(_) => 1,
            Error::NothingWritten(e) => e.exit_code(),
            Error::Exit(code) => *code,
        }
    }
}

fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for item in items {
        for line in item.to_string().lines() {
            write!(f, "\n  {line}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Exit(code) => write!(f, "the command exited with {code}"),
            Error::Config(errors) => {
                write!(
                    f,
                    "invalid configuration ({} problem{}):",
                    errors.len(),
                    plural(errors.len())
                )?;
                list(f, errors)
            }
            Error::Input(errors) => {
                write!(
                    f,
                    "invalid template input ({} problem{}):",
                    errors.len(),
                    plural(errors.len())
                )?;
                list(f, errors)
            }
            Error::Render(errors) => {
                write!(
                    f,
                    "{} template{} could not be rendered:",
                    errors.len(),
                    plural(errors.len())
                )?;
                list(f, errors)
            }
            Error::Unresolved(failures) => {
                write!(
                    f,
                    "{} reference{} could not be resolved:",
                    failures.len(),
                    plural(failures.len())
                )?;
                for (failure, users) in failures {
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
            Error::Output(e) => write!(f, "{e}"),
            Error::Unhealthy(why) => write!(f, "not ready: {why}"),
            Error::NothingWritten(e) => write!(f, "{e}\nnothing was written"),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl std::error::Error for Error {}
