"""Attention Fusion block (AFB), after DAN's AFN: heads compete per feature, then are summed.

Parameter-free. With K > 1, log-softmax over the head axis makes the heads compete for every
feature index; the partition loss (hmhn.losses) then pushes them apart so that they attend to
different face regions. With K == 1 there is nothing to compete with and the head passes through.
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionFusion(nn.Module):
    """(B,K,C) head vectors -> (competed heads (B,K,C), fused vector (B,C))."""

    def forward(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if heads.shape[1] > 1:
            # fp32: log-softmax is autocast's fp32 op anyway; keep the partition loss's input precise.
            heads = torch.log_softmax(heads.float(), dim=1)
        return heads, heads.sum(dim=1)


def mean_fusion(heads: torch.Tensor) -> torch.Tensor:
    """AFB ablation: the plain mean of the head vectors, (B,K,C) -> (B,C)."""
    return heads.mean(dim=1)
