"""DiG benchmark: memory and time of one sampling step and one training step at DiG's protein
configuration (d_model 768, d_pair 256, 12 layers, 32 heads), ours (ds4sci.evoformer_attention)
vs the same model with naive attention (logits materialised). One fresh process per case;
running out of memory is a result (``status: oom``).

``--quick``: CPU, 1 layer, 32 and 64 residues (under a minute). Full: 256 / 512 / 1,024
residues, 12 layers, bf16 on a GPU (``--device cuda``).
Results: ``<out>/dig_<device>[_quick].json|csv`` with machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import (
    WORKER_ENV,
    current_rss_bytes,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    run_worker,
    write_rows,
)

CONTENDERS = ("ds4sci", "naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model_and_inputs(contender: str, residues: int, layers: int, device: str, dtype):
    from ds4sci.models.dig import build_model, get_config

    cfg = get_config("dig-protein", num_layers=layers, naive_attention=contender == "naive")
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
           dtype_name: str, rounds: int) -> dict:
    """Peak memory and median time of ``mode`` (``sample``: one no-grad denoising step with
    the molecule features precomputed; ``train``: loss + backward) in this fresh process."""
    from ds4sci.models.dig import denoising_loss_sum

    dtype = DTYPES[dtype_name]
    model, mol, x = _model_and_inputs(contender, residues, layers, device, dtype)
    sigma = torch.full((1,), 5.0, device=device, dtype=dtype)

    def step():
        if mode == "sample":
            with torch.no_grad():
                return model(x, sigma, mol, cond)
        loss, count = denoising_loss_sum(model, {"x": x, **mol})
        (loss / count).backward()
        return loss

    cuda = device.startswith("cuda")
    try:
        with torch.no_grad():
            cond = model.condition(mol)
        step()  # warm-up: kernels, op registration, allocator (not counted)
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = current_rss_bytes()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    except (RuntimeError, MemoryError) as err:
        text = str(err).lower()
        if isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text:
            return {"status": "oom", "error": str(err).splitlines()[0][:200]}
        raise
    return {"status": "ok", "time_s": statistics.median(times), "first_time_s": times[0],
            "peak_bytes": peak}


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", nargs=7, metavar=("CONTENDER", "MODE", "L", "LAYERS",
                                                      "DEVICE", "DTYPE", "ROUNDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        c, mode, L, layers, device, dtype_name, rounds = args.worker
        print(json.dumps(worker(c, mode, int(L), int(layers), device, dtype_name,
                                int(rounds))))
        return 0
    if args.quick:
        args.device = "cpu"
    residues = args.residues or ([32, 64] if args.quick else [256, 512, 1024])
    layers = args.layers or (1 if args.quick else 12)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rounds = 2 if args.quick else args.rounds
    rows = []
    for mode in args.modes:
        for L in residues:
            case = {}
            for contender in CONTENDERS:
                result = run_worker("ds4sci.bench.dig", ["--worker", contender, mode, str(L),
                                                         str(layers), args.device, dtype_name,
                                                         str(rounds)],
                                    timeout=1800, env=WORKER_ENV)
                row = {"mode": mode, "residues": L, "layers": layers, "contender": contender,
                       "device": args.device, "dtype": dtype_name, **result}
                case[contender] = row
                rows.append(row)
                peak = row.get("peak_bytes")
                print(f"{mode:6s} L={L:5d} {contender:7s} {row['status']:4s} "
                      f"time {row.get('time_s', float('nan')):.3f}s peak "
                      f"{(peak or 0) / 2**20:.0f} MiB", flush=True)
            ours, naive = case["ds4sci"], case["naive"]
            if ours["status"] == naive["status"] == "ok":
                naive["peak_ratio_vs_ds4sci"] = naive["peak_bytes"] / max(ours["peak_bytes"], 1)
                naive["time_ratio_vs_ds4sci"] = naive["time_s"] / ours["time_s"]
    stem = f"dig_{args.device.split(':')[0]}" + ("_quick" if args.quick else "")
    json_path, _ = write_rows(rows, machine_info(), args.out, stem)
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
