"""FASTA / gzipped FASTA reading on Biopython, with per-record validation.

Records stream one at a time (never the whole file in memory). Each sequence is upper-cased and
checked against the IUPAC nucleotide alphabet plus gaps; a bad record is reported by name and,
by policy, skipped (with a warning) or rejected (an error). Nothing is silently altered.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from Bio import SeqIO

log = logging.getLogger(__name__)

IUPAC_DNA = "ACGTURYSWKMBDHVN"
"""Accepted letters: A C G T, U (RNA, read as T) and the IUPAC ambiguity codes."""
_BAD = re.compile(f"[^{IUPAC_DNA}.-]")


class FastaRecordError(ValueError):
    """A record that cannot be used: empty, or with letters outside IUPAC nucleotides."""


@dataclass(frozen=True)
class FastaRecord:
    name: str
    """The record id (first word of the header)."""
    description: str
    """The whole header line without ``>``."""
    sequence: str
    """Upper-case sequence as read (gaps and ambiguity codes kept)."""


def _open(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    # utf-8-sig: a byte-order mark (Windows editors write one) is read as nothing, not as text
    # before the first '>'.
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _parse(handle, path: Path):
    try:
        yield from SeqIO.parse(handle, "fasta")
    except UnicodeDecodeError as err:
        raise FastaRecordError(f"{path}: not a text FASTA file (byte {err.start} is not UTF-8)") from err
    except ValueError as err:  # e.g. text before the first '>'
        first = str(err).strip().splitlines()[0]
        raise FastaRecordError(f"{path}: not a valid FASTA file: {first}") from err
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise FastaRecordError(f"{path}: truncated or corrupt gzip file ({err})") from err


def read_fasta(path: str | Path, on_bad: str = "skip") -> Iterator[FastaRecord]:
    """Yield the records of a FASTA file (plain or gzip, detected by content).

    on_bad: ``"skip"`` logs a warning naming the record and goes on; ``"error"`` raises
    :class:`FastaRecordError` naming the file, record and problem.
    """
    if on_bad not in ("skip", "error"):
        raise ValueError(f"read_fasta: on_bad={on_bad!r}; expected 'skip' or 'error'")
    path = Path(path)
    if path.is_dir():
        raise FastaRecordError(f"read_fasta: {path} is a directory; expected a FASTA file (plain or .gz)")
    if not path.is_file():
        raise FileNotFoundError(f"read_fasta: no such FASTA file: {path}")
    n_records = 0
    with _open(path) as handle:
        for rec in _parse(handle, path):
            n_records += 1
            seq = str(rec.seq).upper()
            problem = None
            if not seq:
                problem = "empty sequence"
            elif (bad := _BAD.search(seq)) is not None:
                problem = f"letter {bad.group()!r} at position {bad.start() + 1} is not a nucleotide code"
            if problem:
                message = f"{path}: record {rec.id!r}: {problem}"
                if on_bad == "error":
                    raise FastaRecordError(message)
                log.warning("skipping %s", message)
                continue
            yield FastaRecord(rec.id, rec.description, seq)
    if n_records == 0:
        raise FastaRecordError(f"{path}: no FASTA records found (is it a FASTA file?)")
