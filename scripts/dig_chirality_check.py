"""Fraction of DiG samples with alanine's C-alpha chirality (L) vs its mirror image (D).

The signed volume of (N - CA, C - CA, CB - CA) has one sign in every MD frame (L-alanine); a
model that has not learned chirality draws about half of its samples as the mirror image,
whose (phi, psi) are reflected (alpha_R -> alpha_L, C7eq -> C7ax).

Where chirality is decided (``--denoise-sigmas``): MD frames noised to sigma and denoised in
one step (Tweedie: x0 = x - sigma eps_theta); among the noisy frames whose C-alpha volume
looks flipped, the fraction the denoiser returns as L. A denoiser that restores L there has
the chirality at that noise level; if samples still come out D, it was decided at higher sigma.

Usage: python scripts/dig_chirality_check.py --checkpoint benchmarks/results/dig_ala2_cpu/dig_ala2.pt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ds4sci.data import conformations as conf
from ds4sci.models.dig.sample import load_checkpoint, sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--denoise-sigmas", type=float, nargs="*", default=[],
                        help="noise levels (Angstrom) of the one-step denoising check")
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
    if args.denoise_sigmas:
        denoise_check(model, ref, top, sign, args.denoise_sigmas)


def denoise_check(model, ref, top, sign, sigmas, frames: int = 500) -> None:
    mol = conf.molecule_from_topology(top)
    x0 = torch.tensor(ref[:: max(1, len(ref) // frames)][:frames], dtype=torch.float32)
    x0 = x0 - x0.mean(1, keepdim=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sigma in sigmas:
            eps = torch.randn(x0.shape, generator=gen)
            x_t = x0 + sigma * (eps - eps.mean(1, keepdim=True))
            x_hat = x_t - sigma * model(x_t, torch.full((len(x0),), sigma), mol)
            flipped = conf.calpha_signed_volumes(x_t.numpy(), top)[:, 0] * sign < 0
            back = conf.calpha_signed_volumes(x_hat.numpy(), top)[:, 0] * sign > 0
            print(f"sigma {sigma}: noisy frames with a flipped-looking C-alpha "
                  f"{flipped.mean():.2f}; denoised to L among them "
                  f"{back[flipped].mean() if flipped.any() else float('nan'):.2f}, "
                  f"among the rest {back[~flipped].mean():.2f}")


if __name__ == "__main__":
    main()
