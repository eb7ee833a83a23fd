//! Link settings for the `envrender` binary, and the commit it is built
//! from (`envrender --version`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    // Relative relocations packed as DT_RELR (glibc 2.36 and later, static
    // glibc included): a position-independent binary otherwise carries one
    // 24-byte entry per pointer to fix up at start (about 29,000 here), and
    // the loader reads every page of them into each process.
    if target.contains("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rustc-env=ENVRENDER_COMMIT={}", commit());
}

/// The commit: `ENVRENDER_COMMIT` when set (a build from a source archive),
/// else what git says of the checkout, else "unknown".
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=ENVRENDER_COMMIT");
    if let Ok(commit) = std::env::var("ENVRENDER_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Built again when HEAD moves (only files that exist: a missing one
    // would rerun this at every build).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let head = git(&["symbolic-ref", "-q", "HEAD"]);
        let files = ["HEAD", "packed-refs"]
            .into_iter()
            .map(String::from)
            .chain(head);
        for file in files {
            let path = std::path::Path::new(&dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}
