"""Frame -> video aggregation and video-level RMSE / MAE, the way AVEC scores depression.

AVEC scores one prediction per recording: frame predictions of a video are aggregated first
(mean by default), then RMSE and MAE are taken over videos, each video counting once.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

AGGREGATIONS = ("mean", "median")


def video_scores(video_ids: Sequence[str], frame_scores: Sequence[float] | np.ndarray,
                 how: str = "mean") -> dict[str, float]:
    """One score per video from its frames' scores ("mean" or "median"); ids and scores align by position."""
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    scores = np.asarray(frame_scores, dtype=np.float64).reshape(-1)
    ids = list(video_ids)
    if len(ids) != scores.shape[0]:
        raise ValueError(f"{len(ids)} video ids but {scores.shape[0]} frame scores")
    per_video: dict[str, list[float]] = defaultdict(list)
    for video_id, score in zip(ids, scores.tolist()):
        per_video[str(video_id)].append(score)
    reduce = np.mean if how == "mean" else np.median
    return {video_id: float(reduce(values)) for video_id, values in per_video.items()}


def video_metrics(pred: Mapping[str, float], truth: Mapping[str, float]) -> dict[str, float | int]:
    """RMSE and MAE over the videos present in both mappings; scores are taken as given (no clamping).

    Returns {"rmse", "mae", "n_videos"}. Raises ValueError when no video is in both.
    """
    common = sorted(set(pred) & set(truth))
    if not common:
        raise ValueError("no video is present in both predictions and ground truth")
    errors = np.array([float(pred[v]) - float(truth[v]) for v in common], dtype=np.float64)
    return {"rmse": float(math.sqrt(np.mean(errors ** 2))), "mae": float(np.mean(np.abs(errors))),
            "n_videos": len(common)}
