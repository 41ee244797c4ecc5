"""Score new interview videos with a registered HMHN model: one row per video in a CSV.

    python jobs/predict.py --model models:/hmhn@champion --input new_videos/ --output scores.csv
    python jobs/predict.py --model models:/hmhn@champion --input a.mp4 b.mp4 --output scores.csv \
        --explain-dir explain/ --explain-videos 2
    ray job submit --working-dir . -- python jobs/predict.py --model models:/hmhn@champion \
        --mlflow-uri http://mlflow:5000 --input s3://b/new/ --workdir s3://b/scoring --output s3://b/scores.csv

The videos are preprocessed with the preprocessing configuration stored with the model (so exactly as
its training data was), then scored by a Ray Data actor pool. Output columns: video_id, score (BDI-II
0..63), frames_used, score_std, severity, status (ok / no_face / failed), reason.
Exit status: 0 when at least one video was scored, 1 when none was, 2 for invalid input or model
(also a URI with credentials in it: give them through the environment - AWS_* variables,
MLFLOW_TRACKING_USERNAME/PASSWORD - or an instance / workload identity). Printed lines show URIs
redacted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmhn.scoring import ScoringConfig  # noqa: E402
from pipeline.cli import add_config_arguments, job_config, job_parser  # noqa: E402
from pipeline.storage import redact_uri  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_arguments(parser, ScoringConfig, "scoring")
    return parser


def main(argv: list[str] | None = None) -> int:
    _, config = job_config(build_parser(), ScoringConfig, argv)
    if config is None:
        return 2

    from mlflow.exceptions import MlflowException

    from hmhn.scoring import ScoringError, score_videos
    from pipeline.manifest import ManifestError
    from pipeline.shardset import LockedError, ShardSetError
    from pipeline.storage import StorageError

    try:
        table = score_videos(config)
    except (ScoringError, ManifestError, StorageError, MlflowException, LockedError, ShardSetError) as exc:
        print(f"error: {redact_uri(exc)}", file=sys.stderr)
        return 2
    if not (table["frames_used"] > 0).any():
        print("error: no video could be scored (see the status and reason columns of the CSV)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
