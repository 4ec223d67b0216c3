"""Neighbour lists for atomistic models: O(N) cell list with periodic boundaries, pure torch.

Edges are directed pairs (src j, dst i) with an integer image shift S so that the edge vector is
``x[j] - x[i] + S @ cell`` (cell rows are the lattice vectors a, b, c, as in ASE). Both (i, j, S)
and (j, i, -S) are listed. Positions need not be wrapped into the cell; shifts are relative to
the positions given, so they stay valid while atoms move continuously (Verlet-list reuse).

Cell list: fractional coordinates are binned with bins at least ``cutoff`` thick (perpendicular
to each cell face), so every pair within the cutoff lies in the same or an adjacent bin; atoms are
sorted by bin and each atom checks the 27 neighbouring bins through a padded [bins, M] table, in
atom chunks to bound memory. Everything is tensor code: no Python loop over atoms or edges.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

_OFFSETS_27 = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.long)


def cell_heights(cell_33: Tensor) -> Tensor:
    """Perpendicular widths h_a = V / |b x c| (and cyclic) of a cell; [3]."""
    a, b, c = cell_33.unbind(0)
    vol = torch.abs(torch.dot(a, torch.linalg.cross(b, c)))
    areas = torch.stack([torch.linalg.vector_norm(torch.linalg.cross(b, c)),
                         torch.linalg.vector_norm(torch.linalg.cross(c, a)),
                         torch.linalg.vector_norm(torch.linalg.cross(a, b))])
    return vol / areas


def check_cell(cell_33: Tensor | None, pbc_3: Tensor | None, cutoff: float) -> None:
    """Raise ValueError unless cutoff <= half of every periodic cell height (minimum image)."""
    if cell_33 is None or pbc_3 is None or not bool(pbc_3.any()):
        return
    if cell_33.shape != (3, 3):
        raise ValueError(f"cell has shape {tuple(cell_33.shape)}; expected (3, 3)")
    if abs(float(torch.linalg.det(cell_33.double()))) < 1e-9:
        raise ValueError(f"cell={cell_33.tolist()} is singular; expected three independent "
                         "lattice vectors for a periodic system")
    h = cell_heights(cell_33.double())
    for ax in range(3):
        if bool(pbc_3[ax]) and cutoff > 0.5 * float(h[ax]):
            raise ValueError(
                f"cutoff (+ skin) = {cutoff:.4g} A is larger than half the periodic cell along "
                f"axis {ax} (cell height {float(h[ax]):.4g} A); expected cutoff <= "
                f"{0.5 * float(h[ax]):.4g} A. Use a larger cell (ase Atoms.repeat) or a smaller "
                "cutoff.")


def vesin_available() -> bool:
    try:
        import vesin  # noqa: F401
    except ImportError:
        return False
    return True


def _vesin_list(pos_N3: Tensor, cutoff: float, cell_33: Tensor | None,
                pbc_3: Tensor | None) -> tuple[Tensor, Tensor]:
    import numpy as np
    import vesin

    periodic = cell_33 is not None
    box = cell_33.detach().double().cpu().numpy() if periodic else np.zeros((3, 3))
    flags = [bool(v) for v in pbc_3.tolist()] if periodic else False
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, S = nl.compute(pos_N3.detach().double().cpu().numpy(), box, flags, "ijS")
    # vesin: vector = x[j] - x[i] + S @ box; ours: edge (src j, dst i), same vector.
    edge_index = torch.stack([torch.as_tensor(j.astype(np.int64)), torch.as_tensor(i.astype(np.int64))])
    return (edge_index.to(pos_N3.device),
            torch.as_tensor(S, dtype=pos_N3.dtype).reshape(-1, 3).to(pos_N3.device))


def neighbor_list(pos_N3: Tensor, cutoff: float, cell_33: Tensor | None = None,
                  pbc_3: Tensor | None = None, batch_N: Tensor | None = None,
                  chunk_size: int = 2048, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """All directed pairs within ``cutoff`` (no self pairs at zero shift).

    Args:
        pos_N3: positions (Angstrom).
        cutoff: radius (Angstrom).
        cell_33: lattice vectors as rows (one cell for all atoms); None = open boundaries.
        pbc_3: periodic flag per axis (bool [3]); None = all periodic if a cell is given.
        batch_N: graph index per atom; pairs never cross graphs (open boundaries only).
        chunk_size: atoms processed together (bounds memory at chunk * 27 * M candidates).
        backend: "torch" (this cell list), "vesin" (the vesin library, CPU; 15-20x faster on
            1k-10k-atom water boxes, see docs/forcefield.md) or "auto" (vesin when installed, the
            positions are on the CPU and there is a single graph; else torch).

    Returns:
        edge_index_2E (src j, dst i), shifts_E3 (integer image shifts, same dtype as pos).
    """
    device, N = pos_N3.device, pos_N3.shape[0]
    if pos_N3.ndim != 2 or pos_N3.shape[1] != 3:
        raise ValueError(f"pos has shape {tuple(pos_N3.shape)}; expected (N, 3)")
    if not cutoff > 0:
        raise ValueError(f"cutoff={cutoff}; expected > 0")
    if N == 0:
        return (torch.zeros(2, 0, dtype=torch.long, device=device),
                pos_N3.new_zeros(0, 3))
    if backend not in ("auto", "torch", "vesin"):
        raise ValueError(f"neighbor_list: backend={backend!r}; expected 'auto', 'torch' or 'vesin'")
    periodic = cell_33 is not None and (pbc_3 is None or bool(torch.as_tensor(pbc_3).any()))
    single = batch_N is None or int(batch_N.max()) == 0
    if backend == "vesin" and not (single and vesin_available()):
        raise ValueError("neighbor_list: backend='vesin' needs the vesin package and a single "
                         f"graph (vesin installed: {vesin_available()}, single graph: {single})")
    use_vesin = backend == "vesin" or (backend == "auto" and single and pos_N3.device.type == "cpu"
                                       and vesin_available())
    if periodic:
        if batch_N is not None and int(batch_N.max()) > 0:
            raise ValueError("neighbor_list: a periodic cell with several graphs in batch_N is "
                             "not supported; build one list per periodic system")
        pbc_3 = (torch.ones(3, dtype=torch.bool, device=device) if pbc_3 is None
                 else torch.as_tensor(pbc_3, dtype=torch.bool, device=device))
        check_cell(cell_33, pbc_3, cutoff)
        cell = cell_33.to(device=device, dtype=torch.float64)
    else:
        pbc_3 = torch.zeros(3, dtype=torch.bool, device=device)
        cell = torch.eye(3, dtype=torch.float64, device=device)
    if use_vesin:
        return _vesin_list(pos_N3, cutoff, cell if periodic else None, pbc_3 if periodic else None)
    pos = pos_N3.detach().to(torch.float64)
    frac = pos @ torch.linalg.inv(cell)  # [N, 3]
    wrap = torch.where(pbc_3, torch.floor(frac), torch.zeros_like(frac))
    frac = frac - wrap
    lo = torch.where(pbc_3, torch.zeros(3, dtype=frac.dtype, device=device), frac.amin(0))
    hi = torch.where(pbc_3, torch.ones(3, dtype=frac.dtype, device=device), frac.amax(0))
    h = cell_heights(cell)
    if batch_N is not None and int(batch_N.max()) > 0:
        # Separate graphs: offset each graph far apart along x so no bin pairs them.
        span = float((hi[0] - lo[0]) * h[0]) + 2.0 * cutoff + 1.0
        frac = frac.clone()
        frac[:, 0] = frac[:, 0] + batch_N.to(frac.dtype) * span
        hi = hi.clone()
        hi[0] = frac[:, 0].max()
    extent = (hi - lo) * h  # Angstrom, perpendicular
    n_bins = torch.clamp(torch.floor(extent / cutoff), min=1).long()
    # Sparse open systems: cap bins so the table stays O(N).
    cap = max(1, int(round(2 * N ** (1 / 3))) + 1)
    n_bins = torch.where(pbc_3, n_bins, n_bins.clamp(max=cap))
    nb = n_bins.tolist()
    width = torch.where(n_bins > 0, (hi - lo) / n_bins, torch.ones_like(hi))
    width = torch.where(width > 0, width, torch.ones_like(width))
    b3 = torch.floor((frac - lo) / width).long()
    b3 = torch.minimum(torch.maximum(b3, torch.zeros_like(b3)), n_bins - 1)
    strides = torch.tensor([nb[1] * nb[2], nb[2], 1], device=device)
    bin_N = (b3 * strides).sum(-1)
    num_bins = nb[0] * nb[1] * nb[2]

    order = torch.argsort(bin_N, stable=True)
    counts = torch.bincount(bin_N, minlength=num_bins)
    M = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(N, device=device) - start[bin_N[order]]
    table = torch.full((num_bins, M), -1, dtype=torch.long, device=device)
    table[bin_N[order], rank] = order

    offsets = _OFFSETS_27.to(device)
    cart_frac = frac @ cell  # wrapped Cartesian positions
    src_all, dst_all, shift_all = [], [], []
    for c0 in range(0, N, chunk_size):
        i = torch.arange(c0, min(N, c0 + chunk_size), device=device)
        nbr3 = b3[i].unsqueeze(1) + offsets  # [C, 27, 3]
        img = torch.where(pbc_3, torch.div(nbr3, n_bins, rounding_mode="floor"),
                          torch.zeros_like(nbr3))
        inside = torch.where(pbc_3, torch.ones_like(nbr3, dtype=torch.bool),
                             (nbr3 >= 0) & (nbr3 < n_bins)).all(-1)  # [C, 27]
        # Distinct integer bins map to distinct (bin, image) pairs, so even with fewer than 3
        # bins along a periodic axis no pair is listed twice.
        nbr_bin = (torch.remainder(nbr3, n_bins) * strides).sum(-1)  # [C, 27]
        keep = inside
        j = table[nbr_bin]  # [C, 27, M]
        valid = keep.unsqueeze(-1) & (j >= 0)
        jj = j.clamp(min=0)
        vec = (cart_frac[jj] + (img.to(cell.dtype) @ cell).unsqueeze(2)
               - cart_frac[i].view(-1, 1, 1, 3))
        d2 = (vec * vec).sum(-1)
        self_pair = (jj == i.view(-1, 1, 1)) & (img == 0).all(-1).unsqueeze(-1)
        valid = valid & (d2 < cutoff * cutoff) & ~self_pair
        ci, cb, cm = valid.nonzero(as_tuple=True)
        dst = i[ci]
        src = jj[ci, cb, cm]
        s = img[ci, cb]
        src_all.append(src)
        dst_all.append(dst)
        # shift relative to the unwrapped input positions
        shift_all.append(s.to(torch.float64) - wrap[src] + wrap[dst])
    edge_index = torch.stack([torch.cat(src_all), torch.cat(dst_all)])
    shifts = torch.cat(shift_all)
    if not periodic:
        shifts = torch.zeros_like(shifts)
    return edge_index, shifts.to(pos_N3.dtype)


def edge_vectors(pos_N3: Tensor, edge_index_2E: Tensor, shifts_E3: Tensor | None = None,
                 cell_33: Tensor | None = None) -> Tensor:
    """x[src] - x[dst] + shift @ cell; [E, 3] (differentiable in pos and cell)."""
    vec = pos_N3[edge_index_2E[0]] - pos_N3[edge_index_2E[1]]
    if shifts_E3 is not None and cell_33 is not None:
        vec = vec + shifts_E3.to(pos_N3.dtype) @ cell_33.to(pos_N3.dtype)
    return vec
