//! envrender puts configuration and secrets into an application's container
//! and keeps them fresh.
//!
//! The data flow, one module per step:
//!
//! - [`cli`] and [`config`]: flags, `ENVRENDER_*` variables and the TOML file,
//!   validated into typed settings before anything runs.
//! - [`reference`]: the one grammar for naming a value (`ssm:/app/db#password`).
//! - [`template`]: Handlebars templates, compiled once; a discovery pass
//!   records the references a template needs without fetching anything.
//! - [`resolve`]: de-duplicates references into sources, groups them by
//!   backend, fetches concurrently with retries, applies fields and defaults,
//!   and keeps every failure.
//! - [`backend`]: where values come from. [`backend::local`] serves `file:`
//!   and `env:`.
//! - [`local_values`]: production references answered from a local file, so
//!   the same templates render with no server ("airplane mode").
//! - [`engine`]: plan → resolve → render, shared by every command.
//! - [`output`]: files written atomically, all of a run or none; env files.
//! - [`secret`]: the value type that never prints itself.
//! - [`shutdown`]: SIGTERM and SIGINT end every mode at any moment.
//! - [`container`]: `copy` and `probe`, for images that hold nothing else.
//! - [`app`]: the commands; [`error`]: their errors and exit codes;
//!   [`telemetry`]: logs.

// `FetchError` is large because it carries everything a person needs to fix a
// failure (action, resource, identity, hint). It is built on the cold path,
// once per failing reference; boxing it would cost clarity, not time.
#![allow(clippy::result_large_err)]

pub mod app;
pub mod backend;
pub mod cli;
pub mod config;
pub mod container;
pub mod engine;
pub mod environment;
pub mod error;
pub mod local_values;
pub mod output;
pub mod reference;
pub mod resolve;
pub mod run;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod template;
pub mod watch;
