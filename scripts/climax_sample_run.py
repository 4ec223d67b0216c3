"""A plain training loop of ``climax-tiny`` on the embedded ERA5 sample, scored against
persistence and climatology: the numbers quoted in docs/climax.md until ``ds4sci train climax``
(the common trainer) replaces it. Writes ``benchmarks/results/climax_sample_run.json``.

Usage: python scripts/climax_sample_run.py [--seconds 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ds4sci.bench.common import machine_info
from ds4sci.data import climate as C
from ds4sci.models.climax import ClimaX, preset
from ds4sci.models.climax import metrics as M

OUT = Path(__file__).resolve().parents[1] / "benchmarks/results/climax_sample_run.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = C.sample_datasets(patch_size=4)
    train, val, stats, lat = data["train"], data["val"], data["stats"], data["lat"].numpy()
    variables = list(C.SAMPLE_CHANNELS)
    config = preset("climax-tiny")
    model = ClimaX(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    curve, steps, start = [], 0, time.time()
    while time.time() - start < args.seconds:
        for idx in torch.randperm(len(train)).split(args.batch_size):
            batch = C.collate([train[int(i)] for i in idx])
            model.train()
            (loss,), _ = model(batch["x"], batch["y"], batch["lead_times"], variables, variables,
                               [M.lat_weighted_mse], lat)
            opt.zero_grad()
            loss["loss"].backward()
            opt.step()
            steps += 1
            curve.append({"step": steps, "loss": float(loss["loss"].detach()), "seconds": time.time() - start})
    elapsed = time.time() - start
    model.eval()
    batch = C.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        pred = model.predict(batch["x"], batch["lead_times"], variables, variables)

    def phys(t):
        return stats.denormalize(t.double(), variables)

    clim = phys(data["climatology"])
    scores = {"climax-tiny": M.evaluate(phys(pred), phys(batch["y"]), clim, lat, variables),
              **M.baselines(phys(batch["x"]), phys(batch["y"]), clim, lat, variables)}
    result = {"machine": machine_info(), "config": config.climax_kwargs() | {"params": sum(p.numel() for p in model.parameters())},
              "train_pairs": len(train), "val_pairs": len(val), "lead_hours": 12, "steps": steps,
              "seconds": elapsed, "seconds_per_step": elapsed / steps, "loss_first": curve[0]["loss"],
              "loss_last": curve[-1]["loss"], "val_scores": scores, "curve": curve[:: max(1, len(curve) // 50)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{steps} steps in {elapsed:.0f} s; loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}")
    print(f"{'variable':20s} {'model RMSE':>11s} {'persist.':>9s} {'climat.':>9s} {'model ACC':>10s} {'persist.':>9s}")
    for v in variables:
        print(f"{v:20s} {scores['climax-tiny'][v]['rmse']:11.2f} {scores['persistence'][v]['rmse']:9.2f} "
              f"{scores['climatology'][v]['rmse']:9.2f} {scores['climax-tiny'][v]['acc']:10.3f} "
              f"{scores['persistence'][v]['acc']:9.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
