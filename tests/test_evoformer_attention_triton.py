"""The Triton backend vs the fp64 truth: values, every gradient, masks, determinism, errors.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set per test; the
backend loads a private interpreter copy of its kernels, so other tests are unaffected) on tiny
shapes; with a GPU present every case also runs compiled on CUDA. Interpreter blocks are 32
wide, so L = 33 crosses a block edge and L = 1, 17 are partial blocks.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from ds4sci.ops.evoformer_attention import dispatch, evoformer_attention, triton_backend  # noqa: E402
from evoformer_helpers import assert_within_rule, make_inputs, plain_torch, run_with_grads, truth  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _triton(device):
    """The op on ``device`` with the Triton backend, for CPU leaves (grads flow back to CPU)."""
    def fn(q, k, v, biases):
        moved = [t.to(device) for t in (q, k, v, *biases)]
        return evoformer_attention(*moved[:3], moved[3:], backend="triton").cpu()
    return fn


def _check(q, k, v, biases, grad_out, dtype, device):
    ours = run_with_grads(_triton(device), q, k, v, biases, grad_out)
    names = ["out", "dq", "dk", "dv"] + [f"dbias{i}" for i, b in enumerate(biases) if b.requires_grad]
    assert_within_rule(ours, truth(q, k, v, biases, grad_out), plain_torch(q, k, v, biases, grad_out),
                       dtype, names)


def _bias_shapes(lead, l_q, l_k, heads):
    """Mask ``[*, 1, 1, L_k]`` and pair ``[*, 1, H, L_q, L_k]`` (broadcast over the last lead dim)."""
    return (*lead, 1, 1, l_k), (*lead[:-1], 1, heads, l_q, l_k)


# (lead dims, L_q, L_k, H, D): L in 1, 17, 33; D in 8, 16, 32, 64, 128 (padded to 16+);
# L_q != L_k both ways.
SHAPES = [
    ((1, 2), 1, 1, 2, 8),
    ((1, 2), 17, 17, 2, 16),
    ((1, 2), 33, 33, 1, 32),
    ((2,), 17, 33, 2, 8),
    ((2, 1, 2), 33, 5, 1, 24),
    ((1, 1), 5, 9, 1, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_both_bias_grads_match_reference(device, dtype, shape):
    lead, l_q, l_k, heads, dim = shape
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype,
                                      _bias_shapes(lead, l_q, l_k, heads), [True, True])
    _check(q, k, v, biases, do, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_128(device, dtype):
    lead, l_q, l_k, heads, dim = (1, 2), 3, 17, 1, 128
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, dtype,
                                      _bias_shapes(lead, l_q, l_k, heads), [False, True])
    _check(q, k, v, biases, do, dtype, device)


@pytest.mark.parametrize("which,grads", [((), ()), (("mask",), (False,)), (("pair",), (True,)),
                                         (("pair", "mask"), (False, True))],
                         ids=["none", "mask-nograd", "pair-grad", "pair-then-mask-grad"])
def test_each_bias_with_and_without_grad(device, which, grads):
    lead, l_q, l_k, heads, dim = (1, 3), 17, 19, 2, 8
    mask, pair = _bias_shapes(lead, l_q, l_k, heads)
    shapes = [{"mask": mask, "pair": pair}[w] for w in which]
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float32, shapes, grads)
    _check(q, k, v, biases, do, torch.float32, device)


@pytest.mark.parametrize(
    "bias_shape",
    [
        (2, 17, 19),  # [H, L_q, L_k], no leading dims
        (19,),  # key mask only
        (2, 3, 2, 17, 19),  # full size
        (1, 3, 1, 17, 1),  # per-sequence query bias
        (2, 1, 1, 1, 19),  # per-batch key mask
        (3, 2, 1, 19),  # [N, H, 1, L_k] without B
        (1, 1, 1, 1, 1),  # a scalar
    ],
    ids=str,
)
def test_other_broadcast_patterns(device, bias_shape):
    lead, l_q, l_k, heads, dim = (2, 3), 17, 19, 2, 8
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float32,
                                      [bias_shape, (1, 1, heads, l_q, l_k)], [True, True])
    _check(q, k, v, biases, do, torch.float32, device)


def test_expanded_bias_with_grad_and_strided_inputs(device):
    """A stride-0 (expanded) bias that needs a gradient, and q/k/v that are permuted views."""
    lead, l_q, l_k, heads, dim = (2, 2), 9, 11, 2, 8
    q, k, v, _, do = make_inputs(lead, l_q, l_k, heads, dim, torch.float32)
    q, k, v = (t.detach().transpose(-2, -3).contiguous().transpose(-2, -3).requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    mask = torch.randn(2, 1, 1, 1, l_k).expand(2, 2, 1, l_q, l_k).requires_grad_()
    _check(q, k, v, [mask], do, torch.float32, device)


def test_float32_bias_with_bfloat16_inputs(device):
    q, k, v, (pair,), do = make_inputs((1, 2), 9, 9, 2, 8, torch.bfloat16, [(1, 1, 2, 9, 9)], [True],
                                       bias_dtype=torch.float32)
    _check(q, k, v, [pair], do, torch.bfloat16, device)
    out = _triton(device)(q, k, v, [pair])
    out.backward(do)
    assert out.dtype == torch.bfloat16 and pair.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_finite_mask_match_reference(device, dtype):
    lead, l_q, l_k, heads, dim = (1, 4), 6, 33, 2, 8
    q, k, v, (pair,), do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [(1, 1, 2, 6, 33)], [True])
    mask = torch.zeros(1, 4, 1, 1, l_k)
    mask[0, 1] = -1e9  # sequence 1: every key masked, as OpenFold does
    mask[0, 2, ..., :20] = -1e9
    _check(q, k, v, [mask, pair], do, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_with_inf_give_zero_not_nan(device, dtype):
    lead, l_q, l_k, heads, dim = (1, 3), 5, 33, 2, 8
    q, k, v, (pair,), do = make_inputs(lead, l_q, l_k, heads, dim, dtype, [(1, 1, 2, 5, 33)], [True])
    mask = torch.zeros(1, 3, 1, 1, l_k, dtype=dtype)
    mask[0, 1] = float("-inf")
    mask[0, 2, ..., 4:] = float("-inf")
    mask.requires_grad_()
    out = _triton(device)(q, k, v, [mask, pair])
    out.backward(do)
    for t in (out, q.grad, k.grad, v.grad, pair.grad, mask.grad):
        assert not torch.isnan(t).any()
    assert (out[0, 1] == 0).all()
    assert (q.grad[0, 1] == 0).all() and (k.grad[0, 1] == 0).all() and (v.grad[0, 1] == 0).all()
    assert (mask.grad[0, 1] == 0).all() and (mask.grad[0, 2, ..., 4:] == 0).all()
    expected = [t.detach() for t in (out, q.grad, k.grad, v.grad, pair.grad)]
    ref = run_with_grads(lambda q, k, v, b: evoformer_attention(q, k, v, b, backend="reference"),
                         q, k, v, [mask.detach(), pair], do)
    tol = {"rtol": 0, "atol": {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]}
    for a, b in zip(expected, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    # Statistics of a fully -inf row: (row max 0, log denominator +inf), as the torch backend.
    moved = [t.detach().to(device) for t in (q, k, v, mask, pair)]
    _, stats = triton_backend.forward(*moved[:3], moved[3:])
    assert (stats[0, 1, :, :, 0] == 0).all() and (stats[0, 1, :, :, 1] == float("inf")).all()
    assert torch.isfinite(stats[0, 0]).all()


def test_bias_gradients_are_deterministic(device):
    """Two backward runs give bit-identical gradients (no atomics anywhere; the pair bias
    gradient sums over N in a fixed order). Only the GPU run can really tell: the interpreter
    runs programs one after another."""
    lead, l_q, l_k, heads, dim = (1, 8 if device == "cuda" else 3), 33, 33, 2, 16
    q, k, v, biases, do = make_inputs(lead, l_q, l_k, heads, dim, torch.bfloat16,
                                      _bias_shapes(lead, l_q, l_k, heads), [True, True])
    first = run_with_grads(_triton(device), q, k, v, biases, do)
    second = run_with_grads(_triton(device), q, k, v, biases, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck(device):
    from ds4sci.ops.evoformer_attention.op import _bwd_op, _fwd_op

    q, k, v, (mask, pair), do = make_inputs((1, 2), 9, 9, 2, 8, torch.float32,
                                            _bias_shapes((1, 2), 9, 9, 2), [False, True])
    q, k, v, mask, pair, do = (t.detach().to(device) for t in (q, k, v, mask, pair, do))
    args = (q, k, v, [mask, pair], "triton", 4096)
    torch.library.opcheck(_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    out, stats = _fwd_op(*args)
    bwd_args = (do, *args[:4], out, stats, [False, True], "triton", 4096)
    torch.library.opcheck(_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


# --- dispatch and errors ------------------------------------------------------------------

def _small(device="cpu", dtype=torch.float32, dim=8, n_biases=1):
    lead, length, heads = (1, 2), 5, 2
    return make_inputs(lead, length, length, heads, dim, dtype,
                       [(1, 2, 1, 1, length)] * n_biases)[:4]


def test_auto_never_chooses_triton_on_cpu(monkeypatch):
    q, k, v, biases = _small()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select("auto", q, biases).name == "torch"
    assert dispatch.select("triton", q, biases).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dispatch.select("auto", q, biases).name == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_chooses_triton_on_cuda_and_falls_back():
    q, k, v, biases = _small()
    q, biases = q.cuda(), [b.cuda() for b in biases]
    assert dispatch.select("auto", q, biases).name == "triton"
    assert dispatch.select("auto", q.double(), biases).name == "torch"
    assert dispatch.select("auto", q, biases * 3).name == "torch"


def test_named_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, biases = _small()
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run this call: .*"
                                           r"device type 'cpu' needs TRITON_INTERPRET=1"):
        evoformer_attention(q, k, v, biases, backend="triton")


@pytest.mark.parametrize("case,reason", [
    ("float64", r"dtype torch.float64 not in \['bfloat16', 'float16', 'float32'\]"),
    ("head_dim", r"head dim D=160 > 128"),
    ("three_biases", r"3 biases; the kernels take at most 2"),
])
def test_unsupported_inputs_name_the_reason(monkeypatch, case, reason):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, biases = _small(dtype=torch.float64 if case == "float64" else torch.float32,
                             dim=160 if case == "head_dim" else 8,
                             n_biases=3 if case == "three_biases" else 1)
    with pytest.raises(RuntimeError, match=reason):
        evoformer_attention(q, k, v, biases, backend="triton")
    evoformer_attention(q, k, v, biases)  # auto: the torch backend runs it


def test_environment_reasons(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert triton_backend.environment_reasons() == ["triton not installed (pip install triton)"]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_backend.environment_reasons() == ["no CUDA device"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.environment_reasons() == []


def test_loading_interpreter_kernels_leaves_environment_alone(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = triton_backend._kernels(torch.device("cpu"))
    assert "TRITON_INTERPRET" not in os.environ
    assert type(kernels._fwd_kernel).__name__ == "InterpretedFunction"


# --- the GPU check script's device-independent parts ----------------------------------------

def test_gpu_check_plan_measure_and_outputs(tmp_path):
    from ds4sci.bench import gpu_check

    shapes = {"ds-test-256": ((1, 2, 9, 2, 8), "tiny stand-in"), "of-triangle": ((1, 2, 7, 1, 16), "tiny")}
    cases = gpu_check.plan(shapes, ["bfloat16", "float16"], list(gpu_check.CONTENDERS))
    assert cases[: len(gpu_check.CONTENDERS)] == [("bfloat16", "ds-test-256", c) for c in gpu_check.CONTENDERS]
    assert ("float16", "of-triangle", "flex") not in cases and ("float16", "ds-test-256", "flex") in cases
    assert len(cases) == len(set(cases)) == 2 * 2 * 5 - 1
    rows = []
    for name in ("torch", "naive", "sdpa"):
        row = gpu_check.measure(name, shapes["ds-test-256"][0], torch.bfloat16, torch.device("cpu"), iters=1)
        assert row["status"] == "ok" and row["time_s"] > 0, row
        rows.append({"shape_key": "ds-test-256", "shape": "1x2x9x2x8", "dtype": "bfloat16",
                     "contender": name, "floor_bytes": 1000, "peak_bytes": 1500.0, "peak_over_floor": 1.5,
                     **row})
    rows.append({"shape_key": "ds-test-256", "shape": "1x2x9x2x8", "dtype": "bfloat16",
                 "contender": "triton", "status": "skipped", "floor_bytes": 1000})
    meta = {"host_cpu": "test cpu", "torch": torch.__version__, "date": "today", "cuda_device": None,
            "bf16_matmul_tflops": 100.0, "correctness": [{"shape_key": "ds-test-256", "dtype": "bfloat16",
                                                          "status": "pass", "deterministic": True}]}
    assert gpu_check.plot(rows, tmp_path / "x.png", meta).stat().st_size > 0
    table = gpu_check.summary_markdown(rows, meta)
    assert "SKIPPED" in table and "1.50x" in table and "correctness ds-test-256 bfloat16: pass" in table
    assert gpu_check.attention_flops((1, 2, 9, 2, 8)) == 3.5 * 4 * 2 * 2 * 81 * 8


def test_gpu_check_correctness_phase_runs(monkeypatch):
    from ds4sci.bench import gpu_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = gpu_check.check_correctness(torch.device("cpu"), {"tiny": ((1, 2, 9, 2, 8), "tiny")},
                                       ["bfloat16"], progress=lambda line: None)
    assert [(r["shape_key"], r["status"], r["deterministic"]) for r in rows] == [("tiny", "pass", True)]
    assert rows[0]["err_dpair"] > 0 and rows[0]["plain_err_dpair"] > 0

    def broken(*args):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(gpu_check, "_correctness_case", broken)  # reported, not raised
    rows = gpu_check.check_correctness(torch.device("cpu"), {"tiny": ((1, 2, 9, 2, 8), "tiny")},
                                       ["float16"], progress=lambda line: None)
    assert rows[0]["status"] == "ERROR: RuntimeError: no kernel image"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_cuda_memory_near_the_floor():
    """fwd+bwd at a shape whose logits would be 4x the floor: peak within 1.5x the floor."""
    from ds4sci.bench.evoformer_attention import floor_bytes, logits_bytes
    from ds4sci.bench.gpu_check import make_inputs as bench_inputs

    shape, device = (1, 512, 384, 4, 8), torch.device("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    q, k, v, mask, pair, do = bench_inputs(shape, torch.bfloat16, device)
    evoformer_attention(q, k, v, [mask, pair]).backward(do)  # warm-up (compilation)
    for t in (q, k, v, pair):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    evoformer_attention(q, k, v, [mask, pair]).backward(do)
    torch.cuda.synchronize()
    peak, floor = torch.cuda.max_memory_allocated() - base, floor_bytes(shape, torch.bfloat16)
    assert logits_bytes(shape, torch.bfloat16) > 4 * floor
    assert peak < 1.5 * floor, (peak, floor)


# --- the compiled (GPU) path, checked without a GPU ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 32), (torch.float16, 8), (torch.bfloat16, 128),
                                       (torch.float32, 64)], ids=str)
def test_kernels_compile_for_an_nvidia_gpu(monkeypatch, dtype, dim):
    """Every launch the backend makes for a call with both bias gradients, with the GPU block
    settings, compiles to a cubin for sm_90 (Triton ships ptxas): catches code that only the
    interpreter accepts, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton_backend._kernels(torch.device("cuda"))  # loads the module; needs no GPU
    assert type(compiled._fwd_kernel).__name__ == "JITFunction"
    launches = []

    class Recorder:
        def __getattr__(self, name):
            return _Launch(name, launches)

    monkeypatch.setitem(triton_backend._KERNEL_MODULES, False, Recorder())
    monkeypatch.setattr(triton_backend, "_interpreted", lambda device: False)
    monkeypatch.setattr(triton_backend, "_target_programs", lambda device: 4 * 132)  # an H100
    monkeypatch.setattr(triton_backend, "_shared_memory", lambda device: 227 * 1024)
    lead, length, heads = (1, 2), 33, 2
    q, k, v, biases, do = make_inputs(lead, length, length, heads, dim, dtype,
                                      _bias_shapes(lead, length, length, heads))
    out, stats = triton_backend.forward(q, k, v, biases)
    triton_backend.backward(do, q, k, v, biases, out, stats, [True, True])
    assert [name for name, *_ in launches] == ["_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel",
                                               "_dbias_kernel", "_dbias_kernel"]
    n_splits = launches[-1][1][fn_arg_index(compiled._dbias_kernel, "n_splits")]
    assert n_splits > 1  # the pair bias gradient is split over N (then summed in a fixed order)
    types = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}
    for name, args, kwargs in launches:
        fn = getattr(compiled, name)
        options = {"num_warps": kwargs.pop("num_warps")}
        signature = {}
        for arg_name, value in zip(fn.arg_names, args):
            if isinstance(value, torch.Tensor):
                signature[arg_name] = "*" + types[value.dtype]
            else:
                signature[arg_name] = "fp32" if isinstance(value, float) else "i32"
        signature.update({key: "constexpr" for key in kwargs})
        kernel = triton.compile(ASTSource(fn, signature, kwargs), target=GPUTarget("cuda", 90, 32),
                                options=options)
        assert kernel.asm["cubin"], name


def fn_arg_index(fn, name):
    return fn.arg_names.index(name)


class _Launch:
    """Stands in for ``kernel[grid]``: records the call instead of running it."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


@pytest.mark.subprocess
def test_interpreter_kernels_leave_compiled_triton_usable():
    """A fresh process whose first Triton use is loading the interpreter kernels: Triton's own
    ``@jit`` library functions stay compiled-mode, so compiled kernels (ours on a GPU,
    Inductor's) still work afterwards, and the interpreter kernels run."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from ds4sci.ops.evoformer_attention import triton_backend\n"
        "triton_backend._kernels(torch.device('cpu'))\n"
        "import triton.language as tl\n"
        "print(type(tl.zeros).__name__, type(tl.standard._sum_combine).__name__)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 2, 5, 2, 8)\n"
        "out, _ = triton_backend.forward(q, q, q, [])\n"
        "print(bool(torch.isfinite(out).all()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()
    assert out == ["JITFunction", "JITFunction", "True"]
