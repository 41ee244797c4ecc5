"""The checkpoint of a training run: one file per epoch, written by rank 0, handed to Ray Train.

`CHECKPOINT_FILE` in a Ray Train checkpoint folder holds a dict of tensors and plain data (read
back with torch.load(weights_only=True): nothing is unpickled as code):

    model, optimizer, scheduler   state dicts (the schedule itself is rebuilt from the config)
    epoch                         the epoch these weights finished
    config                        TrainConfig.to_dict(), URIs redacted (pipeline.storage.redact)
    model_config                  the HMHNConfig the weights belong to
    preprocess_version            of the shard set it was trained on (a resume on another is refused)
    train_mean, run_id, metrics   the training mean, the MLflow run, this epoch's reported metrics
    best                          {epoch, dev_rmse, dev_mae, model}: the selection so far; model is None
                                  when this epoch is the best (its weights are `model` already)

A resumed run continues from it (hmhn.train_loop); the driver registers the best one
(`model_from_checkpoint`). Pretrained backbones are another matter: hmhn/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from hmhn.config import HMHNConfig
from hmhn.model import HMHN
from hmhn.train_config import TrainConfig
from pipeline.storage import redact

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(folder: str | os.PathLike, *, model: HMHN, optimizer, scheduler, epoch: int,
                    config: TrainConfig, preprocess_version: str, train_mean: float, metrics: dict[str, Any],
                    run_id: str, best: dict[str, Any]) -> Path:
    """Write CHECKPOINT_FILE into `folder`; the best weights only when they are not this epoch's (space)."""
    path = Path(folder) / CHECKPOINT_FILE
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "config": redact(config.to_dict()),  # stored: URIs without their secrets
                "model_config": dataclasses.asdict(model.config),
                "preprocess_version": preprocess_version, "train_mean": train_mean, "metrics": metrics,
                "run_id": run_id, "best": {**best, "model": None if best["epoch"] == epoch else best["model"]}},
               path)
    return path


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
