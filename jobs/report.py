"""Rebuild an experiment's comparison table and plot from MLflow alone (no Ray, no shards).

    python jobs/report.py --experiment abl1 [--mlflow-uri sqlite:///mlflow.db] [--out reports/abl1] [--log]

Reads the parent run tagged hmhn.experiment=NAME and its finished child runs (one per variant x
seed) and writes table.csv, table.md and plot.png to --out (default reports/NAME); --log also
logs them to the parent run (comparison/), as jobs/experiment.py does at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cli import job_parser, parse_args  # noqa: E402
from hmhn.experiment import comparison_figure, comparison_from_mlflow, log_comparison, table_csv, table_markdown  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--experiment", required=True, help="experiment name (jobs/experiment.py --name)")
    parser.add_argument("--mlflow-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--mlflow-experiment", default="hmhn", help="MLflow experiment holding the runs")
    parser.add_argument("--out", default="", help="output folder (default reports/NAME)")
    parser.add_argument("--log", action="store_true", help="also log the table and plot to the parent run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    from hmhn import tracking

    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    try:
        table, parent = comparison_from_mlflow(uri, args.mlflow_experiment, args.experiment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.csv").write_text(table_csv(table))
    (out / "table.md").write_text(table_markdown(table))
    fig = comparison_figure(table, f"{args.experiment}: test metrics per variant (mean ± std over seeds)")
    fig.savefig(out / "plot.png", dpi=120)
    if args.log:
        log_comparison(uri, parent.info.run_id, table, args.experiment)
    print(table_markdown(table))
    print(f"written: {out / 'table.csv'}, {out / 'table.md'}, {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
