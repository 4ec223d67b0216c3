"""ViSNet energy/forces/stress: finite differences, symmetries, loss helpers, init."""

import math

import pytest
import torch

from ds4sci.data.molecules import collate, default_dataset
from ds4sci.models.visnet import (ViSNet, ViSNetConfig, energy_force_loss_sum,
                                  energy_force_metric_sums, energy_forces, finish_metrics, preset)
from ds4sci.ops.neighbors import neighbor_list

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


CFG = ViSNetConfig(lmax=2, vecnorm_type="max_min", trainable_vecnorm=True, vertex=True,
                   num_heads=2, num_layers=2, hidden_channels=16, num_rbf=8, cutoff=3.0)


def _model(cfg=CFG, seed=0):
    m = ViSNet(cfg).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases so no term vanishes by symmetry of the init
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _mol(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, 9, (n,), generator=g),
            torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.1)


def _energy(m, z, pos):
    return energy_forces(m, z, pos, forces=False).energy.sum()


def test_forces_equal_central_differences():
    m = _model()
    z, pos = _mol()
    f = energy_forces(m, z, pos).forces
    h = 1e-5
    fd = torch.zeros_like(pos)
    for i in range(0, pos.shape[0], 2):  # every other atom keeps the test fast
        for k in range(3):
            p, q = pos.clone(), pos.clone()
            p[i, k] += h
            q[i, k] -= h
            fd[i, k] = -(_energy(m, z, p) - _energy(m, z, q)) / (2 * h)
    # the graph is fixed for small steps only if no pair sits at the cutoff; checked here
    sel = slice(0, None, 2)
    assert (f[sel] - fd[sel]).abs().max() < 1e-7 * max(1.0, float(f.abs().max()))
    assert float(f.abs().max()) > 1e-3  # not trivially zero


def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


def test_rotation_translation_permutation():
    m = _model()
    z, pos = _mol(9)
    out = energy_forces(m, z, pos)
    R = _rotation(5)
    out_r = energy_forces(m, z, pos @ R.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(out_r.energy, out.energy, atol=1e-10, rtol=0)
    assert torch.allclose(out_r.forces, out.forces @ R.T, atol=1e-10, rtol=0)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    out_p = energy_forces(m, z[perm], pos[perm])
    assert torch.allclose(out_p.energy, out.energy, atol=1e-10, rtol=0)
    assert torch.allclose(out_p.forces, out.forces[perm], atol=1e-10, rtol=0)


def test_batch_equals_separate_molecules():
    m = _model()
    (z1, p1), (z2, p2) = _mol(5, 1), _mol(8, 2)
    both = energy_forces(m, torch.cat([z1, z2]), torch.cat([p1, p2 + 0.1]),
                         torch.tensor([0] * 5 + [1] * 8), 2)
    a, b = energy_forces(m, z1, p1), energy_forces(m, z2, p2 + 0.1)
    assert torch.allclose(both.energy, torch.cat([a.energy, b.energy]), atol=1e-12)
    assert torch.allclose(both.forces, torch.cat([a.forces, b.forces]), atol=1e-12)


def test_stress_equals_strain_derivative():
    m = _model(CFG.replace(cutoff=2.6))
    cell = torch.tensor([[6.0, 0.0, 0.0], [1.0, 5.8, 0.0], [0.5, -0.7, 6.2]], dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    pos = torch.rand(10, 3, generator=g, dtype=torch.float64) @ cell
    z = torch.randint(1, 9, (10,), generator=g)
    pbc = torch.tensor([True] * 3)

    def energy(eps):
        c = cell @ (torch.eye(3, dtype=torch.float64) + eps)
        p = pos @ (torch.eye(3, dtype=torch.float64) + eps)
        ei, sh = neighbor_list(p, 2.6, c, pbc)
        return energy_forces(m, z, p, edge_index_2E=ei, shifts_E3=sh, cell_B33=c[None],
                             forces=False).energy.sum()

    ei, sh = neighbor_list(pos, 2.6, cell, pbc)
    out = energy_forces(m, z, pos, edge_index_2E=ei, shifts_E3=sh, cell_B33=cell[None], stress=True)
    vol = float(torch.linalg.det(cell))
    h = 1e-5
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            e = torch.zeros(3, 3, dtype=torch.float64)
            e[a, b] = h
            fd[a, b] = (energy(e) - energy(-e)) / (2 * h) / vol
    assert (out.stress[0] - fd).abs().max() < 1e-7
    assert float(out.stress.abs().max()) > 1e-4


def test_loss_and_metrics_on_embedded_data():
    ds = default_dataset()
    cfg = preset("visnet-tiny").replace(mean=float(ds.energy.mean()))
    m = ViSNet(cfg)
    m.reset_parameters(torch.Generator().manual_seed(0))
    batch = collate([ds[i] for i in range(3)]).to(dtype=torch.float32)
    m.train()
    loss, count = energy_force_loss_sum(m, batch, 1.0, 10.0)
    assert count == 3 and math.isfinite(float(loss.detach()))
    loss.backward()  # force term is differentiable in the weights (create_graph in training)
    assert m.layers[0].q_proj.weight.grad.abs().sum() > 0
    m.eval()
    metrics = finish_metrics(energy_force_metric_sums(m, batch))
    assert set(metrics) == {"energy_mae_per_atom", "force_mae", "force_rmse"}
    assert metrics["force_rmse"] >= metrics["force_mae"] > 0


def test_reset_parameters_deterministic_and_errors():
    a, b = ViSNet(CFG), ViSNet(CFG)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    with pytest.raises(ValueError, match="hidden_channels=10 is not divisible by num_heads=4"):
        ViSNetConfig(hidden_channels=10, num_heads=4)
    with pytest.raises(ValueError, match="lmax=3"):
        ViSNetConfig(lmax=3)


def test_activation_checkpointing_gives_identical_forces():
    m = _model()
    z, pos = _mol(9)
    ref = energy_forces(m, z, pos)
    m.cfg = CFG.replace(activation_checkpointing=True)
    out = energy_forces(m, z, pos)
    assert torch.equal(out.energy, ref.energy) and torch.allclose(out.forces, ref.forces, atol=1e-13)


def test_edge_chunking_matches_unchunked():
    m = _model()
    z, pos = _mol(9)
    ref = energy_forces(m, z, pos)
    m.set_edge_chunk_size(7)  # several chunks, last one partial; embedding stage and layers
    assert m.cfg.edge_chunk_size == 7 and all(la.edge_chunk_size == 7 for la in m.layers)
    out = energy_forces(m, z, pos)
    assert torch.allclose(out.energy, ref.energy, atol=1e-12, rtol=0)
    assert torch.allclose(out.forces, ref.forces, atol=1e-12, rtol=0)
    m.cfg = m.cfg.replace(activation_checkpointing=True)  # both memory options together
    out = energy_forces(m, z, pos)
    assert torch.allclose(out.forces, ref.forces, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="edge_chunk_size=0"):
        CFG.replace(edge_chunk_size=0)
