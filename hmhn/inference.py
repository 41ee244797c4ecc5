"""Inference in one place: a model from weights + config, face crops -> model input, frame scores
with one precision policy.

Training's evaluation (hmhn.evaluation), batch scoring (hmhn.scoring), the served pyfunc (hmhn.serving)
and the explainer use these, so the scores a model is selected on are the scores it serves: the
same decode + resize + normalisation (hmhn.image) and the same numerics, bf16 autocast +
channels_last on CUDA and fp32 on CPU, whichever path runs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hmhn.config import HMHNConfig
from hmhn.image import decode_jpeg, to_model_input
from hmhn.model import HMHN, HMHNScorer


def model_from_state(state: Mapping[str, torch.Tensor], config: HMHNConfig | Mapping[str, Any],
                     device: torch.device | str = "cpu") -> HMHN:
    """An HMHN in eval mode on `device` from a state_dict and its config (dataclass or dict)."""
    model = HMHN(config if isinstance(config, HMHNConfig) else HMHNConfig(**config))
    model.load_state_dict(state)
    return model.to(device).eval()


def model_from_files(weights_path: str, config_path: str, device: torch.device | str = "cpu") -> HMHN:
    """The logged model's two artifacts: weights.pt (loaded weights_only) and hmhn_config.json."""
    state = torch.load(weights_path, map_location=device, weights_only=True)
    return model_from_state(state, json.loads(Path(config_path).read_text()), device)


def scorer_for(model: HMHN) -> HMHNScorer:
    """Frame scores clamped to the BDI-II range, as the registered model serves them."""
    return HMHNScorer(model, clamp=True).eval()


def crops_to_input(crops: Sequence[bytes] | np.ndarray, input_size: int) -> torch.Tensor:
    """Encoded JPEG/PNG crops (decoded and resized to input_size) or a uint8 batch (N, S, S, 3)
    -> the float model input (N, 3, S, S). ValueError names an undecodable crop."""
    if isinstance(crops, np.ndarray) and crops.dtype == np.uint8 and crops.ndim == 4:
        return to_model_input(crops)
    return to_model_input(np.stack([decode_jpeg(data, input_size) for data in crops]))


@torch.no_grad()
def score_input(scorer: HMHNScorer, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Frame scores (float64) of a model-input batch on the scorer's device, in chunks of batch_size.
    The one precision policy: bf16 autocast + channels_last on CUDA, fp32 on CPU."""
    device = next(scorer.parameters()).device
    cuda = device.type == "cuda"
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size].to(device, non_blocking=True)
        if cuda:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out.append(scorer(chunk).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
