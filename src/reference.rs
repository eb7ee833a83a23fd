//! The one reference grammar.
//!
//! A reference names one value in one backend. The same string is accepted in
//! an `[env]` mapping, in a template helper, by `envrender get`, and as the
//! value of an environment variable given to `envrender run`:
//!
//! ```text
//! reference := body ( "|optional" | "|default=" TEXT )*
//! body      := SCHEME ":" PATH [ "@" VERSION ] [ "?" PARAMS ] [ "#" FIELD ]
//!            | SSM-ARN [ "#" FIELD ]
//!            | SECRETS-MANAGER-ARN          (ECS `valueFrom` form)
//! PARAMS    := NAME "=" VALUE ( "&" NAME "=" VALUE )*
//! FIELD     := KEY ( "." KEY )*
//! ```
//!
//! A `PATH` ending in `/` is a prefix: it yields a map of every value below it,
//! keyed by the path relative to the prefix. `@VERSION` is only recognised by
//! backends that have versions (`ssm`, `sm`, `vault`); elsewhere `@` is part of
//! the path. A backslash escapes the next character (`\@`, `\#`, `\?`, `\|`,
//! `\\`, and `\.` inside a field key).
//!
//! The parsed form separates what must be fetched (`Source`, the unit of
//! de-duplication and batching) from what is done with it afterwards (the field
//! selector and the optional/default modifiers), so `ssm:/a#x` and `ssm:/a#y`
//! are one request.

use std::collections::BTreeMap;
use std::fmt;

/// The backends a reference can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// Consul KV (`consul:app/prod/db_host`).
    Consul,
    /// HashiCorp Vault or OpenBao (`vault:secret/app#password`).
    Vault,
    /// SSM Parameter Store (`ssm:/app/prod/db/password`, or an SSM ARN).
    Ssm,
    /// AWS Secrets Manager (`sm:prod/db`, or a Secrets Manager ARN).
    SecretsManager,
    /// A base64 ciphertext decrypted by AWS KMS (`kms:AQICAH…`).
    Kms,
    /// A local file or directory (`file:./values.yaml`).
    File,
    /// An environment variable (`env:DB_PASSWORD`).
    Env,
    /// A Consul service's healthy instances (`service:web?tag=primary`).
    Service,
}

impl Scheme {
    /// Every scheme, in the order they are listed in messages.
    pub const ALL: [Scheme; 8] = [
        Scheme::Consul,
        Scheme::Vault,
        Scheme::Ssm,
        Scheme::SecretsManager,
        Scheme::Kms,
        Scheme::File,
        Scheme::Env,
        Scheme::Service,
    ];

    /// The scheme as written before the colon.
    pub fn prefix(self) -> &'static str {
        match self {
            Scheme::Consul => "consul",
            Scheme::Vault => "vault",
            Scheme::Ssm => "ssm",
            Scheme::SecretsManager => "sm",
            Scheme::Kms => "kms",
            Scheme::File => "file",
            Scheme::Env => "env",
            Scheme::Service => "service",
        }
    }

    /// The scheme written as `s` before the colon; `None` for an unknown one.
    pub fn from_prefix(s: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|scheme| scheme.prefix() == s)
    }

    /// Whether the backend reads the local machine (no network, no server).
    pub fn is_local(self) -> bool {
        matches!(self, Scheme::File | Scheme::Env)
    }

    /// Whether `@version` is meaningful for this backend.
    fn has_versions(self) -> bool {
        matches!(self, Scheme::Vault | Scheme::Ssm | Scheme::SecretsManager)
    }

    /// Whether `?name=value` parameters are meaningful for this backend.
    fn has_params(self) -> bool {
        matches!(
            self,
            Scheme::Vault | Scheme::Kms | Scheme::Consul | Scheme::Service
        )
    }

    /// Whether a trailing `/` (a prefix read) is supported.
    fn has_prefixes(self) -> bool {
        matches!(
            self,
            Scheme::Consul | Scheme::Vault | Scheme::Ssm | Scheme::File
        )
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())
    }
}

/// How the reference was written, so it can be printed back the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Form {
    /// `scheme:path…`
    Scheme,
    /// An AWS ARN (`arn:PARTITION:ssm:…` or `arn:PARTITION:secretsmanager:…`).
    Arn {
        /// `aws`, `aws-cn`, `aws-us-gov`…
        partition: String,
        /// The region the request goes to, whatever the default region.
        region: String,
        /// The account id, as written.
        account: String,
    },
}

/// What has to be fetched: the unit of de-duplication, batching and caching.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// The backend that serves it.
    pub scheme: Scheme,
    /// Key, path, parameter name, secret id, ciphertext, file path or variable
    /// name. For an SSM ARN this is the whole ARN (the API accepts it as a
    /// name); for a Secrets Manager ARN it is the ARN up to the secret name.
    pub path: String,
    /// `@VERSION`: an SSM version or label, a Secrets Manager stage or
    /// version id, a Vault KV v2 version; `None`: the current one.
    pub version: Option<String>,
    /// `?NAME=VALUE` parameters, by name (Consul `dc`, `service:` filters,
    /// KMS key and context, the body of a Vault write).
    pub params: BTreeMap<String, String>,
    /// How it was written, to print it back the same way.
    pub form: Form,
}

impl Source {
    /// A trailing slash: every value below the path, as a map.
    pub fn is_prefix(&self) -> bool {
        self.path.ends_with('/')
    }

    /// A prefix read or a service: the value is a collection, and an empty
    /// one is treated as missing.
    pub fn is_collection(&self) -> bool {
        self.is_prefix() || self.scheme == Scheme::Service
    }

    /// The AWS region named by an ARN, if the reference was written as one.
    pub fn region(&self) -> Option<&str> {
        match &self.form {
            Form::Arn { region, .. } => Some(region),
            Form::Scheme => None,
        }
    }
}

/// A dotted selector inside a structured (JSON, YAML, TOML) value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Field(pub Vec<String>);

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            for c in key.chars() {
                if matches!(c, '.' | '\\' | '|' | '@') {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// A parsed reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// What to fetch.
    pub source: Source,
    /// `#FIELD`: what to select inside the fetched value; `None`: all of it.
    pub field: Option<Field>,
    /// A missing value is not an error: it renders as an empty string (or an
    /// empty map for a prefix).
    pub optional: bool,
    /// A missing value is replaced by this text.
    pub default: Option<String>,
}

impl Reference {
    /// True when a missing value is acceptable (optional, or has a default).
    pub fn tolerates_missing(&self) -> bool {
        self.optional || self.default.is_some()
    }
}

/// A syntax error, pointing at the offending character.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The reference as shown under the message: control characters
    /// replaced, an over-long one cut short.
    pub input: String,
    /// Character offset (not byte offset) of the offending character.
    pub at: usize,
    /// What is wrong, in a few words.
    pub message: String,
    /// How to write it instead, when there is a likely fix.
    pub hint: Option<String>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The reference on its own line with a caret under the offending
        // character, so the pointer stays aligned whatever precedes the message.
        write!(
            f,
            "invalid reference: {} (at character {})\n    {}\n    {}^",
            self.message,
            self.at + 1,
            self.input,
            " ".repeat(self.at)
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// Whether `name` can be an environment variable's name: letters, digits
/// and `_`, not starting with a digit.
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
}

/// True when `s` starts like a reference (a known scheme or a supported ARN).
/// `envrender run` uses this to decide which environment variables to resolve;
/// everything else is passed through untouched.
pub fn looks_like_reference(s: &str) -> bool {
    if let Some((scheme, _)) = s.split_once(':')
        && Scheme::from_prefix(scheme).is_some()
    {
        return true;
    }
    s.starts_with("arn:") && (s.contains(":ssm:") || s.contains(":secretsmanager:"))
}

impl std::str::FromStr for Reference {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// The longest reference accepted, in characters: far above any backend's
/// own limit on names (SSM: 2,048), low enough that a value pasted where a
/// reference belongs is caught.
pub const MAX_LEN: usize = 4096;

/// Parses one reference.
pub fn parse(input: &str) -> Result<Reference, ParseError> {
    let len = input.chars().count();
    if len > MAX_LEN {
        const SHOWN: usize = 60;
        return Err(ParseError {
            input: format!("{}…", input.chars().take(SHOWN).collect::<String>()),
            at: SHOWN,
            message: format!("the reference is {len} characters long; the limit is {MAX_LEN}"),
            hint: Some(
                "a reference names a value (consul:app/key); check that a value was not pasted in its place"
                    .to_string(),
            ),
        });
    }
    if let Some((at, c)) = input.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(ParseError {
            // Shown with each control character replaced, so the line stays
            // on one line and the caret under it.
            input: input
                .chars()
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect(),
            at,
            message: format!("control character U+{:04X} in the reference", c as u32),
            hint: Some(
                "remove it; a newline or tab at the end often comes from a file or a variable read with its line ending"
                    .to_string(),
            ),
        });
    }
    Parser::new(input).reference()
}

struct Parser<'a> {
    input: &'a str,
    chars: Vec<char>,
}

/// A piece of the input with its escapes removed, remembering where it started.
struct Piece {
    text: String,
    start: usize,
}

const SPECIALS: [char; 5] = ['\\', '@', '#', '?', '|'];

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            chars: input.chars().collect(),
        }
    }

    fn error(&self, at: usize, message: impl Into<String>) -> ParseError {
        ParseError {
            input: self.input.to_string(),
            at,
            message: message.into(),
            hint: None,
        }
    }

    fn error_hint(
        &self,
        at: usize,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> ParseError {
        ParseError {
            hint: Some(hint.into()),
            ..self.error(at, message)
        }
    }

    /// Index of the first unescaped `c` in `start..end`.
    fn find(&self, c: char, start: usize, end: usize) -> Option<usize> {
        let mut i = start;
        while i < end {
            match self.chars[i] {
                '\\' => i += 2,
                x if x == c => return Some(i),
                _ => i += 1,
            }
        }
        None
    }

    /// Index of the last unescaped `c` in `start..end`.
    fn rfind(&self, c: char, start: usize, end: usize) -> Option<usize> {
        let mut found = None;
        let mut i = start;
        while i < end {
            match self.chars[i] {
                '\\' => i += 2,
                x if x == c => {
                    found = Some(i);
                    i += 1
                }
                _ => i += 1,
            }
        }
        found
    }

    /// The text of `start..end` with escapes removed.
    fn unescape(&self, start: usize, end: usize, allowed: &[char]) -> Result<Piece, ParseError> {
        let mut text = String::new();
        let mut i = start;
        while i < end {
            let c = self.chars[i];
            if c == '\\' {
                match self.chars.get(i + 1) {
                    Some(&next) if i + 1 < end && allowed.contains(&next) => {
                        text.push(next);
                        i += 2;
                    }
                    Some(&next) if i + 1 < end => {
                        return Err(self.error_hint(
                            i,
                            format!("'\\{next}' is not an escape"),
                            format!(
                                "a backslash escapes only {}; write '\\\\' for a backslash",
                                allowed
                                    .iter()
                                    .map(|c| format!("'{c}'"))
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            ),
                        ));
                    }
                    _ => return Err(self.error(i, "a backslash at the end escapes nothing")),
                }
            } else {
                text.push(c);
                i += 1;
            }
        }
        Ok(Piece { text, start })
    }

    fn reference(&self) -> Result<Reference, ParseError> {
        let len = self.chars.len();
        if len == 0 {
            return Err(self.error_hint(
                0,
                "empty reference",
                "write scheme:path, e.g. ssm:/app/db/password",
            ));
        }
        // Modifiers: everything after the first unescaped '|'.
        let body_end = self.find('|', 0, len).unwrap_or(len);
        let (optional, default) = self.modifiers(body_end)?;
        if self.input.starts_with("arn:") {
            return self.arn(body_end, optional, default);
        }
        let Some(colon) = self.chars[..body_end].iter().position(|&c| c == ':') else {
            return Err(self.error_hint(
                0,
                "no scheme",
                format!("start with one of {}", scheme_list()),
            ));
        };
        let scheme_text: String = self.chars[..colon].iter().collect();
        let Some(scheme) = Scheme::from_prefix(&scheme_text) else {
            return Err(self.error_hint(
                0,
                format!("unknown scheme \"{scheme_text}\""),
                format!(
                    "use one of {}, or an SSM or Secrets Manager ARN",
                    scheme_list()
                ),
            ));
        };
        let start = colon + 1;
        // Field: after the first unescaped '#'.
        let field_at = self.find('#', start, body_end);
        let head_end = field_at.unwrap_or(body_end);
        let field = match field_at {
            Some(at) => Some(self.field(at + 1, body_end)?),
            None => None,
        };
        // Parameters: after the first unescaped '?'.
        let params_at = self.find('?', start, head_end);
        let path_end = params_at.unwrap_or(head_end);
        let params = match params_at {
            Some(at) => {
                if !scheme.has_params() {
                    return Err(self.error_hint(
                        at,
                        format!("{scheme}: references take no '?' parameters"),
                        "escape a literal '?' in the path as '\\?'",
                    ));
                }
                self.params(at + 1, head_end)?
            }
            None => BTreeMap::new(),
        };
        // Version: after the last unescaped '@', for backends with versions.
        let version_at = if scheme.has_versions() {
            self.rfind('@', start, path_end)
        } else {
            None
        };
        let path_stop = version_at.unwrap_or(path_end);
        let path_allowed: &[char] = if scheme.has_versions() {
            &SPECIALS
        } else {
            &['\\', '#', '?', '|']
        };
        let path = self.unescape(start, path_stop, path_allowed)?;
        let version = match version_at {
            Some(at) => {
                let v = self.unescape(at + 1, path_end, &SPECIALS)?;
                if v.text.is_empty() {
                    return Err(self.error(at, "empty version after '@'"));
                }
                Some(v)
            }
            None => None,
        };
        // An unescaped '@' in the field of a versioned backend is the ECS
        // habit of writing the stage last: say how to write it.
        if let Some(f) = field_at
            && version_at.is_none()
            && scheme.has_versions()
            && let Some(at) = self.find('@', f + 1, body_end)
        {
            let stage: String = self.chars[at + 1..body_end].iter().collect();
            let key: String = self.chars[f + 1..at].iter().collect();
            if !stage.is_empty()
                && (scheme != Scheme::Vault || stage.chars().all(|c| c.is_ascii_digit()))
            {
                return Err(self.error_hint(
                    at,
                    "the version must come before the field",
                    format!(
                        "write {scheme}:{}@{stage}#{key}, or escape a literal '@' in the key as '\\@'",
                        path.text
                    ),
                ));
            }
        }
        let source = self.check_source(scheme, path, version, params)?;
        Ok(Reference {
            source,
            field,
            optional,
            default,
        })
    }

    /// `|optional` and `|default=TEXT` after `body_end`.
    fn modifiers(&self, body_end: usize) -> Result<(bool, Option<String>), ParseError> {
        let len = self.chars.len();
        let mut optional = false;
        let mut default = None;
        let mut at = body_end;
        while at < len {
            // at points at a '|'
            let start = at + 1;
            let rest: String = self.chars[start..].iter().collect();
            if let Some(text) = rest.strip_prefix("default=") {
                if default.is_some() {
                    return Err(self.error(start, "default given twice"));
                }
                // The default takes the rest of the string, verbatim.
                default = Some(text.to_string());
                break;
            }
            let end = self.find('|', start, len).unwrap_or(len);
            let word: String = self.chars[start..end].iter().collect();
            match word.as_str() {
                "optional" => {
                    if optional {
                        return Err(self.error(start, "'optional' given twice"));
                    }
                    optional = true;
                }
                _ => {
                    return Err(self.error_hint(
                        start,
                        format!("unknown modifier \"{word}\""),
                        "modifiers are '|optional' and '|default=TEXT'; escape a literal '|' as '\\|'",
                    ));
                }
            }
            at = end;
        }
        Ok((optional, default))
    }

    fn field(&self, start: usize, end: usize) -> Result<Field, ParseError> {
        let mut keys = Vec::new();
        let mut key_start = start;
        let mut i = start;
        loop {
            let at_end = i >= end;
            if at_end || self.chars[i] == '.' {
                let key = self.unescape(key_start, i, &['\\', '.', '|', '#', '@', '?'])?;
                if key.text.is_empty() {
                    return Err(self.error_hint(
                        key.start.min(self.chars.len().saturating_sub(1)),
                        "empty key in field selector",
                        "a field is dotted keys, e.g. #db.password; escape a literal '.' as '\\.'",
                    ));
                }
                keys.push(key.text);
                if at_end {
                    break;
                }
                key_start = i + 1;
                i += 1;
            } else if self.chars[i] == '\\' {
                i += 2;
            } else {
                i += 1;
            }
        }
        Ok(Field(keys))
    }

    fn params(&self, start: usize, end: usize) -> Result<BTreeMap<String, String>, ParseError> {
        let mut params = BTreeMap::new();
        let mut pair_start = start;
        loop {
            let pair_end = self.find('&', pair_start, end).unwrap_or(end);
            let Some(eq) = self.find('=', pair_start, pair_end) else {
                return Err(self.error_hint(
                    pair_start,
                    "parameter without '='",
                    "parameters are name=value pairs joined by '&'",
                ));
            };
            let name = self.unescape(pair_start, eq, &SPECIALS)?;
            let value = self.unescape(eq + 1, pair_end, &SPECIALS)?;
            if name.text.is_empty() {
                return Err(self.error(pair_start, "empty parameter name"));
            }
            if params.insert(name.text.clone(), value.text).is_some() {
                return Err(self.error(
                    pair_start,
                    format!("parameter \"{}\" given twice", name.text),
                ));
            }
            if pair_end >= end {
                break;
            }
            pair_start = pair_end + 1;
        }
        Ok(params)
    }

    /// Backend-specific rules on the path, version and parameters.
    fn check_source(
        &self,
        scheme: Scheme,
        path: Piece,
        version: Option<Piece>,
        params: BTreeMap<String, String>,
    ) -> Result<Source, ParseError> {
        let at = path.start;
        let p = &path.text;
        if p.is_empty() {
            return Err(self.error_hint(at, format!("{scheme}: empty path"), example(scheme)));
        }
        if p.ends_with('/') && !scheme.has_prefixes() {
            return Err(self.error_hint(
                at + p.chars().count() - 1,
                format!("{scheme}: references cannot be prefixes (trailing '/')"),
                example(scheme),
            ));
        }
        if p.ends_with('/')
            && let Some(v) = &version
        {
            return Err(self.error(v.start - 1, "a prefix reference cannot take a version"));
        }
        match scheme {
            Scheme::Consul | Scheme::Vault => {
                if scheme == Scheme::Consul
                    && let Some(name) = params.keys().find(|k| *k != "dc")
                {
                    return Err(self.error_hint(
                        at + p.chars().count() + 1,
                        format!("consul: parameter \"{name}\" is not understood"),
                        "consul: takes dc=DATACENTER",
                    ));
                }
                if p.starts_with('/') {
                    return Err(self.error_hint(
                        at,
                        format!("{scheme}: path starts with '/'"),
                        format!(
                            "write the path without the leading slash: {scheme}:{}",
                            p.trim_start_matches('/')
                        ),
                    ));
                }
                if let Some(bad) = p.find("//") {
                    return Err(
                        self.error(at + p[..bad].chars().count(), "empty path segment ('//')")
                    );
                }
            }
            Scheme::Ssm => {
                if let Some((i, c)) = p
                    .chars()
                    .enumerate()
                    .find(|(_, c)| !(c.is_ascii_alphanumeric() || "_.-/".contains(*c)))
                {
                    return Err(self.error_hint(
                        at + i,
                        format!("'{c}' cannot appear in an SSM parameter name"),
                        "SSM names use letters, digits and _ . - /",
                    ));
                }
                if p.ends_with('/') && !p.starts_with('/') {
                    return Err(self.error_hint(
                        at,
                        "an SSM path (prefix) must start with '/'",
                        format!("write ssm:/{p}"),
                    ));
                }
                if let Some(v) = &version {
                    check_ssm_version(self, v)?;
                }
            }
            Scheme::SecretsManager => {
                if let Some((i, c)) = p
                    .chars()
                    .enumerate()
                    .find(|(_, c)| !(c.is_ascii_alphanumeric() || "/_+=.@-:".contains(*c)))
                {
                    return Err(self.error_hint(
                        at + i,
                        format!("'{c}' cannot appear in a Secrets Manager secret name"),
                        "secret names use letters, digits and / _ + = . @ -",
                    ));
                }
            }
            Scheme::Kms => {
                use base64::Engine as _;
                if base64::engine::general_purpose::STANDARD.decode(p).is_err() {
                    return Err(self.error_hint(
                        at,
                        "kms: ciphertext is not valid base64",
                        "pass the CiphertextBlob as standard base64 (as `aws kms encrypt` prints it)",
                    ));
                }
                for name in params.keys() {
                    if name != "key_id" && !name.starts_with("context.") {
                        return Err(self.error_hint(
                            at + p.chars().count() + 1,
                            format!("unknown kms: parameter \"{name}\""),
                            "kms: takes key_id=KEY and context.NAME=VALUE (encryption context)",
                        ));
                    }
                }
            }
            Scheme::File => {}
            Scheme::Service => {
                if let Some((i, c)) = p
                    .chars()
                    .enumerate()
                    .find(|(_, c)| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
                {
                    return Err(self.error_hint(
                        at + i,
                        format!("'{c}' cannot appear in a Consul service name"),
                        "service names use letters, digits and _ . -",
                    ));
                }
                for (name, value) in &params {
                    let ok = match name.as_str() {
                        "dc" | "tag" => !value.is_empty(),
                        "passing" => value == "true" || value == "false",
                        _ => false,
                    };
                    if !ok {
                        return Err(self.error_hint(
                            at + p.chars().count() + 1,
                            format!("service: parameter {name}={value} is not understood"),
                            "service: takes dc=DATACENTER, tag=TAG and passing=true|false",
                        ));
                    }
                }
            }
            Scheme::Env => {
                if !is_env_name(p) {
                    return Err(self.error_hint(
                        at,
                        format!("\"{p}\" is not an environment variable name"),
                        "names are letters, digits and '_', not starting with a digit",
                    ));
                }
            }
        }
        if scheme == Scheme::Vault
            && let Some(v) = &version
            && !v.text.chars().all(|c| c.is_ascii_digit())
        {
            return Err(self.error_hint(
                v.start,
                "a Vault version is a number",
                "write vault:secret/app@3 for version 3 of a KV v2 secret",
            ));
        }
        Ok(Source {
            scheme,
            path: path.text,
            version: version.map(|v| v.text),
            params,
            form: Form::Scheme,
        })
    }

    /// `arn:PARTITION:ssm:REGION:ACCOUNT:parameter/NAME[#field]` or
    /// `arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME[:key[:stage[:id]]]`.
    fn arn(
        &self,
        body_end: usize,
        optional: bool,
        default: Option<String>,
    ) -> Result<Reference, ParseError> {
        let body: String = self.chars[..body_end].iter().collect();
        let parts: Vec<&str> = body.splitn(6, ':').collect();
        if parts.len() < 6 {
            return Err(self.error_hint(
                0,
                "incomplete ARN",
                "expected arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE",
            ));
        }
        let offset = |n: usize| {
            parts[..n]
                .iter()
                .map(|p| p.chars().count() + 1)
                .sum::<usize>()
        };
        let (partition, service, region, account, resource) =
            (parts[1], parts[2], parts[3], parts[4], parts[5]);
        if !partition.starts_with("aws") {
            return Err(self.error(offset(1), format!("unknown partition \"{partition}\"")));
        }
        if !matches!(service, "ssm" | "secretsmanager") {
            return Err(self.error_hint(
                offset(2),
                format!("ARNs of service \"{service}\" are not references"),
                "ARNs of ssm (parameters) and secretsmanager (secrets) are accepted",
            ));
        }
        if region.is_empty() {
            return Err(self.error(offset(3), "the ARN has no region"));
        }
        let form = Form::Arn {
            partition: partition.to_string(),
            region: region.to_string(),
            account: account.to_string(),
        };
        match service {
            "ssm" => {
                let res_at = offset(5);
                let (res, field) = match self.find('#', res_at, body_end) {
                    Some(h) => (
                        self.chars[res_at..h].iter().collect::<String>(),
                        Some(self.field(h + 1, body_end)?),
                    ),
                    None => (resource.to_string(), None),
                };
                let Some(name) = res.strip_prefix("parameter/") else {
                    return Err(self.error_hint(
                        res_at,
                        "an SSM ARN names a parameter",
                        "expected arn:aws:ssm:REGION:ACCOUNT:parameter/NAME",
                    ));
                };
                if name.is_empty() || name.ends_with('/') {
                    return Err(self.error(res_at + 10, "the ARN names no parameter"));
                }
                let path = format!("arn:{partition}:ssm:{region}:{account}:{res}");
                Ok(Reference {
                    source: Source {
                        scheme: Scheme::Ssm,
                        path,
                        version: None,
                        params: BTreeMap::new(),
                        form,
                    },
                    field,
                    optional,
                    default,
                })
            }
            "secretsmanager" => {
                let res_at = offset(5);
                let Some(rest) = resource.strip_prefix("secret:") else {
                    return Err(self.error_hint(
                        res_at,
                        "a Secrets Manager ARN names a secret",
                        "expected arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME[:json-key[:stage[:version-id]]]",
                    ));
                };
                let fields: Vec<&str> = rest.split(':').collect();
                if fields.len() > 4 {
                    return Err(self.error(
                        res_at + 7 + fields[..4].iter().map(|f| f.len() + 1).sum::<usize>() - 1,
                        "too many ':' parts after the secret name (name:json-key:stage:version-id)",
                    ));
                }
                let name = fields[0];
                if name.is_empty() {
                    return Err(self.error(res_at + 7, "the ARN names no secret"));
                }
                let nonempty = |i: usize| {
                    fields
                        .get(i)
                        .filter(|s| !s.is_empty())
                        .map(|s| s.to_string())
                };
                let field = match nonempty(1) {
                    Some(key) => {
                        let key_at = res_at + 7 + name.chars().count() + 1;
                        Some(self.field(key_at, key_at + key.chars().count())?)
                    }
                    None => None,
                };
                let (stage, id) = (nonempty(2), nonempty(3));
                if stage.is_some() && id.is_some() {
                    return Err(self.error_hint(
                        res_at,
                        "give a version stage or a version id, not both",
                        "ECS accepts one of the two",
                    ));
                }
                Ok(Reference {
                    source: Source {
                        scheme: Scheme::SecretsManager,
                        path: format!(
                            "arn:{partition}:secretsmanager:{region}:{account}:secret:{name}"
                        ),
                        version: stage.or(id),
                        params: BTreeMap::new(),
                        form,
                    },
                    field,
                    optional,
                    default,
                })
            }
            _ => unreachable!("service checked above"),
        }
    }
}

fn check_ssm_version(p: &Parser<'_>, v: &Piece) -> Result<(), ParseError> {
    let t = &v.text;
    if t.chars().all(|c| c.is_ascii_digit()) {
        if t.starts_with('0') {
            return Err(p.error(v.start, "SSM versions start at 1"));
        }
        return Ok(());
    }
    if let Some((i, c)) = t
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(p.error_hint(
            v.start + i,
            format!("'{c}' cannot appear in an SSM label"),
            "labels use letters, digits and _ . -",
        ));
    }
    if t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(p.error_hint(
            v.start,
            "an SSM label cannot start with a digit",
            "a version is all digits (@3); a label starts with a letter (@live)",
        ));
    }
    Ok(())
}

fn scheme_list() -> String {
    Scheme::ALL
        .iter()
        .map(|s| format!("{s}:"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn example(scheme: Scheme) -> String {
    let e = match scheme {
        Scheme::Consul => "consul:app/prod/db_host or consul:app/prod/ (a prefix)",
        Scheme::Vault => "vault:secret/app#password",
        Scheme::Ssm => "ssm:/app/prod/db/password or ssm:/app/prod/ (a prefix)",
        Scheme::SecretsManager => "sm:prod/db#password",
        Scheme::Kms => "kms:AQICAH… (base64 ciphertext)",
        Scheme::File => "file:./values.yaml#db.password or file:/run/secrets/ (a directory)",
        Scheme::Env => "env:DB_PASSWORD",
        Scheme::Service => "service:web or service:web?tag=primary",
    };
    format!("e.g. {e}")
}

fn escape_into(out: &mut String, text: &str, specials: &[char]) {
    for c in text.chars() {
        if specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        match (&self.form, self.scheme) {
            (Form::Arn { .. }, Scheme::SecretsManager) => {
                out.push_str(&self.path);
                if let Some(v) = &self.version {
                    out.push_str("::");
                    out.push_str(v);
                }
            }
            (Form::Arn { .. }, _) => out.push_str(&self.path),
            (Form::Scheme, scheme) => {
                out.push_str(scheme.prefix());
                out.push(':');
                let specials: &[char] = if scheme.has_versions() {
                    &SPECIALS
                } else {
                    &['\\', '#', '?', '|']
                };
                escape_into(&mut out, &self.path, specials);
                if let Some(v) = &self.version {
                    out.push('@');
                    escape_into(&mut out, v, &SPECIALS);
                }
                for (i, (name, value)) in self.params.iter().enumerate() {
                    out.push(if i == 0 { '?' } else { '&' });
                    escape_into(&mut out, name, &['\\', '@', '#', '?', '|', '&', '=']);
                    out.push('=');
                    escape_into(&mut out, value, &['\\', '@', '#', '?', '|', '&']);
                }
            }
        }
        f.write_str(&out)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source.form, self.source.scheme) {
            (Form::Arn { .. }, Scheme::SecretsManager) => {
                // ECS form: NAME:json-key:stage:version-id
                write!(f, "{}", self.source.path)?;
                let field = self
                    .field
                    .as_ref()
                    .map(|k| k.to_string())
                    .unwrap_or_default();
                match &self.source.version {
                    Some(v) if is_version_id(v) => write!(f, ":{field}::{v}")?,
                    Some(v) => write!(f, ":{field}:{v}")?,
                    None if !field.is_empty() => write!(f, ":{field}")?,
                    None => {}
                }
            }
            _ => {
                write!(f, "{}", self.source)?;
                if let Some(field) = &self.field {
                    write!(f, "#{field}")?;
                }
            }
        }
        if self.optional {
            f.write_str("|optional")?;
        }
        if let Some(d) = &self.default {
            write!(f, "|default={d}")?;
        }
        Ok(())
    }
}

/// Secrets Manager version ids are UUIDs; anything else after `@` is a stage.
pub fn is_version_id(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && v.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Reference {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn control_characters_and_overlong_references_are_refused() {
        let e = err("consul:app\u{1}x");
        assert_eq!(e.at, 10);
        assert!(e.message.contains("U+0001"), "{e}");
        assert!(!e.to_string().contains('\u{1}'));
        let e = err("ssm:/app/x\n");
        assert!(e.message.contains("U+000A"), "{e}");
        let long = format!("consul:{}", "a".repeat(MAX_LEN));
        let e = err(&long);
        assert!(e.message.contains("the limit is 4096"), "{e}");
        assert!(e.to_string().len() < 400, "{e}");
        assert!(parse(&format!("consul:{}", "a".repeat(MAX_LEN - 7))).is_ok());
    }

    fn err(s: &str) -> ParseError {
        match parse(s) {
            Ok(r) => panic!("{s} parsed as {r:?}"),
            Err(e) => e,
        }
    }

    fn roundtrip(s: &str) {
        let r = ok(s);
        let printed = r.to_string();
        let again = ok(&printed);
        assert_eq!(r, again, "{s} printed as {printed}");
        assert_eq!(printed, again.to_string());
    }

    #[test]
    fn consul_key_and_prefix() {
        let r = ok("consul:app/prod/db_host");
        assert_eq!(r.source.scheme, Scheme::Consul);
        assert_eq!(r.source.path, "app/prod/db_host");
        assert!(!r.source.is_prefix());
        let p = ok("consul:app/prod/");
        assert!(p.source.is_prefix());
        // '@' is part of a Consul key: Consul has no versions.
        let a = ok("consul:users/ann@example.com");
        assert_eq!(a.source.path, "users/ann@example.com");
        assert_eq!(a.source.version, None);
    }

    #[test]
    fn vault_field_version_params() {
        // An '@' in a Vault field is text unless it looks like a version.
        assert_eq!(
            ok("vault:secret/users#ann@example.com").field,
            Some(Field(vec!["ann@example".into(), "com".into()]))
        );
        assert!(
            err("vault:secret/app#password@2")
                .message
                .contains("before the field")
        );
        let r = ok("vault:secret/app#password");
        assert_eq!(r.source.path, "secret/app");
        assert_eq!(r.field, Some(Field(vec!["password".into()])));
        let v = ok("vault:secret/app@3#db.password");
        assert_eq!(v.source.version.as_deref(), Some("3"));
        assert_eq!(v.field, Some(Field(vec!["db".into(), "password".into()])));
        let p = ok("vault:pki/issue/web?common_name=app.example.com&ttl=24h#certificate");
        assert_eq!(p.source.params["common_name"], "app.example.com");
        assert_eq!(p.source.params["ttl"], "24h");
        assert_eq!(
            err("vault:secret/app@latest").message,
            "a Vault version is a number"
        );
        assert!(
            err("vault:/secret/app")
                .hint
                .unwrap()
                .contains("vault:secret/app")
        );
    }

    #[test]
    fn ssm_names_versions_labels_prefixes() {
        let r = ok("ssm:/app/prod/db/password");
        assert_eq!(r.source.path, "/app/prod/db/password");
        assert_eq!(ok("ssm:/app/x@3").source.version.as_deref(), Some("3"));
        assert_eq!(
            ok("ssm:/app/x@live").source.version.as_deref(),
            Some("live")
        );
        assert!(ok("ssm:/app/prod/").source.is_prefix());
        assert_eq!(ok("ssm:plain-name").source.path, "plain-name");
        let e = err("ssm:/app/x@");
        assert_eq!(e.at, 10);
        assert_eq!(err("ssm:/app/x@0").message, "SSM versions start at 1");
        assert!(
            err("ssm:/app/x@1abc")
                .message
                .contains("cannot start with a digit")
        );
        let e = err("ssm:/app/db pass");
        assert_eq!(e.at, 11);
        assert!(e.message.contains("' '"));
        assert_eq!(
            err("ssm:app/").message,
            "an SSM path (prefix) must start with '/'"
        );
        assert!(err("ssm:/app/@3").message.contains("prefix"));
    }

    #[test]
    fn ssm_arn() {
        let r = ok("arn:aws:ssm:eu-west-1:123456789012:parameter/app/x");
        assert_eq!(r.source.scheme, Scheme::Ssm);
        assert_eq!(r.source.region(), Some("eu-west-1"));
        assert_eq!(
            r.source.path,
            "arn:aws:ssm:eu-west-1:123456789012:parameter/app/x"
        );
        let f = ok("arn:aws:ssm:eu-west-1:123456789012:parameter/app/json#a.b|optional");
        assert_eq!(f.field, Some(Field(vec!["a".into(), "b".into()])));
        assert!(f.optional);
        assert!(
            err("arn:aws:ssm:eu-west-1:1:document/x")
                .message
                .contains("names a parameter")
        );
        assert!(err("arn:aws:s3:::bucket").message.contains("\"s3\""));
        assert_eq!(err("arn:aws:ssm").message, "incomplete ARN");
    }

    #[test]
    fn secrets_manager_name_and_arn() {
        let r = ok("sm:prod/db#password");
        assert_eq!(r.source.scheme, Scheme::SecretsManager);
        assert_eq!(r.source.path, "prod/db");
        assert_eq!(r.field, Some(Field(vec!["password".into()])));
        let s = ok("sm:prod/db@AWSPREVIOUS");
        assert_eq!(s.source.version.as_deref(), Some("AWSPREVIOUS"));
        // '@' may appear in secret names: the last one separates the version.
        let at = ok("sm:team\\@corp/db@AWSCURRENT");
        assert_eq!(at.source.path, "team@corp/db");
        assert_eq!(at.source.version.as_deref(), Some("AWSCURRENT"));
        // Field before version is the ECS order mistake: say how to fix it.
        let e = err("sm:prod/db#password@AWSPREVIOUS");
        assert_eq!(e.message, "the version must come before the field");
        assert!(e.hint.unwrap().contains("sm:prod/db@AWSPREVIOUS#password"));
        assert_eq!(err("sm:prod/db#password@AWSPREVIOUS|optional").at, 19);
        let escaped = ok(r"sm:prod/db#user\@corp");
        assert_eq!(escaped.field, Some(Field(vec!["user@corp".into()])));

        let a = ok(
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf:password:AWSPREVIOUS:",
        );
        assert_eq!(
            a.source.path,
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"
        );
        assert_eq!(a.field, Some(Field(vec!["password".into()])));
        assert_eq!(a.source.version.as_deref(), Some("AWSPREVIOUS"));
        assert_eq!(a.source.region(), Some("us-east-1"));
        let id = ok(
            "arn:aws:secretsmanager:us-east-1:1:secret:db:::0b4f6a52-8e4c-4c3e-9f1e-6a7b8c9d0e1f",
        );
        assert_eq!(id.field, None);
        assert!(is_version_id(id.source.version.as_deref().unwrap()));
        let bare = ok("arn:aws:secretsmanager:us-east-1:1:secret:db");
        assert_eq!(bare.field, None);
        assert_eq!(bare.source.version, None);
        assert!(err("arn:aws:secretsmanager:us-east-1:1:secret:db:k:AWSCURRENT:0b4f6a52-8e4c-4c3e-9f1e-6a7b8c9d0e1f")
            .message
            .contains("not both"));
        assert!(
            err("arn:aws:secretsmanager:us-east-1:1:secret:db:a:b:c:d")
                .message
                .contains("too many")
        );
        assert!(err("sm:prod/").message.contains("cannot be prefixes"));
    }

    #[test]
    fn kms_ciphertext_and_context() {
        let r = ok("kms:AQICAHg=?context.app=web&key_id=alias/app#token");
        assert_eq!(r.source.path, "AQICAHg=");
        assert_eq!(r.source.params["context.app"], "web");
        assert_eq!(r.source.params["key_id"], "alias/app");
        assert_eq!(r.field, Some(Field(vec!["token".into()])));
        assert!(err("kms:not base64!").message.contains("base64"));
        assert!(err("kms:AQICAHg=?colour=red").message.contains("colour"));
        // '@' is part of base64? No, but kms has no versions, so it's path text.
        assert!(err("kms:AQ@3").message.contains("base64"));
    }

    #[test]
    fn local_sources() {
        let f = ok("file:./local/values.yaml#db.password");
        assert_eq!(f.source.scheme, Scheme::File);
        assert_eq!(f.source.path, "./local/values.yaml");
        assert_eq!(f.field, Some(Field(vec!["db".into(), "password".into()])));
        assert!(ok("file:/run/secrets/").source.is_prefix());
        assert_eq!(ok("file:/srv/a@b.json").source.path, "/srv/a@b.json");
        assert_eq!(ok("env:DB_PASSWORD").source.path, "DB_PASSWORD");
        assert!(
            err("env:1BAD")
                .message
                .contains("not an environment variable name")
        );
        assert!(err("env:A/").message.contains("cannot be prefixes"));
    }

    #[test]
    fn modifiers() {
        let o = ok("env:X|optional");
        assert!(o.optional);
        assert!(o.tolerates_missing());
        let d = ok("consul:app/port|default=8080");
        assert_eq!(d.default.as_deref(), Some("8080"));
        // The default takes the rest verbatim, '|' and '#' included.
        let d = ok("env:X|optional|default=a|b#c");
        assert!(d.optional);
        assert_eq!(d.default.as_deref(), Some("a|b#c"));
        let e = err("env:X|optinal");
        assert_eq!(e.at, 6);
        assert!(e.message.contains("optinal"));
        assert!(err("env:X|optional|optional").message.contains("twice"));
        assert_eq!(ok("env:X|default=").default.as_deref(), Some(""));
    }

    #[test]
    fn escapes() {
        let r = ok(r"consul:weird\#key\?x\|y#field\.with\.dots");
        assert_eq!(r.source.path, "weird#key?x|y");
        assert_eq!(r.field, Some(Field(vec!["field.with.dots".into()])));
        let e = err(r"consul:a\qb");
        assert_eq!(e.at, 8);
        assert!(e.message.contains("not an escape"));
        assert!(err("consul:a\\").message.contains("escapes nothing"));
    }

    #[test]
    fn syntax_errors_point_at_the_character() {
        let e = err("smm:/app/x");
        assert_eq!(e.at, 0);
        assert!(e.message.contains("unknown scheme \"smm\""));
        let shown = e.to_string();
        assert!(
            shown.contains("hint: use one of consul: vault: ssm: sm: kms: file: env: service:")
        );
        let e = err("vault:secret/app#db..password");
        assert!(e.message.contains("empty key"));
        assert_eq!(e.at, 20);
        let e = err("ssm:/x#");
        assert!(e.message.contains("empty key"));
        assert!(err("").message.contains("empty"));
        assert!(err("noscheme").message.contains("no scheme"));
        assert!(err("consul:").message.contains("empty path"));
        assert!(err("consul:a//b").message.contains("//"));
        assert!(err("vault:a?x").message.contains("'='"));
        assert!(err("vault:a?x=1&x=2").message.contains("twice"));
        assert!(err("env:A?x=1").message.contains("no '?' parameters"));
        assert!(
            err("consul:a?stale=1")
                .message
                .contains("\"stale\" is not understood")
        );
        assert_eq!(ok("consul:a/b?dc=dc2").source.params["dc"], "dc2");
        assert!(
            ok("service:web?tag=primary&passing=false")
                .source
                .params
                .contains_key("tag")
        );
        assert!(
            err("service:web?passing=maybe")
                .message
                .contains("passing=maybe")
        );
        assert!(err("service:web/x").message.contains("'/'"));
        // The caret sits under the offending character.
        let e = err("ssm:/app/x@0");
        let shown = e.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[1].trim_start(), "ssm:/app/x@0");
        let caret = lines[2].find('^').unwrap();
        assert_eq!(&lines[1][caret..caret + 1], "0");
    }

    #[test]
    fn sources_dedupe_across_fields_and_modifiers() {
        let a = ok("ssm:/app/x#a");
        let b = ok("ssm:/app/x#b|optional");
        assert_eq!(a.source, b.source);
        assert_ne!(a, b);
        assert_ne!(ok("ssm:/app/x@2").source, ok("ssm:/app/x").source);
    }

    #[test]
    fn looks_like() {
        assert!(looks_like_reference("ssm:/a"));
        assert!(looks_like_reference("arn:aws:ssm:eu-west-1:1:parameter/a"));
        assert!(looks_like_reference(
            "arn:aws:secretsmanager:eu-west-1:1:secret:a"
        ));
        assert!(!looks_like_reference("arn:aws:s3:::bucket"));
        assert!(!looks_like_reference("https://example.com"));
        assert!(!looks_like_reference("postgres://u@h/db"));
        assert!(!looks_like_reference("plain value"));
    }

    #[test]
    fn roundtrips() {
        for s in [
            "consul:app/prod/db_host",
            "consul:app/prod/",
            "consul:users/ann@example.com#name",
            r"consul:weird\#key\?x\|y#field\.with\.dots",
            "vault:secret/app#password",
            "vault:secret/app@3#db.password|optional",
            "vault:pki/issue/web?common_name=app.example.com&ttl=24h#certificate",
            "ssm:/app/prod/db/password",
            "ssm:/app/x@3",
            "ssm:/app/x@live#a.b|default=x|y",
            "ssm:/app/prod/|optional",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/app/x",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/app/x#k|optional",
            "sm:prod/db#password",
            "sm:prod/db@AWSPREVIOUS#password",
            r"sm:prod/db#user\@corp",
            r"sm:team\@corp/db@AWSCURRENT",
            "arn:aws:secretsmanager:us-east-1:1:secret:prod/db-AbCdEf",
            "arn:aws:secretsmanager:us-east-1:1:secret:prod/db-AbCdEf:password",
            "arn:aws:secretsmanager:us-east-1:1:secret:prod/db-AbCdEf:password:AWSPREVIOUS",
            "arn:aws:secretsmanager:us-east-1:1:secret:db:::0b4f6a52-8e4c-4c3e-9f1e-6a7b8c9d0e1f",
            "arn:aws-cn:secretsmanager:cn-north-1:1:secret:db::AWSCURRENT|default=x",
            "kms:AQICAHg=?context.app=web&key_id=alias/app#token",
            "file:./local/values.yaml#db.password",
            "file:/run/secrets/",
            "env:DB_PASSWORD|optional",
            "env:X|default=",
            "consul:app/db?dc=dc2#host",
            "service:web?passing=false&tag=primary",
        ] {
            roundtrip(s);
        }
    }

    #[test]
    fn canonical_printing() {
        // Parameters print sorted; the version before the field.
        assert_eq!(
            ok("vault:pki/issue/web?ttl=1h&common_name=a").to_string(),
            "vault:pki/issue/web?common_name=a&ttl=1h"
        );
        assert_eq!(ok("ssm:/a@3#k").to_string(), "ssm:/a@3#k");
        assert_eq!(
            ok("env:X|default=1|optional").to_string(),
            "env:X|default=1|optional"
        );
    }
}
