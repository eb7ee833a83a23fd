//! The command line. The command names and the flags in DESIGN.md's CLI
//! contract are fixed: scripts and manifests depend on them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{LogFormat, LogLevel};

#[derive(Debug, Parser)]
#[command(
    name = "envrender",
    version,
    about = "Renders configuration and secrets from Consul, Vault, AWS and local files into files and environment variables.",
    after_help = "Exit codes: 0 success; 1 a value could not be resolved, rendered or written; 2 invalid usage or input."
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

    #[command(subcommand)]
    pub command: Command,
}

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
}

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

#[derive(Debug, Args)]
pub struct RenderArgs {
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
