"""GridViT as a training task: learn the advection-diffusion propagator of 2-D fields
(``data.fields``) with a bidirectional patch transformer (``models.gridvit``); loss = mean
squared error over every predicted value, validation MSE. It shares nothing with GenSLM but the
common trainer, which is why it exists: it keeps the core model-agnostic (and is the worked
example of adding a model in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.fields import AdvectionDiffusionFields
from ...models.gridvit import GridViT, GridViTConfig, init_parameters, preset
from ...models.gridvit.model import squared_error_sum
from ..task import Task


@dataclass
class FieldDataConfig:
    n_train: int = 256
    """Training field pairs (records 0 .. n_train-1 of the seed's sequence)."""
    n_val: int = 32
    """Validation field pairs (the next n_val records: disjoint from training)."""
    dt: float = 0.1
    """Time between input and target field."""
    modes: int = 4
    """Fourier modes per direction in the random initial fields."""
    seed: int = 0
    """Seed of the fields and of each channel's velocity and diffusivity."""

    def __post_init__(self):
        if self.n_train < 1 or self.n_val < 0:
            raise ValueError(f"data.n_train={self.n_train}, data.n_val={self.n_val}; expected >= 1 and >= 0")
        if self.dt < 0 or self.modes < 1:
            raise ValueError(f"data.dt={self.dt}, data.modes={self.modes}; expected dt >= 0, modes >= 1")


class GridViTTask(Task):
    name = "gridvit"
    description = "GridViT bidirectional patch transformer learning 2-D advection-diffusion (synthetic fields)"
    data_config = FieldDataConfig
    model_config = GridViTConfig
    default_model = "gridvit-tiny"
    defaults = {"optim.lr": 1e-3, "optim.batch_size": 8, "optim.max_steps": 60, "eval_every": 20}
    count_name = "values"
    val_metric = "val_mse"
    loss_label = "mean squared error"

    def preset(self, name: str) -> GridViTConfig:
        return preset(name)

    def config_from_dict(self, data: dict) -> GridViTConfig:
        return GridViTConfig.from_dict(dict(data))

    def datasets(self, cfg, out_dir: Path):
        m, d = cfg.model_config(), cfg.data
        common = dict(channels=m.channels, height=m.height, width=m.width, dt=d.dt, modes=d.modes, seed=d.seed)
        return (AdvectionDiffusionFields(d.n_train, **common),
                AdvectionDiffusionFields(d.n_val, start=d.n_train, **common))

    def collate(self, records: list):
        return torch.stack([x for x, _ in records]), torch.stack([y for _, y in records])

    def count(self, records: list) -> int:
        return sum(y.numel() for _, y in records)

    def describe_data(self, cfg, train, val) -> str:
        return f"{len(train)} train / {len(val)} val field pairs"

    def data_label(self, cfg) -> str:
        return "advection-diffusion fields"

    def build_model(self, model_config, seed=None) -> GridViT:
        return GridViT(model_config, seed=seed)

    def init_parameters(self, module, seed: int) -> None:
        init_parameters(module, seed)

    def loss_sum(self, model, batch):
        x, y = batch
        return squared_error_sum(model(x), y), torch.tensor(y.numel())

    def check_layout(self, dims, model_config) -> None:
        from ...models.gridvit.parallelize import check_layout

        check_layout(dims, model_config)

    def parallelize(self, model, dims, mesh, parallel, fsdp: dict) -> None:
        from ...models.gridvit.parallelize import parallelize_gridvit

        parallelize_gridvit(model, dims, mesh, **fsdp)

    def pipeline(self, model, dims, mesh, parallel, fsdp: dict, *, batch_size: int, seq_len: int, device):
        from ...models.gridvit.parallelize import pipeline_gridvit

        return pipeline_gridvit(model, dims, mesh, batch_size=batch_size, n_microbatches=parallel.pp_microbatches,
                                schedule=parallel.pp_schedule, device=device, **fsdp)

    def sharded_loss_sum(self, model, batch, dims, mesh, parallel):
        from ...models.gridvit.parallelize import sharded_loss_sum

        return sharded_loss_sum(model, *batch, dims, mesh)
