//! Settings from the configuration and the flags: what to render (the
//! same for every command), how `watch` acts and how `run` runs its command.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::cli::{OutputArgs, RunArgs, WatchArgs};
use crate::config::{self, Config};
use crate::engine::Settings;
use crate::error::Error;
use crate::problem::ConfigError;
use crate::run::{Refresh, RunSettings};
use crate::watch::WatchSettings;

/// How long `render` and `get` retry transient failures when nothing says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The timeout a flag gives, else the configuration's, else the default.
pub fn timeout_of(flag: &Option<Duration>, config: &Config) -> Duration {
    flag.or(config.timeout).unwrap_or(DEFAULT_TIMEOUT)
}

/// The settings of `run`: the configuration's `[env]` with the process's
/// variables that are references laid over it, and how the app is run.
pub fn run_settings(
    config: &Config,
    args: RunArgs,
    process_env: &[(OsString, OsString)],
) -> Result<(Settings, RunSettings), Error> {
    let timeout = timeout_of(&args.timeout, config);
    let mut settings = settings_of(config, &args.outputs, timeout)?;
    overlay_environment(&mut settings, process_env, &args.keep_env)?;
    let run = RunSettings {
        argv: args.command,
        stop_signal: args.stop_signal,
        grace: args.grace,
        subreaper: args.subreaper,
        supervise: args.supervise || args.subreaper,
        keep_env: args.keep_env,
        secrets_dir: args.secrets_dir,
        refresh: match (args.reload_signal, args.restart) {
            (Some(sig), _) => Some(Refresh::Reload(sig)),
            (None, true) => Some(Refresh::Restart),
            (None, false) => None,
        },
        wait: args.wait.unwrap_or_default(),
        listen: args.listen,
        restart_on_exit: args.restart_on_exit,
        splay: args.splay,
    };
    Ok((settings, run))
}

/// Lays the process's environment over `[env]`, as `run` gives it to its
/// command. A variable set in the environment wins over the same name in
/// `[env]`, whatever its value: an operator's override in a task definition
/// is what the app gets (resolved first when it is a reference).
/// envrender's own credentials are not the app's: `[env]` keeps those names
/// unless `keep_env` passes the environment's. Returns the names of
/// `[env]` the environment set to values of its own.
fn overlay_environment(
    settings: &mut Settings,
    process_env: &[(OsString, OsString)],
    keep_env: &[String],
) -> Result<Vec<String>, Error> {
    let references = crate::supervise::env::env_references(
        process_env
            .iter()
            .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v.to_str()?.to_string()))),
    )?;
    let overridden = |name: &str| {
        let own = crate::environment::BACKEND_CREDENTIALS.contains(&name)
            && !keep_env.iter().any(|k| k == name);
        !own && process_env.iter().any(|(k, _)| k.to_str() == Some(name))
    };
    let mut replaced = Vec::new();
    settings.env.retain(|(n, _)| {
        let keep = !overridden(n);
        if !keep {
            replaced.push(n.clone());
        }
        keep
    });
    for (name, value) in references {
        replaced.retain(|n| *n != name);
        settings.env.retain(|(n, _)| *n != name);
        settings.env.push((name, value));
    }
    Ok(replaced)
}

/// The settings `check` checks: what `render` would write, and the
/// environment `run` would give its command (`[env]` with the process's
/// variables laid over it, references held in variables included), so that
/// a wrapper's configuration is checked as it will run. Also returns the
/// names of `[env]` the environment overrides with values of its own.
pub fn check_settings(
    config: &Config,
    args: &OutputArgs,
    timeout: Duration,
    process_env: &[(OsString, OsString)],
) -> Result<(Settings, Vec<String>), Error> {
    let mut settings = settings_of(config, args, timeout)?;
    let overridden = overlay_environment(&mut settings, process_env, &[])?;
    if settings.templates.is_empty()
        && settings.env_files.is_empty()
        && settings.env.is_empty()
        && overridden.is_empty()
    {
        return Err(nothing_to(
            config,
            "nothing to check: no templates, no env files, no [env] and no references in the environment",
            "add [[template]], [[env_file]] or [env] to the configuration, pass --template SRC:DEST, or set a variable to a reference (DB_PASSWORD=ssm:/app/db/password)",
        ));
    }
    Ok((settings, overridden))
}

/// The error of a command given nothing to do.
fn nothing_to(config: &Config, message: &str, hint: &str) -> Error {
    Error::Config(vec![
        ConfigError::new(
            config
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "envrender".into()),
            message,
        )
        .hint(hint),
    ])
}

/// The actions and timing of `watch`, from its flags.
pub fn watch_settings(args: &WatchArgs) -> Result<WatchSettings, Error> {
    use crate::action::Action;
    let usage = |message: &str, hint: &str| {
        Error::Config(vec![
            ConfigError::new("envrender watch", message).hint(hint),
        ])
    };
    let mut actions = Vec::new();
    if let Some(a) = crate::action::signal_action(
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
        actions.push(crate::action::http_action(url).map_err(|e| {
            usage(
                &format!("--http: {e}"),
                "e.g. --http http://127.0.0.1:9090/-/reload",
            )
        })?);
    }
    Ok(WatchSettings {
        wait: args.wait.unwrap_or_default(),
        splay: args.splay,
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

/// The configuration with the command's flags laid over it.
fn settings_of(config: &Config, args: &OutputArgs, timeout: Duration) -> Result<Settings, Error> {
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
    let mut limits = crate::template::Limits::default();
    if let Some(max) = config.max_output {
        limits.max_output = max;
    }
    Ok(Settings {
        templates,
        env: config.env.clone(),
        env_files: config.env_files.clone(),
        output_root: args.output_root.clone(),
        linked_dirs: config.linked_dirs.clone(),
        timeout,
        limits,
    })
}

/// [`settings_of`], for a command that must have something to render.
pub fn render_settings(
    config: &Config,
    args: &OutputArgs,
    timeout: Duration,
) -> Result<Settings, Error> {
    let settings = settings_of(config, args, timeout)?;
    if settings.templates.is_empty() && settings.env_files.is_empty() {
        return Err(nothing_to(
            config,
            "nothing to render: no templates and no env files",
            "add [[template]] or [[env_file]] to the configuration, or pass --template SRC:DEST",
        ));
    }
    Ok(settings)
}
