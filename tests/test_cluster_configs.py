"""cluster/: every manifest parses and agrees with the project (no Kubernetes or Docker needed).

The checks are functions returning a list of problems, so each one is also run on a deliberately
broken copy: a check that cannot fail proves nothing.
"""
from __future__ import annotations

import copy
import functools
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
    assert any(e["name"] == "MLFLOW_TRACKING_PASSWORD" and "secretKeyRef" in e.get("valueFrom", {})
               for e in ray_env)


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
