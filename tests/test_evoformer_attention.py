"""Evoformer attention vs the fp64 truth: values and every gradient, dtypes x awkward shapes."""

import pytest
import torch

import ds4sci
from ds4sci.ops.evoformer_attention import evoformer_attention, evoformer_attention_reference
from evoformer_helpers import assert_within_rule, make_inputs, plain_torch, run_with_grads, truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (lead dims, L_q, L_k, H, D): every L in 1, 17, 97, 257, every D in 8..128, L_q != L_k.
SHAPES = [
    ((1, 3), 1, 1, 2, 8),
    ((2, 2), 17, 17, 4, 16),
    ((1, 2), 97, 97, 2, 32),
    ((1, 1), 257, 257, 1, 8),
    ((3,), 17, 97, 2, 64),
    ((1, 2), 97, 17, 1, 128),
    ((), 1, 257, 3, 16),
    ((2, 1, 2), 5, 7, 2, 24),
]


def _bias_shapes(lead, l_q, l_k, heads):
    """The two canonical Evoformer biases for these leading dims: mask then pair."""
    mask = (*lead[:-1], lead[-1] if lead else 1, 1, 1, l_k) if lead else (1, 1, l_k)
    pair = (*lead[:-1], 1, heads, l_q, l_k) if lead else (heads, l_q, l_k)
    return mask, pair


def _check(q, k, v, biases, grad_out, dtype, **kw):
    fn = lambda q, k, v, b: evoformer_attention(q, k, v, b, **kw)
    ours = run_with_grads(fn, q, k, v, biases, grad_out)
    names = ["out", "dq", "dk", "dv"] + [f"dbias{i}" for i, b in enumerate(biases) if b.requires_grad]
    assert_within_rule(ours, truth(q, k, v, biases, grad_out), plain_torch(q, k, v, biases, grad_out),
                       dtype, names)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_both_biases_match_reference(dtype, shape, tiles):
    lead, l_q, l_k, heads, dim = shape
    mask, pair = _bias_shapes(lead, l_q, l_k, heads)
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [mask, pair], [False, True])
    tile = None if tiles == "default" else 3 * heads * l_k  # several query tiles per row block
    _check(q, k, v, biases, do, dtype, tile_elements=tile)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "which,grads",
    [((), ()), (("mask",), (False,)), (("pair",), (True,)), (("pair",), (False,)),
     (("mask", "pair"), (True, True)), (("mask", "pair"), (False, False))],
    ids=["none", "mask", "pair-grad", "pair-nograd", "both-grad", "both-nograd"],
)
def test_each_bias_with_and_without_grad(dtype, which, grads):
    lead, l_q, l_k, heads, dim = (2, 3), 17, 19, 4, 16
    mask, pair = _bias_shapes(lead, l_q, l_k, heads)
    shapes = [{"mask": mask, "pair": pair}[w] for w in which]
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype, shapes, grads)
    _check(q, k, v, biases, do, dtype, tile_elements=2 * heads * l_k)


@pytest.mark.parametrize(
    "bias_shape",
    [
        (4, 17, 19),  # [H, L_q, L_k], no leading dims
        (19,),  # key mask only
        (2, 3, 4, 17, 19),  # full size
        (1, 3, 1, 17, 1),  # per-sequence query bias
        (2, 1, 1, 1, 19),  # per-batch key mask
        (3, 4, 1, 19),  # [N, H, 1, L_k] without B
        (1, 1, 1, 1, 1),  # a scalar
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_other_broadcast_patterns(bias_shape, dtype):
    lead, l_q, l_k, heads, dim = (2, 3), 17, 19, 4, 8
    _, pair = _bias_shapes(lead, l_q, l_k, heads)
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [bias_shape, pair], [True, True])
    _check(q, k, v, biases, do, dtype, tile_elements=5 * heads * l_k)


def test_gather_path_when_batch_chunks_cross_bias_rows():
    # Bias 0 varies along the first leading dim only: chunks of 3 flat rows span two of its rows.
    # Bias 1 varies along the second: within a chunk its rows jump back (gather).
    from ds4sci.ops.evoformer_attention.torch_tiled import _chunks, _FlatBias

    lead, l_q, l_k, heads, dim = (4, 5), 3, 6, 2, 8
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float64,
                                      [(4, 1, 1, 3, 6), (1, 5, 2, 1, 6)], [True, True])
    tile = 3 * heads * l_k * max(l_q, dim)  # three flat batch rows per chunk
    kinds = {_FlatBias(b, lead, True).batch_slice(b0, b1).kind
             for b in biases for b0, b1, _ in _chunks(20, l_q, l_k, heads, dim, tile)}
    assert kinds == {"const", "range", "gather"}
    ours = run_with_grads(lambda *a: evoformer_attention(*a[:3], a[3], tile_elements=tile),
                          q, k, v, biases, do)
    for o, t in zip(ours, truth(q, k, v, biases, do)):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [1, 7, 40, None])
def test_gradcheck_float64(tile):
    lead, l_q, l_k, heads, dim = (2, 2), 5, 4, 2, 3
    q, k, v, biases, _ = make_inputs(lead, l_q, l_k, heads, dim, torch.float64,
                                     [(2, 2, 1, 1, 4), (2, 1, 2, 5, 4)], [True, True])
    fn = lambda q, k, v, m, p: evoformer_attention(q, k, v, [m, p], tile_elements=tile)
    assert torch.autograd.gradcheck(fn, (q, k, v, *biases))


def test_expanded_mask_is_not_copied_and_matches():
    from ds4sci.ops.evoformer_attention.torch_tiled import _FlatBias

    lead, l_q, l_k, heads, dim = (2, 3), 9, 9, 2, 8
    q, k, v, _, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float64)
    mask = torch.randn(2, 3, 1, 1, l_k, dtype=torch.float64).expand(2, 3, heads, l_q, l_k)
    assert _FlatBias(mask, lead, narrow_expanded=True).rows.numel() == 2 * 3 * l_k
    out = evoformer_attention(q, k, v, [mask])
    ref = evoformer_attention_reference(q, k, v, [mask], compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_finite_mask_match_reference(dtype):
    lead, l_q, l_k, heads, dim = (1, 4), 6, 7, 2, 8
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [(1, 1, 2, 6, 7)], [True])
    mask = torch.zeros(1, 4, 1, 1, l_k)
    mask[0, 1] = -1e9  # sequence 1: every key masked, as OpenFold does
    mask[0, 2, ..., :3] = -1e9
    _check(q, k, v, [mask, *biases], do, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_with_inf_give_zero_not_nan(dtype):
    lead, l_q, l_k, heads, dim = (1, 3), 5, 6, 2, 8
    q, k, v, (pair,), do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [(1, 1, 2, 5, 6)], [True])
    mask = torch.zeros(1, 3, 1, 1, l_k, dtype=dtype)
    mask[0, 1] = float("-inf")
    mask[0, 2, ..., 4:] = float("-inf")
    mask.requires_grad_()
    out = evoformer_attention(q, k, v, [mask, pair], tile_elements=2 * heads * l_k)
    out.backward(do)
    for t in (out, q.grad, k.grad, v.grad, pair.grad, mask.grad):
        assert not torch.isnan(t).any()
    assert (out[0, 1] == 0).all()
    assert (q.grad[0, 1] == 0).all() and (k.grad[0, 1] == 0).all() and (v.grad[0, 1] == 0).all()
    assert (mask.grad[0, 1] == 0).all() and (mask.grad[0, 2, ..., 4:] == 0).all()
    ref = evoformer_attention_reference(q, k, v, [mask, pair])
    torch.testing.assert_close(out.float(), ref, **_loose(dtype))


def _loose(dtype):
    return {"rtol": 0, "atol": {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]}


def test_float32_bias_with_half_inputs():
    q, k, v, (pair,), do = make_inputs((1, 2), 9, 9, 2, 8, torch.bfloat16, [(1, 1, 2, 9, 9)], [True],
                                       bias_dtype=torch.float32)
    _check(q, k, v, [pair], do, torch.bfloat16)
    out = evoformer_attention(q, k, v, [pair])
    out.backward(do)
    assert out.dtype == torch.bfloat16 and pair.grad.dtype == torch.float32


@pytest.mark.parametrize("length", [1, 6])
def test_does_not_modify_inputs(length):
    q, k, v, biases, do = make_inputs((1, 2), length, length, 2, 8, torch.float32,
                                      [(1, 2, 1, 1, length)], [True])
    biases[0].data[0, 0] = float("-inf")
    snapshot = [t.detach().clone() for t in (q, k, v, *biases, do)]
    evoformer_attention(q, k, v, biases).backward(do)
    for before, after in zip(snapshot, (q, k, v, *biases, do)):
        assert torch.equal(before, after)


def test_ds4sci_evoformer_attention_dropin():
    b, n, length, heads, dim = 1, 3, 11, 2, 8
    q, k, v, (mask, pair), do = make_inputs((b, n), length, length, heads, dim, torch.float32,
                                            [(b, n, 1, 1, length), (b, 1, heads, length, length)],
                                            [False, True])
    ours = ds4sci.DS4Sci_EvoformerAttention(q, k, v, [mask, pair])
    torch.testing.assert_close(ours, evoformer_attention(q, k, v, [mask, pair]))
    for biases in ([], [None], [None, pair], [mask], [mask, None]):
        expected = evoformer_attention(q, k, v, [x for x in biases if x is not None])
        torch.testing.assert_close(ds4sci.DS4Sci_EvoformerAttention(q, k, v, biases), expected)
    with pytest.raises(ValueError, match=r"biases\[0\] \(mask bias\) has shape \(1, 3, 1, 11\)"):
        ds4sci.DS4Sci_EvoformerAttention(q, k, v, [mask[:, :, 0]])
    with pytest.raises(ValueError, match=r"biases\[1\] \(pair bias\).*expected \(1, 1, 2, 11, 11\)"):
        ds4sci.DS4Sci_EvoformerAttention(q, k, v, [mask, pair.expand(1, 3, 2, 11, 11)])
    with pytest.raises(ValueError, match="at most 2"):
        ds4sci.DS4Sci_EvoformerAttention(q, k, v, [mask, pair, pair])
    with pytest.raises(ValueError, match=r"Q has shape \(3, 11, 2, 8\); expected rank 5"):
        ds4sci.DS4Sci_EvoformerAttention(q[0], k[0], v[0], [])
