//! deploy/release.sh, checked from outside: both static binaries (`file`),
//! their sums, archives and SBOMs, both images and the multi-arch archive
//! (podman, the OCI layout's own files), and the arm64 binary rendering under
//! qemu against local values and the test servers on loopback.
//!
//! The artifacts are built once per run (support::release). Without podman
//! the image tests say so and pass, unless ENVRENDER_REQUIRE_PODMAN is set;
//! without qemu-aarch64-static the arm64 render says so and passes, unless
//! ENVRENDER_REQUIRE_QEMU is set (CI sets both).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::consul::ConsulServer;
use support::release::{ARCHS, VERSION, artifacts, file_kind, podman_ok};
use support::vault::VaultServer;
use support::{CANARY, Dir};

/// What the image holds, and nothing else: no shell, no package manager.
const IMAGE_FILES: [&str; 8] = [
    "LICENSE",
    "envrender",
    "envrender-bin/",
    "etc/group",
    "etc/passwd",
    "etc/ssl/certs/ca-certificates.crt",
    "run/app/",
    "run/envrender/",
];

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn git_head() -> String {
    run("git", &["rev-parse", "HEAD"], &support::repo())
        .trim()
        .to_string()
}

#[test]
fn both_binaries_are_static_for_their_architecture_with_sums_and_archives() {
    let Some(a) = artifacts() else { return };
    for (arch, _, machine) in ARCHS {
        let bin = a.file(arch, "");
        let kind = file_kind(&bin);
        assert!(
            kind.contains(machine) && kind.contains("static") && kind.contains("stripped"),
            "{}: {kind}",
            bin.display()
        );
        assert!(
            !kind.contains("dynamically linked") && !kind.contains("interpreter"),
            "{kind}"
        );
        // The archive holds the binary, its licence, the README, the
        // completions and the man page.
        let archive = a.file(arch, ".tar.gz");
        let listing = run("tar", &["-tzf", archive.to_str().unwrap()], &a.dist);
        let files: BTreeSet<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
        assert_eq!(
            files,
            BTreeSet::from([
                "envrender",
                "LICENSE",
                "README.md",
                "completions/envrender.bash",
                "completions/_envrender",
                "completions/envrender.fish",
                "man/envrender.1",
            ]),
            "{}",
            archive.display()
        );
        let packed = Command::new("tar")
            .args(["-xOzf", archive.to_str().unwrap(), "envrender"])
            .output()
            .unwrap()
            .stdout;
        assert!(
            packed == std::fs::read(&bin).unwrap(),
            "the archive's envrender is not {}",
            bin.display()
        );
    }
    // Every file of the run is summed, and every sum holds.
    let sums = std::fs::read_to_string(a.dist.join("SHA256SUMS")).unwrap();
    for (arch, _, _) in ARCHS {
        for suffix in ["", ".cdx.json", ".tar.gz"] {
            let name = format!("envrender-{VERSION}-{arch}-linux-musl{suffix}");
            assert!(
                sums.lines().any(|l| l.ends_with(&format!("  {name}"))),
                "SHA256SUMS lacks {name}:\n{sums}"
            );
        }
    }
    let checked = run("sha256sum", &["--check", "--strict", "SHA256SUMS"], &a.dist);
    assert_eq!(
        checked.lines().filter(|l| l.ends_with(": OK")).count(),
        sums.lines().count(),
        "{checked}"
    );
}

/// The versions of each crate in Cargo.lock.
fn locked() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(support::repo().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&text).unwrap();
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        versions
            .entry(p["name"].as_str().unwrap().into())
            .or_default()
            .insert(p["version"].as_str().unwrap().into());
    }
    versions
}

#[test]
fn each_binary_has_an_sbom_of_the_rust_dependencies_it_was_built_with() {
    let Some(a) = artifacts() else { return };
    let locked = locked();
    for (arch, _, _) in ARCHS {
        let path = a.file(arch, ".cdx.json");
        let sbom: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(sbom["bomFormat"], "CycloneDX", "{}", path.display());
        let root = &sbom["metadata"]["component"];
        assert_eq!(
            (&root["name"], &root["version"]),
            (&json!("envrender"), &json!(VERSION))
        );
        let components: BTreeMap<String, String> = sbom["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["version"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // Each one is the version Cargo.lock holds.
        for (name, version) in &components {
            assert!(
                locked.get(name).is_some_and(|v| v.contains(version)),
                "{}: {name} {version} is not in Cargo.lock",
                path.display()
            );
        }
        // What envrender is made of is there ...
        for name in [
            "tokio",
            "handlebars",
            "clap",
            "aws-sdk-ssm",
            "aws-sdk-kms",
            "rustls",
            "aws-lc-rs",
            "notify",
            "nix",
            "reqwest",
            "serde",
            "toml",
            "tracing",
        ] {
            assert!(
                components.contains_key(name),
                "{}: {name} is missing",
                path.display()
            );
        }
        // ... and what only its tests use is not.
        for name in ["proptest", "rcgen"] {
            assert!(
                !components.contains_key(name),
                "{}: {name} is a test dependency",
                path.display()
            );
        }
    }
}

fn image_archive_blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn json_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&std::fs::read(image_archive_blob(layout, digest)).unwrap()).unwrap()
}

#[test]
fn both_images_hold_only_envrender_with_labels_and_no_volumes() {
    let Some(a) = artifacts().filter(|a| a.images) else {
        return;
    };
    let source = std::fs::read_to_string(support::repo().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("repository = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .expect("Cargo.toml names its repository");
    let revision = git_head();
    for (_, platform, _) in ARCHS {
        let image = a.image(platform);
        let inspect: Value =
            serde_json::from_str(&podman_ok(&["image", "inspect", &image])).unwrap();
        let i = &inspect[0];
        assert_eq!(i["Architecture"], platform, "{image}");
        assert_eq!(i["Os"], "linux", "{image}");
        let config = &i["Config"];
        assert_eq!(config["User"], "65532:65532", "{image}");
        assert_eq!(config["Entrypoint"], json!(["/envrender"]), "{image}");
        assert!(
            config["Volumes"].as_object().is_none_or(|v| v.is_empty()),
            "{image} declares VOLUMEs: {}",
            config["Volumes"]
        );
        let labels = &i["Labels"];
        for (label, value) in [
            ("source", source.as_str()),
            ("version", VERSION),
            ("revision", revision.as_str()),
            ("licenses", "Apache-2.0"),
            ("title", "envrender"),
        ] {
            assert_eq!(
                labels[format!("org.opencontainers.image.{label}")],
                value,
                "{image}: {labels}"
            );
        }
    }

    // The multi-arch image: an OCI layout whose index names one image per
    // platform, each of one layer holding exactly the expected files, with
    // that platform's binary.
    let layout = Dir::new();
    run(
        "tar",
        &[
            "-xf",
            a.image_archive().to_str().unwrap(),
            "-C",
            layout.path().to_str().unwrap(),
        ],
        &a.dist,
    );
    let top: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let list = json_blob(
        layout.path(),
        top["manifests"][0]["digest"].as_str().unwrap(),
    );
    let mut platforms = BTreeMap::new();
    for m in list["manifests"].as_array().unwrap() {
        platforms.insert(
            m["platform"]["architecture"].as_str().unwrap().to_string(),
            m["digest"].as_str().unwrap().to_string(),
        );
        assert_eq!(m["platform"]["os"], "linux");
    }
    assert_eq!(
        platforms.keys().map(String::as_str).collect::<Vec<_>>(),
        ["amd64", "arm64"]
    );
    for (arch, platform, machine) in ARCHS {
        let manifest = json_blob(layout.path(), &platforms[platform]);
        let config = json_blob(
            layout.path(),
            manifest["config"]["digest"].as_str().unwrap(),
        );
        assert_eq!(config["architecture"], platform);
        assert!(
            config["config"]["Volumes"]
                .as_object()
                .is_none_or(|v| v.is_empty())
        );
        let layers = manifest["layers"].as_array().unwrap();
        let files: BTreeSet<String> = layers
            .iter()
            .flat_map(|l| {
                let blob = image_archive_blob(layout.path(), l["digest"].as_str().unwrap());
                run("tar", &["-tzf", blob.to_str().unwrap()], layout.path())
                    .lines()
                    .map(|f| f.trim_start_matches("./").to_string())
                    .filter(|f| !f.is_empty() && f != "etc/" && f != "etc/ssl/" && f != "run/")
                    .filter(|f| f != "etc/ssl/certs/")
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            files,
            IMAGE_FILES.iter().map(|f| f.to_string()).collect(),
            "{platform}"
        );
        // The paths volumes are mounted on (and /run) belong to the
        // non-root user, everything else to root.
        for l in layers {
            let blob = image_archive_blob(layout.path(), l["digest"].as_str().unwrap());
            let listing = run(
                "tar",
                &["--numeric-owner", "-tvzf", blob.to_str().unwrap()],
                layout.path(),
            );
            for line in listing.lines() {
                let name = line.rsplit(' ').next().unwrap().trim_start_matches("./");
                let owner = line.split_whitespace().nth(1).unwrap();
                let expected =
                    if ["run/", "run/app/", "run/envrender/", "envrender-bin/"].contains(&name) {
                        "65532/65532"
                    } else {
                        "0/0"
                    };
                assert_eq!(owner, expected, "{platform}: {line}");
            }
        }
        let out = layout.join(&format!("envrender-{platform}"));
        for l in layers {
            let blob = image_archive_blob(layout.path(), l["digest"].as_str().unwrap());
            let bytes = Command::new("tar")
                .args(["-xOzf", blob.to_str().unwrap(), "envrender"])
                .output()
                .unwrap();
            if bytes.status.success() && !bytes.stdout.is_empty() {
                std::fs::write(&out, &bytes.stdout).unwrap();
            }
        }
        let kind = file_kind(&out);
        assert!(kind.contains(machine) && kind.contains("static"), "{kind}");
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(a.file(arch, "")).unwrap(),
            "the {platform} image's envrender is not the {arch} binary"
        );
    }
}

/// `qemu-aarch64-static`, or None (then the test says so) unless
/// ENVRENDER_REQUIRE_QEMU is set.
fn qemu() -> Option<PathBuf> {
    let found = support::which("qemu-aarch64-static");
    if found.is_none() {
        assert!(
            std::env::var_os("ENVRENDER_REQUIRE_QEMU").is_none(),
            "ENVRENDER_REQUIRE_QEMU is set but qemu-aarch64-static is not installed"
        );
        eprintln!("qemu-aarch64-static is not installed: the arm64 binary is not run");
    }
    found
}

#[test]
fn the_arm64_binary_renders_under_qemu_from_local_values_and_the_test_servers() {
    let Some(qemu) = qemu() else { return };
    let Some(a) = artifacts() else { return };
    let bin = a.file("aarch64", "");
    let d = Dir::new();
    let arm64 = |args: &[&str]| {
        let mut all = vec![bin.to_str().unwrap()];
        all.extend_from_slice(args);
        d.cmd_of(&qemu, &all)
    };
    let version = arm64(&["--version"]).run().success();
    assert!(
        version
            .stdout
            .contains(&format!("envrender {VERSION} (commit ")),
        "{}",
        version.stdout
    );

    // Airplane mode: every value from a local file.
    d.write(
        "app.conf.hbs",
        "url = {{consul \"app/url\"}}\npassword = {{vault \"secret/app\" \"password\"}}\nsmtp = {{ssm \"/release/arm64/smtp\"}}\n",
    );
    d.write(
        "values.yaml",
        &format!(
            "consul:app/url: https://local.example.com\nvault:secret/app: {{password: {CANARY}}}\nssm:/release/arm64/smtp: local-smtp\n"
        ),
    );
    arm64(&[
        "--values",
        "values.yaml",
        "render",
        "--template",
        "app.conf.hbs:local/app.conf",
    ])
    .run()
    .success()
    .no_canary();
    assert_eq!(
        d.read("local/app.conf"),
        format!("url = https://local.example.com\npassword = {CANARY}\nsmtp = local-smtp\n")
    );
    assert_eq!(d.mode("local/app.conf"), 0o600);

    // The same template against Consul, Vault and the AWS emulator.
    let consul = ConsulServer::start();
    consul.put("app/url", "https://consul.example.com");
    let vault = VaultServer::start();
    vault.kv2_put("secret/", "app", json!({"password": CANARY}));
    let moto = support::aws::moto();
    support::aws::put_parameters(&moto.url, &[("/release/arm64/smtp", "ssm-smtp", true)]);
    arm64(&["render", "--template", "app.conf.hbs:served/app.conf"])
        .env("CONSUL_HTTP_ADDR", &consul.url)
        .env("VAULT_ADDR", &vault.url)
        .env("VAULT_TOKEN", &vault.root_token)
        .aws(&moto.url)
        .run()
        .success()
        .no_canary();
    assert_eq!(
        d.read("served/app.conf"),
        format!("url = https://consul.example.com\npassword = {CANARY}\nsmtp = ssm-smtp\n")
    );
    assert_eq!(d.mode("served/app.conf"), 0o600);
}

/// actionlint (with shellcheck when installed) finds nothing in the release
/// workflow, and the workflow builds with deploy/release.sh and publishes
/// the files it makes. Without Go the lint says so and passes, unless
/// ENVRENDER_REQUIRE_GO is set (CI sets it).
#[test]
fn the_release_workflow_lints_clean_and_publishes_what_the_script_builds() {
    let workflow = support::repo().join(".github/workflows/release.yml");
    let text = std::fs::read_to_string(&workflow).unwrap();
    for needle in [
        "run: deploy/release.sh --tag",
        "oci-archive:dist/envrender-$VERSION-image.oci.tar",
        "dist/envrender-$VERSION-$arch-linux-musl.cdx.json",
        "cosign sign --yes --recursive",
        "cosign attest --yes --type cyclonedx",
        "actions/attest-build-provenance",
        "dist/SHA256SUMS",
    ] {
        assert!(text.contains(needle), "release.yml lacks {needle:?}");
    }
    let go = Command::new("go").arg("version").output();
    if !go.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("ENVRENDER_REQUIRE_GO").is_none(),
            "ENVRENDER_REQUIRE_GO is set but go does not run"
        );
        eprintln!("go is not installed: the release workflow is not linted");
        return;
    }
    let bin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gobin");
    if !bin.join("actionlint").is_file() {
        let out = Command::new("go")
            .args([
                "install",
                "github.com/rhysd/actionlint/cmd/actionlint@v1.7.12",
            ])
            .env("GOBIN", &bin)
            .output()
            .expect("go install");
        assert!(
            out.status.success(),
            "go install actionlint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(bin.join("actionlint"))
        .arg(&workflow)
        .current_dir(support::repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
