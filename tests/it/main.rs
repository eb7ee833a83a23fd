//! envrender's integration tests, in one binary: the support code (the
//! Consul and Vault test servers, the AWS emulator and its proxy, the fault
//! proxy) compiles once instead of once per file. Each former `tests/*.rs`
//! is a module here, so `cargo test --test it aws::` runs what
//! `cargo test --test aws` ran.
//!
//! The modules share one process and run on parallel threads: a test must
//! not change process-wide state (the environment, the current directory,
//! the umask, signal dispositions, rlimits); it gives a child process what
//! it needs through that child's `Command` instead.

// Harness code: a panic is a failed run with its line.
#![allow(clippy::unwrap_used)]

// The harness calls libc where std has no API: prctl for the AWS
// emulator's death signal, wait4 for a child's peak memory.
#[allow(unsafe_code)]
mod support;

mod aws;
mod canary;
mod cli;
mod consul;
mod crash;
mod deploy;
mod docs_links;
mod faults;
mod hostile_local;
#[allow(unsafe_code)]
mod hostile_servers;
mod hostile_templates;
mod hygiene;
mod layers;
mod load;
mod malformed;
mod properties;
mod release;
mod run;
mod shutdown;
mod vault;
mod watch;
