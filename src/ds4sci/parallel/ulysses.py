"""Ulysses sequence parallelism (Jacobs et al., 2023, "DeepSpeed Ulysses").

Each rank of the sequence-parallel group holds a contiguous shard of the sequence with every
head. Before attention one all-to-all turns that into the whole sequence for a subset of heads;
attention runs unchanged on it; a second all-to-all turns the result back. q, k and v travel in
one all-to-all. Per layer each rank sends ``4 B (S/P) E (P-1)/P`` elements in forward (its
shard's q, k, v and output, less the part it keeps) and as many in backward: constant per rank
when S grows with P (``sequence.comm_bytes_per_layer`` has the exact figure for uneven heads).

Heads need not divide the group size: rank ``j`` takes ``H // P`` heads, plus one for the first
``H % P`` ranks (blocks of uneven size per rank), so nothing is padded or replicated. A rank
with no head (``P > H``) sends all its heads away and attends over nothing; use the hybrid
Ulysses x ring layout (``ring.hybrid_attention``) to go beyond ``H``. All ranks must hold shards
of the same length (``sequence.shard_batch`` pads to make them so).

Any attention runs on the gathered sequence (``core``): causal or bidirectional
(:func:`local_attention`), with the end-of-sequence key padding of a sharded bidirectional
sequence cut off by ``valid_length``.

Legend: ``B`` batch, ``H`` heads, ``S`` sequence, ``D`` head dim, ``P`` group size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import torch.nn.functional as F


def local_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, causal: bool = True,
                    valid_length: int | None = None) -> torch.Tensor:
    """Attention of a whole (gathered) sequence through SDPA's flash/memory-efficient kernels.

    ``causal``: causal (top-left aligned) or bidirectional. ``valid_length``: keys at positions
    ``>= valid_length`` are padding and are not attended (bidirectional only; they are cut off,
    so no mask tensor exists and their gradients are zero).
    """
    if valid_length is not None and not causal:
        k_BHSD, v_BHSD = k_BHSD[..., :valid_length, :], v_BHSD[..., :valid_length, :]
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=causal)


def causal_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    return local_attention(q_BHSD, k_BHSD, v_BHSD, causal=True)


def head_splits(num_heads: int, size: int) -> list[int]:
    """Heads per rank: ``num_heads // size``, one more on the first ``num_heads % size`` ranks."""
    base, extra = divmod(num_heads, size)
    return [base + (j < extra) for j in range(size)]


def _offsets(splits: list[int]) -> list[int]:
    return [sum(splits[:j]) for j in range(len(splits))]


def _head_blocks(flat: torch.Tensor, splits: list[int], outer: tuple, inner: tuple) -> list[torch.Tensor]:
    """Views of ``flat`` as consecutive per-rank blocks ``[*outer, H_j, *inner]`` (``H_j =
    splits[j]``), the layout every exchange here sends or receives heads in."""
    unit = math.prod(outer) * math.prod(inner)  # elements per head
    return [flat[offset * unit : (offset + count) * unit].view(*outer, count, *inner)
            for offset, count in zip(_offsets(splits), splits)]


def _all_to_all(send: torch.Tensor, group, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """One ``all_to_all_single`` of flat buffers: ``send_sizes[j]`` elements to rank ``j``,
    ``recv_sizes[j]`` from it (uneven sizes are fine on gloo and NCCL alike)."""
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
    return recv


# Layouts are chosen so that what is sent and received is whole contiguous blocks and attention
# reads what arrives in place: one copy per exchange, where reshaping around the all-to-all in
# the natural [B, H, S, D] layout needs three (pack, reorder on arrival, the caller's reshape to
# [B, S, E]).


class _PackHeads(torch.autograd.Function):
    """q, k, v ``[B, H, S/P, D]`` -> one flat send buffer: for each rank ``j`` in turn, its heads
    as a block ``[S/P, B, H_j, n, D]``. Saves nothing, so the caller can drop q, k, v before the
    exchange."""

    @staticmethod
    def forward(ctx, splits, *tensors):
        b, _, s_local, d = tensors[0].shape
        n = len(tensors)
        ctx.splits, ctx.shape, ctx.n = splits, tensors[0].shape, n
        send = tensors[0].new_empty(sum(splits) * s_local * b * n * d)
        for offset, dst in zip(_offsets(splits), _head_blocks(send, splits, (s_local, b), (n, d))):
            for i, t in enumerate(tensors):
                dst[:, :, :, i] = t[:, offset : offset + dst.shape[2]].permute(2, 0, 1, 3)
        return send

    @staticmethod
    def backward(ctx, grad_send):
        b, h, s_local, d = ctx.shape
        n = ctx.n
        grad = torch.cat(_head_blocks(grad_send, ctx.splits, (s_local, b), (n, d)), dim=2)  # [S/P, B, H, n, D]
        return (None, *(grad[:, :, :, i].permute(1, 2, 0, 3) for i in range(n)))


class _ExchangeToHeads(torch.autograd.Function):
    """The all-to-all of :func:`seq_to_head`: the blocks received (rank order = sequence order)
    form ``[S, B, H_j, n, D]``, returned as ``n`` views ``[B, H_j, S, D]`` (memory order
    ``[S, B, H_j, D]``, which attention reads as is)."""

    @staticmethod
    def forward(ctx, send, group, splits, shape, n):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        b, _, s_local, d = shape
        block = s_local * b * n * d
        ctx.group, ctx.splits, ctx.shape, ctx.n = group, splits, shape, n
        recv = _all_to_all(send, group, [c * block for c in splits], [splits[rank] * block] * size)
        buf = recv.view(size * s_local, b, splits[rank], n, d)
        return tuple(buf[:, :, :, i].permute(1, 2, 0, 3) for i in range(n))

    @staticmethod
    def backward(ctx, *grads_BHjSD):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        b, _, s_local, d = ctx.shape
        n, splits = ctx.n, ctx.splits
        block = s_local * b * n * d
        # Each rank's positions of this rank's heads, in the layout of the block it sent.
        send = grads_BHjSD[0].new_empty(size * s_local, b, splits[rank], n, d)
        for i, g in enumerate(grads_BHjSD):
            send[:, :, :, i] = g.permute(2, 0, 1, 3)
        grad_send = _all_to_all(send.view(-1), ctx.group, [splits[rank] * block] * size, [c * block for c in splits])
        return grad_send, None, None, None, None


def seq_to_head(tensors, group, release: bool = False) -> list[torch.Tensor]:
    """Sequence shards with all heads ``[B, H, S/P, D]`` -> the whole sequence with this rank's
    heads ``[B, H_j, S, D]`` (shards concatenated in group-rank order), for each of ``tensors``
    (same shape) in one all-to-all. ``release``: empty the list ``tensors`` once they are copied
    into the send buffer, so that (with no other reference) they are freed before the receive."""
    splits = head_splits(tensors[0].shape[1], dist.get_world_size(group))
    shape, n = tensors[0].shape, len(tensors)
    send = _PackHeads.apply(splits, *tensors)
    if release:
        tensors.clear()
    return list(_ExchangeToHeads.apply(send, group, splits, shape, n))


def head_to_seq(x_BHjSD: torch.Tensor, group, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: ``[B, H_j, S, D]`` -> ``[B, H, S/P, D]`` (memory order
    ``[B, S/P, H, D]``, so the caller's ``[B, S/P, E]`` reshape is free)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    b, h_j, s, d = x_BHjSD.shape
    splits = head_splits(num_heads, size)
    if h_j != splits[rank] or s % size:
        raise ValueError(f"head_to_seq: input has shape {tuple(x_BHjSD.shape)}; expected "
                         f"[B, {splits[rank]}, S divisible by {size}, D] on group rank {rank}")
    return _HeadToSeq.apply(x_BHjSD, group, splits)


class _HeadToSeq(torch.autograd.Function):
    """The all-to-all of :func:`head_to_seq`. To rank ``r`` go positions ``r`` of this rank's
    heads as ``[B, S/P, H_j, D]`` (no copy when attention's output is laid out ``[B, S, H_j, D]``,
    as the CPU and GPU kernels write it, and B = 1); what arrives is laid side by side over heads.
    Its backward returns the gradient in ``[B, S, H_j, D]`` memory order (a transposed view), the
    layout attention's backward wants (else it makes its own copy, one more ``[B, H_j, S, D]``
    tensor alive at the layer's peak)."""

    @staticmethod
    def forward(ctx, x_BHjSD, group, splits):
        size = dist.get_world_size(group)
        b, h_j, s, d = x_BHjSD.shape
        s_local = s // size
        ctx.group, ctx.splits, ctx.shape = group, splits, x_BHjSD.shape
        send = x_BHjSD.transpose(1, 2).reshape(b, size, s_local, h_j, d).transpose(0, 1).contiguous()
        recv = _all_to_all(send.view(-1), group, [b * s_local * h_j * d] * size, [b * s_local * c * d for c in splits])
        return torch.cat(_head_blocks(recv, splits, (b, s_local), (d,)), dim=2).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_BHsD):
        size = dist.get_world_size(ctx.group)
        b, h_j, s, d = ctx.shape
        s_local, splits = s // size, ctx.splits
        grad_BsHD = grad_BHsD.transpose(1, 2)
        send = grad_BHsD.new_empty(b * s_local * sum(splits) * d)
        for offset, dst in zip(_offsets(splits), _head_blocks(send, splits, (b, s_local), (d,))):
            dst.copy_(grad_BsHD[:, :, offset : offset + dst.shape[2]])
        recv = _all_to_all(send, ctx.group, [b * s_local * c * d for c in splits], [b * s_local * h_j * d] * size)
        # [P, B, S/P, H_j, D] -> [B, S, H_j, D]: free when B = 1
        grad_BSHjD = recv.view(size, b, s_local, h_j, d).transpose(0, 1).reshape(b, s, h_j, d)
        return grad_BSHjD.transpose(1, 2), None, None


def _check_qkv(name, q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}; expected three equal [B, H, S_local, D]")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                      core=causal_attention) -> torch.Tensor:
    """Attention (``core``, causal by default) of a sequence sharded contiguously over ``group``.

    q, k, v: this rank's shard ``[B, H, S/P, D]`` (all heads, positions already applied);
    returns the attention output for the same shard, ``[B, H, S/P, D]``. ``core`` attends the
    whole (gathered) sequence for a subset of heads; the hybrid layout passes ring attention.
    Differentiable with respect to q, k, v. See :func:`ulysses_attention_releasing` for the
    form the model uses.
    """
    return ulysses_attention_releasing([q, k, v], group, core)


def ulysses_attention_releasing(qkv: list[torch.Tensor], group, core=causal_attention) -> torch.Tensor:
    """:func:`ulysses_attention` of ``qkv = [q, k, v]``, emptying the list once they are sent.

    The local shards are not needed after the all-to-all (autograd saves none of them), so a
    caller that hands over its only references (``model.run_core``) has them freed before the
    attention runs: three fewer ``[B, H, S/P, D]`` tensors alive at its peak.
    """
    _check_qkv("ulysses_attention", *qkv)
    num_heads = qkv[0].shape[1]
    if dist.get_world_size(group) == 1:
        q, k, v = qkv
        qkv.clear()
        return core(q, k, v)
    q_j, k_j, v_j = seq_to_head(qkv, group, release=True)  # one collective for all three
    return head_to_seq(core(q_j, k_j, v_j), group, num_heads)
