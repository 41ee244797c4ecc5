"""Face-crop pixels -> model input. One place, so training, evaluation, export and serving agree."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.jpeg import decode_jpeg, encode_jpeg  # noqa: F401  (one JPEG path for crops, re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB batch (N, H, W, 3) -> float32 (N, 3, H, W), ImageNet mean/std normalised."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
