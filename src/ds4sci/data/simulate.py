"""Seeded simulator of genome variants, for a default corpus of whole genomes with no setup.

Each new genome copies an earlier one (the reference or a previous variant, so lineages form a
tree) and adds mutations: substitutions with a transition/transversion bias (transitions A<->G,
C<->T are ``kappa`` times as likely per pair as each transversion; SARS-CoV-2 also shows a strong
C->T excess, modelled by ``c_to_t_excess``) and short indels, mostly in-frame (multiples of 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TRANSITION = {"A": "G", "G": "A", "C": "T", "T": "C"}
_TRANSVERSIONS = {"A": "CT", "G": "CT", "C": "AG", "T": "AG"}


@dataclass(frozen=True)
class Variant:
    name: str
    parent: str
    substitutions: int
    insertions: int
    deletions: int
    sequence: str

    @property
    def header(self) -> str:
        return (f"{self.name} parent={self.parent} substitutions={self.substitutions} "
                f"insertions={self.insertions} deletions={self.deletions}")


def _mutate(seq: str, rng: np.random.Generator, sub_rate, indel_rate, kappa, c_to_t_excess):
    chars = list(seq)
    n_draws = rng.poisson(sub_rate * len(chars))
    p_transition = kappa / (kappa + 2.0)
    n_subs = 0
    for pos in rng.choice(len(chars), size=min(n_draws, len(chars)), replace=False):
        base = chars[pos]
        if base not in _TRANSITION:  # ambiguity codes stay as they are
            continue
        n_subs += 1
        if base == "C" and rng.random() < c_to_t_excess:
            chars[pos] = "T"
        elif rng.random() < p_transition:
            chars[pos] = _TRANSITION[base]
        else:
            chars[pos] = _TRANSVERSIONS[base][rng.integers(2)]
    n_ins = n_del = 0
    for _ in range(rng.poisson(indel_rate * len(chars))):
        length = int(3 * rng.integers(1, 4)) if rng.random() < 0.8 else int(rng.integers(1, 3))
        pos = int(rng.integers(0, len(chars)))
        if rng.random() < 0.6:  # deletions dominate in SARS-CoV-2 lineages
            del chars[pos : pos + length]
            n_del += 1
        else:
            chars[pos:pos] = list(rng.choice(list("ACGT"), size=length))
            n_ins += 1
    return "".join(chars), n_subs, n_ins, n_del


def simulate_variants(
    reference: str,
    n: int,
    *,
    seed: int = 0,
    substitution_rate: float = 1e-3,
    indel_rate: float = 5e-5,
    kappa: float = 6.0,
    c_to_t_excess: float = 0.3,
    name_prefix: str = "sim",
) -> list[Variant]:
    """``n`` variant genomes descending from ``reference`` (same seed, same genomes).

    substitution_rate / indel_rate: expected events per site per generation.
    """
    if n < 0:
        raise ValueError(f"simulate_variants: n={n}; expected >= 0")
    rng = np.random.default_rng(seed)
    pool = [("reference", reference.upper())]
    variants = []
    for i in range(n):
        parent_name, parent_seq = pool[int(rng.integers(len(pool)))]
        seq, subs, ins, dels = _mutate(parent_seq, rng, substitution_rate, indel_rate, kappa, c_to_t_excess)
        variant = Variant(f"{name_prefix}_{i:05d}", parent_name, subs, ins, dels, seq)
        variants.append(variant)
        pool.append((variant.name, seq))
    return variants
