"""Cell-list neighbour lists against an O(N^2) minimum-image brute force."""

import pytest
import torch

from ds4sci.md.neighbors import VerletList, pad_neighbors, unpad_neighbors
from ds4sci.ops.neighbors import neighbor_list, vesin_available

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def brute_force(pos, cutoff, cell=None):
    """All (j, i, S) with |x_j - x_i + S cell| < cutoff, S in {-1,0,1}^3 (minimum image)."""
    n = pos.shape[0]
    out = set()
    images = [(0, 0, 0)] if cell is None else [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1)
                                               for c in (-1, 0, 1)]
    for s in images:
        shift = torch.zeros(3, dtype=pos.dtype) if cell is None else torch.tensor(s, dtype=pos.dtype) @ cell
        d = torch.linalg.vector_norm(pos[None, :, :] + shift - pos[:, None, :], dim=-1)  # [i, j]
        i, j = (d < cutoff).nonzero(as_tuple=True)
        for ii, jj in zip(i.tolist(), j.tolist()):
            if ii == jj and s == (0, 0, 0):
                continue
            out.add((jj, ii, s))
    return out


def as_set(edge_index, shifts, pos, cell):
    # shifts are relative to the (unwrapped) input positions: compare via the integer shift
    return {(int(j), int(i), tuple(int(round(v)) for v in s.tolist()))
            for j, i, s in zip(edge_index[0], edge_index[1], shifts)}


CELLS = {
    "cubic": torch.eye(3, dtype=torch.float64) * 9.0,
    "orthorhombic": torch.diag(torch.tensor([7.0, 9.5, 12.0], dtype=torch.float64)),
    "triclinic": torch.tensor([[8.0, 0.0, 0.0], [2.5, 7.5, 0.0], [-1.5, 2.0, 8.5]],
                              dtype=torch.float64),
}


BACKENDS = ["torch"] + (["vesin"] if vesin_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("cutoff", [2.5, 3.4])
def test_periodic_matches_brute_force(name, cutoff, backend):
    cell = CELLS[name]
    g = torch.Generator().manual_seed(1)
    frac = torch.rand(60, 3, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some atoms outside
    pos = frac @ cell
    ei, sh = neighbor_list(pos, cutoff, cell, torch.tensor([True, True, True]), backend=backend)
    got = as_set(ei, sh, pos, cell)
    assert len(got) == ei.shape[1]  # no duplicates
    assert got == brute_force(pos, cutoff, cell)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_boundaries_and_batches(backend):
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(50, 3, generator=g, dtype=torch.float64) * 3
    ei, sh = neighbor_list(pos, 2.0, backend=backend)
    assert as_set(ei, sh, pos, None) == brute_force(pos, 2.0)
    batch = torch.tensor([0] * 20 + [1] * 30)
    ei, _ = neighbor_list(pos, 2.0, batch_N=batch)
    want = {e for e in brute_force(pos, 2.0) if batch[e[0]] == batch[e[1]]}
    assert {(int(j), int(i), (0, 0, 0)) for j, i in ei.T} == want


def test_cutoff_larger_than_half_cell_rejected():
    with pytest.raises(ValueError, match="half the periodic cell"):
        neighbor_list(torch.zeros(2, 3), 5.0, torch.eye(3) * 9.0, torch.tensor([True] * 3))


def test_verlet_skin_reuse_is_exact():
    cell = CELLS["triclinic"]
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(40, 3, generator=g, dtype=torch.float64) @ cell
    vl = VerletList(cutoff=2.5, skin=0.8, cell_33=cell, pbc_3=torch.tensor([True] * 3))
    for step in range(12):
        ei, sh = vl.within_cutoff(pos)
        assert as_set(ei, sh, pos, cell) == brute_force(pos, 2.5, cell), step
        pos = pos + 0.07 * torch.randn(pos.shape, generator=g, dtype=torch.float64)
    assert 1 < vl.builds < 12  # reused in between, rebuilt when atoms moved > skin/2


def test_padded_roundtrip():
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(30, 3, generator=g, dtype=torch.float64) * 2
    ei, sh = neighbor_list(pos, 2.5)
    src, shp, mask = pad_neighbors(ei, sh, 30, 40)
    assert src.shape == (30, 40) and mask.sum() == ei.shape[1]
    ei2, sh2 = unpad_neighbors(src, shp, mask)
    assert as_set(ei2, sh2, pos, None) == as_set(ei, sh, pos, None)
    with pytest.raises(ValueError, match="max_neighbors"):
        pad_neighbors(ei, sh, 30, 1)
