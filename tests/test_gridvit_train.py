"""The common trainer on a task that is not GenSLM: GridViT (bidirectional patch transformer, no
vocabulary, no causal mask, a regression loss) trained in one process, through the CLI, and
under every parallel layout on gloo, each equal to one process. Its grid of 5 x 3 = 15 patches
is divided by no sequence-parallel degree here, so the end-padding path (key mask through
``valid_length``) is exercised by Ulysses, ring and hybrid alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_helpers import assert_same_run, run_distributed, run_summary
from ds4sci.models.gridvit import GridViT, preset
from ds4sci.models.gridvit.model import patchify, unpatchify
from ds4sci.train.config import load_config
from ds4sci.train.trainer import Trainer

STEPS = 3
SMALL = ["model.height=20", "model.width=12", "model.embed_dim=16", "model.num_heads=4", "model.depth=2",
         "data.n_train=16", "data.n_val=3", "optim.batch_size=4", f"optim.max_steps={STEPS}",
         "optim.warmup_steps=1", "eval_every=0", "checkpoint_every=0", "progress=false"]


def _cfg(out, *extra):
    return load_config(None, [f"out_dir={out}", *SMALL, *extra], task="gridvit")


def _summary(trainer, rows):
    return run_summary(trainer, rows, "val_mse")


_REFERENCE = {}


def _reference(tmp_path, *extra):
    if extra not in _REFERENCE:
        trainer = Trainer(_cfg(tmp_path / f"single{len(_REFERENCE)}", *extra))
        _REFERENCE[extra] = _summary(trainer, trainer.fit()["rows"])
    return _REFERENCE[extra]


def _distributed(rank, world_size, out, extra):
    from ds4sci.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(out, *extra))
    return _summary(trainer, trainer.fit()["rows"])


def _compare(ref, results):
    assert_same_run(ref, results, "val_mse", min_steps=STEPS)


def test_one_process_learns_the_propagator_and_resumes(tmp_path):
    rows = Trainer(_cfg(tmp_path / "a", "optim.max_steps=30", "optim.lr=3e-3", "eval_every=10")).fit()["rows"]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert {"values", "values_per_s", "val_mse"} <= set(rows[-1])
    half = Trainer(_cfg(tmp_path / "b", "optim.max_steps=6", "checkpoint_every=3"))
    half.fit(until_step=3)
    resumed = Trainer(_cfg(tmp_path / "b", "optim.max_steps=6", "checkpoint_every=3"), resume=True)
    assert resumed.step == 3
    full = Trainer(_cfg(tmp_path / "c", "optim.max_steps=6", "checkpoint_every=3")).fit()["rows"]
    assert [r["loss"] for r in resumed.fit()["rows"]] == [r["loss"] for r in full]


def test_patchify_round_trip_and_shapes():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 4), 3, 8, 12, 4), x)
    model = GridViT(preset("gridvit-tiny"), seed=0)
    assert model(torch.randn(2, 2, 16, 16)).shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match=r"GridViT: input has shape \(2, 3, 16, 16\); expected \[B, C=2"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="height=18 is not a multiple of patch_size=4"):
        preset("gridvit-tiny").replace(height=18)


LAYOUTS_2 = [
    pytest.param(["parallel.dp=2"], id="fsdp2"),
    pytest.param(["parallel.sp=2"], id="ulysses2-padded"),
    pytest.param(["parallel.sp=2", "parallel.sp_mode=ring"], id="ring2-padded"),
    pytest.param(["parallel.sp=2", "model.width=16"], id="ulysses2-even"),
    pytest.param(["parallel.tp=2"], id="tp2"),
    pytest.param(["parallel.pp=2"], id="pp2"),
]


def _model_settings(layout):
    return tuple(x for x in layout if x.startswith(("model.", "optim.")))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_ranks_equal_one_process(tmp_path, layout):
    ref = _reference(tmp_path, *_model_settings(layout))
    _compare(ref, run_distributed(_distributed, 2, str(tmp_path / "dist"), layout))


@pytest.mark.distributed
@pytest.mark.slow
def test_hybrid_four_ranks_equal_one_process(tmp_path):
    layout = ["parallel.sp=4", "parallel.sp_mode=hybrid", "parallel.sp_ulysses=2"]
    _compare(_reference(tmp_path), run_distributed(_distributed, 4, str(tmp_path / "dist"), layout))


@pytest.mark.subprocess
@pytest.mark.distributed
def test_cli_trains_gridvit_in_one_process_and_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ds4sci.cli", "train", "gridvit", f"--out_dir={tmp_path / 'one'}",
                          *SMALL], capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "ds4sci train gridvit: gridvit-tiny" in one.stdout and "mean squared error" in one.stdout
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "ds4sci.cli", "train", "gridvit", f"--out_dir={tmp_path / 'dist'}", *SMALL,
                           "--sp=2", "--sp-mode=ring"], capture_output=True, text=True, timeout=180, env=env)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert "layout dp=1 sp=2(ring) tp=1 pp=1" in dist.stdout

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("dist") == pytest.approx(losses("one"), rel=2e-5)
