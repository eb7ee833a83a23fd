//! The commands: settings from the configuration, the environment and flags,
//! then `get`, `render` or `check` over the engine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{Backends, OnFirstUse};
use crate::cli::{Cli, Command, OutputArgs};
use crate::config::{self, Config, ConfigError, LogFormat, LogLevel};
use crate::engine::{Plan, Resolution, Settings};
use crate::environment::Environment;
use crate::error::Error;
use crate::local_values::LocalValues;
use crate::output::{self, Status};
use crate::reference;
use crate::resolve::{FetchResults, Resolver};

/// How long `render` and `get` retry transient failures when nothing says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one command. Logging is set up here, once the configuration (which
/// may set the level) has been read.
pub async fn run(cli: Cli, env: Arc<dyn Environment>) -> Result<(), Error> {
    // Before anything is read or fetched, in every mode.
    let private = keep_private();
    // The container helpers read no configuration.
    match &cli.command {
        Some(Command::Copy { dest }) => {
            init_logs(&cli, None);
            report_private(private);
            return crate::container::copy_self(dest).map(drop);
        }
        Some(Command::Probe { target, timeout }) => {
            init_logs(&cli, None);
            report_private(private);
            return crate::container::probe(&crate::container::probe_url(target)?, *timeout).await;
        }
        _ => {}
    }
    let config = load_config(cli.config.as_deref())?;
    init_logs(&cli, Some(&config));
    report_private(private);
    if let Some(file) = &config.file {
        tracing::debug!(config = %file.display(), "configuration loaded");
    }
    let mut backends = Backends::local(env.clone());
    let aws = crate::backend::aws::register(&mut backends, config.aws.clone(), env.as_ref());
    // Built on first use: a run with no Consul or Vault reference never
    // builds their HTTP clients.
    let consul: Arc<dyn crate::backend::Backend> = {
        let (config, env) = (config.consul.clone(), env.clone());
        Arc::new(OnFirstUse::new("consul", move || {
            crate::backend::consul::Consul::new(config, env.as_ref())
                .map(|c| Arc::new(c) as Arc<dyn crate::backend::Backend>)
        }))
    };
    backends.insert(crate::reference::Scheme::Consul, consul.clone());
    backends.insert(crate::reference::Scheme::Service, consul);
    let vault: Arc<dyn crate::backend::Backend> = {
        let (config, env) = (config.vault.clone(), env.clone());
        Arc::new(OnFirstUse::new("vault", move || {
            crate::backend::vault::Vault::new(config, env.as_ref(), Some(aws))
                .map(|v| Arc::new(v) as Arc<dyn crate::backend::Backend>)
        }))
    };
    backends.insert(crate::reference::Scheme::Vault, vault);
    let mut resolver = Resolver::new(backends);
    if let Some(path) = cli.values.as_ref().or(config.local_values.as_ref()) {
        let mut local = LocalValues::load(path).map_err(|e| Error::Config(vec![e]))?;
        local.fallthrough = config.local_fallthrough;
        tracing::debug!(file = %path.display(), values = local.count(), "local values loaded");
        resolver = resolver.with_local_values(local);
    }
    let command = match (cli.command, cli.exec) {
        (Some(c), exec) if exec.is_empty() => c,
        // `envrender -- CMD` is `envrender run -- CMD`: parsed as such, so it
        // gets run's defaults and its ENVRENDER_* variables.
        (None, exec) if !exec.is_empty() => {
            let argv = ["envrender", "run", "--"].map(String::from).into_iter();
            match <Cli as clap::Parser>::try_parse_from(argv.chain(exec)) {
                Ok(Cli {
                    command: Some(run @ Command::Run(_)),
                    ..
                }) => run,
                Ok(_) => unreachable!("`run --` parses as the run command"),
                Err(e) => {
                    return Err(Error::Config(vec![ConfigError::new(
                        "envrender -- CMD",
                        e.to_string().trim().to_string(),
                    )]));
                }
            }
        }
        _ => {
            return Err(Error::Config(vec![
                ConfigError::new("envrender", "no command given").hint(
                    "use get, render, check, watch, run -- CMD, or -- CMD; see envrender --help",
                ),
            ]));
        }
    };
    match command {
        Command::Run(args) => {
            let timeout = timeout_of(&args.timeout, &config);
            let mut env = config.env.clone();
            let process_env: Vec<(std::ffi::OsString, std::ffi::OsString)> =
                std::env::vars_os().collect();
            let references =
                crate::run::env_references(process_env.iter().filter_map(|(k, v)| {
                    Some((k.to_str()?.to_string(), v.to_str()?.to_string()))
                }))?;
            for (name, value) in references {
                env.retain(|(n, _)| *n != name);
                env.push((name, value));
            }
            let mut templates = config.templates.clone();
            for flag in &args.outputs.templates {
                templates
                    .push(config::parse_template_flag(flag).map_err(|e| Error::Config(vec![e]))?);
            }
            let settings = Settings {
                templates,
                env,
                env_files: config.env_files.clone(),
                output_root: args.outputs.output_root.clone(),
                timeout,
                limits: limits(&config),
            };
            let run = crate::run::RunSettings {
                argv: args.command,
                stop_signal: args.stop_signal,
                grace: args.grace,
                subreaper: args.subreaper,
                supervise: args.supervise || args.subreaper,
                keep_env: args.keep_env,
                secrets_dir: args.secrets_dir,
                refresh: match (args.reload_signal, args.restart) {
                    (Some(sig), _) => Some(crate::run::Refresh::Reload(sig)),
                    (None, true) => Some(crate::run::Refresh::Restart),
                    (None, false) => None,
                },
                wait: args.wait.unwrap_or_default(),
                listen: args.listen,
                restart_on_exit: args.restart_on_exit,
                splay: args.splay,
            };
            let code = crate::run::run(&resolver, &settings, &run, process_env).await?;
            Err(Error::Exit(code))
        }
        Command::Get { reference, timeout } => {
            let timeout = timeout.or(config.timeout).unwrap_or(DEFAULT_TIMEOUT);
            let text = until_stopped(get(&resolver, &reference, timeout)).await?;
            println!("{text}");
            Ok(())
        }
        Command::Render(args) => {
            let timeout = args.timeout.or(config.timeout).unwrap_or(DEFAULT_TIMEOUT);
            let settings = settings(&config, &args.outputs, timeout)?;
            until_stopped(render(&resolver, &settings)).await
        }
        Command::Watch(args) => {
            let timeout = args
                .render
                .timeout
                .or(config.timeout)
                .unwrap_or(DEFAULT_TIMEOUT);
            let settings = settings(&config, &args.render.outputs, timeout)?;
            let options = watch_settings(&args)?;
            let config_path = cli.config.clone();
            let outputs = args.render.outputs;
            let reload = move || {
                let config = load_config(config_path.as_deref())?;
                let timeout = timeout_of(&args.render.timeout, &config);
                self::settings(&config, &outputs, timeout)
            };
            crate::watch::watch(&resolver, settings, options, reload).await
        }
        Command::Copy { .. } | Command::Probe { .. } => {
            unreachable!("copy and probe return before the configuration is read")
        }
        Command::Check(args) => {
            let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let settings = settings(&config, &args, timeout)?;
            let (report, result) = until_stopped(check(&resolver, &settings, &config)).await?;
            print!("{report}");
            result
        }
    }
}

/// `work` (a one-shot command), or exit 128+N on signal N (SIGTERM,
/// SIGINT) with nothing written: the render is dropped at an await, and
/// outputs are committed between two awaits, whole. As PID 1 (an init
/// container) SIGTERM would otherwise be ignored until the deadline.
async fn until_stopped<T>(
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let mut stop = crate::shutdown::Stop::listen()?;
    match stop.or_stop(work).await {
        Ok(out) => out,
        Err(sig) => {
            tracing::warn!(signal = %sig, "stopped; nothing was written");
            Err(Error::Exit(crate::shutdown::exit_code(sig)))
        }
    }
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

fn timeout_of(flag: &Option<Duration>, config: &Config) -> Duration {
    flag.or(config.timeout).unwrap_or(DEFAULT_TIMEOUT)
}

/// The actions and timing of `watch`, from its flags.
fn watch_settings(args: &crate::cli::WatchArgs) -> Result<crate::watch::WatchSettings, Error> {
    use crate::watch::Action;
    let usage = |message: &str, hint: &str| {
        Error::Config(vec![
            ConfigError::new("envrender watch", message).hint(hint),
        ])
    };
    let mut actions = Vec::new();
    if let Some(a) = crate::watch::signal_action(
        args.signal,
        args.pid_file.clone(),
        args.process_name.clone(),
    )
    .map_err(|e| {
        usage(
            &format!("--signal, --pid-file, --process-name: {e}"),
            "e.g. --signal SIGHUP --process-name nginx",
        )
    })? {
        actions.push(a);
    }
    if let Some(cmd) = &args.exec {
        let argv = shlex::split(cmd).filter(|a| !a.is_empty()).ok_or_else(|| {
            usage(
                &format!("--exec \"{cmd}\" is not a command line (unbalanced quotes?)"),
                "e.g. --exec 'nginx -s reload'",
            )
        })?;
        actions.push(Action::Exec {
            argv,
            timeout: args.exec_timeout,
        });
    }
    if let Some(url) = &args.http {
        actions.push(crate::watch::http_action(url).map_err(|e| {
            usage(
                &format!("--http: {e}"),
                "e.g. --http http://127.0.0.1:9090/-/reload",
            )
        })?);
    }
    Ok(crate::watch::WatchSettings {
        wait: args.wait.unwrap_or_default(),
        actions,
        listen: args.listen,
        keep_env: args.keep_env.clone(),
    })
}

/// The configuration file: the one given, or `./envrender.toml` if it exists,
/// or none.
pub fn load_config(path: Option<&Path>) -> Result<Config, Error> {
    match path {
        Some(p) => config::load(p).map_err(Error::Config),
        None if Path::new(config::DEFAULT_FILE).is_file() => {
            config::load(Path::new(config::DEFAULT_FILE)).map_err(Error::Config)
        }
        None => Ok(Config::default()),
    }
}

/// The template limits the configuration sets.
fn limits(config: &Config) -> crate::template::Limits {
    let mut limits = crate::template::Limits::default();
    if let Some(max) = config.max_output {
        limits.max_output = max;
    }
    limits
}

/// The configuration with the command's flags laid over it.
pub fn settings(config: &Config, args: &OutputArgs, timeout: Duration) -> Result<Settings, Error> {
    let mut templates = config.templates.clone();
    let mut errors = Vec::new();
    for flag in &args.templates {
        match config::parse_template_flag(flag) {
            Ok(t) => templates.push(t),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Error::Config(errors));
    }
    let settings = Settings {
        templates,
        env: config.env.clone(),
        env_files: config.env_files.clone(),
        output_root: args.output_root.clone(),
        timeout,
        limits: limits(config),
    };
    if settings.templates.is_empty() && settings.env_files.is_empty() {
        return Err(Error::Config(vec![
            ConfigError::new(
                config
                    .file
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_else(|| "envrender".into()),
                "nothing to render: no templates and no env files",
            )
            .hint("add [[template]] or [[env_file]] to the configuration, or pass --template SRC:DEST"),
        ]));
    }
    Ok(settings)
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
    let statuses = output::commit(&writes).map_err(Error::Output)?;
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

/// `envrender check`: the report for stdout, and the run's outcome.
pub async fn check(
    resolver: &Resolver,
    settings: &Settings,
    config: &Config,
) -> Result<(String, Result<(), Error>), Error> {
    let plan = Plan::new(settings)?;
    let resolution = plan
        .resolve(resolver, Instant::now() + settings.timeout)
        .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration: {}",
        config
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "none (flags only)".into())
    );
    references_report(&mut out, resolver, &resolution);
    let result = match plan.outputs(&resolution) {
        Ok(writes) => match output::preview(&writes) {
            Ok(statuses) => {
                let _ = writeln!(out, "\noutputs (nothing written):");
                for (w, status) in writes.iter().zip(statuses) {
                    let verb = match status {
                        Status::Created => "would create",
                        Status::Updated => "would update",
                        Status::Attributes => "would fix mode/owner of",
                        Status::Unchanged => "unchanged",
                    };
                    let _ = writeln!(
                        out,
                        "  {verb:<24} {}  (from {}, mode {:04o}, {} bytes)",
                        w.path.display(),
                        w.origin,
                        w.mode,
                        w.contents.len()
                    );
                }
                Ok(())
            }
            Err(e) => Err(Error::Output(e)),
        },
        Err(e) => Err(e),
    };
    Ok((out, result))
}

fn references_report(out: &mut String, resolver: &Resolver, resolution: &Resolution) {
    let failed: BTreeMap<_, _> = resolution
        .failures
        .iter()
        .map(|f| (&f.reference, &f.error))
        .collect();
    let _ = writeln!(out, "\nreferences ({}):", resolution.users.len());
    for (r, users) in &resolution.users {
        let fetched = resolution.fetched.get(&r.source);
        // Missing: the source, or the field inside it.
        let missing = match fetched {
            Some(Err(_)) => true,
            Some(Ok(f)) => r.field.as_ref().is_some_and(|field| {
                crate::resolve::select_field(f.value.expose(), field)
                    .is_err_and(|e| e.kind == crate::backend::ErrorKind::NotFound)
            }),
            None => false,
        };
        let state = match (resolution.values.get(r), failed.get(r), fetched) {
            (Some(_), _, _) if missing && r.default.is_some() => {
                "missing, default used".to_string()
            }
            (Some(_), _, _) if missing => "missing, optional".to_string(),
            (Some(v), _, fetched) => {
                let mut s = format!("ok      {}", v.describe());
                if resolver.serves_locally(&r.source) {
                    s.push_str(" (local values)");
                } else if let Some(Ok(crate::backend::Fetched {
                    version: Some(version),
                    ..
                })) = fetched
                {
                    let _ = write!(s, " (version {version})");
                }
                s
            }
            (None, Some(e), _) => format!("FAILED  {}", e.to_string().replace('\n', "; ")),
            (None, None, _) => "not fetched".to_string(),
        };
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "  {r}\n      {state}\n      used by {}",
            users.join(", ")
        );
    }
    // The requests, per backend, as the backends would batch them.
    let mut by_scheme: BTreeMap<_, Vec<_>> = BTreeMap::new();
    let (mut local, mut missing) = (0, 0);
    for source in resolution.fetched.keys() {
        if resolver.serves_locally(source) {
            local += 1;
        } else if resolver.answers_locally(source) {
            missing += 1;
        } else {
            by_scheme
                .entry(source.scheme)
                .or_default()
                .push(source.clone());
        }
    }
    let _ = writeln!(out, "\nrequests:");
    if local + missing > 0 {
        let _ = writeln!(
            out,
            "  local values file: {local} value{}{}",
            if local == 1 { "" } else { "s" },
            if missing > 0 {
                format!(", {missing} not in it")
            } else {
                String::new()
            }
        );
    }
    let mut watches: Vec<String> = Vec::new();
    for (scheme, mut sources) in by_scheme {
        sources.sort();
        let Ok(backend) = resolver.backends().get(scheme) else {
            let _ = writeln!(
                out,
                "  {scheme}: no backend configured ({} source{} not fetched)",
                sources.len(),
                if sources.len() == 1 { "" } else { "s" }
            );
            continue;
        };
        let mut counts: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
        for call in backend.plan(&sources) {
            *counts.entry((call.target, call.action)).or_default() += 1;
        }
        let calls: Vec<String> = counts
            .into_iter()
            .map(|((target, action), n)| match target {
                Some(t) => format!("{n} × {action} ({t})"),
                None => format!("{n} × {action}"),
            })
            .collect();
        let _ = writeln!(out, "  {}: {}", backend.name(), calls.join(", "));
        watches.extend(
            backend
                .watches(&sources)
                .into_iter()
                .map(|w| format!("{}: {w}", backend.name())),
        );
    }
    if !watches.is_empty() {
        let _ = writeln!(out, "\nwatches (in watch mode):");
        for w in watches {
            let _ = writeln!(out, "  {w}");
        }
    }
}
