//! Configuration: a TOML file, validated into typed settings before anything
//! runs.
//!
//! Two steps, as in ripgrep: serde reads the file into raw structures that
//! reject unknown keys (with the key's line), then validation turns strings
//! into durations, modes, owners, references and paths, reporting every
//! problem with its line and a hint rather than stopping at the first.
//! Flags and `ENVRENDER_*` variables are layered on top by the caller.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::action::{self, Action};
use crate::backend::aws::AwsConfig;
use crate::backend::consul::ConsulConfig;
use crate::backend::vault::{AuthConfig, MAX_LEASE_OVERLAP, RoleId, VaultConfig};
use crate::engine::{EnvFileOutput, EnvValue, TemplateOutput};
use crate::output::{DEFAULT_MODE, EnvFormat, Owner};
use crate::problem::ConfigError;
use crate::reference::{self, is_env_name};
use crate::telemetry::{LogFormat, LogLevel};

/// The name looked for in the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "envrender.toml";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    render: RawRender,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    aws: RawAws,
    #[serde(default)]
    consul: RawConsul,
    #[serde(default)]
    vault: RawVault,
    #[serde(default, rename = "template")]
    templates: Vec<RawTemplate>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    #[serde(default, rename = "env_file")]
    env_files: Vec<RawEnvFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRender {
    timeout: Option<Spanned<String>>,
    max_output: Option<Spanned<SizeValue>>,
    #[serde(default)]
    linked_dirs: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    values: Option<Spanned<String>>,
    #[serde(default)]
    fallthrough: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAws {
    region: Option<Spanned<String>>,
    rate_limit: Option<Spanned<f64>>,
    startup_jitter: Option<Spanned<String>>,
    poll_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConsul {
    address: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    datacenter: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    max_stale: Option<Spanned<String>>,
    wait: Option<Spanned<String>>,
    watch: Option<Spanned<String>>,
    max_answer_size: Option<Spanned<SizeValue>>,
}

/// A size in the configuration: bytes, or text such as "64MiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVault {
    address: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
    kv_refresh: Option<Spanned<String>>,
    pki_reissue_at: Option<Spanned<f64>>,
    lease_overlap: Option<Spanned<f64>>,
    revoke_on_stop: Option<bool>,
    #[serde(default)]
    lease_overlap_for: BTreeMap<String, Spanned<f64>>,
    #[serde(default)]
    kv_mounts: BTreeMap<String, Spanned<i64>>,
    max_answer_size: Option<Spanned<SizeValue>>,
    redirect_origins: Option<Spanned<Vec<String>>>,
    auth: Option<Spanned<RawVaultAuth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVaultAuth {
    method: Spanned<String>,
    mount: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    role_id: Option<Spanned<String>>,
    role_id_file: Option<Spanned<String>>,
    secret_id_file: Option<Spanned<String>>,
    header_value: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    sts_endpoint: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    source: Spanned<String>,
    destination: Spanned<String>,
    mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
    on_change: Option<Spanned<RawOnChange>>,
    check: Option<Spanned<String>>,
}

/// What to do when a template's output changed (watch mode).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnChange {
    signal: Option<Spanned<String>>,
    pid_file: Option<Spanned<String>>,
    process_name: Option<Spanned<String>>,
    exec: Option<Spanned<RawCommand>>,
    timeout: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
}

/// A command as one line (split like a shell would) or as argv.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Line(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvFile {
    destination: Spanned<String>,
    format: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
}

/// A validated configuration file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// The file it was read from; `None` when parsed from text, or for the
    /// defaults when there is no file.
    pub file: Option<PathBuf>,
    /// `render.timeout`: how long transient failures are retried;
    /// `--timeout` (`ENVRENDER_TIMEOUT`) wins over it, 30s when unset.
    pub timeout: Option<Duration>,
    /// The most one template may render to (`render.max_output`).
    pub max_output: Option<usize>,
    /// `render.linked_dirs`: directories whose outputs change together,
    /// through a `..data` link swapped in one step.
    pub linked_dirs: Vec<PathBuf>,
    /// `log.level`; `--log-level` (`ENVRENDER_LOG_LEVEL`) wins over it,
    /// `info` when unset.
    pub log_level: Option<LogLevel>,
    /// `log.format`; `--log-format` (`ENVRENDER_LOG_FORMAT`) wins over it,
    /// `text` when unset.
    pub log_format: Option<LogFormat>,
    /// A local values file answering references before any backend.
    pub local_values: Option<PathBuf>,
    /// Send network references missing from the values file to their backends.
    pub local_fallthrough: bool,
    /// `[aws]`.
    pub aws: AwsConfig,
    /// `[consul]`.
    pub consul: ConsulConfig,
    /// `[vault]`.
    pub vault: VaultConfig,
    /// `[[template]]`s, in file order; `--template` flags add to them.
    pub templates: Vec<TemplateOutput>,
    /// `[env]`: each variable's name and value, references parsed.
    pub env: Vec<(String, EnvValue)>,
    /// `[[env_file]]`s, in file order.
    pub env_files: Vec<EnvFileOutput>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![
            ConfigError::new(&origin, format!("cannot read the configuration: {e}")).hint(match e
                .kind()
            {
                std::io::ErrorKind::NotFound => {
                    "give an existing file with --config or ENVRENDER_CONFIG"
                }
                std::io::ErrorKind::InvalidData => "the file is not UTF-8 text; save it as UTF-8",
                _ => "check the file's permissions",
            }),
        ]
    })?;
    parse(&origin, &text).map(|mut c| {
        c.file = Some(path.to_path_buf());
        c
    })
}

/// Validates configuration text; `origin` names it in errors.
pub fn parse(origin: &str, text: &str) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| crate::backend::local::line_column(text, s.start))
            .unzip();
        vec![ConfigError {
            origin: origin.to_string(),
            line,
            column,
            message: e.message().trim_end().to_string(),
            hint: e.message().contains("unknown field").then(|| {
                "see the configuration reference in docs/configuration.md for the keys of each table"
                    .to_string()
            }),
        }]
    })?;
    let mut v = Validator {
        origin,
        text,
        errors: Vec::new(),
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(v.errors)
    }
}

struct Validator<'a> {
    origin: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error<T>(&mut self, at: &Spanned<T>, message: impl Into<String>, hint: impl Into<String>) {
        let (line, column) = crate::backend::local::line_column(self.text, at.span().start);
        self.errors.push(ConfigError {
            origin: self.origin.to_string(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
            hint: Some(hint.into()).filter(|h: &String| !h.is_empty()),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let timeout = self.duration(raw.render.timeout.as_ref(), "render.timeout");
        let max_output = self
            .size(raw.render.max_output.as_ref(), "render.max_output")
            .map(|n| n as usize);
        let log_level = self.choice(raw.log.level.as_ref(), "log.level");
        let log_format = self.choice(raw.log.format.as_ref(), "log.format");
        let templates = raw
            .templates
            .iter()
            .map(|t| TemplateOutput {
                source: self.path(&t.source, "template.source"),
                destination: self.path(&t.destination, "template.destination"),
                mode: self.mode(t.mode.as_ref()),
                owner: self.owner(t.owner.as_ref()),
                on_change: t
                    .on_change
                    .as_ref()
                    .map(|a| self.on_change(a))
                    .unwrap_or_default(),
                check: t.check.as_ref().and_then(|c| self.check_command(c)),
            })
            .collect();
        let env = raw
            .env
            .iter()
            .map(|(name, value)| {
                if !is_env_name(name) {
                    self.error(
                        value,
                        format!("env: \"{name}\" is not an environment variable name"),
                        "names are letters, digits and '_', not starting with a digit",
                    );
                }
                (name.clone(), self.env_value(name, value))
            })
            .collect();
        let env_files = raw
            .env_files
            .iter()
            .map(|f| EnvFileOutput {
                destination: self.path(&f.destination, "env_file.destination"),
                format: self
                    .choice(f.format.as_ref(), "env_file.format")
                    .unwrap_or(EnvFormat::Dotenv),
                mode: self.mode(f.mode.as_ref()),
                owner: self.owner(f.owner.as_ref()),
            })
            .collect();
        let local_values = raw
            .local
            .values
            .as_ref()
            .map(|p| self.path(p, "local.values"));
        let linked_dirs = raw
            .render
            .linked_dirs
            .iter()
            .map(|d| self.path(d, "render.linked_dirs"))
            .collect();
        Config {
            file: None,
            timeout,
            max_output,
            linked_dirs,
            log_level,
            log_format,
            local_values,
            local_fallthrough: raw.local.fallthrough,
            aws: self.aws(&raw.aws),
            consul: self.consul(&raw.consul),
            vault: self.vault(&raw.vault),
            templates,
            env,
            env_files,
        }
    }

    fn aws(&mut self, raw: &RawAws) -> AwsConfig {
        let defaults = AwsConfig::default();
        let rate_limit = match &raw.rate_limit {
            Some(r) if !(r.get_ref().is_finite() && *r.get_ref() > 0.0) => {
                self.error(
                    r,
                    "aws.rate_limit must be a positive number of requests per second",
                    "e.g. rate_limit = 10",
                );
                defaults.rate_limit
            }
            Some(r) => *r.get_ref(),
            None => defaults.rate_limit,
        };
        AwsConfig {
            region: raw.region.as_ref().map(|r| r.get_ref().clone()),
            rate_limit,
            startup_jitter: self
                .duration(raw.startup_jitter.as_ref(), "aws.startup_jitter")
                .unwrap_or(defaults.startup_jitter),
            poll_interval: self
                .duration(raw.poll_interval.as_ref(), "aws.poll_interval")
                .unwrap_or(defaults.poll_interval),
        }
    }

    fn consul(&mut self, raw: &RawConsul) -> ConsulConfig {
        let defaults = ConsulConfig::default();
        let wait = self
            .duration(raw.wait.as_ref(), "consul.wait")
            .unwrap_or(defaults.wait);
        if let Some(w) = &raw.wait
            && (wait > Duration::from_secs(600) || wait.is_zero())
        {
            self.error(
                w,
                "consul.wait must be more than 0 and at most 10m (Consul's cap)",
                "e.g. wait = \"60s\"",
            );
        }
        ConsulConfig {
            address: raw.address.as_ref().map(|a| a.get_ref().clone()),
            token: raw.token.as_ref().map(|t| t.get_ref().clone()),
            token_file: raw
                .token_file
                .as_ref()
                .map(|p| self.path(p, "consul.token_file")),
            datacenter: raw.datacenter.as_ref().map(|d| d.get_ref().clone()),
            ca_file: raw.ca_file.as_ref().map(|p| self.path(p, "consul.ca_file")),
            client_cert: self.client_pair(&raw.client_cert, &raw.client_key, "consul", true),
            client_key: self.client_pair(&raw.client_key, &raw.client_cert, "consul", false),
            max_stale: self
                .duration(raw.max_stale.as_ref(), "consul.max_stale")
                .unwrap_or(defaults.max_stale),
            wait,
            watch: self
                .choice(raw.watch.as_ref(), "consul.watch")
                .unwrap_or(defaults.watch),
            max_answer_size: self
                .size(raw.max_answer_size.as_ref(), "consul.max_answer_size")
                .unwrap_or(defaults.max_answer_size),
        }
    }

    /// A template's check command: a command line with `{file}` in it.
    fn check_command(&mut self, at: &Spanned<String>) -> Option<Vec<String>> {
        let hint =
            "e.g. check = \"nginx -t -c {file}\": {file} is the new file, before it goes live";
        match shlex::split(at.get_ref()).filter(|argv| !argv.is_empty()) {
            None => {
                self.error(
                    at,
                    "template.check is not a command line (unbalanced quotes?)",
                    hint,
                );
                None
            }
            Some(argv) if !argv.iter().any(|a| a.contains("{file}")) => {
                self.error(
                    at,
                    "template.check does not name the file it checks: {file} is missing",
                    hint,
                );
                None
            }
            Some(argv) => Some(argv),
        }
    }

    fn on_change(&mut self, at: &Spanned<RawOnChange>) -> Vec<Action> {
        let raw = at.get_ref();
        let mut actions = Vec::new();
        let signal = raw.signal.as_ref().and_then(|s| {
            action::parse_signal(s.get_ref())
                .map_err(|e| self.error(s, format!("template.on_change.signal: {e}"), ""))
                .ok()
        });
        let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
        let pid_file = raw
            .pid_file
            .as_ref()
            .map(|p| self.path(p, "template.on_change.pid_file"));
        // A signal that did not parse is reported once, above.
        let signal_given = raw.signal.is_some();
        match action::signal_action(signal, pid_file, text(&raw.process_name)) {
            Ok(Some(a)) => actions.push(a),
            Ok(None) => {}
            Err(_) if signal_given && signal.is_none() => {}
            Err(e) => self.error(
                at,
                format!("template.on_change: {e}"),
                "e.g. on_change = { signal = \"SIGHUP\", process_name = \"nginx\" }",
            ),
        }
        let timeout = self
            .duration(raw.timeout.as_ref(), "template.on_change.timeout")
            .unwrap_or(action::DEFAULT_EXEC_TIMEOUT);
        if let Some(exec) = &raw.exec {
            let argv = match exec.get_ref() {
                RawCommand::Line(line) => shlex::split(line),
                RawCommand::Argv(argv) => Some(argv.clone()),
            }
            .filter(|a| !a.is_empty() && !a[0].is_empty());
            match argv {
                Some(argv) => actions.push(Action::Exec { argv, timeout }),
                None => self.error(
                    exec,
                    "template.on_change.exec is not a command (empty, or unbalanced quotes)",
                    "e.g. exec = [\"nginx\", \"-s\", \"reload\"] or exec = \"nginx -s reload\"",
                ),
            }
        }
        if let Some(url) = &raw.http {
            match action::http_action(url.get_ref()) {
                Ok(a) => actions.push(a),
                Err(e) => self.error(url, format!("template.on_change.http: {e}"), ""),
            }
        }
        actions
    }

    /// One of `client_cert` / `client_key` under `[section]`, resolved
    /// against the configuration's folder; one without the other is an
    /// error (reported once, at the certificate).
    /// A lease overlap: a share of the TTL, above 0 and at most
    /// [`MAX_LEASE_OVERLAP`].
    fn overlap(&mut self, share: &Spanned<f64>, name: &str) -> Option<f64> {
        let value = *share.get_ref();
        if value > 0.0 && value <= MAX_LEASE_OVERLAP {
            return Some(value);
        }
        self.error(
            share,
            format!(
                "{name} must be a share of the lease's TTL, above 0 and at most {MAX_LEASE_OVERLAP}"
            ),
            "e.g. 0.5: new credentials are in place while the old ones still have half their TTL",
        );
        None
    }

    fn client_pair(
        &mut self,
        this: &Option<Spanned<String>>,
        other: &Option<Spanned<String>>,
        section: &str,
        is_cert: bool,
    ) -> Option<PathBuf> {
        let (name, other_name) = if is_cert {
            ("client_cert", "client_key")
        } else {
            ("client_key", "client_cert")
        };
        let path = this.as_ref()?;
        if other.is_none() {
            self.error(
                path,
                format!("{section}.{name} is set but {section}.{other_name} is not: a client certificate needs both"),
                format!("set {other_name} = \"path/to/{}.pem\" under [{section}], or remove {name}", if is_cert { "client-key" } else { "client" }),
            );
            return None;
        }
        Some(self.path(path, &format!("{section}.{name}")))
    }

    fn vault(&mut self, raw: &RawVault) -> VaultConfig {
        let defaults = VaultConfig::default();
        let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
        let kv_refresh = self
            .duration(raw.kv_refresh.as_ref(), "vault.kv_refresh")
            .unwrap_or(defaults.kv_refresh);
        let pki_reissue_at = match &raw.pki_reissue_at {
            Some(f) if !(*f.get_ref() > 0.0 && *f.get_ref() < 1.0) => {
                self.error(
                    f,
                    "vault.pki_reissue_at must be a fraction of the certificate's lifetime, between 0 and 1",
                    "e.g. pki_reissue_at = 0.67 re-issues a 24h certificate after about 16h",
                );
                defaults.pki_reissue_at
            }
            Some(f) => *f.get_ref(),
            None => defaults.pki_reissue_at,
        };
        let lease_overlap = raw
            .lease_overlap
            .as_ref()
            .and_then(|share| self.overlap(share, "vault.lease_overlap"))
            .unwrap_or(defaults.lease_overlap);
        let mut lease_overlap_for = Vec::new();
        for (path, share) in &raw.lease_overlap_for {
            let name = format!("vault.lease_overlap_for.\"{path}\"");
            if let Some(share) = self.overlap(share, &name) {
                lease_overlap_for.push((path.trim_matches('/').to_string(), share));
            }
        }
        let mut kv_mounts = Vec::new();
        for (path, version) in &raw.kv_mounts {
            let mount = path.trim_matches('/');
            let kv2 = match *version.get_ref() {
                1 => false,
                2 => true,
                n => {
                    self.error(
                        version,
                        format!("vault.kv_mounts.{path}: KV version {n} does not exist"),
                        "write 1 for a KV v1 mount, 2 for KV v2, e.g. kv_mounts = { secret = 2 }",
                    );
                    continue;
                }
            };
            if mount.is_empty() {
                self.error(
                    version,
                    "vault.kv_mounts: a mount path cannot be empty",
                    "name the mount as `vault secrets list` shows it, e.g. kv_mounts = { secret = 2 }",
                );
                continue;
            }
            kv_mounts.push((format!("{mount}/"), kv2));
        }
        let mut redirect_origins = Vec::new();
        if let Some(list) = &raw.redirect_origins {
            for origin in list.get_ref() {
                match crate::backend::http::parse_origin(origin) {
                    Ok(o) => redirect_origins.push(o),
                    Err(e) => self.error(
                        list,
                        format!("vault.redirect_origins: {e}"),
                        "list the other nodes of this Vault cluster, e.g. redirect_origins = [\"https://vault-1:8200\", \"https://vault-2:8200\"]",
                    ),
                }
            }
        }
        VaultConfig {
            address: text(&raw.address),
            namespace: text(&raw.namespace),
            ca_file: raw.ca_file.as_ref().map(|p| self.path(p, "vault.ca_file")),
            client_cert: self.client_pair(&raw.client_cert, &raw.client_key, "vault", true),
            client_key: self.client_pair(&raw.client_key, &raw.client_cert, "vault", false),
            state_file: raw
                .state_file
                .as_ref()
                .map(|p| self.path(p, "vault.state_file")),
            kv_refresh,
            pki_reissue_at,
            lease_overlap,
            lease_overlap_for,
            revoke_on_stop: raw.revoke_on_stop.unwrap_or(defaults.revoke_on_stop),
            kv_mounts,
            max_answer_size: self
                .size(raw.max_answer_size.as_ref(), "vault.max_answer_size")
                .unwrap_or(defaults.max_answer_size),
            redirect_origins,
            auth: raw.auth.as_ref().and_then(|a| self.vault_auth(a)),
        }
    }

    fn vault_auth(&mut self, at: &Spanned<RawVaultAuth>) -> Option<AuthConfig> {
        let raw = at.get_ref();
        let method = raw.method.get_ref().as_str();
        let given: Vec<(&str, bool)> = vec![
            ("mount", raw.mount.is_some()),
            ("role", raw.role.is_some()),
            ("token_file", raw.token_file.is_some()),
            ("role_id", raw.role_id.is_some()),
            ("role_id_file", raw.role_id_file.is_some()),
            ("secret_id_file", raw.secret_id_file.is_some()),
            ("header_value", raw.header_value.is_some()),
            ("region", raw.region.is_some()),
            ("sts_endpoint", raw.sts_endpoint.is_some()),
        ];
        let allowed: &[&str] = match method {
            "token" => &["token_file"],
            "approle" => &["mount", "role_id", "role_id_file", "secret_id_file"],
            "kubernetes" => &["mount", "role", "token_file"],
            "aws" => &["mount", "role", "header_value", "region", "sts_endpoint"],
            other => {
                self.error(
                    &raw.method,
                    format!("vault.auth.method \"{other}\" is not an auth method envrender knows"),
                    "use one of: token, approle, kubernetes, aws",
                );
                return None;
            }
        };
        let stray: Vec<&str> = given
            .iter()
            .filter(|(k, set)| *set && !allowed.contains(k))
            .map(|(k, _)| *k)
            .collect();
        if !stray.is_empty() {
            self.error(
                at,
                format!(
                    "vault.auth: {} not used by method \"{method}\"",
                    stray.join(", ")
                ),
                format!("method \"{method}\" takes: {}", allowed.join(", ")),
            );
        }
        let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
        let mount = text(&raw.mount)
            .map(|m| m.trim_matches('/').to_string())
            .unwrap_or_else(|| method.to_string());
        match method {
            "token" => Some(AuthConfig::Token {
                file: raw
                    .token_file
                    .as_ref()
                    .map(|p| self.path(p, "vault.auth.token_file")),
            }),
            "approle" => {
                let role_id = match (&raw.role_id, &raw.role_id_file) {
                    (Some(id), None) => RoleId::Value(id.get_ref().clone()),
                    (None, Some(f)) => RoleId::File(self.path(f, "vault.auth.role_id_file")),
                    _ => {
                        self.error(
                            at,
                            "vault.auth: approle needs exactly one of role_id and role_id_file",
                            "e.g. auth = { method = \"approle\", role_id_file = \"/vault/role-id\", secret_id_file = \"/vault/secret-id\" }",
                        );
                        return None;
                    }
                };
                Some(AuthConfig::AppRole {
                    mount,
                    role_id,
                    secret_id_file: raw
                        .secret_id_file
                        .as_ref()
                        .map(|p| self.path(p, "vault.auth.secret_id_file")),
                })
            }
            "kubernetes" => {
                let Some(role) = text(&raw.role) else {
                    self.error(
                        at,
                        "vault.auth: kubernetes needs the Vault role to log in as",
                        "e.g. auth = { method = \"kubernetes\", role = \"app\" }",
                    );
                    return None;
                };
                Some(AuthConfig::Kubernetes {
                    mount,
                    role,
                    jwt_file: raw
                        .token_file
                        .as_ref()
                        .map(|p| self.path(p, "vault.auth.token_file"))
                        .unwrap_or_else(|| {
                            PathBuf::from(crate::backend::vault::SERVICE_ACCOUNT_TOKEN)
                        }),
                })
            }
            _ => Some(AuthConfig::Aws {
                mount,
                role: text(&raw.role),
                header_value: text(&raw.header_value),
                region: text(&raw.region),
                sts_endpoint: text(&raw.sts_endpoint),
            }),
        }
    }

    fn duration(&mut self, s: Option<&Spanned<String>>, key: &str) -> Option<Duration> {
        let s = s?;
        parse_duration(s.get_ref())
            .map_err(|e| {
                self.error(
                    s,
                    format!("{key}: {e}"),
                    "write a duration such as \"30s\", \"2m\" or \"1m30s\"",
                )
            })
            .ok()
    }

    /// A size: a number of bytes, or text such as "64MiB".
    fn size(&mut self, s: Option<&Spanned<SizeValue>>, key: &str) -> Option<u64> {
        let s = s?;
        let parsed = match s.get_ref() {
            SizeValue::Bytes(n) if *n > 0 => Ok(*n as u64),
            SizeValue::Bytes(n) => Err(format!("{n} is not a size of at least 1 byte")),
            SizeValue::Text(t) => parse_size(t),
        };
        parsed
            .map_err(|e| {
                self.error(
                    s,
                    format!("{key}: {e}"),
                    "write a size such as \"64MiB\", \"512KiB\" or a number of bytes",
                )
            })
            .ok()
    }

    /// One of a fixed set of words.
    fn choice<T: clap::ValueEnum>(&mut self, s: Option<&Spanned<String>>, key: &str) -> Option<T> {
        let s = s?;
        T::from_str(s.get_ref(), true)
            .map_err(|_| {
                let names: Vec<String> = T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                    .collect();
                self.error(
                    s,
                    format!("{key}: unknown value \"{}\"", s.get_ref()),
                    format!("one of {}", names.join(", ")),
                );
            })
            .ok()
    }

    fn path(&mut self, s: &Spanned<String>, key: &str) -> PathBuf {
        if s.get_ref().trim().is_empty() {
            self.error(s, format!("{key} is empty"), "give a file path");
        }
        PathBuf::from(s.get_ref())
    }

    fn mode(&mut self, s: Option<&Spanned<String>>) -> u32 {
        let Some(s) = s else { return DEFAULT_MODE };
        match parse_mode(s.get_ref()) {
            Ok(m) => m,
            Err(e) => {
                self.error(
                    s,
                    format!("mode: {e}"),
                    "write the mode as an octal string, e.g. mode = \"0640\"",
                );
                DEFAULT_MODE
            }
        }
    }

    fn owner(&mut self, s: Option<&Spanned<String>>) -> Option<Owner> {
        let s = s?;
        match parse_owner(s.get_ref()) {
            Ok(o) => Some(o),
            Err(e) => {
                self.error(
                    s,
                    format!("owner: {e}"),
                    "write \"USER\", \"USER:GROUP\", \":GROUP\", or numeric ids \"1000:1000\"",
                );
                None
            }
        }
    }

    fn env_value(&mut self, name: &str, s: &Spanned<String>) -> EnvValue {
        match env_value(s.get_ref()) {
            Ok(v) => v,
            Err(e) => {
                let hint = e.hint.clone().unwrap_or_default();
                self.error(s, format!("env.{name}: {}", e.message), hint);
                EnvValue::Literal(String::new())
            }
        }
    }
}

/// A value in `[env]`: a reference when it starts with a known scheme or is a
/// supported ARN, otherwise literal text.
pub fn env_value(s: &str) -> Result<EnvValue, reference::ParseError> {
    if reference::looks_like_reference(s) {
        reference::parse(s).map(EnvValue::Reference)
    } else {
        Ok(EnvValue::Literal(s.to_string()))
    }
}

/// A duration as humantime writes it ("30s", "2m", "1m30s"), surrounding
/// blanks ignored; the error quotes `s`. For the configuration and the
/// flags alike.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("\"{s}\" is not a duration ({e})"))
}

/// A size in bytes: "1048576", "512KiB", "64MiB", "1GiB" (or KB, MB, GB in
/// powers of ten); at least one byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("\"{s}\" is not a size")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0 && usize::try_from(n).is_ok())
        .ok_or_else(|| format!("\"{s}\" is not a size"))
}

/// An octal file mode: "0600", "600" or "0o600".
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode =
        u32::from_str_radix(digits, 8).map_err(|_| format!("\"{s}\" is not an octal mode"))?;
    if digits.is_empty() || mode > 0o7777 {
        return Err(format!("\"{s}\" is not an octal mode of at most 4 digits"));
    }
    Ok(mode)
}

/// `USER[:GROUP]`, `:GROUP`, names or numeric ids. Names are looked up in the
/// local user database now, so a typo fails before anything is fetched.
pub fn parse_owner(s: &str) -> Result<Owner, String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = match user {
        "" => None,
        u => Some(match u.parse::<u32>() {
            Ok(id) => id,
            Err(_) => nix::unistd::User::from_name(u)
                .map_err(|e| format!("cannot look up user \"{u}\": {e}"))?
                .ok_or_else(|| format!("no user \"{u}\" on this system"))?
                .uid
                .as_raw(),
        }),
    };
    let gid = match group {
        None | Some("") => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => nix::unistd::Group::from_name(g)
                .map_err(|e| format!("cannot look up group \"{g}\": {e}"))?
                .ok_or_else(|| format!("no group \"{g}\" on this system"))?
                .gid
                .as_raw(),
        }),
    };
    if uid.is_none() && gid.is_none() {
        return Err("no user or group given".into());
    }
    Ok(Owner { uid, gid })
}

/// `--template SRC:DEST[:MODE]`.
pub fn parse_template_flag(s: &str) -> Result<TemplateOutput, ConfigError> {
    let origin = format!("--template {s}");
    let parts: Vec<&str> = s.split(':').collect();
    let (source, destination, mode) = match parts.as_slice() {
        [src, dest] => (*src, *dest, None),
        [src, dest, mode] => (*src, *dest, Some(*mode)),
        _ => {
            return Err(
                ConfigError::new(origin, "expected SRC:DEST or SRC:DEST:MODE")
                    .hint("e.g. --template templates/app.conf.hbs:/etc/app/app.conf:0640"),
            );
        }
    };
    if source.is_empty() || destination.is_empty() {
        return Err(
            ConfigError::new(origin, "the source and the destination must both be given")
                .hint("e.g. --template templates/app.conf.hbs:/etc/app/app.conf"),
        );
    }
    let mode = match mode {
        None => DEFAULT_MODE,
        Some(m) => parse_mode(m)
            .map_err(|e| ConfigError::new(&origin, e).hint("the mode is octal, e.g. 0640"))?,
    };
    Ok(TemplateOutput {
        source: source.into(),
        destination: destination.into(),
        mode,
        owner: None,
        on_change: Vec::new(),
        check: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[render]
timeout = "45s"

[log]
level = "debug"
format = "json"

[local]
values = "local/values.yaml"

[[template]]
source = "templates/app.conf.hbs"
destination = "/etc/app/app.conf"
mode = "0640"
owner = "0:0"

[[template]]
source = "templates/b.hbs"
destination = "out/b"

[env]
DB_PASSWORD = "ssm:/app/prod/db/password"
LOG_URL = "https://logs.example.com"

[[env_file]]
destination = "/run/app/app.env"

[[env_file]]
destination = "/run/app/env.json"
format = "json"
mode = "0400"
"#;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size(" 512 KiB "), Ok(512 << 10));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in [
            "",
            "0",
            "lots",
            "MiB",
            "1.5MiB",
            "-1",
            "99999999999999999999GiB",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(format!("\"{bad}\" is not a size")),
                "{bad}"
            );
        }
        let e = parse("c.toml", "[render]\nmax_output = \"big\"\n").unwrap_err();
        assert!(
            e[0].to_string()
                .contains("render.max_output: \"big\" is not a size"),
            "{e:?}"
        );
        let c = parse("c.toml", "[render]\nmax_output = \"1KiB\"\n").unwrap();
        assert_eq!(c.max_output, Some(1024));
    }

    #[test]
    fn full_config() {
        let c = parse("envrender.toml", FULL).unwrap();
        assert_eq!(c.timeout, Some(Duration::from_secs(45)));
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.local_values, Some(PathBuf::from("local/values.yaml")));
        assert_eq!(c.templates.len(), 2);
        assert_eq!(c.templates[0].mode, 0o640);
        assert_eq!(
            c.templates[0].owner,
            Some(Owner {
                uid: Some(0),
                gid: Some(0)
            })
        );
        assert_eq!(c.templates[1].mode, DEFAULT_MODE);
        assert_eq!(c.env[0].0, "DB_PASSWORD");
        assert!(
            matches!(&c.env[0].1, EnvValue::Reference(r) if r.to_string() == "ssm:/app/prod/db/password")
        );
        assert_eq!(
            c.env[1].1,
            EnvValue::Literal("https://logs.example.com".into())
        );
        assert_eq!(c.env_files[0].format, EnvFormat::Dotenv);
        assert_eq!(c.env_files[1].format, EnvFormat::Json);
        assert_eq!(c.env_files[1].mode, 0o400);
    }

    #[test]
    fn check_commands_name_their_file() {
        let ok = parse(
            "envrender.toml",
            "[[template]]\nsource = \"a\"\ndestination = \"b\"\ncheck = \"nginx -t -c '{file}'\"\n",
        )
        .unwrap();
        assert_eq!(
            ok.templates[0].check,
            Some(vec![
                "nginx".into(),
                "-t".into(),
                "-c".into(),
                "{file}".into()
            ])
        );
        for bad in ["nginx -t", "nginx '-t"] {
            let text =
                format!("[[template]]\nsource = \"a\"\ndestination = \"b\"\ncheck = \"{bad}\"\n");
            let errors = parse("envrender.toml", &text).unwrap_err();
            assert_eq!(errors[0].line, Some(4), "{bad}");
            assert!(
                errors[0].message.contains("template.check"),
                "{}",
                errors[0].message
            );
        }
    }

    #[test]
    fn lease_overlaps() {
        let c = parse(
            "envrender.toml",
            "[vault]\nlease_overlap = 0.25\n[vault.lease_overlap_for]\n\"/database/creds/pool/\" = 0.5\n",
        )
        .unwrap();
        assert_eq!(c.vault.lease_overlap_of("database/creds/app"), 0.25);
        assert_eq!(c.vault.lease_overlap_of("database/creds/pool"), 0.5);
        assert_eq!(
            VaultConfig::default().lease_overlap_of("x"),
            crate::backend::vault::DEFAULT_LEASE_OVERLAP
        );
        for bad in [
            "lease_overlap = 0.0",
            "lease_overlap = 0.9",
            "lease_overlap_for = { \"a/b\" = -1.0 }",
        ] {
            let errors = parse("envrender.toml", &format!("[vault]\n{bad}\n")).unwrap_err();
            assert_eq!(errors.len(), 1, "{bad}");
            assert_eq!(errors[0].line, Some(2), "{bad}");
            assert!(
                errors[0].message.contains("share of the lease's TTL"),
                "{}",
                errors[0].message
            );
        }
    }

    #[test]
    fn declared_kv_mounts() {
        let c = parse(
            "envrender.toml",
            "[vault]\nkv_mounts = { secret = 2, \"team/kv/\" = 1 }\n",
        )
        .unwrap();
        assert_eq!(
            c.vault.kv_mounts,
            vec![
                ("secret/".to_string(), true),
                ("team/kv/".to_string(), false)
            ]
        );
        let e = parse(
            "envrender.toml",
            "[vault]\nkv_mounts = { secret = 3, \"/\" = 2 }\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|e| e.line == Some(2)), "{e:?}");
        assert!(
            e.iter()
                .any(|e| e.message.contains("KV version 3 does not exist"))
        );
        assert!(e.iter().any(|e| e.message.contains("cannot be empty")));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let text = "[[template]]\nsource = \"a\"\ndestinaton = \"b\"\n";
        let e = parse("envrender.toml", text).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(3));
        assert!(
            e[0].message.contains("unknown field `destinaton`"),
            "{}",
            e[0]
        );
        assert!(e[0].message.contains("destination"), "{}", e[0]);
        let e = parse("x.toml", "[vaults]\naddress = \"x\"\n").unwrap_err();
        assert_eq!(e[0].line, Some(1));
        assert!(e[0].to_string().starts_with("x.toml:1:"), "{}", e[0]);
    }

    #[test]
    fn every_invalid_value_is_reported_with_its_line() {
        let text = r#"[render]
timeout = "soon"
[[template]]
source = "a"
destination = "b"
mode = "0999"
owner = "no-such-user-envrender"
[env]
"1BAD" = "x"
GOOD = "smm:/typo"
OK = "ssm:/app/x@"
"#;
        let e = parse("c.toml", text).unwrap_err();
        let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        let lines: Vec<Option<usize>> = e.iter().map(|e| e.line).collect();
        assert_eq!(
            lines,
            [Some(2), Some(6), Some(7), Some(9), Some(11)],
            "{shown:#?}"
        );
        assert!(shown[0].contains("\"soon\" is not a duration"));
        assert!(shown[1].contains("\"0999\" is not an octal mode"));
        assert!(shown[2].contains("no user \"no-such-user-envrender\""));
        assert!(shown[3].contains("\"1BAD\" is not an environment variable name"));
        assert!(shown[4].contains("empty version"));
        // An unknown scheme is not a reference: it is passed through as text.
        assert!(!shown.iter().any(|s| s.contains("smm")));
    }

    #[test]
    fn choices_list_the_valid_values() {
        let e = parse(
            "c.toml",
            "[log]\nlevel = \"loud\"\n[[env_file]]\ndestination = \"x\"\nformat = \"yaml\"\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0].to_string(),
            "c.toml:2:9: log.level: unknown value \"loud\"\n    hint: one of error, warn, info, debug, trace"
        );
        assert!(
            e[1].to_string().contains("hint: one of dotenv, json"),
            "{}",
            e[1]
        );
    }

    #[test]
    fn modes_and_owners() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert_eq!(parse_mode("0o4755"), Ok(0o4755));
        assert!(parse_mode("").is_err());
        assert!(parse_mode("8").is_err());
        assert!(parse_mode("17777").is_err());
        assert_eq!(
            parse_owner("1000"),
            Ok(Owner {
                uid: Some(1000),
                gid: None
            })
        );
        assert_eq!(
            parse_owner(":50"),
            Ok(Owner {
                uid: None,
                gid: Some(50)
            })
        );
        assert_eq!(
            parse_owner("root:root"),
            Ok(Owner {
                uid: Some(0),
                gid: Some(0)
            })
        );
        assert!(parse_owner(":").is_err());
    }

    #[test]
    fn template_flags() {
        let t = parse_template_flag("in.hbs:out.conf").unwrap();
        assert_eq!(
            (t.source.to_str(), t.destination.to_str(), t.mode),
            (Some("in.hbs"), Some("out.conf"), 0o600)
        );
        assert_eq!(
            parse_template_flag("in.hbs:out.conf:0644").unwrap().mode,
            0o644
        );
        assert!(
            parse_template_flag("in.hbs")
                .unwrap_err()
                .message
                .contains("SRC:DEST")
        );
        assert!(
            parse_template_flag("in.hbs:out:rw")
                .unwrap_err()
                .message
                .contains("octal")
        );
        assert!(parse_template_flag(":out").is_err());
    }
}
