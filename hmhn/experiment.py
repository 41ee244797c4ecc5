"""Experiments as one command: every variant x seed of a grid as a Ray Train run scheduled by Ray Tune,
compared from MLflow.

    run_experiment(ExperimentConfig(name="abl-1", grid="ablations", seeds=3, base=TrainConfig(data=...)))

* Grids are named in one place (`GRIDS`: ablations, heads, losses); `load_grid_file` reads others
  from YAML (variant name -> overrides of model / loss / training fields).
* Ray Train V2 + Tune: each Tune trial is a small function (`_trial`, {"CPU": 0.1}) that calls
  `hmhn.train.run_training` (which builds and fits a TorchTrainer that asks Ray for its own workers)
  and reports the final metrics with `tune.report`. Trials run concurrently as the cluster allows
  (`max_concurrent_trials`, 1 on a 2-core machine); a failed trial is retried `trial_retries` times
  and then reported (parent run tag `failed_trials`, exit status 1 of jobs/experiment.py).
* Resume: rerunning with the same name restores the Tune experiment (`Tuner.can_restore` /
  `Tuner.restore(resume_unfinished, resume_errored)`): finished trials are not run again; an
  unfinished trial's Ray Train run resumes from its last checkpoint (same run name). A trial
  whose MLflow child run is already marked done (tag `hmhn.trial_done`) is never retrained, even
  if the Tune state was lost.
* MLflow: one parent run per experiment (tag `hmhn.experiment`) and one child run per trial
  (tag `mlflow.parentRunId`; the child is created here with the tag `hmhn.run_name` that
  run_training looks for, so run_training attaches to it instead of creating its own run).
  The shard set is logged as the input of both (`log_inputs`, digest = preprocess_version). At the
  end the parent gets the comparison table (CSV + Markdown) and plot (`comparison/`), rebuilt by
  `comparison_from_mlflow` alone (jobs/report.py).
* Only the best trial (lowest dev RMSE of the selected epoch: the test split plays no part in the
  choice) is registered, as `@candidate`; promotion stays its own step (jobs/promote.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hmhn.config import HMHNConfig
from hmhn.losses import LossConfig
from hmhn.train_config import TrainConfig

EXPERIMENT_TAG = "hmhn.experiment"        # parent: the experiment name; children: too
ROLE_TAG = "hmhn.role"                    # "experiment" (parent) | "trial" (child)
VARIANT_TAG, SEED_TAG = "hmhn.variant", "hmhn.seed"
TRIAL_DONE_TAG = "hmhn.trial_done"        # set on a child once its metrics are complete
ATTEMPTS_TAG = "hmhn.trial_attempts"      # times a Tune trial function started for this child
PARENT_TAG = "mlflow.parentRunId"
TABLE_METRICS = (("test_rmse", "best_test_rmse"), ("test_mae", "best_test_mae"), ("dev_rmse", "best_dev_rmse"))

# ---------------------------------------------------------------------------------------------
# Grids: variant name -> overrides ({"model": {...}, "loss": {...}, training fields at the top)

GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "ablations": {
        "full": {},
        "no_gwa": {"model": {"use_gwa": False}},
        "no_dff": {"model": {"use_dff": False}},
        "no_mab": {"model": {"use_mab": False}},
        "no_afb": {"model": {"use_afb": False}},
    },
    "heads": {f"k{k}": {"model": {"num_heads": k}} for k in (1, 2, 3, 4)},
    "losses": {
        "partition": {},
        "no_partition": {"loss": {"partition_weight": 0.0}},
    },
}

_VARIANT_RE = r"[A-Za-z0-9][A-Za-z0-9_.]*"  # no '-': it separates name, variant and seed in run names


def normalise_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Accept nested ({"model": {"use_gwa": false}}) or flat ({"use_gwa": false}) overrides; return nested.

    A flat key goes to whichever of TrainConfig / HMHNConfig / LossConfig has it (training first);
    unknown keys raise ValueError.
    """
    out: dict[str, Any] = {}
    train_fields = set(TrainConfig.__dataclass_fields__) - {"model", "loss"}
    for key, value in (overrides or {}).items():
        if key in ("model", "loss"):
            cls = HMHNConfig if key == "model" else LossConfig
            unknown = set(value or {}) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown {key} field(s): {', '.join(sorted(unknown))}")
            out.setdefault(key, {}).update(value or {})
        elif key in train_fields:
            out[key] = value
        elif key in HMHNConfig.__dataclass_fields__:
            out.setdefault("model", {})[key] = value
        elif key in LossConfig.__dataclass_fields__:
            out.setdefault("loss", {})[key] = value
        else:
            raise ValueError(f"unknown override {key!r} (not a training, model or loss field)")
    for forbidden in ("data", "run_name", "seed", "mlflow_uri", "experiment", "register", "promote",
                      "storage_path"):
        if forbidden in out:
            raise ValueError(f"a variant cannot override {forbidden!r} (the experiment sets it)")
    return out


def check_grid(grid: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    if not grid:
        raise ValueError("the grid has no variants")
    checked = {}
    for name, overrides in grid.items():
        if not re.fullmatch(_VARIANT_RE, str(name)):
            raise ValueError(f"variant name {name!r}: use letters, digits, '_' and '.'")
        checked[str(name)] = normalise_overrides(overrides)
    return checked


def load_grid_file(path: str) -> dict[str, dict[str, Any]]:
    """YAML: {variant: {overrides}} or {variants: {variant: {overrides}}}."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(doc, dict) and set(doc) == {"variants"}:
        doc = doc["variants"]
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of variant name -> overrides")
    return check_grid({k: v or {} for k, v in doc.items()})


def apply_overrides(base: TrainConfig, overrides: Mapping[str, Any], **fixed: Any) -> TrainConfig:
    """`base` with a variant's (nested) overrides and the experiment's fixed fields applied (validated)."""
    values = base.to_dict()
    for key, value in normalise_overrides(overrides).items():
        if key in ("model", "loss"):
            values[key].update(value)
        else:
            values[key] = value
    values.update(fixed)
    return TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = field(metadata={
        "help": "experiment name (letters, digits, '.', '_'); rerun it to resume (jobs/experiment.py: "
                "exp_<date>_<time> when not given)"})
    base: TrainConfig = field(metadata={"help": "training options every variant starts from"})
    grid: str = field(default="ablations", metadata={
        "help": "a named grid (ignored with --grid-file)", "choices": tuple(GRIDS)})
    variants: dict[str, dict[str, Any]] | None = field(default=None, metadata={
        "help": "explicit grid: variant -> overrides (jobs/experiment.py: --grid-file)"})
    seeds: int = field(default=3, metadata={"help": "seeds per variant (0..N-1)"})
    storage_path: str = field(default="", metadata={
        "help": "Tune + Train state of every trial; empty: ~/ray_results/experiments"})
    max_concurrent_trials: int = field(default=0, metadata={
        "help": "trials at once; 0 = as many as the cluster's CPUs / GPUs allow (1 on 2 cores)"})
    trial_cpus: float = field(default=0.1, metadata={
        "help": "CPUs of the trial function itself (run_training asks for its workers)"})
    trial_retries: int = field(default=1, metadata={"help": "retries of a failed trial before it is reported"})
    register_best: bool = field(default=True, metadata={
        "help": "register the best trial's model as @candidate (promotion: jobs/promote.py)"})
    refit_on_dev: bool = field(default=False, metadata={
        "help": "after choosing the epoch count on dev, retrain on train+dev for it and report test "
                "(refit_test_rmse / refit_test_mae in each trial's run; docs/EXPERIMENTS.md)"})

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", self.name):
            raise ValueError(f"experiment name {self.name!r}: use letters, digits, '.' and '_' (no '-')")
        if self.variants is None and self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; known: {', '.join(GRIDS)} (or --grid-file)")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if not self.base.data:
            raise ValueError("no shard set given (--data)")

    def grid_variants(self) -> dict[str, dict[str, Any]]:
        return check_grid(self.variants if self.variants is not None else GRIDS[self.grid])

    def trials(self) -> list[dict[str, Any]]:
        return [{"variant": v, "seed": s, "overrides": o}
                for v, o in self.grid_variants().items() for s in range(self.seeds)]

    def root(self) -> str:
        base = self.storage_path or os.path.join(os.path.expanduser("~"), "ray_results", "experiments")
        return base if "://" in base else str(Path(base).resolve())


def trial_run_name(experiment: str, variant: str, seed: int) -> str:
    return f"{experiment}-{variant}-s{seed}"


def _abs(path: str) -> str:
    return path if "://" in path or not path else str(Path(path).resolve())


@dataclass
class ExperimentResult:
    name: str
    parent_run_id: str
    table: list[dict[str, Any]]
    trials: list[dict[str, Any]]          # per finished trial: variant, seed, run_id, metrics
    failed: list[str]                     # "variant/seed" of trials that errored (after retries)
    best: dict[str, Any] | None           # the best trial (by dev RMSE)
    model_uri: str | None
    table_csv: str = ""
    table_md: str = ""
    restored: bool = False


# ---------------------------------------------------------------------------------------------
# MLflow structure


def _client(uri: str):
    from hmhn import tracking

    return tracking._client(uri)


def find_parent_run(uri: str, experiment: str, name: str):
    """The experiment's parent run (entity), or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{EXPERIMENT_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'experiment'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def start_or_resume_parent(uri: str, experiment: str, name: str, description: dict[str, Any]) -> tuple[str, bool]:
    """(parent run id, resumed). A rerun must describe the same experiment (grid, seeds, data)."""
    from hmhn import tracking
    from pipeline.storage import redact_uri

    client = _client(uri)
    run = find_parent_run(uri, experiment, name)
    spec = json.dumps(description, sort_keys=True, default=str)
    if run is not None:
        known = run.data.tags.get("hmhn.experiment_spec")
        if known and known != redact_uri(spec):
            raise ValueError(f"experiment {name!r} exists with a different grid/seeds/data/options: use a new --name")
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    run = client.create_run(exp_id, run_name=name, tags={EXPERIMENT_TAG: name, ROLE_TAG: "experiment",
                                                         "hmhn.experiment_spec": redact_uri(spec)})
    return run.info.run_id, False


def ensure_child_run(uri: str, experiment: str, parent_id: str, name: str, variant: str, seed: int,
                     preprocess_version: str, data: str):
    """The child MLflow run of one trial, created with the tags run_training finds it by (so its
    start_or_resume_run attaches to it) plus mlflow.parentRunId. Returns the run (entity)."""
    from hmhn import tracking
    from pipeline.storage import redact_uri

    client = _client(uri)
    run_name = trial_run_name(name, variant, seed)
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run = found[0]
        if run.data.tags.get(PARENT_TAG) != parent_id:
            client.set_tag(run.info.run_id, PARENT_TAG, parent_id)
        return client.get_run(run.info.run_id)
    run = client.create_run(exp_id, run_name=run_name, tags={
        tracking.RUN_NAME_TAG: run_name, PARENT_TAG: parent_id, EXPERIMENT_TAG: name, ROLE_TAG: "trial",
        VARIANT_TAG: variant, SEED_TAG: str(seed), "preprocess_version": preprocess_version,
        "data": redact_uri(data)})
    client.set_terminated(run.info.run_id, status="SCHEDULED")  # not RUNNING until run_training starts it
    return client.get_run(run.info.run_id)


def log_shardset_input(uri: str, run_id: str, data: str, preprocess_version: str, context: str = "training") -> None:
    """The shard set as the run's input dataset (digest = preprocess_version); once per run."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from pipeline.storage import redact_uri

    client = _client(uri)
    run = client.get_run(run_id)
    inputs = getattr(run.inputs, "dataset_inputs", None) or []
    if any(d.dataset.digest == preprocess_version for d in inputs):
        return
    source_uri = redact_uri(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            source = resolve_dataset_source(source_uri)
        except Exception:  # noqa: BLE001 - any URI still gets a source
            from mlflow.data.artifact_dataset_sources import LocalArtifactDatasetSource

            source = LocalArtifactDatasetSource(source_uri)
    dataset = MetaDataset(source, name=f"faces-{preprocess_version}", digest=preprocess_version)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", context)])])


def _child_metrics(run) -> dict[str, float]:
    return {short: run.data.metrics[key] for short, key in TABLE_METRICS if key in run.data.metrics}


# ---------------------------------------------------------------------------------------------
# The Tune trial


def _trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """One variant x seed: attach the child run, run_training (resumable by run name), tune.report."""
    from ray import tune

    from hmhn.train import run_training

    params = params.get("trial", params)  # param_space = {"trial": grid_search([{variant, seed, overrides}])}
    variant, seed = params["variant"], int(params["seed"])
    uri, experiment, name = spec["tracking_uri"], spec["experiment"], spec["name"]
    child = ensure_child_run(uri, experiment, spec["parent_id"], name, variant, seed, spec["preprocess_version"],
                             spec["base"]["data"])
    run_id = child.info.run_id
    attempts = int(child.data.tags.get(ATTEMPTS_TAG, "0")) + 1  # how often Tune started this trial
    _client(uri).set_tag(run_id, ATTEMPTS_TAG, str(attempts))
    if child.data.tags.get(TRIAL_DONE_TAG) == "1":  # finished in an earlier call: report, do not retrain
        tune.report({**_child_metrics(child), "run_id": run_id, "reused": 1,
                     "checkpoint_path": child.data.tags.get("hmhn.checkpoint_path", "")})
        return
    config = apply_overrides(TrainConfig.from_dict(spec["base"]), params["overrides"], seed=seed,
                             run_name=trial_run_name(name, variant, seed), register=False, promote=False,
                             storage_path=spec["train_storage"])
    log_shardset_input(uri, run_id, config.data, spec["preprocess_version"])
    result = run_training(config)
    client = _client(uri)
    metrics = {"test_rmse": result.test_rmse, "test_mae": result.test_mae, "dev_rmse": result.best_dev_rmse,
               "dev_mae": result.best_dev_mae, "best_epoch": result.best_epoch}
    client.set_tag(run_id, "hmhn.checkpoint_path", result.checkpoint_path or "")
    if spec.get("refit_on_dev"):
        metrics.update(_refit(spec, config, result, run_id))
    client.set_tag(run_id, TRIAL_DONE_TAG, "1")
    tune.report({**{k: (math.nan if v is None else float(v)) for k, v in metrics.items()}, "run_id": run_id,
                 "reused": 0, "checkpoint_path": result.checkpoint_path or ""})


def _refit(spec: dict[str, Any], config: TrainConfig, result, child_id: str) -> dict[str, float]:
    """Retrain on train+dev for the epoch count chosen on dev; log its test metrics as refit_* in the child."""
    from hmhn.train import run_training

    data = refit_dataset(config.data, spec["refit_storage"])
    epochs = max(1, int(result.best_epoch))
    refit = run_training(dataclasses.replace(config, data=data, run_name=config.run_name + "-refit", epochs=epochs,
                                             allow_no_dev=True, register=False))
    _client(spec["tracking_uri"]).set_tag(refit.run_id, PARENT_TAG, child_id)  # the refit is the trial's child
    out = {"refit_epochs": float(epochs)}
    if refit.test_rmse is not None:
        out.update({"refit_test_rmse": refit.test_rmse, "refit_test_mae": refit.test_mae})
    from hmhn import tracking

    tracking.RunLogger(spec["tracking_uri"], child_id).log_metrics(out)
    return out


def refit_dataset(data: str, folder: str) -> str:
    """A view of shard set `data` in which the dev videos are training videos (no dev split).

    The index and commit log are rewritten (split dev -> train) beside links to the same shard files, under a
    preprocess_version suffixed '+dev' so its runs can never be confused with the original's.
    Local shard sets only (a cluster would need TrainConfig.train_splits: see docs/EXPERIMENTS.md).
    """
    from hmhn.data import open_shardset

    index = open_shardset(data)
    if "://" in data:
        raise ValueError("--refit-on-dev needs a local shard set here (see docs/EXPERIMENTS.md)")
    src = Path(data)
    version = index.preprocess_version + "+dev"
    dst = Path(folder) / version.replace("+", "_plus_")
    if (dst / ".complete").exists():
        return str(dst)
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, copy_function=os.link if _same_fs(src, dst) else shutil.copy2)
        else:
            shutil.copy2(item, target)
    for parquet in dst.rglob("*.parquet"):
        if parquet.parent.name == "shards":  # frame shards stay as they are (row groups are addressed by index)
            continue
        table = pq.read_table(parquet)
        changed = False
        if "split" in table.column_names:
            split = table.column("split")
            table = table.set_column(table.column_names.index("split"), "split",
                                     pc.if_else(pc.equal(split, "dev"), "train", split))
            changed = True
        if "preprocess_version" in table.column_names:
            table = table.set_column(table.column_names.index("preprocess_version"), "preprocess_version",
                                     pc.cast(pc.if_else(pc.is_valid(table.column("preprocess_version")), version,
                                                        table.column("preprocess_version")),
                                             table.schema.field("preprocess_version").type))
            changed = True
        if changed:
            parquet.unlink()  # a hard link: do not write through to the original
            pq.write_table(table, parquet)
    for js in dst.rglob("*.json"):
        text = js.read_text()
        new = text.replace(json.dumps(index.preprocess_version), json.dumps(version))
        if new != text:
            js.unlink()
            js.write_text(new)
    (dst / ".complete").write_text("")
    return str(dst)


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Comparison table + plot


def comparison_table(rows: list[dict[str, Any]], order: list[str] | None = None) -> list[dict[str, Any]]:
    """rows: {variant, seed, test_rmse, test_mae, dev_rmse} per trial -> one row per variant with
    n_seeds and mean/std (sample std, ddof=1; 0 with one seed) of each metric."""
    import numpy as np

    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    names = [v for v in (order or []) if v in by_variant] + sorted(v for v in by_variant if v not in (order or []))
    table = []
    for variant in names:
        group = by_variant[variant]
        out: dict[str, Any] = {"variant": variant, "n_seeds": len(group)}
        for short, _ in TABLE_METRICS:
            values = np.array([r.get(short, math.nan) for r in group], dtype=float)
            values = values[np.isfinite(values)]
            out[f"{short}_mean"] = float(values.mean()) if len(values) else math.nan
            out[f"{short}_std"] = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)
        table.append(out)
    return table


TABLE_COLUMNS = ["variant", "n_seeds"] + [f"{m}_{s}" for m, _ in TABLE_METRICS for s in ("mean", "std")]


def table_csv(table: list[dict[str, Any]]) -> str:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()


def table_markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| variant | n seeds | test RMSE | test MAE | dev RMSE |", "|---|---:|---:|---:|---:|"]
    for row in table:
        cells = [f"{row[f'{m}_mean']:.2f} ± {row[f'{m}_std']:.2f}" for m, _ in TABLE_METRICS]
        lines.append(f"| {row['variant']} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_figure(table: list[dict[str, Any]], title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["variant"] for r in table]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6))
    width = 0.38
    for offset, (metric, label) in zip((-width / 2, width / 2), (("test_rmse", "test RMSE"), ("test_mae", "test MAE"))):
        ax.bar(x + offset, [r[f"{metric}_mean"] for r in table], width, yerr=[r[f"{metric}_std"] for r in table],
               capsize=4, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("BDI-II points (per video)")
    n = sorted({r["n_seeds"] for r in table})
    ax.set_title(title or f"per variant: mean ± std over {'/'.join(map(str, n))} seeds")
    ax.legend()
    fig.tight_layout()
    return fig


def trial_rows_from_mlflow(uri: str, experiment: str, name: str) -> tuple[Any, list[dict[str, Any]]]:
    """(parent run, per finished trial {variant, seed, run_id, metrics...}) read from MLflow alone."""
    parent = find_parent_run(uri, experiment, name)
    if parent is None:
        raise ValueError(f"no experiment {name!r} in MLflow experiment {experiment!r}")
    client = _client(uri)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                                f"tags.`{TRIAL_DONE_TAG}` = '1'", max_results=10000)
    rows = [{"variant": c.data.tags[VARIANT_TAG], "seed": int(c.data.tags[SEED_TAG]), "run_id": c.info.run_id,
             **_child_metrics(c)} for c in children]
    rows.sort(key=lambda r: (r["variant"], r["seed"]))
    return parent, rows


def comparison_from_mlflow(uri: str, experiment: str, name: str) -> tuple[list[dict[str, Any]], Any]:
    parent, rows = trial_rows_from_mlflow(uri, experiment, name)
    order = json.loads(parent.data.tags.get("hmhn.variants", "[]"))
    return comparison_table(rows, order), parent


def log_comparison(uri: str, parent_id: str, table: list[dict[str, Any]], name: str) -> tuple[str, str]:
    from hmhn import tracking

    logger = tracking.RunLogger(uri, parent_id)
    csv_text, md = table_csv(table), table_markdown(table)
    logger.log_text(csv_text, "comparison/table.csv")
    logger.log_text(md, "comparison/table.md")
    fig = comparison_figure(table, f"{name}: test metrics per variant (mean ± std over seeds)")
    logger.log_figure(fig, "comparison/plot.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    logger.log_metrics({f"{r['variant']}.{k}": r[k] for r in table for k in TABLE_COLUMNS[2:]
                        if isinstance(r[k], float) and math.isfinite(r[k])})
    return csv_text, md


# ---------------------------------------------------------------------------------------------
# The driver


def run_experiment(config: ExperimentConfig, log=print) -> ExperimentResult:
    from ray import tune

    from hmhn import tracking
    from hmhn.data import open_shardset
    from pipeline.ray_utils import init_ray
    from pipeline.resources import alive_nodes, plan_trial_concurrency

    base = dataclasses.replace(config.base, data=_abs(config.base.data))
    uri = tracking.resolve_tracking_uri(base.mlflow_uri)
    base = dataclasses.replace(base, mlflow_uri=uri)
    variants = config.grid_variants()
    for variant, overrides in variants.items():  # validate every variant before anything starts
        apply_overrides(base, overrides, run_name=trial_run_name(config.name, variant, 0))
    index = open_shardset(base.data)
    init_ray()
    root = config.root()
    tune_storage, train_storage = f"{root}/{config.name}/tune", f"{root}/{config.name}/train"
    if "://" not in root:
        Path(tune_storage).mkdir(parents=True, exist_ok=True)
        Path(train_storage).mkdir(parents=True, exist_ok=True)

    description = {"grid": variants, "seeds": config.seeds, "preprocess_version": index.preprocess_version,
                   "base": {k: v for k, v in base.to_dict().items() if k not in ("mlflow_uri", "register", "promote")},
                   "refit_on_dev": config.refit_on_dev}
    parent_id, resumed = start_or_resume_parent(uri, base.experiment, config.name, description)
    client = _client(uri)
    client.set_tag(parent_id, "hmhn.variants", json.dumps(list(variants)))
    logger = tracking.RunLogger(uri, parent_id)
    logger.log_params({"grid": config.grid if config.variants is None else "file", "seeds": config.seeds,
                       "variants": ",".join(variants), "preprocess_version": index.preprocess_version,
                       **tracking.flatten({k: v for k, v in base.to_dict().items()
                                           if k not in ("run_name", "seed", "register", "promote")})})
    log_shardset_input(uri, parent_id, base.data, index.preprocess_version)

    spec = {"name": config.name, "experiment": base.experiment, "tracking_uri": uri, "parent_id": parent_id,
            "preprocess_version": index.preprocess_version, "base": base.to_dict(), "train_storage": train_storage,
            "refit_storage": f"{root}/{config.name}/refit", "refit_on_dev": config.refit_on_dev}
    trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec), {"CPU": config.trial_cpus})
    concurrency = config.max_concurrent_trials or plan_trial_concurrency(alive_nodes(), config.base.workers,
                                                                         config.base.gpu, config.base.cpus_per_worker)
    experiment_path = f"{tune_storage}/{config.name}"
    restored = tune.Tuner.can_restore(experiment_path)
    if restored:
        log(f"[experiment] resuming {config.name} from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(config.trials())},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=config.name, storage_path=tune_storage,
                                      failure_config=tune.FailureConfig(max_failures=config.trial_retries),
                                      verbose=1))
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.end_run(uri, parent_id, "FAILED")
        raise

    failed = []
    for r in grid:
        if r.error is not None:
            t = r.config.get("trial", r.config)
            failed.append(f"{t['variant']}/{t['seed']}")
    table, _ = comparison_from_mlflow(uri, base.experiment, config.name)
    _, rows = trial_rows_from_mlflow(uri, base.experiment, config.name)
    csv_text, md = log_comparison(uri, parent_id, table, config.name)
    expected = len(config.trials())
    incomplete = expected - len(rows)
    client.set_tag(parent_id, "failed_trials", ",".join(sorted(failed)))
    client.set_tag(parent_id, "trials_done", f"{len(rows)}/{expected}")

    best, model_uri = None, None
    finite = [r for r in rows if math.isfinite(r.get("dev_rmse", math.nan))]
    if finite:
        best = min(finite, key=lambda r: (r["dev_rmse"], r["variant"], r["seed"]))
        client.set_tag(parent_id, "best_trial", f"{best['variant']}/{best['seed']}")
        client.set_tag(parent_id, "best_run_id", best["run_id"])
        if config.register_best and incomplete == 0:
            model_uri = register_best_trial(uri, base, best["run_id"], index)
            client.set_tag(parent_id, "model_uri", model_uri)
    tracking.end_run(uri, parent_id, "FINISHED" if incomplete == 0 else "FAILED")
    if failed:
        log(f"[experiment] failed trials (after {config.trial_retries} retries): {', '.join(sorted(failed))}; "
            f"rerun with --name {config.name} to retry them")
    return ExperimentResult(name=config.name, parent_run_id=parent_id, table=table, trials=rows, failed=sorted(failed),
                            best=best, model_uri=model_uri, table_csv=csv_text, table_md=md, restored=restored)


def register_best_trial(uri: str, base: TrainConfig, run_id: str, index) -> str:
    """Log + register the best trial's model in its own (child) run as @candidate; returns models:/NAME/VERSION."""
    from hmhn import tracking
    from hmhn.train_checkpoint import model_from_checkpoint

    run = _client(uri).get_run(run_id)
    path = run.data.tags.get("hmhn.checkpoint_path")
    if not path:
        raise ValueError(f"trial run {run_id} has no checkpoint path")
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as folder:
        model, state = model_from_checkpoint(folder)
    version = tracking.log_and_register_model(
        uri, run_id, model, base.model_name,
        preprocess_config=index.preprocess_config or {"preprocess_version": index.preprocess_version, "config": {}},
        version_tags={"best_epoch": int(state["epoch"]), "training_run": run.data.tags.get(tracking.RUN_NAME_TAG, ""),
                      "experiment": run.data.tags.get(EXPERIMENT_TAG, ""),
                      "aggregation": "mean of frame scores per video"})
    tracking.register_candidate(uri, base.model_name, version, float(run.data.metrics["best_dev_rmse"]))
    return f"models:/{base.model_name}/{version}"
