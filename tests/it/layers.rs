//! The layering of `src/`: each top-level module (a file `src/X.rs` or a
//! folder `src/X/`) imports only modules on lower layers, so data flows
//! one way (settings → plan → resolve → render → write → act) and there is
//! no import cycle. CONTRIBUTING.md draws the same layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, from the ground up. A module may import only modules of
/// the layers before its own.
const LAYERS: &[&[&str]] = &[
    &[
        "problem",
        "backoff",
        "environment",
        "secret",
        "reference",
        "output",
        "telemetry",
    ],
    &["template", "backend"],
    &["local_values"],
    &["resolve"],
    &["error"],
    &["action", "health", "shutdown", "container"],
    &["engine"],
    &["config", "check", "watch", "supervise"],
    &["cli", "run"],
    &["app"],
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for the crate
/// roots `lib.rs` and `main.rs`).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules `text` names as `crate::NAME`, outside comments.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            // `envrender::...` or another crate's `xcrate::` is not ours.
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Each top-level module with the modules it imports, from the code.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in all {
        let Some(module) = module_of(&path) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let used = imports(&text);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(used.into_iter().filter(|m| *m != module));
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    let layered: BTreeSet<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let missing: Vec<String> = graph()
        .into_keys()
        .filter(|m| !layered.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a layer in tests/layers.rs (and CONTRIBUTING.md): {missing:?}"
    );
}

#[test]
fn no_module_imports_one_above_it() {
    let layer: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().map(move |m| (*m, i)))
        .collect();
    let mut wrong = Vec::new();
    for (module, used) in graph() {
        let Some(&mine) = layer.get(module.as_str()) else {
            continue;
        };
        for other in used {
            match layer.get(other.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => wrong.push(format!(
                    "{module} (layer {mine}) imports {other} (layer {theirs})"
                )),
                None => wrong.push(format!("{module} imports {other}, which has no layer")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the flow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_imports() {
    let text = "use crate::engine::{Plan, Settings};\n// crate::app in a comment\nlet x = crate::backoff::sleep_until(None);\nenvrender::cli::Cli";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["backoff", "engine"]);
    // The graph of the real tree has edges, so the checks above are not
    // vacuous.
    let g = graph();
    assert!(g["app"].contains("engine") && g["engine"].contains("resolve"));
}
