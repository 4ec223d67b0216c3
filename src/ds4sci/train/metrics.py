"""Run metrics: peak memory and the loss-curve plot."""

from __future__ import annotations

from pathlib import Path


def peak_memory_bytes(device=None) -> int:
    """Peak memory: the accelerator's peak allocation on CUDA, else this process's peak RSS
    (Linux VmHWM; ru_maxrss elsewhere)."""
    import torch

    from ..bench.common import peak_rss_bytes

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


def plot_metrics(rows: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss (nats/token)")
    val = [(r["step"], r["val_perplexity"]) for r in rows if r.get("val_perplexity") is not None]
    if val:
        import math

        ax.plot([s for s, _ in val], [math.log(p) for _, p in val], "o-", label="validation loss = log(perplexity)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
