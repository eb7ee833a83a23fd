#!/usr/bin/env python3
"""Checks every deployment file in deploy/ offline.

- Kubernetes manifests: kubernetes-validate --strict against every
  Kubernetes version from 1.29 to the newest it knows, plus what the schema cannot see
  (restartPolicy only on init containers, mounts name declared volumes,
  probes ask envrender's own paths on its --listen port, the ConfigMap holds
  every template its configuration names, hardened security contexts, a
  shared PID namespace wherever envrender signals a process by name).
- ECS task definitions: botocore's RegisterTaskDefinition model (types and
  required fields, then every enum value), plus dependsOn/mount/health-check
  consistency, a CPU architecture stated, and every volume envrender writes
  declared as a VOLUME of the ECS image (ECS takes a volume's owner from the
  image only there).
- The Terraform example: parsed with python-hcl2; its task definition is
  the JSON one (read with jsondecode), its CPU architecture a variable whose
  default is the JSON's, and the files it reads exist.
- IAM policies: JSON, no wildcard action, "Resource": "*" only for actions
  that have no resource-level permissions.

Usage: python3 deploy/validate.py [--self-test]
Needs: pip install kubernetes-validate==1.37.0 python-hcl2==8.1.4 botocore==1.44.5
--self-test breaks each rule once in memory and fails unless every break is
reported.
"""

import copy
import json
import pathlib
import re
import sys
import tomllib

import botocore.session
import botocore.validate
import hcl2
import kubernetes_validate
import kubernetes_validate.utils
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
# Every Kubernetes version from 1.29 (the first with native sidecars on by
# default: restartPolicy on init containers) to the newest the validator knows.
KUBERNETES_VERSIONS = sorted(
    {v for v in kubernetes_validate.utils.all_versions() if tuple(map(int, v.split("."))) >= (1, 29)},
    key=lambda v: tuple(map(int, v.split("."))),
)
# Where every pattern mounts the configuration (ConfigMap, or the ECS image).
CONFIG_MOUNT = "/etc/envrender"
ENVRENDER_PATHS = {"/healthz", "/readyz", "/metrics"}
ENVRENDER_COMMANDS = {"get", "render", "check", "watch", "run", "copy", "probe"}
# Actions that cannot be scoped to a resource (the IAM service authorisation
# reference lists no resource type for them).
NO_RESOURCE_LEVEL = {"ecr:GetAuthorizationToken", "secretsmanager:BatchGetSecretValue"}
# The image deploy/ecs/Containerfile builds, as the task definitions name it.
ECS_IMAGE = "app-envrender"


def image_name(container):
    """The image's repository name without registry or tag: app-envrender."""
    return container.get("image", "").rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def containerfile_volumes(text):
    """The paths of every VOLUME instruction (JSON or shell form) of a Containerfile."""
    paths = set()
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0].upper() == "VOLUME":
            rest = words[1].strip()
            paths.update(json.loads(rest) if rest.startswith("[") else rest.split())
    return paths


class Problems(list):
    def add(self, where, message):
        self.append(f"{where}: {message}")


def flag(args, name):
    """The value of `--name VALUE` in an argv, or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def envrender_argv(container):
    """envrender's own arguments when this container runs envrender, else None.
    Kubernetes: command + args; ECS: entryPoint + command."""
    if "entryPoint" in container:
        argv = list(container["entryPoint"]) + list(container.get("command") or [])
    else:
        argv = list(container.get("command") or []) + list(container.get("args") or [])
    if argv and argv[0].endswith("/envrender"):
        return argv[1:]
    image = container.get("image", "").rsplit("/", 1)[-1]
    if "envrender" in image and not (container.get("command") or [""])[0].startswith("/"):
        # The image's entrypoint is envrender; these are its arguments.
        return argv
    return None


def listen_port(args):
    listen = flag(args, "--listen")
    return int(listen.rsplit(":", 1)[1]) if listen else None


# ---------------------------------------------------------------- Kubernetes


def check_kubernetes(docs, problems):
    """docs: {file name: [resources]}"""
    for name, resources in docs.items():
        for r in resources:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(r, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    problems.add(name, f"Kubernetes {version}: {path}: {e.message}")
    by_kind = {}
    for resources in docs.values():
        for r in resources:
            by_kind.setdefault(r["kind"], {})[r["metadata"]["name"]] = r
    for name, resources in docs.items():
        for r in resources:
            if r["kind"] == "ConfigMap":
                check_configmap(name, r, problems)
            if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                template = r["spec"]["template"]
                check_pod(name, template["spec"], by_kind, problems, template.get("metadata", {}))


def check_configmap(name, cm, problems):
    data = cm.get("data", {})
    if "envrender.toml" not in data:
        return
    try:
        config = tomllib.loads(data["envrender.toml"])
    except tomllib.TOMLDecodeError as e:
        problems.add(name, f"envrender.toml is not TOML: {e}")
        return
    for t in config.get("template", []):
        # Relative paths are taken from the working directory: name the mount.
        directory, _, key = t["source"].rpartition("/")
        if directory != CONFIG_MOUNT or key not in data:
            problems.add(name, f"template source {t['source']!r} is not a key of the ConfigMap under {CONFIG_MOUNT}")


def check_pod(name, pod, by_kind, problems, metadata=None):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    used = set()
    sa = pod.get("serviceAccountName")
    if sa and sa not in by_kind.get("ServiceAccount", {}):
        problems.add(name, f"serviceAccountName {sa!r} is not defined in deploy/kubernetes")
    pod_sc = pod.get("securityContext", {})
    if not pod_sc.get("runAsNonRoot"):
        problems.add(name, "the pod does not set securityContext.runAsNonRoot: true")
    for kind in ("initContainers", "containers"):
        for c in pod.get(kind, []):
            where = f"{name}: {kind} {c['name']}"
            if "restartPolicy" in c and kind != "initContainers":
                problems.add(where, "restartPolicy is for init containers (native sidecars) only")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.add(where, "allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.add(where, "readOnlyRootFilesystem is not true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.add(where, "capabilities are not dropped (drop: [ALL])")
            if sc.get("capabilities", {}).get("add"):
                problems.add(where, "adds capabilities")
            for m in c.get("volumeMounts", []):
                used.add(m["name"])
                if m["name"] not in volumes:
                    problems.add(where, f"mounts volume {m['name']!r}, which the pod does not declare")
                    continue
                cm = volumes[m["name"]].get("configMap")
                if cm and cm["name"] not in by_kind.get("ConfigMap", {}) and not cm.get("optional"):
                    problems.add(where, f"ConfigMap {cm['name']!r} is not defined in deploy/kubernetes")
            args = envrender_argv(c)
            if args is None:
                continue
            if not args or args[0] not in ENVRENDER_COMMANDS and args[0] != "--":
                problems.add(where, f"runs envrender with {args[:1]}, not one of its commands")
            if flag(args, "--process-name") and not pod.get("shareProcessNamespace"):
                problems.add(where, "--process-name needs shareProcessNamespace: true")
            if args and args[0] == "watch" and kind == "initContainers" and c.get("restartPolicy") != "Always":
                problems.add(where, "watch as an init container needs restartPolicy: Always (native sidecar)")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe_kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_kind, {}).get("httpGet")
                if not probe:
                    continue
                if probe["path"] not in ENVRENDER_PATHS:
                    problems.add(where, f"{probe_kind} asks {probe['path']}, which envrender does not serve")
                port = ports.get(probe["port"], probe["port"])
                if port != listen_port(args):
                    problems.add(where, f"{probe_kind} asks port {port}, envrender listens on {flag(args, '--listen')}")
    for unused in set(volumes) - used:
        problems.add(name, f"volume {unused!r} is declared but mounted nowhere")
    check_credentials(name, pod, by_kind, problems, metadata or {})


def check_credentials(name, pod, by_kind, problems, metadata):
    """envrender's credentials reach envrender's containers only: no
    automatic service-account token, a projected one for Vault (its own
    audience, short-lived) mounted where envrender runs, and IRSA's
    credentials kept from every other container."""
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    runs_envrender = {c["name"] for c in containers if envrender_argv(c) is not None}
    if not runs_envrender:
        return
    if pod.get("automountServiceAccountToken") is not False:
        problems.add(
            name,
            "the service-account token is mounted into every container: set automountServiceAccountToken: false"
            " and mount a projected token (audience vault) into envrender's",
        )
    for v in pod.get("volumes", []):
        for source in v.get("projected", {}).get("sources", []):
            token = source.get("serviceAccountToken")
            if token is None:
                continue
            if not token.get("audience"):
                problems.add(name, f"volume {v['name']}: the projected token has no audience (it would be the API server's)")
            if token.get("expirationSeconds", 3607) > 3600:
                problems.add(name, f"volume {v['name']}: the projected token lives longer than an hour")
            for c in containers:
                mounted = any(m["name"] == v["name"] for m in c.get("volumeMounts", []))
                if mounted and c["name"] not in runs_envrender:
                    problems.add(name, f"volume {v['name']}: the Vault token is mounted into {c['name']}, which does not run envrender")
    account = by_kind.get("ServiceAccount", {}).get(pod.get("serviceAccountName"), {})
    if "eks.amazonaws.com/role-arn" in account.get("metadata", {}).get("annotations", {}):
        skipped = {
            n.strip()
            for n in metadata.get("annotations", {}).get("eks.amazonaws.com/skip-containers", "").split(",")
            if n.strip()
        }
        for c in containers:
            if c["name"] not in runs_envrender and c["name"] not in skipped:
                problems.add(
                    name,
                    f"IRSA gives {c['name']} envrender's AWS role: list it in the pod template's"
                    " eks.amazonaws.com/skip-containers annotation",
                )


# ---------------------------------------------------------------------- ECS


def enum_problems(value, shape, path):
    """Enum values botocore's ParamValidator does not check."""
    if shape.type_name == "structure" and isinstance(value, dict):
        for k, v in value.items():
            if k in shape.members:
                yield from enum_problems(v, shape.members[k], f"{path}.{k}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, v in enumerate(value):
            yield from enum_problems(v, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for k, v in value.items():
            yield from enum_problems(v, shape.value, f"{path}.{k}")
    elif getattr(shape, "enum", None) and value not in shape.enum:
        yield f"{path}: {value!r} is not one of {sorted(shape.enum)}"


def check_ecs(name, task, volumes_declared, problems):
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = botocore.validate.ParamValidator().validate(task, shape)
    if report.has_errors():
        for line in report.generate_report().splitlines():
            problems.add(name, line.strip())
    for p in enum_problems(task, shape, "task"):
        problems.add(name, p)
    containers = {c["name"]: c for c in task.get("containerDefinitions", [])}
    volumes = {v["name"] for v in task.get("volumes", [])}
    if not any(c.get("essential", True) for c in containers.values()):
        problems.add(name, "no container is essential")
    if "cpuArchitecture" not in task.get("runtimePlatform", {}):
        problems.add(name, "runtimePlatform.cpuArchitecture is not set (ECS would choose X86_64): state ARM64 or X86_64")
    for c in containers.values():
        where = f"{name}: container {c['name']}"
        if "essential" not in c:
            problems.add(where, "essential is not set (it defaults to true): choose it")
        for m in c.get("mountPoints", []):
            if m["sourceVolume"] not in volumes:
                problems.add(where, f"mounts {m['sourceVolume']!r}, which the task does not declare")
            if m.get("readOnly") or "envrender" not in image_name(c):
                continue
            if image_name(c) != ECS_IMAGE:
                problems.add(
                    where,
                    f"writes {m['containerPath']} from {image_name(c)}, which declares no VOLUME there:"
                    f" ECS would make the volume root's; use the {ECS_IMAGE} image (deploy/ecs/Containerfile)",
                )
            elif m["containerPath"] not in volumes_declared:
                problems.add(
                    where,
                    f"writes {m['containerPath']}, which deploy/ecs/Containerfile does not declare as a VOLUME:"
                    " ECS would make the volume root's",
                )
        for d in c.get("dependsOn", []):
            target = containers.get(d["containerName"])
            if target is None:
                problems.add(where, f"depends on {d['containerName']!r}, which the task does not define")
            elif d["condition"] == "HEALTHY" and "healthCheck" not in target:
                problems.add(where, f"waits for {d['containerName']} HEALTHY, which has no healthCheck")
            elif d["condition"] in ("COMPLETE", "SUCCESS") and target.get("essential", True):
                problems.add(where, f"waits for {d['containerName']} to exit, but it is essential")
        if not c.get("readonlyRootFilesystem"):
            problems.add(where, "readonlyRootFilesystem is not true")
        if c.get("privileged"):
            problems.add(where, "is privileged")
        args = envrender_argv(c)
        if args is None:
            continue
        if flag(args, "--process-name") and task.get("pidMode") != "task":
            problems.add(where, "--process-name needs pidMode: task")
        health = c.get("healthCheck", {}).get("command", [])
        if health:
            if health[0] != "CMD" or not health[1].endswith("/envrender") or health[2] != "probe":
                problems.add(where, f"health check {health} is not `envrender probe` (the image has no shell or curl)")
            elif health[3:4] and health[3].rsplit(":", 1)[-1] != str(listen_port(args)):
                problems.add(where, f"health check asks {health[3]}, envrender listens on {flag(args, '--listen')}")


def check_terraform(name, text, json_arch, problems):
    try:
        tf = hcl2.loads(text)
    except Exception as e:  # python-hcl2 raises lark errors of several kinds
        problems.add(name, f"does not parse: {e}")
        return
    tasks = [
        body
        for r in tf.get("resource", [])
        for kind, named in r.items()
        if kind.strip('"') == "aws_ecs_task_definition"
        for body in named.values()
    ]
    if not tasks:
        problems.add(name, "defines no aws_ecs_task_definition")
    for t in tasks:
        # Every setting of the task comes from the JSON task definition
        # (local.task), so the two cannot drift apart.
        for key in ("family", "network_mode", "pid_mode", "cpu", "memory", "requires_compatibilities"):
            if "local.task." not in str(t.get(key, "")):
                problems.add(name, f"aws_ecs_task_definition: {key} is not taken from the JSON task definition")
        if "local.task.containerDefinitions" not in t.get("container_definitions", ""):
            problems.add(name, "container_definitions are not the JSON task definition's")
        platform = (t.get("runtime_platform") or [{}])[0]
        if "var.cpu_architecture" not in str(platform.get("cpu_architecture", "")):
            problems.add(name, "aws_ecs_task_definition: cpu_architecture is not the variable cpu_architecture")
    variables = {k.strip('"'): v for block in tf.get("variable", []) for k, v in block.items()}
    arch = variables.get("cpu_architecture")
    if arch is None:
        problems.add(name, "declares no variable cpu_architecture")
    else:
        default = str(arch.get("default")).strip('"')
        if default != json_arch:
            problems.add(name, f"cpu_architecture defaults to {default!r}, the JSON task definition says {json_arch!r}")
        condition = str(arch.get("validation", [{}])[0].get("condition", ""))
        if not all(a in condition for a in ("ARM64", "X86_64")):
            problems.add(name, "cpu_architecture's validation does not allow ARM64 and X86_64")
    providers = [
        p for block in tf.get("terraform", []) for p in block.get("required_providers", []) if "aws" in p
    ]
    if not providers or "hashicorp/aws" not in str(providers[0]["aws"]):
        problems.add(name, "does not pin its AWS provider (terraform.required_providers.aws)")
    # Every role ECS assumes is bound to this account's tasks.
    for doc in tf.get("data", []):
        for kind, named in doc.items():
            if kind.strip('"') != "aws_iam_policy_document":
                continue
            for doc_name, body in named.items():
                for st in body.get("statement", []):
                    principals = str(st.get("principals", ""))
                    if "ecs-tasks.amazonaws.com" not in principals:
                        continue
                    variables = {str(c.get("variable", "")).strip('"') for c in st.get("condition", [])}
                    for key in ("aws:SourceAccount", "aws:SourceArn"):
                        if key not in variables:
                            problems.add(name, f"{doc_name.strip(chr(34))}: ecs-tasks may assume the role without an {key} condition")
    if 'jsondecode(file("${path.module}/sidecar-task-definition.json"))' not in text:
        problems.add(name, "does not read sidecar-task-definition.json")
    for f in re.findall(r'file\(\\?"\$\{path\.module\}/([^"\\]+)', text):
        if not (DEPLOY / "ecs" / f).is_file():
            problems.add(name, f"reads {f}, which is not in deploy/ecs")


# ---------------------------------------------------------------------- IAM


def check_policy(name, policy, problems):
    if policy.get("Version") != "2012-10-17":
        problems.add(name, 'Version is not "2012-10-17"')
    for s in policy.get("Statement", []):
        where = f"{name}: statement {s.get('Sid', '?')}"
        actions = s.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        if not actions:
            problems.add(where, "has no Action")
        for a in actions:
            if "*" in a:
                problems.add(where, f"action {a!r} is a wildcard")
        if s.get("Effect") != "Allow":
            continue
        resources = s.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if "*" in resources and not set(actions) <= NO_RESOURCE_LEVEL:
            problems.add(where, f'"Resource": "*" for {sorted(set(actions) - NO_RESOURCE_LEVEL)}')
        if "NotAction" in s or "NotResource" in s:
            problems.add(where, "uses NotAction/NotResource")


# ---------------------------------------------------------------------- all


def load():
    k8s = {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    }
    ecs = {p.name: json.loads(p.read_text()) for p in sorted((DEPLOY / "ecs").glob("*task-definition.json"))}
    policies = {
        str(p.relative_to(DEPLOY)): json.loads(p.read_text())
        for p in sorted(DEPLOY.glob("*/*.json"))
        if "Statement" in p.read_text()
    }
    tf = {p.name: p.read_text() for p in sorted((DEPLOY / "ecs").glob("*.tf"))}
    containerfile = (DEPLOY / "ecs" / "Containerfile").read_text()
    return k8s, ecs, policies, tf, containerfile


def check(k8s, ecs, policies, tf, containerfile):
    problems = Problems()
    check_kubernetes(k8s, problems)
    volumes = containerfile_volumes(containerfile)
    for name, task in ecs.items():
        check_ecs(name, task, volumes, problems)
    for name, policy in policies.items():
        check_policy(name, policy, problems)
    sidecar_arch = ecs["sidecar-task-definition.json"].get("runtimePlatform", {}).get("cpuArchitecture")
    for name, text in tf.items():
        check_terraform(name, text, sidecar_arch, problems)
    # The ECS sidecar's template is the ConfigMap's, so both platforms render
    # the same app.conf.
    cm = next(r for r in k8s["configmap.yaml"] if r["kind"] == "ConfigMap")
    if (DEPLOY / "ecs" / "app.conf.hbs").read_text() != cm["data"]["app.conf.hbs"]:
        problems.add("ecs/app.conf.hbs", "differs from app.conf.hbs in kubernetes/configmap.yaml")
    return problems


def self_test(k8s, ecs, policies, tf, cf):
    """Each break must be reported by the check meant for it."""

    def pod(docs, file):
        return next(r for r in docs[file] if r["kind"] == "Deployment")["spec"]["template"]["spec"]

    def breaks():
        d = copy.deepcopy(k8s)
        pod(d, "sidecar.yaml")["containers"][0]["restartPolicy"] = "Always"
        yield "restartPolicy", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        pod(d, "init-container.yaml")["containers"][0]["volumeMounts"][0]["name"] = "nowhere"
        yield "does not declare", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        pod(d, "sidecar.yaml")["initContainers"][0]["startupProbe"]["httpGet"]["path"] = "/ready"
        yield "does not serve", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        pod(d, "sidecar.yaml")["initContainers"][0]["securityContext"]["privileged"] = "yes"
        yield "Kubernetes 1.29.0", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        pod(d, "sidecar.yaml")["initContainers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
        yield "Additional properties", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        del pod(d, "sidecar.yaml")["automountServiceAccountToken"]
        yield "set automountServiceAccountToken: false", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        pod(d, "sidecar.yaml")["containers"][0]["volumeMounts"].append({"name": "vault-token", "mountPath": "/t"})
        yield "the Vault token is mounted into app", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        del pod(d, "init-container.yaml")["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
        yield "has no audience", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        next(r for r in d["init-container.yaml"] if r["kind"] == "Deployment")["spec"]["template"]["metadata"]["annotations"] = {}
        yield "IRSA gives app envrender's AWS role", (d, ecs, policies, tf, cf)
        d = copy.deepcopy(k8s)
        del pod(d, "sidecar.yaml")["shareProcessNamespace"]
        yield "shareProcessNamespace", (d, ecs, policies, tf, cf)
        e = copy.deepcopy(ecs)
        e["sidecar-task-definition.json"]["pidMode"] = "shared"
        yield "is not one of", (k8s, e, policies, tf, cf)
        e = copy.deepcopy(ecs)
        e["sidecar-task-definition.json"]["containerDefinitions"][0]["memory"] = "64"
        yield "Invalid type", (k8s, e, policies, tf, cf)
        e = copy.deepcopy(ecs)
        del e["sidecar-task-definition.json"]["containerDefinitions"][0]["healthCheck"]
        yield "has no healthCheck", (k8s, e, policies, tf, cf)
        p = copy.deepcopy(policies)
        p["ecs/task-role-policy.json"]["Statement"][0]["Action"] = "ssm:*"
        yield "wildcard", (k8s, ecs, p, tf, cf)
        for before, after, expected in [
            ("= local.task.pidMode", '= "task"', "pid_mode"),
            ('default     = "ARM64"', 'default     = "X86_64"', "cpu_architecture defaults to 'X86_64'"),
            ("= var.cpu_architecture", "= local.task.runtimePlatform.cpuArchitecture", "is not the variable cpu_architecture"),
            ('"aws:SourceArn"', '"aws:PrincipalArn"', "without an aws:SourceArn condition"),
            ('"hashicorp/aws"', '"example/aws"', "does not pin its AWS provider"),
        ]:
            yield expected, (k8s, ecs, policies, {**tf, "sidecar.tf": tf["sidecar.tf"].replace(before, after)}, cf)
        yield "does not parse", (k8s, ecs, policies, {**tf, "sidecar.tf": tf["sidecar.tf"] + "\nresource {\n"}, cf)
        e = copy.deepcopy(ecs)
        del e["wrapper-task-definition.json"]["runtimePlatform"]["cpuArchitecture"]
        yield "cpuArchitecture is not set", (k8s, e, policies, tf, cf)
        e = copy.deepcopy(ecs)
        e["wrapper-task-definition.json"]["containerDefinitions"][0]["image"] = "registry.example.com/envrender:0.1.0"
        yield "which declares no VOLUME there", (k8s, e, policies, tf, cf)
        yield "does not declare as a VOLUME", (k8s, ecs, policies, tf, cf.replace(', "/envrender-bin"]', "]"))

    def sound():
        """Variants that are as good as the files: nothing may be reported."""
        e = copy.deepcopy(ecs)
        for task in e.values():
            for c in task["containerDefinitions"]:
                if image_name(c) == ECS_IMAGE:
                    c["image"] = c["image"].split(":")[0] + "@sha256:" + "0" * 64
        yield "a digest-pinned ECS image", (k8s, e, policies, tf, cf)
        shell_form = cf.replace('VOLUME ["/run/app", "/run/envrender", "/envrender-bin"]', "VOLUME /run/app /run/envrender /envrender-bin")
        yield "shell-form VOLUME", (k8s, ecs, policies, tf, shell_form)

    missed = []
    for what, inputs in sound():
        try:
            found = check(*inputs)
        except Exception as e:  # a crash is a false report too
            found = [f"{type(e).__name__}: {e}"]
        if found:
            missed.append(f"{what}: reported {found}")
    for expected, inputs in breaks():
        found = check(*inputs)
        if not any(expected in p for p in found):
            missed.append(f"{expected!r} not reported; got {found}")
    return missed


def main():
    inputs = load()
    problems = check(*inputs)
    for p in problems:
        print(p)
    if "--self-test" in sys.argv[1:]:
        missed = self_test(*inputs)
        for m in missed:
            print(f"self-test: {m}")
        problems += missed
    counts = (len(inputs[0]), len(inputs[1]), len(inputs[2]), len(inputs[3]))
    print(
        f"{'FAILED' if problems else 'ok'}: {counts[0]} Kubernetes files ({', '.join(KUBERNETES_VERSIONS)}),"
        f" {counts[1]} ECS task definitions, {counts[2]} IAM policies, {counts[3]} Terraform files"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
