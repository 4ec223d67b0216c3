"""DiG benchmark: memory and time of one sampling step and one training step at DiG's protein
configuration (d_model 768, d_pair 256, 12 layers, 32 heads, batch 1), ours vs the same model
with naive attention. One fresh process per case, under an address-space limit (``--budget-gib``,
default 20) so that a step that does not fit is recorded as ``oom`` instead of a crash.

Contenders (all built from the same weights):
  * ``ds4sci``: ``ds4sci.evoformer_attention`` (logits never materialised), the pair track
    processed in row tiles of ``--pair-chunk`` rows (pair-bias projection, pair update, input
    features and head; each tile recomputed in backward) and, in training, activation
    checkpointing in segments of ``--checkpoint-layers`` layers;
  * ``naive``: the same, but attention with the logits ``[B, H, N, N]`` materialised;
  * ``plain``: naive attention, no tiling, no checkpointing (the model as one would write it).

Recorded per case: peak resident memory of the whole process (``ru_maxrss``: weights, inputs,
molecule features and the step) and the step's time. ``sample``: one no-grad denoising step
with the molecule features precomputed (as the samplers do); ``train``: loss + backward.
``--quick``: 1 layer, 32 and 64 residues (under a minute). Full: 256 / 512 / 1,024 residues.
Results: ``<out>/dig_<device>[_quick].json|csv`` (cases merged into an existing file) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import (
    WORKER_ENV,
    limit_address_space,
    machine_info,
    merge_rows,
    peak_rss_bytes,
    run_worker,
    save_figure,
    subplots,
    write_rows,
)

CONTENDERS = ("ds4sci", "naive", "plain")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def contender_settings(contender: str, pair_chunk: int, checkpoint_layers: int) -> dict:
    """DiGConfig overrides of one contender."""
    if contender == "plain":
        return {"naive_attention": True}
    return {"naive_attention": contender == "naive", "pair_chunk": pair_chunk,
            "checkpoint_layers": checkpoint_layers}


def _model_and_inputs(settings: dict, residues: int, layers: int, device: str, dtype):
    from ds4sci.models.dig import build_model, get_config

    cfg = get_config("dig-protein", num_layers=layers, **settings)
    model = build_model(cfg).to(device=device, dtype=dtype)
    L = residues
    g = torch.Generator().manual_seed(0)
    mol = {"atom_types": torch.randint(1, 21, (1, L), generator=g),
           "bonds": torch.zeros(1, L, L, dtype=torch.long),
           "path": torch.full((1, L, L), 2), "mask": torch.ones(1, L, dtype=torch.bool),
           "single_repr": torch.randn(1, L, cfg.d_single_in, generator=g),
           "pair_repr": torch.randn(1, L, L, cfg.d_pair_in, generator=g)}
    mol = {k: v.to(device) if not v.is_floating_point() else v.to(device, dtype)
           for k, v in mol.items()}
    x = (torch.randn(1, L, 3, generator=g) * 10).to(device, dtype)
    return model, mol, x


def worker(contender: str, mode: str, residues: int, layers: int, device: str,
           dtype_name: str, rounds: int, warmup: int, pair_chunk: int, checkpoint_layers: int,
           budget: int) -> dict:
    """Peak memory and median time of ``mode`` (``sample``: one no-grad denoising step with
    the molecule features precomputed; ``train``: loss + backward) in this fresh process."""
    from ds4sci.models.dig import denoising_loss_sum

    cuda = device.startswith("cuda")
    if not cuda:
        limit_address_space(budget)
    dtype = DTYPES[dtype_name]
    settings = contender_settings(contender, pair_chunk, checkpoint_layers)
    result = {"status": "ok", "settings": settings, "threads": torch.get_num_threads(),
              "load_avg_1min_at_start": os.getloadavg()[0]}  # the CPU is shared
    try:
        model, mol, x = _model_and_inputs(settings, residues, layers, device, dtype)
        sigma = torch.full((1,), 5.0, device=device, dtype=dtype)
        result["setup_peak_bytes"] = peak_rss_bytes()  # weights + inputs, before any step

        def step(x, mol, cond):
            if mode == "sample":
                with torch.no_grad():
                    return model(x, sigma, mol, cond)
            loss, count = denoising_loss_sum(model, {"x": x, **mol})
            (loss / count).backward()
            return loss

        # One step on the first 16 residues: op registration and first-call costs (seconds)
        # leave the timed steps without the cost of a full-size warm-up step.
        small = {k: v[:, :16, :16] if v.dim() > 2 and v.shape[2] == residues else v[:, :16]
                 for k, v in mol.items()}
        with torch.no_grad():
            small_cond = model.condition(small)
        step(x[:, :16], small, small_cond)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            cond = model.condition(mol)
        for _ in range(warmup):  # full-size untimed steps
            step(x, mol, cond)
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            step(x, mol, cond)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    except (RuntimeError, MemoryError) as err:
        text = str(err).lower()
        if isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text:
            return {**result, "status": "oom", "error": str(err).splitlines()[0][:200]
                    if str(err) else "MemoryError", "peak_bytes": peak_rss_bytes()}
        raise
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {**result, "time_s": statistics.median(times), "first_time_s": times[0],
            "rounds": rounds, "warmup": warmup, "peak_bytes": peak}


def fit_quadratic(rows: list[dict], mode: str, contender: str, key: str):
    """Least-squares ``a + b L^2`` through the measured ``key`` of (mode, contender): pair
    track, pair ops and the dominant memory are all O(L^2) at batch 1. None if < 2 points."""
    pts = [(r["residues"], r[key]) for r in rows if r["mode"] == mode and
           r["contender"] == contender and r.get("status") == "ok" and key in r]
    if len(pts) < 2:
        return None
    A = torch.tensor([[1.0, L * L] for L, _ in pts], dtype=torch.float64)
    y = torch.tensor([v for _, v in pts], dtype=torch.float64)
    a, b = torch.linalg.lstsq(A, y.unsqueeze(-1)).solution.squeeze(-1).tolist()
    return a, b, sorted(L for L, _ in pts)


def plot(rows: list[dict], meta: dict, path: Path) -> Path:
    fig, axes = subplots(2, 2, figsize=(11, 8))
    colours = {"ds4sci": "C0", "naive": "C1", "plain": "C3"}
    for col, mode in enumerate(("sample", "train")):
        for row, (key, label, scale) in enumerate((("peak_bytes", "peak RSS (GiB)", 2**30),
                                                   ("time_s", "step time (s)", 1))):
            ax = axes[row][col]
            for c in CONTENDERS:
                ok = sorted((r["residues"], r[key] / scale) for r in rows if r["mode"] == mode
                            and r["contender"] == c and r.get("status") == "ok")
                if ok:
                    ax.plot(*zip(*ok), "o-", color=colours[c], label=c)
                fit = fit_quadratic(rows, mode, c, key)
                if fit:
                    a, b, _ = fit
                    Ls = torch.linspace(min(p[0] for p in ok), 1024, 50).tolist()
                    ax.plot(Ls, [(a + b * L * L) / scale for L in Ls], ":", color=colours[c])
                for r in rows:
                    if r["mode"] == mode and r["contender"] == c and r.get("status") != "ok":
                        ax.annotate(r["status"].upper(), (r["residues"], 0), color=colours[c],
                                    xytext=(0, 12 * (1 + CONTENDERS.index(c))),
                                    textcoords="offset points", ha="center", fontsize=8)
            if key == "peak_bytes":
                budget = rows[0].get("budget_gib")
                if budget:
                    ax.axhline(budget, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("residues")
            ax.set_ylabel(label)
            ax.set_title(f"{mode} step")
            ax.legend(fontsize=8)
    fig.suptitle(f"DiG protein config (768/256/12 layers/32 heads), batch 1, "
                 f"{meta['host_cpu']} x{meta['cpu_count']}; dotted: a + b L^2 fit")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench dig", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, 1 layer, 32/64 residues")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--residues", type=int, nargs="+", default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=("sample", "train"),
                        default=["sample", "train"])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed steps per case (default 2 quick, 1 full)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 1 quick, 0 full: a 1,024-residue "
                             "step takes minutes on a CPU)")
    parser.add_argument("--pair-chunk", type=int, default=None,
                        help="pair-track rows per tile (default 16 quick, 64 full)")
    parser.add_argument("--checkpoint-layers", type=int, default=3,
                        help="layers per checkpointed segment in training (ds4sci, naive)")
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", nargs=11, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (c, mode, L, layers, device, dtype_name, rounds, warmup, chunk, ckpt,
         budget) = args.worker
        print(json.dumps(worker(c, mode, int(L), int(layers), device, dtype_name, int(rounds),
                                int(warmup), int(chunk), int(ckpt), int(float(budget)))))
        return 0
    if args.quick:
        args.device = "cpu"
    residues = args.residues or ([32, 64] if args.quick else [256, 512, 1024])
    layers = args.layers or (1 if args.quick else 12)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rounds = args.rounds or (2 if args.quick else 1)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 0)
    chunk = args.pair_chunk or (16 if args.quick else 64)
    budget = int(args.budget_gib * 2**30)
    meta = machine_info()
    rows = []
    for mode in args.modes:
        for L in residues:
            for contender in args.contenders:
                result = run_worker("ds4sci.bench.dig", ["--worker", contender, mode, str(L),
                                                         str(layers), args.device, dtype_name,
                                                         str(rounds), str(warmup), str(chunk),
                                                         str(args.checkpoint_layers),
                                                         str(budget)],
                                    timeout=args.timeout, env=WORKER_ENV)
                row = {"mode": mode, "residues": L, "layers": layers, "contender": contender,
                       "device": args.device, "dtype": dtype_name,
                       "budget_gib": args.budget_gib, **result}
                rows.append(row)
                peak = row.get("peak_bytes")
                print(f"{mode:6s} L={L:5d} {contender:7s} {row['status']:7s} "
                      f"time {row.get('time_s', float('nan')):8.2f} s peak "
                      f"{(peak or 0) / 2**30:6.2f} GiB", flush=True)
    stem = f"dig_{args.device.split(':')[0]}" + ("_quick" if args.quick else "")
    rows = merge_rows(args.out / f"{stem}.json", rows,
                      lambda r: (r["mode"], r["residues"], r["layers"], r["contender"]), meta)
    by_case = {(r["mode"], r["residues"], r["layers"], r["contender"]): r for r in rows}
    for r in rows:  # ratios between contenders measured on the same machine
        ours = by_case.get((r["mode"], r["residues"], r["layers"], "ds4sci"))
        if r["contender"] != "ds4sci" and ours and ours["status"] == r["status"] == "ok":
            r["peak_ratio_vs_ds4sci"] = r["peak_bytes"] / ours["peak_bytes"]
            r["time_ratio_vs_ds4sci"] = r["time_s"] / ours["time_s"]
    fits = {}
    for mode in ("sample", "train"):
        for c in CONTENDERS:
            for key in ("peak_bytes", "time_s"):
                fit = fit_quadratic(rows, mode, c, key)
                if fit:
                    a, b, Ls = fit
                    fits[f"{mode}/{c}/{key}"] = {"a": a, "b_per_L2": b, "from_residues": Ls,
                                                 "at_1024": a + b * 1024 ** 2}
    meta["fits_a_plus_bL2"] = fits
    json_path, _ = write_rows(rows, meta, args.out, stem)
    plot(rows, meta, args.out / f"{stem}.png")
    print(f"wrote {json_path} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
