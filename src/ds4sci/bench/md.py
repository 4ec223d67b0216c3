"""MD speed of the ViSNet force field: steps/s, ns/day (1 fs) and peak memory.

Contenders (same ViSNet weights and size, float32, same thread count):
  ours-compiled  the same with torch.compile(dynamic=True) (compile time excluded: warm-up).
  ours        ds4sci.md: Verlet list (vesin when installed, else the torch cell list; + skin), velocity Verlet in float64 state,
              forces from one backward without graph.
  pyg-ase     torch_geometric.nn.models.ViSNet(derivative=True) in an ASE Calculator driven by
              ASE's VelocityVerlet, the natural user's path. PyG's radius_graph needs pyg-lib or
              torch_cluster (not installed here); it is replaced by an exact O(N^2) torch.cdist
              graph with self loops and no neighbour cap, i.e. the same graph as ours.
Systems: alanine dipeptide (22 atoms, embedded data frame 0) and water clusters of about 1k
(and, full mode, 10k) atoms cut from a liquid-density lattice (open boundaries, so both
contenders see the same graph; PyG's ViSNet has no periodic boundaries); ours also runs the
periodic box. Each case runs in a fresh process (peak RSS = ru_maxrss). The model is untrained
(random init): speed does not depend on the weights; the energy drift reported is of that model.

Usage: ``python -m ds4sci.bench.md [--quick]`` -> benchmarks/results/md_cpu.{json,csv}
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ds4sci.bench.common import machine_info, run_worker, write_rows


def water_box(n_molecules: int, seed: int = 0):
    """Liquid-density water (1 g/cm^3, 29.9 A^3 per molecule) on a jittered cubic lattice."""
    from ase import Atoms

    n_side = math.ceil(n_molecules ** (1 / 3))
    box = (29.9 * n_side ** 3) ** (1 / 3)
    a = box / n_side
    rng = np.random.default_rng(seed)
    mol = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    pos, num = [], []
    for ijk in np.ndindex(n_side, n_side, n_side):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pos.append((np.array(ijk) + 0.5) * a + mol @ q.T)
        num += [8, 1, 1]
    return Atoms(numbers=num, positions=np.concatenate(pos), cell=[box] * 3, pbc=True)


def system(name: str):
    from ase import Atoms

    from ds4sci.data.molecules import default_dataset

    if name == "ala2":
        ds = default_dataset()
        return Atoms(numbers=ds.z[0], positions=ds.pos[0])
    n_atoms = {"water-1k": 1000, "water-10k": 10000,
               "water-100k": 100000}[name.removesuffix("-pbc")]
    atoms = water_box(n_atoms // 3)
    if not name.endswith("-pbc"):
        atoms.pbc = False
    return atoms


def worker(contender: str, sys_name: str, preset_name: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from ase import units

    from ds4sci.md.potential import load_model

    atoms = system(sys_name)
    model = load_model(f"preset:{preset_name}")
    masses = torch.as_tensor(atoms.get_masses())
    from ds4sci.md.integrators import VelocityVerlet, maxwell_boltzmann

    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(0))
    warm = 3
    if contender in ("ours-eval", "ours-eval-ckpt", "ours-eval-chunk"):
        # One energy+force evaluation: peak memory of large systems (with/without per-layer
        # activation checkpointing), extrapolated linearly in N by the reader.
        from ds4sci.md.potential import Potential

        if contender == "ours-eval-ckpt":
            model.cfg = model.cfg.replace(activation_checkpointing=True)
        if contender == "ours-eval-chunk":  # edge chunks of 32k, each recomputed in backward
            model.cfg = model.cfg.replace(activation_checkpointing=True, edge_chunk_size=32768)
            for layer in model.layers:
                layer.edge_chunk_size = 32768
        periodic = bool(atoms.pbc.any())
        pot = Potential(model, torch.as_tensor(atoms.numbers),
                        torch.as_tensor(np.asarray(atoms.cell)) if periodic else None,
                        torch.as_tensor(atoms.pbc) if periodic else None, skin=0.0)
        pos = torch.as_tensor(atoms.positions)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        pot.compute(pos)
        wall = time.perf_counter() - t0
        n_edges = int(pot.nlist.within_cutoff(pos)[0].shape[1])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"status": "ok", "n_atoms": len(atoms), "n_edges": n_edges, "eval_s": wall,
                "peak_rss_mib": peak, "rss_before_eval_mib": rss0,
                "peak_minus_before_mib": peak - rss0}
    if contender in ("ours", "ours-compiled"):
        from ds4sci.md.potential import Potential

        periodic = bool(atoms.pbc.any())
        pot = Potential(model, torch.as_tensor(atoms.numbers),
                        torch.as_tensor(np.asarray(atoms.cell)) if periodic else None,
                        torch.as_tensor(atoms.pbc) if periodic else None, skin=1.0,
                        compile=contender == "ours-compiled")
        integ = VelocityVerlet(pot, torch.as_tensor(atoms.positions), masses, v0, 1.0)
        integ.run(warm)
        e0 = integ.epot + integ.ekin
        t0 = time.perf_counter()
        integ.run(steps)
        wall = time.perf_counter() - t0
        drift = abs(integ.epot + integ.ekin - e0)
        extra = {"neighbor_list_builds": pot.nlist.builds}
    elif contender == "pyg-ase":
        if atoms.pbc.any():
            return {"status": "unsupported", "error": "PyG ViSNet has no periodic boundaries"}
        import torch_geometric.nn.models.visnet as pv
        from ase.calculators.calculator import Calculator, all_changes
        from ase.md.verlet import VelocityVerlet as AseVV

        from ds4sci.models.visnet import pyg_kwargs
        from ds4sci.models.visnet.interop import convert_pyg_state_dict  # noqa: F401

        def radius_graph(pos, r, batch=None, loop=False, max_num_neighbors=32, **_):
            adj = torch.cdist(pos, pos) < r
            if loop:
                adj.fill_diagonal_(True)
            j, i = adj.nonzero(as_tuple=True)
            return torch.stack([j, i])

        pv.radius_graph = radius_graph
        ref = pv.ViSNet(**pyg_kwargs(model.cfg.replace(derivative=True))).eval()

        class PygCalc(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                z = torch.as_tensor(self.atoms.numbers)
                pos = torch.tensor(self.atoms.positions, dtype=torch.float32)
                e, f = ref(z, pos, torch.zeros_like(z))
                self.results = {"energy": float(e.sum()), "forces": f.detach().double().numpy()}

        atoms.calc = PygCalc()
        atoms.set_velocities(v0.numpy())
        dyn = AseVV(atoms, timestep=1.0 * units.fs)
        dyn.run(warm)
        e0 = atoms.get_total_energy()
        t0 = time.perf_counter()
        dyn.run(steps)
        wall = time.perf_counter() - t0
        drift = abs(atoms.get_total_energy() - e0)
        extra = {}
    else:
        raise ValueError(f"unknown contender {contender!r}; expected 'ours' or 'pyg-ase'")
    sps = steps / wall
    return {"status": "ok", "n_atoms": len(atoms), "steps": steps, "wall_s": wall,
            "steps_per_s": sps, "ns_per_day_1fs": sps * 1e-6 * 86400.0,
            "hours_per_1M_steps": 1e6 / sps / 3600.0, "abs_energy_change_eV": drift,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def neighbor_rows(repeats: int = 3) -> list[dict]:
    """Time one neighbour-list build (r = 6 A = cutoff + skin) per backend on periodic water."""
    from ds4sci.ops.neighbors import neighbor_list, vesin_available

    rows = []
    for name in ("water-1k-pbc", "water-10k-pbc"):
        atoms = system(name)
        pos = torch.as_tensor(atoms.positions)
        cell = torch.as_tensor(np.asarray(atoms.cell))
        pbc = torch.tensor([True] * 3)
        for backend in ["torch"] + (["vesin"] if vesin_available() else []):
            neighbor_list(pos, 6.0, cell, pbc, backend=backend)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ei, _ = neighbor_list(pos, 6.0, cell, pbc, backend=backend)
                times.append(time.perf_counter() - t0)
            rows.append({"system": name, "backend": backend, "n_atoms": len(atoms),
                         "n_pairs": int(ei.shape[1]), "build_s": min(times)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ala2 + water-1k, few steps (< 1 min)")
    ap.add_argument("--preset", default="visnet-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--memory", action="store_true",
                    help="only: peak memory of one force evaluation of periodic water boxes")
    ap.add_argument("--memory-systems", default="water-10k-pbc",
                    help="comma-separated systems for --memory (water-100k-pbc: ~10 min)")
    ap.add_argument("--memory-contenders", default="ours-eval,ours-eval-ckpt,ours-eval-chunk")
    ap.add_argument("--neighbors", action="store_true",
                    help="only: neighbour-list build time, torch cell list vs vesin")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        c, s, p, n, t = args.worker
        print(json.dumps(worker(c, s, p, int(n), int(t))))
        return 0
    if args.neighbors:
        torch.set_num_threads(args.threads)
        rows = neighbor_rows()
        for r in rows:
            print(json.dumps(r))
        print("wrote", *write_rows(rows, machine_info(), Path(args.out), "md_cpu_neighbors"))
        return 0
    if args.quick:
        cases = [("ala2", 200), ("water-1k", 5), ("water-1k-pbc", 5)]
    else:
        cases = [("ala2", 2000), ("water-1k", 50), ("water-1k-pbc", 50), ("water-10k", 5),
                 ("water-10k-pbc", 5)]
    contenders = ("ours", "ours-compiled", "pyg-ase")
    if args.memory:
        cases = [(name, 1) for name in args.memory_systems.split(",")]
        contenders = tuple(args.memory_contenders.split(","))
    rows = []
    for sys_name, steps in cases:
        for contender in contenders:
            if contender == "pyg-ase" and sys_name.endswith("-pbc"):
                continue
            res = run_worker("ds4sci.bench.md", ["--worker", contender, sys_name, args.preset,
                                                 str(steps), str(args.threads)], timeout=900)
            row = {"system": sys_name, "contender": contender, "preset": args.preset,
                   "threads": args.threads, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for sys_name in {r["system"] for r in rows}:
        by = {r["contender"]: r for r in rows if r["system"] == sys_name and r["status"] == "ok"}
        for ours in ("ours", "ours-compiled"):
            if ours in by and "pyg-ase" in by:
                by[ours]["speedup_vs_pyg_ase"] = by[ours]["steps_per_s"] / by["pyg-ase"]["steps_per_s"]
    meta = {**machine_info(), "quick": args.quick}
    stem = "md_cpu_memory" if args.memory else "md_cpu_quick" if args.quick else "md_cpu"
    paths = write_rows(rows, meta, Path(args.out), stem)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
