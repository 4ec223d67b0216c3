"""Benchmark: one ClimaX training step at the issue's resolutions, ours vs ClimaX's own code path.

Each (contender, resolution) runs one AdamW step (forward with ClimaX's lat-weighted MSE over
every variable, backward, optimizer) on random fields in a fresh process, under an
address-space limit (``--budget-gib``, default 20) so that a step that does not fit is recorded
as ``oom`` instead of waking the OOM killer. Recorded: the process's peak resident memory
(``ru_maxrss``: weights, AdamW state and the step) and the step's time.

Resolutions (ERA5 0.25 deg is 721 x 1440: cropped to 720 x 1440, ``data.climate.fit_grid``):
5.625 deg p2 (512 tokens), 1.40625 deg p4 (2,048), 1.40625 deg p2 (8,192), 0.25 deg p8 (16,200),
p4 (64,800), p2 (259,200). Model: the published 48-variable configuration (embed 1024, depth 8,
16 heads, about 108M parameters) unless ``--width/--depth/--heads`` say otherwise.

Contenders: ``ours`` (tiled tokenisation + aggregation, SDPA, per-block checkpointing, tiled
MLP), ``ours-plain`` (SDPA only: every switch off, for resolutions the original fits), ``climax`` (ClimaX's code path as published: ``models.climax.reference`` with eager
attention and ``nn.MultiheadAttention`` over the whole ``[B, V, L, D]``), ``climax-sdpa-ckpt``
(that path with SDPA and per-block checkpointing).

Usage: ``python -m ds4sci.bench.climax_memory --quick`` (width 128, depth 2, two resolutions:
under a minute) or ``python benchmarks/climax_memory.py``. A full run at the published width takes
hours on a small CPU; not run here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .common import (
    WORKER_ENV,
    limit_address_space,
    machine_info,
    merge_rows,
    peak_rss_bytes,
    run_worker,
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
        text = str(err).lower()
        if not isinstance(err, MemoryError) and "can't allocate" not in text and "out of memory" not in text:
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200] if str(err) else "MemoryError",
                "peak_bytes": peak_rss_bytes()}
    return {"status": "ok", "peak_bytes": peak_rss_bytes(), "time_s": elapsed, "loss": float(loss["loss"]),
            "tokens": config.num_patches, "params": sum(p.numel() for p in model.parameters())}


def run(resolutions, contenders, width, depth, heads, budget_gib, out_dir: Path, stem: str, progress=print):
    rows, meta = [], machine_info()
    for contender in contenders:
        for res in resolutions:
            args = ["--worker", contender, res, str(width), str(depth), str(heads), str(budget_gib)]
            r = run_worker("ds4sci.bench.climax_memory", args, timeout=4 * 3600, env=WORKER_ENV)
            rows.append({"contender": contender, "resolution": res, "width": width, "depth": depth,
                         "tokens": _config(res, width, depth, heads).num_patches, "budget_gib": budget_gib, **r})
            peak = f"{r['peak_bytes'] / 2**30:7.2f} GiB" if r.get("status") == "ok" else r["status"].upper()
            extra = f"  {r['time_s']:8.2f} s" if r.get("status") == "ok" else ""
            progress(f"{contender:<17} {res:<14} L={rows[-1]['tokens']:>7}  peak {peak}{extra}")
            if r["status"] != "ok":
                break  # finer resolutions will not fit either
    rows = merge_rows(out_dir / f"{stem}.json", rows, lambda r: (r["contender"], r["resolution"]), meta)
    json_path, _ = write_rows(rows, meta, out_dir, stem)
    progress(f"wrote {json_path}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench climax-memory", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="width 128, depth 2, two coarse resolutions (< 1 min)")
    parser.add_argument("--resolutions", nargs="+", choices=list(RESOLUTIONS), default=None)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.worker:
        import json

        contender, res, width, depth, heads, budget = args.worker
        print(json.dumps(worker(contender, res, int(width), int(depth), int(heads), int(float(budget) * 2**30))))
        return 0
    if args.quick:
        width, depth, heads, resolutions, stem = 128, 2, 4, list(QUICK), "climax_memory_quick_cpu"
        budget = min(args.budget_gib, 4.0)
    else:
        width, depth, heads, stem = args.width, args.depth, args.heads, "climax_memory_cpu"
        resolutions, budget = args.resolutions or list(RESOLUTIONS), args.budget_gib
    run(resolutions, args.contenders, width, depth, heads, budget, args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
