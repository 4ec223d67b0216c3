"""Distributed training of any task under ``torchrun``: the single-process trainer's computation
spread over a ``ParallelDims`` layout (FSDP over dp x sp, sequence, tensor and pipeline
parallelism), each task applying its model's own plans (``Task.parallelize`` / ``pipeline``).

Launch (one process per rank; gloo on CPU, NCCL on GPUs)::

    torchrun --standalone --nproc-per-node=4 -m ds4sci.cli train genslm --dp=2 --sp=2 optim.batch_size=2

Same numbers as one process. ``optim.batch_size`` is the *global* number of records per
micro-batch: every rank draws the same record indices (the sampler is a pure function of the
seed) and keeps its data-parallel share, so the step's count of loss targets is known everywhere
without communication and each rank's loss is ``local sum * dp_sp / global count`` (FSDP
averages gradients over dp x sp). Gradient clipping uses the global norm (over shards and pipeline
stages). A layout therefore changes only how the work is split, which is also why a checkpoint
resumes under any other layout.

Checkpoints are ``torch.distributed.checkpoint`` directories (every rank writes its shards;
loading reshards to the new layout) beside ``state.pt`` (step, scheduler, data position, RNG,
config) and a manifest of sizes and hashes, made atomic like the single-process ones.

Faults: collectives time out after ``parallel.timeout_s`` (the process group's timeout), and
torchrun stops every rank when one exits with an error, so a rank that raises or dies ends the
job with an error instead of a hang. The config is compared across ranks at start (hash, then
the differing keys). ``DS4SCI_FAULT=<rank>:<step>:raise|exit`` makes one rank fail on purpose
at the start of that step (used by the tests of this behaviour).

Memory at start: the model is built on the meta device (no storage), sharded, and only then
made real, each rank filling its own shards (``Task.init_parameters`` through
``parallel.init``: every weight is a function of the seed and its name, so the values equal one
process's). Initialising, or loading ``init_from`` weights (one whole tensor read at a time), a rank
never holds the whole model, only its shards plus one whole weight. (Resuming a single-process
checkpoint, every rank reads its whole model and optimizer state.)

Limits: ``out_dir`` must be one filesystem all ranks see (rank 0 writes the token files and
publishes checkpoints the others wrote shards into).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import save_distributed_checkpoint
from .config import TrainConfig
from .trainer import Trainer, _autocast, _device, _flat, _rng_state, to_device

FAULT_ENV = "DS4SCI_FAULT"


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or any launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float, device: torch.device) -> tuple[int, int]:
    """Join the job's default process group (unless already joined); ``(rank, world_size)``.

    ``timeout_s`` bounds every collective: a rank whose peer died raises after it.
    """
    if not dist.is_initialized():
        if not launched_distributed():
            raise RuntimeError("distributed training needs RANK and WORLD_SIZE in the environment; "
                               "launch with torchrun --nproc-per-node=N -m ds4sci.cli train <task> ...")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def config_digest(cfg: TrainConfig) -> str:
    payload = json.dumps({"config": cfg.to_dict(), "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def agree_on_config(cfg: TrainConfig) -> None:
    """Raise on every rank, naming the ranks and keys, unless all ranks have the same config."""
    mine = (config_digest(cfg), _flat(cfg.to_dict()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if len({digest for digest, _ in gathered}) == 1:
        return
    ref = gathered[0][1]
    diffs = []
    for rank, (_, flat) in enumerate(gathered[1:], start=1):
        keys = sorted(k for k in ref.keys() | flat.keys() if ref.get(k) != flat.get(k))
        if keys:
            diffs.append(f"rank {rank} differs from rank 0 in " +
                         ", ".join(f"{k} ({ref.get(k)!r} vs {flat.get(k)!r})" for k in keys))
        elif gathered[rank][0] != gathered[0][0]:
            diffs.append(f"rank {rank} runs another torch version")
    raise ValueError("the ranks of this job were started with different configs: " + "; ".join(diffs))


def inject_fault(rank: int, step: int) -> None:
    """Fail on purpose when ``DS4SCI_FAULT=<rank>:<step>:raise|exit`` names this rank and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    try:
        fault_rank, fault_step, kind = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
    except ValueError as err:
        raise ValueError(f"{FAULT_ENV}={spec!r}; expected <rank>:<step>:raise|exit") from err
    if (fault_rank, fault_step) != (rank, step):
        return
    if kind == "exit":
        os._exit(13)  # dies without cleanup, like a killed process
    raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {rank} at step {step}")


class DistributedTrainer(Trainer):
    """``Trainer`` over the layout ``cfg.parallel`` on the ranks of the default process group."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, config_path=None):
        p = cfg.parallel
        self._dist_device = self._rank_device(cfg.device)
        self.rank, self.world_size = init_distributed(p.timeout_s, self._dist_device)
        self.is_main = self.rank == 0
        model_config = cfg.model_config()
        agree_on_config(cfg)
        task = cfg.task_spec
        self.dims = task.make_dims(p, self.world_size, model_config)
        task.check_layout(self.dims, model_config)
        o = cfg.optim
        if o.batch_size % self.dims.dp:
            raise ValueError(f"optim.batch_size={o.batch_size} is not divisible by dp={self.dims.dp}: "
                             f"the batch size is global (records per micro-batch over all data-parallel "
                             f"ranks); use a multiple of {self.dims.dp}")
        if self.dims.pp_enabled and (o.batch_size // self.dims.dp) % p.pp_microbatches:
            raise ValueError(f"parallel.pp_microbatches={p.pp_microbatches} does not divide the "
                             f"per-rank batch of {o.batch_size // self.dims.dp} records")
        if p.fsdp_cpu_offload and self.dims.dp_sp == 1:
            raise ValueError(f"parallel.fsdp_cpu_offload=true needs FSDP, i.e. dp x sp > 1; layout "
                             f"{self.dims.describe()} shards nothing (offload the shards of a layout with "
                             f"dp or sp > 1, or drop the flag)")
        self.mesh = self.dims.build_mesh(self._dist_device.type)
        self.pipeline = None
        super().__init__(cfg, resume, config_path)

    # ----- hooks -----
    @staticmethod
    def _rank_device(name: str) -> torch.device:
        device = _device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _setup_device(self) -> torch.device:
        return self._dist_device

    def _barrier(self) -> None:
        dist.barrier()

    def _build_model(self, config) -> torch.nn.Module:
        # Without storage: _parallelize shards it, then each rank makes and fills its shards only.
        with torch.device("meta"):
            return self.task.build_model(config)

    def _parallelize(self) -> None:
        p = self.cfg.parallel
        self._shard()
        # Offloaded shards live in host memory (FSDP2 copies them to the device per layer).
        self._trained_module().to_empty(device="cpu" if p.fsdp_cpu_offload else self.device)
        if self._initialise:
            self.task.init_parameters(self._trained_module(), self.cfg.seed)

    def _shard(self) -> None:
        p = self.cfg.parallel
        fsdp = dict(cpu_offload=p.fsdp_cpu_offload, reshard_after_forward=p.fsdp_reshard_after_forward,
                    param_dtype=torch.bfloat16 if p.fsdp_param_dtype == "bf16" else None)
        if self.dims.pp_enabled:
            records = [d[i] for d in (self.train_data, self.val_data) for i in range(len(d))]
            self.pipeline = self.task.pipeline(
                self.model, self.dims, self.mesh, p, fsdp, batch_size=self.cfg.optim.batch_size // self.dims.dp,
                seq_len=self.task.pipeline_length(records), device=self.device)
            _drop_other_stages(self.model, self.pipeline.module)
            return
        self.task.parallelize(self.model, self.dims, self.mesh, p, fsdp)

    def _trained_module(self) -> torch.nn.Module:
        return self.pipeline.module if self.pipeline is not None else self.model

    def _micro_batches(self) -> tuple[list, int]:
        o, dp, dp_rank = self.cfg.optim, self.dims.dp, self.mesh.dp_rank
        share = o.batch_size // dp
        micro, total = [], 0
        for _ in range(o.grad_accum):
            indices, self.position = self.sampler.take(self.position, o.batch_size)
            records = [self.train_data[i] for i in indices]
            total += self.task.count(records)
            mine = records[dp_rank * share : (dp_rank + 1) * share]
            micro.append(to_device(self.task.collate(mine), self.device))
        return micro, total

    def _local_loss_sum(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed loss and count for its data-parallel share (its sequence shard)."""
        with _autocast(self.device, self.cfg.precision):
            return self.task.sharded_loss_sum(self.model, batch, self.dims, self.mesh, self.cfg.parallel)

    def _global_sum(self, value: torch.Tensor, group_name: str) -> torch.Tensor:
        value = value.detach().float().clone()
        if self.mesh[group_name].size() > 1:
            dist.all_reduce(value, group=self.mesh.group(group_name))
        return value

    def _micro_step(self, batch: tuple, total_tokens: int) -> float:
        if self.pipeline is not None:
            # Each microbatch's summed loss is divided by this count: the global one over dp
            # (FSDP averages gradients over the dp ranks).
            # (Each dp rank holds >= 1 record, so this count is >= 1, which Pipeline requires.)
            scaled_count = total_tokens / self.dims.dp_sp
            with _autocast(self.device, self.cfg.precision):
                mean = self.pipeline.step(*self.task.pipeline_batch(batch), num_tokens=torch.tensor(scaled_count))
            # Only last stages know the loss; sum them over dp and pp (for rank 0's log).
            part = mean.float() * scaled_count if mean is not None else torch.zeros((), device=self.device)
            part = self._global_sum(part, "dp_sp")
            return float(self._global_sum(part, "pp"))
        loss_sum, _ = self._local_loss_sum(batch)
        (loss_sum * (self.dims.dp_sp / max(total_tokens, 1))).backward()
        return float(self._global_sum(loss_sum, "dp_sp"))

    def _clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over every shard (DTensor) and pipeline stage; clip to max_norm."""
        grads = [p.grad for p in self._trained_module().parameters() if p.grad is not None]
        # Squared norms of local shards, summed per set of mesh axes they are sharded over, then
        # one all-reduce per axis: a few collectives per step, not one per parameter.
        buckets: dict[tuple, torch.Tensor] = {}
        for g in grads:
            groups = ()
            if hasattr(g, "to_local"):
                groups = tuple(g.device_mesh.get_group(i) for i, pl in enumerate(g.placements)
                               if not pl.is_replicate())
                g = g.to_local()
            sq = torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
            buckets[groups] = buckets.get(groups, 0) + sq.to(self.device)
        total_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for groups, sq in buckets.items():
            for group in groups:
                dist.all_reduce(sq, group=group)
            total_sq = total_sq + sq
        if self.dims.pp_enabled:  # each stage holds different parameters
            dist.all_reduce(total_sq, group=self.mesh.group("pp"))
        total = total_sq.sqrt()
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
        return float(total)

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Validation metrics over every validation record, the records split over dp ranks."""
        module = self._trained_module()
        module.eval()
        n, dp, dp_rank = len(self.val_data), self.dims.dp, self.mesh.dp_rank
        stats = torch.zeros(2, dtype=torch.float32, device=self.device)
        # Every rank runs the same number of forwards (FSDP gathers weights collectively); a rank
        # without a record left runs the first one and does not count it.
        for start in range(0, n, dp):
            i = start + dp_rank
            batch = to_device(self.task.collate([self.val_data[min(i, n - 1)]]), self.device)
            if self.pipeline is not None:
                with _autocast(self.device, self.cfg.precision):
                    result = self.pipeline.evaluate(*self.task.pipeline_batch(batch))  # (sum, count) on the last stage only
                if result is not None and i < n:
                    stats += torch.stack([t.float().to(self.device) for t in result])
            else:
                loss_sum, count = self._local_loss_sum(batch)
                if i < n:
                    stats += torch.stack((loss_sum.float(), count.float()))
        module.train()
        for axis in ("dp_sp", "pp"):
            if self.mesh[axis].size() > 1:
                dist.all_reduce(stats, group=self.mesh.group(axis))
        total, count = stats.tolist()
        return self.task.eval_metrics(total, count)

    def train_step(self) -> dict:
        inject_fault(self.rank, self.step + 1)
        row = super().train_step()
        # The largest rank's peak memory, not rank 0's (pipeline stages and shards differ).
        peak = torch.tensor(float(row["peak_memory_bytes"]), dtype=torch.float64, device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row.update(peak_memory_bytes=int(peak), layout=self.dims.describe())
        return row

    # ----- checkpoints -----
    def save(self) -> Path:
        state = {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
            "data_position": vars(self.position), "layout": self.dims.describe(),
            "config": {"train": self.cfg.to_dict(), "model_config": dataclasses.asdict(self.model.config)},
        }
        path = save_distributed_checkpoint(self.out, self.step, self._app_state(), state,
                                           self.cfg.keep_checkpoints, is_main=self.is_main,
                                           barrier=self._barrier)
        self._drop_replaced()
        return path

    def _stop_requested(self, stop) -> bool:
        flag = torch.tensor(float(stop.requested is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _load_single_process(self, ckpt: Path, model_state: dict, optim_state: dict) -> None:
        """A single-process checkpoint: its full state, read on every rank into a plain model and
        optimizer to name the optimizer state by parameter, then scattered to this layout."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        from .trainer import _optimizer, load_plain_state

        with torch.device("meta"):  # its values come from the checkpoint
            plain = self.task.build_model(self.model.config)
        plain.to_empty(device="cpu")
        plain_optimizer = _optimizer(plain, self.cfg)
        load_plain_state(ckpt, plain, plain_optimizer, model_state, optim_state)
        full_model, full_optim = get_state_dict(plain, plain_optimizer)
        module = self._trained_module()
        if self.pipeline is not None:  # this stage's parameters only
            names = set(dict(module.named_parameters()))
            full_model = {k: v for k, v in full_model.items() if k in names}
            full_optim = {"state": {k: v for k, v in full_optim["state"].items() if k in names},
                          "param_groups": [{**g, "params": [n for n in g["params"] if n in names]}
                                           for g in full_optim["param_groups"]]}
        set_state_dict(module, self.optimizer, model_state_dict=full_model, optim_state_dict=full_optim,
                       options=StateDictOptions(full_state_dict=True))


def _drop_other_stages(model: torch.nn.Module, stage: torch.nn.Module) -> None:
    """Free the modules of ``model`` that this rank's pipeline ``stage`` does not hold, or every
    rank would keep the whole model: blocks not in the stage become Identity, other top-level
    modules None."""
    kept = {id(m) for m in stage.modules()}
    for name in ("layers", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for i, block in enumerate(blocks):
                if id(block) not in kept:
                    blocks[i] = torch.nn.Identity()
    for name, child in list(model.named_children()):
        if name not in ("layers", "blocks") and id(child) not in kept and any(True for _ in child.parameters()):
            setattr(model, name, None)
