"""Benchmark: memory per rank to get a GenSLM sharded (FSDP2 over P ranks) and its weights set.

Contenders, each a torchrun job of P gloo processes, the same model and layout. Initialising:

- ``whole-then-shard``: every rank builds and initialises the whole model, then ``fully_shard``
  keeps its shard (FSDP2's plain recipe, and ds4sci's before meta-device initialisation);
- ``meta``: built on the meta device, sharded, then each rank makes its shards real and fills
  them (``models.genslm.init_parameters``), which is what ``ds4sci train`` does under torchrun.

Loading saved weights (a safetensors file of the whole model, as for ``init_from``), both onto
the meta-built, sharded model:

- ``load-whole``: every rank reads the whole state dict, then torch's
  ``set_model_state_dict(..., full_state_dict=True)`` keeps its shards;
- ``load-lazy``: ``models.genslm.load_parameters`` over ``train.checkpoint.safetensors_tensors``,
  one whole tensor read at a time (what ``init_from`` does).

Recorded per job: the largest rank's peak resident memory above its state before the model
(process group up, torch loaded), its memory when set up, and the slowest rank's set-up time,
beside the model's fp32 size and the ideal shard (size / P). ``genslm-2.5b`` (10.1 GB in fp32)
runs with ``meta`` only: four whole copies do not fit this machine.

Usage: ``python -m ds4sci.bench.genslm_init [--quick]`` or ``ds4sci bench genslm-init``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .common import (
    current_rss_bytes, finish_worker, init_gloo, machine_info, peak_rss_bytes, reset_peak_rss,
    run_torchrun, save_figure, subplots, write_rows, WORKER_ENV,
)

CONTENDERS = ("whole-then-shard", "meta", "load-whole", "load-lazy")
BASELINE = {"meta": "whole-then-shard", "load-lazy": "load-whole"}  # ours -> what it replaces
# (preset, processes, contenders)
CASES = [("genslm-250m", p, CONTENDERS) for p in (1, 2, 4)] + [("genslm-2.5b", 4, ("meta",))]
QUICK_CASES = [("genslm-25m", p, CONTENDERS) for p in (1, 2)]
STEM = "genslm_init_cpu"
SEED = 0


def worker(contender: str, preset_name: str, weights_file: str) -> dict:
    import torch.distributed as dist

    from ..models.genslm import preset

    init_gloo()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
    # First uses (meta tensors, FSDP, DTensor state dicts) load code: not the model's memory.
    warm_up = Path(weights_file).with_name("genslm-tiny.safetensors")
    for name in CONTENDERS:
        _set_up(name, preset("genslm-tiny"), mesh, warm_up)
    dist.barrier()
    reset_peak_rss()
    base, start = current_rss_bytes(), time.perf_counter()
    model = _set_up(contender, preset(preset_name), mesh, Path(weights_file))
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


def _set_up(contender: str, config, mesh, weights_file: Path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..models.genslm import GenSLM, init_parameters, load_parameters
    from ..parallel.fsdp import apply_fsdp
    from ..train.checkpoint import safetensors_tensors

    if contender == "whole-then-shard":
        model = GenSLM(config, seed=SEED)
    else:
        with torch.device("meta"):
            model = GenSLM(config)
    if mesh.size() > 1:
        apply_fsdp(model, mesh)
    if contender == "whole-then-shard":
        return model
    model.to_empty(device="cpu")
    if contender == "meta":
        init_parameters(model, SEED)
    elif contender == "load-lazy":
        load_parameters(model, safetensors_tensors([weights_file]))
    else:
        set_model_state_dict(model, load_file(weights_file), options=StateDictOptions(full_state_dict=True))
    return model


def _save_weights(preset_name: str, directory: Path) -> Path:
    """The whole model's weights as one safetensors file (what the load contenders read)."""
    from safetensors.torch import save_file

    from ..models.genslm import GenSLM, preset

    path = directory / f"{preset_name}.safetensors"
    if not path.is_file():
        save_file(GenSLM(preset(preset_name), seed=SEED).state_dict(), path)
    return path


def run(cases, out_dir: Path, stem: str, progress=print) -> list[dict]:
    meta = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds4sci-genslm-init-") as tmp:  # saved weights (GBs)
        scratch = Path(tmp)
        _save_weights("genslm-tiny", scratch)
        for preset_name, p, contenders in cases:
            weights = _save_weights(preset_name, scratch) if any(c.startswith("load") for c in contenders) else ""
            for contender in contenders:
                result = run_torchrun("ds4sci.bench.genslm_init", p,
                                      ["--worker", contender, preset_name, str(weights or scratch / "none")],
                                      timeout=1800, env=WORKER_ENV)
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
        other = next((o for o in rows if o["contender"] == BASELINE.get(r["contender"]) and o["status"] == "ok"
                      and (o["preset"], o["processes"]) == (r["preset"], r["processes"])), None)
        if r["status"] == "ok" and other:
            r["peak_ratio_vs_baseline"] = other["peak_bytes"] / r["peak_bytes"]  # > 1: ours needs less


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def _format(r) -> str:
    head = f"{r['preset']:<12} P={r['processes']} {r['contender']:<17}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error', '')}"
    return (f"{head} peak {_gib(r['peak_bytes'])} ({r['peak_over_shard']:.2f}x the shard), "
            f"held {_gib(r['held_bytes'])}, {r['time_s']:.1f} s")


def summary_markdown(rows) -> str:
    """Peak memory per rank (and its multiple of the ideal shard) for each contender, and ours
    against what it replaces."""
    contenders = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    lines = ["| model (fp32 size) | P | ideal shard | " + " | ".join(f"{c} peak" for c in contenders)
             + " | meta vs whole-then-shard | load-lazy vs load-whole |",
             "|---|---|---|" + "---|" * (len(contenders) + 2)]
    for preset_name, p in dict.fromkeys((r["preset"], r["processes"]) for r in rows):
        case = {r["contender"]: r for r in rows if (r["preset"], r["processes"]) == (preset_name, p)}
        ref = next((r for r in case.values() if r["status"] == "ok"), None)
        if ref is None:
            continue
        cells = []
        for c in contenders:
            r = case.get(c)
            cells.append("not run" if r is None else r["status"] if r["status"] != "ok"
                         else f"{_gib(r['peak_bytes'])} ({r['peak_over_shard']:.2f}x)")
        ratios = [f"{case[c]['peak_ratio_vs_baseline']:.2f}x less" if "peak_ratio_vs_baseline" in case.get(c, {})
                  else "-" for c in BASELINE]
        lines.append(f"| {preset_name} ({_gib(ref['model_bytes'])}) | {p} | {_gib(ref['shard_bytes'])} | "
                     + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, meta: dict) -> Path:
    fig, ax = subplots(figsize=(6.5, 4.2))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    for preset_name, marker in zip(presets, "os^"):
        for contender, style in zip(CONTENDERS, ("--", "-", "-.", "-")):
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
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds4sci.bench.genslm_init", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="genslm-25m on 1 and 2 processes (smoke test)")
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "PRESET", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        finish_worker(worker(*args.worker))
    run(QUICK_CASES if args.quick else CASES, args.out, "genslm_init_quick" if args.quick else STEM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
