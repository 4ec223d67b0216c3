"""Meta-device initialisation and lean loading for any model, plain or sharded.

A model built on the meta device has no storage; once sharded (FSDP2, tensor parallel: DTensor
parameters) and made real with ``to_empty``, each rank fills only its shards here. Every weight's
initial value is a function of ``(seed, its name)`` (:func:`seeded_generator`), drawn whole on
CPU by each rank that holds a shard of it, so the weights equal one process's exactly and no rank
ever holds more than its shards plus one whole weight. Loading works the same way, one whole
tensor at a time (:func:`load_parameters`, fed by lazy readers such as
``data.weights.LazyTensors``).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

InitialValue = Callable[[str, nn.Module, torch.Size, torch.Generator], "torch.Tensor | float"]
"""``(parameter name, the module that owns it, its shape, a generator seeded by (seed, name))``
-> the whole initial value (a CPU tensor), or a float to fill with."""

# Every rank holds the same whole weight, so each may slice its shard itself (torch >= 2.7);
# older torch scatters rank 0's copy instead: the same values, one collective per weight.
_SLICE_LOCALLY = ({"src_data_rank": None}
                  if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {})


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends on ``seed`` and ``name`` only."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, initial_value: InitialValue) -> None:
    """Set every parameter of ``module`` (a whole model or a pipeline stage keeping the whole
    model's names; plain or DTensor parameters; any device) to ``initial_value(name, ...)``."""
    for module_name, sub in module.named_modules():
        for param_name, p in sub.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            value = initial_value(name, sub, p.shape, seeded_generator(seed, name))
            if isinstance(value, (int, float)):
                (p.to_local() if isinstance(p, DTensor) else p).fill_(value)
            else:
                set_whole(p, value)


@torch.no_grad()
def load_parameters(module: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Set every parameter of ``module`` (as for :func:`init_parameters`) to ``weights[its
    name]``, a whole tensor of any float dtype.

    ``weights`` may read each tensor from storage when asked (``data.weights.LazyTensors``): they
    are asked for one at a time, so a rank holds its shards plus one whole weight. Entries for
    parameters ``module`` does not hold (other pipeline stages') are not read.
    """
    missing = [name for name, _ in module.named_parameters() if name not in weights]
    if missing:
        raise KeyError(f"load_parameters: the weights lack {len(missing)} of the module's parameters, "
                       f"e.g. {missing[:4]}; they have e.g. {list(weights)[:4]}")
    for name, p in module.named_parameters():
        whole = weights[name]
        if tuple(whole.shape) != tuple(p.shape):
            raise ValueError(f"load_parameters: weights[{name!r}] has shape {tuple(whole.shape)}; "
                             f"expected the parameter's {tuple(p.shape)}")
        set_whole(p, whole)


def distribute_locally(whole: torch.Tensor, mesh, placements) -> DTensor:
    """``distribute_tensor`` without communication: every rank holds ``whole`` (or it is on the
    meta device) and keeps its own part."""
    return distribute_tensor(whole, mesh, placements, **_SLICE_LOCALLY)


def set_whole(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Write this rank's part of the whole value ``whole`` into ``p`` (plain or DTensor)."""
    whole = whole.to(p.dtype)
    if isinstance(p, DTensor):  # this rank's shard only
        p.to_local().copy_(distribute_locally(whole, p.device_mesh, p.placements).to_local())
    else:
        p.copy_(whole)
