//! Logs: to stderr, as text or JSON.
//!
//! The level applies to envrender's own events; every other crate is held at
//! `warn`, because HTTP and TLS libraries log headers and bodies at debug and
//! trace, and those carry tokens and secret values. envrender's own events
//! carry reference names, versions and counts, never values.

use std::io::IsTerminal as _;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How much is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Failures and what may become one.
    Warn,
    /// What was written and done (the default).
    Info,
    /// What was fetched and why.
    Debug,
    /// Everything, with the libraries' own lines.
    Trace,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people (the default).
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends logs to stderr: envrender's events at `level`, other crates' at
/// `warn`; text is coloured only on a terminal. Once per process: later
/// calls change nothing.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    // By target prefix, as `warn,envrender=LEVEL` would be in RUST_LOG's
    // syntax, without a directive parser.
    let filter = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("envrender", level);
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .finish()
            .with(filter)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .try_init(),
    };
    // Already initialised (tests running several commands in one process).
    let _ = result;
}
