"""DiG-style diffusion over conformations as a training task: alanine-dipeptide MD frames
(``data.conformations``; embedded implicit-solvent MD), DiG's denoising objective as (sum,
count) and validation loss; the run ends by sampling the trained model and comparing with the MD
reference (Jensen-Shannon divergence of the (phi, psi) histogram, basins, valid bond lengths,
Ramachandran plot). ``ds4sci sample --model RUN`` samples a trained run.

Layouts: one process. torchrun layouts are refused: every rank seeds torch's generator alike,
so data-parallel ranks would draw the same diffusion noise (noise drawn per record would lift
this).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..task import Task


@dataclass
class ConformationDataConfig:
    trajectory: str = ""
    """Training conformations: an .npz of ``xyz`` in Angstrom (the embedded MD's format) or a
    trajectory mdtraj reads (with ``topology``); empty = the embedded alanine-dipeptide MD."""
    topology: str = ""
    """PDB of the molecule; empty = the embedded alanine dipeptide."""
    val_fraction: float = 0.1
    """Last fraction of the frames held out for validation (later in time: no overlap)."""
    sample_at_end: int = 500
    """Conformations sampled at the end of the run and compared with the MD (0 = none)."""

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction}; expected in (0, 1)")
        if self.sample_at_end < 0:
            raise ValueError(f"data.sample_at_end={self.sample_at_end}; expected >= 0")


class _Split(torch.utils.data.Dataset):
    def __init__(self, data, indices):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


class DiGTask(Task):
    name = "dig"
    description = "DiG-style diffusion of equilibrium conformations; default: embedded alanine-dipeptide MD"
    data_config = ConformationDataConfig
    default_model = "dig-tiny"
    defaults = {"optim.lr": 1e-3, "optim.batch_size": 64, "optim.max_steps": 300, "optim.warmup_steps": 20,
                "eval_every": 100, "checkpoint_every": 100}
    count_name = "coordinates"
    loss_label = "denoising loss (noise MSE)"
    run_files = frozenset({"ramachandran.png", "sample_metrics.json", "dig_model.pt"})

    def __init__(self):
        from ...models.dig import DiGConfig

        self.model_config = DiGConfig

    def preset(self, name: str):
        from ...models.dig import get_config

        return get_config(name)

    def _dataset(self, cfg):
        from ...data import conformations as conf

        if not cfg.data.trajectory:
            return conf.alanine_dipeptide_dataset()
        top = conf.load_topology(cfg.data.topology or conf.ALA2_PDB)
        path = Path(cfg.data.trajectory)
        xyz = (conf.load_alanine_dipeptide(path)[0] if path.suffix == ".npz"
               else conf.load_trajectory(path, cfg.data.topology or conf.ALA2_PDB))
        return conf.ConformationDataset(xyz, conf.molecule_from_topology(top))

    def datasets(self, cfg, out_dir: Path):
        data = self._dataset(cfg)
        self._data = data
        n_val = max(1, int(round(len(data) * cfg.data.val_fraction)))
        return _Split(data, range(len(data) - n_val)), _Split(data, range(len(data) - n_val, len(data)))

    def collate(self, records: list):
        return self._data.collate(records)

    def count(self, records: list) -> int:
        return len(records) * int(self._data.molecule["mask"].sum()) * 3

    def describe_data(self, cfg, train, val) -> str:
        atoms = int(self._data.molecule["mask"].sum())
        return f"{len(train)} train / {len(val)} val conformations of {atoms} atoms"

    def data_label(self, cfg) -> str:
        return "embedded alanine-dipeptide MD" if not cfg.data.trajectory else cfg.data.trajectory

    def build_model(self, model_config, seed=None):
        from ...models.dig import DiGModel

        model = DiGModel(model_config)
        if not next(model.parameters()).is_meta:
            self.init_parameters(model, int(torch.randint(2**62, ())) if seed is None else seed)
        return model

    def init_parameters(self, module, seed: int) -> None:
        from ...models.dig import initial_value
        from ...parallel.init import init_parameters

        init_parameters(module, seed, lambda name, owner, shape, gen: initial_value(name, shape, gen))

    def loss_sum(self, model, batch):
        from ...models.dig import denoising_loss_sum

        return denoising_loss_sum(model, batch)

    def check_layout(self, dims, model_config) -> None:
        # Every rank seeds torch's generator alike, so dp ranks would draw the same diffusion
        # noise for different records: refused until noise is drawn per record.
        raise ValueError(f"parallel layout {dims.describe()}: DiG training runs in one process (under data "
                         "parallelism every rank would draw the same diffusion noise)")

    def parallelize(self, model, dims, mesh, parallel, fsdp: dict) -> None:
        from ...parallel.fsdp import apply_fsdp

        if dims.dp_sp > 1:
            apply_fsdp(model, mesh.dp_sp, **fsdp)

    def after_fit(self, trainer) -> dict:
        """Sample the trained model and compare with the MD (alanine dipeptide only)."""
        cfg = trainer.cfg
        if not trainer.is_main or hasattr(trainer, "dims") or not cfg.data.sample_at_end:
            return {}
        import json
        import time

        from ...data import conformations as conf
        from ...models.dig.sample import compare_with_reference, sample

        top = conf.load_topology(cfg.data.topology or conf.ALA2_PDB)
        model = trainer.model.eval()
        start = time.perf_counter()
        xyz = sample(model, top, cfg.data.sample_at_end, sampler="heun", seed=cfg.seed)
        seconds = time.perf_counter() - start
        model.train()
        reference = self._data.xyz
        metrics = compare_with_reference(xyz, reference, top, trainer.out / "ramachandran.png")
        metrics.update(samples=len(xyz), sampler="heun", samples_per_second=len(xyz) / seconds)
        (trainer.out / "sample_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"{len(xyz)} samples (Heun, {len(xyz) / seconds:.1f}/s): JS divergence (phi, psi) vs MD "
              f"{metrics['js_divergence_phi_psi_nats']:.3f} nats; valid bonds {metrics['valid_bond_fraction']:.3f}; "
              f"basins {metrics['basins_samples']} (MD {metrics.get('basins_reference')}); "
              f"{trainer.out / 'ramachandran.png'}")
        return metrics


def load_model(path: str | Path):
    """A trained DiG from a run directory (its latest checkpoint), a checkpoint directory or a
    ``models.dig.sample.save_checkpoint`` file."""
    path = Path(path)
    if path.is_file():
        from ...models.dig.sample import load_checkpoint

        return load_checkpoint(path)
    from ..task import get_task

    return get_task("dig").load_model(path)[0]
