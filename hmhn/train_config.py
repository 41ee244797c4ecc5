"""What defines a training run, and what one returns.

* `TrainConfig`: every option of a run (jobs/train_ddp.py makes one option per field), validated
  when it is built, before Ray, MLflow or storage are touched: ranges, names, and no credentials
  in a URI. It is logged to MLflow and stored (redacted) in every checkpoint; `from_dict` rebuilds
  it from either.
* `TrainingResult`: what `hmhn.train.run_training` hands back.
* `parse_worker_resources`: the `--worker-resources` syntax, checked with the config.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from hmhn.config import HMHNConfig
from hmhn.data import AUGMENTATIONS
from hmhn.losses import LossConfig
from hmhn.schedules import SCHEDULE_NAMES


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; logged to MLflow and stored in every checkpoint."""

    data: str = field(default="", metadata={"help": "shard set written by preprocessing: OUTPUT/<preprocess_version>/"})
    run_name: str = field(default="", metadata={"help": "training run name; rerunning with the same name resumes "
                                                        "it (default: hmhn-<date>-<time>)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (one per GPU with --gpu)"})
    gpu: bool = field(default=False, metadata={"help": "one GPU per worker, bf16 autocast, channels_last"})
    cpus_per_worker: float = field(default=0.0, metadata={"help": "CPUs reserved per worker; 0 = from the shape of "
                                                                  "a node that can run a worker: half its CPUs per "
                                                                  "GPU (or per worker), the other half left to the "
                                                                  "Ray Data pipeline (pipeline/resources.py)"})
    worker_resources: str = field(default="", metadata={"help": "extra Ray resources per worker, NAME=COUNT[,...] "
                                                                "(e.g. a node-type label such as a100=1)"})
    resource_wait_s: float = field(default=600.0, metadata={"help": "seconds to wait for the GPUs / worker resources "
                                                                    "an autoscaler adds before failing (0 = fail at "
                                                                    "once if they are not there)"})
    epochs: int = field(default=10, metadata={"help": "total epochs (a resumed run continues up to this)"})
    batch_size: int = field(default=32, metadata={"help": "frames per batch per worker"})
    frames_per_video: int = field(default=64, metadata={"help": "training frames drawn per video per epoch"})
    augmentation: str = field(default="full", metadata={
        "help": "training augmentation: full (flip, small affine, random erasing), flip, none",
        "choices": AUGMENTATIONS})
    eval_frames_per_video: int = field(default=32, metadata={"help": "frames per dev video in the per-epoch "
                                                                     "evaluation (evenly spaced; 0 = all)"})
    final_eval_frames_per_video: int = field(default=0, metadata={"help": "frames per dev/test video in the final "
                                                                          "evaluation of the best model (0 = all)"})
    eval_batch_size: int = field(default=64, metadata={"help": "frames per evaluation batch"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the ResNet-18 trunk"})
    head_lr: float = field(default=1e-3, metadata={"help": "learning rate of GWA/DFF/MAB/regressor"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    schedule: str = field(default="exponential", metadata={"help": "learning-rate schedule, stepped per epoch "
                                                                   "(hmhn/schedules.py)", "choices": SCHEDULE_NAMES})
    warmup_epochs: int = field(default=0, metadata={"help": "linear warmup epochs before the schedule"})
    lr_decay: float = field(default=0.8, metadata={"help": "exponential: factor per epoch; step: factor per "
                                                           "--lr-step-epochs"})
    lr_step_epochs: int = field(default=10, metadata={"help": "step schedule: epochs between decays"})
    lr_min_factor: float = field(default=0.01, metadata={"help": "cosine schedule: final rate as a fraction of "
                                                                 "the base rates"})
    backbone_checkpoint: str = field(default="", metadata={"help": "optional pretrained ResNet-18 state dict "
                                                                   "(torchvision or DAN MS-Celeb) for a fresh run"})
    seed: int = field(default=0, metadata={"help": "seed of model initialisation (same on every worker)"})
    storage_path: str = field(default="", metadata={"help": "Ray Train checkpoints (shared storage on a "
                                                            "cluster; default ~/ray_results)"})
    max_failures: int = field(default=2, metadata={"help": "worker failures to recover from (restart from "
                                                           "the last checkpoint)"})
    num_to_keep: int = field(default=2, metadata={"help": "checkpoints kept: the best by dev RMSE + the latest"})
    mlflow_uri: str = field(default="", metadata={"help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                          "else sqlite:///mlflow.db + ./mlartifacts)"})
    experiment: str = field(default="hmhn", metadata={"help": "MLflow experiment"})
    model_name: str = field(default="hmhn", metadata={"help": "registered model name"})
    register: bool = field(default=True, metadata={"help": "log + register the best model as a new version "
                                                            "with the alias candidate"})
    promote: bool = field(default=False, metadata={"help": "after registering, also move the alias champion to "
                                                           "the new version if its dev RMSE beats the champion's "
                                                           "(default off: promotion is its own step, "
                                                           "jobs/promote.py)"})
    log_predictions: bool = field(default=True, metadata={
        "help": "log per-video labels and predictions as MLflow artifacts (evaluation/video_predictions.csv, "
                "predicted_vs_true.png, fallback_videos.csv); on for research, turn it OFF for clinical "
                "deployments: then only aggregate metrics go to MLflow"})
    log_attention_maps: bool = field(default=False, metadata={"help": "log per-head attention maps over a few "
                                                                      "dev faces (face images: health data; "
                                                                      "off unless asked for)"})
    attention_frames: int = field(default=4, metadata={"help": "faces shown with --log-attention-maps"})
    allow_no_dev: bool = field(default=False, metadata={"help": "train without a dev split, selecting the best "
                                                                "epoch on the training videos"})
    model: HMHNConfig = field(default_factory=HMHNConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {self.schedule!r}")
        if self.warmup_epochs < 0 or self.lr_step_epochs < 1 or not 0 < self.lr_decay <= 1 \
                or not 0 <= self.lr_min_factor <= 1:
            raise ValueError("warmup_epochs must be >= 0, lr_step_epochs >= 1, lr_decay in (0, 1], "
                             "lr_min_factor in [0, 1]")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        for name in ("workers", "epochs", "batch_size", "frames_per_video", "eval_batch_size", "num_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.run_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise ValueError(f"run_name {self.run_name!r}: use letters, digits, '.', '_' and '-' "
                             "(it names a checkpoint folder and an MLflow tag)")
        if min(self.cpus_per_worker, self.eval_frames_per_video, self.final_eval_frames_per_video) < 0 \
                or self.max_failures < -1:
            raise ValueError("cpus_per_worker and the eval frame counts must be >= 0, max_failures >= -1")
        parse_worker_resources(self.worker_resources)  # ValueError naming the bad entry
        if self.resource_wait_s < 0:
            raise ValueError(f"resource_wait_s must be >= 0, got {self.resource_wait_s}")
        if self.promote and not self.register:
            raise ValueError("--promote needs --register (only a registered version can become champion)")
        from pipeline.storage import check_no_credentials

        for name in ("data", "storage_path", "mlflow_uri", "backbone_checkpoint"):  # CredentialsInURIError: ValueError
            check_no_credentials(getattr(self, name), "--" + name.replace("_", "-"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        values["model"] = HMHNConfig(**values.get("model", {}))
        values["loss"] = LossConfig(**values.get("loss", {}))
        return cls(**values)


@dataclass
class TrainingResult:
    run_name: str
    run_id: str                              # MLflow run
    model_uri: str | None                    # models:/NAME/VERSION (None with register=False)
    champion_moved: bool                     # only ever True with TrainConfig.promote
    best_epoch: int
    best_dev_rmse: float
    best_dev_mae: float
    test_rmse: float | None                  # best model, per video; None without a labelled test split
    test_mae: float | None
    baseline_test_rmse: float | None         # predicting the training mean for every video
    baseline_test_mae: float | None
    epochs_run: list[int]                    # epochs trained by the last worker group of this call
    checkpoint_path: str | None              # best Ray Train checkpoint
    preprocess_version: str = ""
    diverged_at_epoch: int | None = None     # training stopped there (NaN/inf); the model is the last good one
    n_videos_fallback: dict[str, int] = field(default_factory=dict)  # per split: scored with the training mean
    history: list[dict[str, float]] = field(default_factory=list)  # their per-epoch metrics
    model_version: str | None = None         # the registered version (alias candidate)


def parse_worker_resources(text: str) -> dict[str, float]:
    """"a100=1,fast_disk=0.5" -> {"a100": 1.0, "fast_disk": 0.5}; ValueError naming a bad entry."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition("=")
        try:
            value = float(count)
        except ValueError:
            value = -1.0
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) or not 0 < value < 1e6 \
                or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"--worker-resources entry {item!r}: expected NAME=COUNT with a custom resource name "
                             "(letters, digits, '_', '.', '-'; not CPU/GPU, which have their own options) and "
                             "a count > 0")
        out[name] = value
    return out
