"""The fused MD path (fixed-shape pair lists, torch.func forces, one compiled step) gives the
same trajectory as the eager path: exactly in float64 uncompiled, to float32 rounding compiled."""

import functools

import numpy as np
import pytest
import torch

ase = pytest.importorskip("ase")
from ase import Atoms  # noqa: E402

from ds4sci.md.integrators import LangevinBAOAB, VelocityVerlet, maxwell_boltzmann  # noqa: E402
from ds4sci.md.potential import Potential  # noqa: E402
from ds4sci.models.visnet import ViSNet, ViSNetConfig, energy_forces  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CFG = ViSNetConfig(num_heads=2, num_layers=2, hidden_channels=16, num_rbf=8, cutoff=3.0)


def _model(cfg=CFG):
    m = ViSNet(cfg)
    m.reset_parameters(torch.Generator().manual_seed(0))
    return m.eval()


def _molecule():
    # one atom 4 A away: some pairs lie beyond r_c = 3 A, so the all-pairs list needs the mask
    return Atoms("CNOCHH", positions=[[0, 0, 0], [1.3, 0.1, 0], [1.9, 1.2, 0.2], [0.4, -1.2, 0.5],
                                      [4.0, 0, 0], [-2, 0.5, 1]])


def _box():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(4) * 1.8] * 3), -1).reshape(-1, 3)[:40]
    return Atoms(numbers=rng.choice([1, 6, 8], 40), positions=grid + rng.normal(0, 0.1, (40, 3)),
                 cell=[7.2] * 3, pbc=True)


def _potential(atoms, model, dtype=torch.float64, compile=False, skin=0.3):
    periodic = bool(atoms.pbc.any())
    return Potential(model, torch.as_tensor(atoms.numbers),
                     torch.as_tensor(np.asarray(atoms.cell)) if periodic else None,
                     torch.as_tensor(atoms.pbc) if periodic else None, skin=skin, dtype=dtype,
                     compile=compile)


def _start(atoms, temperature_K: float):
    """(positions, masses, Maxwell-Boltzmann velocities with seed 0) of ``atoms``."""
    masses = torch.as_tensor(atoms.get_masses())
    v0 = maxwell_boltzmann(masses, temperature_K, torch.Generator().manual_seed(0))
    return torch.as_tensor(atoms.positions), masses, v0


def test_superset_pairs_give_the_cutoff_graph_energy_and_forces():
    """Pairs beyond r_c (all pairs) and padding slots contribute exactly nothing."""
    m = _model().double()
    atoms = _molecule()
    z, pos = torch.as_tensor(atoms.numbers), torch.as_tensor(atoms.positions)
    ref = energy_forces(m, z, pos)  # exact within-cutoff list
    pot = _potential(atoms, m)
    ei, off, _ = pot.static_pairs(pos)
    assert pot.all_pairs and ei.shape[1] == 30 > 2 * 7  # more pairs than the cutoff graph
    e_B, f = pot.forces_on_pairs(pos, ei, off)
    assert abs(float(e_B[0] - ref.energy[0])) < 1e-12
    torch.testing.assert_close(f, ref.forces, atol=1e-12, rtol=0)
    # periodic, padded Verlet list (cutoff + skin, then padding to capacity)
    box = _box()
    pot = _potential(box, m, skin=0.5)
    pos = torch.as_tensor(box.positions)
    ei, off, rebuilt = pot.static_pairs(pos)
    inside = pot.nlist.within_cutoff(pos)[0].shape[1]
    assert rebuilt and pot.capacity == ei.shape[1] > inside  # padded
    assert pot.nlist.edge_index.shape[1] > inside  # the skin's candidates were filtered
    e_B, f = pot.forces_on_pairs(pos, ei, off)
    ref = pot.compute(pos)
    assert abs(float(e_B[0] - ref.energy[0])) < 1e-11
    torch.testing.assert_close(f, ref.forces, atol=1e-11, rtol=0)


@pytest.mark.parametrize("system", ["molecule", "periodic"])
def test_fused_velocity_verlet_equals_eager(system):
    atoms = _molecule() if system == "molecule" else _box()
    m = _model()
    pos, masses, v0 = _start(atoms, 3000.0)
    eager = VelocityVerlet(_potential(atoms, m), pos, masses, v0, 2.0)
    pot = _potential(atoms, m)
    fused = VelocityVerlet(pot, pos, masses, v0, 2.0, fused=True)
    eager.run(30)
    fused.run(30)
    torch.testing.assert_close(fused.x, eager.x, atol=1e-11, rtol=0)
    torch.testing.assert_close(fused.v, eager.v, atol=1e-11, rtol=0)
    assert abs(fused.epot - eager.epot) < 1e-11
    if system == "periodic":  # the padded list was rebuilt on the way, as the eager one
        assert 1 < pot.nlist.builds == eager.pot.nlist.builds


def test_fused_langevin_equals_eager():
    atoms = _box()
    m = _model()
    masses = torch.as_tensor(atoms.get_masses())
    pos = torch.as_tensor(atoms.positions)
    runs = []
    for fused in (False, True):
        integ = LangevinBAOAB(_potential(atoms, m), pos, masses, None, 1.0, 500.0, 0.05,
                              torch.Generator().manual_seed(3), fused=fused)
        integ.run(10)
        runs.append(integ)
    torch.testing.assert_close(runs[1].x, runs[0].x, atol=1e-11, rtol=0)
    torch.testing.assert_close(runs[1].v, runs[0].v, atol=1e-11, rtol=0)


def _assert_same_run(eager, fast, steps: int, f_rel: float, x_abs: float) -> None:
    """Run both integrators ``steps`` steps; forces (relative to the largest), positions and
    energies agree to float32 rounding."""
    eager.run(steps)
    fast.run(steps)
    scale = float(eager.f.abs().max())
    torch.testing.assert_close(fast.f.cpu(), eager.f, atol=f_rel * scale, rtol=0)
    torch.testing.assert_close(fast.x.cpu(), eager.x, atol=x_abs, rtol=0)
    assert abs(fast.epot - eager.epot) < 1e-5 * max(1.0, abs(eager.epot))


def test_compiled_fused_step_equals_eager_to_float32_rounding(monkeypatch):
    """torch.compile of the whole step (the fast path of ``--compile``), float32 model. Traced by
    Dynamo + AOTAutograd as in production; the "aot_eager" backend skips Inductor's C++ build
    (minutes on a cold cache); the bench checks Inductor's forces (``max_force_diff_vs_eager``)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    atoms = _molecule()
    m = _model()
    pos, masses, v0 = _start(atoms, 300.0)
    eager = VelocityVerlet(_potential(atoms, m, torch.float32), pos, masses, v0, 1.0)
    fast = VelocityVerlet(_potential(atoms, m, torch.float32, compile=True), pos, masses, v0, 1.0)
    _assert_same_run(eager, fast, 5, f_rel=2e-5, x_abs=1e-6)


def test_edge_chunks_in_the_eager_path_only():
    """``edge_chunk_size`` chunks the eager evaluations (equal to all edges at once in float64)
    and leaves the fused step's model unchunked; the fused run still equals the eager one."""
    atoms = _box()
    m = _model()
    pos = torch.as_tensor(atoms.positions)
    plain = _potential(atoms, m).compute(pos)
    periodic = dict(cell_33=torch.as_tensor(np.asarray(atoms.cell)), pbc_3=torch.as_tensor(atoms.pbc))
    chunked = Potential(m, torch.as_tensor(atoms.numbers), **periodic, skin=0.3,
                        dtype=torch.float64, edge_chunk_size=37)
    assert chunked.net.cfg.edge_chunk_size == 37 and m.cfg.edge_chunk_size is None
    ev = chunked.compute(pos, stress=True)
    torch.testing.assert_close(ev.forces, plain.forces, atol=1e-11, rtol=0)
    assert abs(float(ev.energy[0] - plain.energy[0])) < 1e-10
    fused_pot = Potential(m, torch.as_tensor(atoms.numbers), **periodic, skin=0.3,
                          dtype=torch.float64, edge_chunk_size=37, compile=True)
    assert fused_pot.model.cfg.edge_chunk_size is None
    assert fused_pot.net.cfg.edge_chunk_size == 37
    with pytest.raises(ValueError, match="edge_chunk_size=0"):
        Potential(m, torch.as_tensor(atoms.numbers), edge_chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_equals_eager():
    """--compile on CUDA replays the whole velocity-Verlet step as a CUDA graph (Inductor's
    cudagraph trees); 30 steps with list rebuilds equal the eager CPU trajectory to float32
    rounding."""
    atoms = _box()
    m = _model()
    pos, masses, v0 = _start(atoms, 3000.0)
    eager = VelocityVerlet(_potential(atoms, m, torch.float32), pos, masses, v0, 1.0)
    pot = Potential(m, torch.as_tensor(atoms.numbers), torch.as_tensor(np.asarray(atoms.cell)),
                    torch.as_tensor(atoms.pbc), skin=0.5, device="cuda", compile=True)
    graphed = VelocityVerlet(pot, pos.cuda(), masses.cuda(), v0.cuda(), 1.0)
    assert graphed._graphed
    _assert_same_run(eager, graphed, 30, f_rel=5e-5, x_abs=1e-5)
    assert pot.nlist.builds > 1


def _cross_cutoff_energies(smooth: bool, biases: bool):
    cfg = CFG.replace(smooth_cutoff=smooth)
    m = _model(cfg).double()
    if biases:  # a trained model's s_proj bias: vector messages survive m = 0 (PyG's jump)
        with torch.no_grad():
            for layer in m.layers:
                layer.s_proj.bias.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    z = torch.tensor([6, 8, 1])
    out = []
    for r in (cfg.cutoff - 1e-7, cfg.cutoff + 1e-7):  # atom 2 crosses r_c of atom 0
        pos = torch.tensor([[0.0, 0, 0], [1.2, 0, 0], [0.0, r, 0]], dtype=torch.float64)
        out.append(float(energy_forces(m, z, pos).energy[0]))
    return out


def test_smooth_cutoff_makes_the_energy_continuous_at_rc():
    lo, hi = _cross_cutoff_energies(smooth=False, biases=True)
    assert abs(hi - lo) > 1e-4  # PyG's equations: a jump when a pair crosses r_c
    lo, hi = _cross_cutoff_energies(smooth=True, biases=True)
    assert abs(hi - lo) < 1e-8
    lo, hi = _cross_cutoff_energies(smooth=False, biases=False)
    assert abs(hi - lo) < 1e-8  # zero biases (initialisation): no jump either way


def test_reference_energies_added_in_float64():
    """atomref and mean (hundreds of eV) are added outside the float32 model."""
    cfg = CFG.replace(atomref=(0.0, -13.6, 0, 0, 0, 0, -1030.5, -1486.0, -2040.8), mean=-3.25)
    m = _model(cfg)
    atoms = _molecule()
    z, pos = torch.as_tensor(atoms.numbers), torch.as_tensor(atoms.positions)
    ref = energy_forces(m.double(), z, pos)  # float64 throughout
    ev = _potential(atoms, m, dtype=torch.float32).compute(pos)
    assert ev.energy.dtype == torch.float64
    assert abs(float(ev.energy[0] - ref.energy[0])) < 1e-5  # float32 rounding of ~1 eV, not ~4000 eV
    torch.testing.assert_close(ev.forces.double(), ref.forces, atol=1e-4, rtol=0)
    assert float(m.atomref.weight[8, 0]) == float(torch.tensor(-2040.8))  # caller's model untouched
