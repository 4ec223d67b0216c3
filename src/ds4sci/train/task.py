"""Training tasks: what one model family gives the common trainer.

The trainer (``trainer.Trainer``, ``distributed.DistributedTrainer``) owns everything that is the
same for every model: optimizer, schedule, clipping, accumulation, mixed precision, progress,
``metrics.jsonl`` and plots, atomic checkpoints, exact resume, ``init_from``, torchrun layouts
and fault handling. A :class:`Task` supplies the rest, and a new model is a package under
``models/``, a data module under ``data/`` and a task registered here, never a new trainer
(torchtitan's train spec, kept to what a task really varies).

Data contract: ``datasets`` returns two indexable splits whose items are *records* (anything:
a token tensor, a dict of fields). The trainer draws record indices from a seeded sampler (so the
order is a pure function of seed and epoch, and resume is exact), then asks the task to
``collate`` records into a batch and to ``count`` the loss targets in records before any forward
runs: every loss is a ``(sum, count)`` pair, and the trainer divides by the global count, so one
process, accumulation and every parallel layout give the same mean.

Batches are tensors, or tuples / lists / dicts of them (moved to the device by the trainer); a
task that pipelines says which are the pipeline's ``(inputs, targets)`` (``pipeline_batch``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Task:
    """Base class of training tasks; subclasses set the class attributes and override methods.
    Defaults that fit most tasks are given here."""

    name: str = ""
    """What ``ds4sci train <name>`` calls it."""
    description: str = ""
    """One line for ``ds4sci train --help``."""
    data_config: type = None
    """Dataclass of the ``data.*`` config keys."""
    model_config: type = None
    """Dataclass of the model's config (``model.<field>`` keys change fields of the preset)."""
    default_model: str = ""
    """Preset used when ``model`` is not given."""
    defaults: dict = {}
    """Defaults of common keys for this task (e.g. ``{"optim.lr": 1e-3}``), applied before a
    YAML file and overrides."""
    count_name: str = "targets"
    """What the loss counts, for metrics (``tokens``: ``tokens`` and ``tokens_per_s`` columns)."""
    run_files: frozenset = frozenset()
    """Files the task writes at the top of the run directory, besides the trainer's."""
    val_metric: str = "val_loss"
    """Name of the validation loss (summed loss / count over the validation set) in metrics."""
    loss_label: str = "loss"
    """What the loss is, for the final summary and the plot's axis."""

    # ----- config -----
    def preset(self, name: str):
        """The model config called ``name``."""
        raise NotImplementedError

    def config_from_dict(self, data: dict):
        return self.model_config(**data)

    def check(self, cfg, model_config) -> None:
        """Raise ValueError for settings that do not fit together (before any data is read)."""

    # ----- data -----
    def prepare_data(self, cfg, out_dir: Path, resume: bool = False) -> None:
        """Build caches in ``out_dir`` (main rank only, before ``datasets``); default: none.
        A cache must be keyed on its inputs' contents; on ``resume`` a cache whose inputs
        changed must be refused (the run would not continue on the same data)."""

    def datasets(self, cfg, out_dir: Path) -> tuple[Sequence, Sequence]:
        """``(train, val)`` splits of records."""
        raise NotImplementedError

    def collate(self, records: list) -> tuple[torch.Tensor, ...]:
        """A batch (CPU tensors; the first two are the pipeline's inputs and targets)."""
        raise NotImplementedError

    def count(self, records: list) -> int:
        """How many loss targets ``records`` hold (known before any forward runs)."""
        raise NotImplementedError

    def describe_data(self, cfg, train, val) -> str:
        return f"{len(train)} train / {len(val)} val records"

    def data_label(self, cfg) -> str:
        return "its data"

    # ----- model -----
    def build_model(self, model_config, seed: int | None = None) -> nn.Module:
        """The model, initialised from ``seed`` (or without values under the meta device)."""
        raise NotImplementedError

    def init_parameters(self, module: nn.Module, seed: int) -> None:
        """Fill every parameter of ``module`` (whole model or pipeline stage, plain or sharded)
        as a function of (seed, its name): ``parallel.init.init_parameters``."""
        raise NotImplementedError

    def load_parameters(self, module: nn.Module, weights) -> None:
        from ..parallel.init import load_parameters

        load_parameters(module, weights)

    def loss_sum(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed loss, count)`` of a whole batch in one process."""
        raise NotImplementedError

    # ----- distributed (ParallelDims layouts) -----
    def make_dims(self, parallel, world_size: int, model_config):
        """``ParallelDims`` for the ``ParallelConfig`` (hybrid SP's Ulysses degree may depend
        on the model's heads)."""
        from ..parallel.dims import ParallelDims

        return ParallelDims(dp=parallel.dp, sp=parallel.sp, tp=parallel.tp, pp=parallel.pp,
                            world_size=world_size, sp_mode=parallel.sp_mode,
                            sp_ulysses=parallel.sp_ulysses if parallel.sp_mode == "hybrid" else None)

    def check_layout(self, dims, model_config) -> None:
        """Raise ValueError, with the reason, for a layout this model cannot run under."""

    def parallelize(self, model: nn.Module, dims, mesh, parallel, fsdp: dict) -> None:
        """Apply SP, TP and FSDP (``fsdp``: ``apply_fsdp`` keyword arguments) in place."""
        raise NotImplementedError

    def pipeline(self, model: nn.Module, dims, mesh, parallel, fsdp: dict, *, batch_size: int,
                 seq_len: int, device):
        """This rank's ``parallel.pipeline.Pipeline`` (TP and FSDP applied to the stage)."""
        raise ValueError(f"task {self.name!r} does not support pipeline parallelism")

    def pipeline_batch(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of a batch as the pipeline's first and last stages take them."""
        return batch[0], batch[1]

    def pipeline_length(self, records: list) -> int:
        """The fixed sequence length of pipeline steps, from every record (train and val)."""
        return 1

    def sharded_loss_sum(self, model: nn.Module, batch: tuple, dims, mesh, parallel):
        """``(summed loss, count)`` of this rank's part of its data-parallel share of a batch
        (its sequence shard under SP)."""
        return self.loss_sum(model, batch)

    # ----- evaluation and reporting -----
    def eval_metrics(self, loss_sum: float, count: float) -> dict:
        """Validation metrics from the summed validation loss and its count (``metrics.jsonl``
        values must be finite or None: they are written as JSON)."""
        return {self.val_metric: loss_sum / count if count else None}

    def summary(self, rows: list[dict]) -> str:
        """The line printed at the end of a run."""
        first, last = rows[0], rows[-1]
        val = last.get(self.val_metric)
        return (f"{self.loss_label} {_num(first['loss'])} -> {_num(last['loss'])} over {last['step']} steps; "
                f"validation {_num(val)}; peak memory "
                f"{last['peak_memory_bytes'] / 2**30:.2f} GiB")

    def plot(self, rows: list[dict], path: Path, title: str) -> None:
        from .metrics import plot_metrics

        renamed = [{**r, "val_loss": r.get(self.val_metric)} for r in rows]
        plot_metrics(renamed, path, title=title, unit="", ylabel=self.loss_label)

    def after_fit(self, trainer) -> dict:
        """Task-specific evaluation once training is done (main rank of a finished run); returns
        what to report (also printed). Default: nothing."""
        return {}

    # ----- weights from elsewhere (init_from) -----
    def load_weights(self, path: str):
        """``(weights, model_config, extra)`` of a run, a checkpoint or a task-specific format."""
        from .checkpoint import checkpoint_weights, latest_checkpoint

        path = Path(path)
        ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint found")
        weights, state = checkpoint_weights(ckpt)
        return weights, self.config_from_dict(dict(state["config"]["model_config"])), state["config"]["train"]

    def load_model(self, path: str):
        """``(model, run config)`` of a trained run of this task (run or checkpoint directory):
        the model built on the meta device and filled one weight at a time (``load_parameters``),
        in eval mode on the CPU; the run's ``TrainConfig`` (its data settings, for tasks whose
        inference needs them)."""
        from .config import TrainConfig

        weights, config, train_cfg = self.load_weights(str(path))
        if train_cfg.get("task", "genslm") != self.name:
            raise ValueError(f"{path}: a run of task {train_cfg.get('task', 'genslm')!r}, not {self.name}")
        cfg = TrainConfig(task=self.name, model=train_cfg["model"], model_changes=train_cfg["model_changes"],
                          data=train_cfg["data"], seed=train_cfg["seed"])
        with torch.device("meta"):
            model = self.build_model(config)
        model.to_empty(device="cpu")
        self.load_parameters(model, weights)
        return model.eval(), cfg

    def check_init_from(self, path: str, theirs_config, extra, cfg, model_config) -> None:
        """Refuse weights that do not fit this run (architecture, vocabulary, ...)."""
        if theirs_config != model_config:
            raise ValueError(f"init_from={path!r}: its model config differs from this run's")


def _num(x, spec: str = ".4g") -> str:
    """A metric for a message: None (a skipped or undefined value) reads "n/a"."""
    return "n/a" if x is None else format(x, spec)


def finite_or_none(x):
    """``x`` if it is a finite number, else None (JSON has no NaN or Infinity)."""
    return x if x is not None and math.isfinite(x) else None


# ----- the registry --------------------------------------------------------------------------

_BUILTIN = {
    "genslm": "ds4sci.train.tasks.genslm:GenSLMTask",
    "gridvit": "ds4sci.train.tasks.gridvit:GridViTTask",
    "climax": "ds4sci.train.tasks.climax:ClimaXTask",
    "dig": "ds4sci.train.tasks.dig:DiGTask",
    "forcefield": "ds4sci.train.tasks.forcefield:ForceFieldTask",
}
_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available to ``ds4sci train <task.name>`` (and ``get_task``)."""
    if not task.name:
        raise ValueError("register_task: the task has no name")
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_TASKS))


def get_task(name: str) -> Task:
    """The registered task called ``name`` (built-in tasks load on first use)."""
    if name not in _TASKS and name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        register_task(getattr(importlib.import_module(module), cls)())
    if name not in _TASKS:
        raise ValueError(f"task={name!r} is not a training task; expected one of {task_names()}")
    return _TASKS[name]


def dataclass_keys(cls: Any, prefix: str) -> list[str]:
    return [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]
