"""The whole pipeline with every location on S3: a real S3 server (moto on 127.0.0.1, from the
`s3_server` fixture; never AWS), real Ray, real MLflow (local sqlite), tiny real face videos.

    videos + manifest.csv on s3 --run_preprocess--> s3 shard set (few big objects)
        --run_training (Ray Train, checkpoints on s3)--> registered model
        --score_videos (workdir and scores.csv on s3)--> one row per video

plus the two properties the shard-set format promises on object storage: a run killed mid-way
resumes with every video exactly once, and objects that no commit-log row points at (a killed
run's leftovers, garbage) are never read and are deleted by the next run.

The S3 env (endpoint + dummy keys) is in os.environ before Ray starts (`ray_with_s3`), so Ray
Data / Ray Train workers and the preprocessing job's subprocess reach the same server.
"""
from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
import uuid

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.align import AlignConfig
from pipeline.decode import SamplingConfig
from pipeline.preprocess import PreprocessConfig, preprocess_version, run_preprocess
from pipeline.storage import resolve_filesystem
from tests.conftest import REPO, face_frames

pytestmark = pytest.mark.timeout(900)

SIZE = 64  # face crops and model input: small and fast (HMHN needs a multiple of 16, >= 32)
FAST_SAMPLING = SamplingConfig(mode="fps", fps=5.0, chunk_frames=4)
MODEL_NAME = "hmhn-s3"


# ----------------------------------------------------------------------------------------------
# Helpers


def _put(uri: str, data: bytes) -> None:
    fs, path = resolve_filesystem(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def _get(uri: str) -> bytes:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_stream(path) as src:
        return src.read()


def _manifest_csv(rows: list[dict]) -> bytes:
    frame = pd.DataFrame(rows, columns=["video_id", "subject_id", "split", "label", "uri", "task"])
    return frame.to_csv(index=False).encode()


def _upload_videos(s3, prefix: str, face_rgb: np.ndarray, tmp_dir, splits: list[str], seconds: float = 1.0
                   ) -> tuple[str, list[dict]]:
    """Write one real face mp4 per entry of `splits` to s3://bucket/prefix/videos/ and a manifest CSV with
    their s3:// URIs to s3://bucket/prefix/manifest.csv; returns (manifest uri, manifest rows)."""
    from pipeline.video_io import write_mp4

    variants = [face_rgb, np.ascontiguousarray(np.fliplr(face_rgb))]
    rows = []
    for i, split in enumerate(splits):
        local = tmp_dir / f"clip{i}.mp4"
        write_mp4(local, face_frames(variants[i % 2], int(round(30 * seconds))))
        uri = s3.uri(f"{prefix}/videos/clip{i}.mp4")
        _put(uri, local.read_bytes())
        rows.append({"video_id": f"clip{i}", "subject_id": f"subj{i}", "split": split, "label": (5 + 9 * i) % 64,
                     "uri": uri, "task": ""})
    manifest = s3.uri(f"{prefix}/manifest.csv")
    _put(manifest, _manifest_csv(rows))
    return manifest, rows


def _keys(s3, uri: str) -> list[str]:
    """Every object key under `uri` (relative to it), listed with boto3 - independently of pyarrow.
    Keys ending in '/' are the empty directory markers pyarrow's create_dir leaves; they hold no data."""
    prefix = uri.split(f"s3://{s3.bucket}/", 1)[1].rstrip("/") + "/"
    client = s3.boto3_client()
    keys, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix, **extra)
        keys += [o["Key"][len(prefix):] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def _shard_keys(s3, shard_set: str) -> set[str]:
    return {k for k in _keys(s3, shard_set) if k.startswith("shards/")}


# ----------------------------------------------------------------------------------------------
# One preprocessed shard set on S3, shared by the end-to-end test and the stray-files test


@pytest.fixture(scope="module")
def s3_faces(ray_with_s3, s3_server, astronaut_rgb, tmp_path_factory):
    """5 tiny face videos (3 train, 1 dev, 1 test) + manifest on S3, preprocessed to an S3 shard set."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    manifest, rows = _upload_videos(s3_server, prefix, astronaut_rgb, tmp_path_factory.mktemp("clips"),
                                    ["train", "train", "train", "dev", "test"])
    config = PreprocessConfig(dataset="csv", input=manifest, output=s3_server.uri(f"{prefix}/faces"),
                              sampling=FAST_SAMPLING, align=AlignConfig(size=SIZE), num_detect_actors=1,
                              videos_per_task=3, progress_every_s=5)
    started = time.time()
    summary = run_preprocess(config)
    print(f"[s3 test] preprocessing {len(rows)} videos on S3 took {time.time() - started:.1f} s")
    return {"prefix": prefix, "manifest": manifest, "rows": rows, "config": config, "summary": summary}


@pytest.mark.slow
def test_preprocess_train_predict_on_s3(s3_faces, s3_server, mlflow_store, tmp_path):
    from hmhn.config import HMHNConfig
    from hmhn.data import iter_eval_batches, open_shardset
    from hmhn.model import HMHNScorer
    from hmhn.image import to_model_input
    from hmhn.metrics import video_scores
    from hmhn.scoring import OUTPUT_COLUMNS, ScoringConfig, score_videos
    from hmhn.serving import load_scoring_model
    from hmhn.train import TrainConfig, run_training

    import torch

    s3 = s3_server
    prefix, config, summary, rows = s3_faces["prefix"], s3_faces["config"], s3_faces["summary"], s3_faces["rows"]
    n_videos = len(rows)

    # ---- preprocessing: every video ok, frames where the 5 fps plan puts them, few big objects
    shard_set = summary["shard_set"]
    assert shard_set == s3.uri(f"{prefix}/faces/{preprocess_version(config)}")
    assert (summary["videos"], summary["ok"], summary["no_face"], summary["failed"]) == (n_videos, n_videos, 0, 0), \
        summary["problems"]
    assert summary["faces_total"] >= 4 * n_videos  # 5 sampled frames per 1 s clip, a face in (nearly) each
    assert summary["this_run"]["videos_processed"] == n_videos
    index = open_shardset(shard_set)  # through S3
    assert sorted(index.table.column("video_id").to_pylist()) == sorted(r["video_id"] for r in rows)
    assert sum(v.faces_kept for v in index.videos()) == summary["faces_total"]

    keys = _keys(s3, shard_set)
    shard_files = [k for k in keys if k.startswith("shards/")]
    log_files = [k for k in keys if k.startswith("log/")]
    tasks = math.ceil(n_videos / 3)  # videos_per_task=3: one shard file per task
    assert len(shard_files) == tasks == summary["this_run"]["shard_files_written"], keys
    assert all(k.startswith("shards/part-") and k.endswith(".parquet") for k in shard_files)
    assert 1 <= len(log_files) <= 2 and all(k.startswith("log/commit-") for k in log_files), keys
    assert set(keys) - set(shard_files) - set(log_files) == {"config.json", "index.parquet", "summary.json"}, \
        "unexpected objects (a per-video object, a lock left behind, a tmp index?)"
    assert len(keys) <= 3 + tasks + 2  # not one object (or more) per video
    referenced = index.table.column("file").to_pylist()
    assert set(referenced) == set(shard_files)
    assert max(referenced.count(f) for f in set(referenced)) == 3  # many videos share one file
    from pipeline.shardset import read_video_frames
    for video in index.videos():
        frames = read_video_frames(shard_set, video, ["video_id", "frame_index", "image"])
        assert frames.num_rows == video.faces_kept > 0
        assert set(frames.column("video_id").to_pylist()) == {video.video_id}
        assert set(frames.column("frame_index").to_pylist()) <= {0, 6, 12, 18, 24}
        crop = cv2.imdecode(np.frombuffer(frames.column("image")[0].as_py(), np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (SIZE, SIZE, 3)

    # ---- training: 1 epoch, 1 worker; shard set and Ray Train checkpoints on S3; registered in MLflow
    storage = s3.uri(f"{prefix}/ray_results")
    started = time.time()
    result = run_training(TrainConfig(
        data=shard_set, run_name="s3-run", workers=1, epochs=1, batch_size=4, frames_per_video=4,
        eval_batch_size=16, augmentation="flip", storage_path=storage, register=True, model_name=MODEL_NAME,
        promote=True,  # training registers @candidate only; --promote also moves @champion (scored below)
        model=HMHNConfig(input_size=SIZE, num_heads=2)))
    print(f"[s3 test] training took {time.time() - started:.1f} s")
    assert result.epochs_run == [1] and result.best_epoch == 1
    assert math.isfinite(result.best_dev_rmse) and result.test_rmse is not None and math.isfinite(result.test_rmse)
    assert result.model_uri == f"models:/{MODEL_NAME}/1" and result.champion_moved
    assert result.preprocess_version == preprocess_version(config)
    checkpoints = [k for k in _keys(s3, f"{storage}/s3-run") if k.endswith("/checkpoint.pt")]
    assert checkpoints, "Ray Train wrote no checkpoint to the S3 storage_path"
    assert not (tmp_path / "ray_results").exists()

    # ---- scoring: the registered champion, input the S3 manifest, workdir and output on S3
    output = s3.uri(f"{prefix}/out/scores.csv")
    workdir = s3.uri(f"{prefix}/scoring")
    started = time.time()
    table = score_videos(ScoringConfig(model=f"models:/{MODEL_NAME}@champion", input=(s3_faces["manifest"],),
                                       workdir=workdir, output=output, batch_size=16))
    print(f"[s3 test] scoring took {time.time() - started:.1f} s")
    scored = pd.read_csv(io.BytesIO(_get(output)), keep_default_na=False, na_values=[""])
    assert list(scored.columns) == OUTPUT_COLUMNS
    assert sorted(scored["video_id"]) == sorted(r["video_id"] for r in rows)  # one row per video
    assert scored["video_id"].is_unique
    scored = scored.set_index("video_id")
    assert (scored["status"] == "ok").all(), scored[["status", "reason"]]
    assert ((scored["score"] >= 0) & (scored["score"] <= 63)).all()
    assert set(scored["severity"]) <= {"minimal", "mild", "moderate", "severe"}
    pd.testing.assert_series_equal(scored["score"], table.set_index("video_id")["score"], atol=1e-3,
                                   check_names=False)  # the returned table is what was written

    # Scoring re-ran the model's own preprocessing into the S3 workdir: same version, same frames.
    score_set = f"{workdir}/{preprocess_version(config)}"
    score_index = open_shardset(score_set)
    kept = {v.video_id: v.faces_kept for v in score_index.videos()}
    assert kept == {v.video_id: v.faces_kept for v in index.videos()}
    assert {vid: int(scored.loc[vid, "frames_used"]) for vid in kept} == kept
    assert _shard_keys(s3, score_set), "scoring's preprocessing wrote no shards to the S3 workdir"

    # ... and the scores are training's evaluation path (shard JPEGs -> HMHNScorer -> per-video mean).
    model, _, input_size = load_scoring_model(f"models:/{MODEL_NAME}@champion")
    assert input_size == SIZE
    scorer = HMHNScorer(model, clamp=True).eval()
    ids, frame_scores = [], []
    with torch.no_grad():
        for batch_ids, images, _ in iter_eval_batches(score_set, score_index.videos(), SIZE, batch_size=7):
            frame_scores.extend(scorer(to_model_input(torch.from_numpy(images))).tolist())
            ids.extend(batch_ids)
    expected = video_scores(ids, frame_scores)
    assert sorted(expected) == sorted(kept)
    for vid, score in expected.items():
        assert scored.loc[vid, "score"] == pytest.approx(score, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# A killed run on S3 resumes with every video exactly once


def _job(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "preprocess.py"), *args]


@pytest.mark.slow
def test_killed_run_on_s3_resumes_with_every_video_exactly_once(s3_server, astronaut_rgb, tmp_path):
    from pipeline.shardset import ShardIndex, VideoEntry, read_log, read_video_frames, referenced_files

    s3 = s3_server
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    splits = ["train"] * 8
    manifest, rows = _upload_videos(s3, prefix, astronaut_rgb, tmp_path, splits)
    output = s3.uri(f"{prefix}/faces")
    config = PreprocessConfig(dataset="csv", input=manifest, output=output, sampling=FAST_SAMPLING,
                              align=AlignConfig(size=SIZE), num_detect_actors=1, videos_per_task=1, commit_every=1)
    shard_set = f"{output}/{preprocess_version(config)}"
    args = ("--dataset", "csv", "--input", manifest, "--output", output, "--sampling-fps", "5",
            "--sampling-chunk-frames", "4", "--align-size", str(SIZE), "--num-detect-actors", "1",
            "--videos-per-task", "1", "--commit-every", "1")
    # The S3 env is in os.environ (s3_server fixture): the job and its private Ray inherit it.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint
    proc = subprocess.Popen(_job(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        logged: list[str] = []
        while time.time() < deadline:
            logged = [k for k in _keys(s3, shard_set) if k.startswith("log/")]
            if logged:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        assert logged, "the run never committed a video"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first_output = proc.stdout.read()
    # Ray's worker processes have process groups of their own and exit once their raylet is gone: wait
    # until the listing of shards/ stops changing, so that no straggler lands after the rerun's cleanup.
    listing, stable_since, deadline = _shard_keys(s3, shard_set), time.time(), time.time() + 60
    while time.time() - stable_since < 2.0 and time.time() < deadline:
        time.sleep(0.25)
        now = _shard_keys(s3, shard_set)
        if now != listing:
            listing, stable_since = now, time.time()
    committed = read_log(shard_set)  # through pipeline.shardset, on the s3 URI
    n_committed = committed.num_rows
    assert 0 < n_committed < len(rows), f"kill came too late to test a resume ({n_committed} committed)\n{first_output}"
    assert set(committed.column("status").to_pylist()) == {"ok"}
    leftovers_before = _shard_keys(s3, shard_set) - referenced_files(committed)
    assert not [k for k in _keys(s3, shard_set) if k == "index.parquet"], "a killed run has no index"

    started = time.time()
    rerun = subprocess.run(_job(*args), capture_output=True, text=True, timeout=400, env=env)
    print(f"[s3 test] rerun took {time.time() - started:.1f} s; {n_committed} committed before the kill, "
          f"{len(leftovers_before)} unreferenced shard files then")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{n_committed} already done" in rerun.stdout, rerun.stdout
    assert f"shard_set: {shard_set}" in rerun.stdout

    index = ShardIndex.load(shard_set)
    ids = index.table.column("video_id").to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # every video exactly once
    assert set(index.table.column("status").to_pylist()) == {"ok"}
    # Videos committed before the kill were not redone: their log rows are those of the first run.
    first_run = committed.column("run_id")[0].as_py()
    full_log = read_log(shard_set, ["video_id", "run_id"])
    assert sorted(full_log.filter(pc.equal(full_log.column("run_id"), first_run)).column("video_id").to_pylist()) \
        == sorted(committed.column("video_id").to_pylist())

    seen: set[tuple[str, int]] = set()
    for row in index.table.to_pylist():
        entry = VideoEntry.from_row(row)
        frames = read_video_frames(shard_set, entry, ["video_id", "frame_index"])
        keys = list(zip(frames.column("video_id").to_pylist(), frames.column("frame_index").to_pylist()))
        assert len(keys) == len(set(keys)) == entry.faces_kept > 0, (entry.video_id, len(keys), entry.faces_kept)
        assert {v for v, _ in keys} == {entry.video_id}
        assert not seen & set(keys), "a frame is committed twice"
        seen |= set(keys)
    # No shard file that the index does not reference is left (killed run's leftovers deleted).
    shard_files = _shard_keys(s3, shard_set)
    assert shard_files == referenced_files(index.table), (shard_files, referenced_files(index.table))
    assert not leftovers_before & shard_files
    assert "_lock.json" not in _keys(s3, shard_set)


# ----------------------------------------------------------------------------------------------
# Objects no commit-log row points at are never read, and are deleted by the next run


@pytest.mark.slow
def test_stray_files_on_s3_are_never_read(s3_faces, s3_server):
    from hmhn.data import iter_eval_batches, open_shardset
    from hmhn.scoring import FRAME_COLUMNS, read_committed_frames
    from pipeline.schema import SHARD_SCHEMA
    from pipeline.shardset import ShardFileWriter, read_video_frames

    s3 = s3_server
    summary, config = s3_faces["summary"], s3_faces["config"]
    shard_set = summary["shard_set"]
    before = open_shardset(shard_set)
    real_files = _shard_keys(s3, shard_set)
    assert real_files == set(before.table.column("file").to_pylist())

    # 1. garbage: the first half of a real shard file (no footer), under a name like a real one's
    real = sorted(real_files)[0]
    data = _get(f"{shard_set}/{real}")
    _put(f"{shard_set}/shards/part-stray.parquet", data[: len(data) // 2])
    # 2. a VALID shard file, written the way a detector actor writes one, never committed: rows of an
    #    uncommitted video "ghost" and a second copy of every row of a committed video
    victim = before.videos()[0]
    rows = read_video_frames(shard_set, victim)
    ghost = rows.set_column(rows.schema.get_field_index("video_id"), "video_id",
                            pa.array(["ghost"] * rows.num_rows, pa.string()))
    writer = ShardFileWriter(shard_set, row_group_rows=2)
    ghost_file = writer.add_video(ghost).file
    assert writer.add_video(rows).file == ghost_file
    writer.close()
    stray = {"shards/part-stray.parquet", ghost_file}
    assert _shard_keys(s3, shard_set) == real_files | stray
    # The ghost file really is readable and holds what we meant (so "never read" below means something).
    fs, base = resolve_filesystem(shard_set)
    planted = pq.read_table(f"{base}/{ghost_file}", filesystem=fs)
    assert planted.schema.equals(SHARD_SCHEMA)
    assert planted.column("video_id").to_pylist().count("ghost") == rows.num_rows == victim.faces_kept

    # Readers go through the index only.
    index = open_shardset(shard_set)
    ids = index.table.column("video_id").to_pylist()
    assert "ghost" not in ids and sorted(ids) == sorted(before.table.column("video_id").to_pylist())
    assert set(index.table.column("file").to_pylist()) == real_files

    frame_ids: list[str] = []
    n_images = 0
    for batch_ids, images, _ in iter_eval_batches(shard_set, index.videos(), SIZE, batch_size=5):
        frame_ids.extend(batch_ids)
        n_images += len(images)
        assert images.shape[1:] == (SIZE, SIZE, 3)
    assert n_images == len(frame_ids) == summary["faces_total"]
    assert "ghost" not in frame_ids
    assert frame_ids.count(victim.video_id) == victim.faces_kept

    committed = read_committed_frames(index.select(), shard_set)  # the Ray Data UDF, called directly
    assert committed.column_names == FRAME_COLUMNS
    assert committed.num_rows == summary["faces_total"]
    assert "ghost" not in committed.column("video_id").to_pylist()
    keys = list(zip(committed.column("video_id").to_pylist(), committed.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate frames read"

    # The next run on the same output deletes both stray objects and nothing else.
    printed: list[str] = []
    again = run_preprocess(config, printer=printed.append)
    assert again["this_run"]["videos_processed"] == 0 and again["ok"] == summary["ok"]
    assert any("2 unreferenced shard files of an earlier run deleted" in line for line in printed), printed
    assert _shard_keys(s3, shard_set) == real_files
    after = open_shardset(shard_set)
    assert after.table.equals(before.table)
