"""DiG on alanine dipeptide: sample quality and speed of the samplers vs running MD itself.

For a trained checkpoint, each sampler setting (``heun:<steps>``: the deterministic
probability-flow ODE; ``edm:<steps>``: EDM's stochastic Heun; ``ancestral:<steps>``: DiG's
ancestral SDE sampler) draws ``--num-samples`` conformations and is scored against the embedded MD reference: Jensen-Shannon divergence of the
(phi, psi) histogram (36 x 36 bins, nats), basin populations, fraction with every bond within 10 %
of the MD mean, fraction with the MD's C-alpha handedness (L), samples per second; and the
JS and basins of the same samples after reflecting the mirror images (``mirror_fixed_*``,
:func:`ds4sci.models.dig.sample.fix_mirror_images`: post-processing, reported apart). Each DiG sample is drawn from fresh noise, so every sample is
statistically independent.

MD side: the decorrelation time is measured on the reference trajectory itself (statistical
inefficiency g = 1 + 2 sum_k C(k), summed to the first zero, of cos/sin phi, cos/sin psi and
the basin indicators; the largest is used), and MD's speed on this machine is measured by
running the same system (OpenMM: amber99sbildn + OBC, 2 fs Langevin, HBond constraints, CPU
platform with the same number of threads as torch) for ``--md-seconds``. Independent MD
samples per second = (steps/s) / (g frames x steps per frame).

A noise floor comes with it: the JS divergence of ``--num-samples`` frames drawn at random from
the MD itself against the whole reference (finite-sample bias of the histogram metric).

Usage: ``python -m ds4sci.bench.dig_quality --checkpoint RUN/dig_ala2.pt``
Results: ``<out>/<stem>.json|csv`` + ``<stem>.png`` (JS and valid bonds vs network evaluations).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .common import machine_info, merge_rows, save_figure, subplots, write_rows


def parse_setting(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if sampler not in ("heun", "edm", "ancestral") or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler setting {text!r}; expected 'heun:<steps>', 'edm:<steps>' "
                         "or 'ancestral:<steps>' with steps >= 1")
    return sampler, int(steps)


def network_evaluations(sampler: str, steps: int) -> int:
    """Score-network calls per sample: Heun skips its correction on the last step."""
    return 2 * steps - 1 if sampler in ("heun", "edm") else steps


def md_decorrelation(xyz: np.ndarray, topology) -> dict:
    """Statistical inefficiency (frames) of the reference's slow observables."""
    from ..data import conformations as conf

    phi, psi = conf.phi_psi(xyz, topology)
    signals = {"cos_phi": np.cos(np.radians(phi)), "sin_phi": np.sin(np.radians(phi)),
               "cos_psi": np.cos(np.radians(psi)), "sin_psi": np.sin(np.radians(psi))}
    labels = conf.basin(phi, psi)
    for i, name in enumerate(conf.BASINS):
        indicator = (labels == i).astype(np.float64)
        if 0 < indicator.mean() < 1:
            signals[f"basin_{name}"] = indicator
    return {name: conf.autocorrelation_time(s) for name, s in signals.items()}


def openmm_steps_per_second(seconds: float, threads: int) -> dict:
    """Steps/s of the reference's system on this machine's CPU (OpenMM), after a short warm-up."""
    import openmm
    from openmm import app, unit

    from ..data import conformations as conf

    pdb = app.PDBFile(str(conf.ALA2_PDB))
    forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                     constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                                 2.0 * unit.femtoseconds)
    platform = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(pdb.topology, system, integrator, platform, {"Threads": str(threads)})
    sim.context.setPositions(pdb.positions)
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    sim.step(2000)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sim.step(1000)
        steps += 1000
    sim.context.getState(getEnergy=True)  # wait for the last steps
    elapsed = time.perf_counter() - start
    return {"engine": f"OpenMM {openmm.__version__} CPU platform", "threads": threads,
            "steps": steps, "seconds": elapsed, "steps_per_second": steps / elapsed,
            "timestep_fs": 2.0}


def md_noise_floor(xyz: np.ndarray, topology, n: int, repeats: int = 5, seed: int = 0) -> dict:
    """JS divergence of n random MD frames (and of the first vs second half) against the MD."""
    from ..data import conformations as conf

    phi, psi = conf.phi_psi(xyz, topology)
    ref = conf.ramachandran_histogram(phi, psi)
    rng = np.random.default_rng(seed)
    js = []
    for _ in range(repeats):
        idx = rng.choice(len(xyz), size=min(n, len(xyz)), replace=False)
        js.append(conf.js_divergence(conf.ramachandran_histogram(phi[idx], psi[idx]), ref))
    half = len(xyz) // 2
    halves = conf.js_divergence(conf.ramachandran_histogram(phi[:half], psi[:half]),
                                conf.ramachandran_histogram(phi[half:], psi[half:]))
    return {"random_md_frames": n, "js_random_frames_mean": float(np.mean(js)),
            "js_random_frames_max": float(np.max(js)), "js_first_vs_second_half": halves}


def plot(rows: list[dict], meta: dict, path: Path) -> Path:
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for sampler, colour in (("heun", "C0"), ("edm", "C2"), ("ancestral", "C1")):
        pts = sorted((r["network_evaluations"], r["js_divergence_phi_psi_nats"],
                      r["valid_bond_fraction"]) for r in rows if r["sampler"] == sampler)
        if pts:
            nfe, js, valid = zip(*pts)
            axes[0].plot(nfe, js, "o-", color=colour, label=sampler)
            axes[1].plot(nfe, valid, "o-", color=colour, label=sampler)
    floor = meta.get("md_noise_floor", {}).get("js_random_frames_mean")
    if floor is not None:
        axes[0].axhline(floor, color="grey", ls=":", label="MD frames, same count")
    axes[0].axhline(0.05, color="k", ls="--", lw=0.8, label="target 0.05")
    axes[0].set_ylabel("JS divergence (phi, psi) vs MD (nats)")
    axes[1].set_ylabel("fraction with valid bonds")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.legend(fontsize=8)
    fig.suptitle(f"DiG samplers on alanine dipeptide ({meta.get('checkpoint_label', '')}), "
                 f"{meta['host_cpu']} x{meta['cpu_count']}")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci bench dig-quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="DiG checkpoint (.pt) or run dir")
    parser.add_argument("--settings", nargs="+",
                        default=["heun:10", "heun:20", "heun:40", "ancestral:100",
                                 "ancestral:500"])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md-seconds", type=float, default=30.0,
                        help="wall time of the OpenMM speed measurement (0 = skip)")
    parser.add_argument("--device", default="cpu", help="where DiG samples (cpu, cuda)")
    parser.add_argument("--bf16", action="store_true",
                        help="network under bfloat16 autocast (sampler state fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (CUDA: replayed as a CUDA graph); the "
                             "first batch, which compiles, is drawn once before timing")
    parser.add_argument("--label", default="", help="what the checkpoint is (for the record)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="dig_ala2_samplers_cpu")
    args = parser.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]

    from ..data import conformations as conf
    from ..models.dig.sample import compare_with_reference, fix_mirror_images, sample
    from ..train.tasks.dig import load_model

    model = load_model(args.checkpoint).eval().to(args.device)
    fast = {"compile": args.compile, "autocast": torch.bfloat16 if args.bf16 else None}
    ref_xyz, topology, dt_ps = conf.load_alanine_dipeptide()
    meta = machine_info()
    meta.update(checkpoint=str(args.checkpoint), checkpoint_label=args.label,
                checkpoint_config=vars(model.config) if hasattr(model.config, "__dict__")
                else None, num_samples=args.num_samples, device=args.device, bf16=args.bf16,
                compile=args.compile)
    g = md_decorrelation(ref_xyz, topology)
    slowest = max(g, key=g.get)
    meta["md_statistical_inefficiency_frames"] = g
    meta["md_decorrelation"] = {"observable": slowest, "frames": g[slowest],
                                "ps": g[slowest] * dt_ps, "frame_ps": dt_ps}
    meta["md_noise_floor"] = md_noise_floor(ref_xyz, topology, args.num_samples)
    if args.md_seconds > 0:
        md = openmm_steps_per_second(args.md_seconds, torch.get_num_threads())
        steps_per_frame = dt_ps * 1000 / md["timestep_fs"]
        md["independent_samples_per_second"] = md["steps_per_second"] / (
            g[slowest] * steps_per_frame)
        meta["md_speed"] = md
        print(f"MD: {md['steps_per_second']:.0f} steps/s ({md['engine']}, {md['threads']} "
              f"threads); decorrelation {g[slowest] * dt_ps:.0f} ps ({slowest}) -> "
              f"{md['independent_samples_per_second']:.3f} independent samples/s", flush=True)
    meta["basins_reference"] = conf.basin_populations(*conf.phi_psi(ref_xyz, topology))
    rows = []
    for sampler, steps in settings:
        if args.compile:  # compilation (and CUDA-graph capture) outside the timed run
            sample(model, topology, min(args.batch_size, args.num_samples), sampler=sampler,
                   steps=steps, seed=args.seed + 1, batch_size=args.batch_size, **fast)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        xyz = sample(model, topology, args.num_samples, sampler=sampler, steps=steps,
                     seed=args.seed, batch_size=args.batch_size, **fast)
        seconds = time.perf_counter() - start
        metrics = compare_with_reference(xyz, ref_xyz, topology)
        row = {"sampler": sampler, "steps": steps,
               "network_evaluations": network_evaluations(sampler, steps),
               "seconds": seconds, "samples_per_second": len(xyz) / seconds,
               "threads": torch.get_num_threads(), **metrics}
        for name, value in metrics["basins_samples"].items():
            row[f"basin_{name}"] = value
        del row["basins_samples"], row["basins_reference"]
        # The same samples with mirror images reflected back (post-processing, reported apart)
        fixed, reflected = fix_mirror_images(xyz, ref_xyz, topology)
        fixed_metrics = compare_with_reference(fixed, ref_xyz, topology)
        row["mirror_fixed_reflected_fraction"] = float(reflected.mean())
        row["mirror_fixed_js_nats"] = fixed_metrics["js_divergence_phi_psi_nats"]
        for name, value in fixed_metrics["basins_samples"].items():
            row[f"mirror_fixed_basin_{name}"] = value
        if "md_speed" in meta:
            row["speedup_vs_md_independent"] = (
                row["samples_per_second"] / meta["md_speed"]["independent_samples_per_second"])
        rows.append(row)
        print(f"{sampler:9s} {steps:4d} steps: JS {row['js_divergence_phi_psi_nats']:.3f} "
              f"valid bonds {row['valid_bond_fraction']:.3f} chirality as MD "
              f"{row['chirality_fraction']} {row['samples_per_second']:.2f} "
              f"samples/s basins {metrics['basins_samples']}; mirror-fixed JS "
              f"{row['mirror_fixed_js_nats']:.3f}", flush=True)
        # Written after every setting: a long run cut short keeps what it measured.
        merged = merge_rows(args.out / f"{args.stem}.json", rows,
                            lambda r: (r["sampler"], r["steps"]), dict(meta))
        json_path, _ = write_rows(merged, meta, args.out, args.stem)
        plot(merged, meta, args.out / f"{args.stem}.png")
    print(f"wrote {json_path} and {args.stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
