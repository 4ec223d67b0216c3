"""Benchmark: sequence-parallel scaling of ``genslm-25m`` training over P = 1, 2, 4 processes.

Each case (contender, P, total length S) is one ``torchrun`` job of P gloo ranks in fresh
processes. Every rank builds the model (same memory settings as ``genslm_memory``'s ``ds4sci``:
full activation checkpointing, tiled MLP, chunked loss), applies the contender's sequence
parallelism with FSDP over the P ranks (``parallelize_genslm``, sp = P), runs a warm-up step,
then one AdamW step on one sequence of S tokens split over the ranks. Recorded per case: the
largest peak resident memory of any rank above its idle state, the step time, and the bytes each
rank sent for attention (all-to-all / ring send), counted at the ``torch.distributed`` calls,
next to the theoretical volume of the algorithm.

Per (contender, P) the fit of ``genslm_memory`` predicts the longest sequence whose step fits the
per-process budget (20 GiB, as there); the target is ``max_len(P) >= 0.9 * P * max_len(1)``. The
fit here is ``a + b*S`` (``fit_and_predict(quadratic=False)``): every contender attends with
flash-style kernels whose memory is linear in S (``tests/test_parallel_sp.py`` asserts no
``S_local x S`` tensor), and the three points of a case are so nearly on a line (second
differences of a few MB, the noise of peak RSS, on steps of 75-130 MB) that a free ``c S^2``
term would be fitted to that noise and move a 1M-token extrapolation by gigabytes either way.
The free quadratic fits are kept in the results (``fits_free_quadratic``) for comparison.

Theoretical attention volume sent per rank per layer: ``parallel.sequence.comm_bytes_per_layer``
(Ulysses: all-to-alls of q, k, v and the output and of their gradients, ``4 S E (P-1)/P^2``
elements each way; ring: K/V on P-1 hops each way plus fp32 dK/dV on P hops), with the forward
counted twice because activation checkpointing recomputes it. Measured: bytes leaving each rank
through ``all_to_all_single`` / ``batch_isend_irecv`` during the step
(``parallel.sequence.count_sent_bytes``), the largest rank's, per layer.

Contenders: ``ulysses`` (ds4sci), ``ring`` (ds4sci, zigzag), ``deepspeed-ulysses``
(``deepspeed.sequence.layer.DistributedAttention`` as the attention core of the same model, when
``pip install deepspeed`` is present; it runs on CPU with gloo).

Step times of separate jobs drift with whatever else the machine does, so our Ulysses and
DeepSpeed-Ulysses are also timed *paired* (``--paired``): one torchrun job per (P, S) builds the
model once and swaps the two attention cores step by step, ``--rounds`` rounds of one step each
after a warm-up round at the same length, the order alternating between rounds; the medians
and the median per-round ratio go to the results file's ``paired_timing``. Both cores run the
same local causal attention, so this compares the sequence-parallel layers themselves.
``--exchange`` times those layers alone (``exchange_worker``: an elementwise stand-in for the
local attention, forward and backward of one layer), results under ``exchange_timing``.

Usage: ``python -m ds4sci.bench.parallel [--quick]`` or ``ds4sci bench parallel-scaling``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .common import (
    current_rss_bytes, finish_worker, gather_ranks, init_gloo, is_out_of_memory, limit_address_space, machine_info,
    merge_rows,
    peak_rss_bytes, reset_peak_rss, run_torchrun, save_figure, subplots, write_rows, WORKER_ENV,
)
from .genslm_memory import BUDGET, fit_and_predict

CONTENDERS = ("ulysses", "ring", "deepspeed-ulysses")
PROCESSES = (1, 2, 4)
CHUNK = 2048
"""MLP and loss chunk (tokens per rank); every measured shard is at least twice as long, so the
chunks' fixed buffers do not bend the fit."""
LENGTHS = {1: (8192, 12288, 16384), 2: (8192, 12288, 16384), 4: (16384, 24576, 32768)}
"""Total lengths per P, chosen so that at every point the peak lies in the last layer's attention
backward (the per-token peak the fit extrapolates). One process accumulates every layer's
unsharded gradients, so below ~8K tokens its peak is in the first layer's backward instead; with
FSDP (P > 1) the gradients are sharded and 4096 tokens per rank suffice."""
RING_HEAD_CHUNK = 1
"""Ring contender: its backward runs one ring pass per head (``ring_attention(head_chunk=1)``,
set through the model's ``attention_head_chunk``, which only the ring reads under SP)."""
QUICK_LENGTHS = {1: (256, 512), 2: (512, 1024), 4: (1024, 2048)}
STEM = "parallel_scaling_cpu"


def theory_bytes_per_layer(contender: str, p: int, s: int, config) -> float:
    """Attention bytes one rank sends per layer in one training step: the forward twice (the
    activation-checkpointing recompute repeats it) and the backward once, from
    ``parallel.sequence.comm_bytes_per_layer``."""
    from ..parallel.sequence import comm_bytes_per_layer

    if p == 1:
        return 0.0
    mode = "ring" if contender == "ring" else "ulysses"
    b = comm_bytes_per_layer(mode, batch=1, seq_len=s, num_heads=config.num_attention_heads,
                             head_dim=config.head_dim, sp=p)
    return float(2 * b["forward"] + b["backward"])


def _deepspeed_core(group, local_core=None):
    """DeepSpeed-Ulysses' DistributedAttention as a ``(q, k, v) [B, H, S, D]`` core: it takes
    ``[S, B, H, D]`` (scatter heads, gather sequence) and runs ``local_core`` (default our causal
    SDPA) locally."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from ..models.genslm.model import causal_attention

    local_core = local_core or causal_attention
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")

    def local(q_SBHD, k_SBHD, v_SBHD, *args, **kwargs):
        out = local_core(*(t.permute(1, 2, 0, 3) for t in (q_SBHD, k_SBHD, v_SBHD)))
        return out.permute(2, 0, 1, 3)

    attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=0)

    def core(q, k, v):
        out_SBHD = attn(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), 1)
        return out_SBHD.permute(1, 2, 0, 3)

    return core


def _setup(contender: str, preset_name: str):
    """Process group, model (parallelized for ``contender``), optimizer and a step function."""
    import torch.distributed as dist

    from ..models.genslm import GenSLM, preset
    from ..models.genslm.parallelize import parallelize_genslm
    from ..parallel.sequence import sequence_layout
    from ..parallel import ParallelDims
    from ..models.genslm.parallelize import shard_batch

    init_gloo()
    p, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    config = preset(preset_name).replace(activation_checkpointing="full", loss_chunk_size=CHUNK,
                                         mlp_chunk_size=CHUNK)
    if contender == "ring":
        config = config.replace(attention_head_chunk=RING_HEAD_CHUNK)
    model = GenSLM(config)
    mode = "ring" if contender == "ring" else "ulysses"
    dims = ParallelDims(sp=p, world_size=p, sp_mode=mode)
    mesh = dims.build_mesh("cpu") if p > 1 else None
    if p > 1:
        parallelize_genslm(model, dims, mesh, ring_layout="zigzag")
        if contender == "deepspeed-ulysses":
            core = _deepspeed_core(mesh.group("sp"))
            for layer in model.layers:
                layer.attention.core = core
    layout, ulysses = sequence_layout(dims, "zigzag")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(n):
        ids = torch.randint(5, 69, (1, n), generator=torch.Generator().manual_seed(n))
        ids_l, targets_l, positions = shard_batch(ids, ids, rank, p, layout, ulysses)
        loss_sum, count, _ = model.loss_sum(model.hidden_states(ids_l, positions=positions), targets_l)
        stats = torch.stack((loss_sum.detach(), count.float()))
        (loss_sum * p / (n - 1)).backward()  # FSDP averages over the p ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if p > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[1])

    return model, config, mesh, step


def _alternate(runs: dict, rounds: int, **fields) -> dict:
    """Time each of ``runs`` (name -> ``run(name)``, the two contenders) once per round, the
    slowest rank's time, ``rounds`` rounds after a warm-up round 0 (the first call at a new size
    pays page faults for its new buffers); the order alternates between rounds so neither always
    goes first. Rank 0 returns the summary with ``fields``, other ranks ``{}``."""
    import statistics

    import torch.distributed as dist

    times = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name in (list(runs) if round_ % 2 else list(runs)[::-1]):
            dist.barrier()
            elapsed = torch.tensor(runs[name](name), dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # done when the slowest rank is
            if round_:
                times[name].append(float(elapsed))
    p, rank = dist.get_world_size(), dist.get_rank()
    dist.destroy_process_group()
    if rank:
        return {}
    ratios = [d / u for d, u in zip(times["deepspeed-ulysses"], times["ulysses"])]
    return {"processes": p, **fields, "rounds": rounds, "times": times,
            "median_s": {name: statistics.median(t) for name, t in times.items()},
            "deepspeed_time_over_ours": statistics.median(ratios)}


def paired_worker(length: int, preset_name: str, rounds: int) -> dict:
    """One rank of a job timing our Ulysses against DeepSpeed-Ulysses alternately on one model."""
    model, _, mesh, step = _setup("ulysses", preset_name)
    cores = {"ulysses": [layer.attention.core for layer in model.layers]}
    cores["deepspeed-ulysses"] = [_deepspeed_core(mesh.group("sp"))] * len(model.layers)
    step(256)  # kernels, optimizer state, communicators

    def run(name):
        for layer, core in zip(model.layers, cores[name]):
            layer.attention.core = core
        start = time.perf_counter()
        step(length)
        return time.perf_counter() - start

    return _alternate({name: run for name in cores}, rounds, length=length)


def _no_attention(q, k, v):
    """Stand-in for the local attention in the exchange timing: elementwise, so what is timed
    is the sequence-parallel layer around it (its output keeps the inputs' memory order)."""
    return q + k + v


def exchange_worker(local_len: int, preset_name: str, rounds: int) -> dict:
    """One rank timing the sequence-parallel layers alone: our Ulysses and DeepSpeed-Ulysses
    around :func:`_no_attention`, forward and backward of one layer's q, k, v ``[1, H, S/P, D]``,
    alternately, ``rounds`` rounds of 3 calls each after a warm-up round."""
    import torch.distributed as dist

    from ..models.genslm import preset
    from ..parallel.ulysses import ulysses_attention

    init_gloo()
    config = preset(preset_name)
    group = dist.group.WORLD
    layers = {"ulysses": lambda q, k, v: ulysses_attention(q, k, v, group, core=_no_attention),
              "deepspeed-ulysses": _deepspeed_core(group, local_core=_no_attention)}
    shape = (1, config.num_attention_heads, local_len, config.head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    ours, theirs = (layer(q, k, v) for layer in layers.values())
    if not torch.equal(ours, theirs):  # the same sums of the same gathered heads
        raise RuntimeError(f"exchange timing: outputs differ by {(ours - theirs).abs().max():.3g}")

    def run(name):
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape)
        start = time.perf_counter()
        for _ in range(3):
            layers[name](q, k, v).backward(grad)
        return (time.perf_counter() - start) / 3

    return _alternate({name: run for name in layers}, rounds, tokens_per_rank=local_len)


def worker(contender: str, length: int, preset_name: str) -> dict:
    """One rank of a torchrun job; rank 0 returns the case's summary."""
    import torch.distributed as dist

    from ..parallel.sequence import count_sent_bytes

    _, config, _, step = _setup(contender, preset_name)
    p = dist.get_world_size()
    step(256)  # warm-up: kernels, optimizer state, communicators (same weights for every P)
    dist.barrier()
    limit_address_space(BUDGET + 4 * 2**30)
    reset_peak_rss()
    base = current_rss_bytes()
    status, loss, error = "ok", None, None
    start = time.perf_counter()
    with count_sent_bytes() as sent:
        try:
            loss = step(length)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            status, error = "oom", str(err).splitlines()[0][:200]
    elapsed = time.perf_counter() - start
    gathered = gather_ranks({"peak": peak_rss_bytes() - base, "time": elapsed, "status": status, "sent": sent.total})
    if gathered is None:
        return {}
    if any(g["status"] != "ok" for g in gathered):
        return {"status": "oom", "error": error}
    # Only the attention calls the two counted functions (FSDP all-gathers and reduce-scatters,
    # the loss is all-reduced), so the count is the attention's traffic.
    layers = config.num_hidden_layers
    return {"status": "ok", "peak_bytes": max(g["peak"] for g in gathered),
            "time_s": max(g["time"] for g in gathered), "tokens_per_s": length / max(g["time"] for g in gathered),
            "loss": loss, "attn_bytes_per_layer": max(g["sent"] for g in gathered) / layers,
            "theory_bytes_per_layer": theory_bytes_per_layer(contender, p, length, config)}


def _torchrun(p: int, args: list[str], timeout: float) -> dict:
    """This module with ``args`` as a torchrun job of ``p`` local processes sharing the cores."""
    return run_torchrun("ds4sci.bench.parallel", p, args, timeout, WORKER_ENV)


def _deepspeed_available() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return f"deepspeed not installed ({err})"
    return None


def run(contenders, processes, lengths, preset_name: str, out_dir: Path, stem: str, progress=print,
        update: bool = False):
    """Measure, fit and write; with ``update``, keep the results file's other cases (so the
    benchmark can be run in parts: ``--processes 4 --contenders ring --update``)."""
    rows = []
    commit = machine_info()["git_commit"]
    for contender in contenders:
        if contender == "deepspeed-ulysses" and (why := _deepspeed_available()):
            progress(f"{contender}: skipped, {why}")
            continue
        for p in processes:
            if contender != "ulysses" and p == 1:
                continue  # one process: no sequence parallelism, the same run as ulysses P=1
            for length in lengths[p]:
                r = _torchrun(p, ["--worker", contender, str(length), preset_name], timeout=3600)
                rows.append({"contender": contender, "processes": p, "length": length, "preset": preset_name,
                             **r, "git_commit": commit, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                if r["status"] == "ok":
                    progress(f"{contender:<18} P={p} S={length:>6}  peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
                             f"{r['time_s']:7.1f} s  attention {r['attn_bytes_per_layer'] / 2**20:8.1f} MiB/layer "
                             f"(theory {r['theory_bytes_per_layer'] / 2**20:8.1f})")
                else:
                    progress(f"{contender:<18} P={p} S={length:>6}  {r['status'].upper()} {r.get('error', '')}")
                    break
    meta = machine_info()
    if update:
        rows = merge_rows(out_dir / f"{stem}.json", rows, lambda r: (r["contender"], r["processes"], r["length"]), meta)
    fits, free_quadratic, scaling = {}, {}, {}
    for r in rows:
        key = f"{r['contender']}/P={r['processes']}"
        if key in fits:
            continue
        ok = [(x["length"], x["peak_bytes"]) for x in rows if x["status"] == "ok"
              and x["contender"] == r["contender"] and x["processes"] == r["processes"]]
        if len(ok) >= 2:
            fits[key] = fit_and_predict(*zip(*ok), quadratic=False)
            free_quadratic[key] = fit_and_predict(*zip(*ok))
    one = fits.get("ulysses/P=1")
    for key, f in fits.items():
        p = int(key.split("=")[1])
        if one and p > 1:
            scaling[key] = f["predicted_max_tokens"] / one["predicted_max_tokens"]
            progress(f"{key:<22} predicted max length {f['predicted_max_tokens']:,.0f} tokens = "
                     f"{scaling[key]:.2f}x one process (target >= {0.9 * p:.1f}x)")
    meta.update({"budget_bytes_per_process": BUDGET, "fits": fits, "scaling_vs_one_process": scaling,
                 "fits_free_quadratic": free_quadratic, "worker_env": WORKER_ENV})
    previous = out_dir / f"{stem}.json"
    if previous.exists():
        # Separate measurements (``--paired``, ``--exchange``), each entry with its commit.
        earlier = json.loads(previous.read_text())["machine"]
        meta.update({spec.key: earlier[spec.key] for spec in TIMINGS.values() if spec.key in earlier})
    json_path, csv_path = write_rows(rows, meta, out_dir, stem)
    png = plot(rows, out_dir / f"{stem}.png", meta)
    md = write_markdown(rows, meta, out_dir / f"{stem}.md")
    progress(f"wrote {json_path}, {csv_path}, {png}, {md}")
    return rows, fits


class Timing(NamedTuple):
    """One kind of our-Ulysses-vs-DeepSpeed timing."""

    flag: str  # the worker's command-line flag
    key: str  # where its results go in the results file
    field: str  # the result field holding the worker's number (the case's second element)
    column: str  # that number's name in the progress line and in the table
    ours: str  # our column in the table
    timeout: float
    unit: str
    scale: float  # seconds -> unit
    cases: tuple  # (P, number)
    quick_cases: tuple


TIMINGS = {
    # Whole steps: 4096 tokens per rank, and 2048 at P = 4 (where the exchanges are a larger share
    # of the step than attention, quadratic in S).
    "paired": Timing("--paired-worker", "paired_timing", "length", "S", "ulysses (ds4sci)", 7200, "s", 1.0,
                     cases=((2, 8192), (4, 8192), (4, 16384)), quick_cases=((2, 1024), (4, 2048))),
    # The Ulysses layers alone (``--exchange``), by tokens per rank.
    "exchange": Timing("--exchange-worker", "exchange_timing", "tokens_per_rank", "tokens per rank",
                       "Ulysses layer alone (ds4sci)", 1800, "ms", 1e3,
                       cases=((2, 8192), (4, 8192)), quick_cases=((2, 256), (4, 256))),
}


def run_timing(kind: str, cases, preset_name: str, out_dir: Path, stem: str, rounds: int,
               progress=print) -> list[dict]:
    """Our Ulysses against DeepSpeed-Ulysses in one job per case (module doc): ``paired`` whole
    steps, ``exchange`` the layers alone. Stored under the kind's key in the results file; cases
    not measured now keep their earlier entries (``--processes 4`` re-times P = 4 alone)."""
    spec = TIMINGS[kind]
    if why := _deepspeed_available():
        progress(f"{kind} timing skipped: {why}")
        return []
    results = []
    commit = machine_info()["git_commit"]
    for p, n in cases:
        r = _torchrun(p, [spec.flag, str(n), preset_name, str(rounds)], timeout=spec.timeout)
        if "median_s" not in r:
            progress(f"{kind} P={p} {spec.column}={n}: failed {r.get('error', '')}")
            continue
        # The scaling rows may be from another commit.
        r.update(measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), git_commit=commit)
        results.append(r)
        ours, theirs = (r["median_s"][name] * spec.scale for name in ("ulysses", "deepspeed-ulysses"))
        progress(f"{kind} P={p} {spec.column}={n:>6}: ulysses {ours:.1f} {spec.unit}, deepspeed-ulysses "
                 f"{theirs:.1f} {spec.unit} (deepspeed/ours {r['deepspeed_time_over_ours']:.2f}x, "
                 f"median of {rounds} rounds)")
    path = out_dir / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() else {
        "machine": {**machine_info(), "budget_bytes_per_process": BUDGET, "fits": {}, "scaling_vs_one_process": {}},
        "results": []}

    def case(r):
        return r["processes"], r[spec.field]

    now = {case(r) for r in results}
    kept = [r for r in data["machine"].get(spec.key, []) if case(r) not in now]
    data["machine"][spec.key] = sorted(kept + results, key=case)
    write_rows(data["results"], data["machine"], out_dir, stem)
    write_markdown(data["results"], data["machine"], out_dir / f"{stem}.md")
    return results


def write_markdown(rows, meta, path: Path) -> Path:
    """The README tables: every case, then the fitted longest length per (contender, P)."""
    lines = ["| contender | P | S | peak / process | step time | attention sent / layer (theory) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['contender']} | {r['processes']} | {r['length']:,} | {r['status'].upper()} | | |")
            continue
        lines.append(f"| {r['contender']} | {r['processes']} | {r['length']:,} | {r['peak_bytes'] / 2**30:.2f} GiB "
                     f"| {r['time_s']:.1f} s | {r['attn_bytes_per_layer'] / 2**20:.1f} MiB "
                     f"({r['theory_bytes_per_layer'] / 2**20:.1f} MiB) |")
    lines += ["", f"| contender / P | predicted max length in {meta['budget_bytes_per_process'] / 2**30:.0f} GiB "
                  "per process | vs one process |", "|---|---|---|"]
    for key, f in meta["fits"].items():
        ratio = meta["scaling_vs_one_process"].get(key)
        lines.append(f"| {key} | {f['predicted_max_tokens']:,.0f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    for spec in TIMINGS.values():
        if not meta.get(spec.key):
            continue
        lines += ["", f"| P | {spec.column} | {spec.ours} | deepspeed-ulysses | deepspeed / ours |", "|---|---|---|---|---|"]
        for r in meta[spec.key]:
            ours, theirs = (r["median_s"][name] * spec.scale for name in ("ulysses", "deepspeed-ulysses"))
            lines.append(f"| {r['processes']} | {r[spec.field]:,} | {ours:.1f} {spec.unit} | {theirs:.1f} {spec.unit} "
                         f"| {r['deepspeed_time_over_ours']:.2f}x |")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows, path: Path, meta) -> Path:
    fig, (ax_m, ax_t) = subplots(1, 2, figsize=(12, 5))
    keys = list(dict.fromkeys((r["contender"], r["processes"]) for r in rows if r["status"] == "ok"))
    for i, (contender, p) in enumerate(keys):
        ok = [r for r in rows if r["status"] == "ok" and r["contender"] == contender and r["processes"] == p]
        label = f"{contender} P={p}"
        ax_m.plot([r["length"] for r in ok], [r["peak_bytes"] / 2**30 for r in ok], "o-", color=f"C{i}", label=label)
        ax_t.plot([r["length"] for r in ok], [r["time_s"] for r in ok], "o-", color=f"C{i}", label=label)
    for ax, ylabel in ((ax_m, "peak memory per process (GiB)"), (ax_t, "step time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    preset_name = rows[0]["preset"] if rows else ""
    fig.suptitle(f"sequence-parallel {preset_name} training step, gloo, {meta['host_cpu']}, torch {meta['torch']}")
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench parallel-scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "LENGTH", "PRESET"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--processes", nargs="+", type=int, choices=PROCESSES, default=list(PROCESSES))
    parser.add_argument("--paired-worker", nargs=3, metavar=("LENGTH", "PRESET", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true",
                        help="only the paired Ulysses vs DeepSpeed-Ulysses timing, added to the results file")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the paired timing")
    parser.add_argument("--exchange-worker", nargs=3, metavar=("LOCAL_LENGTH", "PRESET", "ROUNDS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--exchange", action="store_true",
                        help="only the timing of the Ulysses layers alone (no attention), added to the results file")
    parser.add_argument("--quick", action="store_true", help="genslm-tiny at short lengths (smoke test)")
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured cases in the results file (run in parts)")
    args = parser.parse_args(argv)
    if args.worker or args.paired_worker or args.exchange_worker:
        if args.worker:
            contender, length, preset_name = args.worker
            result = worker(contender, int(length), preset_name)
        elif args.exchange_worker:
            length, preset_name, rounds = args.exchange_worker
            result = exchange_worker(int(length), preset_name, int(rounds))
        else:
            length, preset_name, rounds = args.paired_worker
            result = paired_worker(int(length), preset_name, int(rounds))
        finish_worker(result)
    preset_name = "genslm-tiny" if args.quick else "genslm-25m"
    stem = "parallel_scaling_quick" if args.quick else STEM
    if kind := "exchange" if args.exchange else "paired" if args.paired else None:
        spec = TIMINGS[kind]
        cases = [c for c in (spec.quick_cases if args.quick else spec.cases) if c[0] in args.processes]
        run_timing(kind, cases, preset_name, args.out, stem, args.rounds)
        return 0
    run(args.contenders, args.processes, QUICK_LENGTHS if args.quick else LENGTHS, preset_name, args.out,
        stem, update=args.update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
