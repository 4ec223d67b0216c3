"""MD integrators in ASE units: velocity Verlet (NVE) and Langevin BAOAB (NVT).

Positions and velocities are float64 (the accumulation energy conservation needs); the model may
run in float32. Velocities are in A per ASE time unit (as ``ase.Atoms.get_velocities``).
``run(n)`` advances n steps in one call and checks forces for NaN/explosion every step.
BAOAB: Leimkuhler & Matthews, Appl. Math. Res. Express 2013.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ds4sci.md.potential import Potential
from ds4sci.md.units import FS, KB


class MDInstabilityError(RuntimeError):
    """Forces became NaN/inf or exceeded the limit; ``step`` is the failing step."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def maxwell_boltzmann(masses_N: Tensor, temperature_K: float, generator: torch.Generator | None = None,
                      batch_N: Tensor | None = None) -> Tensor:
    """Velocities [N, 3] drawn at ``temperature_K`` with zero net momentum (per molecule)."""
    m = masses_N.double().unsqueeze(1)
    v = torch.randn(masses_N.shape[0], 3, generator=generator, dtype=torch.float64) * torch.sqrt(
        KB * temperature_K / m)
    return zero_momentum(v, masses_N, batch_N)


def zero_momentum(v_N3: Tensor, masses_N: Tensor, batch_N: Tensor | None = None) -> Tensor:
    m = masses_N.double().unsqueeze(1)
    if batch_N is None:
        return v_N3 - (m * v_N3).sum(0) / m.sum()
    B = int(batch_N.max()) + 1
    p_B3 = torch.zeros(B, 3, dtype=v_N3.dtype).index_add_(0, batch_N, m * v_N3)
    m_B = torch.zeros(B, dtype=v_N3.dtype).index_add_(0, batch_N, m.squeeze(1))
    return v_N3 - (p_B3 / m_B.unsqueeze(1))[batch_N]


class Integrator:
    """Shared state: positions x, velocities v (float64), forces, energy, step counter."""

    def __init__(self, potential: Potential, positions_N3: Tensor, masses_N: Tensor,
                 velocities_N3: Tensor | None, dt_fs: float, max_force: float = 1e3):
        if not dt_fs > 0:
            raise ValueError(f"dt={dt_fs} fs; expected > 0")
        self.pot = potential
        self.x = torch.as_tensor(positions_N3, dtype=torch.float64).clone()
        self.m = torch.as_tensor(masses_N, dtype=torch.float64).unsqueeze(1)
        self.v = (torch.zeros_like(self.x) if velocities_N3 is None
                  else torch.as_tensor(velocities_N3, dtype=torch.float64).clone())
        self.dt = dt_fs * FS
        self.dt_fs = dt_fs
        self.max_force = max_force
        self.step = 0
        self._evaluate()

    def _evaluate(self) -> None:
        ev = self.pot.compute(self.x)
        f = ev.forces.double()
        if not bool(torch.isfinite(f).all()) or not bool(torch.isfinite(ev.energy).all()):
            raise MDInstabilityError(self.step, f"MD stopped at step {self.step}: forces or "
                                     "energy are NaN/inf")
        fmax = float(f.abs().max()) if f.numel() else 0.0
        if fmax > self.max_force:
            raise MDInstabilityError(self.step, f"MD stopped at step {self.step}: a force of "
                                     f"{fmax:.3g} eV/A exceeds max_force={self.max_force:g} eV/A "
                                     "(exploding simulation)")
        self.f = f
        self.epot = float(ev.energy.sum())

    @property
    def ekin(self) -> float:
        return float(0.5 * (self.m * self.v * self.v).sum())

    @property
    def temperature(self) -> float:
        dof = 3 * self.x.shape[0]  # ASE's convention (Atoms.get_temperature without constraints)
        return 2.0 * self.ekin / (dof * KB) if dof else 0.0

    def run(self, n_steps: int) -> None:
        for _ in range(n_steps):
            self._step()
            self.step += 1


class VelocityVerlet(Integrator):
    """NVE: v += dt/2 F/m; x += dt v; F(x); v += dt/2 F/m."""

    def _step(self) -> None:
        self.v += 0.5 * self.dt * self.f / self.m
        self.x += self.dt * self.v
        self._evaluate()
        self.v += 0.5 * self.dt * self.f / self.m


class LangevinBAOAB(Integrator):
    """NVT Langevin, BAOAB splitting; ``friction`` gamma in 1/fs (ASE's Langevin uses 1/time)."""

    def __init__(self, potential, positions_N3, masses_N, velocities_N3, dt_fs: float,
                 temperature_K: float, friction_per_fs: float = 0.01,
                 generator: torch.Generator | None = None, max_force: float = 1e3):
        if temperature_K < 0:
            raise ValueError(f"temperature={temperature_K} K; expected >= 0")
        if friction_per_fs < 0:
            raise ValueError(f"friction={friction_per_fs} 1/fs; expected >= 0")
        super().__init__(potential, positions_N3, masses_N, velocities_N3, dt_fs, max_force)
        self.c1 = math.exp(-friction_per_fs * dt_fs)
        self.c2 = math.sqrt(1.0 - self.c1 ** 2)
        self.sigma = torch.sqrt(KB * temperature_K / self.m)
        self.gen = generator

    def _step(self) -> None:
        self.v += 0.5 * self.dt * self.f / self.m                       # B
        self.x += 0.5 * self.dt * self.v                                # A
        noise = torch.randn(self.v.shape, generator=self.gen, dtype=torch.float64)
        self.v = self.c1 * self.v + self.c2 * self.sigma * noise        # O
        self.x += 0.5 * self.dt * self.v                                # A
        self._evaluate()
        self.v += 0.5 * self.dt * self.f / self.m                       # B
