"""MD speed of the ViSNet force field: steps/s, ns/day (1 fs) and peak memory.

Contenders (same ViSNet weights and size, float32, same thread count, velocity Verlet, dt 1 fs):
  ours-compiled  ds4sci.md with ``Potential(compile=True)``: fixed-shape pair list (every pair of
                 a small molecule; else the Verlet list with a 1 A skin padded to a capacity),
                 the whole step (kick, drift, forces by torch.func.grad, kick) compiled as one
                 graph. Compile time is in ``warmup_s`` (3 warm-up steps), not in the timing.
  ours           ds4sci.md eager: exact within-cutoff Verlet list (vesin when installed), forces
                 from one backward without graph.
  ours-chunked   ours with edge chunks of 32k (embedding stage and layers), each recomputed in
                 the backward: the 10k/100k-atom memory path.
  pyg-ase        torch_geometric.nn.models.ViSNet(derivative=True) in an ASE Calculator driven by
                 ASE's VelocityVerlet, the natural user's path. PyG's radius_graph needs pyg-lib or
                 torch_cluster (not installed here); it is replaced by an exact O(N^2) torch.cdist
                 graph with self loops and no neighbour cap, i.e. the same graph as ours.
Systems: alanine dipeptide (22 atoms, embedded data frame 0) and water of about 1k, 10k and 100k
atoms on a liquid-density lattice, as open clusters (both contenders see the same graph; PyG's
ViSNet has no periodic boundaries) and periodic boxes (ours only). Each case runs in a fresh
process (peak RSS = ru_maxrss); ``--repeats R`` alternates the contenders of a system R times
and reports the speed-up per repeat (adjacent runs on this shared machine) and its median.
``--mem-limit-gib G`` caps each worker's address space (a contender that needs more is reported
as "oom"). The model is untrained (random init): speed does not depend on the weights.

Usage: ``python -m ds4sci.bench.md [--quick | --large | --memory | --neighbors] [--repeats R]``
-> benchmarks/results/md_cpu{_quick,_large,_memory,_neighbors,}.{json,csv}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ds4sci.bench.common import machine_info, run_worker, write_rows


CHUNK = 32768
"""Edge chunk of the memory-lean contenders (``ours-chunked``, ``ours-eval-chunk``)."""


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


def _potential(model, atoms, **kwargs):
    """``md.Potential`` of an ASE ``atoms`` (its cell only when periodic)."""
    from ds4sci.md.potential import Potential

    periodic = bool(atoms.pbc.any())
    return Potential(model, torch.as_tensor(atoms.numbers),
                     torch.as_tensor(np.asarray(atoms.cell)) if periodic else None,
                     torch.as_tensor(atoms.pbc) if periodic else None, **kwargs)


def _cap_address_space() -> None:
    limit = os.environ.get("DS4SCI_BENCH_AS_LIMIT_GIB")
    if limit:  # address-space cap: a contender that needs more fails with "oom", not the machine
        cap = int(float(limit) * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def worker(contender: str, sys_name: str, preset_name: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    _cap_address_space()
    from ase import units

    from ds4sci.md.potential import load_model

    atoms = system(sys_name)
    model = load_model(f"preset:{preset_name}")
    masses = torch.as_tensor(atoms.get_masses())
    from ds4sci.md.integrators import VelocityVerlet, maxwell_boltzmann

    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(0))
    # warm-up steps (compilation, first list build, allocator): fewer for the large systems
    warm = 3 if len(atoms) < 5_000 else 1 if len(atoms) < 50_000 else 0
    if contender in ("ours-eval", "ours-eval-ckpt", "ours-eval-chunk", "ours-eval-chunk-only"):
        # One energy+force evaluation: peak memory of large systems (with/without per-layer
        # activation checkpointing), extrapolated linearly in N by the reader.
        if contender == "ours-eval-ckpt":
            model.cfg = model.cfg.replace(activation_checkpointing=True)
        if contender == "ours-eval-chunk-only":  # edge chunks without per-layer checkpointing
            model.set_edge_chunk_size(CHUNK)
        if contender == "ours-eval-chunk":  # edge chunks of 32k, each recomputed in backward
            model.cfg = model.cfg.replace(activation_checkpointing=True)
            model.set_edge_chunk_size(CHUNK)
        pot = _potential(model, atoms, skin=0.0)
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
    if contender in ("ours", "ours-compiled", "ours-chunked"):
        if contender == "ours-chunked":  # memory-lean eager path for the largest systems
            # edge chunks only: per-layer checkpointing on top saves nothing more (10k water:
            # 634 vs 639 MiB) and costs a third forward (45 vs 66 s per evaluation)
            model.set_edge_chunk_size(CHUNK)
        pot = _potential(model, atoms, skin=1.0, compile=contender == "ours-compiled")
        t0 = time.perf_counter()
        integ = VelocityVerlet(pot, torch.as_tensor(atoms.positions), masses, v0, 1.0)
        integ.run(warm)  # includes torch.compile's compilation for ours-compiled
        extra = {"neighbor_list_builds": pot.nlist.builds, "warmup_s": time.perf_counter() - t0,
                 "warmup_steps": warm}
        if contender == "ours-compiled":
            # Inductor's forces at the current state vs the eager model (float32 both).
            ref = _potential(model, atoms).compute(integ.x)
            extra["max_force_diff_vs_eager"] = float((ref.forces.double() - integ.f).abs().max())
            extra["max_abs_force"] = float(integ.f.abs().max())
        e0 = integ.epot + integ.ekin
        t0 = time.perf_counter()
        integ.run(steps)
        wall = time.perf_counter() - t0
        drift = abs(integ.epot + integ.ekin - e0)
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
    elif contender in ("mace-ase", "torchmdnet-ase"):
        # Other packages' models as a user runs them: their ASE calculator (MACE) or their model
        # in an ASE calculator (TorchMD-Net ships no MD driver), ASE's VelocityVerlet.
        from ase import units as ase_units
        from ase.md.verlet import VelocityVerlet as AseVV

        try:
            calc, extra = _contender_calculator(contender, atoms)
        except ImportError as e:  # not installed: a result, not a crash
            return {"status": "unavailable", "error": f"{type(e).__name__}: {e}"}
        atoms.calc = calc
        atoms.set_velocities(v0.numpy())
        dyn = AseVV(atoms, timestep=1.0 * ase_units.fs)
        t0 = time.perf_counter()
        dyn.run(warm)
        extra["warmup_s"] = time.perf_counter() - t0
        e0 = atoms.get_total_energy()
        t0 = time.perf_counter()
        dyn.run(steps)
        wall = time.perf_counter() - t0
        drift = abs(atoms.get_total_energy() - e0)
    else:
        raise ValueError(f"unknown contender {contender!r}; expected one of ours, ours-compiled, "
                         "ours-chunked, pyg-ase, mace-ase, torchmdnet-ase")
    sps = steps / wall
    return {"status": "ok", "n_atoms": len(atoms), "steps": steps, "wall_s": wall,
            "steps_per_s": sps, "ns_per_day_1fs": sps * 1e-6 * 86400.0,
            "hours_per_1M_steps": 1e6 / sps / 3600.0, "abs_energy_change_eV": drift,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def _contender_calculator(contender: str, atoms):
    """(ASE calculator, info) for MACE / TorchMD-Net at about visnet-tiny's cost: 2 interaction
    layers, 32 channels (MACE: 16x0e+16x1o), r_c = 5 A, float32, random init (seed 0)."""
    torch.manual_seed(0)
    elements = sorted(set(int(z) for z in atoms.numbers))
    if contender == "mace-ase":
        # e3nn 0.4.4 (pinned by mace-torch 0.3.16) loads its constants with torch.load's
        # pre-2.6 default; with torch >= 2.6 a user must allow full unpickling as here.
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        from e3nn import o3
        from mace.calculators import MACECalculator
        from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock

        model = MACE(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
                     interaction_cls=RealAgnosticResidualInteractionBlock,
                     interaction_cls_first=RealAgnosticInteractionBlock, num_interactions=2,
                     num_elements=len(elements), hidden_irreps=o3.Irreps("16x0e+16x1o"),
                     MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(elements)),
                     avg_num_neighbors=20.0, atomic_numbers=elements, correlation=3,
                     gate=torch.nn.functional.silu).float()
        calc = MACECalculator(models=model, device="cpu", default_dtype="float32")
        import mace
        info = {"version": getattr(mace, "__version__", "0.3.16"),
                "model": "MACE r_max 5, 2 interactions, 16x0e+16x1o, max_ell 2, correlation 3"}
    else:
        from ase.calculators.calculator import Calculator, all_changes
        from torchmdnet.models.model import create_model

        args = {"model": "tensornet", "precision": 32, "embedding_dimension": 32,
                "num_layers": 2, "num_rbf": 16, "rbf_type": "expnorm", "trainable_rbf": False,
                "activation": "silu", "cutoff_lower": 0.0, "cutoff_upper": 5.0, "max_z": 100,
                "max_num_neighbors": 64, "equivariance_invariance_group": "O(3)",
                "static_shapes": False, "box_vecs": None, "derivative": True, "atom_filter": -1,
                "prior_model": None, "output_model": "Scalar", "reduce_op": "add",
                "check_errors": True, "vector_cutoff": False}
        net = create_model(args).eval()

        class TorchMDNetCalc(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                z = torch.as_tensor(self.atoms.numbers, dtype=torch.long)
                pos = torch.tensor(self.atoms.positions, dtype=torch.float32)
                e, f = net(z, pos, torch.zeros_like(z))
                self.results = {"energy": float(e.sum()), "forces": f.detach().double().numpy()}

        calc = TorchMDNetCalc()
        info = {"version": "3.1.0 (sdist)", "model": "TensorNet, 32 channels, 2 layers, 16 RBF, "
                "r_c 5 A, max 64 neighbours"}
        model = net
    info["params"] = sum(p.numel() for p in model.parameters())
    return calc, info


def _domain_rank(rank: int, world: int, init_file: str, sys_name: str, preset_name: str,
                 steps: int, chunk: int, queue) -> None:
    """One gloo rank of the domain-decomposed contender: ``DomainMD`` velocity Verlet (atoms
    sharded by slab, halo exchange; edges in chunks of ``chunk``, 0 = all at once)."""
    import torch.distributed as dist

    from ds4sci.md.domain import DomainMD
    from ds4sci.md.integrators import maxwell_boltzmann
    from ds4sci.md.potential import load_model

    torch.set_num_threads(1)
    _cap_address_space()  # per process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    atoms = system(sys_name)
    masses = torch.as_tensor(atoms.get_masses())
    pot = _potential(load_model(f"preset:{preset_name}"), atoms, edge_chunk_size=chunk or None)
    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    integ = DomainMD(pot, torch.as_tensor(atoms.positions), masses, v0, 1.0)
    first = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    integ.run(steps)
    wall = time.perf_counter() - t0
    fmax = torch.tensor([float(integ.fo.abs().max())])
    dist.all_reduce(fmax, op=dist.ReduceOp.MAX)
    queue.put({"rank": rank, "wall_s": wall, "first_eval_s": first, "epot": integ.epot,
               "fmax": float(fmax[0]), "owned_atoms": int(integ.gid.numel()),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    dist.destroy_process_group()


def domain_worker(sys_name: str, preset_name: str, steps: int, world: int, chunk: int) -> dict:
    """``world`` gloo processes (one thread each) sharing one MD run of ``sys_name``."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = tempfile.mktemp(prefix="ds4sci_md_domain_")
    procs = [ctx.Process(target=_domain_rank, args=(r, world, init_file, sys_name, preset_name,
                                                    steps, chunk, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    res = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    res.sort(key=lambda r: r["rank"])
    wall = max(r["wall_s"] for r in res)
    return {"status": "ok", "n_atoms": len(system(sys_name)), "processes": world, "steps": steps,
            "edge_chunk": chunk, "max_abs_force_eV_A": res[0]["fmax"],
            "wall_s": wall, "steps_per_s": steps / wall, "ns_per_day_1fs": steps / wall * 0.0864,
            "epot_eV": res[0]["epot"], "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in res],
            "peak_rss_mib_sum": sum(r["peak_rss_mib"] for r in res),
            "owned_atoms_per_rank": [r["owned_atoms"] for r in res],
            "first_eval_s_per_rank": [r["first_eval_s"] for r in res]}


def _nve(model_spec: str, dt_fs: float, steps: int, every: int, seed: int = 0,
         smooth: bool = False):
    """Velocity Verlet (compiled fused path, float32 model, float64 state and energy sums) of
    alanine dipeptide from 300 K Maxwell-Boltzmann velocities: (rows, wall_s, warmup_s)."""
    from ds4sci.md.integrators import VelocityVerlet, maxwell_boltzmann
    from ds4sci.md.potential import Potential, load_model

    atoms = system("ala2")
    masses = torch.as_tensor(atoms.get_masses())
    model = load_model(model_spec)
    model.cfg = model.cfg.replace(smooth_cutoff=smooth)  # either way: the variant asked for
    for layer in model.layers:
        layer.smooth_cutoff = smooth
    pot = Potential(model, torch.as_tensor(atoms.numbers), compile=True)
    v0 = maxwell_boltzmann(masses, 300.0, torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    integ = VelocityVerlet(pot, torch.as_tensor(atoms.positions), masses, v0, dt_fs)
    integ.run(2)
    integ.step = 0
    warmup = time.perf_counter() - t0
    rows = [(0, 0.0, integ.epot, integ.ekin, integ.epot + integ.ekin, integ.temperature)]
    t0 = time.perf_counter()
    while integ.step < steps:
        integ.run(min(every, steps - integ.step))
        rows.append((integ.step, integ.step * dt_fs, integ.epot, integ.ekin,
                     integ.epot + integ.ekin, integ.temperature))
    return np.array(rows), time.perf_counter() - t0, warmup


def drift(model_spec: str, steps: int, dt_fs: float, threads: int, smooth: bool) -> dict:
    """NVE energy conservation of alanine dipeptide over ``steps`` steps, and the dt^2 check
    (RMS Etot error over 1 ps at dt and dt/2; velocity Verlet's error scales as dt^2 -> 4)."""
    torch.set_num_threads(threads)
    every = max(1, steps // 1000)
    a, wall, warmup = _nve(model_spec, dt_fs, steps, every, smooth=smooth)
    t_ns = a[:, 1] * 1e-6
    etot = a[:, 4]
    slope, _ = np.polyfit(t_ns, etot, 1)
    n_atoms = 22
    sps = steps / wall
    out = {"system": "ala2", "n_atoms": n_atoms, "model": model_spec, "smooth_cutoff": smooth,
           "dt_fs": dt_fs,
           "steps": steps, "simulated_ps": steps * dt_fs * 1e-3, "threads": threads,
           "wall_s": wall, "warmup_s_incl_compile": warmup, "steps_per_s": sps,
           "ns_per_day": sps * dt_fs * 1e-6 * 86400.0,
           "projected_hours_per_1M_steps": 1e6 / sps / 3600.0,
           "etot0_eV": float(etot[0]),
           "drift_eV_per_ns_linear_fit": float(slope),
           "drift_meV_per_atom_per_ns": float(slope) / n_atoms * 1e3,
           "etot_final_minus_initial_eV": float(etot[-1] - etot[0]),
           "etot_max_abs_deviation_eV": float(np.abs(etot - etot[0]).max()),
           "etot_std_eV": float(etot.std()), "epot_std_eV": float(a[:, 2].std()),
           "temperature_mean_K": float(a[:, 5].mean()),
           "temperature_min_max_K": [float(a[:, 5].min()), float(a[:, 5].max())]}
    # dt^2: 1 ps at dt and dt/2, same start, Etot sampled every dt
    fluct = {}
    for d in (dt_fs, dt_fs / 2):
        n = int(round(1000.0 / d))
        b, _, _ = _nve(model_spec, d, n, max(1, int(round(dt_fs / d))), smooth=smooth)
        fluct[d] = float(np.sqrt(np.mean((b[:, 4] - b[0, 4]) ** 2)))
    out["dt2_check"] = {"rms_etot_error_eV": {str(k): v for k, v in fluct.items()},
                        "ratio": fluct[dt_fs] / fluct[dt_fs / 2], "expected_ratio": 4.0,
                        "simulated_ps_each": 1.0}
    out["series_every_steps"] = every
    out["series"] = {"step": a[:, 0].astype(int).tolist()[:: max(1, len(a) // 200)],
                     "etot_eV": etot.tolist()[:: max(1, len(a) // 200)],
                     "temperature_K": a[:, 5].tolist()[:: max(1, len(a) // 200)]}
    return out


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
    ap.add_argument("--drift", action="store_true",
                    help="only: NVE energy drift of alanine dipeptide (--drift-steps, --dt, --model)")
    ap.add_argument("--drift-steps", type=int, default=100_000)
    ap.add_argument("--drift-variants", default="smooth,pyg",
                    help="smooth: the smooth cutoff; pyg: PyG's equations (same weights)")
    ap.add_argument("--dt", type=float, default=0.5, help="fs (--drift)")
    ap.add_argument("--model", default="preset:visnet-tiny", help="checkpoint for --drift")
    ap.add_argument("--large", action="store_true",
                    help="water 10k (open: vs PyG+ASE; periodic) and 100k (periodic, chunked)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of the mode's systems")
    ap.add_argument("--contenders", default=None,
                    help="comma-separated subset of the mode's contenders")
    ap.add_argument("--repeats", type=int, default=1,
                    help="repeat each system's contenders, alternating (ratios per repeat)")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="address-space limit of each worker (RLIMIT_AS); exceeding it = 'oom'")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    ap.add_argument("--contenders-path", default=None,
                    help="directory with mace-torch / torchmd-net (pip install --target DIR)")
    ap.add_argument("--stem", default=None, help="results file name (default: by mode)")
    ap.add_argument("--domain", action="store_true",
                    help="only: one MD step of --domain-system over 1, 2, 4 gloo processes")
    ap.add_argument("--domain-system", default="water-10k-pbc")
    ap.add_argument("--domain-procs", default="1,2,4")
    ap.add_argument("--domain-chunk", type=int, default=CHUNK,
                    help="edge chunk of --domain (0 = none)")
    ap.add_argument("--domain-worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.domain_worker:
        s_, p_, n_, w_, c_ = args.domain_worker
        print(json.dumps(domain_worker(s_, p_, int(n_), int(w_), int(c_))))
        return 0
    if args.domain:
        env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
        if args.mem_limit_gib:
            env["DS4SCI_BENCH_AS_LIMIT_GIB"] = str(args.mem_limit_gib)
        rows = []
        for world in [int(w) for w in args.domain_procs.split(",")]:
            res = run_worker("ds4sci.bench.md", ["--domain-worker", args.domain_system,
                                                 args.preset, "1", str(world),
                                                 str(args.domain_chunk)],
                             timeout=args.timeout, env=env)
            rows.append({"system": args.domain_system, "contender": "ours-domain",
                         "preset": args.preset, "threads_per_process": 1, **res})
            print(json.dumps(rows[-1]), flush=True)
        meta = {**machine_info(), "load_average_at_end": os.getloadavg()}
        print("wrote", *write_rows(rows, meta, Path(args.out), args.stem or "md_cpu_domain"))
        return 0
    if args.worker:
        c, s, p, n, t = args.worker
        print(json.dumps(worker(c, s, p, int(n), int(t))))
        return 0
    if args.drift:
        res = []
        variants = {"smooth": True, "pyg": False}
        for v in args.drift_variants.split(","):
            if v not in variants:
                raise SystemExit(f"--drift-variants: {v!r}; expected a subset of smooth,pyg")
        for smooth in [variants[v] for v in args.drift_variants.split(",")]:
            # smooth-cutoff variant first (the conservation figure)
            # PyG's equations: the jumps at r_c dominate within 10 ps, so 20k steps suffice
            n = args.drift_steps if smooth else min(args.drift_steps, 20_000)
            res.append(drift(args.model, n, args.dt, args.threads, smooth))
            print(json.dumps({k: v for k, v in res[-1].items() if k != "series"}), flush=True)
        meta = {**machine_info(), "load_average_at_end": os.getloadavg()}
        path = Path(args.out) / f"{args.stem or 'md_cpu_nve_drift'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": meta, "results": res}, indent=2) + "\n")
        print("wrote", path)
        return 0
    if args.neighbors:
        torch.set_num_threads(args.threads)
        rows = neighbor_rows()
        for r in rows:
            print(json.dumps(r))
        print("wrote", *write_rows(rows, machine_info(), Path(args.out), "md_cpu_neighbors"))
        return 0
    # (system, contender, steps, threads); contenders of one system alternate, R repeats
    t = args.threads
    if args.memory:
        jobs = [(name, c, 1, t) for name in args.memory_systems.split(",")
                for c in args.memory_contenders.split(",")]
    elif args.quick:
        jobs = [("ala2", "ours-compiled", 1000, t), ("ala2", "pyg-ase", 300, t),
                ("ala2", "ours", 200, t), ("ala2", "ours-compiled", 300, 2),
                ("ala2", "mace-ase", 300, t), ("ala2", "torchmdnet-ase", 300, t),
                ("water-1k", "ours-compiled", 10, t), ("water-1k", "pyg-ase", 5, t),
                ("water-1k", "ours", 5, t), ("water-1k", "mace-ase", 5, t),
                ("water-1k", "torchmdnet-ase", 5, t), ("water-1k-pbc", "ours-compiled", 10, t)]
    elif args.large:
        jobs = [("water-10k", "ours-compiled", 3, t), ("water-10k", "pyg-ase", 2, t),
                ("water-10k", "ours", 2, t), ("water-10k", "torchmdnet-ase", 2, t),
                ("water-10k", "mace-ase", 1, t), ("water-10k-pbc", "ours-compiled", 3, t),
                ("water-10k-pbc", "ours", 2, t), ("water-10k-pbc", "ours-chunked", 2, t),
                ("water-100k-pbc", "ours-chunked", 1, t), ("water-100k", "pyg-ase", 1, t),
                ("water-100k", "torchmdnet-ase", 1, t), ("water-100k", "mace-ase", 1, t)]
    else:
        jobs = [("ala2", "ours-compiled", 3000, t), ("ala2", "pyg-ase", 1000, t),
                ("ala2", "ours", 500, t), ("water-1k", "ours-compiled", 50, t),
                ("water-1k", "pyg-ase", 20, t), ("water-1k-pbc", "ours-compiled", 50, t)]
    if args.systems:
        jobs = [j for j in jobs if j[0] in args.systems.split(",")]
    if args.contenders:
        jobs = [j for j in jobs if j[1] in args.contenders.split(",")]
    env = {"DS4SCI_BENCH_AS_LIMIT_GIB": str(args.mem_limit_gib)} if args.mem_limit_gib else {}
    if args.large or args.memory:
        # glibc's adaptive mmap threshold keeps freed chunk buffers (MBs each) in the heap, so
        # RSS grows with fragmentation (10k water, chunked: 1,829 MiB vs 640 MiB with a fixed
        # threshold); large systems run with a fixed one, as a user should (docs/forcefield.md).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if args.contenders_path:  # MACE / TorchMD-Net installed with pip --target (not in .[test])
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in (os.environ.get("PYTHONPATH"), args.contenders_path) if p])
    systems = list(dict.fromkeys(j[0] for j in jobs))
    rows = []
    for sys_name in systems:
        for rep in range(args.repeats):
            for name, contender, steps, threads in jobs:
                if name != sys_name or (contender == "pyg-ase" and name.endswith("-pbc")):
                    continue
                res = run_worker("ds4sci.bench.md", ["--worker", contender, name, args.preset,
                                                     str(steps), str(threads)],
                                 timeout=args.timeout, env=env)
                row = {"system": name, "contender": contender, "preset": args.preset,
                       "threads": threads, "repeat": rep, **res}
                if res.get("status") in ("oom", "error", "timeout") and args.mem_limit_gib:
                    row["address_space_limit_gib"] = args.mem_limit_gib
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for sys_name in systems:
        mine = [r for r in rows if r["system"] == sys_name and r.get("status") == "ok"
                and "steps_per_s" in r]
        keys = list(dict.fromkeys((r["contender"], r["threads"]) for r in mine))
        ref = [r for r in mine if r["contender"] == "pyg-ase"]
        for c, th in keys:
            rs = [r for r in mine if (r["contender"], r["threads"]) == (c, th)]
            sps = statistics.median(r["steps_per_s"] for r in rs)
            entry = {"system": sys_name, "contender": c, "threads": th, "runs": len(rs),
                     "median_steps_per_s": sps, "ns_per_day_1fs": sps * 0.0864,
                     "hours_per_1M_steps": 1e6 / sps / 3600.0,
                     "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
            if ref and c != "pyg-ase":
                # ratio within each repeat (adjacent runs), then the median of those ratios
                by_rep = {r["repeat"]: r["steps_per_s"] for r in ref}
                ratios = [r["steps_per_s"] / by_rep[r["repeat"]] for r in rs
                          if r["repeat"] in by_rep]
                entry["speedup_vs_pyg_ase_per_repeat"] = ratios
                entry["median_speedup_vs_pyg_ase"] = statistics.median(ratios)
            summary.append(entry)
            print(json.dumps(entry), flush=True)
    failed = [{"system": r["system"], "contender": r["contender"], "status": r["status"],
               "error": r.get("error")} for r in rows if r.get("status") != "ok"]
    rows = [{"kind": "run", **r} for r in rows] + [{"kind": "summary", **e} for e in summary]
    if failed:
        print("not ok:", json.dumps(failed))
    meta = {**machine_info(), "quick": args.quick, "repeats": args.repeats,
            "load_average_at_end": os.getloadavg()}
    stem = args.stem or ("md_cpu_memory" if args.memory else "md_cpu_quick" if args.quick
                         else "md_cpu_large" if args.large else "md_cpu")
    paths = write_rows(rows, meta, Path(args.out), stem)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
