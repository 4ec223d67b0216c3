"""Ulysses sequence parallelism (Jacobs et al., 2023, "DeepSpeed Ulysses").

Each rank of the sequence-parallel group holds a contiguous shard of the sequence with every
head. Before attention one all-to-all turns that into the whole sequence for a subset of heads;
attention runs unchanged on it; a second all-to-all turns the result back. q, k and v travel in
one all-to-all. Per layer each rank sends ``4 B (S/P) E (P-1)/P`` elements in forward (its
shard's q, k, v and output, less the part it keeps) and as many in backward: constant per rank
when S grows with P (``sequence.comm_bytes_per_layer`` has the exact figure for uneven heads).

Heads need not divide the group size: rank ``j`` takes ``H // P`` heads, plus one for the first
``H % P`` ranks (uneven ``all_to_all_single`` splits), so nothing is padded or replicated. A rank
with no head (``P > H``) sends all its heads away and attends over nothing; use the hybrid
Ulysses x ring layout (``ring.hybrid_attention``) to go beyond ``H``. All ranks must hold shards
of the same length (``sequence.shard_batch`` pads to make them so).

Legend: ``B`` batch, ``H`` heads, ``S`` sequence, ``D`` head dim, ``P`` group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds4sci.models.genslm.model import causal_attention


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward is the inverse all-to-all (splits
    swapped), so gradients return to the ranks and rows their inputs came from."""

    @staticmethod
    def forward(ctx, x, group, in_splits, out_splits):
        ctx.group, ctx.in_splits, ctx.out_splits = group, in_splits, out_splits
        return _all_to_all(x, group, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.out_splits, ctx.in_splits), None, None, None


def _all_to_all(x, group, in_splits, out_splits):
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=group)
    return out


def head_splits(num_heads: int, size: int) -> list[int]:
    """Heads per rank: ``num_heads // size``, one more on the first ``num_heads % size`` ranks."""
    base, extra = divmod(num_heads, size)
    return [base + (j < extra) for j in range(size)]


def seq_to_head(tensors, group, release: bool = False) -> list[torch.Tensor]:
    """Sequence shards with all heads ``[B, H, S/P, D]`` -> the whole sequence with this rank's
    heads ``[B, H_j, S, D]`` (shards concatenated in group-rank order), for each of ``tensors``
    (same shape) in one all-to-all. ``release``: empty the list ``tensors`` once they are copied
    into the send buffer, so that (with no other reference) they are freed before the receive."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    b, h, s_local, d = tensors[0].shape
    splits = head_splits(h, size)
    # all_to_all_single splits dim 0, so heads go first; stacking writes that layout in one copy.
    x_HnBsD = torch.stack([t.transpose(0, 1) for t in tensors], dim=1)
    n = len(tensors)
    if release:
        tensors.clear()
    out = _AllToAll.apply(x_HnBsD, group, splits, [splits[rank]] * size)  # [P * H_j, n, B, S/P, D]
    del x_HnBsD  # free the send buffer before the reordering copy below
    out = out.view(size, splits[rank], n, b, s_local, d).permute(2, 3, 1, 0, 4, 5)
    return list(out.reshape(n, b, splits[rank], size * s_local, d).unbind(0))


def head_to_seq(x_BHjSD: torch.Tensor, group, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: ``[B, H_j, S, D]`` -> ``[B, H, S/P, D]``."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    b, h_j, s, d = x_BHjSD.shape
    splits = head_splits(num_heads, size)
    if h_j != splits[rank] or s % size:
        raise ValueError(f"head_to_seq: input has shape {tuple(x_BHjSD.shape)}; expected "
                         f"[B, {splits[rank]}, S divisible by {size}, D] on group rank {rank}")
    return _HeadToSeq.apply(x_BHjSD, group, splits)


class _HeadToSeq(torch.autograd.Function):
    """The all-to-all of :func:`head_to_seq`. Its backward returns the gradient in
    ``[B, S, H_j, D]`` memory order (a transposed view): the attention backward on CPU wants
    its output gradient laid out so and would otherwise make its own copy, one more
    ``[B, H_j, S, D]`` tensor alive at the layer's peak."""

    @staticmethod
    def forward(ctx, x_BHjSD, group, splits):
        size = dist.get_world_size(group)
        b, h_j, s, d = x_BHjSD.shape
        ctx.group, ctx.splits, ctx.shape = group, splits, x_BHjSD.shape
        x_PHjBsD = x_BHjSD.view(b, h_j, size, s // size, d).permute(2, 1, 0, 3, 4)
        out = _all_to_all(x_PHjBsD.reshape(size * h_j, b, s // size, d), group,
                          [h_j] * size, splits)  # [H, B, S/P, D]
        return out.permute(1, 0, 2, 3)

    @staticmethod
    def backward(ctx, grad_BHsD):
        b, h_j, s, d = ctx.shape
        size = dist.get_world_size(ctx.group)
        recv = _all_to_all(grad_BHsD.permute(1, 0, 2, 3), ctx.group, ctx.splits, [h_j] * size)  # [P*H_j, B, S/P, D]
        grad_BPsHjD = torch.empty(b, size, s // size, h_j, d, dtype=recv.dtype, device=recv.device)
        grad_BPsHjD.copy_(recv.view(size, h_j, b, s // size, d).permute(2, 0, 3, 1, 4))
        return grad_BPsHjD.view(b, s, h_j, d).transpose(1, 2), None, None


def _check_qkv(name, q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}; expected three equal [B, H, S_local, D]")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                      core=causal_attention) -> torch.Tensor:
    """Causal attention of a sequence sharded contiguously over ``group``.

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
