"""Run a grid of HMHN variants x seeds as Ray Train runs scheduled by Ray Tune; compare them in MLflow.

    python jobs/experiment.py --data data/faces/<preprocess_version> --grid ablations --seeds 3 --name abl1 \\
        --epochs 5 --input-size 112 --workers-per-trial 1
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

Training options are those of jobs/train_ddp.py (--epochs, --batch-size, --input-size, ...); they
are the base every variant overrides. Exit status: 0 all trials finished, 1 some failed, 2 bad options.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from hmhn import HMHNConfig, LossConfig  # noqa: E402
from hmhn.experiment import GRIDS, ExperimentConfig, load_grid_file, run_experiment  # noqa: E402
from hmhn.train import TrainConfig  # noqa: E402
from pipeline.cli import (add_config_arguments, add_verbose_flag, apply_verbose_flag,  # noqa: E402
                          build_config)
from pipeline.storage import install_log_redaction, redact_uri, redacting_printer  # noqa: E402

EXPERIMENT_SET = ("data", "run_name", "seed", "register", "promote", "workers", "storage_path")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(parser)
    g = parser.add_argument_group("experiment")
    g.add_argument("--data", required=True, help="shard set: OUTPUT/<preprocess_version>/")
    g.add_argument("--name", default="", help="experiment name (letters, digits, '.', '_'); rerun it to resume "
                                              "(default: exp_<date>_<time>)")
    g.add_argument("--grid", default="ablations", choices=sorted(GRIDS), help="a named grid")
    g.add_argument("--grid-file", help="YAML grid: variant -> overrides (replaces --grid)")
    g.add_argument("--seeds", type=int, default=3, help="seeds per variant (0..N-1)")
    g.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers of each trial")
    g.add_argument("--max-concurrent-trials", type=int, default=0,
                   help="trials at once (0: as many as the cluster's CPUs / GPUs allow; 1 on 2 cores)")
    g.add_argument("--trial-retries", type=int, default=1, help="retries of a failed trial before it is reported")
    g.add_argument("--storage-path", default="", help="Tune + Train state (default ~/ray_results/experiments)")
    g.add_argument("--refit-on-dev", action="store_true",
                   help="after choosing the epoch count on dev, retrain on train+dev for it and report test "
                        "(refit_test_rmse / refit_test_mae in each trial's run)")
    g.add_argument("--no-register", action="store_true", help="do not register the best trial's model")
    add_config_arguments(parser, TrainConfig, "training (base of every variant)", skip=("model", "loss") + EXPERIMENT_SET)
    add_config_arguments(parser, HMHNConfig, "model", skip=("initial_score",))
    add_config_arguments(parser, LossConfig, "loss")
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    out = redacting_printer(print)
    try:
        import time

        base = build_config(TrainConfig, args, {}, data=args.data, workers=args.workers_per_trial,
                            model=build_config(HMHNConfig, args, {}), loss=build_config(LossConfig, args, {}))
        config = ExperimentConfig(
            name=args.name or time.strftime("exp_%Y%m%d_%H%M%S"), base=base, grid=args.grid,
            variants=load_grid_file(args.grid_file) if args.grid_file else None, seeds=args.seeds,
            storage_path=args.storage_path, max_concurrent_trials=args.max_concurrent_trials,
            trial_retries=args.trial_retries, register_best=not args.no_register, refit_on_dev=args.refit_on_dev)
    except (SystemExit, ValueError) as exc:
        code = getattr(exc, "code", None)
        if isinstance(exc, SystemExit) and not isinstance(code, str):
            raise
        print(f"error: {redact_uri(code if isinstance(exc, SystemExit) else exc)}", file=sys.stderr)
        return 2
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
