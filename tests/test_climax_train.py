"""ClimaX on the common trainer: the embedded ERA5 sample trains through the CLI, ends with the
skill table and maps, and every supported layout (FSDP, Ulysses / ring / hybrid over the patch
tokens, padded when the ranks do not divide them, pipeline) equals one process; tensor
parallelism is refused with the reason."""

from __future__ import annotations

import json

import pytest
from dist_helpers import assert_same_run, run_distributed, run_summary

from ds4sci.train.config import load_config
from ds4sci.train.trainer import Trainer

pytest.importorskip("xarray")

STEPS = 3
# 6 x 12 patches of 10 x 10 grid points: 72 tokens (4 ranks: 18 each; 5 do not divide: padding).
SMALL = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.decoder_depth=1",
         "model.patch_size=10", "model.drop_path=0", "model.drop_rate=0", "optim.batch_size=4",
         f"optim.max_steps={STEPS}", "optim.warmup_steps=1", "eval_every=0", "checkpoint_every=0",
         "progress=false"]


def _cfg(out, *extra):
    return load_config(None, [f"out_dir={out}", *SMALL, *extra], task="climax")


_REFERENCE = {}


def _reference(tmp_path):
    if not _REFERENCE:
        trainer = Trainer(_cfg(tmp_path / "single"))
        _REFERENCE["ref"] = run_summary(trainer, trainer.fit()["rows"], "val_lat_mse")
    return _REFERENCE["ref"]


def _distributed(rank, world_size, out, extra):
    from ds4sci.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(out, *extra))
    return run_summary(trainer, trainer.fit()["rows"], "val_lat_mse")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.dp=2"], id="fsdp2"),
    pytest.param(["parallel.sp=2"], id="ulysses2"),
    pytest.param(["parallel.sp=2", "parallel.sp_mode=ring"], id="ring2"),
    pytest.param(["parallel.pp=2"], id="pp2"),
])
def test_two_ranks_equal_one_process(tmp_path, layout):
    assert_same_run(_reference(tmp_path), run_distributed(_distributed, 2, str(tmp_path / "dist"), layout),
                    "val_lat_mse", min_steps=STEPS)


@pytest.mark.distributed
@pytest.mark.slow
def test_hybrid_over_four_ranks_equals_one_process(tmp_path):
    layout = ["parallel.sp=4", "parallel.sp_mode=hybrid", "parallel.sp_ulysses=2"]
    assert_same_run(_reference(tmp_path), run_distributed(_distributed, 4, str(tmp_path / "dist"), layout),
                    "val_lat_mse", min_steps=STEPS)


def _resumed(rank, world_size, out, extra):
    from ds4sci.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(out, *extra), resume=True)
    summary = run_summary(trainer, trainer.fit()["rows"], "val_lat_mse")
    return {**summary, "start": 2, "pos_rows": tuple(trainer.model.pos_embed.to_local().shape)}


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_sharded_position_embedding_over_dp_x_sp_resumes_a_one_process_run(tmp_path):
    """Under SP each rank holds only its patches' rows of pos_embed (a DTensor the data-parallel
    replicas reduce): a one-process checkpoint resumes under dp=2 x sp=2 and the run equals the
    uninterrupted one process; its own checkpoint holds the whole embedding."""
    import torch

    from ds4sci.train.task import get_task

    ref = _reference(tmp_path)
    Trainer(_cfg(tmp_path / "run", "checkpoint_every=2")).fit(until_step=2)
    layout = ["parallel.dp=2", "parallel.sp=2", "checkpoint_every=2"]
    results = run_distributed(_resumed, 4, str(tmp_path / "run"), layout)
    for res in results:
        assert res["pos_rows"] == (1, 36, 16)  # 72 patches over sp=2
        assert res["loss"] == pytest.approx(ref["loss"], rel=2e-5)  # steps 1-2 from the log, 3 resumed
    torch.testing.assert_close(results[0]["params"]["pos_embed"], ref["params"]["pos_embed"], atol=1e-2, rtol=0)
    model, _ = get_task("climax").load_model(tmp_path / "run")
    assert tuple(model.pos_embed.shape) == (1, 72, 16)
    torch.testing.assert_close(model.pos_embed.detach(), results[0]["params"]["pos_embed"], atol=0, rtol=0)


def test_tensor_parallelism_is_refused_with_the_reason():
    from ds4sci.parallel import ParallelDims
    from ds4sci.train.task import get_task

    task = get_task("climax")
    dims = ParallelDims(dp=1, sp=1, tp=2, pp=1, world_size=2)
    with pytest.raises(ValueError, match="ClimaX does not support tensor parallelism"):
        task.check_layout(dims, task.preset("climax-tiny"))


def test_cli_run_ends_with_the_skill_table_and_maps(tmp_path, capsys):
    from ds4sci.cli import main

    assert main(["train", "climax", f"--out_dir={tmp_path}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "validation forecasts at +12 h" in out and "persistence RMSE" in out
    result = json.loads((tmp_path / "climax_eval.json").read_text())
    assert set(result["model"]) == {"geopotential_500", "geopotential_850", "temperature_500", "temperature_850"}
    assert (tmp_path / "climax_maps.png").stat().st_size > 0
    # A wrong grid is refused naming the fix.
    assert main(["train", "climax", f"--out_dir={tmp_path / 'x'}", *SMALL, "model.img_size=[70, 120]"]) == 2
    assert "set --model.img_size=[60, 120]" in capsys.readouterr().err
