"""One Evoformer / extra-MSA block training step (forward + backward, checkpointed): ds4sci's
memory-efficient attention vs the same modules with naive attention (stock OpenFold's way),
at OpenFold's initial-training and fine-tuning dims, fp32 and bf16 on CPU.

Each case runs in a fresh process per contender under a 20 GiB address-space budget (an
allocation beyond it fails and is recorded as OOM). Where both fit, the times reported are then
re-measured in one process, alternating the contenders (``--rounds``, median). Peak memory is the process's high-water RSS above its baseline
after building the block (so it includes the inputs, activations and gradients); time is the
last of the configured steps (two at initial-training dims, where the first pays the page
faults of new allocations; one at fine-tuning dims). A tiny step before the baseline loads
kernels and allocates the parameter gradients, so the peak counts activations and inputs.

Where naive attention runs out of memory (the fine-tuning extra-MSA block), its peak is
extrapolated: the same step is measured at 1/20, 1/10 and 1/5 of the MSA depth, where it fits,
and ``peak = a + b * depth`` (every MSA-sized tensor, the logits included, grows linearly with the
depth; the pair terms are constant) is fitted and evaluated at the real depth. The row
``predicted_peak_bytes`` holds it, ``predicted_from`` the points; the ratio to ours is then marked
``naive_peak_extrapolated``.

Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (as ``genslm_memory``): with glibc's default
dynamic threshold, freed chunk-sized buffers stay in the heap and the high-water RSS counts them
again; with it, RSS follows the memory the tensors use, for every contender alike.
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
    reset_peak_rss, run_worker, save_figure, subplots, write_rows, WORKER_ENV,
)

CONFIGS = {
    # name: (preset, N_res, N_seq for the Evoformer block, N_extra for the extra-MSA block, steps)
    # One step at fine-tuning dims: the extra-MSA block's outer product mean alone is ~1.5
    # TFLOP forward there (an (N_res*32)^2 x N_extra matmul), minutes per step on a laptop CPU.
    "initial": ("openfold-initial-training", 256, 128, 1024, 2),
    "finetune": ("openfold-finetuning", 384, 512, 5120, 1),
}
QUICK_CONFIGS = {"tiny": ("openfold-initial-training", 16, 8, 24, 2)}
BLOCKS = ("evoformer", "extra_msa")
CONTENDERS = {"ds4sci": ("auto", None), "ds4sci-chunked": ("auto", 128), "naive": ("naive", None)}
"""name -> (attention backend, chunk_size). ``ds4sci-chunked`` also runs every row/column-independent
part 128 rows at a time, recomputing each chunk in backward (a ds4sci switch stock OpenFold training
does not use); the other two differ only in the attention."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEMORY_BUDGET = 20 * 2**30
EXTRAPOLATION_FRACTIONS = (20, 10, 5)
"""A contender that runs out of memory is measured at depth // 20, // 10 and // 5 and extrapolated."""


def _build(block: str, preset_name: str, backend: str, dtype):
    from ds4sci.models.evoformer import EvoformerBlock, ExtraMSABlock, preset

    p = preset(preset_name)
    cfg = p.evoformer_stack if block == "evoformer" else p.extra_msa_stack
    cls = EvoformerBlock if block == "evoformer" else ExtraMSABlock
    return cls(attention_backend=backend, **cfg.block_kwargs()).to(dtype).train(), cfg


def _inputs(cfg, n_res: int, n_seq: int, dtype):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(1, n_seq, n_res, cfg.c_m, generator=gen).to(dtype).requires_grad_()
    z = torch.randn(1, n_res, n_res, cfg.c_z, generator=gen).to(dtype).requires_grad_()
    msa_mask = torch.ones(1, n_seq, n_res, dtype=dtype)
    pair_mask = torch.ones(1, n_res, n_res, dtype=dtype)
    return m, z, msa_mask, pair_mask


def _step(block_module, inputs, chunk_size=None) -> None:
    from ds4sci.models.evoformer.evoformer import _run_blocks

    m, z, msa_mask, pair_mask = inputs
    m.grad = z.grad = None
    m_out, z_out = _run_blocks([block_module], m, z, msa_mask, pair_mask, chunk_size, blocks_per_ckpt=1)
    # A fixed upstream gradient of ones: the loss is the sum of both outputs.
    torch.autograd.backward([m_out, z_out], [torch.ones_like(m_out), torch.ones_like(z_out)])


def worker(contender: str, block: str, config: str, dtype_name: str, quick: bool,
           depth: int | None = None) -> dict:
    """One contender's step in this process; ``depth`` overrides the MSA depth (N_seq / N_extra)."""
    preset_name, n_res, n_seq, n_extra, steps = (QUICK_CONFIGS if quick else CONFIGS)[config]
    if depth is not None:
        n_seq = n_extra = depth
    dtype = DTYPES[dtype_name]
    backend, chunk_size = CONTENDERS[contender]
    module, cfg = _build(block, preset_name, backend, dtype)
    _step(module, _inputs(cfg, 4, 3, dtype), chunk_size)  # load kernels, allocate parameter gradients
    limit_address_space(MEMORY_BUDGET)
    reset_peak_rss()
    base = current_rss_bytes()
    try:
        inputs = _inputs(cfg, n_res, n_seq if block == "evoformer" else n_extra, dtype)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _step(module, inputs, chunk_size)
            times.append(time.perf_counter() - start)
    except RuntimeError as err:  # an allocation beyond the budget
        if "can't allocate" not in str(err).lower() and "out of memory" not in str(err).lower():
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200]}
    return {"status": "ok", "peak_bytes": peak_rss_bytes() - base, "time_s": times[-1],
            "steps": steps}


def timing_worker(block: str, config: str, dtype_name: str, rounds: int, quick: bool) -> dict:
    """Both contenders in one process, alternating (ours, naive, ours, naive...) on the same
    inputs, so a drift in machine speed hits both alike; medians and the median per-round ratio."""
    preset_name, n_res, n_seq, n_extra, _ = (QUICK_CONFIGS if quick else CONFIGS)[config]
    dtype = DTYPES[dtype_name]
    modules = {}
    for contender in ("ds4sci", "naive"):
        backend, _ = CONTENDERS[contender]
        torch.manual_seed(0)
        modules[contender], cfg = _build(block, preset_name, backend, dtype)
    for module in modules.values():
        _step(module, _inputs(cfg, 4, 3, dtype))  # load kernels, allocate parameter gradients
    inputs = _inputs(cfg, n_res, n_seq if block == "evoformer" else n_extra, dtype)
    times = {c: [] for c in modules}
    for _ in range(rounds):
        for contender, module in modules.items():
            start = time.perf_counter()
            _step(module, inputs)
            times[contender].append(time.perf_counter() - start)
    ratios = [n / o for n, o in zip(times["naive"], times["ds4sci"])]
    return {"times": times, "naive_time_over_ours": statistics.median(ratios), "rounds": rounds}


def run(configs: dict, blocks, dtypes, out_dir: Path, stem: str, quick: bool, update: bool,
        rounds: int = 2, contenders=tuple(CONTENDERS), progress=print) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        for config, (preset_name, n_res, n_seq, n_extra, _) in configs.items():
            for block in blocks:
                case = {}
                for contender in contenders:
                    result = _measure(contender, block, config, dtype_name, quick)
                    row = {"block": block, "config": config, "preset": preset_name, "dtype": dtype_name,
                           "contender": contender, "n_res": n_res,
                           "n_seq": n_seq if block == "evoformer" else n_extra,
                           "status": result["status"], "peak_bytes": result.get("peak_bytes"),
                           "time_s": result.get("time_s"), "steps": result.get("steps"),
                           "error": result.get("error"),
                           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    if result["status"] == "oom":
                        row.update(_extrapolate(contender, block, config, dtype_name, quick, row["n_seq"]))
                    case[contender] = row
                naive = case.get("naive")
                for name, ours in case.items():
                    if name == "naive" or not naive or ours["status"] != "ok":
                        continue
                    if naive["status"] == "ok":
                        ours["naive_peak_over_ours"] = naive["peak_bytes"] / ours["peak_bytes"]
                        if name != "ds4sci":
                            ours["naive_time_over_ours"] = naive["time_s"] / ours["time_s"]
                    elif naive.get("predicted_peak_bytes"):
                        ours["naive_peak_over_ours"] = naive["predicted_peak_bytes"] / ours["peak_bytes"]
                        ours["naive_peak_extrapolated"] = True
                if {"ds4sci", "naive"} <= case.keys() and all(case[c]["status"] == "ok" for c in ("ds4sci", "naive")):
                    _paired_timing(case, block, config, dtype_name, quick, rounds)
                for row in case.values():
                    rows.append(row)
                    progress(_format(row))
    meta = machine_info()
    meta.update({"memory_budget_bytes": MEMORY_BUDGET, "worker_env": WORKER_ENV})
    if update:
        rows = merge_rows(out_dir / f"{stem}.json", rows,
                          lambda r: (r["block"], r["config"], r["dtype"], r["contender"]), meta)
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    progress(f"wrote {json_path}, {csv_path}, {png}")
    return rows


def _measure(contender: str, block: str, config: str, dtype_name: str, quick: bool,
             depth: int | None = None) -> dict:
    """``worker`` in a fresh process (``depth``: a shallower MSA than the config's)."""
    args = ["--worker", contender, block, config, dtype_name]
    args += (["--quick"] if quick else []) + ([] if depth is None else ["--depth", str(depth)])
    return run_worker("ds4sci.bench.evoformer_block", args, timeout=3600, env=WORKER_ENV)


def _extrapolate(contender: str, block: str, config: str, dtype_name: str, quick: bool, depth: int) -> dict:
    """The peak of a step that did not fit, from a linear fit over shallower MSAs (module doc)."""
    points = []
    for fraction in EXTRAPOLATION_FRACTIONS:
        small = max(1, depth // fraction)
        result = _measure(contender, block, config, dtype_name, quick, small)
        if result["status"] == "ok":
            points.append((small, result["peak_bytes"]))
    if len(points) < 2:
        return {}
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    (a, b), *_ = torch.linalg.lstsq(design, y[:, None])
    fitted = (design @ torch.stack([a, b])).squeeze(1)
    return {"predicted_peak_bytes": float(a + b * depth), "predicted_from": points,
            "fit": {"a": float(a), "b_per_sequence": float(b),
                    "max_relative_residual": float(((fitted - y).abs() / y).max())}}


def _paired_timing(case: dict, block: str, config: str, dtype_name: str, quick: bool, rounds: int) -> None:
    """Replace the contenders' times by a paired measurement (see ``timing_worker``)."""
    args = ["--timing", block, config, dtype_name, str(rounds)] + (["--quick"] if quick else [])
    timed = run_worker("ds4sci.bench.evoformer_block", args, timeout=7200, env=WORKER_ENV)
    if "times" not in timed:
        case["ds4sci"]["timing_error"] = timed.get("error")
        return
    for contender in ("ds4sci", "naive"):
        row = case[contender]
        row["unpaired_time_s"] = row["time_s"]
        row["time_s"] = statistics.median(timed["times"][contender])
        row["timing_rounds"] = timed["rounds"]
    case["ds4sci"]["naive_time_over_ours"] = timed["naive_time_over_ours"]


def _format(r: dict) -> str:
    what = f"{r['block']:>9} {r['config']:>8} {r['dtype']:>8} {r['contender']:>6}: "
    if r["status"] != "ok":
        if r.get("predicted_peak_bytes"):
            return what + f"{r['status'].upper()}, extrapolated peak {r['predicted_peak_bytes'] / 2**30:.2f} GiB"
        return what + r["status"].upper()
    extra = ""
    if "naive_peak_over_ours" in r:
        extrapolated = " (naive extrapolated)" if r.get("naive_peak_extrapolated") else ""
        extra = f"  (naive/ours: memory {r['naive_peak_over_ours']:.2f}x{extrapolated}"
        extra += f", time {r['naive_time_over_ours']:.2f}x)" if "naive_time_over_ours" in r else ")"
    return what + f"peak {r['peak_bytes'] / 2**30:.2f} GiB, step {r['time_s']:.2f} s" + extra


def plot(rows, path: Path, meta: dict) -> Path:
    cases = list(dict.fromkeys((r["block"], r["config"], r["dtype"]) for r in rows))
    fig, axes = subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(CONTENDERS)
    for ax, metric, label in ((axes[0], "peak_bytes", "peak memory (GiB)"), (axes[1], "time_s", "step time (s)")):
        for ci, contender in enumerate(CONTENDERS):
            by = {(r["block"], r["config"], r["dtype"]): r for r in rows if r["contender"] == contender}
            for xi, case in enumerate(cases):
                r = by.get(case)
                x = xi + ci * width
                if r and r["status"] == "ok":
                    ax.bar(x, r[metric] / (2**30 if metric == "peak_bytes" else 1), width,
                           color=f"C{ci}", label=contender if xi == 0 else None)
                elif r and metric == "peak_bytes" and r.get("predicted_peak_bytes"):
                    ax.bar(x, r["predicted_peak_bytes"] / 2**30, width, color=f"C{ci}", fill=False,
                           hatch="//", edgecolor=f"C{ci}")
                    ax.text(x, r["predicted_peak_bytes"] / 2**30, "OOM\n(extrap.)", ha="center",
                            va="bottom", fontsize=6, color=f"C{ci}")
                elif r:
                    ax.text(x, 0.02, r["status"].upper(), rotation=90, ha="center", va="bottom",
                            fontsize=8, color=f"C{ci}", transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xticks([i + width * (len(CONTENDERS) - 1) / 2 for i in range(len(cases))], ["\n".join(c) for c in cases], fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"One Evoformer / extra-MSA block training step (checkpointed), {meta['host_cpu']}, "
                 f"torch {meta['torch']}", fontsize=9)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench evoformer-block", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("CONTENDER", "BLOCK", "CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timing", nargs=4, metavar=("BLOCK", "CONFIG", "DTYPE", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="paired timing rounds where both fit")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="subset of dims (default all)")
    parser.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny dims: a smoke test of the pipeline")
    parser.add_argument("--update", action="store_true", help="replace only these cases' rows in the results file")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, quick=args.quick, depth=args.depth)))
        return 0
    if args.timing:
        block, config, dtype_name, rounds = args.timing
        print(json.dumps(timing_worker(block, config, dtype_name, int(rounds), quick=args.quick)))
        return 0
    configs = QUICK_CONFIGS if args.quick else {k: CONFIGS[k] for k in (args.configs or CONFIGS)}
    stem = "evoformer_block_quick" if args.quick else "evoformer_block_cpu"
    run(configs, args.blocks, args.dtypes, args.out, stem, args.quick, args.update, args.rounds,
        tuple(args.contenders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
