"""``ds4sci sample``: draw conformations from a trained DiG model and compare them with MD.

Writes ``samples.pdb`` (multi-model), ``samples.dcd`` (+ ``topology.pdb``) or
``samples.extxyz``; for peptides a Ramachandran plot beside the MD reference
(``ramachandran.png``) and ``metrics.json`` (JS divergence of the (phi, psi) histograms,
basin populations, fraction of samples with valid bond lengths, samples per second).

Checkpoint format (written by :func:`save_checkpoint`): ``{"config": dict of DiGConfig,
"model": state_dict}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ...data import conformations as conf
from .config import DiGConfig
from .diffusion import SAMPLERS
from .diffusion import sample as _sample
from .model import DiGModel


def save_checkpoint(model: DiGModel, path: str | Path) -> None:
    torch.save({"config": dataclasses.asdict(model.config), "model": model.state_dict()}, path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> DiGModel:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a DiG checkpoint: expected a dict "
                         "with 'config' and 'model' (ds4sci.models.dig.sample.save_checkpoint)")
    model = DiGModel(DiGConfig(**state["config"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def sample(model: DiGModel, topology, num_samples: int, **kwargs) -> np.ndarray:
    """Conformations ``[S, N, 3]`` (Angstrom) of the molecule described by an mdtraj topology.

    ``kwargs`` go to :func:`ds4sci.models.dig.diffusion.sample` (sampler, steps, seed,
    batch_size, compile, autocast). Raises ValueError for unsupported elements or too many atoms.
    """
    device = next(model.parameters()).device
    mol = conf.molecule_from_topology(topology, max_atoms=model.config.max_atoms)
    mol = {k: v.to(device) for k, v in mol.items()}
    return _sample(model, mol, num_samples, **kwargs).cpu().numpy()


def write_conformations(xyz: np.ndarray, topology, out_dir: Path, fmt: str) -> Path:
    """Write ``xyz [S, N, 3]`` (Angstrom) as multi-model PDB, DCD (+ topology PDB) or extxyz."""
    import mdtraj as md

    traj = md.Trajectory(xyz.astype(np.float32) / 10.0, topology)
    if fmt == "pdb":
        path = out_dir / "samples.pdb"
        traj.save_pdb(str(path))
    elif fmt == "dcd":
        path = out_dir / "samples.dcd"
        traj.save_dcd(str(path))
        traj[0].save_pdb(str(out_dir / "topology.pdb"))
    elif fmt == "extxyz":
        path = out_dir / "samples.extxyz"
        symbols = [a.element.symbol for a in topology.atoms]
        with open(path, "w") as handle:
            for i, frame in enumerate(xyz):
                handle.write(f"{len(symbols)}\nProperties=species:S:1:pos:R:3 sample={i}\n")
                handle.writelines(f"{s} {x:.4f} {y:.4f} {z:.4f}\n"
                                  for s, (x, y, z) in zip(symbols, frame))
    else:
        raise ValueError(f"format {fmt!r} is unknown; expected 'pdb', 'dcd' or 'extxyz'")
    return path


def fix_mirror_images(xyz: np.ndarray, reference: np.ndarray, topology):
    """Reflect (z -> -z) every sample whose C-alpha handedness is, at most residues, the
    mirror of the reference's: ``(fixed [S, N, 3], reflected [S] bool)``.

    Post-processing for a model that has not learned chirality (an E(3)-symmetric score draws
    the racemic mixture, half of it mirror images): the mirror image of a D sample is an L
    sample, so for a molecule with one stereocentre (alanine dipeptide) this turns the racemic
    mixture back into the L ensemble exactly. It is a correction of the samples, not of the
    model; the metrics report the samples with and without it.
    """
    vol = conf.calpha_signed_volumes(xyz, topology)
    if vol.shape[1] == 0:
        raise ValueError("fix_mirror_images: the topology has no residue with N, CA, C and CB "
                         "(no C-alpha handedness to fix)")
    reflected = (vol * conf.reference_handedness(reference, topology) < 0).mean(1) > 0.5
    fixed = np.array(xyz, copy=True)
    fixed[reflected, :, 2] *= -1
    return fixed, reflected


def compare_with_reference(xyz: np.ndarray, ref_xyz: np.ndarray, topology,
                           plot: Path | None = None) -> dict:
    """Metrics of samples against an MD reference (same topology); optional Ramachandran plot."""
    phi, psi = conf.phi_psi(xyz, topology)
    phi_r, psi_r = conf.phi_psi(ref_xyz, topology)
    js = conf.js_divergence(conf.ramachandran_histogram(phi, psi),
                            conf.ramachandran_histogram(phi_r, psi_r))
    pairs = conf.bond_pairs(conf.molecule_from_topology(topology))
    ref_len = conf.bond_lengths(ref_xyz, pairs).mean(0)
    metrics = {
        "js_divergence_phi_psi_nats": js,
        "basins_samples": conf.basin_populations(phi, psi),
        "basins_reference": conf.basin_populations(phi_r, psi_r),
        "valid_bond_fraction": conf.valid_bond_fraction(xyz, pairs, ref_len),
        # C-alpha handedness as the MD's (L for natural amino acids); None without one
        "chirality_fraction": conf.chirality_fraction(xyz, ref_xyz, topology),
        "num_samples": len(xyz),
        "num_reference": len(ref_xyz),
    }
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
        for ax, (p, s, title) in zip(axes, ((phi_r, psi_r, f"MD reference ({len(ref_xyz)})"),
                                            (phi, psi, f"DiG samples ({len(xyz)})"))):
            ax.hist2d(p, s, bins=72, range=[[-180, 180], [-180, 180]], cmap="viridis",
                      norm=matplotlib.colors.LogNorm())
            ax.set_title(title)
            ax.set_xlabel("phi (deg)")
        axes[0].set_ylabel("psi (deg)")
        fig.suptitle(f"alanine dipeptide, JS divergence {js:.3f} nats")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds4sci sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="DiG checkpoint (.pt)")
    parser.add_argument("--topology", default=str(conf.ALA2_PDB),
                        help="PDB of the molecule (default: embedded alanine dipeptide)")
    parser.add_argument("--reference", default=None,
                        help="MD reference .npz (xyz in Angstrom) or trajectory for metrics; "
                             "default: the embedded MD when sampling alanine dipeptide")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler", choices=SAMPLERS, default="heun",
                        help="heun: deterministic ODE; edm: stochastic Heun (EDM); "
                             "ancestral: DiG's")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--format", choices=("pdb", "dcd", "extxyz"), default="pdb")
    parser.add_argument("--out", default="dig_samples", help="output directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (on CUDA: replayed as a CUDA graph)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the network in bfloat16 (torch.autocast; for GPUs)")
    parser.add_argument("--fix-mirror", action="store_true",
                        help="reflect samples whose C-alpha handedness is the reference's "
                             "mirror image before writing and scoring them (post-processing)")
    args = parser.parse_args(argv)

    topology = conf.load_topology(args.topology)
    model = load_checkpoint(args.checkpoint, args.device)
    ref = None  # checked before sampling: a bad reference should not cost a sampling run
    if args.reference is not None:
        ref_path = Path(args.reference)
        ref = (conf.load_alanine_dipeptide(ref_path)[0] if ref_path.suffix == ".npz"
               else conf.load_trajectory(ref_path, args.topology))
    elif Path(args.topology).resolve() == conf.ALA2_PDB.resolve():
        ref = conf.load_alanine_dipeptide()[0]
    if ref is not None and ref.shape[1] != topology.n_atoms:
        raise ValueError(f"reference has {ref.shape[1]} atoms; the topology has "
                         f"{topology.n_atoms}")
    if args.fix_mirror and ref is None:
        raise ValueError("--fix-mirror needs a reference (--reference) for the handedness")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    xyz = sample(model, topology, args.num_samples, sampler=args.sampler, steps=args.steps,
                 seed=args.seed, batch_size=args.batch_size, compile=args.compile,
                 autocast=torch.bfloat16 if args.bf16 else None)
    seconds = time.perf_counter() - start
    metrics = {"sampler": args.sampler, "steps": args.steps, "seconds": seconds,
               "samples_per_second": len(xyz) / seconds, "device": args.device,
               "bf16": args.bf16, "compile": args.compile,
               "mirror_fixed": args.fix_mirror}
    if args.fix_mirror:
        xyz, reflected = fix_mirror_images(xyz, ref, topology)
        metrics["reflected_fraction"] = float(reflected.mean())
        print(f"reflected {int(reflected.sum())} of {len(xyz)} mirror-image samples")
    path = write_conformations(xyz, topology, out, args.format)
    print(f"wrote {len(xyz)} conformations to {path} ({len(xyz) / seconds:.1f} samples/s)")
    if ref is not None:
        metrics.update(compare_with_reference(xyz, ref, topology, out / "ramachandran.png"))
        print(f"JS divergence (phi, psi) = {metrics['js_divergence_phi_psi_nats']:.4f} nats; "
              f"valid bonds {metrics['valid_bond_fraction']:.3f}; "
              f"MD's chirality {metrics['chirality_fraction']}; "
              f"basins {metrics['basins_samples']}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
