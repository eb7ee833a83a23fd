//! Property tests: the reference parser, the configuration loader and the
//! template compiler take any input — random text, and text built from
//! their own grammar's pieces — without panicking, and a reference that
//! parses prints back to one that parses to the same thing.

use std::collections::HashMap;
use std::sync::Arc;

use envrender::{config, reference, template::Templates};
use proptest::prelude::*;

/// Cases per property: 2,000, or `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Strings made of a reference's pieces, so most cases get past the scheme.
fn reference_like() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec![
        "consul:",
        "vault:",
        "ssm:",
        "sm:",
        "kms:",
        "file:",
        "env:",
        "service:",
        "arn:aws:ssm:",
        "",
    ]);
    let piece = prop::sample::select(vec![
        "/", "app", "db", "@", "3", "live", "#", "field", ".", "?", "=", "&", "|", "optional",
        "default=", "dc=", "%", "%2F", " ", "\u{e9}", ":", "\\", "\"", "\0",
    ]);
    (scheme, prop::collection::vec(piece, 0..12)).prop_map(|(s, p)| format!("{s}{}", p.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn the_reference_parser_takes_any_text(input in any::<String>()) {
        let _ = reference::parse(&input);
    }

    #[test]
    fn a_parsed_reference_prints_back_to_itself(input in reference_like()) {
        if let Ok(r) = reference::parse(&input) {
            let printed = r.to_string();
            let again = reference::parse(&printed);
            prop_assert!(again.is_ok(), "{input:?} printed as {printed:?}, which does not parse");
            prop_assert_eq!(again.unwrap(), r);
        }
    }
}

/// TOML made of the configuration's own keys and values of every type.
fn config_like() -> impl Strategy<Value = String> {
    let line = prop::sample::select(vec![
        "[consul]",
        "[vault]",
        "[aws]",
        "[local]",
        "[render]",
        "[env]",
        "[[template]]",
        "[[env_file]]",
        "address = \"127.0.0.1:8500\"",
        "wait = \"60s\"",
        "wait = \"-1s\"",
        "wait = 5",
        "watch = \"key\"",
        "watch = \"nope\"",
        "auth = { method = \"approle\" }",
        "auth = { method = \"token\", token_file = 3 }",
        "rate_limit = 0",
        "rate_limit = -1",
        "rate_limit = 1e400",
        "poll_interval = \"0s\"",
        "timeout = \"99999999999h\"",
        "source = \"t.hbs\"",
        "destination = \"/tmp/x\"",
        "destination = \"\"",
        "mode = \"0777\"",
        "mode = \"9\"",
        "owner = \"a:b:c\"",
        "owner = \":\"",
        "values = \"v.yaml\"",
        "X = \"ssm:/a\"",
        "X = \"vault:\"",
        "X_FILE = \"consul:k\"",
        "1 = 2",
        "on_change = 3",
        "path = \"out.env\"",
        "format = \"json\"",
        "x = [1, \"a\", {}]",
        "\"\u{e9}\" = \"\\u0000\"",
    ]);
    prop::collection::vec(line, 0..16).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn the_configuration_loader_takes_any_text(text in any::<String>()) {
        let _ = config::parse("fuzz.toml", &text);
    }

    #[test]
    fn the_configuration_loader_takes_any_mix_of_its_keys(text in config_like()) {
        if let Err(errors) = config::parse("fuzz.toml", &text) {
            // Every error names the file.
            for e in errors {
                prop_assert!(e.to_string().contains("fuzz.toml"), "{e}");
            }
        }
    }
}

/// Template text made of Handlebars pieces and envrender's helpers.
fn template_like() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "{{",
        "}}",
        "{{{",
        "}}}",
        "{{#each ",
        "{{/each}}",
        "{{#if ",
        "{{/if}}",
        "{{else}}",
        "secret ",
        "consul ",
        "vault ",
        "ssm ",
        "service ",
        "json ",
        "base64_decode ",
        "lookup ",
        "\"consul:a/b\"",
        "\"vault:secret/x#f\"",
        "\"ssm:/p\"",
        "\"bad:\"",
        "\"consul:a/\"",
        "this",
        "@key",
        "..",
        "(",
        ")",
        " ",
        "\n",
        "text",
        "|",
        "~",
        "!",
        "\\",
        "\"",
    ]);
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn templates_compile_and_render_any_text(text in prop_oneof![any::<String>(), template_like()]) {
        if let Ok(templates) = Templates::compile(&[("t.hbs".to_string(), text)]) {
            let discovery = templates.discover(&Arc::new(HashMap::new()));
            let _ = discovery;
            let _ = templates.render("t.hbs", &Arc::new(HashMap::new()));
        }
    }
}
