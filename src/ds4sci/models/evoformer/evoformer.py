"""Evoformer blocks and stacks (AF2 Algorithms 6 and 18) on ds4sci's memory-efficient attention,
weight-compatible with OpenFold's ``evoformer.py``: same module tree, parameter names and
shapes, so ``block.load_state_dict(openfold_block.state_dict())`` works unchanged and gives
OpenFold's outputs.

What differs from OpenFold is how it runs: every attention (MSA row with pair bias, MSA column,
global column, triangle start/end) goes through ``ds4sci.evoformer_attention``, chosen once per
model (``attention_backend=`` at construction or ``set_attention_backend``); activation
checkpointing is per block; ``chunk_size`` bounds the non-attention working sets at inference
with identical results.

Legend: ``m [*, N_seq, N_res, C_m]`` MSA representation, ``z [*, N_res, N_res, C_z]`` pair
representation, ``msa_mask [*, N_seq, N_res]``, ``pair_mask [*, N_res, N_res]`` (1 = keep).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BlockConfig, EvoformerStackConfig, ExtraMSAStackConfig, parse_kwargs
from .dropout import DropoutRowwise
from .msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from .outer_product_mean import OuterProductMean
from .primitives import Linear, check_chunk_size, set_attention_backend
from .transition import MSATransition, PairTransition
from .triangle import TriangleAttention, TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing


class PairStack(nn.Module):
    """The pair half of a block: triangle multiplications (outgoing, incoming), triangle
    attention (starting, ending node) and the pair transition, each a residual update."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        c_z = cfg.c_z
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_z, cfg.c_hidden_mul, cfg.fuse_projection_weights)
        self.tri_mul_in = TriangleMultiplicationIncoming(c_z, cfg.c_hidden_mul, cfg.fuse_projection_weights)
        self.tri_att_start = TriangleAttention(c_z, cfg.c_hidden_pair_att, cfg.no_heads_pair, inf=cfg.inf)
        self.tri_att_end = TriangleAttention(c_z, cfg.c_hidden_pair_att, cfg.no_heads_pair, inf=cfg.inf)
        self.pair_transition = PairTransition(c_z, cfg.transition_n)
        self.ps_dropout_row_layer = DropoutRowwise(cfg.pair_dropout)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor,
                chunk_size: int | None = None) -> torch.Tensor:
        drop = self.ps_dropout_row_layer
        z = z + drop(self.tri_mul_out(z, pair_mask, chunk_size))
        z = z + drop(self.tri_mul_in(z, pair_mask, chunk_size))
        z = z + drop(self.tri_att_start(z, pair_mask, chunk_size))
        # Ending node = starting node on the transpose; row-wise dropout there is column-wise here.
        z_t = z.transpose(-2, -3)
        z = (z_t + drop(self.tri_att_end(z_t, pair_mask.transpose(-1, -2), chunk_size))).transpose(-2, -3)
        return z + self.pair_transition(z, pair_mask, chunk_size)


class MSABlock(nn.Module):
    """What Evoformer and extra-MSA blocks share; subclasses set ``msa_att_col``."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.opm_first = cfg.opm_first
        self.c_m, self.c_z = cfg.c_m, cfg.c_z
        self.msa_att_row = MSARowAttentionWithPairBias(cfg.c_m, cfg.c_z, cfg.c_hidden_msa_att,
                                                       cfg.no_heads_msa, inf=cfg.inf)
        self.msa_dropout_layer = DropoutRowwise(cfg.msa_dropout)
        self.msa_transition = MSATransition(cfg.c_m, cfg.transition_n)
        self.outer_product_mean = OuterProductMean(cfg.c_m, cfg.c_z, cfg.c_hidden_opm)
        self.pair_stack = PairStack(cfg)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None = None,
                pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block: ``(m, z) -> (m, z)``, shapes unchanged. Masks default to all ones.

        ``chunk_size`` runs every part of the block that is independent along rows or columns
        (attention, outer product mean, triangle multiplications, transitions) that many rows
        at a time, without changing the result: at inference this bounds the working set; while
        training each chunk is also recomputed in backward, so only one chunk's activations are
        alive at a time (more compute, much less memory)."""
        _check_shapes(type(self).__name__, m, z, msa_mask, pair_mask, (self.c_m, self.c_z), chunk_size)
        if msa_mask is None:
            msa_mask = m.new_ones(m.shape[:-1])
        if pair_mask is None:
            pair_mask = z.new_ones(z.shape[:-1])
        if self.opm_first:
            z = z + self.outer_product_mean(m, msa_mask, chunk_size)
        m = m + self.msa_dropout_layer(self.msa_att_row(m, z, msa_mask, chunk_size))
        if getattr(self, "msa_att_col", None) is not None:
            m = m + self.msa_att_col(m, msa_mask, chunk_size)
        m = m + self.msa_transition(m, msa_mask, chunk_size)
        if not self.opm_first:
            z = z + self.outer_product_mean(m, msa_mask, chunk_size)
        return m, self.pair_stack(z, pair_mask, chunk_size)


class EvoformerBlock(MSABlock):
    """Algorithm 6, lines 2-12: one block of the main trunk (MSA column self-attention).

    Keyword arguments as OpenFold's ``EvoformerBlock`` (``c_m``, ``c_z``, ``c_hidden_msa_att``,
    ``no_heads_msa``, ...; see :class:`BlockConfig`), plus ``attention_backend``.
    """

    def __init__(self, *, attention_backend: str = "auto", **kwargs):
        cfg = parse_kwargs(BlockConfig, "EvoformerBlock", kwargs)
        super().__init__(cfg)
        self.no_column_attention = cfg.no_column_attention
        if not cfg.no_column_attention:
            self.msa_att_col = MSAColumnAttention(cfg.c_m, cfg.c_hidden_msa_att, cfg.no_heads_msa,
                                                  inf=cfg.inf)
        set_attention_backend(self, attention_backend)


class ExtraMSABlock(MSABlock):
    """Algorithm 18's block: as :class:`EvoformerBlock` but with global column attention
    (Algorithm 19), for the thousands of unclustered extra-MSA rows."""

    def __init__(self, *, attention_backend: str = "auto", **kwargs):
        kwargs.pop("ckpt", None)  # OpenFold's per-block flag; the stack checkpoints here
        cfg = parse_kwargs(BlockConfig, "ExtraMSABlock", kwargs)
        if cfg.no_column_attention:
            raise ValueError("ExtraMSABlock: no_column_attention=True is not an extra-MSA option")
        super().__init__(cfg)
        self.msa_att_col = MSAColumnGlobalAttention(cfg.c_m, cfg.c_hidden_msa_att, cfg.no_heads_msa,
                                                    inf=cfg.inf, eps=cfg.eps)
        set_attention_backend(self, attention_backend)


def _check_shapes(owner, m, z, msa_mask, pair_mask, channels, chunk_size) -> None:
    check_chunk_size(owner, chunk_size)
    if m.dim() < 3 or z.dim() < 3:
        raise ValueError(f"{owner}: m has shape {tuple(m.shape)} and z {tuple(z.shape)}; expected "
                         "m [*, N_seq, N_res, C_m] and z [*, N_res, N_res, C_z]")
    for name, t, symbol, c in (("m", m, "C_m", channels[0]), ("z", z, "C_z", channels[1])):
        if t.shape[-1] != c:
            raise ValueError(f"{owner}: {name} has shape {tuple(t.shape)} with {t.shape[-1]} channels; "
                             f"this block was built with {symbol}={c}")
    n_res = m.shape[-2]
    if z.shape[-3:-1] != (n_res, n_res) or z.shape[:-3] != m.shape[:-3]:
        raise ValueError(f"{owner}: z has shape {tuple(z.shape)}; expected "
                         f"[{', '.join(map(str, m.shape[:-3]))}{', ' if m.dim() > 3 else ''}"
                         f"N_res={n_res}, N_res={n_res}, C_z] to match m {tuple(m.shape)}")
    if msa_mask is not None and msa_mask.shape != m.shape[:-1]:
        raise ValueError(f"{owner}: msa_mask has shape {tuple(msa_mask.shape)}; expected "
                         f"{tuple(m.shape[:-1])} (m without channels)")
    if pair_mask is not None and pair_mask.shape != z.shape[:-1]:
        raise ValueError(f"{owner}: pair_mask has shape {tuple(pair_mask.shape)}; expected "
                         f"{tuple(z.shape[:-1])} (z without channels)")


def _run_blocks(blocks, m, z, msa_mask, pair_mask, chunk_size, blocks_per_ckpt):
    """Run ``blocks`` in order, checkpointing groups of ``blocks_per_ckpt`` while training."""
    if blocks_per_ckpt is None or not torch.is_grad_enabled():
        for block in blocks:
            m, z = block(m, z, msa_mask, pair_mask, chunk_size)
        return m, z

    def group(start, m, z):
        for block in blocks[start : start + blocks_per_ckpt]:
            m, z = block(m, z, msa_mask, pair_mask, chunk_size)
        return m, z

    for start in range(0, len(blocks), blocks_per_ckpt):
        m, z = checkpoint(group, start, m, z, use_reentrant=False)
    return m, z


class EvoformerStack(nn.Module):
    """Algorithm 6: ``no_blocks`` Evoformer blocks, then the single representation
    ``s = linear(m[..., 0, :, :])`` from the first MSA row. Returns ``(m, z, s)``.

    Keyword arguments as OpenFold's ``EvoformerStack`` (see :class:`EvoformerStackConfig`),
    plus ``attention_backend``; ``blocks_per_ckpt`` checkpoints that many blocks at a time.
    """

    def __init__(self, *, attention_backend: str = "auto", **kwargs):
        super().__init__()
        self.config = parse_kwargs(EvoformerStackConfig, "EvoformerStack", kwargs)
        self.blocks_per_ckpt = self.config.blocks_per_ckpt
        self.blocks = nn.ModuleList(
            EvoformerBlock(attention_backend=attention_backend, **self.config.block_kwargs())
            for _ in range(self.config.no_blocks))
        self.linear = Linear(self.config.c_m, self.config.c_s)

    @classmethod
    def from_config(cls, config: EvoformerStackConfig, attention_backend: str = "auto") -> EvoformerStack:
        return cls(attention_backend=attention_backend, **vars(config))

    def forward(self, m, z, msa_mask=None, pair_mask=None, chunk_size: int | None = None):
        m, z = _run_blocks(self.blocks, m, z, msa_mask, pair_mask, chunk_size, self.blocks_per_ckpt)
        return m, z, self.linear(m[..., 0, :, :])


class ExtraMSAStack(nn.Module):
    """Algorithm 18: ``no_blocks`` extra-MSA blocks; returns the updated pair representation.

    Keyword arguments as OpenFold's ``ExtraMSAStack`` (see :class:`ExtraMSAStackConfig`), plus
    ``attention_backend``; ``ckpt`` checkpoints every block.
    """

    def __init__(self, *, attention_backend: str = "auto", **kwargs):
        super().__init__()
        self.config = parse_kwargs(ExtraMSAStackConfig, "ExtraMSAStack", kwargs)
        self.ckpt = self.config.ckpt
        self.blocks = nn.ModuleList(
            ExtraMSABlock(attention_backend=attention_backend, **self.config.block_kwargs())
            for _ in range(self.config.no_blocks))

    @classmethod
    def from_config(cls, config: ExtraMSAStackConfig, attention_backend: str = "auto") -> ExtraMSAStack:
        return cls(attention_backend=attention_backend, **vars(config))

    def forward(self, m, z, msa_mask=None, pair_mask=None, chunk_size: int | None = None) -> torch.Tensor:
        _, z = _run_blocks(self.blocks, m, z, msa_mask, pair_mask, chunk_size, 1 if self.ckpt else None)
        return z
