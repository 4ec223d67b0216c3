"""The embedded default corpus: SARS-CoV-2 Wuhan-Hu-1 (GenBank MN908947.3) plus simulated variants."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

from .fasta import read_fasta
from .simulate import simulate_variants

REFERENCE_FILE = "sars-cov-2_MN908947.3.fasta"


def reference_genome() -> tuple[str, str]:
    """``(name, sequence)`` of the vendored SARS-CoV-2 reference genome (29,903 nt)."""
    with resources.as_file(resources.files("ds4sci.data").joinpath("files", REFERENCE_FILE)) as path:
        record = next(read_fasta(path, on_bad="error"))
    return record.name, record.sequence


def default_records(n_simulated: int = 47, seed: int = 0) -> Iterator[tuple[str, str]]:
    """The reference, then ``n_simulated`` seeded variant genomes descending from it."""
    name, sequence = reference_genome()
    yield name, sequence
    for variant in simulate_variants(sequence, n_simulated, seed=seed):
        yield variant.name, variant.sequence
