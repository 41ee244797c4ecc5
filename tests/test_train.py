"""Distributed training end to end: real local Ray (the session's 2-CPU instance), real MLflow.

Training runs are expensive on 2 cores (~30 s each), so one module-scoped fixture trains the
run that most assertions share:
  call A: `jobs/train_ddp.py --run-name shared --epochs 2` (2 workers) in another process with its
          own Ray, SIGKILLed - the driver and that Ray - as soon as an epoch is in MLflow;
  call B: same run name, --epochs 3, here, with rank 1 killed once at the start of epoch 3
          (tests/train_faults.py) -> resumes after A's last committed epoch (1, rarely 2), loses a
          worker in epoch 3, restarts from the epoch-2 checkpoint, finishes and registers.
The alias logic is tested on the registry directly with fake versions; the MLflow-server test
trains one more tiny 1-worker run, whose loss turns NaN at epoch 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hmhn import HMHN, HMHNConfig, video_metrics
from hmhn.data import (ShardSetError, check_trainable, open_shardset, sample_train_frames, uniform_positions,
                       write_synthetic_shardset)
from hmhn.evaluation import evaluate_split
from hmhn.train import TrainConfig, run_training
from hmhn.train_checkpoint import model_from_checkpoint
from tests.conftest import mlflow_store_in, running_mlflow_server
from tests.interrupt import kill_when, start_driver
from tests.train_faults import Faults, inject

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # crops and model input: HMHN needs a multiple of its 4x4 grid, >= 32


def tiny_config(data: str, **overrides) -> TrainConfig:
    values = dict(data=data, workers=2, epochs=1, batch_size=8, frames_per_video=4, eval_batch_size=16,
                  lr=3e-4, head_lr=1e-3, max_failures=2, model_name="hmhn-test",
                  model=HMHNConfig(input_size=SIZE, num_heads=2))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("faces") / "synth000"
    # 5 dev and 5 test videos: with 2 workers each split has videos on both ranks (owner_rank:
    # dev_000..003 -> 1, dev_004 -> 0; test_000..003 -> 0, test_004 -> 1), so the distributed
    # evaluation really merges two non-empty halves (test_distributed_metrics_equal_single_process).
    return write_synthetic_shardset(str(root), {"train": 6, "dev": 5, "test": 5}, frames_per_video=6, size=SIZE)


@pytest.fixture(scope="module")
def module_mlflow(tmp_path_factory):
    """Like conftest's mlflow_store, for module-scoped fixtures."""
    with mlflow_store_in(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _logged_epochs(uri: str, run_name: str, key: str = "dev_rmse") -> list[int]:
    """The steps of `key` in the MLflow run of a training run name (every run with that name)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hmhn")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`hmhn.run_name` = '{run_name}'")
    return sorted(m.step for run in runs for m in client.get_metric_history(run.info.run_id, key))


def _train_then_kill_the_driver(data: str, storage: Path, uri: str) -> list[int]:
    """Call A: the job in another process with its own Ray, SIGKILLed (driver and Ray) once an epoch
    is in MLflow; the epochs logged by then."""
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # the store's schema exists before two processes open it
    folder = Path(uri.removeprefix("sqlite:///")).parent
    driver = start_driver([sys.executable, str(REPO / "jobs" / "train_ddp.py"), "--data", data, "--run-name", "shared",
                           "--epochs", "2", "--workers", "2", "--batch-size", "8", "--frames-per-video", "4",
                           "--eval-batch-size", "16", "--lr", "3e-4", "--head-lr", "1e-3", "--max-failures", "2",
                           "--model-name", "hmhn-test", "--input-size", str(SIZE), "--num-heads", "2",
                           "--storage-path", str(storage)], folder / "killed-driver.log", cwd=folder)
    # Polled often: the sooner after the log, the likelier the kill lands before Ray Train's commit.
    return kill_when(driver, lambda: _logged_epochs(uri, "shared"), folder / "killed-driver.log", every=0.3)


@pytest.fixture(scope="module")
def trained(ray_session, shard_root, module_mlflow, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ray_results")
    marker = storage / "killed-once"
    logged_before_kill = _train_then_kill_the_driver(shard_root, storage, module_mlflow)
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, Faults(kill_rank1_at_epoch=3, kill_marker=str(marker)))
        second = run_training(tiny_config(shard_root, run_name="shared", storage_path=str(storage), epochs=3))
    return {"logged_before_kill": logged_before_kill, "second": second, "marker": marker, "uri": module_mlflow,
            "data": shard_root}


# ----------------------------------------------------------------------------------------------
# Cheap unit tests (no Ray)


def test_uniform_positions_fixed_count_and_spread():
    assert uniform_positions(100, 4, 0.0).tolist() == [0, 25, 50, 75]
    assert uniform_positions(100, 4, 0.99).tolist() == [24, 49, 74, 99]
    short = uniform_positions(3, 7, 0.5).tolist()  # short video: repeats, still k samples, all frames used
    assert len(short) == 7 and sorted(set(short)) == [0, 1, 2] and short == sorted(short)


def test_train_frames_fixed_per_video_and_redrawn(shard_root):
    index = open_shardset(shard_root)
    row = index.select("train", with_frames=True).slice(0, 1)
    video = index.videos("train")[0]
    batch = {name: row.column(name).to_numpy(zero_copy_only=False) for name in row.column_names}
    draws = [sample_train_frames(batch, shard_root, 3, SIZE, augmentation="none") for _ in range(12)]
    assert all(d["image"].shape == (3, SIZE, SIZE, 3) and d["image"].dtype == np.uint8 for d in draws)
    assert all(np.allclose(d["label"], video.label) for d in draws)
    assert len({d["image"].tobytes() for d in draws}) > 1  # re-drawn: not the same frames every epoch


def test_shardset_errors(tmp_path):
    with pytest.raises(ShardSetError, match="no index.parquet.*OUTPUT/<preprocess_version>"):
        open_shardset(str(tmp_path))
    (tmp_path / "log").mkdir()
    with pytest.raises(ShardSetError, match="did not finish.*Rerun the same preprocessing command"):
        open_shardset(str(tmp_path))
    old = tmp_path / "old"  # format 1: a folder per video and status.parquet
    (old / "shards" / "v1").mkdir(parents=True)
    (old / "status.parquet").write_bytes(b"")
    (old / "config.json").write_text(json.dumps({"preprocess_version": "abc", "config": {}}))
    with pytest.raises(ShardSetError, match="format 1.*Rerun preprocessing"):
        open_shardset(str(old))
    no_dev = write_synthetic_shardset(str(tmp_path / "nodev"), {"train": 2, "test": 1}, frames_per_video=2)
    with pytest.raises(ShardSetError, match="no dev videos.*--allow-no-dev"):
        check_trainable(open_shardset(no_dev))
    check_trainable(open_shardset(no_dev), allow_no_dev=True)
    no_train = write_synthetic_shardset(str(tmp_path / "notrain"), {"dev": 1}, frames_per_video=2)
    with pytest.raises(ShardSetError, match="no training videos"):
        check_trainable(open_shardset(no_train))


def test_cli_reports_missing_shards(tmp_path, monkeypatch):
    import runpy

    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the job edits it; restore after
    job = runpy.run_path(str(REPO / "jobs" / "train_ddp.py"))
    with pytest.raises(SystemExit, match="error: no index.parquet"):
        job["main"](["--data", str(tmp_path), "--input-size", "64", "--num-heads", "2"])
    with pytest.raises(SystemExit):
        job["main"](["--epochs", "2"])  # --data is required


def test_attention_maps_only_rendered_when_asked(shard_root):
    from hmhn.evaluation import log_attention_maps

    class Recorder:
        def __init__(self):
            self.figures = []

        def log_figure(self, figure, artifact_file):
            self.figures.append((figure, artifact_file))

    config = tiny_config(shard_root, log_attention_maps=True, attention_frames=2)
    recorder = Recorder()
    model = HMHN(dataclasses.replace(config.model)).eval()
    log_attention_maps(recorder, model, open_shardset(shard_root), config, "cpu")
    (figure, name), = recorder.figures
    assert name == "evaluation/attention_maps.png" and len(figure.axes) == 2 * (1 + config.model.num_heads)
    with pytest.raises(ValueError, match="run_name"):
        TrainConfig(run_name="a b'; drop")


def test_alias_champion_moves_only_on_improvement(mlflow_store):
    """Registration gives `candidate` only; `promote` (jobs/promote.py) moves `champion` on improvement."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from hmhn.tracking import PromotionError, promote, register_candidate

    client = MlflowClient()
    name = "alias-test"
    client.create_registered_model(name)
    versions = [client.create_model_version(name, source=f"file:///nowhere/{i}").version for i in range(5)]

    def candidate(i: int, rmse: float) -> None:  # what training does with a new version
        register_candidate(mlflow_store, name, versions[i], rmse)
        assert client.get_model_version_by_alias(name, "candidate").version == versions[i]

    def champion() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, "champion").version)
        except MlflowException:
            return None

    candidate(0, 8.0)
    assert champion() is None                                               # registering never promotes
    first = promote(mlflow_store, name)                                     # the @candidate by default
    assert first.moved and first.champion_before is None and champion() == str(versions[0])
    candidate(1, 9.0)
    worse = promote(mlflow_store, name)                                     # worse: stays candidate only
    assert not worse.moved and worse.champion_after == str(versions[0]) and "does not beat" in worse.reason
    assert client.get_model_version_by_alias(name, "candidate").version == versions[1]
    candidate(2, 8.0)
    assert not promote(mlflow_store, name, version=versions[2]).moved      # a tie is not an improvement
    candidate(3, 7.5)
    better = promote(mlflow_store, name, version=versions[3])              # better: champion moves
    assert better.moved and (better.champion_before, better.champion_after) == (str(versions[0]), str(versions[3]))
    assert champion() == str(versions[3]) and "champion since" in client.get_model_version(
        name, versions[3]).tags["promoted"]
    assert not promote(mlflow_store, name, version=versions[3]).moved      # already champion: nothing to do
    client.delete_model_version_tag(name, versions[3], "dev_rmse")          # champion of unknown quality ...
    candidate(4, 1.0)
    assert not promote(mlflow_store, name, version=versions[4]).moved      # ... is left alone
    assert champion() == str(versions[3])
    client.delete_model_version_tag(name, versions[4], "dev_rmse")
    for bad in ({"version": versions[4]}, {"version": "99"}, {"alias": "nonexistent"}):
        with pytest.raises(PromotionError):                                 # no metric / no version / no alias
            promote(mlflow_store, name, **bad)
    with pytest.raises(PromotionError, match="no registered model"):
        promote(mlflow_store, "no-such-model")
    assert [m.name for m in client.search_registered_models()] == [name]   # no lock left behind


# ----------------------------------------------------------------------------------------------
# One shared distributed run


def test_killed_driver_rerun_and_lost_worker_resume_from_checkpoints_logging_each_epoch_once(trained):
    from mlflow import MlflowClient

    second = trained["second"]
    assert trained["logged_before_kill"] in ([1], [1, 2])       # call A died mid-run, before its end
    assert trained["marker"].exists()                          # rank 1 really died once
    # Call B continued A's run; its last worker group was restarted from the epoch-2 checkpoint.
    assert second.epochs_run == [3] and second.history[0]["start_epoch"] == 2
    client = MlflowClient(trained["uri"])
    run = client.get_run(second.run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one MLflow run across the kill and the rerun
    for key in ("train_loss", "dev_rmse", "lr", "epoch_seconds"):  # every epoch trained and logged exactly once
        assert _logged_epochs(trained["uri"], "shared", key) == [1, 2, 3], key
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.tags["changed.epochs"] == "3"
    # The killed call registered nothing; call B (resumed, with a worker restart inside it) registered once.
    versions = client.search_model_versions("name='hmhn-test'")
    assert [(str(v.version), v.run_id) for v in versions] == [(second.model_version, second.run_id)]


def test_registered_champion_loads_and_predicts(trained):
    import base64

    import mlflow
    import pandas as pd

    from hmhn import HMHNScorer
    from hmhn.image import encode_jpeg, to_model_input
    from hmhn.serving import load_scoring_model

    from hmhn.tracking import promote

    second = trained["second"]
    assert second.model_uri == f"models:/hmhn-test/{second.model_version}"
    # Training registered @candidate and moved nothing; promotion is its own step.
    assert not second.champion_moved
    with pytest.raises(Exception, match="champion"):
        load_scoring_model("models:/hmhn-test@champion")
    promotion = promote(trained["uri"], "hmhn-test")
    assert promotion.moved and promotion.version == second.model_version
    # The registered model is the scoring model: plain torch for batch scoring ...
    champion, preprocess_config, input_size = load_scoring_model("models:/hmhn-test@champion")
    assert input_size == SIZE and preprocess_config["preprocess_version"] == second.preprocess_version
    # ... and a pyfunc taking base64 face crops, as `mlflow models serve` does.
    crops = np.random.default_rng(0).integers(0, 255, size=(5, SIZE, SIZE, 3), dtype=np.uint8)
    frame = pd.DataFrame({"image": [base64.b64encode(encode_jpeg(c)).decode() for c in crops]})
    out = mlflow.pyfunc.load_model("models:/hmhn-test@candidate").predict(frame)
    assert len(out) == 5 and ((out["score"] >= 0) & (out["score"] <= 63)).all()
    # candidate = this run's model = the best checkpoint's weights
    model, _ = model_from_checkpoint(second.checkpoint_path)
    from hmhn.image import decode_jpeg

    x = to_model_input(np.stack([decode_jpeg(encode_jpeg(c), SIZE) for c in crops]))
    expected = HMHNScorer(model).eval()(x).detach().numpy()
    assert np.allclose(out["score"].to_numpy(), expected, atol=1e-3)
    assert np.allclose(HMHNScorer(champion).eval()(x).detach().numpy(), expected, atol=1e-3)
    # The pt2 export of the same model sits beside it in the run.
    pt2 = mlflow.pytorch.load_model(f"runs:/{second.run_id}/model_pt2")
    assert np.allclose(pt2(x).detach().numpy(), expected, atol=1e-3)


def test_distributed_metrics_equal_single_process(trained):
    """The 2-worker evaluation (each rank scores the videos it owns, the halves are all-gathered) gives
    the same per-video predictions and metrics as one process scoring every video."""
    import csv

    from mlflow import MlflowClient

    from hmhn.data import owner_rank

    second = trained["second"]
    model, state = model_from_checkpoint(second.checkpoint_path)
    config = TrainConfig.from_dict(state["config"])
    index = open_shardset(trained["data"])
    for split in ("dev", "test"):  # both ranks own videos of each split: the merge joins two non-empty halves
        owners = [owner_rank(v.video_id, 2) for v in index.videos(split, with_frames=True)]
        assert sorted(set(owners)) == [0, 1], (split, owners)
    mean = index.train_mean()
    dev_predictions, dev = evaluate_split(model, index, "dev", config, mean)     # one process, every frame
    assert dev["n_videos"] == 5 and dev["n_videos_fallback"] == 0
    assert math.isclose(dev["rmse"], state["metrics"]["dev_rmse"], rel_tol=1e-5, abs_tol=1e-4)
    assert math.isclose(dev["mae"], state["metrics"]["dev_mae"], rel_tol=1e-5, abs_tol=1e-4)
    assert math.isclose(dev["rmse"], second.best_dev_rmse, rel_tol=1e-5, abs_tol=1e-4)
    test_predictions, test = evaluate_split(model, index, "test", config, mean)
    assert math.isclose(test["rmse"], second.test_rmse, rel_tol=1e-5, abs_tol=1e-4)
    assert math.isclose(test["mae"], second.test_mae, rel_tol=1e-5, abs_tol=1e-4)
    truth = index.labels("test")  # the baseline: the training mean predicted for every test video
    baseline = video_metrics({v: mean for v in truth}, truth)
    assert (second.baseline_test_rmse, second.baseline_test_mae) == pytest.approx((baseline["rmse"], baseline["mae"]))
    # Per video: the run's table (the merged 2-rank evaluation, printed to 3 decimals) has every video,
    # none as a training-mean fallback, each with the single-process prediction.
    table = MlflowClient(trained["uri"]).download_artifacts(second.run_id, "evaluation/video_predictions.csv")
    with open(table, newline="") as f:
        logged = {(r["split"], r["video_id"]): r for r in csv.DictReader(f)}
    single = {**{("dev", v): p for v, p in dev_predictions.items()},
              **{("test", v): p for v, p in test_predictions.items()}}
    assert sorted(logged) == sorted(single)
    for key, prediction in single.items():
        assert logged[key]["fallback"] == "0", key
        assert float(logged[key]["prediction"]) == pytest.approx(prediction, abs=1e-3), key


def _assert_run_logged(client, run_id: str, n_videos: int, world_size: int) -> None:
    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["model.input_size"] == str(SIZE) and params["world_size"] == str(world_size)
    assert params["preprocess_version"] == "synth000"
    for key in ("train_loss", "dev_rmse", "dev_mae", "lr", "samples_per_s", "best_dev_rmse", "best_test_rmse",
                "baseline_test_rmse"):
        assert key in metrics, key
    files = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert files == {"evaluation/video_predictions.csv", "evaluation/predicted_vs_true.png"}  # no faces
    table = client.download_artifacts(run_id, "evaluation/video_predictions.csv")
    assert len(Path(table).read_text().strip().splitlines()) == 1 + n_videos
    config = client.download_artifacts(run_id, "preprocessing/config.json")
    assert json.loads(Path(config).read_text())["preprocess_version"] == "synth000"


def test_mlflow_run_contents(trained):
    from mlflow import MlflowClient

    client = MlflowClient(trained["uri"])
    second = trained["second"]
    _assert_run_logged(client, second.run_id, n_videos=10, world_size=2)
    version = client.get_model_version_by_alias("hmhn-test", "candidate")
    assert second.model_uri == f"models:/hmhn-test/{version.version}"
    assert float(version.tags["dev_rmse"]) == pytest.approx(second.best_dev_rmse)
    assert version.tags["preprocess_version"] == "synth000"


# ----------------------------------------------------------------------------------------------
# A real MLflow server; a run that diverges ends cleanly


@pytest.fixture
def mlflow_server(tmp_path):
    with running_mlflow_server(tmp_path) as url:
        yield url


def test_a_diverging_run_against_an_mlflow_server_registers_its_last_good_epoch(ray_session, shard_root, mlflow_server,
                                                                              tmp_path, monkeypatch):
    """One 1-worker run for two stories (a training run costs ~30 s here): a real `mlflow server`,
    and a loss that turns NaN at epoch 2 (tests/train_faults.py): the run stops cleanly there, and
    --promote registers and promotes the last good epoch's model."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    inject(monkeypatch, Faults(nan_at_epoch=2))
    result = run_training(tiny_config(shard_root, run_name="server-run", workers=1, epochs=3, mlflow_uri=mlflow_server,
                                      storage_path=str(tmp_path / "ray_results"), promote=True))  # --promote
    assert result.diverged_at_epoch == 2 and result.epochs_run == [1]
    assert result.best_epoch == 1 and math.isfinite(result.best_dev_rmse)
    state = model_from_checkpoint(result.checkpoint_path)[1]
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diverged_at_epoch"] == "2"
    _assert_run_logged(client, result.run_id, n_videos=10, world_size=1)
    assert result.champion_moved and result.model_uri == "models:/hmhn-test/1"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    try:
        scores = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model_pt2")(torch.randn(2, 3, SIZE, SIZE))
        from hmhn.serving import load_scoring_model

        load_scoring_model("models:/hmhn-test@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert scores.shape == (2,)
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------------------------
# AVEC scoring rules: every labelled dev/test video is predicted


def test_videos_without_faces_are_scored_with_the_training_mean(tmp_path):
    root = write_synthetic_shardset(str(tmp_path / "synth"), {"train": 3, "dev": 2, "test": 2}, frames_per_video=4,
                                    size=SIZE, no_face={"dev": 1, "test": 2})
    index = open_shardset(root)
    config = tiny_config(root)
    model = HMHN(config.model).eval()
    mean = index.train_mean()
    predictions, metrics = evaluate_split(model, index, "test", config, mean)
    assert metrics["n_videos"] == 4 and metrics["n_videos_fallback"] == 2       # AVEC: all videos count
    assert metrics["fallback_videos"] == ["test_noface_000", "test_noface_001"]
    assert all(predictions[v] == mean for v in metrics["fallback_videos"])
    truth = index.labels("test")
    expected = math.sqrt(np.mean([(predictions[v] - truth[v]) ** 2 for v in truth]))
    assert math.isclose(metrics["rmse"], expected, rel_tol=1e-9)
    _, dev = evaluate_split(model, index, "dev", config, mean)
    assert dev["n_videos"] == 3 and dev["n_videos_fallback"] == 1
