"""GenSLM training: loss falls, resume equals uninterrupted, config and checkpoint errors, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from ds4sci.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ds4sci.train.config import load_config
from ds4sci.train.trainer import Trainer

SMALL = ["data.n_simulated=5", "data.max_tokens=64", "optim.warmup_steps=2", "progress=false",
         "eval_every=2", "checkpoint_every=2", "model.hidden_size=32", "model.intermediate_size=64"]


def _cfg(tmp_path, *extra):
    return load_config(None, [f"out_dir={tmp_path}", *SMALL, *extra])


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(tmp_path):
    full = Trainer(_cfg(tmp_path / "full", "optim.max_steps=6", "optim.grad_accum=2"))
    full.fit()
    half = Trainer(_cfg(tmp_path / "half", "optim.max_steps=6", "optim.grad_accum=2"))
    half.fit(until_step=3)
    # A row logged after the last checkpoint, as if the run died there: resume drops it.
    with (tmp_path / "half" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    resumed = Trainer(_cfg(tmp_path / "half", "optim.max_steps=6", "optim.grad_accum=2"), resume=True)
    assert resumed.step == 3
    resumed.fit()
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full")
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 0


def test_loss_falls_and_metrics_are_written(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "optim.max_steps=12", "optim.lr=1e-2", "optim.batch_size=2"))
    rows = trainer.fit()["rows"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert {"step", "loss", "lr", "tokens_per_s", "peak_memory_bytes"} <= set(rows[0])
    assert "val_perplexity" in rows[-1]


def test_bf16_autocast_trains(tmp_path):
    rows = Trainer(_cfg(tmp_path, "optim.max_steps=3", "precision=bf16")).fit()["rows"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_checkpoint_corruption_and_incompatibility_are_refused(tmp_path):
    Trainer(_cfg(tmp_path, "optim.max_steps=2")).fit()
    with pytest.raises(CheckpointError, match="was made for another model"):
        Trainer(_cfg(tmp_path, "optim.max_steps=4", "model.num_hidden_layers=3"), resume=True)
    ckpt = latest_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(tmp_path / "empty", "optim.max_steps=2"), resume=True)


@pytest.mark.parametrize("override,error,match", [
    (["optim.lr=-1"], ValueError, r"optim.lr=-1"),
    (["optim.nope=1"], ValueError, r"unknown config key 'optim.nope'"),
    (["precision=fp8"], ValueError, r"precision='fp8'"),
    (["model=genslm-1t"], ValueError, "unknown GenSLM preset"),
    (["model.hidden_size=30"], ValueError, "not divisible"),
    (["data.frame=4"], ValueError, r"data.frame=4"),
    (["lr"], ValueError, r"expected --key=value"),
])
def test_bad_config_errors(override, error, match):
    with pytest.raises(error, match=match):
        load_config(None, override)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: genslm-tiny\noptim:\n  lr: 0.01\n  max_steps: 5\nmodel_changes:\n  activation_checkpointing: full\n")
    cfg = load_config(path, ["optim.max_steps=7"])
    assert cfg.optim.lr == 0.01 and cfg.optim.max_steps == 7
    assert cfg.model_config().activation_checkpointing == "full"


@pytest.mark.subprocess
def test_cli_train_embed_generate(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ds4sci.cli"]
    proc = subprocess.run([*cmd, "train", "genslm", f"--out_dir={run}", *[f"--{o}" for o in SMALL],
                           "--optim.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout and (run / "loss_curve.png").exists()
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">a\nATGGGCTTTAAA\n>b\nATGCCC\n")
    proc = subprocess.run([*cmd, "embed", "--model", str(run), "--fasta", str(fasta), "--out",
                           str(tmp_path / "e.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import numpy as np

    assert np.load(tmp_path / "e.npy").shape == (2, 32)
    assert (tmp_path / "e.names.txt").read_text() == "a\nb\n"
    proc = subprocess.run([*cmd, "generate", "--model", str(run), "--num", "2", "--max-new-tokens", "5",
                           "--out", str(tmp_path / "g.fasta")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "g.fasta").read_text().splitlines()
    assert lines[0].startswith(">generated_0") and len(lines[1]) == 18 and lines[1].startswith("ATG")
    proc = subprocess.run([*cmd, "train", "genslm", f"--out_dir={run}", "--optim.lr=-3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "optim.lr=-3" in proc.stderr
