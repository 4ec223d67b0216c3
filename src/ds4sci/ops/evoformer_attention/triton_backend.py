"""Triton backend for Evoformer attention: launches the kernels in ``triton_kernels``.

The GPU path of the op (the role DeepSpeed4Science's CUTLASS kernel plays), with no build step,
any head dim up to 128, any L >= 1, fp16/bf16/fp32 and deterministic fp32 bias gradients.
``auto`` chooses it for CUDA tensors (ROCm tensors are ``cuda`` too). CPU tensors run through
Triton's interpreter when the backend is named explicitly and ``TRITON_INTERPRET=1`` is set:
slow, for tests only. The interpreter copy of the kernels is a second, private load of
``triton_kernels.py`` made while ``TRITON_INTERPRET=1``, since ``@triton.jit`` picks
interpreter or compiler when a kernel is defined; so one process can run both, and the
setting never leaks into other code that uses Triton. (As always with Triton, a process that
sets ``TRITON_INTERPRET=1`` before triton is first imported interprets every kernel.)

Legend: ``Bf`` = product of the leading dims ``*``; tensors are viewed as ``[Bf, L, H, D]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

MAX_HEAD_DIM = 128
MAX_BIASES = 2
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

_KERNEL_MODULES: dict[bool, object] = {}


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: CPU tensors may then run (when named explicitly)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def environment_reasons() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton not installed (pip install triton)"]
    if not torch.cuda.is_available() and not interpreter_enabled():
        return ["no CUDA device"]
    return []


def input_reasons(q: torch.Tensor, biases: Sequence[torch.Tensor]) -> list[str]:
    reasons = []
    if q.device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("device type 'cpu' needs TRITON_INTERPRET=1 (Triton's interpreter, for tests)")
    elif q.device.type != "cuda":
        reasons.append(f"device type {q.device.type!r} not in ['cuda', 'cpu' (interpreter)]")
    elif (q.dtype == torch.bfloat16 and torch.version.hip is None
          and torch.cuda.get_device_capability(q.device) < (8, 0)):
        reasons.append("bfloat16 needs an NVIDIA GPU of compute capability >= 8.0")
    if len(biases) > MAX_BIASES:
        reasons.append(f"{len(biases)} biases; the kernels take at most {MAX_BIASES}")
    return reasons


def _kernels(device: torch.device):
    """The kernel module for this device: compiled for GPUs, interpreted for CPU tensors (and
    for every device under ``TRITON_INTERPRET=1``, as Triton does)."""
    interpret = _interpreted(device)
    if interpret not in _KERNEL_MODULES:
        # Triton's own @jit helpers (tl.sum, tl.zeros...) are made when triton is first
        # imported: import it before TRITON_INTERPRET is set below, or they would all become
        # interpreter functions for the rest of the process (breaking every compiled kernel).
        import triton.language  # noqa: F401

        if interpret:
            _fix_interpreter_index()
        name = f"{__package__}.triton_kernels" + ("_interpreted" if interpret else "")
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
        sys.modules[name] = module
        _KERNEL_MODULES[interpret] = module
    return _KERNEL_MODULES[interpret]


def _fix_interpreter_index() -> None:
    """Let a kernel's scalar arguments bound Python loops (``range(0, L_k, BK)``) in the
    interpreter of triton < 3.7 under NumPy >= 2.4.

    Those interpreters hold a scalar argument as a 1-element array and give it
    ``__index__ = int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); triton 3.7 squeezes the array first. This does the same for
    older versions, on the interpreter's own patching hook (called at each launch, so it also
    survives 3.6's restoring of patched attributes). A no-op where the hook does not exist.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "ds4sci_index_fix", False):
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.item())

    patch_lang_tensor.ds4sci_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


# (BQ, BK, warps) per kernel and padded head dim, fp16/bf16: the largest blocks that compile
# for sm_90 without register spills (chosen offline, with no GPU at hand to time them; the test
# suite compiles them, ``benchmarks/gpu_check.sh`` measures them). fp32 (exact fp32 dots, not a
# speed target) uses 32 x 32 blocks everywhere.
_GPU_BLOCKS = {
    16: {"fwd": (64, 32, 4), "dkdv": (32, 64, 4), "dq": (64, 32, 4), "dbias": (64, 32, 4)},
    32: {"fwd": (64, 32, 4), "dkdv": (32, 64, 4), "dq": (64, 32, 4), "dbias": (64, 32, 4)},
    64: {"fwd": (64, 64, 8), "dkdv": (64, 64, 8), "dq": (64, 64, 8), "dbias": (64, 64, 8)},
    128: {"fwd": (64, 32, 4), "dkdv": (32, 32, 4), "dq": (64, 32, 4), "dbias": (64, 32, 4)},
}


def _blocks(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict[str, dict]:
    """Launch settings per kernel: ``BQ``/``BK`` query/key block, ``DP`` padded head dim, warps."""
    dp = max(16, _next_power_of_2(head_dim))
    if _interpreted(device):  # small blocks, so tests cross block edges
        table = dict.fromkeys(("fwd", "dkdv", "dq", "dbias"), (32, 32, 1))
    elif dtype == torch.float32 or (dp >= 64 and _shared_memory(device) < 100 * 1024):
        # (the 64-wide blocks for head dims >= 64 need up to ~90 KiB of shared memory)
        table = dict.fromkeys(("fwd", "dkdv", "dq", "dbias"), (32, 32, 4))
    else:
        table = _GPU_BLOCKS[dp]
    cfgs = {kernel: {"BQ": bq, "BK": bk, "DP": dp, "num_warps": warps}
            for kernel, (bq, bk, warps) in table.items()}
    cfgs["delta"] = {"BQ": cfgs["fwd"]["BQ"], "DP": dp, "num_warps": cfgs["fwd"]["num_warps"]}
    return cfgs


@functools.lru_cache(maxsize=16)
def _shared_memory(device: torch.device) -> int:
    """Shared memory one block may use on this GPU (opt-in maximum), in bytes."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu" or interpreter_enabled()


def _ieee(q: torch.Tensor) -> bool:
    """Dots in fp32: for fp32 inputs, and always in the interpreter (see ``triton_kernels._dot``)."""
    return q.dtype == torch.float32 or _interpreted(q.device)


def _target_programs(device: torch.device) -> int:
    """Programs a bias-gradient launch should have: 4 per SM on a GPU; a few in the
    interpreter, so tests take the split path too."""
    if _interpreted(device):
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _BiasArgs:
    """One bias as the kernels read it: itself (expanded view, 0 strides where it broadcasts),
    a per-batch-row offset table, and the strides of its H, L_q, L_k dims."""

    def __init__(self, bias: torch.Tensor, lead: Sequence[int], heads: int, l_q: int, l_k: int):
        full_rank = len(lead) + 3
        self.full = bias.reshape((1,) * (full_rank - bias.dim()) + tuple(bias.shape))  # a view
        self.tensor = self.full.expand(*lead, heads, l_q, l_k)  # a view: 0 strides, no copy
        strides = self.tensor.stride()
        self.offsets = _row_offsets(tuple(lead), strides[: len(lead)], bias.device)
        self.strides = tuple(strides[len(lead):])
        self.lead = tuple(lead)

    def launch_args(self) -> tuple:
        return (self.tensor, self.offsets)

    def grad_groups(self):
        """``(n_rows, members, group_ptr)``: batch rows grouped by the bias row they read.

        A bias row is one index of the bias's own leading dims (size-1 dims broadcast), so an
        expanded bias that needs a gradient gets it at its full (expanded) size, as autograd does.
        """
        return _row_groups(self.lead, tuple(self.full.shape[: len(self.lead)]), self.offsets.device)


# The index tables are tiny but built on the host: cached per layout, since copying host memory
# to the GPU on every call would wait for the GPU's queue to drain.
@functools.lru_cache(maxsize=256)
def _row_offsets(lead: tuple, lead_strides: tuple, device: torch.device) -> torch.Tensor:
    """Element offset of each flat batch row's bias row, ``[Bf]`` int64."""
    offsets = torch.zeros(1, dtype=torch.int64)
    for n, stride in zip(lead, lead_strides):
        offsets = (offsets[:, None] + torch.arange(n, dtype=torch.int64) * stride).reshape(-1)
    return offsets.to(device)


@functools.lru_cache(maxsize=256)
def _row_groups(lead: tuple, bias_lead: tuple, device: torch.device):
    n_rows = math.prod(bias_lead)
    row_of = torch.arange(n_rows).reshape(bias_lead).expand(lead).reshape(-1)
    members = torch.argsort(row_of, stable=True)
    counts = torch.bincount(row_of, minlength=n_rows)
    group_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return n_rows, members.to(device), group_ptr.to(device)


def _bias_launch_args(bias_args: list[_BiasArgs], dummy: torch.Tensor):
    """Pointer args for the two bias slots, their strides, and the HAS_B0/HAS_B1 flags."""
    pointers, strides, flags = [], [], {}
    zero_offsets = _row_offsets((), (), dummy.device)
    for slot in range(MAX_BIASES):
        if slot < len(bias_args):
            pointers += bias_args[slot].launch_args()
            strides += bias_args[slot].strides
        else:
            pointers += [dummy, zero_offsets]
            strides += [0, 0, 0]
        flags[f"HAS_B{slot}"] = slot < len(bias_args)
        # A bias constant along L_q (a mask) is read as one row of keys per tile.
        flags[f"B{slot}_ROW"] = slot < len(bias_args) and bias_args[slot].strides[1] == 0
    return pointers, strides, flags


def _flatten(q, k, v):
    lead = tuple(q.shape[:-3])
    n_batch = math.prod(lead)
    return lead, n_batch, [t.reshape(n_batch, *t.shape[-3:]) for t in (q, k, v)]


def forward(q, k, v, biases, tile_elements=None):
    """Returns ``(out [*, L_q, H, D], stats [*, H, L_q, 2])``, stats = (row max, log denominator)
    in fp32; a fully ``-inf`` row gets (0, +inf). ``tile_elements`` is unused (fixed blocks)."""
    kernels = _kernels(q.device)
    lead, n_batch, (q3, k3, v3) = _flatten(q, k, v)
    l_q, heads, head_dim = q3.shape[1:]
    l_k = k3.shape[1]
    bias_args = [_BiasArgs(b, lead, heads, l_q, l_k) for b in biases]
    pointers, bias_strides, flags = _bias_launch_args(bias_args, q3)
    out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    stats = torch.empty(n_batch, heads, l_q, 2, dtype=torch.float32, device=q.device)
    cfg = _blocks(q.device, head_dim, q.dtype)["fwd"]
    grid = (n_batch * heads, _cdiv(l_q, cfg["BQ"]))
    with _on(q.device):
        kernels._fwd_kernel[grid](
            q3, k3, v3, out, stats, *pointers,
            *q3.stride(), *k3.stride(), *v3.stride(), *out.stride(), *bias_strides,
            heads, l_q, l_k, head_dim, head_dim**-0.5,
            **flags, IEEE=_ieee(q), **cfg,
        )
    return out.reshape(q.shape), stats.reshape(*lead, heads, l_q, 2)


def backward(grad_out, q, k, v, biases, out, stats, bias_needs_grad, tile_elements=None):
    """Returns ``[dq, dk, dv, *dbias]``; a bias that needs no gradient gets an empty tensor."""
    kernels = _kernels(q.device)
    lead, n_batch, (q3, k3, v3) = _flatten(q, k, v)
    do3 = grad_out.reshape(q3.shape)
    o3 = out.reshape(q3.shape)
    stats3 = stats.reshape(n_batch, *stats.shape[-3:]).contiguous()
    l_q, heads, head_dim = q3.shape[1:]
    l_k = k3.shape[1]
    bias_args = [_BiasArgs(b, lead, heads, l_q, l_k) for b in biases]
    pointers, bias_strides, flags = _bias_launch_args(bias_args, q3)
    cfgs = _blocks(q.device, head_dim, q.dtype)
    flags["IEEE"] = _ieee(q)
    qkv_strides = (*q3.stride(), *k3.stride(), *v3.stride(), *do3.stride())
    dims = (heads, l_q, l_k, head_dim, head_dim**-0.5)
    delta = torch.empty(n_batch, heads, l_q, dtype=torch.float32, device=q.device)
    dq = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k3.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v3.shape, dtype=v.dtype, device=v.device)
    with _on(q.device):
        cfg = cfgs["delta"]
        kernels._delta_kernel[(n_batch * heads, _cdiv(l_q, cfg["BQ"]))](
            o3, do3, delta, *o3.stride(), *do3.stride(), heads, l_q, head_dim, **cfg,
        )
        cfg = cfgs["dkdv"]
        kernels._dkdv_kernel[(n_batch * heads, _cdiv(l_k, cfg["BK"]))](
            q3, k3, v3, do3, stats3, delta, dk, dv, *pointers, *qkv_strides, *dk.stride(),
            *bias_strides, *dims, **flags, **cfg,
        )
        cfg = cfgs["dq"]
        kernels._dq_kernel[(n_batch * heads, _cdiv(l_q, cfg["BQ"]))](
            q3, k3, v3, do3, stats3, delta, dq, *pointers, *qkv_strides, *dq.stride(),
            *bias_strides, *dims, **flags, **cfg,
        )
        cfg = cfgs["dbias"]
        dbiases = []
        for b, ba, needs in zip(biases, bias_args, bias_needs_grad):
            if not needs:
                dbiases.append(b.new_empty(0))
                continue
            n_rows, members, group_ptr = ba.grad_groups()
            h_b, lq_b, lk_b = ba.full.shape[-3:]
            bcast = {"BCAST_H": h_b == 1, "BCAST_Q": lq_b == 1, "BCAST_K": lk_b == 1}
            q_blocks = 1 if bcast["BCAST_Q"] else _cdiv(l_q, cfg["BQ"])
            k_blocks = 1 if bcast["BCAST_K"] else _cdiv(l_k, cfg["BK"])
            # Split each bias row's batch rows when there are too few tiles to fill the device.
            n_splits = max(1, min(n_batch // n_rows,
                                  _cdiv(_target_programs(q.device), n_rows * h_b * q_blocks * k_blocks)))
            grad = torch.empty(n_splits, n_rows, h_b, lq_b, lk_b, dtype=torch.float32, device=q.device)
            grid = (n_splits * n_rows * h_b, q_blocks, k_blocks)
            kernels._dbias_kernel[grid](
                q3, k3, v3, do3, stats3, delta, grad, members, group_ptr, *pointers, *qkv_strides,
                *bias_strides, heads, h_b, n_rows * h_b, n_splits, l_q, l_k, head_dim, head_dim**-0.5,
                **bcast, **flags, **cfg,
            )
            grad = grad[0] if n_splits == 1 else grad.sum(0)
            dbiases.append(grad.reshape(ba.full.shape).reshape(b.shape).to(b.dtype))
    return [dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), *dbiases]


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device); interpreter launches
    leave ``triton.language`` as they found it."""
    if _interpreted(device):
        return _language_restored()
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _language_restored():
    """Undo what an interpreter launch does to ``triton.language``.

    Before triton 3.6 the interpreter rebinds ``tl``'s builtins (``tl.program_id``,
    ``tensor.__floordiv__``...) to its own builder at each launch and never restores them, so
    compiling any kernel later in the same process fails (``'block_argument' object has no
    attribute 'dtype'``); 3.6 restores them itself. Here the namespaces it patches are saved
    before and restored after.
    """
    import triton.language as tl

    spaces = [tl, tl.core, tl.tensor, tl.math]
    spaces += [getattr(tl.core, name) for name in ("_experimental_tensor_descriptor_base", "tensor_descriptor_base")
               if isinstance(getattr(tl.core, name, None), type)]
    saved = [(space, dict(vars(space))) for space in spaces]
    try:
        yield
    finally:
        for space, before in saved:
            now = vars(space)
            for name in [n for n in now if n not in before]:
                delattr(space, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(space, name, value)


_MISSING = object()
