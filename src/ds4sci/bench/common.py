"""Shared benchmark plumbing: machine description, fresh-process cases, peak memory, outputs."""

from __future__ import annotations

import csv
import ctypes
import gc
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from ..train.metrics import peak_rss_bytes  # noqa: F401  (re-exported for the benchmarks)


def machine_info() -> dict:
    """Machine, versions and date, written beside every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    from ds4sci import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ds4sci": __version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Restart the high-water mark at the current RSS (Linux >= 4.0: ``clear_refs`` value 5).

    Freed heap memory is first handed back to the OS (glibc ``malloc_trim``): otherwise memory
    cached by the allocator after a warm-up counts in the baseline and is then reused unseen.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def limit_address_space(budget_bytes: int) -> None:
    """Make allocations beyond the budget fail with an error instead of waking the OOM killer."""
    resource.setrlimit(resource.RLIMIT_AS, (budget_bytes, budget_bytes))


# Environment of every memory-measuring worker. glibc keeps freed heap blocks below its mmap
# threshold (up to 32 MiB) resident, so without this the RSS of a long-sequence step measures
# allocator fragmentation more than what the step needs (several times the per-token slope,
# seen while developing). Every contender of a benchmark runs with the same setting.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def init_gloo() -> None:
    """In a torchrun worker: this rank's share of the cores (the job's processes share the
    machine) and its gloo process group."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", 1))))
    dist.init_process_group("gloo")


def run_torchrun(module: str, processes: int, args: list[str], timeout: float, env: dict) -> dict:
    """``python -m module args...`` as a torchrun job of ``processes`` local processes sharing
    the cores; rank 0 prints one JSON line last (see :func:`run_worker`, :func:`finish_worker`)."""
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    return run_worker("torch.distributed.run",
                      ["--standalone", f"--nproc-per-node={processes}", "-m", module, *args],
                      timeout=timeout, env={**env, "OMP_NUM_THREADS": threads})


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (a ``MemoryError``, or the allocator's
    RuntimeError under the address-space limit) rather than a bug to raise."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or "can't allocate" in text or "out of memory" in text


def gather_ranks(mine: dict) -> list[dict] | None:
    """In a torchrun worker: every rank's ``mine`` on rank 0 (None on the others); the process
    group is destroyed afterwards."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return None if rank else gathered


def finish_worker(result: dict | None) -> None:
    """End a torchrun worker: print its result (rank 0's) as the JSON line and leave at once.

    The process group is destroyed and the result written. About one exit in twenty then aborts
    in gloo's C++ teardown ("terminate called without an active exception"), which would turn a
    finished case into a failed one: leave without interpreter finalization.
    """
    if result:
        print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def run_worker(module: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python -m module args...`` in a fresh process; it prints one JSON line last.

    ``env``: variables added to this process's environment for the worker.
    """
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"exceeded {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = proc.returncode in (-9, 137) or any(
        "can't allocate" in t.lower() or "out of memory" in t.lower() for t in tail)
    return {"status": "oom" if oom else "error", "error": " | ".join(tail)[-400:]}


def merge_rows(json_path: Path, new_rows: list[dict], key, meta: dict) -> list[dict]:
    """Rows of an existing results file with the cases in ``new_rows`` (by ``key(row)``)
    replaced, in the file's order; ``meta`` records the first run's date."""
    if not json_path.is_file():
        return new_rows
    old = json.loads(json_path.read_text())
    replaced = {key(r) for r in new_rows}
    order = {key(r): i for i, r in enumerate(old["results"])}
    kept = [r for r in old["results"] if key(r) not in replaced]
    meta["first_run"] = old["machine"].get("first_run", old["machine"]["date"])
    return sorted(kept + new_rows, key=lambda r: order.get(key(r), len(order)))


def write_rows(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` (meta + rows) and ``stem.csv`` (rows, meta columns prefixed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"machine": meta, "results": rows}, indent=2) + "\n")
    fields = sorted({key for row in rows for key in row})
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + ["machine_date", "machine_cpu", "torch"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "machine_date": meta["date"], "machine_cpu": meta["host_cpu"],
                             "torch": meta["torch"]})
    return json_path, csv_path


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend (benchmarks write PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG, 110 dpi), free it, and return ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
