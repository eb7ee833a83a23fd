//! A corpus of malformed input: configurations, templates, references,
//! values files, oversized, binary and non-UTF-8 data. Each case gives the
//! exit code (2: bad input, found before any request; 1: a value that cannot
//! be used) and what the error must say — the file, line or reference, and
//! the fix. Every backend address points at a counting proxy, so a case that
//! should fail before the network proves it made no request. No case may
//! panic, print a planted secret, or leave an output behind.
//!
//! To add a case, add a [`Case`] to [`corpus`].

use crate::support;

use support::fault::{Fault, FaultProxy};
use support::{CANARY, Dir};

struct Case {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    code: i32,
    has: &'static [&'static str],
    lacks: &'static [&'static str],
}

fn case(
    name: &'static str,
    files: &[(&'static str, &[u8])],
    args: &'static [&'static str],
    code: i32,
    has: &'static [&'static str],
) -> Case {
    Case {
        name,
        files: files.iter().map(|(n, b)| (*n, b.to_vec())).collect(),
        args,
        env: &[],
        code,
        has,
        lacks: &[],
    }
}

const RENDER: &[&str] = &["render"];
const TEMPLATE: (&str, &[u8]) = ("t.hbs", b"x={{consul \"app/x\"}}\n");

fn config(text: &'static str) -> (&'static str, &'static [u8]) {
    ("envrender.toml", text.as_bytes())
}

fn corpus() -> Vec<Case> {
    let mut cases = vec![
        // Configurations.
        case(
            "toml syntax",
            &[config("[consul\naddress = 1\n")],
            RENDER,
            2,
            &["envrender.toml:1:8", "unclosed table"],
        ),
        case(
            "unknown key",
            &[config("[consul]\nadress = \"x\"\n")],
            RENDER,
            2,
            &["envrender.toml:2:1", "unknown field `adress`", "hint:"],
        ),
        case(
            "unknown table",
            &[config("[bogus]\nx = 1\n")],
            RENDER,
            2,
            &["envrender.toml:1:2", "unknown field `bogus`"],
        ),
        case(
            "wrong type",
            &[config("[consul]\nwait = 5\n")],
            RENDER,
            2,
            &[
                "envrender.toml:2:8",
                "invalid type: integer `5`, expected a string",
            ],
        ),
        case(
            "bad duration",
            &[config("[consul]\nwait = \"5 parsecs\"\n")],
            RENDER,
            2,
            &[
                "consul.wait: \"5 parsecs\" is not a duration",
                "hint: write a duration such as \"30s\"",
            ],
        ),
        case(
            "no destination",
            &[config("[[template]]\nsource = \"t.hbs\"\n"), TEMPLATE],
            RENDER,
            2,
            &["envrender.toml", "missing field `destination`"],
        ),
        case(
            "one destination twice",
            &[
                config(
                    "[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\n[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\n",
                ),
                TEMPLATE,
            ],
            RENDER,
            2,
            &[
                "two outputs write this destination",
                "hint: give each template and env file its own destination",
            ],
        ),
        case(
            "bad mode",
            &[
                config("[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\nmode = \"0999\"\n"),
                TEMPLATE,
            ],
            RENDER,
            2,
            &["envrender.toml:4:8", "\"0999\" is not an octal mode"],
        ),
        case(
            "bad mode flag",
            &[TEMPLATE],
            &["render", "--template", "t.hbs:o:9z"],
            2,
            &["--template t.hbs:o:9z", "\"9z\" is not an octal mode"],
        ),
        case(
            "template flag without destination",
            &[TEMPLATE],
            &["render", "--template", "t.hbs"],
            2,
            &["expected SRC:DEST or SRC:DEST:MODE"],
        ),
        case(
            "signal to nobody",
            &[
                config(
                    "[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\non_change = { signal = \"HUP\" }\n",
                ),
                TEMPLATE,
            ],
            RENDER,
            2,
            &["a signal needs a pid file or a process name"],
        ),
        case(
            "signal to both",
            &[
                config(
                    "[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\non_change = { signal = \"HUP\", process_name = \"x\", pid_file = \"p\" }\n",
                ),
                TEMPLATE,
            ],
            RENDER,
            2,
            &["not both"],
        ),
        case(
            "empty exec",
            &[
                config(
                    "[[template]]\nsource = \"t.hbs\"\ndestination = \"o\"\non_change = { exec = \"\" }\n",
                ),
                TEMPLATE,
            ],
            RENDER,
            2,
            &["envrender.toml:4:22", "exec is not a command"],
        ),
        case(
            "empty path setting",
            &[config("[consul]\nca_file = \"\"\n")],
            RENDER,
            2,
            &["envrender.toml:2:11", "consul.ca_file is empty"],
        ),
        case(
            "fraction out of range",
            &[config("[vault]\npki_reissue_at = 2.0\n")],
            RENDER,
            2,
            &["between 0 and 1"],
        ),
        case(
            "client certificate without key",
            &[config("[vault]\nclient_cert = \"c.pem\"\n")],
            RENDER,
            2,
            &["vault.client_cert is set but vault.client_key is not"],
        ),
        case(
            "bad reference in [env]",
            &[config("[env]\nDB = \"ssm:\"\n")],
            RENDER,
            2,
            &["envrender.toml:2:6", "env.DB: ssm: empty path"],
        ),
        case(
            "configuration not UTF-8",
            &[("envrender.toml", b"\xff\xfe[consul]\n")],
            RENDER,
            2,
            &["envrender.toml", "not UTF-8 text; save it as UTF-8"],
        ),
        case(
            "configuration missing",
            &[],
            &["render", "--config", "nope.toml"],
            2,
            &["nope.toml", "give an existing file"],
        ),
        // Templates.
        case(
            "unclosed block",
            &[("t.hbs", b"{{#if x}}open")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs:1:", "cannot parse template"],
        ),
        case(
            "unknown helper",
            &[("t.hbs", b"{{nohelper \"x\"}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs:1:1", "nohelper"],
        ),
        case(
            "helper without its argument",
            &[("t.hbs", b"{{consul}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs:1:1", "expects a reference string"],
        ),
        case(
            "helper with too many arguments",
            &[("t.hbs", b"{{consul \"a\" \"b\" \"c\"}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs:1:1", "takes at most 2 arguments, got 3"],
        ),
        case(
            "bad reference in a helper",
            &[("t.hbs", b"{{consul \"app/x?bogus=1\"}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &[
                "t.hbs:1:1",
                "parameter \"bogus\" is not understood",
                "hint: consul: takes dc=",
            ],
        ),
        case(
            "unknown helper option",
            &[("t.hbs", b"{{consul \"x\" bogus=1}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["unknown option bogus="],
        ),
        case(
            "computed default",
            &[("t.hbs", b"{{consul \"x\" default=(consul \"y\")}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["default= takes literal text"],
        ),
        case(
            "missing partial",
            &[("t.hbs", b"{{> nopartial}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs:1:1", "nopartial"],
        ),
        case(
            "variable of its own",
            &[("t.hbs", b"{{password}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["\"password\" is not defined", "{{secret \"REF\"}}"],
        ),
        case(
            "template not UTF-8",
            &[("t.hbs", b"a\xffb{{consul \"x\"}}")],
            &["render", "--template", "t.hbs:o"],
            2,
            &["t.hbs", "not UTF-8 text; save it as UTF-8"],
        ),
        case(
            "template missing",
            &[],
            &["render", "--template", "nope.hbs:o"],
            2,
            &["nope.hbs", "cannot read the template"],
        ),
        // References.
        case(
            "unknown scheme",
            &[],
            &["get", "foo:bar"],
            2,
            &["unknown scheme \"foo\"", "hint: use one of consul: vault:"],
        ),
        case(
            "empty path",
            &[],
            &["get", "ssm:"],
            2,
            &["ssm: empty path", "hint: e.g. ssm:/app/prod/db/password"],
        ),
        case(
            "empty field",
            &[],
            &["get", "consul:app#"],
            2,
            &["empty key in field selector"],
        ),
        case(
            "empty version",
            &[],
            &["get", "ssm:/x@"],
            2,
            &["empty version after '@'"],
        ),
        case(
            "version not a number",
            &[],
            &["get", "vault:secret/x@abc"],
            2,
            &["a Vault version is a number"],
        ),
        case(
            "empty parameter name",
            &[],
            &["get", "vault:pki/issue/x?=1"],
            2,
            &["empty parameter name"],
        ),
        case(
            "control character",
            &[],
            &["get", "consul:app\u{1}x"],
            2,
            &["control character U+0001", "at character 11"],
        ),
        case(
            "trailing newline",
            &[],
            &["get", "ssm:/app/db/password\n"],
            2,
            &["control character U+000A", "line ending"],
        ),
        // Values files and values.
        case(
            "values file not YAML",
            &[("v.yaml", b"\"consul:x\": [unclosed\n"), TEMPLATE],
            &["render", "--values", "v.yaml", "--template", "t.hbs:o"],
            2,
            &["v.yaml: not valid YAML at line 1, column"],
        ),
        case(
            "values file not JSON",
            &[("v.json", b"{\"consul:x\": 1,,}"), TEMPLATE],
            &["render", "--values", "v.json", "--template", "t.hbs:o"],
            2,
            &["v.json: not valid JSON at line 1, column 16"],
        ),
        case(
            "values file not UTF-8",
            &[("v.yaml", b"\"consul:x\": \"a\xffb\"\n"), TEMPLATE],
            &["render", "--values", "v.yaml", "--template", "t.hbs:o"],
            2,
            &["v.yaml", "valid UTF-8"],
        ),
        case(
            "binary file value",
            &[
                ("bin.dat", b"\x00\x01\xfe\xff\x80binary"),
                ("t.hbs", b"{{file \"./bin.dat\"}}"),
            ],
            &["render", "--template", "t.hbs:o"],
            1,
            &["file:./bin.dat", "not UTF-8 text (byte 2)", "base64_decode"],
        ),
        case(
            "env file not UTF-8",
            &[
                ("e.env", b"A=1\nB=\xff\xfe\n"),
                ("t.hbs", b"{{file \"./e.env#B\"}}"),
            ],
            &["render", "--template", "t.hbs:o"],
            1,
            &["file:./e.env#B", "not UTF-8 text"],
        ),
        // run.
        Case {
            env: &[("DB_PASSWORD", "ssm:")],
            ..case(
                "run with an empty reference",
                &[],
                &["run", "--", "true"],
                2,
                &[
                    "environment variable DB_PASSWORD",
                    "ssm: empty path",
                    "fix the reference, or unset the variable",
                ],
            )
        },
        Case {
            env: &[("DB_PASSWORD", "vault:secret/x#")],
            ..case(
                "run with an empty field",
                &[],
                &["run", "--", "true"],
                2,
                &[
                    "environment variable DB_PASSWORD",
                    "empty key in field selector",
                ],
            )
        },
        case("run without a command", &[], &["run", "--"], 2, &["<CMD>"]),
    ];
    // A secret in a values file that does not parse is never echoed.
    let bad_json = format!("{{\"consul:x\": \"{CANARY}\",,}}");
    cases.push(Case {
        files: vec![
            ("v.json", bad_json.into_bytes()),
            ("t.hbs", TEMPLATE.1.to_vec()),
        ],
        lacks: &[CANARY],
        ..case(
            "secret in a broken values file",
            &[],
            &["render", "--values", "v.json", "--template", "t.hbs:o"],
            2,
            &["v.json: not valid JSON"],
        )
    });
    let bad_yaml = format!("\"consul:x\": {CANARY}\n  : [\n");
    cases.push(Case {
        files: vec![
            ("v.yaml", bad_yaml.into_bytes()),
            ("t.hbs", TEMPLATE.1.to_vec()),
        ],
        lacks: &[CANARY],
        ..case(
            "secret in a broken YAML file",
            &[],
            &["render", "--values", "v.yaml", "--template", "t.hbs:o"],
            2,
            &["v.yaml: not valid YAML"],
        )
    });
    // Oversized: a reference far past any backend's limit, and a 20 MB value
    // (which works).
    cases.push(Case {
        files: vec![(
            "t.hbs",
            format!("{{{{consul \"{}\"}}}}", "k".repeat(10_000)).into_bytes(),
        )],
        ..case(
            "overlong reference",
            &[],
            &["render", "--template", "t.hbs:o"],
            2,
            &[
                "t.hbs:1:1",
                "the reference is 10007 characters long; the limit is 4096",
            ],
        )
    });
    cases
}

#[test]
fn malformed_input_gets_a_clear_error_and_no_request() {
    let consul = FaultProxy::start("http://127.0.0.1:9");
    let vault = FaultProxy::start("http://127.0.0.1:9");
    let aws = FaultProxy::start("http://127.0.0.1:9");
    for p in [&consul, &vault, &aws] {
        p.inject(Fault::Status(503), None);
    }
    let cases = corpus();
    let mut failures = Vec::new();
    for c in &cases {
        let d = Dir::new();
        for (name, bytes) in &c.files {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        let before = consul.requests() + vault.requests() + aws.requests();
        let mut cmd = d
            .cmd(c.args)
            .env("CONSUL_HTTP_ADDR", consul.addr())
            .env("VAULT_ADDR", &vault.url)
            .env("VAULT_TOKEN", "t")
            .env("ENVRENDER_TIMEOUT", "3s")
            .aws(&aws.url);
        for (k, v) in c.env {
            cmd = cmd.env(k, v);
        }
        let out = cmd.command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        let requests = consul.requests() + vault.requests() + aws.requests() - before;
        let mut wrong = Vec::new();
        if code != c.code {
            wrong.push(format!("exit {code}, not {}", c.code));
        }
        for h in c.has {
            if !stderr.contains(h) {
                wrong.push(format!("no {h:?}"));
            }
        }
        for l in c.lacks {
            if stderr.contains(l) || String::from_utf8_lossy(&out.stdout).contains(l) {
                wrong.push(format!("prints {l:?}"));
            }
        }
        if stderr.contains("panicked") {
            wrong.push("panicked".to_string());
        }
        if c.code == 2 && requests > 0 {
            wrong.push(format!("{requests} requests before the input error"));
        }
        if d.join("o").exists() {
            wrong.push("an output was written".to_string());
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}\n{stderr}", c.name, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} malformed inputs, each with its error", cases.len());
}

#[test]
fn a_twenty_megabyte_value_is_written_whole() {
    let d = Dir::new();
    std::fs::write(d.join("big.txt"), "a".repeat(20_000_000)).unwrap();
    d.write("t.hbs", "{{file \"./big.txt\"}}");
    d.cmd(&["render", "--template", "t.hbs:o"]).run().success();
    assert_eq!(std::fs::metadata(d.join("o")).unwrap().len(), 20_000_000);
}
