"""Distributed GenSLM training (``ds4sci.train.distributed``) against one process.

Each case runs the real trainer for a few steps on 2 or 4 gloo ranks under one parallel layout
and compares with the same config in one process: the loss of every step, the gradient norm,
the validation perplexity and the final parameters. Records are cropped to 37 tokens, which no
sequence-parallel degree here divides (padding path). Then: resume under another layout, config
mismatch across ranks, and a failing rank ending a ``torchrun`` job with an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dist_helpers import assert_same_run, run_distributed, run_summary
from ds4sci.train.checkpoint import latest_checkpoint
from ds4sci.train.config import load_config
from ds4sci.train.trainer import Trainer

pytestmark = pytest.mark.distributed

STEPS = 3
SMALL = ["data.n_simulated=9", "data.max_tokens=37", "optim.warmup_steps=1", "progress=false",
         "eval_every=0", "checkpoint_every=0", "model.hidden_size=32", "model.intermediate_size=64",
         "model.loss_chunk_size=16", "optim.batch_size=4", f"optim.max_steps={STEPS}"]
def _cfg(out, *extra):
    return load_config(None, [f"out_dir={out}", *SMALL, *extra])


def _summary(trainer, rows):
    return run_summary(trainer, rows, "val_perplexity")


_REFERENCE = {}


def _reference(tmp_path, *extra):
    key = tuple(extra)
    if key not in _REFERENCE:
        trainer = Trainer(_cfg(tmp_path / f"single{len(_REFERENCE)}", *extra))
        _REFERENCE[key] = _summary(trainer, trainer.fit()["rows"])
    return _REFERENCE[key]


def _distributed(rank, world_size, out, extra):
    from ds4sci.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(out, *extra))
    if trainer.pipeline is not None:  # a stage's rank holds only that stage's parameters
        stage = {id(p) for p in trainer.pipeline.module.parameters()}
        assert {id(p) for p in trainer.model.parameters()} <= stage
        assert trainer.model.num_parameters() < trainer.num_parameters
    return _summary(trainer, trainer.fit()["rows"])


def _compare(ref, results):
    assert_same_run(ref, results, "val_perplexity")


LAYOUTS_2 = [
    pytest.param(["parallel.dp=2"], id="fsdp2"),
    pytest.param(["parallel.dp=2", "parallel.fsdp_cpu_offload=true"], id="fsdp2-offload"),
    pytest.param(["parallel.sp=2"], id="ulysses2"),
    # 3 heads on 2 ranks: an uneven head split in the all-to-all
    pytest.param(["parallel.sp=2", "model.num_attention_heads=3", "model.hidden_size=24"], id="ulysses2-uneven-heads"),
    pytest.param(["parallel.sp=2", "parallel.sp_mode=ring"], id="ring2-zigzag"),
    pytest.param(["parallel.sp=2", "parallel.sp_mode=ring", "parallel.sp_layout=contiguous"], id="ring2-contiguous"),
    pytest.param(["parallel.tp=2"], id="tp2"),
    pytest.param(["parallel.pp=2", "parallel.pp_schedule=1f1b"], id="pp2-1f1b"),
    pytest.param(["parallel.pp=2", "parallel.pp_schedule=gpipe", "optim.grad_accum=2"], id="pp2-gpipe-accum"),
]

LAYOUTS_4 = [
    pytest.param(["parallel.sp=4", "parallel.sp_mode=hybrid", "parallel.sp_ulysses=2"], id="hybrid-2x2"),
    pytest.param(["parallel.dp=2", "parallel.sp=2"], id="dp2-ulysses2"),
    pytest.param(["parallel.tp=2", "parallel.sp=2", "parallel.sp_mode=ring"], id="tp2-ring2"),
    pytest.param(["parallel.tp=2", "parallel.dp=2"], id="tp2-fsdp2"),
    pytest.param(["parallel.pp=2", "parallel.dp=2"], id="pp2-fsdp2"),
    pytest.param(["parallel.pp=2", "parallel.tp=2"], id="pp2-tp2"),
]

# Settings that change the single-process run too (the model), as opposed to the layout.
_MODEL_KEYS = ("model.", "optim.")


def _model_settings(layout):
    return [x for x in layout if x.startswith(_MODEL_KEYS)]


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_ranks_equal_one_process(tmp_path, layout):
    ref = _reference(tmp_path, *_model_settings(layout))
    _compare(ref, run_distributed(_distributed, 2, str(tmp_path / "dist"), layout))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_ranks_equal_one_process(tmp_path, layout):
    ref = _reference(tmp_path, *_model_settings(layout))
    _compare(ref, run_distributed(_distributed, 4, str(tmp_path / "dist"), layout))


def _initial_state(rank, world_size, out, extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ds4sci.models.genslm import GenSLM
    from ds4sci.train import distributed
    from ds4sci.train.distributed import DistributedTrainer

    def whole_model_built(model, seed=None):  # what every rank did before meta-device init
        raise AssertionError("a rank built and initialised a whole GenSLM")

    def initialised(module, seed):
        raise AssertionError("weights initialised although init_from sets them")

    GenSLM.reset_parameters = whole_model_built  # this forked rank's copies only
    if any(x.startswith("init_from=") for x in extra):
        distributed.init_parameters = initialised
    trainer = DistributedTrainer(_cfg(out, *extra))
    module = trainer._trained_module()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())
    assert not any(p.is_meta for p in trainer.model.parameters())
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return held, {k: v.clone() for k, v in full.items()}


def _initial_state_scattered(rank, world_size, out, extra):
    """As on torch < 2.7: shards scattered from rank 0's copy, not sliced by each rank."""
    from ds4sci.parallel import init

    init._SLICE_LOCALLY = {}
    return _initial_state(rank, world_size, out, extra)


@pytest.mark.parametrize("world_size, layout, fn", [
    pytest.param(2, ["parallel.dp=2"], _initial_state, id="fsdp2"),
    pytest.param(2, ["parallel.dp=2"], _initial_state_scattered, id="fsdp2-scattered"),
    pytest.param(2, ["parallel.pp=2"], _initial_state, id="pp2"),
    pytest.param(4, ["parallel.tp=2", "parallel.dp=2"], _initial_state, id="tp2-fsdp2", marks=pytest.mark.slow),
])
def test_ranks_hold_only_their_shards_of_the_one_process_weights(tmp_path, world_size, layout, fn):
    """The model is built on the meta device and each rank fills its own shards: the weights,
    gathered, are exactly those one process starts from, and no rank holds much more than
    its share (whole-model copies would be world_size times that)."""
    single = Trainer(_cfg(tmp_path / "single"))
    ref = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    results = run_distributed(fn, world_size, str(tmp_path / "dist"), layout)
    weights = {}
    for held, full in results:
        assert held < 0.6 * single.num_parameters * 2 / world_size, (held, single.num_parameters)
        weights.update(full)
    assert weights.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("layout, source", [
    pytest.param(["parallel.dp=2"], "distributed checkpoint", id="fsdp2-from-dcp"),
    pytest.param(["parallel.tp=2"], "hf", id="tp2-from-hf"),
    pytest.param(["parallel.pp=2"], "run", id="pp2-from-run"),
])
def test_init_from_loads_the_weights_into_every_layout(tmp_path, layout, source):
    """Each source kind (a single-process run, a distributed checkpoint, a saved HF model)
    under a layout: the gathered weights equal the source's exactly."""
    base = tmp_path / "base"
    if source == "distributed checkpoint":
        _, summary = run_distributed(_train_until, 2, str(base), ["parallel.dp=2", "optim.max_steps=1"],
                                     1, False)[0]
        trained = summary["params"]
        base = latest_checkpoint(base)
        assert (base / "dcp").is_dir()
    else:
        trainer = Trainer(_cfg(base, "optim.max_steps=1"))
        trainer.fit()
        trained = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if source == "hf":
            pytest.importorskip("transformers")
            from ds4sci.models.genslm import to_hf

            base = tmp_path / "hf"  # read without building a model
            to_hf(trainer.model).save_pretrained(base)
    results = run_distributed(_initial_state, 2, str(tmp_path / "dist"), [*layout, f"init_from={base}"])
    weights = {}
    for _, full in results:
        weights.update(full)
    assert weights.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.sp=2"], id="ulysses2"),
    pytest.param(["parallel.pp=2"], id="pp2"),
    pytest.param(["parallel.dp=2", "parallel.fsdp_param_dtype=bf16"], id="fsdp2-bf16-params"),
])
def test_bf16_autocast_under_a_layout_trains_like_one_process(tmp_path, layout):
    """bf16 autocast reaches the sharded computation (not silently fp32): the curve matches one
    bf16 process to bf16 accuracy and differs from the fp32 curve."""
    ref = _reference(tmp_path, "precision=bf16")
    fp32 = _reference(tmp_path)
    results = run_distributed(_distributed, 2, str(tmp_path / "dist"), [*layout, "precision=bf16"])
    assert results[0]["loss"] == pytest.approx(ref["loss"], rel=5e-3)
    assert results[0]["loss"] != pytest.approx(fp32["loss"], rel=1e-6)


def _train_until(rank, world_size, out, extra, until, resume):
    from ds4sci.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(out, *extra), resume=resume)
    start = trainer.step
    rows = trainer.fit(until_step=until)["rows"]
    return start, _summary(trainer, rows)


def test_resume_under_another_layout(tmp_path):
    """One run, each step under another layout, resuming from the previous one's checkpoint:
    one process -> FSDP (dp=2) -> pipeline (pp=2) -> ring SP (sp=2) -> tensor parallel (tp=2)
    -> one process. Its loss curve and final parameters equal an uninterrupted single-process run."""
    steps = ["optim.max_steps=6", "checkpoint_every=1"]
    ref = _reference(tmp_path, *steps)
    out = tmp_path / "dist"
    Trainer(_cfg(out, *steps)).fit(until_step=1)  # a single-process (safetensors) checkpoint
    chain = [["parallel.dp=2"], ["parallel.pp=2"], ["parallel.sp=2", "parallel.sp_mode=ring"], ["parallel.tp=2"]]
    for until, layout in enumerate(chain, start=2):
        start, _ = run_distributed(_train_until, 2, str(out), [*steps, *layout], until, True)[0]
        assert start == until - 1
        assert (latest_checkpoint(out) / "dcp" / ".metadata").is_file()
    last = Trainer(_cfg(out, *steps), resume=True)  # one process resumes a distributed checkpoint
    assert last.step == 5
    # embed/generate load the full weights of a distributed checkpoint too
    from ds4sci.train.tasks.genslm import load_model

    loaded, _ = load_model(out)
    for name, value in last.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    rows = last.fit()["rows"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    _compare(ref, [_summary(last, rows)])
    # A changed setting is refused, naming it.
    with pytest.raises(Exception, match=r"made with other settings.*optim.lr"):
        run_distributed(_train_until, 2, str(out), [*steps, "parallel.dp=2", "optim.lr=0.5"], None, True)


def _mismatched(rank, world_size, out):
    from ds4sci.train.distributed import DistributedTrainer

    DistributedTrainer(_cfg(out, "parallel.dp=2", f"optim.lr={1e-3 * (rank + 1)}"))


def test_config_mismatch_across_ranks_is_refused(tmp_path):
    with pytest.raises(Exception, match=r"different configs: rank 1 differs from rank 0 in optim.lr \(0.001 vs 0.002\)"):
        run_distributed(_mismatched, 2, str(tmp_path))


def _layout_error(rank, world_size, out, extra):
    from ds4sci.train.distributed import DistributedTrainer

    DistributedTrainer(_cfg(out, *extra))


@pytest.mark.parametrize("extra, message", [
    (["parallel.sp=2", "parallel.pp=2"], "sp\\*tp\\*pp = 2\\*1\\*2 = 4 does not divide world size 2"),
    (["parallel.tp=4"], "tp=4 does not divide world size 2"),
    (["parallel.tp=2", "model.num_attention_heads=1"], "num_attention_heads=1 is not divisible by tp=2"),
    (["parallel.dp=2", "optim.batch_size=3"], "optim.batch_size=3 is not divisible by dp=2"),
    (["parallel.tp=2", "parallel.fsdp_cpu_offload=true"],
     "parallel.fsdp_cpu_offload=true needs FSDP, i.e. dp x sp > 1; layout .* shards nothing"),
])
def test_unsupported_layouts_are_refused_up_front(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        run_distributed(_layout_error, 2, str(tmp_path), extra)


def test_pipeline_with_sequence_parallelism_is_refused():
    from ds4sci.models.genslm.config import preset
    from ds4sci.models.genslm.parallelize import check_layout
    from ds4sci.parallel import ParallelDims

    with pytest.raises(ValueError, match="pipeline x sequence parallelism is not supported: pipeline "
                                         "stages pass whole-sequence activations"):
        check_layout(ParallelDims(world_size=4, sp=2, pp=2), preset("genslm-tiny"))
    with pytest.raises(ValueError, match="num_hidden_layers=2 is less than pp=4"):
        check_layout(ParallelDims(world_size=4, pp=4), preset("genslm-tiny"))


def _torchrun(tmp_path, *args, env=None, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "ds4sci.cli", "train", "genslm", f"--out_dir={tmp_path}", *SMALL, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - start


@pytest.mark.subprocess
def test_torchrun_cli_trains_and_matches_one_process(tmp_path):
    proc, _ = _torchrun(tmp_path / "dist", "--sp=2", "--sp-mode=ring")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout dp=1 sp=2(ring) tp=1 pp=1" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(_reference(tmp_path)["loss"], rel=2e-5)


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_failing_rank_ends_torchrun_job_with_error(tmp_path, kind):
    """Rank 1 raises (or dies without cleanup) at step 2 while rank 0 waits in a collective:
    the job ends with an error well before the collective timeout, no hang."""
    proc, elapsed = _torchrun(tmp_path, "--dp=2", "optim.max_steps=20", "parallel.timeout_s=60",
                              env={"DS4SCI_FAULT": f"1:2:{kind}"})
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    if kind == "raise":
        assert "injected failure on rank 1 at step 2" in proc.stderr
    else:
        assert "exitcode  : 13" in proc.stderr or "exit code 13" in proc.stderr.lower(), proc.stderr[-2000:]


def _stuck_peer(rank, world_size, out):
    import torch.distributed as dist

    if rank == 1:
        time.sleep(30)  # alive but never joins the collective
        return None
    t = torch.ones(1)
    dist.all_reduce(t)
    return t


def test_collective_timeout_bounds_a_stuck_peer(tmp_path):
    """Without torchrun's supervision a rank waiting on a stuck peer raises after the process
    group's timeout (parallel.timeout_s in training) instead of waiting forever."""
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        run_distributed(_stuck_peer, 2, str(tmp_path), pg_timeout=3, timeout=60)
    assert time.monotonic() - start < 25


def test_cli_layout_without_torchrun_says_how_to_launch(tmp_path, capsys, monkeypatch):
    from ds4sci.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "genslm", "--sp=2", "--tp=2", f"--out_dir={tmp_path}"]) == 2
    assert ("the layout dp=-1 sp=2 tp=2 pp=1 needs 4 processes; launch with torchrun "
            "--nproc-per-node=4 -m ds4sci.cli train genslm") in capsys.readouterr().err
