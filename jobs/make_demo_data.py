"""Generate the AVEC2014-shaped demo data set from real face photos.

    python jobs/make_demo_data.py --output data/demo [--subjects 8 --videos-per-subject 3 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import add_config_arguments, build_config, load_yaml_defaults  # noqa: E402
from pipeline.demo_data import DemoDataConfig, make_demo_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of defaults (keys = option names)")
    add_config_arguments(parser, DemoDataConfig, "demo data")
    args = parser.parse_args(argv)
    config = build_config(DemoDataConfig, args, load_yaml_defaults(args.config))
    summary = make_demo_dataset(config)
    print(json.dumps({k: summary[k] for k in ("root", "manifest", "videos", "splits", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
