"""Domain decomposition over gloo ranks (atoms sharded by slab, halo exchange) equals one
process: energies, forces, and whole MD runs (NVE and Langevin, atoms migrating between slabs)."""

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


# Hot and with a long step, so atoms cross slab boundaries within the run (checked below).
MD_ARGS = dict(dt_fs=2.0, temperature_K=3000.0, steps=12, log_every=4, traj_every=4,
               dtype="float64", plot=False)


def _atoms(periodic):
    from ase import Atoms
    m, z, pos = _setup(periodic)
    return m, Atoms(numbers=z.numpy(), positions=pos.numpy(), cell=CELL.numpy(), pbc=periodic)


def _md_worker(rank, world, out, ensemble, periodic):
    from ds4sci.md.run import run_md
    m, atoms = _atoms(periodic)
    return run_md(atoms, m, ensemble, out_dir=out, domain=True, **MD_ARGS)


@pytest.mark.distributed
@pytest.mark.parametrize("world,ensemble,periodic", [(2, "nve", True), (4, "nve", True),
                                                     (3, "nvt", True), (2, "nve", False)])
def test_domain_md_run_equals_one_process(world, ensemble, periodic, tmp_path):
    """``run_md(domain=True)`` on 2-4 gloo ranks writes the one-process trajectory (positions,
    velocities, energies), with atoms migrating between ranks on the way."""
    import ase.io

    from ds4sci.md.domain import Slabs
    from ds4sci.md.run import run_md
    m, atoms = _atoms(periodic)
    run_md(atoms, m, ensemble, out_dir=tmp_path / "one", **MD_ARGS)
    results = run_distributed(_md_worker, world, str(tmp_path / "dd"), ensemble, periodic)
    assert results[0]["status"] == "completed" and results[0]["steps_done"] == 12
    assert all(r["steps_done"] == 12 for r in results[1:])
    ref = ase.io.read(tmp_path / "one" / "trajectory.extxyz", ":")
    got = ase.io.read(tmp_path / "dd" / "trajectory.extxyz", ":")
    assert len(got) == len(ref) == 4
    for a, b in zip(ref, got):
        assert abs(a.positions - b.positions).max() < 1e-9
        assert abs(a.get_velocities() - b.get_velocities()).max() < 1e-9
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-9
    pos0 = torch.as_tensor(ref[0].positions)
    slabs = Slabs.for_system(pos0, world, CELL if periodic else None)
    moved = slabs.owner(torch.as_tensor(ref[-1].positions)) != slabs.owner(pos0)
    assert int(moved.sum()) > 0  # the run exercised migration


def _unstable_worker(rank, world, out):
    from ds4sci.md.run import run_md
    m, atoms = _atoms(True)
    try:
        run_md(atoms, m, "nve", out_dir=out, domain=True, max_force=1e-3, **MD_ARGS)
    except Exception as e:  # noqa: BLE001 - what each rank raised, for the test
        return type(e).__name__
    return "no error"


@pytest.mark.distributed
def test_domain_instability_stops_every_rank():
    """A force limit exceeded on one rank's atoms stops all ranks with the step (no hang)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        results = run_distributed(_unstable_worker, 2, d)
    # the first forces already exceed the limit: every rank raises at step 0, none waits
    assert results == ["MDInstabilityError", "MDInstabilityError"]
