"""Atomic, verified checkpoints: model weights in safetensors, the rest in a torch file.

A single-process checkpoint is a directory ``step-NNNNNNNN/`` holding ``model.safetensors``, ``state.pt``
(optimizer, scheduler, RNG state, data position, config; tensors and plain values only, loaded
with ``weights_only=True``) and ``manifest.json`` (size and
sha256 of each file). It is written under a temporary name, fsynced, and renamed into place;
``latest`` (a one-line file naming it) is replaced atomically after that, and older checkpoints
are pruned last, so a crash or power loss at any moment leaves a complete checkpoint. Loading verifies the manifest first: a truncated
or altered file is refused with a message naming it.

A distributed checkpoint (``train.distributed``) has the same frame, with ``dcp/`` (a
``torch.distributed.checkpoint`` directory: every rank's shards of model and optimizer state,
loadable under another parallel layout) in place of ``model.safetensors``; its manifest lists
every file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.weights import LazyTensors, safetensors_tensors

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or incompatible with the run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically; prune to ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / FILES[0])
        torch.save(state, tmp / FILES[1])
        manifest = {"step": step, "files": {name: {"bytes": (tmp / name).stat().st_size,
                                                   "sha256": _sha256(tmp / name)} for name in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, MANIFEST):
            _fsync(tmp / name)
        _fsync(tmp)
    except OSError as err:  # disk full, quota, read-only: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(v.numel() * v.element_size() for v in model_state.values())
        raise CheckpointError(f"could not write checkpoint step {step} in {root}: {err.strerror or err} "
                              f"(it needs more than {need / 2**20:.1f} MiB for the weights alone, plus "
                              f"optimizer state; {shutil.disk_usage(root).free / 2**20:.1f} MiB are free); "
                              "the previous checkpoint is intact") from err
    return _publish(root, tmp, step, keep)


def _publish(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Move a complete ``tmp`` checkpoint into place as step ``step``, point ``latest`` at it,
    prune older ones (in that order, so a crash at any moment leaves a complete checkpoint)."""
    final = root / f"step-{step:08d}"
    if final.exists():  # re-saving a step: move the old copy aside, never leave a gap
        old = root / f".step-{step:08d}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    _replace_text(root / "latest", final.name + "\n")
    _fsync(root)
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and int(p.name[5:]) < step)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_distributed_checkpoint(run_dir: str | Path, step: int, app_state: dict, state: dict, keep: int,
                                *, is_main: bool, barrier) -> Path:
    """Collective: every rank writes its shards of ``app_state`` (model/optimizer state dicts with
    DTensors) with ``torch.distributed.checkpoint``; the main rank writes ``state`` and the manifest
    and publishes the checkpoint. ``barrier()`` waits for all ranks."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    tmp = root / f".step-{step:08d}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(app_state, checkpoint_id=str(tmp / "dcp"))
    barrier()
    final = root / f"step-{step:08d}"
    if is_main:
        torch.save(state, tmp / FILES[1])
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "distributed": True,
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in (*files, tmp / MANIFEST, tmp / "dcp", tmp):
            _fsync(p)
        _publish(root, tmp, step, keep)
    barrier()
    return final


def _verify(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a ds4sci checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from err
    # Well-formed JSON of the wrong shape (edited by hand, another tool's file) is refused here
    # rather than as a KeyError deep in the checks below.
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        raise CheckpointError(f"{manifest_path} is malformed: expected {{\"step\": ..., \"files\": "
                              f"{{name: {{\"bytes\": int, \"sha256\": str}}}}}}")
    names = files if manifest.get("distributed") else FILES
    for name in names:
        file = path / name
        expected = files.get(name)
        if expected is None or not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt (size or sha256 differs from {MANIFEST})"
            )
    return manifest


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def read_distributed_state(path: str | Path) -> dict:
    """The verified ``state.pt`` of a distributed checkpoint (step, scheduler, config, ...)."""
    path = Path(path)
    manifest = _verify(path)
    if not manifest.get("distributed"):
        raise CheckpointError(f"checkpoint {path} was written by a single-process run; resume it "
                              "without torchrun (distributed runs resume distributed checkpoints)")
    return torch.load(path / FILES[1], map_location="cpu", weights_only=True)


def load_distributed_app_state(path: str | Path, app_state: dict, alone: bool = False) -> None:
    """Fill ``app_state`` (this rank's state dicts, any layout) from ``path/dcp``; collective
    when a process group exists, else (or ``alone``) this process reads everything it asks for."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import warnings

    try:
        with warnings.catch_warnings():
            # one process without a process group reads every shard itself (what we mean here)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(app_state, checkpoint_id=str(Path(path) / "dcp"), no_dist=alone or not dist.is_initialized())
    except Exception as err:  # DCP wraps per-rank failures; say which checkpoint did not fit
        raise CheckpointError(f"checkpoint {path} does not fit this run: {err}") from err


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def _dcp_tensors(path: Path) -> LazyTensors:
    """The model tensors of the distributed checkpoint ``path``, each read whole when asked for
    (by this process alone: ranks may ask for different tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    readers = {}
    for key, item in metadata.items():
        if key.startswith("model.") and hasattr(item, "size"):  # tensors (not bytes) of the model
            name = key[len("model."):]
            readers[name] = functools.partial(_read_dcp, path, name, tuple(item.size), item.properties.dtype)
    return LazyTensors(readers)


def _read_dcp(path: Path, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    load_distributed_app_state(path, {"model": {name: tensor}}, alone=True)
    return tensor


def checkpoint_weights(path: str | Path, verify: bool = True) -> tuple[LazyTensors, dict]:
    """``(weights, state)`` of a verified checkpoint directory, single-process or distributed:
    its model tensors, read one at a time when asked for, and its ``state.pt`` (for a
    distributed checkpoint without optimizer state: resume restores that, see
    ``Trainer._resume``). ``verify=False``: the caller has just verified it."""
    path = Path(path)
    manifest = _verify(path) if verify else json.loads((path / MANIFEST).read_text())
    # weights_only: a checkpoint is data, never code (no arbitrary unpickling).
    state = torch.load(path / FILES[1], map_location="cpu", weights_only=True)
    if manifest.get("distributed"):
        return _dcp_tensors(path), state
    return safetensors_tensors([path / FILES[0]]), state


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """``(model_state, state)`` of a verified checkpoint directory, or CheckpointError: the whole
    model's tensors in memory (gathered from the shards of a distributed checkpoint)."""
    weights, state = checkpoint_weights(path, verify)
    return dict(weights.items()), state


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds any published checkpoint (intact or not)."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and (any(p.is_dir() for p in root.glob("step-*")) or (root / "latest").is_file())


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """``(checkpoint, its state, skipped)``: the newest checkpoint of ``run_dir`` that verifies
    (every file's size and sha256 as in its manifest), with the newer ones skipped and why.
    CheckpointError when none does."""
    root = Path(run_dir) / "checkpoints"
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    skipped = []
    for path in steps:
        try:
            _verify(path)
            state = torch.load(path / FILES[1], map_location="cpu", weights_only=True)
        except (CheckpointError, OSError, RuntimeError, KeyError, ValueError) as err:
            skipped.append((path, str(err)))
            continue
        return path, state, skipped
    why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
    raise CheckpointError(f"--resume: no intact checkpoint in {root}" + (f" ({why})" if why else ""))
