"""DiG (Distributional Graphormer): equilibrium conformation ensembles by diffusion.

Task-facing surface (for ``ds4sci train dig`` / ``ds4sci sample``):
  * :class:`DiGConfig`, :func:`get_config` (presets ``dig-tiny``, ``dig-protein``)
  * :func:`build_model`, :func:`initial_value` (whole-tensor initial value by parameter name)
  * :func:`denoising_loss_sum` ``(model, batch, generator) -> (sum, count)``
  * :func:`sample` (batched, seeded samplers: ``ancestral`` = DiG's, ``heun`` = fast ODE)
  * data: :func:`ds4sci.data.conformations.alanine_dipeptide_dataset` (indexable, ``collate``)
"""

from .config import PRESETS, DiGConfig, get_config
from .diffusion import denoising_loss_sum, sample
from .model import DiGModel, build_model, init_parameters, initial_value

__all__ = ["PRESETS", "DiGConfig", "DiGModel", "build_model", "denoising_loss_sum",
           "get_config", "init_parameters", "initial_value", "sample"]
