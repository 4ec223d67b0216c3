"""Sequence parallelism (Ulysses, ring, hybrid) against single-process attention and GenSLM.

Every distributed case runs 2 or 4 forked gloo ranks (``dist_helpers.run_distributed``), each
holding its shard of the same inputs, and compares the reassembled outputs and q/k/v gradients
(or the model's loss and parameter gradients) with one process running plain SDPA / GenSLM.
"""

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_helpers import run_distributed
from torch.distributed.device_mesh import init_device_mesh

from ds4sci.models.genslm import GenSLM, preset
from ds4sci.models.genslm.model import IGNORE_INDEX
from ds4sci.models.genslm.parallelize import shard_batch
from ds4sci.parallel import ring
from ds4sci.parallel.ring import ring_attention
from ds4sci.parallel.sequence import (
    apply_sequence_parallel,
    comm_bytes_per_layer,
    count_sent_bytes,
    global_mean_loss,
    sequence_parallel_core,
    shard_positions,
)
from ds4sci.parallel.ulysses import head_splits, ulysses_attention

pytestmark = pytest.mark.distributed

# ----- single process: layouts and batch sharding -------------------------------------------


@pytest.mark.parametrize("layout,sp,ulysses", [
    ("contiguous", 2, 1), ("contiguous", 4, 4), ("contiguous", 4, 2),
    ("zigzag", 2, 1), ("zigzag", 4, 1), ("zigzag", 4, 2)])
def test_shard_positions_partition_the_sequence(layout, sp, ulysses):
    seq = 48
    parts = [shard_positions(seq, r, sp, layout, ulysses) for r in range(sp)]
    assert all(p.numel() == seq // sp for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(seq))
    ring = sp // ulysses
    for ring_rank in range(ring):
        # A ring shard is its Ulysses ranks' pieces in order: contiguous, or chunks r and 2R-1-r.
        shard = torch.cat(parts[ring_rank * ulysses:(ring_rank + 1) * ulysses])
        if layout == "contiguous":
            expected = torch.arange(ring_rank * seq // ring, (ring_rank + 1) * seq // ring)
        else:
            c = seq // (2 * ring)
            late = 2 * ring - 1 - ring_rank
            expected = torch.cat((torch.arange(ring_rank * c, (ring_rank + 1) * c),
                                  torch.arange(late * c, (late + 1) * c)))
        assert torch.equal(shard, expected)


def test_shard_batch_shifts_labels_globally_and_pads():
    ids = torch.arange(2 * 7).view(2, 7) + 5
    labels = ids.clone()
    labels[1, 5:] = IGNORE_INDEX  # a right-padded record
    shards = [shard_batch(ids, labels, r, 2, "zigzag", pad_id=3) for r in range(2)]
    # 7 tokens pad to 8 (4 chunks of 2): rank 0 holds positions 0,1,6,7; rank 1 holds 2,3,4,5.
    assert [s[2].tolist() for s in shards] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    ids0, targets0, _ = shards[0]
    assert ids0[0].tolist() == [5, 6, 11, 3]
    # The target of position 1 is the label of position 2, which lives on the other rank.
    assert targets0[0].tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert shards[1][1].tolist() == [[8, 9, 10, 11], [15, 16, IGNORE_INDEX, IGNORE_INDEX]]
    ids1, targets1, pos1 = shard_batch(ids, labels, 1, 2, "contiguous")
    assert pos1.tolist() == [4, 5, 6, 7] and ids1[0].tolist() == [9, 10, 11, 0]
    assert targets1[0].tolist() == [10, 11, IGNORE_INDEX, IGNORE_INDEX]


def test_head_splits_are_uneven_but_complete():
    assert head_splits(4, 2) == [2, 2]
    assert head_splits(5, 4) == [2, 1, 1, 1]
    assert head_splits(2, 4) == [1, 1, 0, 0]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="layout='diagonal'"):
        shard_positions(8, 0, 2, "diagonal")
    with pytest.raises(ValueError, match="seq_len=9 is not a multiple of 4"):
        shard_positions(9, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="sp_rank=2"):
        shard_positions(8, 2, 2, "contiguous")
    with pytest.raises(ValueError, match="ulysses_size=3 does not divide sp_size=4"):
        shard_positions(8, 0, 4, "contiguous", ulysses_size=3)
    with pytest.raises(ValueError, match=r"labels \(2, 5\)"):
        shard_batch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), 0, 2)
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError,
                       match=r"ring_attention: q, k, v have shapes \(1, 2, 4, 8\), \(1, 2, 3, 8\)"):
        ring_attention(q, q[:, :, :3], q, group=None)
    with pytest.raises(ValueError, match="S_local=3"):
        ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], group=None, layout="zigzag")
    with pytest.raises(ValueError, match="layout='spiral'"):
        ring_attention(q, q, q, group=None, layout="spiral")
    with pytest.raises(ValueError, match="head_chunk=0; expected None or a positive int"):
        ring_attention(q, q, q, group=None, head_chunk=0)
    with pytest.raises(ValueError, match="ulysses_attention: q, k, v"):
        ulysses_attention(q, q, q[..., :4], group=None)
    with pytest.raises(ValueError, match="mode='star'"):
        sequence_parallel_core("star", sp_group=None)
    with pytest.raises(ValueError, match="needs ulysses_group and ring_group"):
        sequence_parallel_core("hybrid", ring_group=object())
    with pytest.raises(ValueError, match="needs sp_group"):
        sequence_parallel_core("ring")
    with pytest.raises(TypeError, match="Linear has no attention module with a .core. attribute"):
        apply_sequence_parallel(torch.nn.Linear(2, 2), "ring", sp_group=object())


def test_global_mean_loss_single_process():
    loss, mean = global_mean_loss(torch.tensor(6.0, requires_grad=True), torch.tensor(4), None, 2)
    assert mean.item() == 1.5 and loss.item() == 3.0


# ----- block kernels (single process) ----------------------------------------------------------


def _reference_block(q, k, v, dout, causal):
    """fp64 attention of a block with its lse, and q/k/v grads, by autograd."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        above = torch.ones_like(scores, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = scores.logsumexp(-1)
    out = scores.softmax(-1) @ v
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Causal blocks are square (a rank's own shard); off-diagonal ones may not be (zigzag halves).
@pytest.mark.parametrize("s_q,s_k,d,causal", [
    (1, 1, 8, True), (17, 17, 16, True), (97, 97, 64, True),
    (1, 1, 8, False), (97, 97, 64, False), (17, 33, 32, False), (5, 257, 128, False)])
def test_block_kernels_against_fp64(backend, dtype, causal, s_q, s_k, d, monkeypatch):
    monkeypatch.setattr(ring, "MATH_TILE_ROWS", 16)
    fwd, bwd = ring.BACKENDS[backend]
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, 3, s_q, d, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 3, s_k, d, generator=g) for _ in range(2))
    want = _reference_block(q, k, v, dout, causal)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = fwd(q, k, v, causal)
    grads = bwd(dout, q, k, v, out, lse, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        # Relative to the tensor's largest entry, at least 1 (with one key, dq is exactly 0).
        err = (got.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= tol, f"{name}: error {err:.3g} > {tol}"


# ----- distributed attention ------------------------------------------------------------------


def _groups(mode, world_size, ulysses):
    """(ulysses group, ring group) for the mode; the hybrid one from a (ring, ulysses) mesh, the
    ordering ``ParallelDims`` uses (sp rank = ring rank * ulysses + ulysses rank)."""
    if mode != "hybrid":
        return dist.group.WORLD, dist.group.WORLD
    mesh = init_device_mesh("cpu", (world_size // ulysses, ulysses),
                            mesh_dim_names=("ring", "ulysses"))
    return mesh.get_group("ulysses"), mesh.get_group("ring")


def _attention_rank(rank, world_size, q, k, v, dout, mode, layout, ulysses, backend, head_chunk):
    ulysses_group, ring_group = _groups(mode, world_size, ulysses)
    pos = shard_positions(q.shape[2], rank, world_size, layout, ulysses)
    q_l, k_l, v_l = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    if mode == "ulysses":
        out = ulysses_attention(q_l, k_l, v_l, ulysses_group)
    elif mode == "ring":
        out = ring_attention(q_l, k_l, v_l, ring_group, layout=layout, backend=backend,
                             head_chunk=head_chunk)
    else:
        core = sequence_parallel_core("hybrid", ulysses_group=ulysses_group, ring_group=ring_group,
                                      layout=layout, head_chunk=head_chunk)
        out = core(q_l, k_l, v_l)
    assert out.shape == q_l.shape and out.dtype == q.dtype
    out.backward(dout[:, :, pos])
    return pos, out.detach(), q_l.grad, k_l.grad, v_l.grad


def _sdpa(q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# (mode, world size, heads, sequence length, layout, ulysses degree, backend[, ring head chunk])
ATTENTION_CASES = [
    ("ulysses", 2, 4, 16, "contiguous", 2, "auto"),   # even heads
    ("ulysses", 2, 3, 17, "contiguous", 2, "auto"),   # uneven heads, length padded 17 -> 18
    ("ulysses", 4, 6, 12, "contiguous", 4, "auto"),   # uneven heads 2,2,1,1
    ("ulysses", 4, 2, 8, "contiguous", 4, "auto"),    # more ranks than heads: two ranks idle
    ("ring", 2, 3, 16, "contiguous", 1, "auto"),
    ("ring", 4, 2, 24, "contiguous", 1, "auto"),
    ("ring", 2, 3, 17, "zigzag", 1, "auto"),
    ("ring", 4, 2, 24, "zigzag", 1, "auto"),
    ("ring", 4, 2, 16, "zigzag", 1, "math"),
    ("ring", 2, 2, 8, "contiguous", 1, "math"),
    ("hybrid", 4, 2, 19, "zigzag", 2, "auto"),        # sp 4 > 2 heads
    ("hybrid", 4, 3, 16, "contiguous", 2, "auto"),    # uneven heads inside the Ulysses group
    ("hybrid", 4, 2, 8, "zigzag", 4, "auto"),         # Ulysses degree 4 > 2 heads: empty rings
    ("ring", 2, 3, 17, "zigzag", 1, "auto", 2),       # backward in head groups of 2 and 1
    ("ring", 4, 2, 24, "contiguous", 1, "math", 1),
    ("hybrid", 4, 3, 16, "contiguous", 2, "auto", 1),
]


def _run_attention(case, dtype, seed=0):
    mode, world_size, heads, seq, layout, ulysses, backend, *head_chunk = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(2, heads, seq, 16, generator=g) for _ in range(4))
    # Pad the sequence as shard_batch does: zeros at the end never reach a real query (causal).
    pad = -seq % (world_size * (2 if layout == "zigzag" else 1))
    padded = [F.pad(t, (0, 0, 0, pad)).to(dtype) for t in (q, k, v, dout)]
    results = run_distributed(_attention_rank, world_size, *padded, mode, layout, ulysses, backend,
                              *(head_chunk or [None]))
    full = [torch.zeros_like(padded[0]) for _ in range(4)]
    for pos, *parts in results:
        for whole, part in zip(full, parts):
            whole[:, :, pos] = part
    return [t[:, :, :seq] for t in full], (q, k, v, dout)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_matches_single_process_fp32(case, monkeypatch):
    # Small tiles so the math kernel's query tiling (and its causal offsets) is exercised; the
    # forked ranks inherit the setting.
    monkeypatch.setattr(ring, "MATH_TILE_ROWS", 3)
    ours, (q, k, v, dout) = _run_attention(case, torch.float32)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, _sdpa(q, k, v, dout)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _bidirectional_rank(rank, world_size, q, k, v, dout, mode, ulysses, valid, head_chunk):
    ulysses_group, ring_group = _groups(mode, world_size, ulysses)
    core = sequence_parallel_core(mode, sp_group=ulysses_group if mode == "ulysses" else ring_group,
                                  ulysses_group=ulysses_group, ring_group=ring_group, layout="contiguous",
                                  head_chunk=head_chunk, causal=False)
    core.valid_length = valid
    pos = shard_positions(q.shape[2], rank, world_size, "contiguous", ulysses)
    q_l, k_l, v_l = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    out = core(q_l, k_l, v_l)
    assert torch.isfinite(out).all()  # padded queries too
    # Padded rows carry no loss (what a model's loss does with them): zero upstream gradient.
    out.backward(dout[:, :, pos] * (pos < valid)[:, None])
    return pos, out.detach(), q_l.grad, k_l.grad, v_l.grad


# (mode, world size, heads, real length, ulysses degree, ring head chunk): bidirectional
# attention of a sequence padded at its end; 3 tokens on 4 ranks leaves a rank all padding.
BIDIRECTIONAL_CASES = [
    ("ulysses", 2, 3, 17, 2, None), ("ulysses", 2, 2, 16, 2, None), ("ring", 2, 3, 17, 1, None),
    ("ring", 4, 2, 21, 1, 1), ("ring", 4, 2, 3, 1, None), ("hybrid", 4, 2, 19, 2, None),
]


@pytest.mark.parametrize("case", BIDIRECTIONAL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_bidirectional_attention_with_end_padding_matches_sdpa(case):
    mode, world_size, heads, seq, ulysses, head_chunk = case
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(2, heads, seq, 8, generator=g) for _ in range(4))
    pad = -seq % world_size
    padded = [F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, dout)]
    results = run_distributed(_bidirectional_rank, world_size, *padded, mode, ulysses, seq, head_chunk)
    full = [torch.zeros_like(padded[0]) for _ in range(4)]
    for pos, *parts in results:
        for whole, part in zip(full, parts):
            whole[:, :, pos] = part
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q_, k_, v_)
    want.backward(dout)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), full, (want.detach(), q_.grad, k_.grad, v_.grad)):
        torch.testing.assert_close(got[:, :, :seq], ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if pad:  # padded keys are never attended: no gradient reaches them
        assert not full[2][:, :, seq:].any() and not full[3][:, :, seq:].any()


@pytest.mark.parametrize("case", [ATTENTION_CASES[1], ATTENTION_CASES[7], ATTENTION_CASES[10], ATTENTION_CASES[13]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision_error_within_twice_plain_torch(case, dtype):
    ours, (q, k, v, dout) = _run_attention(case, dtype)
    truth = _sdpa(*(t.double() for t in (q, k, v, dout)))
    plain = _sdpa(*(t.to(dtype) for t in (q, k, v, dout)))
    for name, got, ref, want in zip(("out", "dq", "dk", "dv"), ours, plain, truth):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        plain_err = (ref.double() - want).abs().max().item()
        assert err <= 2 * plain_err + 1e-6, \
            f"{name}: error {err:.3g} vs plain torch {plain_err:.3g}"


@pytest.mark.parametrize("case", [ATTENTION_CASES[1], ATTENTION_CASES[7], ATTENTION_CASES[10]],
                         ids=lambda c: "-".join(map(str, c)))
def test_attention_float64(case):
    ours, (q, k, v, dout) = _run_attention(case, torch.float64)
    truth = _sdpa(*(t.double() for t in (q, k, v, dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, truth):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def _autocast_rank(rank, world_size, q, k, v, backend):
    pos = shard_positions(q.shape[2], rank, world_size, "zigzag")
    q_l, k_l, v_l = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ring_attention(q_l, k_l, v_l, dist.group.WORLD, backend=backend)
        out.sum().backward()
    return pos, out.detach(), q_l.grad


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
def test_ring_under_autocast_keeps_input_precision(backend):
    # fp32 inputs inside a bf16 autocast region (as the trainer's --precision bf16 runs): the
    # kernels must not silently drop to bf16.
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    want, dq_want = _sdpa(q, k, v, torch.ones(1, 2, 16, 8))[:2]
    for pos, out, dq in run_distributed(_autocast_rank, 2, q, k, v, backend):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want[:, :, pos], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(dq, dq_want[:, :, pos], atol=2e-5, rtol=1e-4)


def _work_rank(rank, world_size, layout):
    """Score entries this rank's block kernels compute (causal blocks count their lower half)."""
    work = [0]
    fwd, bwd = ring.BACKENDS["math"]

    def counting_fwd(q, k, v, causal):
        n = q.shape[-2] * k.shape[-2]
        work[0] += (n + q.shape[-2]) // 2 if causal else n
        return fwd(q, k, v, causal)

    ring.BACKENDS["math"] = (counting_fwd, bwd)
    x = torch.randn(1, 1, 8, 4)
    ring_attention(x, x, x, dist.group.WORLD, layout=layout, backend="math")
    return work[0]


def test_zigzag_balances_causal_work():
    # 32 tokens on 4 ranks: the causal triangle has 32 * 33 / 2 = 528 score entries.
    zigzag = run_distributed(_work_rank, 4, "zigzag")
    contiguous = run_distributed(_work_rank, 4, "contiguous")
    assert sum(zigzag) == sum(contiguous) == 528
    assert len(set(zigzag)) == 1  # every rank the same
    assert contiguous == [36, 100, 164, 228]  # rank r: r full blocks and one triangle


def _comm_rank(rank, world_size, mode, ulysses, heads, seq, dtype):
    ulysses_group, ring_group = _groups(mode, world_size, ulysses)
    core = sequence_parallel_core(mode, sp_group=dist.group.WORLD, ulysses_group=ulysses_group,
                                  ring_group=ring_group, layout="zigzag")
    q, k, v = (torch.randn(2, heads, seq // world_size, 8, dtype=dtype, requires_grad=True)
               for _ in range(3))
    with count_sent_bytes() as forward:
        out = core(q, k, v)
    with count_sent_bytes() as backward:
        out.sum().backward()
    return forward.total, backward.total


@pytest.mark.parametrize("mode,world_size,ulysses,heads", [
    ("ulysses", 2, 2, 3), ("ulysses", 4, 4, 6), ("ring", 4, 1, 2), ("hybrid", 4, 2, 3)])
def test_measured_comm_volume_matches_theory(mode, world_size, ulysses, heads):
    seq, dtype = 16, torch.bfloat16
    measured = run_distributed(_comm_rank, world_size, mode, ulysses, heads, seq, dtype)
    for rank, (forward, backward) in enumerate(measured):
        theory = comm_bytes_per_layer(mode, batch=2, seq_len=seq, num_heads=heads, head_dim=8,
                                      sp=world_size, ulysses=ulysses, dtype=dtype, sp_rank=rank)
        assert (forward, backward) == (theory["forward"], theory["backward"]), f"rank {rank}"


def _layout_rank(rank, world_size, heads):
    """What Ulysses hands the attention core's backward, and what it keeps of the caller's q, k, v."""
    import weakref

    from ds4sci.parallel.ulysses import head_splits, head_to_seq, ulysses_attention_releasing

    h_j = head_splits(heads, world_size)[rank]
    x = torch.randn(1, h_j, 8 * world_size, 4, requires_grad=True)
    seen = []
    y = x * 1.0  # a non-leaf, so the hook sees the gradient exactly as head_to_seq returns it
    y.register_hook(lambda g: seen.append(g.transpose(1, 2).is_contiguous()))
    head_to_seq(y, dist.group.WORLD, heads).sum().backward()
    qkv = [torch.randn(1, heads, 8, 4) for _ in range(3)]
    refs = [weakref.ref(t) for t in qkv]
    freed = []

    def core(q, k, v):
        freed.append([r() is None for r in refs])
        return q
    ulysses_attention_releasing(qkv, dist.group.WORLD, core=core)
    return seen, freed, qkv


@pytest.mark.parametrize("heads", [4, 3])
def test_ulysses_frees_sent_shards_and_returns_grads_in_attention_layout(heads):
    """The local q, k, v are freed once sent (the caller handed over its only references), and
    the gradient head_to_seq returns is laid out [B, S, H_j, D] as attention's backward wants."""
    for seen, freed, qkv in run_distributed(_layout_rank, 2, heads):
        assert seen == [True]
        assert freed == [[True, True, True]] and qkv == []


def _largest_rank(rank, world_size, mode, head_chunk):
    from memory_helpers import LargestAllocation

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g, requires_grad=True) for _ in range(3))
    with LargestAllocation() as mode_:
        if mode == "ulysses":
            out = ulysses_attention(q, k, v, dist.group.WORLD)
        else:
            out = ring_attention(q, k, v, dist.group.WORLD, head_chunk=head_chunk)
        out.sum().backward()
    return mode_.largest


@pytest.mark.parametrize("mode,head_chunk", [("ulysses", None), ("ring", None), ("ring", 1)])
def test_attention_memory_is_linear_in_the_sequence(mode, head_chunk):
    """No tensor of forward + backward has S_local x S elements (scores): what the parallel-scaling
    benchmark's linear fit of peak memory against S assumes."""
    s_local, s = 256, 512
    for largest in run_distributed(_largest_rank, 2, mode, head_chunk):
        assert largest <= 3 * 2 * s * 16 < s_local * s, largest


def test_failing_rank_ends_the_ring_with_an_error():
    def body(rank, world_size):
        x = torch.randn(1, 2, 4, 8)
        if rank == 1:
            raise RuntimeError("rank 1 failed before attention")
        ring_attention(x, x, x, dist.group.WORLD)  # rank 0 waits for a peer that is gone

    start = time.monotonic()
    with pytest.raises(RuntimeError,
                       match="rank 1 failed first:(.|\n)*rank 1 failed before attention"):
        run_distributed(body, 2, timeout=60, pg_timeout=10)
    assert time.monotonic() - start < 10


# ----- whole GenSLM -------------------------------------------------------------------------


def _batch(config, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (2, seq), generator=g)
    labels = ids.clone()
    labels[1, seq - 4:] = IGNORE_INDEX  # a shorter, right-padded record
    ids[1, seq - 4:] = 3
    return ids, labels


def _model_rank(rank, world_size, config, state, ids, labels, mode, layout, ulysses):
    model = GenSLM(config)
    model.load_state_dict(state)
    ulysses_group, ring_group = _groups(mode, world_size, ulysses)
    apply_sequence_parallel(model, mode, sp_group=dist.group.WORLD if mode != "hybrid" else None,
                            ulysses_group=ulysses_group, ring_group=ring_group, layout=layout,
                            head_chunk=config.attention_head_chunk)
    model = copy.deepcopy(model)  # a copy shares the process groups (e.g. for an EMA model)
    ids_l, targets_l, pos_l = shard_batch(ids, labels, rank, world_size, layout, ulysses, pad_id=3)
    hidden = model.hidden_states(ids_l, positions=pos_l)
    loss_sum, count, _ = model.loss_sum(hidden, targets_l)
    loss, mean = global_mean_loss(loss_sum, count, dist.group.WORLD)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)  # replicated weights: their gradient is the sum over shards
        grads[name] = p.grad
    return mean, grads


# (mode, world size, layout, ulysses degree, sequence length, config changes)
MODEL_CASES = [
    ("ulysses", 2, "contiguous", 2, 19, {}),
    ("ulysses", 2, "contiguous", 2, 16, dict(hidden_size=48, num_attention_heads=3)),
    ("ulysses", 2, "contiguous", 2, 19, dict(activation_checkpointing="full", checkpoint_num_layers=2,
                                             attention_head_chunk=1, mlp_chunk_size=4)),
    ("ring", 2, "zigzag", 1, 21, dict(loss_chunk_size=5)),
    ("ring", 4, "zigzag", 1, 5, {}),  # padded 5 -> 8: chunks of one token, some all padding
    ("ring", 4, "contiguous", 1, 18, dict(activation_checkpointing="full")),
    ("hybrid", 4, "zigzag", 2, 23, dict(hidden_size=32, num_attention_heads=2)),
    ("ring", 2, "zigzag", 1, 21, dict(activation_checkpointing="full", attention_head_chunk=1)),
    ("hybrid", 4, "zigzag", 2, 23, dict(activation_checkpointing="full", attention_head_chunk=1)),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_genslm_loss_and_grads_match_single_process(case):
    mode, world_size, layout, ulysses, seq, changes = case
    config = preset("genslm-tiny").replace(**changes)
    model = GenSLM(config)
    ids, labels = _batch(config, seq)
    out = model(ids, labels=labels)
    out.loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = run_distributed(_model_rank, world_size, config, state, ids, labels, mode, layout,
                              ulysses)
    for mean, grads in results:
        torch.testing.assert_close(mean, out.loss.detach(), atol=1e-6, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"grad of {name}: {m}")


# ----- sequence parallelism composed with FSDP (dp x sp) and tensor parallelism (tp x sp) ------


def _composed_rank(rank, world_size, config, state, ids, labels, dims_kwargs, layout):
    from ds4sci.parallel import ParallelDims
    from ds4sci.parallel.fsdp import apply_fsdp
    from ds4sci.models.genslm.parallelize import tensor_parallel_genslm

    dims = ParallelDims(world_size=world_size, **dims_kwargs)
    mesh = dims.build_mesh("cpu")
    model = GenSLM(config)
    model.load_state_dict(state)
    if dims.tp_enabled:
        tensor_parallel_genslm(model, mesh.tp)
    hybrid = dims.sp_mode == "hybrid"
    apply_sequence_parallel(model, dims.sp_mode, sp_group=mesh.group("sp"),
                            ulysses_group=mesh.group("ulysses") if hybrid else None,
                            ring_group=mesh.group("ring") if hybrid else None, layout=layout)
    apply_fsdp(model, mesh.dp_sp)
    # Each data-parallel rank takes its rows of the batch, then its shard of their sequence.
    share = ids.shape[0] // dims.dp
    rows = slice(mesh.dp_rank * share, (mesh.dp_rank + 1) * share)
    layout = "contiguous" if dims.sp_mode == "ulysses" else layout
    ids_l, targets_l, pos_l = shard_batch(ids[rows], labels[rows], mesh.sp_rank, dims.sp, layout,
                                          dims.ulysses, pad_id=3)
    hidden = model.hidden_states(ids_l, positions=pos_l)
    loss_sum, count, _ = model.loss_sum(hidden, targets_l)
    # FSDP (over dp x sp: the ranks of one sequence hold the same weights) averages gradients.
    loss, mean = global_mean_loss(loss_sum, count, mesh.group("dp_sp"), dims.dp_sp)
    loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters()}
    return mean, grads


COMPOSED_CASES = [
    (dict(dp=2, sp=2, sp_mode="ulysses"), "contiguous", 19),
    (dict(dp=2, sp=2, sp_mode="ring"), "zigzag", 21),
    (dict(dp=1, sp=2, tp=2, sp_mode="ulysses"), "contiguous", 17),  # FSDP over sp, x TP
    (dict(dp=1, sp=2, tp=2, sp_mode="ring"), "zigzag", 22),
    (dict(dp=1, sp=4, sp_mode="hybrid", sp_ulysses=2), "zigzag", 18),
]


@pytest.mark.parametrize("case", COMPOSED_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c[0].items()) + f"-{c[1]}")
def test_sequence_parallel_composes_with_fsdp_and_tp(case):
    dims_kwargs, layout, seq = case
    config = preset("genslm-tiny")
    model = GenSLM(config)
    ids, labels = _batch(config, seq)
    out = model(ids, labels=labels)
    out.loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = run_distributed(_composed_rank, 4, config, state, ids, labels, dims_kwargs, layout)
    for mean, grads in results:
        torch.testing.assert_close(mean, out.loss.detach(), atol=1e-6, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"grad of {name}: {m}")
