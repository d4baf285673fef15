"""Bidirectional feedback propagation unit (BFPU; ``Fusion`` in the released code)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv3x3


class FeedbackFusion(nn.Module):
    """Mixes two latents through a shared sigmoid gate and per-input 2-way pixel weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj_x = conv3x3(channels, channels, bias=True)
        self.proj_y = conv3x3(channels, channels, bias=True)
        self.mix_x = conv3x3(channels * 2, 2, bias=True)
        self.mix_y = conv3x3(channels * 2, 2, bias=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.proj_x(x) * self.proj_y(y))
        gated_x, gated_y = x * gate, y * gate
        wx = self.mix_x(torch.cat([x, gated_x], dim=1))
        wy = self.mix_y(torch.cat([y, gated_y], dim=1))
        return x * wx[:, 0:1] + gated_x * wx[:, 1:2] + y * wy[:, 0:1] + gated_y * wy[:, 1:2]
