"""GPU check for Evoformer attention: correctness at real sizes, then fwd+bwd time and memory.

Contenders: ds4sci's ``triton`` and ``torch`` backends, naive PyTorch (what stock OpenFold
does), SDPA with one float bias (mask + pair summed, ``[B, N, H, L, L]``), and FlexAttention
(``torch.compile``d, a ``score_mod`` that reads both biases; head dims below 16 are zero-padded
to 16, FlexAttention's minimum). Shapes are those of ``ds4sci.bench.evoformer_attention``; the
mask needs no gradient, the pair bias does (as in OpenFold).

Time: CUDA events, median of several steps after warm-up (compilation excluded). Memory:
``torch.cuda.max_memory_allocated`` during one step, less what was allocated before the inputs,
beside the floor (inputs, upstream gradient, output, returned gradients). TFLOP/s count the
usual ``3.5 x 4 B N H L^2 D`` of attention fwd+bwd, beside a measured bf16 matmul rate.

Usage (repo root): ``bash benchmarks/gpu_check.sh`` or
``python -m ds4sci.bench.gpu_check [--budget-s S] [--device cpu --quick]`` (the CPU run is a
dry run of the pipeline on a tiny shape: Triton through its interpreter, eager FlexAttention).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import machine_info, save_figure, subplots, write_rows
from .evoformer_attention import QUICK_SHAPES, SHAPES, floor_bytes

CONTENDERS = ("triton", "torch", "naive", "sdpa", "flex")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DS_SHAPES = ("ds-test-256", "ds-test-512")  # DeepSpeed's test shapes: the targets' yardstick


def attention_flops(shape) -> float:
    b, n, length, h, d = shape
    return 3.5 * 4 * b * n * h * length * length * d


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """Measured dense bf16 matmul rate of this chip (the ceiling to read TFLOP/s against)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * n**3 / seconds / 1e12


def make_inputs(shape, dtype, device, masked_fraction=0.1, seed=0):
    """q, k, v, mask ``[B, N, 1, 1, L]`` (OpenFold's -1e9), pair ``[B, 1, H, L, L]``, grad_out."""
    b, n, length, h, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    keep = torch.rand(b, n, 1, 1, length, generator=gen, device=device) >= masked_fraction
    mask = torch.where(keep, 0.0, -1e9).to(dtype)
    pair = torch.randn(b, 1, h, length, length, generator=gen, device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return q, k, v, mask, pair, grad_out


def contender(name: str, device: torch.device):
    """``fn(q, k, v, mask, pair) -> out`` for one contender."""
    from ds4sci.ops.evoformer_attention import evoformer_attention, evoformer_attention_naive

    if name in ("triton", "torch"):
        return lambda q, k, v, mask, pair: evoformer_attention(q, k, v, [mask, pair], backend=name)
    if name == "naive":
        return lambda q, k, v, mask, pair: evoformer_attention_naive(q, k, v, [mask, pair])
    if name == "sdpa":
        def sdpa(q, k, v, mask, pair):
            # SDPA takes one float mask: the summed bias [B, N, H, L, L]. Batch dims are folded
            # to [B*N, H, L, D] so its fused (memory-efficient) kernel can take the call.
            b, n, length, h, d = q.shape
            q4, k4, v4 = (t.transpose(-2, -3).reshape(b * n, h, t.shape[-3], d) for t in (q, k, v))
            bias = (mask + pair).reshape(b * n, h, length, k.shape[-3])
            out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias)
            return out.reshape(b, n, h, length, d).transpose(-2, -3)
        return sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        def flex(q, k, v, mask, pair):
            b, n, length, h, d = q.shape
            mask_BL = mask.reshape(b * n, length)
            pair_BHLL = pair[:, 0]

            def score_mod(score, bn, head, q_idx, kv_idx):
                return score + mask_BL[bn, kv_idx] + pair_BHLL[bn // n, head, q_idx, kv_idx]

            # [B, N, L, H, D] -> [B*N, H, L, D]; head dims below 16 zero-padded (scale kept).
            padded = [torch.nn.functional.pad(t, (0, 16 - d)) if d < 16 else t for t in (q, k, v)]
            qf, kf, vf = (t.reshape(b * n, length, h, -1).transpose(1, 2) for t in padded)
            out = flex_attention(qf, kf, vf, score_mod=score_mod, scale=d**-0.5)
            return out.transpose(1, 2)[..., :d].reshape(b, n, length, h, d)

        # The CPU dry run stays eager (compiling needs a C++ toolchain and minutes).
        return torch.compile(flex, dynamic=False) if device.type == "cuda" else flex
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def _step(fn, inputs):
    q, k, v, mask, pair, grad_out = inputs
    for t in (q, k, v, pair):
        t.grad = None
    out = fn(q, k, v, mask, pair)
    out.backward(grad_out)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(name: str, shape, dtype, device, iters: int) -> dict:
    """Peak memory of one fwd+bwd and the median time of ``iters`` more (after warm-up)."""
    _fresh(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    fn = contender(name, device)
    inputs = make_inputs(shape, dtype, device)
    try:
        _step(fn, inputs)  # warm-up: compilation, autotuning
        _step(fn, inputs)
        _sync(device)
        peak = None
        if device.type == "cuda":
            for t in (inputs[0], inputs[1], inputs[2], inputs[4]):
                t.grad = None
            _fresh(device)
            torch.cuda.reset_peak_memory_stats(device)
            _step(fn, inputs)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _step(fn, inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                _step(fn, inputs)
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:
        return {"status": "oom", "error": str(err).splitlines()[0][:200]}
    except Exception as err:  # a contender that cannot run this case is a result, not a crash
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        del inputs
        _fresh(device)
    seconds = statistics.median(times)
    return {"status": "ok", "time_s": seconds, "time_min_s": min(times), "iters": iters,
            "peak_bytes": peak, "tflops": attention_flops(shape) / seconds / 1e12}


def check_correctness(device, shapes: dict, dtypes: list[str], progress=print) -> list[dict]:
    """Triton backend vs the fp64 truth at real sizes, under the tests' 2x-plain-torch rule
    (10% of keys masked with -1e9), and two backward runs bit-identical. Fully masked rows are
    left to the unit tests: at -1e9 in fp32 the fp64 truth differs from every fp32 computation
    by O(1) there, which would hide the error elsewhere, and plain fp16 gives NaN."""
    tests_dir = Path(__file__).resolve().parents[3] / "tests"
    if not (tests_dir / "evoformer_helpers.py").is_file():
        progress(f"correctness: skipped ({tests_dir}/evoformer_helpers.py not found; run from the repo)")
        return []
    sys.path.insert(0, str(tests_dir))
    rows = []
    for key, (shape, _) in shapes.items():
        for dtype_name in dtypes:
            dtype = DTYPES.get(dtype_name, torch.float32)
            row = {"shape_key": key, "shape": "x".join(map(str, shape)), "dtype": dtype_name,
                   "deterministic": None}
            try:
                row.update(_correctness_case(shape, dtype, device))
            except Exception as err:  # report it and go on to the benchmark
                row["status"] = f"ERROR: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            errors = " ".join(f"{n} {row[f'err_{n}']:.2e} (plain {row[f'plain_err_{n}']:.2e})"
                              for n in _GRAD_NAMES if f"err_{n}" in row)
            progress(f"correctness {key} {dtype_name}: {row['status']}  {errors}")
            _fresh(device)
    return rows


_GRAD_NAMES = ["out", "dq", "dk", "dv", "dpair"]


def _correctness_case(shape, dtype, device) -> dict:
    from evoformer_helpers import assert_within_rule, max_err, plain_torch, run_with_grads, truth

    from ds4sci.ops.evoformer_attention import evoformer_attention

    q, k, v, mask, pair, grad_out = make_inputs(shape, dtype, device, seed=1)
    biases = [mask, pair]
    fn = lambda q, k, v, b: evoformer_attention(q, k, v, b, backend="triton")
    ours = run_with_grads(fn, q, k, v, biases, grad_out)
    again = run_with_grads(fn, q, k, v, biases, grad_out)
    true, plain = truth(q, k, v, biases, grad_out), plain_torch(q, k, v, biases, grad_out)
    row = {"deterministic": all(torch.equal(a, b) for a, b in zip(ours, again))}
    for name, o, t, p in zip(_GRAD_NAMES, ours, true, plain):
        row[f"err_{name}"], row[f"plain_err_{name}"] = max_err(o, t), max_err(p, t)
    try:
        assert_within_rule(ours, true, plain, dtype, _GRAD_NAMES)
        row["status"] = "pass" if row["deterministic"] else "FAIL (not deterministic)"
    except AssertionError as err:
        row["status"] = f"FAIL: {err}"
    return row


def plan(shapes: dict, dtypes: list[str], contenders: list[str]) -> list[tuple]:
    """Cases in priority order: DeepSpeed shapes in bf16 first (the targets), then the rest.

    FlexAttention recompiles per shape and dtype (tens of seconds each), so in fp16 it runs at
    DeepSpeed's shapes only.
    """
    cases = []
    for dtype_name in dtypes:
        for key in sorted(shapes, key=lambda k: k not in DS_SHAPES):
            for c in contenders:
                if c == "flex" and dtype_name != dtypes[0] and key not in DS_SHAPES:
                    continue
                cases.append((dtype_name, key, c))
    ds_first = [c for c in cases if c[1] in DS_SHAPES and c[0] == dtypes[0]]
    return ds_first + [c for c in cases if c not in ds_first]


def run(device, shapes: dict, dtypes: list[str], contenders: list[str], out_dir: Path,
        stem: str, budget_s: float, iters: int, progress=print) -> tuple[list[dict], dict]:
    start = time.monotonic()
    meta = machine_info()
    meta["device"] = str(device)
    meta["bf16_matmul_tflops"] = matmul_tflops(device)
    if meta["bf16_matmul_tflops"]:
        progress(f"bf16 matmul: {meta['bf16_matmul_tflops']:.0f} TFLOP/s")
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["correctness"] = check_correctness(device, {k: shapes[k] for k in shapes if k in DS_SHAPES}
                                            or dict(list(shapes.items())[:1]), dtypes, progress)
    rows = []
    for dtype_name, key, name in plan(shapes, dtypes, contenders):
        shape, origin = shapes[key]
        row = {"shape_key": key, "shape": "x".join(map(str, shape)), "origin": origin,
               "dtype": dtype_name, "contender": name,
               "floor_bytes": floor_bytes(shape, DTYPES.get(dtype_name, torch.float32))}
        if time.monotonic() - start > budget_s:
            row.update(status="skipped", error=f"time budget {budget_s:.0f} s spent")
        else:
            row.update(measure(name, shape, DTYPES.get(dtype_name, torch.float32), device, iters))
        if row.get("peak_bytes") is not None:
            row["peak_over_floor"] = row["peak_bytes"] / row["floor_bytes"]
        row["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows.append(row)
        progress(_format(row))
    _add_ratios(rows)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    (out_dir / f"{stem}.md").write_text(summary_markdown(rows, meta))
    progress(f"wrote {json_path}, {csv_path}, {png}, {stem}.md ({meta['elapsed_s']:.0f} s)")
    return rows, meta


def _add_ratios(rows):
    for r in rows:
        ours = next((o for o in rows if o["contender"] == "triton" and o["shape_key"] == r["shape_key"]
                     and o["dtype"] == r["dtype"] and o["status"] == "ok"), None)
        if ours and r["status"] == "ok" and r is not ours:
            r["time_vs_triton"] = r["time_s"] / ours["time_s"]  # > 1: triton is faster


def _format(r) -> str:
    head = f"{r['dtype']:>8} {r['shape_key']:<18} {r['contender']:<7}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()} {r.get('error', '')}"
    mem = f"peak {r['peak_bytes'] / 2**20:9.1f} MiB ({r['peak_over_floor']:.2f}x floor)" if r["peak_bytes"] else ""
    return f"{head} {r['time_s'] * 1e3:9.3f} ms  {r['tflops']:6.1f} TFLOP/s  {mem}"


def summary_markdown(rows, meta) -> str:
    chip = meta.get("cuda_device") or meta["host_cpu"]
    rate = meta.get("bf16_matmul_tflops")
    lines = [f"{chip}, torch {meta['torch']}, triton {meta.get('triton')}, {meta['date']}"
             + (f"; measured bf16 matmul {rate:.0f} TFLOP/s" if rate else ""), ""]
    for c in meta.get("correctness", []):
        lines.append(f"- correctness {c['shape_key']} {c['dtype']}: {c['status']}, deterministic {c['deterministic']}")
    lines.append("")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        lines += [f"**{dtype}** (fwd+bwd time ms / TFLOP/s / peak memory over floor)", "",
                  "| shape [B,N,L,H,D] | " + " | ".join(CONTENDERS) + " |",
                  "|---" * (len(CONTENDERS) + 1) + "|"]
        for key in dict.fromkeys(r["shape_key"] for r in rows if r["dtype"] == dtype):
            case = {r["contender"]: r for r in rows if r["dtype"] == dtype and r["shape_key"] == key}
            cells = [f"{key} ({next(iter(case.values()))['shape'].replace('x', ',')})"]
            for c in CONTENDERS:
                r = case.get(c)
                if r is None:
                    cells.append("-")
                elif r["status"] != "ok":
                    cells.append(r["status"].upper())
                else:
                    mem = f" / {r['peak_over_floor']:.2f}x" if r.get("peak_over_floor") else ""
                    cells.append(f"{r['time_s'] * 1e3:.2f} / {r['tflops']:.0f}{mem}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path: Path, meta: dict) -> Path:
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    keys = list(dict.fromkeys(r["shape_key"] for r in rows))
    metrics = (("time_s", "fwd+bwd time (ms)", 1e3), ("tflops", "TFLOP/s", 1.0),
               ("peak_over_floor", "peak memory / floor", 1.0))
    fig, axes = subplots(len(metrics), len(dtypes), figsize=(7 * len(dtypes), 10), squeeze=False)
    width = 0.8 / len(CONTENDERS)
    for col, dt in enumerate(dtypes):
        by = {(r["shape_key"], r["contender"]): r for r in rows if r["dtype"] == dt}
        for row_i, (metric, label, factor) in enumerate(metrics):
            ax = axes[row_i][col]
            for ci, c in enumerate(CONTENDERS):
                pts = [(xi + ci * width, by[(k, c)][metric] * factor) for xi, k in enumerate(keys)
                       if (k, c) in by and by[(k, c)]["status"] == "ok" and by[(k, c)].get(metric)]
                if pts:
                    ax.bar(*zip(*pts), width, label=c)
            if metric == "tflops" and meta.get("bf16_matmul_tflops"):
                ax.axhline(meta["bf16_matmul_tflops"], color="black", ls="--", lw=1, label="bf16 matmul")
            if metric == "peak_over_floor":
                ax.axhline(1.5, color="black", ls=":", lw=1, label="1.5x floor")
            ax.set_yscale("log")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(dt)
            ax.legend(fontsize=7)
    fig.suptitle(f"Evoformer attention fwd+bwd on {meta.get('cuda_device') or meta['host_cpu']}, "
                 f"torch {meta['torch']}, triton {meta.get('triton')}")
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds4sci.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default=None, help="output file stem (default evoformer_attention_gpu)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="subset of shapes (default all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="one tiny shape (pipeline smoke test)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per case")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no new case after this many seconds (the rest are marked skipped)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --device cpu --quick for a dry run", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend runs in its interpreter
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    stem = args.stem or ("evoformer_attention_gpu" if device.type == "cuda" and not args.quick
                         else f"evoformer_attention_{device.type}_check_quick")
    rows, meta = run(device, shapes, args.dtypes, args.contenders, args.out, stem, args.budget_s, args.iters)
    correct = all(c["status"] == "pass" for c in meta["correctness"])
    ran = all(r["status"] in ("ok", "skipped") for r in rows if r["contender"] == "triton")
    return 0 if correct and ran else 1


if __name__ == "__main__":
    raise SystemExit(main())
