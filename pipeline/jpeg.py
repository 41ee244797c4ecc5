"""JPEG face crops: written by preprocessing, read by training and scoring.

Kept free of torch so the preprocessing actors start in a fraction of the time (importing torch
costs seconds per actor on a busy core); hmhn.image re-exports both functions.
"""
from __future__ import annotations

import cv2
import numpy as np


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
