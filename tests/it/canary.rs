//! The secret hygiene audit: a canary value in every backend (Consul, Vault,
//! SSM, Secrets Manager, KMS, a local values file, a file, an environment
//! variable) and in the credentials (the Vault token, the AWS secret key).
//! Every mode runs over them at trace level, with text and JSON logs, with
//! successes, failures, template errors, `check`, `get`, a watch through a
//! Consul outage (readiness and `/metrics`), and `run` (its own and its
//! command's argv and environment). Everything envrender emitted is then
//! scanned: no canary anywhere but in the rendered files and in the command's
//! environment, where they belong.

use crate::support;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use support::aws::{block_on, sdk};
use support::consul::ConsulServer;
use support::fault::{Fault, FaultProxy};
use support::vault::VaultServer;
use support::{CANARY, Dir, KillOnDrop, eventually};

struct Fixture {
    consul: ConsulServer,
    consul_proxy: FaultProxy,
    vault: VaultServer,
    moto: String,
    kms_ciphertext: String,
    d: Dir,
    /// Every secret planted, for the scan and for the positive control.
    secrets: Vec<String>,
}

fn canary(what: &str) -> String {
    format!("{CANARY}-{what}")
}

impl Fixture {
    fn start() -> Fixture {
        let consul = ConsulServer::start();
        consul.put("app/key", &canary("consul"));
        consul.put("app/prefix/a", &canary("consul-prefix"));
        let vault = VaultServer::start();
        vault.kv2_put(
            "secret/",
            "app",
            json!({"password": canary("vault"), "user": "app"}),
        );
        let moto = support::aws::moto().url.clone();
        support::aws::put_parameters(&moto, &[("/t/canary/ssm", &canary("ssm"), true)]);
        let kms_ciphertext = block_on(async {
            let sm = aws_sdk_secretsmanager::Client::new(&sdk(&moto));
            sm.create_secret()
                .name("t/canary/sm")
                .secret_string(json!({"key": canary("sm")}).to_string())
                .send()
                .await
                .unwrap();
            let kms = aws_sdk_kms::Client::new(&sdk(&moto));
            let key = kms.create_key().send().await.unwrap();
            let out = kms
                .encrypt()
                .key_id(key.key_metadata().unwrap().key_id())
                .plaintext(aws_sdk_kms::primitives::Blob::new(canary("kms")))
                .send()
                .await
                .unwrap();
            base64::engine::general_purpose::STANDARD
                .encode(out.ciphertext_blob().unwrap().as_ref())
        });
        let d = Dir::new();
        d.write(
            "values.yaml",
            &format!("\"consul:local/key\": {}\n", canary("local")),
        );
        d.write("secret.txt", &canary("file"));
        d.write(
            "envrender.toml",
            "[local]\nvalues = \"values.yaml\"\nfallthrough = true\n\n[consul]\nwait = \"1s\"\n",
        );
        let secrets = [
            "consul",
            "consul-prefix",
            "vault",
            "ssm",
            "sm",
            "kms",
            "local",
            "file",
            "env",
        ]
        .iter()
        .map(|w| canary(w))
        .chain([canary("aws-secret-key"), vault.root_token.clone()])
        .collect();
        Fixture {
            consul_proxy: FaultProxy::start(&consul.url),
            consul,
            vault,
            moto,
            kms_ciphertext,
            d,
            secrets,
        }
    }

    /// Every backend's reference, as template text.
    fn template(&self) -> String {
        format!(
            "consul={{{{consul \"app/key\"}}}}\n\
             prefix={{{{#each (consul \"app/prefix/\")}}}}{{{{this}}}}{{{{/each}}}}\n\
             vault={{{{vault \"secret/app#password\"}}}}\n\
             ssm={{{{ssm \"/t/canary/ssm\"}}}}\n\
             sm={{{{sm \"t/canary/sm#key\"}}}}\n\
             kms={{{{kms \"{}\"}}}}\n\
             local={{{{consul \"local/key\"}}}}\n\
             file={{{{file \"./secret.txt\"}}}}\n\
             env={{{{env \"API_KEY\"}}}}\n",
            self.kms_ciphertext
        )
    }

    /// envrender at trace level with every backend and credential set.
    fn cmd(&self, args: &[&str]) -> support::Cmd {
        self.d
            .cmd(args)
            .env("ENVRENDER_LOG_LEVEL", "trace")
            .env("CONSUL_HTTP_ADDR", self.consul_proxy.addr())
            .env("VAULT_ADDR", &self.vault.url)
            .env("VAULT_TOKEN", &self.vault.root_token)
            .env("API_KEY", &canary("env"))
            .aws(&self.moto)
            .env("AWS_SECRET_ACCESS_KEY", &canary("aws-secret-key"))
    }
}

/// What envrender emitted, by where it came from.
#[derive(Default)]
struct Emitted(Vec<(String, String)>);

impl Emitted {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn add_run(&mut self, what: &str, run: &support::Run) {
        self.add(format!("{what}: stderr"), run.stderr.clone());
        self.add(format!("{what}: stdout"), run.stdout.clone());
    }

    /// Asserts no secret appears anywhere; returns the bytes scanned.
    fn assert_clean(&self, secrets: &[String]) -> usize {
        let mut leaks = Vec::new();
        for (what, text) in &self.0 {
            for s in secrets {
                if text.contains(s.as_str()) {
                    leaks.push(format!("{what} contains {s}"));
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
        self.0.iter().map(|(_, t)| t.len()).sum()
    }
}

#[test]
fn no_secret_reaches_logs_errors_metrics_check_or_argv() {
    let f = Fixture::start();
    let d = &f.d;
    d.write("all.hbs", &f.template());
    let mut emitted = Emitted::default();

    // Renders that succeed, in both log formats: the control that every
    // secret was fetched and written.
    for format in ["text", "json"] {
        let out = format!("all-{format}.out");
        let run = f
            .cmd(&[
                "render",
                "--log-format",
                format,
                "--template",
                &format!("all.hbs:{out}"),
            ])
            .run();
        assert_eq!(run.code, 0, "{}", run.stderr);
        let written = d.read(&out);
        for s in f
            .secrets
            .iter()
            .filter(|s| s.starts_with(CANARY) && !s.ends_with("aws-secret-key"))
        {
            assert!(written.contains(s.as_str()), "{s} was not rendered");
        }
        assert!(run.stderr.contains("TRACE") || run.stderr.contains("\"TRACE\""));
        emitted.add_run(&format!("render ({format} logs)"), &run);
    }

    // A render with unresolvable references next to resolved ones.
    d.write(
        "missing.hbs",
        &format!("{}gone={{{{consul \"app/gone\"}}}}\nfield={{{{vault \"secret/app#nope\"}}}}\ndeep={{{{consul \"app/key#a.b\"}}}}\n", f.template()),
    );
    let run = f
        .cmd(&["render", "--template", "missing.hbs:missing.out"])
        .run();
    assert_eq!(run.code, 1, "{}", run.stderr);
    emitted.add_run("render with missing values", &run);

    // Template errors over secret values: helpers that fail on them, and
    // Handlebars' own log helper.
    for (name, text) in [
        ("b64", "{{base64_decode (vault \"secret/app#password\")}}"),
        (
            "split",
            "{{#each (split (ssm \"/t/canary/ssm\") 3)}}{{/each}}",
        ),
        ("lookup", "{{lookup (consul \"app/key\") \"x\"}}"),
        (
            "log",
            "{{log (consul \"app/key\")}}{{log (vault \"secret/app#password\") level=\"error\"}}",
        ),
        (
            "each",
            "{{#each (sm \"t/canary/sm#key\")}}{{this.x.y}}{{/each}}",
        ),
    ] {
        d.write(&format!("{name}.hbs"), text);
        let run = f
            .cmd(&["render", "--template", &format!("{name}.hbs:{name}.out")])
            .run();
        emitted.add_run(&format!("template {name} (exit {})", run.code), &run);
    }

    // `check`: the plan with values masked.
    for format in ["text", "json"] {
        let run = f
            .cmd(&[
                "check",
                "--log-format",
                format,
                "--template",
                "all.hbs:check.out",
            ])
            .run();
        assert_eq!(run.code, 0, "{}", run.stderr);
        emitted.add_run(&format!("check ({format} logs)"), &run);
    }

    // `get` prints the value asked for, by design; its errors must not.
    for reference in [
        "vault:secret/app#nope",
        "consul:app/key#x",
        "sm:t/canary/sm#nope",
    ] {
        let run = f.cmd(&["get", reference]).run();
        assert_ne!(run.code, 0, "{reference}");
        emitted.add_run(&format!("get {reference}"), &run);
    }

    // watch: a change, then a Consul outage (readiness lists the errors),
    // with /metrics and /readyz read throughout.
    let port = support::aws::free_port();
    let listen = format!("127.0.0.1:{port}");
    let log = d.join("watch.log");
    let mut watch = KillOnDrop(
        f.cmd(&[
            "watch",
            "--listen",
            &listen,
            "--template",
            "all.hbs:watch.out",
        ])
        .env("ENVRENDER_LOG_FORMAT", "json")
        .command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let get = |path: &str| {
        block_on(async {
            match reqwest::get(format!("http://{listen}{path}")).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        })
    };
    eventually(Duration::from_secs(20), "readiness", || {
        get("/readyz").0 == 200
    });
    f.consul.put("app/key", &canary("consul-2"));
    eventually(Duration::from_secs(10), "the change", || {
        d.read("watch.out").contains(&canary("consul-2"))
    });
    emitted.add("watch /metrics", get("/metrics").1);
    f.consul_proxy.inject(Fault::Status(500), None);
    eventually(Duration::from_secs(20), "degraded readiness", || {
        get("/readyz").0 == 503
    });
    emitted.add("watch /readyz (degraded)", get("/readyz").1);
    emitted.add("watch /metrics (degraded)", get("/metrics").1);
    f.consul_proxy.clear();
    let _ = watch.0.kill();
    let _ = watch.0.wait();
    emitted.add("watch (json logs)", std::fs::read_to_string(&log).unwrap());

    // run: the command gets the values in its environment, never in argv;
    // envrender's own argv and environment hold none.
    let script = "tr '\\0' ' ' < /proc/$PPID/cmdline > argv.txt; echo >> argv.txt; \
                  tr '\\0' ' ' < /proc/$$/cmdline >> argv.txt; echo >> argv.txt; \
                  tr '\\0' '\\n' < /proc/$PPID/environ > parent-env.txt; \
                  env > child-env.txt; exec sleep 30";
    let mut run = KillOnDrop(
        f.cmd(&[
            "run",
            "--supervise",
            "--template",
            "all.hbs:run.out",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("DB_PASSWORD", "vault:secret/app#password")
        .env("LEVEL", "ssm:/t/canary/ssm")
        .command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("run.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    eventually(Duration::from_secs(20), "the command", || {
        d.join("child-env.txt").exists() && d.join("parent-env.txt").exists()
    });
    std::thread::sleep(Duration::from_millis(200));
    let child_env = d.read("child-env.txt");
    assert!(
        child_env.contains(&format!("DB_PASSWORD={}", canary("vault"))),
        "{child_env}"
    );
    assert!(child_env.contains(&format!("LEVEL={}", canary("ssm"))));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = run.0.wait();
    emitted.add(
        "run: argv of envrender and of the command",
        d.read("argv.txt"),
    );
    emitted.add("run (text logs)", d.read("run.log"));
    // envrender's environment holds the references and the credentials it
    // was given, never a fetched value.
    let parent_env = d.read("parent-env.txt");
    let fetched: Vec<String> = ["consul", "vault", "ssm", "sm", "kms", "local", "file"]
        .iter()
        .map(|w| canary(w))
        .collect();
    let mut env_scan = Emitted::default();
    env_scan.add("run: envrender's environment", parent_env);
    env_scan.assert_clean(&fetched);

    let bytes = emitted.assert_clean(&f.secrets);
    eprintln!(
        "scanned {} outputs, {bytes} bytes, for {} secrets: none found",
        emitted.0.len(),
        f.secrets.len()
    );
}
