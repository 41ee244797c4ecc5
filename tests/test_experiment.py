"""Experiments (hmhn/experiment.py, jobs/experiment.py, jobs/report.py) on the session's local Ray.

One module-scoped experiment does the expensive part (2 variants x 2 seeds, 1 epoch, 64 px, 1 worker):
  call A: a driver in another process (its own Ray), SIGKILLed once one trial has finished: an
          interrupted experiment;
  call B: same name, here -> Tune restores it and runs the trials A did not finish; trial no_gwa/1
          fails (a file sits where its Ray Train run folder goes; no retries) -> 3 trials
          finished, 1 reported failed;
  call C: same name, the file gone -> runs only the failed trial, registers the best.
"""
from __future__ import annotations

import csv
import io
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hmhn import HMHNConfig
from hmhn.data import write_synthetic_shardset
from hmhn.experiment import (GRIDS, ExperimentConfig, apply_overrides, check_grid, comparison_table,
                             load_grid_file, table_csv, trial_rows_from_mlflow, trial_run_name)
from hmhn.train import TrainConfig
from tests.conftest import mlflow_store_in
from tests.interrupt import kill_when, start_driver

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
NAME = "exp_t"


def base_config(data: str) -> TrainConfig:
    return TrainConfig(data=data, workers=1, epochs=1, batch_size=8, frames_per_video=4, eval_batch_size=16,
                       lr=3e-4, head_lr=1e-3, max_failures=0, model_name="hmhn-exp-test", log_predictions=False,
                       model=HMHNConfig(input_size=SIZE, num_heads=2))


# ---- cheap: grids and overrides


def test_grids_and_overrides(tmp_path):
    assert list(GRIDS["ablations"]) == ["full", "no_gwa", "no_dff", "no_mab", "no_afb"]
    assert list(GRIDS["heads"]) == ["k1", "k2", "k3", "k4"]
    base = base_config("x")
    c = apply_overrides(base, GRIDS["ablations"]["no_mab"], seed=3)
    assert not c.model.use_mab and c.model.use_gwa and c.seed == 3 and c.model.input_size == SIZE
    assert apply_overrides(base, GRIDS["losses"]["no_partition"]).loss.partition_weight == 0.0
    grid = tmp_path / "g.yaml"
    grid.write_text("wide:\n  num_heads: 3\n  head_lr: 0.002\nsl1:\n  loss: {regression: smooth_l1}\nplain: {}\n")
    variants = load_grid_file(str(grid))
    assert variants == {"wide": {"model": {"num_heads": 3}, "head_lr": 0.002},
                        "sl1": {"loss": {"regression": "smooth_l1"}}, "plain": {}}
    c = apply_overrides(base, variants["wide"])
    assert c.model.num_heads == 3 and c.head_lr == 0.002
    with pytest.raises(ValueError, match="unknown override"):
        check_grid({"bad": {"nonsense": 1}})
    with pytest.raises(ValueError, match="cannot override"):
        check_grid({"bad": {"seed": 1}})
    with pytest.raises(ValueError, match="variant name"):
        check_grid({"a-b": {}})


def test_comparison_table_math():
    rows = [{"variant": "b", "seed": 0, "test_rmse": 1.0, "test_mae": 2.0, "dev_rmse": 3.0},
            {"variant": "b", "seed": 1, "test_rmse": 3.0, "test_mae": 4.0, "dev_rmse": 5.0},
            {"variant": "a", "seed": 0, "test_rmse": 7.0, "test_mae": 8.0, "dev_rmse": 9.0}]
    table = comparison_table(rows, order=["b", "a"])
    assert [r["variant"] for r in table] == ["b", "a"]
    assert table[0]["n_seeds"] == 2 and table[0]["test_rmse_mean"] == 2.0
    assert math.isclose(table[0]["test_rmse_std"], math.sqrt(2.0))
    assert table[1]["test_rmse_std"] == 0.0


# ---- the experiment on Ray + MLflow


INTERRUPTED_DRIVER = """
import pickle, sys
from hmhn.experiment import run_experiment
from pipeline.ray_utils import init_ray
init_ray(num_cpus=2)
run_experiment(pickle.load(open(sys.argv[1], "rb")))
"""


def _interrupt_after_first_trial(config: ExperimentConfig, uri: str, tmp: Path) -> dict[str, float]:
    """Run the experiment in another process and SIGKILL it (driver and its Ray, the whole session)
    as soon as one trial has finished; {run id: dev RMSE} of the trials finished by then."""
    (tmp / "config.pkl").write_bytes(pickle.dumps(config))
    proc = start_driver([sys.executable, "-c", INTERRUPTED_DRIVER, str(tmp / "config.pkl")], tmp / "interrupted.log",
                        cwd=tmp, MLFLOW_TRACKING_URI=uri,
                        TUNE_GLOBAL_CHECKPOINT_S="1")  # Tune saves its state every second

    def finished_trials() -> dict[str, float]:
        try:
            return {r["run_id"]: r["dev_rmse"] for r in trial_rows_from_mlflow(uri, "hmhn", NAME)[1]}
        except ValueError:  # no parent run yet
            return {}

    return kill_when(proc, finished_trials, tmp / "interrupted.log")


@pytest.fixture(scope="module")
def experiment(ray_session, tmp_path_factory):
    import mlflow

    from hmhn.experiment import run_experiment

    tmp = tmp_path_factory.mktemp("exp")
    data = write_synthetic_shardset(str(tmp / "faces" / "synth000"), {"train": 6, "dev": 3, "test": 2},
                                    frames_per_video=6, size=SIZE)
    with mlflow_store_in(tmp) as uri:
        config = ExperimentConfig(name=NAME, base=base_config(data), variants={"full": {}, "no_gwa": {"use_gwa": False}},
                                  seeds=2, storage_path=str(tmp / "ray_results"), trial_retries=0,
                                  max_concurrent_trials=1)
        interrupted = _interrupt_after_first_trial(config, uri, tmp)
        # A storage fault for one trial: a file where its Ray Train run folder goes.
        blocker = Path(config.root()) / NAME / "train" / trial_run_name(NAME, "no_gwa", 1)
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")
        first = run_experiment(config)
        blocker.unlink()
        client = mlflow.MlflowClient(uri)
        _, rows_a = trial_rows_from_mlflow(uri, "hmhn", NAME)
        finished_a = [r["run_id"] for r in rows_a]
        second = run_experiment(config)
        yield {"first": first, "second": second, "uri": uri, "data": data, "tmp": tmp, "finished_a": finished_a,
               "client": client, "interrupted": interrupted}


def test_interrupted_experiment_resumes_and_failed_trial_is_reported_then_resumed(experiment):
    first, second, client = experiment["first"], experiment["second"], experiment["client"]
    interrupted = experiment["interrupted"]
    # the killed driver's finished trial was kept: not trained again by the calls after it (Tune may
    # start it again if the kill came before Tune saved its state; the trial then reports its MLflow
    # metrics instead of training)
    assert len(interrupted) >= 1 and first.restored
    for run_id, dev_rmse in interrupted.items():
        assert len(client.get_metric_history(run_id, "train_loss")) == 1
        assert next(r for r in second.trials if r["run_id"] == run_id)["dev_rmse"] == dev_rmse
    assert first.failed == ["no_gwa/1"] and len(first.trials) == 3 and first.model_uri is None
    assert client.get_run(first.parent_run_id).data.tags["trials_done"] == "4/4"  # after the last call
    assert second.restored and second.failed == [] and len(second.trials) == 4
    assert second.parent_run_id == first.parent_run_id
    # the three trials finished by the first two calls were not trained again in the last one
    assert len(experiment["finished_a"]) == 3 and set(interrupted) <= set(experiment["finished_a"])
    for run in (client.get_run(r["run_id"]) for r in second.trials):
        if run.info.run_id not in experiment["finished_a"]:  # only the failed trial runs again
            assert (run.data.tags["hmhn.variant"], run.data.tags["hmhn.seed"]) == ("no_gwa", "1")
            assert int(run.data.tags["hmhn.trial_attempts"]) >= 2
        # every epoch logged once, also by a trial killed with the first driver and trained again
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"


def test_parent_child_structure_and_inputs(experiment):
    client, second = experiment["client"], experiment["second"]
    parent = client.get_run(second.parent_run_id)
    assert parent.data.tags["hmhn.experiment"] == NAME and "mlflow.parentRunId" not in parent.data.tags
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert names == [f"{NAME}-full-s0", f"{NAME}-full-s1", f"{NAME}-no_gwa-s0", f"{NAME}-no_gwa-s1"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["seed"] == child.data.tags["hmhn.seed"]
        assert child.data.params["model.use_gwa"] == str(child.data.tags["hmhn.variant"] == "full")
        assert {d.dataset.digest for d in child.inputs.dataset_inputs} == {"synth000"}
    assert {d.dataset.digest for d in parent.inputs.dataset_inputs} == {"synth000"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {"comparison/table.csv", "comparison/table.md", "comparison/plot.png"}


def test_table_equals_child_metrics(experiment):
    client, second = experiment["client"], experiment["second"]
    children = client.search_runs([client.get_run(second.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{second.parent_run_id}'")
    for row in second.table:
        mine = [c for c in children if c.data.tags["hmhn.variant"] == row["variant"]]
        assert row["n_seeds"] == len(mine) == 2
        for short, key in (("test_rmse", "best_test_rmse"), ("test_mae", "best_test_mae"),
                           ("dev_rmse", "best_dev_rmse")):
            values = np.array([c.data.metrics[key] for c in mine])
            assert math.isclose(row[f"{short}_mean"], values.mean(), rel_tol=1e-9)
            assert math.isclose(row[f"{short}_std"], values.std(ddof=1), rel_tol=1e-9, abs_tol=1e-12)
    logged = Path(client.download_artifacts(second.parent_run_id, "comparison/table.csv",
                                            str(experiment["tmp"] / "dl"))).read_text()
    assert logged == second.table_csv == table_csv(second.table)
    assert [r["variant"] for r in csv.DictReader(io.StringIO(logged))] == ["full", "no_gwa"]


def test_only_best_trial_registered(experiment):
    client, second = experiment["client"], experiment["second"]
    versions = client.search_model_versions("name = 'hmhn-exp-test'")
    assert len(versions) == 1 and second.model_uri == f"models:/hmhn-exp-test/{versions[0].version}"
    assert versions[0].run_id == second.best["run_id"]
    assert second.best["dev_rmse"] == min(r["dev_rmse"] for r in second.trials)
    assert client.get_registered_model("hmhn-exp-test").aliases == {"candidate": versions[0].version}


def test_report_rebuilds_from_mlflow(experiment):
    out = experiment["tmp"] / "report"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), "--experiment", NAME,
                           "--mlflow-uri", experiment["uri"], "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=experiment["tmp"])
    assert done.returncode == 0, done.stderr
    assert (out / "table.csv").read_text() == experiment["second"].table_csv
    assert (out / "table.md").read_text() == experiment["second"].table_md
    assert (out / "plot.png").stat().st_size > 1000


def test_refit_dataset_view(tmp_path):
    """--refit-on-dev's shard-set view: dev videos become training videos, shards untouched, new version."""
    from hmhn.data import open_shardset
    from hmhn.experiment import refit_dataset

    data = write_synthetic_shardset(str(tmp_path / "faces" / "synth000"), {"train": 4, "dev": 2, "test": 2},
                                    frames_per_video=4, size=SIZE)
    view = refit_dataset(data, str(tmp_path / "refit"))
    index, original = open_shardset(view), open_shardset(data)
    assert index.preprocess_version == "synth000+dev" and original.preprocess_version == "synth000"
    assert (index.count("train"), index.count("dev"), index.count("test")) == (6, 0, 2)
    assert (original.count("train"), original.count("dev")) == (4, 2)  # the original is not written through
    shards = sorted(p.name for p in (Path(data) / "shards").iterdir())
    assert sorted(p.name for p in (Path(view) / "shards").iterdir()) == shards
    assert refit_dataset(data, str(tmp_path / "refit")) == view  # reused


def test_refit_on_dev_retrains_on_train_and_dev_and_reports_test(ray_session, tmp_path, mlflow_store):
    """--refit-on-dev: the trial's best epoch count, retrained on train + dev, evaluated on test."""
    import mlflow

    from hmhn.experiment import PARENT_TAG, run_experiment

    data = write_synthetic_shardset(str(tmp_path / "faces" / "synth000"), {"train": 4, "dev": 2, "test": 2},
                                    frames_per_video=6, size=SIZE)
    uri = mlflow_store
    run_experiment(ExperimentConfig(name="exp_refit", base=base_config(data), variants={"full": {}}, seeds=1,
                                    storage_path=str(tmp_path / "ray_results"), trial_retries=0,
                                    refit_on_dev=True, register_best=False))
    _, rows = trial_rows_from_mlflow(uri, "hmhn", "exp_refit")
    (trial,) = rows
    client = mlflow.MlflowClient(uri)
    child = client.get_run(trial["run_id"])
    assert child.data.metrics["refit_epochs"] == 1.0 and math.isfinite(child.data.metrics["refit_test_rmse"])
    refits = client.search_runs([child.info.experiment_id],
                                filter_string=f"tags.`{PARENT_TAG}` = '{child.info.run_id}'")
    (refit,) = refits
    assert refit.data.params["train_videos"] == "6"  # 4 train + 2 dev videos
    assert refit.data.params["epochs"] == "1"
    assert refit.data.metrics["best_test_rmse"] == pytest.approx(child.data.metrics["refit_test_rmse"])
