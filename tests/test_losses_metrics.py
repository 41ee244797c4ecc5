"""Losses (regression + partition) and AVEC-style video-level metrics, checked against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hmhn import HMHNOutput, LossConfig, hmhn_loss, partition_loss, video_metrics, video_scores


def _output(score, heads, partition_applies=True) -> HMHNOutput:
    score = torch.as_tensor(score, dtype=torch.float32)
    heads = torch.as_tensor(heads, dtype=torch.float32)
    b, k, _ = heads.shape
    return HMHNOutput(score, heads, torch.ones(b, k, 2, 2), heads.sum(1), partition_applies)


# ------------------------------------------------------------------------------------------- losses

def test_partition_loss_by_hand():
    # One sample, K=2 heads, 2 features: unbiased variance across heads per feature = (a-b)^2 / 2.
    heads = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])
    mean_variance = ((0 - 2) ** 2 / 2 + (1 - 5) ** 2 / 2) / 2          # (2 + 8) / 2 = 5
    assert partition_loss(heads).item() == pytest.approx(math.log(1 + 2 / mean_variance))
    assert partition_loss(torch.randn(3, 1, 8)).item() == 0.0
    spread = partition_loss(torch.tensor([[[0.0], [10.0]]]))
    assert spread < partition_loss(heads)                              # more spread -> smaller loss


def test_hmhn_loss_mse_and_partition_weight():
    heads = [[[0.0, 1.0], [2.0, 5.0]], [[1.0, 1.0], [3.0, 3.0]]]
    out = _output([10.0, 20.0], heads)
    target = torch.tensor([13.0, 16.0])
    expected_mse = ((10 - 13) ** 2 + (20 - 16) ** 2) / 2                  # 12.5
    total, parts = hmhn_loss(out, target, LossConfig(regression="mse", partition_weight=0.5))
    assert parts["regression"].item() == pytest.approx(expected_mse)
    expected_partition = partition_loss(torch.tensor(heads)).item()
    assert parts["partition"].item() == pytest.approx(expected_partition)
    assert total.item() == pytest.approx(expected_mse + 0.5 * expected_partition)
    total, parts = hmhn_loss(out, target, LossConfig(partition_weight=0.0))
    assert parts["partition"].item() == 0.0 and total.item() == pytest.approx(expected_mse)


def test_hmhn_loss_smooth_l1_by_hand():
    out = _output([10.0, 20.0, 30.0], torch.zeros(3, 1, 4), partition_applies=False)
    target = torch.tensor([10.5, 23.0, 30.0])
    # beta=1: 0.5*d^2 for |d|<1, |d|-0.5 otherwise -> 0.125, 2.5, 0
    total, parts = hmhn_loss(out, target, LossConfig(regression="smooth_l1"))
    assert parts["regression"].item() == pytest.approx((0.125 + 2.5 + 0.0) / 3)
    assert parts["partition"].item() == 0.0 and total.item() == pytest.approx(parts["regression"].item())


def test_hmhn_loss_without_competing_heads_has_no_partition_term():
    out = _output([1.0, 2.0], [[[0.0, 1.0], [2.0, 5.0]], [[1.0, 1.0], [3.0, 3.0]]], partition_applies=False)
    _, parts = hmhn_loss(out, torch.tensor([1.0, 2.0]))
    assert parts["partition"].item() == 0.0 and parts["regression"].item() == 0.0


def test_loss_config_validation():
    with pytest.raises(ValueError):
        LossConfig(regression="l2")
    with pytest.raises(ValueError):
        LossConfig(partition_weight=-1.0)
    with pytest.raises(ValueError, match="shape"):
        hmhn_loss(_output([1.0, 2.0], torch.zeros(2, 1, 4)), torch.tensor([1.0, 2.0, 3.0]))


# ------------------------------------------------------------------------------------------ metrics

def test_video_scores_mean_and_median():
    ids = ["a", "a", "a", "b", "b", "c"]
    frames = np.array([10.0, 20.0, 60.0, 5.0, 7.0, 40.0])
    assert video_scores(ids, frames) == pytest.approx({"a": 30.0, "b": 6.0, "c": 40.0})
    assert video_scores(ids, frames.tolist(), how="median") == pytest.approx({"a": 20.0, "b": 6.0, "c": 40.0})
    with pytest.raises(ValueError):
        video_scores(ids, frames[:-1])
    with pytest.raises(ValueError):
        video_scores(ids, frames, how="max")


def test_video_metrics_by_hand():
    pred = {"a": 10.0, "b": 20.0, "c": 30.0, "only_pred": 99.0}
    truth = {"a": 12.0, "b": 17.0, "c": 30.0, "only_truth": 0.0}
    # errors over the 3 shared videos: -2, 3, 0
    metrics = video_metrics(pred, truth)
    assert metrics["n_videos"] == 3
    assert metrics["rmse"] == pytest.approx(math.sqrt((4 + 9 + 0) / 3))    # 2.0817
    assert metrics["mae"] == pytest.approx((2 + 3 + 0) / 3)                 # 1.6667
    # Scores are taken as given: no clamping to 0..63.
    assert video_metrics({"a": 70.0}, {"a": 63.0})["mae"] == pytest.approx(7.0)
    with pytest.raises(ValueError):
        video_metrics({"x": 1.0}, {"y": 1.0})


def test_frames_to_video_metrics_end_to_end():
    # Every video counts once, however many frames it has (AVEC scores recordings, not frames).
    ids = ["long"] * 4 + ["short"]
    frames = [10.0, 12.0, 14.0, 16.0, 30.0]                                # long -> 13, short -> 30
    metrics = video_metrics(video_scores(ids, frames), {"long": 10.0, "short": 34.0})
    assert metrics["rmse"] == pytest.approx(math.sqrt((3 ** 2 + 4 ** 2) / 2))
    assert metrics["mae"] == pytest.approx(3.5)


def test_severity_bands_at_their_edges():
    """BDI-II bands (Beck et al. 1996): 0-13 minimal, 14-19 mild, 20-28 moderate, 29-63 severe; model
    scores are real numbers, so a band runs up to (not including) the next cut-off."""
    from pipeline.schema import severity_band

    edges = {0: "minimal", 13: "minimal", 13.99: "minimal", 14: "mild", 19: "mild", 19.99: "mild",
             20: "moderate", 28: "moderate", 28.99: "moderate", 29: "severe", 63: "severe"}
    assert {score: severity_band(score) for score in edges} == edges
