"""How ClimaX is spread over a ``ParallelDims`` layout (the model itself stays plain PyTorch).

Sequence parallelism shards the patch tokens contiguously (bidirectional attention: every rank
has the same work) in every mode; a patch count the ranks do not divide is padded at the end,
the padded keys cut off (``parallel.sequence.set_valid_length``) and the padded patches not
counted in the loss. Tensor parallelism (Megatron) splits each block by heads and MLP columns:
``mlp.fc1`` column-wise, ``attn.proj`` and ``mlp.fc2`` row-wise, and the fused ``attn.qkv``,
whose rows are timm's ``[(q|k|v), h, d]``, with ``parallel.tensor.FusedColwiseParallel``: each
rank takes the q, k and v rows of its ``h / tp`` heads (a strided split of the unchanged
weight, so names, shapes, initial values and checkpoints are ClimaX's). The embeddings, the
variable aggregation and the head stay whole on every rank. FSDP shards each block over dp x sp
(after TP: "2D"); pipeline stages are cut between blocks (``ClimaX.pipeline_stage``), each stage
tensor-parallel and FSDP-sharded the same way.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ...parallel.dims import ParallelDims, ParallelMesh
from ...parallel.fsdp import apply_fsdp
from ...parallel.pipeline import build_pipeline
from ...parallel.sequence import (apply_sequence_parallel_mesh, sequence_layout, set_valid_length, shard_sequence,
                                  valid_mask)
from ...parallel.tensor import FusedColwiseParallel, apply_tensor_parallel, check_divisible
from .config import ClimaXConfig
from .model import ClimaX, DropPath, patchify_targets


def tensor_parallel_plan() -> dict:
    """Each block's Megatron plan; ``attn.qkv`` stacks q, k and v (``n_fused=3``)."""
    return {"attn.qkv": FusedColwiseParallel(3), "attn.proj": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}


def check_layout(dims: ParallelDims, config: ClimaXConfig) -> None:
    """Raise ValueError, with the reason, for a layout ClimaX cannot run under."""
    if dims.tp_enabled:
        check_divisible("ClimaX tensor parallelism", {
            "model.num_heads": config.num_heads,
            "the MLP hidden size int(model.embed_dim * model.mlp_ratio)": int(config.embed_dim * config.mlp_ratio)},
            dims.tp)
        if dims.dp_sp > 1 and config.embed_dim % dims.dp_sp:
            # FSDP splits each rank's qkv rows by columns (parallel.fsdp), and only evenly.
            raise ValueError(f"parallel layout {dims.describe()}: model.embed_dim={config.embed_dim} is not "
                             f"divisible by dp x sp={dims.dp_sp}; tensor parallelism with FSDP splits the "
                             "qkv weight's columns evenly over the dp x sp ranks")
    if dims.pp_enabled and dims.sp_enabled:
        raise ValueError(f"parallel layout {dims.describe()}: pipeline x sequence parallelism is not "
                         "supported for ClimaX (stages pass whole-sequence activations)")
    if dims.pp_enabled and config.depth < dims.pp:
        raise ValueError(f"parallel layout {dims.describe()}: depth={config.depth} < pp={dims.pp}")


def _tp_then_fsdp(module, dims: ParallelDims, mesh: ParallelMesh, **fsdp):
    if dims.tp_enabled:
        apply_tensor_parallel(module, mesh.tp, tensor_parallel_plan())
    if dims.dp_sp > 1:
        apply_fsdp(module, mesh.dp_sp, **fsdp)
    return module


def parallelize_climax(model: ClimaX, dims: ParallelDims, mesh: ParallelMesh, **fsdp) -> ClimaX:
    """Apply SP, TP and FSDP to ``model`` in place (pipeline layouts: :func:`pipeline_climax`)."""
    check_layout(dims, model.config)
    if dims.sp_enabled:
        apply_sequence_parallel_mesh(model, dims, mesh)  # bidirectional: contiguous shards
    return _tp_then_fsdp(model, dims, mesh, **fsdp)


def pipeline_climax(model: ClimaX, dims: ParallelDims, mesh: ParallelMesh, *, variables, out_variables, lat,
                    batch_size: int, n_microbatches: int, schedule: str, device, **fsdp):
    """This rank's pipeline stage of ``model`` (TP, then FSDP over dp applied to it) and its
    schedule."""
    check_layout(dims, model.config)
    model.set_pipeline_task(variables, out_variables, lat)
    return build_pipeline(model, mesh.pp, batch_size=batch_size, seq_len=model.config.num_patches,
                          n_microbatches=n_microbatches, schedule=schedule, device=device,
                          parallelize_stage=lambda stage: _tp_then_fsdp(stage, dims, mesh, **fsdp))


def set_batch_share(model, offset: int, total: int | None) -> None:
    """Tell every drop-path of ``model`` that its batches are samples ``offset ...`` of a batch
    of ``total`` (data-parallel shares; None: whole batches), so each sample gets one process's
    mask and the ranks of one sample equal ones (``model.DropPath``)."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.batch_share = None if total is None else (offset, total)


def sharded_loss_sum(model: ClimaX, x_BVHW, y_all_BVHW, lead_B, variables, out_variables, lat,
                     dims: ParallelDims, mesh: ParallelMesh, v_out: int):
    """``(lat-weighted summed squared error, count)`` of this rank's patches under SP.
    ``y_all``: targets laid out over all the model's variables (``v_out`` of them scored)."""
    c = model.config
    layout, ulysses = sequence_layout(dims)
    # Patch ids of this shard; end padding gets patch 0 (any real one) and is not counted.
    ids, pos, valid = shard_sequence(torch.arange(c.num_patches, device=x_BVHW.device)[None], mesh.sp_rank,
                                     dims.sp, layout, ulysses, pad_value=0)
    positions, real = ids[0], valid_mask(pos, valid)
    set_valid_length(model, valid if valid < positions.numel() * dims.sp else None)
    out = model.predict_patches(x_BVHW, lead_B, variables, positions)
    target = patchify_targets(y_all_BVHW, c.patch_size)[:, positions]
    w = model.patch_loss_weights(lat, out_variables).to(out.device)[positions]
    loss = (w[real] * (out[:, real].float() - target[:, real].float()).pow(2)).sum()
    # This shard's share of the count B * V_out * H * W: its real patches' grid points.
    return loss, torch.tensor(x_BVHW.shape[0] * v_out * int(real.sum()) * c.patch_size**2)
