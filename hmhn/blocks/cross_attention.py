"""Multi-head Cross Attention block (MAB), after DAN's MAN (Wen et al., yaoing/DAN networks/dan.py).

"Cross" = a spatial attention unit followed by a channel attention unit inside every head; it is
not query/key attention. K heads run in parallel on the same trunk map, without weight sharing.
Layer layout and initialisation follow DAN so that its behaviour carries over.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(in_channels: int, out_channels: int, kernel: tuple[int, int], padding: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.BatchNorm2d(out_channels))


class SpatialAttentionUnit(nn.Module):
    """(B,C,h,w) -> (attended map (B,C,h,w), spatial attention map (B,1,h,w)).

    1x1 reduce, then 3x3 + 1x3 + 3x1 branches summed (square and stripe-shaped face regions),
    ReLU, channel sum. The map is not normalised (DAN), so it also scales the features.
    """

    def __init__(self, channels: int = 512, reduced: int = 256):
        super().__init__()
        self.reduce = _conv_bn(channels, reduced, (1, 1), (0, 0))
        self.conv_3x3 = _conv_bn(reduced, channels, (3, 3), (1, 1))
        self.conv_1x3 = _conv_bn(reduced, channels, (1, 3), (0, 1))
        self.conv_3x1 = _conv_bn(reduced, channels, (3, 1), (1, 0))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reduced = self.reduce(x)
        response = self.relu(self.conv_3x3(reduced) + self.conv_1x3(reduced) + self.conv_3x1(reduced))
        attention_map = response.sum(dim=1, keepdim=True)
        return x * attention_map, attention_map


class ChannelAttentionUnit(nn.Module):
    """(B,C,h,w) -> (B,C): global average pool v, then v * sigmoid(MLP(v))."""

    def __init__(self, channels: int = 512, hidden: int = 32):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(-2, -1))
        return pooled * self.gate(pooled)


class CrossAttentionHead(nn.Module):
    """One MAB head: spatial unit -> channel unit. (B,C,h,w) -> ((B,C) head vector, (B,h,w) map)."""

    def __init__(self, channels: int = 512, reduced: int = 256, channel_hidden: int = 32):
        super().__init__()
        self.spatial = SpatialAttentionUnit(channels, reduced)
        self.channel = ChannelAttentionUnit(channels, channel_hidden)
        self._init_like_dan()

    def _init_like_dan(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # DAN's N(0, 0.001^2): the channel gate starts at sigmoid(~0) = 0.5 for every channel.
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, attention_map = self.spatial(x)
        return self.channel(attended), attention_map.squeeze(1)


class MultiHeadCrossAttention(nn.Module):
    """K independent heads on the trunk map: (B,C,h,w) -> (head vectors (B,K,C), maps (B,K,h,w))."""

    def __init__(self, num_heads: int = 4, channels: int = 512, reduced: int = 256, channel_hidden: int = 32):
        super().__init__()
        self.heads = nn.ModuleList(CrossAttentionHead(channels, reduced, channel_hidden) for _ in range(num_heads))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [head(features) for head in self.heads]
        vectors = torch.stack([vector for vector, _ in outputs], dim=1)
        maps = torch.stack([attention_map for _, attention_map in outputs], dim=1)
        return vectors, maps
