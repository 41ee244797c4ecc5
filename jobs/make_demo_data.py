"""Generate the AVEC2014-shaped demo data set from real face photos.

    python jobs/make_demo_data.py --output data/demo [--subjects 8 --videos-per-subject 3 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import add_config_arguments, build_config, job_parser, parse_args  # noqa: E402
from pipeline.demo_data import DemoDataConfig, make_demo_dataset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    add_config_arguments(parser, DemoDataConfig, "demo data")
    return parser


def main(argv: list[str] | None = None) -> int:
    config = build_config(DemoDataConfig, parse_args(build_parser(), argv))
    summary = make_demo_dataset(config)
    print(json.dumps({k: summary[k] for k in ("root", "manifest", "videos", "splits", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
