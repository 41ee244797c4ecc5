"""`make demo`: the whole pipeline on the embedded default, end to end.

    demo data (real faces, labels drawn into them) -> preprocess (Ray Data) -> train (Ray Train,
    2 CPU workers, 112 px) -> register in MLflow (sqlite:///mlflow.db, ./mlartifacts) as @candidate
    -> promote (hmhn.tracking.promote, as jobs/promote.py): @champion moves if it is better

Ends by printing the test-split video RMSE/MAE beside the predict-the-training-mean baseline, the
registered model's URI and which version is `models:/NAME@champion`. Everything lands under
--workdir (default data/demo) plus the MLflow store in the current directory; rerunning reuses the
demo videos and the preprocessed shards (preprocessing resumes, so only missing videos are redone),
trains a new run and promotes it only if it beats the current champion.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.decode import SamplingConfig  # noqa: E402
from pipeline.cli import add_verbose_flag, apply_verbose_flag  # noqa: E402
from pipeline.demo_data import DemoDataConfig, make_demo_dataset  # noqa: E402
from pipeline.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from pipeline.storage import CredentialsInURIError, check_no_credentials, install_log_redaction  # noqa: E402
from pipeline.storage import redacting_printer  # noqa: E402


out = redacting_printer(print)  # printed lines show URIs redacted


def _step(title: str) -> None:
    out(f"\n=== {title} ===")


def _demo_data(workdir: Path, config: DemoDataConfig) -> Path:
    videos = workdir / "videos"
    info = videos / "demo_data.json"
    if info.exists() and json.loads(info.read_text()).get("config") == {**config.__dict__, "output": str(videos)}:
        out(f"reusing demo videos in {videos}")
    else:
        make_demo_dataset(DemoDataConfig(**{**config.__dict__, "output": str(videos)}))
    return videos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(parser)
    parser.add_argument("--workdir", default="data/demo", help="where demo videos and shards go")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--frames-per-video", type=int, default=32, help="training frames drawn per video per epoch")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per batch per worker")
    parser.add_argument("--augmentation", default="flip", choices=("full", "flip", "none"),
                        help="training augmentation (random erasing can hide the drawn label in the few "
                             "frames of a demo video; on real data use full)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="learning rate of every block (no pretrained backbone ships, so the trunk learns "
                             "from scratch as fast as the rest)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--input-size", type=int, default=112, help="model input size (112 keeps CPU training short)")
    parser.add_argument("--sample-fps", type=float, default=5.0, help="frames per second kept by preprocessing")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each demo video")
    parser.add_argument("--model-name", default="hmhn-demo", help="registered model name")
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        check_no_credentials(args.mlflow_uri, "--mlflow-uri")
        check_no_credentials(args.workdir, "--workdir")
    except CredentialsInURIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    workdir = Path(args.workdir).resolve()

    from hmhn import HMHNConfig, tracking
    from hmhn.train import TrainConfig, run_training
    from pipeline.ray_utils import init_ray

    _step("1/4 demo data: AVEC2014-shaped videos made from real face photos")
    videos = _demo_data(workdir, DemoDataConfig(seconds=args.seconds))

    _step("2/4 preprocess: decode -> MTCNN faces -> aligned crops -> parquet shards (Ray Data)")
    init_ray()
    summary = run_preprocess(PreprocessConfig(dataset="avec2014", input=str(videos), output=str(workdir / "faces"),
                                              sampling=SamplingConfig(mode="fps", fps=args.sample_fps),
                                              progress_every_s=15))

    _step("3/4 train + register: HMHN with Ray Train (DDP on CPU workers), tracked in MLflow, as @candidate")
    config = TrainConfig(data=summary["shard_set"], workers=args.workers, epochs=args.epochs,
                         frames_per_video=args.frames_per_video, batch_size=args.batch_size,
                         lr=args.lr, head_lr=args.lr, lr_decay=0.9, augmentation=args.augmentation,
                         run_name=time.strftime("demo-%Y%m%d-%H%M%S"), mlflow_uri=args.mlflow_uri,
                         experiment="hmhn-demo", model_name=args.model_name,
                         storage_path=str(workdir / "ray_results"),
                         model=HMHNConfig(input_size=args.input_size))
    result = run_training(config)

    # Training never moves @champion: promotion is its own step (what `jobs/promote.py --model-name NAME`
    # does), so `models:/NAME@champion` below is the best model so far, not merely the latest.
    _step("4/4 promote: move @champion to the new version if its dev RMSE beats the champion's")
    promotion = tracking.promote(tracking.resolve_tracking_uri(args.mlflow_uri), args.model_name,
                                 version=result.model_version)
    out(f"version {promotion.version}: {'champion moved' if promotion.moved else 'champion kept'} ({promotion.reason})")

    fmt = lambda x: "n/a" if x is None else f"{x:6.2f}"  # noqa: E731
    out("\n=== demo finished in %.1f min ===" % ((time.time() - started) / 60))
    out(f"videos           : {videos}  ({summary['videos']} videos, {summary['faces_total']} face crops)")
    out(f"shards           : {summary['shard_set']}")
    out(f"MLflow           : {args.mlflow_uri}  (experiment hmhn-demo, run {result.run_id}; "
        f"`.venv/bin/mlflow ui --backend-store-uri {args.mlflow_uri}`)")
    out(f"best dev epoch   : {result.best_epoch}  dev RMSE {fmt(result.best_dev_rmse)}  MAE {fmt(result.best_dev_mae)}")
    out(f"test (per video) : RMSE {fmt(result.test_rmse)}  MAE {fmt(result.test_mae)}")
    out(f"baseline (mean)  : RMSE {fmt(result.baseline_test_rmse)}  MAE {fmt(result.baseline_test_mae)}  "
        "(predict the training-set mean for every video)")
    champion_note = ("now @champion" if promotion.moved else
                     f"@candidate; @champion stays version {promotion.champion_after}")
    out(f"model            : {result.model_uri}  ({champion_note})")
    out(f"champion         : models:/{args.model_name}@champion = version {promotion.champion_after}")
    out(f"score new videos : .venv/bin/python jobs/predict.py --model models:/{args.model_name}@champion "
        f"--input {videos}/Testing --output scores.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
