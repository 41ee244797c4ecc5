"""`make demo`: the whole pipeline on the embedded default, end to end (jobs/demo.py wires it).

    demo data (real faces, labels drawn into them) -> preprocess (Ray Data) -> train (Ray Train,
    CPU workers, 112 px) -> register in MLflow as @candidate -> promote: @champion moves if better

Everything lands under `workdir` plus the MLflow store (default sqlite:///mlflow.db in the current
directory). A rerun reuses the demo videos and the shards (preprocessing resumes, so only missing
videos are redone), trains a new run and promotes it only if it beats the current champion.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hmhn.data import AUGMENTATIONS

DEMO_EXPERIMENT = "hmhn-demo"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's own defaults: small and fast on a CPU, not the training defaults for real data."""
    workdir: str = field(default="data/demo", metadata={"help": "where demo videos, shards and Ray results go"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    frames_per_video: int = field(default=32, metadata={"help": "training frames drawn per video per epoch"})
    batch_size: int = field(default=16, metadata={"help": "frames per batch per worker"})
    augmentation: str = field(default="flip", metadata={
        "help": "training augmentation (random erasing can hide the drawn label in the few frames of a demo "
                "video; on real data use full)", "choices": AUGMENTATIONS})
    lr: float = field(default=1e-3, metadata={
        "help": "learning rate of every block (no pretrained backbone ships, so the trunk learns from scratch as "
                "fast as the rest)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    input_size: int = field(default=112, metadata={"help": "model input size in pixels (112 keeps CPU training short)"})
    sample_fps: float = field(default=5.0, metadata={"help": "frames per second kept by preprocessing"})
    seconds: float = field(default=5.0, metadata={"help": "length of each demo video in seconds"})
    model_name: str = field(default="hmhn-demo", metadata={"help": "registered model name"})
    mlflow_uri: str = field(default="", metadata={
        "help": "MLflow tracking + registry URI (empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"})

    def __post_init__(self) -> None:
        from pipeline.storage import check_no_credentials

        check_no_credentials(self.mlflow_uri, "--mlflow-uri")  # raises a ValueError naming the option
        check_no_credentials(self.workdir, "--workdir")
        for name in ("epochs", "frames_per_video", "batch_size", "workers", "input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_fps <= 0 or self.seconds <= 0:
            raise ValueError("sample_fps and seconds must be > 0")


def _demo_videos(workdir: Path, seconds: float, out: Callable[[str], None]) -> Path:
    from pipeline.demo_data import DemoDataConfig, make_demo_dataset

    videos = workdir / "videos"
    config = DemoDataConfig(seconds=seconds, output=str(videos))
    info = videos / "demo_data.json"
    if info.exists() and json.loads(info.read_text()).get("config") == config.__dict__:
        out(f"reusing demo videos in {videos}")
    else:
        make_demo_dataset(config)
    return videos


def run_demo(config: DemoConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """The four steps, a line per stage and the final summary; returns the figures it printed."""
    from hmhn import HMHNConfig, tracking
    from hmhn.train import TrainConfig, run_training
    from pipeline.decode import SamplingConfig
    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.ray_utils import init_ray

    started = time.time()
    workdir = Path(config.workdir).resolve()
    mlflow_uri = tracking.resolve_tracking_uri(config.mlflow_uri)

    out("\n=== 1/4 demo data: AVEC2014-shaped videos made from real face photos ===")
    videos = _demo_videos(workdir, config.seconds, out)

    out("\n=== 2/4 preprocess: decode -> MTCNN faces -> aligned crops -> parquet shards (Ray Data) ===")
    init_ray()
    summary = run_preprocess(PreprocessConfig(dataset="avec2014", input=str(videos), output=str(workdir / "faces"),
                                              sampling=SamplingConfig(mode="fps", fps=config.sample_fps),
                                              progress_every_s=15))

    out("\n=== 3/4 train + register: HMHN with Ray Train (DDP on CPU workers), tracked in MLflow, as @candidate ===")
    result = run_training(TrainConfig(
        data=summary["shard_set"], workers=config.workers, epochs=config.epochs,
        frames_per_video=config.frames_per_video, batch_size=config.batch_size, lr=config.lr, head_lr=config.lr,
        lr_decay=0.9, augmentation=config.augmentation, run_name=time.strftime("demo-%Y%m%d-%H%M%S"),
        mlflow_uri=mlflow_uri, experiment=DEMO_EXPERIMENT, model_name=config.model_name,
        storage_path=str(workdir / "ray_results"), model=HMHNConfig(input_size=config.input_size)))

    # Training never moves @champion: promotion is its own step (jobs/promote.py), so
    # `models:/NAME@champion` is the best model so far, not merely the latest.
    out("\n=== 4/4 promote: move @champion to the new version if its dev RMSE beats the champion's ===")
    promotion = tracking.promote(mlflow_uri, config.model_name, version=result.model_version)
    out(f"version {promotion.version}: {'champion moved' if promotion.moved else 'champion kept'} ({promotion.reason})")

    fmt = lambda x: "n/a" if x is None else f"{x:6.2f}"  # noqa: E731
    champion_note = ("now @champion" if promotion.moved else
                     f"@candidate; @champion stays version {promotion.champion_after}")
    out("\n=== demo finished in %.1f min ===" % ((time.time() - started) / 60))
    out(f"videos           : {videos}  ({summary['videos']} videos, {summary['faces_total']} face crops)")
    out(f"shards           : {summary['shard_set']}")
    out(f"MLflow           : {mlflow_uri}  (experiment {DEMO_EXPERIMENT}, run {result.run_id}; "
        f"`.venv/bin/mlflow ui --backend-store-uri {mlflow_uri}`)")
    out(f"best dev epoch   : {result.best_epoch}  dev RMSE {fmt(result.best_dev_rmse)}  MAE {fmt(result.best_dev_mae)}")
    out(f"test (per video) : RMSE {fmt(result.test_rmse)}  MAE {fmt(result.test_mae)}")
    out(f"baseline (mean)  : RMSE {fmt(result.baseline_test_rmse)}  MAE {fmt(result.baseline_test_mae)}  "
        "(predict the training-set mean for every video)")
    out(f"model            : {result.model_uri}  ({champion_note})")
    out(f"champion         : models:/{config.model_name}@champion = version {promotion.champion_after}")
    out(f"score new videos : .venv/bin/python jobs/predict.py --model models:/{config.model_name}@champion "
        f"--input {videos}/Testing --output scores.csv")
    return {"videos": summary["videos"], "test_rmse": result.test_rmse, "model_uri": result.model_uri,
            "champion_version": promotion.champion_after}
