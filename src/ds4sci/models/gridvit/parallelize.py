"""How GridViT is spread over a ``ParallelDims`` layout (the model itself stays plain PyTorch).

Sequence parallelism shards the patch tokens contiguously (bidirectional attention needs no
zigzag: every rank has the same work) for every mode, Ulysses, ring and hybrid; a patch count
the ranks do not divide is padded at the end and the padded keys are cut off
(``parallel.sequence.set_valid_length``). Tensor parallelism splits ``attn.qkv``/``mlp.fc1``
by columns and ``attn.proj``/``mlp.fc2`` by rows; FSDP shards each block over dp x sp; pipeline
stages are cut between blocks (``GridViT.pipeline_stage``).
"""

from __future__ import annotations

import torch

from ...parallel.dims import ParallelDims, ParallelMesh
from ...parallel.fsdp import apply_fsdp
from ...parallel.pipeline import build_pipeline
from ...parallel.sequence import (apply_sequence_parallel_mesh, sequence_layout, set_valid_length, shard_sequence,
                                  valid_mask)
from ...parallel.tensor import apply_tensor_parallel, check_divisible, megatron_block_plan
from .config import GridViTConfig
from .model import GridViT, patchify, squared_error_sum

BLOCK_PLAN = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def check_layout(dims: ParallelDims, config: GridViTConfig) -> None:
    """Raise ValueError, with the reason, for a layout GridViT cannot run under."""
    if dims.tp_enabled:
        check_divisible("GridViT tensor parallelism", {"num_heads": config.num_heads,
                                                       "mlp_dim": config.mlp_dim}, dims.tp)
    if dims.pp_enabled and dims.sp_enabled:
        raise ValueError(f"parallel layout {dims.describe()}: pipeline x sequence parallelism is not "
                         "supported for GridViT (stages pass whole-sequence activations)")
    if dims.pp_enabled and config.depth < dims.pp:
        raise ValueError(f"parallel layout {dims.describe()}: depth={config.depth} is less than "
                         f"pp={dims.pp}; each stage needs at least one block")


def _tp_then_fsdp(module, dims: ParallelDims, mesh: ParallelMesh, **fsdp):
    if dims.tp_enabled:
        apply_tensor_parallel(module, mesh.tp, megatron_block_plan(*BLOCK_PLAN))
    if dims.dp_sp > 1:
        apply_fsdp(module, mesh.dp_sp, **fsdp)
    return module


def parallelize_gridvit(model: GridViT, dims: ParallelDims, mesh: ParallelMesh, **fsdp) -> GridViT:
    """Apply SP, TP and FSDP to ``model`` in place (pipeline layouts: :func:`pipeline_gridvit`)."""
    check_layout(dims, model.config)
    if dims.sp_enabled:
        apply_sequence_parallel_mesh(model, dims, mesh)  # bidirectional: contiguous shards
    return _tp_then_fsdp(model, dims, mesh, **fsdp)


def pipeline_gridvit(model: GridViT, dims: ParallelDims, mesh: ParallelMesh, *, batch_size: int,
                     n_microbatches: int, schedule: str, device, **fsdp):
    check_layout(dims, model.config)
    return build_pipeline(model, mesh.pp, batch_size=batch_size, seq_len=model.config.num_patches,
                          n_microbatches=n_microbatches, schedule=schedule, device=device,
                          parallelize_stage=lambda stage: _tp_then_fsdp(stage, dims, mesh, **fsdp))


def sharded_loss_sum(model: GridViT, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, dims: ParallelDims,
                     mesh: ParallelMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed squared error, count)`` of this rank's patches (all of them without SP)."""
    p = model.config.patch_size
    x, y = patchify(x_BCHW, p), patchify(y_BCHW, p)
    if not dims.sp_enabled:
        return squared_error_sum(model.predict_patches(x), y), torch.tensor(y.numel())
    layout, ulysses = sequence_layout(dims)  # contiguous
    x, positions, valid = shard_sequence(x, mesh.sp_rank, dims.sp, layout, ulysses)
    y, _, _ = shard_sequence(y, mesh.sp_rank, dims.sp, layout, ulysses)
    set_valid_length(model, valid if valid < positions.numel() * dims.sp else None)
    real = valid_mask(positions, valid)
    pred = model.predict_patches(x, positions)
    loss = squared_error_sum(pred[:, real], y[:, real])
    return loss, torch.tensor(y[:, real].numel())
