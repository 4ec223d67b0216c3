"""ClimaX (Nguyen et al. 2023, arXiv:2301.10343): the architecture of microsoft/ClimaX v0.3.1
``src/climax/arch.py`` in plain PyTorch, weight-compatible with it, plus exact long-sequence
switches.

Per-variable patch embedding -> + variable embedding -> variable aggregation (one learnable query,
single-layer multi-head cross-attention over the variables of each patch) -> + 2-D sin-cos
position embedding -> + lead-time embedding -> ViT blocks -> norm -> head -> unpatchify.

Parameter names equal ClimaX's (``token_embeds``, ``var_embed``, ``var_query``,
``var_agg.in_proj_weight``, ``pos_embed``, ``lead_time_embed``, ``blocks.i.attn.qkv`` ...,
``norm``, ``head.k``), so ``load_state_dict`` works both ways.

Long sequences (each exact: same outputs and gradients as the plain path):
- ``agg_tile``: tokenisation + aggregation run tile by tile of patches, each tile recomputed in
  backward (``torch.utils.checkpoint``), so ``[B, V, L, D]`` and the aggregation's keys/values
  exist one tile at a time;
- attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels);
- ``activation_checkpointing`` per block; ``mlp_chunk`` tiles the MLP over tokens.

Legend: ``B`` batch, ``V`` variables, ``H``/``W`` grid (lat/lon), ``p`` patch side, ``L``
patches (``H/p * W/p``), ``P`` = ``p*p``, ``D`` width, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...parallel import init as _init
from .config import ClimaXConfig

# ----------------------------------------------------------------------------------------------
# Fixed embeddings (ClimaX utils/pos_embed.py, computed in float64 as numpy does there)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[M, dim]``: sin of ``pos * omega`` in the first half, cos in the second, with
    ``omega_i = 10000^(-i / (dim/2))``."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim={dim}; expected an even number")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(pos, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """``[grid_h*grid_w, dim]`` in row-major patch order. As in ClimaX (and MAE), the first half
    of the channels encodes the column (w) index and the second half the row (h) index."""
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


# ----------------------------------------------------------------------------------------------
# Patches


def patchify(x_BVHW: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, V, H, W]`` -> ``[B, V, L, p*p]``: patches row-major, values row-major within a patch
    (the order a ``Conv2d(1, D, p, stride=p)`` kernel reads them)."""
    b, v, h, w = x_BVHW.shape
    x = x_BVHW.reshape(b, v, h // p, p, w // p, p)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(b, v, (h // p) * (w // p), p * p)


def unpatchify(x_BLQ: torch.Tensor, v: int, h: int, w: int, p: int) -> torch.Tensor:
    """Head output ``[B, L, p*p*V]`` -> ``[B, V, H, W]``. ClimaX lays each token's outputs out as
    ``(p_row, p_col, V)`` (variable last), unlike the input patches."""
    b = x_BLQ.shape[0]
    if x_BLQ.shape[1] != (h // p) * (w // p) or x_BLQ.shape[2] != p * p * v:
        raise ValueError(f"unpatchify: input has shape {tuple(x_BLQ.shape)}; expected "
                         f"[B, L={(h // p) * (w // p)}, p*p*V={p * p * v}]")
    x = x_BLQ.reshape(b, h // p, w // p, p, p, v)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, v, h, w)


def _patch_rows_cols(positions: torch.Tensor, h: int, w: int, p: int, row0: int):
    """Patch row (relative to the band starting at patch row ``row0``) and column of each of
    ``positions`` (global row-major patch ids) in a field band ``[.., h, w]``."""
    rows, cols = positions // (w // p) - row0, positions % (w // p)
    if positions.numel() and (int(rows.min()) < 0 or int(rows.max()) >= h // p):
        raise ValueError(f"ClimaX: patches in patch rows {int(rows.min()) + row0}..{int(rows.max()) + row0} "
                         f"are outside the field band of patch rows {row0}..{row0 + h // p - 1}")
    return rows, cols


def patches_at(x_BVHW: torch.Tensor, p: int, positions: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """:func:`patchify` restricted to the patches ``positions``: ``[B, V, L', p*p]``, gathered
    straight from the field (a sequence shard never copies the whole field). ``x`` may be a band
    of patch rows starting at patch row ``row0``."""
    b, v, h, w = x_BVHW.shape
    rows, cols = _patch_rows_cols(positions, h, w, p, row0)
    x = x_BVHW.reshape(b, v, h // p, p, w // p, p)[:, :, rows, :, cols, :]  # [L', B, V, p, p]
    return x.permute(1, 2, 0, 3, 4).reshape(b, v, positions.numel(), p * p)


def targets_at(y_BVHW: torch.Tensor, p: int, positions: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """:func:`patchify_targets` restricted to the patches ``positions``: ``[B, L', p*p*V]``."""
    b, v, h, w = y_BVHW.shape
    rows, cols = _patch_rows_cols(positions, h, w, p, row0)
    y = y_BVHW.reshape(b, v, h // p, p, w // p, p)[:, :, rows, :, cols, :]  # [L', B, V, p, p]
    return y.permute(1, 0, 3, 4, 2).reshape(b, positions.numel(), p * p * v)


def patchify_targets(y_BVHW: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`unpatchify`: ``[B, V, H, W]`` -> ``[B, L, p*p*V]``."""
    b, v, h, w = y_BVHW.shape
    y = y_BVHW.reshape(b, v, h // p, p, w // p, p)
    return y.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * v)


# ----------------------------------------------------------------------------------------------
# Modules


class PatchEmbed(nn.Module):
    """One variable's patch embedding, named as timm's ``PatchEmbed`` (``proj`` is the
    ``Conv2d(1, D, p, stride=p)``; ``norm`` is the identity, as ClimaX uses it)."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)


class ParallelVarPatchEmbed(nn.Module):
    """Every variable's patch embedding as one grouped tensor (ClimaX ``ParallelVarPatchEmbed``):
    ``proj_weights [V, D, 1, p, p]``, ``proj_biases [V, D]``."""

    def __init__(self, max_vars: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj_weights = nn.Parameter(torch.empty(max_vars, embed_dim, 1, patch_size, patch_size))
        self.proj_biases = nn.Parameter(torch.empty(max_vars, embed_dim))


class VariableAggregation(nn.Module):
    """Cross-attention of one query over the V variable tokens of each patch, with the parameters
    (and names) of a single-layer ``nn.MultiheadAttention(D, h, batch_first=True)``."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query_D: torch.Tensor, x_BVtD: torch.Tensor) -> torch.Tensor:
        """Aggregate ``[B, V, t, D]`` to ``[B, t, D]`` with the query ``[D]``.

        The same function as ``nn.MultiheadAttention(query, x, x)``, computed in another order:
        the query is one vector, so each head's score ``q_h . (W_k,h x + b_k,h)`` is ``x . u_h +
        c_h`` with ``u_h = W_k,h^T q_h``, and, the weights summing to 1 over the variables, the
        value side is ``W_v,h (sum_v a_v,h x_v) + b_v,h``. Keys and values ``[B, V, t, D]`` are
        never formed and their projections cost ``t D^2`` instead of ``V t D^2``.
        """
        b, nv, t, dim = x_BVtD.shape
        h = self.num_heads
        d = dim // h
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q_hd = (F.linear(query_D, w_q, b_q) * d**-0.5).view(h, d)
        u_hD = torch.einsum("hd,hde->he", q_hd, w_k.view(h, d, dim))
        c_h = (b_k.view(h, d) * q_hd).sum(-1)
        scores_BtHV = torch.einsum("bvte,he->bthv", x_BVtD, u_hD) + c_h[:, None]
        attn_BtHV = scores_BtHV.softmax(dim=-1)
        z_BtHD = torch.einsum("bthv,bvte->bthe", attn_BtHV, x_BVtD)  # per head, weighted mean of x
        out_BtHd = torch.einsum("bthe,hde->bthd", z_BtHD, w_v.view(h, d, dim)) + b_v.view(h, d)
        return self.out_proj(out_BtHd.reshape(b, t, dim))


def full_attention(q_BhLd: torch.Tensor, k_BhLd: torch.Tensor, v_BhLd: torch.Tensor) -> torch.Tensor:
    """Non-causal attention over the whole sequence (SDPA's flash/memory-efficient kernels)."""
    return F.scaled_dot_product_attention(q_BhLd, k_BhLd, v_BhLd)


class Attention(nn.Module):
    """timm ``Attention`` (qkv bias, no attention dropout as ClimaX builds it): ``qkv`` output is
    laid out ``[(q|k|v), h, d]``."""

    causal = False
    """Every patch attends to every patch (read by ``parallel.sequence``)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.core = full_attention
        """``(q, k, v) [B, h, L, d] -> [B, h, L, d]``; sequence parallelism swaps it."""

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BLD.shape
        # Heads counted from the projection's output, so a tensor-parallel shard of the heads
        # (the q, k and v rows of h/tp heads) runs this code unchanged.
        qkv = self.qkv(x_BLD).view(b, s, 3, -1, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, d]
        out = self.core(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, s, -1)))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU -> dropout -> fc2 -> dropout; optionally ``chunk`` tokens at a
    time, each chunk recomputed in backward, so the hidden ``[B, L, mlp_ratio*D]`` never exists
    whole. Under dropout the chunks draw their masks separately (same distribution)."""

    def __init__(self, dim: int, hidden: int, drop: float, chunk: int | None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.chunk = chunk

    def _mlp(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        if self.chunk is None or x_BLD.shape[1] <= self.chunk:
            return self._mlp(x_BLD)
        grad = torch.is_grad_enabled()
        return torch.cat([checkpoint(self._mlp, part, use_reentrant=False) if grad else self._mlp(part)
                          for part in x_BLD.split(self.chunk, dim=1)], dim=1)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``, scaled by 1/keep), drawn from torch's RNG.

    ``batch_share = (offset, total)`` says the batch is samples ``offset ... offset+B-1`` of a
    batch of ``total`` split over ranks: the mask is then drawn for all ``total`` samples and this
    share kept, so every rank consumes the same random numbers and each sample gets the mask one
    process would draw for it. Ranks that hold the same samples (sequence or tensor shards of
    them) thus draw equal masks, as they must. None: the batch is whole.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.batch_share: tuple[int, int] | None = None

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        offset, total = self.batch_share or (0, x.shape[0])
        if offset < 0 or offset + x.shape[0] > total:
            raise ValueError(f"DropPath: batch_share={self.batch_share} does not hold a batch of {x.shape[0]}")
        mask = x.new_empty((total,) + (1,) * (x.dim() - 1)).bernoulli_(keep)[offset:offset + x.shape[0]]
        return x * mask.div_(keep)


class Block(nn.Module):
    """timm ViT ``Block``: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, config: ClimaXConfig, drop_path: float):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, config.num_heads, config.drop_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.drop_rate, config.mlp_chunk)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.drop_path(self.attn(self.norm1(x_BLD)))
        return x_BLD + self.drop_path(self.mlp(self.norm2(x_BLD)))


# ----------------------------------------------------------------------------------------------


class ClimaX(nn.Module):
    """ClimaX: fields ``[B, V_in, H, W]`` + lead times ``[B]`` -> fields ``[B, V_out, H, W]``."""

    fsdp_forward_methods = ("predict_patches", "predict")
    """Called instead of ``forward`` by training (``parallel.fsdp`` gathers the root for them)."""

    def __init__(self, config: ClimaXConfig | None = None, *, seed: int | None = None, **climax_kwargs):
        """``ClimaX(config)`` or ``ClimaX(default_vars, img_size=..., ...)`` with ClimaX's own
        arguments. Built and initialised as ClimaX initialises; under ``torch.device("meta")``
        built without values, for :func:`init_parameters` after sharding."""
        super().__init__()
        if config is None or not isinstance(config, ClimaXConfig):
            if config is not None:
                climax_kwargs["default_vars"] = config
            config = ClimaXConfig(**climax_kwargs)
        elif climax_kwargs:
            raise ValueError(f"ClimaX: got a config and keyword arguments {sorted(climax_kwargs)}; "
                             f"pass one or the other")
        self.config = c = config
        self.img_size, self.patch_size = list(c.img_size), c.patch_size
        self.default_vars, self.parallel_patch_embed = list(c.default_vars), c.parallel_patch_embed
        self.num_patches = c.num_patches
        self.var_map = {name: i for i, name in enumerate(c.default_vars)}
        self.pipeline_task = None
        nv, dim = len(c.default_vars), c.embed_dim
        if c.parallel_patch_embed:
            self.token_embeds = ParallelVarPatchEmbed(nv, c.patch_size, dim)
        else:
            self.token_embeds = nn.ModuleList(PatchEmbed(c.patch_size, dim) for _ in range(nv))
        self.var_embed = nn.Parameter(torch.empty(1, nv, dim))
        self.var_query = nn.Parameter(torch.empty(1, 1, dim))
        self.var_agg = VariableAggregation(dim, c.num_heads)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, dim))
        self.lead_time_embed = nn.Linear(1, dim)
        self.pos_drop = nn.Dropout(c.drop_rate)
        rates = [r.item() for r in torch.linspace(0, c.drop_path, c.depth, device="cpu")]
        self.blocks = nn.ModuleList(Block(c, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        head: list[nn.Module] = []
        for _ in range(c.decoder_depth):
            head += [nn.Linear(dim, dim), nn.GELU()]
        head.append(nn.Linear(dim, nv * c.patch_size**2))
        self.head = nn.Sequential(*head)
        if not self.pos_embed.is_meta:
            init_parameters(self, int(torch.randint(2**62, (), device="cpu")) if seed is None else seed)

    # ----- parameters' initial values (ClimaX.initialize_weights, by name) -----
    def initial_value(self, name: str, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """ClimaX's initial value of parameter ``name`` as a whole CPU fp32 tensor of ``shape``."""
        return initial_value(self.config, name, shape, generator)

    # ----- variables -----
    def var_ids(self, variables: Sequence[str], device=None) -> torch.Tensor:
        unknown = [v for v in variables if v not in self.var_map]
        if unknown:
            raise ValueError(f"ClimaX: variables {unknown} are not among default_vars {self.default_vars}")
        return torch.tensor([self.var_map[v] for v in variables], dtype=torch.long, device=device)

    def _embed_weights(self, ids: torch.Tensor):
        """Patch-embedding weights ``[V', D, P]`` and biases ``[V', D]`` of variables ``ids``."""
        if self.parallel_patch_embed:
            w, b = self.token_embeds.proj_weights[ids], self.token_embeds.proj_biases[ids]
        else:
            picked = [self.token_embeds[i] for i in ids.tolist()]
            w = torch.stack([m.proj.weight for m in picked])
            b = torch.stack([m.proj.bias for m in picked])
        return w.flatten(2), b

    def _tokenize_tile(self, patches_BVtP, w_VDP, b_VD, var_emb_VD, query_D):
        """One tile: embed each variable's patches, add the variable embedding, aggregate."""
        x_BVtD = torch.einsum("bvtp,vdp->bvtd", patches_BVtP, w_VDP) + b_VD[None, :, None, :]
        x_BVtD = x_BVtD + var_emb_VD[None, :, None, :]
        return self.var_agg(query_D, x_BVtD)

    def tokens(self, x_BVHW: torch.Tensor, lead_times_B: torch.Tensor, variables: Sequence[str],
               positions: torch.Tensor | None = None, row0: int = 0) -> torch.Tensor:
        """Tokens ``[B, L, D]`` before the blocks: embedding + aggregation + position + lead time.
        ``positions`` (global patch indices, row-major) restricts them to those patches, as a
        sequence shard needs; default all ``L``. With ``positions``, ``x`` may be only the band
        of patch rows from ``row0`` that holds them (a shard need not load the whole field)."""
        c = self.config
        variables = list(variables)
        # A shard (positions given) may hold any band of whole patch rows; patches_at checks
        # that the band covers its patches.
        if (x_BVHW.dim() != 4 or x_BVHW.shape[1] != len(variables) or x_BVHW.shape[3] != c.img_size[1]
                or (x_BVHW.shape[2] % c.patch_size if positions is not None
                    else x_BVHW.shape[2] != c.img_size[0])):
            raise ValueError(f"ClimaX: x has shape {tuple(x_BVHW.shape)}; expected [B, V={len(variables)} "
                             f"(len(variables)), H={c.img_size[0]}, W={c.img_size[1]}]"
                             + (" (or a band of whole patch rows of H)" if positions is not None else ""))
        if positions is None:
            patches = patchify(x_BVHW, c.patch_size)  # input-sized, D/(p*p) times smaller than [B, V, L, D]
        else:
            patches = patches_at(x_BVHW, c.patch_size, positions, row0)
        return self.tokens_from_patches(patches, lead_times_B, variables, positions)

    def tokens_from_patches(self, patches_BVLP: torch.Tensor, lead_times_B: torch.Tensor, variables: Sequence[str],
                            positions: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`tokens` of patchified inputs ``[B, V, L', p*p]`` (:func:`patchify`), which are
        the patches ``positions`` (default all ``L``)."""
        c = self.config
        ids = self.var_ids(list(variables), device=patches_BVLP.device)
        w, b = self._embed_weights(ids)
        var_emb = self.var_embed[0, ids]
        query = self.var_query[0, 0]
        patches = patches_BVLP
        pos = self.position_rows(positions)
        if patches.shape[2] != pos.shape[0]:
            raise ValueError(f"ClimaX: {patches.shape[2]} patches for {pos.shape[0]} positions")
        tile = c.agg_tile or patches.shape[2]
        recompute = c.agg_tile is not None and torch.is_grad_enabled()
        outs = []
        for start in range(0, patches.shape[2], tile):
            part = patches[:, :, start:start + tile]
            if recompute:
                outs.append(checkpoint(self._tokenize_tile, part, w, b, var_emb, query, use_reentrant=False))
            else:
                outs.append(self._tokenize_tile(part, w, b, var_emb, query))
        x_BLD = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        x_BLD = x_BLD + pos
        lead_BD = self.lead_time_embed(lead_times_B.to(x_BLD.dtype).unsqueeze(-1))
        return self.pos_drop(x_BLD + lead_BD.unsqueeze(1))

    def position_rows(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Position embeddings ``[L', D]`` of ``positions`` (default all ``L``). Under sequence
        parallelism an instance attribute of the same name takes the rank's rows of a
        sequence-sharded ``pos_embed`` instead (``parallelize.shard_position_embedding``)."""
        return self.pos_embed[0] if positions is None else self.pos_embed[0, positions]

    def run_blocks(self, x_BLD: torch.Tensor, blocks=None) -> torch.Tensor:
        """The ViT blocks (all, or ``blocks``: a pipeline stage's), checkpointed if configured."""
        for block in self.blocks if blocks is None else blocks:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                x_BLD = checkpoint(block, x_BLD, use_reentrant=False)
            else:
                x_BLD = block(x_BLD)
        return x_BLD

    def project(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Final norm + head: ``[B, L, D]`` -> per-token outputs ``[B, L, p*p*V]`` (all
        default_vars; :func:`unpatchify` lays them out)."""
        return self.head(self.norm(x_BLD))

    def predict_from_tokens(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Blocks + norm + head: tokens ``[B, L, D]`` -> ``[B, L, p*p*V]``."""
        return self.project(self.run_blocks(x_BLD))

    def predict_patches(self, x_BVHW, lead_times_B, variables, positions: torch.Tensor | None = None,
                        row0: int = 0) -> torch.Tensor:
        """Head outputs ``[B, L', p*p*V]`` of the patches ``positions`` (default all): what a
        sequence shard computes (attention over the whole sequence goes through ``attn.core``).
        ``row0``: ``x`` is the band of patch rows from there (see :meth:`tokens`)."""
        return self.project(self.run_blocks(self.tokens(x_BVHW, lead_times_B, variables, positions, row0)))

    def patch_loss_weights(self, lat_H, out_variables: Sequence[str],
                           positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, p*p*V]`` weights laid out as the head's outputs: ``cos(lat)/mean(cos(lat))`` on
        the entries of ``out_variables``, 0 elsewhere, so ``sum(w * (out - patchify_targets(y))^2)
        / (B * V_out * H * W)`` is ClimaX's lat-weighted MSE; ``positions`` (global patch ids):
        only those rows, as a sequence shard needs (never the whole ``[L, p*p*V]``)."""
        c = self.config
        lat = torch.as_tensor(np.asarray(lat_H, dtype=np.float64))
        if lat.shape != (c.img_size[0],):
            raise ValueError(f"ClimaX.patch_loss_weights: lat has shape {tuple(lat.shape)}; expected [H={c.img_size[0]}]")
        w_H = torch.cos(torch.deg2rad(lat))
        w_H = (w_H / w_H.mean()).float()
        keep = torch.zeros(len(c.default_vars))
        keep[self.var_ids(list(out_variables))] = 1.0
        p, v = c.patch_size, len(c.default_vars)
        if positions is None:
            positions = torch.arange(c.num_patches)
        rows = positions.cpu() // (c.img_size[1] // p)
        lat_rows = rows[:, None] * p + torch.arange(p)  # [L', p]: grid row of each patch row
        w = w_H[lat_rows][:, :, None, None] * keep  # [L', p_row, 1, V]: ClimaX's (p_row, p_col, V) order
        return w.expand(-1, p, p, v).reshape(len(positions), p * p * v)

    # ----- the pipeline protocol (parallel.pipeline) -----
    def set_pipeline_task(self, variables: Sequence[str], out_variables: Sequence[str], lat_H) -> None:
        """What the pipeline stages compute: inputs ``variables``, loss on ``out_variables`` at
        latitudes ``lat``."""
        self.var_ids(list(variables)), self.var_ids(list(out_variables))  # raise on unknown names
        self.pipeline_task = (list(variables), list(out_variables), np.asarray(lat_H, dtype=np.float64))

    def pipeline_blocks(self) -> int:
        return len(self.blocks)

    def pipeline_stage(self, block_ids: range, is_first: bool, is_last: bool) -> ClimaXStage:
        return ClimaXStage(self, block_ids, is_first, is_last)

    def fields(self, out_BLQ: torch.Tensor, out_variables: Sequence[str]) -> torch.Tensor:
        """Head outputs of all ``L`` patches -> ``[B, V_out, H, W]`` of ``out_variables``."""
        c = self.config
        preds = unpatchify(out_BLQ, len(c.default_vars), c.img_size[0], c.img_size[1], c.patch_size)
        return preds[:, self.var_ids(list(out_variables), device=preds.device)]

    def predict(self, x_BVHW, lead_times_B, variables, out_variables) -> torch.Tensor:
        """``[B, V_out, H, W]`` forecast."""
        return self.fields(self.predict_from_tokens(self.tokens(x_BVHW, lead_times_B, variables)), out_variables)

    def forward(self, x, y, lead_times, variables, out_variables, metric, lat):
        """As ClimaX: ``(loss, preds)`` where ``loss = [m(preds, y, out_variables, lat) for m in
        metric]`` (None if ``metric`` is None) and ``preds [B, V_out, H, W]``."""
        preds = self.predict(x, lead_times, variables, out_variables)
        loss = None if metric is None else [m(preds, y, out_variables, lat) for m in metric]
        return loss, preds


# ----------------------------------------------------------------------------------------------
# The pipeline protocol (parallel.pipeline): one tensor in, one tensor out per stage


def pack_inputs(x_BVHW: torch.Tensor, lead_times_B: torch.Tensor, p: int) -> torch.Tensor:
    """A pipeline's input ``[B, L, V*p*p + 1]``: each token's patch values of every variable
    (:func:`patchify` order) and the sample's lead time last."""
    b, v = x_BVHW.shape[:2]
    patches = patchify(x_BVHW, p)  # [B, V, L, P]
    lead = lead_times_B.to(x_BVHW.dtype)[:, None, None].expand(b, patches.shape[2], 1)
    return torch.cat([patches.permute(0, 2, 1, 3).reshape(b, patches.shape[2], -1), lead], dim=-1)


class ClimaXStage(nn.Module):
    """Blocks ``block_ids`` of a ClimaX (a pipeline stage). The first stage also tokenises
    (input: :func:`pack_inputs` of the task's ``variables``), the last also projects (output:
    ``[B, L, p*p*V]``; targets: ``patchify_targets`` of all default_vars, other than
    ``out_variables`` anything finite, NaN rows = padding). Parameter names are the whole
    model's. The task (``variables``, ``out_variables``, ``lat``) is set on the model with
    :meth:`ClimaX.set_pipeline_task` before the stages are built."""

    def __init__(self, model: ClimaX, block_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        if getattr(model, "pipeline_task", None) is None:
            raise ValueError("ClimaX.pipeline_stage: call model.set_pipeline_task(variables, out_variables, lat) first")
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self._model = [model]  # not a submodule: its other parts belong to other stages
        self.variables, self.out_variables, lat = model.pipeline_task
        if is_first:
            self.token_embeds, self.var_agg, self.lead_time_embed = model.token_embeds, model.var_agg, model.lead_time_embed
            self.var_embed, self.var_query, self.pos_embed = model.var_embed, model.var_query, model.pos_embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        if is_last:
            self.norm, self.head = model.norm, model.head
        self._weights = model.patch_loss_weights(lat, self.out_variables) if is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        if self.is_first:
            # The bare embedding parameters are registered on this stage too; after to_empty or
            # FSDP's unshard the stage holds the live tensors, so the model must read those.
            for name in ("var_embed", "var_query", "pos_embed"):
                model._parameters[name] = getattr(self, name)
            b, l, _ = x.shape
            patches = x[..., :-1].reshape(b, l, len(self.variables), -1).permute(0, 2, 1, 3)
            x = model.tokens_from_patches(patches, x[:, 0, -1], self.variables)
        x = model.run_blocks(x, self.blocks.values())
        return model.project(x) if self.is_last else x

    def loss_sum(self, out_BLQ: torch.Tensor, target_BLQ: torch.Tensor):
        """Lat-weighted summed squared error over the real samples (ClimaX's loss times count)."""
        real = ~target_BLQ[:, 0, 0].isnan()
        w = self._weights.to(out_BLQ.device)
        diff = out_BLQ[real].float() - target_BLQ[real].float()
        return (w * diff.pow(2)).sum(), self.count(target_BLQ)

    def fixed_batch(self, inputs, targets, batch_size: int, seq_len: int):
        """Inputs/targets padded to ``batch_size`` samples (zero inputs, NaN targets)."""
        pad = batch_size - inputs.shape[0]
        if pad:
            inputs = torch.cat([inputs, inputs.new_zeros((pad, *inputs.shape[1:]))])
            targets = torch.cat([targets, targets.new_full((pad, *targets.shape[1:]), float("nan"))])
        return inputs, targets

    def count(self, targets_BLQ: torch.Tensor) -> torch.Tensor:
        """Values ClimaX's mean runs over: real samples x V_out x H x W."""
        h, w = self.config.img_size
        return (~targets_BLQ[:, 0, 0].isnan()).sum() * len(self.out_variables) * h * w


# ----------------------------------------------------------------------------------------------
# Initial values


def _trunc_normal(shape, generator) -> torch.Tensor:
    # timm's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. +-100 std: torch's with a=-2, b=2.
    return nn.init.trunc_normal_(torch.empty(tuple(shape)), std=0.02, a=-2.0, b=2.0, generator=generator)


def initial_value(config: ClimaXConfig, name: str, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """ClimaX's initial value of parameter ``name`` (``ClimaX.initialize_weights``): trunc-normal
    (std 0.02) linear and patch-embedding weights, zero linear biases, LayerNorm 1/0, sin-cos
    position and variable embeddings, a zero variable query, the aggregation's input projection
    Xavier-uniform (``nn.MultiheadAttention``'s own init, which ClimaX keeps) and patch-embedding
    biases U(-1/p, 1/p) (the conv default, which ClimaX keeps)."""
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    if name == "pos_embed":
        gh, gw = config.grid
        return torch.from_numpy(sincos_2d(shape[-1], gh, gw)).float().reshape(shape)
    if name == "var_embed":
        return torch.from_numpy(sincos_1d(shape[-1], np.arange(shape[1]))).float().reshape(shape)
    if name == "var_query" or name == "var_agg.in_proj_bias":
        return torch.zeros(shape)
    if name == "var_agg.in_proj_weight":
        return nn.init.xavier_uniform_(torch.empty(shape), generator=generator)
    if name.startswith("token_embeds."):
        if leaf in ("weight", "proj_weights"):
            return _trunc_normal(shape, generator)
        bound = 1.0 / math.sqrt(config.patch_size**2)  # fan_in of Conv2d(1, D, p)
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    if leaf.startswith("norm") or ".norm" in name or name.startswith("norm."):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "weight":
        return _trunc_normal(shape, generator)
    raise KeyError(f"ClimaX initial_value: no rule for parameter {name!r}")


def init_parameters(module: nn.Module, seed: int) -> None:
    """Every parameter of a ClimaX (or a part keeping its names) as a function of (seed, name)."""
    config = module.config
    _init.init_parameters(module, seed, lambda name, _m, shape, gen: initial_value(config, name, shape, gen))
