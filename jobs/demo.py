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
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmhn.demo import DemoConfig, run_demo  # noqa: E402
from pipeline.cli import add_config_arguments, apply_verbose_flag, build_config, job_parser, parse_args  # noqa: E402
from pipeline.storage import install_log_redaction, redacting_printer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_arguments(parser, DemoConfig, "demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    apply_verbose_flag(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        config = build_config(DemoConfig, args)
    except SystemExit as exc:  # invalid values (a credentialed URI among them): a message, exit 2
        if not isinstance(exc.code, str):
            raise
        print(f"error: {exc.code}", file=sys.stderr)
        return 2
    run_demo(config, out=redacting_printer(print))  # printed lines show URIs redacted
    return 0


if __name__ == "__main__":
    sys.exit(main())
