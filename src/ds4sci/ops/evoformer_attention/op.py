"""Public Evoformer attention: input checks, custom ops, autograd and the DeepSpeed drop-in.

Layers (flash-attention style): backend functions (``torch_tiled``, ``triton``...) →
``torch.library`` custom ops with fake implementations, so ``torch.compile`` treats the op as
one opaque node → an ``autograd.Function`` that saves the softmax statistics → ``evoformer_attention``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from . import dispatch
from .torch_tiled import DEFAULT_TILE_ELEMENTS


@torch.library.custom_op("ds4sci::evoformer_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: list[torch.Tensor],
    backend: str,
    tile_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        out, stats = dispatch.get(backend).forward(q, k, v, biases, tile_elements)
    return out.contiguous(), stats.contiguous()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, biases, backend, tile_elements):
    stats_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3], 2)
    stats = q.new_empty(stats_shape, dtype=dispatch.compute_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats


@torch.library.custom_op("ds4sci::evoformer_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: list[torch.Tensor],
    out: torch.Tensor,
    stats: torch.Tensor,
    bias_needs_grad: list[bool],
    backend: str,
    tile_elements: int,
) -> list[torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        grads = dispatch.get(backend).backward(
            grad_out, q, k, v, biases, out, stats, bias_needs_grad, tile_elements
        )
    return [g.contiguous() for g in grads]


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, biases, out, stats, bias_needs_grad, backend, tile_elements):
    grads = [q.new_empty(t.shape) for t in (q, k, v)]
    grads += [b.new_empty(b.shape if needs else (0,)) for b, needs in zip(biases, bias_needs_grad)]
    return grads


class EvoformerAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend, tile_elements, *biases):
        out, stats = _fwd_op(q, k, v, list(biases), backend, tile_elements)
        ctx.save_for_backward(q, k, v, out, stats, *biases)
        ctx.backend, ctx.tile_elements = backend, tile_elements
        ctx.bias_needs_grad = [ctx.needs_input_grad[5 + i] for i in range(len(biases))]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, stats, *biases = ctx.saved_tensors
        grads = _bwd_op(
            grad_out.contiguous(), q, k, v, biases, out, stats,
            ctx.bias_needs_grad, ctx.backend, ctx.tile_elements,
        )
        dq, dk, dv, *dbiases = grads
        dbiases = [g if needs else None for g, needs in zip(dbiases, ctx.bias_needs_grad)]
        return dq, dk, dv, None, None, *dbiases


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_inputs(q, k, v, biases) -> None:
    """Raise a ValueError/TypeError naming the argument, what was seen and what was expected."""
    name = "evoformer_attention"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dispatch.FLOAT_DTYPES:
            raise TypeError(
                f"{name}: {arg} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
            )
        if arg == "q" and t.device.type == "meta":  # k, v, biases: "on meta but q is on cpu" below
            raise ValueError(f"{name}: {arg} is a meta tensor (shape only, no data); expected a tensor "
                             f"on a real device (cpu, cuda)")
        if t.dim() < 3:
            raise ValueError(
                f"{name}: {arg} has shape {_shape(t)}; expected rank >= 3, layout [*, L, H, D]"
            )
        if t.numel() == 0:
            raise ValueError(f"{name}: {arg} has shape {_shape(t)} with no elements; expected non-empty")
    for arg, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but q is on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k has shape {_shape(k)} and v has {_shape(v)}; they must be equal")
    *lead, l_q, heads, head_dim = q.shape
    if k.dim() != q.dim() or tuple(k.shape[:-3]) != tuple(lead):
        raise ValueError(
            f"{name}: k has shape {_shape(k)}; its leading dims must equal q's {tuple(lead)} "
            f"(layout [*, L_k, H, D])"
        )
    if k.shape[-2] != heads or k.shape[-1] != head_dim:
        raise ValueError(
            f"{name}: k has shape {_shape(k)}; expected H={heads} and D={head_dim} like q {_shape(q)}"
        )
    l_k = k.shape[-3]
    target = (*lead, heads, l_q, l_k)
    for i, b in enumerate(biases):
        arg = f"biases[{i}]"
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor or None, got {type(b).__name__}")
        if b.dtype not in (q.dtype, torch.float32):
            raise TypeError(
                f"{name}: {arg} has dtype {b.dtype}; expected q's dtype {q.dtype} or float32"
            )
        if b.device != q.device:
            raise ValueError(f"{name}: {arg} is on {b.device} but q is on {q.device}; they must match")
        if b.numel() == 0:
            raise ValueError(f"{name}: {arg} has shape {_shape(b)} with no elements")
        fits = b.dim() <= len(target) and all(
            s == 1 or s == t for s, t in zip(reversed(b.shape), reversed(target))
        )
        if not fits:
            raise ValueError(
                f"{name}: {arg} has shape {_shape(b)}; it must broadcast to "
                f"[*, H={heads}, L_q={l_q}, L_k={l_k}] = {target}"
            )


def evoformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: Sequence[torch.Tensor | None] = (),
    *,
    backend: str = "auto",
    tile_elements: int | None = None,
) -> torch.Tensor:
    """Exact attention with Evoformer's additive biases, without materialising the logits.

    Computes ``softmax(q k^T / sqrt(D) + sum(biases)) v`` per head.

    Args:
        q: ``[*, L_q, H, D]`` queries (e.g. ``[B, N, L, H, D]``, the DeepSpeed/OpenFold layout).
        k, v: ``[*, L_k, H, D]`` keys and values, same leading dims as ``q``.
        biases: tensors each broadcastable to ``[*, H, L_q, L_k]``, e.g. the mask bias
            ``[B, N, 1, 1, L_k]`` and the pair bias ``[B, 1, H, L_q, L_k]``. ``None`` entries are
            skipped. dtype: ``q``'s or float32. Each one that requires grad gets its gradient,
            summed over its broadcast dims.
        backend: ``"auto"`` or a name from ``ds4sci info`` (``"torch"``, ``"reference"``...).
        tile_elements: upper bound on the elements of one logits tile (default 2**20); a tile
            always holds at least one query row for all heads, ``H * L_k`` elements.

    Returns:
        ``[*, L_q, H, D]`` in ``q``'s dtype.

    Masking: a large finite negative bias (OpenFold's -1e9) behaves as in plain softmax, so a
    fully masked row averages ``v`` uniformly. A row whose logits are all ``-inf`` returns 0
    and passes zero gradients (never NaN). Softmax statistics and tile arithmetic are fp32.
    Under autocast, ``q``, ``k``, ``v`` are cast to the autocast dtype (like SDPA).
    """
    if biases is None:  # DeepSpeed-style callers pass None for "no biases"
        biases = ()
    if isinstance(biases, torch.Tensor) or not isinstance(biases, Sequence):
        raise TypeError(f"evoformer_attention: biases is a {type(biases).__name__}; expected a list or "
                        f"tuple of tensors (or None entries), e.g. [mask_bias, pair_bias]")
    biases = [b for b in biases if b is not None]
    if (all(isinstance(t, torch.Tensor) for t in (q, k, v)) and q.device.type != "meta"
            and torch.is_autocast_enabled(q.device.type)):
        # Like SDPA under autocast: fp16/bf16/fp32 inputs run in the autocast dtype (not fp64).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
                   for t in (q, k, v))
        biases = [b.to(dtype) if isinstance(b, torch.Tensor) and b.dtype in (torch.float16, torch.bfloat16)
                  else b for b in biases]
    _check_inputs(q, k, v, biases)
    if tile_elements is not None and (isinstance(tile_elements, bool) or not isinstance(tile_elements, numbers.Integral)):
        raise TypeError(f"evoformer_attention: tile_elements={tile_elements!r} ({type(tile_elements).__name__}); "
                        f"expected an int >= 1 or None")
    tile = DEFAULT_TILE_ELEMENTS if tile_elements is None else int(tile_elements)
    if tile < 1:
        raise ValueError(f"evoformer_attention: tile_elements={tile_elements}; expected >= 1")
    chosen = dispatch.select(backend, q, biases)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *biases))):
        # Nothing to differentiate (e.g. sampling): the forward op alone, which also keeps
        # torch.compile away from tracing the autograd.Function without autograd.
        return _fwd_op(q, k, v, biases, chosen.name, tile)[0]
    return EvoformerAttentionFunction.apply(q, k, v, chosen.name, tile, *biases)


def DS4Sci_EvoformerAttention(Q, K, V, biases):  # noqa: N802 - DeepSpeed's public name
    """Drop-in for ``deepspeed.ops.deepspeed4science.DS4Sci_EvoformerAttention``.

    ``Q, K, V``: ``[B, N, L, H, D]``; ``biases``: a list of up to two entries, each a tensor or
    ``None``: ``biases[0]`` the mask bias ``[B, N, 1, 1, L]``, ``biases[1]`` the pair bias
    ``[B, 1, H, L, L]``. Unlike DeepSpeed, any dtype and head dim work and a ``None`` bias costs
    nothing (no zero tensor is allocated).
    """
    name = "DS4Sci_EvoformerAttention"
    if not isinstance(Q, torch.Tensor) or Q.dim() != 5:
        shape = _shape(Q) if isinstance(Q, torch.Tensor) else type(Q).__name__
        raise ValueError(f"{name}: Q has shape {shape}; expected rank 5, [B, N, L, H, D]")
    biases = list(biases)
    if len(biases) > 2:
        raise ValueError(f"{name}: got {len(biases)} biases; expected at most 2")
    batch, n_seq, length, heads, _ = Q.shape
    expected = [(batch, n_seq, 1, 1, length), (batch, 1, heads, length, length)]
    for i, b in enumerate(biases):
        if b is not None and _shape(b) != expected[i]:
            kind = ("mask", "pair")[i]
            raise ValueError(
                f"{name}: biases[{i}] ({kind} bias) has shape {_shape(b)}; expected {expected[i]}"
            )
    return evoformer_attention(Q, K, V, biases)
