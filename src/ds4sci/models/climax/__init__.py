"""ClimaX (weather and climate foundation model), weight-compatible with microsoft/ClimaX v0.3.1.

Task-facing surface: :class:`ClimaXConfig` / :func:`preset`, :class:`ClimaX` (``tokens`` ->
``run_blocks`` -> ``project`` -> ``fields``; ``forward`` as ClimaX's), :mod:`.metrics`
(lat-weighted loss as (sum, count), RMSE, ACC, baselines), :mod:`.interop` (Lightning
checkpoints, position-embedding interpolation, crop/pad of grids), :func:`.io.write_forecast_netcdf`.
"""

from .config import CLIMAX_VARS, PRESETS, SAMPLE_VARS, ClimaXConfig, preset
from .model import (
                    ClimaX,
                    ClimaXStage,
                    init_parameters,
                    initial_value,
                    pack_inputs,
                    patches_at,
                    patchify,
                    patchify_targets,
                    targets_at,
                    unpatchify,
)

__all__ = ["CLIMAX_VARS", "PRESETS", "SAMPLE_VARS", "ClimaX", "ClimaXConfig", "ClimaXStage", "init_parameters",
           "initial_value", "pack_inputs", "patches_at", "patchify", "patchify_targets", "preset", "targets_at",
           "unpatchify"]
