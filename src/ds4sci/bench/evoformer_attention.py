"""Benchmark: Evoformer attention forward+backward, ours vs naive PyTorch vs SDPA.

Every (contender, shape, dtype) case runs in a fresh process so its peak memory is its own;
times come from one more process per shape that runs the contenders in turn for several rounds
(median time, and the median of the per-round ratios to ds4sci), so machine drift cancels.
Peak memory is the rise of the resident set over the process's state after imports and a tiny
warm-up call; the *floor* is the bytes that must exist anyway: q, k, v, both biases, the
output, the upstream gradient and the returned gradients (q, k, v, pair bias). The mask bias
needs no gradient, as in OpenFold; the pair bias (computed from the pair representation) does.

Usage: ``python -m ds4sci.bench.evoformer_attention [--out DIR] [--quick]`` or
``ds4sci bench evoformer-attention``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .common import (
    current_rss_bytes, limit_address_space, machine_info, merge_rows, peak_rss_bytes,
    reset_peak_rss, run_worker, save_figure, subplots, write_rows,
)

# (B, N, L, H, D) with where it comes from.
SHAPES = {
    "ds-test-256": ((1, 256, 256, 4, 32), "DeepSpeed test shape"),
    "ds-test-512": ((1, 512, 256, 8, 8), "DeepSpeed test shape"),
    "of-init-extra-msa": ((1, 1024, 256, 8, 8), "OpenFold initial training, extra-MSA row attention"),
    "of-ft-msa-row": ((1, 512, 384, 8, 32), "OpenFold fine-tuning, MSA row attention"),
    "of-triangle": ((1, 384, 384, 4, 32), "OpenFold fine-tuning, triangle attention"),
    "of-ft-extra-msa": ((1, 5120, 384, 8, 8), "OpenFold fine-tuning, extra-MSA row attention"),
}
QUICK_SHAPES = {"tiny": ((1, 8, 33, 2, 8), "smoke test")}
CONTENDERS = ("ds4sci", "naive", "sdpa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_BUDGET = 20 * 2**30


def _inputs(shape, dtype):
    b, n, length, h, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    mask = torch.where(torch.rand(b, n, 1, 1, length, generator=gen) < 0.1, -1e9, 0.0).to(dtype)
    pair = torch.randn(b, 1, h, length, length, generator=gen, dtype=dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=gen, dtype=dtype)
    return q, k, v, mask, pair, grad_out


def floor_bytes(shape, dtype) -> int:
    b, n, length, h, d = shape
    size = torch.finfo(dtype).bits // 8
    per_qkv = b * n * length * h * d
    # q, k, v, out, grad_out, dq, dk, dv; mask; pair and its gradient.
    return size * (8 * per_qkv + b * n * length + 2 * b * h * length * length)


def logits_bytes(shape, dtype) -> int:
    b, n, length, h, _ = shape
    return b * n * h * length * length * (torch.finfo(dtype).bits // 8)


def _contender(name: str):
    from ds4sci.ops.evoformer_attention import evoformer_attention, evoformer_attention_naive

    if name == "ds4sci":
        return lambda q, k, v, mask, pair: evoformer_attention(q, k, v, [mask, pair], backend="torch")
    if name == "naive":
        return lambda q, k, v, mask, pair: evoformer_attention_naive(q, k, v, [mask, pair])
    if name == "sdpa":
        def sdpa(q, k, v, mask, pair):
            # SDPA wants [*, H, L, D] and one float mask: the summed bias is [B, N, H, L, L].
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3), attn_mask=mask + pair
            )
            return out.transpose(-2, -3)
        return sdpa
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def _step(fn, inputs):
    q, k, v, mask, pair, grad_out = inputs
    out = fn(q, k, v, mask, pair)
    out.backward(grad_out)
    return out


def worker(contender: str, shape: tuple, dtype_name: str) -> dict:
    """Peak memory of one fwd+bwd in this (fresh) process; also its (cold) time."""
    dtype = DTYPES[dtype_name]
    fn = _contender(contender)
    _step(fn, _inputs((1, 2, 5, 2, shape[-1]), dtype))  # load kernels and libraries
    limit_address_space(MEMORY_BUDGET)
    reset_peak_rss()
    base = current_rss_bytes()
    inputs = _inputs(shape, dtype)
    try:
        start = time.perf_counter()
        _step(fn, inputs)
        elapsed = time.perf_counter() - start
    except RuntimeError as err:  # allocation beyond the budget
        if "can't allocate" not in str(err).lower() and "out of memory" not in str(err).lower():
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200]}
    return {"status": "ok", "cold_time_s": elapsed, "peak_bytes": peak_rss_bytes() - base}


def timing_worker(contenders: list[str], shape: tuple, dtype_name: str, rounds: int) -> dict:
    """Contenders in turn, A B C A B C ..., on the same inputs in one process.

    Returns each one's median time and the median of the per-round ratios to ds4sci, so a
    drift in machine speed hits every contender alike.
    """
    dtype = DTYPES[dtype_name]
    fns = {c: _contender(c) for c in contenders}
    inputs = _inputs(shape, dtype)
    for fn in fns.values():
        _step(fn, inputs)  # warm-up at this shape
    times = {c: [] for c in contenders}
    for _ in range(rounds):
        for c, fn in fns.items():
            for t in (inputs[0], inputs[1], inputs[2], inputs[4]):
                t.grad = None
            start = time.perf_counter()
            _step(fn, inputs)
            times[c].append(time.perf_counter() - start)
    result = {c: {"time_s": statistics.median(ts), "time_min_s": min(ts), "rounds": rounds}
              for c, ts in times.items()}
    if "ds4sci" in times:
        for c, ts in times.items():
            result[c]["time_ratio_vs_ds4sci"] = statistics.median(
                t / ours for t, ours in zip(ts, times["ds4sci"]))
    return result


def measure_case(shape_key: str, shape: tuple, origin: str, dtype_name: str, contenders: list[str],
                 rounds: int = 5) -> list[dict]:
    """Rows for one shape and dtype: memory per contender (fresh processes), then paired timing."""
    module = "ds4sci.bench.evoformer_attention"
    floor = floor_bytes(shape, DTYPES[dtype_name])
    shape_arg = ",".join(map(str, shape))
    case_rows = {}
    for contender in contenders:
        result = run_worker(module, ["--worker", contender, shape_arg, dtype_name], timeout=1800)
        row = {
            "shape_key": shape_key, "shape": "x".join(map(str, shape)), "origin": origin,
            "dtype": dtype_name, "contender": contender, "floor_bytes": floor,
            "logits_bytes": logits_bytes(shape, DTYPES[dtype_name]),
            "status": result["status"], "peak_bytes": result.get("peak_bytes"),
            "time_s": result.get("cold_time_s"), "error": result.get("error"),
        }
        if row["peak_bytes"] is not None:
            row["peak_over_floor"] = row["peak_bytes"] / floor
        case_rows[contender] = row
    fit = [c for c, r in case_rows.items() if r["status"] == "ok"]
    if len(fit) > 1:  # paired timing; a lone contender keeps its cold time
        timed = run_worker(module, ["--timing", ",".join(fit), shape_arg, dtype_name, str(rounds)],
                           timeout=3600)
        for c in fit:
            case_rows[c].update(timed.get(c, {}))
    ours = case_rows.get("ds4sci")
    for c, row in case_rows.items():
        if ours and ours["status"] == "ok" and row["status"] == "ok" and c != "ds4sci":
            row["peak_ratio_vs_ds4sci"] = row["peak_bytes"] / ours["peak_bytes"]
    return list(case_rows.values())


def run(shapes: dict, dtypes: list[str], contenders: list[str], out_dir: Path,
        stem: str = "evoformer_attention_cpu", rounds: int = 5, progress=print,
        update: bool = False) -> list[dict]:
    """Measure every case and write the results; with ``update``, replace only these cases'
    rows in an existing results file (each row records when it was measured)."""
    rows = []
    for dtype_name in dtypes:
        for key, (shape, origin) in shapes.items():
            for row in measure_case(key, shape, origin, dtype_name, contenders, rounds):
                row["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                rows.append(row)
                progress(_format_row(row))
    meta = machine_info()
    meta["memory_budget_bytes"] = MEMORY_BUDGET
    if update:
        rows = merge_rows(out_dir / f"{stem}.json", rows, lambda r: (r["shape_key"], r["dtype"]), meta)
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    (out_dir / f"{stem}.md").write_text(summary_markdown(rows))
    progress(f"wrote {json_path}, {csv_path}, {png}, {stem}.md")
    return rows


def summary_markdown(rows: list[dict]) -> str:
    """A table per dtype: peak memory (x floor) and time of each contender, ratios to ds4sci."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        lines += [f"**{dtype}**", "",
                  "| shape [B,N,L,H,D] | floor | ds4sci peak | naive peak | SDPA peak | ds4sci time | naive time | SDPA time |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys(r["shape_key"] for r in rows):
            case = {r["contender"]: r for r in rows if r["dtype"] == dtype and r["shape_key"] == key}
            if not case:
                continue
            any_row = next(iter(case.values()))
            cells = [f"{key} ({any_row['shape'].replace('x', ',')})", f"{any_row['floor_bytes'] / 2**20:,.0f} MiB"]
            for c in CONTENDERS:
                r = case.get(c)
                if r is None or r["status"] != "ok":
                    cells.append(r["status"].upper() if r else "-")
                    continue
                ratio = f", {r['peak_ratio_vs_ds4sci']:.1f}x ours" if "peak_ratio_vs_ds4sci" in r else ""
                cells.append(f"{r['peak_bytes'] / 2**20:,.0f} MiB ({r['peak_over_floor']:.2f}x floor{ratio})")
            for c in CONTENDERS:
                r = case.get(c)
                if r is None or r["status"] != "ok":
                    cells.append(r["status"].upper() if r else "-")
                    continue
                ratio = f" ({r['time_ratio_vs_ds4sci']:.2f}x ours)" if c != "ds4sci" and "time_ratio_vs_ds4sci" in r else ""
                cells.append(f"{r['time_s']:.2f} s{ratio}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _format_row(r) -> str:
    if r["status"] != "ok":
        return f"{r['dtype']:>8} {r['shape_key']:<18} {r['contender']:<7} {r['status'].upper()}"
    ratio = f"  time {r['time_ratio_vs_ds4sci']:.2f}x ours" if "time_ratio_vs_ds4sci" in r else ""
    return (
        f"{r['dtype']:>8} {r['shape_key']:<18} {r['contender']:<7} {r['time_s']:8.3f} s  "
        f"peak {r['peak_bytes'] / 2**20:9.1f} MiB  floor {r['floor_bytes'] / 2**20:8.1f} MiB  "
        f"({r['peak_over_floor']:.2f}x floor){ratio}"
    )


def plot(rows, path: Path, meta: dict) -> Path:
    dtypes = sorted({r["dtype"] for r in rows}, key=list(DTYPES).index)
    keys = list(dict.fromkeys(r["shape_key"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = subplots(2, len(dtypes), figsize=(6.5 * len(dtypes), 8), squeeze=False)
    width = 0.8 / len(contenders)
    for col, dt in enumerate(dtypes):
        by = {(r["shape_key"], r["contender"]): r for r in rows if r["dtype"] == dt}
        for row_i, (metric, label) in enumerate((("peak_bytes", "peak memory (GiB)"), ("time_s", "fwd+bwd time (s)"))):
            ax = axes[row_i][col]
            for ci, c in enumerate(contenders):
                xs, ys, oom_x = [], [], []
                for xi, key in enumerate(keys):
                    r = by.get((key, c))
                    if r and r["status"] == "ok":
                        xs.append(xi + ci * width)
                        ys.append(r[metric] / (2**30 if metric == "peak_bytes" else 1))
                    elif r:
                        oom_x.append(xi + ci * width)
                ax.bar(xs, ys, width, label=c)
                for x in oom_x:
                    ax.text(x, 0.02, "OOM", rotation=90, ha="center", va="bottom", fontsize=8,
                            transform=ax.get_xaxis_transform())
            if metric == "peak_bytes":
                floors = [by[(k, contenders[0])]["floor_bytes"] / 2**30 for k in keys]
                ax.scatter([i + 0.4 - width / 2 for i in range(len(keys))], floors, marker="_",
                           s=400, color="black", label="floor", zorder=3)
            ax.set_yscale("log")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{dt}")
            ax.legend(fontsize=8)
    fig.suptitle(f"Evoformer attention fwd+bwd, {meta['host_cpu']}, {meta['torch_threads']} threads, torch {meta['torch']}")
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench evoformer-attention", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--timing", nargs=4, metavar=("CONTENDERS", "SHAPE", "DTYPE", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="subset of shapes (default all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="one tiny shape, a smoke test of the pipeline")
    parser.add_argument("--stem", default=None, help="output file stem (default evoformer_attention_cpu)")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the given shapes/dtypes and replace their rows in the results file")
    args = parser.parse_args(argv)
    if args.worker:
        contender, shape, dtype_name = args.worker
        print(json.dumps(worker(contender, tuple(int(s) for s in shape.split(",")), dtype_name)))
        return 0
    if args.timing:
        contenders, shape, dtype_name, rounds = args.timing
        print(json.dumps(timing_worker(contenders.split(","), tuple(int(s) for s in shape.split(",")),
                                       dtype_name, int(rounds))))
        return 0
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    stem = args.stem or ("evoformer_attention_quick" if args.quick else "evoformer_attention_cpu")
    run(shapes, args.dtypes, args.contenders, args.out, stem=stem, update=args.update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
