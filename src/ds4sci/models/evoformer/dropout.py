"""Shared-mask dropout (AF2 Supplement 1.11.6): one mask for a whole row (``DropoutRowwise``,
shared along dim -3) or column (``DropoutColumnwise``, dim -2) of the representation."""

from __future__ import annotations

import torch
from torch import nn


class _SharedDropout(nn.Module):
    shared_dim = -3

    def __init__(self, r: float):
        super().__init__()
        if not 0.0 <= r < 1.0:
            raise ValueError(f"{type(self).__name__}: r={r}; expected a rate in [0, 1)")
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.r == 0.0:
            return x
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.r)
        # In place on the product (not saved by autograd): one new tensor, not two.
        return (x * keep).div_(1.0 - self.r)


class DropoutRowwise(_SharedDropout):
    shared_dim = -3


class DropoutColumnwise(_SharedDropout):
    shared_dim = -2
