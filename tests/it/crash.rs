//! Crash safety: `envrender render` killed with SIGKILL at random moments,
//! cycle after cycle, while it renders and writes three outputs (one of
//! ~480 KB). After every kill each destination holds the complete old or the
//! complete new content, never a mix, a part or nothing; a staged file with
//! bytes in it already has its destination's mode; and the next run that
//! gets to the end removes what the killed ones left behind.
//!
//! `cargo test` runs 1,000 cycles; `ENVRENDER_CRASH_CYCLES=10000 cargo test
//! --test it crash:: -- --nocapture` runs ten thousand and prints the tally.

use crate::support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Instant;

use support::Dir;

/// Destinations, their modes, and what generation `g` renders into them.
const OUTPUTS: [(&str, u32); 3] = [
    ("out/big.conf", 0o640),
    ("out/small.conf", 0o600),
    ("out/public.conf", 0o644),
];

fn blob(g: u64) -> String {
    format!("{g:06}").repeat(80_000)
}

fn expected(dest: &str, g: u64) -> String {
    if dest.ends_with("big.conf") {
        format!("gen={g}\n{}\nend={g}\n", blob(g))
    } else {
        format!("password=pw-{g}\n")
    }
}

fn write_values(d: &Dir, g: u64) {
    let values = serde_json::json!({
        "consul:gen": g.to_string(),
        "consul:blob": blob(g),
        "vault:secret/app": {"password": format!("pw-{g}")},
    });
    // Replaced atomically, so a render never reads half a values file.
    d.write("values.json.tmp", &values.to_string());
    std::fs::rename(d.join("values.json.tmp"), d.join("values.json")).unwrap();
}

fn render(d: &Dir) -> support::Cmd {
    d.cmd(&[
        "render",
        "--values",
        "values.json",
        "--template",
        "big.hbs:out/big.conf:0640",
        "--template",
        "small.hbs:out/small.conf:0600",
        "--template",
        "small.hbs:out/public.conf:0644",
    ])
}

/// Staged files left in `out/`: (name, mode, size).
fn staged(d: &Dir) -> Vec<(String, u32, u64)> {
    let Ok(entries) = std::fs::read_dir(d.join("out")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e.metadata().ok()?;
            name.ends_with(".envrender-tmp")
                .then(|| (name, m.permissions().mode() & 0o7777, m.len()))
        })
        .collect()
}

/// Which generation a destination holds, asserting it is a whole one of
/// the two it may be.
fn held(d: &Dir, dest: &str, old: Option<u64>, new: u64, cycle: u64) -> Option<u64> {
    let Ok(text) = std::fs::read_to_string(d.join(dest)) else {
        assert_eq!(old, None, "cycle {cycle}: {dest} vanished");
        return None;
    };
    for g in old.into_iter().chain([new]) {
        if text == expected(dest, g) {
            return Some(g);
        }
    }
    panic!(
        "cycle {cycle}: {dest} is neither generation {old:?} nor {new}: {} bytes, starts {:?}",
        text.len(),
        &text[..text.len().min(40)]
    );
}

#[test]
fn killed_at_random_a_render_leaves_old_or_new_files_and_no_debris() {
    let cycles: u64 = std::env::var("ENVRENDER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let d = Dir::new();
    d.write(
        "big.hbs",
        "gen={{consul \"gen\"}}\n{{consul \"blob\"}}\nend={{consul \"gen\"}}\n",
    );
    d.write("small.hbs", "password={{vault \"secret/app#password\"}}\n");

    // How long a whole render takes here: kills land across all of it.
    let mut took = Vec::new();
    for g in 0..5 {
        write_values(&d, g);
        let start = Instant::now();
        render(&d).run().success();
        took.push(start.elapsed());
    }
    took.sort();
    let span = took[2].mul_f64(1.3);
    let mut gens: Vec<Option<u64>> = OUTPUTS
        .iter()
        .map(|(dest, _)| held(&d, dest, None, 4, 0))
        .collect();

    let (mut old_kept, mut new_written, mut mixed_runs, mut debris) = (0, 0, 0, 0);
    let started = Instant::now();
    for cycle in 1..=cycles {
        let g = 100 + cycle;
        write_values(&d, g);
        let finish = cycle % 25 == 0;
        let mut child = render(&d)
            .command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if finish {
            assert!(child.wait().unwrap().success(), "cycle {cycle}");
        } else {
            std::thread::sleep(span.mul_f64(fastrand::f64()));
            let _ = child.kill();
            child.wait().unwrap();
        }
        let mut news = 0;
        for (i, (dest, mode)) in OUTPUTS.iter().enumerate() {
            gens[i] = held(&d, dest, gens[i], g, cycle);
            if gens[i] == Some(g) {
                news += 1;
                new_written += 1;
            } else {
                old_kept += 1;
            }
            if gens[i].is_some() {
                let m = std::fs::metadata(d.join(dest))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777;
                assert_eq!(m, *mode, "cycle {cycle}: {dest} has mode {m:o}");
            }
        }
        if news != 0 && news != OUTPUTS.len() {
            mixed_runs += 1;
        }
        let left = staged(&d);
        for (name, m, size) in &left {
            let (_, mode) = OUTPUTS
                .iter()
                .find(|(dest, _)| {
                    name.starts_with(&format!(".{}.", dest.trim_start_matches("out/")))
                })
                .unwrap_or_else(|| {
                    panic!("cycle {cycle}: a staged file of no destination: {name}")
                });
            if *size > 0 {
                assert_eq!(
                    m, mode,
                    "cycle {cycle}: {name} holds {size} bytes at mode {m:o}"
                );
            }
        }
        if finish {
            assert_eq!(gens, vec![Some(g); 3], "cycle {cycle}: a finished run");
            assert!(
                left.is_empty(),
                "cycle {cycle}: left behind after a whole run: {left:?}"
            );
        } else if !left.is_empty() {
            debris += 1;
        }
    }
    let elapsed = started.elapsed();
    // The last run removes what is left.
    write_values(&d, 99_999);
    render(&d).run().success();
    assert!(staged(&d).is_empty(), "{:?}", staged(&d));
    eprintln!(
        "{cycles} cycles in {elapsed:.1?} (kills spread over {span:.1?}): per destination {old_kept} kept the old content and {new_written} took the new; {mixed_runs} runs were cut between renames; {debris} kills left staged files, all removed by the next whole run"
    );
    assert!(
        new_written > 0 && old_kept > 0,
        "the kills never landed inside a render: {span:?}"
    );
}
