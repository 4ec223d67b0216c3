"""Train a DiG model on the embedded alanine-dipeptide MD for a fixed wall time (CPU check).

A stand-alone loop (Adam, cosine learning rate, EMA of the weights) until ``ds4sci train dig``
runs it through the common trainer. Writes ``<out>/dig_ala2.pt`` (EMA weights, the format of
``ds4sci.models.dig.sample.load_checkpoint``) and ``<out>/train_log.json``.

Usage: python scripts/train_dig_ala2.py --minutes 8 --out runs/dig_ala2
then:  python -m ds4sci.models.dig.sample --checkpoint runs/dig_ala2/dig_ala2.pt --out runs/s
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ds4sci.data.conformations import alanine_dipeptide_dataset
from ds4sci.models.dig import build_model, denoising_loss_sum, get_config
from ds4sci.models.dig.sample import save_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dig-tiny")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/dig_ala2")
    parser.add_argument("--save-every", type=float, default=10.0, metavar="MINUTES",
                        help="also save the EMA checkpoint and log this often (0 = at the end)")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="start from these weights and their config (e.g. a previous "
                             "run's EMA dig_ala2.pt, to continue it; --set still applies)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="DiGConfig overrides, e.g. train_sigma=lognormal num_layers=4")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = alanine_dipeptide_dataset()
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}; expected FIELD=VALUE")
        default = getattr(get_config(args.preset), field, None)
        if default is None:
            raise ValueError(f"--set {item!r}: DiGConfig has no field {field!r}")
        if isinstance(default, bool):  # bool("False") would be True
            if value not in ("True", "False"):
                raise ValueError(f"--set {item!r}: expected True or False")
            overrides[field] = value == "True"
        else:
            overrides[field] = type(default)(value)
    if args.init:
        from ds4sci.models.dig.sample import load_checkpoint

        model = load_checkpoint(args.init).train()
        model.config = model.config.replace(**overrides)
    else:
        model = build_model(get_config(args.preset, **overrides), seed=args.seed)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    start = time.time()
    log, step, running = [], 0, None
    last_save = start

    def save():
        save_checkpoint(ema, out / "dig_ala2.pt")
        (out / "train_log.json").write_text(json.dumps(
            {"preset": args.preset, "init": args.init, "overrides": overrides, "config": asdict(model.config),
             "threads": args.threads, "steps": step, "batch_size": args.batch_size,
             "lr": args.lr, "minutes_budget": args.minutes, "seconds": time.time() - start,
             "log": log}, indent=1) + "\n")
    while step < args.max_steps and time.time() - start < budget:
        frac = min(1.0, (time.time() - start) / budget)
        for group in opt.param_groups:  # cosine decay over the wall-time budget
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(len(ds), (args.batch_size,), generator=gen).tolist()
        loss_sum, count = denoising_loss_sum(model, ds.collate([ds[i] for i in idx]), gen)
        loss = loss_sum / count
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 100 == 0:
            log.append({"step": step, "loss": running, "seconds": time.time() - start})
            print(f"step {step} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
        if args.save_every > 0 and time.time() - last_save > args.save_every * 60:
            save()  # a run cut short keeps its latest EMA weights
            last_save = time.time()
    save()
    print(f"saved {out / 'dig_ala2.pt'} after {step} steps")


if __name__ == "__main__":
    main()
