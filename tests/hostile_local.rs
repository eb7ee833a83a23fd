//! A hostile neighbour: a process of another user (or of the app's user)
//! on the same machine, which plants symlinks and directories where
//! envrender writes, reads /proc, writes the pid file, and sources the env
//! files envrender writes. Tests run as root and play the other user with
//! uid 65534 (nobody).

mod support;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use proptest::prelude::*;
use support::Dir;

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
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
    let text = envrender::output::env_file(&vars, envrender::config::EnvFormat::Dotenv);
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
        use envrender::config::EnvFormat;
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
