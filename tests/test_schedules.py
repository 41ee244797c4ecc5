"""Learning-rate schedules by name (hmhn/schedules.py), as the training loop steps them."""
from __future__ import annotations

import math

import pytest
import torch

from hmhn import HMHN, HMHNConfig
from hmhn.schedules import SCHEDULE_NAMES, ScheduleParams, lr_factor, make_optimizer
from hmhn.train_config import TrainConfig


def _rates(config: TrainConfig, epochs: int) -> list[list[float]]:
    """The learning rates of both parameter groups during each epoch, stepping as the worker loop does."""
    model = HMHN(HMHNConfig(input_size=32, num_heads=2))
    optimizer, scheduler = make_optimizer(model, config)
    rates = []
    for _ in range(epochs):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_default_is_the_papers_exponential_decay():
    rates = _rates(TrainConfig(lr=1e-4, head_lr=1e-3, lr_decay=0.8), 3)
    assert rates[0] == pytest.approx([1e-4, 1e-3]) and rates[2] == pytest.approx([0.64e-4, 0.64e-3])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_warms_up_then_stays_positive_and_finite(name):
    params = ScheduleParams(epochs=12, warmup_epochs=2, decay=0.5, step_epochs=3, min_factor=0.1)
    factors = [lr_factor(name, e, params) for e in range(12)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warmup, then the schedule from 1
    assert all(math.isfinite(f) and 0 < f <= 1 for f in factors)


def test_cosine_and_step_shapes():
    cosine = ScheduleParams(epochs=11, min_factor=0.1)
    assert lr_factor("cosine", 0, cosine) == 1.0 and lr_factor("cosine", 10, cosine) == pytest.approx(0.1)
    assert lr_factor("cosine", 5, cosine) == pytest.approx(0.55)
    step = ScheduleParams(epochs=10, decay=0.5, step_epochs=3)
    assert [lr_factor("step", e, step) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]


def test_a_resumed_run_continues_the_schedule_and_reads_old_checkpoints():
    config = TrainConfig(schedule="cosine", epochs=6, warmup_epochs=1)
    model = HMHN(HMHNConfig(input_size=32, num_heads=2))
    optimizer, scheduler = make_optimizer(model, config)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    fresh_optimizer, fresh = make_optimizer(model, config)
    fresh.load_state_dict({"lr_lambdas": [None, None], **saved})
    assert fresh.last_epoch == 3
    # an ExponentialLR state (checkpoints written before --schedule existed) loads too: its epoch counts
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1)
    old = torch.optim.lr_scheduler.ExponentialLR(sgd, 0.8)
    sgd.step()  # as training does: the optimiser steps first (else torch warns that a value is skipped)
    old.step()
    _, again = make_optimizer(model, TrainConfig())
    again.load_state_dict({"lr_lambdas": [None, None], **old.state_dict()})
    assert again.last_epoch == 1


def test_unknown_schedule_is_refused_when_the_config_is_built():
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear-ish")
