"""Train HMHN with Ray Train (PyTorch DDP) on face shards; track and register it in MLflow.

    python jobs/train_ddp.py --data data/faces/<preprocess_version> --workers 2 --input-size 112 --epochs 5
    python jobs/train_ddp.py --workers 8 --gpu --data s3://bucket/faces/<version> --mlflow-uri http://mlflow:5000 \\
        --storage-path s3://bucket/ray_results --run-name hmhn-avec2014-a

Rerun with the same --run-name to resume (e.g. with a larger --epochs). Options can also come from
a YAML file (--config FILE; keys = option names: `input-size: 112`).

The new model version gets the alias `candidate`; `champion` moves only through
jobs/promote.py (or --promote here). Exit status: 0 trained, 1 training failed (bad data,
divergence), 2 invalid options - among them a URI with credentials in it (--data, --storage-path,
--mlflow-uri): give them through the environment (AWS_* variables, MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD) or an instance / workload identity. Printed lines show URIs redacted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers of a local instance inherit this environment: they import hmhn/pipeline from the
# checkout whatever the working directory is (`ray job submit --working-dir .` does it on clusters).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from hmhn.train import TrainConfig, TrainingDiverged, run_training  # noqa: E402
from pipeline.cli import add_config_arguments, job_config, job_parser  # noqa: E402
from pipeline.storage import redact_uri, redacting_printer  # noqa: E402

# The model's and the loss's options are known unprefixed (--input-size, --num-heads); the initial
# score is set from the training mean.
FLAT, SKIP = ("model", "loss"), ("model.initial_score",)


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_arguments(parser, TrainConfig, "training", skip=SKIP, flat=FLAT)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _, config = job_config(parser, TrainConfig, argv, skip=SKIP, flat=FLAT)
    if config is None:
        return 2
    out = redacting_printer(print)
    if not config.data:
        parser.error("--data is required (the shard set: OUTPUT/<preprocess_version>/ of preprocessing)")
    try:
        result = run_training(config)
    except (ValueError, TrainingDiverged) as exc:  # bad data / options / a run that diverged: a message
        raise SystemExit(f"error: {redact_uri(exc)}") from exc
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    alias = " -> champion" if result.champion_moved else (" (@candidate; promote with jobs/promote.py)"
                                                          if result.model_uri else "")
    out(f"run {result.run_name} (MLflow run {result.run_id}); model {result.model_uri or 'not registered'}{alias}")
    out(f"best epoch {result.best_epoch}: dev RMSE {fmt(result.best_dev_rmse)} MAE {fmt(result.best_dev_mae)}")
    if result.diverged_at_epoch:
        out(f"training diverged at epoch {result.diverged_at_epoch}: the model is the last good epoch's")
    if any(result.n_videos_fallback.values()):
        out("videos without a usable face, scored with the training mean: "
            + ", ".join(f"{split} {n}" for split, n in result.n_videos_fallback.items()))
    out(f"test RMSE {fmt(result.test_rmse)} MAE {fmt(result.test_mae)}   "
        f"(predict-the-training-mean baseline: RMSE {fmt(result.baseline_test_rmse)} "
        f"MAE {fmt(result.baseline_test_mae)})")
    out(json.dumps({k: v for k, v in vars(result).items() if k not in ("history",)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
