"""Energy -> forces (and stress) by one reverse-mode pass over a ViSNet (or any energy model).

F = -dE/dx. Stress uses the strain derivative: positions and cell are deformed by (1 + eps),
eps = 0, and sigma = (1/V) dE/d(eps) (ASE's sign convention, eV/A^3). Both gradients come from
the same single ``torch.autograd.grad`` call; at inference it keeps no graph (create_graph=False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ds4sci.ops.neighbors import neighbor_list


@dataclass
class EnergyForces:
    energy: Tensor
    """[B] energy per graph (eV)."""
    forces: Tensor | None
    """[N, 3] forces (eV/A), None if not requested."""
    stress: Tensor | None
    """[B, 3, 3] stress (eV/A^3), None unless requested with a cell."""


def energy_forces(model: torch.nn.Module, z_N: Tensor, pos_N3: Tensor, batch_N: Tensor | None = None,
                  num_graphs: int | None = None, edge_index_2E: Tensor | None = None,
                  shifts_E3: Tensor | None = None, cell_B33: Tensor | None = None,
                  forces: bool = True, stress: bool = False, training: bool = False) -> EnergyForces:
    """Energy, forces and (periodic) stress of a batch of graphs.

    Args:
        model: maps (z, edge_index, edge vectors, batch, num_graphs) to energies [B].
        z_N, pos_N3, batch_N: atomic numbers, positions (A), graph index per atom (None = one graph).
        edge_index_2E, shifts_E3: neighbour list (src j, dst i) and integer image shifts; None =
            open-boundary list built here with the model's cutoff.
        cell_B33: lattice vectors per graph (rows), needed with shifts and for stress.
        training: keep the graph of the force computation (force loss backpropagates).
    """
    if batch_N is None:
        batch_N = torch.zeros(z_N.shape[0], dtype=torch.long, device=z_N.device)
    if num_graphs is None:
        num_graphs = int(batch_N.max()) + 1 if batch_N.numel() else 0
    if edge_index_2E is None:
        edge_index_2E, shifts_E3 = neighbor_list(pos_N3, model.cfg.cutoff, batch_N=batch_N)
        shifts_E3 = None
    if stress and cell_B33 is None:
        raise ValueError("energy_forces: stress=True needs cell_B33 (a periodic cell per graph)")
    need_grad = forces or stress
    with torch.enable_grad() if need_grad else torch.no_grad():
        pos = pos_N3.detach().requires_grad_(forces) if need_grad else pos_N3
        inputs = [pos] if forces else []
        if stress:
            eps_B33 = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device,
                                  requires_grad=True)
            inputs.append(eps_B33)
            pos = pos + (pos.unsqueeze(1) @ eps_B33[batch_N]).squeeze(1)
            cell = cell_B33.to(pos.dtype) + cell_B33.to(pos.dtype) @ eps_B33
        else:
            cell = cell_B33.to(pos.dtype) if cell_B33 is not None else None
        src, dst = edge_index_2E[0], edge_index_2E[1]
        vec_E3 = pos[src] - pos[dst]
        if shifts_E3 is not None and cell is not None:
            vec_E3 = vec_E3 + (shifts_E3.to(pos.dtype).unsqueeze(1) @ cell[batch_N[dst]]).squeeze(1)
        energy_B = model(z_N, edge_index_2E, vec_E3, batch_N, num_graphs)
        if not need_grad:
            return EnergyForces(energy_B, None, None)
        grads = torch.autograd.grad(energy_B.sum(), inputs, create_graph=training)
    f_N3 = -grads[0] if forces else None
    s_B33 = None
    if stress:
        vol_B = torch.linalg.det(cell_B33.to(pos.dtype)).abs()
        s_B33 = grads[-1] / vol_B.view(-1, 1, 1)
    if not training:
        energy_B = energy_B.detach()
    return EnergyForces(energy_B, f_N3, s_B33)
