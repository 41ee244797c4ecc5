"""cluster/: every manifest parses and agrees with the project (no Kubernetes or Docker needed).

The checks are functions returning a list of problems, so each one is also run on a deliberately
broken copy: a check that cannot fail proves nothing. The last part checks what SECURITY.md
promises of the deployment files: Ray token auth, loopback dashboards, MLflow credentials only in
the training job (cluster/submit.sh), the AWS launcher's AMI / IAM / env file, .dockerignore.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
STORAGE_FLAGS = ("--input", "--output", "--data", "--storage-path")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|_KEY$|STORE_URI|DATABASE_URI)", re.I)


# ---------------------------------------------------------------------------------------- pins
@functools.cache
def pins() -> dict[str, str]:
    """name (with extras stripped) -> exact version, from pyproject.toml (single source of truth)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out = {}
    for req in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^;\s]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def python_tag() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    major, minor = re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups()
    return f"py{major}{minor}"


def test_pins_are_read_from_pyproject():
    p = pins()
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["ray"]), p
    assert {"torch", "mlflow", "onnxruntime-gpu"} <= set(p)


# ------------------------------------------------------------------------------------- loading
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.cache
def all_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(REPO)), d) for p in YAML_FILES for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in all_docs() if d.get("kind") == kind]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for d in docs:
        assert isinstance(d, dict)


def test_expected_manifests_exist():
    kinds = {d.get("kind") for _, d in all_docs()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    assert len(docs_of_kind("RayJob")) >= 2
    assert (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "README.md").is_file()
    assert (CLUSTER / "runtime_env.yaml").is_file()
    assert any("available_node_types" in d for _, d in all_docs()), "no Ray cluster launcher YAML"


# ----------------------------------------------------------------------------- KubeRay checks
def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = [(f"{f}:{d['metadata']['name']}", d["spec"]) for f, d in docs_of_kind("RayCluster")]
    out += [(f"{f}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for f, d in docs_of_kind("RayJob")
            if "rayClusterSpec" in d["spec"]]
    return out


def _gpu_limit(container: dict) -> float:
    res = container.get("resources", {})
    return float(res.get("limits", {}).get("nvidia.com/gpu", 0) or 0)


def check_ray_cluster_spec(spec: dict, ray_version: str) -> list[str]:
    problems = []
    if str(spec.get("rayVersion")) != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != pinned ray {ray_version}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    head = spec["headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("head should schedule no work (rayStartParams num-cpus: '0')")
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    gpu_groups = 0
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            image = c["image"]
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag.startswith(ray_version):
                problems.append(f"{name}: image {image} tag does not carry ray {ray_version}")
        if name == "head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        replicas = group.get("replicas", lo)
        if lo is None or hi is None or not (0 <= lo <= replicas <= hi) or hi < 1:
            problems.append(f"{name}: autoscaling bounds min={lo} replicas={replicas} max={hi} invalid")
        limits = [_gpu_limit(c) for c in group["template"]["spec"]["containers"]]
        gpus = sum(limits)
        declared = float(group.get("rayStartParams", {}).get("num-gpus", gpus if gpus else 0))
        if "gpu" in name.lower():
            gpu_groups += 1
            if gpus < 1:
                problems.append(f"{name}: a GPU group without limits nvidia.com/gpu >= 1")
            tol = group["template"]["spec"].get("tolerations", [])
            if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
                problems.append(f"{name}: no toleration for the nvidia.com/gpu taint")
        if declared != gpus:
            problems.append(f"{name}: rayStartParams num-gpus {declared} != nvidia.com/gpu limit {gpus}")
    if gpu_groups == 0:
        problems.append("no GPU worker group")
    return problems


def test_kuberay_specs_match_pins_and_request_gpus():
    specs = ray_cluster_specs()
    assert len(specs) >= 3  # the RayCluster and both RayJobs
    for where, spec in specs:
        assert check_ray_cluster_spec(spec, pins()["ray"]) == [], where


def test_kuberay_check_catches_broken_specs():
    where, spec = ray_cluster_specs()[0]
    ray_version = pins()["ray"]
    gpu = next(g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"])

    broken = copy.deepcopy(spec)
    broken["rayVersion"] = "2.9.0"
    assert any("rayVersion" in p for p in check_ray_cluster_spec(broken, ray_version))

    broken = copy.deepcopy(spec)
    g = next(x for x in broken["workerGroupSpecs"] if x["groupName"] == gpu["groupName"])
    g["rayStartParams"]["num-gpus"] = "2"
    assert any("num-gpus" in p for p in check_ray_cluster_spec(broken, ray_version))

    broken = copy.deepcopy(spec)
    g = next(x for x in broken["workerGroupSpecs"] if x["groupName"] == gpu["groupName"])
    for c in g["template"]["spec"]["containers"]:
        c["resources"]["limits"].pop("nvidia.com/gpu")
    g["template"]["spec"].pop("tolerations")
    found = check_ray_cluster_spec(broken, ray_version)
    assert any("nvidia.com/gpu >= 1" in p for p in found) and any("toleration" in p for p in found)

    broken = copy.deepcopy(spec)
    broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.59.0-gpu"
    broken["workerGroupSpecs"][0]["minReplicas"] = 5
    broken["workerGroupSpecs"][0]["maxReplicas"] = 1
    found = check_ray_cluster_spec(broken, ray_version)
    assert any("tag" in p for p in found) and any("bounds" in p for p in found)


# ------------------------------------------------------------------------ entry points & flags
@functools.cache
def job_flags(script: str) -> frozenset[str]:
    """Every --flag that `python jobs/X.py --help` documents."""
    out = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out.stdout))


def check_command(cmd: str, where: str, check_flags: bool = True) -> list[str]:
    """`python jobs/X.py --flag value ...`: the script exists, its flags exist, storage is shared."""
    from pipeline.storage import is_shared_path

    tokens = shlex.split(cmd)
    scripts = [t for t in tokens if t.endswith(".py")]
    if not scripts:
        return [f"{where}: no python script in {cmd!r}"]
    script = scripts[0]
    problems = []
    if not re.fullmatch(r"jobs/[A-Za-z0-9_]+\.py", script) or not (REPO / script).is_file():
        return [f"{where}: entrypoint {script} is not an existing jobs/*.py"]
    args = tokens[tokens.index(script) + 1:]
    if check_flags and "..." not in args:
        known = job_flags(script)
        for a in args:
            if a.startswith("--") and a.split("=", 1)[0] not in known:
                problems.append(f"{where}: {script} has no flag {a}")
    for i, a in enumerate(args[:-1]):
        if a in STORAGE_FLAGS and not is_shared_path(args[i + 1]):
            problems.append(f"{where}: {a} {args[i + 1]} is not storage every node sees")
    return problems


def rayjob_entrypoints() -> list[tuple[str, str]]:
    return [(f"{f}:{d['metadata']['name']}", d["spec"]["entrypoint"]) for f, d in docs_of_kind("RayJob")]


def readme_commands() -> list[str]:
    """Every `python jobs/...` command of cluster/README.md (shell continuations joined)."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return [m.group(0).strip() for m in re.finditer(r"python jobs/\S+\.py[^\n`]*", text)]


def test_rayjob_entrypoints_run_existing_jobs_with_real_flags(monkeypatch):
    monkeypatch.setenv("HMHN_SHARED_PATHS", "/mnt/shared")  # as on every pod
    entries = rayjob_entrypoints()
    assert {Path(shlex.split(e)[1]).name for _, e in entries} >= {"preprocess.py", "train_ddp.py"}
    for where, entry in entries:
        assert check_command(entry, where) == [], entry


def test_readme_commands_run_existing_jobs_with_real_flags(monkeypatch):
    monkeypatch.setenv("HMHN_SHARED_PATHS", "/mnt/shared")
    cmds = readme_commands()
    assert any("jobs/preprocess.py" in c for c in cmds) and any("jobs/train_ddp.py" in c for c in cmds)
    assert any(c.startswith("python jobs/preprocess.py") for c in cmds)
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray job submit", "--working-dir .", "ray job logs -f", "8265"):
        assert needle in text
    for cmd in cmds:
        assert check_command(cmd, "cluster/README.md") == [], cmd


def test_entrypoint_check_catches_mistakes(monkeypatch):
    monkeypatch.delenv("HMHN_SHARED_PATHS", raising=False)
    assert check_command("python jobs/nope.py --x 1", "t")
    assert check_command("python pipeline/storage.py", "t")
    assert any("no flag --outptu" in p for p in
               check_command("python jobs/preprocess.py --outptu s3://b/x", "t"))
    assert any("--output /data/faces" in p for p in
               check_command("python jobs/preprocess.py --output /data/faces", "t"))


# --------------------------------------------------------------------------------- runtime_env
def check_runtime_env(data: dict, where: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    problems = []
    public = {k for k in RuntimeEnv.known_fields if not k.startswith("_")}
    unknown = set(data) - public
    if unknown:
        problems.append(f"{where}: unknown runtime_env keys {sorted(unknown)}")
    try:
        RuntimeEnv(**data)  # ray's own type checks (env_vars must be Dict[str, str], ...)
    except Exception as exc:  # noqa: BLE001 - any rejection is a finding
        problems.append(f"{where}: RuntimeEnv rejects it: {exc}")
    excludes = " ".join(data.get("excludes", []))
    for must in (".venv", "data/", "mlruns"):
        if must not in excludes:
            problems.append(f"{where}: excludes lacks {must}")
    for name in data.get("env_vars", {}) or {}:
        if SECRET_NAME.search(name):
            problems.append(f"{where}: env var {name} looks like a secret; runtime_env is not secret")
    return problems


def runtime_envs() -> list[tuple[str, dict]]:
    out = [("cluster/runtime_env.yaml", yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))]
    for where, d in docs_of_kind("RayJob"):
        if "runtimeEnvYAML" in d["spec"]:
            out.append((where, yaml.safe_load(d["spec"]["runtimeEnvYAML"])))
    return out


def image_workdir() -> str:
    workdirs = [ln.split(None, 1)[1] for ln in dockerfile_logical_lines(CLUSTER / "Dockerfile")
                if ln.upper().startswith("WORKDIR ")]
    return workdirs[-1]


def test_runtime_envs_are_valid_and_secret_free():
    envs = runtime_envs()
    assert len(envs) >= 3
    for where, data in envs:
        data = dict(data)
        wd = data.get("working_dir", ".")
        if wd.startswith("/"):
            # a RayJob's working_dir is the code baked into the image: it must be the image's
            # WORKDIR; RuntimeEnv checks that a local working_dir exists, so validate the repo copy
            assert wd == image_workdir(), (where, wd)
        data["working_dir"] = str(REPO)
        assert check_runtime_env(data, where) == []


def test_runtime_env_check_catches_mistakes():
    _, good = runtime_envs()[0]
    assert any("unknown" in p for p in check_runtime_env({**good, "env_var": {}}, "t"))
    assert any("rejects" in p for p in check_runtime_env({**good, "env_vars": {"N": 1}}, "t"))
    assert any("secret" in p for p in
               check_runtime_env({**good, "env_vars": {"MLFLOW_TRACKING_PASSWORD": "x"}}, "t"))
    assert any(".venv" in p for p in check_runtime_env({**good, "excludes": ["data/", "mlruns/"]}, "t"))


# ---------------------------------------------------------------------------------- Dockerfile
def dockerfile_logical_lines(path: Path) -> list[str]:
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        cur += raw.rstrip().rstrip("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if cur.strip():
                lines.append(" ".join(cur.split()))
            cur = ""
    return lines


def check_dockerfile(lines: list[str]) -> list[str]:
    p = pins()
    problems = []
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    want = f"FROM rayproject/ray:{p['ray']}-{python_tag()}-gpu"
    if not froms or froms[0] != want:
        problems.append(f"FROM is {froms[:1]}, want {want!r}")
    text = "\n".join(lines)
    # commands in order, split at && and ; so that "after" means later in the build
    cmds = [c.strip() for ln in lines if ln.upper().startswith("RUN ") for c in re.split(r"&&|;", ln[4:])]
    if f"torch=={p['torch']}" not in text:
        problems.append(f"torch=={p['torch']} is not pinned")
    uninstall = next((i for i, c in enumerate(cmds)
                      if re.search(r"pip uninstall -y .*\bonnxruntime\b", c) and "onnxruntime-gpu" in c), None)
    gpu_install = next((i for i, c in enumerate(cmds) if "pip install" in c and "onnxruntime-gpu" in c), None)
    if gpu_install is None:
        problems.append("onnxruntime-gpu is never installed")
    else:
        if f"onnxruntime-gpu[cuda,cudnn]=={p['onnxruntime-gpu']}" not in cmds[gpu_install] \
                and f"onnxruntime-gpu=={p['onnxruntime-gpu']}" not in cmds[gpu_install]:
            problems.append(f"onnxruntime-gpu is not installed at the pinned {p['onnxruntime-gpu']}")
        if uninstall is None or uninstall > gpu_install:
            problems.append("onnxruntime-gpu is installed without first uninstalling onnxruntime + onnxruntime-gpu")
        if "--no-deps" in cmds[gpu_install] and not any(
                "pip install" in c and "nvidia-cudnn" in c for c in cmds[gpu_install + 1:]):
            problems.append("--no-deps skips the [cuda,cudnn] extras but their CUDA wheels are not installed")
        later_cpu = [c for c in cmds[gpu_install + 1:] if re.search(r"pip install .*\bonnxruntime(==|\s|$)", c)]
        if later_cpu:
            problems.append(f"the CPU onnxruntime is installed again afterwards: {later_cpu}")
    if "pip install" in text and not re.search(r"pip install[^\n]* \.(\s|$|\[)", text):
        problems.append("the project itself is not pip-installed")
    return problems


def test_dockerfile_matches_pins_and_swaps_onnxruntime_safely():
    assert check_dockerfile(dockerfile_logical_lines(CLUSTER / "Dockerfile")) == []


def test_dockerfile_check_catches_mistakes():
    lines = dockerfile_logical_lines(CLUSTER / "Dockerfile")
    swapped = [ln.replace(f"rayproject/ray:{pins()['ray']}", "rayproject/ray:2.9.0") for ln in lines]
    assert any("FROM" in p for p in check_dockerfile(swapped))
    no_uninstall = [ln.replace("pip uninstall -y onnxruntime onnxruntime-gpu", "true") for ln in lines]
    assert any("uninstalling" in p for p in check_dockerfile(no_uninstall))
    no_cuda = [ln.replace('"nvidia-cudnn-cu13~=9.0"', "") for ln in lines]
    assert any("extras" in p for p in check_dockerfile(no_cuda))
    loose_torch = [ln.replace(f"torch=={pins()['torch']}", "torch") for ln in lines]
    assert any("torch" in p for p in check_dockerfile(loose_torch))


def test_mlflow_image_pins_mlflow_with_auth_extra():
    text = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f'"mlflow[auth]=={pins()["mlflow"]}"' in text  # basic-auth needs Flask-WTF


# ------------------------------------------------------------------------------ cluster launcher
# GPUs per instance for the types the launcher config may use (add a row when you add a type).
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g6.xlarge": 1,
            "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.12xlarge": 4, "g6e.xlarge": 1, "g6e.4xlarge": 1,
            "p4d.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8}


def launcher_configs() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in all_docs() if "available_node_types" in d]


def test_launcher_config_is_valid_for_ray_and_has_gpu_nodes():
    from ray.autoscaler._private.util import prepare_config, validate_config

    configs = launcher_configs()
    assert configs
    for where, cfg in configs:
        validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does first
        image = cfg["docker"]["image"]
        assert image.rsplit(":", 1)[1].startswith(pins()["ray"]), (where, image)
        gpu_types = 0
        for name, nt in cfg["available_node_types"].items():
            itype = nt["node_config"]["InstanceType"]
            gpus = nt.get("resources", {}).get("GPU", 0)
            if itype.split(".")[0][0] in "gp":  # g*/p* families carry NVIDIA GPUs
                assert itype in AWS_GPUS, f"{where}:{name}: add {itype} to AWS_GPUS"
                assert gpus == AWS_GPUS[itype] >= 1, f"{where}:{name}: resources GPU {gpus} vs {itype}"
                gpu_types += 1
            else:
                assert gpus == 0, f"{where}:{name}: GPU resource on a CPU instance {itype}"
        assert gpu_types >= 1
        assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("CPU") == 0


def test_launcher_validation_catches_mistakes():
    from ray.autoscaler._private.util import prepare_config, validate_config

    _, cfg = launcher_configs()[0]
    broken = copy.deepcopy(cfg)
    broken["available_node_types"][broken["head_node_type"]]["min_worker"] = 1  # typo
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


# ------------------------------------------------------------------------------ MLflow & secrets
def containers_of(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    tmpl = spec.get("template", {}).get("spec", {})
    return tmpl.get("containers", [])


def check_no_literal_secrets(docs: list[tuple[str, dict]]) -> list[str]:
    problems = []
    for where, d in docs:
        if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
            problems.append(f"{where}: a Secret with values is committed")
        stack = [d]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
                    problems.append(f"{where}: env {node['name']} has a literal value; use secretKeyRef")
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return problems


def test_mlflow_server_has_auth_on_and_secret_credentials():
    deployments = [(f, d) for f, d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert len(deployments) == 1
    where, dep = deployments[0]
    (c,) = containers_of(dep)
    cmdline = " ".join(c.get("command", []) + c.get("args", []))
    assert re.search(r"mlflow server\b[^\n]*", cmdline)
    assert "--app-name basic-auth" in cmdline
    assert c["image"].rsplit(":", 1)[1] == pins()["mlflow"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_USERNAME",
                 "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name].get("valueFrom", {}), name
        assert "value" not in env[name]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "postgresql://" not in yaml.safe_dump(dep)  # the backend URI only lives in the Secret
    # a Service that every node reaches, and Ray pods pointing at it
    svc = [d for _, d in docs_of_kind("Service") if d["metadata"]["name"] == "mlflow"]
    assert svc and svc[0]["spec"]["ports"][0]["port"] == 5000
    url = f"http://mlflow.{dep['metadata']['namespace']}.svc.cluster.local:5000"
    ray_env = [e for _, spec in ray_cluster_specs() for e in
               spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])]
    assert {"name": "MLFLOW_TRACKING_URI", "value": url} in ray_env
    # The credentials are not in Ray pods (see test_mlflow_secret_only_in_the_training_submitter):
    # the training RayJob's submitter takes them from the Secret.
    submitter_env = [e for _, d in docs_of_kind("RayJob") if "submitterPodTemplate" in d["spec"]
                     for c in d["spec"]["submitterPodTemplate"]["spec"]["containers"] for e in c.get("env", [])]
    assert any(e["name"] == "MLFLOW_TRACKING_PASSWORD" and "secretKeyRef" in e.get("valueFrom", {})
               for e in submitter_env)


def test_no_credentials_in_any_cluster_file():
    assert check_no_literal_secrets(all_docs()) == []
    aws_key = re.compile(r"AKIA[0-9A-Z]{16}")
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not aws_key.search(text), path
            assert not re.search(r"postgresql://[^:\s/]+:[^@$\s]+@", text.replace("USER:PASSWORD@", "")
                                 .replace(":$PGPW@", "")), path


def test_secret_check_catches_literal_passwords():
    bad = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
        {"name": "x", "env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}]}]}}}}
    assert check_no_literal_secrets([("t", bad)])
    assert check_no_literal_secrets([("t", {"kind": "Secret", "stringData": {"a": "b"}})])


# ============================================================================ secure by default
# SECURITY.md: token auth, loopback dashboards, where the MLflow credentials go, the launcher's
# AMI / IAM / env-file, the Docker build context. Each check returns problems and is also run on
# a broken copy.
MLFLOW_CLIENT_SECRET = "hmhn-mlflow-client"
MLFLOW_CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
LOOPBACK = ("127.0.0.1", "localhost")
CUDA13_MIN_DRIVER = 580


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def secret_refs(node) -> set[str]:
    """Names of the Kubernetes Secrets a manifest fragment references (env, envFrom, volumes)."""
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            for key in ("secretKeyRef", "secretRef"):
                if isinstance(n.get(key), dict) and "name" in n[key]:
                    found.add(n[key]["name"])
            if isinstance(n.get("secret"), dict) and "secretName" in n["secret"]:
                found.add(n["secret"]["secretName"])
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return found


def _env_names(node) -> set[str]:
    names, stack = set(), [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if "name" in n and ("value" in n or "valueFrom" in n):
                names.add(str(n["name"]))
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return names


# ---------------------------------------------------------------------------------- KubeRay
def check_kuberay_security(kind: str, spec: dict) -> list[str]:
    """Token auth on, no MLflow credential in any Ray pod template, loopback dashboard on RayClusters.

    RayJob clusters keep their job server on the pod network: the KubeRay operator polls the job's
    status and the submitter pod submits from outside the head pod (token-protected, SECURITY.md).
    """
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode is not 'token' (Ray token authentication off)")
    if _version_tuple(spec.get("rayVersion", "0")) < (2, 52, 0):
        problems.append(f"rayVersion {spec.get('rayVersion')} predates token authentication (2.52)")
    head = spec["headGroupSpec"]
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        template = group["template"]
        if MLFLOW_CLIENT_SECRET in secret_refs(template):
            problems.append(f"{name}: pod template mounts the MLflow Secret {MLFLOW_CLIENT_SECRET}")
        leaked = sorted(_env_names(template) & set(MLFLOW_CRED_VARS))
        if leaked:
            problems.append(f"{name}: pod template sets {leaked}")
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                if e.get("name") == "RAY_AUTH_MODE" and e.get("value") != "token":
                    problems.append(f"{name}: RAY_AUTH_MODE={e.get('value')} overrides token auth")
    host = str(head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0"))
    if kind == "RayCluster" and host not in LOOPBACK:
        problems.append(f"RayCluster head dashboard-host {host}: the dashboard/job server must listen on loopback")
    return problems


def kuberay_specs_by_kind() -> list[tuple[str, str, dict]]:
    out = [("RayCluster", f"{f}:{d['metadata']['name']}", d["spec"]) for f, d in docs_of_kind("RayCluster")]
    out += [("RayJob", f"{f}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for f, d in docs_of_kind("RayJob")]
    return out


def test_kuberay_token_auth_loopback_dashboard_and_no_mlflow_secret_in_ray_pods():
    specs = kuberay_specs_by_kind()
    assert {k for k, _, _ in specs} == {"RayCluster", "RayJob"} and len(specs) >= 3
    for kind, where, spec in specs:
        assert check_kuberay_security(kind, spec) == [], where


def test_kuberay_security_check_catches_mistakes():
    kind, _, spec = next(x for x in kuberay_specs_by_kind() if x[0] == "RayCluster")
    broken = copy.deepcopy(spec)
    broken.pop("authOptions")
    assert any("token" in p for p in check_kuberay_security(kind, broken))
    broken = copy.deepcopy(spec)
    broken["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    assert any("loopback" in p for p in check_kuberay_security(kind, broken))
    broken = copy.deepcopy(spec)  # the previous manifests: the MLflow Secret in every worker pod
    worker = broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"] = list(worker.get("env", [])) + [
        {"name": "MLFLOW_TRACKING_PASSWORD",
         "valueFrom": {"secretKeyRef": {"name": MLFLOW_CLIENT_SECRET, "key": "password"}}}]
    found = check_kuberay_security(kind, broken)
    assert any("mounts the MLflow Secret" in p for p in found) and any("sets" in p for p in found)
    broken = copy.deepcopy(spec)
    broken["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
        {"name": "creds", "secret": {"secretName": MLFLOW_CLIENT_SECRET}})
    assert any("mounts the MLflow Secret" in p for p in check_kuberay_security(kind, broken))


def check_rayjob_mlflow_credentials(doc: dict) -> list[str]:
    """A RayJob that trains gets the MLflow credentials in its submitter pod only, which passes them
    to the job through cluster/submit.sh; a RayJob that does not train references no MLflow Secret."""
    spec = doc["spec"]
    trains = "jobs/train_ddp.py" in spec.get("entrypoint", "")
    submitter = (spec.get("submitterPodTemplate") or {}).get("spec", {})
    others = {k: v for k, v in spec.items() if k != "submitterPodTemplate"}
    problems = []
    if MLFLOW_CLIENT_SECRET in secret_refs(others):
        problems.append(f"{MLFLOW_CLIENT_SECRET} is referenced outside the submitter pod")
    if not trains:
        if MLFLOW_CLIENT_SECRET in secret_refs(submitter):
            problems.append("a RayJob that writes no MLflow run gets the MLflow Secret")
        return problems
    if not submitter:
        return problems + ["training RayJob without a submitterPodTemplate: nothing hands the job its MLflow credentials"]
    (c, *_) = submitter["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        ref = (env.get(name, {}).get("valueFrom") or {}).get("secretKeyRef", {})
        if ref.get("name") != MLFLOW_CLIENT_SECRET:
            problems.append(f"submitter: {name} does not come from the Secret {MLFLOW_CLIENT_SECRET}")
    script = " ".join(c.get("command", []) + c.get("args", []))
    if "cluster/submit.sh" not in script:
        problems.append("submitter does not run cluster/submit.sh (credentials into the job's runtime_env)")
    if env.get("HMHN_ENTRYPOINT", {}).get("value") != spec.get("entrypoint"):
        problems.append("submitter's HMHN_ENTRYPOINT differs from spec.entrypoint")
    if env.get("HMHN_RUNTIME_ENV_YAML", {}).get("value") != spec.get("runtimeEnvYAML"):
        problems.append("submitter's HMHN_RUNTIME_ENV_YAML differs from spec.runtimeEnvYAML")
    if not ("$HMHN_ENTRYPOINT" in script and "$HMHN_RUNTIME_ENV_YAML" in script):
        problems.append("submitter does not submit HMHN_ENTRYPOINT with HMHN_RUNTIME_ENV_YAML")
    return problems


def test_mlflow_secret_only_in_the_training_submitter():
    jobs = docs_of_kind("RayJob")
    assert any("jobs/train_ddp.py" in d["spec"]["entrypoint"] for _, d in jobs)
    for where, d in jobs:
        assert check_rayjob_mlflow_credentials(d) == [], where
    # the long-lived RayCluster has no pod with the Secret either
    for where, d in docs_of_kind("RayCluster"):
        assert MLFLOW_CLIENT_SECRET not in secret_refs(d), where
    # the submitter's script ships in the image it runs
    copies = " ".join(ln for ln in dockerfile_logical_lines(CLUSTER / "Dockerfile") if ln.upper().startswith("COPY "))
    assert "cluster/submit.sh" in copies


def test_rayjob_credential_check_catches_mistakes():
    (_, train), = [(f, d) for f, d in docs_of_kind("RayJob") if "train_ddp" in d["spec"]["entrypoint"]]
    (_, prep), = [(f, d) for f, d in docs_of_kind("RayJob") if "preprocess" in d["spec"]["entrypoint"]]
    broken = copy.deepcopy(train)
    broken["spec"].pop("submitterPodTemplate")
    assert any("submitterPodTemplate" in p for p in check_rayjob_mlflow_credentials(broken))
    broken = copy.deepcopy(train)
    broken["spec"]["entrypoint"] += " --epochs 1"          # drifted from what the submitter runs
    assert any("HMHN_ENTRYPOINT" in p for p in check_rayjob_mlflow_credentials(broken))
    broken = copy.deepcopy(train)
    head = broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["envFrom"] = [{"secretRef": {"name": MLFLOW_CLIENT_SECRET}}]
    assert any("outside the submitter" in p for p in check_rayjob_mlflow_credentials(broken))
    broken = copy.deepcopy(prep)
    broken["spec"]["submitterPodTemplate"] = copy.deepcopy(train["spec"]["submitterPodTemplate"])
    assert any("writes no MLflow run" in p for p in check_rayjob_mlflow_credentials(broken))


# ------------------------------------------------------------------------- AWS cluster launcher
def _docker_options(cfg: dict, node_type: str | None) -> list[str]:
    """The `docker run` options of a node type (global run_options + head/worker + per-type)."""
    docker = cfg.get("docker", {})
    opts = list(docker.get("run_options", []))
    if node_type == cfg["head_node_type"]:
        opts += docker.get("head_run_options", [])
    elif node_type is not None:
        opts += docker.get("worker_run_options", [])
        opts += cfg["available_node_types"][node_type].get("docker", {}).get("worker_run_options", [])
    return opts


def _docker_env(opts: list[str]) -> dict[str, str]:
    env = {}
    toks = shlex.split(" ".join(opts))
    for i, tok in enumerate(toks):
        if tok in ("--env", "-e") and i + 1 < len(toks) and "=" in toks[i + 1]:
            k, v = toks[i + 1].split("=", 1)
            env[k] = v
        elif tok.startswith("--env=") and "=" in tok[6:]:
            k, v = tok[6:].split("=", 1)
            env[k] = v
    return env


def _env_files(opts: list[str]) -> list[str]:
    toks = shlex.split(" ".join(opts))
    return [toks[i + 1] for i, t in enumerate(toks) if t == "--env-file" and i + 1 < len(toks)] + \
        [t.split("=", 1)[1] for t in toks if t.startswith("--env-file=")]


def _init_commands(cfg: dict, node_type: str) -> list[str]:
    nt = cfg["available_node_types"][node_type]
    if node_type != cfg["head_node_type"] and "initialization_commands" in nt:
        return list(nt["initialization_commands"])  # a node type's list replaces the global one
    return list(cfg.get("initialization_commands", []))


def _readable_by_login_user(path: str, commands: list[str], ssh_user: str) -> bool:
    """Is the env file `path` written so that the SSH user (who runs `docker run`) can read it?"""
    for cmd in commands:
        if path not in cmd:
            continue
        owner = re.search(r"\b(chown|install)\b[^;&|]*(\$\(id -u\)|\$USER|\$\{USER\}|\b" + re.escape(ssh_user) + r"\b)", cmd)
        world = re.search(r"\bchmod\s+(0?644|0?444|a\+r|o\+r|go\+r)\b", cmd)
        if owner or world or "sudo" not in cmd:
            return True
    return False


RAY_AMI_FALLBACKS = ("", "latest_dlami")  # what makes Ray pick its old default DLAMI


def check_launcher_security(cfg: dict) -> list[str]:
    problems = []
    text = yaml.safe_dump(cfg)
    ssh_user = cfg.get("auth", {}).get("ssh_user", "ubuntu")
    if "RAY_AUTH_MODE=disabled" in text:
        problems.append("RAY_AUTH_MODE=disabled somewhere in the config")
    for node_type, nt in cfg["available_node_types"].items():
        opts = _docker_options(cfg, node_type)
        env = _docker_env(opts)
        # token authentication on every node, with a token file that is synced to every node
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{node_type}: containers do not run with RAY_AUTH_MODE=token")
        token_path = env.get("RAY_AUTH_TOKEN_PATH")
        if "RAY_AUTH_TOKEN" not in env and token_path not in cfg.get("file_mounts", {}):
            problems.append(f"{node_type}: RAY_AUTH_TOKEN_PATH {token_path} is not a file_mounts target")
        if "RAY_AUTH_TOKEN" in env:
            problems.append(f"{node_type}: the Ray token is written into the config (RAY_AUTH_TOKEN)")
        # no MLflow credential in any node's environment
        leaked = sorted(set(env) & set(MLFLOW_CRED_VARS))
        if leaked:
            problems.append(f"{node_type}: {leaked} in the containers' environment")
        # an --env-file is read by the docker CLI as the SSH user: it must be readable by it
        for path in _env_files(opts):
            if not _readable_by_login_user(path, _init_commands(cfg, node_type), ssh_user):
                problems.append(f"{node_type}: --env-file {path} is not made readable by {ssh_user}, "
                                "who runs `docker run` (the container would not start)")
            if node_type != cfg["head_node_type"]:
                problems.append(f"{node_type}: a worker container gets an --env-file ({path})")
        nc = nt["node_config"]
        # an explicit AMI, or a loud REQUIRED placeholder: never Ray's old default DLAMI
        ami = nc.get("ImageId")
        if ami is None or str(ami).strip().lower() in RAY_AMI_FALLBACKS:
            problems.append(f"{node_type}: no ImageId: Ray falls back to an old DLAMI whose NVIDIA driver "
                            f"is below {CUDA13_MIN_DRIVER} (CUDA 13)")
        elif not (re.fullmatch(r"ami-[0-9a-f]{8,17}", str(ami)) or str(ami).startswith("REQUIRED")):
            problems.append(f"{node_type}: ImageId {ami!r} is neither an ami-... id nor a REQUIRED placeholder")
        sgs = nc.get("SecurityGroupIds") or []
        if not sgs or not all(re.fullmatch(r"sg-[0-9a-f]{8,17}", s) or s.startswith("REQUIRED") for s in sgs):
            problems.append(f"{node_type}: no own SecurityGroupIds (Ray's default group opens SSH to the world)")
        for bdm in nc.get("BlockDeviceMappings", []):
            if "Ebs" in bdm and bdm["Ebs"].get("Encrypted") is not True:
                problems.append(f"{node_type}: EBS volume {bdm.get('DeviceName')} not encrypted (Ray spills face crops there)")
        if nt.get("resources", {}).get("GPU", 0):
            init = " ".join(_init_commands(cfg, node_type))
            if not ("nvidia-smi" in init and str(CUDA13_MIN_DRIVER) in init):
                problems.append(f"{node_type}: GPU node without a driver >= {CUDA13_MIN_DRIVER} check")
    # dashboard + job server on the head's loopback only
    head_cmds = " ".join(cfg.get("head_start_ray_commands", []))
    hosts = re.findall(r"--dashboard-host[= ]\s*([^\s;]+)", head_cmds)
    if "ray start --head" not in head_cmds or not hosts or any(h not in LOOPBACK for h in hosts):
        problems.append(f"head: ray start --head --dashboard-host {hosts or 'unset'}: must be 127.0.0.1 "
                        "(reach it with `ray dashboard`)")
    if str(CUDA13_MIN_DRIVER) not in (CLUSTER / "aws" / "ray-cluster-aws.yaml").read_text():
        problems.append(f"the launcher config does not document the NVIDIA driver >= {CUDA13_MIN_DRIVER} requirement")
    return problems


def _allowed(policy: dict) -> list[dict]:
    out = []
    for st in policy["Statement"]:
        if st.get("Effect") != "Allow":
            continue
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        out += [{"action": a, "resources": resources, "condition": st.get("Condition", {})} for a in actions]
    return out


AUTOSCALER_ACTIONS = {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
                      "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                      "ec2:DescribeInstanceTypes", "iam:PassRole"}


def _profile_name(node_type: dict) -> str:
    return node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1]


def check_launcher_iam(cfg: dict, head_policy: dict, data_policy: dict) -> list[str]:
    """The head's role lets the autoscaler start/stop workers; PassRole only for the worker role."""
    problems = []
    head_type = cfg["head_node_type"]
    types = cfg["available_node_types"]
    head_profile = _profile_name(types[head_type])
    worker_profiles = {_profile_name(nt) for name, nt in types.items() if name != head_type}
    if head_profile in worker_profiles:
        problems.append(f"workers share the head's instance profile {head_profile} (and its EC2/PassRole rights)")
    grants = _allowed(head_policy)
    actions = {g["action"] for g in grants}
    missing = AUTOSCALER_ACTIONS - actions
    if missing:
        problems.append(f"head policy lacks {sorted(missing)}: the autoscaler cannot launch/terminate workers")
    for g in grants + _allowed(data_policy):
        if g["action"] == "*" or g["action"].endswith(":*"):
            problems.append(f"wildcard action {g['action']}")
    passrole = [r for g in grants if g["action"] == "iam:PassRole" for r in g["resources"]]
    allowed_roles = {f"role/{p}" for p in worker_profiles}  # each role sits in a profile of its name
    for r in passrole:
        if "*" in r or r.rsplit(":", 1)[-1] not in allowed_roles:
            problems.append(f"iam:PassRole on {r}: only the worker role(s) {sorted(allowed_roles)}")
    for g in grants:
        if g["action"] == "ec2:TerminateInstances":
            tag = g["condition"].get("StringEquals", {}).get("ec2:ResourceTag/ray-cluster-name")
            if tag != cfg["cluster_name"]:
                problems.append("ec2:TerminateInstances is not limited to this cluster's instances "
                                "(ec2:ResourceTag/ray-cluster-name)")
            region = cfg["provider"]["region"]
            if any(r != "*" and f":{region}:" not in r for r in g["resources"]):
                problems.append(f"ec2:TerminateInstances resources are not in the region {region}")
    for g in _allowed(data_policy):
        if g["action"].split(":")[0] in ("ec2", "iam", "secretsmanager", "sts"):
            problems.append(f"the workers' data policy grants {g['action']}")
    return problems


def launcher_iam_policies() -> tuple[dict, dict]:
    return (json.loads((CLUSTER / "aws" / "iam-head-policy.json").read_text()),
            json.loads((CLUSTER / "aws" / "iam-data-policy.json").read_text()))


def test_launcher_is_secure_and_can_start_workers():
    configs = launcher_configs()
    assert configs
    head_policy, data_policy = launcher_iam_policies()
    for where, cfg in configs:
        assert check_launcher_security(cfg) == [], where
        assert check_launcher_iam(cfg, head_policy, data_policy) == [], where
        # the placeholders are loud, never a made-up AMI id
        amis = {nt["node_config"]["ImageId"] for nt in cfg["available_node_types"].values()}
        assert all(a.startswith("REQUIRED") or re.fullmatch(r"ami-[0-9a-f]{8,17}", a) for a in amis), amis


def test_launcher_security_check_catches_the_old_config():
    _, cfg = launcher_configs()[0]
    head_type = cfg["head_node_type"]
    workers = [n for n in cfg["available_node_types"] if n != head_type]
    head_policy, data_policy = launcher_iam_policies()

    # the previous config: a root-only env file for every container, no ImageId, 0.0.0.0 dashboard
    old = copy.deepcopy(cfg)
    old["docker"]["run_options"] = [o for o in old["docker"]["run_options"] if "RAY_AUTH" not in o] + [
        "--env-file /etc/hmhn/mlflow-client.env"]
    old["initialization_commands"] = list(old["initialization_commands"]) + [
        "sudo sh -c 'umask 077; aws secretsmanager get-secret-value --secret-id hmhn/mlflow-client "
        "--query SecretString --output text > /etc/hmhn/mlflow-client.env'"]
    for nt in old["available_node_types"].values():
        nt["node_config"].pop("ImageId")
        nt.pop("initialization_commands", None)
    old["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                      for c in old["head_start_ray_commands"]]
    found = check_launcher_security(old)
    assert any("not made readable" in p for p in found), found
    assert any("worker container gets an --env-file" in p for p in found)
    assert any("no ImageId" in p for p in found)
    assert any("RAY_AUTH_MODE=token" in p for p in found)
    assert any("dashboard-host" in p for p in found)
    assert any("driver >= 580 check" in p for p in found)

    # the same env file, owned by the login user and on the head only, is fine
    fixed = copy.deepcopy(cfg)
    fixed["docker"]["head_run_options"] = ["--env-file /etc/hmhn/mlflow-client.env"]
    fixed["initialization_commands"] = list(fixed["initialization_commands"]) + [
        "sudo install -d -m 0700 -o \"$(id -u)\" /etc/hmhn && (umask 077; aws secretsmanager get-secret-value "
        "--secret-id hmhn/mlflow-client --query SecretString --output text > /etc/hmhn/mlflow-client.env)"]
    assert check_launcher_security(fixed) == []

    broken = copy.deepcopy(cfg)
    broken["available_node_types"][workers[0]]["node_config"]["ImageId"] = "latest_dlami"
    broken["available_node_types"][workers[0]]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] = False
    broken["available_node_types"][workers[0]]["node_config"].pop("SecurityGroupIds")
    broken["docker"]["run_options"] = list(broken["docker"]["run_options"]) + ["--env MLFLOW_TRACKING_PASSWORD=x"]
    found = check_launcher_security(broken)
    assert any("no ImageId" in p for p in found) and any("not encrypted" in p for p in found)
    assert any("SecurityGroupIds" in p for p in found) and any("MLFLOW_TRACKING_PASSWORD" in p for p in found)

    # IAM: the head's profile without autoscaler rights, PassRole on anything, shared profiles
    assert check_launcher_iam(cfg, {"Statement": []}, data_policy)
    wide = copy.deepcopy(head_policy)
    for st in wide["Statement"]:
        if st["Action"] == "iam:PassRole":
            st["Resource"] = "*"
    assert any("PassRole" in p for p in check_launcher_iam(cfg, wide, data_policy))
    no_terminate = copy.deepcopy(head_policy)
    for st in no_terminate["Statement"]:
        if isinstance(st["Action"], list):
            st["Action"] = [a for a in st["Action"] if a != "ec2:TerminateInstances"]
    assert any("TerminateInstances" in p for p in check_launcher_iam(cfg, no_terminate, data_policy))
    shared = copy.deepcopy(cfg)
    for nt in shared["available_node_types"].values():
        nt["node_config"]["IamInstanceProfile"] = copy.deepcopy(
            cfg["available_node_types"][head_type]["node_config"]["IamInstanceProfile"])
    assert any("share the head's instance profile" in p for p in check_launcher_iam(shared, head_policy, data_policy))
    greedy = copy.deepcopy(data_policy)
    greedy["Statement"].append({"Effect": "Allow", "Action": "ec2:*", "Resource": "*"})
    found = check_launcher_iam(cfg, head_policy, greedy)
    assert any("wildcard" in p for p in found) and any("data policy grants" in p for p in found)


# ---------------------------------------------------------------------------- .dockerignore
def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per line, as Docker/BuildKit (moby/patternmatcher) read .dockerignore."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:].strip() if negate else line
        pat = re.sub(r"/+", "/", pat).strip("/")  # filepath.Clean, leading "/" dropped
        rx, i = "^", 0
        while i < len(pat):
            ch = pat[i]
            if pat.startswith("**", i):
                i += 2
                if i < len(pat) and pat[i] == "/":
                    i += 1
                rx += ".*" if i >= len(pat) else "(.*/)?"
                continue
            rx += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
            i += 1
        rules.append((negate, re.compile(rx + "$")))
    return rules


def dockerignore_excludes(rules, path: str) -> bool:
    """Last matching rule wins; a rule matches the path or one of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# What must never reach a build context: face crops / shards, videos, runs, stores, logs, envs.
MUST_STAY_OUT = [
    "data/faces/v1/shards/part-0000.parquet", "data/faces/v1/_lock.json", "data/demo/videos/subject01.mp4", "data/raw/AVEC2013/x.avi",
    ".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py",
    "mlartifacts/1/abc/artifacts/evaluation/attention_maps.png", "mlruns/0/meta.yaml", "mlflow.db",
    "ray_results/hmhn-avec-224/checkpoint_000003/model.pt", ".git/HEAD", "train.log", "jobs/preprocess.log",
    "hmhn/__pycache__/model.cpython-311.pyc", ".pytest_cache/v/cache/lastfailed", "out/scores.csv",
    "tests/test_cluster_configs.py", "jobs/data/faces.parquet", "hmhn/faces/crop_0001.jpg",
    "pipeline/tmp/video_predictions.csv", "SECURITY.md",
]


def copy_sources() -> list[str]:
    """Every file that a COPY of cluster/Dockerfile takes from the build context (repo root)."""
    out = []
    for ln in dockerfile_logical_lines(CLUSTER / "Dockerfile"):
        if not ln.upper().startswith("COPY "):
            continue
        srcs = [t for t in shlex.split(ln)[1:] if not t.startswith("--")][:-1]
        for src in srcs:
            p = REPO / src
            if p.is_dir():
                out += [str(f.relative_to(REPO)) for f in sorted(p.rglob("*.py")) if "__pycache__" not in f.parts]
            else:
                out.append(src)
    return out


def check_dockerignore(text: str) -> list[str]:
    rules = dockerignore_rules(text)
    problems = [f"{p} would enter the build context" for p in MUST_STAY_OUT if not dockerignore_excludes(rules, p)]
    problems += [f"{p} is copied by cluster/Dockerfile but excluded" for p in copy_sources()
                 if dockerignore_excludes(rules, p)]
    return problems


def test_dockerignore_keeps_data_out_and_the_copied_sources_in():
    text = (REPO / ".dockerignore").read_text()
    assert len(copy_sources()) > 20 and "pyproject.toml" in copy_sources()
    assert check_dockerignore(text) == []
    # also literally listed, for a human reader
    lines = {ln.strip() for ln in text.splitlines()}
    assert {".venv", "data", "mlartifacts", "mlruns", "mlflow.db", "ray_results", ".git", "**/*.log"} <= lines


def test_dockerignore_check_catches_mistakes():
    text = (REPO / ".dockerignore").read_text()
    denylist_only = "\n".join(ln for ln in text.splitlines() if ln.strip() not in ("*", "data", "**/data"))
    found = check_dockerignore(denylist_only)
    assert any(p.startswith("data/faces/v1/_lock.json") for p in found) and any("tests/" in p for p in found)
    assert any("hmhn/model.py is copied" in p for p in check_dockerignore(text + "\nhmhn\n"))
    rules = dockerignore_rules("*\n!hmhn/\n**/*.log\n")  # the matcher itself: allowlist + re-exclude
    assert not dockerignore_excludes(rules, "hmhn/model.py")
    assert dockerignore_excludes(rules, "hmhn/x.log") and dockerignore_excludes(rules, "data/a.parquet")


def test_dockerignore_agrees_with_dockers_own_matcher(tmp_path):
    """Cross-check the matcher above with the Docker SDK's (docker-py, an MLflow dependency)."""
    build = pytest.importorskip("docker.utils.build")
    for rel in MUST_STAY_OUT + copy_sources():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    text = (REPO / ".dockerignore").read_text()
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    sent = set(build.exclude_paths(str(tmp_path), patterns))  # what docker-py sends: the kept paths
    assert not sent & set(MUST_STAY_OUT)
    assert set(copy_sources()) <= sent


# ------------------------------------------------------------------------------ cluster/submit.sh
FAKE_RAY = r"""#!/usr/bin/env bash
# records what submit.sh asks of `ray`; pretends the cluster knows no job yet
echo "ARGV $*" >> "$FAKE_RAY_LOG"
if [[ "$1 $2" == "job status" ]]; then [[ -n "${FAKE_RAY_KNOWN:-}" ]] && exit 0 || exit 1; fi
if [[ "$1 $2" == "job submit" ]]; then
  while (($#)); do
    if [[ "$1" == "--runtime-env" ]]; then
      cp "$2" "$FAKE_RAY_LOG.runtime_env"; stat -c %a "$2" > "$FAKE_RAY_LOG.mode"; echo "$2" > "$FAKE_RAY_LOG.path"
    fi
    shift
  done
fi
exit 0
"""


def _run_submit(tmp_path, env_extra: dict, args: list[str]):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "ray").write_text(FAKE_RAY)
    (bindir / "ray").chmod(0o755)
    log = tmp_path / "ray.log"
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "FAKE_RAY_LOG": str(log), "PYTHON": sys.executable, **env_extra}
    out = subprocess.run(["bash", str(CLUSTER / "submit.sh"), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    merged = json.loads((tmp_path / "ray.log.runtime_env").read_text()) if (tmp_path / "ray.log.runtime_env").exists() else None
    mode = (tmp_path / "ray.log.mode").read_text().strip() if (tmp_path / "ray.log.mode").exists() else None
    path = (tmp_path / "ray.log.path").read_text().strip() if (tmp_path / "ray.log.path").exists() else None
    return out, calls, merged, mode, path


CREDS = {"MLFLOW_TRACKING_USERNAME": "hmhn-pipeline", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-Pa55 'x\""}


def test_submit_sh_hands_the_credentials_to_the_job_only(tmp_path):
    out, calls, merged, mode, path = _run_submit(
        tmp_path, CREDS, ["--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
                          "python", "jobs/train_ddp.py", "--epochs", "1"])
    assert out.returncode == 0, out.stderr
    submit = [c for c in calls if c.startswith("ARGV job submit")]
    assert len(submit) == 1
    assert "--working-dir ." in submit[0] and "-- python jobs/train_ddp.py --epochs 1" in submit[0]
    assert "--address http://127.0.0.1:8265" in submit[0] and "--submission-id" in submit[0]
    # in the job's runtime_env, with the committed settings; never on a command line; 0600; deleted
    base = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert merged["env_vars"] == {**base["env_vars"], **CREDS}
    assert merged["excludes"] == base["excludes"]
    assert mode == "600" and not Path(path).exists()
    assert not any(CREDS["MLFLOW_TRACKING_PASSWORD"] in c for c in calls)
    assert CREDS["MLFLOW_TRACKING_PASSWORD"] not in out.stdout + out.stderr
    assert calls[-1].startswith("ARGV job logs --address http://127.0.0.1:8265 --follow")


def test_submit_sh_refuses_without_credentials_or_with_committed_ones(tmp_path):
    out, calls, *_ = _run_submit(tmp_path, {}, ["--", "python", "jobs/train_ddp.py"])
    assert out.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in out.stderr
    assert not any("job submit" in c for c in calls)
    leaky = tmp_path / "leaky_runtime_env.yaml"
    leaky.write_text(yaml.safe_dump({"env_vars": {"MLFLOW_TRACKING_PASSWORD": "committed"}}))
    out, calls, *_ = _run_submit(tmp_path, CREDS, ["--runtime-env", str(leaky), "--", "python", "jobs/train_ddp.py"])
    assert out.returncode != 0 and "never go into a runtime_env file" in out.stderr
    assert not any("job submit" in c for c in calls)


def test_submit_sh_does_not_resubmit_a_known_submission_id(tmp_path):
    out, calls, merged, *_ = _run_submit(tmp_path, {**CREDS, "FAKE_RAY_KNOWN": "1"},
                                         ["--submission-id", "rayjob-abc", "--", "python", "jobs/train_ddp.py"])
    assert out.returncode == 0, out.stderr
    assert not any("job submit" in c for c in calls) and merged is None
    assert calls[-1] == "ARGV job logs --follow rayjob-abc"


# ------------------------------------------------------------------------- documentation
def test_security_docs_cover_the_switches_and_the_limits():
    security = (REPO / "SECURITY.md").read_text()
    readme = (CLUSTER / "README.md").read_text()
    assert "--no-log-predictions" in job_flags("jobs/train_ddp.py")  # the documented switch exists
    for doc in (security, readme):
        assert "--no-log-predictions" in doc and "--log-attention-maps" in doc
        assert "cluster/submit.sh" in doc or "`submit.sh`" in doc
        assert "580" in doc
    for needle in ("conditional PUT", "object store", "Ray token", "rank 0", "runtime_env",
                   "models-from-code", "jobs/promote.py", "NO_PERMISSIONS", "What an operator must set",
                   "Known limits"):
        assert needle in security, needle
    assert "ray dashboard" in readme and "--dashboard-host=127.0.0.1" in readme


def test_no_credentials_in_uris_of_cluster_files():
    userinfo = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s/@:'\"]+:[^\s/@'\"]+@", re.I)
    allowed = ("USER:PASSWORD@", ":$PGPW@")  # documentation of the server's own backend URI Secret
    for path in [*CLUSTER.rglob("*"), REPO / "SECURITY.md"]:
        if path.is_file():
            text = path.read_text()
            for a in allowed:
                text = text.replace(a, "@")
            assert not userinfo.search(text), (path, userinfo.search(text).group(0))
