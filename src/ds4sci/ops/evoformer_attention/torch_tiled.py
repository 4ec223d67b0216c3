"""Tiled pure-PyTorch backend for Evoformer attention (CPU and any torch device).

Follows the FlashAttention recipe (Dao et al., 2022) with Evoformer's broadcast biases: the
logits are produced one tile of ``[n_b, H, t_q, L_k]`` at a time, softmax statistics are kept
per row, and backward recomputes the probabilities tile by tile. The statistics are the row max
``m`` and ``log(sum exp(s - m))`` kept apart, not summed into one logsumexp: with OpenFold's
-1e9 masks, ``m`` is near -1e9 where fp32 spacing is 64, so ``m + log(denominator)`` would
round the denominator away and a fully masked row would get wrong gradients. The gradient of
each bias is reduced over its broadcast dims as the tiles go by, so no tensor of the full
``[*, H, L_q, L_k]`` size ever exists. Arithmetic inside a tile is fp32 (fp64 for fp64 inputs).

Legend: ``Bf`` = product of the leading dims, ``n_b`` a chunk of it, ``t_q`` a chunk of ``L_q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dispatch import compute_dtype

DEFAULT_TILE_ELEMENTS = 1 << 20
"""Default bound on the elements of one logits tile (4 MiB in fp32; measured best of 2**17..2**20 on CPU)."""


# exp() of inputs whose result underflows (masked logits at -1e9, -inf, denormal results) takes
# a scalar slow path on CPU, many times slower than the vector path. Shifted logits are
# clamped here first: exp(-87) ~ 1.6e-38 is below fp32 resolution of any row sum (>= 1), so
# results are unchanged to fp32 rounding. Fully -inf rows are zeroed explicitly instead.
_EXP_FLOOR = -87.0
_EXP_FLOOR_VALUE = math.exp(_EXP_FLOOR) * 1.001


@dataclass
class _BatchSlice:
    """How the rows ``[b0, b1)`` of the flattened batch map onto the rows of one bias."""

    kind: str  # "const": one bias row for all; "range": consecutive rows; "gather": anything else
    start: int
    index: torch.Tensor | None


class _FlatBias:
    """A bias viewed as ``[P_b, H_b, Lq_b, Lk_b]`` plus a map from flat batch row to bias row.

    Dims of size 1 broadcast. Stride-0 (expanded) dims of a bias that needs no gradient are
    narrowed back to size 1 so an expanded mask is never copied to its full size.
    """

    def __init__(self, bias: torch.Tensor, lead: Sequence[int], narrow_expanded: bool):
        full_rank = len(lead) + 3
        b = bias.reshape((1,) * (full_rank - bias.dim()) + tuple(bias.shape))
        if narrow_expanded:
            for d in range(full_rank):
                if b.stride(d) == 0 and b.shape[d] > 1:
                    b = b.narrow(d, 0, 1)
        self.padded_shape = tuple(b.shape)
        self.device = b.device
        bias_lead = b.shape[:-3]
        n_rows = math.prod(bias_lead)
        self.rows = b.reshape(n_rows, *b.shape[-3:])
        # row_of[i] = the bias row used by flat batch row i (broadcast dims contribute 0); kept on
        # the CPU for the const/range/gather decisions, moved to the device only to gather.
        self.row_of = torch.arange(n_rows).reshape(bias_lead).expand(tuple(lead)).reshape(-1)

    def batch_slice(self, b0: int, b1: int) -> _BatchSlice:
        seg = self.row_of[b0:b1]
        first = int(seg[0])
        if bool((seg == first).all()):
            return _BatchSlice("const", first, None)
        if int(seg[-1]) - first == b1 - b0 - 1 and bool((seg.diff() == 1).all()):
            return _BatchSlice("range", first, None)
        return _BatchSlice("gather", first, seg.to(self.device))

    def tile(self, bs: _BatchSlice, n_b: int, q0: int, q1: int) -> torch.Tensor:
        """Bias values broadcastable to the ``[n_b, H, t_q, L_k]`` logits tile."""
        rows = self.rows if self.rows.shape[-2] == 1 else self.rows[:, :, q0:q1]
        if bs.kind == "const":
            return rows[bs.start : bs.start + 1]
        if bs.kind == "range":
            return rows[bs.start : bs.start + n_b]
        return rows.index_select(0, bs.index)

    def accumulate_grad(self, grad_rows, bs: _BatchSlice, ds: torch.Tensor, q0: int, q1: int):
        """Add the logits-tile gradient ``ds`` into ``grad_rows``, summed over broadcast dims."""
        dims = [d for d in (1, 2, 3) if self.rows.shape[d] == 1]
        if bs.kind == "const":
            dims.insert(0, 0)
        reduced = ds.sum(dim=dims, keepdim=True) if dims else ds
        target = grad_rows if self.rows.shape[-2] == 1 else grad_rows[:, :, q0:q1]
        if bs.kind == "const":
            target[bs.start : bs.start + 1] += reduced
        elif bs.kind == "range":
            target[bs.start : bs.start + reduced.shape[0]] += reduced
        else:
            target.index_add_(0, bs.index, reduced)


def _chunks(n_batch: int, l_q: int, l_k: int, heads: int, head_dim: int, tile: int):
    """Yield ``(b0, b1, [(q0, q1), ...])`` so that one tile holds at most ``tile`` logits.

    A tile always holds at least one full row of keys for every head (``H * L_k`` elements).
    Query tiles are balanced (no small remainder tile) to keep the matmuls efficient.
    """
    row = heads * l_k
    if row * l_q <= tile:
        n_b = max(1, min(n_batch, tile // (row * max(l_q, head_dim))))
        q_tiles = [(0, l_q)]
    else:
        n_b = 1
        n_tiles = math.ceil(l_q / max(1, tile // row))
        t_q = math.ceil(l_q / n_tiles)
        q_tiles = [(q0, min(q0 + t_q, l_q)) for q0 in range(0, l_q, t_q)]
    for b0 in range(0, n_batch, n_b):
        yield b0, min(b0 + n_b, n_batch), q_tiles


def _flatten(q, k, v):
    lead = q.shape[:-3]
    n_batch = math.prod(lead)
    return lead, n_batch, (t.reshape(n_batch, *t.shape[-3:]) for t in (q, k, v))


def _heads_first(x_BLHD: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``[n, L, H, D]`` -> a new contiguous ``[n, H, L, D]`` in the compute dtype.

    Always a copy (never a view of the caller's tensor), so callers may modify it in place.
    """
    n, length, heads, dim = x_BLHD.shape
    out = torch.empty((n, heads, length, dim), dtype=cdt, device=x_BLHD.device)
    return out.copy_(x_BLHD.permute(0, 2, 1, 3))


def _tile_logits(q_BHQD, ks_BHKD, flat_biases, slices, n_b, q0, q1):
    """Logits tile ``[n_b, H, t_q, L_k]``: q (k * scale)^T + every bias."""
    logits = torch.matmul(q_BHQD, ks_BHKD.transpose(-1, -2))
    for fb, bs in zip(flat_biases, slices):
        logits += fb.tile(bs, n_b, q0, q1)
    return logits


def _accumulate_matmul(acc_BHXD: torch.Tensor, a_BHYX: torch.Tensor, b_BHYD: torch.Tensor) -> None:
    """``acc += a^T @ b`` in place, batched over (n_b, H)."""
    n = acc_BHXD.shape[0] * acc_BHXD.shape[1]
    acc = acc_BHXD.view(n, *acc_BHXD.shape[2:])
    acc.baddbmm_(a_BHYX.reshape(n, *a_BHYX.shape[2:]).transpose(1, 2), b_BHYD.reshape(n, *b_BHYD.shape[2:]))


def forward(q, k, v, biases, tile_elements: int = DEFAULT_TILE_ELEMENTS):
    """Returns ``(out [*, L_q, H, D], stats [*, H, L_q, 2])``, stats = (row max, log denominator).

    Stats are fp32 (fp64 for fp64 inputs); a fully ``-inf`` row gets (0, +inf).
    """
    lead, n_batch, (q3, k3, v3) = _flatten(q, k, v)
    l_q, heads, head_dim = q3.shape[1:]
    l_k = k3.shape[1]
    cdt = compute_dtype(q.dtype)
    scale = head_dim**-0.5
    flat_biases = [_FlatBias(b, lead, narrow_expanded=True) for b in biases]
    out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)  # contiguous, like the fake
    stats = torch.empty(n_batch, heads, l_q, 2, dtype=cdt, device=q.device)
    for b0, b1, q_tiles in _chunks(n_batch, l_q, l_k, heads, head_dim, tile_elements):
        n_b = b1 - b0
        slices = [fb.batch_slice(b0, b1) for fb in flat_biases]
        # The softmax scale is folded into k once per batch chunk.
        ks_BHKD = _heads_first(k3[b0:b1], cdt).mul_(scale)
        v_BHKD = _heads_first(v3[b0:b1], cdt)
        for q0, q1 in q_tiles:
            q_BHQD = _heads_first(q3[b0:b1, q0:q1], cdt)
            p = _tile_logits(q_BHQD, ks_BHKD, flat_biases, slices, n_b, q0, q1)
            row_max = p.amax(dim=-1, keepdim=True)
            empty = row_max == float("-inf")  # every key masked with -inf
            row_max.masked_fill_(empty, 0.0)
            p.sub_(row_max).clamp_(min=_EXP_FLOOR).exp_()
            denom = p.sum(dim=-1, keepdim=True)
            o = torch.matmul(p, v_BHKD).div_(denom).masked_fill_(empty, 0.0)
            out[b0:b1, q0:q1] = o.permute(0, 2, 1, 3)
            stats[b0:b1, :, q0:q1, 0:1] = row_max
            stats[b0:b1, :, q0:q1, 1:2] = denom.log_().masked_fill_(empty, float("inf"))
    return out.reshape(q.shape), stats.reshape(*lead, heads, l_q, 2)


def backward(grad_out, q, k, v, biases, out, stats, bias_needs_grad,
             tile_elements: int = DEFAULT_TILE_ELEMENTS):
    """Returns ``[dq, dk, dv, *dbias]``; a bias that needs no gradient gets an empty tensor."""
    lead, n_batch, (q3, k3, v3) = _flatten(q, k, v)
    do3 = grad_out.reshape(q3.shape)
    o3 = out.reshape(q3.shape)
    stats3 = stats.reshape(n_batch, *stats.shape[-3:])
    l_q, heads, head_dim = q3.shape[1:]
    l_k = k3.shape[1]
    cdt = compute_dtype(q.dtype)
    scale = head_dim**-0.5
    flat_biases = [
        _FlatBias(b, lead, narrow_expanded=not needs) for b, needs in zip(biases, bias_needs_grad)
    ]
    grad_rows = [
        torch.zeros(fb.rows.shape, dtype=cdt, device=q.device) if needs else None
        for fb, needs in zip(flat_biases, bias_needs_grad)
    ]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q3, k3, v3))
    for b0, b1, q_tiles in _chunks(n_batch, l_q, l_k, heads, head_dim, tile_elements):
        n_b = b1 - b0
        slices = [fb.batch_slice(b0, b1) for fb in flat_biases]
        ks_BHKD = _heads_first(k3[b0:b1], cdt).mul_(scale)
        v_BHKD = _heads_first(v3[b0:b1], cdt)
        dk_acc = torch.zeros(n_b, heads, l_k, head_dim, dtype=cdt, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        for q0, q1 in q_tiles:
            q_BHQD = _heads_first(q3[b0:b1, q0:q1], cdt)
            o_BHQD = _heads_first(o3[b0:b1, q0:q1], cdt)
            row_max = stats3[b0:b1, :, q0:q1, 0:1]
            row_log_denom = stats3[b0:b1, :, q0:q1, 1:2]
            # Fully masked rows (log denominator +inf) pass no gradient: with do = 0 there,
            # every product with their (clamped, tiny) probabilities is exactly 0.
            do_BHQD = _heads_first(do3[b0:b1, q0:q1], cdt).masked_fill_(row_log_denom == float("inf"), 0.0)
            delta = (do_BHQD * o_BHQD).sum(dim=-1, keepdim=True)
            p = _tile_logits(q_BHQD, ks_BHKD, flat_biases, slices, n_b, q0, q1)
            p.sub_(row_max).sub_(row_log_denom).clamp_(min=_EXP_FLOOR).exp_()
            # Exact zeros where the floor was hit, so ds = p * (dp - delta) makes no denormals
            # (denormal arithmetic is as slow as the exp slow path).
            torch.nn.functional.threshold_(p, _EXP_FLOOR_VALUE, 0.0)
            _accumulate_matmul(dv_acc, p, do_BHQD)
            ds = torch.matmul(do_BHQD, v_BHKD.transpose(-1, -2)).sub_(delta).mul_(p)
            del p
            for fb, bs, g in zip(flat_biases, slices, grad_rows):
                if g is not None:
                    fb.accumulate_grad(g, bs, ds, q0, q1)
            dq[b0:b1, q0:q1] = torch.matmul(ds, ks_BHKD).permute(0, 2, 1, 3)
            _accumulate_matmul(dk_acc, ds, q_BHQD)
        dk[b0:b1] = dk_acc.mul_(scale).permute(0, 2, 1, 3)
        dv[b0:b1] = dv_acc.permute(0, 2, 1, 3)
    dbiases = []
    for b, fb, g in zip(biases, flat_biases, grad_rows):
        if g is None:
            dbiases.append(b.new_empty(0))
        else:
            dbiases.append(g.reshape(fb.padded_shape).reshape(b.shape).to(b.dtype))
    return [dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), *dbiases]
