//! A hostile neighbour: a process of another user (or of the app's user)
//! on the same machine, which plants symlinks and directories where
//! envrender writes, reads /proc, writes the pid file, and sources the env
//! files envrender writes. Tests run as root and play the other user with
//! uid 65534 (nobody).

use crate::support;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use proptest::prelude::*;
use support::{Dir, KillOnDrop, eventually};

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn envrender_bin() -> &'static str {
    env!("CARGO_BIN_EXE_envrender")
}

// ---------------------------------------------------------------------------
// Item 6: output attributes are never fixed through a path an app swapped.

/// A destination that is a symlink to a root-only file with the very content
/// being rendered: the link is replaced by a file of its own; the file it
/// pointed at keeps its mode, owner and content.
#[test]
fn a_symlinked_destination_never_changes_its_targets_mode_or_owner() {
    let d = Dir::new();
    d.write("t.hbs", "same\n");
    let target = d.write("shadow", "same\n");
    chmod(&target, 0o600);
    std::os::unix::fs::symlink(&target, d.join("out.conf")).unwrap();
    chown(&d.join("out.conf"), NOBODY);
    d.cmd(&["render", "--template", "t.hbs:out.conf:0644"])
        .run()
        .success();
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), 0);
    assert_eq!(d.read("shadow"), "same\n");
    let out = std::fs::symlink_metadata(d.join("out.conf")).unwrap();
    assert!(out.is_file());
    assert_eq!(out.mode() & 0o7777, 0o644);
}

// ---------------------------------------------------------------------------
// Item 7: run's *_FILE secrets.

/// A script that records the path it was given and what the file held.
const RECORD_FILE: &str =
    "printf %s \"$DB_PASSWORD_FILE\" > path; cat \"$DB_PASSWORD_FILE\" > seen";

fn secret_file_config(d: &Dir) {
    d.write("v.yaml", &format!("pw: {}\n", support::CANARY));
    d.write(
        "envrender.toml",
        "[env]\nDB_PASSWORD_FILE = \"file:v.yaml#pw\"\n",
    );
}

/// Another user made the directory the old code would use
/// (`/dev/shm/envrender-<pid>`, the pid being predictable) and planted a
/// symlink in it: envrender makes a fresh private directory of its own.
#[test]
fn run_secret_files_ignore_a_directory_planted_at_a_predictable_name() {
    let d = Dir::new();
    secret_file_config(&d);
    let target = d.write("target", "untouched");
    // The shell plants the directory for its own pid, then becomes envrender.
    let script = "p=/dev/shm/envrender-$$; mkdir -m 0777 \"$p\"; chown 65534:65534 \"$p\"; \
                  ln -s \"$TARGET\" \"$p/db_password\"; \
                  exec \"$BIN\" run -- sh -c \"$RECORD\"";
    let mut cmd = d.cmd_of(Path::new("/bin/sh"), &["-c", script]);
    cmd.command
        .env("TARGET", &target)
        .env("BIN", envrender_bin())
        .env("RECORD", RECORD_FILE)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.command.spawn().unwrap();
    let planted = PathBuf::from(format!("/dev/shm/envrender-{}", child.id()));
    let out = child.wait_with_output().unwrap();
    let path = PathBuf::from(d.read("path"));
    let _ = std::fs::remove_dir_all(&planted);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.read("target"), "untouched");
    assert_eq!(d.read("seen"), support::CANARY);
    assert!(!path.starts_with(&planted), "{}", path.display());
    // Exec mode cannot clean up: the file is the app's now. Private.
    let dir = path.parent().unwrap();
    let dir_meta = std::fs::symlink_metadata(dir).unwrap();
    assert!(dir_meta.is_dir());
    assert_eq!(dir_meta.mode() & 0o7777, 0o700);
    assert_eq!(dir_meta.uid(), 0);
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Supervised, the files (and the private directory) are removed when the
/// command exits.
#[test]
fn run_secret_files_are_removed_when_the_supervised_command_exits() {
    let d = Dir::new();
    secret_file_config(&d);
    d.cmd(&["run", "--supervise", "--", "sh", "-c", RECORD_FILE])
        .run()
        .success()
        .no_canary();
    assert_eq!(d.read("seen"), support::CANARY);
    let path = PathBuf::from(d.read("path"));
    assert!(!path.exists(), "{} is still there", path.display());
    assert!(
        !path.parent().unwrap().exists(),
        "its directory is still there"
    );
    // In a directory given with --secrets-dir: the files go, the directory stays.
    d.cmd(&[
        "run",
        "--supervise",
        "--secrets-dir",
        "secrets",
        "--",
        "sh",
        "-c",
        RECORD_FILE,
    ])
    .run()
    .success();
    assert_eq!(d.read("seen"), support::CANARY);
    assert!(!d.join("secrets/db_password").exists());
    assert!(d.join("secrets").is_dir());
}

/// In a --secrets-dir, a symlink or an open file already at the name is
/// replaced by a new 0600 file, never written through.
#[test]
fn run_secret_files_replace_what_is_planted_in_the_secrets_dir() {
    let d = Dir::new();
    secret_file_config(&d);
    let target = d.write("target", "untouched");
    std::fs::create_dir(d.join("secrets")).unwrap();
    std::os::unix::fs::symlink(&target, d.join("secrets/db_password")).unwrap();
    d.cmd(&[
        "run",
        "--secrets-dir",
        "secrets",
        "--",
        "sh",
        "-c",
        RECORD_FILE,
    ])
    .run()
    .success();
    assert_eq!(d.read("target"), "untouched");
    assert_eq!(d.read("seen"), support::CANARY);
    let meta = std::fs::symlink_metadata(d.join("secrets/db_password")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    // A world-readable file from before (owned by another user) is replaced
    // too, not reused with its mode.
    let old = d.write("secrets/db_password", "old");
    chmod(&old, 0o644);
    chown(&old, NOBODY);
    d.cmd(&[
        "run",
        "--secrets-dir",
        "secrets",
        "--",
        "sh",
        "-c",
        RECORD_FILE,
    ])
    .run()
    .success();
    let meta = std::fs::symlink_metadata(d.join("secrets/db_password")).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o600, 0));
    assert_eq!(d.read("secrets/db_password"), support::CANARY);
}

// ---------------------------------------------------------------------------
// Item 8: credentials do not reach reload commands.

/// Credentials, and variables that say where credentials are.
const CREDENTIALS: &[(&str, &str)] = &[
    ("VAULT_TOKEN", "hvs.CANARY-7f3a9c"),
    ("CONSUL_HTTP_TOKEN", "CANARY-7f3a9c-consul"),
    ("CONSUL_HTTP_TOKEN_FILE", "/run/secrets/consul-token"),
    ("CONSUL_HTTP_AUTH", "admin:CANARY-7f3a9c"),
    ("AWS_ACCESS_KEY_ID", "AKIACANARY"),
    ("AWS_SECRET_ACCESS_KEY", "CANARY-7f3a9c-aws"),
    ("AWS_SESSION_TOKEN", "CANARY-7f3a9c-session"),
    (
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "http://127.0.0.1:9/creds",
    ),
    (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "/v2/credentials/x",
    ),
    ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "CANARY-7f3a9c-pod"),
    (
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "/var/run/secrets/pods.eks.amazonaws.com/token",
    ),
    (
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "/var/run/secrets/eks.amazonaws.com/token",
    ),
    ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/app"),
];

fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Starts `watch` with `flags` and every credential in its environment; the
/// --exec action writes its environment to `seen`.
fn watch_exec_env(d: &Dir, flags: &[&str]) -> Vec<(String, String)> {
    d.write("t.hbs", "{{file \"v.yaml#name\"}}\n");
    d.write("v.yaml", "name: a\n");
    // A file from before: the first render replaces it and runs the action.
    d.write("out.conf", "old\n");
    let _ = std::fs::remove_file(d.join("seen"));
    let mut args = vec![
        "watch",
        "--template",
        "t.hbs:out.conf",
        "--exec",
        "sh -c 'env > seen.tmp; mv seen.tmp seen'",
    ];
    args.extend(flags);
    let mut cmd = d.cmd(&args).env("PLAIN", "kept");
    for (k, v) in CREDENTIALS {
        cmd = cmd.env(k, v);
    }
    cmd.command.stdout(Stdio::null()).stderr(Stdio::null());
    let _watch = KillOnDrop(cmd.command.spawn().unwrap());
    eventually(Duration::from_secs(10), "the --exec action", || {
        d.join("seen").exists()
    });
    parse_env(&d.read("seen"))
}

#[test]
fn reload_commands_get_no_credentials_unless_kept() {
    let d = Dir::new();
    let env = watch_exec_env(&d, &[]);
    assert!(env.contains(&("PLAIN".into(), "kept".into())), "{env:?}");
    for (name, _) in CREDENTIALS {
        assert!(
            !env.iter().any(|(k, _)| k == name),
            "{name} reached the --exec command"
        );
    }
    // Kept by name.
    let env = watch_exec_env(
        &d,
        &["--keep-env", "AWS_ROLE_ARN", "--keep-env", "VAULT_TOKEN"],
    );
    for kept in ["AWS_ROLE_ARN", "VAULT_TOKEN"] {
        assert!(env.iter().any(|(k, _)| k == kept), "{kept} not kept");
    }
    assert!(!env.iter().any(|(k, _)| k == "CONSUL_HTTP_TOKEN"));
}

/// A template's own `on_change` command is a reload command too.
#[test]
fn on_change_commands_get_no_credentials() {
    let d = Dir::new();
    d.write("t.hbs", "{{file \"v.yaml#name\"}}\n");
    d.write("v.yaml", "name: a\n");
    d.write("out.conf", "old\n");
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"t.hbs\"\ndestination = \"out.conf\"\n\
         on_change = { exec = [\"sh\", \"-c\", \"env > seen.tmp; mv seen.tmp seen\"] }\n",
    );
    let mut cmd = d.cmd(&["watch"]);
    for (k, v) in CREDENTIALS {
        cmd = cmd.env(k, v);
    }
    cmd.command.stdout(Stdio::null()).stderr(Stdio::null());
    let _watch = KillOnDrop(cmd.command.spawn().unwrap());
    eventually(Duration::from_secs(10), "the on_change command", || {
        d.join("seen").exists()
    });
    let env = parse_env(&d.read("seen"));
    for (name, _) in CREDENTIALS {
        assert!(
            !env.iter().any(|(k, _)| k == name),
            "{name} reached the on_change command"
        );
    }
}

/// `run`: the app loses envrender's Vault and Consul credentials, and keeps
/// the AWS ones (the container's identity is the app's too).
#[test]
fn the_run_app_keeps_the_aws_identity_but_not_vault_or_consul_credentials() {
    let d = Dir::new();
    let mut cmd = d.cmd(&["run", "--", "sh", "-c", "env > seen"]);
    for (k, v) in CREDENTIALS {
        cmd = cmd.env(k, v);
    }
    cmd.run().success();
    let env = parse_env(&d.read("seen"));
    for (name, _) in CREDENTIALS {
        let present = env.iter().any(|(k, _)| k == name);
        assert_eq!(
            present,
            name.starts_with("AWS_"),
            "{name}: present {present}"
        );
    }
}

// ---------------------------------------------------------------------------
// Item 9: every mode is undumpable.

/// Runs envrender as another user with a Consul address that accepts the
/// connection and never answers; once envrender has connected (past its
/// start, in the middle of a fetch), its /proc entries must be root's: the
/// process is not dumpable, so no core file and no same-user /proc reads.
#[test]
fn every_mode_is_undumpable_while_it_works() {
    let d = Dir::new();
    chmod(d.path(), 0o755);
    // The test binary's directory may not be readable by nobody.
    let bin = d.join("envrender");
    std::fs::copy(envrender_bin(), &bin).unwrap();
    chmod(&bin, 0o755);
    d.write("t.hbs", "{{consul \"k\"}}\n");
    let modes: &[&[&str]] = &[
        &["render", "--template", "t.hbs:out.conf"],
        &["check", "--template", "t.hbs:out.conf"],
        &["get", "consul:k"],
        &["probe", "ADDR"],
        &["watch", "--template", "t.hbs:out.conf"],
        &["run", "--", "true"],
    ];
    for args in modes {
        // A listener of its own per mode: no connection left from the last.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "ADDR" { addr.as_str() } else { a })
            .collect();
        let mut cmd = d
            .cmd_of(&bin, &args)
            .env("CONSUL_HTTP_ADDR", &addr)
            .env("K", "consul:k");
        cmd.command
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = KillOnDrop(cmd.command.spawn().unwrap());
        let pid = child.0.id();
        let conn = std::cell::RefCell::new(None);
        eventually(Duration::from_secs(10), "a connection", || {
            if let Ok((s, _)) = listener.accept() {
                *conn.borrow_mut() = Some(s);
            }
            conn.borrow().is_some()
        });
        let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
            .unwrap()
            .uid();
        assert_eq!(owner, 0, "{args:?}: /proc/{pid} is the user's: dumpable");
    }
}

// ---------------------------------------------------------------------------
// Item 10: --output-root holds every destination; the pid file is checked.

#[test]
fn destinations_stay_inside_the_output_root() {
    let d = Dir::new();
    d.write("t.hbs", "x\n");
    std::fs::create_dir(d.join("root")).unwrap();
    for dest in [
        "../escape.conf",
        "/etc/../../escape.conf",
        "a/../../escape.conf",
    ] {
        for mode in ["render", "check"] {
            d.cmd(&[
                mode,
                "--output-root",
                "root",
                "--template",
                &format!("t.hbs:{dest}"),
            ])
            .run()
            .code(2)
            .stderr_has(dest)
            .stderr_has("--output-root");
        }
    }
    assert!(!d.join("escape.conf").exists());
    assert!(!Path::new("/escape.conf").exists());
    // Inside the root: fine.
    d.cmd(&[
        "render",
        "--output-root",
        "root",
        "--template",
        "t.hbs:/etc/app.conf",
    ])
    .run()
    .success();
    assert_eq!(d.read("root/etc/app.conf"), "x\n");
}

#[test]
fn the_same_destination_spelled_twice_is_refused() {
    let d = Dir::new();
    d.write("a.hbs", "a\n");
    d.write("b.hbs", "b\n");
    for (first, second, root) in [
        ("x.conf", "./x.conf", None),
        ("dir/x.conf", "dir/./x.conf", None),
        ("dir/x.conf", "dir//x.conf", None),
        ("dir/x.conf", "dir/sub/../x.conf", None),
        ("/etc/x.conf", "etc/x.conf", Some("root")),
    ] {
        let (a, b) = (format!("a.hbs:{first}"), format!("b.hbs:{second}"));
        let mut args = vec!["render", "--template", &a, "--template", &b];
        if let Some(root) = root {
            args.extend(["--output-root", root]);
        }
        d.cmd(&args)
            .run()
            .code(2)
            .stderr_has("two outputs write this destination");
    }
    assert!(!d.join("x.conf").exists());
}

/// `watch --signal … --pid-file F` with F holding -1 or 0: kill(2) would
/// signal every process (or the whole process group). The watch runs in a
/// PID namespace of its own, with a bystander that records the signal, so
/// the old behaviour cannot reach the rest of the machine.
#[test]
fn a_pid_file_that_is_not_a_process_id_signals_nobody() {
    let d = Dir::new();
    d.write("t.hbs", "{{file \"v.yaml#n\"}}\n");
    d.write("v.yaml", "n: 0\n");
    d.write("pid", "-1\n");
    let script = "sh -c 'trap \"echo hit >> hits\" USR1; echo ready > ready; \
                  while :; do sleep 0.05; done' & \
                  exec \"$BIN\" watch --template t.hbs:out.conf --signal SIGUSR1 --pid-file pid";
    let log = d.join("watch.log");
    let mut cmd = d.cmd_of(
        Path::new("unshare"),
        &["--pid", "--fork", "--kill-child", "sh", "-c", script],
    );
    cmd.command
        .env("BIN", envrender_bin())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _watch = KillOnDrop(cmd.command.spawn().unwrap());
    eventually(Duration::from_secs(10), "the bystander", || {
        d.join("ready").exists()
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(Duration::from_secs(10), "the first render", || {
        log_text().contains("first complete render done")
    });
    let mut n = 0;
    for bad in ["-1", "0", "abc", "99999999999"] {
        d.write("pid", &format!("{bad}\n"));
        let failed_before = log_text().matches("action failed").count();
        // Changed again until a render runs the action: the file watch
        // starts just after the first render is logged.
        let start = std::time::Instant::now();
        while log_text().matches("action failed").count() == failed_before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no refusal:\n{}",
                log_text()
            );
            n += 1;
            d.write("v.yaml", &format!("n: {n}\n"));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let text = log_text();
    assert!(
        !d.join("hits").exists(),
        "a bystander was signalled:\n{text}"
    );
    assert!(text.contains("not a process id"), "{text}");
    assert!(!text.contains("cannot signal process"), "{text}");
}

// ---------------------------------------------------------------------------
// Item 12: a dotenv file is safe to source in sh and reads back exactly.

/// The case found: a value with a quote and a backtick ran a command when
/// the file was sourced.
#[test]
fn a_backtick_in_a_dotenv_value_runs_nothing_when_sourced() {
    let d = Dir::new();
    let vars = vec![(
        "V".to_string(),
        "it's `touch pwned` $(touch pwned)".to_string(),
    )];
    let text = envrender::output::env_file(&vars, envrender::output::EnvFormat::Dotenv);
    std::fs::write(d.join("app.env"), &text).unwrap();
    let out = std::process::Command::new("/bin/sh")
        .current_dir(d.path())
        .args(["-c", ". ./app.env; printf %s \"$V\""])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&text);
    assert!(!d.join("pwned").exists(), "a command ran: {shown}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), vars[0].1);
}

/// Characters a shell or a dotenv parser treats specially, plus any text.
fn hostile_value() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "'",
            "\"",
            "`",
            "$",
            "$(touch pwned)",
            "`touch pwned`",
            "${HOME}",
            "$HOME",
            "\\",
            "\\'",
            "'\\''",
            "\\n",
            "\n",
            "\r",
            "\r\n",
            " ",
            "\t",
            "#",
            ";",
            "&",
            "|",
            "<",
            ">",
            "(",
            ")",
            "{",
            "}",
            "!",
            "*",
            "?",
            "~",
            "=",
            "\u{e9}",
            "\u{feff}",
            "\u{2028}",
        ])
        .prop_map(String::from),
        "[^\u{0}]{0,4}",
    ];
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
    ))]

    #[test]
    fn a_dotenv_file_sources_and_parses_back_exactly(value in hostile_value()) {
        use envrender::output::EnvFormat;
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            ("FIRST".to_string(), value.clone()),
            ("SECOND".to_string(), "after".to_string()),
        ];
        let text = envrender::output::env_file(&vars, EnvFormat::Dotenv);
        let file = dir.path().join("app.env");
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .current_dir(dir.path())
            .args(["-c", ". ./app.env && printf %s \"$FIRST\" && printf '\\0%s' \"$SECOND\""])
            .env_clear()
            .output()
            .unwrap();
        prop_assert!(out.status.success(), "sh failed on {:?}: {}", String::from_utf8_lossy(&text), String::from_utf8_lossy(&out.stderr));
        let expected = format!("{value}\0after");
        prop_assert_eq!(String::from_utf8_lossy(&out.stdout), expected.as_str(), "file: {:?}", String::from_utf8_lossy(&text));
        prop_assert!(!dir.path().join("pwned").exists(), "a command ran");
        let parsed: Result<Vec<(String, String)>, _> = dotenvy::from_read_iter(&text[..]).collect();
        prop_assert_eq!(parsed.ok(), Some(vars), "file: {:?}", String::from_utf8_lossy(&text));
    }
}
