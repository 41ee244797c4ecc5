"""Videos -> aligned face shards with Ray Data.

    python jobs/preprocess.py --dataset avec2014 --input data/demo --output data/faces
    ray job submit --working-dir . -- python jobs/preprocess.py --dataset csv --input s3://b/manifest.csv --output s3://b/faces

Runs on the cluster it is submitted to (RAY_ADDRESS), else starts a local Ray sized to this
machine. Options can also come from a YAML file (`--config`; keys = option names, e.g.
`detector-name: scrfd`, or sections: `detector: {name: scrfd}`). Exit status: 0 when at least one
video was preprocessed, 1 when every video failed, 2 for an invalid configuration or manifest (also
a URI with credentials in it: give them through the environment or an instance / workload
identity), or when another run holds the output's lock. Printed lines show URIs redacted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import add_config_arguments, job_config, job_parser  # noqa: E402
from pipeline.preprocess import PreprocessConfig  # noqa: E402
from pipeline.storage import redact_uri  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_arguments(parser, PreprocessConfig, "preprocessing")
    return parser


def main(argv: list[str] | None = None) -> int:
    _, config = job_config(build_parser(), PreprocessConfig, argv)
    if config is None:
        return 2

    from pipeline.manifest import ManifestError
    from pipeline.preprocess import run_preprocess
    from pipeline.shardset import LockedError, ShardSetError
    from pipeline.storage import StorageError

    try:
        summary = run_preprocess(config)
    except (ManifestError, StorageError, LockedError, ShardSetError) as exc:
        print(f"error: {redact_uri(exc)}", file=sys.stderr)
        return 2
    if summary["ok"] == 0:
        print(f"error: no video was preprocessed successfully ({summary['failed']} failed, "
              f"{summary['no_face']} without a face)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
