"""``run_md``: molecular dynamics of a structure file with a ds4sci force field.

Reads the structure with ASE (xyz, extxyz, pdb, cif, ...), checks it (elements the model knows,
no overlapping atoms, cutoff within half the periodic cell), runs NVE (velocity Verlet) or NVT
(Langevin BAOAB), writes the trajectory (extxyz or ASE .traj, flushed every frame), a thermo log
(step, time, Epot, Ekin, Etot, T, ns/day) and an energy/temperature plot. If the run becomes
unstable it stops with the step number; everything written so far stays readable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ds4sci.md.integrators import LangevinBAOAB, MDInstabilityError, VelocityVerlet, maxwell_boltzmann
from ds4sci.md.potential import Potential, load_model

ENSEMBLES = ("nve", "nvt")
TRAJ_FORMATS = ("extxyz", "traj")


def read_structure(path):
    """A structure via ``ase.io.read``, or ``builtin:ala2`` (frame 0 of the embedded alanine
    dipeptide data)."""
    import ase.io

    if str(path) == "builtin:ala2":
        from ase import Atoms

        from ds4sci.data.molecules import default_dataset
        ds = default_dataset()
        return Atoms(numbers=ds.z[0], positions=ds.pos[0])
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"structure file {str(path)!r} does not exist")
    try:
        atoms = ase.io.read(str(p))
    except Exception as e:
        raise ValueError(f"cannot read structure {str(path)!r} with ase.io "
                         f"({type(e).__name__}: {e}); expected xyz/extxyz/pdb/cif/...") from e
    if len(atoms) == 0:
        raise ValueError(f"structure {str(path)!r} has no atoms")
    return atoms


class _TrajectoryWriter:
    def __init__(self, path: Path, fmt: str):
        self.fmt, self.path = fmt, path
        if fmt == "extxyz":
            self.fh = open(path, "w")
        else:
            from ase.io.trajectory import Trajectory
            self.traj = Trajectory(str(path), "w")

    def write(self, atoms) -> None:
        if self.fmt == "extxyz":
            import ase.io
            ase.io.write(self.fh, atoms, format="extxyz")
            self.fh.flush()
        else:
            self.traj.write(atoms)

    def close(self) -> None:
        (self.fh if self.fmt == "extxyz" else self.traj).close()


def run_md(structure, model="preset:visnet-tiny", ensemble: str = "nvt", dt_fs: float = 0.5,
           temperature_K: float = 300.0, steps: int = 1000, out_dir="md_out",
           traj_format: str = "extxyz", traj_every: int = 10, log_every: int = 10,
           friction_per_fs: float = 0.01, seed: int = 0, dtype: str = "float32",
           device: str = "cpu", skin: float = 1.0, max_force: float = 1e3, plot: bool = True,
           progress: bool = False, compile: bool = False, domain: bool = False,
           edge_chunk_size: int | None = None) -> dict:
    """Run MD; returns a summary dict (also written to ``out_dir/summary.json``).

    Raises ValueError / FileNotFoundError for bad input and ``MDInstabilityError`` (with
    ``.step``) when forces become NaN or exceed ``max_force`` eV/A.

    ``domain=True``: force evaluation split over the torch.distributed ranks (started by torchrun;
    gloo is initialised here if needed), see ``ds4sci.md.domain``; rank 0 writes the outputs.
    ``edge_chunk_size``: the eager force evaluation takes edges in chunks (large systems:
    100,000 water atoms need < 5 GiB with 32,768).
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble={ensemble!r}; expected one of {ENSEMBLES}")
    if traj_format not in TRAJ_FORMATS:
        raise ValueError(f"traj_format={traj_format!r}; expected one of {TRAJ_FORMATS}")
    if steps < 0 or traj_every < 1 or log_every < 1:
        raise ValueError(f"steps={steps}, traj_every={traj_every}, log_every={log_every}; "
                         "expected steps >= 0 and intervals >= 1")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r}; expected 'float32' or 'float64'")
    atoms = structure if hasattr(structure, "positions") else read_structure(structure)
    net = load_model(model) if isinstance(model, str) else model
    periodic = bool(atoms.pbc.any())
    rank = 0
    if domain:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        rank = dist.get_rank()
        compile = False  # each rank's local graph changes size every step: eager
    pot = Potential(net, torch.as_tensor(atoms.numbers),
                    torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64) if periodic else None,
                    torch.as_tensor(atoms.pbc) if periodic else None, skin=skin,
                    dtype=getattr(torch, dtype), device=device, compile=compile,
                    edge_chunk_size=edge_chunk_size)
    pos = torch.as_tensor(atoms.positions, dtype=torch.float64)
    pot.check_overlap(pos)
    masses = torch.as_tensor(atoms.get_masses(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    v0 = maxwell_boltzmann(masses, temperature_K, gen) if temperature_K > 0 else None
    if domain:
        from ds4sci.md.domain import DomainMD
        integ = DomainMD(pot, pos, masses, v0, dt_fs, ensemble, temperature_K, friction_per_fs,
                         gen, max_force=max_force)
    elif ensemble == "nve":
        integ = VelocityVerlet(pot, pos, masses, v0, dt_fs, max_force=max_force)
    else:
        integ = LangevinBAOAB(pot, pos, masses, v0, dt_fs, temperature_K, friction_per_fs, gen,
                              max_force=max_force)

    # a domain-decomposed run gathers the sharded state on rank 0 before each output
    gather = getattr(integ, "gather", lambda: None)
    if rank != 0:  # the other ranks run the same steps and collectives, write nothing
        return _follow(integ, steps, log_every, traj_every, gather)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traj_path = out / f"trajectory.{traj_format}"
    writer = _TrajectoryWriter(traj_path, traj_format)
    log_path = out / "thermo.log"
    log = open(log_path, "w")
    log.write("# step time_fs epot_eV ekin_eV etot_eV temperature_K ns_per_day\n")
    rows: list[tuple] = []
    frame = atoms.copy()

    def snapshot():
        frame.positions = integ.x.numpy()
        frame.set_velocities(integ.v.numpy())
        frame.calc = SinglePointCalculator(frame, energy=integ.epot, forces=integ.f.numpy())
        writer.write(frame)

    def record(ns_day):
        row = (integ.step, integ.step * dt_fs, integ.epot, integ.ekin, integ.epot + integ.ekin,
               integ.temperature, ns_day)
        rows.append(row)
        log.write("%d %.3f %.8f %.8f %.8f %.3f %.4g\n" % row)
        log.flush()

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, unit="step")
    status, error = "completed", None
    t_start = time.perf_counter()
    gather()
    record(float("nan"))
    snapshot()
    try:
        chunk = np.gcd(traj_every, log_every)
        while integ.step < steps:
            n = min(chunk, steps - integ.step)
            t0 = time.perf_counter()
            integ.run(n)
            dt_wall = time.perf_counter() - t0
            ns_day = n * dt_fs * 1e-6 / max(dt_wall, 1e-12) * 86400.0
            write_frame = _frame_due(integ.step, traj_every, steps)
            if write_frame:
                gather()
            if integ.step % log_every == 0 or integ.step == steps:
                record(ns_day)
            if write_frame:
                snapshot()
            if bar is not None:
                bar.update(n)
                bar.set_postfix(ns_day=f"{ns_day:.3g}", T=f"{integ.temperature:.0f}K")
    except MDInstabilityError as e:
        status, error = "unstable", e
    finally:
        writer.close()
        log.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    summary = {
        "status": status, "steps_done": integ.step, "steps_requested": steps, "dt_fs": dt_fs,
        "ensemble": ensemble, "n_atoms": len(atoms), "wall_s": wall,
        "steps_per_s": integ.step / wall if wall > 0 else None,
        "ns_per_day": integ.step * dt_fs * 1e-6 / wall * 86400.0 if wall > 0 else None,
        "neighbor_list_builds": pot.nlist.builds, "trajectory": str(traj_path),
        "thermo_log": str(log_path), "error": None if error is None else str(error),
    }
    if plot and len(rows) > 1:
        summary["plot"] = str(_plot(rows, out / "thermo.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if error is not None:
        raise MDInstabilityError(error.step, f"{error} -- trajectory up to step "
                                 f"{rows[-1][0]} kept in {traj_path}") from error
    return summary


def _frame_due(step: int, traj_every: int, steps: int) -> bool:
    """A trajectory frame is written at this step (rank 0; the others gather for it)."""
    return step % traj_every == 0 or step == steps


def _follow(integ, steps: int, log_every: int, traj_every: int, gather) -> dict:
    """A non-zero rank of a domain-decomposed run: the same steps in the same chunks as rank 0
    and the same collectives (force evaluations, gathers before output), no files."""
    chunk = int(np.gcd(traj_every, log_every))
    try:
        gather()
        while integ.step < steps:
            integ.run(min(chunk, steps - integ.step))
            if _frame_due(integ.step, traj_every, steps):
                gather()
    except MDInstabilityError:
        return {"status": "unstable", "steps_done": integ.step}
    return {"status": "completed", "steps_done": integ.step}


def _plot(rows, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array(rows, dtype=float)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax1.plot(a[:, 1], a[:, 2] - a[0, 4], label="Epot")
    ax1.plot(a[:, 1], a[:, 4] - a[0, 4], label="Etot")
    ax1.set_ylabel("E - Etot(0) (eV)")
    ax1.legend()
    ax2.plot(a[:, 1], a[:, 5])
    ax2.set_ylabel("T (K)")
    ax2.set_xlabel("time (fs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
