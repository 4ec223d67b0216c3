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


COMPILE_OPTIONS = {"cpp_wrapper": True}
"""Inductor options of the compiled step on CPU: a C++ wrapper calls the step's ~100 kernels
instead of Python; alanine dipeptide (visnet-tiny, 1 thread) 758 vs 610 steps/s (median of 6
interleaved windows of CPU time, same process), identical trajectories."""

CUDA_COMPILE_OPTIONS = {"triton.cudagraphs": True}
"""On CUDA the compiled step is replayed as one CUDA graph (static shapes: the padded pair list
keeps its capacity between rebuilds), so a step costs one graph launch instead of ~100 kernel
launches from Python."""


def compile_options(device: torch.device) -> dict:
    return CUDA_COMPILE_OPTIONS if device.type == "cuda" else COMPILE_OPTIONS


class MDInstabilityError(RuntimeError):
    """Forces became NaN/inf or exceeded the limit; ``step`` is the failing step."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def check_stability(step: int, fmax: float, energy: float, max_force: float) -> None:
    """Raise ``MDInstabilityError`` at ``step`` for NaN/inf forces or energy, or a force above
    ``max_force`` (eV/A)."""
    if not (math.isfinite(fmax) and math.isfinite(energy)):
        raise MDInstabilityError(step, f"MD stopped at step {step}: forces or energy are NaN/inf")
    if fmax > max_force:
        raise MDInstabilityError(step, f"MD stopped at step {step}: a force of {fmax:.3g} eV/A "
                                 f"exceeds max_force={max_force:g} eV/A (exploding simulation)")


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
    """Shared state: positions x, velocities v (float64), forces, energy, step counter.

    Two execution paths with the same numbers (up to float32 rounding of the model):
      * eager (``Potential(compile=False)``): the exact within-cutoff pair list every step;
      * fused (``Potential(compile=True)``, or ``fused=True``): the model sees a fixed-shape pair
        list (``Potential.static_pairs``) and forces come from ``torch.func.grad``, so forces and
        (for velocity Verlet) the whole step compile into one graph with static shapes: no
        recompiles between list rebuilds, one small host read per step (force max, energy,
        displacement) for the instability and rebuild checks.
    """

    def __init__(self, potential: Potential, positions_N3: Tensor, masses_N: Tensor,
                 velocities_N3: Tensor | None, dt_fs: float, max_force: float = 1e3,
                 fused: bool | None = None):
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
        self.fused = getattr(potential, "compile", False) if fused is None else fused
        if self.fused:
            self._forces = potential.forces_on_pairs
        self._evaluate(initial=True)

    def _check(self, fmax: float, energy: float) -> None:
        check_stability(self.step, fmax, energy, self.max_force)

    def _evaluate(self, initial: bool = False) -> None:
        # The first evaluation of a fused run on a padded Verlet list runs eagerly (same model,
        # the exact pair list; edge chunks apply): func.grad outside the compiled graph would
        # keep every edge intermediate with autograd's bookkeeping (9 GiB at 10k atoms).
        if self.fused and (self.pot.all_pairs or not initial):
            ei, off, _ = self.pot.static_pairs(self.x)
            with torch.no_grad():
                e_B, f = self._forces(self.x, ei, off)
            self._set(f, e_B)
            return
        ev = self.pot.compute(self.x)
        f = ev.forces.double()
        fmax = float(f.abs().max()) if f.numel() else 0.0
        self._check(fmax, float(ev.energy.sum()))
        self.f = f
        self.energy_B = ev.energy

    def _set(self, f: Tensor, e_B: Tensor) -> None:
        fmax = float(f.abs().max()) if f.numel() else 0.0
        self._check(fmax, float(e_B.sum()))
        self.f, self.energy_B = f, e_B

    @property
    def epot(self) -> float:
        return float(self.energy_B.sum())

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
    """NVE: v += dt/2 F/m; x += dt v; F(x); v += dt/2 F/m.

    Fused path: one traced function per step takes x(t+dt) and v(t+dt/2) (its inputs, so forces
    are the gradient with respect to an input), evaluates F(t+dt), finishes v(t+dt) and already
    does the next half kick and drift, returning x(t+2dt) and v(t+3dt/2) for the next call. The
    pending next positions are known exactly, so the Verlet list is rebuilt before a step when
    needed, never redone. Read ``x``/``v``/``f``; set them only before the first ``run``.
    (With the drift inside the graph, i.e. forces as the gradient with respect to an intermediate,
    Inductor in torch 2.13 returned wrong forces, right energies, for the smooth-cutoff model.)
    """

    def __init__(self, potential, positions_N3, masses_N, velocities_N3, dt_fs: float,
                 max_force: float = 1e3, fused: bool | None = None):
        super().__init__(potential, positions_N3, masses_N, velocities_N3, dt_fs, max_force,
                         fused)
        self._pending: tuple[Tensor, Tensor] | None = None
        if self.fused:
            self._fused = self._fused_step
            if potential.compile:
                self._fused = torch.compile(self._fused_step, fullgraph=True, dynamic=False,
                                            options=compile_options(potential.device))
        # CUDA graphs overwrite their outputs on the next replay: keep copies of the state
        self._graphed = bool(self.fused and potential.compile and potential.device.type == "cuda")

    def _fused_step(self, x_N3: Tensor, v_half_N3: Tensor, edge_index_2C: Tensor,
                    offset_C3: Tensor):
        """F(x); v = v_half + dt/2 F/m; then the next v_half and x. Returns
        (v, F, energies, next x, next v_half, [max |F|, energy])."""
        e_B, f_N3 = self.pot.forces_on_pairs(x_N3, edge_index_2C, offset_C3)
        v_N3 = v_half_N3 + 0.5 * self.dt * f_N3 / self.m
        v_next = v_N3 + 0.5 * self.dt * f_N3 / self.m
        x_next = x_N3 + self.dt * v_next
        stats = torch.stack([f_N3.abs().amax(), e_B.sum().double()])
        return v_N3, f_N3, e_B, x_next, v_next, stats

    def _step(self) -> None:
        if not self.fused:
            self.v += 0.5 * self.dt * self.f / self.m
            self.x += self.dt * self.v
            self._evaluate()
            self.v += 0.5 * self.dt * self.f / self.m
            return
        pot = self.pot
        if self._pending is None:  # first step: the half kick and drift from the initial state
            v_half = self.v + 0.5 * self.dt * self.f / self.m
            self._pending = (self.x + self.dt * v_half, v_half)
        x, v_half = self._pending
        if pot.all_pairs and pot._static is not None:
            ei, off = pot._static
        else:  # the pairs inside r_c at x (the Verlet list is rebuilt when x needs it)
            ei, off, _ = pot.static_pairs(x)
        with torch.no_grad():
            if self._graphed:
                torch.compiler.cudagraph_mark_step_begin()
                out = [t.clone() for t in self._fused(x, v_half, ei, off)]
            else:
                out = self._fused(x, v_half, ei, off)
        v, f, e_B, x_next, v_next, stats = out
        fmax, energy = stats.tolist()
        self.x = x
        self._check(fmax, energy)
        self.v, self.f, self.energy_B = v, f, e_B
        self._pending = (x_next, v_next)


class LangevinBAOAB(Integrator):
    """NVT Langevin, BAOAB splitting; ``friction`` gamma in 1/fs (ASE's Langevin uses 1/time)."""

    def __init__(self, potential, positions_N3, masses_N, velocities_N3, dt_fs: float,
                 temperature_K: float, friction_per_fs: float = 0.01,
                 generator: torch.Generator | None = None, max_force: float = 1e3,
                 fused: bool | None = None):
        if temperature_K < 0:
            raise ValueError(f"temperature={temperature_K} K; expected >= 0")
        if friction_per_fs < 0:
            raise ValueError(f"friction={friction_per_fs} 1/fs; expected >= 0")
        super().__init__(potential, positions_N3, masses_N, velocities_N3, dt_fs, max_force,
                         fused)
        if self.fused and getattr(potential, "compile", False):
            # (no CUDA graphs here: the B/A/O updates run eagerly between force calls)
            self._forces = torch.compile(potential.forces_on_pairs, fullgraph=True,
                                         dynamic=False, options=COMPILE_OPTIONS
                                         if potential.device.type == "cpu" else None)
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
