"""Label alanine-dipeptide MD frames with GFN2-xTB energies and forces (offline; kept for reuse).

Input: (1) mdtraj's example trajectory of alanine dipeptide in vacuum (``examples/data/frame0.xtc``,
501 frames, with ``native.pdb`` as topology) from mdtraj's source distribution (LGPL-2.1):

    pip download --no-deps --no-binary :all: mdtraj   # unpack; files are under examples/data/

(2) frames from GFN2-xTB Langevin MD at 600 K started from frame 0 (coverage of higher-energy
conformations, as the issue asks for 300-600 K sampling).

Labels: GFN2-xTB (Bannwarth, Ehlert, Grimme, JCTC 2019) through ``tblite`` (pip install tblite).
Relabel with DFT by replacing ``label()`` (e.g. pyscf); any rMD17-style npz with the same keys
works with ``ds4sci.data.molecules``.

Output: ``src/ds4sci/data/files/ala2_gfn2.npz`` with float32 ``R`` [T, 22, 3] (Angstrom),
``E`` [T] (eV), ``F`` [T, 22, 3] (eV/Angstrom), int ``z`` [22] and an ``attribution`` string.

    python scripts/make_forcefield_data.py --xtc frame0.xtc --pdb native.pdb --out src/ds4sci/data/files/ala2_gfn2.npz
"""

from __future__ import annotations

import argparse
import time
from importlib.metadata import version

import numpy as np

HARTREE_EV = 27.211386245988
BOHR_A = 0.529177210903


def label(z: np.ndarray, pos_A: np.ndarray) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (eV) and forces (eV/A) of one structure."""
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", z, pos_A / BOHR_A)
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    return float(res.get("energy")) * HARTREE_EV, -res.get("gradient") * HARTREE_EV / BOHR_A


def hot_md(z, pos0_A, n_frames, temperature_K, stride, seed):
    """Frames from GFN2-xTB Langevin MD (ASE, 0.5 fs) started at ``pos0_A``: wider coverage than
    the 300 K trajectory so MD with the learned model stays in the training distribution."""
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from tblite.ase import TBLite

    atoms = Atoms(numbers=z, positions=pos0_A)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature_K, friction=0.02, rng=rng)
    R, E, F = [], [], []
    for _ in range(n_frames):
        dyn.run(stride)
        R.append(atoms.get_positions())
        E.append(atoms.get_potential_energy())
        F.append(atoms.get_forces())
    return np.array(R), np.array(E), np.array(F)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xtc", required=True)
    ap.add_argument("--pdb", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--hot-frames", type=int, default=300,
                    help="extra frames from GFN2-xTB Langevin MD at --hot-temperature (coverage)")
    ap.add_argument("--hot-temperature", type=float, default=600.0)
    ap.add_argument("--hot-stride", type=int, default=4, help="MD steps (0.5 fs) between frames")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import mdtraj

    traj = mdtraj.load(args.xtc, top=args.pdb)
    if args.max_frames:
        traj = traj[: args.max_frames]
    z = np.array([a.element.atomic_number for a in traj.topology.atoms], dtype=np.int64)
    R = traj.xyz.astype(np.float64) * 10.0  # nm -> Angstrom
    E, F = np.empty(len(R)), np.empty_like(R)
    t0 = time.time()
    for t in range(len(R)):
        E[t], F[t] = label(z, R[t])
    n_md = len(R)
    if args.hot_frames:
        R_hot, E_hot, F_hot = hot_md(z, R[0], args.hot_frames, args.hot_temperature,
                                     args.hot_stride, args.seed)
        R, E, F = np.concatenate([R, R_hot]), np.concatenate([E, E_hot]), np.concatenate([F, F_hot])
    print(f"{n_md} mdtraj frames + {len(R) - n_md} hot frames;")
    print(f"labelled {len(R)} frames of {len(z)} atoms in {time.time() - t0:.1f} s")
    np.savez_compressed(
        args.out, R=R.astype(np.float32), E=E.astype(np.float64), F=F.astype(np.float32), z=z,
        attribution=np.array(
            "Conformations: mdtraj examples/data/frame0.xtc + native.pdb (alanine dipeptide MD, "
            "mdtraj project, LGPL-2.1) plus frames of GFN2-xTB Langevin MD at 600 K started "
            "from frame 0. Labels: GFN2-xTB via tblite "
            f"{version('tblite')}, eV and eV/Angstrom. Made by "
            "scripts/make_forcefield_data.py."))


if __name__ == "__main__":
    main()
