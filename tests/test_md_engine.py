"""MD engine: NVE drift ~ dt^2, ASE calculator round trip, run_md outputs, bad inputs."""

import numpy as np
import pytest
import torch

ase = pytest.importorskip("ase")
from ase import Atoms  # noqa: E402
from ase.md.verlet import VelocityVerlet as AseVelocityVerlet  # noqa: E402

from ds4sci.md.calculator import DS4SciCalculator  # noqa: E402
from ds4sci.md.cli import main as md_main  # noqa: E402
from ds4sci.md.integrators import MDInstabilityError, VelocityVerlet, maxwell_boltzmann  # noqa: E402
from ds4sci.md.potential import Potential, save_model  # noqa: E402
from ds4sci.md.run import run_md  # noqa: E402
from ds4sci.md.units import FS  # noqa: E402
from ds4sci.models.visnet import ViSNet, ViSNetConfig, energy_forces  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


CFG = ViSNetConfig(num_heads=2, num_layers=2, hidden_channels=16, num_rbf=8, cutoff=5.0,
                   elements=(1, 6, 7, 8))


def _model(cfg=CFG, seed=0):
    m = ViSNet(cfg)
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m.eval()


def _molecule():
    return Atoms("CNOC", positions=[[0, 0, 0], [1.3, 0.1, 0], [1.9, 1.2, 0.2], [0.4, -1.2, 0.5]])


def _energy_error(dt_fs, total_fs=40.0):
    atoms = _molecule()
    m = _model()
    pot = Potential(m, torch.as_tensor(atoms.numbers), dtype=torch.float64)
    masses = torch.as_tensor(atoms.get_masses())
    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(0))
    integ = VelocityVerlet(pot, torch.as_tensor(atoms.positions), masses, v0, dt_fs)
    e0, err = integ.epot + integ.ekin, 0.0
    for _ in range(int(round(total_fs / dt_fs))):
        integ.run(1)
        err = max(err, abs(integ.epot + integ.ekin - e0))
    return err


def test_nve_energy_error_scales_as_dt_squared():
    e1, e2 = _energy_error(1.0), _energy_error(0.5)
    assert e1 > 1e-7  # the dynamics really moved
    assert 2.8 < e1 / e2 < 5.5, (e1, e2)


def test_ase_calculator_round_trip_and_dynamics():
    m = _model()
    atoms = _molecule()
    atoms.calc = DS4SciCalculator(m, dtype="float64")
    ref = energy_forces(m.double(), torch.as_tensor(atoms.numbers),
                        torch.as_tensor(atoms.positions))
    assert abs(atoms.get_potential_energy() - float(ref.energy)) < 1e-10
    np.testing.assert_allclose(atoms.get_forces(), ref.forces.numpy(), atol=1e-10)
    # ASE's own velocity Verlet driven by our calculator == our integrator
    masses = torch.as_tensor(atoms.get_masses())
    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(1))
    atoms.set_velocities(v0.numpy())
    ours = VelocityVerlet(Potential(m, torch.as_tensor(atoms.numbers), dtype=torch.float64),
                          torch.as_tensor(atoms.positions), masses, v0, 0.5)
    AseVelocityVerlet(atoms, timestep=0.5 * FS).run(10)
    ours.run(10)
    np.testing.assert_allclose(atoms.positions, ours.x.numpy(), atol=1e-9)
    np.testing.assert_allclose(atoms.get_velocities(), ours.v.numpy(), atol=1e-9)


def test_ase_stress_matches_numerical():
    m = _model(CFG.replace(cutoff=3.0))
    rng = np.random.default_rng(0)
    cell = np.array([[6.5, 0, 0], [0.8, 6.4, 0], [0.3, -0.5, 6.8]])
    atoms = Atoms(numbers=rng.choice([1, 6, 8], 12), scaled_positions=rng.random((12, 3)),
                  cell=cell, pbc=True)
    atoms.calc = DS4SciCalculator(m, dtype="float64", skin=0.0)
    s = atoms.get_stress()
    from ase.calculators.fd import calculate_numerical_stress
    num = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(s, num, atol=1e-7)
    assert np.abs(s).max() > 1e-4


def _write(path, atoms):
    ase.io.write(str(path), atoms)
    return path


@pytest.mark.parametrize("fmt", ["extxyz", "traj"])
def test_run_md_outputs(tmp_path, fmt):
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, _model())
    s = run_md(_write(tmp_path / "mol.xyz", _molecule()), str(ckpt), "nvt", 0.5, 300.0, 20,
               tmp_path / "out", fmt, traj_every=5, log_every=5)
    assert s["status"] == "completed" and s["steps_done"] == 20
    frames = ase.io.read(s["trajectory"], index=":")
    assert len(frames) == 5 and frames[-1].get_potential_energy() != 0
    log = np.loadtxt(s["thermo_log"])
    assert log.shape == (5, 7) and (tmp_path / "out" / "thermo.png").is_file()


def test_cli_run_and_error_exit(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, _model())
    xyz = _write(tmp_path / "mol.xyz", _molecule())
    assert md_main(["run", str(xyz), "--model", str(ckpt), "--steps", "4", "--out",
                    str(tmp_path / "o"), "--no-progress", "--no-plot", "--threads", "1"]) == 0
    assert md_main(["run", str(tmp_path / "nope.xyz"), "--model", str(ckpt)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_inputs(tmp_path):
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, _model())
    kw = dict(model=str(ckpt), steps=2, out_dir=tmp_path / "o", plot=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_md(tmp_path / "missing.xyz", **kw)
    (tmp_path / "bad.xyz").write_text("3\nnot xyz\nC 0 0\nfoo\n")
    with pytest.raises(ValueError, match="cannot read structure"):
        run_md(tmp_path / "bad.xyz", **kw)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        run_md(_write(tmp_path / "m.xyz", _molecule()), str(tmp_path / "bad.pt"), steps=2,
               out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"'Cl'.*not trained on"):
        run_md(_write(tmp_path / "cl.xyz", Atoms("CCl", positions=[[0, 0, 0], [1.8, 0, 0]])), **kw)
    with pytest.raises(ValueError, match="overlap"):
        run_md(_write(tmp_path / "ov.xyz", Atoms("CO", positions=[[0, 0, 0], [0.05, 0, 0]])), **kw)
    box = Atoms("CO", positions=[[0, 0, 0], [1.2, 0, 0]], cell=[8.0, 8.0, 8.0], pbc=True)
    with pytest.raises(ValueError, match="larger than half the periodic cell"):
        run_md(_write(tmp_path / "box.extxyz", box), **kw)


def test_nan_forces_stop_with_step_and_keep_trajectory(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = Potential.compute

    def flaky(self, pos, stress=False):
        calls["n"] += 1
        ev = orig(self, pos, stress)
        if calls["n"] > 13:  # initial evaluation + 12 steps are fine
            ev.forces = ev.forces * float("nan")
        return ev

    monkeypatch.setattr(Potential, "compute", flaky)
    with pytest.raises(MDInstabilityError, match="step 12") as info:
        run_md(_molecule(), _model(), "nve", 0.5, 300.0, 50, tmp_path / "o", traj_every=5,
               log_every=5, plot=False)
    assert info.value.step == 12
    frames = ase.io.read(tmp_path / "o" / "trajectory.extxyz", index=":")
    assert len(frames) == 3  # steps 0, 5, 10 written and readable
    assert '"status": "unstable"' in (tmp_path / "o" / "summary.json").read_text()


class _FreeParticles:
    """Zero forces: the Langevin thermostat alone sets the temperature."""

    def compute(self, pos, stress=False):
        from ds4sci.md.potential import Evaluation
        return Evaluation(torch.zeros(1, dtype=torch.float64), torch.zeros_like(pos), None)


def test_langevin_baoab_samples_the_bath_temperature():
    from ds4sci.md.integrators import LangevinBAOAB

    n = 400
    masses = torch.full((n,), 12.0, dtype=torch.float64)
    integ = LangevinBAOAB(_FreeParticles(), torch.zeros(n, 3, dtype=torch.float64), masses, None,
                          1.0, 300.0, friction_per_fs=0.2,
                          generator=torch.Generator().manual_seed(0))
    temps = []
    for _ in range(150):
        integ.run(1)
        temps.append(integ.temperature)
    assert abs(np.mean(temps[50:]) / 300.0 - 1.0) < 0.03


def test_training_steps_reduce_force_error():
    from ds4sci.data.molecules import collate, default_dataset
    from ds4sci.models.visnet import (energy_force_loss_sum, energy_force_metric_sums,
                                      finish_metrics, preset)

    ds = default_dataset()
    batch = collate([ds[i] for i in range(0, 800, 200)]).to(dtype=torch.float32)
    m = ViSNet(preset("visnet-tiny").replace(mean=float(ds.energy.mean())))
    m.reset_parameters(torch.Generator().manual_seed(0))
    before = finish_metrics(energy_force_metric_sums(m.eval(), batch))["force_rmse"]
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    m.train()
    for _ in range(6):
        opt.zero_grad()
        loss, count = energy_force_loss_sum(m, batch, 1.0, 10.0)
        (loss / count).backward()
        opt.step()
    after = finish_metrics(energy_force_metric_sums(m.eval(), batch))["force_rmse"]
    assert after < 0.85 * before, (before, after)
