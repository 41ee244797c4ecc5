"""The optimiser of a training run and its learning-rate schedules, chosen by name (`--schedule`),
with a linear warmup around each.

`make_optimizer(model, config)` is what the worker loop (hmhn.train_loop) and jobs/bench_train.py
use: AdamW with the trunk at `lr` and the new blocks at `head_lr` (MODEL.md section 5), plus the
schedule of `config.schedule`.

A schedule is a function (epoch, ScheduleParams) -> factor of the base learning rates, epoch
counting from 0 after warmup; `make_scheduler` wraps it in a torch LambdaLR that is stepped once
per epoch. The function is rebuilt from the run's config on resume, so a checkpoint holds only the
epoch counter. To add a schedule, write its function and add one line to SCHEDULES.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # hmhn.train_config imports SCHEDULE_NAMES from here
    from hmhn.model import HMHN
    from hmhn.train_config import TrainConfig


@dataclass(frozen=True)
class ScheduleParams:
    epochs: int              # total epochs of the run (cosine reaches its floor at the last one)
    warmup_epochs: int = 0   # linear warmup from 1/(warmup+1) of the base rates
    decay: float = 0.8       # exponential: factor per epoch; step: factor per step_epochs
    step_epochs: int = 10    # step: epochs between decays
    min_factor: float = 0.01  # cosine: the floor, as a fraction of the base rates


def _constant(epoch: int, p: ScheduleParams) -> float:
    return 1.0


def _exponential(epoch: int, p: ScheduleParams) -> float:
    return p.decay ** epoch


def _step(epoch: int, p: ScheduleParams) -> float:
    return p.decay ** (epoch // max(1, p.step_epochs))


def _cosine(epoch: int, p: ScheduleParams) -> float:
    span = max(1, p.epochs - p.warmup_epochs - 1)
    progress = min(1.0, epoch / span)
    return p.min_factor + (1.0 - p.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[int, ScheduleParams], float]] = {
    "exponential": _exponential,  # the paper's recipe (MODEL.md): x0.8 per epoch
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
}
SCHEDULE_NAMES = tuple(SCHEDULES)


def lr_factor(name: str, epoch: int, params: ScheduleParams) -> float:
    """The factor of the base learning rates during `epoch` (0-based: the first epoch is 0)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULE_NAMES}")
    if epoch < params.warmup_epochs:
        return (epoch + 1) / (params.warmup_epochs + 1)
    return SCHEDULES[name](epoch - params.warmup_epochs, params)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, params: ScheduleParams):
    """A LambdaLR over every parameter group (their base rates keep their ratio)."""
    lr_factor(name, 0, params)  # validates the name before the optimiser is touched
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(name, epoch, params))


def make_optimizer(model: "HMHN", config: "TrainConfig"):
    """(AdamW with the trunk at lr and the new blocks at head_lr, its schedule), stepped once per epoch."""
    trunk = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": config.lr}, {"params": rest, "lr": config.head_lr}],
                                  weight_decay=config.weight_decay)
    schedule = ScheduleParams(epochs=config.epochs, warmup_epochs=config.warmup_epochs, decay=config.lr_decay,
                              step_epochs=config.lr_step_epochs, min_factor=config.lr_min_factor)
    return optimizer, make_scheduler(optimizer, config.schedule, schedule)
