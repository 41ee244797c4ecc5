"""hmhn.scoring + jobs/predict.py end to end: real demo videos and broken files -> preprocessing with the
model's stored config -> Ray Data inference -> scores.csv, checked against training's evaluation path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hmhn import HMHNConfig, HMHNScorer, video_scores
from hmhn.data import open_shardset
from hmhn.image import to_model_input
from hmhn.train import TrainConfig, evaluate_split
from pipeline.schema import severity_band
from tests.job_modules import load_job
from tests.test_serving import INPUT_SIZE, register_champion, small_scoring_model, training_preprocess_doc

REPO = Path(__file__).resolve().parents[1]


def load_predict_job():
    return load_job("predict")


@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory) -> Path:
    from pipeline.demo_data import DemoDataConfig, make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(DemoDataConfig(output=str(root), subjects=3, videos_per_subject=1, seconds=1.0, seed=5),
                      progress=False)
    return root


def direct_video_scores(model, shard_set: str) -> dict[str, float]:
    """Training's evaluation path, spelled out: shard JPEGs -> hmhn.image -> HMHNScorer -> video_scores."""
    from hmhn.data import iter_eval_batches, open_shardset

    index = open_shardset(shard_set)
    scorer = HMHNScorer(model, clamp=True).eval()
    ids, scores = [], []
    with torch.no_grad():
        for batch_ids, images, _ in iter_eval_batches(shard_set, index.videos(), INPUT_SIZE, batch_size=7):
            scores.extend(scorer(to_model_input(torch.from_numpy(images))).tolist())
            ids.extend(batch_ids)
    return video_scores(ids, scores)


def test_predict_job_matches_direct_evaluation_and_records_bad_videos(ray_session, mlflow_store, demo_videos,
                                                                      make_video, tmp_path):
    from pipeline.preprocess import preprocess_config_from_dict, shard_set_path

    model = small_scoring_model(seed=1)
    doc = training_preprocess_doc()
    uri = register_champion("hmhn-scoring", model, doc)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.mp4").write_text("this is a text file, not a video\n")
    (bad / "empty.mp4").write_bytes(b"")
    no_face = make_video("no_face.mp4", n_frames=20, width=96, height=64)  # moving bars, no face

    workdir, output, explain = tmp_path / "work", tmp_path / "out" / "scores.csv", tmp_path / "explain"
    job = load_predict_job()
    exit_code = job.main(["--model", uri, "--input", str(demo_videos), str(bad / "notes.mp4"), str(bad / "empty.mp4"),
                          str(no_face), "--output", str(output), "--workdir", str(workdir),
                          "--explain-dir", str(explain), "--explain-videos", "1"])
    assert exit_code == 0
    from ray.data import DataContext

    # Preprocessing ran in this process with its crash tolerance; scoring's own datasets must not
    # have inherited it (scoring sets 0 on its dataset; this checks the process-wide default).
    assert DataContext.get_current().max_errored_blocks == 0

    table = pd.read_csv(output, keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["video_id", "score", "frames_used", "score_std", "severity", "status", "reason"]
    rows = table.set_index("video_id")
    good = sorted(v for v in rows.index if v.startswith("20"))
    assert len(good) == 3 and len(rows) == 6

    # Same preprocessing as training (same version hash), same numbers as training's evaluation path.
    shard_set = shard_set_path(preprocess_config_from_dict(doc, output=str(workdir)))
    assert Path(shard_set).name == doc["preprocess_version"]
    expected = direct_video_scores(model, shard_set)
    assert sorted(expected) == good
    for video_id in good:
        row = rows.loc[video_id]
        assert row["status"] == "ok" and row["frames_used"] >= 3
        assert row["score"] == pytest.approx(expected[video_id], abs=1e-3)
        assert 0 < row["score"] < 63 and row["score_std"] >= 0
        assert row["severity"] == severity_band(row["score"])
        assert pd.isna(row["reason"])  # an empty cell in the CSV (read with na_values=[""]): no reason
    assert len({round(rows.loc[v, "score"], 3) for v in good}) == 3, "scores should differ between videos"

    # ... and the same as hmhn.train.evaluate_split, training's own evaluation function.
    index = open_shardset(shard_set)
    predictions, metrics = evaluate_split(model, index, "test", TrainConfig(data=shard_set, model=HMHNConfig(
        input_size=INPUT_SIZE)), train_mean=20.0)
    assert metrics["n_videos"] == 0  # new videos have no label: nothing to score against, no fallback
    assert sorted(predictions) == good
    for video_id, score in predictions.items():
        assert rows.loc[video_id, "score"] == pytest.approx(score, abs=1e-3)

    # Bad input: a row each that says what was wrong, and the run went on.
    assert rows.loc["notes", "status"] == "failed" and rows.loc["empty", "status"] == "failed"
    assert rows.loc["no_face", "status"] == "no_face"
    for video_id, words in (("notes", "not a video"), ("empty", "zero-byte"),
                            ("no_face", "no face above score threshold")):
        assert rows.loc[video_id, "frames_used"] == 0 and np.isnan(rows.loc[video_id, "score"])
        assert pd.isna(rows.loc[video_id, "severity"])  # no score, no band (an empty CSV cell)
        assert words in rows.loc[video_id, "reason"], (video_id, rows.loc[video_id, "reason"])

    first_scored = table.loc[table["status"] == "ok", "video_id"].iloc[0]  # explained: the first N in CSV order
    pictures = sorted(p.name for p in explain.iterdir())
    assert pictures == [f"{first_scored}_attention.png", f"{first_scored}_scores.png"]


def test_model_whose_preprocessing_cannot_be_reproduced_is_refused(mlflow_store, demo_videos, tmp_path):
    from hmhn.scoring import ScoringConfig, ScoringError, score_videos

    doc = training_preprocess_doc()
    doc["preprocess_version"] = "0123456789"  # as if the preprocessing code had changed since training
    uri = register_champion("hmhn-drift", small_scoring_model(), doc)
    with pytest.raises(ScoringError, match="cannot be reproduced"):
        score_videos(ScoringConfig(model=uri, input=(str(demo_videos),), output=str(tmp_path / "s.csv")))
    assert not (tmp_path / "s.csv").exists()


# The config.json of a shard set written before each face detector had its own settings (one flat
# DetectorConfig), for the config training_preprocess_doc() describes, and its preprocess_version.
STORED_BEFORE_DETECTOR_SETTINGS = {
    "preprocess_version": "924a84a4fc",
    "config": {"dataset": "csv", "input": "training-manifest.csv", "output": "faces", "labels": "", "split_policy": "",
               "split_seed": 0, "jpeg_quality": 92, "num_detect_actors": 0, "max_detect_actors": 0,
               "video_timeout_s": 3600.0, "resource_wait_s": 600.0, "gpu_per_actor": 0.25, "limit": 0,
               "progress_every_s": 10.0, "target_file_mb": 256.0, "row_group_rows": 32, "videos_per_task": 0,
               "commit_every": 500, "commit_interval_s": 30.0, "lock_stale_s": 600.0, "force_unlock": False,
               "sampling": {"mode": "fps", "fps": 5.0, "every_n": 10, "max_frames": 64, "chunk_frames": 32,
                            "backend": "auto", "max_pixels": 8294400},
               "detector": {"name": "mtcnn", "model_path": None, "det_size": 640, "min_face_size": 40,
                            "score_threshold": 0.9, "max_image_side": 640, "use_gpu": False, "nms_threshold": 0.4,
                            "intra_op_threads": 1, "allow_cpu_fallback": False, "batch_frames": 0},
               "align": {"size": INPUT_SIZE, "margin": 0.3, "face_selection": "largest"}}}


def test_models_stored_before_the_detectors_had_their_own_settings_still_score(tmp_path):
    """A registered model keeps the preprocessing config of its time: flat detector keys still load, and
    give the same preprocess_version (so scoring reproduces the preprocessing instead of refusing)."""
    import copy

    from hmhn.scoring import ScoringError, model_preprocessing
    from pipeline.detect import DetectorConfig

    old = copy.deepcopy(STORED_BEFORE_DETECTOR_SETTINGS)
    preprocess = model_preprocessing(old, "csv", "new-videos.csv", str(tmp_path))
    assert preprocess.detector == DetectorConfig() and preprocess.align.size == INPUT_SIZE
    assert training_preprocess_doc()["preprocess_version"] == old["preprocess_version"]  # today's form, same hash

    scrfd = copy.deepcopy(old)
    scrfd["config"]["detector"].update(name="scrfd", model_path="/models/buffalo_l", det_size=320)
    with pytest.raises(ScoringError, match="cannot be reproduced"):  # the version belongs to the MTCNN config
        model_preprocessing(scrfd, "csv", "new-videos.csv", str(tmp_path))
    scrfd["preprocess_version"] = ""  # no version stored: nothing to compare, the settings still land right
    detector = model_preprocessing(scrfd, "csv", "new-videos.csv", str(tmp_path)).detector
    assert (detector.scrfd.model_path, detector.scrfd.det_size, detector.mtcnn.model_path) == ("/models/buffalo_l", 320,
                                                                                                None)


def test_config_and_input_errors_are_clear(tmp_path):
    from hmhn.scoring import ScoringConfig, ScoringError, build_manifest

    with pytest.raises(ValueError, match="model is required"):
        ScoringConfig(input=("x",))
    with pytest.raises(ValueError, match="aggregate"):
        ScoringConfig(model="m", input=("x",), aggregate="max")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="no video files"):
        build_manifest(ScoringConfig(model="m", input=(str(tmp_path / "empty"),)))
    with pytest.raises(ScoringError, match="not found"):
        build_manifest(ScoringConfig(model="m", input=(str(tmp_path / "missing.mp4"),)))
    assert ScoringConfig(model="m", input="one.mp4").input == ("one.mp4",)


def _corrupt_images(shard_set: str, video_id: str) -> None:
    """Overwrite one committed video's JPEG bytes in place (same row groups), as bit rot would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shardset import ShardIndex

    entry = next(v for v in ShardIndex.load(shard_set).videos(with_frames=True) if v.video_id == video_id)
    path = Path(shard_set) / entry.file
    source = pq.ParquetFile(path)
    groups = [source.read_row_group(i) for i in range(source.num_row_groups)]
    for g in range(entry.row_group_first, entry.row_group_first + entry.row_group_count):
        column = groups[g].schema.get_field_index("image")
        groups[g] = groups[g].set_column(column, "image", pa.array([b"not a jpeg"] * groups[g].num_rows, pa.binary()))
    schema = source.schema_arrow
    source.close()
    with pq.ParquetWriter(path, schema) as out:
        for table in groups:
            out.write_table(table, row_group_size=max(1, table.num_rows))


def test_a_failed_inference_batch_fails_its_videos_with_the_reason(ray_session, tmp_path):
    """Inference errors surface as failed videos with a reason; the other videos are still scored."""
    from hmhn.data import write_synthetic_shardset
    from hmhn.scoring import read_status, score_frames, video_table
    from pipeline.shardset import ShardIndex

    shard_set = write_synthetic_shardset(str(tmp_path / "synth"), {"test": 3}, frames_per_video=4,
                                         size=INPUT_SIZE, row_group_rows=4, videos_per_file=3)
    _corrupt_images(shard_set, "test_001")
    lines: list[str] = []
    ids = ["test_000", "test_001", "test_002"]
    frames = score_frames(small_scoring_model(seed=1), shard_set, ids, batch_size=4, num_actors=1,
                          printer=lines.append)
    manifest = ShardIndex.load(shard_set, columns=["video_id"]).table
    table = video_table(manifest, read_status(shard_set), frames).set_index("video_id")
    assert table.loc["test_001", "status"] == "failed"
    assert table.loc["test_001", "reason"].startswith("inference failed (")  # the decoder's error follows
    assert "not a decodable JPEG/PNG image" in table.loc["test_001", "reason"], table.loc["test_001", "reason"]
    assert np.isnan(table.loc["test_001", "score"]) and table.loc["test_001", "frames_used"] == 0
    assert (table.loc[["test_000", "test_002"], "status"] == "ok").all()
    assert table.loc[["test_000", "test_002"], "frames_used"].tolist() == [4, 4]
    assert table.loc[["test_000", "test_002"], "reason"].tolist() == ["", ""]
