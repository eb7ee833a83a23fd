//! The problem type of everything a person gave envrender: a configuration
//! file, a flag, an environment variable, a template path. Each says where
//! it is (file, line, column, or the flag's name) and how to fix it.

use std::fmt;

/// A problem with what was given, with where it is and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or the flag or variable the value came from.
    pub origin: String,
    /// The line in `origin`, counted from 1, when it is a file.
    pub line: Option<usize>,
    /// The column on that line, counted from 1.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n    hint: {h}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// A problem at `origin`, without a line or a hint.
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.into(),
            line: None,
            column: None,
            message: message.into(),
            hint: None,
        }
    }

    /// The problem with a hint on how to fix it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}
