"""The common trainer: AdamW, warmup + cosine, clipping, accumulation, mixed precision, progress,
metrics, checkpoints, resume and init_from, for every training task (``train.task``). This is the
single-process trainer; ``distributed.DistributedTrainer`` runs the same computation over a
parallel layout through the hooks marked below, and checkpoints of either resume in the other.

Everything that decides the numbers is restored on ``resume``: weights, optimizer and scheduler
state, RNG states and the data position (the order of records is a pure function of the seed
and epoch), so a resumed run's loss curve equals an uninterrupted one's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    has_checkpoints,
    is_distributed_checkpoint,
    load_checkpoint,
    load_distributed_app_state,
    newest_intact_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .metrics import peak_memory_bytes
from .run_dir import GracefulStop, RunLock, RunStopped, check_out_dir
from .task import finite_or_none


@dataclass
class DataPosition:
    """Where the next micro-batch starts: epoch and index into that epoch's permutation."""

    epoch: int = 0
    index: int = 0


class RecordSampler:
    """Deterministic record order: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()

    def take(self, pos: DataPosition, count: int) -> tuple[list[int], DataPosition]:
        taken, epoch, index = [], pos.epoch, pos.index
        order = self.order(epoch)
        while len(taken) < count:
            if index == self.n:
                epoch, index = epoch + 1, 0
                order = self.order(epoch)
            taken.append(order[index])
            index += 1
        return taken, DataPosition(epoch, index)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at ``max_steps``."""
    o = cfg.optim
    if step < o.warmup_steps:  # step is 0-based: the first step runs at lr / warmup_steps
        return (step + 1) / o.warmup_steps
    # The last step (max_steps - 1) runs at exactly min_lr_ratio.
    progress = (step - o.warmup_steps + 1) / max(1, o.max_steps - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def _rng_state() -> dict:
    """Torch's generators: the only randomness training draws on (data order is seeded apart)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        # As many devices as are visible now (a run resumed on fewer GPUs than it was saved on).
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def load_plain_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     model_state: dict, optim_state: dict) -> None:
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this run: {err}") from err


# Settings a resumed run may change without changing its numbers (max_steps extends the run,
# which moves the cosine schedule from then on).
_RESUMABLE_CHANGES = {"optim.max_steps", "progress", "eval_every", "checkpoint_every",
                      "keep_checkpoints", "out_dir", "overwrite", "device", "init_from", "on_nonfinite"}
# Keys that checkpoints from before they existed lack, with the value those runs had.
_DEFAULTS_OF_OLD_CHECKPOINTS = {"task": "genslm"}


def _changed_settings(saved: dict, now: dict) -> dict:
    """Flat config keys whose change would change a resumed run's numbers: ``{key: (saved, now)}``.
    The parallel layout may change: every layout computes the same numbers."""
    saved = {**_DEFAULTS_OF_OLD_CHECKPOINTS, **saved}
    return {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
            if k not in _RESUMABLE_CHANGES and not k.startswith("parallel.") and saved.get(k) != now.get(k)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_changes":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_device(batch, device: torch.device):
    """A batch (a tensor, or tuples / lists / dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to"):  # a batch class of its own (e.g. data.molecules.MoleculeBatch)
        return batch.to(device)
    return batch


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(task, model, data, precision: str, device: torch.device) -> tuple[float, float]:
    """``(summed loss, count)`` over every validation record, one record at a time."""
    model.eval()
    total, count = 0.0, 0
    for i in range(len(data)):
        batch = to_device(task.collate([data[i]]), device)
        with _autocast(device, precision):
            loss_sum, n = task.loss_sum(model, batch)
        mean = loss_sum / n.clamp_min(1)
        total += mean.item() * n.item()
        count += n.item()
    model.train()
    return total, count


class Trainer:
    """One process trains the whole model of ``cfg.task``. ``distributed.DistributedTrainer``
    overrides the hooks marked "hook" to spread the same computation over ranks."""

    is_main = True
    """Whether this process writes metrics, plots and the run's config (rank 0)."""
    _lock = None
    """The run directory's lock (``close`` releases it; set before anything can fail)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, config_path: str | Path | None = None):
        """``config_path``: the YAML file the config came from, never overwritten by the run's
        ``config.yaml`` (when it is that file)."""
        self.cfg = cfg
        self.task = cfg.task_spec
        self.out = Path(cfg.out_dir)
        self._lock = None
        self._config_path = Path(config_path).resolve() if config_path else None
        try:
            self._start(resume)
        except BaseException:
            self.close()
            raise

    def _start(self, resume: bool) -> None:
        cfg = self.cfg
        # Everything that can be checked without touching out_dir is checked first.
        self.device = self._setup_device()
        model_config = cfg.model_config()
        self.task.check(cfg, model_config)
        if self.is_main:
            check_out_dir(self.out, self.task.run_files)
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.out).acquire()
        self._barrier()
        # Every rank decides (they read the same directory); only the main one moves files.
        resume_from = None
        if resume:
            resume_from = self._resumable_checkpoint(model_config)
        elif has_checkpoints(self.out) and not cfg.overwrite:
            raise ValueError(
                f"out_dir {self.out} already holds a run's checkpoints; pass --resume to continue "
                f"it, --overwrite=true to replace it, or choose another --out_dir"
            )
        torch.manual_seed(cfg.seed)
        if self.is_main:
            self.task.prepare_data(cfg, self.out, resume=resume)
        self._barrier()
        self.train_data, self.val_data = self.task.datasets(cfg, self.out)
        # Weights that a checkpoint (resume) or init_from will set are not initialised first.
        self._initialise = not resume and cfg.init_from is None
        self.model = self._build_model(model_config)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        """Of the whole model (a pipeline stage holds only some)."""
        self._parallelize()
        if cfg.init_from is not None and not resume:
            self._init_from(cfg.init_from)
        # Building on a real device draws from torch's RNG (default inits of nn.Linear ...), on
        # the meta device (distributed runs) not: restart the stream so that training draws the
        # same numbers (dropout, drop-path) in every layout.
        torch.manual_seed(cfg.seed)
        self.optimizer = _optimizer(self._trained_module(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.sampler = RecordSampler(len(self.train_data), cfg.seed)
        self.position = DataPosition()
        self.step = 0
        self.metrics_path = self.out / "metrics.jsonl"
        if resume_from is not None:
            self._resume(*resume_from)
        elif self.is_main:
            if has_checkpoints(self.out):  # --overwrite: kept aside until the new run's first checkpoint
                shutil.rmtree(self.out / "checkpoints.replaced", ignore_errors=True)
                os.replace(self.out / "checkpoints", self.out / "checkpoints.replaced")
            self.metrics_path.unlink(missing_ok=True)
        if self.is_main:
            config_file = self.out / "config.yaml"
            if self._config_path is None or config_file.resolve() != self._config_path:
                config_file.write_text(_yaml(cfg.to_dict()))
        self._barrier()

    def close(self) -> None:
        """Release the run directory (the kernel also does when the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        self.close()

    # ----- hooks (one process: the plain computation) -----
    def _setup_device(self) -> torch.device:
        return _device(self.cfg.device)

    def _barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""

    def _build_model(self, config) -> torch.nn.Module:
        """The whole model on this process's device, initialised from ``cfg.seed`` (or, when its
        weights come from storage, with its storage allocated only)."""
        if self._initialise:
            with torch.device(self.device):
                return self.task.build_model(config, seed=self.cfg.seed)
        with torch.device("meta"):
            model = self.task.build_model(config)
        return model.to_empty(device=self.device)

    def _parallelize(self) -> None:
        """Spread ``self.model`` over ranks (nothing to do in one process)."""

    def _trained_module(self) -> torch.nn.Module:
        """The module whose parameters this process optimizes (a pipeline stage under pp)."""
        return self.model

    def _micro_batches(self) -> tuple[list, int]:
        """The step's micro-batches for this process and the step's number of loss targets over
        all of them (every process's)."""
        o = self.cfg.optim
        micro, total = [], 0
        for _ in range(o.grad_accum):
            indices, self.position = self.sampler.take(self.position, o.batch_size)
            records = [self.train_data[i] for i in indices]
            total += self.task.count(records)
            micro.append(to_device(self.task.collate(records), self.device))
        return micro, total

    def _micro_step(self, batch: tuple, total_count: int) -> float:
        """Forward and backward of one micro-batch, weighted by its share of the step's targets;
        returns its summed loss (over every rank's targets)."""
        with _autocast(self.device, self.cfg.precision):
            loss_sum, count = self.task.loss_sum(self.model, batch)
            mean = loss_sum / count.clamp_min(1)
        (mean * (count / max(total_count, 1))).backward()
        return mean.item() * count.item()

    def _clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def _evaluate(self) -> dict:
        total, count = evaluate(self.task, self.model, self.val_data, self.cfg.precision, self.device)
        return self.task.eval_metrics(total, count)

    def _resumable_checkpoint(self, model_config) -> tuple[Path, dict]:
        """The newest intact checkpoint and its state, checked against this run's config before
        anything is read or rebuilt (a corrupt newer one is skipped, and said so)."""
        if not (self.out / "checkpoints").is_dir():
            raise CheckpointError(f"--resume: {self.out} holds no checkpoints (out_dir={str(self.out)!r}); "
                                  "start the run without --resume")
        ckpt, state, skipped = newest_intact_checkpoint(self.out)
        if self.is_main:
            for path, why in skipped:
                print(f"resume: skipping {path.name}: {why}", file=sys.stderr)
            if skipped:
                print(f"resume: using {ckpt.name}, the newest intact checkpoint", file=sys.stderr)
        self._check_resumable(ckpt, state, model_config)
        if state["step"] > self.cfg.optim.max_steps:
            raise CheckpointError(f"--resume: checkpoint {ckpt.name} is at step {state['step']}, past "
                                  f"optim.max_steps={self.cfg.optim.max_steps}; set optim.max_steps above "
                                  f"{state['step']} to train on")
        return ckpt, state

    def _resume(self, ckpt: Path, state: dict) -> None:
        """Restore ``ckpt`` (verified), written by this or any other parallel layout."""
        if is_distributed_checkpoint(ckpt):
            self._load_distributed(ckpt)
        else:
            model_state, state = load_checkpoint(ckpt, verify=False)
            self._load_single_process(ckpt, model_state, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.position = DataPosition(**state["data_position"])
        self.step = state["step"]
        if self.is_main and self.metrics_path.exists():  # drop rows logged after the checkpoint
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))
        self._barrier()

    def _init_from(self, path: str) -> None:
        """The weights of ``cfg.init_from``, after checking they fit this model (the task says
        what must match: architecture, tokenizer, ...)."""
        expected = f"expected a ds4sci run or checkpoint directory (or what task {self.task.name!r} reads)"
        if not Path(path).exists():
            raise FileNotFoundError(f"init_from={path!r}: no such file or directory; {expected}")
        try:
            weights, config, extra = self.task.load_weights(path)
        except (FileNotFoundError, CheckpointError) as err:
            raise type(err)(f"init_from={path!r}: {err}; {expected}") from err
        except (ValueError, KeyError, RuntimeError) as err:  # unreadable or inconsistent weights
            raise ValueError(f"init_from={path!r}: {err}") from err
        self.task.check_init_from(path, config, extra, self.cfg, self.model.config)
        # Every rank reads the whole tensors, one at a time, and keeps what it holds of each.
        try:
            self.task.load_parameters(self._trained_module(), weights)
        except (ValueError, KeyError, RuntimeError, CheckpointError) as err:  # a file that fails mid-read
            raise ValueError(f"init_from={path!r}: {err}") from err

    def _check_resumable(self, ckpt: Path, state: dict, model_config) -> None:
        saved, now = _flat(state["config"]["train"]), _flat(self.cfg.to_dict())
        changed = _changed_settings(saved, now)
        if changed:
            raise CheckpointError(
                f"checkpoint {ckpt} was made with other settings, (saved, now): {changed}; resume "
                f"with the same config (only {sorted(_RESUMABLE_CHANGES)} and the parallel layout may change)"
            )
        saved_model = state["config"]["model_config"]
        now_model = dataclasses.asdict(model_config)
        if saved_model != now_model:
            diff = {k: (saved_model.get(k), v) for k, v in now_model.items() if saved_model.get(k) != v}
            raise CheckpointError(f"checkpoint {ckpt} was made for another model: (saved, now) = {diff}")

    def _load_single_process(self, ckpt: Path, model_state: dict, optim_state: dict) -> None:
        """Weights and optimizer state of a single-process checkpoint into this run."""
        load_plain_state(ckpt, self.model, self.optimizer, model_state, optim_state)

    def _app_state(self) -> dict:
        """Model and optimizer state keyed by parameter name (DTensor shards when distributed),
        the form ``torch.distributed.checkpoint`` saves and reshards."""
        from ..parallel.tensor import checkpoint_layout

        return checkpoint_layout(self._live_state())

    def _live_state(self) -> dict:
        """Model and optimizer state as training holds them (before ``checkpoint_layout``)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._trained_module(), self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _load_distributed(self, ckpt: Path) -> None:
        """Weights and optimizer state of a distributed checkpoint (any layout) into this run."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from ..parallel.tensor import checkpoint_layout, restore_layout

        live = self._live_state()
        # Read in the layout the checkpoint can hold, then back to the training layout (strided
        # tensor-parallel shards: parallel.tensor.checkpoint_layout).
        app_state = checkpoint_layout(live)
        load_distributed_app_state(ckpt, app_state)
        app_state = restore_layout(app_state, live)
        set_state_dict(self._trained_module(), self.optimizer, model_state_dict=app_state["model"],
                       optim_state_dict=app_state["optim"])

    def save(self) -> Path:
        state = {
            "step": self.step, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
            "data_position": vars(self.position),
            "config": {"train": self.cfg.to_dict(), "model_config": dataclasses.asdict(self.model.config)},
        }
        path = save_checkpoint(self.out, self.step, self.model.state_dict(), state, self.cfg.keep_checkpoints)
        self._drop_replaced()
        return path

    def _drop_replaced(self) -> None:
        """The run that --overwrite replaced, once this run has a checkpoint of its own."""
        if self.is_main:
            shutil.rmtree(self.out / "checkpoints.replaced", ignore_errors=True)

    def _log(self, row: dict) -> None:
        # JSON has no NaN or Infinity: non-finite values are written as null.
        clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def train_step(self) -> dict:
        o = self.cfg.optim
        # Every micro-batch's loss is weighted by its share of the step's loss targets.
        micro, total = self._micro_batches()
        loss_sum = 0.0
        start = time.perf_counter()
        for batch in micro:
            loss_sum += self._micro_step(batch, total)
        grad_norm = self._clip_grad_norm(o.grad_clip if o.grad_clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        loss = loss_sum / max(total, 1)
        # Every rank sees the same global loss and norm, so all take the same decision.
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite and self.cfg.on_nonfinite == "error":
            raise NonFiniteError(
                f"step {self.step + 1}: the loss is {loss} and the gradient norm {grad_norm}; training "
                f"stopped before the update, so no checkpoint holds a non-finite model (the last one is "
                f"intact). Lower optim.lr or raise optim.warmup_steps, or set on_nonfinite=skip to skip "
                f"such steps")
        if finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        name = self.task.count_name
        row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, name: total,
               f"{name}_per_s": total / elapsed, "peak_memory_bytes": peak_memory_bytes(self.device),
               "epoch": self.position.epoch}
        if not finite:
            row["skipped"] = True
        return row

    def _stop_requested(self, stop: GracefulStop) -> bool:
        """Whether a signal asked this run to stop (any rank's signal stops every rank)."""
        return stop.requested is not None

    def fit(self, until_step: int | None = None) -> dict:
        """Train to ``optim.max_steps`` (or stop early at ``until_step``, with a checkpoint). On
        SIGINT or SIGTERM the step in progress finishes, a checkpoint is written and
        ``RunStopped`` is raised (a second signal exits at once)."""
        from tqdm import tqdm

        cfg = self.cfg
        stop = cfg.optim.max_steps if until_step is None else min(until_step, cfg.optim.max_steps)
        bar = tqdm(total=cfg.optim.max_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=f"train {self.task.name}", unit="step", dynamic_ncols=True)
        self.model.train()
        rate = f"{self.task.count_name}_per_s"
        try:
            return self._fit(stop, bar, rate)
        except BaseException:
            self.close()  # an error ends the run: the directory is free again
            raise

    def _fit(self, stop: int, bar, rate: str) -> dict:
        cfg = self.cfg
        row = {}
        with GracefulStop() as signals:
            while self.step < stop:
                row = self.train_step()
                last = self.step == cfg.optim.max_steps
                if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    row.update(self._evaluate())
                if self.is_main:
                    self._log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", rate=f"{row[rate]:.0f}/s",
                                mem=f"{row['peak_memory_bytes'] / 2**30:.2f}GiB")
                stopping = self._stop_requested(signals)
                if stopping or self.step == stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                if stopping:
                    bar.close()
                    self.close()
                    raise RunStopped(f"stopped by {signals.requested or 'a signal on another rank'} after step "
                                     f"{self.step}; checkpoint written: continue with --resume")
        bar.close()
        self._barrier()  # the main rank's last metrics row is written
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        if self.is_main:
            self.task.plot(rows, self.out / "loss_curve.png", title=f"{cfg.model} on {self.task.data_label(cfg)}")
        self.close()
        return {"rows": rows, "final": row}


class NonFiniteError(ValueError):
    """The loss or the gradient norm became NaN or infinite (the run diverged)."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return device


def _yaml(data: dict) -> str:
    import yaml

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(data), sort_keys=False)
