"""Megatron-style tensor parallelism for GenSLM through DTensor's ``parallelize_module``.

Follows Shoeybi et al. 2019 ("Megatron-LM", section 3): in each layer the first linear of the
attention and of the MLP is split by output columns and the second by input rows, so each of
the two blocks needs one all-reduce in forward (after its row-parallel linear) and one in
backward (at its column-parallel input). PyTorch's ``ColwiseParallel`` / ``RowwiseParallel`` insert exactly those
collectives; the model code is unchanged (STYLE habit 2).

GPT-NeoX's fused ``query_key_value`` output is laid out per head as ``[q | k | v]`` (``[H, 3, D]``
flattened), so a column split into ``tp`` equal contiguous pieces hands each rank
``H / tp`` whole heads with their own q, k and v: ``Attention`` reads its head count from the
projection output and runs on its subset unchanged. ``dense`` (row-parallel) then sums the heads'
contributions across ranks.

Optionally the embeddings are split over the vocabulary too: ``embed_in`` row-wise (each rank
looks up its vocabulary slice, the partial embeddings are summed), ``embed_out`` column-wise
with the logits gathered (replicated), so the chunked cross-entropy runs unchanged. Uneven
vocabularies (69 codons on 2 ranks) are fine: DTensor shards unevenly.

LayerNorms stay replicated plain parameters: every TP rank sees the same replicated activations
there, so their gradients are already identical across the TP group.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def check_tensor_parallel(config, tp: int) -> None:
    """Raise a ValueError naming the field when ``config`` cannot be split over ``tp`` ranks."""
    if tp < 1:
        raise ValueError(f"apply_tensor_parallel: tp={tp}; expected >= 1")
    if config.num_attention_heads % tp:
        raise ValueError(
            f"apply_tensor_parallel: num_attention_heads={config.num_attention_heads} is not "
            f"divisible by tp={tp}; each tensor-parallel rank must hold whole heads"
        )
    if config.intermediate_size % tp:
        raise ValueError(
            f"apply_tensor_parallel: intermediate_size={config.intermediate_size} is not "
            f"divisible by tp={tp}; the MLP is split by columns of equal width"
        )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *,
                          embeddings: bool = True) -> nn.Module:
    """Shard ``model`` (a ``GenSLM`` or a pipeline ``GenSLMStage``) in place over the 1-D
    ``tp_mesh``; returns it.

    Per layer: ``query_key_value`` and ``dense_h_to_4h`` column-wise, ``dense`` and
    ``dense_4h_to_h`` row-wise. ``embeddings``: also split ``embed_in`` (row-wise, by vocabulary)
    and ``embed_out`` (column-wise, logits gathered). Inputs and outputs of the model stay plain
    replicated tensors, so the caller feeds every TP rank the same batch.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel: tp_mesh has {tp_mesh.ndim} dims "
                         f"{tp_mesh.mesh_dim_names}; expected a 1-D tensor-parallel mesh")
    check_tensor_parallel(model.config, tp_mesh.size())
    if tp_mesh.size() == 1:
        return model
    layer_plan = {
        "attention.query_key_value": ColwiseParallel(),
        "attention.dense": RowwiseParallel(),
        "mlp.dense_h_to_4h": ColwiseParallel(),
        "mlp.dense_4h_to_h": RowwiseParallel(),
    }
    # A pipeline stage keys its layers by whole-model index (a ModuleDict); GenSLM has a list.
    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan)
    if embeddings:
        # A pipeline stage holds at most one of them.
        plan = {"embed_in": RowwiseParallel(input_layouts=Replicate()),
                "embed_out": ColwiseParallel(output_layouts=Replicate())}
        plan = {name: style for name, style in plan.items() if hasattr(model, name)}
        if plan:
            parallelize_module(model, tp_mesh, plan)
    return model
