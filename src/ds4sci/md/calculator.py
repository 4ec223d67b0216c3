"""ASE calculator over a ds4sci force field, so ASE's dynamics and optimisers can drive it."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ds4sci.md.potential import Potential, load_model
from ds4sci.models.visnet import ViSNet


class DS4SciCalculator(Calculator):
    """Energy (eV), forces (eV/A) and, for periodic cells, stress (eV/A^3, Voigt) from ViSNet.

    Args:
        model: a ViSNet, a checkpoint path or ``preset:<name>``.
        dtype: "float32" or "float64" model precision.
        skin: Verlet skin (A); the neighbour list is reused between calls while atoms move little.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model: ViSNet | str, dtype: str = "float32", skin: float = 1.0,
                 device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.model = load_model(model) if isinstance(model, str) else model
        self.torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        self.skin, self.device = skin, device
        self.potential: Potential | None = None
        self._key = None

    def _potential_for(self, atoms) -> Potential:
        periodic = bool(atoms.pbc.any())
        key = (tuple(atoms.numbers.tolist()), tuple(atoms.pbc.tolist()),
               tuple(np.asarray(atoms.cell).ravel().round(12).tolist()) if periodic else None)
        if self.potential is None or key != self._key:
            self.potential = Potential(
                self.model, torch.as_tensor(atoms.numbers),
                torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64) if periodic else None,
                torch.as_tensor(atoms.pbc) if periodic else None, skin=self.skin,
                dtype=self.torch_dtype, device=self.device)
            self._key = key
        return self.potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pot = self._potential_for(self.atoms)
        pos = torch.as_tensor(self.atoms.positions, dtype=torch.float64, device=self.device)
        want_stress = "stress" in properties and bool(self.atoms.pbc.all())
        if "stress" in properties and not want_stress:
            from ase.calculators.calculator import PropertyNotImplementedError
            raise PropertyNotImplementedError("stress needs a fully periodic cell")
        ev = pot.compute(pos, stress=want_stress)
        self.results["energy"] = self.results["free_energy"] = float(ev.energy.sum())
        self.results["forces"] = ev.forces.double().cpu().numpy()
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(ev.stress.double().cpu().numpy())
