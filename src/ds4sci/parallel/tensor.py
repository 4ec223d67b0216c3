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
out per head (``[H, 3, D]``); one laid out ``[3, H, D]`` (timm's, ClimaX's) is split by
:class:`FusedColwiseParallel` instead, whose strided shards :func:`checkpoint_layout` converts for
checkpoints. The attention must read its head count from the projection output so a shard of
heads runs unchanged. Norms stay replicated plain parameters: every TP rank sees the
same replicated activations there, so their gradients are already identical across the group.
"""

from __future__ import annotations

import math

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard


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


class FusedColwiseParallel(ColwiseParallel):
    """Column parallelism of a linear whose output stacks ``n_fused`` projections, each laid out
    per head: ``[n_fused, h, d]`` (timm's and ClimaX's fused qkv, ``n_fused = 3``).

    A plain column split would hand rank 0 the q of every head and half the k. Here each of the
    ``n_fused`` blocks of rows is split over the ranks and a rank keeps its part of every block:
    the q, k and v rows of its ``h / tp`` heads, so its output is ``[n_fused, h/tp, d]`` and the
    attention runs unchanged on its heads. The parameters stay DTensors of the unchanged global
    shape and order (placement ``_StridedShard(0, split_factor=n_fused)``, DTensor's strided
    split), so names, initial values (``parallel.init``), whole-tensor state dicts and loading
    are those of the plain model. ``torch.distributed.checkpoint`` cannot write such a shard (its
    rows are ``n_fused`` separate blocks): :func:`checkpoint_layout` converts it for checkpoints.
    """

    def __init__(self, n_fused: int, **kwargs):
        super().__init__(**kwargs)
        if n_fused < 1:
            raise ValueError(f"FusedColwiseParallel: n_fused={n_fused}; expected >= 1")
        self.n_fused = n_fused

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in module.named_parameters():
            # The bias ([n_fused * h * d], a few numbers) stays whole on every rank: FSDP would
            # chunk a strided 1-D shard into pieces no placement describes (see parallel.fsdp).
            placement = _StridedShard(0, split_factor=self.n_fused) if param.ndim == 2 else Replicate()
            dist_param = nn.Parameter(distribute_tensor(param, device_mesh, [placement],
                                                        src_data_rank=self.src_data_rank),
                                      requires_grad=param.requires_grad)
            module.register_parameter(pname, dist_param)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        # The output's last dim carries the weight's strided split: each rank's n_fused blocks
        # of h/tp heads, which is the local layout the attention wants; no redistribution.
        placement = outputs.placements[0]
        if not (isinstance(placement, _StridedShard) and placement.dim == outputs.ndim - 1):
            raise RuntimeError(f"FusedColwiseParallel: output placement {outputs.placements}; expected "
                               f"a strided shard of the last dim")
        return outputs.to_local() if use_local_output else outputs


# ----- checkpoints of strided shards -----


def _writable_placements(t: DTensor) -> tuple | None:
    """Placements ``torch.distributed.checkpoint`` can write for ``t`` (each rank's shard one
    box of the global tensor), or None when ``t``'s own are. A ``_StridedShard`` is one box only
    when the mesh dims after it split the same tensor dim into exactly ``split_factor`` parts
    (FSDP x TP's own use); :class:`FusedColwiseParallel`'s is not (a rank holds ``n_fused``
    separate blocks of rows), and becomes a plain split of another dim (the whole tensor for a
    1-D one)."""
    placements, mesh, changed = list(t.placements), t.device_mesh, False
    for i, p in enumerate(placements):
        if not isinstance(p, _StridedShard):
            continue
        later = math.prod(mesh.size(j) for j in range(i + 1, mesh.ndim)
                          if isinstance(placements[j], (Shard, _StridedShard)) and placements[j].dim == p.dim)
        if later != p.split_factor:
            others = [d for d in range(t.ndim) if d != p.dim]
            placements[i] = Shard(others[-1]) if others else Replicate()
            changed = True
    return tuple(placements) if changed else None


def _map_tensors(state, fn):
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [_map_tensors(v, fn) for v in state]
    return fn(state)


def checkpoint_layout(state):
    """``state`` (nested dicts/lists of model and optimizer state, as ``get_state_dict`` gives)
    with every DTensor that ``torch.distributed.checkpoint`` cannot write redistributed to one it
    can; the same global values, so the checkpoint holds the plain model's tensors. Others are
    kept as they are (the same objects)."""
    def convert(t):
        placements = _writable_placements(t) if isinstance(t, DTensor) else None
        return t if placements is None else t.redistribute(t.device_mesh, placements)

    return _map_tensors(state, convert)


def restore_layout(loaded, live):
    """``loaded`` (a :func:`checkpoint_layout` of ``live``, filled from a checkpoint) with every
    DTensor back in the placements of its counterpart in ``live``; everything else as loaded
    (a checkpoint's plain entries, e.g. optimizer groups, may differ from ``live``'s)."""
    if isinstance(loaded, dict) and isinstance(live, dict):
        return {k: restore_layout(v, live[k]) if k in live else v for k, v in loaded.items()}
    if isinstance(loaded, list) and isinstance(live, list) and len(loaded) == len(live):
        return [restore_layout(v, w) for v, w in zip(loaded, live)]
    if isinstance(loaded, DTensor) and isinstance(live, DTensor) and loaded.placements != live.placements:
        return loaded.redistribute(live.device_mesh, live.placements)
    return loaded
