"""Videos -> aligned face shards with Ray Data.

    python jobs/preprocess.py --dataset avec2014 --input data/demo --output data/faces
    ray job submit --working-dir . -- python jobs/preprocess.py --dataset csv --input s3://b/manifest.csv --output s3://b/faces

Runs on the cluster it is submitted to (RAY_ADDRESS), else starts a local Ray sized to this
machine. Options can also come from a YAML file (`--config`), with sections `sampling:`,
`detector:` and `align:` for the nested settings. Exit status: 0 when at least one video was
preprocessed, 1 when every video failed, 2 for an invalid configuration or manifest (also a URI
with credentials in it: give them through the environment or an instance / workload identity), or
when another run holds the output's lock. Printed lines show URIs redacted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import AlignConfig  # noqa: E402
from pipeline.cli import (add_config_arguments, add_verbose_flag, apply_verbose_flag,  # noqa: E402
                          build_config, load_yaml_defaults)
from pipeline.decode import SamplingConfig  # noqa: E402
from pipeline.detect import DetectorConfig  # noqa: E402
from pipeline.preprocess import PreprocessConfig  # noqa: E402
from pipeline.storage import install_log_redaction, redact_uri  # noqa: E402

NESTED = (("sampling", SamplingConfig, "frame sampling and decoding"),
          ("detector", DetectorConfig, "face detection"),
          ("align", AlignConfig, "face alignment"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(parser)
    parser.add_argument("--config", help="YAML file of defaults")
    add_config_arguments(parser, PreprocessConfig, "preprocessing")
    for prefix, cls, title in NESTED:
        add_config_arguments(parser, cls, title, prefix=prefix)
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    yaml_values = load_yaml_defaults(args.config)
    nested = {prefix: build_config(cls, args, yaml_values.get(prefix) or {}, prefix=prefix)
              for prefix, cls, _ in NESTED}
    return build_config(PreprocessConfig, args, yaml_values, **nested)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    args = build_parser().parse_args(argv)
    apply_verbose_flag(args)
    try:
        config = config_from_args(args)  # before anything starts: no Ray, no storage access
    except SystemExit as exc:  # invalid values (a credentialed URI among them): a message, exit 2
        if not isinstance(exc.code, str):
            raise
        print(f"error: {redact_uri(exc.code)}", file=sys.stderr)
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
