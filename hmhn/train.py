"""Distributed HMHN training: Ray Train V2 (PyTorch DDP) over face shards, tracked in MLflow.

    run_training(TrainConfig(data="data/faces/ab12cd34", workers=2, epochs=10))

Two functions carry it, in the style of the Ray Train examples:
* `train_loop_per_worker` - what every worker runs: build the model, resume from Ray Train's
  checkpoint if there is one, then per epoch train on its share of the frames, evaluate dev per
  video across all workers, report metrics + a checkpoint (rank 0). At the end it evaluates the
  best weights on dev and test and rank 0 logs the evaluation artifacts.
* `run_training` - the driver: index the shard set, find or create the MLflow run, size the
  workers to the cluster, fit, then log + register the best model as `@candidate`. Moving
  `@champion` is its own step (jobs/promote.py, hmhn.tracking.promote), or `--promote`.

Nothing secret is stored: URIs in params, tags, the checkpoint's config and the registered model
are redacted (pipeline.storage.redact_uri), and a URI with credentials is refused at validation.

Resume = rerun with the same run name (Ray Train V2 restores from RunConfig(name, storage_path));
a worker that dies is restarted from the last checkpoint (FailureConfig.max_failures).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmhn import HMHN, HMHNConfig, LossConfig, hmhn_loss, video_metrics
from hmhn.data import (AUGMENTATIONS, ShardIndex, VideoEntry, check_trainable, iter_eval_batches, open_shardset,
                       owner_rank, train_dataset)
from hmhn.image import to_model_input
from hmhn.inference import crops_to_input, score_input, scorer_for
from hmhn.schedules import SCHEDULE_NAMES, ScheduleParams, make_scheduler
from pipeline.storage import redact

CHECKPOINT_FILE = "checkpoint.pt"
KILL_ENV = "HMHN_TEST_KILL_RANK1_AT_EPOCH"  # test-only: rank 1 exits once at this epoch
KILL_MARKER_ENV = "HMHN_TEST_KILL_MARKER"     # the file that makes it "once"
NAN_ENV = "HMHN_TEST_NAN_AT_EPOCH"           # test-only: the loss turns NaN from this epoch on


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


# ----------------------------------------------------------------------------------------------
# Pieces shared by the worker loop, the benchmark and tests


SHUFFLE_BUFFER_MAX_ROWS = 2048  # ~300 MB of 224 px uint8 crops per worker


def build_model(config: TrainConfig, train_mean: float) -> HMHN:
    torch.manual_seed(config.seed)  # identical init on every worker (DDP broadcasts rank 0's anyway)
    return HMHN(dataclasses.replace(config.model, initial_score=train_mean))


def make_optimizer(model: HMHN, config: TrainConfig):
    """AdamW with the trunk at lr and the new blocks at head_lr (MODEL.md section 5), and the
    learning-rate schedule (hmhn/schedules.py), stepped once per epoch."""
    trunk = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": config.lr}, {"params": rest, "lr": config.head_lr}],
                                  weight_decay=config.weight_decay)
    schedule = ScheduleParams(epochs=config.epochs, warmup_epochs=config.warmup_epochs, decay=config.lr_decay,
                              step_epochs=config.lr_step_epochs, min_factor=config.lr_min_factor)
    return optimizer, make_scheduler(optimizer, config.schedule, schedule)


@torch.no_grad()
def video_score_sums(model: HMHN, root: str, videos: list[VideoEntry], config: TrainConfig, max_frames: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, tuple[float, int]]:
    """video_id -> (sum, count) of its frame scores (clamped to 0..63, as the registered model serves them)."""
    scorer = scorer_for(model)  # the served model's scoring (hmhn.inference): what selection sees is what it serves
    sums: dict[str, list[float]] = {}
    for batch_ids, images, _ in iter_eval_batches(root, videos, config.model.input_size, config.eval_batch_size,
                                                  max_frames):
        scores = score_input(scorer, crops_to_input(images, config.model.input_size)).tolist()
        for video_id, score in zip(batch_ids, scores):
            entry = sums.setdefault(video_id, [0.0, 0])
            entry[0] += score
            entry[1] += 1
    return {k: (v[0], int(v[1])) for k, v in sums.items()}


def evaluate_split(model: HMHN, index: ShardIndex, split: str, config: TrainConfig, train_mean: float,
                   device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, max_frames: int = 0
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """(per-video predictions, metrics) of one split, the way AVEC scores it: every labelled video counts.

    A video without usable frames (no face, failed) is predicted as the training mean and counted in
    `n_videos_fallback` (listed in `fallback_videos`). Metrics: rmse, mae, n_videos, and per task
    (`rmse_<task>`, `mae_<task>`) when the split has tasks (AVEC2014 Freeform / Northwind).

    With world_size > 1 (inside the worker group) each worker scores only the videos it owns
    (stable hash of video_id) and only per-video (sum, count) pairs are all-gathered: the same
    numbers as world_size == 1, and traffic per video, not per frame.
    """
    if world_size > 1:
        # DDP syncs BatchNorm running stats from rank 0 only at the start of each forward, so after
        # training every rank holds slightly different ones; evaluate with rank 0's (= the checkpoint's).
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    videos = [v for v in index.videos(split, with_frames=True) if owner_rank(v.video_id, world_size) == rank]
    sums = video_score_sums(model, index.root, videos, config, max_frames, device)
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, sums)
        sums = {k: v for part in gathered for k, v in part.items()}
    predictions = {video_id: total / count for video_id, (total, count) in sums.items() if count}
    truth = index.labels(split)
    fallback = sorted(v for v in truth if v not in predictions)
    predictions.update({v: train_mean for v in fallback})
    metrics: dict[str, Any] = {"rmse": math.nan, "mae": math.nan, "n_videos": 0, "n_videos_fallback": len(fallback),
                               "fallback_videos": fallback}
    if truth:
        metrics.update(video_metrics(predictions, truth))
        tasks = index.select(split).select(["video_id", "task"]).to_pylist()
        by_task: dict[str, dict[str, float]] = {}
        for row in tasks:
            if row["task"] and row["video_id"] in truth:
                by_task.setdefault(row["task"], {})[row["video_id"]] = truth[row["video_id"]]
        for task, task_truth in sorted(by_task.items()):
            task_metrics = video_metrics(predictions, task_truth)
            metrics[f"rmse_{task}"], metrics[f"mae_{task}"] = task_metrics["rmse"], task_metrics["mae"]
    return predictions, metrics


def baseline_metrics(index: ShardIndex, split: str) -> dict[str, float] | None:
    """Predict-the-training-mean for every video of `split` (None when it has no labelled videos)."""
    truth = index.labels(split)
    if not truth:
        return None
    mean = index.train_mean()
    return video_metrics({v: mean for v in truth}, truth)


def load_checkpoint_state(checkpoint_dir: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The dict a worker saved (model, optimizer, scheduler, epoch, config, best, ...); tensors only: weights_only."""
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)


def model_from_checkpoint(checkpoint_dir: str | os.PathLike, best: bool = False) -> tuple[HMHN, dict[str, Any]]:
    """Rebuild HMHN on CPU from a checkpoint (its own config), in eval mode; best=True: the best weights in it."""
    state = load_checkpoint_state(checkpoint_dir)
    model = HMHN(HMHNConfig(**state["model_config"]))
    weights = state["best"]["model"] if best and state["best"]["model"] is not None else state["model"]
    model.load_state_dict(weights)
    return model.eval(), state


def _maybe_die_for_test(test_kill: dict | None, rank: int, epoch: int) -> None:
    """Test hook (HMHN_TEST_KILL_RANK1_AT_EPOCH): rank 1 exits hard, once, to exercise FailureConfig."""
    if test_kill and rank == 1 and epoch == test_kill["epoch"] and not os.path.exists(test_kill["marker"]):
        import ray.train

        # Ray Train registers reports asynchronously: a crash within a moment of the previous
        # report restarts from the checkpoint before it (that epoch is then trained again). Wait
        # until the controller has the last report, so the test sees the deterministic case.
        ray.train.get_all_reported_checkpoints(timeout_s=120)
        Path(test_kill["marker"]).write_text(f"killed at epoch {epoch}\n")
        os._exit(1)


def _all_reduce(values: list[float], op=None) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# The worker


def _quiet_ray_train_logs() -> None:
    """Ray Train's INFO lines in a worker (a dict per report, per epoch and worker) to WARNING. Its
    report logger is named after its file path (logging.getLogger(__file__)), not ray.train.*."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
               device: torch.device, poison: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step on a batch of uint8 crops (B,S,S,3) and their labels: what the worker
    loop runs per batch (jobs/bench_train.py's plain loop runs it too). Returns (loss, parts)."""
    cuda = device.type == "cuda"
    x = to_model_input(images.to(device, non_blocking=True))
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        output = model(x)
    loss, parts = hmhn_loss(output, y, config.loss)  # fp32
    if poison:
        loss = loss * math.nan  # test hook (HMHN_TEST_NAN_AT_EPOCH): a diverging run
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, parts


_LOOKAHEAD_ROWS = 64  # training rows queued ahead of the step (at least 2 batches): ~10 MB at 224 px


class _EpochBatches:
    """The training batches of consecutive epochs, produced by one background thread that runs ahead.

    Each epoch is one pass of `shard.iter_torch_batches(**kwargs)` (a new Ray Data execution: a
    fresh frame draw). Epoch e's pass ends when its local shuffle buffer is drained into a queue of
    `lookahead` batches, and the thread then starts epoch e+1's pass at once: the split's next
    execution and the refill of the shuffle buffer (which must hold `local_shuffle_buffer_size` rows
    before the first batch comes out) overlap the last batches of epoch e and the evaluation after
    it, instead of stalling the first step of epoch e+1. The passes run one after the other in the
    same thread, so one split iterator is never iterated twice at once. `wait_s` adds up the time
    the training loop waited for a batch.
    """

    _END = object()

    def __init__(self, shard, epochs: int, lookahead: int, **kwargs):
        import queue
        import threading

        self.wait_s = 0.0
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, lookahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(shard, epochs, kwargs), daemon=True,
                                        name="hmhn-train-batches")
        self._thread.start()

    def _produce(self, shard, epochs: int, kwargs: dict) -> None:
        try:
            for _ in range(epochs):
                for batch in shard.iter_torch_batches(**kwargs):
                    if not self._put(batch):
                        return
                if not self._put(self._END):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the training loop
            self._put(error)

    def _put(self, item) -> bool:
        """Queue `item` (blocks while `lookahead` items wait); False once closed."""
        if self._stop.is_set():
            return False
        self._queue.put(item)  # close() empties the queue, which lets a blocked put through
        return not self._stop.is_set()

    def epoch(self):
        """This epoch's batches, in order; raises what the producer raised."""
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - started
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the producer (after a break or at the end): it ends its pass at its next batch."""
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass


def train_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from hmhn.tracking import RunLogger

    # The console: Ray Train V2 patches print() and, when stdout is wrapped (MLflow does), writes each
    # line twice; its own INFO lines ("Reporting training result ...") come once per epoch and worker.
    _quiet_ray_train_logs()
    worker_log = logging.getLogger("hmhn.train")
    worker_log.setLevel(logging.INFO)
    say = worker_log.info
    # DDP's "grad strides do not match bucket view strides" is a performance note about conv
    # weights' memory layout, printed once per worker; it does not change the result.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    config: TrainConfig = TrainConfig.from_dict(loop["config"])
    index = ShardIndex.load(loop["data"])  # each worker reads the index itself: the driver sends its location
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    master = rank == 0  # rank 0 logs to MLflow and writes checkpoints
    # pipeline/resources.plan_training: on CPU-only nodes all the node's cores (the reservation is
    # logical; the data tasks run ahead and need little), on GPU nodes the reserved CPUs.
    torch.set_num_threads(loop["threads"])
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    select_split = "dev" if index.count("dev") else "train"  # "train" only with --allow-no-dev

    # Model, optimizer, schedule; then whatever Ray Train hands back on resume/restart.
    model = build_model(config, loop["train_mean"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.backbone_checkpoint:
        from hmhn import load_backbone_checkpoint

        load_backbone_checkpoint(model, config.backbone_checkpoint, printer=say if master else None)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to device + DDP when world_size > 1
    raw_model: HMHN = model.module if hasattr(model, "module") else model
    optimizer, scheduler = make_optimizer(raw_model, config)
    start_epoch = 0
    best: dict[str, Any] = {"epoch": 0, "dev_rmse": math.inf, "dev_mae": math.inf, "model": None}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint_state(folder, device)
        if state["preprocess_version"] != index.preprocess_version:
            raise ValueError(f"run {loop['run_name']!r} was trained on preprocess_version "
                             f"{state['preprocess_version']}, --data has {index.preprocess_version}: "
                             "use a new --run-name")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # checkpoints written before schedules had names hold an ExponentialLR state: only its epoch counts
        scheduler.load_state_dict({"lr_lambdas": [None] * len(optimizer.param_groups), **state["scheduler"]})
        start_epoch = state["epoch"]
        best = dict(state["best"])
        if best["model"] is None:  # the checkpoint's own epoch was the best one
            best["model"] = copy.deepcopy(state["model"])
        del state

    logger = RunLogger(loop["tracking_uri"], loop["run_id"]) if master else None
    if master:
        system_metrics = logger.start_system_metrics()
        logger.log_params({**config.to_dict(), "world_size": world_size, "threads_per_worker": loop["threads"],
                           "cpus_per_worker": loop["cpus_per_worker"], "device": device.type,
                           "preprocess_version": index.preprocess_version,
                           "train_mean": round(loop["train_mean"], 4), "selection_split": select_split,
                           **{f"{split}_videos": index.count(split, with_frames=False) for split in ("train", "dev", "test")},
                           **{f"{split}_videos_without_frames": index.count(split, with_frames=False) - index.count(split)
                              for split in ("train", "dev", "test")}})
        logger.set_tags({"system_metrics": system_metrics})
        if start_epoch:
            say(f"[hmhn] resuming {loop['run_name']} after epoch {start_epoch} "
                f"(best so far: epoch {best['epoch']}, dev RMSE {best['dev_rmse']:.3f})")

    history: list[dict[str, float]] = []  # epochs trained by this worker group (returned by rank 0)
    diverged_at: int | None = None
    train_shard = ray.train.get_dataset_shard("train")
    # Each Ray Data task emits all k frames of one video (one label), so a small shuffle buffer
    # gives batches of one or two videos: correlated gradients and useless BatchNorm statistics.
    # Shuffle across (up to) a whole epoch of this worker's frames instead.
    epoch_rows = index.count("train") * config.frames_per_video // world_size
    shuffle_rows = max(4 * config.batch_size, min(epoch_rows, SHUFFLE_BUFFER_MAX_ROWS))
    # The next epoch's batches are prepared while this epoch ends and is evaluated (_EpochBatches).
    batches = _EpochBatches(train_shard, config.epochs - start_epoch,
                            lookahead=max(2, -(-_LOOKAHEAD_ROWS // config.batch_size)),
                            batch_size=config.batch_size, local_shuffle_buffer_size=shuffle_rows,
                            drop_last=True,  # a 1-frame last batch breaks BatchNorm in train mode
                            dtypes={"image": torch.uint8, "label": torch.float32})
    for epoch in range(start_epoch + 1, config.epochs + 1):
        # ---- train one epoch on this worker's share of the frames drawn for this epoch
        model.train()
        started = time.perf_counter()
        sums = np.zeros(3)  # total, regression, partition losses, weighted by batch size
        samples = 0
        waited_before = batches.wait_s
        for step, batch in enumerate(batches.epoch()):
            loss, parts = train_step(model, optimizer, batch["image"], batch["label"], config, device,
                                     poison=bool(loop.get("test_nan_epoch")) and epoch >= loop["test_nan_epoch"])
            n = batch["label"].shape[0]
            sums += n * np.array([loss.item(), parts["regression"].item(), parts["partition"].item()])
            samples += n
            if step == 0:
                _maybe_die_for_test(loop.get("test_kill"), rank, epoch)
        seconds = time.perf_counter() - started
        waited = batches.wait_s - waited_before  # > 0: the data pipeline kept this worker waiting
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        *total_sums, total_samples = _all_reduce([*sums.tolist(), samples])
        slowest, waited = _all_reduce([seconds, waited], torch.distributed.ReduceOp.MAX if world_size > 1 else None)

        # ---- a diverged run stops here, on every rank alike (the losses were all-reduced), before
        # its broken weights are reported; the last reported checkpoint is the last good one.
        train_loss = total_sums[0] / max(total_samples, 1)
        dev: dict[str, Any] = {}
        if math.isfinite(train_loss):
            # ---- per-video evaluation on a capped, evenly spaced set of frames per video
            _, dev = evaluate_split(raw_model, index, select_split, config, loop["train_mean"], device, rank,
                                    world_size, max_frames=config.eval_frames_per_video)
        if not math.isfinite(train_loss) or (dev["n_videos"] and not math.isfinite(dev["rmse"])):
            diverged_at = epoch
            if master:
                say(f"[hmhn] epoch {epoch}: training diverged (train loss {train_loss}, {select_split} RMSE "
                    f"{dev.get('rmse', math.nan)}); stopping. The model is the last good epoch's "
                    f"({best['epoch'] or 'none'}). Lower --lr / --head-lr, or check the data")
            break
        if dev["rmse"] < best["dev_rmse"]:
            best = {"epoch": epoch, "dev_rmse": dev["rmse"], "dev_mae": dev["mae"],
                    "model": {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}}
        metrics = {"epoch": epoch, "train_loss": train_loss,
                   "train_regression_loss": total_sums[1] / max(total_samples, 1),
                   "train_partition_loss": total_sums[2] / max(total_samples, 1),
                   "dev_rmse": dev["rmse"], "dev_mae": dev["mae"], "lr": lr, "train_samples": total_samples,
                   "samples_per_s": total_samples / max(slowest, 1e-9), "epoch_seconds": slowest,
                   "data_wait_s": waited,
                   # the selection so far, on the capped per-epoch evaluation (best_* at the end: every frame)
                   "selected_dev_rmse": best["dev_rmse"], "best_epoch": best["epoch"], "start_epoch": start_epoch}
        history.append(metrics)

        # ---- report (every worker, same number of times); rank 0 attaches the checkpoint
        if master:
            logger.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch")}, step=epoch)
            say(f"[hmhn] epoch {epoch}/{config.epochs}  train loss {metrics['train_loss']:.3f}  "
                f"{select_split} RMSE {dev['rmse']:.3f} MAE {dev['mae']:.3f}  "
                f"{metrics['samples_per_s']:.1f} samples/s  ({slowest:.1f} s)")
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "config": redact(config.to_dict()),  # stored: URIs without their secrets
                            "model_config": dataclasses.asdict(raw_model.config),
                            "preprocess_version": index.preprocess_version,
                            "train_mean": loop["train_mean"], "metrics": metrics, "run_id": loop["run_id"],
                            # the best weights only when they differ from this epoch's (saves space)
                            "best": {**best, "model": None if best["epoch"] == epoch else best["model"]}},
                           Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    batches.close()  # after a divergence the producer may be preparing an epoch that never comes
    if best["model"] is None:  # diverged before any good epoch: nothing to evaluate
        if master:
            logger.set_tags({"diverged_at_epoch": diverged_at})
            logger.stop_system_metrics()
        return {"diverged_at_epoch": diverged_at, "best_epoch": 0, "history": history} if master else None
    # ---- final evaluation of the best weights on every split, every frame by default (no report:
    # counts stay equal)
    raw_model.load_state_dict(best["model"])
    predictions = {split: evaluate_split(raw_model, index, split, config, loop["train_mean"], device, rank, world_size,
                                         max_frames=config.final_eval_frames_per_video)
                   for split in ("dev", "test") if index.count(split, with_frames=False)}
    if not master:
        return None
    # best_<split>_*: the chosen epoch's weights evaluated on every frame (final_eval_frames_per_video)
    final: dict[str, Any] = {"best_epoch": best["epoch"]}
    for split, (_, m) in predictions.items():
        final.update({f"best_{split}_{k}": v for k, v in m.items() if k.startswith(("rmse", "mae"))})
        final[f"n_videos_fallback_{split}"] = m["n_videos_fallback"]
    logger.log_metrics(final)
    if diverged_at:
        logger.set_tags({"diverged_at_epoch": diverged_at})
    log_final_evaluation(logger, config, index, predictions, loop["run_name"], best["epoch"])
    if config.log_attention_maps:
        _log_attention_maps(logger, raw_model, index, config, device)
    logger.stop_system_metrics()
    return {**final, "diverged_at_epoch": diverged_at, "history": history,
            "predictions": {split: p for split, (p, _) in predictions.items()},
            "fallback_videos": {split: m["fallback_videos"] for split, (_, m) in predictions.items()}}


def log_final_evaluation(logger, config: TrainConfig, index: ShardIndex, predictions, run_name: str,
                         best_epoch: int) -> None:
    """The per-video evaluation artifacts, only with config.log_predictions (labels and predictions of
    identifiable people: off for clinical deployments; the aggregate metrics are logged either way)."""
    if config.log_predictions:
        _log_evaluation_artifacts(logger, index, predictions, run_name, best_epoch)


def _log_evaluation_artifacts(logger, index: ShardIndex, predictions, run_name: str, best_epoch: int) -> None:
    """Per-video CSV (fallback videos flagged), predicted-vs-true scatter (numbers only: no face pixels)."""
    from hmhn.tracking import prediction_table, scatter_figure

    by_id = {v.video_id: v for v in index.videos(with_frames=False) if v.split in predictions}
    rows = [{"split": split, "video_id": vid, "subject_id": by_id[vid].subject_id, "task": by_id[vid].task or "",
             "label": by_id[vid].label, "prediction": score, "n_frames": by_id[vid].faces_kept if
             by_id[vid].has_frames else 0, "fallback": int(vid in metrics["fallback_videos"])}
            for split, (preds, metrics) in predictions.items() for vid, score in sorted(preds.items())]
    logger.log_text(prediction_table(rows), "evaluation/video_predictions.csv")
    fallback = [r for r in rows if r["fallback"]]
    if fallback:
        logger.log_text("split,video_id,reason\n" + "".join(
            f"{r['split']},{r['video_id']},{by_id[r['video_id']].status}: {by_id[r['video_id']].reason}\n"
            for r in fallback), "evaluation/fallback_videos.csv")
    labelled = [r for r in rows if not math.isnan(r["label"])]
    if labelled:
        logger.log_figure(scatter_figure(labelled, f"{run_name}, best epoch {best_epoch}"),
                          "evaluation/predicted_vs_true.png")


def _log_attention_maps(logger, model: HMHN, index: ShardIndex, config: TrainConfig, device) -> None:
    """Opt-in only (face images are health data): per-head attention over a few dev faces."""
    from hmhn.explain import attention_figure, attention_maps

    videos = index.videos("dev") or index.videos("train")
    ids, images, _ = next(iter_eval_batches(index.root, videos[:config.attention_frames], config.model.input_size,
                                            batch_size=config.attention_frames, max_frames_per_video=1))
    logger.log_figure(attention_figure(images, attention_maps(model, images), ids), "evaluation/attention_maps.png")


# ----------------------------------------------------------------------------------------------
# The driver


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


def require_multi_node_ready(config: TrainConfig, tracking_uri: str) -> None:
    """On a cluster of more than one node, refuse (before any work) what only works on one:
    checkpoints on a node-local path, and an MLflow store in a local file (rank 0, which logs, may
    run on another node and would write into its own empty database)."""
    from pipeline.ray_utils import alive_node_count
    from pipeline.storage import StorageError, require_shared_storage

    nodes = alive_node_count()
    if nodes <= 1:
        return
    if not config.storage_path:
        raise StorageError(f"the Ray cluster has {nodes} nodes: --storage-path is required (checkpoints would go to "
                           "each node's own ~/ray_results and the first upload from another node would fail). Use "
                           "s3://bucket/ray_results or a mount shared by every node (HMHN_SHARED_PATHS)")
    require_shared_storage(config.storage_path, "--storage-path", node_count=nodes)
    scheme = tracking_uri.split(":", 1)[0] if "://" in tracking_uri else "file"
    if scheme in ("sqlite", "file"):
        from pipeline.storage import redact_uri

        raise StorageError(f"the Ray cluster has {nodes} nodes but the MLflow store is a local {scheme} store "
                           f"({redact_uri(tracking_uri)}): rank 0 logs from whichever node it runs on and would see "
                           "its own empty database. Use an MLflow server: --mlflow-uri http://HOST:5000 "
                           "(cluster/mlflow) or set MLFLOW_TRACKING_URI")


def _test_kill_option(run_name: str) -> dict | None:
    if not os.environ.get(KILL_ENV):
        return None
    marker = os.environ.get(KILL_MARKER_ENV) or os.path.join(tempfile.gettempdir(), f"hmhn-test-kill-{run_name}")
    return {"epoch": int(os.environ[KILL_ENV]), "marker": marker}


def run_training(config: TrainConfig) -> TrainingResult:
    """Train (or resume) a run on the Ray cluster from pipeline.ray_utils.init_ray; see the module doc."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from hmhn import tracking
    from pipeline.ray_utils import init_ray
    from pipeline.resources import alive_nodes, plan_training, training_bundles, wait_for_resources
    from pipeline.storage import require_shared_storage

    if not config.data:
        raise ValueError("no shard set given (--data OUTPUT/<preprocess_version>/)")
    tracking_uri = tracking.resolve_tracking_uri(config.mlflow_uri)  # refuses credentials, also in the env
    # The driver reads only the index's small columns (columnar: cheap at 10^5 videos) for the checks,
    # the training mean and the sizes; workers and Ray Data read the index themselves.
    index = open_shardset(config.data)
    check_trainable(index, config.allow_no_dev)
    train_videos = index.count("train")
    per_worker = train_videos * config.frames_per_video // config.workers
    if per_worker < config.batch_size:
        raise ValueError(f"each of the {config.workers} workers gets ~{per_worker} training frames per epoch, fewer "
                         f"than --batch-size {config.batch_size}: no training step would run (lower --batch-size "
                         f"or --workers, or raise --frames-per-video)")
    init_ray()
    require_shared_storage(config.data, "--data")
    extra = parse_worker_resources(config.worker_resources)
    # GPUs (or labelled nodes) that are not up yet: ask the autoscaler and wait, not fail.
    wait_for_resources(training_bundles(config.workers, config.gpu, extra), f"{config.workers} training worker(s)",
                       config.resource_wait_s, printer=lambda line: print(line, flush=True))
    require_multi_node_ready(config, tracking_uri)
    plan = plan_training(alive_nodes(), config.workers, config.gpu, config.cpus_per_worker, extra)
    print(f"[hmhn] {plan.describe(config.workers, config.gpu)}", flush=True)
    run_name = config.run_name or time.strftime("hmhn-%Y%m%d-%H%M%S")

    run_id, resumed = tracking.start_or_resume_run(
        tracking_uri, config.experiment, run_name,
        {"preprocess_version": index.preprocess_version, "data": config.data})
    if resumed:
        known = tracking.run_tags(tracking_uri, run_id).get("preprocess_version")
        if known and known != index.preprocess_version:
            raise ValueError(f"run {run_name!r} was trained on preprocess_version {known}, --data has "
                             f"{index.preprocess_version}: use a new --run-name")
    _log_data_report(tracking.RunLogger(tracking_uri, run_id), config.data)
    train_mean = index.train_mean()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "data": config.data, "run_name": run_name,
                           "run_id": run_id, "tracking_uri": tracking_uri, "train_mean": train_mean,
                           "threads": plan.threads, "cpus_per_worker": plan.cpus_per_worker,
                           "test_kill": _test_kill_option(run_name),
                           "test_nan_epoch": int(os.environ.get(NAN_ENV, "0") or 0)},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                               resources_per_worker={"CPU": plan.cpus_per_worker,
                                                                     **plan.worker_resources}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=config.storage_path or None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep,
                                                         checkpoint_score_attribute="dev_rmse",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
        datasets={"train": train_dataset(index, config.frames_per_video, config.model.input_size,
                                         augmentation=config.augmentation, num_cpus=plan.data_cpus)},
        # dev/test never go through Ray's split (equal=True may drop rows): workers evaluate disjoint videos.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise

    final = result.return_value or {}
    best_checkpoint = result.get_best_checkpoint(metric="dev_rmse", mode="min") or result.checkpoint
    history = final.get("history", [])
    diverged_at = final.get("diverged_at_epoch")
    if best_checkpoint is None:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        if diverged_at:
            raise TrainingDiverged(f"training diverged at epoch {diverged_at} (NaN/inf loss or dev RMSE) before any "
                                   "good epoch: nothing to register. Lower --lr / --head-lr or check the data")
        raise RuntimeError("training reported no checkpoint")
    if diverged_at:
        print(f"[hmhn] training diverged at epoch {diverged_at}; registering the last good model "
              f"(best epoch {final.get('best_epoch')})", flush=True)

    model_uri, model_version, moved = None, None, False
    with best_checkpoint.as_directory() as folder:
        model, state = model_from_checkpoint(folder)
        best_epoch = int(state["epoch"])
        if config.register:
            version = tracking.log_and_register_model(
                tracking_uri, run_id, model, config.model_name,
                preprocess_config=index.preprocess_config or {"preprocess_version": index.preprocess_version,
                                                              "config": {}},
                version_tags={"best_epoch": best_epoch, "training_run": run_name,
                              "aggregation": "mean of frame scores per video"})
            # The new version becomes @candidate only; @champion moves in its own step (jobs/promote.py)
            # unless --promote asked for it here.
            # Its dev RMSE for promotion: the final every-frame evaluation of these weights.
            dev_rmse = float(final.get("best_dev_rmse", state["metrics"]["dev_rmse"]))
            tracking.register_candidate(tracking_uri, config.model_name, version, dev_rmse)
            if config.promote:
                promotion = tracking.promote(tracking_uri, config.model_name, version=version)
                moved = promotion.moved
                print(f"[hmhn] promotion of version {version}: {'champion moved' if moved else 'champion kept'} "
                      f"({promotion.reason})", flush=True)
            model_uri, model_version = f"models:/{config.model_name}/{version}", str(version)
    baseline = baseline_metrics(index, "test")
    baseline_dev = baseline_metrics(index, "dev")
    logger = tracking.RunLogger(tracking_uri, run_id)
    logger.log_metrics({f"baseline_{s}_{k}": v for s, b in (("test", baseline), ("dev", baseline_dev)) if b
                        for k, v in b.items() if k != "n_videos"})
    logger.set_tags({"champion_moved": moved, "model_uri": model_uri or ""})
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    return TrainingResult(
        run_name=run_name, run_id=run_id, model_uri=model_uri, champion_moved=moved, best_epoch=best_epoch,
        best_dev_rmse=float(final.get("best_dev_rmse", state["metrics"]["dev_rmse"])),
        best_dev_mae=float(final.get("best_dev_mae", state["metrics"]["dev_mae"])),
        test_rmse=final.get("best_test_rmse"), test_mae=final.get("best_test_mae"),
        baseline_test_rmse=baseline["rmse"] if baseline else None,
        baseline_test_mae=baseline["mae"] if baseline else None,
        epochs_run=[int(m["epoch"]) for m in history], checkpoint_path=best_checkpoint.path,
        preprocess_version=index.preprocess_version, history=history, diverged_at_epoch=diverged_at,
        n_videos_fallback={k.removeprefix("n_videos_fallback_"): int(v) for k, v in final.items()
                           if k.startswith("n_videos_fallback_")}, model_version=model_version)


class TrainingDiverged(RuntimeError):
    """The loss or dev RMSE became NaN/inf before any good epoch."""


def _log_data_report(logger, data: str) -> None:
    """What preprocessing reported about the manifest (split sizes, subjects recurring across the
    official partitions, unlabelled videos) goes to the run: the protocol is part of the result."""
    from pipeline.shardset import SUMMARY_FILE, read_json

    report = (read_json(data, SUMMARY_FILE) or {}).get("manifest")
    if not report:
        return
    recurring = report.get("recurring_subjects") or {}
    logger.log_params({"recurring_subjects": int(recurring.get("count", 0)),
                       "unlabelled_videos": len(report.get("unlabelled_video_ids") or [])})
    logger.log_text(json.dumps(report, indent=2, default=str), "data/manifest_report.json")
