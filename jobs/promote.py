"""Move a registered model's `champion` alias to a candidate, only when the candidate is better.

    python jobs/promote.py --model-name hmhn                       # the version aliased @candidate
    python jobs/promote.py --model-name hmhn --version 7 --mlflow-uri http://mlflow:5000
    python jobs/promote.py --model-name hmhn --alias candidate --metric dev_rmse

Training registers every model as a new version with the alias `candidate` and never moves
`champion` (unless `jobs/train_ddp.py --promote`). This is the deliberate step that does: it
compares the candidate's metric (its version tag, as training stores `dev_rmse`; else its run's
`best_<metric>` metric) with the champion's, and moves `champion` only on a strict improvement
(lower is better unless --higher-is-better). A champion whose metric is unknown is kept. Two
promotions of the same model at once are serialised by a lock in the registry (see
hmhn.tracking.promote): they end as if run one after the other, with the better one as champion.

Exit status: 0 champion moved, 3 not better (champion kept), 2 bad input (no such model / version /
alias, no metric, a URI with credentials in it: give them through MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN), 1 another promotion held the lock too long.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import job_parser, parse_args  # noqa: E402
from pipeline.storage import install_log_redaction, redact_uri, redacting_printer  # noqa: E402

EXIT_MOVED, EXIT_BUSY, EXIT_BAD_INPUT, EXIT_KEPT = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--model-name", required=True, help="registered model name")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to promote")
    which.add_argument("--alias", default="candidate", help="promote the version holding this alias")
    parser.add_argument("--metric", default="dev_rmse", help="what to compare")
    parser.add_argument("--higher-is-better", action="store_true", help="the metric improves upwards "
                                                                        "(default: lower is better)")
    parser.add_argument("--mlflow-uri", default="", help="MLflow tracking/registry URI (default: "
                                                         "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--lock-timeout-s", type=float, default=120.0,
                        help="how long to wait for another promotion of the same model")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    args = parse_args(build_parser(), argv)
    out = redacting_printer(print)

    from mlflow.exceptions import MlflowException

    from hmhn import tracking

    try:
        tracking_uri = tracking.resolve_tracking_uri(args.mlflow_uri)  # refuses a URI with credentials
        result = tracking.promote(tracking_uri, args.model_name, version=args.version,
                                  alias=args.alias, metric=args.metric, higher_is_better=args.higher_is_better,
                                  lock_timeout_s=args.lock_timeout_s)
    except (ValueError, MlflowException) as exc:  # PromotionError, CredentialsInURIError, registry refusals
        print(f"error: {redact_uri(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except tracking.PromotionBusy as exc:
        print(f"error: {redact_uri(exc)}", file=sys.stderr)
        return EXIT_BUSY
    verdict = "champion moved" if result.moved else "champion kept"
    out(f"{args.model_name}: version {result.version} -> {verdict} ({result.reason}); "
        f"champion is now version {result.champion_after or 'none'} (models:/{args.model_name}@champion)")
    out(json.dumps(result.to_dict()))
    return EXIT_MOVED if result.moved else EXIT_KEPT


if __name__ == "__main__":
    sys.exit(main())
