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
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ...parallel.dims import ParallelDims, ParallelMesh
from ...parallel.fsdp import apply_fsdp
from ...parallel.init import distribute_locally
from ...parallel.pipeline import build_pipeline
from ...parallel.sequence import (
    apply_sequence_parallel_mesh,
    sequence_layout,
    set_valid_length,
    shard_sequence,
    valid_mask,
)
from ...parallel.tensor import FusedColwiseParallel, apply_tensor_parallel, check_divisible
from .config import ClimaXConfig
from .model import ClimaX, DropPath, targets_at


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
    ignored = None
    if dims.sp_enabled:
        apply_sequence_parallel_mesh(model, dims, mesh)  # bidirectional: contiguous shards
        ignored = {shard_position_embedding(model, dims, mesh)}
    return _tp_then_fsdp(model, dims, mesh, ignored_params=ignored, **fsdp)


class _ReduceOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the data-parallel replicas and scales
    it by ``1 / (dp * sp)``: what FSDP's gradient averaging over dp x sp does for every other
    parameter (the loss of each rank is scaled by dp x sp; ``parallel.fsdp``)."""

    @staticmethod
    def forward(ctx, x, group, scale):
        ctx.group, ctx.scale = group, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.scale
        if ctx.group is not None:
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None, None


def shard_position_embedding(model: ClimaX, dims: ParallelDims, mesh: ParallelMesh) -> nn.Parameter:
    """Shard ``pos_embed [1, L, D]`` over the SP ranks by rows, as the patches are (contiguous
    chunks of ceil(L / sp)): each rank keeps, uses and updates only its patches' rows, so this
    O(L D) parameter (with its gradient and AdamW state, 16 bytes x D per patch) is divided by sp
    like the activations. Under FSDP it would be gathered whole on every rank for the forward and
    its gradient made whole before the reduce-scatter. Returns the new parameter (a DTensor
    ``Shard(1)`` over the SP mesh, so checkpoints hold the whole embedding), for FSDP to ignore."""
    whole = model.pos_embed
    sharded = nn.Parameter(distribute_locally(whole.detach(), mesh.sp, [Shard(1)]),
                           requires_grad=whole.requires_grad)
    model.pos_embed = sharded
    chunk = -(-model.config.num_patches // dims.sp)
    start = mesh.sp_rank * chunk
    group = mesh.group("dp") if dims.dp > 1 else None
    scale = 1.0 / dims.dp_sp

    def position_rows(positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            raise ValueError("ClimaX under sequence parallelism: position_rows needs this rank's positions")
        local = _ReduceOverReplicas.apply(model.pos_embed.to_local()[0], group, scale)  # [n_local, D]
        n_local = local.shape[0]
        rel = positions - start
        # End padding (and any patch not in this rank's chunk) reads an appended zero row: it is
        # cut from attention and not counted in the loss.
        rel = torch.where((rel >= 0) & (rel < n_local), rel, n_local)
        return torch.cat([local, local.new_zeros(1, local.shape[1])])[rel]

    model.position_rows = position_rows
    return sharded


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


def shard_patches(config: ClimaXConfig, dims: ParallelDims, mesh: ParallelMesh, device=None):
    """This SP rank's patches: ``(positions [L'], real [L'] bool, valid)``, global row-major
    patch ids (end padding gets patch 0, any real one, marked not ``real``) and the number of
    real patches over the ranks (``set_valid_length``)."""
    layout, ulysses = sequence_layout(dims)
    ids, pos, valid = shard_sequence(torch.arange(config.num_patches, device=device)[None], mesh.sp_rank,
                                     dims.sp, layout, ulysses, pad_value=0)
    return ids[0], valid_mask(pos, valid), valid


def patch_row_band(config: ClimaXConfig, positions: torch.Tensor) -> tuple[int, int]:
    """``(first, stop)`` patch rows holding ``positions``: the band of the fields a sequence
    shard needs (grid rows ``first * p`` to ``stop * p``), so each rank may load only that."""
    per_row = config.img_size[1] // config.patch_size
    return int(positions.min()) // per_row, int(positions.max()) // per_row + 1


def sharded_loss_sum(model: ClimaX, x_BVHW, y_all_BVHW, lead_B, variables, out_variables, lat,
                     dims: ParallelDims, mesh: ParallelMesh, v_out: int, row0: int = 0):
    """``(lat-weighted summed squared error, count)`` of this rank's patches under SP.
    ``y_all``: targets laid out over all the model's variables (``v_out`` of them scored).
    ``x`` and ``y_all`` are whole fields, or (``row0``) the band of patch rows from ``row0``
    that holds this rank's patches (:func:`patch_row_band`)."""
    c = model.config
    positions, real, valid = shard_patches(c, dims, mesh, x_BVHW.device)
    set_valid_length(model, valid if valid < positions.numel() * dims.sp else None)
    out = model.predict_patches(x_BVHW, lead_B, variables, positions, row0)
    target = targets_at(y_all_BVHW, c.patch_size, positions, row0)
    w = model.patch_loss_weights(lat, out_variables, positions).to(out.device)
    loss = (w[real] * (out[:, real].float() - target[:, real].float()).pow(2)).sum()
    # This shard's share of the count B * V_out * H * W: its real patches' grid points.
    return loss, torch.tensor(x_BVHW.shape[0] * v_out * int(real.sum()) * c.patch_size**2)
