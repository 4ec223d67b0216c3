"""Gridded 2-D fields for the GridViT task: smooth random periodic fields and the same fields
advected and diffused for a time ``dt``, solved exactly in Fourier space.

Each record is ``(x [C, H, W], y [C, H, W])``; channel ``c`` is a tracer with its own velocity and
diffusivity, so the map ``x -> y`` is a fixed linear operator a model can learn exactly
(``y_hat(k) = x_hat(k) exp(-i k.u dt - kappa |k|^2 dt)``). Records are a pure function of
``(seed, index)``: nothing is stored, any number can be drawn, and train / validation are
disjoint ranges of indices.
"""

from __future__ import annotations

import math

import torch


class AdvectionDiffusionFields(torch.utils.data.Dataset):
    """Records ``start .. start + n - 1`` of the field pairs of ``seed``."""

    def __init__(self, n: int, *, channels: int = 2, height: int = 16, width: int = 16, dt: float = 0.1,
                 modes: int = 4, seed: int = 0, start: int = 0):
        if n < 0 or channels < 1 or height < 2 or width < 2 or modes < 1 or dt < 0:
            raise ValueError(f"AdvectionDiffusionFields: n={n}, channels={channels}, height={height}, "
                             f"width={width}, modes={modes}, dt={dt}; expected n >= 0, channels >= 1, "
                             f"height/width >= 2, modes >= 1, dt >= 0")
        self.n, self.c, self.h, self.w = n, channels, height, width
        self.dt, self.modes, self.seed, self.start = dt, modes, seed, start
        ky = torch.fft.fftfreq(height, d=1.0 / height) * 2 * math.pi
        kx = torch.fft.fftfreq(width, d=1.0 / width) * 2 * math.pi
        self._ky, self._kx = ky[:, None], kx[None, :]
        # Per-channel velocity (u_x, u_y) and diffusivity, fixed by the seed.
        g = torch.Generator().manual_seed(seed)
        self.velocity = torch.rand(channels, 2, generator=g, dtype=torch.float64) * 2 - 1
        self.diffusivity = 0.002 + 0.01 * torch.rand(channels, generator=g, dtype=torch.float64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"AdvectionDiffusionFields: index {i} out of range for {self.n} records")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.start + i + 1)
        m = self.modes
        coeff = torch.randn(self.c, 2 * m + 1, 2 * m + 1, 2, generator=g, dtype=torch.float64)
        spec = torch.zeros(self.c, self.h, self.w, dtype=torch.complex128)
        idx = torch.arange(-m, m + 1)
        amp = 1.0 / (1.0 + idx[:, None] ** 2 + idx[None, :] ** 2)  # smooth: energy in low modes
        spec[:, idx[:, None] % self.h, idx[None, :] % self.w] = torch.complex(coeff[..., 0], coeff[..., 1]) * amp
        x = torch.fft.ifft2(spec).real
        x = x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        x_hat = torch.fft.fft2(x)
        u = self.velocity
        phase = -(self._kx * u[:, 0, None, None] + self._ky * u[:, 1, None, None]) * self.dt
        decay = -self.diffusivity[:, None, None] * (self._kx**2 + self._ky**2) * self.dt
        y = torch.fft.ifft2(x_hat * torch.exp(torch.complex(decay, phase))).real
        return x.float(), y.float()
