"""ViSNet force field (Wang et al., Nat. Commun. 2024; AI2BMD's model).

Task-facing surface (for the common trainer):
    ViSNetConfig, preset(name)         typed config; presets "visnet-tiny", "visnet-small"
    ViSNet(cfg)                        energy model; reset_parameters(generator) / initial_value
    energy_forces(model, z, pos, ...)  energies [B], forces [N, 3], stress [B, 3, 3]
    energy_force_loss_sum(model, batch, w_energy, w_forces) -> (sum, count)
    energy_force_metric_sums(model, batch), finish_metrics(sums)
    load_pyg_state_dict(model, sd)     weights from torch_geometric.nn.models.ViSNet
Data: ds4sci.data.molecules (datasets, collate -> MoleculeBatch). MD: ds4sci.md.
"""

from ds4sci.models.visnet.config import PRESETS, ViSNetConfig, preset
from ds4sci.models.visnet.forces import EnergyForces, energy_forces
from ds4sci.models.visnet.interop import config_from_pyg, load_pyg_state_dict, pyg_kwargs
from ds4sci.models.visnet.loss import energy_force_loss_sum, energy_force_metric_sums, finish_metrics
from ds4sci.models.visnet.model import ViSNet

__all__ = ["PRESETS", "ViSNetConfig", "preset", "ViSNet", "EnergyForces", "energy_forces",
           "energy_force_loss_sum", "energy_force_metric_sums", "finish_metrics",
           "load_pyg_state_dict", "config_from_pyg", "pyg_kwargs"]
