"""ZeRO-3-style sharding of any transformer with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Follows Rajbhandari et al. 2020 ("ZeRO", stage 3): parameters, gradients and optimizer state are
sharded over the data-parallel ranks; each layer's parameters are all-gathered just before the
layer runs and freed after it, gradients are reduce-scattered. With sequence parallelism the mesh
is the flattened dp x sp mesh: SP ranks hold different tokens of the same samples, so for the
weights they are data-parallel ranks too (ZeRO over dp x sp, as DeepSpeed-Ulysses does).

One FSDP unit per transformer block plus the root (embeddings, final norm, output head), so at
most one block's full parameters exist at a time besides the root's. Because training code may
call other methods than ``forward`` (GenSLM's ``hidden_states`` and ``loss_sum`` for the
sequence-parallel loss), a model lists them in ``fsdp_forward_methods`` and they are registered
as FSDP forward methods so the root's parameters are gathered for them too.

CPU offload (ZeRO-Offload / ZeRO-Infinity's host side) is FSDP2's ``CPUOffloadPolicy``: sharded
parameters, gradients and hence the optimizer step live in host memory and are copied to the
accelerator per layer. On a CPU-only mesh there is nothing to offload to (parameters are already
in host memory), but the switch still runs FSDP2's offload code path with unpinned host memory
(pinning needs an accelerator), so the same configuration trains on a laptop and on GPUs, and the
tests exercise that path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from .tensor import model_blocks

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(name: str, dtype) -> None:
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"apply_fsdp: {name}={dtype}; expected None or one of {_FLOAT_DTYPES}")


def _shard_placement(param: nn.Parameter) -> Shard | None:
    """FSDP's split of ``param``: dim 0 (None, the default), except for a tensor-parallel weight
    whose dim 0 already carries a strided split (``tensor.FusedColwiseParallel``): a dim-0 chunk
    of a rank's strided rows is a set of rows no DTensor placement describes, so initial values,
    state dicts and checkpoints would misplace them; such weights are split along dim 1."""
    if isinstance(param, DTensor) and param.ndim > 1 and any(
            isinstance(p, _StridedShard) and p.dim == 0 for p in param.placements):
        return Shard(1)
    return None


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True, ignored_params: set[nn.Parameter] | None = None) -> nn.Module:
    """Shard ``model`` (or a pipeline stage of it) in place over the 1-D data-parallel ``mesh``;
    returns it. Each repeated block (``tensor.model_blocks``: ``.layers`` or ``.blocks``) is one
    FSDP unit, the rest of the model the root unit; methods named in the model's
    ``fsdp_forward_methods`` (besides ``forward``) gather the root's parameters too.

    ``param_dtype``: dtype the gathered parameters compute in (mixed precision; None = their own
    dtype); the sharded master copy and the optimizer state keep the parameters' own dtype (fp32
    for a model built in fp32).
    ``reduce_dtype``: dtype of the gradient reduce-scatter (fp32 by default, so gradients computed
    in bf16 are summed over ranks without further rounding); None = the compute dtype.
    ``cpu_offload``: keep sharded parameters/gradients/optimizer state in host memory (see the
    module docstring for CPU-only meshes).
    ``reshard_after_forward``: free each layer's gathered parameters after its forward (ZeRO-3;
    gathered again in backward) or keep them until backward (ZeRO-2-like: less communication,
    more memory).
    ``ignored_params``: parameters FSDP leaves alone (the model shards and reduces them itself,
    e.g. a sequence-sharded position embedding).

    Gradients are averaged over the mesh (FSDP's default), so each rank's loss should be its share
    of the global mean: ``local_loss_sum * mesh.size() / global_token_count``.

    Tensor parallelism, if any, must be applied first (its DTensor parameters are then sharded
    over this mesh as well: FSDP x TP, "2D").
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp: mesh has {mesh.ndim} dims {mesh.mesh_dim_names}; expected "
                         f"a 1-D data-parallel mesh (flatten dp x sp first, e.g. "
                         f"mesh['dp', 'sp']._flatten())")
    _check_dtype("param_dtype", param_dtype)
    _check_dtype("reduce_dtype", reduce_dtype)
    try:
        blocks = model_blocks(model)
    except TypeError as err:
        raise TypeError(f"apply_fsdp: {err}") from None
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    else:
        offload_policy = OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy, shard_placement_fn=_shard_placement)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root (embeddings, final norm, output head) stays gathered from forward to backward: the
    # output head is needed again first thing in backward, and sequence-parallel training may call
    # the root twice (hidden states, then the loss) per step (FSDP2's own default for a root).
    fully_shard(model, reshard_after_forward=False, ignored_params=ignored_params, **kwargs)
    for method in getattr(model, "fsdp_forward_methods", ()):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model
