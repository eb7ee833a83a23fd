//! envrender puts configuration and secrets into an application's container
//! and keeps them fresh.
//!
//! Data flows one way, and each step only imports the steps below it:
//!
//! - settings: [`cli`] (flags and `ENVRENDER_*` variables) and [`config`]
//!   (the TOML file), validated before anything runs; [`app`] lays them
//!   together and starts a command.
//! - plan: [`engine`] reads and compiles the [`template`]s and checks every
//!   [`reference`] written in the configuration.
//! - resolve: [`resolve`] fetches what the plan needs from the
//!   [`backend`]s (or a [`local_values`] file), with retries and every
//!   failure kept.
//! - render and write: [`engine`] renders the outputs; [`output`] writes
//!   them atomically, all of a run or none.
//! - act: [`check`] reports instead of writing; [`watch`] renders again
//!   when values change and runs [`action`]s; [`run`] hands the values to
//!   a command that [`supervise`] keeps running.
//!
//! Beside the flow: [`secret`] (the value type that never prints itself),
//! [`problem`] and [`error`] (what went wrong, and exit codes),
//! [`health`] (readiness and metrics), [`shutdown`] (SIGTERM and SIGINT in
//! every mode), [`backoff`], [`environment`], [`telemetry`] (logs) and
//! [`container`] (`copy` and `probe`, for images that hold nothing else).

// `FetchError` is large because it carries everything a person needs to fix a
// failure (action, resource, identity, hint). It is built on the cold path,
// once per failing reference; boxing it would cost clarity, not time.
#![allow(clippy::result_large_err)]

pub mod action;
pub mod app;
pub mod backend;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod config;
pub mod container;
pub mod engine;
pub mod environment;
pub mod error;
pub mod health;
pub mod local_values;
pub mod output;
pub mod problem;
pub mod reference;
pub mod resolve;
pub mod run;
pub mod secret;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod template;
pub mod watch;
