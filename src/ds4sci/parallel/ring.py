"""Ring attention (Liu et al., 2023, "Ring Attention with Blockwise Transformers"), causal (with
zigzag load balancing) or bidirectional, and the hybrid Ulysses x ring layout.

Each rank of the ring holds a shard of the sequence (all heads). K/V shards travel around the
ring, one hop per step, while every rank attends its queries to the shard it holds; the partial
results are merged with the online-softmax rule on fp32 log-sum-exp statistics, so the output is
exact. Backward passes K/V around again, with the dK/dV accumulated for them travelling alongside
and arriving back at their owner after the last hop. Each step's transfer is started before that
step's compute, so communication overlaps it.

Layouts (``sequence.shard_positions`` produces the matching token order):

* ``contiguous``: rank ``r`` holds chunk ``r`` of ``P``. Causal masking makes the last rank do
  ``P`` blocks of work and the first one; every step waits for the slowest.
* ``zigzag`` (head-tail): the sequence is cut into ``2P`` chunks and rank ``r`` holds chunks
  ``r`` and ``2P-1-r``. Then at every step other than the first, each rank does exactly half a
  block: against an earlier rank's shard all its queries see the shard's first chunk; against a
  later rank's shard only its second chunk sees it, whole. Every rank does the same work.

Bidirectional attention (``causal=False``, e.g. ViT patch tokens) needs no zigzag: every query
sees every key, so the contiguous layout already gives every rank the same work. A sequence
padded at its end to a length the ranks divide is attended exactly by passing ``valid_length``
(the real token count): each block is cut to the keys before it (a key-padding mask that is a
slice, so no mask tensor exists). Padded queries get finite outputs that a loss must ignore.
No other additive bias is supported by the ring.

The hybrid layout (:func:`hybrid_attention`) runs Ulysses inside groups and the ring across them,
so the sequence-parallel degree can exceed the number of heads.

Legend: ``B`` batch, ``H`` heads, ``S`` local sequence, ``D`` head dim, ``P`` ring size.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

from .ulysses import _check_qkv, ulysses_attention_releasing

LAYOUTS = ("contiguous", "zigzag")
log = logging.getLogger(__name__)


# ----- block kernels: attention of q against one K/V block, with its log-sum-exp --------------

MATH_TILE_ROWS = 1024
"""Query rows per tile of the math kernel: its fp32 scores are ``[B, H, tile, S_block]``."""


def _acc(dtype):
    """Statistics and accumulation dtype: fp32, or the input's own when wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q_tile, kf, row0, causal):
    """fp32 scaled scores of a query tile starting at row ``row0`` of the block, causally masked
    (top-left aligned: query row i sees key columns <= i)."""
    scores = (q_tile.to(kf.dtype) @ kf.transpose(-1, -2)) * q_tile.shape[-1] ** -0.5
    if causal:
        rows = torch.arange(row0, row0 + q_tile.shape[-2], device=q_tile.device)[:, None]
        cols = torch.arange(kf.shape[-2], device=q_tile.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return scores


def _no_autocast(kernel):
    """Run a block kernel with autocast off: its inputs arrive in the dtype autocast already chose,
    and its fp32 statistics must stay fp32 (an autocast region would run its matmuls in bf16)."""
    @functools.wraps(kernel)
    def run(*args):
        with torch.autocast(args[1].device.type, enabled=False):
            return kernel(*args)
    return run


@_no_autocast
def _block_forward_math(q, k, v, causal):
    """fp32 block kernel for any device, tiled over query rows so the scores never exceed
    ``MATH_TILE_ROWS x S_block``: ``out`` in q's dtype, ``lse`` fp32 ``[B, H, S]``."""
    kf, vf = k.to(_acc(k.dtype)), v.to(_acc(v.dtype))
    outs, lses = [], []
    for row0 in range(0, q.shape[-2], MATH_TILE_ROWS):
        scores = _scores(q[..., row0:row0 + MATH_TILE_ROWS, :], kf, row0, causal)
        lse = scores.logsumexp(dim=-1)
        outs.append(((scores - lse[..., None]).exp() @ vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


@_no_autocast
def _block_backward_math(dout, q, k, v, out, lse, causal):
    scale = q.shape[-1] ** -0.5
    kf, vf = k.to(_acc(k.dtype)), v.to(_acc(v.dtype))
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for row0 in range(0, q.shape[-2], MATH_TILE_ROWS):
        rows = slice(row0, row0 + MATH_TILE_ROWS)
        qf, dof = q[..., rows, :].to(kf.dtype), dout[..., rows, :].to(kf.dtype)
        p = (_scores(qf, kf, row0, causal) - lse[..., rows, None]).exp()
        dv += p.transpose(-1, -2) @ dof
        # D = rowsum(dO * O) with the *global* output, so this block's share of the softmax
        # gradient is exact even though the block saw only part of the keys.
        d_row = (dof * out[..., rows, :].to(kf.dtype)).sum(-1, keepdim=True)
        ds = p * (dof @ vf.transpose(-1, -2) - d_row)
        dq[..., rows, :] = (ds @ kf * scale).to(q.dtype)
        dk += ds.transpose(-1, -2) @ qf * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _block_forward_cpu(q, k, v, causal):
    # The CPU flash kernel dies (SIGFPE) on empty inputs, e.g. a rank with no head.
    if q.numel() == 0:
        return _block_forward_math(q, k, v, causal)
    # PyTorch's CPU flash-attention kernel (what SDPA runs on CPU) returns the fp32 lse we need.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse


def _block_backward_cpu(dout, q, k, v, out, lse, causal):
    if q.numel() == 0:
        return _block_backward_math(dout, q, k, v, out, lse, causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal)


BACKENDS = {"math": (_block_forward_math, _block_backward_math),
            "cpu_flash": (_block_forward_cpu, _block_backward_cpu)}


def _pick_backend(q, backend):
    if backend == "auto":
        # DISCREPANCY: on GPUs this uses the tiled fp32 math kernel (no fused flash kernel with
        # log-sum-exp is wired in yet): exact, memory bounded by the tile, slower than flash.
        backend = auto_backend(q.device.type, q.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"ring_attention: backend={backend!r}; expected 'auto' or one of "
                         f"{sorted(BACKENDS)}")
    if backend == "cpu_flash" and (q.device.type != "cpu" or q.dtype == torch.float64):
        raise ValueError(f"ring_attention: backend='cpu_flash' needs CPU fp32/bf16/fp16 tensors; "
                         f"got {q.device.type} {q.dtype}")
    log.debug("ring_attention: block kernel %s for %s %s", backend, q.device.type, q.dtype)
    return BACKENDS[backend]


def auto_backend(device_type: str, dtype: torch.dtype) -> str:
    """The block kernel ``backend="auto"`` picks (for ``ds4sci info``)."""
    return "cpu_flash" if device_type == "cpu" and dtype != torch.float64 else "math"


# ----- the ring schedule --------------------------------------------------------------------

def _blocks(rank, src, layout, s, causal=True, valid_length=None):
    """Which part of this rank's queries meets which part of ``src``'s K/V, and whether the block
    is causal: ``(q_slice, kv_slice, causal)`` or None when no query sees any of those keys.

    Bidirectional (``causal=False``, contiguous layout): every block is whole, cut to the keys
    before ``valid_length`` (global positions ``src * s ...``). A rank's own block always has at
    least one key (if its shard is all padding, the padded keys themselves), so step 0 gives every
    row finite statistics.
    """
    full, half = slice(0, s), slice(0, s // 2)
    if not causal:
        if valid_length is None:
            return full, full, False
        keys = min(max(valid_length - src * s, 0), s)
        if keys == 0:
            return (full, full, False) if src == rank else None
        return full, slice(0, keys), False
    if src == rank:
        # Own shard: plain causal attention, also for zigzag (its chunks are in order).
        return full, full, True
    if layout == "contiguous":
        return (full, full, False) if src < rank else None
    # zigzag: an earlier shard's first chunk precedes both our chunks and its second chunk
    # follows both; a later shard's two chunks both lie between our first and second chunk.
    return (full, half, False) if src < rank else (slice(s // 2, s), full, False)


def _ring_peers(group) -> tuple[int, int, int, int]:
    """(size, rank in ``group``, global rank to send to, global rank to receive from)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return (size, rank, dist.get_global_rank(group, (rank + 1) % size),
            dist.get_global_rank(group, (rank - 1) % size))


def _exchange(tensor, group, send_to, recv_from, tag):
    """Start sending ``tensor`` to ``send_to`` and receiving a same-shaped one from ``recv_from``;
    returns (the receive buffer, requests to wait on). ``tag`` keeps the K/V and dK/dV streams
    of backward apart."""
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to, group, tag),
           dist.P2POp(dist.irecv, received, recv_from, group, tag)]
    return received, dist.batch_isend_irecv(ops)


def _wait(reqs):
    for req in reqs:
        req.wait()


def _ring_steps(kv, group, layout, s, causal=True, valid_length=None):
    """The ring schedule, shared by forward and backward: per step ``(block, held)``, the K/V shard
    this rank holds and which of its queries meet which of those keys (``_blocks``; None for
    none). The next shard's transfer starts before each step and is waited for after it, so it
    overlaps the caller's compute; a shard sent is dropped as soon as its successor has arrived
    (callers ``del held`` at the end of a step, so that their reference does not keep it alive
    through the next receive)."""
    size, rank, send_to, recv_from = _ring_peers(group)
    held = kv
    for step in range(size):
        if step + 1 < size:
            next_kv, reqs = _exchange(held, group, send_to, recv_from, tag=0)
        yield _blocks(rank, (rank - step) % size, layout, s, causal, valid_length), held
        if step + 1 < size:
            _wait(reqs)
            held, next_kv, reqs = next_kv, None, None


def _merge(out, lse, rows, block_out, block_lse):
    """Online-softmax merge of one block's (out, lse) into the fp32 accumulators, rows ``rows``."""
    old_lse = lse[..., rows]
    new_lse = torch.logaddexp(old_lse, block_lse)
    # In place: no block-sized temporaries next to the K/V blocks in flight.
    out[..., rows, :].mul_((old_lse - new_lse).exp()[..., None]).addcmul_(
        block_out.to(out.dtype), (block_lse - new_lse).exp()[..., None])
    lse[..., rows] = new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, group, layout, backend, head_chunk, causal, valid_length):
        """``kv``: k and v stacked ``[2, B, H, S, D]``, one message per hop (saved as is)."""
        fwd, bwd = _pick_backend(q, backend)
        out = lse = None
        for block, held in _ring_steps(kv, group, layout, q.shape[-2], causal, valid_length):
            if block is not None:
                rows, cols, block_causal = block
                block_out, block_lse = fwd(q[..., rows, :], held[0][..., cols, :],
                                           held[1][..., cols, :], block_causal)
                if out is None:  # step 0 is the own (diagonal) block: every row has a key
                    out, lse = block_out.to(_acc(q.dtype)), block_lse.to(_acc(q.dtype)).contiguous()
                else:
                    _merge(out, lse, rows, block_out, block_lse)
                del block_out, block_lse  # not alive while the next receive buffer is
            del held
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group, ctx.layout, ctx.bwd, ctx.head_chunk = group, layout, bwd, head_chunk
        ctx.causal, ctx.valid_length = causal, valid_length
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        # The kernels take strided tensors; a gradient arriving through the caller's [B, S, H*D]
        # reshape is [B, S, H, D] in memory, and a copy of it would be one more tensor alive.
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        h, chunk = q.shape[1], ctx.head_chunk
        run = functools.partial(_ring_backward, group=ctx.group, layout=ctx.layout, bwd=ctx.bwd,
                                causal=ctx.causal, valid_length=ctx.valid_length)
        none = (None,) * 6
        if not chunk or chunk >= h:
            dq, dkv = run(dout, q, kv, out, lse)
            return dq.to(q.dtype), dkv.to(kv.dtype), *none
        # Head groups one ring pass at a time: K/V in flight, the travelling dK/dV and the block
        # gradients are a group's, not all heads'; the results go straight into the gradients.
        dq, dkv = torch.empty_like(q), torch.empty_like(kv)
        for h0 in range(0, h, chunk):
            heads = slice(h0, min(h0 + chunk, h))
            dq_g, dkv_g = run(dout[:, heads], q[:, heads], kv[:, :, heads].contiguous(), out[:, heads],
                              lse[:, heads])
            dq[:, heads], dkv[:, :, heads] = dq_g, dkv_g
            del dq_g, dkv_g
        return dq, dkv, *none


def _ring_backward(dout, q, kv, out, lse, *, group, layout, bwd, causal=True, valid_length=None):
    """One ring pass of backward over the heads given: ``(dq, dkv)`` in the accumulation dtype,
    ``dkv`` stacked ``[2, B, H, S, D]`` like ``kv``."""
    size, _, send_to, recv_from = _ring_peers(group)
    dq = None
    # dK/dV of the shard currently held, accumulated in fp32 as it travels with that shard. Its
    # transfer overlaps the next step's block kernel: it is only waited for when that step's
    # contribution is added.
    dkv, dkv_reqs = None, []
    for block, held in _ring_steps(kv, group, layout, q.shape[-2], causal, valid_length):
        if block is not None:
            rows, cols, block_causal = block
            bdq, bdk, bdv = bwd(dout[..., rows, :], q[..., rows, :], held[0][..., cols, :],
                                held[1][..., cols, :], out[..., rows, :], lse[..., rows].contiguous(),
                                block_causal)
            if dq is None:  # step 0: the own block, every row
                dq = bdq.to(_acc(q.dtype))
            else:
                dq[..., rows, :] += bdq
            del bdq
        _wait(dkv_reqs)
        dkv_reqs = []  # drops the dK/dV sent last step
        acc = torch.zeros_like(held, dtype=_acc(held.dtype)) if dkv is None else dkv
        del held
        if block is not None:
            acc[0][..., cols, :] += bdk
            acc[1][..., cols, :] += bdv
            del bdk, bdv  # not alive while the next receive buffers are
        if size == 1:  # nowhere to travel (gloo refuses a send to oneself)
            dkv = acc
            break
        # Pass the accumulated dK/dV on with the shard; after the last step this hop brings
        # each shard's gradient home.
        dkv, dkv_reqs = _exchange(acc, group, send_to, recv_from, tag=1)
        del acc
    _wait(dkv_reqs)
    return dq, dkv


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                   layout: str = "zigzag", backend: str = "auto", head_chunk: int | None = None,
                   causal: bool = True, valid_length: int | None = None) -> torch.Tensor:
    """Causal (or, ``causal=False``, bidirectional) attention of a sequence sharded over the ranks
    of ``group``.

    q, k, v: this rank's shard ``[B, H, S_local, D]`` (all heads, positions already applied) in
    the token order of ``layout`` (``contiguous`` or ``zigzag``, see the module docstring; for
    zigzag ``S_local`` must be even). Returns the output for the same tokens, same shape and
    dtype. ``backend``: block kernel, ``auto`` (CPU flash kernel on CPU, fp32 ``math``
    elsewhere), ``cpu_flash`` or ``math``. ``head_chunk``: backward runs one ring pass per group of
    this many heads, so the K/V blocks in flight, the travelling dK/dV and the block gradients
    are one group's (about half the ring's peak per local token at one head per group; more
    messages, same bytes). ``causal=False`` needs ``layout="contiguous"``; ``valid_length``: the
    sequence's real length when its end is padding (bidirectional only: causal attention never
    lets a real token see later padding). Differentiable with respect to q, k, v.
    """
    return ring_attention_releasing([q, k, v], group, layout, backend, head_chunk, causal, valid_length)


def ring_attention_releasing(qkv: list[torch.Tensor], group, layout: str = "zigzag", backend: str = "auto",
                             head_chunk: int | None = None, causal: bool = True,
                             valid_length: int | None = None) -> torch.Tensor:
    """:func:`ring_attention` of ``qkv = [q, k, v]``, emptying the list once k and v are stacked
    into the one tensor that travels (``model.run_core`` hands over its only references, so k and
    v are freed before the ring starts: two fewer ``[B, H, S, D]`` tensors alive)."""
    q, k, v = qkv
    _check_qkv("ring_attention", q, k, v)
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout={layout!r}; expected one of {LAYOUTS}")
    if layout == "zigzag" and q.shape[-2] % 2:
        raise ValueError(f"ring_attention: layout='zigzag' needs an even local length (two equal "
                         f"chunks); q has S_local={q.shape[-2]}")
    if head_chunk is not None and (not isinstance(head_chunk, int) or head_chunk < 1):
        raise ValueError(f"ring_attention: head_chunk={head_chunk!r}; expected None or a positive int")
    if not causal and layout != "contiguous":
        raise ValueError(f"ring_attention: causal=False with layout={layout!r}; bidirectional "
                         "attention is balanced as it is: use layout='contiguous'")
    if valid_length is not None and (causal or not 1 <= valid_length <= q.shape[-2] * dist.get_world_size(group)):
        raise ValueError(f"ring_attention: valid_length={valid_length!r}; expected None, or with "
                         f"causal=False an int in [1, S_local * ring size]")
    kv = torch.stack((k, v))  # its backward only splits the gradient: saves neither input
    del k, v
    qkv.clear()
    return _RingAttention.apply(q, kv, group, layout, backend, head_chunk, causal, valid_length)


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses_group, ring_group,
                     layout: str = "zigzag", backend: str = "auto", head_chunk: int | None = None,
                     causal: bool = True, valid_length: int | None = None) -> torch.Tensor:
    """Causal (or bidirectional) attention over a ring of Ulysses groups: an all-to-all inside ``ulysses_group``
    gathers the ring shard for a subset of heads, ring attention over ``ring_group`` attends it,
    and the inverse all-to-all returns the output shard.

    q, k, v: ``[B, H, S_local, D]``, this rank's slice of its ring shard (token order from
    ``sequence.shard_positions`` with the same ``layout`` and Ulysses degree).
    """
    return hybrid_attention_releasing([q, k, v], ulysses_group, ring_group, layout, backend, head_chunk,
                                      causal, valid_length)


def hybrid_attention_releasing(qkv: list[torch.Tensor], ulysses_group, ring_group,
                               layout: str = "zigzag", backend: str = "auto",
                               head_chunk: int | None = None, causal: bool = True,
                               valid_length: int | None = None) -> torch.Tensor:
    """:func:`hybrid_attention` of ``qkv = [q, k, v]``, emptying the list once they are sent
    (see ``ulysses.ulysses_attention_releasing``)."""
    core = functools.partial(ring_attention, group=ring_group, layout=layout, backend=backend,
                             head_chunk=head_chunk, causal=causal, valid_length=valid_length)
    return ulysses_attention_releasing(qkv, ulysses_group, core=core)
