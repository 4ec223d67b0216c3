"""Pipeline parallelism for GenSLM with ``torch.distributed.pipelining`` (GPipe and 1F1B).

Follows Huang et al. 2019 ("GPipe": all microbatch forwards, then all backwards) and Narayanan
et al. 2019 ("PipeDream" 1F1B: after warm-up each stage alternates one forward and one backward,
so at most ``pp`` microbatches' activations are alive per stage instead of all of them). The
schedules are PyTorch's ``ScheduleGPipe`` / ``Schedule1F1B``; this module only cuts the model
into stages and supplies an exact loss.

The model is cut by layers: stage 0 holds the token embedding and the first layers, the last
stage the remaining layers, the final norm and the output head (the loss). Stage modules keep
the whole model's parameter names (``layers.5.mlp...``), so a distributed checkpoint written
under one pipeline layout loads under another.

Exactness: each microbatch's loss is its *summed* cross-entropy divided by the token count of the
whole batch, and the schedule's own gradient scaling (by ``1 / n_microbatches``) is off, so the
accumulated gradients are those of the whole batch's mean loss even when microbatches hold
different numbers of non-ignored labels.

Shapes: a pipeline stage allocates its receive buffers from the first step's shapes, so every
step must have the same ``[B, S]``. ``pipeline_step`` right-pads shorter batches to the
``seq_len`` given at build time (padding labels are ignored and causal attention never looks
right, so the loss is unchanged).

Legend: ``B`` batch, ``S`` sequence, ``E`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..models.genslm.model import IGNORE_INDEX, GenSLM, run_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Layers of each stage: contiguous, as even as possible, earlier stages one more if uneven
    (the last stage also runs the output head and the loss)."""
    if pp < 1:
        raise ValueError(f"pipeline: pp={pp}; expected >= 1")
    if num_layers < pp:
        raise ValueError(f"pipeline: num_hidden_layers={num_layers} is less than pp={pp}; "
                         f"every pipeline stage needs at least one layer")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        stop = start + base + (s < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


class GenSLMStage(nn.Module):
    """Layers ``layer_ids`` of a GenSLM; the first stage also embeds the tokens, the last also
    applies the final norm and owns the output head used by ``loss_sum``.

    ``forward``: first stage ``input_ids [B, S]``, later stages ``hidden [B, S, E]`` ->
    ``hidden [B, S, E]`` (final-normed on the last stage).
    """

    # The output head's chunked cross-entropy is GenSLM's own, not a copy.
    loss_sum = GenSLM.loss_sum
    _chunk_loss = GenSLM._chunk_loss

    def __init__(self, model: GenSLM, layer_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self.rotary = model.rotary
        if is_first:
            self.embed_in = model.embed_in
        # Keyed by the whole model's layer index so parameter names match the unsplit model.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if is_last:
            self.final_layer_norm = model.final_layer_norm
            self.embed_out = model.embed_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every stage sees the full (unsharded) sequence, so positions are 0..S-1.
        cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device))
        x = run_layers(self.layers.values(), x, cos, sin, self.config,
                       embed=self.embed_in if self.is_first else None)
        return self.final_layer_norm(x) if self.is_last else x


class Pipeline:
    """One pipeline stage of a GenSLM on this rank and the schedule that drives it.

    Build with ``build_pipeline``; call ``step(input_ids, labels)`` on every rank of the pipeline
    (each rank passes the same whole batch), then the optimizer on ``module.parameters()``;
    ``evaluate`` runs forward only. The schedule runs the stages and the loss in the calling
    thread, so mixed precision is ``with torch.autocast(...): pipeline.step(...)``, as without
    pipelining.
    """

    def __init__(self, module: GenSLMStage, stage: PipelineStage, schedule, seq_len: int,
                 batch_size: int, n_microbatches: int):
        self.module, self.stage, self.schedule = module, stage, schedule
        self.seq_len, self.batch_size, self.n_microbatches = seq_len, batch_size, n_microbatches

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    def _inputs(self, what: str, input_ids: torch.Tensor, labels: torch.Tensor):
        """``(ids, targets)`` shifted and padded to the fixed ``[batch_size, seq_len]``."""
        if input_ids.dim() != 2 or labels.shape != input_ids.shape:
            raise ValueError(f"pipeline {what}: input_ids {tuple(input_ids.shape)} and labels "
                             f"{tuple(labels.shape)}; expected both [B, S]")
        b, s = input_ids.shape
        if b > self.batch_size:
            raise ValueError(f"pipeline {what}: batch size {b} exceeds batch_size="
                             f"{self.batch_size} given to build_pipeline (stages' buffers are "
                             f"fixed)")
        if s > self.seq_len:
            raise ValueError(f"pipeline {what}: sequence length {s} exceeds seq_len={self.seq_len} "
                             f"given to build_pipeline (stages' buffers are fixed)")
        # Shift before padding: token t predicts label t+1, the last real token nothing.
        targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
        # Padding rows and columns have every target ignored: they add nothing to loss or grads.
        ids = input_ids.new_zeros((self.batch_size, self.seq_len))
        padded = targets.new_full((self.batch_size, self.seq_len), IGNORE_INDEX)
        ids[:b, :s], padded[:b, :s] = input_ids, targets
        return ids.to(self.stage.device), padded.to(self.stage.device)

    def _run(self, run, ids, targets, num_tokens) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        run(*((ids,) if self.module.is_first else ()), target=targets if self.is_last else None,
            losses=losses, return_outputs=False, loss_kwargs={"num_tokens": num_tokens})
        return losses

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor,
             num_tokens: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate in
        ``module``'s parameters. Returns the batch's loss (summed cross-entropy / ``num_tokens``)
        on the last stage and None on the others.

        ``input_ids``, ``labels``: ``[B, S]`` with ``B <= batch_size`` and ``S <= seq_len``
        (``-100`` = ignored label). ``num_tokens``: the count the summed loss is divided by
        (default: this batch's non-ignored targets, giving the mean loss); pass a global count,
        scaled as the data parallelism in use requires, when batches are split over
        data-parallel ranks.
        """
        ids, targets = self._inputs("step", input_ids, labels)
        if num_tokens is None:
            num_tokens = (targets != IGNORE_INDEX).sum()
        num_tokens = torch.as_tensor(num_tokens).clamp_min(1)  # all ignored: loss 0, not 0/0
        losses = self._run(self.schedule.step, ids, targets, num_tokens)
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Forward only: ``(summed cross-entropy, count of non-ignored targets)`` of the batch on
        the last stage, None on the others (same shapes as ``step``)."""
        ids, targets = self._inputs("evaluate", input_ids, labels)
        losses = self._run(self.schedule.eval, ids, targets, torch.ones(()))
        if not self.is_last:
            return None
        return torch.stack(losses).sum(), (targets != IGNORE_INDEX).sum()


def build_pipeline(model: GenSLM, pp_mesh: DeviceMesh, *, batch_size: int, seq_len: int,
                   n_microbatches: int, schedule: str = "1f1b",
                   device: torch.device | str | None = None,
                   parallelize_stage: Callable[[GenSLMStage], object] | None = None) -> Pipeline:
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
    ranges = stage_layer_ranges(model.config.num_hidden_layers, pp)
    if device is None:
        device = (torch.device(pp_mesh.device_type, torch.cuda.current_device())
                  if pp_mesh.device_type == "cuda" else torch.device(pp_mesh.device_type))
    module = GenSLMStage(model, ranges[stage_index], is_first=stage_index == 0,
                         is_last=stage_index == pp - 1)
    if not any(p.is_meta for p in module.parameters()):
        module = module.to(device)
    if parallelize_stage is not None:
        parallelize_stage(module)
    stage = PipelineStage(module, stage_index, pp, torch.device(device), group=pp_mesh.get_group())

    def loss_fn(hidden_BSE, targets_BS, num_tokens):
        loss_sum, _, _ = module.loss_sum(hidden_BSE, targets_BS)
        return loss_sum / num_tokens

    # scale_grads=False: the loss already carries the whole batch's normalisation (see module doc).
    sched = SCHEDULES[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                scale_grads=False)
    return Pipeline(module, stage, sched, seq_len, batch_size, n_microbatches)
