"""MLflow for training runs: one run per training run, per-epoch logging, plots, model registry.

Who does what:
* the driver finds or creates the run (one MLflow run per training run name, across restarts and
  reruns: found again by the tag `hmhn.run_name`), and at the end logs + registers the model;
* rank 0 reattaches by run_id through `RunLogger` (an MlflowClient bound to the run: no process
  globals, no second run) and logs params, per-epoch metrics and evaluation artifacts.

Face crops are health data: nothing here logs an image of a face unless the caller asked for
attention maps explicitly (TrainConfig.log_attention_maps).
"""
from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "hmhn.run_name"
CANDIDATE, CHAMPION = "candidate", "champion"
DEV_RMSE_TAG = "dev_rmse"


def resolve_tracking_uri(explicit: str = "") -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory.

    A relative sqlite path is made absolute: Ray workers run in other working directories.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql")) or "://" not in tracking_uri


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id; a new experiment in a local store keeps its artifacts in ./mlartifacts.

    (MLflow's own default for sqlite is ./mlruns; a tracking server decides for itself.)
    """
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if _is_local_store(tracking_uri):
        location = Path(os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or DEFAULT_ARTIFACTS).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> tuple[str, bool]:
    """(run_id, resumed): the run tagged with this training run name, or a new one. Marks it RUNNING."""
    client = _client(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id, False


def run_tags(tracking_uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(tracking_uri).get_run(run_id).data.tags)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"input_size": 112}} -> {"model.input_size": "112"} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class RunLogger:
    """Rank 0's handle on the driver's run: an MlflowClient plus the run_id."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = _client(tracking_uri)
        self._system_monitor = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once. MLflow params are immutable, so a rerun that changes a value (e.g. more
        --epochs to resume) records the new value as tag `changed.<param>` instead of failing."""
        from mlflow.entities import Param, RunTag

        flat = flatten(params)
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
        changed = [RunTag(f"changed.{k}", v[:5000]) for k, v in flat.items() if k in existing and existing[k] != v]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def start_system_metrics(self) -> str:
        """MLflow's system metrics (CPU/GPU/memory) need psutil (and pynvml for GPUs); skip without them."""
        if importlib.util.find_spec("psutil") is None:
            return "skipped: psutil is not installed (pip install psutil to log system metrics)"
        try:
            import mlflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(self.tracking_uri)  # the monitor logs through the fluent API
            self._system_monitor = SystemMetricsMonitor(self.run_id, resume_logging=True)
            self._system_monitor.start()
            return "on"
        except Exception as exc:  # never let monitoring stop training
            return f"skipped: {type(exc).__name__}: {exc}"

    def stop_system_metrics(self) -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None


# ----------------------------------------------------------------------------------------------
# Evaluation artifacts


def prediction_table(rows: list[dict[str, Any]]) -> str:
    """CSV of per-video predictions: split, video_id, subject_id, task, label, prediction, error, n_frames,
    fallback (1 = no usable face: predicted as the training mean)."""
    import csv

    out = io.StringIO()
    fields = ["split", "video_id", "subject_id", "task", "label", "prediction", "error", "n_frames", "fallback"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "label": f"{row['label']:.3f}", "prediction": f"{row['prediction']:.3f}",
                         "error": f"{row['prediction'] - row['label']:.3f}"})
    return out.getvalue()


def scatter_figure(rows: list[dict[str, Any]], title: str):
    """Predicted vs true BDI-II, one point per video, coloured by split."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    for split, colour in (("train", "tab:gray"), ("dev", "tab:blue"), ("test", "tab:orange")):
        pts = [(r["label"], r["prediction"]) for r in rows if r["split"] == split]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=18, c=colour, label=f"{split} ({len(pts)} videos)", alpha=0.8)
    ax.plot([0, 63], [0, 63], "k--", lw=0.8)
    ax.set(xlim=(0, 63), ylim=(0, 63), xlabel="true BDI-II", ylabel="predicted BDI-II (mean over frames)",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Model logging and the registry


def champion_dev_rmse(tracking_uri: str, name: str) -> tuple[str | None, float | None]:
    """(version, dev RMSE) of the current champion; (None, None) when there is none.

    dev RMSE comes from the version's `dev_rmse` tag, else from its run's `best_dev_rmse` metric.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model, or no champion alias yet
        return None, None
    if DEV_RMSE_TAG in champion.tags:
        return champion.version, float(champion.tags[DEV_RMSE_TAG])
    if champion.run_id:
        metric = client.get_run(champion.run_id).data.metrics.get("best_dev_rmse")
        if metric is not None:
            return champion.version, float(metric)
    return champion.version, None


def promote(tracking_uri: str, name: str, version: str, dev_rmse: float) -> bool:
    """Give `version` the alias `candidate`; move `champion` to it only if it beats the champion's dev RMSE.

    A champion whose dev RMSE is unknown (e.g. set by hand) is kept: we cannot show we are better.
    Returns whether champion moved. Dev RMSEs are only comparable on the same dev split: keep one
    registered model name per data set / preprocessing.
    """
    client = _client(tracking_uri)
    client.set_model_version_tag(name, version, DEV_RMSE_TAG, repr(float(dev_rmse)))
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion_version, champion_rmse = champion_dev_rmse(tracking_uri, name)
    if champion_version == str(version):
        return False
    if champion_version is None or (champion_rmse is not None and dev_rmse < champion_rmse):
        client.set_registered_model_alias(name, CHAMPION, version)
        return True
    if champion_rmse is None:
        log.warning("champion of %s (version %s) has no known dev RMSE; leaving it in place", name, champion_version)
    return False


def log_and_register_model(tracking_uri: str, run_id: str, model, model_name: str,
                           preprocess_config: Mapping[str, Any], version_tags: Mapping[str, Any]) -> str:
    """Log the best model twice in the run and register the scoring one; returns the version.

    * `model` (registered as `model_name`): the pyfunc scoring model of hmhn.serving (weights,
      HMHNConfig, the preprocessing config; base64 face crops in, scores out) - what
      `jobs/predict.py` and `mlflow models serve -m models:/NAME@champion` use;
    * `model_pt2`: the HMHNScorer exported with torch.export (MLflow's pt2 format, dynamic batch,
      fixed image size), for people who want a plain tensor-in/tensor-out artefact.
    A rerun that finds this run already registered (same best epoch) returns that version instead
    of registering a duplicate.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from hmhn.model import HMHNScorer
    from hmhn.serving import log_scoring_model

    client = _client(tracking_uri)
    best_epoch = str(version_tags.get("best_epoch"))
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == model_name and version.tags.get("best_epoch") == best_epoch:
            return version.version
    model = model.eval().cpu()
    input_size = model.config.input_size
    example = np.random.default_rng(0).standard_normal((2, 3, input_size, input_size)).astype(np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, input_size, input_size))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))
    # Explicit requirements: inferring them imports and scans the environment (~10 s).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}"]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(HMHNScorer(model, clamp=True).eval(), name="model_pt2", serialization_format="pt2",
                                 signature=signature, input_example=example, pip_requirements=requirements,
                                 metadata={"preprocess_version": preprocess_config.get("preprocess_version", ""),
                                           "input_size": input_size})
        info = log_scoring_model(model, name="model", preprocess_config=dict(preprocess_config),
                                 input_size=input_size, registered_model_name=model_name,
                                 extra_tags={k: str(v) for k, v in version_tags.items()})
        mlflow.log_dict(dict(preprocess_config), "preprocessing/config.json")  # beside the run, where people look first
    return str(info.registered_model_version)
