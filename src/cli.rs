//! The command line. The command names and the flags in DESIGN.md's CLI
//! contract are fixed: scripts and manifests depend on them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::{LogFormat, LogLevel};

/// The version and the commit it was built from (`--version`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ENVRENDER_COMMIT"),
    ")"
);

/// The top-level help's examples, one per mode, and the exit codes.
const AFTER_HELP: &str = "\
Examples:
  envrender render --config envrender.toml           # init container: render once, exit
  envrender watch --signal SIGHUP --process-name nginx --listen 0.0.0.0:8080
                                                      # sidecar: keep the files fresh
  DB_PASSWORD=ssm:/app/db/password envrender -- ./server
                                                      # wrapper: resolve the environment, run the app
  envrender check                                     # what a render would do, nothing written
  envrender get vault:secret/app#api_key              # one value

Exit codes: 0 success; 1 a value could not be resolved, rendered or written; 2 invalid usage or input.";

/// The whole command line: global flags, then a subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "envrender",
    version = VERSION,
    about = "Renders configuration and secrets from Consul, Vault, AWS and local files into files and environment variables.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Configuration file [default: ./envrender.toml when it exists].
    #[arg(long, global = true, env = "ENVRENDER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Answer the references that are keys of this YAML/JSON/TOML file from
    /// it, before asking any backend ("airplane mode").
    #[arg(long, global = true, env = "ENVRENDER_VALUES", value_name = "FILE")]
    pub values: Option<PathBuf>,

    /// Log level of envrender's own messages (other libraries stay at warn).
    #[arg(
        long,
        global = true,
        env = "ENVRENDER_LOG_LEVEL",
        value_enum,
        value_name = "LEVEL"
    )]
    pub log_level: Option<LogLevel>,

    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "ENVRENDER_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// What to do; `None` with a command after `--` is `run`.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `envrender -- CMD [ARG]...` is `envrender run -- CMD [ARG]...`.
    #[arg(last = true, value_name = "CMD")]
    pub exec: Vec<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one resolved value on stdout (a map or list as JSON).
    ///
    /// Example: envrender get 'file:values.yaml#db.password'
    Get {
        /// The reference, e.g. ssm:/app/prod/db/password or vault:secret/app#key.
        #[arg(value_name = "REF")]
        reference: String,

        /// Give up on transient failures after this long.
        #[arg(long, env = "ENVRENDER_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },

    /// Render every template and env file once, then exit.
    ///
    /// Writes all outputs or none. Exits 1 listing every value that could not
    /// be resolved, 2 on invalid input.
    Render(RenderArgs),

    /// Validate configuration and templates, resolve every reference and print
    /// the plan, with values masked. Writes nothing.
    Check(OutputArgs),

    /// Render, then keep the outputs fresh: watch every source, renew Vault
    /// leases, rewrite what changed and tell the app (sidecar mode).
    ///
    /// Example: envrender watch --signal SIGHUP --process-name nginx --listen 0.0.0.0:8080
    Watch(WatchArgs),

    /// Resolve the environment and files, then run CMD with them: exec into
    /// it when nothing needs keeping alive, else supervise it (signals,
    /// zombies, exit code).
    ///
    /// Example: DB_PASSWORD=ssm:/app/db/password envrender run -- ./server
    Run(RunArgs),

    /// Copy this binary to DEST (a directory gets DEST/envrender), mode 0755,
    /// atomically: an init container hands envrender to an app image this
    /// way, for `envrender -- app` (the image has no `cp`).
    ///
    /// Example: envrender copy /envrender-bin/
    Copy {
        /// The file to write, or a directory (or a path ending in /) to put
        /// envrender in.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
    },

    /// Exit 0 when a running `watch` or `run --listen` is ready, else 1
    /// (container health checks; the image has no curl).
    ///
    /// Example (ECS healthCheck): ["CMD", "/envrender", "probe", "127.0.0.1:9102"]
    Probe {
        /// The --listen address (its /readyz is asked; 0.0.0.0 means
        /// loopback) or a full URL [default: $ENVRENDER_LISTEN].
        #[arg(env = "ENVRENDER_LISTEN", value_name = "ADDR|URL")]
        target: String,

        /// Give up after this long.
        #[arg(long, default_value = "3s", value_name = "DUR", value_parser = parse_duration)]
        timeout: Duration,
    },

    /// Print a shell completion script for this command line.
    ///
    /// Example: envrender completions bash > /etc/bash_completion.d/envrender
    Completions {
        /// The shell.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },

    /// Print the manual page (roff) for this command line.
    ///
    /// Example: envrender manpage > envrender.1 && man ./envrender.1
    Manpage,
}

/// `envrender completions SHELL`: the script for `shell`, built from the
/// same definition as the command line itself.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "envrender", &mut out);
    out
}

/// `envrender manpage`: the manual page, in roff.
pub fn manpage() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out)?;
    Ok(out)
}

/// The flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// --template and --output-root.
    #[command(flatten)]
    pub outputs: OutputArgs,

    /// Give up resolving after this long; the command is not started.
    #[arg(long, env = "ENVRENDER_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// The signal that stops the command (on SIGTERM).
    #[arg(long, default_value = "SIGTERM", value_name = "SIG", value_parser = parse_signal)]
    pub stop_signal: nix::sys::signal::Signal,

    /// How long the command has to stop before its process group is killed.
    #[arg(long, default_value = "10s", value_name = "DUR", value_parser = parse_duration)]
    pub grace: Duration,

    /// Reap orphaned descendants even when not PID 1 (implies --supervise).
    #[arg(long)]
    pub subreaper: bool,

    /// Stay as the command's parent even when nothing needs keeping alive
    /// (as PID 1, envrender always does, to reap zombies).
    #[arg(long)]
    pub supervise: bool,

    /// Watch what the command uses; when files change, rewrite them and send
    /// this signal to the command's process group.
    #[arg(long, value_name = "SIG", value_parser = parse_signal, conflicts_with = "restart")]
    pub reload_signal: Option<nix::sys::signal::Signal>,

    /// Watch what the command uses; on any change (files or environment),
    /// stop the command (--stop-signal, --grace) and start it again.
    #[arg(long)]
    pub restart: bool,

    /// With --reload-signal or --restart: wait until changes have stopped for
    /// MIN, but never more than MAX after the first [default: 0s].
    #[arg(long, env = "ENVRENDER_WAIT", value_name = "MIN[:MAX]", value_parser = parse_wait)]
    pub wait: Option<(Duration, Duration)>,

    /// With --reload-signal or --restart: wait a random extra time up to this
    /// before acting on changes, so a fleet does not reload in step.
    #[arg(long, default_value = "0s", value_name = "DUR", value_parser = parse_duration)]
    pub splay: Duration,

    /// Start the command again when it exits on its own, after a backoff
    /// that doubles from 1s to 1m (a run of 10 minutes resets it).
    #[arg(long)]
    pub restart_on_exit: bool,

    /// Serve /healthz, /readyz (ready once the command started) and /metrics
    /// on this address (implies --supervise).
    #[arg(long, env = "ENVRENDER_LISTEN", value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,

    /// Pass this credential variable (VAULT_TOKEN, CONSUL_HTTP_TOKEN…) to the
    /// command; it is removed otherwise. Repeats.
    #[arg(long, value_name = "NAME")]
    pub keep_env: Vec<String>,

    /// Where [env] NAME_FILE values are written [default: a private
    /// directory under /dev/shm].
    #[arg(long, env = "ENVRENDER_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,

    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The flags of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The flags of `render`.
    #[command(flatten)]
    pub render: RenderArgs,

    /// After outputs change, send this signal (SIGHUP, HUP or a number) to the
    /// process in --pid-file or to the processes named --process-name.
    #[arg(long, env = "ENVRENDER_SIGNAL", value_name = "SIG", value_parser = parse_signal)]
    pub signal: Option<nix::sys::signal::Signal>,

    /// The file holding the process id to signal.
    #[arg(
        long,
        env = "ENVRENDER_PID_FILE",
        value_name = "FILE",
        conflicts_with = "process_name"
    )]
    pub pid_file: Option<PathBuf>,

    /// Signal every process with this name (needs a shared PID namespace:
    /// shareProcessNamespace in Kubernetes, pidMode task in ECS).
    #[arg(long, env = "ENVRENDER_PROCESS_NAME", value_name = "NAME")]
    pub process_name: Option<String>,

    /// After outputs change, run this command (split like a shell would, but
    /// run without one; wrap it in sh -c yourself if you need one).
    #[arg(long, env = "ENVRENDER_EXEC", value_name = "CMD")]
    pub exec: Option<String>,

    /// Kill the --exec command after this long.
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = parse_duration)]
    pub exec_timeout: Duration,

    /// Pass this credential variable (VAULT_TOKEN, CONSUL_HTTP_TOKEN,
    /// AWS_ACCESS_KEY_ID…) to the commands of --exec and on_change; they
    /// get none otherwise. Repeats.
    #[arg(long, value_name = "NAME")]
    pub keep_env: Vec<String>,

    /// After outputs change, POST to this URL (e.g. a /-/reload endpoint).
    #[arg(long, env = "ENVRENDER_HTTP", value_name = "URL")]
    pub http: Option<String>,

    /// Wait until changes have stopped for MIN before rendering, but never
    /// more than MAX after the first one [default: 0s; MAX: 4 × MIN].
    #[arg(long, env = "ENVRENDER_WAIT", value_name = "MIN[:MAX]", value_parser = parse_wait)]
    pub wait: Option<(Duration, Duration)>,

    /// Wait a random extra time up to this before rendering changes (and
    /// running the actions), so that a fleet does not reload in step.
    #[arg(long, env = "ENVRENDER_SPLAY", default_value = "0s", value_name = "DUR", value_parser = parse_duration)]
    pub splay: Duration,

    /// Serve /healthz, /readyz and /metrics on this address.
    #[arg(long, env = "ENVRENDER_LISTEN", value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

/// The flags that add or move outputs: of `render`, `check`, `watch` and
/// `run`.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// A template to render, in addition to the configuration's [[template]]s.
    /// MODE is octal and defaults to 0600.
    ///
    /// Example: --template templates/app.conf.hbs:/etc/app/app.conf:0640
    #[arg(long = "template", value_name = "SRC:DEST[:MODE]")]
    pub templates: Vec<String>,

    /// Write every destination under this directory (/etc/app/x.conf becomes
    /// DIR/etc/app/x.conf): try a configuration on a laptop.
    #[arg(long, env = "ENVRENDER_OUTPUT_ROOT", value_name = "DIR")]
    pub output_root: Option<PathBuf>,
}

/// The flags of `render` (and of `watch`).
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// --template and --output-root.
    #[command(flatten)]
    pub outputs: OutputArgs,

    /// Retry transient failures with backoff for at most this long, then exit 1
    /// [default: render.timeout from the configuration, else 30s].
    #[arg(long, env = "ENVRENDER_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    crate::action::parse_signal(s)
}

/// `MIN[:MAX]`; MAX defaults to four times MIN.
pub fn parse_wait(s: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match s.split_once(':') {
        Some((a, b)) => (parse_duration(a)?, Some(parse_duration(b)?)),
        None => (parse_duration(s)?, None),
    };
    let max = max.unwrap_or(min * 4);
    if max < min {
        return Err(format!("the MAX of --wait {s} is shorter than its MIN"));
    }
    Ok((min, max))
}
