"""What protects a run in the common trainer (issue "What a new user meets first"): stale data,
divergence, concurrent runs, --overwrite, refused resumes, foreign directories, signals, corrupt
checkpoints and clear one-line errors. Every case failed on the trainer before these mechanisms."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds4sci.train.checkpoint import CheckpointError, latest_checkpoint
from ds4sci.train.config import load_config
from ds4sci.train.run_dir import EXIT_STOPPED, RunDirError
from ds4sci.train.tasks.genslm import GenSLMTask
from ds4sci.train.trainer import NonFiniteError, Trainer

SMALL = ["data.n_simulated=5", "data.max_tokens=40", "optim.warmup_steps=1", "progress=false",
         "eval_every=2", "checkpoint_every=2", "model.hidden_size=16", "model.intermediate_size=32",
         "model.num_attention_heads=2", "model.num_hidden_layers=1", "optim.max_steps=4"]
GRID = ["model.embed_dim=16", "model.depth=1", "data.n_train=8", "data.n_val=2", "optim.batch_size=2",
        "progress=false", "eval_every=0"]


def _cfg(out, *extra, task=None):
    return load_config(None, [f"out_dir={out}", *(GRID if task == "gridvit" else SMALL), *extra], task=task)


def _fasta(path: Path, records: dict) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))
    return path


def _strict_json(line):
    def refuse(const):
        raise ValueError(f"bare {const} in metrics.jsonl")
    return json.loads(line, parse_constant=refuse)


# ----- data -------------------------------------------------------------------------------------

def test_token_cache_follows_the_fasta_contents(tmp_path, capsys):
    fasta = _fasta(tmp_path / "g.fa", {f"r{i}": "ATG" * (20 + i) for i in range(6)})
    extra = [f"data.fasta=[{fasta}]", "data.val_fraction=0.2"]
    Trainer(_cfg(tmp_path / "run", *extra, "optim.max_steps=2")).fit()
    # Touched, copied over with the same bytes: not a change (only the contents count).
    os.utime(fasta, ns=(1, 1))
    Trainer(_cfg(tmp_path / "run", *extra), resume=True).fit()
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    # Edited in place (same path, same config): the next run must not train on the old tokens.
    _fasta(fasta, {f"r{i}": "GCC" * (30 + i) for i in range(6)})
    with pytest.raises(ValueError, match=r"g\.fa changed since this run tokenised them"):
        Trainer(_cfg(tmp_path / "run", *extra), resume=True)
    Trainer(_cfg(tmp_path / "run", *extra, "overwrite=true")).fit()
    assert "changed since the tokens" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["tokens"] != meta["tokens"]


def test_resume_uses_the_cached_tokens_when_the_fasta_has_moved(tmp_path):
    fasta = _fasta(tmp_path / "g.fa", {f"r{i}": "ATG" * (20 + i) for i in range(6)})
    extra = [f"data.fasta=[{fasta}]", "data.val_fraction=0.2", "optim.max_steps=4"]
    Trainer(_cfg(tmp_path / "run", *extra)).fit(until_step=2)
    fasta.rename(tmp_path / "moved.fa")
    trainer = Trainer(_cfg(tmp_path / "run", *extra), resume=True)
    assert trainer.step == 2 and trainer.fit()["rows"][-1]["step"] == 4


def test_records_too_short_to_predict_anything_are_refused(tmp_path):
    fasta = _fasta(tmp_path / "g.fa", {"a": "ATG", "b": "AT"})
    with pytest.raises(ValueError, match=r"no training records \(read 2 record\(s\).* skipped as shorter than two tokens"):
        Trainer(_cfg(tmp_path / "run", f"data.fasta=[{fasta}]", "data.val_fraction=0"))


# ----- divergence -------------------------------------------------------------------------------

def _diverging(monkeypatch, at_call: int):
    """The loss becomes NaN from the ``at_call``-th training loss on."""
    calls = {"n": 0}
    original = GenSLMTask.loss_sum

    def loss_sum(self, model, batch):
        total, count = original(self, model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= at_call:
                total = total * float("nan")
        return total, count

    monkeypatch.setattr(GenSLMTask, "loss_sum", loss_sum)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    _diverging(monkeypatch, at_call=3)
    trainer = Trainer(_cfg(tmp_path))
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


def test_on_nonfinite_skip_skips_the_update_and_writes_valid_json(tmp_path, monkeypatch):
    _diverging(monkeypatch, at_call=3)
    rows = Trainer(_cfg(tmp_path, "on_nonfinite=skip")).fit()["rows"]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = _strict_json(line)
        assert row["loss"] is None or row["step"] < 3
    for name, p in torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)["optimizer"]["state"].items():
        assert torch.isfinite(p["exp_avg"]).all(), name  # NaN gradients never reached the optimizer


def test_perplexity_overflow_is_inf_not_a_crash():
    assert GenSLMTask().eval_metrics(1e6, 10.0)["val_perplexity"] == float("inf")


# ----- the run directory ------------------------------------------------------------------------

def test_a_second_run_into_the_same_directory_is_refused_naming_the_first(tmp_path):
    first = Trainer(_cfg(tmp_path))
    with pytest.raises(RunDirError, match=rf"is in use by another run \(pid {os.getpid()} on"):
        Trainer(_cfg(tmp_path), resume=False)
    first.fit()  # finishing releases the directory
    Trainer(_cfg(tmp_path, "optim.max_steps=6"), resume=True).fit()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_really_started(tmp_path):
    Trainer(_cfg(tmp_path)).fit()
    old = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(FileNotFoundError, match="data.fasta"):
        Trainer(_cfg(tmp_path, "overwrite=true", f"data.fasta=[{tmp_path / 'missing.fa'}]"))
    with pytest.raises(ValueError, match="betas"):
        Trainer(load_config(None, [f"out_dir={tmp_path}", *SMALL, "overwrite=true", "optim.betas=[0.9, 1.5]"]))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == old
    new = Trainer(_cfg(tmp_path, "overwrite=true", "seed=1"))
    assert (tmp_path / "checkpoints.replaced").is_dir()  # aside, not deleted, until ...
    new.fit()
    assert not (tmp_path / "checkpoints.replaced").exists()  # ... the new run's first checkpoint


def test_a_refused_resume_touches_nothing(tmp_path):
    Trainer(_cfg(tmp_path)).fit()
    stamp = (tmp_path / "data" / "config.json").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match="other settings"):
        Trainer(_cfg(tmp_path, "optim.lr=0.1", "optim.max_steps=6"), resume=True)
    with pytest.raises(CheckpointError, match=r"at step 4, past optim.max_steps=3"):
        Trainer(_cfg(tmp_path, "optim.max_steps=3"), resume=True)
    assert (tmp_path / "data" / "config.json").stat().st_mtime_ns == stamp


def test_a_directory_of_user_files_is_refused_and_the_config_file_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"is not empty and is not a ds4sci run \(it holds notes.txt\)"):
        Trainer(_cfg(tmp_path))
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        Trainer(_cfg(file))
    run = tmp_path / "run"
    run.mkdir()
    config = run / "config.yaml"
    config.write_text("# my comments\noptim:\n  lr: 0.002\n")
    Trainer(load_config(config, [f"out_dir={run}", *SMALL]), config_path=config).fit()
    assert config.read_text().startswith("# my comments")


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_which(tmp_path, capsys):
    Trainer(_cfg(tmp_path)).fit()
    newest = latest_checkpoint(tmp_path)
    (newest / "model.safetensors").write_bytes(b"garbage")
    trainer = Trainer(_cfg(tmp_path, "optim.max_steps=6"), resume=True)
    err = capsys.readouterr().err
    assert trainer.step == 2
    assert f"skipping {newest.name}" in err and "corrupt" in err and "using step-00000002" in err


@pytest.mark.subprocess
def test_sigterm_finishes_the_step_checkpoints_and_exits_75(tmp_path):
    cmd = [sys.executable, "-m", "ds4sci.cli", "train", "gridvit", f"--out_dir={tmp_path}", *GRID,
           "optim.max_steps=100000", "checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert latest_checkpoint(tmp_path).name == f"step-{step:08d}"
    resumed = Trainer(_cfg(tmp_path, f"optim.max_steps={step + 1}", "checkpoint_every=0", task="gridvit"),
                      resume=True)
    assert resumed.step == step


# ----- one clear line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["optim.lr=.inf"], "optim.lr=inf; expected a finite number > 0"),
    (["optim.min_lr_ratio=1.5"], r"optim.min_lr_ratio=1.5; expected in \[0, 1\]"),
    (["eval_every=-1"], "eval_every=-1; expected >= 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0; expected a finite number >= 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1; expected a finite number >= 0"),
    (["device=tpu"], "device='tpu'; expected cpu, cuda, cuda:N or auto"),
    (["device=mps"], "device='mps'; expected cpu, cuda, cuda:N or auto"),
    (["data.vocab=genslm-71"], r"data.vocab='genslm-71' has 71 tokens but model.vocab_size=69; add --model.vocab_size=71"),
])
def test_values_that_make_no_sense_are_refused_before_any_data(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(None, [f"out_dir={tmp_path / 'run'}", *SMALL, *args]))
    assert not (tmp_path / "run" / "data").exists()


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  betas: [0.9\n")
    with pytest.raises(ValueError, match=r"bad.yaml: line \d+, column \d+: YAML syntax error"):
        load_config(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"bin.yaml is not text"):
        load_config(binary)


def test_disk_full_while_checkpointing_leaves_nothing_half_written(tmp_path, monkeypatch):
    import ds4sci.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    trainer = Trainer(_cfg(tmp_path))
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match=r"No space left on device \(it needs more than .* MiB"):
        trainer.fit()
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from ds4sci.cli import main

    assert main(["train", "genslm", f"--out_dir={tmp_path}", "device=tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ds4sci train: error: device='tpu'")


# ----- the default run's science check ------------------------------------------------------------

def test_lineage_scores_on_hand_made_clusters():
    import numpy as np

    from ds4sci.train.lineages import knn_accuracy, silhouette, simulated_lineages

    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 10 + ["b"] * 10)
    apart = np.concatenate([rng.normal(0, 0.1, (10, 5)) + 3, rng.normal(0, 0.1, (10, 5)) - 3])
    assert knn_accuracy(apart, labels) == 1.0 and silhouette(apart, labels) > 0.8
    mixed = rng.normal(0, 1, (20, 5))
    assert silhouette(mixed, labels) < 0.2
    lineages = simulated_lineages(47, 0)
    assert lineages["sim_00000"] == "sim_00000" and set(lineages.values()) >= {"reference", "sim_00005"}


def test_the_default_corpus_run_ends_with_the_lineage_comparison(tmp_path, capsys):
    from ds4sci.cli import main

    assert main(["train", "genslm", f"--out_dir={tmp_path}", *SMALL, "data.n_simulated=12"]) == 0
    out = capsys.readouterr().out
    assert "lineages (" in out and "vs" in out and "(codon frequencies)" in out
    result = json.loads((tmp_path / "lineages.json").read_text())
    assert 0 <= result["embedding"]["knn1_accuracy"] <= 1 and (tmp_path / "lineages.png").stat().st_size > 0


def test_disk_full_while_tokenising_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    import ds4sci.data.dataset as dataset

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".tokens.tmp"):
            def write(_):
                raise OSError(28, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(dataset, "open", full_open, raising=False)
    with pytest.raises(ValueError, match=r"could not write the token files .* No space left on device"):
        Trainer(_cfg(tmp_path))
    assert not list((tmp_path / "data").glob("*.tmp"))
