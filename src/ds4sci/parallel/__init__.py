"""Distributed training on ``torch.distributed``: the parallel layout (``ParallelDims``), sequence
parallelism (Ulysses, ring, hybrid), FSDP2 sharding, tensor and pipeline parallelism.

Only the layout is imported eagerly; the rest load on first use, so ``import ds4sci`` stays
cheap and one missing piece does not break the others.
"""

from __future__ import annotations

import importlib

from .dims import SP_MODES, ParallelDims, ParallelMesh

# public name -> submodule that defines it
_LAZY = {
    "ulysses_attention": "ulysses",
    "ring_attention": "ring",
    "hybrid_attention": "ring",
    "shard_batch": "sequence",
    "apply_sequence_parallel": "sequence",
    "global_mean_loss": "sequence",
    "comm_bytes_per_layer": "sequence",
    "apply_fsdp": "fsdp",
    "apply_tensor_parallel": "tensor",
    "build_pipeline": "pipeline",
}

__all__ = ["SP_MODES", "ParallelDims", "ParallelMesh", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
