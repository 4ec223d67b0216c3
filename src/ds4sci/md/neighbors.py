"""Verlet neighbour lists for MD: cutoff + skin, rebuilt only when an atom moved > skin/2.

Built on the O(N) cell list of ``ds4sci.ops.neighbors``. ``VerletList.update(pos)`` returns the
candidate pairs within cutoff + skin (a superset of the pairs within the cutoff while no atom has
moved more than skin/2 since the last build, so forces are exact) and ``within_cutoff`` selects
the pairs the model sees this step. ``pad_neighbors`` turns a list into static shapes
([N, K] with a mask) for compiled / CUDA-graph execution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ds4sci.ops.neighbors import cell_heights, check_cell, neighbor_list


class VerletList:
    """Cached neighbour list with a skin.

    Args:
        cutoff: model cutoff r_c (A).
        skin: extra radius (A); the list is rebuilt when max displacement > skin / 2.
        cell_33, pbc_3: periodic cell (rows) and flags; None = open boundaries.
        batch_N: graph index per atom (open boundaries), pairs never cross graphs.
    """

    def __init__(self, cutoff: float, skin: float = 1.0, cell_33: Tensor | None = None,
                 pbc_3: Tensor | None = None, batch_N: Tensor | None = None):
        if skin < 0:
            raise ValueError(f"VerletList: skin={skin}; expected >= 0 A")
        self.periodic = cell_33 is not None and pbc_3 is not None and bool(torch.as_tensor(pbc_3).any())
        if self.periodic:
            check_cell(cell_33, torch.as_tensor(pbc_3), cutoff)
            h = cell_heights(cell_33.double())
            room = min(0.5 * float(h[a]) for a in range(3) if bool(pbc_3[a])) - cutoff
            skin = min(skin, max(room, 0.0))  # keep the minimum-image condition with the skin
        self.cutoff, self.skin = float(cutoff), float(skin)
        self.cell_33 = cell_33 if self.periodic else None
        self.pbc_3 = pbc_3 if self.periodic else None
        self.batch_N = batch_N
        self.ref_pos: Tensor | None = None
        self.edge_index: Tensor | None = None
        self.shifts: Tensor | None = None
        self.builds = 0

    def needs_rebuild(self, pos_N3: Tensor) -> bool:
        if self.ref_pos is None or self.ref_pos.shape != pos_N3.shape:
            return True
        disp2 = ((pos_N3.detach() - self.ref_pos) ** 2).sum(-1).max()
        return bool(disp2 > (0.5 * self.skin) ** 2)

    def update(self, pos_N3: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate pairs (src j, dst i) within cutoff + skin and their integer image shifts."""
        if self.needs_rebuild(pos_N3):
            self.edge_index, self.shifts = neighbor_list(
                pos_N3.detach(), self.cutoff + self.skin, self.cell_33, self.pbc_3, self.batch_N)
            self.ref_pos = pos_N3.detach().clone()
            self.builds += 1
        return self.edge_index, self.shifts

    def within_cutoff(self, pos_N3: Tensor) -> tuple[Tensor, Tensor]:
        """Pairs strictly within the cutoff at ``pos`` (exactly what a fresh list would give)."""
        ei, sh = self.update(pos_N3)
        vec = pos_N3.detach()[ei[0]] - pos_N3.detach()[ei[1]]
        if self.periodic:
            vec = vec + sh.to(vec.dtype) @ self.cell_33.to(vec.dtype)
        keep = (vec * vec).sum(-1) < self.cutoff ** 2
        return ei[:, keep], sh[keep]


def pad_neighbors(edge_index_2E: Tensor, shifts_E3: Tensor, num_atoms: int,
                  max_neighbors: int) -> tuple[Tensor, Tensor, Tensor]:
    """Static-shape neighbour table: (src [N, K], shifts [N, K, 3], mask [N, K]) per target atom.

    Unused slots point at the atom itself with mask False. Raises ValueError if an atom has more
    than ``max_neighbors`` neighbours (silently dropping some would change forces).
    """
    dst, src = edge_index_2E[1], edge_index_2E[0]
    counts = torch.bincount(dst, minlength=num_atoms)
    if counts.numel() and int(counts.max()) > max_neighbors:
        raise ValueError(f"pad_neighbors: an atom has {int(counts.max())} neighbours; "
                         f"max_neighbors={max_neighbors} is too small")
    order = torch.argsort(dst, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(dst.numel(), device=dst.device) - start[dst[order]]
    src_NK = torch.arange(num_atoms, device=dst.device).unsqueeze(1).repeat(1, max_neighbors)
    shifts_NK3 = shifts_E3.new_zeros(num_atoms, max_neighbors, 3)
    mask_NK = torch.zeros(num_atoms, max_neighbors, dtype=torch.bool, device=dst.device)
    d = dst[order]
    src_NK[d, slot] = src[order]
    shifts_NK3[d, slot] = shifts_E3[order]
    mask_NK[d, slot] = True
    return src_NK, shifts_NK3, mask_NK


def unpad_neighbors(src_NK: Tensor, shifts_NK3: Tensor, mask_NK: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``pad_neighbors``: (edge_index [2, E], shifts [E, 3])."""
    N, K = src_NK.shape
    dst_NK = torch.arange(N, device=src_NK.device).unsqueeze(1).expand(N, K)
    return torch.stack([src_NK[mask_NK], dst_NK[mask_NK]]), shifts_NK3[mask_NK]
