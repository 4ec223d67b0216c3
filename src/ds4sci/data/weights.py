"""Weights read lazily: ``name -> tensor`` mappings that read each tensor from storage only when
asked for, so whole-model weights pass through memory one tensor at a time
(``parallel.init.load_parameters`` keeps each rank's share of each). Readers for safetensors
files and memory-mapped torch files; ``train.checkpoint`` adds ds4sci checkpoints on top."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open


class LazyTensors(Mapping):
    """``name -> tensor``, each read from storage only when asked for."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # without reading (Mapping's would read)
        return name in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def safetensors_tensors(files: list[Path], rename: Callable[[str], str | None] = lambda k: k) -> LazyTensors:
    """The tensors of safetensors ``files``, keyed by ``rename(key)`` (None: left out)."""
    readers = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if (name := rename(key)) is not None:
                readers[name] = functools.partial(_read_safetensors, file, key)
    return LazyTensors(readers)


def _read_safetensors(file: Path, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


def torch_file_tensors(files: list[Path], rename: Callable[[str], str | None] = lambda k: k) -> LazyTensors:
    """The tensors of ``torch.save`` files (e.g. ``pytorch_model.bin``), keyed by ``rename(key)``:
    memory-mapped, each tensor read (and the map closed) alone; a file in torch's legacy (pre-1.6)
    format cannot be memory-mapped and is read whole."""
    import zipfile

    readers = {}
    for file in files:
        if zipfile.is_zipfile(file):
            keys = list(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
            readers.update({name: functools.partial(_read_torch_file, file, key) for key in keys
                            if (name := rename(key)) is not None})
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
            readers.update({name: (lambda t=tensor: t) for key, tensor in tensors.items()
                            if (name := rename(key)) is not None})
    return LazyTensors(readers)


def _read_torch_file(file: Path, key: str) -> torch.Tensor:
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)[key].clone()
