"""Outer product mean (Algorithm 10): the MSA's per-column features, multiplied pairwise over
residues and averaged over sequences, update the pair representation. OpenFold names.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import Linear, chunked, run_piece


class OuterProductMean(nn.Module):
    """``z_ij += Linear(mean_s a_si (x) b_sj)``, the mean over sequences where both are unmasked.

    The ``[*, N_res, N_res, C, C]`` outer products are the big intermediate (C=32: 1024 numbers
    per residue pair); ``chunk_size`` makes them ``chunk_size`` rows at a time (recomputed in
    backward while training), same result.
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.layer_norm = nn.LayerNorm(c_m)
        self.linear_1 = Linear(c_m, c_hidden)
        self.linear_2 = Linear(c_m, c_hidden)
        self.linear_out = Linear(c_hidden**2, c_z, init="final")

    def forward(self, m: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``m [*, N_seq, N_res, C_m]``, ``mask [*, N_seq, N_res]`` -> ``[*, N_res, N_res, C_z]``."""
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        mask = mask.unsqueeze(-1).to(m.dtype)  # [*, S, R, 1]
        # norm_ij = number of sequences where residues i and j are both present.
        norm = torch.einsum("...sic,...sjc->...ijc", mask, mask) + self.eps  # [*, R, R, 1]
        n = m.shape[-2]
        if chunk_size is None or n <= chunk_size:
            return self._rows(*self._projections(m, mask), norm)
        # Chunked: the projections are recomputed in backward, so the normalised m is not kept.
        a, b = run_piece(self._projections, m, mask)
        return chunked(lambda a, norm, b: self._rows(a, b, norm), chunk_size, (-2, -3), (a, norm), (b,),
                       out_dim=-3)

    def _projections(self, m: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a, b [*, S, R, C]``: the masked projections of the normalised MSA."""
        ln = self.layer_norm(m)
        return self.linear_1(ln) * mask, self.linear_2(ln) * mask

    def _rows(self, a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Rows ``i`` of the update for the columns ``i`` of ``a [*, S, I, C]`` given."""
        outer = torch.einsum("...sic,...sje->...ijce", a, b)  # [*, I, R, C, C]
        return self.linear_out(outer.flatten(-2)) / norm
