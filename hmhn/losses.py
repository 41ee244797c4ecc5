"""Training loss: frame-level regression on BDI-II plus DAN's partition loss over the heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from hmhn.model import HMHNOutput

REGRESSION_LOSSES = ("mse", "smooth_l1")


@dataclass(frozen=True)
class LossConfig:
    """Loss = regression(score, BDI-II) + partition_weight * partition(heads)."""

    regression: Literal["mse", "smooth_l1"] = field(default="mse", metadata={"help": "frame-level regression loss"})
    partition_weight: float = field(default=1.0, metadata={"help": "weight of the partition loss (DAN: 1)"})
    smooth_l1_beta: float = field(default=1.0, metadata={"help": "SmoothL1 transition point, in BDI-II points"})

    def __post_init__(self) -> None:
        if self.regression not in REGRESSION_LOSSES:
            raise ValueError(f"regression must be one of {REGRESSION_LOSSES}, got {self.regression!r}")
        if self.partition_weight < 0:
            raise ValueError(f"partition_weight must be >= 0, got {self.partition_weight}")
        if self.smooth_l1_beta <= 0:
            raise ValueError(f"smooth_l1_beta must be > 0, got {self.smooth_l1_beta}")


def partition_loss(heads: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DAN's partition loss on (B,K,C) competed heads: log(1 + K / mean variance across heads); 0 if K == 1.

    Larger spread between heads -> smaller loss, i.e. heads are pushed to different face regions.
    eps only guards the division when all heads are identical (DAN has none).
    """
    num_heads = heads.shape[1]
    if num_heads < 2:
        return heads.new_zeros((), dtype=torch.float32)
    variance = heads.float().var(dim=1).mean()
    return torch.log1p(num_heads / variance.clamp_min(eps))


def hmhn_loss(output: HMHNOutput, target: torch.Tensor, config: LossConfig = LossConfig()
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"regression": ..., "partition": ...}), all fp32 scalars; target (B,) BDI-II scores.

    The partition term is 0 when the heads do not compete (K == 1, MAB off or AFB off) or its weight is 0.
    """
    score = output.score.float()
    target = target.to(device=score.device, dtype=torch.float32)
    if target.shape != score.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match score shape {tuple(score.shape)}")
    if config.regression == "mse":
        regression = F.mse_loss(score, target)
    else:
        regression = F.smooth_l1_loss(score, target, beta=config.smooth_l1_beta)
    if output.partition_applies and config.partition_weight > 0:
        partition = partition_loss(output.heads)
    else:
        partition = score.new_zeros(())
    total = regression + config.partition_weight * partition
    return total, {"regression": regression, "partition": partition}
