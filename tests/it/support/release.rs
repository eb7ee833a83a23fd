//! The release artifacts `deploy/release.sh` builds (both static binaries,
//! their SBOMs and archives, and, with podman, both images), built once per
//! test run into `CARGO_TARGET_TMPDIR/dist`, and the podman command the
//! container tests use.
//!
//! Podman runs here as root with `--runtime runc --cgroup-manager=cgroupfs`
//! (ENVRENDER_PODMAN overrides the command). Without podman the images are
//! not built and the container tests say so and pass, unless
//! ENVRENDER_REQUIRE_PODMAN is set (CI sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The tag the images are built under: `TAG-amd64` and `TAG-arm64`.
pub const IMAGE_TAG: &str = "localhost/envrender:test";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// (release.sh's architecture, the image platform's, `file`'s machine name)
pub const ARCHS: [(&str, &str, &str); 2] = [
    ("x86_64", "amd64", "x86-64"),
    ("aarch64", "arm64", "ARM aarch64"),
];

pub struct Artifacts {
    pub dist: PathBuf,
    /// Whether the images were built (podman is present).
    pub images: bool,
}

impl Artifacts {
    /// `dist/envrender-VERSION-ARCH-linux-musl`, and the files named after it
    /// with `suffix` (`.cdx.json`, `.tar.gz`).
    pub fn file(&self, arch: &str, suffix: &str) -> PathBuf {
        self.dist
            .join(format!("envrender-{VERSION}-{arch}-linux-musl{suffix}"))
    }

    /// The image of one platform (`amd64`, `arm64`).
    pub fn image(&self, platform: &str) -> String {
        format!("{IMAGE_TAG}-{platform}")
    }

    /// The multi-arch image: an OCI layout archive.
    pub fn image_archive(&self) -> PathBuf {
        self.dist.join(format!("envrender-{VERSION}-image.oci.tar"))
    }
}

/// Runs `deploy/release.sh` once (it takes seconds when `.ci/run` built
/// the same commit before the tests). None, said on stderr, where it cannot
/// run (not root, and musl-gcc or `file` missing, which it would install),
/// unless ENVRENDER_REQUIRE_RELEASE is set (CI sets it).
pub fn artifacts() -> Option<&'static Artifacts> {
    static BUILT: OnceLock<Option<Artifacts>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = super::is_root();
            let tools = ["musl-gcc", "file"].iter().all(|t| super::which(t).is_some());
            if !root && !tools {
                assert!(
                    std::env::var_os("ENVRENDER_REQUIRE_RELEASE").is_none(),
                    "ENVRENDER_REQUIRE_RELEASE is set but deploy/release.sh cannot install musl-tools and file (not root)"
                );
                eprintln!(
                    "musl-gcc or file is missing and this is not root: the release artifacts are not built"
                );
                return None;
            }
            Some(build())
        })
        .as_ref()
}

fn build() -> Artifacts {
    let dist = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dist");
    let images = podman_present();
    let mut command = Command::new(super::repo().join("deploy/release.sh"));
    command
        .arg("--tag")
        .arg(IMAGE_TAG)
        .env("DIST", &dist)
        .env("PODMAN", podman_words().join(" "));
    if !images {
        command.arg("--no-image");
    }
    let out = command.output().expect("deploy/release.sh");
    assert!(
        out.status.success(),
        "deploy/release.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 60),
    );
    Artifacts { dist, images }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether podman runs here; it must when ENVRENDER_REQUIRE_PODMAN is set.
pub fn podman_present() -> bool {
    let words = podman_words();
    let present = Command::new(&words[0])
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("ENVRENDER_REQUIRE_PODMAN").is_none(),
            "ENVRENDER_REQUIRE_PODMAN is set but {} does not run",
            words[0]
        );
        eprintln!("podman is not installed: the images are not built or played");
    }
    present
}

pub fn podman_words() -> Vec<String> {
    std::env::var("ENVRENDER_PODMAN")
        .unwrap_or_else(|_| {
            "podman --runtime runc --cgroup-manager=cgroupfs --events-backend=file".into()
        })
        .split_whitespace()
        .map(String::from)
        .collect()
}

pub fn podman(args: &[&str]) -> Output {
    let words = podman_words();
    Command::new(&words[0])
        .args(&words[1..])
        .args(args)
        .output()
        .expect("podman")
}

pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `file -b PATH`.
pub fn file_kind(path: &Path) -> String {
    let out = Command::new("file")
        .arg("-b")
        .arg(path)
        .output()
        .expect("file (Debian: file)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
