"""Preprocessing end to end on a real local Ray: demo videos and every kind of bad input.

Videos are tiny (1 s) and sampled at 5 fps so the whole module stays well under two minutes.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from pipeline.decode import SamplingConfig
from pipeline.preprocess import PreprocessConfig, preprocess_config_from_dict, preprocess_version, run_preprocess
from pipeline.video_io import write_audio_only, write_mp4
from tests.conftest import REPO, face_frames

FAST_SAMPLING = SamplingConfig(mode="fps", fps=5.0, chunk_frames=4)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["video_id", "subject_id", "split", "label", "uri", "task"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"task": "", **r})
    return path


def _read_shards(shard_set: str):
    """Every committed row, read the way training and scoring read them: through the index."""
    import pyarrow as pa

    from pipeline.shardset import ShardIndex, read_video_frames

    index = ShardIndex.load(str(shard_set))
    tables = [read_video_frames(str(shard_set), v) for v in index.videos(with_frames=True)]
    return pa.concat_tables(tables) if tables else pa.table({"video_id": []})


def _status(shard_set) -> dict[str, dict]:
    return {s["video_id"]: s for s in pq.read_table(Path(shard_set) / "index.parquet").to_pylist()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory, astronaut_rgb, t1_rgb):
    """One good face video per subject plus every bad input the issue lists."""
    root = tmp_path_factory.mktemp("videos")
    good = {}
    for i in range(3):
        path = root / f"good{i}.mp4"
        write_mp4(path, face_frames(astronaut_rgb if i != 1 else np.fliplr(astronaut_rgb).copy(), 30))
        good[f"good{i}"] = path
    bad = {}
    (root / "zero.mp4").write_bytes(b"")
    bad["zero_byte"] = root / "zero.mp4"
    full = root / "full.mp4"
    write_mp4(full, face_frames(astronaut_rgb, 60))
    data = full.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    bad["truncated"] = root / "truncated.mp4"
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    bad["text_file"] = root / "text.mp4"
    write_audio_only(root / "audio.mp4", seconds=1.0)
    bad["audio_only"] = root / "audio.mp4"
    write_mp4(root / "noface.mp4", (np.full((240, 320, 3), 40 + 4 * i, np.uint8) for i in range(30)))
    bad["no_face"] = root / "noface.mp4"
    write_mp4(root / "group.mp4", face_frames(t1_rgb, 10, 640, 444))
    bad["several_faces"] = root / "group.mp4"
    write_mp4(root / "oneframe.mp4", face_frames(astronaut_rgb, 1))
    bad["one_frame"] = root / "oneframe.mp4"
    write_mp4(root / "huge.mp4", (np.zeros((2304, 4096, 3), np.uint8) for _ in range(1)))
    bad["huge_frame"] = root / "huge.mp4"
    bad["missing"] = root / "does_not_exist.mp4"
    return root, good, bad


def _rows(items: dict[str, Path], split: str = "train") -> list[dict]:
    return [{"video_id": vid, "subject_id": f"s_{vid}", "split": split, "label": 10 + i, "uri": str(p)}
            for i, (vid, p) in enumerate(items.items())]


def test_preprocess_version_is_the_same_for_the_same_settings():
    """The shard set's content hash of the default configuration, and of an SCRFD one, as they were before
    each face detector had its own settings: the same settings keep their shard sets and models valid.
    Options that do not change the shards (where they go, devices, speed) stay out of the hash."""
    from pipeline.detect import DetectorConfig, MtcnnSettings, ScrfdSettings

    assert preprocess_version(PreprocessConfig(input="x")) == "527b8bdbfb"
    scrfd = DetectorConfig(name="scrfd", score_threshold=0.5,
                           scrfd=ScrfdSettings(model_path="/models/buffalo_l", det_size=320, nms_threshold=0.3))
    assert preprocess_version(PreprocessConfig(input="x", detector=scrfd)) == "4a1fd4d06f"
    same = DetectorConfig(name="scrfd", score_threshold=0.5, use_gpu=True, batch_frames=8, intra_op_threads=0,
                          scrfd=ScrfdSettings(model_path="/models/buffalo_l", det_size=320, nms_threshold=0.3),
                          mtcnn=MtcnnSettings(model_path="/elsewhere"))  # not the chosen detector's
    assert preprocess_version(PreprocessConfig(input="y", output="z", detector=same, num_detect_actors=3,
                                               sampling=SamplingConfig(backend="pyav", chunk_frames=8))) == "4a1fd4d06f"
    assert preprocess_version(PreprocessConfig(input="x", detector=DetectorConfig(
        mtcnn=MtcnnSettings(min_face_size=20)))) != "527b8bdbfb"


def test_good_videos_become_readable_shards(ray_session, videos, tmp_path):
    root, good, _ = videos
    manifest = _write_manifest(tmp_path / "m.csv", _rows(good))
    config = PreprocessConfig(dataset="csv", input=str(manifest), output=str(tmp_path / "out"),
                              sampling=FAST_SAMPLING, progress_every_s=1)
    summary = run_preprocess(config)
    assert summary["ok"] == 3 and summary["failed"] == 0
    shard_set = summary["shard_set"]
    assert shard_set.endswith(preprocess_version(config))
    table = _read_shards(shard_set)  # plain pyarrow, no Ray extension types
    assert set(table.column("video_id").to_pylist()) == set(good)
    assert table.num_rows == summary["faces_total"] >= 12  # 5 frames each, a face in (nearly) every one
    assert set(table.column("preprocess_version").to_pylist()) == {preprocess_version(config)}
    row = table.slice(0, 1).to_pylist()[0]
    crop = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (224, 224, 3)
    x1, y1, x2, y2 = row["bbox"]
    pts = np.array(row["landmarks"]).reshape(5, 2)
    assert (pts[:, 0] >= x1 - 2).all() and (pts[:, 0] <= x2 + 2).all() and (pts[:, 1] >= y1 - 2).all()
    for vid in good:  # frame indices/timestamps are the 5 fps plan of a 30-frame clip
        frames = sorted(r["frame_index"] for r in table.filter(pds.field("video_id") == vid).select(["frame_index"]).to_pylist())
        assert set(frames) <= {0, 6, 12, 18, 24}
    assert {v: s["status"] for v, s in _status(shard_set).items()} == {v: "ok" for v in good}
    saved = json.loads(Path(shard_set, "config.json").read_text())
    assert preprocess_config_from_dict(saved) == config  # the stored config rebuilds the same run
    assert saved["format_version"] == 2
    # Plain pyarrow reads a shard file; all videos of a task share one file.
    files = sorted(Path(shard_set, "shards").glob("*.parquet"))
    assert pds.dataset([str(f) for f in files], format="parquet").count_rows() == table.num_rows

    # Rerun with the same config: nothing to do, nothing duplicated, nothing new written.
    again = run_preprocess(config)
    assert again["this_run"]["videos_processed"] == 0
    assert _read_shards(shard_set).num_rows == table.num_rows
    assert sorted(Path(shard_set, "shards").glob("*.parquet")) == files


def test_every_bad_input_gets_a_reason_and_the_run_goes_on(ray_session, videos, tmp_path):
    root, good, bad = videos
    rows = _rows({"good0": good["good0"]}) + _rows(bad, split="dev")
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    config = PreprocessConfig(dataset="csv", input=str(manifest), output=str(tmp_path / "out"),
                              sampling=FAST_SAMPLING, progress_every_s=1)
    summary = run_preprocess(config)
    status = _status(summary["shard_set"])
    assert set(status) == {r["video_id"] for r in rows}
    expect = {
        "zero_byte": ("failed", "zero-byte"),
        "truncated": ("failed", "truncated"),
        "text_file": ("failed", "not a video"),
        "audio_only": ("failed", "no video stream"),
        "no_face": ("no_face", "no face"),
        "several_faces": ("ok", "several faces"),
        "one_frame": ("ok", ""),
        "huge_frame": ("failed", "max_pixels"),
        "missing": ("failed", "not found"),
        "good0": ("ok", ""),
    }
    for vid, (want_status, want_reason) in expect.items():
        got = status[vid]
        assert got["status"] == want_status, (vid, got)
        if want_reason:
            assert want_reason in got["reason"], (vid, got["reason"])
        else:  # a clean video carries no reason at all
            assert got["reason"] == "", (vid, got["reason"])
    assert status["one_frame"]["frames_decoded"] == 1 and status["one_frame"]["faces_kept"] == 1
    table = _read_shards(summary["shard_set"])
    kept = set(table.column("video_id").to_pylist())
    assert kept == {"good0", "one_frame", "several_faces"}, "failed videos must not leave frames behind"
    assert summary["ok"] == 3 and summary["failed"] == 6 and summary["no_face"] == 1


def _job(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "preprocess.py"), *args]


def test_invalid_manifest_stops_before_any_work(tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", [
        {"video_id": "a", "subject_id": "s1", "split": "train", "label": 70, "uri": "a.mp4"},
        {"video_id": "a", "subject_id": "s1", "split": "test", "label": 3, "uri": "b.mp4"},
    ])
    proc = subprocess.run(_job("--dataset", "csv", "--input", str(manifest), "--output", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "row" in proc.stderr and "'a'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_all_videos_failing_exits_nonzero(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    manifest = _write_manifest(tmp_path / "m.csv", [
        {"video_id": "x", "subject_id": "s1", "split": "train", "label": 1, "uri": "x.mp4"}])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(_job("--dataset", "csv", "--input", str(manifest), "--output", str(tmp_path / "out"),
                               "--num-detect-actors", "1"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "zero-byte" in proc.stdout


def test_killed_run_resumes_with_every_frame_exactly_once(videos, tmp_path):
    """Kill the job (and its private Ray) mid-run, rerun: every video once, no duplicate frames."""
    root, good, _ = videos
    items = {f"v{i}": good[f"good{i % 3}"] for i in range(6)}
    manifest = _write_manifest(tmp_path / "m.csv", _rows(items))
    out = tmp_path / "out"
    args = ("--dataset", "csv", "--input", str(manifest), "--output", str(out), "--sampling-fps", "5",
            "--sampling-chunk-frames", "2", "--num-detect-actors", "1", "--commit-every", "1")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(_job(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    deadline = time.time() + 240
    logs = []
    while time.time() < deadline:
        logs = list(out.glob("*/log/commit-*.parquet"))
        if logs:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert logs, "the run never committed a video"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    shard_set = logs[0].parent.parent
    from pipeline.shardset import read_log

    committed_before = set(read_log(str(shard_set), ["video_id"]).column("video_id").to_pylist())
    assert 0 < len(committed_before) < len(items), "kill came too late to test a resume"

    rerun = subprocess.run(_job(*args), capture_output=True, text=True, timeout=400, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(committed_before)} already done" in rerun.stdout
    table = _read_shards(str(shard_set))
    keys = list(zip(table.column("video_id").to_pylist(), table.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate frames after resume"
    status = _status(shard_set)
    assert set(status) == set(items) and all(s["status"] == "ok" for s in status.values())
    for vid in items:  # the shards hold exactly what the status table says was kept
        assert sum(1 for v, _ in keys if v == vid) == status[vid]["faces_kept"] > 0
    # Files of the killed run that no committed video points at were deleted by the rerun.
    referenced = {s["file"] for s in status.values()}
    assert {f"shards/{p.name}" for p in (shard_set / "shards").glob("*.parquet")} == referenced


CRASH_DRIVER = """
import json, sys
import ray
from pipeline.preprocess import PreprocessConfig, run_preprocess
from pipeline.decode import SamplingConfig
ray.init(address="local", num_cpus=2, include_dashboard=False,
         runtime_env={"worker_process_setup_hook": "tests.crash_injection.install"})
config = PreprocessConfig(dataset="csv", input=sys.argv[1], output=sys.argv[2], num_detect_actors=1,
                          video_timeout_s=float(sys.argv[3]),
                          sampling=SamplingConfig(mode="fps", fps=5.0, chunk_frames=4))
print(json.dumps(run_preprocess(config, printer=lambda *a: None)))
"""


def test_a_video_that_kills_or_hangs_its_decoder_fails_alone(videos, tmp_path):
    """A process death while decoding (segfault, OOM kill) fails that video only, after one retry,
    instead of retrying for ever (Ray Data's default for actor tasks) or ending the run; a decoder
    that hangs fails its video at the per-video deadline and the actor goes on with the next one."""
    from tests.crash_injection import CRASH_MARKER, HANG_MARKER

    root, good, _ = videos
    crasher, hanger = tmp_path / f"{CRASH_MARKER}.mp4", tmp_path / f"{HANG_MARKER}.mp4"
    crasher.write_bytes(good["good0"].read_bytes())
    hanger.write_bytes(good["good0"].read_bytes())
    items = {"before": good["good0"], "crasher": crasher, "hanger": hanger, "after": good["good1"]}
    manifest = _write_manifest(tmp_path / "m.csv", _rows(items))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # workers import the hook
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", CRASH_DRIVER, str(manifest), str(tmp_path / "out"), "8"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - started < 240  # the hung decoder did not hold the run (it sleeps an hour)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 2 and summary["failed"] == 2, summary["problems"]
    assert "worker process died" in summary["problems"]["crasher"]
    assert summary["problems"]["hanger"].startswith("failed: deadline exceeded: no result after 8 s (--video-timeout-s)")
    table = _read_shards(summary["shard_set"])
    assert set(table.column("video_id").to_pylist()) == {"before", "after"}


def test_many_videos_share_a_file_in_strided_row_groups(ray_session, videos, tmp_path):
    """videos_per_task videos go into one big file; each video's frames are split into row groups of
    at most row_group_rows, group g holding every G-th frame (so one group is an evenly spaced sample)."""
    root, good, _ = videos
    items = {f"v{i}": good[f"good{i % 3}"] for i in range(4)}
    manifest = _write_manifest(tmp_path / "m.csv", _rows(items))
    config = PreprocessConfig(dataset="csv", input=str(manifest), output=str(tmp_path / "out"),
                              sampling=FAST_SAMPLING, videos_per_task=2, row_group_rows=2, num_detect_actors=1)
    summary = run_preprocess(config)
    assert summary["ok"] == 4 and summary["this_run"]["shard_files_written"] == 2
    shard_set = summary["shard_set"]
    status = _status(shard_set)
    assert len({s["file"] for s in status.values()}) == 2
    for vid, s in status.items():
        meta = pq.ParquetFile(Path(shard_set) / s["file"]).metadata
        groups = [meta.row_group(s["row_group_first"] + g) for g in range(s["row_group_count"])]
        assert s["row_group_count"] == -(-s["faces_kept"] // 2) and all(g.num_rows <= 2 for g in groups)
        assert sum(g.num_rows for g in groups) == s["faces_kept"]
        frames = [pq.ParquetFile(Path(shard_set) / s["file"]).read_row_group(s["row_group_first"] + g)
                  .column("frame_index").to_pylist() for g in range(s["row_group_count"])]
        ordered = sorted(f for group in frames for f in group)
        assert frames[0] == ordered[::s["row_group_count"]]  # group 0 = every G-th frame


def test_hostile_video_ids_are_refused_and_delete_nothing(tmp_path):
    """A manifest value never becomes a path: names that could leave the output are refused (exit 2)."""
    victim = tmp_path / "out" / "precious.txt"
    victim.parent.mkdir(parents=True)
    victim.write_text("earlier work")
    rows = [{"video_id": "../../precious", "subject_id": "s1", "split": "train", "label": 1, "uri": "a.mp4"},
            {"video_id": "a/b", "subject_id": "s2", "split": "train", "label": 1, "uri": "b.mp4"},
            {"video_id": ".hidden", "subject_id": "s3", "split": "train", "label": 1, "uri": "c.mp4"}]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    proc = subprocess.run(_job("--dataset", "csv", "--input", str(manifest), "--output", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "../../precious" in proc.stderr and "a/b" in proc.stderr and ".hidden" in proc.stderr
    assert victim.read_text() == "earlier work" and sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_the_lock(tmp_path, videos):
    from pipeline.shardset import RunLock

    root, good, _ = videos
    manifest = _write_manifest(tmp_path / "m.csv", _rows({"good0": good["good0"]}))
    config = PreprocessConfig(dataset="csv", input=str(manifest), output=str(tmp_path / "out"),
                              sampling=FAST_SAMPLING)
    from pipeline.preprocess import shard_set_path

    with RunLock(shard_set_path(config)):  # "another run" holds the lock, heartbeat fresh
        proc = subprocess.run(_job("--dataset", "csv", "--input", str(manifest), "--output", str(tmp_path / "out")),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "another preprocessing run is writing" in proc.stderr and "--force-unlock" in proc.stderr
    assert not list(Path(shard_set_path(config)).glob("shards/*"))


def test_avec2014_distribution_keeps_its_official_partitions(ray_session, videos, tmp_path):
    """The AVEC2014 tree as unpacked (subjects recurring across partitions, labels where AVEC puts
    them, a recording without a label): every video in its official split with its label, the
    recurrence reported in the log and the summary; a rerun asking for another split policy on the
    same output is refused (done videos would keep their old split)."""
    import shutil

    from pipeline.shardset import ShardSetError
    from tests.avec_fixtures import RECURRING_SUBJECTS, build_avec2014_tree

    root, good, _ = videos
    expected = build_avec2014_tree(tmp_path / "AVEC2014", lambda path: shutil.copyfile(good["good0"], path))
    lines: list[str] = []
    config = PreprocessConfig(dataset="avec2014", input=str(tmp_path / "AVEC2014"), output=str(tmp_path / "out"),
                              sampling=FAST_SAMPLING)
    summary = run_preprocess(config, printer=lines.append)
    assert summary["ok"] == len(expected)
    status = _status(summary["shard_set"])
    for video_id, (split, label, task) in expected.items():
        row = status[video_id]
        assert (row["split"], row["task"]) == (split, task)
        assert (row["label"] is None and label is None) or row["label"] == pytest.approx(label)
    recurring = summary["manifest"]["recurring_subjects"]
    assert recurring["count"] == len(RECURRING_SUBJECTS) and set(recurring["subject_ids"]) == set(RECURRING_SUBJECTS)
    assert any("recur" in line and "203" in line for line in lines)
    assert summary["manifest"]["unlabelled_video_ids"]
    with pytest.raises(ShardSetError, match="split_policy"):
        run_preprocess(PreprocessConfig(dataset="avec2014", input=str(tmp_path / "AVEC2014"),
                                        output=str(tmp_path / "out"), sampling=FAST_SAMPLING,
                                        split_policy="subject-disjoint"))
