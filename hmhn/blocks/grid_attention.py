"""Grid-Wise Attention block (GWA), after FER-VT (Huang et al., Information Sciences 2021).

The face image is cut into grid x grid cells; every cell gets one weight per colour channel from a
softmax competition between cells, and the image is re-weighted cell by cell (M = W * x).
Two bugs of the unofficial FER-VT code are fixed here (see /work/shared/MODEL.md 3.1): cells are
cut by a parameter-free reshape (not an 88 M-weight 56x56 conv), and cell weights are painted back
at their true grid positions.
"""
from __future__ import annotations

import torch
from torch import nn


def split_into_cells(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, grid*grid, C, S/grid, S/grid); cell index g = row * grid + col."""
    b, c, h, w = x.shape
    ch, cw = h // grid, w // grid
    cells = x.reshape(b, c, grid, ch, grid, cw).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, grid * grid, c, ch, cw)


def merge_cells(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of split_into_cells: (B, grid*grid, C, h, w) -> (B, C, grid*h, grid*w)."""
    b, _, c, ch, cw = cells.shape
    image = cells.reshape(b, grid, grid, c, ch, cw).permute(0, 3, 1, 4, 2, 5)
    return image.reshape(b, c, grid * ch, grid * cw)


def paint_cell_weights(weights: torch.Tensor, grid: int, cell_h: int, cell_w: int) -> torch.Tensor:
    """(B, grid*grid, C) per-cell weights -> (B, C, grid*cell_h, grid*cell_w) piecewise-constant image."""
    b, _, c = weights.shape
    per_cell = weights.reshape(b, grid * grid, c, 1, 1).expand(b, grid * grid, c, cell_h, cell_w)
    return merge_cells(per_cell, grid)


class GridWiseAttention(nn.Module):
    """x (B,3,S,S) -> M = W * x, W constant inside each of the grid x grid cells.

    Per cell: shared local net phi (1x1 conv 3->hidden->3, BN, LeakyReLU), per-channel
    self-similarity F F^T / cell, softmax over the cells, average -> one weight per (cell, channel).
    """

    def __init__(self, channels: int = 3, grid: int = 4, hidden: int = 64):
        super().__init__()
        self.grid = grid
        # phi has only 1x1 convs, so running it on the whole image equals running it on each cell
        # separately with shared weights (BatchNorm statistics cover the same pixels either way).
        self.local_net = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(inplace=True),
        )

    def cell_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid, C) weights; for every channel they sum to 1 over the cells."""
        if x.shape[-1] % self.grid or x.shape[-2] % self.grid:
            raise ValueError(f"GWA: image {tuple(x.shape[-2:])} is not divisible into a {self.grid}x{self.grid} grid")
        features = split_into_cells(self.local_net(x), self.grid)          # B, G, C, h, w
        cell = features.shape[-1]
        similarity = features @ features.transpose(-1, -2) / cell           # B, G, C, h, h
        # Softmax in fp32: under bf16 autocast 16-way competitions lose most of their resolution.
        competition = torch.softmax(similarity.float(), dim=1)              # cells compete at every (c, i, j)
        return competition.mean(dim=(-1, -2))                               # B, G, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.cell_weights(x).to(x.dtype)
        weight_image = paint_cell_weights(weights, self.grid, x.shape[-2] // self.grid, x.shape[-1] // self.grid)
        return weight_image * x
