//! deploy/: the manifests validated offline, and each Kubernetes pattern and
//! the ECS sidecar task played with real containers of the image
//! deploy/release.sh builds (support::release).
//!
//! The pod player reads the pod spec from the manifest itself (commands,
//! arguments, environment, mounts, security context, probes, the shared PID
//! namespace) and runs it with podman on the host network, so the containers
//! reach the Consul and Vault test servers and the AWS emulator on loopback.
//! What a cluster injects is supplied the same way: the service-account token
//! file, AWS credentials (IRSA's job) and the backend addresses, which point at
//! the test servers. Where the manifest and this test disagree, one of them is
//! wrong.
//!
//! Without podman the container tests say so and pass, unless
//! ENVRENDER_REQUIRE_PODMAN is set (CI sets it); the process-level variant
//! (`unshare`) runs everywhere.

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::consul::ConsulServer;
use support::release::{podman, podman_ok};
use support::vault::{Role, VaultServer};

/// The image deploy/release.sh built for this machine's architecture (CI's:
/// x86_64), from the static musl binary it ships.
#[cfg(target_arch = "aarch64")]
const ENVRENDER_IMAGE: &str = "localhost/envrender:test-arm64";
#[cfg(not(target_arch = "aarch64"))]
const ENVRENDER_IMAGE: &str = "localhost/envrender:test-amd64";
const APP_IMAGE: &str = "localhost/envrender-test-app:1";
/// deploy/ecs/Containerfile built on ENVRENDER_IMAGE.
const ECS_SIDECAR_IMAGE: &str = "localhost/envrender-ecs-sidecar:test";
/// The service-account token Kubernetes mounts into every container.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.deploy-test-service-account.sig";
/// The runAsUser of every manifest.
const UID: u32 = 65532;

/// One pattern at a time: they share the host network (port 9102) and the
/// machine's two cores.
static ONE_POD: Mutex<()> = Mutex::new(());

#[test]
fn manifests_validate_offline() {
    let python = support::pip_install(
        "kubernetes-validate==1.37.0 python-hcl2==8.1.4 botocore==1.44.5",
        "deploy-validate-1",
        "ENVRENDER_DEPLOY_PYTHONPATH",
    );
    let out = Command::new("python3")
        .arg(support::repo().join("deploy/validate.py"))
        .arg("--self-test")
        .env("PYTHONPATH", &python)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok: 5 Kubernetes files") && stdout.contains("2 ECS task definitions"),
        "{stdout}"
    );
}

/// The configuration both platforms use parses and names its templates.
#[test]
fn deploy_configurations_pass_envrender_check_syntax() {
    let d = support::Dir::new();
    // The configuration names its templates where the pod mounts them.
    let mounted = |text: &str, dir: &str| {
        text.replace("/etc/envrender/", &format!("{}/", d.join(dir).display()))
    };
    for (name, text) in configmap_data() {
        d.write(&format!("k8s/{name}"), &mounted(&text, "k8s"));
    }
    for name in ["envrender.toml", "app.conf.hbs"] {
        let text = std::fs::read_to_string(support::repo().join("deploy/ecs").join(name)).unwrap();
        d.write(&format!("ecs/{name}"), &mounted(&text, "ecs"));
    }
    for dir in ["k8s", "ecs"] {
        // Every value resolves from a local file: the configuration and the
        // template are what is checked, not the backends.
        d.write(
            &format!("{dir}/values.yaml"),
            "consul:app/prod/public_url: https://app.example.com\n\
             consul:app/prod/db/host: db.internal\n\
             consul:app/prod/features/: {beta: true}\n\
             vault:database/creds/app: {username: u, password: p}\n\
             vault:secret/app/api: {key: k}\n\
             ssm:/app/prod/smtp/password: s\n",
        );
        d.cmd(&[
            "--config",
            &format!("{dir}/envrender.toml"),
            "--values",
            &format!("{dir}/values.yaml"),
            "render",
            "--output-root",
            &format!("{dir}/out"),
        ])
        .run()
        .success();
        let conf = d.read(&format!("{dir}/out/run/app/app.conf"));
        assert!(
            conf.contains("public_url = \"https://app.example.com\""),
            "{conf}"
        );
        assert!(conf.contains("\"beta\" = true"), "{conf}");
        assert_eq!(d.mode(&format!("{dir}/out/run/app/app.conf")), 0o600);
    }
}

// ------------------------------------------------------------ the backends

/// The values the manifests' template reads, in the test servers.
struct Backends {
    consul: ConsulServer,
    vault: VaultServer,
    moto: String,
    /// The AWS access key the containers use (IRSA's or the task role's).
    aws_key: (String, String),
}

/// For the Kubernetes manifests: the shared AWS emulator, any key.
fn backends() -> Backends {
    let moto = support::aws::moto().url.clone();
    support::aws::put_parameters(&moto, &[("/app/prod/smtp/password", "smtp-pw-1", true)]);
    backends_with(moto, ("test".into(), "test".into()))
}

/// For the ECS task definitions: an AWS emulator that enforces IAM, with a
/// user holding deploy/ecs/task-role-policy.json standing in for the task
/// role; Vault logs in with it (AWS IAM auth). The emulator evaluates only
/// action-level policies, so each statement's resources are widened to `*`:
/// what is checked is that the policy's actions cover every call.
fn ecs_backends() -> Backends {
    // Four requests before IAM applies: the user, its policy, its key, the
    // parameter.
    let moto = support::aws::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
    let text =
        std::fs::read_to_string(support::repo().join("deploy/ecs/task-role-policy.json")).unwrap();
    let mut policy: Value = serde_json::from_str(&text).unwrap();
    for statement in policy["Statement"].as_array_mut().unwrap() {
        statement["Resource"] = json!("*");
        statement.as_object_mut().unwrap().remove("Condition");
    }
    let policy = policy.to_string();
    let key = support::aws::auth_setup(
        &moto.url,
        &policy,
        &[("/app/prod/smtp/password", "smtp-pw-1")],
    );
    let b = backends_with(moto.url.clone(), key);
    b.vault.aws_role(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 3600,
            arns: vec![format!(
                "arn:aws:iam::{}:user/envrender-test",
                support::aws::ACCOUNT
            )],
            ..Role::default()
        },
    );
    // deploy/ecs/envrender.toml's header_value.
    b.vault.aws_server_id("vault.internal.example.com");
    b
}

fn backends_with(moto: String, aws_key: (String, String)) -> Backends {
    let consul = ConsulServer::start();
    consul.put("app/prod/public_url", "https://v1.example.com");
    consul.put("app/prod/db/host", "db.internal");
    consul.put("app/prod/features/beta", "true");
    let vault = VaultServer::start();
    vault.policy(
        "app",
        &[
            ("secret/data/app/*", &["read"]),
            ("database/creds/app", &["read"]),
            ("sys/leases/*", &["update"]),
        ],
    );
    vault.kubernetes_role(
        "app",
        Role {
            policies: vec!["app".into()],
            ttl: 3600,
            jwts: vec![JWT.into()],
            ..Role::default()
        },
    );
    vault.database_role("app", 3600, 86400);
    vault.kv2_put("secret/", "app/api", json!({"key": support::CANARY}));
    Backends {
        consul,
        vault,
        moto,
        aws_key,
    }
}

impl Backends {
    /// What the cluster would set: addresses (here, the test servers) and
    /// AWS credentials (IRSA's job).
    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "CONSUL_HTTP_ADDR".into(),
                self.consul.url.trim_start_matches("http://").into(),
            ),
            ("VAULT_ADDR".into(), self.vault.url.clone()),
            ("AWS_REGION".into(), support::aws::REGION.into()),
            ("AWS_ENDPOINT_URL".into(), self.moto.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.aws_key.0.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.aws_key.1.clone()),
        ]
    }
}

// ------------------------------------------------------------ the manifests

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(support::repo().join("deploy/kubernetes").join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn configmap_data() -> BTreeMap<String, String> {
    serde_json::from_value(yaml("configmap.yaml")["data"].clone()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// One container of a pod spec, as the player needs it.
struct Container {
    name: String,
    /// The manifest's image, mapped to the image built here.
    image: &'static str,
    command: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// (volume, mount path, read-only)
    mounts: Vec<(String, String, bool)>,
    read_only_root: bool,
    drop_all: bool,
    no_new_privileges: bool,
    /// Native sidecar: an init container with restartPolicy Always.
    sidecar: bool,
    /// The startupProbe's path and port.
    startup_probe: Option<(String, u16)>,
    /// ECS: the healthCheck command (after "CMD"), run in the container.
    health_check: Option<Vec<String>>,
}

/// The image built here that stands in for a manifest's image.
fn stand_in(image: &str) -> &'static str {
    if image.contains("/envrender:") {
        ENVRENDER_IMAGE
    } else if image.contains("/app-envrender:") {
        ECS_SIDECAR_IMAGE
    } else if image.contains("/app:") {
        APP_IMAGE
    } else {
        panic!("no test image stands in for {image}")
    }
}

fn container(c: &Value) -> Container {
    let image = stand_in(c["image"].as_str().unwrap());
    let ports: BTreeMap<String, u16> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["containerPort"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    let startup_probe = c["startupProbe"]["httpGet"].as_object().map(|g| {
        let port = match &g["port"] {
            Value::String(name) => ports[name],
            n => n.as_u64().unwrap() as u16,
        };
        (g["path"].as_str().unwrap().to_string(), port)
    });
    let sc = &c["securityContext"];
    Container {
        name: c["name"].as_str().unwrap().to_string(),
        image,
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env: name_values(&c["env"]),
        mounts: mounts(&c["volumeMounts"], "name", "mountPath"),
        read_only_root: sc["readOnlyRootFilesystem"].as_bool() == Some(true),
        drop_all: strings(&sc["capabilities"]["drop"]).contains(&"ALL".to_string()),
        no_new_privileges: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        sidecar: c["restartPolicy"].as_str() == Some("Always"),
        startup_probe,
        health_check: None,
    }
}

/// `[{name, value}]` entries with a literal value (Kubernetes `valueFrom`
/// entries, optional Secrets here, have no stand-in).
fn name_values(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect()
}

/// (volume, path, read-only) of each mount, under the platform's key names.
fn mounts(list: &Value, volume: &str, path: &str) -> Vec<(String, String, bool)> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m[volume].as_str().unwrap().to_string(),
                m[path].as_str().unwrap().to_string(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// An ECS container definition, as the player needs it.
fn ecs_container(c: &Value) -> Container {
    assert_eq!(c["user"].as_str(), Some("65532:65532"), "{}", c["name"]);
    let health = strings(&c["healthCheck"]["command"]);
    Container {
        name: c["name"].as_str().unwrap().to_string(),
        image: stand_in(c["image"].as_str().unwrap()),
        command: strings(&c["entryPoint"]),
        args: strings(&c["command"]),
        env: name_values(&c["environment"]),
        mounts: mounts(&c["mountPoints"], "sourceVolume", "containerPath"),
        read_only_root: c["readonlyRootFilesystem"].as_bool() == Some(true),
        drop_all: strings(&c["linuxParameters"]["capabilities"]["drop"])
            .contains(&"ALL".to_string()),
        no_new_privileges: false,
        sidecar: c["restartPolicy"]["enabled"].as_bool() == Some(true),
        startup_probe: None,
        health_check: match health.split_first() {
            Some((cmd, argv)) if cmd == "CMD" => Some(argv.to_vec()),
            Some((other, _)) => panic!("healthCheck {other}: the image has no shell"),
            None => None,
        },
    }
}

/// A Deployment's pod: its containers and a host directory per volume.
struct Pod {
    init: Vec<Container>,
    app: Vec<Container>,
    share_pid: bool,
    volumes: BTreeMap<String, PathBuf>,
    /// Kubernetes: the service-account token file mounted in every container
    /// (None when the pod sets automountServiceAccountToken: false).
    token: Option<PathBuf>,
    /// ECS: volume → the podman named volume standing in for the task
    /// volume (both start empty and take their owner from the image).
    named: BTreeMap<String, String>,
    _scratch: tempfile::TempDir,
}

impl Pod {
    fn from_manifest(file: &str) -> Pod {
        let deployment = yaml(file);
        let spec = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            spec["securityContext"]["runAsUser"].as_u64(),
            Some(UID as u64)
        );
        let scratch = tempfile::tempdir().unwrap();
        // Open to the pod's user, as the node's pod directories are.
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let dir = scratch.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert_eq!(cm, "app-envrender", "{file}: unknown ConfigMap");
                for (key, text) in configmap_data() {
                    std::fs::write(dir.join(key), text).unwrap();
                }
            } else if let Some(sources) = v["projected"]["sources"].as_array() {
                // A projected service-account token, as the kubelet writes it.
                for source in sources {
                    let token = &source["serviceAccountToken"];
                    assert_eq!(token["audience"], "vault", "{file}: volume {name}");
                    let path = dir.join(token["path"].as_str().unwrap());
                    std::fs::write(&path, JWT).unwrap();
                    std::os::unix::fs::chown(&path, Some(0), Some(UID)).unwrap();
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))
                        .unwrap();
                }
            } else {
                assert!(v.get("emptyDir").is_some(), "{file}: volume {name}");
                // fsGroup: the volume belongs to the pod's group.
                std::os::unix::fs::chown(&dir, Some(UID), Some(UID)).unwrap();
            }
            volumes.insert(name.to_string(), dir);
        }
        let token = scratch.path().join("token");
        std::fs::write(&token, JWT).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let list = |key: &str| {
            spec[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(container)
                .collect()
        };
        Pod {
            init: list("initContainers"),
            app: list("containers"),
            share_pid: spec["shareProcessNamespace"].as_bool() == Some(true),
            volumes,
            // automountServiceAccountToken: false mounts it nowhere.
            token: (spec["automountServiceAccountToken"].as_bool() != Some(false)).then_some(token),
            named: BTreeMap::new(),
            _scratch: scratch,
        }
    }

    /// An ECS task definition as a pod: the containers that others wait
    /// for (`dependsOn`) start first; `pidMode: task` shares the PID
    /// namespace. Task volumes are directories owned by the task's user.
    fn from_ecs(file: &str) -> Pod {
        let path = support::repo().join("deploy/ecs").join(file);
        let task: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let (mut volumes, mut named) = (BTreeMap::new(), BTreeMap::new());
        for v in task["volumes"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let volume = format!("envrender-test-{}-{name}", std::process::id());
            let _ = podman(&["volume", "rm", "--force", &volume]);
            podman_ok(&["volume", "create", &volume]);
            let dir = podman_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", &volume]);
            volumes.insert(name.to_string(), PathBuf::from(dir.trim()));
            named.insert(name.to_string(), volume);
        }
        let defs = task["containerDefinitions"].as_array().unwrap();
        let awaited: Vec<&str> = defs
            .iter()
            .flat_map(|c| c["dependsOn"].as_array().into_iter().flatten())
            .map(|d| d["containerName"].as_str().unwrap())
            .collect();
        let (init, app): (Vec<_>, Vec<_>) = defs
            .iter()
            .partition(|c| awaited.contains(&c["name"].as_str().unwrap()));
        Pod {
            init: init.into_iter().map(ecs_container).collect(),
            app: app.into_iter().map(ecs_container).collect(),
            share_pid: task["pidMode"].as_str() == Some("task"),
            volumes,
            token: None,
            named,
            _scratch: scratch,
        }
    }

    fn volume(&self, name: &str) -> &Path {
        &self.volumes[name]
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for volume in self.named.values() {
            let _ = podman(&["volume", "rm", "--force", volume]);
        }
    }
}

// ------------------------------------------------------------ podman

/// Whether the container tests can run: podman present, the images built
/// (envrender's from deploy/image, the app's from tests/deploy/app).
fn images() -> bool {
    static BUILT: OnceLock<bool> = OnceLock::new();
    *BUILT.get_or_init(|| {
        if !support::release::artifacts().is_some_and(|a| a.images) {
            eprintln!("no image of envrender: the container patterns are not played");
            return false;
        }
        let ctx = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-app-image");
        let _ = std::fs::remove_dir_all(&ctx);
        std::fs::create_dir_all(&ctx).unwrap();
        for f in ["Containerfile", "server"] {
            std::fs::copy(
                support::repo().join("tests/deploy/app").join(f),
                ctx.join(f),
            )
            .unwrap();
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("busybox (Debian: busybox-static) for the test app image");
        std::fs::copy(busybox, ctx.join("busybox")).unwrap();
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            ctx.join("ca-certificates.crt"),
        )
        .expect("the CA bundle (Debian: ca-certificates)");
        podman_ok(&["build", "--quiet", "-t", APP_IMAGE, ctx.to_str().unwrap()]);
        let ecs = support::repo().join("deploy/ecs");
        podman_ok(&[
            "build",
            "--quiet",
            "--pull=never",
            &format!("--build-arg=ENVRENDER_IMAGE={ENVRENDER_IMAGE}"),
            "-t",
            ECS_SIDECAR_IMAGE,
            ecs.to_str().unwrap(),
        ]);
        true
    })
}

/// The containers of one pod, removed when dropped.
struct Podman<'p> {
    pod: &'p Pod,
    prefix: String,
    env: Vec<(String, String)>,
    started: Vec<String>,
}

impl<'p> Podman<'p> {
    fn new(pod: &'p Pod, backends: &Backends) -> Self {
        Podman {
            pod,
            prefix: format!("envrender-test-{}", std::process::id()),
            env: backends.env(),
            started: Vec::new(),
        }
    }

    fn name(&self, c: &Container) -> String {
        format!("{}-{}", self.prefix, c.name)
    }

    /// `podman run` for a container as the manifest describes it.
    fn run_args(&self, c: &Container, detach: bool) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into(), "--name".into(), self.name(c)];
        if detach {
            a.push("-d".into());
        }
        a.extend(
            [
                "--pull=never",
                "--network=host",
                "--ulimit=nofile=1024:1024",
                "--ulimit=nproc=1024:1024",
            ]
            .map(String::from),
        );
        a.push(format!("--user={UID}:{UID}"));
        if c.read_only_root {
            a.push("--read-only".into());
        }
        if c.drop_all {
            a.push("--cap-drop=all".into());
        }
        if c.no_new_privileges {
            a.push("--security-opt=no-new-privileges".into());
        }
        if self.pod.share_pid
            && let Some(first) = self.started.first()
        {
            a.push(format!("--pid=container:{first}"));
        }
        for (volume, path, ro) in &c.mounts {
            let host = match self.pod.named.get(volume) {
                Some(named) => named.clone(),
                None => self.pod.volume(volume).display().to_string(),
            };
            a.push(format!(
                "--volume={host}:{path}{}",
                if *ro { ":ro" } else { "" }
            ));
        }
        if let Some(token) = &self.pod.token {
            a.push(format!(
                "--volume={}:{SERVICE_ACCOUNT_TOKEN}:ro",
                token.display()
            ));
        }
        for (k, v) in with_cluster_env(&c.env, &self.env) {
            a.push(format!("--env={k}={v}"));
        }
        if !c.command.is_empty() {
            a.push(format!("--entrypoint={}", json!(c.command)));
        }
        a.push(c.image.into());
        a.extend(c.args.iter().cloned());
        a
    }
}

/// How a pattern's containers are run: podman, or processes in namespaces.
trait Runtime {
    /// Runs an init container to its end; returns its output.
    fn run_to_end(&mut self, c: &Container) -> String;
    /// Starts a container (joining the pod's PID namespace when the pod
    /// shares one); returns its name.
    fn start(&mut self, c: &Container) -> String;
    fn running(&self, name: &str) -> bool;
    /// What the container wrote on stdout and stderr.
    fn logs(&self, name: &str) -> String;
    /// Zombie processes in the container's PID namespace.
    fn zombies(&self, name: &str) -> usize;
    /// The name of PID 1 as the container sees it.
    fn pid_1(&self, name: &str) -> String;
    /// SIGTERM, then SIGKILL after `grace` seconds; the exit code.
    fn stop(&mut self, name: &str, grace: u32) -> i32;
    /// Runs a command in the running container (an ECS health check);
    /// whether it exited 0.
    fn exec_ok(&self, name: &str, argv: &[String]) -> bool;
    /// Whether each container has mounts of its own (containers), or the
    /// pod's containers share one mount namespace (processes).
    fn own_mounts(&self) -> bool {
        false
    }

    /// Kubernetes, with mounts of its own: the app's container holds
    /// neither the service-account token nor envrender's Vault token.
    fn assert_no_tokens(&self, pod: &Pod, app: &str) {
        if !self.own_mounts() || !pod.named.is_empty() {
            return;
        }
        let absent = format!(
            "! test -e {SERVICE_ACCOUNT_TOKEN} && ! test -e /run/secrets/vault/token && test -d /run/app"
        );
        assert!(
            self.exec_ok(app, &["sh".into(), "-c".into(), absent]),
            "the app's container holds a token"
        );
    }

    /// Starts a container; a native sidecar must then pass its startupProbe
    /// before the next one starts, as the kubelet has it.
    fn start_ready(&mut self, c: &Container) -> String {
        let name = self.start(c);
        let url = c
            .startup_probe
            .as_ref()
            .map(|(path, port)| format!("http://127.0.0.1:{port}{path}"));
        let started = Instant::now();
        loop {
            let passed = match (&c.health_check, &url) {
                (Some(check), _) => self.exec_ok(&name, check),
                (None, Some(url)) => probe(url),
                (None, None) => true,
            };
            if passed {
                return name;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60) && self.running(&name),
                "{} never passed its {:?}:\n{}",
                c.name,
                c.health_check.as_ref().map(|h| h.join(" ")).or(url.clone()),
                self.logs(&name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the container's log shows `needle`.
    fn wait_log(&self, name: &str, needle: &str) -> String {
        let started = Instant::now();
        loop {
            let logs = self.logs(name);
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{name} never logged {needle:?}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Runtime for Podman<'_> {
    fn own_mounts(&self) -> bool {
        true
    }

    fn run_to_end(&mut self, c: &Container) -> String {
        let args = self.run_args(c, false);
        let out = podman(&args.iter().map(String::as_str).collect::<Vec<_>>());
        self.started.push(self.name(c));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{} failed:\n{text}", c.name);
        text
    }

    fn start(&mut self, c: &Container) -> String {
        let args = self.run_args(c, true);
        podman_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let name = self.name(c);
        self.started.push(name.clone());
        name
    }

    fn running(&self, name: &str) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", name]).trim() == "true"
    }

    fn logs(&self, name: &str) -> String {
        let out = podman(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn zombies(&self, name: &str) -> usize {
        podman_ok(&[
            "exec",
            name,
            "sh",
            "-c",
            "cat /proc/[0-9]*/stat 2>/dev/null",
        ])
        .lines()
        .filter(|l| l.contains(") Z "))
        .count()
    }

    fn pid_1(&self, name: &str) -> String {
        podman_ok(&["exec", name, "cat", "/proc/1/comm"])
            .trim()
            .to_string()
    }

    fn exec_ok(&self, name: &str, argv: &[String]) -> bool {
        let mut args = vec!["exec", name];
        args.extend(argv.iter().map(String::as_str));
        podman(&args).status.success()
    }

    fn stop(&mut self, name: &str, grace: u32) -> i32 {
        podman_ok(&["stop", "--time", &grace.to_string(), name]);
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", name])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        for name in self.started.iter().rev() {
            let _ = podman(&["rm", "--force", "--volumes", "--time", "0", name]);
        }
    }
}

/// A container's environment: the manifest's values, with what the cluster
/// provides (addresses, here the test servers'; IRSA's or the task role's
/// credentials) replacing or adding to them.
fn with_cluster_env(
    manifest: &[(String, String)],
    cluster: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = manifest.to_vec();
    for (k, v) in cluster {
        env.retain(|(n, _)| n != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Whether `url` answers 2xx (asked with `envrender probe`).
fn probe(url: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_envrender"))
        .args(["probe", url, "--timeout", "1s"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The n-th configuration the test app printed ("load N" … "end N").
fn loaded(logs: &str, n: usize) -> String {
    let start = format!("load {n}\n");
    let end = format!("end {n}\n");
    let from = logs
        .find(&start)
        .unwrap_or_else(|| panic!("no load {n}:\n{logs}"))
        + start.len();
    let to = logs[from..].find(&end).unwrap() + from;
    logs[from..to].to_string()
}

fn assert_rendered(conf: &str, public_url: &str) {
    for expected in [
        format!("public_url = \"{public_url}\""),
        "host = \"db.internal\"".to_string(),
        format!("key = \"{}\"", support::CANARY),
        "password = \"smtp-pw-1\"".to_string(),
        "\"beta\" = \"true\"".to_string(),
    ] {
        assert!(conf.contains(&expected), "{expected:?} not in:\n{conf}");
    }
    assert!(
        conf.contains("username = \"v-"),
        "no database user in:\n{conf}"
    );
}

/// A file envrender wrote: owned by the pod's user, mode 0600.
fn assert_private(path: &Path) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(meta.uid(), UID, "{}", path.display());
    assert_eq!(meta.mode() & 0o7777, 0o600, "{}", path.display());
}

// ------------------------------------------------------------ the patterns

/// (a) The init container renders; the app then starts and reads the file.
fn play_init_container(rt: &mut dyn Runtime, pod: &Pod, backends: &Backends) {
    assert_eq!(pod.init.len(), 1);
    let init_logs = rt.run_to_end(&pod.init[0]);
    assert!(!init_logs.contains(support::CANARY), "{init_logs}");
    assert_private(&pod.volume("app-config").join("app.conf"));
    assert_private(&pod.volume("envrender-state").join("vault.json"));
    let app = rt.start_ready(&pod.app[0]);
    rt.assert_no_tokens(pod, &app);
    let logs = rt.wait_log(&app, "end 1");
    assert_rendered(&loaded(&logs, 1), "https://v1.example.com");
    assert_eq!(backends.vault.count("logins"), 1);
    assert_eq!(backends.vault.count("leases_issued"), 1);
}

/// (b) The native sidecar is ready before the app starts; a Consul change
/// reaches the app, found by name in the shared PID namespace, as SIGHUP.
fn play_native_sidecar(rt: &mut dyn Runtime, pod: &Pod, backends: &Backends) {
    assert!(pod.share_pid && pod.init[0].sidecar);
    let sidecar = rt.start_ready(&pod.init[0]);
    assert_private(&pod.volume("app-config").join("app.conf"));
    let app = rt.start_ready(&pod.app[0]);
    rt.assert_no_tokens(pod, &app);
    let logs = rt.wait_log(&app, "end 1");
    assert_rendered(&loaded(&logs, 1), "https://v1.example.com");
    backends
        .consul
        .put("app/prod/public_url", "https://v2.example.com");
    // Rewritten after --wait 2s, then one SIGHUP: the second load is the
    // new content (a signal at the first render would have made it the old).
    let logs = rt.wait_log(&app, "end 2");
    assert_rendered(&loaded(&logs, 2), "https://v2.example.com");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!rt.logs(&app).contains("load 3"), "{}", rt.logs(&app));
    let sidecar_logs = rt.logs(&sidecar);
    assert!(!sidecar_logs.contains(support::CANARY), "{sidecar_logs}");
    // One action in all: none at the first render, when the app was not
    // there yet, one for the change.
    assert_eq!(
        sidecar_logs.matches("action done").count(),
        1,
        "{sidecar_logs}"
    );
    // The app sees envrender's process but cannot read its environment
    // (tokens, AWS keys) or its files through /proc.
    let read_environ = "found=; for p in /proc/[0-9]*; do \
        if [ \"$(cat $p/comm 2>/dev/null)\" = envrender ]; then found=1; \
        cat $p/environ >/dev/null 2>&1 && exit 1; ls $p/root/ >/dev/null 2>&1 && exit 1; fi; done; \
        [ -n \"$found\" ]";
    assert!(rt.exec_ok(&app, &["sh".into(), "-c".into(), read_environ.into()]));
    assert_eq!(backends.vault.count("logins"), 1);
    assert_eq!(backends.vault.count("leases_issued"), 1);
    // Pod shutdown: the app first, then the sidecar, which exits 0.
    assert_eq!(rt.stop(&app, 10), 3, "{}", rt.logs(&app));
    assert_eq!(rt.stop(&sidecar, 10), 0, "{}", rt.logs(&sidecar));
}

/// (c) The binary copied in by an init container runs as PID 1 of the app's
/// container: references in the environment replaced, orphans reaped, a
/// change sent as --reload-signal, SIGTERM forwarded, the app's exit code.
fn play_wrapper(rt: &mut dyn Runtime, pod: &Pod, backends: &Backends) {
    rt.run_to_end(&pod.init[0]);
    let copied = pod.volume("envrender-bin").join("envrender");
    let meta = std::fs::metadata(&copied).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o755, "{}", copied.display());
    let app = rt.start_ready(&pod.app[0]);
    let logs = rt.wait_log(&app, "end 1");
    let first = loaded(&logs, 1);
    assert_rendered(&first, "https://v1.example.com");
    assert!(first.contains("env SMTP_PASSWORD=smtp-pw-1"), "{first}");
    assert_eq!(rt.pid_1(&app), "envrender");
    // The app left five orphans that end after 0.2 s.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rt.zombies(&app), 0);
    backends
        .consul
        .put("app/prod/public_url", "https://v2.example.com");
    let logs = rt.wait_log(&app, "end 2");
    assert_rendered(&loaded(&logs, 2), "https://v2.example.com");
    assert_eq!(rt.stop(&app, 20), 3, "{}", rt.logs(&app));
    assert!(rt.logs(&app).contains("stopping"));
}

type Play = fn(&mut dyn Runtime, &Pod, &Backends);

/// The patterns need root (containers, mount namespaces, file owners).
fn as_root() -> bool {
    let root = support::is_root();
    if !root {
        assert!(
            std::env::var_os("ENVRENDER_REQUIRE_PODMAN").is_none(),
            "ENVRENDER_REQUIRE_PODMAN is set but the tests do not run as root"
        );
        eprintln!("not root: the deployment patterns are not played");
    }
    root
}

fn in_containers(manifest: &str, play: Play) {
    let _one = ONE_POD.lock().unwrap_or_else(|e| e.into_inner());
    if !as_root() || !images() {
        return;
    }
    let backends = backends();
    let pod = Pod::from_manifest(manifest);
    play(&mut Podman::new(&pod, &backends), &pod, &backends);
}

fn in_namespaces(manifest: &str, play: Play) {
    let _one = ONE_POD.lock().unwrap_or_else(|e| e.into_inner());
    if !as_root() {
        return;
    }
    let backends = backends();
    let pod = Pod::from_manifest(manifest);
    play(&mut Namespaces::new(&pod, &backends), &pod, &backends);
}

#[test]
fn init_container_in_containers() {
    in_containers("init-container.yaml", play_init_container);
}

#[test]
fn native_sidecar_in_containers() {
    in_containers("sidecar.yaml", play_native_sidecar);
}

#[test]
fn wrapper_in_containers() {
    in_containers("wrapper.yaml", play_wrapper);
}

/// The ECS sidecar task definition, in containers: the configuration baked
/// into the sidecar's image by deploy/ecs/Containerfile, Vault's AWS IAM
/// login and SSM under the task role's policy, the app started once the
/// sidecar's healthCheck (`envrender probe`, run in its container) passes.
#[test]
fn ecs_sidecar_in_containers() {
    let _one = ONE_POD.lock().unwrap_or_else(|e| e.into_inner());
    if !as_root() || !images() {
        return;
    }
    let backends = ecs_backends();
    let pod = Pod::from_ecs("sidecar-task-definition.json");
    assert!(pod.init[0].health_check.is_some());
    play_native_sidecar(&mut Podman::new(&pod, &backends), &pod, &backends);
}

#[test]
fn init_container_as_processes() {
    in_namespaces("init-container.yaml", play_init_container);
}

#[test]
fn native_sidecar_as_processes() {
    in_namespaces("sidecar.yaml", play_native_sidecar);
}

#[test]
fn wrapper_as_processes() {
    in_namespaces("wrapper.yaml", play_wrapper);
}

// ------------------------------------------------------------ namespaces

/// The process-level runtime, for machines without podman: each container
/// is a process tree in PID and mount namespaces of its own (`unshare`), or
/// in the first container's when the pod shares one (`nsenter`), run as the
/// pod's user (`setpriv`). Mounts under /run are bind mounts on a private
/// tmpfs, as in the container; the other mount paths (/etc/envrender,
/// /envrender-bin) cannot be made without touching the host, so they are
/// replaced by the volume's directory in arguments and in the ConfigMap's
/// files. The envrender image's entrypoint is the binary under test; the app
/// image's /app/server is tests/deploy/app/server.
struct Namespaces<'p> {
    pod: &'p Pod,
    env: Vec<(String, String)>,
    logs: tempfile::TempDir,
    /// name → (the unshare/nsenter process, the container's main process)
    running: BTreeMap<String, (std::process::Child, i32)>,
    /// The main process of the first container, whose namespaces the
    /// others join when the pod shares its PID namespace.
    first: Option<i32>,
}

impl<'p> Namespaces<'p> {
    fn new(pod: &'p Pod, backends: &Backends) -> Self {
        let ns = Namespaces {
            pod,
            env: backends.env(),
            logs: tempfile::tempdir().unwrap(),
            running: BTreeMap::new(),
            first: None,
        };
        let config = pod.volume("envrender-config");
        for entry in std::fs::read_dir(config).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, ns.host_paths(&text)).unwrap();
        }
        ns
    }

    /// Mounts outside /run, by the path of the volume's directory: an
    /// argument that starts with one, or a quoted path in a file.
    fn host_paths(&self, text: &str) -> String {
        let mut text = text.to_string();
        for c in self.pod.init.iter().chain(&self.pod.app) {
            for (volume, path, _) in c.mounts.iter().filter(|m| !m.1.starts_with("/run/")) {
                let host = self.pod.volume(volume).display().to_string();
                text = text.replace(&format!("\"{path}/"), &format!("\"{host}/"));
                if let Some(rest) = text.strip_prefix(path.as_str())
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    text = format!("{host}{rest}");
                }
            }
        }
        text
    }

    /// An argument, with the images' programs and the mounts outside /run
    /// replaced by where they are on the host.
    fn program(&self, arg: &str) -> String {
        match arg {
            "/envrender" | "/app/server" => images_as_files().join(&arg[1..]).display().to_string(),
            a => self.host_paths(a),
        }
    }

    /// The shell script that sets the container's mounts up and execs its
    /// process as the pod's user.
    fn script(&self, c: &Container, new_mounts: bool) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let mut lines = vec!["set -e".to_string()];
        if new_mounts {
            lines.push("mount -t tmpfs -o mode=755 tmpfs /run".into());
        }
        if let Some(token) = self.pod.token.as_ref().filter(|_| new_mounts) {
            lines.push(format!(
                "mkdir -p {dir} && touch {SERVICE_ACCOUNT_TOKEN} && mount --bind {} {SERVICE_ACCOUNT_TOKEN}",
                quote(&token.display().to_string()),
                dir = Path::new(SERVICE_ACCOUNT_TOKEN).parent().unwrap().display()
            ));
        }
        // A container joining the pod's namespaces finds its volumes
        // mounted already (the pod's mount namespace is shared here).
        for (volume, path, ro) in c.mounts.iter().filter(|_| new_mounts) {
            if path.starts_with("/run/") {
                let host = quote(&self.pod.volume(volume).display().to_string());
                lines.push(format!("mkdir -p {path} && mount --bind {host} {path}"));
                if *ro {
                    lines.push(format!("mount -o remount,bind,ro {path}"));
                }
            }
        }
        let entrypoint = if c.command.is_empty() {
            assert_eq!(c.image, ENVRENDER_IMAGE, "{}: no command", c.name);
            vec!["/envrender".to_string()]
        } else {
            c.command.clone()
        };
        let argv: Vec<String> = entrypoint
            .iter()
            .chain(&c.args)
            .map(|a| self.program(a))
            .collect();
        lines.push(format!(
            "exec setpriv --reuid={UID} --regid={UID} --clear-groups --no-new-privs -- {}",
            argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
        ));
        lines.join("\n")
    }

    fn launch(&mut self, c: &Container) -> String {
        let name = c.name.clone();
        let join = self.first.filter(|_| self.pod.share_pid);
        let mut cmd = match join {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["--target", &pid.to_string(), "--pid", "--mount", "--"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--pid", "--fork", "--mount-proc", "--mount", "--"]);
                cmd
            }
        };
        cmd.args(["sh", "-c", &self.script(c, join.is_none())]);
        let env = with_cluster_env(&c.env, &self.env);
        let log = std::fs::File::create(self.logs.path().join(&name)).unwrap();
        let child = cmd
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare/nsenter (util-linux)");
        // The container's main process: the launcher's child.
        let children = format!("/proc/{0}/task/{0}/children", child.id());
        let started = Instant::now();
        let main = loop {
            if let Some(pid) = std::fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse().ok())
            {
                break pid;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name} did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.first.get_or_insert(main);
        self.running.insert(name.clone(), (child, main));
        name
    }

    fn wait(&mut self, name: &str, within: Duration) -> Option<i32> {
        let (child, _) = self.running.get_mut(name).unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            if started.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The images' programs where the pod's user can run them: the build
/// directory may sit in root's home.
fn images_as_files() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("envrender");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_envrender"), &bin).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_envrender"), &bin).unwrap();
        }
        std::fs::copy(
            support::repo().join("tests/deploy/app/server"),
            dir.path().join("server"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::rename(dir.path().join("server"), dir.path().join("app/server")).unwrap();
        for p in [dir.path().join("app"), dir.path().join("app/server"), bin] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    })
    .path()
}

impl Runtime for Namespaces<'_> {
    fn run_to_end(&mut self, c: &Container) -> String {
        let name = self.launch(c);
        let code = self.wait(&name, Duration::from_secs(60));
        let logs = self.logs(&name);
        assert_eq!(code, Some(0), "{name} failed:\n{logs}");
        // An init container's namespaces end with it.
        if self.first == Some(self.running[&name].1) {
            self.first = None;
        }
        logs
    }

    fn start(&mut self, c: &Container) -> String {
        self.launch(c)
    }

    fn running(&self, name: &str) -> bool {
        Path::new(&format!("/proc/{}", self.running[name].1)).exists()
    }

    fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default()
    }

    fn zombies(&self, name: &str) -> usize {
        // Every process of the namespace descends from its PID 1, the
        // container's main process here.
        let pid_1 = self.running[name].1;
        let mut zombies = 0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            if field("PPid:") == pid_1.to_string() && field("State:").starts_with('Z') {
                zombies += 1;
            }
        }
        zombies
    }

    fn exec_ok(&self, name: &str, argv: &[String]) -> bool {
        let argv: Vec<String> = argv.iter().map(|a| self.program(a)).collect();
        Command::new("nsenter")
            .args([
                "--target",
                &self.running[name].1.to_string(),
                "--pid",
                "--mount",
                "--",
            ])
            // As the container's user, as `podman exec` runs.
            .args([
                "setpriv",
                &format!("--reuid={UID}"),
                &format!("--regid={UID}"),
            ])
            .args(["--clear-groups", "--"])
            .args(argv)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn pid_1(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.running[name].1))
            .unwrap()
            .trim()
            .to_string()
    }

    fn stop(&mut self, name: &str, grace: u32) -> i32 {
        let main = nix::unistd::Pid::from_raw(self.running[name].1);
        let _ = nix::sys::signal::kill(main, nix::sys::signal::Signal::SIGTERM);
        if let Some(code) = self.wait(name, Duration::from_secs(grace.into())) {
            return code;
        }
        let _ = nix::sys::signal::kill(main, nix::sys::signal::Signal::SIGKILL);
        self.wait(name, Duration::from_secs(10)).unwrap()
    }
}

impl Drop for Namespaces<'_> {
    fn drop(&mut self) {
        for (child, main) in self.running.values_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*main),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
