"""Generate the alanine-dipeptide reference ensemble embedded in ds4sci (DiG's default data).

Implicit-solvent MD with OpenMM: AMBER ff99SB-ILDN + OBC GB (amber99_obc.xml), 300 K, Langevin
middle integrator (1/ps friction, 2 fs, H-bond constraints), no cutoff. Starts from the 22-atom
ACE-ALA-NME structure of mdtraj's test data (``native.pdb``, LGPL-2.1, mdtraj authors), runs a
short equilibration, then saves every ``--save-every`` steps until ``--minutes`` of wall time
or ``--frames`` frames. Writes ``src/ds4sci/data/files/ala2_md.npz`` (float16 Angstrom
coordinates of all 22 atoms, ~1 MB) and ``ala2.pdb`` (topology).

Usage: python scripts/make_dig_data.py --pdb native.pdb --minutes 12
(openmm is needed only here: ``pip install openmm``; it is not a runtime dependency.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdb", required=True, help="ACE-ALA-NME structure with hydrogens")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                              / "src/ds4sci/data/files"))
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-time cap of production")
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--save-every", type=int, default=500, help="steps of 2 fs (500 = 1 ps)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--threads", type=str, default="1")
    args = parser.parse_args(argv)

    import openmm
    from openmm import app, unit

    pdb = app.PDBFile(args.pdb)
    forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                     constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                                 2.0 * unit.femtoseconds)
    integrator.setRandomNumberSeed(args.seed)
    platform = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(pdb.topology, system, integrator, platform, {"Threads": args.threads})
    sim.context.setPositions(pdb.positions)
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, args.seed)
    sim.step(50_000)  # 100 ps equilibration

    frames = []
    start = time.time()
    while len(frames) < args.frames and time.time() - start < args.minutes * 60:
        sim.step(args.save_every)
        state = sim.context.getState(getPositions=True)
        xyz = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        frames.append(np.asarray(xyz, dtype=np.float32))
    xyz = np.stack(frames)  # [T, 22, 3]
    xyz -= xyz.mean(axis=1, keepdims=True)  # store centred: the model is translation invariant
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ala2.pdb", "w") as handle:
        app.PDBFile.writeFile(pdb.topology, xyz[0] * unit.angstrom, handle)
    np.savez_compressed(
        out / "ala2_md.npz", xyz=xyz.astype(np.float16),
        timestep_ps=np.float32(args.save_every * 0.002), temperature_K=np.float32(300.0),
        description=np.array("alanine dipeptide, amber99sbildn + OBC implicit solvent, 300 K "
                             "Langevin (1/ps, 2 fs, HBonds), OpenMM " + openmm.__version__ +
                             f", seed {args.seed}; coordinates in Angstrom, centred"),
    )
    print(f"wrote {len(xyz)} frames ({len(xyz) * args.save_every * 0.002:.0f} ps) in "
          f"{time.time() - start:.0f} s to {out}")


if __name__ == "__main__":
    main()
