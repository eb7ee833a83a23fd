//! SSM Parameter Store, KMS and Secrets Manager against the moto emulator,
//! with a counting, fault-injecting proxy in front of it.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use envrender::backend::aws::AwsConfig;
use envrender::backend::aws::{Aws, secretsmanager::SecretsManager, ssm::Ssm};
use envrender::backend::{Backend, Observation, Watching};
use support::aws::{
    ACCOUNT, Proxy, REGION, block_on, moto, put_parameters, put_parameters_in, sdk,
};
use support::{CANARY, Dir};

/// Writes `n` String parameters `{prefix}p00…` with values `v00…` to the
/// emulator and returns their names and values.
fn numbered_parameters(url: &str, prefix: &str, n: usize) -> Vec<(String, String)> {
    let params: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{prefix}p{i:02}"), format!("v{i:02}")))
        .collect();
    let refs: Vec<(&str, &str, bool)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str(), false))
        .collect();
    put_parameters(url, &refs);
    params
}

/// A template reading every parameter, one `{{ssm}}` after the other.
fn template_reading(params: &[(String, String)], separator: &str) -> String {
    params
        .iter()
        .map(|(n, _)| format!("{{{{ssm \"{n}\"}}}}{separator}"))
        .collect()
}

#[test]
fn ninety_five_names_take_ten_get_parameters_calls() {
    let moto = moto();
    let params = numbered_parameters(&moto.url, "/t/batch/", 95);
    let d = Dir::new();
    let template = template_reading(&params, "\n");
    d.write("t.hbs", &template);
    // The same names again from env mappings and with a default: deduped.
    d.write(
        "envrender.toml",
        "[env]\nA = \"ssm:/t/batch/p00\"\nB = \"ssm:/t/batch/p94|default=x\"\nC = \"ssm:/t/batch/p50#not_json|optional\"\n\
         [[env_file]]\ndestination = \"app.env\"\n[[template]]\nsource = \"t.hbs\"\ndestination = \"t.out\"\n",
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("ssm:/t/batch/p50#not_json|optional");
    // A field on a value that is not JSON is an error even when optional;
    // drop it and count again.
    d.write(
        "envrender.toml",
        "[env]\nA = \"ssm:/t/batch/p00\"\nB = \"ssm:/t/batch/p94|default=x\"\n\
         [[env_file]]\ndestination = \"app.env\"\n[[template]]\nsource = \"t.hbs\"\ndestination = \"t.out\"\n",
    );
    proxy.reset_counts();
    d.cmd(&["render"]).aws(&proxy.url).run().success();
    assert_eq!(proxy.counts(), [("GetParameters".to_string(), 10)].into());
    let expected: String = params.iter().map(|(_, v)| format!("{v}\n")).collect();
    assert_eq!(d.read("t.out"), expected);
    assert_eq!(d.read("app.env"), "A='v00'\nB='v94'\n");
}

#[test]
fn prefixes_page_through_get_parameters_by_path() {
    let moto = moto();
    numbered_parameters(&moto.url, "/t/path/", 21);
    put_parameters(
        &moto.url,
        &[
            ("/t/path/db/host", "db.internal", true),
            ("/t/path/db/nested/deep", "deep", true),
            ("/t/pathological", "not under /t/path/", true),
        ],
    );
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{#each (ssm \"/t/path/\")}}{{@key}}={{this}}\n{{/each}}",
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    let out = d.read("t.out");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 23, "{out}");
    assert_eq!(lines[0], "db/host=db.internal");
    assert_eq!(lines[1], "db/nested/deep=deep");
    assert_eq!(lines[2], "p00=v00");
    assert!(!out.contains("pathological"));
    assert_eq!(
        proxy.counts(),
        [("GetParametersByPath".to_string(), 3)].into()
    );
    // An empty prefix is an error unless optional.
    d.write(
        "e.hbs",
        "{{#each (ssm \"/t/path-empty/\")}}{{this}}{{/each}}",
    );
    d.cmd(&["render", "--template", "e.hbs:e.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("nothing found under the prefix");
}

#[test]
fn versions_and_labels() {
    let moto = moto();
    put_parameters(&moto.url, &[("/t/ver/x", "one", false)]);
    put_parameters(&moto.url, &[("/t/ver/x", "two", false)]);
    let client = aws_sdk_ssm::Client::new(&sdk(&moto.url));
    block_on(
        client
            .label_parameter_version()
            .name("/t/ver/x")
            .parameter_version(1)
            .labels("stable")
            .send(),
    )
    .unwrap();
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{ssm \"/t/ver/x\"}} {{ssm \"/t/ver/x@1\"}} {{ssm \"/t/ver/x@stable\"}}",
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "two one one");
    // Versions of one parameter go to separate calls, so that each answer
    // is known to be the one asked for.
    assert_eq!(proxy.count("GetParameters"), 3);
    d.cmd(&["check", "--template", "t.hbs:t2.out"])
        .aws(&proxy.url)
        .run()
        .success()
        .stdout_has("ssm:/t/ver/x\n      ok      string, 3 chars (version 2)");
    d.write(
        "bad.hbs",
        "{{ssm \"/t/ver/x@9\"}}{{ssm \"/t/ver/x@nolabel\"}}",
    );
    d.cmd(&["render", "--template", "bad.hbs:bad.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("no parameter /t/ver/x with version or label \"9\"")
        .stderr_has("no parameter /t/ver/x with version or label \"nolabel\"");
}

#[test]
fn a_missing_name_is_reported_alone_and_the_rest_resolve() {
    let moto = moto();
    put_parameters(
        &moto.url,
        &[("/t/miss/a", "A", false), ("/t/miss/b", "B", true)],
    );
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{ssm \"/t/miss/a\"}}{{ssm \"/t/miss/nope\"}}{{ssm \"/t/miss/b\"}}",
    );
    let run = d
        .cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .code(1)
        .stderr_has("1 reference could not be resolved")
        .stderr_has("ssm:/t/miss/nope  (used by t.hbs)")
        .stderr_has("ssm: ssm:GetParameters arn:aws:ssm:us-east-1:ACCOUNT:parameter/t/miss/nope: no parameter /t/miss/nope");
    assert!(!run.stderr.contains("/t/miss/a"), "{}", run.stderr);
    d.write(
        "t.hbs",
        "{{ssm \"/t/miss/a\"}}[{{ssm \"/t/miss/nope\" optional=true}}]{{ssm \"/t/miss/b\"}}",
    );
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "A[]B");
}

/// An SSM `StringList` is a list in a template and `a,b` in an environment
/// variable or env file, as ECS's `valueFrom` gives it.
#[test]
fn a_string_list_is_comma_separated_in_the_environment_as_ecs_gives_it() {
    let moto = moto();
    let client = aws_sdk_ssm::Client::new(&sdk(&moto.url));
    block_on(async {
        client
            .put_parameter()
            .name("/t/list/hosts")
            .value("a.example,b.example")
            .r#type(aws_sdk_ssm::types::ParameterType::StringList)
            .overwrite(true)
            .send()
            .await
            .unwrap();
    });
    let d = Dir::new();
    d.write(
        "envrender.toml",
        "[env]\nHOSTS = \"ssm:/t/list/hosts\"\n\n[[env_file]]\ndestination = \"app.env\"\n",
    );
    d.write(
        "t.hbs",
        "{{#each (ssm \"/t/list/hosts\")}}server {{this}}\n{{/each}}",
    );
    let out = d
        .cmd(&[
            "run",
            "--template",
            "t.hbs:t.out",
            "--",
            "sh",
            "-c",
            "echo \"$HOSTS|$FIRST\"",
        ])
        .env("FIRST", "ssm:/t/list/hosts#0")
        .aws(&moto.url)
        .run()
        .success();
    assert_eq!(out.stdout, "a.example,b.example|a.example\n");
    assert_eq!(d.read("t.out"), "server a.example\nserver b.example\n");
    assert!(
        d.read("app.env").contains("HOSTS='a.example,b.example'\n"),
        "{}",
        d.read("app.env")
    );
}

#[test]
fn a_securestring_canary_never_reaches_stderr() {
    let moto = moto();
    put_parameters(&moto.url, &[("/t/canary/secret", CANARY, true)]);
    let d = Dir::new();
    d.write("t.hbs", "secret={{ssm \"/t/canary/secret\"}}\n");
    d.write("bad.hbs", "{{ssm \"/t/canary/secret\" \"field\"}}");
    for format in ["text", "json"] {
        let trace = |args: &[&str]| {
            let mut all = vec!["--log-level", "trace", "--log-format", format];
            all.extend(args);
            d.cmd(&all).aws(&moto.url).run()
        };
        trace(&["render", "--template", "t.hbs:t.out"])
            .success()
            .no_canary();
        trace(&["check", "--template", "t.hbs:t.out"])
            .success()
            .no_canary();
        trace(&["render", "--template", "bad.hbs:bad.out"])
            .code(1)
            .stderr_has("not JSON")
            .no_canary();
    }
    assert_eq!(d.read("t.out"), format!("secret={CANARY}\n"));
}

#[test]
fn kms_decrypts_with_and_without_encryption_context_once_per_ciphertext() {
    let moto = moto();
    let kms = aws_sdk_kms::Client::new(&sdk(&moto.url));
    let (plain, with_context) = block_on(async {
        let key = kms.create_key().send().await.unwrap();
        let key_id = key.key_metadata().unwrap().key_id().to_string();
        let encrypt = |context: Option<(&str, &str)>| {
            let mut req = kms
                .encrypt()
                .key_id(&key_id)
                .plaintext(aws_sdk_kms::primitives::Blob::new("kms-plaintext"));
            if let Some((k, v)) = context {
                req = req.encryption_context(k, v);
            }
            async move { req.send().await.unwrap() }
        };
        let b64 = |o: aws_sdk_kms::operation::encrypt::EncryptOutput| {
            base64::engine::general_purpose::STANDARD.encode(o.ciphertext_blob().unwrap().as_ref())
        };
        (
            b64(encrypt(None).await),
            b64(encrypt(Some(("app", "web"))).await),
        )
    });
    let d = Dir::new();
    d.write(
        "t.hbs",
        &format!(
            "{{{{kms \"{plain}\"}}}} {{{{secret \"kms:{with_context}?context.app=web\"}}}} {{{{kms \"{plain}\"}}}}\n"
        ),
    );
    d.write(
        "envrender.toml",
        &format!("[env]\nK = \"kms:{plain}\"\n[[env_file]]\ndestination = \"k.env\"\n"),
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    assert_eq!(
        d.read("t.out"),
        "kms-plaintext kms-plaintext kms-plaintext\n"
    );
    assert_eq!(d.read("k.env"), "K='kms-plaintext'\n");
    assert_eq!(proxy.counts(), [("Decrypt".to_string(), 2)].into());
    // The wrong context, or none, does not decrypt: say so.
    d.write(
        "w.hbs",
        &format!("{{{{secret \"kms:{with_context}?context.app=api\"}}}}"),
    );
    d.cmd(&["render", "--template", "w.hbs:w.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("kms: kms:Decrypt: InvalidCiphertextException")
        .stderr_has("does not decrypt with encryption context {app=…}");
    d.write("n.hbs", &format!("{{{{kms \"{with_context}\"}}}}"));
    d.cmd(&["render", "--template", "n.hbs:n.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("give the same one as context.NAME=VALUE parameters");
}

fn create_secret(sm: &aws_sdk_secretsmanager::Client, name: &str, value: &str) {
    block_on(sm.create_secret().name(name).secret_string(value).send()).unwrap();
}

/// Secrets `PREFIX/00`… holding `s00`…, and a template line using each:
/// `{{sm "PREFIX/00"}},…`.
fn many_secrets(sm: &aws_sdk_secretsmanager::Client, prefix: &str, n: usize) -> String {
    block_on(async {
        for i in 0..n {
            sm.create_secret()
                .name(format!("{prefix}/{i:02}"))
                .secret_string(format!("s{i:02}"))
                .send()
                .await
                .unwrap();
        }
    });
    (0..n)
        .map(|i| format!("{{{{sm \"{prefix}/{i:02}\"}}}},"))
        .collect()
}

#[test]
fn secrets_manager_names_keys_stages_arns_and_batches() {
    let moto = moto();
    let sm = aws_sdk_secretsmanager::Client::new(&sdk(&moto.url));
    let arn = block_on(async {
        let created = sm
            .create_secret()
            .name("t/sm/db")
            .secret_string(r#"{"user": "app", "password": "first"}"#)
            .send()
            .await
            .unwrap();
        sm.put_secret_value()
            .secret_id("t/sm/db")
            .secret_string(r#"{"user": "app", "password": "second"}"#)
            .send()
            .await
            .unwrap();
        created.arn().unwrap().to_string()
    });
    let many = many_secrets(&sm, "t/sm/many", 25);
    let d = Dir::new();
    d.write(
        "t.hbs",
        &format!(
            "{{{{sm \"t/sm/db\" \"password\"}}}} {{{{secret \"sm:t/sm/db@AWSPREVIOUS#password\"}}}} {{{{secret \"{arn}:password:AWSPREVIOUS\"}}}} {{{{secret \"{arn}:user\"}}}}\n{many}\n"
        ),
    );
    // The ECS valueFrom form in an env mapping.
    d.write(
        "envrender.toml",
        &format!(
            "[env]\nDB_PASSWORD = \"{arn}:password::\"\n[[env_file]]\ndestination = \"a.env\"\n"
        ),
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    let expected_many: String = (0..25).map(|i| format!("s{i:02},")).collect();
    assert_eq!(
        d.read("t.out"),
        format!("second first first app\n{expected_many}\n")
    );
    assert_eq!(d.read("a.env"), "DB_PASSWORD='second'\n");
    // 26 current secrets (t/sm/db asked for once, by name, though its ARN
    // is used too) in two batches; the two stage reads go one by one.
    assert_eq!(
        proxy.count("BatchGetSecretValue"),
        2,
        "{:?}",
        proxy.counts()
    );
    assert_eq!(proxy.count("GetSecretValue"), 2, "{:?}", proxy.counts());
    d.write("m.hbs", "{{sm \"t/sm/none\"}}{{sm \"t/sm/db@AWSNOPE\"}}");
    d.cmd(&["render", "--template", "m.hbs:m.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("sm:t/sm/none  (used by m.hbs)")
        .stderr_has("ResourceNotFoundException")
        .stderr_has("sm:t/sm/db@AWSNOPE");
}

/// A secret named both by name and by ARN is asked for once: twenty
/// secrets, one of them under both, fit one `BatchGetSecretValue`.
#[test]
fn secrets_manager_asks_once_for_a_secret_named_by_name_and_by_arn() {
    let moto = moto();
    let sm = aws_sdk_secretsmanager::Client::new(&sdk(&moto.url));
    let arn = block_on(async {
        let created = sm
            .create_secret()
            .name("t/dup/db")
            .secret_string("db-secret")
            .send()
            .await
            .unwrap();
        created.arn().unwrap().to_string()
    });
    let many = many_secrets(&sm, "t/dup/many", 19);
    let d = Dir::new();
    d.write(
        "t.hbs",
        &format!("{{{{sm \"t/dup/db\"}}}} {{{{secret \"{arn}\"}}}}\n{many}\n"),
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    assert!(d.read("t.out").starts_with("db-secret db-secret\ns00,"));
    assert_eq!(
        proxy.count("BatchGetSecretValue"),
        1,
        "{:?}",
        proxy.counts()
    );
    assert_eq!(proxy.count("GetSecretValue"), 0, "{:?}", proxy.counts());
}

/// A version named by its id that is absent so far is looked for by that
/// id (not as a stage), so it comes through once it exists.
#[test]
fn secrets_manager_watches_for_an_absent_version_id() {
    let moto = moto();
    let sm = aws_sdk_secretsmanager::Client::new(&sdk(&moto.url));
    create_secret(&sm, "t/vid/s", "v1");
    let aws = Arc::new(Aws::with_sdk(AwsConfig::default(), sdk(&moto.url)));
    let backend = SecretsManager::new(aws);
    let id = "0f9e8d7c-6b5a-4f3e-9d2c-1b0a9f8e7d6c";
    let source = envrender::reference::parse(&format!("sm:t/vid/s@{id}"))
        .unwrap()
        .source;
    block_on(async {
        let known = vec![(source.clone(), None)];
        assert_eq!(backend.observe(&known).await, vec![Observation::Unchanged]);
        sm.put_secret_value()
            .secret_id("t/vid/s")
            .secret_string("v2")
            .client_request_token(id)
            .send()
            .await
            .unwrap();
        match backend.observe(&known).await.remove(0) {
            Observation::Changed(f) => assert_eq!(f.value.expose(), "v2"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn secrets_manager_looks_at_describe_secret_before_fetching_again() {
    let moto = moto();
    let sm = aws_sdk_secretsmanager::Client::new(&sdk(&moto.url));
    create_secret(&sm, "t/watch/s", "v1");
    let proxy = Proxy::start(&moto.url);
    let aws = Arc::new(Aws::with_sdk(AwsConfig::default(), sdk(&proxy.url)));
    let backend = SecretsManager::new(aws);
    let source = envrender::reference::parse("sm:t/watch/s").unwrap().source;
    block_on(async {
        let first = backend
            .fetch(std::slice::from_ref(&source))
            .await
            .remove(0)
            .unwrap();
        let known = vec![(source.clone(), Some(first))];
        proxy.reset_counts();
        assert_eq!(backend.observe(&known).await, vec![Observation::Unchanged]);
        assert_eq!(proxy.counts(), [("DescribeSecret".to_string(), 1)].into());
        sm.put_secret_value()
            .secret_id("t/watch/s")
            .secret_string("v2")
            .send()
            .await
            .unwrap();
        match backend.observe(&known).await.remove(0) {
            Observation::Changed(f) => assert_eq!(f.value.expose(), "v2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(proxy.count("DescribeSecret"), 2);
        assert_eq!(proxy.count("GetSecretValue"), 1);
    });
}

#[test]
fn ssm_change_detection_compares_versions_in_batches() {
    let moto = moto();
    let params = numbered_parameters(&moto.url, "/t/poll/", 12);
    let proxy = Proxy::start(&moto.url);
    let aws = Arc::new(Aws::with_sdk(AwsConfig::default(), sdk(&proxy.url)));
    let backend = Ssm::new(aws);
    let sources: Vec<_> = params
        .iter()
        .map(|(n, _)| {
            envrender::reference::parse(&format!("ssm:{n}"))
                .unwrap()
                .source
        })
        .collect();
    let fetched = block_on(backend.fetch(&sources));
    let known: Vec<_> = sources
        .iter()
        .cloned()
        .zip(fetched.into_iter().map(|f| Some(f.unwrap())))
        .collect();
    put_parameters(&moto.url, &[("/t/poll/p03", "changed", false)]);
    block_on(async {
        proxy.reset_counts();
        let seen = backend.observe(&known).await;
        assert_eq!(proxy.counts(), [("GetParameters".to_string(), 2)].into());
        for (i, o) in seen.iter().enumerate() {
            match (i, o) {
                (3, Observation::Changed(f)) => {
                    assert_eq!(f.value.expose(), "changed");
                    assert_eq!(f.version.as_deref(), Some("2"));
                }
                (3, other) => panic!("{other:?}"),
                (_, o) => assert_eq!(o, &Observation::Unchanged),
            }
        }
    });
}

#[test]
fn an_ssm_arn_is_read_in_its_own_region() {
    let moto = moto();
    put_parameters_in(
        &moto.url,
        "us-west-2",
        &[("/t/region/x", "from-us-west-2", false)],
    );
    put_parameters(&moto.url, &[("/t/region/x", "from-us-east-1", false)]);
    let d = Dir::new();
    d.write(
        "t.hbs",
        &format!("{{{{secret \"arn:aws:ssm:us-west-2:{ACCOUNT}:parameter/t/region/x\"}}}} {{{{ssm \"/t/region/x\"}}}}"),
    );
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "from-us-west-2 from-us-east-1");
    d.cmd(&["check", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .success()
        .stdout_has("ssm: 1 × GetParameters (us-east-1), 1 × GetParameters (us-west-2)");
}

#[test]
fn check_shows_the_planned_calls_per_region() {
    let moto = moto();
    let params = numbered_parameters(&moto.url, "/t/plan/", 25);
    let d = Dir::new();
    let mut template = template_reading(&params, "");
    template.push_str("{{#each (ssm \"/t/plan/\")}}{{/each}}");
    d.write("t.hbs", &template);
    d.cmd(&["check", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .success()
        .stdout_has("ssm: 3 × GetParameters (us-east-1), 1 × GetParametersByPath (us-east-1)");
    assert!(!d.join("t.out").exists());
}

#[test]
fn throttling_and_server_errors_are_retried() {
    let moto = moto();
    put_parameters(&moto.url, &[("/t/throttle/x", "ok", false)]);
    let d = Dir::new();
    d.write("t.hbs", "{{ssm \"/t/throttle/x\"}}");
    let proxy = Proxy::start(&moto.url);
    proxy.fail(
        "GetParameters",
        2,
        400,
        "ThrottlingException",
        "Rate exceeded",
    );
    proxy.fail("GetParameters", 1, 500, "InternalServerError", "try again");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .success();
    assert_eq!(d.read("t.out"), "ok");
    assert_eq!(proxy.count("GetParameters"), 4);
    // Throttled past the deadline: exit 1, naming the error, in bounded time.
    proxy.fail(
        "GetParameters",
        10_000,
        400,
        "ThrottlingException",
        "Rate exceeded",
    );
    let start = Instant::now();
    d.cmd(&["render", "--timeout", "3s", "--template", "t.hbs:t2.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has("ThrottlingException: Rate exceeded (HTTP 400)")
        .stderr_has("retried with backoff until the render deadline");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn an_aws_shaped_access_denied_names_action_resource_identity_and_fix() {
    let moto = moto();
    put_parameters(&moto.url, &[("/t/denied/x", "x", false)]);
    let d = Dir::new();
    d.write(
        "t.hbs",
        "{{ssm \"/t/denied/x\"}}{{#each (ssm \"/t/denied/\")}}{{/each}}",
    );
    let proxy = Proxy::start(&moto.url);
    proxy.fail(
        "GetParameters",
        100,
        400,
        "AccessDeniedException",
        &format!("User: arn:aws:sts::{ACCOUNT}:assumed-role/app/i-1 is not authorized to perform: ssm:GetParameters"),
    );
    proxy.fail(
        "GetParametersByPath",
        100,
        400,
        "AccessDeniedException",
        "not authorized",
    );
    let run = d
        .cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&proxy.url)
        .run()
        .code(1)
        .stderr_has(&format!("ssm: ssm:GetParameters arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/t/denied/x: AccessDeniedException"))
        .stderr_has(&format!("(as arn:aws:sts::{ACCOUNT}:user/moto)"))
        .stderr_has(&format!("hint: allow ssm:GetParameters on arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/t/denied/x"))
        .stderr_has(&format!("hint: allow ssm:GetParametersByPath on arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/t/denied"));
    assert!(!run.stderr.contains("service error"), "{}", run.stderr);
    // One identity lookup, however many errors.
    assert_eq!(proxy.count("GetCallerIdentity"), 1);
    // Access errors are not retried.
    assert_eq!(proxy.count("GetParameters"), 1);
}

#[test]
fn emulator_iam_denial_is_reported_with_action_and_resource() {
    let allow = r#"{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["ssm:GetParameters", "sts:GetCallerIdentity"], "Resource": "*"}]}"#;
    // Setup makes 5 requests (user, policy, key, 2 parameters) before IAM is enforced.
    let moto = support::aws::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "5")]);
    let key = support::aws::auth_setup(
        &moto.url,
        allow,
        &[("/t/iam/ok", "fine"), ("/t/iam/dir/x", "x")],
    );
    let d = Dir::new();
    d.write("ok.hbs", "{{ssm \"/t/iam/ok\"}}");
    d.write(
        "t.hbs",
        "{{ssm \"/t/iam/ok\"}}{{#each (ssm \"/t/iam/dir/\")}}{{this}}{{/each}}",
    );
    let user = |cmd: support::Cmd| {
        cmd.aws(&moto.url)
            .env("AWS_ACCESS_KEY_ID", &key.0)
            .env("AWS_SECRET_ACCESS_KEY", &key.1)
    };
    user(d.cmd(&["render", "--template", "ok.hbs:ok.out"]))
        .run()
        .success();
    assert_eq!(d.read("ok.out"), "fine");
    let run = user(d.cmd(&["render", "--template", "t.hbs:t.out"]))
        .run()
        .code(1)
        .stderr_has("ssm:/t/iam/dir/  (used by t.hbs)")
        .stderr_has("ssm:GetParametersByPath")
        .stderr_has(&format!(
            "arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/t/iam/dir"
        ))
        .stderr_has("(HTTP 403)")
        .stderr_has(&format!("(as arn:aws:iam::{ACCOUNT}:user/envrender-test)"));
    assert!(!run.stderr.contains("/t/iam/ok "), "{}", run.stderr);
    // An unknown access key.
    d.cmd(&["render", "--template", "ok.hbs:x.out"])
        .aws(&moto.url)
        .env("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
        .run()
        .code(1)
        .stderr_has("(HTTP 403)");
}

#[test]
fn a_client_side_rate_limit_spaces_requests() {
    let moto = moto();
    let params = numbered_parameters(&moto.url, "/t/rate/", 100);
    let d = Dir::new();
    let template = template_reading(&params, "");
    d.write("t.hbs", &template);
    // 10 calls at 2 per second: 5 at once (the first and a two-second
    // burst of 4), then one every 0.5 s: the last leaves after 2.5 s.
    d.write("envrender.toml", "[aws]\nrate_limit = 2\n");
    let start = Instant::now();
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .success();
    assert!(
        start.elapsed() >= Duration::from_millis(2400),
        "{:?}",
        start.elapsed()
    );
    d.write("envrender.toml", "[aws]\nrate_limit = 0\n");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .aws(&moto.url)
        .run()
        .code(2)
        .stderr_has("aws.rate_limit must be a positive number");
}

#[test]
fn missing_credentials_and_region_are_explained() {
    let d = Dir::new();
    d.write("t.hbs", "{{ssm \"/t/x\"}}");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("AWS_REGION", REGION)
        .run()
        .code(1)
        .stderr_has("no credentials found in chain")
        .stderr_has("hint: no AWS credentials were found");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .run()
        .code(1)
        .stderr_has("no AWS region is configured")
        .stderr_has("hint: set AWS_REGION");
}

#[test]
fn container_credentials_as_on_ecs_and_eks_pod_identity() {
    let moto = moto();
    put_parameters(
        &moto.url,
        &[("/t/creds/x", "via-container-credentials", false)],
    );
    let creds = support::aws::CredentialsServer::start();
    let d = Dir::new();
    d.write("t.hbs", "{{ssm \"/t/creds/x\"}}");
    let token = d.write("pod-identity-token", "eks-pod-identity-token");
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("AWS_ENDPOINT_URL", &moto.url)
        .env("AWS_REGION", REGION)
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &creds.url)
        .env(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token.to_str().unwrap(),
        )
        .run()
        .success();
    assert_eq!(d.read("t.out"), "via-container-credentials");
    assert_eq!(
        *creds.seen_tokens.lock().unwrap(),
        ["eks-pod-identity-token"]
    );
}

#[test]
fn web_identity_credentials_as_with_irsa() {
    let moto = moto();
    put_parameters(&moto.url, &[("/t/irsa/x", "via-web-identity", false)]);
    let d = Dir::new();
    d.write("t.hbs", "{{ssm \"/t/irsa/x\"}}");
    let token = d.write(
        "token",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwOmFwcCJ9.c2ln",
    );
    let proxy = Proxy::start(&moto.url);
    d.cmd(&["render", "--template", "t.hbs:t.out"])
        .env("AWS_ENDPOINT_URL", &proxy.url)
        .env("AWS_REGION", REGION)
        .env("AWS_ROLE_ARN", &format!("arn:aws:iam::{ACCOUNT}:role/app"))
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap())
        .run()
        .success();
    assert_eq!(d.read("t.out"), "via-web-identity");
    assert_eq!(proxy.count("AssumeRoleWithWebIdentity"), 1);
    assert_eq!(proxy.count("GetParameters"), 1);
}

/// The shipped least-privilege policy grants exactly the calls envrender makes
/// (sts:GetCallerIdentity needs no permission).
#[test]
fn the_shipped_iam_policy_covers_every_call() {
    let text = std::fs::read_to_string(support::repo().join("deploy/aws/iam-policy.json")).unwrap();
    let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(policy["Version"], "2012-10-17");
    let mut actions = std::collections::BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        assert!(statement["Resource"].is_string() || statement["Resource"].is_array());
        match &statement["Action"] {
            serde_json::Value::String(a) => {
                actions.insert(a.clone());
            }
            serde_json::Value::Array(list) => {
                actions.extend(list.iter().map(|a| a.as_str().unwrap().to_string()))
            }
            other => panic!("{other}"),
        }
    }
    let expected: std::collections::BTreeSet<String> = [
        "kms:Decrypt",
        "secretsmanager:BatchGetSecretValue",
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
        "ssm:GetParameters",
        "ssm:GetParametersByPath",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(actions, expected);
    // No wildcard actions, and no write access.
    assert!(!text.contains(":*\"") && !text.contains("Put") && !text.contains("\"*:"));
}
