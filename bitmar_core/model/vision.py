"""Vision compressor (paper §3.2): backbone patch grid → 2×2 average pool → BitLinear MLP D→384→128.

The pool cuts the number of patches 4× (odd grids keep their edge via ceil_mode: 7×7 → 4×4), so
fusion attends over N = ceil(h/2)·ceil(w/2) tokens of width C. Backbones live in `backbones.py`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BitMarConfig
from .quant import BitLinear


class VisionCompressor(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.feature_dim = config.vision_feature_dim
        self.fc1 = BitLinear(config.vision_feature_dim, config.vision_hidden)
        self.fc2 = BitLinear(config.vision_hidden, config.memory_dim)
        self.dropout = nn.Dropout(config.vision_dropout)

    @staticmethod
    def pool(grid: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) → (B,N,D). A partial edge window averages only the patches it covers."""
        pooled = F.avg_pool2d(grid.float(), kernel_size=2, stride=2, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B,D,h,w) patch features → V (B,N,C)."""
        if grid.dim() != 4 or grid.shape[1] != self.feature_dim:
            raise ValueError(f"VisionCompressor: expected a (B, {self.feature_dim}, h, w) patch grid, got {tuple(grid.shape)}")
        return self.fc2(self.dropout(F.relu(self.fc1(self.pool(grid)))))
