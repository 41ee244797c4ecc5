"""Deep Feature Fusion block (DFF): fuses the image x with the GWA output M into the trunk's input.

Internals are reconstructed from FER-VT's image-level fusion network (MODEL.md 3.2, variant A):
two separate 3x3 conv branches for x and M, summed, two residual conv layers, one output conv Z.
- "residual" (default): Y = x + gamma * Z, gamma a learnable scalar starting at 0, so training
  starts from the plain pretrained trunk and the fusion is learned in (ReZero-style; at init only
  gamma receives a gradient, the convs start learning once gamma moves off 0).
- "sigmoid" (faithful): Y = sigmoid(Z) read as an RGB image in [0, 1], then ImageNet-normalised
  again, because the pretrained trunk expects normalised input (the unofficial code omits this).
"""
from __future__ import annotations

import torch
from torch import nn

from hmhn.image import IMAGENET_MEAN, IMAGENET_STD

DFF_VARIANTS = ("residual", "sigmoid")


def _conv_bn(in_channels: int, out_channels: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        activation,
    )


class DeepFeatureFusion(nn.Module):
    """(x, M), both (B,3,S,S) ImageNet-normalised -> (B,3,S,S) input for the trunk."""

    def __init__(self, variant: str = "residual", channels: int = 3, mid_channels: int = 3):
        super().__init__()
        if variant not in DFF_VARIANTS:
            raise ValueError(f"DFF variant must be one of {DFF_VARIANTS}, got {variant!r}")
        self.variant = variant
        # Separate weights for the two inputs (one unofficial FER-VT version reuses the x branch for M).
        self.image_branch = _conv_bn(channels, mid_channels, nn.ReLU(inplace=True))
        self.attended_branch = _conv_bn(channels, mid_channels, nn.ReLU(inplace=True))
        self.refine = nn.Sequential(
            _conv_bn(mid_channels, mid_channels, nn.PReLU(mid_channels)),
            _conv_bn(mid_channels, mid_channels, nn.PReLU(mid_channels)),
        )
        self.output_conv = nn.Conv2d(mid_channels, channels, kernel_size=3, padding=1)
        if variant == "residual":
            self.gamma = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def fusion_map(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Z: the fused (B,3,S,S) map before the residual / sigmoid output step."""
        summed = self.image_branch(x) + self.attended_branch(attended)
        return self.output_conv(self.refine(summed) + summed)

    def forward(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        fused = self.fusion_map(x, attended)
        if self.variant == "residual":
            return x + self.gamma.to(fused.dtype) * fused
        image01 = torch.sigmoid(fused)
        return (image01 - self.mean.to(image01.dtype)) / self.std.to(image01.dtype)
