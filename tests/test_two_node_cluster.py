"""A real two-node Ray cluster on this machine: jobs reach both nodes, shared storage is enforced.

Two `ray start` processes (head + one worker node), 1 CPU each, custom resources `head_node` /
`second_node` so that work can be pinned to a node; jobs go through `ray job submit` with
token authentication on (tests/ray_cluster.py).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ray_cluster import RAY, REPO, LocalRayCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster(two_nodes=True) as c:
        yield c


@pytest.fixture(scope="module")
def shared_dir():
    d = tempfile.mkdtemp(prefix="hmhn2n-shared-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _new_job_nodes(before: list, after: list, name_contains: str = "") -> set[str]:
    """Nodes where tasks of jobs that are not in `before` ran (optionally: tasks named like ...)."""
    old_jobs = {job for job, _, _ in before}
    return {node for job, name, node in after if job not in old_jobs and name_contains in name}


PIN_TASKS = (
    "import json, os, ray\n"
    "ray.init()\n"
    "@ray.remote(num_cpus=0)\n"
    "def where():\n"
    "    return ray.get_runtime_context().get_node_id()\n"
    "got = {r: ray.get(where.options(resources={r: 0.01}).remote()) for r in ('head_node', 'second_node')}\n"
    "print('NODES ' + json.dumps(got))\n"
    "print('SHARED ' + os.environ.get('HMHN_SHARED_PATHS', ''))\n"
)


def test_trivial_job_runs_on_both_nodes(cluster, shared_dir):
    ids = cluster.node_ids()
    assert set(ids) == {"head_node", "second_node"} and ids["head_node"] != ids["second_node"]
    before = cluster.task_events()
    out = cluster.submit(["python", "-c", PIN_TASKS], {"HMHN_SHARED_PATHS": shared_dir}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(re.search(r"^NODES (.*)$", out.stdout, re.M).group(1))
    assert got == ids  # each pinned task really ran on its node
    assert f"SHARED {shared_dir}" in out.stdout  # env_vars reached the job
    assert _new_job_nodes(before, cluster.task_events()) == set(ids.values())


def test_ray_job_submit_path(cluster):
    out = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard_url], env=cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN"] = "0" * 64  # a wrong token is refused
    out = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard_url], env=no_token,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0


def _need_jobs(*names: str) -> None:
    missing = [n for n in names if not (REPO / "jobs" / n).is_file()]
    if missing:
        pytest.skip(f"jobs not written yet: {missing}")


@pytest.fixture(scope="module")
def demo_manifest(shared_dir):
    _need_jobs("make_demo_data.py")
    out_dir = Path(shared_dir) / "demo"
    out = subprocess.run([sys.executable, "jobs/make_demo_data.py", "--output", str(out_dir),
                          "--subjects", "3", "--videos-per-subject", "2", "--seed", "0",
                          "--seconds", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = out_dir / "manifest.csv"
    assert manifest.is_file()
    return manifest


def test_node_local_output_is_refused(cluster, demo_manifest, tmp_path):
    _need_jobs("preprocess.py")
    local_out = tmp_path / "faces"  # a tmp dir NOT listed in HMHN_SHARED_PATHS
    out = cluster.submit(["python", "jobs/preprocess.py", "--dataset", "csv", "--input", str(demo_manifest),
                          "--output", str(local_out)], {}, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert f"--output {local_out} is a node-local path but the cluster has 2 nodes" in text, text[-3000:]
    assert not local_out.exists()  # refused before anything was written


def test_preprocess_and_train_use_both_nodes(cluster, demo_manifest, shared_dir):
    _need_jobs("preprocess.py", "train_ddp.py")
    ids = set(cluster.node_ids().values())
    env = {"HMHN_SHARED_PATHS": shared_dir}

    before = cluster.task_events()
    out = cluster.submit(["python", "jobs/preprocess.py", "--dataset", "csv", "--input", str(demo_manifest),
                          "--output", f"{shared_dir}/faces"], env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    shard_set = re.findall(r"^shard_set: (.+)$", out.stdout, re.M)[-1].strip()
    assert shard_set.startswith(f"{shared_dir}/faces/") and list(Path(shard_set).rglob("*.parquet"))
    assert _new_job_nodes(before, cluster.task_events()) == ids, "preprocessing used one node only"

    before = cluster.task_events()
    # 0.6 CPU per worker on 1-CPU nodes: Ray's PACK placement cannot put both ranks on one node
    out = cluster.submit(["python", "jobs/train_ddp.py", "--workers", "2", "--cpus-per-worker", "0.6",
                          "--data", shard_set, "--epochs", "1", "--input-size", "112",
                          "--run-name", "two-node", "--storage-path", f"{shared_dir}/ray_results",
                          "--mlflow-uri", f"sqlite:///{shared_dir}/mlflow.db", "--model-name", "hmhn-two-node"],
                         env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # the DDP ranks themselves (Ray Train worker actors), not just the data tasks feeding them
    assert _new_job_nodes(before, cluster.task_events(), "RayTrainWorker") == ids, \
        "the two DDP workers did not run on two nodes"
    assert any(Path(shared_dir, "ray_results").rglob("*")), "no checkpoint on shared storage"
