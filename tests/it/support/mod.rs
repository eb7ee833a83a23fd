//! Test harness: a scratch directory and a builder for running the envrender
//! binary in it, with a clean environment.

#![allow(dead_code)]

pub mod aws;
pub mod consul;
pub mod fault;
pub mod release;
pub mod vault;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A value planted in fixtures that must never appear in any output but the
/// rendered files themselves.
pub const CANARY: &str = "CANARY-7f3a9c-do-not-print";

pub struct Dir {
    pub dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file, creating its directory.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let path = self.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    pub fn mode(&self, rel: &str) -> u32 {
        std::fs::metadata(self.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    /// The envrender binary, run in this directory with no `ENVRENDER_*`
    /// variables inherited.
    pub fn cmd(&self, args: &[&str]) -> Cmd {
        self.cmd_of(Path::new(env!("CARGO_BIN_EXE_envrender")), args)
    }

    /// Like [`cmd`](Self::cmd), for another build of envrender (a release
    /// binary, for figures).
    pub fn cmd_of(&self, program: &Path, args: &[&str]) -> Cmd {
        let mut command = Command::new(program);
        command.current_dir(self.path()).args(args);
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if ["ENVRENDER_", "AWS_", "CONSUL_", "VAULT_"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                command.env_remove(k);
            }
        }
        // Never reach for real AWS configuration, the instance metadata
        // service or the user's ~/.vault-token.
        command
            .env("HOME", self.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent/envrender-test/config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/envrender-test/credentials",
            );
        Cmd { command }
    }
}

pub struct Cmd {
    pub command: Command,
}

/// What a run printed and how it ended.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cmd {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.command.env(k, v);
        self
    }

    /// Points the AWS SDK at an emulator (or a proxy in front of it).
    pub fn aws(self, url: &str) -> Self {
        self.env("AWS_ENDPOINT_URL", url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", aws::REGION)
    }

    pub fn run(mut self) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = self.command.output().expect("run envrender");
        Run {
            code: status.code().expect("exited normally"),
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }
}

impl Run {
    /// Asserts the exit code, showing the output when it is not.
    pub fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code, expected,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn success(self) -> Self {
        self.code(0)
    }

    pub fn stderr_has(self, needle: &str) -> Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }

    pub fn stdout_has(self, needle: &str) -> Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}:\n{}",
            self.stdout
        );
        self
    }

    /// Neither stream carries the canary.
    pub fn no_canary(self) -> Self {
        assert!(
            !self.stderr.contains(CANARY),
            "canary in stderr:\n{}",
            self.stderr
        );
        assert!(
            !self.stdout.contains(CANARY),
            "canary in stdout:\n{}",
            self.stdout
        );
        self
    }
}

/// Where `program` is on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Installs PyPI packages (`spec`: requirements separated by spaces) with their dependencies into the test scratch
/// directory (`pip install --target`), once: later runs reuse it. `override_var`
/// names an environment variable that points at an existing install instead.
pub fn pip_install(spec: &str, dir_name: &str, override_var: &str) -> PathBuf {
    if let Ok(dir) = std::env::var(override_var) {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir_name);
    if dir.join(".complete").is_file() {
        return dir;
    }
    // One install at a time in this process: tests on other threads that
    // need the same packages wait for it, then find it complete (the
    // partial directory is named by process, so two threads would share it).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join(".complete").is_file() {
        return dir;
    }
    let partial = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    eprintln!("installing {spec} into {}", dir.display());
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-conflicts",
            "--target",
        ])
        .arg(&partial)
        .args(spec.split_whitespace())
        .status()
        .expect("python3 -m pip");
    assert!(status.success(), "pip install {spec} failed");
    std::fs::write(partial.join(".complete"), spec).unwrap();
    if std::fs::rename(&partial, &dir).is_err() {
        // Another test process finished first.
        let _ = std::fs::remove_dir_all(&partial);
    }
    dir
}

/// The repository root, for the shipped examples.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh CA named `name`: its issuer and its certificate in PEM.
fn test_ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    (rcgen::Issuer::new(params, key), pem)
}

/// A certificate for `sans` signed by `issuer`, with its key.
fn issue(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    sans: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![usage];
    (params.signed_by(&key, issuer).unwrap(), key)
}

/// Terminates TLS with `config` on a loopback port and passes the bytes on
/// to `backend`. Returns the `https://localhost:PORT` address.
fn serve_tls(backend: &str, config: tokio_rustls::rustls::ServerConfig) -> String {
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = backend.to_string();
    std::thread::spawn(move || {
        aws::block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        })
    });
    format!("https://localhost:{port}")
}

fn server_key(key: &rcgen::KeyPair) -> tokio_rustls::rustls::pki_types::PrivateKeyDer<'static> {
    tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap()
}

/// A TLS front for a plain loopback server: terminates TLS with a
/// certificate for `localhost` signed by a fresh CA, and passes the bytes on.
/// Returns the `https://localhost:PORT` address and the CA in PEM.
pub fn tls_front(backend: &str) -> (String, String) {
    let (issuer, ca_pem) = test_ca("envrender test TLS CA");
    let (cert, key) = issue(
        &issuer,
        &["localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], server_key(&key))
        .unwrap();
    (serve_tls(backend, config), ca_pem)
}

/// A TLS front that also requires a client certificate (mutual TLS) signed
/// by a client CA of its own.
pub struct MtlsFront {
    /// `https://localhost:PORT`.
    pub url: String,
    /// The CA of the server's certificate.
    pub ca_pem: String,
    /// A client certificate the front accepts, and its key.
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// A client certificate from another CA, which it refuses, and its key.
    pub stranger_cert_pem: String,
    pub stranger_key_pem: String,
}

impl MtlsFront {
    /// Writes `ca.pem`, `client.pem`, `client-key.pem`, `stranger.pem` and
    /// `stranger-key.pem` into `d`.
    pub fn write_files(&self, d: &Dir) {
        d.write("ca.pem", &self.ca_pem);
        d.write("client.pem", &self.client_cert_pem);
        d.write("client-key.pem", &self.client_key_pem);
        d.write("stranger.pem", &self.stranger_cert_pem);
        d.write("stranger-key.pem", &self.stranger_key_pem);
    }
}

pub fn mtls_front(backend: &str) -> MtlsFront {
    use tokio_rustls::rustls;
    let (server_issuer, ca_pem) = test_ca("envrender test TLS CA");
    let (client_issuer, client_ca_pem) = test_ca("envrender test client CA");
    let (stranger_issuer, _) = test_ca("envrender test unknown CA");
    let (cert, key) = issue(
        &server_issuer,
        &["localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = issue(
        &client_issuer,
        &[],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (stranger, stranger_key) = issue(
        &stranger_issuer,
        &[],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::pem::PemObject::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der().clone()], server_key(&key))
        .unwrap();
    MtlsFront {
        url: serve_tls(backend, config),
        ca_pem,
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
        stranger_cert_pem: stranger.pem(),
        stranger_key_pem: stranger_key.serialize_pem(),
    }
}

/// A TCP forwarder to `backend` on a loopback port of its own, which can be
/// shut — new connections refused, open ones cut — and opened again on the
/// same port: a server that goes away and comes back.
pub struct Gate {
    pub addr: String,
    backend: String,
    running: Option<(
        tokio::sync::watch::Sender<bool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Gate {
    pub fn open(backend: &str) -> Gate {
        let port = aws::free_port();
        let mut gate = Gate {
            addr: format!("127.0.0.1:{port}"),
            backend: backend.to_string(),
            running: None,
        };
        gate.reopen();
        gate
    }

    pub fn reopen(&mut self) {
        assert!(self.running.is_none(), "the gate is open");
        let listener = std::net::TcpListener::bind(&self.addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let backend = self.backend.clone();
        let thread = std::thread::spawn(move || {
            aws::block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut shut = rx.clone();
                loop {
                    let client = tokio::select! {
                        _ = shut.changed() => return,
                        accepted = listener.accept() => match accepted {
                            Ok((c, _)) => c,
                            Err(_) => continue,
                        },
                    };
                    let (backend, mut shut) = (backend.clone(), rx.clone());
                    tokio::spawn(async move {
                        let mut client = client;
                        let Ok(mut server) = tokio::net::TcpStream::connect(&backend).await else {
                            return;
                        };
                        tokio::select! {
                            _ = shut.changed() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        }
                    });
                }
            })
        });
        self.running = Some((tx, thread));
    }

    pub fn shut(&mut self) {
        if let Some((tx, thread)) = self.running.take() {
            let _ = tx.send(true);
            thread.join().unwrap();
        }
    }
}

/// Serves `app` on a loopback port of its own, on a thread of its own, for
/// the rest of the test; returns `http://127.0.0.1:PORT`.
pub fn serve_loopback(app: axum::Router) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        aws::block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        })
    });
    url
}

/// A child process killed and reaped when dropped, so a failing test leaves
/// nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms for up to `within`.
pub fn eventually(within: std::time::Duration, what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
