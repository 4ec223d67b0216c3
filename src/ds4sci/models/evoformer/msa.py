"""MSA attention: row-wise with pair bias (Algorithm 7), column-wise (Algorithm 8) and
column-wise global attention for the extra-MSA stack (Algorithm 19); OpenFold's ``msa.py``
module and parameter names.

The row attention is the case DeepSpeed4Science's kernel targets: mask bias
``[*, N_seq, 1, 1, N_res]`` plus pair bias ``[*, 1, H, N_res, N_res]``; neither is expanded and
the ``[*, N_seq, H, N_res, N_res]`` logits never exist (unless the backend is ``"naive"``).
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import Attention, GlobalAttention, Linear, chunked, mask_bias


class MSAAttention(nn.Module):
    """Gated self-attention along the last-but-one axis of ``m`` (rows of the MSA), with an
    optional bias projected from the pair representation."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, pair_bias: bool = False,
                 c_z: int | None = None, inf: float = 1e9):
        super().__init__()
        if pair_bias and c_z is None:
            raise ValueError("MSAAttention: pair_bias=True needs c_z (the pair channel count)")
        self.no_heads, self.inf = no_heads, inf
        self.layer_norm_m = nn.LayerNorm(c_in)
        self.layer_norm_z = nn.LayerNorm(c_z) if pair_bias else None
        self.linear_z = Linear(c_z, no_heads, bias=False, init="normal") if pair_bias else None
        self.mha = Attention(c_in, c_in, c_in, c_hidden, no_heads)

    def forward(self, m: torch.Tensor, z: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
        """``m [*, N_seq, N_res, C_m]``, ``z [*, N_res, N_res, C_z]`` (pair-bias variant only),
        ``mask [*, N_seq, N_res]`` (1 = keep) -> update ``[*, N_seq, N_res, C_m]``.
        ``chunk_size``: that many rows (sequences) at a time; see ``primitives.chunked``."""
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        shared = []
        if self.linear_z is not None:
            if z is None:
                raise ValueError("MSARowAttentionWithPairBias: z (the pair representation) is required")
            # [*, N_res, N_res, H] -> [*, 1, H, N_res, N_res], shared by every row.
            shared.append(self.linear_z(self.layer_norm_z(z)).permute(
                *range(z.dim() - 3), -1, -3, -2).unsqueeze(-4))
        return chunked(self._rows, chunk_size, -3, (m, mask.unsqueeze(-1)), shared)

    def _rows(self, m: torch.Tensor, mask_1: torch.Tensor, *pair_bias: torch.Tensor) -> torch.Tensor:
        m = self.layer_norm_m(m)
        bias = mask_bias(mask_1[..., 0], self.inf, m.dtype)[..., :, None, None, :]  # [*, N_seq, 1, 1, N_res]
        return self.mha(m, m, [bias, *pair_bias])


class MSARowAttentionWithPairBias(MSAAttention):
    """Algorithm 7: row-wise gated self-attention with pair bias."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, no_heads: int, inf: float = 1e9):
        super().__init__(c_m, c_hidden, no_heads, pair_bias=True, c_z=c_z, inf=inf)


class MSAColumnAttention(nn.Module):
    """Algorithm 8: column-wise gated self-attention (rows attend within each residue column).

    Wraps an :class:`MSAAttention` as ``_msa_att`` (OpenFold's parameter path)."""

    def __init__(self, c_m: int, c_hidden: int, no_heads: int, inf: float = 1e9):
        super().__init__()
        self._msa_att = MSAAttention(c_m, c_hidden, no_heads, pair_bias=False, inf=inf)

    def forward(self, m: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``m [*, N_seq, N_res, C_m]``, ``mask [*, N_seq, N_res]`` -> ``[*, N_seq, N_res, C_m]``;
        ``chunk_size`` columns at a time."""
        m = m.transpose(-2, -3)
        mask = None if mask is None else mask.transpose(-1, -2)
        return self._msa_att(m, mask=mask, chunk_size=chunk_size).transpose(-2, -3)


class MSAColumnGlobalAttention(nn.Module):
    """Algorithm 19: column-wise global gated attention (the extra-MSA stack's column step)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, eps: float = 1e-10):
        super().__init__()
        self.layer_norm_m = nn.LayerNorm(c_in)
        self.global_attention = GlobalAttention(c_in, c_hidden, no_heads, inf=inf, eps=eps)

    def forward(self, m: torch.Tensor, mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``m [*, N_seq, N_res, C_m]``, ``mask [*, N_seq, N_res]`` -> ``[*, N_seq, N_res, C_m]``;
        ``chunk_size`` columns at a time."""
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        # [*, N_res, N_seq, C_m]: columns first; each column is independent.
        out = chunked(self._columns, chunk_size, -3, (m.transpose(-2, -3), mask.transpose(-1, -2)[..., None]))
        return out.transpose(-2, -3)

    def _columns(self, m: torch.Tensor, mask_1: torch.Tensor) -> torch.Tensor:
        return self.global_attention(self.layer_norm_m(m), mask_1[..., 0])
