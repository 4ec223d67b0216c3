"""MSA and pair transitions (Algorithms 9 and 15): position-wise two-layer MLPs with a 4x
hidden width; OpenFold names. OpenFold masks their outputs (its DISCREPANCY note: DeepMind's
code does not); we follow OpenFold so its weights give its numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import Linear, chunked


class Transition(nn.Module):
    """``mask * linear_2(relu(linear_1(LN(x))))`` over the last dim of ``[*, R1, R2, C]``."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c)
        self.linear_1 = Linear(c, n * c, init="relu")
        self.relu = nn.ReLU()
        self.linear_2 = Linear(n * c, c, init="final")

    def _transition(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.relu(self.linear_1(self.layer_norm(x)))) * mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``x [*, R1, R2, C]``, ``mask [*, R1, R2]`` -> ``[*, R1, R2, C]``; ``chunk_size`` rows
        ``R1`` at a time bound the ``n * C``-wide hidden activations (also the saved ones while
        training: each chunk is recomputed in backward)."""
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        return chunked(self._transition, chunk_size, -3, (x, mask.unsqueeze(-1).to(x.dtype)))


class MSATransition(Transition):
    """Algorithm 9 (``c_m``, factor ``n``)."""

    def __init__(self, c_m: int, n: int):
        super().__init__(c_m, n)


class PairTransition(Transition):
    """Algorithm 15 (``c_z``, factor ``n``)."""

    def __init__(self, c_z: int, n: int):
        super().__init__(c_z, n)
