"""Per-video evaluation, the way AVEC scores it, and what the final evaluation logs.

* `evaluate_split`: a split's per-video predictions (mean of the clamped frame scores, through the
  served model's scoring path, hmhn.inference) and metrics; every labelled video counts, a video
  without usable frames being predicted as the training mean. Inside the worker group each rank
  scores the videos it owns and only per-video (sum, count) pairs travel, so the numbers equal a
  single-process evaluation.
* `baseline_metrics`: predict-the-training-mean, the floor every run is compared with.
* `log_final_evaluation`, `log_attention_maps`: the evaluation artifacts rank 0 logs (numbers only,
  unless attention maps over faces were asked for).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from hmhn.data import ShardIndex, VideoEntry, iter_eval_batches, owner_rank
from hmhn.inference import crops_to_input, score_input, scorer_for
from hmhn.metrics import video_metrics
from hmhn.model import HMHN
from hmhn.train_config import TrainConfig


@torch.no_grad()
def video_score_sums(model: HMHN, root: str, videos: list[VideoEntry], config: TrainConfig, max_frames: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, tuple[float, int]]:
    """video_id -> (sum, count) of its frame scores (clamped to 0..63, as the registered model serves them)."""
    scorer = scorer_for(model)  # the served model's scoring (hmhn.inference): what selection sees is what it serves
    sums: dict[str, list[float]] = {}
    for batch_ids, images, _ in iter_eval_batches(root, videos, config.model.input_size, config.eval_batch_size,
                                                  max_frames):
        scores = score_input(scorer, crops_to_input(images, config.model.input_size)).tolist()
        for video_id, score in zip(batch_ids, scores):
            entry = sums.setdefault(video_id, [0.0, 0])
            entry[0] += score
            entry[1] += 1
    return {k: (v[0], int(v[1])) for k, v in sums.items()}


def evaluate_split(model: HMHN, index: ShardIndex, split: str, config: TrainConfig, train_mean: float,
                   device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, max_frames: int = 0
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """(per-video predictions, metrics) of one split, the way AVEC scores it: every labelled video counts.

    A video without usable frames (no face, failed) is predicted as the training mean and counted in
    `n_videos_fallback` (listed in `fallback_videos`). Metrics: rmse, mae, n_videos, and per task
    (`rmse_<task>`, `mae_<task>`) when the split has tasks (AVEC2014 Freeform / Northwind).

    With world_size > 1 (inside the worker group) each worker scores only the videos it owns
    (stable hash of video_id) and only per-video (sum, count) pairs are all-gathered: the same
    numbers as world_size == 1, and traffic per video, not per frame.
    """
    if world_size > 1:
        # DDP syncs BatchNorm running stats from rank 0 only at the start of each forward, so after
        # training every rank holds slightly different ones; evaluate with rank 0's (= the checkpoint's).
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    videos = [v for v in index.videos(split, with_frames=True) if owner_rank(v.video_id, world_size) == rank]
    sums = video_score_sums(model, index.root, videos, config, max_frames, device)
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, sums)
        sums = {k: v for part in gathered for k, v in part.items()}
    predictions = {video_id: total / count for video_id, (total, count) in sums.items() if count}
    truth = index.labels(split)
    fallback = sorted(v for v in truth if v not in predictions)
    predictions.update({v: train_mean for v in fallback})
    metrics: dict[str, Any] = {"rmse": math.nan, "mae": math.nan, "n_videos": 0, "n_videos_fallback": len(fallback),
                               "fallback_videos": fallback}
    if truth:
        metrics.update(video_metrics(predictions, truth))
        tasks = index.select(split).select(["video_id", "task"]).to_pylist()
        by_task: dict[str, dict[str, float]] = {}
        for row in tasks:
            if row["task"] and row["video_id"] in truth:
                by_task.setdefault(row["task"], {})[row["video_id"]] = truth[row["video_id"]]
        for task, task_truth in sorted(by_task.items()):
            task_metrics = video_metrics(predictions, task_truth)
            metrics[f"rmse_{task}"], metrics[f"mae_{task}"] = task_metrics["rmse"], task_metrics["mae"]
    return predictions, metrics


def baseline_metrics(index: ShardIndex, split: str) -> dict[str, float] | None:
    """Predict-the-training-mean for every video of `split` (None when it has no labelled videos)."""
    truth = index.labels(split)
    if not truth:
        return None
    mean = index.train_mean()
    return video_metrics({v: mean for v in truth}, truth)


def log_final_evaluation(logger, config: TrainConfig, index: ShardIndex, predictions, run_name: str,
                         best_epoch: int) -> None:
    """The per-video evaluation artifacts, only with config.log_predictions (labels and predictions of
    identifiable people: off for clinical deployments; the aggregate metrics are logged either way)."""
    if config.log_predictions:
        _log_evaluation_artifacts(logger, index, predictions, run_name, best_epoch)


def _log_evaluation_artifacts(logger, index: ShardIndex, predictions, run_name: str, best_epoch: int) -> None:
    """Per-video CSV (fallback videos flagged), predicted-vs-true scatter (numbers only: no face pixels)."""
    from hmhn.tracking import prediction_table, scatter_figure

    by_id = {v.video_id: v for v in index.videos(with_frames=False) if v.split in predictions}
    rows = [{"split": split, "video_id": vid, "subject_id": by_id[vid].subject_id, "task": by_id[vid].task or "",
             "label": by_id[vid].label, "prediction": score, "n_frames": by_id[vid].faces_kept if
             by_id[vid].has_frames else 0, "fallback": int(vid in metrics["fallback_videos"])}
            for split, (preds, metrics) in predictions.items() for vid, score in sorted(preds.items())]
    logger.log_text(prediction_table(rows), "evaluation/video_predictions.csv")
    fallback = [r for r in rows if r["fallback"]]
    if fallback:
        logger.log_text("split,video_id,reason\n" + "".join(
            f"{r['split']},{r['video_id']},{by_id[r['video_id']].status}: {by_id[r['video_id']].reason}\n"
            for r in fallback), "evaluation/fallback_videos.csv")
    labelled = [r for r in rows if not math.isnan(r["label"])]
    if labelled:
        logger.log_figure(scatter_figure(labelled, f"{run_name}, best epoch {best_epoch}"),
                          "evaluation/predicted_vs_true.png")


def log_attention_maps(logger, model: HMHN, index: ShardIndex, config: TrainConfig, device) -> None:
    """Opt-in only (face images are health data): per-head attention over a few dev faces."""
    from hmhn.explain import attention_figure, attention_maps

    videos = index.videos("dev") or index.videos("train")
    ids, images, _ = next(iter_eval_batches(index.root, videos[:config.attention_frames], config.model.input_size,
                                            batch_size=config.attention_frames, max_frames_per_video=1))
    logger.log_figure(attention_figure(images, attention_maps(model, images), ids), "evaluation/attention_maps.png")
