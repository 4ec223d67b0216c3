"""Pipeline parallelism for any model that follows a small protocol, with
``torch.distributed.pipelining`` (GPipe and 1F1B).

Follows Huang et al. 2019 ("GPipe": all microbatch forwards, then all backwards) and Narayanan
et al. 2019 ("PipeDream" 1F1B: after warm-up each stage alternates one forward and one backward,
so at most ``pp`` microbatches' activations are alive per stage instead of all of them). The
schedules are PyTorch's ``ScheduleGPipe`` / ``Schedule1F1B``; this module only cuts the model
into stages and supplies an exact loss.

The protocol (embed -> ordered blocks -> head/loss), what a model provides:

* ``model.pipeline_blocks() -> int``: how many blocks it has (stages are cut between blocks);
* ``model.pipeline_stage(block_ids: range, is_first, is_last) -> nn.Module``: a module holding
  (sharing, not copying) the embedding if first, those blocks, the head if last, under the whole
  model's parameter names (so a distributed checkpoint written under one pipeline layout loads
  under another). The stage module has:

  * ``forward(x)``: the model's inputs (first stage) or the previous stage's activations ->
    activations (the last stage's go to the loss);
  * ``loss_sum(out, targets) -> (sum, count, ...)``: summed loss of the last stage's output;
  * ``fixed_batch(inputs, targets, batch_size, seq_len) -> (inputs, targets)``: the batch put
    in the fixed shape every step must have (padding that adds nothing to the loss; a language
    model also shifts its labels here), and ``count(targets)``: how many targets it counts.

Exactness: each microbatch's loss is its *summed* loss divided by the count of the whole batch,
and the schedule's own gradient scaling (by ``1 / n_microbatches``) is off, so the accumulated
gradients are those of the whole batch's mean loss even when microbatches hold different numbers
of counted targets.

Shapes: a pipeline stage allocates its receive buffers from the first step's shapes, so every
step must have the same shape: ``fixed_batch`` pads to the ``batch_size`` and ``seq_len`` given
at build time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe


SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Blocks of each stage: contiguous, as even as possible, earlier stages one more if uneven
    (the last stage also runs the output head and the loss)."""
    if pp < 1:
        raise ValueError(f"pipeline: pp={pp}; expected >= 1")
    if num_layers < pp:
        raise ValueError(f"pipeline: the model has {num_layers} blocks, fewer than pp={pp}; "
                         f"every pipeline stage needs at least one layer")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        stop = start + base + (s < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


class Pipeline:
    """One pipeline stage of a model on this rank and the schedule that drives it.

    Build with ``build_pipeline``; call ``step(inputs, targets)`` on every rank of the pipeline
    (each rank passes the same whole batch), then the optimizer on ``module.parameters()``;
    ``evaluate`` runs forward only. The schedule runs the stages and the loss in the calling
    thread, so mixed precision is ``with torch.autocast(...): pipeline.step(...)``, as without
    pipelining.
    """

    def __init__(self, module: nn.Module, stage: PipelineStage, schedule, seq_len: int,
                 batch_size: int, n_microbatches: int):
        self.module, self.stage, self.schedule = module, stage, schedule
        self.seq_len, self.batch_size, self.n_microbatches = seq_len, batch_size, n_microbatches

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    def _inputs(self, what: str, inputs: torch.Tensor, targets: torch.Tensor):
        """``(inputs, targets)`` in the fixed ``[batch_size, seq_len, ...]`` shape (the stage's
        ``fixed_batch``), on the stage's device."""
        b = inputs.shape[0]
        if b > self.batch_size:
            raise ValueError(f"pipeline {what}: batch size {b} exceeds batch_size="
                             f"{self.batch_size} given to build_pipeline (stages' buffers are "
                             f"fixed)")
        if inputs.dim() > 1 and inputs.shape[1] > self.seq_len:
            raise ValueError(f"pipeline {what}: sequence length {inputs.shape[1]} exceeds seq_len="
                             f"{self.seq_len} given to build_pipeline (stages' buffers are fixed)")
        inputs, targets = self.module.fixed_batch(inputs, targets, self.batch_size, self.seq_len)
        return inputs.to(self.stage.device), targets.to(self.stage.device)

    def _run(self, run, ids, targets, num_tokens) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        run(*((ids,) if self.module.is_first else ()), target=targets if self.is_last else None,
            losses=losses, return_outputs=False, loss_kwargs={"num_tokens": num_tokens})
        return losses

    def step(self, inputs: torch.Tensor, targets: torch.Tensor,
             num_tokens: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate in
        ``module``'s parameters. Returns the batch's loss (summed loss / ``num_tokens``) on the
        last stage and None on the others.

        ``inputs``, ``targets``: the model's batch (``B <= batch_size``, ``S <= seq_len``; for a
        language model ``[B, S]`` token ids and labels, ``-100`` = ignored). ``num_tokens``: the
        count the summed loss is divided by (default: this batch's counted targets, giving the
        mean loss); pass a global count, scaled as the data parallelism in use requires, when
        batches are split over data-parallel ranks.
        """
        ids, targets = self._inputs("step", inputs, targets)
        if num_tokens is None:
            num_tokens = self.module.count(targets)
        num_tokens = torch.as_tensor(num_tokens).clamp_min(1)  # all ignored: loss 0, not 0/0
        losses = self._run(self.schedule.step, ids, targets, num_tokens)
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor):
        """Forward only: ``(summed loss, count of counted targets)`` of the batch on the last
        stage, None on the others (same shapes as ``step``)."""
        ids, targets = self._inputs("evaluate", inputs, targets)
        losses = self._run(self.schedule.eval, ids, targets, torch.ones(()))
        if not self.is_last:
            return None
        return torch.stack(losses).sum(), self.module.count(targets)


def build_pipeline(model: nn.Module, pp_mesh: DeviceMesh, *, batch_size: int, seq_len: int,
                   n_microbatches: int, schedule: str = "1f1b",
                   device: torch.device | str | None = None,
                   parallelize_stage: Callable[[nn.Module], object] | None = None) -> Pipeline:
    """Cut ``model`` into ``pp_mesh.size()`` stages and return this rank's stage and schedule.

    ``pp_mesh``: 1-D pipeline mesh; the rank's position in it is its stage index.
    ``batch_size``, ``seq_len``: the fixed ``[B, S]`` of every step (shorter sequences are padded).
    ``n_microbatches``: must divide ``batch_size``; ``schedule``: ``"gpipe"`` or ``"1f1b"``.
    ``device``: where the stage runs (default: the mesh's device type; the current CUDA device
    on GPUs). ``parallelize_stage``: called on this rank's stage module before the pipeline stage
    is built, to apply tensor parallelism and/or FSDP to it (in that order), e.g.
    ``lambda m: apply_fsdp(apply_tensor_parallel(m, tp_mesh), dp_mesh)``.
    The returned stage module shares parameters with ``model``: only its parameters are used on
    this rank (give them to the optimizer; the rest of ``model`` may be freed). A ``model`` built
    on the meta device leaves the stage there: make it real before the first step with
    ``module.to_empty(device=...)`` and ``models.genslm.init_parameters(module, seed)``.
    """
    if pp_mesh.ndim != 1:
        raise ValueError(f"build_pipeline: pp_mesh has {pp_mesh.ndim} dims "
                         f"{pp_mesh.mesh_dim_names}; expected a 1-D pipeline mesh")
    if schedule not in SCHEDULES:
        raise ValueError(f"build_pipeline: schedule={schedule!r}; expected one of "
                         f"{sorted(SCHEDULES)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"build_pipeline: batch_size={batch_size}, seq_len={seq_len}; "
                         f"expected >= 1")
    if n_microbatches < 1 or batch_size % n_microbatches:
        raise ValueError(f"build_pipeline: n_microbatches={n_microbatches} does not divide "
                         f"batch_size={batch_size}; microbatches must be equal (fixed stage "
                         f"buffers)")
    pp, stage_index = pp_mesh.size(), pp_mesh.get_local_rank()
    for name in ("pipeline_blocks", "pipeline_stage"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"build_pipeline: {type(model).__name__} has no {name}(); a model is "
                            "pipelined through the protocol in ds4sci.parallel.pipeline")
    ranges = stage_layer_ranges(model.pipeline_blocks(), pp)
    if device is None:
        device = (torch.device(pp_mesh.device_type, torch.cuda.current_device())
                  if pp_mesh.device_type == "cuda" else torch.device(pp_mesh.device_type))
    module = model.pipeline_stage(ranges[stage_index], is_first=stage_index == 0,
                                  is_last=stage_index == pp - 1)
    if not any(p.is_meta for p in module.parameters()):
        module = module.to(device)
    if parallelize_stage is not None:
        parallelize_stage(module)
    stage = PipelineStage(module, stage_index, pp, torch.device(device), group=pp_mesh.get_group())

    def loss_fn(hidden_BSE, targets_BS, num_tokens):
        loss_sum = module.loss_sum(hidden_BSE, targets_BS)[0]
        return loss_sum / num_tokens

    # scale_grads=False: the loss already carries the whole batch's normalisation (see module doc).
    sched = SCHEDULES[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                scale_grads=False)
    return Pipeline(module, stage, sched, seq_len, batch_size, n_microbatches)
