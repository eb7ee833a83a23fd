//! Logs: to stderr, as text or JSON.
//!
//! The level applies to envrender's own events; every other crate is held at
//! `warn`, because HTTP and TLS libraries log headers and bodies at debug and
//! trace, and those carry tokens and secret values. envrender's own events
//! carry reference names, versions and counts, never values.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let filter = EnvFilter::new(format!("warn,vaultrs=off,rustify=off,envrender={level}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already initialised (tests running several commands in one process).
    let _ = result;
}
