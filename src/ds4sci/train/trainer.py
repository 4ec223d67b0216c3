"""GenSLM training: AdamW, warmup + cosine, clipping, accumulation, resume. This is the
single-process trainer; ``distributed.DistributedTrainer`` runs the same computation over a
parallel layout through the hooks marked below, and checkpoints of either resume in the other.

Everything that decides the numbers is restored on ``resume``: weights, optimizer and scheduler
state, RNG states and the data position (the order of records is a pure function of the seed
and epoch), so a resumed run's loss curve equals an uninterrupted one's.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.corpus import default_records
from ..data.dataset import TokenDataset, build_token_dir, collate
from ..data.fasta import read_fasta
from ..data.tokenizer import CodonTokenizer
from ..models.genslm import GenSLM, GenSLMConfig, load_parameters
from .checkpoint import (
    CheckpointError,
    is_distributed_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_distributed_app_state,
    read_distributed_state,
    save_checkpoint,
)
from .config import TrainConfig
from .metrics import peak_memory_bytes, plot_metrics


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


def _records(cfg: TrainConfig):
    if not cfg.data.fasta:
        yield from default_records(cfg.data.n_simulated, cfg.data.simulate_seed)
        return
    for path in cfg.data.fasta:
        for rec in read_fasta(path, on_bad=cfg.data.on_bad):
            yield rec.name, rec.sequence


def prepare_data(cfg: TrainConfig, tokenizer: CodonTokenizer) -> Path:
    """Token files for this data config in ``out_dir/data`` (rebuilt when the config changed)."""
    token_dir = Path(cfg.out_dir) / "data"
    stamp = json.dumps({k: v for k, v in cfg.to_dict()["data"].items() if k != "max_tokens"}, sort_keys=True)
    stamp_file = token_dir / "config.json"
    if not (stamp_file.is_file() and stamp_file.read_text() == stamp):
        stamp_file.unlink(missing_ok=True)  # a build that dies half-way is redone next time
        build_token_dir(_records(cfg), tokenizer, token_dir, cfg.data.val_fraction, cfg.data.frame)
        stamp_file.write_text(stamp)
    return token_dir


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
        torch.cuda.set_rng_state_all(state["cuda"])


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
                      "keep_checkpoints", "out_dir", "overwrite", "device", "init_from"}


def _changed_settings(saved: dict, now: dict) -> dict:
    """Flat config keys whose change would change a resumed run's numbers: ``{key: (saved, now)}``.
    The parallel layout may change: every layout computes the same numbers."""
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


@torch.no_grad()
def evaluate(model: GenSLM, data: TokenDataset, pad_id: int, precision: str, device: torch.device) -> float | None:
    """Validation perplexity: exp of the mean next-token loss over every validation token."""
    model.eval()
    total, count = 0.0, 0
    for i in range(len(data)):
        ids, labels = (t.to(device) for t in collate([data[i]], pad_id))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids, labels=labels)
        total += out.loss.item() * out.num_tokens.item()
        count += out.num_tokens.item()
    model.train()
    return math.exp(total / count) if count else None


class Trainer:
    """One process trains the whole model. ``distributed.DistributedTrainer`` overrides the hooks
    marked "hook" to spread the same computation over ranks."""

    is_main = True
    """Whether this process writes metrics, plots and the run's config (rank 0)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.device = self._setup_device()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        # Every rank decides (they read the same directory); only the main one deletes.
        if not resume and latest_checkpoint(self.out) is not None:
            if not cfg.overwrite:
                raise ValueError(
                    f"out_dir {self.out} already holds a run's checkpoints; pass --resume to continue "
                    f"it, --overwrite=true to replace it, or choose another --out_dir"
                )
            if self.is_main:
                shutil.rmtree(self.out / "checkpoints")
        torch.manual_seed(cfg.seed)
        self.tokenizer = CodonTokenizer(cfg.data.vocab)
        if self.is_main:
            prepare_data(cfg, self.tokenizer)
        self._barrier()
        token_dir = Path(cfg.out_dir) / "data"
        self.train_data = TokenDataset(token_dir, "train", cfg.data.max_tokens)
        self.val_data = TokenDataset(token_dir, "val", cfg.data.max_tokens)
        self.pad_id = self.tokenizer.pad_id
        model_config = cfg.model_config()
        if model_config.vocab_size < len(self.tokenizer):
            raise ValueError(f"model vocab_size={model_config.vocab_size} < tokenizer's {len(self.tokenizer)}")
        # Weights that a checkpoint (resume) or init_from will set are not initialised first.
        self._initialise = not resume and cfg.init_from is None
        self.model = self._build_model(model_config)
        self.num_parameters = self.model.num_parameters()
        """Of the whole model (a pipeline stage holds only some)."""
        self._parallelize()
        if cfg.init_from is not None and not resume:
            self._init_from(cfg.init_from)
        self.optimizer = _optimizer(self._trained_module(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.sampler = RecordSampler(len(self.train_data), cfg.seed)
        self.position = DataPosition()
        self.step = 0
        self.metrics_path = self.out / "metrics.jsonl"
        if resume:
            self._resume()
        elif self.metrics_path.exists() and self.is_main:
            self.metrics_path.unlink()
        if self.is_main:
            (self.out / "config.yaml").write_text(_yaml(cfg.to_dict()))
        self._barrier()

    # ----- hooks (one process: the plain computation) -----
    def _setup_device(self) -> torch.device:
        return _device(self.cfg.device)

    def _barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""

    def _build_model(self, config: GenSLMConfig) -> GenSLM:
        """The whole model on this process's device, initialised from ``cfg.seed`` (or, when its
        weights come from storage, with its storage allocated only)."""
        if self._initialise:
            with torch.device(self.device):
                return GenSLM(config, seed=self.cfg.seed)
        with torch.device("meta"):
            model = GenSLM(config)
        return model.to_empty(device=self.device)

    def _parallelize(self) -> None:
        """Spread ``self.model`` over ranks (nothing to do in one process)."""

    def _trained_module(self) -> torch.nn.Module:
        """The module whose parameters this process optimizes (a pipeline stage under pp)."""
        return self.model

    def _micro_batches(self) -> tuple[list, int]:
        """The step's micro-batches ``[(ids, labels)]`` for this process and the step's number of
        predicted tokens over all of them (every process's)."""
        o = self.cfg.optim
        micro = []
        for _ in range(o.grad_accum):
            indices, self.position = self.sampler.take(self.position, o.batch_size)
            ids, labels = collate([self.train_data[i] for i in indices], self.pad_id)
            micro.append((ids.to(self.device), labels.to(self.device)))
        return micro, sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)

    def _micro_step(self, ids: torch.Tensor, labels: torch.Tensor, total_tokens: int) -> float:
        """Forward and backward of one micro-batch, weighted by its share of the step's tokens;
        returns its summed loss (over every rank's tokens)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = self.model(ids, labels=labels)
        (out.loss * (out.num_tokens / max(total_tokens, 1))).backward()
        return out.loss.item() * out.num_tokens.item()

    def _clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def _evaluate(self) -> float | None:
        return evaluate(self.model, self.val_data, self.pad_id, self.cfg.precision, self.device)

    def _resume(self) -> None:
        """Restore the latest checkpoint, written by this or any other parallel layout."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        if is_distributed_checkpoint(ckpt):
            state = read_distributed_state(ckpt)
            self._check_resumable(ckpt, state)
            self._load_distributed(ckpt)
        else:
            model_state, state = load_checkpoint(ckpt)
            self._check_resumable(ckpt, state)
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
        """The weights of ``cfg.init_from``, after checking they fit this model and tokenizer."""
        from ..models.genslm.inference import load_weights

        expected = "expected a ds4sci run or checkpoint directory or a saved HF GPT-NeoX directory"
        if not Path(path).exists():
            raise FileNotFoundError(f"init_from={path!r}: no such file or directory; {expected}")
        try:
            weights, config, vocab = load_weights(path)
        except (FileNotFoundError, CheckpointError) as err:
            raise type(err)(f"init_from={path!r}: {err}; {expected}") from err
        except (ValueError, KeyError, RuntimeError) as err:  # unreadable or inconsistent weights
            raise ValueError(f"init_from={path!r}: {err}") from err
        changes = config.architecture_changes(self.model.config)
        if changes:
            raise ValueError(f"init_from={path!r}: its model differs from this run's in {changes} (theirs, "
                             f"ours); choose the matching preset (model=...) or --model.<field>=... overrides")
        theirs = CodonTokenizer(vocab or "genslm-69")  # HF (GenSLM) models: GenSLM's 69 tokens
        if theirs.vocab != self.tokenizer.vocab:
            raise ValueError(f"init_from={path!r} was trained with the tokenizer {vocab or 'genslm-69'!r}, "
                             f"this run uses data.vocab={self.cfg.data.vocab!r}, which maps tokens to other "
                             f"ids: the embeddings would mean other codons")
        # Every rank reads the whole tensors, one at a time, and keeps what it holds of each.
        try:
            load_parameters(self._trained_module(), weights)
        except (ValueError, KeyError, RuntimeError, CheckpointError) as err:  # a file that fails mid-read
            raise ValueError(f"init_from={path!r}: {err}") from err

    def _check_resumable(self, ckpt: Path, state: dict) -> None:
        saved, now = _flat(state["config"]["train"]), _flat(self.cfg.to_dict())
        changed = _changed_settings(saved, now)
        if changed:
            raise CheckpointError(
                f"checkpoint {ckpt} was made with other settings, (saved, now): {changed}; resume "
                f"with the same config (only {sorted(_RESUMABLE_CHANGES)} and the parallel layout may change)"
            )
        saved_model = state["config"]["model_config"]
        if saved_model != self.model.config.to_dict():
            diff = {k: (saved_model.get(k), v) for k, v in self.model.config.to_dict().items() if saved_model.get(k) != v}
            raise CheckpointError(f"checkpoint {ckpt} was made for another model: (saved, now) = {diff}")

    def _load_single_process(self, ckpt: Path, model_state: dict, optim_state: dict) -> None:
        """Weights and optimizer state of a single-process checkpoint into this run."""
        load_plain_state(ckpt, self.model, self.optimizer, model_state, optim_state)

    def _app_state(self) -> dict:
        """Model and optimizer state keyed by parameter name (DTensor shards when distributed),
        the form ``torch.distributed.checkpoint`` saves and reshards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._trained_module(), self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _load_distributed(self, ckpt: Path) -> None:
        """Weights and optimizer state of a distributed checkpoint (any layout) into this run."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        app_state = self._app_state()
        load_distributed_app_state(ckpt, app_state)
        set_state_dict(self._trained_module(), self.optimizer, model_state_dict=app_state["model"],
                       optim_state_dict=app_state["optim"])

    def save(self) -> Path:
        state = {
            "step": self.step, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
            "data_position": vars(self.position),
            "config": {"train": self.cfg.to_dict(), "model_config": self.model.config.to_dict()},
        }
        return save_checkpoint(self.out, self.step, self.model.state_dict(), state, self.cfg.keep_checkpoints)

    def _log(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def train_step(self) -> dict:
        o = self.cfg.optim
        # Every micro-batch's loss is weighted by its share of the step's predicted tokens.
        micro, total_tokens = self._micro_batches()
        loss_sum = 0.0
        start = time.perf_counter()
        for ids, labels in micro:
            loss_sum += self._micro_step(ids, labels, total_tokens)
        grad_norm = self._clip_grad_norm(o.grad_clip if o.grad_clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        return {"step": self.step, "loss": loss_sum / max(total_tokens, 1), "lr": lr,
                "grad_norm": grad_norm, "tokens": total_tokens,
                "tokens_per_s": total_tokens / elapsed, "peak_memory_bytes": peak_memory_bytes(self.device),
                "epoch": self.position.epoch}

    def fit(self, until_step: int | None = None) -> dict:
        """Train to ``optim.max_steps`` (or stop early at ``until_step``, with a checkpoint)."""
        from tqdm import tqdm

        cfg = self.cfg
        stop = cfg.optim.max_steps if until_step is None else min(until_step, cfg.optim.max_steps)
        bar = tqdm(total=cfg.optim.max_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc="train genslm", unit="step", dynamic_ncols=True)
        row = {}
        self.model.train()
        while self.step < stop:
            row = self.train_step()
            last = self.step == cfg.optim.max_steps
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                row["val_perplexity"] = self._evaluate()
            if self.is_main:
                self._log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mem=f"{row['peak_memory_bytes'] / 2**30:.2f}GiB")
            if self.step == stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self.save()
        bar.close()
        self._barrier()  # the main rank's last metrics row is written
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        if self.is_main:
            plot_metrics(rows, self.out / "loss_curve.png", title=f"{cfg.model} on {self._data_label()}")
        return {"rows": rows, "final": row}

    def _data_label(self) -> str:
        return "embedded SARS-CoV-2 corpus" if not self.cfg.data.fasta else ", ".join(self.cfg.data.fasta)


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
