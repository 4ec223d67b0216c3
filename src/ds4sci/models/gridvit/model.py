"""GridViT: patches of a gridded field -> bidirectional transformer -> the field's patches.

Plain PyTorch, no parallelism (``parallelize.py`` applies it). Tokens carry fixed 2-D sin-cos
position embeddings computed for the patch indices in use (no table, no parameter), so a
sequence shard embeds its own patches knowing only their global indices.

Legend: ``B`` batch, ``C`` channels, ``H``/``W`` grid, ``p`` patch side, ``L`` patches
(``H/p * W/p``), ``P`` patch values (``C p p``), ``D`` width, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...parallel import init as _init
from .config import GridViTConfig


def patchify(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, L, C p p]``, patches in row-major order."""
    b, c, h, w = x_BCHW.shape
    x = x_BCHW.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x_BLP: torch.Tensor, c: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x_BLP.shape[0]
    x = x_BLP.reshape(b, h // p, w // p, c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def sincos_2d(positions: torch.Tensor, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[L, dim]`` of patch indices ``positions`` (row-major on a
    grid ``grid_w`` patches wide): half the channels encode the row, half the column."""
    rows, cols = (positions // grid_w).float(), (positions % grid_w).float()
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=positions.device) / max(quarter, 1))
    parts = []
    for coord in (rows, cols):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


def full_attention(q_BhLd: torch.Tensor, k_BhLd: torch.Tensor, v_BhLd: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention over the whole sequence (SDPA's flash/memory-efficient kernels)."""
    return F.scaled_dot_product_attention(q_BhLd, k_BhLd, v_BhLd)


class Attention(nn.Module):
    causal = False
    """Every patch attends to every patch (read by ``parallel.sequence``)."""

    def __init__(self, config: GridViTConfig):
        super().__init__()
        self.head_dim = config.embed_dim // config.num_heads
        # Fused projection laid out per head, [h, (q|k|v), d]: a column split over tensor-parallel
        # ranks hands each whole heads.
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.core = full_attention
        """``(q, k, v) [B, h, L, d] -> [B, h, L, d]``; sequence parallelism swaps it."""

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BLD.shape
        qkv = self.qkv(x_BLD).view(b, s, -1, 3 * self.head_dim)  # heads read from the output (TP)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        out = self.core(q, k, v.contiguous())
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: GridViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: GridViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GridViT(nn.Module):
    """Field ``[B, C, H, W]`` -> predicted field ``[B, C, H, W]``."""

    fsdp_forward_methods = ("predict_patches",)
    """Called instead of ``forward`` by sequence-parallel training (``parallel.fsdp``)."""

    def __init__(self, config: GridViTConfig, *, seed: int | None = None):
        """Built and initialised; under ``torch.device("meta")`` built without values, for
        :func:`init_parameters` after sharding."""
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.embed_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.patch_dim)
        if not self.patch_embed.weight.is_meta:
            init_parameters(self, int(torch.randint(2**62, (), device="cpu")) if seed is None else seed)

    def embed(self, patches_BLP: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, L, D]`` of patches whose global indices are ``positions`` (default
        ``0 .. L-1``)."""
        if positions is None:
            positions = torch.arange(patches_BLP.shape[1], device=patches_BLP.device)
        grid_w = self.config.width // self.config.patch_size
        pos = sincos_2d(positions, grid_w, self.config.embed_dim).to(patches_BLP.dtype)
        return self.patch_embed(patches_BLP) + pos

    def run_blocks(self, x_BLD: torch.Tensor, blocks=None) -> torch.Tensor:
        for block in self.blocks if blocks is None else blocks:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                x_BLD = checkpoint(block, x_BLD, use_reentrant=False)
            else:
                x_BLD = block(x_BLD)
        return x_BLD

    def predict_patches(self, patches_BLP: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted patches ``[B, L, P]`` for the input patches (a shard's, with their global
        ``positions``, under sequence parallelism)."""
        return self.head(self.norm(self.run_blocks(self.embed(patches_BLP, positions))))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x_BCHW.dim() != 4 or tuple(x_BCHW.shape[1:]) != (c.channels, c.height, c.width):
            raise ValueError(f"GridViT: input has shape {tuple(x_BCHW.shape)}; expected "
                             f"[B, C={c.channels}, H={c.height}, W={c.width}]")
        out = self.predict_patches(patchify(x_BCHW, c.patch_size))
        return unpatchify(out, c.channels, c.height, c.width, c.patch_size)

    # ----- the pipeline protocol (parallel.pipeline) -----
    def pipeline_blocks(self) -> int:
        return len(self.blocks)

    def pipeline_stage(self, block_ids: range, is_first: bool, is_last: bool) -> GridViTStage:
        return GridViTStage(self, block_ids, is_first, is_last)


class GridViTStage(nn.Module):
    """Blocks ``block_ids`` of a GridViT (a pipeline stage); the first stage also patchifies and
    embeds, the last also normalises and predicts patches. Parameter names are the whole
    model's. ``forward``: first stage ``[B, C, H, W]``, later ``[B, L, D]``; the last returns
    predicted patches ``[B, L, P]``; the targets are patchified fields."""

    def __init__(self, model: GridViT, block_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self._model = [model]  # not a submodule: its other parts belong to other stages
        if is_first:
            self.patch_embed = model.patch_embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        if is_last:
            self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        if self.is_first:
            x = model.embed(patchify(x, self.config.patch_size))
        x = model.run_blocks(x, self.blocks.values())
        return self.head(self.norm(x)) if self.is_last else x

    def loss_sum(self, pred_BLP: torch.Tensor, target_BLP: torch.Tensor):
        """Summed squared error over the real targets (padding rows are NaN: ``fixed_batch``)."""
        real = ~target_BLP.isnan()
        diff = torch.where(real, pred_BLP.float() - target_BLP.float(), 0.0)
        return diff.pow(2).sum(), real.sum()

    def fixed_batch(self, x, y, batch_size: int, seq_len: int):
        """Fields padded to ``batch_size`` (zero inputs, NaN targets that count for nothing);
        targets as patches ``[B, L, P]``."""
        pad = batch_size - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            y = torch.cat([y, y.new_full((pad, *y.shape[1:]), float("nan"))])
        return x, patchify(y, self.config.patch_size)

    @staticmethod
    def count(targets: torch.Tensor) -> torch.Tensor:
        return (~targets.isnan()).sum()


def squared_error_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed squared error in fp32 (the loss is its mean over every predicted value)."""
    return (pred.float() - target.float()).pow(2).sum()


def _initial_value(std: float, name: str, module: nn.Module, shape, generator):
    if name.rsplit(".", 1)[-1] == "bias":
        return 0.0
    if isinstance(module, nn.LayerNorm):
        return 1.0
    if isinstance(module, nn.Linear):
        return torch.empty(shape).normal_(0.0, std, generator=generator)
    raise TypeError(f"GridViT init: no rule for {name} (a parameter of {type(module).__name__})")


def init_parameters(module: nn.Module, seed: int) -> None:
    """Every parameter as a function of (seed, its name): linear weights ``N(0, std)``, biases 0,
    LayerNorm weights 1 (whole model or pipeline stage, plain or sharded)."""
    _init.init_parameters(module, seed, functools.partial(_initial_value, module.config.initializer_range))
