"""Megatron-style tensor parallelism through DTensor's ``parallelize_module``, for any model
whose repeated blocks are a list (``layers`` or ``blocks``).

Follows Shoeybi et al. 2019 ("Megatron-LM", section 3): in each block the first linear of the
attention and of the MLP is split by output columns and the second by input rows, so each of
the two needs one all-reduce in forward (after its row-parallel linear) and one in backward (at
its column-parallel input). PyTorch's ``ColwiseParallel`` / ``RowwiseParallel`` insert exactly
those collectives; the model code is unchanged (STYLE habit 2). Which linear is which is the
model's plan (``models/<name>/parallelize.py``): :func:`megatron_block_plan` builds the usual
one from the four module names.

A column split of a fused qkv projection hands each rank whole heads only if its output is laid
out per head (``[H, 3, D]``); the attention must read its head count from the projection output
so a shard of heads runs unchanged. Norms stay replicated plain parameters: every TP rank sees the
same replicated activations there, so their gradients are already identical across the group.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def megatron_block_plan(attn_in: str, attn_out: str, mlp_in: str, mlp_out: str) -> dict:
    """The plan of one transformer block: attention and MLP input projections column-wise,
    their output projections row-wise (one all-reduce each way per pair)."""
    return {attn_in: ColwiseParallel(), attn_out: RowwiseParallel(),
            mlp_in: ColwiseParallel(), mlp_out: RowwiseParallel()}


def check_divisible(what: str, sizes: dict[str, int], tp: int) -> None:
    """Raise a ValueError naming the field when a size cannot be split over ``tp`` ranks."""
    if tp < 1:
        raise ValueError(f"{what}: tp={tp}; expected >= 1")
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"{what}: {name}={size} is not divisible by tp={tp}; each tensor-"
                             f"parallel rank must hold an equal share")


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """A model's repeated blocks: ``model.layers`` or ``model.blocks`` (a list, or a pipeline
    stage's dict keyed by whole-model index)."""
    for name in ("layers", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleDict):
            return list(blocks.values())
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise TypeError(f"{type(model).__name__} has no repeated blocks: expected a .layers or .blocks "
                    "ModuleList (or a pipeline stage's ModuleDict)")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, block_plan: dict,
                          root_plan: dict | None = None) -> nn.Module:
    """Shard ``model`` (or a pipeline stage of it) in place over the 1-D ``tp_mesh``; returns it.

    ``block_plan``: ``{submodule name in a block: ParallelStyle}`` applied to every block
    (:func:`model_blocks`); ``root_plan``: the same for modules of ``model`` itself (embeddings,
    output head); entries naming modules this stage lacks are skipped. Inputs and outputs of the
    model stay plain replicated tensors, so the caller feeds every TP rank the same batch.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel: tp_mesh has {tp_mesh.ndim} dims "
                         f"{tp_mesh.mesh_dim_names}; expected a 1-D tensor-parallel mesh")
    if tp_mesh.size() == 1:
        return model
    for block in model_blocks(model):
        parallelize_module(block, tp_mesh, block_plan)
    plan = {name: style for name, style in (root_plan or {}).items() if getattr(model, name, None) is not None}
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return model
