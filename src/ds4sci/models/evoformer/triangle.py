"""Triangle updates of the pair representation: triangle self-attention around the starting and
ending node (Algorithms 13, 14) and triangle multiplicative updates with outgoing and incoming
edges (Algorithms 11, 12); OpenFold's ``triangular_attention.py`` and
``triangular_multiplicative_update.py`` names.

Triangle attention's biases are a mask ``[*, I, 1, 1, J]`` and a triangle bias
``[*, 1, H, I, J]``: the same pattern as MSA row attention, so it runs through the
memory-efficient op without the ``[*, I, H, J, J]`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import Attention, Linear, chunked, mask_bias, run_piece


class TriangleAttention(nn.Module):
    """Algorithm 13 (``starting=True``) / 14 (``starting=False``): gated attention along each row
    of the pair representation, biased by the pair itself. The Evoformer blocks use the
    starting-node form for both and transpose ``z`` around the ending-node one, as OpenFold does.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True,
                 inf: float = 1e9):
        super().__init__()
        self.starting, self.inf = starting, inf
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = Linear(c_in, no_heads, bias=False, init="normal")
        self.mha = Attention(c_in, c_in, c_in, c_hidden, no_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``x [*, I, J, C_in]``, ``mask [*, I, J]`` -> update ``[*, I, J, C_in]``;
        ``chunk_size`` rows ``I`` at a time (the triangle bias is shared by all rows)."""
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        if not self.starting:
            x, mask = x.transpose(-2, -3), mask.transpose(-1, -2)
        mask_1 = mask.unsqueeze(-1)
        if chunk_size is None or x.shape[-3] <= chunk_size:
            x = self.layer_norm(x)
            x = self._rows(x, mask_1, self._triangle_bias(x))
        else:
            # Each chunk layer-normalises its own rows, so no normalised copy of x stays alive
            # for backward; the bias is recomputed in backward too.
            tri_bias = run_piece(lambda x: self._triangle_bias(self.layer_norm(x)), x)
            x = chunked(lambda x, *rest: self._rows(self.layer_norm(x), *rest), chunk_size, -3,
                        (x, mask_1), (tri_bias,))
        return x if self.starting else x.transpose(-2, -3)

    def _triangle_bias(self, x_ln: torch.Tensor) -> torch.Tensor:
        """``[*, I, J, C_in]`` (normalised) -> ``[*, 1, H, I, J]``, shared by every row."""
        return self.linear(x_ln).permute(*range(x_ln.dim() - 3), -1, -3, -2).unsqueeze(-4)

    def _rows(self, x: torch.Tensor, mask_1: torch.Tensor, tri_bias: torch.Tensor) -> torch.Tensor:
        bias = mask_bias(mask_1[..., 0], self.inf, x.dtype)[..., :, None, None, :]  # [*, I, 1, 1, J]
        return self.mha(x, x, [bias, tri_bias])


class TriangleAttentionStartingNode(TriangleAttention):
    """Algorithm 13."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9):
        super().__init__(c_in, c_hidden, no_heads, starting=True, inf=inf)


class TriangleAttentionEndingNode(TriangleAttention):
    """Algorithm 14."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9):
        super().__init__(c_in, c_hidden, no_heads, starting=False, inf=inf)


class TriangleMultiplicativeUpdate(nn.Module):
    """Algorithms 11 (``outgoing=True``) and 12: ``z_ij += g_ij * Linear(LN(sum_k a_ik * b_jk))``
    (outgoing) or ``sum_k a_ki * b_kj`` (incoming), with gated, masked projections ``a``, ``b``.

    ``fuse_projection_weights`` stores the ``a``/``b`` projections as one ``linear_ab_*`` pair
    (OpenFold's ``FusedTriangleMultiplicativeUpdate``, used by its multimer weights).

    ``chunk_size`` bounds the working set to ``chunk_size`` rows ``i`` of the output at a time
    (recomputed in backward while training); each output row depends on the whole of ``a`` and
    ``b`` but on no other output row, so the result is the same.
    """

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool = True,
                 fuse_projection_weights: bool = False):
        super().__init__()
        self.c_hidden, self.outgoing = c_hidden, outgoing
        if fuse_projection_weights:
            self.linear_ab_p = Linear(c_z, 2 * c_hidden)
            self.linear_ab_g = Linear(c_z, 2 * c_hidden, init="gating")
        else:
            self.linear_a_p = Linear(c_z, c_hidden)
            self.linear_a_g = Linear(c_z, c_hidden, init="gating")
            self.linear_b_p = Linear(c_z, c_hidden)
            self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.linear_z = Linear(c_hidden, c_z, init="final")
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_hidden)

    def _projections(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "linear_ab_p"):
            ab = self.linear_ab_p(z) * torch.sigmoid(self.linear_ab_g(z)) * mask
            return ab[..., : self.c_hidden], ab[..., self.c_hidden :]
        a = self.linear_a_p(z) * torch.sigmoid(self.linear_a_g(z)) * mask
        b = self.linear_b_p(z) * torch.sigmoid(self.linear_b_g(z)) * mask
        return a, b

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``z [*, N_res, N_res, C_z]``, ``mask [*, N_res, N_res]`` -> update ``[*, N_res, N_res, C_z]``."""
        if mask is None:
            mask = z.new_ones(z.shape[:-1])
        mask_1 = mask.unsqueeze(-1).to(z.dtype)
        if chunk_size is None or z.shape[-3] <= chunk_size:
            z = self.layer_norm_in(z)
            return self._rows(*self._channels_first(*self._projections(z, mask_1)), z)
        # Chunked: a and b are recomputed in backward (only they and z stay alive), and each
        # chunk layer-normalises its own rows of z for the gate.
        a, b = run_piece(lambda z, mask_1: self._projections(self.layer_norm_in(z), mask_1), z, mask_1)
        a_CIK, b_CKJ = self._channels_first(a, b)
        return chunked(lambda a, z, b: self._rows(a, b, self.layer_norm_in(z)), chunk_size, (-2, -3),
                       (a_CIK, z), (b_CKJ,), out_dim=-3)

    def _channels_first(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a, b [*, N, N, C]`` -> ``a [*, C, I, K]``, ``b [*, C, K, J]`` (views) so that the
        update is one batched matmul."""
        lead = range(a.dim() - 3)
        if self.outgoing:  # x_ij = sum_k a_ik b_jk
            return a.permute(*lead, -1, -3, -2), b.permute(*lead, -1, -2, -3)
        return a.permute(*lead, -1, -2, -3), b.permute(*lead, -1, -3, -2)  # x_ij = sum_k a_ki b_kj

    def _rows(self, a_CIK: torch.Tensor, b_CKJ: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Output rows ``i`` for the ``a`` rows and (layer-normed) ``z`` rows given."""
        x = (a_CIK @ b_CKJ).permute(*range(z.dim() - 3), -2, -1, -3)  # [*, I, J, C]
        return self.linear_z(self.layer_norm_out(x)) * torch.sigmoid(self.linear_g(z))


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Algorithm 11."""

    def __init__(self, c_z: int, c_hidden: int, fuse_projection_weights: bool = False):
        super().__init__(c_z, c_hidden, outgoing=True, fuse_projection_weights=fuse_projection_weights)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Algorithm 12."""

    def __init__(self, c_z: int, c_hidden: int, fuse_projection_weights: bool = False):
        super().__init__(c_z, c_hidden, outgoing=False, fuse_projection_weights=fuse_projection_weights)
