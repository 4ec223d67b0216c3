"""Task-facing loss and metrics for force-field training (energy + force matching).

Both return *sums* with a count so a data-parallel trainer can all-reduce them exactly:
mean loss = sum / count over any number of batches and ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ds4sci.models.visnet.forces import energy_forces


def energy_force_loss_sum(model: torch.nn.Module, batch, w_energy: float = 1.0,
                          w_forces: float = 100.0) -> tuple[Tensor, int]:
    """Sum over graphs b of  w_E (dE_b / n_b)^2 + w_F mean_{i in b, k} dF_ik^2; count = graphs.

    ``batch`` is a ``ds4sci.data.molecules.MoleculeBatch`` (z, pos, batch, num_graphs, energy,
    forces, n_atoms). Energy error per atom keeps molecules of different sizes comparable.
    """
    out = energy_forces(model, batch.z, batch.pos, batch.batch, batch.num_graphs,
                        forces=w_forces > 0, training=model.training)
    n_B = batch.n_atoms.to(out.energy.dtype)
    loss_B = w_energy * ((out.energy - batch.energy.to(out.energy.dtype)) / n_B) ** 2
    if w_forces > 0:
        df2_N = ((out.forces - batch.forces.to(out.forces.dtype)) ** 2).sum(-1)
        f_B = df2_N.new_zeros(batch.num_graphs).index_add_(0, batch.batch, df2_N)
        loss_B = loss_B + w_forces * f_B / (3 * n_B)
    return loss_B.sum(), batch.num_graphs


@torch.no_grad()
def energy_force_metric_sums(model: torch.nn.Module, batch) -> dict[str, float]:
    """Sums for validation metrics: energy MAE per atom (eV/atom), force MAE and RMSE (eV/A).

    Reduce with ``finish_metrics`` after summing the dicts over batches/ranks.
    """
    with torch.enable_grad():
        out = energy_forces(model, batch.z, batch.pos, batch.batch, batch.num_graphs)
    n_B = batch.n_atoms.to(out.energy.dtype)
    de = ((out.energy - batch.energy.to(out.energy.dtype)) / n_B).abs()
    df = out.forces - batch.forces.to(out.forces.dtype)
    return {"energy_abs_per_atom": float(de.sum()), "graphs": float(batch.num_graphs),
            "force_abs": float(df.abs().sum()), "force_sq": float((df ** 2).sum()),
            "force_components": float(df.numel())}


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{energy_mae_per_atom, force_mae, force_rmse} from summed ``energy_force_metric_sums``."""
    return {"energy_mae_per_atom": sums["energy_abs_per_atom"] / max(sums["graphs"], 1.0),
            "force_mae": sums["force_abs"] / max(sums["force_components"], 1.0),
            "force_rmse": (sums["force_sq"] / max(sums["force_components"], 1.0)) ** 0.5}
