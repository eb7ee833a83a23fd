//! `envrender run -- app` / `envrender -- app`: real child processes (shell
//! scripts written here), their signals, exit codes, environment, zombies.

use crate::support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use support::consul::ConsulServer;
use support::vault::VaultServer;
use support::{Dir, eventually};

/// Whether a process is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn exit_codes_are_the_commands() {
    use std::os::unix::process::ExitStatusExt as _;
    let d = Dir::new();
    for flags in [&["run"][..], &["run", "--supervise"][..]] {
        for (script, code) in [("exit 0", 0), ("exit 3", 3)] {
            let mut args = flags.to_vec();
            args.extend(["--", "sh", "-c", script]);
            d.cmd(&args).run().code(code);
        }
    }
    // Killed by SIGTERM: supervised, envrender exits 128+15; exec'd, the
    // process itself dies of the signal, as the command would have.
    d.cmd(&["run", "--supervise", "--", "sh", "-c", "kill -TERM $$"])
        .run()
        .code(128 + 15);
    let status = d
        .cmd(&["run", "--", "sh", "-c", "kill -TERM $$"])
        .command
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(15));
    // The short form.
    d.cmd(&["--", "sh", "-c", "exit 5"]).run().code(5);
    // A command that does not exist is found only after the values were
    // fetched: not invalid input (2) but a failure to start (1).
    d.cmd(&["--", "/nonexistent/app"])
        .run()
        .code(1)
        .stderr_has("cannot start /nonexistent/app");
}

/// `envrender -- CMD` reads run's ENVRENDER_* variables as `run -- CMD` does.
#[test]
fn the_short_form_takes_runs_variables() {
    let d = Dir::new();
    d.cmd(&["--", "true"])
        .env("ENVRENDER_WAIT", "bogus")
        .run()
        .code(2)
        .stderr_has("--wait");
}

#[test]
fn exec_mode_leaves_no_envrender_process() {
    let d = Dir::new();
    let mut child = d
        .cmd(&[
            "--",
            "sh",
            "-c",
            "echo $$ > pid; cat /proc/$$/comm > comm; sleep 0.3",
        ])
        .command
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let envrender_pid = child.id();
    assert!(child.wait().unwrap().success());
    // The command ran as the very process envrender was started as.
    assert_eq!(d.read("pid").trim(), envrender_pid.to_string());
    assert_eq!(d.read("comm").trim(), "sh");
}

/// A supervised script that records the signals it gets and exits 0 on TERM.
const RECORDER: &str = "for s in INT HUP USR1 USR2; do trap \"echo $s >> got\" $s; done; \
     trap 'echo TERM >> got; exit 0' TERM; echo ready > ready; \
     while :; do sleep 0.05; done";

#[test]
fn signals_are_forwarded_and_term_stops_the_command() {
    let d = Dir::new();
    let mut envrender = d
        .cmd(&["run", "--supervise", "--", "sh", "-c", RECORDER])
        .command
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "the command", || {
        d.join("ready").exists()
    });
    let pid = Pid::from_raw(envrender.id() as i32);
    for (sig, name) in [
        (Signal::SIGINT, "INT"),
        (Signal::SIGHUP, "HUP"),
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
    ] {
        kill(pid, sig).unwrap();
        eventually(Duration::from_secs(5), name, || {
            std::fs::read_to_string(d.join("got"))
                .unwrap_or_default()
                .lines()
                .any(|l| l == name)
        });
    }
    kill(pid, Signal::SIGTERM).unwrap();
    let status = envrender.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(d.read("got"), "INT\nHUP\nUSR1\nUSR2\nTERM\n");
}

#[test]
fn a_command_that_ignores_the_stop_signal_is_killed_with_its_group_after_the_grace() {
    let d = Dir::new();
    let script = "trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > grandchild; while :; do sleep 0.05; done' & \
                  echo ready > ready; while :; do sleep 0.05; done";
    let mut envrender = d
        .cmd(&[
            "run",
            "--supervise",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ])
        .command
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "the command", || {
        d.join("ready").exists() && d.join("grandchild").exists()
    });
    let grandchild: i32 = d.read("grandchild").trim().parse().unwrap();
    let start = Instant::now();
    kill(Pid::from_raw(envrender.id() as i32), Signal::SIGTERM).unwrap();
    let status = envrender.wait().unwrap();
    let took = start.elapsed();
    assert_eq!(status.code(), Some(128 + 9));
    assert!(
        took >= Duration::from_millis(900),
        "killed before the grace: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    eventually(Duration::from_secs(5), "the grandchild to die", || {
        gone(grandchild)
    });
}

#[test]
fn as_pid_1_orphans_are_reaped() {
    let d = Dir::new();
    // In a new PID namespace envrender is PID 1. Orphans are handed to it;
    // the command counts zombies after they exit.
    let script = "for i in 1 2 3 4 5; do sh -c 'sleep 0.1 &'; done; sleep 0.6; \
                  n=0; for f in /proc/[0-9]*/stat; do \
                  case \"$(cat $f 2>/dev/null)\" in *') Z '*) n=$((n+1));; esac; done; \
                  echo $n > zombies; cat /proc/1/comm > init";
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_envrender"))
        .args(["--", "sh", "-c", script])
        .current_dir(d.path())
        .output()
        .expect("unshare (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.read("init").trim(), "envrender");
    assert_eq!(d.read("zombies").trim(), "0");
}

#[test]
fn reference_variables_are_resolved_and_credentials_scrubbed() {
    let consul = ConsulServer::start();
    consul.put("app/db_host", "db.internal");
    let vault = VaultServer::start();
    vault.kv2_put("secret/", "app", json!({"api_key": support::CANARY}));
    let moto = support::aws::moto();
    support::aws::put_parameters(&moto.url, &[("/t/run/pw", "pa55", true)]);
    let d = Dir::new();
    d.write("envrender.toml", "[env]\nLOG_LEVEL = \"debug\"\n");
    d.cmd(&[
        "--",
        "sh",
        "-c",
        "tr '\\0' '\\n' < /proc/self/environ > environ",
    ])
    .aws(&moto.url)
    .env("CONSUL_HTTP_ADDR", consul.url.trim_start_matches("http://"))
    .env("VAULT_ADDR", &vault.url)
    .env("VAULT_TOKEN", &vault.root_token)
    .env("DB_HOST", "consul:app/db_host")
    .env("API_KEY", "vault:secret/app#api_key")
    .env("DB_PASSWORD", "ssm:/t/run/pw")
    .env("PLAIN", "consul:8500")
    .run()
    .success()
    .no_canary();
    let environ = d.read("environ");
    let vars: Vec<&str> = environ.lines().collect();
    for expected in [
        "DB_HOST=db.internal",
        &format!("API_KEY={}", support::CANARY),
        "DB_PASSWORD=pa55",
        "LOG_LEVEL=debug",
        "PLAIN=consul:8500",
    ] {
        assert!(vars.contains(&expected), "{expected} not in {vars:?}");
    }
    assert!(!environ.contains("VAULT_TOKEN"), "{environ}");
    assert!(!environ.contains("vault:secret"), "{environ}");
    assert!(!environ.contains("ssm:/t/run"), "{environ}");
}

#[test]
fn a_bad_or_missing_value_never_starts_the_command() {
    let consul = ConsulServer::start();
    let d = Dir::new();
    d.cmd(&["--", "sh", "-c", "touch started"])
        .env("CONSUL_HTTP_ADDR", consul.url.trim_start_matches("http://"))
        .env("DB_HOST", "consul:app/missing")
        .env("OTHER", "consul:app/also-missing")
        .run()
        .code(1)
        .stderr_has("consul:app/missing")
        .stderr_has("consul:app/also-missing")
        .stderr_has("env DB_HOST");
    assert!(!d.join("started").exists());
    d.cmd(&["--", "sh", "-c", "touch started"])
        .env("DB_HOST", "vault:a?b")
        .run()
        .code(2)
        .stderr_has("environment variable DB_HOST");
    assert!(!d.join("started").exists());
}

#[test]
fn file_variables_point_at_private_files() {
    let d = Dir::new();
    d.write("v.yaml", "pw: s3cret\n");
    d.write(
        "envrender.toml",
        "[env]\nDB_PASSWORD_FILE = \"file:v.yaml#pw\"\n",
    );
    d.cmd(&[
        "run",
        "--secrets-dir",
        "secrets",
        "--",
        "sh",
        "-c",
        "cat \"$DB_PASSWORD_FILE\" > seen; echo \"$DB_PASSWORD_FILE\" > path",
    ])
    .run()
    .success();
    assert_eq!(d.read("seen"), "s3cret");
    assert_eq!(d.read("path").trim(), "secrets/db_password");
    assert_eq!(d.mode("secrets/db_password"), 0o600);
}

#[test]
fn a_consul_change_reloads_or_restarts_the_command_as_asked() {
    let server = ConsulServer::start();
    server.put("app/level", "one");
    let addr = server.url.trim_start_matches("http://").to_string();
    let d = Dir::new();
    d.write("t.hbs", "level={{consul \"app/level\"}}\n");
    // The command logs each start (with its environment value) and each HUP.
    let script = "echo \"start $LEVEL\" >> log; trap 'echo HUP >> log' HUP; \
                  trap 'echo TERM >> log; exit 0' TERM; while :; do sleep 0.05; done";
    let log = || std::fs::read_to_string(d.join("log")).unwrap_or_default();

    let start = |mode: &[&str]| {
        let mut args = vec!["run"];
        args.extend(mode);
        args.extend(["--template", "t.hbs:out.conf", "--", "sh", "-c", script]);
        d.cmd(&args)
            .env("CONSUL_HTTP_ADDR", &addr)
            .env("LEVEL", "consul:app/level")
            .command
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let stop = |mut envrender: std::process::Child| {
        kill(Pid::from_raw(envrender.id() as i32), Signal::SIGTERM).unwrap();
        assert_eq!(envrender.wait().unwrap().code(), Some(0));
    };

    // --reload-signal: the file is rewritten and the running command told.
    let envrender = start(&["--reload-signal", "SIGHUP"]);
    eventually(Duration::from_secs(5), "the start", || {
        log() == "start one\n"
    });
    server.put("app/level", "two");
    eventually(Duration::from_secs(5), "the reload", || {
        d.read("out.conf") == "level=two\n" && log() == "start one\nHUP\n"
    });
    stop(envrender);
    assert_eq!(log(), "start one\nHUP\nTERM\n");

    // --restart: stopped and started again with the new environment.
    std::fs::remove_file(d.join("log")).unwrap();
    let envrender = start(&["--restart"]);
    eventually(Duration::from_secs(5), "the start", || {
        log() == "start two\n"
    });
    server.put("app/level", "three");
    eventually(Duration::from_secs(5), "the restart", || {
        log() == "start two\nTERM\nstart three\n"
    });
    assert_eq!(d.read("out.conf"), "level=three\n");
    stop(envrender);
}

#[test]
fn an_interactive_command_gets_the_terminal() {
    // `script` gives envrender a terminal; the command, in its own process
    // group, can read from it only if envrender made that group the
    // terminal's foreground.
    let d = Dir::new();
    let inner = format!(
        "{} --log-level warn run --supervise -- sh -c 'read x; echo got-$x > answer'",
        env!("CARGO_BIN_EXE_envrender")
    );
    let mut script = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .current_dir(d.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("script (util-linux)");
    use std::io::Write as _;
    script
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello\n")
        .unwrap();
    eventually(Duration::from_secs(10), "the answer", || {
        d.join("answer").exists() && d.read("answer") == "got-hello\n"
    });
    drop(script.stdin.take());
    assert!(script.wait().unwrap().success());
}

#[test]
fn health_endpoints_while_supervising() {
    let d = Dir::new();
    let port = support::aws::free_port();
    let mut envrender = d
        .cmd(&[
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--",
            "sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 0.05; done",
        ])
        .command
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| {
        support::aws::block_on(async {
            match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        })
    };
    eventually(Duration::from_secs(5), "readiness", || {
        get("/readyz") == 200
    });
    assert_eq!(get("/healthz"), 200);
    assert_eq!(get("/metrics"), 200);
    kill(Pid::from_raw(envrender.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(envrender.wait().unwrap().code(), Some(0));
}

#[test]
fn with_restart_on_exit_a_command_that_exits_is_started_again() {
    let d = Dir::new();
    let mut envrender = d
        .cmd(&[
            "run",
            "--restart-on-exit",
            "--",
            "sh",
            "-c",
            "echo start >> log; trap 'exit 0' TERM; sleep 0.2; exit 4",
        ])
        .command
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let starts = || {
        std::fs::read_to_string(d.join("log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Exits after 0.2 s; started again after 1 s, then 2 s.
    eventually(Duration::from_secs(6), "two restarts", || starts() >= 3);
    kill(Pid::from_raw(envrender.id() as i32), Signal::SIGTERM).unwrap();
    let code = envrender.wait().unwrap().code();
    assert!(matches!(code, Some(0) | Some(4)), "{code:?}");
    // Without the flag, the command's exit is envrender's.
    d.cmd(&["run", "--supervise", "--", "sh", "-c", "exit 4"])
        .run()
        .code(4);
}

/// A variable set in the environment wins over the same name in `[env]`,
/// whatever its value: an operator's override in a task definition
/// (`LOG_LEVEL=debug`) is what the app gets, not the configuration's
/// default.
#[test]
fn the_environment_wins_over_env_in_the_configuration() {
    let d = Dir::new();
    d.write(
        "envrender.toml",
        "[env]\nLOG_LEVEL = \"info\"\nREGION = \"eu-west-1\"\n",
    );
    d.cmd(&["--", "sh", "-c", "echo \"$LOG_LEVEL $REGION\" > seen"])
        .env("LOG_LEVEL", "debug")
        .run()
        .success();
    // The override wins; what the environment does not set comes from
    // `[env]`.
    assert_eq!(d.read("seen").trim(), "debug eu-west-1");
}
