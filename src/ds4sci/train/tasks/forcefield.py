"""A machine-learned force field as a training task: ViSNet (``models.visnet``) on molecules
with quantum-chemistry energies and forces (``data.molecules``: extxyz, ASE db, rMD17-style npz;
default the embedded alanine-dipeptide frames labelled with GFN2-xTB). Loss: per molecule
``w_E (dE / n_atoms)^2 + w_F mean dF^2`` summed, with the molecule count; validation energy MAE
per atom and force MAE/RMSE; parity plots at the end. The trained model runs MD with
``ds4sci md run --model RUN``.

Energies are learned relative to ``n_atoms * e0``, ``e0`` the training split's mean energy per
atom (recomputed deterministically from the data, so resume is exact); the exported model adds
it back through ViSNet's ``atomref``, so MD reports absolute energies.

Layouts: one process (torchrun layouts are refused: ViSNet is small and MD, not training, is
where it needs parallelism: see ``md.domain``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..task import Task


@dataclass
class MoleculeDataConfig:
    path: str = ""
    """Molecules with energies (eV) and forces (eV/A): .extxyz/.xyz, ASE .db or an rMD17-style
    .npz; empty = the embedded alanine dipeptide (801 frames, GFN2-xTB)."""
    val_fraction: float = 0.1
    """Fraction of the frames held out (a seeded random split)."""
    w_energy: float = 1.0
    """Weight of the squared energy error per atom (eV^2)."""
    w_forces: float = 100.0
    """Weight of the mean squared force error ((eV/A)^2)."""

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction}; expected in (0, 1)")
        if self.w_energy < 0 or self.w_forces < 0 or self.w_energy + self.w_forces == 0:
            raise ValueError(f"data.w_energy={self.w_energy}, data.w_forces={self.w_forces}; expected >= 0, "
                             "not both 0")


class ForceFieldTask(Task):
    name = "forcefield"
    description = "ViSNet force field on energies and forces; default: embedded alanine dipeptide (GFN2-xTB)"
    data_config = MoleculeDataConfig
    default_model = "visnet-tiny"
    defaults = {"optim.lr": 1e-3, "optim.batch_size": 8, "optim.max_steps": 200, "optim.warmup_steps": 10,
                "eval_every": 50, "checkpoint_every": 100, "optim.weight_decay": 0.0}
    count_name = "molecules"
    loss_label = "energy + force loss"
    run_files = frozenset({"parity.png", "forcefield_eval.json", "model.pt"})

    def __init__(self):
        from ...models.visnet.config import ViSNetConfig

        self.model_config = ViSNetConfig

    def preset(self, name: str):
        from ...models.visnet.config import preset

        return preset(name)

    def config_from_dict(self, data: dict):
        return self.model_config.from_dict(dict(data))

    # ----- data -----
    def datasets(self, cfg, out_dir: Path):
        from ...data.molecules import default_dataset, read_molecules

        data = read_molecules(cfg.data.path) if cfg.data.path else default_dataset()
        train, val = data.split((1 - cfg.data.val_fraction, cfg.data.val_fraction), seed=cfg.seed)
        unknown = sorted(set(data.elements) - set(range(1, cfg.model_config().max_z)))
        if unknown:
            raise ValueError(f"data: atomic numbers {unknown} exceed model.max_z={cfg.model_config().max_z}")
        self.e0 = train.mean_energy_per_atom()
        return train, val

    def collate(self, records: list):
        """A graph batch in fp32 with energies relative to ``n_atoms * e0`` (shifted in fp64)."""
        from ...data.molecules import collate

        batch = collate(records)
        batch = dataclasses.replace(batch, energy=batch.energy - batch.n_atoms.to(batch.energy.dtype) * self.e0)
        return batch.to(dtype=torch.float32)

    def count(self, records: list) -> int:
        return len(records)

    def describe_data(self, cfg, train, val) -> str:
        return f"{len(train)} train / {len(val)} val molecules (energy reference {self.e0:.3f} eV/atom)"

    def data_label(self, cfg) -> str:
        return "embedded alanine dipeptide (GFN2-xTB)" if not cfg.data.path else cfg.data.path

    # ----- model -----
    def build_model(self, model_config, seed=None):
        from ...models.visnet.model import ViSNet

        model = ViSNet(model_config)
        if not next(model.parameters()).is_meta:
            g = torch.Generator().manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
            model.reset_parameters(g)
        return model

    def init_parameters(self, module, seed: int) -> None:
        module.reset_parameters(torch.Generator().manual_seed(seed))

    def load_parameters(self, module, weights) -> None:
        from ...parallel.init import load_parameters

        load_parameters(module, weights)
        _load_buffers(module, weights)

    def loss_sum(self, model, batch):
        from ...models.visnet.loss import energy_force_loss_sum

        cfg = self._cfg
        total, count = energy_force_loss_sum(model, batch, cfg.data.w_energy, cfg.data.w_forces)
        return total, torch.tensor(count)

    def check(self, cfg, model_config) -> None:
        self._cfg = cfg

    def check_layout(self, dims, model_config) -> None:
        raise ValueError(f"parallel layout {dims.describe()}: force-field training runs in one process (ViSNet "
                         "is small); MD of large systems is spread over processes by ds4sci.md.domain")

    # ----- evaluation -----
    @torch.no_grad()
    def _metrics(self, model, data, device):
        from ...models.visnet.loss import energy_force_metric_sums, finish_metrics
        from ..trainer import to_device

        sums = {}
        for i in range(0, len(data), 16):
            batch = to_device(self.collate([data[j] for j in range(i, min(i + 16, len(data)))]), device)
            for k, v in energy_force_metric_sums(model, batch).items():
                sums[k] = sums.get(k, 0.0) + v
        return finish_metrics(sums)

    def after_fit(self, trainer) -> dict:
        """Validation energy MAE per atom and force MAE/RMSE; parity plots; the model exported for
        MD (``model.pt``, absolute energies through atomref)."""
        if not trainer.is_main:
            return {}
        model = trainer.model.eval()
        result = self._metrics(model, trainer.val_data, trainer.device)
        result["energy_reference_eV_per_atom"] = self.e0
        (trainer.out / "forcefield_eval.json").write_text(json.dumps(result, indent=1))
        self._parity(model, trainer)
        print(f"validation: energy MAE {1000 * result['energy_mae_per_atom']:.2f} meV/atom, force MAE "
              f"{result['force_mae']:.4f} eV/A, force RMSE {result['force_rmse']:.4f} eV/A; "
              f"{trainer.out / 'parity.png'}; MD: ds4sci md run --model {trainer.out} ...")
        model.train()
        return result

    def _parity(self, model, trainer) -> None:
        from ...models.visnet.forces import energy_forces
        from ..metrics import plot_backend
        from ..trainer import to_device

        data = trainer.val_data
        batch = to_device(self.collate([data[i] for i in range(len(data))]), trainer.device)
        with torch.enable_grad():
            out = energy_forces(model, batch.z, batch.pos, batch.batch, batch.num_graphs)
        plt = plot_backend()
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
        n = batch.n_atoms.double()
        a.scatter((batch.energy / n).cpu(), (out.energy.detach().double() / n).cpu(), s=8)
        a.set_xlabel("reference energy - e0 (eV/atom)")
        a.set_ylabel("predicted (eV/atom)")
        b.scatter(batch.forces.flatten().cpu(), out.forces.detach().flatten().cpu(), s=2)
        b.set_xlabel("reference force component (eV/A)")
        b.set_ylabel("predicted (eV/A)")
        for ax in (a, b):
            lo, hi = ax.get_xlim()
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        fig.suptitle("validation parity")
        fig.tight_layout()
        fig.savefig(trainer.out / "parity.png", dpi=100)
        plt.close(fig)


def load_model(path: str | Path):
    """A trained ViSNet for MD from a run directory (or checkpoint directory), with absolute
    energies: the run's energy reference ``e0`` per atom becomes ViSNet's ``atomref``."""
    from ..task import get_task

    task = get_task("forcefield")
    model, cfg = task.load_model(path)  # buffers too: the task's load_parameters
    task.datasets(cfg, Path(path))  # the run's e0
    with torch.no_grad():
        model.atomref.weight.add_(task.e0)  # energies relative to n_atoms * e0 -> absolute
    return model


@torch.no_grad()
def _load_buffers(model, weights) -> None:
    """Buffers (RBF grid, mean, std) from the checkpoint when it has them, else from the config."""
    for name, buf in model.named_buffers():
        buf.copy_(weights[name] if name in weights else model.initial_value(name, buf.shape))
