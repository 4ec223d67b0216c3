"""Data for genome language models: FASTA reading, codon tokenizer, embedded default corpus."""

from .fasta import FastaRecordError, read_fasta
from .simulate import simulate_variants

__all__ = ["FastaRecordError", "read_fasta", "simulate_variants"]
