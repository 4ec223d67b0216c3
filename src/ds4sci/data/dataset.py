"""Token files: FASTA streamed through the tokenizer into memory-mapped ``uint8`` token arrays.

Layout of a token directory: ``{split}.tokens`` (all token ids back to back, uint8),
``{split}.index.npy`` (int64 offsets, ``n_records + 1``) and ``meta.json`` (tokenizer, record
names and counts). Training reads the arrays through ``numpy.memmap``, so a corpus never has to
fit in memory. Records are split by position: every ``round(1 / val_fraction)``-th record goes
to validation, which needs no second pass and is stable when records are appended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .tokenizer import CodonTokenizer

SPLITS = ("train", "val")


def build_token_dir(
    records: Iterable[tuple[str, str]],
    tokenizer: CodonTokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    frame: int = 0,
) -> dict:
    """Tokenize ``(name, sequence)`` records into ``out_dir``; returns the metadata written."""
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"build_token_dir: val_fraction={val_fraction}; expected in [0, 0.5]")
    if len(tokenizer) > 256:
        raise ValueError(f"build_token_dir: vocabulary of {len(tokenizer)} does not fit uint8 tokens")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    files = {s: open(out_dir / f"{s}.tokens.tmp", "wb") for s in SPLITS}
    offsets = {s: [0] for s in SPLITS}
    names = {s: [] for s in SPLITS}
    short, read = [], 0
    try:
        for i, (name, seq) in enumerate(records):
            read += 1
            split = "val" if every and i % every == every - 1 else "train"
            ids = np.asarray(tokenizer.encode(seq, frame=frame), dtype=np.uint8)
            if len(ids) < 2:  # a record must hold one token that predicts another
                short.append(name)
                continue
            files[split].write(ids.tobytes())
            offsets[split].append(offsets[split][-1] + len(ids))
            names[split].append(name)
    finally:
        for f in files.values():
            f.close()
    if short:
        import warnings

        warnings.warn(f"build_token_dir: skipped {len(short)} record(s) shorter than two tokens (nothing to "
                      f"predict), e.g. {short[:3]}", stacklevel=2)
    if not names["train"]:
        detail = (f"read {read} record(s): {len(names['val'])} held out for validation, {len(short)} "
                  f"skipped as shorter than two tokens (one codon pair)")
        raise ValueError(f"build_token_dir: no training records ({detail}); a record needs at least two "
                         f"codons, and val_fraction={val_fraction} holds out every "
                         f"{every or 'no'}-th record")
    for s in SPLITS:
        os.replace(out_dir / f"{s}.tokens.tmp", out_dir / f"{s}.tokens")
        np.save(out_dir / f"{s}.index.npy", np.asarray(offsets[s], dtype=np.int64))
    meta = {
        "vocab_size": len(tokenizer), "pad_id": tokenizer.pad_id, "frame": frame,
        "records": {s: len(names[s]) for s in SPLITS}, "tokens": {s: offsets[s][-1] for s in SPLITS},
        "names": names,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class TokenDataset(torch.utils.data.Dataset):
    """One split of a token directory; item ``i`` is record ``i`` as an int64 tensor."""

    def __init__(self, token_dir: str | Path, split: str = "train", max_tokens: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"TokenDataset: split={split!r}; expected one of {SPLITS}")
        token_dir = Path(token_dir)
        self.meta = json.loads((token_dir / "meta.json").read_text())
        self.offsets = np.load(token_dir / f"{split}.index.npy")
        n_tokens = int(self.offsets[-1])
        self.tokens = (np.memmap(token_dir / f"{split}.tokens", dtype=np.uint8, mode="r", shape=(n_tokens,))
                       if n_tokens else np.zeros(0, dtype=np.uint8))
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.max_tokens is not None:
            end = min(end, start + self.max_tokens)
        return torch.from_numpy(np.array(self.tokens[start:end], dtype=np.int64))


def collate(batch: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest record: ``input_ids`` and ``labels`` (``-100`` on padding)."""
    length = max(len(t) for t in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, t in enumerate(batch):
        ids[row, : len(t)] = t
        labels[row, : len(t)] = t
    return ids, labels
