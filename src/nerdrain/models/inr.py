"""The implicit neural representation (LIIF-style MLP) that refines each coarse scale.

The released code queries the MLP at the feature-grid points themselves, so the relative
coordinates, their positional encoding and the cell size it appends are the same for every pixel
and every one of its four ensemble members. The MLP's first layer on the unfolded 3x3
neighbourhood is therefore a 3x3 convolution plus a constant, and the four-way ensemble average
is one evaluation: identical outputs at a quarter of the cost, with no coordinate grids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import banded, row_bands

# The released query appends 18 zeros (relative coordinate and its encoding) and the cell size,
# which is 2 in both axes once scaled to the feature grid.
CONSTANT_INPUTS = (0.0,) * 18 + (2.0, 2.0)


class ImplicitDecoder(nn.Module):
    """Per-pixel MLP on a 3x3 feature neighbourhood, evaluated as convolutions."""

    def __init__(self, feature_dim: int, hidden: Sequence[int] = (256, 256, 256), out_dim: int = 3):
        super().__init__()
        self.feature_dim = feature_dim
        widths = [feature_dim * 9 + len(CONSTANT_INPUTS), *hidden, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.register_buffer("constant_inputs", torch.tensor(CONSTANT_INPUTS), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bands = row_bands(features)  # in inference on large maps: the 256-wide layers a band at a time
        return self._forward(features) if bands is None else banded(self._forward, features, bands)

    def _forward(self, features: torch.Tensor) -> torch.Tensor:
        first, *rest = self.layers
        n_unfolded = self.feature_dim * 9
        # F.unfold orders inputs channel-major with the 9 taps inner: exactly a conv kernel's layout.
        kernel = first.weight[:, :n_unfolded].reshape(-1, self.feature_dim, 3, 3)
        bias = first.bias + first.weight[:, n_unfolded:] @ self.constant_inputs.to(first.weight.dtype)
        h = F.conv2d(features, kernel.to(features.dtype), bias.to(features.dtype), padding=1)
        for layer in rest:
            h = F.conv2d(F.relu(h), layer.weight[:, :, None, None], layer.bias)
        return h
