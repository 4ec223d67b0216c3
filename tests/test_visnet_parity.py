"""Parity with PyTorch Geometric's ViSNet on shared weights (energies and forces)."""

import pytest
import torch

from ds4sci.models.visnet import ViSNet, ViSNetConfig, energy_forces, load_pyg_state_dict, pyg_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

pyg_visnet = pytest.importorskip("torch_geometric.nn.models.visnet")


def _brute_radius_graph(pos, r, batch=None, loop=False, max_num_neighbors=32, **_):
    # PyG's radius_graph needs pyg-lib/torch_cluster; an exact O(N^2) graph with the same
    # convention (row = source j, col = target i, self loops when loop=True) replaces it.
    n = pos.shape[0]
    batch = torch.zeros(n, dtype=torch.long) if batch is None else batch
    d = torch.cdist(pos, pos)
    adj = (d < r) & (batch[:, None] == batch[None, :])
    if not loop:
        adj.fill_diagonal_(False)
    else:
        adj.fill_diagonal_(True)
    assert int(adj.sum(1).max()) <= max_num_neighbors + int(loop)
    j, i = adj.nonzero(as_tuple=True)
    return torch.stack([j, i])


def _molecules(dtype, n_mol=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [5, 9, 7][:n_mol]
    z = torch.cat([torch.randint(1, 10, (s,), generator=g) for s in sizes])
    pos = torch.cat([torch.randn(s, 3, generator=g, dtype=dtype) * 1.3 for s in sizes])
    batch = torch.cat([torch.full((s,), b) for b, s in enumerate(sizes)])
    return z, pos, batch, len(sizes)


CASES = [
    ViSNetConfig(num_heads=4, num_layers=3, hidden_channels=16, num_rbf=8, cutoff=4.0),
    ViSNetConfig(lmax=2, vecnorm_type="max_min", trainable_vecnorm=True, num_heads=2,
                 num_layers=2, hidden_channels=16, num_rbf=8, cutoff=4.0, reduce_op="add",
                 mean=0.3, std=1.7, atomref=tuple(float(v) for v in range(12))),
    ViSNetConfig(lmax=2, vertex=True, num_heads=4, num_layers=3, hidden_channels=16, num_rbf=8,
                 cutoff=3.5, trainable_rbf=True, reduce_op="mean"),
]


@pytest.mark.parametrize("cfg", CASES, ids=["lmax1", "lmax2-maxmin-atomref", "vertex-mean"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_energy_forces_match_pyg(cfg, dtype, tol, monkeypatch):
    monkeypatch.setattr(pyg_visnet, "radius_graph", _brute_radius_graph)
    torch.manual_seed(0)
    ref = pyg_visnet.ViSNet(**pyg_kwargs(cfg))
    with torch.no_grad():  # non-trivial norms / biases so every term is exercised
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = ref.to(dtype)
    ours = ViSNet(cfg).to(dtype)
    load_pyg_state_dict(ours, ref.state_dict())
    z, pos, batch, B = _molecules(dtype)
    # PyG allocates some zeros (self-loop distances, initial vectors) in the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        e_ref, f_ref = ref(z, pos.clone(), batch)
    finally:
        torch.set_default_dtype(old)
    out = energy_forces(ours, z, pos, batch, B)
    scale_e = e_ref.abs().max().clamp(min=1.0)
    scale_f = f_ref.abs().max().clamp(min=1.0)
    assert (out.energy - e_ref.view(-1)).abs().max() <= tol * scale_e
    assert (out.forces - f_ref).abs().max() <= tol * scale_f
