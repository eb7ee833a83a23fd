//! The envrender binary, driven as a person or a script would: exit codes,
//! messages, files on disk.

use crate::support;

use std::os::unix::fs::MetadataExt as _;

use support::{CANARY, Dir, repo};

/// A small project: a values file holding the canary, and a template.
fn project() -> Dir {
    let d = Dir::new();
    d.write(
        "values.yaml",
        &format!("db:\n  host: db.internal\n  password: {CANARY}\nport: 5432\n"),
    );
    d.write(
        "app.conf.hbs",
        "host={{secret \"file:values.yaml#db.host\"}}\npassword={{file \"values.yaml\" \"db.password\"}}\n",
    );
    d
}

#[test]
fn quickstart_renders_the_shipped_examples() {
    let out = Dir::new();
    let root = out.path().to_str().unwrap();
    // Run from the repository root, as the README does.
    let mut cmd = Dir::new().cmd(&[
        "render",
        "--config",
        "examples/local/envrender.toml",
        "--output-root",
        root,
    ]);
    cmd.command.current_dir(repo());
    let run = cmd.run().success();
    for f in [
        "etc/app/app.conf",
        "etc/app/app.env",
        "etc/app/tls/tls.crt",
        "etc/app/tls/tls.key",
        "etc/app/tls/ca.crt",
        "run/app/secrets.env",
    ] {
        assert!(
            run.stderr.contains(&out.join(f).display().to_string()),
            "{f} not reported:\n{}",
            run.stderr
        );
    }
    let expected = std::fs::read_to_string(repo().join("tests/expected/app.conf")).unwrap();
    assert_eq!(out.read("etc/app/app.conf"), expected);
    assert_eq!(out.mode("etc/app/app.conf"), 0o640);
    assert_eq!(out.mode("etc/app/tls/tls.key"), 0o600);
    assert_eq!(out.mode("etc/app/tls/tls.crt"), 0o644);
    assert!(
        out.read("etc/app/tls/tls.crt")
            .starts_with("-----BEGIN CERTIFICATE-----\n")
    );
    assert!(
        out.read("etc/app/tls/tls.key")
            .starts_with("-----BEGIN PRIVATE KEY-----\n")
    );
    // Airplane mode: check shows that nothing goes to a backend.
    let mut cmd = Dir::new().cmd(&[
        "check",
        "--config",
        "examples/local/envrender.toml",
        "--output-root",
        root,
    ]);
    cmd.command.current_dir(repo());
    let check = cmd
        .run()
        .success()
        .stdout_has("requests:\n  local values file: 9 values, 1 not in it\n\n");
    assert!(
        check
            .stdout
            .contains("consul:app/prod/db/pool_size|default=10\n      missing, default used")
    );
    assert_eq!(
        out.read("run/app/secrets.env"),
        "API_KEY='local-dev-api-key'\nDB_PASSWORD='local-dev-db-password'\nLOG_LEVEL='info'\n"
    );
}

#[test]
fn files_are_written_0600_unless_configured() {
    let d = project();
    d.cmd(&["render", "--template", "app.conf.hbs:out/app.conf"])
        .run()
        .success()
        .no_canary();
    assert_eq!(
        d.read("out/app.conf"),
        format!("host=db.internal\npassword={CANARY}\n")
    );
    assert_eq!(d.mode("out/app.conf"), 0o600);
    d.cmd(&["render", "--template", "app.conf.hbs:out/app.conf:0644"])
        .run()
        .success()
        .stderr_has("mode/owner updated");
    assert_eq!(d.mode("out/app.conf"), 0o644);
}

#[test]
fn unchanged_content_is_not_rewritten() {
    let d = project();
    d.cmd(&["render", "--template", "app.conf.hbs:app.conf"])
        .run()
        .success();
    let before = std::fs::metadata(d.join("app.conf")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    d.cmd(&["render", "--template", "app.conf.hbs:app.conf"])
        .run()
        .success()
        .stderr_has("unchanged");
    let after = std::fs::metadata(d.join("app.conf")).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec(), before.mtime()),
        (after.ino(), after.mtime_nsec(), after.mtime())
    );
    // A changed value is written.
    d.write("values.yaml", "db:\n  host: other\n  password: x\n");
    d.cmd(&["render", "--template", "app.conf.hbs:app.conf"])
        .run()
        .success()
        .stderr_has("updated");
    assert_eq!(d.read("app.conf"), "host=other\npassword=x\n");
}

#[test]
fn a_failing_template_leaves_every_destination_untouched() {
    let d = project();
    d.write("first.conf", "old first\n");
    d.write("second.conf", "old second\n");
    d.write(
        "second.hbs",
        "x={{secret \"file:values.yaml#db.missing\"}}\n",
    );
    d.write(
        "envrender.toml",
        "[[template]]\nsource = \"app.conf.hbs\"\ndestination = \"first.conf\"\n\
         [[template]]\nsource = \"second.hbs\"\ndestination = \"second.conf\"\n",
    );
    d.cmd(&["render"])
        .run()
        .code(1)
        .stderr_has("file:values.yaml#db.missing")
        .stderr_has("no key \"missing\" at #db")
        .stderr_has("keys there: host, password")
        .stderr_has("nothing was written")
        .no_canary();
    assert_eq!(d.read("first.conf"), "old first\n");
    assert_eq!(d.read("second.conf"), "old second\n");
    // The same when the second template fails only at render time, once its
    // data is known: a map printed where text was expected.
    d.write("second.hbs", "x={{secret \"file:values.yaml#db\"}}\n");
    d.cmd(&["render"])
        .run()
        .code(1)
        .stderr_has("second.hbs:1:3")
        .stderr_has("map, 2 keys")
        .no_canary();
    assert_eq!(d.read("first.conf"), "old first\n");
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("envrender-tmp")),
        "{names:?}"
    );
}

#[test]
fn every_unresolved_reference_is_listed_with_its_users() {
    let d = project();
    d.write(
        "t.hbs",
        "{{env \"ENVRENDER_TEST_UNSET\"}}{{file \"nope.yaml\"}}{{secret \"file:values.yaml#db.pass\"}}{{secret \"vault:secret/x\"}}{{env \"HOME\"}}",
    );
    d.write(
        "envrender.toml",
        "[env]\nTOKEN = \"env:ENVRENDER_TEST_UNSET\"\n[[env_file]]\ndestination = \"out.env\"\n",
    );
    let run = d
        .cmd(&["render", "--template", "t.hbs:t.out"])
        .run()
        .code(1)
        .stderr_has("4 references could not be resolved")
        .stderr_has("env:ENVRENDER_TEST_UNSET  (used by env TOKEN, t.hbs)")
        .stderr_has("ENVRENDER_TEST_UNSET is not set")
        .stderr_has("file:nope.yaml  (used by t.hbs)")
        .stderr_has("nope.yaml: No such file or directory")
        .stderr_has("file:values.yaml#db.pass")
        .stderr_has("vault:secret/x")
        .stderr_has("no Vault token: VAULT_TOKEN is not set")
        .no_canary();
    assert!(!run.stderr.contains("env:HOME"));
    assert!(!d.join("t.out").exists() && !d.join("out.env").exists());
}

#[test]
fn optional_references_and_defaults() {
    let d = project();
    d.write(
        "t.hbs",
        "a={{env \"ENVRENDER_TEST_UNSET\" default=\"dflt\"}}\nb=[{{secret \"env:ENVRENDER_TEST_UNSET|optional\"}}]\nc={{secret \"file:values.yaml#db.nope|default=x\"}}\nd={{default (secret \"file:values.yaml#nope|optional\") \"fallback\"}}\n",
    );
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .run()
        .success();
    assert_eq!(d.read("t.out"), "a=dflt\nb=[]\nc=x\nd=fallback\n");
}

#[test]
fn bad_input_exits_2_before_anything_is_fetched() {
    let d = project();
    // Each case also references a missing file: had anything been fetched,
    // the message would name it.
    d.write(
        "t.hbs",
        "{{file \"missing.yaml\"}}\nline2 {{secret \"ssm:/app/x@0\"}}\n",
    );
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .run()
        .code(2)
        .stderr_has("t.hbs:2:7")
        .stderr_has("SSM versions start at 1")
        .stderr_has("      ssm:/app/x@0\n                 ^");
    let run = d.cmd(&["render", "--template", "t.hbs:t.out"]).run();
    assert!(!run.stderr.contains("missing.yaml"), "{}", run.stderr);

    d.write("u.hbs", "{{file \"missing.yaml\"}}\n{{#if x}}\n");
    d.cmd(&["render", "--template", "u.hbs:u.out"])
        .run()
        .code(2)
        .stderr_has("u.hbs:")
        .stderr_has("cannot parse template");

    d.write("v.hbs", "{{file \"missing.yaml\"}}\n   {{undefined_var}}\n");
    d.cmd(&["render", "--template", "v.hbs:v.out"])
        .run()
        .code(2)
        .stderr_has("v.hbs:2:4")
        .stderr_has("\"undefined_var\" is not defined");

    d.write(
        "bad.toml",
        "[[template]]\nsource = \"t.hbs\"\ndestination = \"x\"\nperms = \"0600\"\n",
    );
    d.cmd(&["render", "--config", "bad.toml"])
        .run()
        .code(2)
        .stderr_has("bad.toml:4:1")
        .stderr_has("unknown field `perms`");

    d.write(
        "bad2.toml",
        "[render]\ntimeout = \"forever\"\n[[template]]\nsource = \"t.hbs\"\ndestination = \"x\"\nmode = \"rw\"\n",
    );
    d.cmd(&["render", "--config", "bad2.toml"])
        .run()
        .code(2)
        .stderr_has("2 problems")
        .stderr_has("bad2.toml:2:11: render.timeout")
        .stderr_has("bad2.toml:6:8: mode: \"rw\" is not an octal mode");

    d.cmd(&["render", "--template", "nope.hbs:x"])
        .run()
        .code(2)
        .stderr_has("nope.hbs: cannot read the template");
    d.cmd(&["render", "--template", "t.hbs"])
        .run()
        .code(2)
        .stderr_has("SRC:DEST");
    d.cmd(&["render", "--config", "absent.toml", "--template", "t.hbs:x"])
        .run()
        .code(2)
        .stderr_has("absent.toml: cannot read the configuration");
    d.cmd(&["render", "--timeout", "soon", "--template", "t.hbs:x"])
        .run()
        .code(2);
    d.cmd(&["render", "--no-such-flag"]).run().code(2);
    d.cmd(&[]).run().code(2);
    d.cmd(&["render"])
        .run()
        .code(2)
        .stderr_has("nothing to render");
    d.cmd(&[
        "render",
        "--template",
        "app.conf.hbs:same",
        "--template",
        "t.hbs:same",
    ])
    .run()
    .code(2)
    .stderr_has("two outputs write this destination");
    assert!(!d.join("t.out").exists());
}

#[test]
fn get_prints_one_value() {
    let d = project();
    let run = d.cmd(&["get", "file:values.yaml#db.host"]).run().success();
    assert_eq!(run.stdout, "db.internal\n");
    let run = d.cmd(&["get", "file:values.yaml#port"]).run().success();
    assert_eq!(run.stdout, "5432\n");
    let run = d.cmd(&["get", "file:values.yaml#db"]).run().success();
    let map: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(map["host"], "db.internal");
    d.cmd(&["get", "file:values.yaml#db.nope"])
        .run()
        .code(1)
        .stderr_has("no key \"nope\" at #db")
        .no_canary();
    d.cmd(&["get", "fiel:values.yaml"])
        .run()
        .code(2)
        .stderr_has("unknown scheme \"fiel\"")
        .stderr_has("hint: use one of");
    let run = d
        .cmd(&["get", "env:ENVRENDER_TEST_VALUE"])
        .env("ENVRENDER_TEST_VALUE", "from-env")
        .run()
        .success();
    assert_eq!(run.stdout, "from-env\n");
}

#[test]
fn check_shows_the_plan_masked_and_writes_nothing() {
    let d = project();
    d.write("envrender.toml", "[env]\nDB = \"file:values.yaml#db.password\"\nPLAIN = \"text\"\n[[env_file]]\ndestination = \"out/app.env\"\n[[template]]\nsource = \"app.conf.hbs\"\ndestination = \"out/app.conf\"\n");
    let run = d
        .cmd(&["check"])
        .run()
        .success()
        .stdout_has("configuration: envrender.toml")
        .stdout_has("file:values.yaml#db.password\n      ok      string, 26 chars\n      used by app.conf.hbs, env DB")
        .stdout_has("file: 1 × read file")
        .stdout_has("would create")
        .no_canary();
    assert!(run.stdout.contains("out/app.conf"), "{}", run.stdout);
    assert!(!d.join("out").exists());
    // After a render, check sees the outputs as unchanged.
    d.cmd(&["render"]).run().success();
    d.cmd(&["check"]).run().success().stdout_has("unchanged");
    // A failing reference: the plan is still shown, and the exit code is 1.
    d.write("app.conf.hbs", "{{secret \"file:values.yaml#db.nope\"}}");
    d.cmd(&["check"])
        .run()
        .code(1)
        .stdout_has("FAILED  file: select: no key \"nope\" at #db")
        .stderr_has("1 reference could not be resolved")
        .no_canary();
}

#[test]
fn the_canary_never_reaches_logs_even_at_trace() {
    let d = project();
    d.write("bad.json", &format!("{{\"a\": \"{CANARY}\",,}}"));
    d.write("list.hbs", "{{secret \"file:values.yaml#db\"}}");
    d.write(
        "ok.hbs",
        "{{secret \"file:values.yaml#db.password\"}}{{json (secret \"file:values.yaml\")}}",
    );
    for args in [
        vec!["render", "--template", "ok.hbs:ok.out"],
        vec!["check", "--template", "ok.hbs:ok2.out"],
        vec!["render", "--template", "list.hbs:l.out"],
        vec!["get", "file:bad.json"],
        vec!["get", "file:values.yaml#db.password.deeper"],
        vec!["get", "file:values.yaml"],
    ] {
        for format in ["text", "json"] {
            let mut full = vec!["--log-level", "trace", "--log-format", format];
            full.extend(&args);
            let run = d.cmd(&full).run();
            assert!(
                !run.stderr.contains(CANARY),
                "{args:?}: canary in stderr:\n{}",
                run.stderr
            );
            if args[0] != "get" || args[1] == "file:bad.json" {
                assert!(!run.stdout.contains(CANARY), "{args:?}: canary in stdout");
            }
        }
    }
    // The trace level did log something: the reference names.
    let run = d
        .cmd(&[
            "--log-level",
            "trace",
            "render",
            "--template",
            "ok.hbs:ok.out",
        ])
        .run()
        .success();
    assert!(
        run.stderr.contains("file:values.yaml#db.password"),
        "{}",
        run.stderr
    );
    assert_eq!(d.read("ok.out").matches(CANARY).count(), 2);
}

#[test]
fn env_files_read_back_exactly() {
    let d = Dir::new();
    let tricky = "it's $HOME \"quoted\"\nsecond line\\";
    d.write(
        "v.json",
        &serde_json::json!({"tricky": tricky, "plain": "p"}).to_string(),
    );
    d.write(
        "envrender.toml",
        "[env]\nTRICKY = \"file:v.json#tricky\"\nPLAIN = \"file:v.json#plain\"\nURL = \"https://example.com/?a=1\"\n\
         [[env_file]]\ndestination = \"app.env\"\n[[env_file]]\ndestination = \"app.json\"\nformat = \"json\"\n",
    );
    d.cmd(&["render"]).run().success();
    let parsed: Vec<(String, String)> = dotenvy::from_path_iter(d.join("app.env"))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        parsed,
        [
            ("PLAIN".to_string(), "p".to_string()),
            ("TRICKY".to_string(), tricky.to_string()),
            ("URL".to_string(), "https://example.com/?a=1".to_string())
        ]
    );
    let json: serde_json::Value = serde_json::from_str(&d.read("app.json")).unwrap();
    assert_eq!(json["TRICKY"], tricky);
    assert_eq!(d.mode("app.env"), 0o600);
}

#[test]
fn envrender_variables_and_local_values() {
    let d = project();
    d.write(
        "conf/e.toml",
        "[[template]]\nsource = \"prod.hbs\"\ndestination = \"/etc/app/prod.conf\"\n",
    );
    d.write("prod.hbs", "db={{ssm \"/app/db/password\"}} host={{consul \"app/db/host\"}}\n{{#each (consul \"app/flags/\")}}{{@key}}={{this}};{{/each}}\n");
    d.write("local.yaml", "\"ssm:/app/db/password\": pw\n\"consul:app/db/host\": h\n\"consul:app/flags/a\": \"1\"\n\"consul:app/flags/b\": \"2\"\n");
    d.cmd(&["render"])
        .env("ENVRENDER_CONFIG", "conf/e.toml")
        .env("ENVRENDER_OUTPUT_ROOT", "root")
        .env("ENVRENDER_VALUES", "local.yaml")
        .run()
        .success();
    assert_eq!(d.read("root/etc/app/prod.conf"), "db=pw host=h\na=1;b=2;\n");
    // Without the values file the same template needs backends.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    d.cmd(&["render"])
        .env("ENVRENDER_CONFIG", "conf/e.toml")
        .env("ENVRENDER_OUTPUT_ROOT", "root")
        .env("ENVRENDER_TIMEOUT", "1s")
        .env("CONSUL_HTTP_ADDR", &nobody)
        .run()
        .code(1)
        .stderr_has(&format!("cannot reach Consul at http://{nobody}/"))
        .stderr_has("ssm: resolve region: no AWS region is configured");
    // A reference missing from the values file is reported against it.
    d.write("local.yaml", "\"ssm:/app/db/password\": pw\n");
    d.cmd(&[
        "render",
        "--values",
        "local.yaml",
        "--config",
        "conf/e.toml",
        "--output-root",
        "root",
    ])
    .run()
    .code(1)
    .stderr_has("consul:app/db/host  (used by prod.hbs)")
    .stderr_has("not in local.yaml")
    .stderr_has("add a key \"consul:app/db/host\" to local.yaml");
    // With fallthrough, what the file lacks goes to the backend.
    d.write(
        "conf/f.toml",
        "[local]\nvalues = \"local.yaml\"\nfallthrough = true\n\
         [[template]]\nsource = \"prod.hbs\"\ndestination = \"/etc/app/prod.conf\"\n",
    );
    d.cmd(&[
        "render",
        "--timeout",
        "1s",
        "--config",
        "conf/f.toml",
        "--output-root",
        "root",
    ])
    .env("CONSUL_HTTP_ADDR", &nobody)
    .run()
    .code(1)
    .stderr_has("cannot reach Consul");
}

#[test]
fn references_computed_from_fetched_data() {
    let d = Dir::new();
    d.write("services/web", "10.0.0.1");
    d.write("services/api", "10.0.0.2");
    d.write("creds/web.json", "{\"user\": \"w\"}");
    d.write("creds/api.json", "{\"user\": \"a\"}");
    d.write(
        "t.hbs",
        "{{#each (secret \"file:services/\")}}{{@key}} {{this}} {{secret (concat \"file:creds/\" @key \".json#user\")}}\n{{/each}}",
    );
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .run()
        .success();
    assert_eq!(d.read("t.out"), "api 10.0.0.2 a\nweb 10.0.0.1 w\n");
}

/// `--timeout` is the time allowed: with a backend that never answers, the
/// retries go on until it is nearly spent, not until the next backoff step
/// would pass it (a 3 s timeout gave up after 2.3 s).
#[test]
fn the_timeout_is_the_time_allowed() {
    let d = Dir::new();
    d.write("t.hbs", "{{consul \"app/x\"}}");
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let start = std::time::Instant::now();
    d.cmd(&["render", "--timeout", "3s", "--template", "t.hbs:x"])
        .env("CONSUL_HTTP_ADDR", &nobody)
        .run()
        .code(1)
        .stderr_has("cannot reach Consul");
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(2800),
        "gave up after {took:?} of 3 s"
    );
    assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
}

/// A wrapper's configuration (only `[env]`) is checkable, with the
/// references its environment holds, as `run` would see them.
#[test]
fn check_covers_a_wrapper_configuration_and_references_in_the_environment() {
    let d = Dir::new();
    d.write(
        "envrender.toml",
        "[local]\nvalues = \"local.yaml\"\n\n[env]\nDB_HOST = \"consul:app/db/host\"\nLOG_LEVEL = \"info\"\n",
    );
    d.write(
        "local.yaml",
        "\"consul:app/db/host\": db.internal\n\"ssm:/app/db/password\": pw\n",
    );
    d.cmd(&["check"])
        .env("DB_PASSWORD", "ssm:/app/db/password")
        .env("LOG_LEVEL", "debug")
        .run()
        .success()
        .stdout_has("used by env DB_HOST")
        .stdout_has("ssm:/app/db/password")
        .stdout_has("used by env DB_PASSWORD")
        .stdout_has("environment (as run would give it to its command):")
        .stdout_has("DB_PASSWORD  = ssm:/app/db/password")
        .stdout_has("LOG_LEVEL  set in the environment");
    // A reference the environment holds that cannot be had fails the check.
    d.cmd(&["check"])
        .env("API_KEY", "ssm:/app/missing")
        .run()
        .code(1)
        .stdout_has("ssm:/app/missing")
        .stderr_has("ssm:/app/missing");
    // Nothing at all to check.
    let empty = Dir::new();
    empty
        .cmd(&["check"])
        .run()
        .code(2)
        .stderr_has("nothing to check");
}

/// `--version` names the commit; the top-level help has an example per mode.
#[test]
fn version_names_the_commit_and_help_shows_each_mode() {
    let d = Dir::new();
    let out = d.cmd(&["--version"]).run().success();
    let line = out.stdout.trim();
    let commit = line
        .strip_prefix(concat!(
            "envrender ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{line}"
    );
    let help = d.cmd(&["--help"]).run().success();
    for example in [
        "envrender render",
        "envrender watch",
        "envrender -- ./server",
        "envrender check",
    ] {
        assert!(help.stdout.contains(example), "{example}\n{}", help.stdout);
    }
}

/// Shell completions and the manual page come from the command line's own
/// definition.
#[test]
fn completions_and_the_manual_page_cover_every_command() {
    let d = Dir::new();
    let bash = d.cmd(&["completions", "bash"]).run().success();
    for command in ["render", "watch", "run", "check", "get", "--splay"] {
        assert!(bash.stdout.contains(command), "{command}");
    }
    std::fs::write(d.join("envrender.bash"), &bash.stdout).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(d.join("envrender.bash"))
        .status()
        .unwrap();
    assert!(syntax.success());
    for shell in ["zsh", "fish"] {
        let out = d.cmd(&["completions", shell]).run().success();
        assert!(out.stdout.contains("watch"), "{shell}");
    }
    let man = d.cmd(&["manpage"]).run().success();
    assert!(man.stdout.starts_with(".ie"), "{}", man.stdout);
    for section in [
        ".TH envrender 1",
        ".SH NAME",
        ".SH SYNOPSIS",
        "render",
        "watch",
    ] {
        assert!(man.stdout.contains(section), "{section}");
    }
    d.cmd(&["completions", "tcsh"]).run().code(2);
}
