"""`ray job submit` of the preprocessing job to a real Ray head started with `ray start --head`
on loopback: the job runs on the cluster it is submitted to and writes readable shards."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, LocalRayCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def head():
    with LocalRayCluster(two_nodes=False) as cluster:
        yield cluster


def test_submitted_preprocess_job_writes_shards(head, tmp_path):
    demo = tmp_path / "demo"
    made = subprocess.run([sys.executable, "jobs/make_demo_data.py", "--output", str(demo), "--subjects", "2",
                           "--videos-per-subject", "1", "--seconds", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    out = head.submit(["python", "jobs/preprocess.py", "--dataset", "avec2014", "--input", str(demo),
                       "--output", str(tmp_path / "faces"), "--sampling-fps", "3"], timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Job 'raysubmit_" in text and "succeeded" in text, text[-2000:]  # it went through the job server
    assert "connected to the Ray cluster at" in text  # ... and used that cluster, not a private one
    shard_set = Path(re.findall(r"^shard_set: (.+)$", out.stdout, re.M)[-1].strip())
    from hmhn.data import iter_eval_batches, open_shardset

    index = open_shardset(str(shard_set))
    status = index.table.to_pylist()
    assert len(status) == 2 and all(s["status"] == "ok" for s in status), status
    frames = sum(len(ids) for ids, _, _ in iter_eval_batches(str(shard_set), index.videos(), 32))
    assert frames == sum(s["faces_kept"] for s in status) > 0
