"""ASE-compatible units: A, eV, amu; time in ASE's unit A*sqrt(amu/eV) (1 fs = FS of them)."""

import math

EV_J = 1.602176634e-19
AMU_KG = 1.66053906660e-27
FS = 1e-15 * math.sqrt(EV_J / AMU_KG) / 1e-10
"""One femtosecond in ASE time units (= ase.units.fs, about 0.0982)."""
KB = 8.617333262e-5
"""Boltzmann constant in eV/K (= ase.units.kB)."""
