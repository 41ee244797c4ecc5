"""Run a grid of HMHN variants x seeds as Ray Train runs scheduled by Ray Tune; compare them in MLflow.

    python jobs/experiment.py --data data/faces/<preprocess_version> --grid ablations --seeds 3 --name abl1 \\
        --epochs 5 --input-size 112 --workers 1
    python jobs/experiment.py --data ... --grid-file my_grid.yaml --seeds 2 --name lr1

Grids (hmhn/experiment.py GRIDS): ablations (full, no_gwa, no_dff, no_mab, no_afb), heads (k1..k4),
losses (partition, no_partition). --grid-file YAML: {variant: {overrides of model / loss / training
fields}}, e.g. `wide: {num_heads: 8, head_lr: 0.002}`.

Every variant x seed is one Tune trial that runs one Ray Train run (MLflow child run
NAME-VARIANT-sSEED under the parent run NAME). Rerun with the same --name to resume: finished
trials are not run again, failed / unfinished ones are. At the end the parent run gets the
comparison table (comparison/table.csv, table.md) and plot (comparison/plot.png), and the best trial
by dev RMSE is registered as @candidate (promotion: jobs/promote.py). jobs/report.py rebuilds the
table and plot from MLflow alone.

Training options are those of jobs/train_ddp.py (--epochs, --batch-size, --input-size, --workers
(per trial), ...); they are the base every variant overrides. Exit status: 0 all trials finished, 1 some failed, 2 bad options.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from hmhn.experiment import ExperimentConfig, load_grid_file, run_experiment  # noqa: E402
from pipeline.cli import add_config_arguments, job_config, job_parser  # noqa: E402
from pipeline.storage import redact_uri, redacting_printer  # noqa: E402

# Training options are the base of every variant, unprefixed as in jobs/train_ddp.py. The
# experiment sets the per-trial ones itself (run name, seed, registration) and keeps its own
# --storage-path; --workers are each trial's.
FLAT = ("base", "model", "loss")
SKIP = ("variants", "trial_cpus", "fail_trials", "base.run_name", "base.seed", "base.register", "base.promote",
        "base.storage_path", "base.model.initial_score")


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    parser.add_argument("--grid-file", metavar="FILE",
                        help="YAML grid: variant -> overrides of model / loss / training options (replaces --grid)")
    add_config_arguments(parser, ExperimentConfig, "experiment", skip=SKIP, flat=FLAT)
    return parser


def main(argv: list[str] | None = None) -> int:
    _, config = job_config(build_parser(), ExperimentConfig, argv, skip=SKIP, flat=FLAT, extra=lambda args: {
        "variants": load_grid_file(args.grid_file) if args.grid_file else None,
        "name": getattr(args, "name", "") or time.strftime("exp_%Y%m%d_%H%M%S")})
    if config is None:
        return 2
    out = redacting_printer(print)
    try:
        result = run_experiment(config, log=out)
    except ValueError as exc:
        raise SystemExit(f"error: {redact_uri(exc)}") from exc
    out(f"experiment {result.name} (MLflow parent run {result.parent_run_id}){' resumed' if result.restored else ''}")
    out(result.table_md)
    if result.best:
        out(f"best trial by dev RMSE: {result.best['variant']} seed {result.best['seed']} "
            f"(dev RMSE {result.best['dev_rmse']:.3f}); model {result.model_uri or 'not registered'}")
    if result.failed:
        out(f"failed trials: {', '.join(result.failed)} - rerun with --name {result.name} to retry them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
