"""HMHN model configuration: one frozen dataclass, stored with every checkpoint and MLflow run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.schema import LABEL_MAX, LABEL_MIN

BDI_MIN, BDI_MAX = float(LABEL_MIN), float(LABEL_MAX)  # the model's output range: the BDI-II totals

# The ResNet-18 trunk halves the map five times (each stride-2 layer rounds up: 112 px -> 4x4, 224 px -> 7x7).
BACKBONE_DOWNSAMPLINGS = 5
BACKBONE_CHANNELS = 512


@dataclass(frozen=True)
class HMHNConfig:
    """Architecture switches. `HMHNConfig()` is the paper default (224 px, 4 heads, all blocks on)."""

    input_size: int = field(default=224, metadata={"help": "square face-crop size in pixels, divisible by "
                                                           "grid_size (224 paper, 112 for CPU runs)"})
    num_heads: int = field(default=4, metadata={"help": "number of MAB cross-attention heads (K)"})
    use_gwa: bool = field(default=True, metadata={"help": "Grid-Wise Attention block on/off"})
    use_dff: bool = field(default=True, metadata={"help": "Deep Feature Fusion block on/off"})
    dff_variant: Literal["residual", "sigmoid"] = field(
        default="residual", metadata={"help": "residual: x + gamma*Z with gamma=0 at init (safe with a pretrained "
                                              "trunk); sigmoid: FER-VT's sigmoid image, re-normalised"})
    use_mab: bool = field(default=True, metadata={"help": "Multi-head Cross Attention block on/off "
                                                          "(off: global average pool of the trunk map)"})
    use_afb: bool = field(default=True, metadata={"help": "Attention Fusion block on/off "
                                                          "(off: plain mean of the head vectors)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the regression Linear"})
    initial_score: float = field(default=0.0, metadata={"help": "initial regression bias; set it to the "
                                                                "training-set mean BDI-II"})
    grid_size: int = field(default=4, metadata={"help": "GWA grid is grid_size x grid_size cells"})
    gwa_hidden: int = field(default=64, metadata={"help": "hidden width of GWA's per-cell 1x1 local net"})
    dff_channels: int = field(default=3, metadata={"help": "inner width of the DFF convolutions (FER-VT: 3)"})
    head_reduction: int = field(default=256, metadata={"help": "MAB spatial unit: channels after the 1x1 reduce"})
    channel_hidden: int = field(default=32, metadata={"help": "MAB channel unit: MLP bottleneck width"})

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")
        if self.grid_size < 1 or self.input_size % self.grid_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by grid_size {self.grid_size}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.dff_variant not in ("residual", "sigmoid"):
            raise ValueError(f"dff_variant must be 'residual' or 'sigmoid', got {self.dff_variant!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("gwa_hidden", "dff_channels", "head_reduction", "channel_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def feature_map_size(self) -> int:
        """Side of the trunk's output map (7 for 224 px, 4 for 112 px)."""
        return feature_map_size(self.input_size)

    @property
    def effective_heads(self) -> int:
        """Heads the model really has: 1 when MAB is off (the pooled trunk map acts as one head)."""
        return self.num_heads if self.use_mab else 1


def feature_map_size(input_size: int) -> int:
    """Trunk output side for a square input: ceil-halved five times (conv1, maxpool, layer2-4)."""
    side = input_size
    for _ in range(BACKBONE_DOWNSAMPLINGS):
        side = (side + 1) // 2
    return side
