"""Benchmark: longest trainable sequence for ``genslm-25m`` in a memory budget, ours vs HF.

Each (contender, length) runs one AdamW step (forward, backward, optimizer) on one sequence in
a fresh process; peak resident memory above the process's idle state is recorded. A fit
``memory = a + b*S + c*S^2`` per contender predicts the longest sequence whose step fits the
budget (20 GiB by default). Tokens/s is measured at one length for every contender.

Contenders: ``ds4sci`` (every memory technique: ``OUR_SETTINGS``),
``ds4sci-ckpt`` (full checkpointing only: HF's memory settings, for the tokens/s comparison), ``hf-eager``
(GenSLM's original path: GPTNeoXForCausalLM with eager attention), ``hf-sdpa`` and
``hf-sdpa-ckpt`` (SDPA + gradient checkpointing), all built from the same weights.

Usage: ``python -m ds4sci.bench.genslm_memory [--quick]`` or ``ds4sci bench genslm-memory``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import (
    current_rss_bytes, limit_address_space, machine_info, merge_rows, peak_rss_bytes,
    reset_peak_rss, run_worker, save_figure, subplots, write_rows, WORKER_ENV,
)

CONTENDERS = ("ds4sci", "ds4sci-ckpt", "hf-eager", "hf-sdpa", "hf-sdpa-ckpt")
LENGTHS = {
    # From 16K up: below that the chunks' fixed buffers decide where the peak is and bend the
    # curve. 65536 is also the confirming real step (about 20 minutes here).
    "ds4sci": (16384, 24576, 32768, 65536),
    "ds4sci-ckpt": (8192,),
    "hf-eager": (1024, 2048, 4096),
    "hf-sdpa": (2048, 4096, 8192, 16384),
    "hf-sdpa-ckpt": (2048, 4096, 8192, 16384),
}
OUR_SETTINGS = {
    # Every memory technique: full checkpointing in two-layer segments, attention in groups of two
    # heads, MLP and loss in 2048-token chunks (from 16K tokens on, the peak is then in attention's
    # backward, so the measured points lie on one line; with 4096 it is in the MLP up to ~24K).
    "ds4sci": dict(activation_checkpointing="full", checkpoint_num_layers=2, attention_head_chunk=2,
                   mlp_chunk_size=2048, loss_chunk_size=2048),
    # HF's memory settings (checkpoint every layer, nothing tiled), for the tokens/s comparison.
    "ds4sci-ckpt": dict(activation_checkpointing="full", loss_chunk_size=None),
}
QUICK_LENGTHS = {c: (256, 512, 1024) for c in CONTENDERS}
BUDGET = 20 * 2**30


def _model(contender: str, preset_name: str):
    from ds4sci.models.genslm import GenSLM, preset, to_hf

    torch.manual_seed(0)
    config = preset(preset_name)
    if contender in OUR_SETTINGS:
        return GenSLM(config.replace(**OUR_SETTINGS[contender]))
    hf = to_hf(GenSLM(config)).train()
    hf.config._attn_implementation = "eager" if contender == "hf-eager" else "sdpa"
    if contender == "hf-sdpa-ckpt":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf


def _step(model, optimizer, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def worker(contender: str, length: int, preset_name: str) -> dict:
    model = _model(contender, preset_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, optimizer, torch.randint(5, 69, (1, 64)))  # warm-up: kernels, optimizer state
    limit_address_space(BUDGET + 4 * 2**30)
    reset_peak_rss()
    base = current_rss_bytes()
    ids = torch.randint(5, 69, (1, length), generator=torch.Generator().manual_seed(1))
    try:
        start = time.perf_counter()
        loss = _step(model, optimizer, ids)
        elapsed = time.perf_counter() - start
    except RuntimeError as err:
        if "can't allocate" not in str(err).lower() and "out of memory" not in str(err).lower():
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200]}
    return {"status": "ok", "peak_bytes": peak_rss_bytes() - base, "time_s": elapsed,
            "tokens_per_s": length / elapsed, "loss": loss}


def fit_and_predict(lengths, peaks, budget=BUDGET, quadratic: bool = True) -> dict:
    """Least-squares ``a + b S + c S^2`` (c >= 0; c = 0 without ``quadratic``) and the largest S
    with prediction <= budget."""
    s = np.asarray(lengths, dtype=float)
    y = np.asarray(peaks, dtype=float)
    if len(s) >= 3 and quadratic:
        a, b, c = np.linalg.lstsq(np.stack([np.ones_like(s), s, s * s], 1), y, rcond=None)[0]
    else:
        a, b, c = *np.linalg.lstsq(np.stack([np.ones_like(s), s], 1), y, rcond=None)[0], 0.0
    if c <= 0:  # linear in S: refit without the quadratic term
        a, b = np.linalg.lstsq(np.stack([np.ones_like(s), s], 1), y, rcond=None)[0]
        c = 0.0
        s_max = (budget - a) / b if b > 0 else float("inf")
    else:
        s_max = (-b + np.sqrt(b * b - 4 * c * (a - budget))) / (2 * c)
    return {"a": float(a), "b": float(b), "c": float(c), "predicted_max_tokens": float(s_max)}


def run(lengths: dict, preset_name: str, out_dir: Path, stem: str, rate_length: int, progress=print,
        update: bool = False):
    """Measure, fit and write; with ``update``, replace only the measured contenders' rows."""
    rows = []
    commit = machine_info()["git_commit"]
    for contender, ls in lengths.items():
        for length in ls:
            r = run_worker("ds4sci.bench.genslm_memory", ["--worker", contender, str(length), preset_name],
                           timeout=3600, env=WORKER_ENV)
            rows.append({"contender": contender, "length": length, "preset": preset_name, **r,
                         "git_commit": commit,
                         "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "measured_now": True})
            peak = f"{r['peak_bytes'] / 2**30:7.2f} GiB" if r.get("peak_bytes") is not None else r["status"].upper()
            extra = f"  {r['time_s']:7.1f} s  {r['tokens_per_s']:8.0f} tok/s" if r["status"] == "ok" else ""
            progress(f"{contender:<13} S={length:>7}  peak {peak}{extra}")
            if r["status"] != "ok":
                break  # longer lengths will not fit either
    meta = machine_info()
    if update:
        rows = merge_rows(out_dir / f"{stem}.json", rows, lambda r: (r["contender"], r["length"]), meta)
        stale = {r["contender"] for r in rows} & set(lengths)
        rows = [r for r in rows if r["contender"] not in stale or r.get("measured_now")]
    fits = {}
    for contender in dict.fromkeys(r["contender"] for r in rows):
        ok = [(r["length"], r["peak_bytes"]) for r in rows if r["contender"] == contender and r["status"] == "ok"]
        if len(ok) >= 2:
            fits[contender] = fit_and_predict(*zip(*ok))
            progress(f"{contender:<13} fit: predicted max length in {BUDGET / 2**30:.0f} GiB = "
                     f"{fits[contender]['predicted_max_tokens']:,.0f} tokens")
    rate = {r["contender"]: r["tokens_per_s"] for r in rows if r["length"] == rate_length and r["status"] == "ok"}
    for r in rows:
        r.pop("measured_now", None)
    meta.update({"budget_bytes": BUDGET, "settings": OUR_SETTINGS, "fits": fits, "tokens_per_s_at": rate_length, "tokens_per_s": rate,
                 "worker_env": WORKER_ENV})
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, fits, out_dir / f"{stem}.png", meta)
    progress(f"wrote {json_path}, {csv_path}, {png}")
    return rows, fits


def plot(rows, fits, path: Path, meta) -> Path:
    fig, ax = subplots(figsize=(8, 5))
    for i, contender in enumerate(dict.fromkeys(r["contender"] for r in rows)):
        ok = [(r["length"], r["peak_bytes"] / 2**30) for r in rows if r["contender"] == contender and r["status"] == "ok"]
        color = f"C{i}"
        if ok:
            ax.plot(*zip(*ok), "o", color=color, label=f"{contender} (measured)")
        if contender in fits:
            f = fits[contender]
            s = np.geomspace(min(x for x, _ in ok), max(f["predicted_max_tokens"], 1024), 100)
            ax.plot(s, (f["a"] + f["b"] * s + f["c"] * s * s) / 2**30, "--", color=color,
                    label=f"{contender} fit: max {f['predicted_max_tokens']:,.0f} tokens")
    ax.axhline(meta["budget_bytes"] / 2**30, color="black", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory of one training step (GiB)")
    ax.set_title(f"genslm-25m, one AdamW step, {meta['host_cpu']}, torch {meta['torch']}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench genslm-memory", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "LENGTH", "PRESET"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="genslm-tiny at short lengths (smoke test)")
    parser.add_argument("--confirm", type=int, metavar="LENGTH",
                        help="run one real ds4sci step at LENGTH tokens and write <stem>_confirm_<LENGTH>.json")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the given contenders and replace their rows in the results file")
    args = parser.parse_args(argv)
    if args.worker:
        contender, length, preset_name = args.worker
        print(json.dumps(worker(contender, int(length), preset_name)))
        return 0
    preset_name = "genslm-tiny" if args.quick else "genslm-25m"
    if args.confirm:
        result = run_worker("ds4sci.bench.genslm_memory", ["--worker", "ds4sci", str(args.confirm), preset_name],
                            timeout=3600, env=WORKER_ENV)
        path = args.out / f"genslm_memory_cpu_confirm_{args.confirm}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": {**machine_info(), "worker_env": WORKER_ENV},
                                    "result": {"contender": "ds4sci", "length": args.confirm,
                                               "preset": preset_name, **result}}, indent=2) + "\n")
        print(f"{result} -> {path}")
        return 0
    table = QUICK_LENGTHS if args.quick else LENGTHS
    lengths = {c: table[c] for c in args.contenders}
    run(lengths, "genslm-tiny" if args.quick else "genslm-25m", args.out,
        "genslm_memory_quick" if args.quick else "genslm_memory_cpu", 512 if args.quick else 8192,
        update=args.update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
