"""Pictures that explain a video's score: per-head attention maps over its faces, frame scores over time.

These pictures contain faces (health data): they are written only where a user asks
(`jobs/predict.py --explain-dir`), never logged to MLflow or printed.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmhn.image import decode_jpeg, to_model_input
from hmhn.model import HMHN, HMHNScorer
from pipeline.schema import LABEL_MAX, LABEL_MIN, SEVERITY_BANDS


def pick_faces(count: int, faces: int) -> list[int]:
    """Positions of `faces` frames spread evenly over a video's `count` frames (all of them if fewer)."""
    if count <= faces:
        return list(range(count))
    return np.linspace(0, count - 1, faces).round().astype(int).tolist()


def attention_maps(model: HMHN, images: np.ndarray) -> np.ndarray:
    """(N,K,S,S) per-head attention maps of uint8 RGB crops (N,S,S,3), upsampled to the crop size and
    rescaled to [0, 1] per image and head. Uses the model's own device; the crops must already be S = input size."""
    scorer = HMHNScorer(model).eval()
    device = next(model.parameters()).device
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(images))).to(device)
    return scorer.attention_maps(x, size=images.shape[1], normalise=True).cpu().numpy()


def attention_figure(images: np.ndarray, maps: np.ndarray, captions: list[str]):
    """Grid: one row per face, columns = the crop, then the crop with each head's map over it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n, k = maps.shape[:2]
    fig = Figure(figsize=(1.7 * (k + 1), 1.8 * n), dpi=110)
    for i in range(n):
        for column in range(k + 1):
            ax = fig.add_subplot(n, k + 1, i * (k + 1) + column + 1)
            ax.imshow(images[i])
            if column:
                ax.imshow(maps[i, column - 1], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            if i == 0:
                ax.set_title("face" if column == 0 else f"head {column}", fontsize=8)
            if column == 0:
                ax.set_ylabel(captions[i], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def frame_score_figure(timestamps_s: np.ndarray, scores: np.ndarray, title: str = ""):
    """Frame scores over time with the video mean and the BDI-II band cut-offs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.8), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    order = np.argsort(timestamps_s, kind="stable")
    ax.plot(np.asarray(timestamps_s)[order], np.asarray(scores)[order], ".-", lw=1, ms=4, label="frame score")
    if len(scores):
        mean = float(np.mean(scores))
        ax.axhline(mean, color="C3", lw=1.5, label=f"video mean {mean:.1f}")
    for _, lowest in SEVERITY_BANDS[1:]:  # BDI-II band boundaries
        ax.axhline(lowest, color="0.8", lw=0.8, ls="--")
    ax.set_ylim(LABEL_MIN, LABEL_MAX)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("BDI-II")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def explain_video(model: HMHN, rows: pd.DataFrame, frame_scores: pd.DataFrame, out_dir: str, video_id: str,
                  faces: int = 4) -> dict[str, Any]:
    """Write `<video_id>_attention.png` and `<video_id>_scores.png` into out_dir.

    rows: the video's shard rows (frame_index, timestamp_s, image JPEG bytes), in frame order.
    frame_scores: the video's frame scores (timestamp_s, score), e.g. from hmhn.scoring.score_frames.
    Returns {"attention_png", "scores_png", "maps" (N,K,S,S), "frame_index" of the faces shown}.
    """
    os.makedirs(out_dir, exist_ok=True)
    size = model.config.input_size
    chosen = pick_faces(len(rows), faces)
    images = np.stack([decode_jpeg(rows["image"].iloc[i], size) for i in chosen])
    maps = attention_maps(model, images)
    captions = [f"t={rows['timestamp_s'].iloc[i]:.1f}s" for i in chosen]
    attention_png = os.path.join(out_dir, f"{video_id}_attention.png")
    attention_figure(images, maps, captions).savefig(attention_png)
    scores_png = os.path.join(out_dir, f"{video_id}_scores.png")
    frame_score_figure(frame_scores["timestamp_s"].to_numpy(), frame_scores["score"].to_numpy(),
                       title=f"{video_id}: frame scores").savefig(scores_png)
    return {"attention_png": attention_png, "scores_png": scores_png, "maps": maps,
            "frame_index": [int(rows["frame_index"].iloc[i]) for i in chosen]}
