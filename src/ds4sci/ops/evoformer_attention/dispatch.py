"""Backend registry and selection for Evoformer attention.

Each backend declares what it supports and answers *why* it cannot run a given call
(the xformers pattern). ``backend="auto"`` takes the highest-priority backend with no
reasons; an explicitly named backend that cannot run raises with its reasons. The choice is
logged at debug level and reported by ``ds4sci info``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""Input dtypes the op accepts at all."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for inputs of ``dtype``: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Backend:
    name: str
    """Name used in ``backend=...``."""
    priority: int
    """Higher wins under ``auto``; negative means never chosen by ``auto``."""
    dtypes: frozenset[torch.dtype]
    """Input dtypes it accepts."""
    forward: Callable
    """``(q, k, v, biases, tile_elements) -> (out, stats)``; ``stats`` is ``[*, H, L_q, 2]`` in
    ``compute_dtype(q.dtype)``, saved for this backend's own backward (the torch backend keeps
    each row's logits max and log softmax denominator there; the reference keeps nothing)."""
    backward: Callable
    """``(grad_out, q, k, v, biases, out, stats, bias_needs_grad, tile_elements) -> [dq, dk, dv, *dbias]``."""
    device_types: frozenset[str] | None = None
    """Device types it runs on; None means any torch device."""
    max_head_dim: int | None = None
    """Largest head dim D it accepts; None means unbounded."""
    environment_reasons: Callable[[], list[str]] = field(default=lambda: [])
    """Reasons it cannot run on this machine at all (missing package, no GPU...)."""
    description: str = ""
    """One line for ``ds4sci info``."""
    input_reasons: Callable[[torch.Tensor, Sequence[torch.Tensor]], list[str]] = field(
        default=lambda q, biases: [])
    """Further reasons it cannot run these inputs ``(q, biases)`` (device conditions, bias kinds...)."""
    auto_device_types: frozenset[str] | None = None
    """Device types ``auto`` may choose it for; None means wherever it runs. Elsewhere it runs
    only when named (e.g. a GPU kernel run through an interpreter on CPU, for tests)."""

    def not_supported_reasons(self, q: torch.Tensor, biases: Sequence[torch.Tensor]) -> list[str]:
        reasons = list(self.environment_reasons())
        if self.device_types is not None and q.device.type not in self.device_types:
            reasons.append(f"device type {q.device.type!r} not in {sorted(self.device_types)}")
        if q.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {q.dtype} not in {names}")
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            reasons.append(f"head dim D={q.shape[-1]} > {self.max_head_dim}")
        return reasons + list(self.input_reasons(q, biases))


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> list[Backend]:
    """All registered backends, best first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def get(name: str) -> Backend:
    if name not in _BACKENDS:
        # "naive" (stock OpenFold attention) is a choice of the Evoformer modules, not of this op.
        hint = ("; 'naive' is an Evoformer module option (set_attention_backend), not an op backend"
                if name == "naive" else "")
        raise ValueError(
            f"evoformer_attention: backend={name!r} is unknown; expected 'auto' or one of "
            f"{sorted(_BACKENDS)}{hint}"
        )
    return _BACKENDS[name]


def select(name: str, q: torch.Tensor, biases: Sequence[torch.Tensor]) -> Backend:
    """Resolve ``name`` (or ``"auto"``) to a backend that can run these inputs, or raise."""
    if name != "auto":
        backend = get(name)
        reasons = backend.not_supported_reasons(q, biases)
        if reasons:
            raise RuntimeError(
                f"evoformer_attention: backend={name!r} cannot run this call: " + "; ".join(reasons)
            )
        return backend
    rejected = []
    for backend in backends():
        if backend.priority < 0:
            continue
        reasons = backend.not_supported_reasons(q, biases)
        if backend.auto_device_types is not None and q.device.type not in backend.auto_device_types:
            reasons.append(f"auto does not choose it on device type {q.device.type!r} (name it explicitly)")
        if not reasons:
            if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
                log.debug("evoformer_attention: auto chose backend %r", backend.name)
            return backend
        rejected.append(f"{backend.name}: " + "; ".join(reasons))
    raise RuntimeError("evoformer_attention: no backend can run this call: " + " | ".join(rejected))
