"""Run metrics: peak memory and the loss-curve plot (train loss, validation loss or perplexity)."""

from __future__ import annotations

from pathlib import Path


def peak_memory_bytes(device=None) -> int:
    """Peak memory: the accelerator's peak allocation on CUDA, else this process's peak RSS
    (Linux VmHWM; ru_maxrss elsewhere)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return peak_rss_bytes()
    except (OSError, RuntimeError):  # no /proc (macOS, ...)
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_bytes() -> int:
    """High-water resident set size of this process image (``VmHWM``).

    Not ``ru_maxrss``: Linux carries the parent's RSS at fork into the child's ``ru_maxrss``
    across exec, so a small child of a large parent would report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def plot_backend():
    """``matplotlib.pyplot`` drawing to files (Agg), for plots written by training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(rows: list[dict], path: Path, title: str = "", unit: str = " (nats/token)",
                 ylabel: str = "cross-entropy (nats/token)") -> Path:
    plt = plot_backend()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"train loss{unit}")
    import math

    val = [(r["step"], math.log(r["val_perplexity"])) for r in rows if r.get("val_perplexity") is not None]
    label = "validation loss = log(perplexity)"
    if not val:
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        label = "validation loss"
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
