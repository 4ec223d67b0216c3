"""Fraction of DiG samples with alanine's C-alpha chirality (L) vs its mirror image (D).

The signed volume of (N - CA, C - CA, CB - CA) has one sign in every MD frame (L-alanine); a
model that has not learned chirality draws about half of its samples as the mirror image,
whose (phi, psi) are reflected (alpha_R -> alpha_L, C7eq -> C7ax).

Usage: python scripts/dig_chirality_check.py --checkpoint benchmarks/results/dig_ala2_cpu/dig_ala2.pt
"""

from __future__ import annotations

import argparse

import numpy as np

from ds4sci.data import conformations as conf
from ds4sci.models.dig.sample import load_checkpoint, sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    ref, top, _ = conf.load_alanine_dipeptide()
    sign = np.sign(conf.calpha_signed_volumes(ref, top)[:, 0].mean())
    model = load_checkpoint(args.checkpoint)
    xyz = sample(model, top, args.num_samples, sampler=args.sampler, steps=args.steps, seed=0,
                 batch_size=args.num_samples)
    same = conf.calpha_signed_volumes(xyz, top)[:, 0] * sign > 0
    md_same = (conf.calpha_signed_volumes(ref, top)[:, 0] * sign > 0).mean()
    print(f"MD frames with the reference chirality: {md_same:.3f}")
    print(f"samples with the reference chirality: {same.mean():.3f} of {len(xyz)}")
    phi, psi = conf.phi_psi(xyz, top)
    print("basins, reference chirality:", conf.basin_populations(phi[same], psi[same]))
    print("basins, mirror image:", conf.basin_populations(phi[~same], psi[~same]))


if __name__ == "__main__":
    main()
