"""Molecular structures with energies and forces for force-field training.

Readers: extended XYZ and ASE databases (through ``ase.io``), rMD17 / MD17-style ``.npz``; an
embedded default (alanine dipeptide, GFN2-xTB labels, see ``files/ala2_gfn2.npz``). Units:
Angstrom, eV, eV/Angstrom. A deterministic indexable dataset and ``collate`` into one batched
graph (``MoleculeBatch``: atoms of all molecules concatenated, ``batch`` maps atom -> molecule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

KCAL_PER_MOL_EV = 0.0433641043
"""1 kcal/mol in eV (rMD17 labels are kcal/mol and kcal/mol/A)."""

DEFAULT_DATASET = "ala2_gfn2.npz"


@dataclass
class MoleculeBatch:
    z: Tensor
    """[N] atomic numbers (long)."""
    pos: Tensor
    """[N, 3] positions (A)."""
    batch: Tensor
    """[N] molecule index of each atom (long, sorted)."""
    n_atoms: Tensor
    """[B] atoms per molecule."""
    energy: Tensor
    """[B] reference energies (eV)."""
    forces: Tensor
    """[N, 3] reference forces (eV/A)."""
    num_graphs: int
    """B."""

    def to(self, device=None, dtype=None) -> MoleculeBatch:
        fl = dict(device=device, dtype=dtype)
        return MoleculeBatch(self.z.to(device), self.pos.to(**fl), self.batch.to(device),
                             self.n_atoms.to(device), self.energy.to(**fl),
                             self.forces.to(**fl), self.num_graphs)


class MoleculeDataset(torch.utils.data.Dataset):
    """Frames (z, positions, energy, forces); item i is a dict of tensors; order is fixed."""

    def __init__(self, z: list[np.ndarray], pos: list[np.ndarray], energy: np.ndarray,
                 forces: list[np.ndarray], source: str = ""):
        if not (len(z) == len(pos) == len(energy) == len(forces)):
            raise ValueError(f"MoleculeDataset: {len(z)} z, {len(pos)} positions, {len(energy)} "
                             f"energies, {len(forces)} forces; expected equal counts")
        for k, (zz, rr, ff) in enumerate(zip(z, pos, forces)):
            if rr.shape != (len(zz), 3) or ff.shape != (len(zz), 3):
                raise ValueError(f"MoleculeDataset ({source}): frame {k} has {len(zz)} atoms but "
                                 f"positions {rr.shape} and forces {ff.shape}; expected ({len(zz)}, 3)")
        self.z, self.pos, self.forces = z, pos, forces
        self.energy = np.asarray(energy, dtype=np.float64)
        self.source = source

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"z": torch.as_tensor(self.z[i], dtype=torch.long),
                "pos": torch.as_tensor(self.pos[i], dtype=torch.float64),
                "energy": torch.tensor(float(self.energy[i]), dtype=torch.float64),
                "forces": torch.as_tensor(self.forces[i], dtype=torch.float64)}

    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(sorted({int(v) for zz in self.z for v in np.unique(zz)}))

    def subset(self, idx) -> MoleculeDataset:
        idx = [int(i) for i in idx]
        return MoleculeDataset([self.z[i] for i in idx], [self.pos[i] for i in idx],
                               self.energy[idx], [self.forces[i] for i in idx], self.source)

    def split(self, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[MoleculeDataset]:
        """Deterministic random split (same seed -> same frames)."""
        if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
            raise ValueError(f"split: fractions={fractions}; expected non-negative, summing to 1")
        perm = np.random.default_rng(seed).permutation(len(self))
        bounds = np.round(np.cumsum((0.0,) + tuple(fractions)) * len(self)).astype(int)
        return [self.subset(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def mean_energy_per_atom(self) -> float:
        return float(np.sum(self.energy) / sum(len(zz) for zz in self.z))


def collate(items: list[dict[str, Tensor]]) -> MoleculeBatch:
    """Concatenate molecules into one graph batch."""
    n = torch.tensor([len(it["z"]) for it in items])
    return MoleculeBatch(
        z=torch.cat([it["z"] for it in items]), pos=torch.cat([it["pos"] for it in items]),
        batch=torch.repeat_interleave(torch.arange(len(items)), n), n_atoms=n,
        energy=torch.stack([it["energy"] for it in items]),
        forces=torch.cat([it["forces"] for it in items]), num_graphs=len(items))


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"molecule data file {str(path)!r} does not exist")
    return path


def read_npz(path, energy_unit: str = "auto") -> MoleculeDataset:
    """rMD17 (``nuclear_charges``, ``coords``, ``energies``, ``forces``; kcal/mol) or MD17-style
    (``z``, ``R``, ``E``, ``F``; eV unless ``energy_unit="kcal/mol"``) npz."""
    path = _check_file(path)
    try:
        d = np.load(path, allow_pickle=False)
        keys = set(d.files)
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise ValueError(f"read_npz: {str(path)!r} is not a readable .npz file ({e})") from e
    if {"nuclear_charges", "coords", "energies", "forces"} <= keys:
        z, R, E, F = d["nuclear_charges"], d["coords"], d["energies"], d["forces"]
        unit = "kcal/mol" if energy_unit == "auto" else energy_unit
    elif {"z", "R", "E", "F"} <= keys:
        z, R, E, F = d["z"], d["R"], d["E"], d["F"]
        unit = "eV" if energy_unit == "auto" else energy_unit
    else:
        raise ValueError(f"read_npz: {str(path)!r} has keys {sorted(keys)}; expected rMD17 keys "
                         "(nuclear_charges, coords, energies, forces) or (z, R, E, F)")
    if unit not in ("eV", "kcal/mol"):
        raise ValueError(f"read_npz: energy_unit={energy_unit!r}; expected 'auto', 'eV' or 'kcal/mol'")
    scale = KCAL_PER_MOL_EV if unit == "kcal/mol" else 1.0
    R, F = np.asarray(R, np.float64), np.asarray(F, np.float64) * scale
    E = np.asarray(E, np.float64).reshape(-1) * scale
    z = np.asarray(z, np.int64)
    if R.ndim != 3 or R.shape[1:] != (len(z), 3):
        raise ValueError(f"read_npz: positions have shape {R.shape}; expected (T, {len(z)}, 3)")
    return MoleculeDataset([z] * len(R), list(R), E, list(F), source=str(path))


def read_ase(path, index: str = ":") -> MoleculeDataset:
    """Extended XYZ, ASE .db, .traj, ... (anything ``ase.io.read`` reads) with energies and forces."""
    import ase.io

    path = _check_file(path)
    try:
        frames = ase.io.read(str(path), index=index)
    except Exception as e:
        raise ValueError(f"read_ase: cannot read {str(path)!r} with ase.io ({type(e).__name__}: {e})") from e
    if not isinstance(frames, list):
        frames = [frames]
    z, R, E, F = [], [], [], []
    for k, atoms in enumerate(frames):
        try:
            e, f = atoms.get_potential_energy(), atoms.get_forces()
        except Exception:
            e, f = atoms.info.get("energy"), atoms.arrays.get("forces")
        if e is None or f is None:
            raise ValueError(f"read_ase: frame {k} of {str(path)!r} has no energy/forces; expected "
                             "a SinglePointCalculator or info['energy'] and arrays['forces']")
        z.append(atoms.numbers.astype(np.int64))
        R.append(atoms.positions.astype(np.float64))
        E.append(float(e))
        F.append(np.asarray(f, np.float64))
    return MoleculeDataset(z, R, np.array(E), F, source=str(path))


def read_molecules(path) -> MoleculeDataset:
    """Dispatch on suffix: .npz -> ``read_npz``; anything else -> ``read_ase``."""
    return read_npz(path) if os.fspath(path).endswith(".npz") else read_ase(path)


def default_dataset() -> MoleculeDataset:
    """Embedded alanine dipeptide (22 atoms, 801 frames, GFN2-xTB energies/forces in eV)."""
    with resources.as_file(resources.files("ds4sci.data") / "files" / DEFAULT_DATASET) as p:
        return read_npz(p)


def default_attribution() -> str:
    with resources.as_file(resources.files("ds4sci.data") / "files" / DEFAULT_DATASET) as p:
        return str(np.load(p)["attribution"])
