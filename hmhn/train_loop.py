"""What every Ray Train worker runs: `train_loop_per_worker`, which reads top to bottom.

    set up the worker -> build the model and optimiser, restored from Ray Train's checkpoint on a
    resume or restart -> rank 0 logs the run's params -> per epoch: train on this worker's share
    of the frames drawn for the epoch, stop on divergence, evaluate dev per video across the
    group, report the metrics (rank 0 attaches the checkpoint) -> evaluate the best weights on dev
    and test, rank 0 logs them and the evaluation artifacts.

Ray Train pickles `train_loop_per_worker` by reference: workers import this module (the checkout
on PYTHONPATH locally, `ray job submit --working-dir .` on a cluster). The driver that starts it is
hmhn.train. Rank 0 logs to MLflow; per-epoch metrics once Ray Train has committed the epoch
(hmhn.epoch_log), so that a restart or a rerun never logs an epoch twice.

Also used on their own: `train_step` (one optimisation step; jobs/bench_train.py's plain loop runs
it too) and `build_model`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from hmhn.data import ShardIndex
from hmhn.epoch_batches import EpochBatches
from hmhn.epoch_log import CommittedEpochLog, log_committed_epoch
from hmhn.evaluation import evaluate_split, log_attention_maps, log_final_evaluation
from hmhn.image import to_model_input
from hmhn.losses import hmhn_loss
from hmhn.model import HMHN
from hmhn.schedules import make_optimizer
from hmhn.train_checkpoint import load_checkpoint_state, save_checkpoint
from hmhn.train_config import TrainConfig

SHUFFLE_BUFFER_MAX_ROWS = 2048  # ~300 MB of 224 px uint8 crops per worker
_LOOKAHEAD_ROWS = 64  # training rows queued ahead of the step (at least 2 batches): ~10 MB at 224 px


def train_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any] | None:
    """`loop` is what the driver sends (hmhn.train.run_training): the config as a dict, the shard
    set's location, run name and MLflow run, training mean, threads. Rank 0 returns the final
    metrics, the history of the epochs this worker group trained and the predictions."""
    worker = set_up_worker(loop)
    training = build_or_restore(worker)
    logger = start_run_logging(worker, training) if worker.master else None
    epoch_log = CommittedEpochLog(logger) if worker.master else None
    batches = epoch_batches(worker, training.start_epoch)
    history: list[dict[str, float]] = []  # epochs trained by this worker group (returned by rank 0)
    diverged_at: int | None = None
    for epoch in range(training.start_epoch + 1, worker.config.epochs + 1):
        metrics = train_epoch(worker, training, batches, epoch)
        # A diverged run stops here, on every rank alike (the losses were all-reduced), before its
        # broken weights are reported: the last reported checkpoint is the last good one.
        dev = evaluate_epoch(worker, training) if math.isfinite(metrics["train_loss"]) else None
        if dev is None or (dev["n_videos"] and not math.isfinite(dev["rmse"])):
            diverged_at = epoch
            _say_diverged(worker, training, metrics, dev)
            break
        metrics = select_and_complete(training, metrics, dev)
        history.append(metrics)
        report_epoch(worker, training, metrics, epoch_log)
    batches.close()  # after a divergence the producer may be preparing an epoch that never comes
    return finish(worker, training, logger, epoch_log, history, diverged_at)


# ----------------------------------------------------------------------------------------------
# The steps, in the order the loop takes them


@dataclass
class Worker:
    """What this worker is and works on; fixed for its lifetime."""

    config: TrainConfig
    index: ShardIndex
    loop: dict[str, Any]           # as sent by the driver
    rank: int
    world_size: int
    device: torch.device
    select_split: str              # the split that selects the best epoch: "dev" ("train" with --allow-no-dev)
    say: Callable[[str], None]

    @property
    def master(self) -> bool:      # rank 0 logs to MLflow and writes checkpoints
        return self.rank == 0

    @property
    def train_mean(self) -> float:
        return self.loop["train_mean"]


@dataclass
class Training:
    """The model and optimiser of this worker and where the run stands."""

    model: torch.nn.Module         # DDP-wrapped when world_size > 1
    raw_model: HMHN
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_epoch: int               # epochs done before this worker group started
    best: dict[str, Any]           # the selection so far: epoch, dev_rmse, dev_mae, model (its weights)
    resumed_metrics: dict[str, Any] | None = None  # the metrics of the checkpoint resumed from


def set_up_worker(loop: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch

    # The console: Ray Train V2 patches print() and, when stdout is wrapped (MLflow does), writes each
    # line twice; its own INFO lines ("Reporting training result ...") come once per epoch and worker.
    _quiet_ray_train_logs()
    worker_log = logging.getLogger("hmhn.train")
    worker_log.setLevel(logging.INFO)
    index = ShardIndex.load(loop["data"])  # each worker reads the index itself: the driver sends its location
    context = ray.train.get_context()
    # pipeline/resources.plan_training: on CPU-only nodes all the node's cores (the reservation is
    # logical; the data tasks run ahead and need little), on GPU nodes the reserved CPUs.
    torch.set_num_threads(loop["threads"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Worker(config=TrainConfig.from_dict(loop["config"]), index=index, loop=loop,
                  rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
                  select_split="dev" if index.count("dev") else "train", say=worker_log.info)


def build_or_restore(worker: Worker) -> Training:
    """A fresh model (optionally from a pretrained backbone), or whatever Ray Train hands back on a
    resume or restart: weights, optimiser and schedule state, epoch and selection."""
    import ray.train
    import ray.train.torch

    config = worker.config
    model = build_model(config, worker.train_mean)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.backbone_checkpoint:
        from hmhn import load_backbone_checkpoint

        load_backbone_checkpoint(model, config.backbone_checkpoint, printer=worker.say if worker.master else None)
    if worker.device.type == "cuda":
        # Before DDP is built: its gradient buckets copy the parameters' layout then, and a layout
        # changed afterwards costs a copy per step (DDP's "Grad strides do not match bucket view strides").
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to device + DDP when world_size > 1
    raw_model: HMHN = model.module if hasattr(model, "module") else model
    optimizer, scheduler = make_optimizer(raw_model, config)
    training = Training(model, raw_model, optimizer, scheduler, start_epoch=0,
                        best={"epoch": 0, "dev_rmse": math.inf, "dev_mae": math.inf, "model": None})
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _restore(worker, training, load_checkpoint_state(folder, worker.device))
    return training


def _restore(worker: Worker, training: Training, state: dict[str, Any]) -> None:
    if state["preprocess_version"] != worker.index.preprocess_version:
        raise ValueError(f"run {worker.loop['run_name']!r} was trained on preprocess_version "
                         f"{state['preprocess_version']}, --data has {worker.index.preprocess_version}: "
                         "use a new --run-name")
    training.raw_model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    # checkpoints written before schedules had names hold an ExponentialLR state: only its epoch counts
    training.scheduler.load_state_dict({"lr_lambdas": [None] * len(training.optimizer.param_groups),
                                        **state["scheduler"]})
    training.start_epoch = state["epoch"]
    training.resumed_metrics = state["metrics"]
    training.best = dict(state["best"])
    if training.best["model"] is None:  # the checkpoint's own epoch was the best one
        training.best["model"] = copy.deepcopy(state["model"])


def start_run_logging(worker: Worker, training: Training):
    """Rank 0: the run's params and system metrics, and the epoch resumed from if MLflow lacks it."""
    from hmhn.tracking import RunLogger

    config, index, loop = worker.config, worker.index, worker.loop
    logger = RunLogger(loop["tracking_uri"], loop["run_id"])
    system_metrics = logger.start_system_metrics()
    splits = ("train", "dev", "test")
    logger.log_params({**config.to_dict(), "world_size": worker.world_size, "threads_per_worker": loop["threads"],
                       "cpus_per_worker": loop["cpus_per_worker"], "device": worker.device.type,
                       "preprocess_version": index.preprocess_version,
                       "train_mean": round(worker.train_mean, 4), "selection_split": worker.select_split,
                       **{f"{split}_videos": index.count(split, with_frames=False) for split in splits},
                       **{f"{split}_videos_without_frames": index.count(split, with_frames=False) - index.count(split)
                          for split in splits}})
    logger.set_tags({"system_metrics": system_metrics})
    if training.start_epoch:
        best = training.best
        worker.say(f"[hmhn] resuming {loop['run_name']} after epoch {training.start_epoch} "
                   f"(best so far: epoch {best['epoch']}, dev RMSE {best['dev_rmse']:.3f})")
        log_committed_epoch(logger, training.resumed_metrics)
    return logger


def epoch_batches(worker: Worker, start_epoch: int) -> EpochBatches:
    """The training batches of every epoch left; the next epoch's are prepared while this one ends
    and is evaluated."""
    import ray.train

    config = worker.config
    # Each Ray Data task emits all k frames of one video (one label), so a small shuffle buffer
    # gives batches of one or two videos: correlated gradients and useless BatchNorm statistics.
    # Shuffle across (up to) a whole epoch of this worker's frames instead.
    epoch_rows = worker.index.count("train") * config.frames_per_video // worker.world_size
    shuffle_rows = max(4 * config.batch_size, min(epoch_rows, SHUFFLE_BUFFER_MAX_ROWS))
    return EpochBatches(ray.train.get_dataset_shard("train"), config.epochs - start_epoch,
                         lookahead=max(2, -(-_LOOKAHEAD_ROWS // config.batch_size)),
                         batch_size=config.batch_size, local_shuffle_buffer_size=shuffle_rows,
                         drop_last=True,  # a 1-frame last batch breaks BatchNorm in train mode
                         dtypes={"image": torch.uint8, "label": torch.float32})


def train_epoch(worker: Worker, training: Training, batches: EpochBatches, epoch: int) -> dict[str, float]:
    """Train one epoch on this worker's share of the frames drawn for it and step the schedule; the
    epoch's training metrics, losses averaged over the whole group, times of its slowest worker."""
    training.model.train()
    started = time.perf_counter()
    sums = np.zeros(3)  # total, regression, partition losses, weighted by batch size
    samples = 0
    waited_before = batches.wait_s
    for batch in batches.epoch():
        loss, parts = train_step(training.model, training.optimizer, batch["image"], batch["label"],
                                 worker.config, worker.device)
        n = batch["label"].shape[0]
        sums += n * np.array([loss.item(), parts["regression"].item(), parts["partition"].item()])
        samples += n
    seconds = time.perf_counter() - started
    waited = batches.wait_s - waited_before  # > 0: the data pipeline kept this worker waiting
    lr = training.optimizer.param_groups[0]["lr"]
    training.scheduler.step()
    *total_sums, total_samples = _all_reduce([*sums.tolist(), samples])
    slowest, waited = _all_reduce([seconds, waited],
                                  torch.distributed.ReduceOp.MAX if worker.world_size > 1 else None)
    per_sample = [s / max(total_samples, 1) for s in total_sums]
    return {"epoch": epoch, "train_loss": per_sample[0], "train_regression_loss": per_sample[1],
            "train_partition_loss": per_sample[2], "lr": lr, "train_samples": total_samples,
            "samples_per_s": total_samples / max(slowest, 1e-9), "epoch_seconds": slowest, "data_wait_s": waited}


def evaluate_epoch(worker: Worker, training: Training) -> dict[str, Any]:
    """Per-video metrics of the selection split, on a capped, evenly spaced set of frames per video."""
    _, dev = evaluate_split(training.raw_model, worker.index, worker.select_split, worker.config, worker.train_mean,
                            worker.device, worker.rank, worker.world_size,
                            max_frames=worker.config.eval_frames_per_video)
    return dev


def _say_diverged(worker: Worker, training: Training, metrics: dict[str, float], dev: dict[str, Any] | None) -> None:
    if worker.master:
        worker.say(f"[hmhn] epoch {metrics['epoch']}: training diverged (train loss {metrics['train_loss']}, "
                   f"{worker.select_split} RMSE {(dev or {}).get('rmse', math.nan)}); stopping. The model is the "
                   f"last good epoch's ({training.best['epoch'] or 'none'}). Lower --lr / --head-lr, or check the data")


def select_and_complete(training: Training, metrics: dict[str, float], dev: dict[str, Any]) -> dict[str, float]:
    """Keep this epoch's weights if they are the best so far; the epoch's full metrics (as reported)."""
    epoch = metrics["epoch"]
    if dev["rmse"] < training.best["dev_rmse"]:
        training.best = {"epoch": epoch, "dev_rmse": dev["rmse"], "dev_mae": dev["mae"],
                         "model": {k: v.detach().cpu().clone() for k, v in training.raw_model.state_dict().items()}}
    best = training.best
    # the selection so far is on the capped per-epoch evaluation (best_* at the end: every frame)
    return {**metrics, "dev_rmse": dev["rmse"], "dev_mae": dev["mae"], "selected_dev_rmse": best["dev_rmse"],
            "best_epoch": best["epoch"], "start_epoch": training.start_epoch}


def report_epoch(worker: Worker, training: Training, metrics: dict[str, float],
                 epoch_log: CommittedEpochLog | None) -> None:
    """Every worker reports, the same number of times; rank 0 attaches the checkpoint, prints the
    epoch's line, and logs the metrics to MLflow once Ray Train has committed them (hmhn.epoch_log)."""
    import ray.train

    if not worker.master:
        ray.train.report(metrics)
        return
    config = worker.config
    worker.say(f"[hmhn] epoch {metrics['epoch']}/{config.epochs}  train loss {metrics['train_loss']:.3f}  "
               f"{worker.select_split} RMSE {metrics['dev_rmse']:.3f} MAE {metrics['dev_mae']:.3f}  "
               f"{metrics['samples_per_s']:.1f} samples/s  ({metrics['epoch_seconds']:.1f} s)")
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, model=training.raw_model, optimizer=training.optimizer, scheduler=training.scheduler,
                        epoch=metrics["epoch"], config=config, preprocess_version=worker.index.preprocess_version,
                        train_mean=worker.train_mean, metrics=metrics, run_id=worker.loop["run_id"],
                        best=training.best)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    epoch_log.after_report(metrics)


def finish(worker: Worker, training: Training, logger, epoch_log: CommittedEpochLog | None,
           history: list[dict[str, float]], diverged_at: int | None) -> dict[str, Any] | None:
    """Evaluate the best weights on dev and test (every frame by default; no report, so counts stay
    equal); rank 0 logs the final metrics and artifacts and returns what the driver needs."""
    master, best, index = worker.master, training.best, worker.index
    if best["model"] is None:  # diverged before any good epoch: nothing to evaluate
        if master:
            epoch_log.wait()
            logger.set_tags({"diverged_at_epoch": diverged_at})
            logger.stop_system_metrics()
        return {"diverged_at_epoch": diverged_at, "best_epoch": 0, "history": history} if master else None
    training.raw_model.load_state_dict(best["model"])
    predictions = {split: evaluate_split(training.raw_model, index, split, worker.config, worker.train_mean,
                                         worker.device, worker.rank, worker.world_size,
                                         max_frames=worker.config.final_eval_frames_per_video)
                   for split in ("dev", "test") if index.count(split, with_frames=False)}
    if not master:
        return None
    epoch_log.wait()  # the last epoch's metrics, logged while the final evaluation ran
    # best_<split>_*: the chosen epoch's weights evaluated on every frame (final_eval_frames_per_video)
    final: dict[str, Any] = {"best_epoch": best["epoch"]}
    for split, (_, m) in predictions.items():
        final.update({f"best_{split}_{k}": v for k, v in m.items() if k.startswith(("rmse", "mae"))})
        final[f"n_videos_fallback_{split}"] = m["n_videos_fallback"]
    logger.log_metrics(final)
    if diverged_at:
        logger.set_tags({"diverged_at_epoch": diverged_at})
    log_final_evaluation(logger, worker.config, index, predictions, worker.loop["run_name"], best["epoch"])
    if worker.config.log_attention_maps:
        log_attention_maps(logger, training.raw_model, index, worker.config, worker.device)
    logger.stop_system_metrics()
    return {**final, "diverged_at_epoch": diverged_at, "history": history,
            "predictions": {split: p for split, (p, _) in predictions.items()},
            "fallback_videos": {split: m["fallback_videos"] for split, (_, m) in predictions.items()}}


# ----------------------------------------------------------------------------------------------
# Pieces shared with the benchmark and tests


def build_model(config: TrainConfig, train_mean: float) -> HMHN:
    torch.manual_seed(config.seed)  # identical init on every worker (DDP broadcasts rank 0's anyway)
    return HMHN(dataclasses.replace(config.model, initial_score=train_mean))


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
               device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, parts


def _all_reduce(values: list[float], op=None) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _quiet_ray_train_logs() -> None:
    """Ray Train's INFO lines in a worker (a dict per report, per epoch and worker) to WARNING. Its
    report logger is named after its file path (logging.getLogger(__file__)), not ray.train.*."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
