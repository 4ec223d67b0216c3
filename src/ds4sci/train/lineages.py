"""Does a GenSLM's genome embedding separate lineages? The science check that ends the default
run (GenSLM's headline result: embeddings of SARS-CoV-2 genomes cluster by lineage).

Every genome of the corpus is embedded (mean of the final hidden states, as GenSLM's inference
does), and so is a baseline that needs no model: its codon-usage frequencies (64 numbers). Both
are scored against the lineages by leave-one-out 1-nearest-neighbour accuracy (cosine distance
after per-feature standardisation) and by the silhouette of the lineages; a 2-D PCA projection
of each, coloured by lineage, is drawn. The lineages of the embedded corpus are *simulated*
(``data.simulate``: each variant copies an earlier genome and mutates; a lineage is all the
descendants of one direct child of the reference), so this shows what the pipeline measures, not
a finding about real SARS-CoV-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def simulated_lineages(n_simulated: int, seed: int) -> dict[str, str]:
    """``genome name -> lineage`` of the embedded corpus (the reference is its own)."""
    from ..data.corpus import reference_genome
    from ..data.simulate import simulate_variants

    name, sequence = reference_genome()
    parent = {v.name: v.parent for v in simulate_variants(sequence, n_simulated, seed=seed)}

    def root(x):
        while parent.get(x, "reference") != "reference":
            x = parent[x]
        return x

    return {name: "reference", **{v: root(v) for v in parent}}


def _standardise(x: np.ndarray) -> np.ndarray:
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def knn_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy under cosine distance."""
    z = _standardise(features)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    return float((labels[sim.argmax(1)] == labels).mean())


def silhouette(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of the labels under cosine distance (-1 .. 1; > 0: clusters separate)."""
    z = _standardise(features)
    dist = 1.0 - z @ z.T
    scores = []
    for i, label in enumerate(labels):
        same = (labels == label) & (np.arange(len(labels)) != i)
        if not same.any():
            continue
        a = dist[i, same].mean()
        b = min(dist[i, labels == other].mean() for other in set(labels) if other != label)
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def codon_frequencies(tokens: torch.Tensor, codon_ids: list[int]) -> np.ndarray:
    counts = torch.bincount(tokens, minlength=max(codon_ids) + 1)[codon_ids].double()
    return (counts / counts.sum().clamp_min(1)).numpy()


@torch.no_grad()
def evaluate_lineages(model, datasets, names, lineages: dict[str, str], codon_ids: list[int],
                      out_dir: Path, min_members: int = 3) -> dict:
    """Embed every genome, score both representations, draw ``lineages.png`` and write
    ``lineages.json`` in ``out_dir``; returns the scores."""
    model.eval()
    rows = []
    for data, split_names in zip(datasets, names):
        for i in range(len(data)):
            label = lineages.get(split_names[i])
            tokens = data[i]
            hidden = model.hidden_states(tokens[None].to(next(model.parameters()).device))
            rows.append((label, hidden[0].float().mean(0).cpu().numpy(), codon_frequencies(tokens, codon_ids)))
    counts = {}
    for label, *_ in rows:
        counts[label] = counts.get(label, 0) + 1
    kept = [r for r in rows if r[0] is not None and counts[r[0]] >= min_members]
    labels = np.array([r[0] for r in kept])
    result = {"genomes": len(kept), "lineages": {k: v for k, v in sorted(counts.items()) if v >= min_members and k},
              "majority_class_rate": max(counts[k] for k in set(labels)) / len(kept)}
    for name, column in (("embedding", 1), ("codon_frequency", 2)):
        x = np.stack([r[column] for r in kept])
        result[name] = {"knn1_accuracy": knn_accuracy(x, labels), "silhouette": silhouette(x, labels)}
    (out_dir / "lineages.json").write_text(json.dumps(result, indent=1))
    _plot(kept, labels, out_dir / "lineages.png", result)
    return result


def _plot(kept, labels, path: Path, result: dict) -> None:
    from ..train.metrics import plot_backend

    plt = plot_backend()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (name, column) in zip(axes, (("embedding", 1), ("codon_frequency", 2))):
        z = _standardise(np.stack([r[column] for r in kept]))
        z = z - z.mean(0)
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        xy = u[:, :2] * s[:2]
        for label in sorted(set(labels)):
            ax.scatter(*xy[labels == label].T, label=f"{label} ({(labels == label).sum()})", s=25)
        r = result[name]
        ax.set_title(f"{'GenSLM embedding' if column == 1 else 'codon frequencies (baseline)'}\n"
                     f"1-NN accuracy {r['knn1_accuracy']:.2f}, silhouette {r['silhouette']:.2f}", fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0].legend(title="simulated lineage", fontsize=8)
    fig.suptitle("Genomes of the embedded corpus, by simulated lineage", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
