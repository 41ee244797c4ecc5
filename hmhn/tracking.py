"""MLflow for training runs: one run per training run, per-epoch logging, plots, model registry.

Who does what:
* the driver finds or creates the run (one MLflow run per training run name, across restarts and
  reruns: found again by the tag `hmhn.run_name`), and at the end logs + registers the model;
* rank 0 reattaches by run_id through `RunLogger` (an MlflowClient bound to the run: no process
  globals, no second run) and logs params, per-epoch metrics and evaluation artifacts.

Face crops are health data: nothing here logs an image of a face unless the caller asked for
attention maps explicitly (TrainConfig.log_attention_maps).

Secrets: every param, tag and text artifact goes through pipeline.storage.redact_uri here, in
RunLogger and at registration (a data or storage URI may carry a token in its query string), and a
tracking URI with credentials in it (http://user:password@host) is refused: MLflow takes them from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.

The registry: training registers each model as a new version with the alias `candidate`; moving
`champion` is a separate, deliberate step (`promote`, jobs/promote.py) that compares the two and is
safe against concurrent promotions (see `promote`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import os
import random
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.schema import LABEL_MAX, LABEL_MIN
from pipeline.storage import check_no_credentials, redact, redact_uri

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "hmhn.run_name"
CANDIDATE, CHAMPION = "candidate", "champion"
DEV_RMSE_TAG = "dev_rmse"


def resolve_tracking_uri(explicit: str = "") -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory.

    A relative sqlite path is made absolute: Ray workers run in other working directories.
    Raises pipeline.storage.CredentialsInURIError (a ValueError) for a URI with credentials in it.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    check_no_credentials(uri, "--mlflow-uri" if explicit else "MLFLOW_TRACKING_URI")
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
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, **{k: redact_uri(v) for k, v in tags.items()}})
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
    """Rank 0's handle on the driver's run: an MlflowClient plus the run_id.

    Params, tags and text artifacts are stored redacted (pipeline.storage.redact_uri): a config
    logged whole (data, storage_path, mlflow_uri, ...) never puts a URI's secret into MLflow.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = _client(tracking_uri)
        self._system_monitor = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once. MLflow params are immutable, so a rerun that changes a value (e.g. more
        --epochs to resume) records the new value as tag `changed.<param>` instead of failing."""
        from mlflow.entities import Param, RunTag

        flat = {k: redact_uri(v) for k, v in flatten(params).items()}
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

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact_uri(str(v))[:5000]) for k, v in tags.items()])

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_uri(text), artifact_file)

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
    ax.plot([LABEL_MIN, LABEL_MAX], [LABEL_MIN, LABEL_MAX], "k--", lw=0.8)
    ax.set(xlim=(LABEL_MIN, LABEL_MAX), ylim=(LABEL_MIN, LABEL_MAX), xlabel="true BDI-II", ylabel="predicted BDI-II (mean over frames)",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Model logging and the registry


class PromotionError(ValueError):
    """Promotion cannot be decided: no such model / version / alias, or the candidate has no metric."""


class PromotionBusy(RuntimeError):
    """Another promotion of the same model held the lock for longer than we were willing to wait."""


@dataclass
class PromotionResult:
    moved: bool                      # champion now points at `version` because of this call
    model_name: str
    version: str                     # the candidate that was considered
    champion_before: str | None      # champion version when the decision was taken (under the lock)
    champion_after: str | None       # champion version when this call returned
    metric: str
    candidate_value: float
    champion_value: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_metric(client, version, metric: str = DEV_RMSE_TAG) -> float | None:
    """A model version's `metric`: its version tag of that name (set at registration), else its run's
    metric `best_<metric>`, else the run's metric `<metric>`; None when unknown."""
    if metric in version.tags:
        try:
            return float(version.tags[metric])
        except ValueError:
            return None
    if version.run_id:
        from mlflow.exceptions import MlflowException

        try:
            metrics = client.get_run(version.run_id).data.metrics
        except MlflowException:  # the run was deleted
            return None
        for key in (f"best_{metric}", metric):
            if key in metrics:
                return float(metrics[key])
    return None


def champion_dev_rmse(tracking_uri: str, name: str) -> tuple[str | None, float | None]:
    """(version, dev RMSE) of the current champion; (None, None) when there is none."""
    client = _client(tracking_uri)
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        return None, None
    return str(champion.version), version_metric(client, champion, DEV_RMSE_TAG)


def register_candidate(tracking_uri: str, name: str, version: str, dev_rmse: float) -> None:
    """What training does with a new version: tag its dev RMSE and give it the alias `candidate`.

    `champion` is never touched here: see `promote`. Dev RMSEs are only comparable on the same dev
    split: keep one registered model name per data set / preprocessing.
    """
    client = _client(tracking_uri)
    client.set_model_version_tag(name, str(version), DEV_RMSE_TAG, repr(float(dev_rmse)))
    client.set_registered_model_alias(name, CANDIDATE, str(version))


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias
        return None


PROMOTION_LOCK_SUFFIX = ".promotion-lock"
LOCK_TOKEN_TAG, LOCK_EXPIRES_TAG, LOCK_HOLDER_TAG = "hmhn.lock_token", "hmhn.lock_expires_at", "hmhn.lock_holder"


class _Lease:
    """The promotion lock of one registered model, held as long as `<name>.promotion-lock` exists
    with our token (see `promote` for why a registered model)."""

    def __init__(self, client, name: str, lease_s: float):
        self.client, self.lock_name, self.lease_s = client, name + PROMOTION_LOCK_SUFFIX, lease_s
        self.token = uuid.uuid4().hex

    def _read(self) -> tuple[str, float] | None:
        """(token, expires_at) of the current lock; None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.lock_name)
        except MlflowException:
            return None
        tags = model.tags or {}
        default_expiry = (model.creation_timestamp or 0) / 1000 + self.lease_s
        try:
            expires = float(tags.get(LOCK_EXPIRES_TAG, default_expiry))
        except ValueError:
            expires = default_expiry
        return tags.get(LOCK_TOKEN_TAG, ""), expires

    def try_acquire(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.lock_name,
                tags={LOCK_TOKEN_TAG: self.token, LOCK_EXPIRES_TAG: f"{time.time() + self.lease_s:.3f}",
                      LOCK_HOLDER_TAG: f"{socket.gethostname()} pid {os.getpid()}"},
                description="Held by hmhn.tracking.promote while it moves the champion alias; deleted when it is "
                            f"done. Safe to delete by hand once {LOCK_EXPIRES_TAG} (epoch seconds) has passed.")
            return True
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return False

    def break_if_expired(self) -> bool:
        """Delete a lock whose lease expired (its holder died); True when one was removed."""
        held = self._read()
        if held is None or held[1] > time.time():
            return False
        log.warning("promotion lock %s expired (holder token %s...); taking it over", self.lock_name, held[0][:8])
        return self._delete_if(held[0])

    def still_held(self) -> bool:
        held = self._read()
        return held is not None and held[0] == self.token and held[1] > time.time()

    def release(self) -> None:
        self._delete_if(self.token)

    def _delete_if(self, token: str) -> bool:
        from mlflow.exceptions import MlflowException

        held = self._read()
        if held is None or held[0] != token:
            return False
        try:
            self.client.delete_registered_model(self.lock_name)
            return True
        except MlflowException:  # already gone
            return False


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout_s: float = 120.0, lease_s: float = 300.0,
                   poll_s: float = 0.25) -> Iterator[_Lease]:
    """Hold the promotion lock of registered model `name` (waits up to timeout_s; PromotionBusy after)."""
    lease = _Lease(client, name, lease_s)
    deadline = time.monotonic() + timeout_s
    while not lease.try_acquire():
        if lease.break_if_expired():
            continue
        if time.monotonic() > deadline:
            raise PromotionBusy(f"another promotion of {name!r} holds the lock {lease.lock_name!r} (waited "
                                f"{timeout_s:g} s); retry later, or delete that registered model if its holder "
                                f"died and you cannot wait for its lease ({lease_s:g} s) to expire")
        time.sleep(poll_s * (0.5 + random.random()))  # jitter: waiting promoters do not retry in lockstep
    try:
        yield lease
    finally:
        lease.release()


def promote(tracking_uri: str, name: str, version: str | None = None, alias: str = CANDIDATE,
            metric: str = DEV_RMSE_TAG, higher_is_better: bool = False, lock_timeout_s: float = 120.0,
            lease_s: float = 300.0) -> PromotionResult:
    """Move alias `champion` of registered model `name` to a candidate only if it beats the champion.

    The candidate is `version`, else the version holding `alias` (default `candidate`). Its `metric`
    (default dev_rmse, lower is better; see version_metric) is compared with the champion's:
    * no champion yet -> it becomes champion;
    * strictly better -> champion moves; a tie or worse -> champion kept;
    * a champion whose metric is unknown (e.g. set by hand) is kept: we cannot show we are better.
    Raises PromotionError when the model, version or alias does not exist or the candidate has no
    metric, PromotionBusy when another promotion holds the lock for longer than lock_timeout_s.

    Concurrency guarantee. MLflow has no transactions, but creating a registered model is atomic:
    the registry refuses a second model of the same name (primary key; RESOURCE_ALREADY_EXISTS
    through a tracking server). So a promoter first creates the registered model
    `<name>.promotion-lock` carrying a random token and a lease expiry; whoever creates it holds the
    lock, the others poll until it is deleted. Under the lock it reads the champion, compares, checks
    that its lease is still its own and unexpired, moves the alias and reads it back. Promotions of
    one model therefore run one after the other: two concurrent promotions end exactly as if run in
    sequence - the better candidate is champion, and each call reports truthfully what it did (the
    second sees the first's result as the champion it compares with). Never a worse candidate over a
    better one, never a champion without a known metric replaced.
    Limits: a lock whose holder died is taken over once its lease (lease_s) has expired; a holder
    stalled past its own lease between its lease check and the move (one API call) could still move
    after a take-over. Anything that moves `champion` without this function (the UI, another tool)
    bypasses the lock. Metrics are compared as logged: keep one registered model per dev split.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise PromotionError(f"no registered model {name!r} in {redact_uri(tracking_uri)}") from None
    if version is not None:
        try:
            candidate = client.get_model_version(name, str(version))
        except MlflowException:
            raise PromotionError(f"registered model {name!r} has no version {version}") from None
    else:
        candidate = _alias_version(client, name, alias)
        if candidate is None:
            raise PromotionError(f"registered model {name!r} has no alias {alias!r}")
    value = version_metric(client, candidate, metric)
    if value is None or not math.isfinite(value):
        raise PromotionError(f"version {candidate.version} of {name!r} has no {metric!r} (version tag, or run "
                             f"metric best_{metric} / {metric}): nothing to compare")
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)

    with promotion_lock(client, name, lock_timeout_s, lease_s) as lease:
        champion = _alias_version(client, name, CHAMPION)
        before = str(champion.version) if champion else None
        champion_value = version_metric(client, champion, metric) if champion else None
        if champion is None:
            move, reason = True, "no champion yet"
        elif before == str(candidate.version):
            move, reason = False, f"version {candidate.version} already is the champion"
        elif champion_value is None:
            move, reason = False, (f"the champion (version {before}) has no known {metric}: kept (we cannot show "
                                   "the candidate is better; set its tag or move the alias by hand)")
        elif better(value, champion_value):
            move, reason = True, f"{metric} {value:.4f} beats the champion's {champion_value:.4f}"
        else:
            move, reason = False, f"{metric} {value:.4f} does not beat the champion's {champion_value:.4f}"
        if move:
            if not lease.still_held():
                raise PromotionBusy(f"lost the promotion lock of {name!r} (lease of {lease_s:g} s expired and was "
                                    "taken over) before moving champion: nothing moved; retry")
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
            client.set_model_version_tag(name, candidate.version, "promoted",
                                         f"champion since {time.strftime('%Y-%m-%dT%H:%M:%S%z')} "
                                         f"(previous: {before or 'none'}; {reason})")
        after_version = _alias_version(client, name, CHAMPION)
        after = str(after_version.version) if after_version else None
        if move and after != str(candidate.version):  # only possible when someone bypasses the lock
            raise PromotionBusy(f"champion of {name!r} is version {after} right after moving it to "
                                f"{candidate.version}: something moved it outside the promotion lock")
    if champion is not None and champion_value is None and not move and before != str(candidate.version):
        log.warning("champion of %s (version %s) has no known %s; leaving it in place", name, before, metric)
    return PromotionResult(moved=move, model_name=name, version=str(candidate.version), champion_before=before,
                           champion_after=after, metric=metric, candidate_value=value, champion_value=champion_value,
                           reason=reason)


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
    preprocess_config = redact(dict(preprocess_config))  # as stored: a URI's secret never reaches the registry
    version_tags = {k: redact_uri(str(v)) for k, v in version_tags.items()}
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
        # MLflow prints "Successfully registered model ..." / "Created version ..." straight to stderr
        # (not through logging); the jobs print the version they registered themselves.
        with contextlib.redirect_stderr(io.StringIO()):
            info = log_scoring_model(model, name="model", preprocess_config=dict(preprocess_config),
                                     input_size=input_size, registered_model_name=model_name,
                                     extra_tags={k: str(v) for k, v in version_tags.items()})
        mlflow.log_dict(dict(preprocess_config), "preprocessing/config.json")  # beside the run, where people look first
    return str(info.registered_model_version)
