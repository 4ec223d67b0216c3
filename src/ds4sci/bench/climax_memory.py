"""Benchmark: one ClimaX training step at the issue's resolutions, ours vs ClimaX's own code path.

Each case runs one AdamW step (forward with ClimaX's lat-weighted MSE over every variable,
backward, optimizer) on random fields in fresh processes, under an address-space limit
(``--budget-gib``, default 20) so that a step that does not fit is recorded as ``oom`` instead of
waking the OOM killer. Recorded: each process's peak resident memory (``ru_maxrss``: the
interpreter, weights, AdamW state and the step; the largest over the ranks) and the step's time.

Resolutions (ERA5 0.25 deg is 721 x 1440: cropped to 720 x 1440, ``data.climate.fit_grid``):
5.625 deg p2 (512 tokens), 1.40625 deg p4 (2,048), 1.40625 deg p2 (8,192), 0.25 deg p8 (16,200),
p4 (64,800), p2 (259,200). Model: the published 48-variable configuration (embed 1024, depth 8,
16 heads, about 108M parameters) unless ``--width/--depth/--heads`` say otherwise.

Contenders: ``ours`` (tiled tokenisation + aggregation, SDPA, per-block checkpointing, tiled
MLP), ``ours-plain`` (SDPA only: every switch off, for resolutions the original fits), ``climax``
(ClimaX's code path as published: ``models.climax.reference`` with eager attention and
``nn.MultiheadAttention`` over the whole ``[B, V, L, D]``), ``climax-sdpa-ckpt`` (that path with
SDPA and per-block checkpointing). ``--processes 2 4`` runs ``ours`` as a torchrun job of that many
gloo ranks: sequence parallelism over the patches (Ulysses when the heads divide, else ring) and
FSDP over the same ranks; each rank holds only the band of field rows its patches need.

``--fit`` (no runs) fits ``peak = a + b L`` per (contender, processes, width) over the measured
lengths, projects the resolutions that were not run and the longest sequence that fits the budget
(``L_max = (budget - a) / b``), writes ``<stem>_fit.json``, a Markdown table and a plot.

Usage: ``ds4sci bench climax-memory --quick`` (width 128, depth 2, two resolutions: under a
minute), or e.g. ``ds4sci bench climax-memory --resolutions 1.40625deg-p2 --contenders ours``. The
full table at the published width takes hours on a small CPU: run it a resolution at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import (
    WORKER_ENV,
    finish_worker,
    gather_ranks,
    init_gloo,
    is_out_of_memory,
    limit_address_space,
    machine_info,
    merge_rows,
    peak_rss_bytes,
    run_torchrun,
    run_worker,
    save_figure,
    subplots,
    write_rows,
)

CONTENDERS = ("ours", "ours-plain", "climax", "climax-sdpa-ckpt")
RESOLUTIONS = {  # name -> (grid rows, grid columns, patch)
    "5.625deg-p2": (32, 64, 2),
    "1.40625deg-p4": (128, 256, 4),
    "1.40625deg-p2": (128, 256, 2),
    "0.25deg-p8": (721, 1440, 8),
    "0.25deg-p4": (721, 1440, 4),
    "0.25deg-p2": (721, 1440, 2),
}
QUICK = ("5.625deg-p2", "1.40625deg-p4")
OUR_SETTINGS = dict(agg_tile=512, activation_checkpointing=True, mlp_chunk=4096)
"""Every exact memory switch: 512 patches per aggregation tile, checkpointed blocks, MLP in
4,096-token chunks."""


def _config(resolution: str, width: int, depth: int, heads: int):
    from ds4sci.data.climate import fitted_size
    from ds4sci.models.climax import preset

    h, w, p = RESOLUTIONS[resolution]
    return preset("climax-5.625", img_size=fitted_size(h, w, p, "crop"), patch_size=p, embed_dim=width,
                  depth=depth, num_heads=heads)


def worker(contender: str, resolution: str, width: int, depth: int, heads: int, budget: int) -> dict:
    from ds4sci.models.climax import ClimaX
    from ds4sci.models.climax.metrics import lat_weighted_mse
    from ds4sci.models.climax.reference import ReferenceClimaX

    torch.manual_seed(0)
    config = _config(resolution, width, depth, heads)
    limit_address_space(budget)
    try:
        if contender.startswith("ours"):
            model = ClimaX(config.with_(**OUR_SETTINGS) if contender == "ours" else config, seed=0)
        else:
            model = ReferenceClimaX(**config.climax_kwargs(), attention="eager" if contender == "climax" else "sdpa",
                                    checkpointing=contender == "climax-sdpa-ckpt")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variables = list(config.default_vars)
        h, w = config.img_size
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(1, len(variables), h, w, generator=g), torch.randn(1, len(variables), h, w, generator=g)
        lead_times, lat = torch.full((1,), 0.72), np.linspace(90, -90, 721)[:h]
        start = time.perf_counter()
        (loss,), _ = model(x, y, lead_times, variables, variables, [lat_weighted_mse], lat)
        loss["loss"].backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200] if str(err) else "MemoryError",
                "peak_bytes": peak_rss_bytes()}
    return {"status": "ok", "peak_bytes": peak_rss_bytes(), "time_s": elapsed, "loss": float(loss["loss"]),
            "tokens": config.num_patches, "params": sum(p.numel() for p in model.parameters())}


def sp_worker(resolution: str, width: int, depth: int, heads: int, budget: int) -> dict:
    """One rank of a torchrun job: ``ours`` with SP over every rank and FSDP over the same ranks;
    rank 0 returns the case (peak: the largest rank's; time: the slowest rank's)."""
    import torch.distributed as dist

    from ds4sci.models.climax import ClimaX, init_parameters
    from ds4sci.models.climax.parallelize import (
        parallelize_climax,
        patch_row_band,
        shard_patches,
        sharded_loss_sum,
    )
    from ds4sci.parallel.dims import ParallelDims

    init_gloo()
    p, rank = dist.get_world_size(), dist.get_rank()
    config = _config(resolution, width, depth, heads).with_(**OUR_SETTINGS)
    dims = ParallelDims(dp=1, sp=p, world_size=p, sp_mode="ulysses" if heads % p == 0 else "ring")
    mesh = dims.build_mesh()
    limit_address_space(budget)
    status, error, elapsed, loss_value = "ok", None, 0.0, None
    try:
        with torch.device("meta"):
            model = ClimaX(config)
        parallelize_climax(model, dims, mesh)  # weights sharded before any storage exists
        model.to_empty(device="cpu")
        init_parameters(model, seed=0)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variables = list(config.default_vars)
        h, w = config.img_size
        positions, _, _ = shard_patches(config, dims, mesh)
        first, stop = patch_row_band(config, positions)
        rows = (stop - first) * config.patch_size  # this rank's band of the fields, not the whole field
        g = torch.Generator().manual_seed(1 + rank)
        x, y = torch.randn(1, len(variables), rows, w, generator=g), torch.randn(1, len(variables), rows, w, generator=g)
        lead_times, lat = torch.full((1,), 0.72), np.linspace(90, -90, 721)[:h]
        dist.barrier()
        start = time.perf_counter()
        loss_sum, count = sharded_loss_sum(model, x, y, lead_times, variables, variables, lat, dims, mesh,
                                           v_out=len(variables), row0=first)
        totals = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
        dist.all_reduce(totals)
        (loss_sum / totals[1]).backward()
        optimizer.step()
        elapsed, loss_value = time.perf_counter() - start, float(totals[0] / totals[1])
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        status, error = "oom", (str(err).splitlines()[0][:200] if str(err) else "MemoryError")
    gathered = gather_ranks({"status": status, "peak": peak_rss_bytes(), "time": elapsed})
    if gathered is None:
        return {}
    if any(g["status"] != "ok" for g in gathered):
        return {"status": "oom", "error": error, "peak_bytes": max(g["peak"] for g in gathered)}
    return {"status": "ok", "peak_bytes": max(g["peak"] for g in gathered),
            "peak_bytes_ranks": [g["peak"] for g in gathered], "time_s": max(g["time"] for g in gathered),
            "loss": loss_value, "params": _param_count(config), "sp_mode": dims.sp_mode}


def _param_count(config) -> int:
    from ds4sci.models.climax import ClimaX

    with torch.device("meta"):
        return sum(q.numel() for q in ClimaX(config).parameters())


def _key(row: dict):
    return (row["contender"], row["resolution"], row.get("processes", 1), row["width"], row["depth"])


def run(resolutions, contenders, width, depth, heads, budget_gib, out_dir: Path, stem: str, progress=print,
        processes=(1,), timeout: float = 4 * 3600):
    rows, meta = [], machine_info()
    for contender in contenders:
        for p in processes if contender == "ours" else (1,):
            for res in resolutions:
                args = [contender, res, str(width), str(depth), str(heads), str(budget_gib)]
                if p == 1:
                    r = run_worker("ds4sci.bench.climax_memory", ["--worker", *args], timeout=timeout, env=WORKER_ENV)
                else:
                    r = run_torchrun("ds4sci.bench.climax_memory", p, ["--sp-worker", *args[1:]], timeout=timeout,
                                     env=WORKER_ENV)
                rows.append({"contender": contender, "resolution": res, "processes": p, "width": width,
                             "depth": depth, "heads": heads, "tokens": _tokens(res),
                             "budget_gib": budget_gib, **r})
                peak = f"{r['peak_bytes'] / 2**30:7.2f} GiB" if r.get("status") == "ok" else r["status"].upper()
                extra = f"  {r['time_s']:8.2f} s" if r.get("status") == "ok" else ""
                progress(f"{contender:<17} P={p} {res:<14} L={rows[-1]['tokens']:>7}  peak {peak}{extra}")
                if r["status"] != "ok":
                    break  # finer resolutions will not fit either
    rows = merge_rows(out_dir / f"{stem}.json", rows, _key, meta)
    json_path, _ = write_rows(rows, meta, out_dir, stem)
    progress(f"wrote {json_path}")
    return rows


# ----------------------------------------------------------------------------------------------
# Fit over lengths


N_VARS = 48
"""Variables of the published configuration (every benchmark case uses them all)."""


def field_values(row: dict) -> float:
    """Grid values of one process's input fields, ``V * H * W / P`` (each rank holds the band of
    rows its patches need): the memory that scales with the field, not the token count (the
    inputs, targets, head outputs ``[L, p*p*V]`` and the loss's temporaries)."""
    p = RESOLUTIONS[row["resolution"]][2]
    return row["tokens"] * p * p * N_VARS / row.get("processes", 1)


def fit_rows(rows: list[dict], budget_gib: float, holdout: str | None = "0.25deg-p4") -> list[dict]:
    """Memory model of ``ours`` (every switch on; the other contenders are measured only: their
    memory is not linear, or not run long enough to fit) per number of processes P, by least
    squares over every measured width (lengths from one whole aggregation tile per rank on): ``peak = a_w + b_w L + c F`` (bytes), ``a_w`` and ``b_w`` per (width, depth), ``c``
    shared (bytes per field value per process, :func:`field_values`: it depends on the data,
    not the model's width). Step time ``t = t1 L + t2 L^2`` per (width, depth). For each group:
    the projected peak and time at every resolution, the longest sequence within the budget at
    the finest patch (p = 2: ``(budget - a) / (b + c * 4 * V / P)``) and its ratio to one
    process's. Rows at ``holdout`` are left out of the fit and compared with its prediction."""
    budget = budget_gib * 2**30
    by_p: dict[tuple, list[dict]] = {}
    for r in rows:
        # With every switch on, the aggregation's tile transients grow until a rank has a whole
        # tile of patches (agg_tile) and are constant after: fit the lengths past that point.
        short = r["contender"] == "ours" and r["tokens"] / r.get("processes", 1) < OUR_SETTINGS["agg_tile"]
        if r.get("status") == "ok" and r["contender"] == "ours" and not short:
            by_p.setdefault((r["contender"], r.get("processes", 1)), []).append(r)
    fits = []
    for (contender, procs), ok in sorted(by_p.items()):
        train = [r for r in ok if r["resolution"] != holdout] or ok
        groups = sorted({(r["width"], r["depth"]) for r in train})
        groups = [g for g in groups if len({r["tokens"] for r in train if (r["width"], r["depth"]) == g}) >= 2]
        train = [r for r in train if (r["width"], r["depth"]) in groups]
        if not groups:
            continue
        # Unknowns: (a_g, b_g) per group, then c.
        design = np.zeros((len(train), 2 * len(groups) + 1))
        for i, r in enumerate(train):
            g = groups.index((r["width"], r["depth"]))
            design[i, 2 * g], design[i, 2 * g + 1], design[i, -1] = 1.0, r["tokens"], field_values(r)
        peak = np.array([r["peak_bytes"] for r in train], dtype=float)
        fit_c = np.linalg.matrix_rank(design) == design.shape[1]  # else no field-size variety
        coef, *_ = np.linalg.lstsq(design if fit_c else design[:, :-1], peak, rcond=None)
        c = float(coef[-1]) if fit_c else 0.0
        for g, (width, depth) in enumerate(groups):
            a, b = float(coef[2 * g]), float(coef[2 * g + 1])
            mine = [r for r in ok if (r["width"], r["depth"]) == (width, depth)]
            fitted = [r for r in mine if r in train]
            L = np.array([r["tokens"] for r in fitted], dtype=float)
            t = np.array([r["time_s"] for r in fitted], dtype=float)
            (t1, t2), *_ = np.linalg.lstsq(np.stack([L, L**2], 1), t, rcond=None)

            def model(n, p, a=a, b=b, c=c, procs=procs):
                return a + b * n + c * n * p * p * N_VARS / procs

            per_token_p2 = b + c * 4 * N_VARS / procs
            fit = {
                "contender": contender, "processes": procs, "width": width, "depth": depth,
                "measured_tokens": sorted({r["tokens"] for r in fitted}),
                "a_bytes": a, "b_bytes_per_token": b, "c_bytes_per_field_value": c,
                "max_residual_bytes": float(max(abs(model(r["tokens"], RESOLUTIONS[r["resolution"]][2])
                                                    - r["peak_bytes"]) for r in fitted)),
                "time_per_token_s": float(t1), "time_per_token2_s": float(t2),
                "max_tokens_in_budget_p2": float((budget - a) / per_token_p2) if per_token_p2 > 0 else None,
                "projected": {res: {"tokens": n, "peak_gib": float(model(n, RESOLUTIONS[res][2]) / 2**30),
                                    "time_s": float(t1 * n + t2 * n * n),
                                    "fits": bool(model(n, RESOLUTIONS[res][2]) <= budget)}
                              for res, n in ((res, _tokens(res)) for res in RESOLUTIONS)},
            }
            held = [r for r in mine if r not in train]
            if held:
                r = held[0]
                fit["holdout"] = {"resolution": r["resolution"], "tokens": r["tokens"],
                                  "measured_gib": r["peak_bytes"] / 2**30,
                                  "predicted_gib": float(model(r["tokens"], RESOLUTIONS[r["resolution"]][2]) / 2**30)}
            fits.append(fit)
    singles = {(f["contender"], f["width"], f["depth"]): f for f in fits if f["processes"] == 1}
    for f in fits:
        one = singles.get((f["contender"], f["width"], f["depth"]))
        if one and f["max_tokens_in_budget_p2"] and one["max_tokens_in_budget_p2"]:
            f["max_tokens_vs_one_process"] = f["max_tokens_in_budget_p2"] / one["max_tokens_in_budget_p2"]
    return fits


def _tokens(resolution: str) -> int:
    """Patch tokens of a resolution (the cropped grid over the patch; no model needed)."""
    from ds4sci.data.climate import fitted_size

    h, w, p = RESOLUTIONS[resolution]
    fh, fw = fitted_size(h, w, p, "crop")
    return (fh // p) * (fw // p)


def write_fit(rows: list[dict], budget_gib: float, out_dir: Path, stem: str) -> Path:
    meta = machine_info()
    fits = fit_rows(rows, budget_gib)
    path = out_dir / f"{stem}_fit.json"
    path.write_text(json.dumps({"machine": meta, "budget_gib": budget_gib, "fits": fits}, indent=2) + "\n")
    header = ("| contender | P | width x depth | measured L | a (GiB) | b (KiB/token) | c (B/field value) | "
              "L_max at p=2 | vs P=1 | 64,800 tokens (p4) | 259,200 tokens (p2) | held out: measured / predicted |")
    machine = (f"Machine: {meta['host_cpu']}, {meta['cpu_count']} cores, torch {meta['torch']}, "
               f"commit {meta['git_commit']}, {meta['date'][:10]}. Rows: `{stem}.json`.")
    lines = [f"# ClimaX memory fit (budget {budget_gib:g} GiB per process)", "", machine, "", header, "|" + "---|" * 12]

    def cell(proj: dict) -> str:
        return f"{proj['peak_gib']:.1f} GiB" + ("" if proj["fits"] else " (over)")

    for f in fits:
        ratio = f"{f['max_tokens_vs_one_process']:.2f}" if "max_tokens_vs_one_process" in f else ""
        lmax = f"{f['max_tokens_in_budget_p2']:,.0f}" if f["max_tokens_in_budget_p2"] else "-"
        held = f.get("holdout")
        held = (f"{held['resolution']} ({held['tokens']:,}): {held['measured_gib']:.2f} / "
                f"{held['predicted_gib']:.2f} GiB") if held else ""
        lines.append(f"| {f['contender']} | {f['processes']} | {f['width']} x {f['depth']} | "
                     f"{', '.join(f'{n:,}' for n in f['measured_tokens'])} | {f['a_bytes'] / 2**30:.2f} | "
                     f"{f['b_bytes_per_token'] / 1024:.1f} | {f['c_bytes_per_field_value']:.1f} | {lmax} | {ratio} | "
                     f"{cell(f['projected']['0.25deg-p4'])} | {cell(f['projected']['0.25deg-p2'])} | {held} |")
    (out_dir / f"{stem}_fit.md").write_text("\n".join(lines) + "\n")
    plot(rows, fits, budget_gib, out_dir / f"{stem}.png")
    return path


def plot(rows, fits, budget_gib, path: Path) -> Path:
    fig, ax = subplots(figsize=(7.5, 4.8))
    colors = {}
    for f in fits:
        label = f"{f['contender']} P={f['processes']} w={f['width']}"
        n = np.geomspace(256, 300_000, 64)
        per_token = f["b_bytes_per_token"] + f["c_bytes_per_field_value"] * 4 * N_VARS / f["processes"]
        line, = ax.plot(n, (f["a_bytes"] + per_token * n) / 2**30, "--", lw=1)
        colors[(f["contender"], f["processes"], f["width"])] = line.get_color()
        line.set_label(label + " (fit at p=2)")
    measured_only = iter(["black", "grey", "brown", "olive", "teal", "navy", "maroon", "darkorange"])
    for r in rows:
        key = (r["contender"], r.get("processes", 1), r["width"])
        label = None
        if key not in colors:  # a contender measured only (not fitted)
            colors[key] = next(measured_only, "k")
            label = f"{key[0]} P={key[1]} w={key[2]} (measured)"
        marker = "s" if r["contender"].startswith("climax") else "o"
        if r.get("status") == "ok":
            ax.plot(r["tokens"], r["peak_bytes"] / 2**30, marker, color=colors[key], label=label, ms=5)
        elif r.get("status") == "oom":
            ax.plot(r["tokens"], budget_gib, "x", color=colors[key], ms=9, label=label)
    ax.axhline(budget_gib, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="patch tokens L (x 48 variables)", ylabel="peak memory per process (GiB)",
           title="ClimaX one training step: measured (o ours, s ClimaX), OOM (x), fit (--)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench climax-memory", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--sp-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--processes", nargs="+", type=int, default=[1],
                        help="process counts for `ours` (SP + FSDP over gloo ranks); others run in one")
    parser.add_argument("--timeout", type=float, default=4 * 3600,
                        help="seconds one case may run before it is recorded as `timeout` (default 4 h)")
    parser.add_argument("--fit", action="store_true", help="no runs: fit the measured rows, project, plot")
    parser.add_argument("--quick", action="store_true", help="width 128, depth 2, two coarse resolutions (< 1 min)")
    parser.add_argument("--resolutions", nargs="+", choices=list(RESOLUTIONS), default=None)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.sp_worker:
        res, width, depth, heads, budget = args.sp_worker
        finish_worker(sp_worker(res, int(width), int(depth), int(heads), int(float(budget) * 2**30)))
    if args.worker:
        contender, res, width, depth, heads, budget = args.worker
        print(json.dumps(worker(contender, res, int(width), int(depth), int(heads), int(float(budget) * 2**30))))
        return 0
    if args.quick:
        width, depth, heads, resolutions, stem = 128, 2, 4, list(QUICK), "climax_memory_quick_cpu"
        budget = min(args.budget_gib, 4.0)
    else:
        width, depth, heads, stem = args.width, args.depth, args.heads, "climax_memory_cpu"
        resolutions, budget = args.resolutions or list(RESOLUTIONS), args.budget_gib
    if args.fit:
        rows = json.loads((args.out / f"{stem}.json").read_text())["results"]
        print(write_fit(rows, budget, args.out, stem))
        print((args.out / f"{stem}_fit.md").read_text())
        return 0
    for p in args.processes:
        if p < 1:
            parser.error(f"--processes: {p}; expected process counts >= 1")
    rows = run(resolutions, args.contenders, width, depth, heads, budget, args.out, stem, processes=args.processes,
               timeout=args.timeout)
    write_fit(rows, budget, args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
