//! Hostile templates: sizes, depths, recursion and output that would abort
//! envrender, overflow its stack or run away with memory and time. Each must
//! be an input error (exit 2) naming the template, the line and the limit,
//! found before any request, with no output written; and references
//! computed from values, and very large templates, must work.

use crate::support;

use std::time::{Duration, Instant};

use support::Dir;

/// Runs `render --template t.hbs:o` (plus `args`) and returns the exit code
/// (None when killed by a signal: an abort or a stack overflow) and stderr.
fn render(d: &Dir, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["render", "--template", "t.hbs:o"];
    all.extend_from_slice(args);
    let out = d
        .cmd(&all)
        // Any network reference would go nowhere, fast.
        .env("CONSUL_HTTP_ADDR", "127.0.0.1:9")
        .env("VAULT_ADDR", "http://127.0.0.1:9")
        .env("VAULT_TOKEN", "t")
        .env("ENVRENDER_TIMEOUT", "2s")
        .command
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts an exit-2 input error carrying every `needle`, and no output file.
fn input_error(d: &Dir, args: &[&str], needles: &[&str]) {
    let (code, stderr) = render(d, args);
    assert_eq!(code, Some(2), "exit code (None: killed)\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!d.join("o").exists(), "an output was written");
}

#[test]
fn an_enormous_indent_width_is_an_input_error() {
    let d = Dir::new();
    d.write("t.hbs", "a\n{{indent 100000000000000 \"x\"}}\n");
    input_error(
        &d,
        &[],
        &[
            "t.hbs:2:1",
            "indent",
            "100000000000000",
            "the limit is 1024",
        ],
    );
    // Within the output limit but past the width limit: refused at once,
    // not after allocating gigabytes.
    d.write("t.hbs", "{{indent 3000000000 \"abc\"}}\n");
    let started = Instant::now();
    input_error(&d, &[], &["t.hbs:1:1", "the limit is 1024"]);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn output_past_the_limit_is_an_input_error() {
    let d = Dir::new();
    // A thousand times a thousand lines of 100 bytes: 100 MB from 4 kB.
    let list = vec!["a"; 1000].join(",");
    let line = "x".repeat(99);
    d.write(
        "t.hbs",
        &format!(
            "start\n{{{{#each (split \"{list}\" \",\")}}}}{{{{#each (split \"{list}\" \",\")}}}}{line}\n{{{{/each}}}}{{{{/each}}}}"
        ),
    );
    input_error(
        &d,
        &[],
        &["t.hbs:2:", "more than 64 MiB", "render.max_output"],
    );
    // The setting lowers (or raises) the limit.
    d.write("envrender.toml", "[render]\nmax_output = \"1KiB\"\n");
    d.write(
        "t.hbs",
        &format!("{}\n{}\n", "y".repeat(600), "z".repeat(600)),
    );
    input_error(
        &d,
        &[],
        &["t.hbs:1:1", "more than 1 KiB", "render.max_output"],
    );
    d.write("envrender.toml", "[render]\nmax_output = \"2KiB\"\n");
    let (code, stderr) = render(&d, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(d.read("o").len(), 1202);
    // A bad setting is a configuration error.
    d.write("envrender.toml", "[render]\nmax_output = \"lots\"\n");
    let _ = std::fs::remove_file(d.join("o"));
    input_error(&d, &[], &["render.max_output", "\"lots\" is not a size"]);
}

#[test]
fn deep_nesting_is_an_input_error_not_a_stack_overflow() {
    let d = Dir::new();
    let n = 20_000;
    let text = format!("{}x\n{}", "{{#if true}}\n".repeat(n), "{{/if}}\n".repeat(n));
    d.write("t.hbs", &text);
    input_error(
        &d,
        &[],
        &[
            "t.hbs:101:1",
            "nested more than 100 deep",
            "the limit is 100",
        ],
    );
    // Handlebars allows space between `{{` and `#`, `/` or `else`.
    let text = format!(
        "{}x\n{}",
        "{{ #if true}}\n{{~ #if true}}\n".repeat(n / 2),
        "{{ /if}}\n{{~ /if}}\n".repeat(n / 2)
    );
    d.write("t.hbs", &text);
    input_error(&d, &[], &["t.hbs:101:1", "the limit is 100"]);
    // Subexpressions nest too.
    let text = format!(
        "{{{{concat {}\"x\"{}}}}}",
        "(concat ".repeat(n),
        ")".repeat(n)
    );
    d.write("t.hbs", &text);
    input_error(&d, &[], &["t.hbs:1:", "the limit is 100"]);
    // A long chain of else-if is nesting as well.
    let text = format!(
        "{{{{#if false}}}}\n{}x\n{{{{/if}}}}\n",
        "{{else if false}}\n".repeat(n)
    );
    d.write("t.hbs", &text);
    input_error(&d, &[], &["t.hbs:", "the limit is 100"]);
    // Nesting within the limit works.
    let text = format!("{}x{}", "{{#if true}}".repeat(50), "{{/if}}".repeat(50));
    d.write("t.hbs", &text);
    let (code, stderr) = render(&d, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(d.read("o"), "x");
}

#[test]
fn recursive_partials_are_input_errors() {
    let d = Dir::new();
    d.write(
        "t.hbs",
        "a\n{{#*inline \"p\"}}[{{> p}}]{{/inline}}\n{{> p}}\n",
    );
    input_error(&d, &[], &["t.hbs:2:", "partial \"p\" includes itself"]);
    // Through another partial.
    d.write(
        "t.hbs",
        "{{#*inline \"a\"}}{{> b}}{{/inline}}{{#*inline \"b\"}}{{#if true}}{{> a}}{{/if}}{{/inline}}{{> a}}",
    );
    input_error(&d, &[], &["t.hbs:1:", "includes itself", "\"a\"", "\"b\""]);
    // Two templates including each other.
    d.write("t.hbs", "{{> u.hbs}}");
    d.write("u.hbs", "{{> t.hbs}}");
    input_error(
        &d,
        &["--template", "u.hbs:o2"],
        &["includes itself", "t.hbs", "u.hbs"],
    );
    // A chain of partials long enough to overflow the stack.
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&format!(
            "{{{{#*inline \"p{i}\"}}}}{{{{> p{}}}}}{{{{/inline}}}}\n",
            i + 1
        ));
    }
    text.push_str("{{#*inline \"p20000\"}}end{{/inline}}\n{{> p0}}\n");
    d.write("t.hbs", &text);
    input_error(&d, &[], &["t.hbs:", "the limit is 100"]);
    // A computed name could be any partial, itself included; partial
    // blocks render their content to memory, outside the output limit.
    d.write(
        "t.hbs",
        "{{#*inline \"ab\"}}x{{/inline}}\n{{> (concat \"a\" \"b\")}}",
    );
    input_error(&d, &[], &["t.hbs:2:1", "must be written in the template"]);
    d.write(
        "t.hbs",
        "{{#*inline \"p\"}}[{{> @partial-block}}]{{/inline}}{{#> p}}x{{/p}}",
    );
    input_error(&d, &[], &["t.hbs:1:", "partial blocks"]);
    // Partials that do not recurse work.
    d.write(
        "t.hbs",
        "{{#*inline \"row\"}}[{{this}}]{{/inline}}{{#each (split \"a,b\" \",\")}}{{> row}}{{/each}}",
    );
    let (code, stderr) = render(&d, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(d.read("o"), "[a][b]");
}

#[test]
fn references_computed_directly_from_values_resolve() {
    let d = Dir::new();
    d.write(
        "v.yaml",
        concat!(
            "\"consul:c/1\": c/2\n",
            "\"consul:c/2\": second\n",
            "\"consul:c/name\": alpha\n",
            "\"vault:db/alpha\": { password: p-alpha }\n",
            "\"consul:c/path\": db/alpha\n",
        ),
    );
    d.write(
        "t.hbs",
        concat!(
            "{{consul (consul \"c/1\")}}\n",
            "{{secret (concat \"vault:db/\" (consul \"c/name\") \"#password\")}}\n",
            "{{vault (consul \"c/path\") \"password\"}}\n",
            "{{upper (consul (trim (consul \"c/1\")))}}\n",
        ),
    );
    let (code, stderr) = render(&d, &["--values", "v.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(d.read("o"), "second\np-alpha\np-alpha\nSECOND\n");
    // A computed reference that is itself bad is still reported.
    d.write("v.yaml", "\"consul:c/1\": \"\"\n");
    d.write("t.hbs", "{{consul (consul \"c/1\")}}\n");
    std::fs::remove_file(d.join("o")).unwrap();
    let (code, stderr) = render(&d, &["--values", "v.yaml"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("consul: empty path"), "{stderr}");
    assert!(!d.join("o").exists());
}

/// Compile time once grew with the square of the number of expressions; a
/// generous bound for a debug build catches that without being a speed test.
#[test]
fn twenty_thousand_expressions_render() {
    let d = Dir::new();
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&format!("k{i}={{{{env \"ENVRENDER_TEST_V\"}}}}\n"));
    }
    d.write("t.hbs", &text);
    let started = Instant::now();
    let out = d
        .cmd(&["render", "--template", "t.hbs:o"])
        .env("ENVRENDER_TEST_V", "v")
        .run()
        .success();
    let took = started.elapsed();
    eprintln!("20,000 expressions: compiled and rendered in {took:?}");
    assert!(out.stderr.is_empty() || !out.stderr.contains("error"));
    let rendered = d.read("o");
    assert_eq!(rendered.lines().count(), 20_000);
    assert!(rendered.ends_with("k19999=v\n"));
    assert!(took < Duration::from_secs(30), "took {took:?}");
}
