"""A real multi-node Ray cluster on this machine: jobs reach every node, shared storage is enforced,
pools grow onto nodes that join, training waits for resources that appear later, and runs survive
a node that is killed.

`ray start` processes (head + worker nodes), 1 CPU each, custom resources so that work can be
pinned to a node and a node can stand in for a GPU machine; jobs go through `ray job submit` with
token authentication on (tests/ray_cluster.py). Nodes are added and SIGKILLed while jobs run. The
cluster is shared by the module for speed, but each test first brings it to the shape it needs
(`cluster_with`), so no test depends on another one having run.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_cluster import RAY, REPO, LocalRayCluster, wait_for_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FAULT_HOOK = "tests.crash_injection.install"


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster(two_nodes=True) as c:
        yield c


def cluster_with(cluster: LocalRayCluster, *names: str, resources: dict[str, dict] | None = None) -> dict[str, str]:
    """Make the cluster's worker nodes exactly `names` (head always stays): kill the others, start
    the missing ones (with `resources[name]`, default {name: 1}). Returns {name: node id}."""
    for name in [n for n in cluster.nodes if n != "head" and n not in names]:
        cluster.kill_node(name)
    ids = {}
    for name in names:
        if name not in cluster.nodes:
            ids[name] = cluster.add_node(name, (resources or {}).get(name, {name: 1}))
    return {**{n: i for n, i in cluster.node_ids_by_name().items() if n in names}, **ids}


@pytest.fixture(scope="module")
def shared_dir():
    d = tempfile.mkdtemp(prefix="hmhn2n-shared-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_url(shared_dir):
    from tests.conftest import running_mlflow_server

    folder = Path(shared_dir) / "mlflow-server"
    folder.mkdir()
    with running_mlflow_server(folder) as url:
        yield url


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
    cluster_with(cluster, "worker", resources={"worker": {"second_node": 1}})
    ids = cluster.node_ids()
    assert set(ids) == {"head_node", "second_node"} and ids["head_node"] != ids["second_node"]
    before = cluster.task_events()
    out = cluster.submit(["python", "-c", PIN_TASKS], {"HMHN_SHARED_PATHS": shared_dir}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(re.search(r"^NODES (.*)$", out.stdout, re.M).group(1))
    assert got == ids  # each pinned task really ran on its node
    assert f"SHARED {shared_dir}" in out.stdout  # env_vars reached the job
    assert _new_job_nodes(before, cluster.task_events()) == set(ids.values())
    # the job server with token authentication: listed with the token, refused without it
    out = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard_url], env=cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    wrong_token = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    out = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard_url], env=wrong_token,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0


@pytest.fixture(scope="module")
def demo_manifest(shared_dir) -> Path:
    """8 demo videos (2 s) under a folder whose name makes the fault hook slow each chunk down."""
    out_dir = Path(shared_dir) / "demo"
    out = subprocess.run([sys.executable, "jobs/make_demo_data.py", "--output", str(out_dir),
                          "--subjects", "4", "--videos-per-subject", "2", "--seed", "0",
                          "--seconds", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from tests.crash_injection import SLOW_MARKER

    slow_dir = Path(shared_dir) / SLOW_MARKER
    slow_dir.mkdir()
    rows = list(csv.DictReader((out_dir / "manifest.csv").open()))
    for row in rows:
        target = slow_dir / Path(row["uri"]).name
        shutil.copy(row["uri"] if Path(row["uri"]).is_absolute() else out_dir / row["uri"], target)
        row["uri"] = str(target)
    manifest = Path(shared_dir) / "slow_manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def synthetic_shards(shared_dir) -> str:
    from hmhn.data import write_synthetic_shardset

    return write_synthetic_shardset(f"{shared_dir}/synth/synth000", {"train": 8, "dev": 2}, frames_per_video=8,
                                    size=64)


def test_node_local_paths_and_a_sqlite_store_are_refused_before_any_work(cluster, demo_manifest, synthetic_shards,
                                                                          shared_dir, tmp_path):
    cluster_with(cluster, "worker", resources={"worker": {"second_node": 1}})
    local_out = tmp_path / "faces"  # a tmp dir NOT listed in HMHN_SHARED_PATHS
    out = cluster.submit(["python", "jobs/preprocess.py", "--dataset", "csv", "--input", str(demo_manifest),
                          "--output", str(local_out)], {"HMHN_SHARED_PATHS": shared_dir}, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert f"--output {local_out} is a node-local path but the cluster has 2 nodes" in text, text[-3000:]
    assert not local_out.exists()  # refused before anything was written

    # The training refusals happen in the driver, before Ray Train starts: a driver with RAY_ADDRESS.
    train = ["python", "jobs/train_ddp.py", "--data", synthetic_shards, "--workers", "2", "--epochs", "1",
             "--input-size", "64", "--run-name", "refused"]
    env = {"HMHN_SHARED_PATHS": shared_dir}
    out = cluster.submit(train + ["--mlflow-uri", f"sqlite:///{shared_dir}/refused.db"], env, timeout=600,
                         via_job_server=False)
    assert out.returncode != 0 and "--storage-path is required" in out.stdout + out.stderr, out.stdout[-3000:]
    out = cluster.submit(train + ["--storage-path", str(tmp_path / "ckpt"), "--mlflow-uri",
                                  f"sqlite:///{shared_dir}/refused.db"], env, timeout=600, via_job_server=False)
    assert out.returncode != 0 and f"--storage-path {tmp_path / 'ckpt'} is a node-local path" in out.stdout + out.stderr
    out = cluster.submit(train + ["--storage-path", f"{shared_dir}/ckpt", "--mlflow-uri",
                                  f"sqlite:///{shared_dir}/refused.db"], env, timeout=600, via_job_server=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "the MLflow store is a local sqlite store" in text and "--mlflow-uri http" in text
    # refused before any work: no MLflow database, no checkpoint folder
    assert not Path(shared_dir, "refused.db").exists() and not Path(shared_dir, "ckpt").exists()
    assert not (tmp_path / "ckpt").exists()


def _preprocess(cluster, manifest: Path, output: str, log: Path, shared_dir: str,
                slow_s: float, *extra: str) -> subprocess.Popen:
    return cluster.submit_in_background(
        ["python", "jobs/preprocess.py", "--dataset", "csv", "--input", str(manifest), "--output", output,
         "--progress-every-s", "1", "--videos-per-task", "1", *extra],
        log, {"HMHN_SHARED_PATHS": shared_dir, "HMHN_TEST_SLOW_SECONDS": str(slow_s)}, setup_hook=FAULT_HOOK)


def _every_video_exactly_once(output_root: Path, n_videos: int, failed: dict[str, str] | None = None) -> None:
    """Each video once in the index, `ok` (or failed with the reason that starts as in `failed`), and
    each ok video's rows exactly once in its file."""
    shard_set = next(p for p in output_root.iterdir() if p.is_dir())
    index = pq.read_table(shard_set / "index.parquet").to_pylist()
    assert len(index) == n_videos == len({r["video_id"] for r in index})
    failed = failed or {}
    assert {r["video_id"]: r["reason"][:len(failed[r["video_id"]])] for r in index if r["status"] != "ok"} == failed, \
        [(r["video_id"], r["reason"]) for r in index]
    for row in index:
        if row["status"] != "ok":
            continue  # each committed video's rows: exactly faces_kept distinct frames, read from its file
        rows = pq.ParquetFile(shard_set / row["file"]).read_row_groups(
            list(range(row["row_group_first"], row["row_group_first"] + row["row_group_count"])),
            columns=["video_id", "frame_index"]).to_pylist()
        mine = [r["frame_index"] for r in rows if r["video_id"] == row["video_id"]]
        assert len(mine) == len(set(mine)) == row["faces_kept"] > 0


def test_the_detector_pool_grows_onto_a_node_that_joins_and_survives_losing_it(cluster, demo_manifest, shared_dir,
                                                                               tmp_path):
    """One preprocessing run on the head alone: a node joins and gets detector actors of the growing
    pool; the node is then SIGKILLed (raylet, object store, the actor on its video) and the run still
    ends with every video exactly once; a video whose decoder hangs fails at its deadline meanwhile."""
    from tests.crash_injection import HANG_MARKER

    cluster_with(cluster)  # the head alone: 1 CPU, room for one detector actor
    rows = list(csv.DictReader(demo_manifest.open()))
    hang_dir = Path(shared_dir, HANG_MARKER)
    hang_dir.mkdir(exist_ok=True)
    shutil.copy(rows[0]["uri"], hang_dir / "hung.mp4")
    manifest = tmp_path / "with_hang.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, {**rows[0], "video_id": "hung", "uri": str(hang_dir / "hung.mp4")}])
    before = cluster.task_events()
    log = tmp_path / "job.log"
    job = _preprocess(cluster, manifest, f"{shared_dir}/grow", log, shared_dir, 4.0, "--video-timeout-s", "20")
    try:
        wait_for_line(log, r"autoscaling 1\.\.\d+\)", job, timeout=300)  # the plan: starts at 1, may grow
        late = cluster_with(cluster, "late")["late"]
        deadline = time.time() + 300
        while late not in _new_job_nodes(before, cluster.task_events(), "VideoFaceCropper"):
            assert job.poll() is None, "the run ended before an actor ran on the node that joined:\n" + \
                log.read_text()[-4000:]
            assert time.time() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        cluster.kill_node("late")  # while its actor works on a video
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        job.kill()
    _every_video_exactly_once(Path(shared_dir, "grow"), 9, failed={"hung": "deadline exceeded: no result after 20 s"})


def _train(cluster, shards: str, run: str, log: Path, shared_dir: str, mlflow_url: str, *extra: str):
    return cluster.submit_in_background(
        ["python", "jobs/train_ddp.py", "--data", shards, "--input-size", "64", "--batch-size", "8",
         "--frames-per-video", "4", "--eval-frames-per-video", "4", "--num-heads", "2", "--run-name", run,
         "--storage-path", f"{shared_dir}/ray_results", "--mlflow-uri", mlflow_url, "--no-register", *extra],
        log, {"HMHN_SHARED_PATHS": shared_dir})


def _wait_for_logged_epoch(client, run_name: str, epoch: int, job, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert job.poll() is None, "the run ended before epoch %d was logged:\n%s" % (epoch, log.read_text()[-4000:])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.mlflow.runName = '{run_name}'")
        if runs and any(m.step >= epoch for m in client.get_metric_history(runs[0].info.run_id, "train_loss")):
            return
        time.sleep(0.5)
    raise AssertionError(f"epoch {epoch} of {run_name} never reached MLflow:\n{log.read_text()[-4000:]}")


def test_training_waits_for_gpus_that_join_later_and_restarts_from_its_checkpoint_when_one_dies(
        cluster, synthetic_shards, shared_dir, mlflow_url, tmp_path):
    """A custom resource stands in for GPUs. No node has it when the 2-worker job starts: the job
    asks for it (a placement group the autoscaler would see), says so, and starts once two such
    nodes joined, one DDP rank on each. The node of one rank is then SIGKILLed; with a replacement
    node the run restarts from its last checkpoint and finishes every epoch."""
    from mlflow import MlflowClient

    cluster_with(cluster)
    before = cluster.task_events()
    log = tmp_path / "train.log"
    # 0.6 CPU per worker on 1-CPU nodes: one rank per node
    job = _train(cluster, synthetic_shards, "node-loss", log, shared_dir, mlflow_url, "--workers", "2",
                 "--cpus-per-worker", "0.6", "--epochs", "3", "--max-failures", "3",
                 "--worker-resources", "standin_gpu=1", "--resource-wait-s", "300")
    gpu = {"standin_gpu": 1}
    try:
        wait_for_line(log, r"waiting up to 300 s for 2 training worker\(s\): 2 x \{standin_gpu: 1\}", job)
        ids = cluster_with(cluster, "gpu1", "gpu2", resources={"gpu1": gpu, "gpu2": gpu})
        wait_for_line(log, r"\[hmhn\] epoch 1/3", job, timeout=600)
        # Epoch 1 reaches MLflow once Ray Train has committed its checkpoint (hmhn/epoch_log.py): kill
        # then, at once. A tiny run on a loaded machine can finish its last epochs within seconds, and
        # a node killed after that costs the run nothing. Where the ranks ran is checked afterwards.
        _wait_for_logged_epoch(MlflowClient(mlflow_url), "node-loss", 1, job, log)
        cluster.kill_node("gpu2")
        assert _new_job_nodes(before, cluster.task_events(), "RayTrainWorker") == set(ids.values()), \
            "the two DDP ranks did not run on the two nodes that joined"
        cluster_with(cluster, "gpu1", "gpu3", resources={"gpu3": gpu})  # the autoscaler's replacement
        assert job.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        job.kill()
    text = log.read_text()
    assert re.search(r"\[resources\] 2 training worker\(s\): available after \d+ s", text), text[-3000:]
    # the kill lands in epoch 2, 3 or the final evaluation: a restart from the last checkpoint either way
    assert re.search(r"\[hmhn\] resuming node-loss after epoch [123]", text), text[-4000:]
    client = MlflowClient(mlflow_url)
    run = client.search_runs([client.get_experiment_by_name("hmhn").experiment_id],
                             "tags.mlflow.runName = 'node-loss'")[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(set(steps)) == [1, 2, 3]  # every epoch reached; none skipped by the restart
    assert any(Path(shared_dir, "ray_results", "node-loss").rglob("checkpoint.pt"))
