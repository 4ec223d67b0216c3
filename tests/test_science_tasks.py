"""The science tasks on the common trainer, end to end through the CLI as a user runs them
(tiny settings): ClimaX forecast to NetCDF, force-field training then MD with the trained run,
DiG training then sampling. The models themselves are tested against their references in
test_climax_*, test_visnet_*, test_md_* and test_dig_*."""

from __future__ import annotations

import json

import pytest

from ds4sci.cli import main

pytest.importorskip("ase")
pytest.importorskip("mdtraj")
pytest.importorskip("xarray")


def test_forcefield_trains_then_drives_md_with_absolute_energies(tmp_path, capsys):
    run = tmp_path / "ff"
    assert main(["train", "forcefield", f"--out_dir={run}", "optim.max_steps=3", "eval_every=0",
                 "progress=false", "optim.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "validation: energy MAE" in out and (run / "parity.png").stat().st_size > 0
    result = json.loads((run / "forcefield_eval.json").read_text())
    assert result["force_rmse"] > 0
    md_out = tmp_path / "md"
    assert main(["md", "run", "builtin:ala2", "--model", str(run), "--steps", "4", "--out", str(md_out),
                 "--no-progress", "--no-plot", "--log-every", "2"]) == 0
    rows = [line.split() for line in (md_out / "thermo.log").read_text().splitlines() if not line.startswith("#")]
    assert -1000 < float(rows[0][2]) < -800  # GFN2-xTB energies of alanine dipeptide, about -896 eV
    assert main(["train", "forcefield", f"--out_dir={tmp_path / 'x'}", "--dp=2"]) == 2
    assert "needs 2 processes" in capsys.readouterr().err


def test_dig_trains_then_samples_and_compares_with_md(tmp_path, capsys):
    run = tmp_path / "dig"
    assert main(["train", "dig", f"--out_dir={run}", "optim.max_steps=2", "eval_every=0", "progress=false",
                 "optim.batch_size=8", "data.sample_at_end=8"]) == 0
    assert "JS divergence (phi, psi) vs MD" in capsys.readouterr().out
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(run), "--num-samples", "6", "--steps", "4", "--out", str(samples)]) == 0
    metrics = json.loads((samples / "metrics.json").read_text())
    assert 0 <= metrics["js_divergence_phi_psi_nats"] and (samples / "samples.pdb").is_file()


def test_climax_forecast_writes_netcdf_with_coordinates_and_units(tmp_path, capsys):
    import xarray as xr

    run = tmp_path / "cx"
    small = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.patch_size=10",
             "optim.max_steps=2", "optim.batch_size=4", "eval_every=0", "progress=false"]
    assert main(["train", "climax", f"--out_dir={run}", *small]) == 0
    out = tmp_path / "f.nc"
    assert main(["forecast", "--model", str(run), "--steps", "2", "--out", str(out)]) == 0
    ds = xr.open_dataset(out)
    assert ds["temperature_850"].shape == (1, 2, 60, 120) and ds["temperature_850"].attrs["units"] == "K"
    assert ds["prediction_timedelta"].values[1].astype("timedelta64[h]").astype(int) == 24
    assert main(["forecast", "--model", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_every_task_builds_on_the_meta_device_as_it_does_eagerly():
    """What resume, init_from and distributed runs do (meta -> to_empty -> init_parameters)
    gives the model an eager build gives: no buffer left uninitialised."""
    import torch

    from ds4sci.train.task import get_task, task_names

    for name in task_names():
        task = get_task(name)
        config = task.preset(task.default_model)
        eager = task.build_model(config, seed=3)
        with torch.device("meta"):
            lazy = task.build_model(config)
        lazy.to_empty(device="cpu")
        task.init_parameters(lazy, 3)
        for (n, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items()):
            assert torch.equal(a, b), f"{name}: {n}"
        assert not any(b.is_meta for b in lazy.buffers())
