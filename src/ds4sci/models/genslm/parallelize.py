"""How GenSLM is spread over a ``ParallelDims`` layout (the model itself stays plain PyTorch).

Order, as in torchtitan: sequence parallelism (it only swaps each layer's attention core, so it
is independent of the rest), tensor parallelism (its DTensor parameters are then sharded by FSDP
on the other axis: "2D"), then FSDP over the flattened dp x sp mesh (ranks of one sequence hold
the same weights, so for ZeRO they are data-parallel ranks too). Pipeline parallelism cuts the
model into stages and applies TP and FSDP to each stage (``pipeline_genslm``).

Combinations that do not work are refused before anything is built, with the reason
(:func:`check_layout`).
"""

from __future__ import annotations

import torch

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ...parallel.dims import ParallelDims, ParallelMesh
from ...parallel.fsdp import apply_fsdp
from ...parallel.pipeline import build_pipeline
from ...parallel.sequence import apply_sequence_parallel_mesh, shard_sequence
from ...parallel.tensor import apply_tensor_parallel, check_divisible, megatron_block_plan
from .config import GenSLMConfig
from .model import IGNORE_INDEX


def check_tensor_parallel(config: GenSLMConfig, tp: int) -> None:
    """Raise a ValueError naming the field when ``config`` cannot be split over ``tp`` ranks:
    each rank holds whole heads and an equal share of the MLP columns."""
    check_divisible("apply_tensor_parallel", {"num_attention_heads": config.num_attention_heads,
                                              "intermediate_size": config.intermediate_size}, tp)


def tensor_parallel_genslm(model, tp_mesh: DeviceMesh, *, embeddings: bool = True):
    """Megatron tensor parallelism of a ``GenSLM`` (or a pipeline ``GenSLMStage``) over the 1-D
    ``tp_mesh``, in place; returns it.

    Per layer: ``query_key_value`` and ``dense_h_to_4h`` column-wise, ``dense`` and
    ``dense_4h_to_h`` row-wise. GPT-NeoX's fused ``query_key_value`` output is laid out per head
    as ``[q | k | v]``, so a column split hands each rank ``H / tp`` whole heads. ``embeddings``:
    also split ``embed_in`` (row-wise, by vocabulary: each rank looks up its slice and the partial
    embeddings are summed) and ``embed_out`` (column-wise, logits gathered, so the chunked
    cross-entropy runs unchanged). Uneven vocabularies (69 codons on 2 ranks) are fine: DTensor
    shards unevenly.
    """
    if tp_mesh.ndim == 1:
        check_tensor_parallel(model.config, tp_mesh.size())
    block_plan = megatron_block_plan("attention.query_key_value", "attention.dense",
                                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    root_plan = ({"embed_in": RowwiseParallel(input_layouts=Replicate()),
                  "embed_out": ColwiseParallel(output_layouts=Replicate())} if embeddings else None)
    return apply_tensor_parallel(model, tp_mesh, block_plan, root_plan)


def shard_batch(input_ids_BS: torch.Tensor, labels_BS: torch.Tensor, sp_rank: int, sp_size: int,
                layout: str = "contiguous", ulysses_size: int = 1, pad_id: int = 0):
    """This rank's part of a language-model batch: ``(ids [B, S_local], targets [B, S_local],
    positions [S_local])``.

    ``labels`` are the usual causal-LM labels (``-100`` = ignore), aligned with ``input_ids``;
    they are shifted to next-token ``targets`` on the whole sequence *before* it is split, so the
    target of a shard's last token (the first token of the next shard) is not lost; padding gets
    ``pad_id`` and target ``-100`` (causal attention never lets a real token see it). For
    ``GenSLM.loss_sum`` and ``GenSLM.hidden_states(positions=...)``; see
    ``parallel.sequence.shard_positions`` for the layouts.
    """
    if input_ids_BS.dim() != 2 or labels_BS.shape != input_ids_BS.shape:
        raise ValueError(f"shard_batch: input_ids has shape {tuple(input_ids_BS.shape)} and labels "
                         f"{tuple(labels_BS.shape)}; expected the same [B, S]")
    b = input_ids_BS.shape[0]
    targets = torch.cat([labels_BS[:, 1:], labels_BS.new_full((b, 1), IGNORE_INDEX)], dim=1)
    ids, positions, _ = shard_sequence(input_ids_BS, sp_rank, sp_size, layout, ulysses_size, pad_value=pad_id)
    targets, _, _ = shard_sequence(targets, sp_rank, sp_size, layout, ulysses_size, pad_value=IGNORE_INDEX)
    return ids, targets, positions


def default_sp_ulysses(sp: int, heads_per_tp_rank: int) -> int:
    """Ulysses degree for hybrid mode when none is given: the largest proper divisor of ``sp``
    that divides the heads (so the all-to-all splits heads evenly); the rest is the ring."""
    return max(u for u in range(1, sp) if sp % u == 0 and heads_per_tp_rank % u == 0) if sp > 1 else 1


def make_dims(parallel, world_size: int, config: GenSLMConfig) -> ParallelDims:
    """``ParallelDims`` from a ``ParallelConfig`` (``train.config``) and the world size."""
    sp_ulysses = parallel.sp_ulysses
    if parallel.sp_mode == "hybrid" and sp_ulysses is None:
        sp_ulysses = default_sp_ulysses(parallel.sp, config.num_attention_heads // max(parallel.tp, 1))
    return ParallelDims(dp=parallel.dp, sp=parallel.sp, tp=parallel.tp, pp=parallel.pp,
                        world_size=world_size, sp_mode=parallel.sp_mode,
                        sp_ulysses=sp_ulysses if parallel.sp_mode == "hybrid" else None)


def check_layout(dims: ParallelDims, config: GenSLMConfig) -> None:
    """Raise ValueError, with the reason, for a layout this model cannot run under."""
    if dims.tp_enabled:
        check_tensor_parallel(config, dims.tp)
    if dims.pp_enabled:
        if dims.sp_enabled:
            raise ValueError(
                f"parallel layout {dims.describe()}: pipeline x sequence parallelism is not supported: "
                "pipeline stages pass whole-sequence activations and compute positions 0..S-1, so a "
                "sequence shard would get wrong rotary positions; use sp or pp, not both")
        if config.num_hidden_layers < dims.pp:
            raise ValueError(f"parallel layout {dims.describe()}: num_hidden_layers="
                             f"{config.num_hidden_layers} is less than pp={dims.pp}; each stage "
                             "needs at least one layer")


def parallelize_genslm(model, dims: ParallelDims, mesh: ParallelMesh, *, ring_layout: str = "zigzag",
                       cpu_offload: bool = False, reshard_after_forward: bool = True,
                       tp_embeddings: bool = True, param_dtype: torch.dtype | None = None):
    """Apply SP, TP and FSDP to ``model`` (a ``GenSLM``, identically initialised on every rank)
    in place; returns it. Pipeline layouts go through :func:`pipeline_genslm`.

    Afterwards feed each rank :func:`shard_batch` of its data-parallel share
    with ``parallel.sequence.sequence_layout(dims, ring_layout)``, call ``model.hidden_states(ids,
    positions=...)`` and ``model.loss_sum``, and scale the local loss sum by
    ``dims.dp_sp / global_token_count`` (FSDP averages gradients over dp x sp).
    """
    check_layout(dims, model.config)
    if dims.pp_enabled:
        raise ValueError(f"parallelize_genslm: layout {dims.describe()} has pp={dims.pp}; use "
                         "pipeline_genslm for pipeline layouts")
    # SP only swaps attention cores; it must be set before FSDP wraps the layers.
    if dims.sp_enabled:
        apply_sequence_parallel_mesh(model, dims, mesh, ring_layout,
                                     head_chunk=model.config.attention_head_chunk)
    return _tp_then_fsdp(model, dims, mesh, cpu_offload=cpu_offload, tp_embeddings=tp_embeddings,
                         reshard_after_forward=reshard_after_forward, param_dtype=param_dtype)


def _tp_then_fsdp(module, dims: ParallelDims, mesh: ParallelMesh, *, cpu_offload: bool,
                  reshard_after_forward: bool, tp_embeddings: bool, param_dtype):
    if dims.tp_enabled:
        tensor_parallel_genslm(module, mesh.tp, embeddings=tp_embeddings)
    if dims.dp_sp > 1:
        apply_fsdp(module, mesh.dp_sp, param_dtype=param_dtype, cpu_offload=cpu_offload,
                   reshard_after_forward=reshard_after_forward)
    return module


def pipeline_genslm(model, dims: ParallelDims, mesh: ParallelMesh, *, batch_size: int, seq_len: int,
                    n_microbatches: int, schedule: str = "1f1b", device=None, cpu_offload: bool = False,
                    reshard_after_forward: bool = True, tp_embeddings: bool = True,
                    param_dtype: torch.dtype | None = None):
    """This rank's pipeline stage of ``model`` (TP, then FSDP over dp applied to the stage) and its
    schedule, a ``parallel.pipeline.Pipeline``. ``batch_size``: records per step on this rank."""
    check_layout(dims, model.config)
    def parallelize_stage(stage):
        return _tp_then_fsdp(stage, dims, mesh, cpu_offload=cpu_offload, tp_embeddings=tp_embeddings,
                             reshard_after_forward=reshard_after_forward, param_dtype=param_dtype)

    return build_pipeline(model, mesh.pp, batch_size=batch_size, seq_len=seq_len,
                          n_microbatches=n_microbatches, schedule=schedule, device=device,
                          parallelize_stage=parallelize_stage)
