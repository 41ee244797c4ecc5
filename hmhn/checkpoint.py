"""Load a pretrained ResNet-18 into HMHN's trunk from a local file (never downloads).

Accepted files (torch.save'd, loaded with weights_only=True, so no code is unpickled):
- a torchvision ResNet-18 state dict (conv1.weight, ..., fc.weight);
- DAN's MS-Celeb-1M checkpoint `resnet18_msceleb.pth`: {"state_dict": {...}} whose keys may carry
  a "module." prefix (saved from DataParallel) and include its face-identity classifier fc.*.
The classifier (fc.*) is dropped; everything else must match the trunk exactly.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Containers seen around state dicts in published checkpoints (DAN uses "state_dict").
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_DROPPED_PREFIXES = ("fc.",)
_MAX_LISTED = 8


def read_backbone_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a checkpoint file: container unwrapped, "module." stripped, fc.* dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals: all mean "not a state dict"
        raise ValueError(f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    state = raw
    if isinstance(raw, Mapping):
        for key in _CONTAINER_KEYS:
            if isinstance(raw.get(key), Mapping):
                state = raw[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(raw).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a named tensor; this is not a model state dict")
        name = key.removeprefix("module.")
        if name.startswith(_DROPPED_PREFIXES):
            continue
        tensors[name] = value
    return tensors


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def load_backbone_state_dict(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Strict load with a readable ValueError listing missing / unexpected keys and shape mismatches."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_listing(mismatched)}")
        raise ValueError(f"{source} does not fit the ResNet-18 trunk; " + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)


def load_backbone_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet-18 or DAN MS-Celeb-1M checkpoint strictly into `model.backbone`.

    FileNotFoundError for a missing file; ValueError for a file that is not a fitting ResNet-18.
    """
    load_backbone_state_dict(model.backbone, read_backbone_state_dict(path), source=str(path))
