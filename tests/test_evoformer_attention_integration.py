"""Evoformer attention with the rest of PyTorch, its errors, dispatch and memory bound."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4sci.ops.evoformer_attention import (
    Backend, dispatch, evoformer_attention, evoformer_attention_reference, torch_tiled,
)
from evoformer_helpers import make_inputs, run_with_grads, truth
from memory_helpers import LargestAllocation


def _canonical(dtype=torch.float32, lead=(1, 3), l=9, heads=2, dim=8):
    return make_inputs(lead, l, l, heads, dim, dtype, [(*lead[:-1], lead[-1], 1, 1, l),
                                                       (*lead[:-1], 1, heads, l, l)], [False, True])


# --- composition with autograd tooling, autocast and torch.compile --------------------------

def test_activation_checkpointing_gives_same_grads():
    q, k, v, biases, do = _canonical()
    plain = run_with_grads(lambda q, k, v, b: evoformer_attention(q, k, v, b), q, k, v, biases, do)

    def checkpointed(q, k, v, b):
        return torch.utils.checkpoint.checkpoint(
            lambda *a: evoformer_attention(a[0], a[1], a[2], a[3:]), q, k, v, *b, use_reentrant=False
        )

    for a, b in zip(plain, run_with_grads(checkpointed, q, k, v, biases, do)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_leaves_float64_alone_and_accepts_half_bias():
    q, k, v, biases, _ = _canonical(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evoformer_attention(q, k, v, biases).dtype == torch.float64
    q, k, v, (mask, pair), _ = _canonical(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = evoformer_attention(q, k, v, [mask.bfloat16(), pair])
    assert out.dtype == torch.bfloat16


def test_autocast_casts_to_autocast_dtype():
    q, k, v, biases, do = _canonical(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = evoformer_attention(q, k, v, biases)
    assert out.dtype == torch.bfloat16
    out.float().backward(do)
    assert q.grad.dtype == torch.float32 and biases[1].grad.dtype == torch.float32
    ref = evoformer_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), biases)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


_NO_COMPILER = shutil.which("c++") is None and shutil.which("g++") is None


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(_NO_COMPILER, reason="inductor needs a C++ compiler")]),
])
def test_torch_compile_fullgraph(compile_backend):
    q, k, v, biases, do = _canonical()

    def layer(q, k, v, mask, pair):
        return evoformer_attention(q * 1.5, k, v, [mask, pair]).relu()

    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    eager = run_with_grads(lambda q, k, v, b: layer(q, k, v, *b), q, k, v, biases, do)
    ours = run_with_grads(lambda q, k, v, b: compiled(q, k, v, *b), q, k, v, biases, do)
    for a, b in zip(eager, ours):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_custom_ops_pass_opcheck(backend, layout):
    q, k, v, (mask, pair), do = _canonical()
    from ds4sci.ops.evoformer_attention.op import _bwd_op, _fwd_op

    q = q.detach()
    if layout == "permuted":  # dense but not contiguous: outputs must still match the fake
        q = q.transpose(-2, -3).contiguous().transpose(-2, -3)
    args = (q, k.detach(), v.detach(), [mask, pair.detach()], backend, 4096)
    torch.library.opcheck(_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    out, stats = _fwd_op(*args)
    assert out.is_contiguous()
    bwd_args = (do, *args[:4], out, stats, [False, True], backend, 4096)
    torch.library.opcheck(_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


# --- property-based fuzzing of shapes and broadcast patterns -----------------------------

@st.composite
def _cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    l_q, l_k = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    heads, dim = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    full = (*lead, heads, l_q, l_k)
    biases = []
    for _ in range(draw(st.integers(0, 3))):
        rank = draw(st.integers(1, len(full)))
        shape = tuple(s if draw(st.booleans()) else 1 for s in full[len(full) - rank:])
        biases.append((shape, draw(st.booleans())))
    tile = draw(st.sampled_from([1, 5, 64, None]))
    return lead, l_q, l_k, heads, dim, biases, tile, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_fuzz_shapes_and_broadcasts_float64(case):
    lead, l_q, l_k, heads, dim, biases, tile, seed = case
    q, k, v, bs, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float64,
                                  [s for s, _ in biases], [g for _, g in biases], seed=seed)
    ours = run_with_grads(lambda q, k, v, b: evoformer_attention(q, k, v, b, tile_elements=tile),
                          q, k, v, bs, do)
    for a, b in zip(ours, truth(q, k, v, bs, do)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mutate,error,pattern",
    [
        (lambda q, k, v, b: (q[0, 0, 0], k, v, b), ValueError, r"q has shape \(2, 8\); expected rank >= 3, layout \[\*, L, H, D\]"),
        (lambda q, k, v, b: (q, k[..., :4], v[..., :4], b), ValueError, r"k has shape .*expected H=2 and D=8"),
        (lambda q, k, v, b: (q, k[..., :1, :], v[..., :1, :], b), ValueError, r"expected H=2"),
        (lambda q, k, v, b: (q, k, v[:, :, :5], b), ValueError, r"k has shape \(1, 3, 9, 2, 8\) and v has \(1, 3, 5, 2, 8\)"),
        (lambda q, k, v, b: (q, k[0], v[0], b), ValueError, r"k has shape \(3, 9, 2, 8\); its leading dims must equal q's \(1, 3\)"),
        (lambda q, k, v, b: (q, k.double(), v, b), TypeError, r"k has dtype torch.float64 but q has torch.float32"),
        (lambda q, k, v, b: (q.int(), k, v, b), TypeError, r"q has dtype torch.int32; expected one of"),
        (lambda q, k, v, b: (q[:, :0], k, v, b), ValueError, r"q has shape \(1, 0, 9, 2, 8\) with no elements"),
        (lambda q, k, v, b: (q, k, v, [b[1][..., :8]]), ValueError,
         r"biases\[0\] has shape \(1, 1, 2, 9, 8\); it must broadcast to \[\*, H=2, L_q=9, L_k=9\] = \(1, 3, 2, 9, 9\)"),
        (lambda q, k, v, b: (q, k, v, [b[0], b[1].unsqueeze(0)]), ValueError, r"biases\[1\] has shape \(1, 1, 1, 2, 9, 9\)"),
        (lambda q, k, v, b: (q, k, v, [b[0].half()]), TypeError, r"biases\[0\] has dtype torch.float16; expected q's dtype torch.float32 or float32"),
        (lambda q, k, v, b: (q, k, v, [b[0].bool()]), TypeError, r"biases\[0\] has dtype torch.bool"),
        (lambda q, k, v, b: (q, k, v, ["mask"]), TypeError, r"biases\[0\] must be a torch.Tensor or None, got str"),
        (lambda q, k, v, b: ([1.0], k, v, b), TypeError, r"q must be a torch.Tensor, got list"),
        (lambda q, k, v, b: (q, k.to("meta"), v.to("meta"), b), ValueError, r"k is on meta but q is on cpu"),
        (lambda q, k, v, b: (q, k, v, [b[0].to("meta")]), ValueError, r"biases\[0\] is on meta but q is on cpu"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_input_errors_name_argument_and_shape(mutate, error, pattern):
    q, k, v, biases, _ = _canonical()
    with pytest.raises(error, match=pattern):
        evoformer_attention(*mutate(q, k, v, biases))


def test_bad_tile_elements():
    q, k, v, biases, _ = _canonical()
    with pytest.raises(ValueError, match=r"tile_elements=0; expected >= 1"):
        evoformer_attention(q, k, v, biases, tile_elements=0)


# --- dispatch ---------------------------------------------------------------------------------

def test_auto_picks_torch_and_explicit_backends_work():
    q, k, v, biases, do = _canonical()
    assert dispatch.select("auto", q, biases).name == "torch"
    results = [run_with_grads(lambda q, k, v, b: evoformer_attention(q, k, v, b, backend=name),
                              q, k, v, biases, do) for name in ("reference", "torch")]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_unknown_backend_lists_known_ones():
    q, k, v, biases, _ = _canonical()
    with pytest.raises(ValueError, match=r"backend='cutlass' is unknown; expected 'auto' or one of \['reference', 'torch'"):
        evoformer_attention(q, k, v, biases, backend="cutlass")


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    fake = Backend(
        name="fake-gpu", priority=100, dtypes=frozenset({torch.float16}), max_head_dim=4,
        device_types=frozenset({"cuda"}), forward=torch_tiled.forward, backward=torch_tiled.backward,
        environment_reasons=lambda: ["triton is not installed"],
    )
    monkeypatch.setitem(dispatch._BACKENDS, "fake-gpu", fake)
    q, k, v, biases, _ = _canonical()
    with pytest.raises(RuntimeError) as info:
        evoformer_attention(q, k, v, biases, backend="fake-gpu")
    message = str(info.value)
    for reason in ("triton is not installed", "device type 'cpu' not in ['cuda']",
                   "dtype torch.float32 not in ['float16']", "head dim D=8 > 4"):
        assert reason in message
    # auto skips it and still runs
    assert dispatch.select("auto", q, biases).name == "torch"


# --- memory: no tensor of the logits' size is ever made ------------------------------------

def test_no_op_creates_a_logits_sized_tensor():
    lead, l, heads, dim, tile = (1, 32), 64, 4, 8, 8192
    q, k, v, (mask, pair), do = make_inputs(lead, l, l, heads, dim, torch.float32,
                                            [(1, 32, 1, 1, l), (1, 1, heads, l, l)], [True, True])
    logits_numel = 32 * heads * l * l
    with torch.no_grad(), LargestAllocation() as mode:
        out, stats = torch_tiled.forward(q, k, v, [mask, pair], tile)
        torch_tiled.backward(do, q, k, v, [mask, pair], out, stats, [True, True], tile)
    biggest_input = max(t.numel() for t in (q, pair))
    assert mode.largest <= max(biggest_input, tile), (mode.largest, biggest_input, tile)
    assert mode.largest * 8 <= logits_numel


@pytest.mark.subprocess
def test_peak_rss_stays_near_the_floor():
    """Fresh process, fwd+bwd where the logits would be 256 MiB: peak stays near the floor."""
    from ds4sci.bench.evoformer_attention import floor_bytes, logits_bytes

    shape = (1, 128, 256, 8, 8)
    proc = subprocess.run(
        [sys.executable, "-m", "ds4sci.bench.evoformer_attention", "--worker", "ds4sci",
         ",".join(map(str, shape)), "float32"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    floor, logits = floor_bytes(shape, torch.float32), logits_bytes(shape, torch.float32)
    assert result["status"] == "ok"
    assert result["peak_bytes"] < 1.5 * floor + 32 * 2**20, (result, floor)
    assert result["peak_bytes"] < logits / 2
