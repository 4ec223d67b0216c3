"""Data for genome language models: FASTA reading, codon tokenizer, embedded default corpus."""

from .dataset import TokenDataset, build_token_dir
from .fasta import FastaRecordError, read_fasta
from .simulate import simulate_variants
from .tokenizer import CodonTokenizer

__all__ = ["CodonTokenizer", "FastaRecordError", "TokenDataset", "build_token_dir", "read_fasta",
           "simulate_variants"]
