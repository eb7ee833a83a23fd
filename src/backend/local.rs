//! Local sources: `file:` and `env:` ("airplane mode").
//!
//! `file:PATH` reads a file. YAML (`.yaml`, `.yml`), JSON, TOML and `.env`
//! files are parsed into structured values so `#a.b.c` can select inside them;
//! any other file is its text. `file:DIR/` reads every file below a directory
//! (a Kubernetes Secret or ConfigMap volume, say) into a map keyed by relative
//! path, skipping hidden entries such as the volume's `..data` links.
//! Relative paths are taken from the working directory.
//!
//! `env:NAME` reads one environment variable.
//!
//! Parse errors report a line and column only: the text of a values file is
//! secret, and parser messages quote it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Backend, BoxFuture, ErrorKind, FetchError, Fetched, PlannedCall, Watching};
use crate::environment::Environment;
use crate::reference::Source;
use crate::secret::Secret;

/// Deepest directory level a `file:DIR/` read descends to.
const MAX_DEPTH: usize = 16;

/// `file:PATH` and `file:DIR/`.
pub struct FileBackend;

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        sources
            .iter()
            .map(|s| PlannedCall {
                target: None,
                action: if s.is_prefix() {
                    "read directory"
                } else {
                    "read file"
                }
                .to_string(),
                detail: s.path.clone(),
            })
            .collect()
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(sources.len());
            for source in sources {
                let path = PathBuf::from(&source.path);
                let result = if source.is_prefix() {
                    read_directory(path).await
                } else {
                    read_file(path).await
                };
                out.push(result.map(|v| Fetched::new(Secret::new(v))));
            }
            out
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for FileBackend {
    fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(2)
    }
}

fn io_error(action: &str, path: &Path, e: &std::io::Error) -> FetchError {
    let shown = path.display().to_string();
    let (kind, hint) = match e.kind() {
        std::io::ErrorKind::NotFound => (
            ErrorKind::NotFound,
            Some(if path.is_relative() {
                format!(
                    "relative paths are taken from the working directory ({})",
                    std::env::current_dir()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|_| "unknown".into())
                )
            } else {
                "check the path and that the volume is mounted".to_string()
            }),
        ),
        std::io::ErrorKind::PermissionDenied => (
            ErrorKind::Denied,
            Some(format!(
                "make it readable by uid {} (envrender's user)",
                nix::unistd::getuid()
            )),
        ),
        std::io::ErrorKind::IsADirectory => (
            ErrorKind::Invalid,
            Some(
                "it is a directory: end the reference with '/' to read every file in it"
                    .to_string(),
            ),
        ),
        std::io::ErrorKind::Interrupted
        | std::io::ErrorKind::TimedOut
        | std::io::ErrorKind::WouldBlock
        | std::io::ErrorKind::ResourceBusy => (ErrorKind::Transient, None),
        _ => (ErrorKind::Invalid, None),
    };
    let mut err = FetchError::new(kind, "file", action, e.to_string()).resource(shown);
    err.hint = hint;
    err
}

async fn read_file(path: PathBuf) -> Result<Value, FetchError> {
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| io_error("read file", &path, &e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        FetchError::new(
            ErrorKind::Invalid,
            "file",
            "read file",
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
        .resource(path.display().to_string())
        .hint("store binary data base64-encoded and decode it with the base64_decode helper")
    })?;
    parse_document(&path, text).map_err(|message| {
        FetchError::new(ErrorKind::Invalid, "file", "parse file", message)
            .resource(path.display().to_string())
    })
}

/// The kinds of document a values file can be, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.yaml`, `.yml`.
    Yaml,
    /// `.json`.
    Json,
    /// `.toml`.
    Toml,
    /// `.env`, or a file named `.env`: a map of its variables.
    Dotenv,
    /// Anything else: the file's text as one string.
    Text,
}

impl Format {
    /// The format of `path`, by its extension (any case).
    pub fn of(path: &Path) -> Format {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "yaml" | "yml" => Format::Yaml,
            "json" => Format::Json,
            "toml" => Format::Toml,
            "env" => Format::Dotenv,
            _ if name == ".env" => Format::Dotenv,
            _ => Format::Text,
        }
    }
}

/// Parses a values document. The error names only a position, never content.
pub fn parse_document(path: &Path, text: String) -> Result<Value, String> {
    match Format::of(path) {
        Format::Text => Ok(Value::String(text)),
        Format::Json => serde_json::from_str(&text)
            .map_err(|e| format!("not valid JSON at line {}, column {}", e.line(), e.column())),
        Format::Yaml => serde_saphyr::from_str::<Value>(&text).map_err(|e| match e.location() {
            Some(l) => format!("not valid YAML at line {}, column {}", l.line(), l.column()),
            None => "not valid YAML".to_string(),
        }),
        Format::Toml => {
            let table: toml::Table = toml::from_str(&text).map_err(|e| match e.span() {
                Some(span) => {
                    let (line, column) = line_column(&text, span.start);
                    format!("not valid TOML at line {line}, column {column}")
                }
                None => "not valid TOML".to_string(),
            })?;
            serde_json::to_value(table).map_err(|_| "TOML value cannot be represented".to_string())
        }
        Format::Dotenv => {
            let mut map = Map::new();
            for item in dotenvy::from_read_iter(text.as_bytes()) {
                match item {
                    Ok((k, v)) => {
                        map.insert(k, Value::String(v));
                    }
                    Err(dotenvy::Error::LineParse(_, index)) => {
                        let (line, column) = line_column(&text, index);
                        return Err(format!(
                            "not a valid .env line at line {line}, column {column}"
                        ));
                    }
                    Err(_) => return Err("not a valid .env file".to_string()),
                }
            }
            Ok(Value::Object(map))
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

async fn read_directory(root: PathBuf) -> Result<Value, FetchError> {
    let mut map = Map::new();
    let mut pending = vec![(root.clone(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = pending.pop() {
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .map_err(|e| io_error("read directory", &dir, &e))?;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| io_error("read directory", &dir, &e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            // Follows symlinks: volume entries are links into `..data/`.
            let meta = tokio::fs::metadata(&path)
                .await
                .map_err(|e| io_error("read directory", &path, &e))?;
            let key = format!("{rel}{name}");
            if meta.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    pending.push((path, format!("{key}/"), depth + 1));
                }
            } else if meta.is_file() {
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|e| io_error("read file", &path, &e))?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    FetchError::new(ErrorKind::Invalid, "file", "read file", "not UTF-8 text")
                        .resource(path.display().to_string())
                })?;
                map.insert(key, Value::String(text));
            }
        }
    }
    Ok(Value::Object(map))
}

/// `env:NAME`.
pub struct EnvBackend {
    env: Arc<dyn Environment>,
}

impl EnvBackend {
    /// Reads variables from `env` (the process's, or a map in tests).
    pub fn new(env: Arc<dyn Environment>) -> Self {
        EnvBackend { env }
    }
}

impl Backend for EnvBackend {
    fn name(&self) -> &'static str {
        "env"
    }

    fn plan(&self, sources: &[Source]) -> Vec<PlannedCall> {
        sources
            .iter()
            .map(|s| PlannedCall {
                target: None,
                action: "read variable".to_string(),
                detail: s.path.clone(),
            })
            .collect()
    }

    fn fetch<'a>(
        &'a self,
        sources: &'a [Source],
    ) -> BoxFuture<'a, Vec<Result<Fetched, FetchError>>> {
        Box::pin(async move {
            sources
                .iter()
                .map(|s| match self.env.var(&s.path) {
                    Some(v) => Ok(Fetched::new(Secret::string(v))),
                    None => Err(FetchError::new(
                        ErrorKind::NotFound,
                        "env",
                        "read variable",
                        format!("{} is not set", s.path),
                    )
                    .hint(format!(
                        "set it, or mark the reference optional (env:{}|optional) or give a default (env:{}|default=…)",
                        s.path, s.path
                    ))),
                })
                .collect()
        })
    }

    fn watching(&self) -> Option<&dyn Watching> {
        Some(self)
    }
}

impl Watching for EnvBackend {
    /// Nothing to watch: the value cannot change while envrender runs.
    fn watches(&self, _: &[Source]) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Observation;
    use crate::environment::MapEnv;
    use crate::reference::parse;

    fn sources(refs: &[&str]) -> Vec<Source> {
        refs.iter().map(|r| parse(r).unwrap().source).collect()
    }

    #[tokio::test]
    async fn parses_each_format() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("v.yaml"), "db:\n  password: s3cret\n  port: 5432\n").unwrap();
        std::fs::write(d.join("v.json"), r#"{"db": {"password": "s3cret"}}"#).unwrap();
        std::fs::write(d.join("v.toml"), "[db]\npassword = \"s3cret\"\n").unwrap();
        std::fs::write(
            d.join("v.env"),
            "DB_PASSWORD='s3cret'\n# comment\nPORT=5432\n",
        )
        .unwrap();
        std::fs::write(d.join("cert.pem"), "-----BEGIN X-----\n").unwrap();
        let refs: Vec<String> = ["v.yaml", "v.json", "v.toml", "v.env", "cert.pem"]
            .iter()
            .map(|f| format!("file:{}", d.join(f).display()))
            .collect();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let got = FileBackend.fetch(&sources(&refs)).await;
        let values: Vec<Value> = got
            .into_iter()
            .map(|r| r.unwrap().value.into_exposed())
            .collect();
        assert_eq!(values[0]["db"]["password"], "s3cret");
        assert_eq!(values[0]["db"]["port"], 5432);
        assert_eq!(values[1]["db"]["password"], "s3cret");
        assert_eq!(values[2]["db"]["password"], "s3cret");
        assert_eq!(values[3]["DB_PASSWORD"], "s3cret");
        assert_eq!(values[3]["PORT"], "5432");
        assert_eq!(values[4], "-----BEGIN X-----\n");
    }

    #[tokio::test]
    async fn parse_errors_give_position_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("bad.yaml"), "a: 1\nb: [CANARY-zq9\n").unwrap();
        std::fs::write(d.join("bad.json"), "{\"a\": \"CANARY-zq9\",}").unwrap();
        std::fs::write(d.join("bad.toml"), "a = 1\nb = CANARY-zq9\n").unwrap();
        std::fs::write(d.join("bad.env"), "A=1\nB='CANARY-zq9\n").unwrap();
        for (file, line) in [
            ("bad.yaml", 2),
            ("bad.json", 1),
            ("bad.toml", 2),
            ("bad.env", 2),
        ] {
            let s = sources(&[&format!("file:{}", d.join(file).display())]);
            let err = FileBackend.fetch(&s).await.remove(0).unwrap_err();
            let shown = err.to_string();
            assert_eq!(err.kind, ErrorKind::Invalid, "{file}");
            assert!(!shown.contains("CANARY"), "{file}: {shown}");
            assert!(shown.contains(&format!("line {line}")), "{file}: {shown}");
            assert!(shown.contains(file), "{shown}");
        }
    }

    #[tokio::test]
    async fn missing_and_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = sources(&[&format!("file:{}/nope.yaml", dir.path().display())]);
        let err = FileBackend.fetch(&s).await.remove(0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.to_string().contains("nope.yaml"));
        // A directory named without its '/': not retried, and the fix named.
        let s = sources(&[&format!("file:{}", dir.path().display())]);
        let err = FileBackend.fetch(&s).await.remove(0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.hint.unwrap().contains("end the reference with '/'"));
    }

    #[tokio::test]
    async fn directory_like_a_kubernetes_secret_volume() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // kubelet's layout: a timestamped dir, ..data -> it, visible links into ..data.
        std::fs::create_dir(d.join("..2026_11_22_01_00_00.1")).unwrap();
        std::fs::write(d.join("..2026_11_22_01_00_00.1/username"), "app").unwrap();
        std::fs::write(d.join("..2026_11_22_01_00_00.1/password"), "s3cret").unwrap();
        std::os::unix::fs::symlink("..2026_11_22_01_00_00.1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/username", d.join("username")).unwrap();
        std::os::unix::fs::symlink("..data/password", d.join("password")).unwrap();
        std::fs::create_dir(d.join("nested")).unwrap();
        std::fs::write(d.join("nested/key"), "v").unwrap();
        let s = sources(&[&format!("file:{}/", d.display())]);
        let got = FileBackend
            .fetch(&s)
            .await
            .remove(0)
            .unwrap()
            .value
            .into_exposed();
        assert_eq!(
            got,
            serde_json::json!({"username": "app", "password": "s3cret", "nested/key": "v"})
        );
    }

    #[tokio::test]
    async fn env_variables() {
        let env = Arc::new(MapEnv::new([("A", "1")]));
        let got = EnvBackend::new(env)
            .fetch(&sources(&["env:A", "env:B"]))
            .await;
        assert_eq!(got[0].as_ref().unwrap().value.expose(), "1");
        let err = got[1].as_ref().unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.to_string().contains("B is not set"));
    }

    #[tokio::test]
    async fn observe_reports_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.txt");
        std::fs::write(&path, "one").unwrap();
        let s = sources(&[&format!("file:{}", path.display())]);
        let first = FileBackend.fetch(&s).await.remove(0).unwrap();
        let known = vec![(s[0].clone(), Some(first))];
        assert_eq!(
            FileBackend.observe(&known).await,
            vec![Observation::Unchanged]
        );
        std::fs::write(&path, "two").unwrap();
        match FileBackend.observe(&known).await.remove(0) {
            Observation::Changed(f) => assert_eq!(f.value.expose(), "two"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            FileBackend.observe(&known).await.remove(0),
            Observation::Gone(FetchError {
                kind: ErrorKind::NotFound,
                ..
            })
        ));
        let absent = vec![(s[0].clone(), None)];
        assert_eq!(
            FileBackend.observe(&absent).await,
            vec![Observation::Unchanged]
        );
        std::fs::write(&path, "three").unwrap();
        match FileBackend.observe(&absent).await.remove(0) {
            Observation::Changed(f) => assert_eq!(f.value.expose(), "three"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn line_columns() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
