"""HMHN: Hybrid Multi-head Cross Attention Network (Li et al., Front. Neurosci. 2023), reconstructed.

    x -> GWA -> DFF -> ResNet-18 trunk -> MAB (K heads) -> AFB -> Linear -> one BDI-II score per face crop

See docs/MODEL.md for shapes, parameter counts and which parts are from the paper vs reconstructed.
Ablation switches (HMHNConfig):
- use_gwa=False: no grid attention; DFF (if on) fuses x with itself, so it stays a learned
  image-level conv residual and the GWA-vs-no-GWA comparison isolates the grid attention.
- use_dff=False: the trunk sees the GWA output M directly (or x when GWA is off too).
- use_mab=False: the trunk map is global-average-pooled into a single "head".
- use_afb=False: the head vectors are averaged (no log-softmax competition, no partition loss).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hmhn.blocks.attention_fusion import AttentionFusion, mean_fusion
from hmhn.config import BACKBONE_CHANNELS, BDI_MAX, BDI_MIN, HMHNConfig
from hmhn.blocks.cross_attention import MultiHeadCrossAttention
from hmhn.blocks.feature_fusion import DeepFeatureFusion
from hmhn.blocks.grid_attention import GridWiseAttention
from hmhn.blocks.resnet import ResNet18Trunk


class HMHNOutput(NamedTuple):
    """What HMHN.forward returns. A NamedTuple, so DDP, torch.compile and torch.export see plain tensors."""

    score: torch.Tensor            # (B,) frame-level BDI-II, fp32, not clamped
    heads: torch.Tensor            # (B,K,512) head vectors after AFB's log-softmax (raw when K == 1 or AFB off)
    attention_maps: torch.Tensor   # (B,K,h,w) per-head spatial maps (all ones when MAB is off: plain pooling)
    fused: torch.Tensor            # (B,512) the vector the regression head reads
    partition_applies: bool        # True when heads compete (AFB on and K > 1): the partition loss is defined


class RegressionHead(nn.Module):
    """(B,512) -> (B,) score: BatchNorm1d(512), dropout, Linear(512, 1) with bias = expected mean score.

    DAN ends in Linear(512, C) + BatchNorm1d(C) on the logits; a BN on a 1-d regression output would
    couple scores within a batch, so the normalisation moves to the fused features instead [R].
    Without it the fused vector (a sum of log-softmaxed heads scaled by DAN's unnormalised spatial
    maps) has entries of order 10-50 and the regression diverges at Adam lr 1e-3.
    """

    def __init__(self, in_features: int = BACKBONE_CHANNELS, dropout: float = 0.0, initial_score: float = 0.0):
        super().__init__()
        self.feature_norm = nn.BatchNorm1d(in_features)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, 1)
        nn.init.constant_(self.linear.bias, initial_score)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        features = self.dropout(self.feature_norm(fused)).float()
        # Product + sum in fp32 instead of F.linear: autocast would run a Linear in bf16, whose
        # resolution near a BDI-II of 63 is 0.25, too coarse for an MSE target.
        return (features * self.linear.weight.float()).sum(dim=-1) + self.linear.bias.float()


class HMHN(nn.Module):
    """The full model; `HMHN()` is the paper-default configuration (224 px, 4 heads, all blocks)."""

    def __init__(self, config: HMHNConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else HMHNConfig()
        self.gwa = GridWiseAttention(3, config.grid_size, config.gwa_hidden) if config.use_gwa else None
        self.dff = DeepFeatureFusion(config.dff_variant, 3, config.dff_channels) if config.use_dff else None
        self.backbone = ResNet18Trunk()
        self.mab = (MultiHeadCrossAttention(config.num_heads, BACKBONE_CHANNELS, config.head_reduction,
                                            config.channel_hidden) if config.use_mab else None)
        self.afb = AttentionFusion() if config.use_afb else None
        self.regressor = RegressionHead(BACKBONE_CHANNELS, config.dropout, config.initial_score)

    def trunk_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1 (GWA -> DFF): (B,3,S,S) normalised image -> (B,3,S,S) image the trunk sees."""
        attended = self.gwa(x) if self.gwa is not None else x
        return self.dff(x, attended) if self.dff is not None else attended

    def forward(self, x: torch.Tensor) -> HMHNOutput:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HMHN expects (B, 3, S, S) images, got shape {tuple(x.shape)}")
        features = self.backbone(self.trunk_input(x))                      # B, 512, h, w
        if self.mab is not None:
            heads, attention_maps = self.mab(features)                     # B,K,512 / B,K,h,w
        else:
            heads = features.mean(dim=(-2, -1)).unsqueeze(1)               # B,1,512
            # Plain average pooling weighs every position equally: a uniform "attention" map.
            attention_maps = torch.ones_like(features[:, :1, :, :])
        if self.afb is not None:
            heads, fused = self.afb(heads)
            partition_applies = heads.shape[1] > 1
        else:
            fused = mean_fusion(heads)
            partition_applies = False
        return HMHNOutput(self.regressor(fused), heads, attention_maps, fused, partition_applies)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per block (0 for a block that is switched off) and in total."""
        counts = {name: sum(p.numel() for p in block.parameters()) if block is not None else 0
                  for name, block in (("gwa", self.gwa), ("dff", self.dff), ("backbone", self.backbone),
                                      ("mab", self.mab), ("afb", self.afb), ("regressor", self.regressor))}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


class HMHNScorer(nn.Module):
    """Inference wrapper: forward(x) returns only the (B,) scores, clamped to [0, 63] by default.

    This is what gets exported (torch.export / MLflow pt2) and served. Put it in eval mode first
    (`scorer.eval()`, which also sets the wrapped model): in train mode BatchNorm uses batch statistics.
    """

    def __init__(self, model: HMHN, clamp: bool = True):
        super().__init__()
        self.model = model
        self.clamp = clamp

    @property
    def config(self) -> HMHNConfig:
        return self.model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.model(x).score
        return score.clamp(BDI_MIN, BDI_MAX) if self.clamp else score

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, size: int | None = None, normalise: bool = False) -> torch.Tensor:
        """(B,K,h,w) spatial attention map of every head, for rendering.

        size: upsample (bilinear) to size x size, e.g. the input size, to overlay on the face crop.
        normalise: rescale each map to [0, 1] (per image and head; a constant map becomes 0).
        """
        maps = self.model(x).attention_maps.float()
        if size is not None:
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        if normalise:
            low = maps.amin(dim=(-2, -1), keepdim=True)
            high = maps.amax(dim=(-2, -1), keepdim=True)
            maps = (maps - low) / (high - low).clamp_min(1e-12)
        return maps


def export_scorer(scorer: HMHNScorer, example: torch.Tensor | None = None, dynamic_batch: bool = True,
                  max_batch: int = 4096) -> torch.export.ExportedProgram:
    """torch.export an HMHNScorer in eval mode; the batch dimension stays dynamic, the image size is fixed.

    example defaults to two random images of the configured input size.
    """
    scorer.eval()
    if example is None:
        size = scorer.config.input_size
        example = torch.randn(2, 3, size, size, device=next(scorer.parameters()).device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if dynamic_batch else None
    return torch.export.export(scorer, (example,), dynamic_shapes=dynamic_shapes)
