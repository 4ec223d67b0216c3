"""Benchmark: GenSLM generation speed with ds4sci's KV cache, without it, and with HF's.

Contenders, all greedy over codons (special tokens excluded) on the same weights, fp32, one
process with ``--threads`` torch threads (the committed results: 1, since this 2-core machine is
shared and two spinning threads per process ran 2-4x slower than one):

- ``ds4sci-cache``: ``models.genslm.inference.generate_batch`` (preallocated KV cache);
- ``ds4sci-no-cache``: the same with ``use_cache=False`` (the whole prefix recomputed per token,
  what ``ds4sci generate`` did before the cache);
- ``hf-cache``: ``transformers.GPTNeoXForCausalLM.generate(use_cache=True)`` on the weights
  converted by ``models.genslm.interop.to_hf`` (``suppress_tokens`` = the special tokens).

Each case decodes at a context length L (codons): a prompt of ``L - N`` random codons, then ``N``
new ones. Recorded: the time to the first new token (the prompt's forward pass) and the decode
rate ``(N - 1) / (t_N - t_1)`` in tokens/s from per-token timestamps (ours: ``on_token``; HF: a
logits processor), so the prompt's cost does not dilute it. The no-cache path gets fewer new
tokens (each costs a whole forward pass at L). Whether the greedy tokens equal ours is recorded.
Every contender first runs once on a short prompt (warm-up); at contexts up to 2048 codons the
contenders then alternate for ``ROUNDS`` rounds and the medians are reported (this machine is
shared: alternating spreads its load over all of them alike), longer contexts run once.

Usage: ``python -m ds4sci.bench.genslm_generate [--quick]`` or ``ds4sci bench genslm-generate``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import machine_info, save_figure, subplots, write_rows

CONTENDERS = ("ds4sci-cache", "ds4sci-no-cache", "hf-cache")
# (preset, context length L, new tokens N per contender)
CASES = [("genslm-25m", 1024, {"ds4sci-cache": 64, "ds4sci-no-cache": 8, "hf-cache": 64}),
         ("genslm-25m", 10240, {"ds4sci-cache": 64, "ds4sci-no-cache": 2, "hf-cache": 64})]
QUICK_CASES = [("genslm-25m", 256, {"ds4sci-cache": 16, "ds4sci-no-cache": 4, "hf-cache": 16}),
               ("genslm-25m", 1024, {"ds4sci-cache": 16, "ds4sci-no-cache": 3, "hf-cache": 16})]
STEM = "genslm_generate_cpu"
ROUNDS = 3
SEED = 0


def _prompt(tokenizer, length: int) -> str:
    codons = sorted(tokenizer.codon_ids)
    pick = torch.randint(0, len(codons), (length,), generator=torch.Generator().manual_seed(SEED))
    return "".join(codons[i] for i in pick.tolist())


def run_ours(model, tokenizer, prompt: str, new: int, use_cache: bool) -> tuple[list[float], list[int]]:
    from ..models.genslm.inference import generate_batch

    stamps = [time.perf_counter()]
    out = generate_batch(model, tokenizer, [prompt], new, top_k=1, use_cache=use_cache,
                         on_token=lambda step: stamps.append(time.perf_counter()))[0]
    return stamps, tokenizer.encode(out[len(prompt):])


def run_hf(hf, tokenizer, prompt: str, new: int) -> tuple[list[float], list[int]]:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = [time.perf_counter()]

    class Stamp(LogitsProcessor):
        """Called once per new token, after that step's forward pass."""

        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([tokenizer.encode(prompt)])
    special = [i for i in range(hf.config.vocab_size) if i not in tokenizer.codon_ids.values()]
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, use_cache=True, pad_token_id=0, suppress_tokens=special,
                          logits_processor=LogitsProcessorList([Stamp()]))
    # Stamps are taken before the token is chosen: shift so each marks a token's end like ours.
    stamps = stamps[:1] + stamps[2:] + [time.perf_counter()]
    return stamps, out[0, ids.shape[1]:].tolist()


def _run(contender, models, tokenizer, prompt, new):
    model, hf = models
    if contender == "hf-cache":
        return run_hf(hf, tokenizer, prompt, new)
    return run_ours(model, tokenizer, prompt, new, contender == "ds4sci-cache")


def run(cases, out_dir: Path, stem: str, progress=print) -> list[dict]:
    from ..data.tokenizer import CodonTokenizer
    from ..models.genslm import GenSLM, preset, to_hf

    meta = machine_info()
    tokenizer = CodonTokenizer()
    rows = []
    models = {}
    for preset_name, length, new_tokens in cases:
        if preset_name not in models:
            model = GenSLM(preset(preset_name), seed=SEED).eval()
            models = {preset_name: (model, to_hf(model))}
            for contender in CONTENDERS:  # warm-up: first calls load kernels and allocate
                _run(contender, models[preset_name], tokenizer, _prompt(tokenizer, 64), 4)
        model, hf = models[preset_name]
        rounds = ROUNDS if length <= 2048 else 1
        timings = {c: [] for c in CONTENDERS}
        tokens = {}
        for r in range(rounds):
            for contender in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:
                new = new_tokens[contender]
                stamps, tokens[contender] = _run(contender, models[preset_name], tokenizer,
                                                 _prompt(tokenizer, length - new), new)
                timings[contender].append((stamps[1] - stamps[0], (new - 1) / (stamps[-1] - stamps[1])))
        for contender in CONTENDERS:
            new = new_tokens[contender]
            firsts, rates = (sorted(t[i] for t in timings[contender]) for i in (0, 1))
            row = {"preset": preset_name, "params": model.num_parameters(), "context_codons": length,
                   "contender": contender, "new_tokens": new, "rounds": rounds,
                   "first_token_s": round(firsts[len(firsts) // 2], 4),
                   "decode_tokens_per_s": round(rates[len(rates) // 2], 4),
                   "decode_tokens_per_s_all": [round(x, 4) for x in rates], "git_commit": meta["git_commit"]}
            if contender != "ds4sci-cache":
                n = min(len(tokens[contender]), len(tokens["ds4sci-cache"]))
                row["same_greedy_tokens_as_cache"] = tokens[contender][:n] == tokens["ds4sci-cache"][:n]
            rows.append(row)
            progress(_format(row))
    for r in rows:
        case = {o["contender"]: o for o in rows if (o["preset"], o["context_codons"]) == (r["preset"], r["context_codons"])}
        ours = case["ds4sci-cache"]["decode_tokens_per_s"]
        if r["contender"] != "ds4sci-cache" and ours and r["decode_tokens_per_s"]:
            r["cache_speedup"] = round(ours / r["decode_tokens_per_s"], 2)
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    (out_dir / f"{stem}.md").write_text(summary_markdown(rows, meta))
    progress(f"wrote {json_path}, {csv_path}, {png}, {stem}.md")
    return rows


def _format(r) -> str:
    rate = r["decode_tokens_per_s"]
    return (f"{r['preset']} L={r['context_codons']:<6} {r['contender']:<16} first token {r['first_token_s']:.2f} s, "
            f"decode {rate:.3g} tokens/s ({r['new_tokens']} new, median of {r['rounds']})")


def summary_markdown(rows, meta) -> str:
    lines = [f"GenSLM greedy generation, fp32, {meta['host_cpu']} ({meta['torch_threads']} threads), "
             f"torch {meta['torch']}, {meta['date'][:10]}, commit {meta['git_commit']}.", "",
             "| model | context (codons) | contender | decode tokens/s (median) | first token (s) | ds4sci-cache speed-up | same greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r.get("same_greedy_tokens_as_cache")
        lines.append(f"| {r['preset']} | {r['context_codons']} | {r['contender']} | {r['decode_tokens_per_s']} | "
                     f"{r['first_token_s']} | {r.get('cache_speedup', '-')}{'x' if 'cache_speedup' in r else ''} | "
                     f"{'-' if same is None else 'yes' if same else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, meta: dict) -> Path:
    fig, ax = subplots(figsize=(6.5, 4.0))
    lengths = sorted({r["context_codons"] for r in rows})
    width = 0.8 / len(CONTENDERS)
    for j, contender in enumerate(CONTENDERS):
        heights = [next((r["decode_tokens_per_s"] or 0 for r in rows if r["contender"] == contender
                         and r["context_codons"] == L), 0) for L in lengths]
        ax.bar([i + (j - 1) * width for i in range(len(lengths))], heights, width, label=contender)
    ax.set_xticks(range(len(lengths)), [f"{L} codons" for L in lengths])
    ax.set_yscale("log")
    ax.set_ylabel("greedy decode tokens/s (fp32)")
    ax.set_title(f"GenSLM {rows[0]['preset']} generation, {meta['torch_threads']} CPU threads "
                 f"({meta['date'][:10]}, torch {meta['torch']})", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds4sci.bench.genslm_generate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="256 and 1024 codons, few tokens (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}; expected >= 1")
        torch.set_num_threads(args.threads)
    run(QUICK_CASES if args.quick else CASES, args.out, "genslm_generate_quick" if args.quick else STEM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
