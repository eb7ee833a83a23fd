//! What container deployments need from the binary itself, since the image
//! holds nothing else (no shell, no `cp`, no `curl`):
//!
//! - `envrender copy DIR`: place this binary into a shared volume, so an init
//!   container can hand it to an app image that runs `envrender -- app`.
//! - `envrender probe [ADDR|URL]`: ask a running `watch`/`run --listen` for
//!   `/readyz`, for ECS container health checks and Docker `HEALTHCHECK`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::output::{self, FileWrite, OutputError};

/// The file name `copy` gives the binary when it is told a directory.
pub const BINARY_NAME: &str = "envrender";

/// Copies the running binary to `dest` (a directory, or the file to create)
/// atomically with mode 0755, and returns where it went. A second copy of the
/// same binary changes nothing.
pub fn copy_self(dest: &Path) -> Result<PathBuf, Error> {
    let target = if dest.is_dir() || dest.as_os_str().to_string_lossy().ends_with('/') {
        dest.join(BINARY_NAME)
    } else {
        dest.to_path_buf()
    };
    let exe = std::env::current_exe().and_then(|exe| std::fs::read(&exe).map(|b| (exe, b)));
    let (exe, contents) = exe.map_err(|source| {
        Error::Output(OutputError {
            path: PathBuf::from("/proc/self/exe"),
            action: "read the running envrender binary",
            source,
            outcome: "nothing was copied",
        })
    })?;
    let status = output::commit(&[FileWrite {
        path: target.clone(),
        contents,
        mode: 0o755,
        owner: None,
        origin: format!("copy of {}", exe.display()),
        check: None,
        linked: false,
    }])
    .map_err(Error::Output)?;
    tracing::info!(
        to = %target.display(),
        status = %status.first().map(ToString::to_string).unwrap_or_default(),
        "envrender binary copied"
    );
    Ok(target)
}

/// The URL `probe` asks: a full URL as given, `HOST:PORT` (or `:PORT`) as
/// its `/readyz`. A wildcard listen address is asked on loopback, so the
/// probe can be given the same value as `--listen` / `ENVRENDER_LISTEN`.
pub fn probe_url(target: &str) -> Result<String, Error> {
    if target.starts_with("http://") || target.starts_with("https://") {
        return Ok(target.to_string());
    }
    let usage = |message: String| {
        Error::Config(vec![crate::problem::ConfigError::new("envrender probe", message).hint(
            "give the --listen address (127.0.0.1:9102, :9102) or a URL (http://127.0.0.1:9102/readyz)",
        )])
    };
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| usage(format!("{target:?} is neither HOST:PORT nor a URL")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| usage(format!("{target:?}: {port:?} is not a port number")))?;
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "" | "0.0.0.0" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    };
    Ok(format!("http://{host}:{port}/readyz"))
}

/// Asks `url`; succeeds on a 2xx answer. The answer's body (readiness names
/// the failing backend, never a value) goes to stdout either way, so the
/// platform's health-check log shows why.
pub async fn probe(url: &str, timeout: Duration) -> Result<(), Error> {
    let unhealthy = |why: String| Error::Unhealthy(format!("{url}: {why}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| unhealthy(e.to_string()))?;
    let client = crate::backend::http_client(&parsed, false, None, "probe")
        // A proxy from the environment must not stand between a health
        // check and the process next to it.
        .and_then(|b| crate::backend::build_client(b.timeout(timeout).no_proxy()))
        .map_err(unhealthy)?;
    let response = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| unhealthy(crate::backend::error_chain(&e)))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    print!("{body}");
    if !body.is_empty() && !body.ends_with('\n') {
        println!();
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(unhealthy(format!("answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_targets() {
        for (given, url) in [
            ("127.0.0.1:9102", "http://127.0.0.1:9102/readyz"),
            ("0.0.0.0:9102", "http://127.0.0.1:9102/readyz"),
            (":9102", "http://127.0.0.1:9102/readyz"),
            ("[::]:9102", "http://[::1]:9102/readyz"),
            ("[::1]:80", "http://[::1]:80/readyz"),
            ("sidecar:8080", "http://sidecar:8080/readyz"),
            ("http://x:1/healthz", "http://x:1/healthz"),
        ] {
            assert_eq!(probe_url(given).unwrap(), url, "{given}");
        }
        for bad in ["9102", "host:port", "localhost:70000"] {
            let err = probe_url(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn copy_into_a_directory_is_executable_and_idempotent() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let to = copy_self(dir.path()).unwrap();
        assert_eq!(to, dir.path().join(BINARY_NAME));
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), exe);
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        copy_self(&to).unwrap();
        let again = std::fs::metadata(&to).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&again), inode);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
