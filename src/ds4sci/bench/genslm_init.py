"""Benchmark: memory per rank to get a GenSLM sharded (FSDP2 over P ranks) and initialised.

Contenders, each a torchrun job of P gloo processes, the same model and layout:

- ``whole-then-shard``: every rank builds and initialises the whole model, then ``fully_shard``
  keeps its shard (FSDP2's plain recipe, and ds4sci's before meta-device initialisation);
- ``meta``: built on the meta device, sharded, then each rank makes its shards real and fills
  them (``models.genslm.init_parameters``), which is what ``ds4sci train`` does under torchrun.

Recorded per job: the largest rank's peak resident memory above its state before the model
(process group up, torch loaded), its memory when set up, and the slowest rank's set-up time,
beside the model's fp32 size and the ideal shard (size / P). ``genslm-2.5b`` (10.1 GB in fp32)
runs with ``meta`` only: four whole copies do not fit this machine.

Usage: ``python -m ds4sci.bench.genslm_init [--quick]`` or ``ds4sci bench genslm-init``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .common import current_rss_bytes, machine_info, peak_rss_bytes, reset_peak_rss, run_worker, write_rows
from .genslm_memory import WORKER_ENV

CONTENDERS = ("whole-then-shard", "meta")
# (preset, processes, contenders)
CASES = [("genslm-250m", p, CONTENDERS) for p in (1, 2, 4)] + [("genslm-2.5b", 4, ("meta",))]
QUICK_CASES = [("genslm-25m", p, CONTENDERS) for p in (1, 2)]
STEM = "genslm_init_cpu"
SEED = 0


def worker(contender: str, preset_name: str) -> dict:
    import torch.distributed as dist

    from ..models.genslm import preset

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", 1))))
    dist.init_process_group("gloo")
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
    for name in CONTENDERS:  # first uses (meta tensors, FSDP) load code: not the model's memory
        _set_up(name, preset("genslm-tiny"), mesh)
    dist.barrier()
    reset_peak_rss()
    base, start = current_rss_bytes(), time.perf_counter()
    model = _set_up(contender, preset(preset_name), mesh)
    seconds = time.perf_counter() - start
    mine = torch.tensor([peak_rss_bytes() - base, current_rss_bytes() - base, seconds], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank:
        return {}
    table = torch.stack(gathered)
    return {"status": "ok", "peak_bytes": int(table[:, 0].max()), "held_bytes": int(table[:, 1].max()),
            "time_s": float(table[:, 2].max()), "params": model.num_parameters()}


def _set_up(contender: str, config, mesh):
    from ..models.genslm import GenSLM, init_parameters
    from ..parallel.fsdp import apply_fsdp

    if contender == "meta":
        with torch.device("meta"):
            model = GenSLM(config)
    else:
        model = GenSLM(config, seed=SEED)
    if mesh.size() > 1:
        apply_fsdp(model, mesh)
    if contender == "meta":
        model.to_empty(device="cpu")
        init_parameters(model, SEED)
    return model


def run(cases, out_dir: Path, stem: str, progress=print) -> list[dict]:
    meta = machine_info()
    rows = []
    for preset_name, p, contenders in cases:
        for contender in contenders:
            result = run_worker("torch.distributed.run",
                                ["--standalone", f"--nproc-per-node={p}", "-m", "ds4sci.bench.genslm_init",
                                 "--worker", contender, preset_name],
                                timeout=1800, env={**WORKER_ENV, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // p))})
            row = {"preset": preset_name, "processes": p, "contender": contender, **result,
                   "git_commit": meta["git_commit"]}
            if row["status"] == "ok":
                row["model_bytes"] = 4 * row["params"]
                row["shard_bytes"] = row["model_bytes"] / p
                row["peak_over_shard"] = row["peak_bytes"] / row["shard_bytes"]
            rows.append(row)
            progress(_format(row))
    _add_ratios(rows)
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    (out_dir / f"{stem}.md").write_text(summary_markdown(rows))
    progress(f"wrote {json_path}, {csv_path}, {png}, {stem}.md")
    return rows


def _add_ratios(rows):
    for r in rows:
        other = next((o for o in rows if o["contender"] == "whole-then-shard" and o["status"] == "ok"
                      and (o["preset"], o["processes"]) == (r["preset"], r["processes"])), None)
        if r["contender"] == "meta" and r["status"] == "ok" and other:
            r["peak_ratio_vs_whole"] = other["peak_bytes"] / r["peak_bytes"]  # > 1: meta needs less


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def _format(r) -> str:
    head = f"{r['preset']:<12} P={r['processes']} {r['contender']:<17}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error', '')}"
    return (f"{head} peak {_gib(r['peak_bytes'])} ({r['peak_over_shard']:.2f}x the shard), "
            f"held {_gib(r['held_bytes'])}, {r['time_s']:.1f} s")


def summary_markdown(rows) -> str:
    lines = ["| model (fp32 size) | P | ideal shard | whole-then-shard peak | meta peak (ours) | "
             "ours vs whole | set-up time whole / ours |", "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["preset"], r["processes"]) for r in rows)
    for preset_name, p in keys:
        case = {r["contender"]: r for r in rows if (r["preset"], r["processes"]) == (preset_name, p)}
        ours, whole = case.get("meta", {}), case.get("whole-then-shard", {})
        ref = ours if ours.get("status") == "ok" else whole
        if ref.get("status") != "ok":
            continue
        def peak(r):
            if not r:
                return "not run (P whole copies exceed this machine)"
            if r["status"] != "ok":
                return r["status"]
            return f"{_gib(r['peak_bytes'])} ({r['peak_over_shard']:.2f}x)"
        ratio = f"{ours['peak_ratio_vs_whole']:.2f}x less" if "peak_ratio_vs_whole" in ours else "-"
        times = " / ".join(f"{r['time_s']:.1f} s" if r.get("status") == "ok" else "-" for r in (whole, ours))
        lines.append(f"| {preset_name} ({_gib(ref['model_bytes'])}) | {p} | {_gib(ref['shard_bytes'])} | "
                     f"{peak(whole)} | {peak(ours)} | {ratio} | {times} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, meta: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    for preset_name, marker in zip(presets, "os^"):
        for contender, style in zip(CONTENDERS, ("--", "-")):
            pts = sorted((r["processes"], r["peak_bytes"] / 2**30) for r in rows if r["status"] == "ok"
                         and r["preset"] == preset_name and r["contender"] == contender)
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{preset_name} {contender}")
        ideal = sorted({(r["processes"], r["shard_bytes"] / 2**30) for r in rows
                        if r["status"] == "ok" and r["preset"] == preset_name})
        ax.plot(*zip(*ideal), ":", color="grey", marker=marker, label=f"{preset_name} model / P")
    ax.set_xlabel("processes P (FSDP2)")
    ax.set_ylabel("peak memory per rank to set up (GiB)")
    ax.set_xticks(sorted({r["processes"] for r in rows}))
    ax.set_title(f"GenSLM set-up memory per rank ({meta['date'][:10]}, torch {meta['torch']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds4sci.bench.genslm_init", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="genslm-25m on 1 and 2 processes (smoke test)")
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(*args.worker)
        if result:
            print(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)  # see bench.parallel: gloo's teardown sometimes aborts a finished worker
    run(QUICK_CASES if args.quick else CASES, args.out, "genslm_init_quick" if args.quick else STEM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
