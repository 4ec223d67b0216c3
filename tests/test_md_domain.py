"""Domain decomposition over gloo ranks equals one process (energies and forces)."""

import pytest
import torch

from ds4sci.md.domain import domain_energy_forces
from ds4sci.models.visnet import ViSNet, ViSNetConfig, energy_forces
from ds4sci.ops.neighbors import neighbor_list

from dist_helpers import run_distributed

CFG = ViSNetConfig(lmax=2, num_heads=2, num_layers=2,
                   hidden_channels=16, num_rbf=8, cutoff=2.5, mean=0.7)
CELL = torch.tensor([[15.0, 0.0, 0.0], [1.5, 6.0, 0.0], [-1.0, 0.5, 6.5]], dtype=torch.float64)


def _setup(periodic, vecnorm="none"):
    torch.manual_seed(0)
    m = ViSNet(CFG.replace(vecnorm_type=vecnorm)).double()
    m.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    z = torch.randint(1, 9, (60,), generator=g)
    pos = torch.rand(60, 3, generator=g, dtype=torch.float64) @ CELL
    if not periodic:
        pos = pos * torch.tensor([1.3, 1.0, 1.0], dtype=torch.float64)
    return m, z, pos


def _worker(rank, world, periodic, vecnorm):
    m, z, pos = _setup(periodic, vecnorm)
    return domain_energy_forces(m, z, pos, CELL if periodic else None,
                                torch.tensor([True] * 3) if periodic else None)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("vecnorm,tol", [("none", 1e-10), ("max_min", 1e-8)])
def test_domain_decomposition_equals_one_process(world, periodic, vecnorm, tol):
    # max_min divides by (max - min) of vector norms, which amplifies the summation-order
    # round-off between the local and the global graph; hence its looser fp64 tolerance.
    m, z, pos = _setup(periodic, vecnorm)
    if periodic:
        ei, sh = neighbor_list(pos, CFG.cutoff, CELL, torch.tensor([True] * 3))
        ref = energy_forces(m, z, pos, edge_index_2E=ei, shifts_E3=sh, cell_B33=CELL[None])
    else:
        ref = energy_forces(m, z, pos)
    results = run_distributed(_worker, world, periodic, vecnorm)
    for e, f in results:
        assert abs(float(e) - float(ref.energy)) < tol
        assert (f - ref.forces).abs().max() < tol * max(1.0, float(ref.forces.abs().max()))


def _md_worker(rank, world, out):
    from ase import Atoms

    from ds4sci.md.run import run_md
    m, z, pos = _setup(True)
    atoms = Atoms(numbers=z.numpy(), positions=pos.numpy(), cell=CELL.numpy(), pbc=True)
    summary = run_md(atoms, m, "nve", dt_fs=0.5, temperature_K=300.0, steps=4, out_dir=out,
                     log_every=2, traj_every=2, dtype="float64", plot=False, domain=True)
    return summary


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_domain_md_run_equals_one_process(world, tmp_path):
    """``run_md(domain=True)`` on 2 / 4 gloo ranks writes the one-process trajectory."""
    import ase.io
    from ase import Atoms

    from ds4sci.md.run import run_md
    m, z, pos = _setup(True)
    atoms = Atoms(numbers=z.numpy(), positions=pos.numpy(), cell=CELL.numpy(), pbc=True)
    run_md(atoms, m, "nve", dt_fs=0.5, temperature_K=300.0, steps=4, out_dir=tmp_path / "one",
           log_every=2, traj_every=2, dtype="float64", plot=False)
    results = run_distributed(_md_worker, world, str(tmp_path / "dd"))
    assert results[0]["status"] == "completed" and results[0]["steps_done"] == 4
    assert all(r["steps_done"] == 4 for r in results[1:])
    ref = ase.io.read(tmp_path / "one" / "trajectory.extxyz", ":")
    got = ase.io.read(tmp_path / "dd" / "trajectory.extxyz", ":")
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got):
        assert abs(a.positions - b.positions).max() < 1e-10
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-9
