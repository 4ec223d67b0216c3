"""Distributed training on ``torch.distributed``, for any model: the parallel layout
(``ParallelDims``), sequence parallelism (Ulysses, ring, hybrid; causal or bidirectional), FSDP2
sharding, tensor and pipeline parallelism, and meta-device initialisation. Nothing here imports a
model: models take part through small protocols (see each module) and keep their plans in
``models/<name>/parallelize.py``.

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
    "shard_sequence": "sequence",
    "gather_sequence": "sequence",
    "set_valid_length": "sequence",
    "apply_sequence_parallel": "sequence",
    "global_mean_loss": "sequence",
    "comm_bytes_per_layer": "sequence",
    "apply_fsdp": "fsdp",
    "apply_tensor_parallel": "tensor",
    "build_pipeline": "pipeline",
    "init_parameters": "init",
    "load_parameters": "init",
}

__all__ = ["SP_MODES", "ParallelDims", "ParallelMesh", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
