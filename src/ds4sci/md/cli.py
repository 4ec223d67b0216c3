"""``ds4sci md run``: argparse front end of ``ds4sci.md.run.run_md``."""

from __future__ import annotations

import argparse
import json
import sys

from ds4sci.md.integrators import MDInstabilityError


def build_parser(prog: str = "ds4sci md") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Molecular dynamics with a ds4sci force field")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run MD on a structure file (xyz/extxyz/pdb/cif)")
    r.add_argument("structure", help="structure file read by ase.io, or builtin:ala2")
    r.add_argument("--model", default="preset:visnet-tiny",
                   help="checkpoint (ds4sci.md.potential.save_model) or preset:<name>[:seed] (untrained)")
    r.add_argument("--ensemble", choices=["nve", "nvt"], default="nvt")
    r.add_argument("--dt", type=float, default=0.5, help="time step (fs)")
    r.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities; NVT bath)")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    r.add_argument("--out", default="md_out", help="output directory")
    r.add_argument("--traj-format", choices=["extxyz", "traj"], default="extxyz")
    r.add_argument("--traj-every", type=int, default=10)
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--skin", type=float, default=1.0, help="Verlet skin (A)")
    r.add_argument("--max-force", type=float, default=1e3, help="stop if any force exceeds (eV/A)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest for small molecules on a busy machine)")
    r.add_argument("--compile", action="store_true", help="compile the whole MD step (systems up to 16,384 atoms; compile time ~10-100 s)")
    r.add_argument("--edge-chunk", type=int, default=None, metavar="E",
                   help="eager force evaluation in chunks of E edges (memory of large systems; "
                        "32768: 100,000 water atoms in < 5 GiB)")
    r.add_argument("--domain", action="store_true",
                   help="shard the atoms over torchrun's processes by slab, with halo "
                        "exchange (gloo; each rank holds its slab + halo)")
    r.add_argument("--no-plot", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ds4sci.md.run import run_md

    if args.threads is not None:
        import torch
        if args.threads < 1:
            print(f"ds4sci md run: error: --threads={args.threads}; expected >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    try:
        summary = run_md(args.structure, args.model, args.ensemble, args.dt, args.temperature,
                         args.steps, args.out, args.traj_format, args.traj_every, args.log_every,
                         args.friction, args.seed, args.dtype, args.device, args.skin,
                         args.max_force, plot=not args.no_plot, progress=not args.no_progress,
                         compile=args.compile, domain=args.domain,
                         edge_chunk_size=args.edge_chunk)
    except (ValueError, FileNotFoundError, MDInstabilityError) as e:
        print(f"ds4sci md run: error: {e}", file=sys.stderr)
        return 2
    if summary.get("trajectory"):  # rank 0 (the others of a --domain run print nothing)
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
