"""Typed training configuration: dataclasses, YAML files and ``--key=value`` overrides.

Keys are dotted paths into :class:`TrainConfig` (``optim.lr``, ``data.n_simulated``). The
``data`` section is the task's own dataclass (``train.task.Task.data_config``); keys under
``model.`` change fields of the chosen preset of the task's model
(``model.activation_checkpointing=full``). Values are parsed as YAML scalars (``1e-3``,
``true``, ``null``, ``[a.fa, b.fa]``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .task import get_task


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    max_steps: int = 80
    """Optimizer steps in the whole run."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the mean over all their tokens."""
    batch_size: int = 1
    """Records per micro-batch."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("max_steps", "grad_accum", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)}; expected >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr}; expected a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio}; expected in [0, 1]")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optim.weight_decay={self.weight_decay}; expected a finite number >= 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"optim.grad_clip={self.grad_clip}; expected a finite number >= 0 (0 = no clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}; expected two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}; expected >= 0")


@dataclass
class ParallelConfig:
    """How a run is spread over processes (``torchrun``); dp x sp x tp x pp = world size."""

    dp: int = -1
    """Data-parallel degree (FSDP over dp x sp); -1 = world size / (sp * tp * pp)."""
    sp: int = 1
    """Sequence-parallel degree: ranks sharing each sequence."""
    tp: int = 1
    """Tensor-parallel degree: ranks splitting heads and MLP columns."""
    pp: int = 1
    """Pipeline-parallel degree: stages the layers are cut into."""
    sp_mode: str = "ulysses"
    """Sequence-parallel attention: ulysses, ring or hybrid (ring of Ulysses groups)."""
    sp_ulysses: int | None = None
    """Ulysses degree inside hybrid mode (divides sp); None = the largest divisor of sp that
    divides the heads (per tensor-parallel rank) and is < sp."""
    sp_layout: str = "zigzag"
    """Token layout of the ring level (ring, hybrid): zigzag (causal load balance) or contiguous."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    pp_microbatches: int = 2
    """Microbatches per pipeline step (divides the per-rank batch)."""
    fsdp_cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer state in host memory."""
    fsdp_reshard_after_forward: bool = True
    """ZeRO-3 (free gathered layer weights after forward) or keep them until backward."""
    fsdp_param_dtype: str | None = None
    """FSDP mixed precision: gather and compute with parameters in bf16 (halves the all-gather
    bytes; master weights, optimizer state and the gradient reduction stay fp32); None = fp32."""
    tp_embeddings: bool = True
    """Tensor parallelism also splits the embeddings and output head by vocabulary."""
    timeout_s: float = 300.0
    """Collective timeout: a rank waiting this long on a dead or stuck peer raises."""

    def __post_init__(self):
        from ..parallel.dims import SP_MODES

        if self.sp_mode not in SP_MODES:
            raise ValueError(f"parallel.sp_mode={self.sp_mode!r}; expected one of {SP_MODES}")
        if self.sp_layout not in ("zigzag", "contiguous"):
            raise ValueError(f"parallel.sp_layout={self.sp_layout!r}; expected 'zigzag' or 'contiguous'")
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r}; expected '1f1b' or 'gpipe'")
        for name in ("sp", "tp", "pp", "pp_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)}; expected >= 1")
        if self.dp != -1 and self.dp < 1:
            raise ValueError(f"parallel.dp={self.dp}; expected >= 1 or -1 (infer)")
        if self.fsdp_param_dtype not in (None, "bf16"):
            raise ValueError(f"parallel.fsdp_param_dtype={self.fsdp_param_dtype!r}; expected 'bf16' or null")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s={self.timeout_s}; expected > 0")


@dataclass
class TrainConfig:
    task: str = "genslm"
    """What to train: a registered training task (``ds4sci train --help`` lists them)."""
    model: str = ""
    """Preset name of the task's model; empty = the task's default."""
    model_changes: dict = field(default_factory=dict)
    """Fields of the preset to change (``--model.<field>=value``)."""
    data: Any = None
    """What to train on: the task's data config (None = its defaults)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; parameters and optimizer state stay fp32)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    init_from: str | None = None
    """Start from these weights instead of random ones (fine-tuning): a ds4sci run or checkpoint
    directory, or a format the task reads (GenSLM: a saved HF GPT-NeoX directory,
    ``save_pretrained`` output). Its architecture (and tokenizer) must be the model's; optimizer,
    schedule and data position start fresh (unlike ``--resume``, which continues a run and
    ignores this)."""
    out_dir: str = ""
    """Run directory: checkpoints, metrics.jsonl, plots, data caches; empty = runs/<task>."""
    eval_every: int = 20
    """Validation every N steps (and at the end); 0 = only at the end."""
    checkpoint_every: int = 20
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace the checkpoints of an earlier run in out_dir (otherwise refused)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    on_nonfinite: str = "error"
    """A NaN or infinite loss or gradient norm: stop the run with an error naming the step
    (error), or skip that step's update and go on (skip), as large-scale trainers do."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout (used when launched with torchrun; see ds4sci.train.distributed)."""

    def __post_init__(self):
        task = get_task(self.task)  # validates the name
        if not self.model:
            self.model = task.default_model
        if not self.out_dir:
            self.out_dir = f"runs/{self.task}"
        if self.data is None:
            self.data = task.data_config()
        elif isinstance(self.data, dict):
            self.data = task.data_config(**self.data)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}; expected 'fp32' or 'bf16'")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints}; expected >= 1")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 0 (0 = only at the end)")
        if self.on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}; expected 'error' or 'skip'")
        _check_device_name(self.device)
        self.model_config()  # validates the preset name and changes now, not mid-run

    @property
    def task_spec(self):
        """The ``train.task.Task`` this config trains."""
        return get_task(self.task)

    def model_config(self):
        config = self.task_spec.preset(self.model)
        return dataclasses.replace(config, **self.model_changes) if self.model_changes else config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_device_name(name: str) -> None:
    """Refuse device names training cannot use, before any data is read."""
    if name in ("auto", "cpu") or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        return
    raise ValueError(f"device={name!r}; expected cpu, cuda, cuda:N or auto (ds4sci trains on CPUs and "
                     f"CUDA GPUs)")


def _coerce(dotted: str, value, hint):
    """Convert YAML's value to the field's type (YAML reads ``1e-3`` as a string, say)."""
    if value is None:
        return None
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    wanted = [t for t in typing.get_args(hint) if t is not type(None)] if is_union else [hint]
    for kind in wanted:
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is int and isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if kind in (str, bool, dict) and isinstance(value, kind):
            return value
        if typing.get_origin(kind) in (list, tuple) and isinstance(value, (list, tuple)):
            return typing.get_origin(kind)(value)
    if typing.get_origin(wanted[0]) is list and isinstance(value, str):
        return [value]
    raise ValueError(f"config key {dotted!r}: value {value!r} is not of type {hint}")


def _set(cfg: TrainConfig, dotted: str, value) -> None:
    if dotted.startswith("model."):
        name = dotted[len("model."):]
        hints = typing.get_type_hints(cfg.task_spec.model_config)
        if name not in hints:
            raise ValueError(f"unknown config key {dotted!r}; model fields: {sorted(hints)}")
        cfg.model_changes[name] = _coerce(dotted, value, hints[name])
        return
    *parents, leaf = dotted.split(".")
    target = cfg
    for part in parents:
        if not dataclasses.is_dataclass(getattr(target, part, None)):
            raise ValueError(f"unknown config key {dotted!r}")
        target = getattr(target, part)
    names = {f.name for f in dataclasses.fields(target)}
    if leaf not in names:
        raise ValueError(f"unknown config key {dotted!r}; known here: {sorted(names)}")
    if dataclasses.is_dataclass(getattr(target, leaf)):
        if not isinstance(value, dict):
            raise ValueError(f"config key {dotted!r} is a section; expected a mapping")
        for key, sub in value.items():
            _set(cfg, f"{dotted}.{key}", sub)
        return
    setattr(target, leaf, _coerce(dotted, value, typing.get_type_hints(type(target))[leaf]))


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "model_changes":
            yield from _flatten(value, dotted + ".")
        elif dotted == "model_changes":
            for k, v in value.items():
                yield f"model.{k}", v
        else:
            yield dotted, value


def load_config(yaml_path: str | Path | None = None, overrides: list[str] = (),
                task: str | None = None) -> TrainConfig:
    """Defaults (the task's, then its own defaults of common keys), then the YAML file, then
    ``key=value`` overrides; validated at the end. ``task``: which task (default: the YAML file's
    ``task`` key, else genslm)."""
    data = {}
    if yaml_path is not None:
        data = _read_yaml(Path(yaml_path))
    name = task or data.get("task") or "genslm"
    if task and data.get("task") not in (None, task):
        raise ValueError(f"config file {yaml_path} is for task {data['task']!r}, not {task!r}")
    cfg = TrainConfig(task=name)
    for key, value in get_task(name).defaults.items():
        _set(cfg, key, value)
    for key, value in _flatten(data):
        if key != "task":
            _set(cfg, key, value)
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected --key=value")
        if key == "task":
            raise ValueError(f"override {item!r}: the task is chosen by `ds4sci train <task>`")
        _set(cfg, key, yaml.safe_load(raw))
    # Rebuild so every __post_init__ check runs on the final values.
    return TrainConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in ("data", "optim", "parallel")},
        data=type(cfg.data)(**dataclasses.asdict(cfg.data)), optim=OptimConfig(**dataclasses.asdict(cfg.optim)),
        parallel=ParallelConfig(**dataclasses.asdict(cfg.parallel)),
    )


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"config file {path} {what}; expected a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not text (byte {err.start} is not UTF-8); expected a "
                         f"YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config file {path}:{where} YAML syntax error: {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    return data
