"""`make demo`: the whole pipeline on the embedded default, end to end (hmhn/demo.py).

    demo data (real faces, labels drawn into them) -> preprocess (Ray Data) -> train (Ray Train,
    2 CPU workers, 112 px) -> register in MLflow (sqlite:///mlflow.db, ./mlartifacts) as @candidate
    -> promote (as jobs/promote.py): @champion moves if it is better

Ends by printing the test-split video RMSE/MAE beside the predict-the-training-mean baseline, the
registered model's URI and which version is `models:/NAME@champion`. Everything lands under
--workdir plus the MLflow store in the current directory; rerunning reuses the demo videos and the
preprocessed shards, trains a new run and promotes it only if it beats the current champion.
Exit status: 0 done, 2 invalid options.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmhn.demo import DemoConfig, run_demo  # noqa: E402
from pipeline.cli import add_config_arguments, job_config, job_parser  # noqa: E402
from pipeline.storage import redacting_printer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_arguments(parser, DemoConfig, "demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    _, config = job_config(build_parser(), DemoConfig, argv)
    if config is None:
        return 2
    run_demo(config, out=redacting_printer(print))  # printed lines show URIs redacted
    return 0


if __name__ == "__main__":
    sys.exit(main())
