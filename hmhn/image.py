"""Face-crop pixels -> model input. One place, so training, evaluation, export and serving agree."""
from __future__ import annotations

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_jpeg(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3), resized to size x size when given."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("not a decodable JPEG/PNG image")
    rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if size is not None and rgb.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    return rgb


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB batch (N, H, W, 3) -> float32 (N, 3, H, W), ImageNet mean/std normalised."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
