"""FSDP2 (ZeRO-3, with and without CPU offload, mixed precision), tensor parallelism, FSDP x TP
(2D) and pipeline parallelism (GPipe, 1F1B) of GenSLM against a single process.

Every case trains a tiny GenSLM for a few AdamW steps on 2 or 4 gloo ranks and compares, at each
step, the global loss and every parameter's full gradient, and at the end every parameter, with
the same steps run in one process (fp32). Batches have awkward lengths (S = 17) and ignored
labels, so the loss normalisation is exercised too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dist_helpers import run_distributed
from ds4sci.models.genslm import GenSLM
from ds4sci.models.genslm.config import preset
from ds4sci.models.genslm.model import IGNORE_INDEX
from ds4sci.parallel.fsdp import apply_fsdp
from ds4sci.parallel.pipeline import build_pipeline, stage_layer_ranges
from ds4sci.models.genslm.parallelize import check_tensor_parallel, tensor_parallel_genslm

pytestmark = pytest.mark.distributed

STEPS = 3
LR = 1e-3
# Some gradients are exactly zero in exact arithmetic (the key bias: softmax ignores a constant
# shift of the scores) and rounding noise (~1e-10) in practice; Adam's default eps=1e-8 would
# turn noise of that size into updates of ~1e-2 * LR that differ between layouts. A larger eps
# keeps the comparison of parameters about the optimizer, not about amplified noise.
EPS = 1e-6
# Parameters after the steps: Adam still scales a ~1e-9 gradient difference on a ~1e-8 gradient
# into a visible update difference, so they are compared at 1% of one step (a wrong gradient
# moves a parameter by ~LR per step).
PARAM_ATOL = 1e-2 * LR
BATCH, SEQ = 4, 17
# Small chunk so the chunked loss crosses sequence and batch boundaries.
CFG = preset("genslm-tiny").replace(loss_chunk_size=11)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 9:] = IGNORE_INDEX  # a right-padded sample: microbatches/shards count differently
    labels[2, :3] = IGNORE_INDEX
    return ids, labels


def _targets(labels):
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def _model(cfg=CFG):
    torch.manual_seed(0)
    return GenSLM(cfg)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads(model):
    """Full (gathered) gradients by name; collective for sharded models."""
    return {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}


def _params(model):
    """Full (gathered) parameters by name; collective for sharded models."""
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _reference(cfg=CFG):
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    losses, grads = [], []
    for step in range(STEPS):
        ids, labels = _batch(step)
        loss = model(ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


_REF = {}


def reference(cfg=CFG):
    if cfg not in _REF:
        _REF[cfg] = _reference(cfg)
    return _REF[cfg]


def _compare(result, ref, *, atol=2e-6, rtol=1e-4, param_atol=PARAM_ATOL):
    losses, grads, params = result
    ref_losses, ref_grads, ref_params = ref
    assert len(losses) == len(ref_losses) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(losses[step], ref_losses[step], atol=atol, rtol=rtol,
                                   msg=lambda m: f"step {step} loss: {m}")
        assert grads[step].keys() == ref_grads[step].keys()
        for name, g in grads[step].items():
            torch.testing.assert_close(g, ref_grads[step][name], atol=atol, rtol=rtol,
                                       msg=lambda m: f"step {step} grad {name}: {m}")
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], atol=param_atol, rtol=rtol,
                                   msg=lambda m: f"param {name} after {STEPS} steps: {m}")


# --------------------------------------------------------------------------------------------
# FSDP, TP and FSDP x TP: one worker, the layout chosen by arguments.


def _train_sharded(rank, world_size, dp, tp, fsdp_kwargs, tp_embeddings=True, cfg=CFG):
    """AdamW steps with batch rows split over ``dp`` and the model over ``tp`` (FSDP over dp
    when ``fsdp_kwargs`` is not None); returns (losses, full grads per step, full params).
    ``cfg`` may differ from ``CFG`` only in ways that keep the numbers (checkpointing, tiling)."""
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = _model(cfg)
    if tp > 1:
        tensor_parallel_genslm(model, mesh["tp"], embeddings=tp_embeddings)
    if fsdp_kwargs is not None:
        apply_fsdp(model, mesh["dp"], **fsdp_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    losses, grads = [], []
    for step in range(STEPS):
        ids, labels = _batch(step)
        rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
        ids, targets = ids[rows], _targets(labels)[rows]
        # Through hidden_states/loss_sum (FSDP forward methods), as sequence-parallel training does.
        loss_sum, count, _ = model.loss_sum(model.hidden_states(ids), targets)
        count = count.clone()
        dist.all_reduce(count, group=dp_group)
        # FSDP averages gradients over dp: each rank's share of the global mean, times dp.
        (loss_sum * dp / count).backward()
        total = loss_sum.detach().clone()
        dist.all_reduce(total, group=dp_group)
        losses.append(total / count)
        grads.append(_grads(model))
        opt.step()
        opt.zero_grad()
    return losses, grads, _params(model)


@pytest.mark.parametrize("world_size, kwargs", [
    (2, dict()),
    (2, dict(cpu_offload=True)),
    (4, dict(reshard_after_forward=False)),
], ids=["dp2", "dp2-offload", "dp4-no-reshard"])
def test_fsdp_matches_single_process(world_size, kwargs):
    results = run_distributed(_train_sharded, world_size, world_size, 1, kwargs)
    for result in results:
        _compare(result, reference())


@pytest.mark.parametrize("checkpointing,head_chunk,segment", [
    ("full", None, 1), ("selective", None, 1), ("full", 1, 1), ("full", 1, 2)])
def test_fsdp_with_activation_checkpointing_matches_single_process(checkpointing, head_chunk, segment):
    """Recomputing a layer's pieces in backward uses its FSDP-gathered parameters (tiled
    attention slices them per head group); a two-layer segment re-gathers both layers."""
    cfg = CFG.replace(activation_checkpointing=checkpointing, mlp_chunk_size=5, attention_head_chunk=head_chunk,
                      checkpoint_num_layers=segment)
    results = run_distributed(_train_sharded, 2, 2, 1, dict(), True, cfg)
    for result in results:
        _compare(result, reference())


def _offload_placement(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    model = apply_fsdp(_model(), mesh, cpu_offload=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    ids, labels = _batch(0)
    model(ids, labels=labels).loss.backward()
    opt.step()
    state = {
        "params": {p.to_local().device.type for p in model.parameters()},
        "grads": {p.grad.to_local().device.type for p in model.parameters()},
        "optim": {v.device.type for s in opt.state.values() for v in s.values()
                  if torch.is_tensor(v)},
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
    }
    return state


def test_fsdp_cpu_offload_keeps_state_on_host_and_sharded():
    """On a CPU-only mesh the offload switch runs FSDP2's CPUOffloadPolicy (unpinned): sharded
    parameters, gradients and optimizer state live in host memory, and each rank holds about
    1/world of the parameters. (Moving them off an accelerator needs one: not testable here.)"""
    results = run_distributed(_offload_placement, 2)
    total = _model().num_parameters()
    for state in results:
        assert state["params"] == state["grads"] == state["optim"] == {"cpu"}
        # Dim-0 shards of odd-sized parameters (69 vocabulary rows) differ by a row per rank.
        assert abs(state["local_numel"] - total / 2) <= 512, (state["local_numel"], total)
    assert sum(s["local_numel"] for s in results) == total


def _train_bf16(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    model = apply_fsdp(_model(), mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    seen = []
    model.layers[0].mlp.dense_4h_to_h.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids, labels = _batch(0)
    out = model(ids, labels=labels)  # every rank the same batch: grads = the batch's grads
    out.loss.backward()
    return out.loss.detach().float(), _grads(model), seen, {p.dtype for p in model.parameters()}


def test_fsdp_mixed_precision_computes_in_bf16_keeps_fp32_master():
    results = run_distributed(_train_bf16, 2)
    ref_losses, ref_grads, _ = reference()
    for loss, grads, seen, param_dtypes in results:
        assert seen == [torch.bfloat16]  # the layer really ran in bf16
        assert param_dtypes == {torch.float32}  # sharded master weights stay fp32
        torch.testing.assert_close(loss, ref_losses[0], atol=2e-2, rtol=2e-2)
        for name, g in grads.items():
            assert g.dtype == torch.float32
            scale = ref_grads[0][name].abs().max().clamp_min(1e-6)
            err = (g - ref_grads[0][name]).abs().max() / scale
            assert err < 0.1, f"{name}: bf16 grad relative error {err:.3g}"


@pytest.mark.parametrize("embeddings", [True, False], ids=["vocab-split", "layers-only"])
def test_tensor_parallel_matches_single_process(embeddings):
    results = run_distributed(_train_sharded, 2, 1, 2, None, embeddings)
    for result in results:
        _compare(result, reference())


def test_tensor_parallel_with_tiled_mlp_and_checkpointing_matches_single_process():
    """The tiled MLP slices the sequence of the column-parallel activations; recomputation in
    backward replays the TP collectives; tiled attention is off under TP (heads are already split)
    and two-layer checkpoint segments replay both layers' collectives."""
    cfg = CFG.replace(activation_checkpointing="full", mlp_chunk_size=5, attention_head_chunk=1,
                      checkpoint_num_layers=2)
    results = run_distributed(_train_sharded, 2, 1, 2, None, True, cfg)
    for result in results:
        _compare(result, reference())


def test_fsdp_x_tensor_parallel_2d_matches_single_process():
    """dp=2 (FSDP) x tp=2 on 4 ranks: TP parameters become 2-D DTensors (sharded on dp and tp)."""
    results = run_distributed(_train_sharded, 4, 2, 2, dict())
    for result in results:
        _compare(result, reference())


def _tp_heads(rank, world_size):
    """The column split of the fused per-head [q|k|v] projection gives each rank whole heads:
    its local rows are exactly heads [rank*H/tp, (rank+1)*H/tp) of the full weight."""
    full = _model()
    model = tensor_parallel_genslm(_model(), init_device_mesh("cpu", (world_size,)))
    h, d = CFG.num_attention_heads, CFG.head_dim
    local = model.layers[0].attention.query_key_value.weight.to_local()
    per_head = full.layers[0].attention.query_key_value.weight.view(h, 3 * d, -1)
    heads = slice(rank * h // world_size, (rank + 1) * h // world_size)
    mine = per_head[heads].reshape(-1, CFG.hidden_size)
    return torch.equal(local, mine)


def test_tensor_parallel_column_split_keeps_heads_whole():
    assert run_distributed(_tp_heads, 2) == [True, True]


# --------------------------------------------------------------------------------------------
# Composed with sequence parallelism: SP (attention cores) -> TP -> FSDP over dp x sp. One
# step of each composition is in test_parallel_sp.py; here several optimizer steps run on the
# 2-D (dp_sp x tp) DTensor parameters.


def _train_with_sp(rank, world_size, dp, sp, tp, sp_mode, layout):
    from ds4sci.parallel.dims import ParallelDims
    from ds4sci.models.genslm.parallelize import shard_batch
    from ds4sci.parallel.sequence import apply_sequence_parallel

    dims = ParallelDims(dp=dp, sp=sp, tp=tp, world_size=world_size, sp_mode=sp_mode)
    mesh = dims.build_mesh("cpu")
    model = apply_sequence_parallel(_model(), sp_mode, sp_group=mesh.group("sp"), layout=layout)
    if tp > 1:
        tensor_parallel_genslm(model, mesh.tp)
    apply_fsdp(model, mesh.dp_sp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    rows = slice(mesh.dp_rank * BATCH // dp, (mesh.dp_rank + 1) * BATCH // dp)
    group = mesh.group("dp_sp")
    losses, grads = [], []
    for step in range(STEPS):
        ids, labels = _batch(step)
        ids, targets, positions = shard_batch(ids[rows], labels[rows], mesh.sp_rank, sp, layout)
        loss_sum, count, _ = model.loss_sum(model.hidden_states(ids, positions=positions), targets)
        count = count.clone()
        dist.all_reduce(count, group=group)
        # FSDP averages gradients over dp x sp.
        (loss_sum * dims.dp_sp / count).backward()
        total = loss_sum.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total / count)
        grads.append(_grads(model))
        opt.step()
        opt.zero_grad()
    return losses, grads, _params(model)


@pytest.mark.parametrize("dp, sp, tp, sp_mode, layout", [
    (1, 2, 2, "ring", "zigzag"),  # sp x tp, FSDP over the sp ranks
], ids=["sp2xtp2-ring-fsdp"])
def test_composed_with_sequence_parallel_matches_single_process(dp, sp, tp, sp_mode, layout):
    results = run_distributed(_train_with_sp, dp * sp * tp, dp, sp, tp, sp_mode, layout)
    for result in results:
        _compare(result, reference())


# --------------------------------------------------------------------------------------------
# Pipeline parallelism.


def _train_pipeline(rank, world_size, cfg, schedule, n_microbatches, seq_len, pp, other=None,
                    accum=1):
    """AdamW steps through a ``pp``-stage pipeline; with ``other`` = "dp" (FSDP over 2 ranks, batch
    rows split) or "tp" (2 ranks) each stage is also sharded; ``accum`` pipeline steps (gradient
    accumulation) per optimizer step. Returns this rank's stage's (losses, full grads per step,
    full params, evaluation, evaluated rows); losses are global (None off the last stage)."""
    if other is None:
        mesh, par, dp = init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",)), None, 1
    else:
        mesh = init_device_mesh("cpu", (pp, world_size // pp), mesh_dim_names=("pp", other))
        par = ((lambda m: apply_fsdp(m, mesh["dp"])) if other == "dp"
               else (lambda m: tensor_parallel_genslm(m, mesh["tp"])))
        dp = mesh["dp"].size() if other == "dp" else 1
    dp_rank = mesh["dp"].get_local_rank() if dp > 1 else 0
    share = BATCH // dp // accum
    pipe = build_pipeline(_model(cfg), mesh["pp"], batch_size=share, seq_len=seq_len,
                          n_microbatches=n_microbatches, schedule=schedule, parallelize_stage=par)
    opt = torch.optim.AdamW(pipe.module.parameters(), lr=LR, eps=EPS)
    losses, grads = [], []
    for step in range(STEPS):
        ids, labels = _batch(step)
        count = (_targets(labels) != IGNORE_INDEX).sum()
        # FSDP averages gradients over dp, so each dp rank normalises by count / dp.
        parts = []
        for a in range(accum):
            rows = slice((dp_rank * accum + a) * share, (dp_rank * accum + a + 1) * share)
            parts.append(pipe.step(ids[rows], labels[rows], num_tokens=count / dp))
        assert all((part is not None) == pipe.is_last for part in parts)
        loss = sum(parts) if pipe.is_last else None
        if loss is not None and dp > 1:
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            loss = loss / dp
        losses.append(loss)
        grads.append(_grads(pipe.module))
        opt.step()
        opt.zero_grad()
    # Forward only, after training, on a smaller batch than the pipeline's (rows padded too).
    ids, labels = _batch(STEPS)
    n_eval = max(pipe.batch_size - 1, 1)
    evaluated = pipe.evaluate(ids[:n_eval, :SEQ - 2], labels[:n_eval, :SEQ - 2])
    assert (evaluated is not None) == pipe.is_last
    return losses, grads, _params(pipe.module), evaluated, n_eval


@pytest.mark.parametrize("world_size, layers, schedule, n_microbatches, seq_len, pp, other, accum", [
    (2, 2, "gpipe", 1, SEQ, 2, None, 2),  # 2 accumulated pipeline steps of 2 rows
    (2, 3, "1f1b", 4, SEQ + 3, 2, None, 1),  # uneven stages (2 + 1 layers); padded length
    (4, 5, "1f1b", 4, SEQ, 4, None, 1),  # 4 stages of 2, 1, 1, 1 layers
    (4, 4, "gpipe", 4, SEQ + 1, 4, None, 1),
    # pp=2 x FSDP dp=2, accumulating 2 steps of 1 row (1F1B needs >= pp microbatches)
    (4, 3, "gpipe", 1, SEQ, 2, "dp", 2),
    (4, 3, "1f1b", 2, SEQ, 2, "dp", 1),
    (4, 3, "1f1b", 2, SEQ + 2, 2, "tp", 1),  # pp=2 x tp=2
], ids=["pp2-gpipe-accum", "pp2-1f1b-uneven-padded", "pp4-1f1b", "pp4-gpipe-padded",
        "pp2xfsdp2-gpipe-accum", "pp2xfsdp2-1f1b", "pp2xtp2-1f1b"])
def test_pipeline_matches_single_process(world_size, layers, schedule, n_microbatches, seq_len,
                                         pp, other, accum):
    cfg = CFG.replace(num_hidden_layers=layers)
    results = run_distributed(_train_pipeline, world_size, cfg, schedule, n_microbatches, seq_len,
                              pp, other, accum)
    ref_losses, ref_grads, ref_params = reference(cfg)
    per_stage = world_size // pp
    seen_params = {}
    trained = _model(cfg)
    trained.load_state_dict(ref_params)
    for rank, (losses, grads, params, evaluated, rows) in enumerate(results):
        if rank // per_stage == pp - 1:
            for step in range(STEPS):
                torch.testing.assert_close(losses[step], ref_losses[step], atol=2e-6, rtol=1e-4)
            ids, labels = _batch(STEPS)
            with torch.no_grad():
                want = trained(ids[:rows, :SEQ - 2], labels=labels[:rows, :SEQ - 2])
            torch.testing.assert_close(evaluated[0] / evaluated[1], want.loss, atol=1e-5, rtol=1e-4)
            assert evaluated[1] == want.num_tokens
        for step in range(STEPS):
            for name, g in grads[step].items():
                torch.testing.assert_close(
                    g, ref_grads[step][name], atol=2e-6, rtol=1e-4,
                    msg=lambda m: f"rank {rank} step {step} grad {name}: {m}")
        for name, p in params.items():
            torch.testing.assert_close(p, ref_params[name], atol=PARAM_ATOL, rtol=1e-4,
                                       msg=lambda m: f"param {name} after {STEPS} steps: {m}")
        if rank % per_stage == 0:
            assert not seen_params.keys() & params.keys(), "a parameter lives on two stages"
            seen_params.update(params)
    # Together the stages hold every parameter of the model, under the model's own names.
    assert seen_params.keys() == ref_params.keys()


def _pipeline_autocast(rank, world_size):
    pipe = build_pipeline(_model(), init_device_mesh("cpu", (world_size,)), batch_size=BATCH,
                          seq_len=SEQ, n_microbatches=2, schedule="1f1b")
    seen = []
    for layer in pipe.module.layers.values():
        layer.mlp.dense_4h_to_h.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pipe.step(*_batch(0))
    return loss, _grads(pipe.module), seen


def test_pipeline_autocast_bf16_matches_single_process_autocast():
    """Autocast around ``step`` reaches the stages and the loss (run in the calling thread)."""
    results = run_distributed(_pipeline_autocast, 2)
    model = _model()
    ids, labels = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
    out.loss.backward()
    for rank, (loss, grads, seen) in enumerate(results):
        assert seen and set(seen) == {torch.bfloat16}  # the layers really ran in bf16
        if rank == 1:
            torch.testing.assert_close(loss, out.loss.detach(), atol=1e-2, rtol=1e-2)
        for name, g in grads.items():
            ref = dict(model.named_parameters())[name].grad
            err = (g - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
            assert err < 0.05, f"{name}: grad relative error {err:.3g} vs autocast single process"


def test_stage_layer_ranges():
    assert stage_layer_ranges(5, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert stage_layer_ranges(8, 2) == [range(0, 4), range(4, 8)]
    with pytest.raises(ValueError, match="the model has 2 blocks, fewer than pp=3"):
        stage_layer_ranges(2, 3)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.


def test_tensor_parallel_rejects_indivisible_heads_and_mlp():
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp=3"):
        check_tensor_parallel(CFG, 3)
    with pytest.raises(ValueError, match="intermediate_size=250 is not divisible by tp=4"):
        check_tensor_parallel(CFG.replace(intermediate_size=250), 4)


def _bad_inputs(rank, world_size):
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    errors = []
    for call in (
        lambda: apply_fsdp(_model(), mesh),
        lambda: apply_fsdp(_model(), mesh["a"], param_dtype=torch.int8),
        lambda: tensor_parallel_genslm(_model(), mesh),
        lambda: build_pipeline(_model(), mesh["a"], batch_size=4, seq_len=8, n_microbatches=3),
        lambda: build_pipeline(_model(), mesh["a"], batch_size=4, seq_len=8, n_microbatches=2,
                               schedule="zb"),
    ):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    try:
        apply_fsdp(torch.nn.Linear(2, 2), mesh["a"])
        errors.append(None)
    except TypeError as e:
        errors.append(str(e))
    pipe = build_pipeline(_model(), mesh["a"], batch_size=4, seq_len=8, n_microbatches=2)
    for ids in (torch.zeros(5, 8, dtype=torch.long), torch.zeros(4, 9, dtype=torch.long)):
        try:
            pipe.step(ids, ids)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_inputs_raise_clear_errors():
    errors = run_distributed(_bad_inputs, 1)[0]
    expected = [
        "apply_fsdp: mesh has 2 dims",
        "apply_fsdp: param_dtype=torch.int8",
        "apply_tensor_parallel: tp_mesh has 2 dims",
        "n_microbatches=3 does not divide batch_size=4",
        "schedule='zb'; expected one of ['1f1b', 'gpipe']",
        "apply_fsdp: Linear has no repeated blocks",
        "batch size 5 exceeds batch_size=4",
        "sequence length 9 exceeds seq_len=8",
    ]
    assert len(errors) == len(expected)
    for err, want in zip(errors, expected):
        assert err is not None and want in err, (err, want)
