"""ClimaX as a training task: forecast gridded weather fields at a lead time (``data.climate``:
NetCDF / GRIB / zarr through xarray; default the embedded ERA5 sample), latitude-weighted MSE
(summed, with its count, so every layout gives ClimaX's mean), validation lat-weighted MSE, and
at the end per-variable RMSE and ACC against persistence and climatology with maps of truth,
forecast and error (``climax_eval.json``, ``climax_maps.png``).

Parallel layouts (``models.climax.parallelize``): sequence parallelism over patch tokens (Ulysses,
ring, hybrid), tensor parallelism over heads and MLP columns, FSDP over the blocks and pipeline
stages. Drop-path masks are drawn per sample of the global batch, so every layout but the
pipeline draws one process's masks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..task import Task


@dataclass
class ClimateDataConfig:
    path: list[str] = field(default_factory=list)
    """NetCDF / GRIB / zarr files in the ERA5 / WeatherBench layout (several along time); empty =
    the embedded ERA5 sample (4 variables, 10 members x 4 times, 3 degrees)."""
    variables: list[str] = field(default_factory=list)
    """Input channels in ClimaX's names (geopotential_500, 2m_temperature, ...); empty = the
    model's default_vars."""
    out_variables: list[str] = field(default_factory=list)
    """Channels to forecast; empty = the input channels."""
    lead_steps: int = 1
    """Lead time in time steps of the data (12 h in the embedded sample)."""
    grid_mode: str = "crop"
    """Grids the patch does not divide: crop (drop the last rows/columns) or pad (edge rows,
    wrapped columns); see data.climate.fit_grid."""

    def __post_init__(self):
        if self.lead_steps < 1:
            raise ValueError(f"data.lead_steps={self.lead_steps}; expected >= 1")
        if self.grid_mode not in ("crop", "pad"):
            raise ValueError(f"data.grid_mode={self.grid_mode!r}; expected 'crop' or 'pad'")


class ClimaXTask(Task):
    name = "climax"
    description = "ClimaX weather/climate foundation model on gridded fields; default: embedded ERA5 sample"
    data_config = ClimateDataConfig
    default_model = "climax-tiny"
    defaults = {"optim.lr": 2e-3, "optim.batch_size": 4, "optim.max_steps": 100, "optim.warmup_steps": 5,
                "eval_every": 25, "checkpoint_every": 50}
    count_name = "values"
    val_metric = "val_lat_mse"
    loss_label = "latitude-weighted MSE (normalised units)"
    run_files = frozenset({"climax_eval.json", "climax_maps.png"})

    def __init__(self):
        from ...models.climax import ClimaXConfig

        self.model_config = ClimaXConfig
        self._data = {}

    def preset(self, name: str):
        from ...models.climax import preset

        return preset(name)

    def config_from_dict(self, data: dict):
        fields = {f.name: f for f in dataclasses.fields(self.model_config)}
        return self.model_config(**{k: tuple(v) if isinstance(v, list) and k in fields else v
                                    for k, v in data.items()})

    def _variables(self, cfg, model_config) -> tuple[list[str], list[str]]:
        variables = list(cfg.data.variables or model_config.default_vars)
        return variables, list(cfg.data.out_variables or variables)

    def check(self, cfg, model_config) -> None:
        variables, out_variables = self._variables(cfg, model_config)
        unknown = [v for v in {*variables, *out_variables} if v not in model_config.default_vars]
        if unknown:
            raise ValueError(f"data.variables/out_variables: {sorted(unknown)} are not among the model's "
                             f"default_vars {list(model_config.default_vars)}")

    # ----- data -----
    def data(self, cfg) -> dict:
        """The datasets and their statistics, built once per config (they are read lazily)."""
        from ...data.climate import sample_datasets

        model_config = cfg.model_config()
        variables, out_variables = self._variables(cfg, model_config)
        key = json.dumps([cfg.to_dict()["data"], model_config.patch_size, cfg.seed], sort_keys=True)
        if key not in self._data:
            data = sample_datasets(patch_size=model_config.patch_size, lead_steps=cfg.data.lead_steps,
                                   grid_mode=cfg.data.grid_mode, variables=variables, out_variables=out_variables,
                                   path=cfg.data.path or None, seed=cfg.seed)
            self._data = {key: data}
        size = tuple(self._data[key]["train"].size)
        if size != tuple(model_config.img_size):
            raise ValueError(f"model.img_size={list(model_config.img_size)} but the data's grid, fitted to "
                             f"patch_size={model_config.patch_size} by data.grid_mode={cfg.data.grid_mode!r}, "
                             f"is {list(size)}; set --model.img_size=[{size[0]}, {size[1]}]")
        self.variables, self.out_variables = variables, out_variables
        self.lat = self._data[key]["lat"]
        self._model_config, self._model_vars = model_config, list(model_config.default_vars)
        return self._data[key]

    def datasets(self, cfg, out_dir: Path):
        data = self.data(cfg)
        return data["train"], data["val"]

    def collate(self, records: list):
        return (torch.stack([r["x"] for r in records]), torch.stack([r["y"] for r in records]),
                torch.stack([r["lead_times"] for r in records]))

    def count(self, records: list) -> int:
        return sum(r["y"].numel() for r in records)

    def describe_data(self, cfg, train, val) -> str:
        h, w = train.size
        return (f"{len(train)} train / {len(val)} val forecast pairs, {len(self.variables)} -> "
                f"{len(self.out_variables)} variables on {h}x{w}, lead {cfg.data.lead_steps} step(s)")

    def data_label(self, cfg) -> str:
        return "embedded ERA5 sample" if not cfg.data.path else ", ".join(cfg.data.path)

    # ----- model -----
    def build_model(self, model_config, seed=None):
        from ...models.climax import ClimaX

        return ClimaX(model_config, seed=seed)

    def init_parameters(self, module, seed: int) -> None:
        from ...models.climax import init_parameters

        init_parameters(module, seed)

    def loss_sum(self, model, batch):
        from ...models.climax.metrics import lat_weighted_mse_sum

        x, y, lead = batch
        preds = model.predict(x, lead, self.variables, self.out_variables)
        return lat_weighted_mse_sum(preds, y, self.lat)

    # ----- distributed -----
    def check_layout(self, dims, model_config) -> None:
        from ...models.climax.parallelize import check_layout

        check_layout(dims, model_config)

    def parallelize(self, model, dims, mesh, parallel, fsdp: dict) -> None:
        from ...models.climax.parallelize import parallelize_climax

        parallelize_climax(model, dims, mesh, **fsdp)

    def pipeline(self, model, dims, mesh, parallel, fsdp: dict, *, batch_size: int, seq_len: int, device):
        from ...models.climax.parallelize import pipeline_climax

        return pipeline_climax(model, dims, mesh, variables=self.variables, out_variables=self.out_variables,
                               lat=self.lat, batch_size=batch_size, n_microbatches=parallel.pp_microbatches,
                               schedule=parallel.pp_schedule, device=device, **fsdp)

    def pipeline_batch(self, batch):
        from ...models.climax import pack_inputs, patchify_targets

        x, y, lead = batch
        return pack_inputs(x, lead, self._patch), patchify_targets(self._all_targets(y), self._patch)

    def _all_targets(self, y_BVHW):
        """``y`` of the output variables placed among all the model's variables (zeros elsewhere:
        the loss weights are zero there), the layout of the head's outputs."""
        model_vars = list(self._model_vars)
        if list(self.out_variables) == model_vars:
            return y_BVHW
        full = y_BVHW.new_zeros((y_BVHW.shape[0], len(model_vars), *y_BVHW.shape[2:]))
        full[:, [model_vars.index(v) for v in self.out_variables]] = y_BVHW
        return full

    def sharded_loss_sum(self, model, batch, dims, mesh, parallel):
        from ...models.climax.parallelize import set_batch_share, sharded_loss_sum

        x, y, lead = batch
        # This rank's records are its dp share of the global batch (same share on every sp/tp rank).
        set_batch_share(model, mesh.dp_rank * x.shape[0], dims.dp * x.shape[0])
        if not dims.sp_enabled:
            return self.loss_sum(model, batch)
        return sharded_loss_sum(model, x, self._all_targets(y), lead, self.variables, self.out_variables, self.lat,
                                dims, mesh, v_out=y.shape[1])

    @property
    def _patch(self) -> int:
        return self._model_config.patch_size

    # ----- evaluation -----
    def after_fit(self, trainer) -> dict:
        """RMSE and ACC per variable at the lead time on the validation pairs (physical units),
        against persistence and climatology; a table, ``climax_eval.json`` and maps."""
        if not trainer.is_main or hasattr(trainer, "dims"):
            return {}
        from .climax_eval import evaluate_run

        return evaluate_run(self, trainer)
