//! The commands: settings from the configuration, the environment and flags,
//! then `get`, `render`, `check`, `watch` or `run`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

mod settings;

use crate::backend::{Backends, Release};
use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::engine::{Plan, Settings};
use crate::environment::Environment;
use crate::error::Error;
use crate::local_values::LocalValues;
use crate::output::Status;
use crate::problem::ConfigError;
use crate::reference;
use crate::resolve::{FetchResults, Resolver};
use crate::shutdown::Stop;
use crate::telemetry::{LogFormat, LogLevel};
use settings::{
    DEFAULT_TIMEOUT, check_settings, load_config, render_settings, run_settings, timeout_of,
    watch_settings,
};

/// Writes `bytes` to stdout (the output of `completions` and `manpage`).
fn print(bytes: &[u8]) -> Result<u8, Error> {
    use std::io::Write as _;
    std::io::stdout().write_all(bytes).map(|()| 0).map_err(|e| {
        Error::Setup(ConfigError::new(
            "envrender",
            format!("cannot write to stdout: {e}"),
        ))
    })
}

/// Runs one command; returns the exit code of a success (`run`: the
/// app's; 128+N when stop signal N ended the command). Logging is set up
/// here, once the configuration (which may set the level) has been read.
pub async fn run(cli: Cli, env: Arc<dyn Environment>) -> Result<u8, Error> {
    // Before anything is read or fetched, in every mode.
    let private = keep_private();
    // The container helpers read no configuration.
    match &cli.command {
        Some(Command::Copy { dest }) => {
            init_logs(&cli, None);
            report_private(private);
            return crate::container::copy_self(dest).map(|_| 0);
        }
        Some(Command::Probe { target, timeout }) => {
            init_logs(&cli, None);
            report_private(private);
            let url = crate::container::probe_url(target)?;
            return crate::container::probe(&url, *timeout).await.map(|_| 0);
        }
        Some(Command::Completions { shell }) => {
            return print(&crate::cli::completions(*shell));
        }
        Some(Command::Manpage) => {
            let page = crate::cli::manpage()
                .map_err(|e| Error::Setup(ConfigError::new("envrender manpage", e.to_string())))?;
            return print(&page);
        }
        _ => {}
    }
    let config = load_config(cli.config.as_deref())?;
    init_logs(&cli, Some(&config));
    report_private(private);
    if let Some(file) = &config.file {
        tracing::debug!(config = %file.display(), "configuration loaded");
    }
    // As PID 1 (an init container, `run` as entrypoint) a SIGTERM without a
    // handler is never delivered: every command listens from its start,
    // and gives up what it is waiting on when one comes. Outputs are
    // committed between two awaits, whole or not at all.
    let mut stop = Stop::listen()?;
    let resolver = resolver(&cli, &config, env.clone())?;
    let config_path = cli.config.clone();
    match command(cli.command, cli.exec)? {
        Command::Run(args) => {
            let process_env = env.vars_os();
            let (settings, run) = run_settings(&config, args, &process_env)?;
            let outcome = crate::run::run(&resolver, settings, &run, process_env, stop).await;
            // The command has exited (or never started): what was issued
            // for it is of no further use.
            let why = if outcome.is_ok() {
                Release::Stopped
            } else {
                Release::Failed
            };
            resolver.backends().release(why).await;
            outcome
        }
        Command::Get { reference, timeout } => {
            let timeout = timeout_of(&timeout, &config);
            match stop.or_stop(get(&resolver, &reference, timeout)).await {
                Ok(text) => println!("{}", text?),
                Err(sig) => return Ok(stopped(sig)),
            }
            Ok(0)
        }
        Command::Render(args) => {
            let timeout = timeout_of(&args.timeout, &config);
            let settings = render_settings(&config, &args.outputs, timeout)?;
            let outcome = stop.or_stop(render(&resolver, &settings)).await;
            if !matches!(outcome, Ok(Ok(()))) {
                // Nothing was written: what the render issued reaches no
                // output.
                resolver.backends().release(Release::Failed).await;
            }
            match outcome {
                Ok(outcome) => outcome.map(|()| 0),
                Err(sig) => Ok(stopped(sig)),
            }
        }
        Command::Watch(args) => {
            let timeout = timeout_of(&args.render.timeout, &config);
            let settings = render_settings(&config, &args.render.outputs, timeout)?;
            let options = watch_settings(&args)?;
            let outputs = args.render.outputs;
            let reload = move || {
                let config = load_config(config_path.as_deref())?;
                let timeout = timeout_of(&args.render.timeout, &config);
                render_settings(&config, &outputs, timeout)
            };
            crate::watch::watch(&resolver, settings, options, reload, stop)
                .await
                .map(|()| 0)
        }
        Command::Check(args) => {
            let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let (settings, overridden) = check_settings(&config, &args, timeout, &env.vars_os())?;
            let check =
                crate::check::check(&resolver, &settings, &overridden, config.file.as_deref());
            match stop.or_stop(check).await {
                Ok(outcome) => {
                    let (report, result) = outcome?;
                    print!("{report}");
                    result.map(|()| 0)
                }
                Err(sig) => Ok(stopped(sig)),
            }
        }
        Command::Copy { .. }
        | Command::Probe { .. }
        | Command::Completions { .. }
        | Command::Manpage => {
            unreachable!(
                "copy, probe, completions and manpage return before the configuration is read"
            )
        }
    }
}

/// The command to run: the subcommand, or `envrender -- CMD`, which is
/// `envrender run -- CMD`, parsed as such, so that it gets run's defaults
/// and its `ENVRENDER_*` variables.
fn command(command: Option<Command>, exec: Vec<String>) -> Result<Command, Error> {
    match (command, exec) {
        (Some(c), exec) if exec.is_empty() => Ok(c),
        (None, exec) if !exec.is_empty() => {
            let argv = ["envrender", "run", "--"].map(String::from).into_iter();
            match <Cli as clap::Parser>::try_parse_from(argv.chain(exec)) {
                Ok(Cli {
                    command: Some(run @ Command::Run(_)),
                    ..
                }) => Ok(run),
                Ok(_) => unreachable!("`run --` parses as the run command"),
                Err(e) => Err(Error::Config(vec![ConfigError::new(
                    "envrender -- CMD",
                    e.to_string().trim().to_string(),
                )])),
            }
        }
        _ => Err(Error::Config(vec![
            ConfigError::new("envrender", "no command given")
                .hint("use get, render, check, watch, run -- CMD, or -- CMD; see envrender --help"),
        ])),
    }
}

/// The backends the configuration sets up, and a local values file if one
/// is given.
fn resolver(cli: &Cli, config: &Config, env: Arc<dyn Environment>) -> Result<Resolver, Error> {
    let backends = Backends::build(
        config.aws.clone(),
        config.consul.clone(),
        config.vault.clone(),
        env,
    );
    let mut resolver = Resolver::new(backends);
    if let Some(path) = cli.values.as_ref().or(config.local_values.as_ref()) {
        let mut local = LocalValues::load(path).map_err(|e| Error::Config(vec![e]))?;
        local.fallthrough = config.local_fallthrough;
        tracing::debug!(file = %path.display(), values = local.count(), "local values loaded");
        resolver = resolver.with_local_values(local);
    }
    Ok(resolver)
}

/// A command ended by stop signal `sig`: 128+N, nothing written.
fn stopped(sig: nix::sys::signal::Signal) -> u8 {
    tracing::warn!(signal = %sig, "stopped; nothing was written");
    crate::shutdown::exit_code(sig)
}

/// Every mode holds a token or values at some point: `render`, `check` and
/// `get` briefly, `watch` and `run` for as long as they run. Not dumpable,
/// the process's /proc entries (environ, memory, root) are root's, so
/// another process of the same user — the app, in a shared PID namespace —
/// cannot read them; and an abort leaves no core dump. (The app itself,
/// once exec'd, is dumpable again.) Called first thing; the outcome is
/// logged once logging is set up.
fn keep_private() -> nix::Result<()> {
    nix::sys::prctl::set_dumpable(false)
}

fn report_private(outcome: nix::Result<()>) {
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "cannot make this process undumpable; /proc/<pid>/environ stays readable by the same user, and a crash may leave a core dump");
    }
}

fn init_logs(cli: &Cli, config: Option<&Config>) {
    crate::telemetry::init(
        cli.log_level
            .or(config.and_then(|c| c.log_level))
            .unwrap_or(LogLevel::Info),
        cli.log_format
            .or(config.and_then(|c| c.log_format))
            .unwrap_or(LogFormat::Text),
    );
}

/// `envrender get REF`: the value as text; a map or list as pretty JSON.
pub async fn get(resolver: &Resolver, text: &str, timeout: Duration) -> Result<String, Error> {
    let r = reference::parse(text)
        .map_err(|e| Error::Config(vec![ConfigError::new("envrender get", e.to_string())]))?;
    let mut results = FetchResults::new();
    resolver
        .fetch([r.source.clone()], &mut results, Instant::now() + timeout)
        .await;
    let (mut values, failures) = Resolver::select_all([&r], &results);
    if let Some(f) = failures.into_iter().next() {
        return Err(Error::Unresolved(vec![(f, Vec::new())]));
    }
    let value = values.remove(&r).unwrap_or_default().into_exposed();
    Ok(match &value {
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
            serde_json::to_string_pretty(&value).unwrap_or_default()
        }
        v => crate::secret::to_text(v),
    })
}

/// `envrender render`: every output written, or none.
pub async fn render(resolver: &Resolver, settings: &Settings) -> Result<(), Error> {
    let started = Instant::now();
    let plan = Plan::new(settings)?;
    plan.remove_interrupted_writes();
    let resolution = plan.resolve(resolver, started + settings.timeout).await?;
    let writes = plan
        .outputs(&resolution)
        .map_err(|e| Error::NothingWritten(Box::new(e)))?;
    let statuses = crate::action::commit_checked(&writes).await?;
    let mut written = 0;
    for (w, status) in writes.iter().zip(&statuses) {
        if *status != Status::Unchanged {
            written += 1;
        }
        tracing::info!(
            path = %w.path.display(),
            from = %w.origin,
            mode = %format_args!("{:04o}", w.mode),
            bytes = w.contents.len(),
            "{status}"
        );
    }
    tracing::info!(
        outputs = writes.len(),
        written,
        references = resolution.users.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "render complete"
    );
    Ok(())
}
