"""GenSLM training: loss falls, resume equals uninterrupted, config and checkpoint errors, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from ds4sci.models.genslm import GenSLM
from ds4sci.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ds4sci.train.config import load_config
from ds4sci.train.trainer import Trainer

SMALL = ["data.n_simulated=9", "data.max_tokens=64", "optim.warmup_steps=2", "progress=false",
         "eval_every=2", "checkpoint_every=2", "model.hidden_size=32", "model.intermediate_size=64"]


def _cfg(tmp_path, *extra):
    return load_config(None, [f"out_dir={tmp_path}", *SMALL, *extra])


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def _no_init(model, seed=None):
    raise AssertionError("weights initialised although a checkpoint or init_from sets them")


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full = Trainer(_cfg(tmp_path / "full", "optim.max_steps=6", "optim.grad_accum=2"))
    full.fit()
    half = Trainer(_cfg(tmp_path / "half", "optim.max_steps=6", "optim.grad_accum=2"))
    half.fit(until_step=3)
    # A row logged after the last checkpoint, as if the run died there: resume drops it.
    with (tmp_path / "half" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    with monkeypatch.context() as patch:
        patch.setattr(GenSLM, "reset_parameters", _no_init)
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
    assert rows[-1]["val_perplexity"] is not None and 1 < rows[-1]["val_perplexity"] < 69


def test_bf16_autocast_trains_like_fp32(tmp_path):
    bf16 = Trainer(_cfg(tmp_path / "bf16", "optim.max_steps=3", "precision=bf16")).fit()["rows"]
    fp32 = Trainer(_cfg(tmp_path / "fp32", "optim.max_steps=3")).fit()["rows"]
    for a, b in zip(bf16, fp32):
        assert abs(a["loss"] - b["loss"]) < 0.05


def test_init_from_a_run_or_an_hf_directory_starts_from_its_weights(tmp_path, monkeypatch):
    """Fine-tuning: a new run starts from another run's (or a saved HF model's) weights, with a
    fresh optimizer and schedule; mismatched models and tokenizers are refused up front."""
    base = Trainer(_cfg(tmp_path / "base", "optim.max_steps=2"))
    base.fit()
    trained = {k: v.clone() for k, v in base.model.state_dict().items()}
    with monkeypatch.context() as patch:
        patch.setattr(GenSLM, "reset_parameters", _no_init)
        tuned = Trainer(_cfg(tmp_path / "tuned", "optim.max_steps=2", f"init_from={tmp_path / 'base'}"))
    assert tuned.step == 0 and not tuned.optimizer.state
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    tuned.fit()
    fresh = Trainer(_cfg(tmp_path / "fresh", "optim.max_steps=2"))
    assert not torch.equal(fresh.model.embed_in.weight, trained["embed_in.weight"])

    pytest.importorskip("transformers")
    from ds4sci.models.genslm import to_hf

    to_hf(base.model).save_pretrained(tmp_path / "hf")
    from_hf = Trainer(_cfg(tmp_path / "from_hf", "optim.max_steps=1", f"init_from={tmp_path / 'hf'}"))
    for name, value in from_hf.model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    from_hf.fit()  # and it trains

    with pytest.raises(ValueError, match=r"its model differs from this run's in \{'hidden_size': \(32, 64\)"):
        Trainer(_cfg(tmp_path / "wide", "model.hidden_size=64", f"init_from={tmp_path / 'base'}"))
    v71 = ["data.vocab=genslm-71", "model.vocab_size=71"]
    Trainer(_cfg(tmp_path / "v71", "optim.max_steps=1", *v71)).fit()
    with pytest.raises(ValueError, match="trained with the tokenizer 'genslm-71', this run uses data.vocab='genslm-69'"):
        Trainer(_cfg(tmp_path / "v69", "model.vocab_size=71",
                     f"init_from={latest_checkpoint(tmp_path / 'v71')}"))  # a checkpoint directory
    with pytest.raises(FileNotFoundError, match="init_from='/nonexistent/run': no such file"):
        Trainer(_cfg(tmp_path / "none", "init_from=/nonexistent/run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"init_from='{tmp_path / 'empty'}': .*not a ds4sci checkpoint"):
        Trainer(_cfg(tmp_path / "from_empty", f"init_from={tmp_path / 'empty'}"))
    # A run started from weights resumes whatever init_from now says (the checkpoint decides).
    Trainer(_cfg(tmp_path / "tuned", "optim.max_steps=3"), resume=True).fit()


def test_fresh_run_refuses_to_clobber_checkpoints(tmp_path):
    Trainer(_cfg(tmp_path, "optim.max_steps=2")).fit()
    with pytest.raises(ValueError, match="already holds a run's checkpoints; pass --resume"):
        Trainer(_cfg(tmp_path, "optim.max_steps=2"))
    trainer = Trainer(_cfg(tmp_path, "optim.max_steps=2", "overwrite=true"))
    assert trainer.step == 0 and latest_checkpoint(tmp_path) is None
    trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_checkpoint_corruption_and_incompatibility_are_refused(tmp_path):
    Trainer(_cfg(tmp_path, "optim.max_steps=2")).fit()
    with pytest.raises(CheckpointError, match=r"made with other settings.*model_changes"):
        Trainer(_cfg(tmp_path, "optim.max_steps=4", "model.num_hidden_layers=3"), resume=True)
    with pytest.raises(CheckpointError, match=r"made with other settings.*optim.lr"):
        Trainer(_cfg(tmp_path, "optim.max_steps=4", "optim.lr=0.5"), resume=True)
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
    (["model.nope=1"], ValueError, r"unknown config key 'model.nope'"),
    (["model.rotary_pct=abc"], ValueError, r"model.rotary_pct"),
    (["data.val_fraction=0.9"], ValueError, r"data.val_fraction=0.9"),
])
def test_bad_config_errors(override, error, match):
    with pytest.raises(error, match=match):
        load_config(None, override)


def test_lr_schedule_warmup_and_cosine_end():
    from ds4sci.train.trainer import lr_factor

    cfg = load_config(None, ["optim.warmup_steps=4", "optim.max_steps=20", "optim.min_lr_ratio=0.1"])
    factors = [lr_factor(s, cfg) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] < 1.0 and all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(0.1)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: genslm-tiny\noptim:\n  lr: 0.01\n  max_steps: 5\nmodel_changes:\n  activation_checkpointing: full\n")
    cfg = load_config(path, ["optim.max_steps=7", "model.layer_norm_eps=1e-6"])
    assert cfg.optim.lr == 0.01 and cfg.optim.max_steps == 7
    assert cfg.model_config().activation_checkpointing == "full"
    assert cfg.model_config().layer_norm_eps == 1e-6  # YAML reads 1e-6 as a string


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


def test_checkpoint_written_before_the_common_trainer_still_resumes(tmp_path):
    """A run checkpointed at step 2 by the code of commit a0157cc (tests/data/genslm_run_a0157cc,
    made by tests/data/make_genslm_run_fixture.sh; its config has no ``task`` key) resumes with
    today's trainer and finishes with the old code's own uninterrupted losses."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "data" / "genslm_run_a0157cc"
    run = tmp_path / "run"
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("expected_metrics.jsonl"))
    overrides = [f"out_dir={run}", "optim.max_steps=4", "checkpoint_every=2", "eval_every=2",
                 "data.n_simulated=4", "data.max_tokens=64", "model.hidden_size=32",
                 "model.num_attention_heads=2", "model.intermediate_size=64", "model.num_hidden_layers=2",
                 "optim.warmup_steps=1", "progress=false"]
    (run / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (fixture / "expected_metrics.jsonl").read_text().splitlines()[:2]))
    trainer = Trainer(load_config(None, overrides), resume=True)
    assert trainer.step == 2
    rows = trainer.fit()["rows"]
    expected = [json.loads(line) for line in (fixture / "expected_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows[2:], expected[2:]):
        # Bit-identical on the machine that made it; other CPUs round matmuls differently.
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
