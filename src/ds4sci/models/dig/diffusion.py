"""DiG's diffusion of coordinates: variance-exploding (VE) SDE, training loss and samplers.

Schedule (as DiG's translation diffusion): ``sigma(t) = sigma_min^(1-t) * sigma_max^t`` for
``t`` in [0, 1], forward process ``x_t = x_0 + sigma(t) * eps`` with ``eps`` Gaussian noise
projected to zero centre of mass (the data are centred, so the process lives in the
``3(N-1)``-dimensional subspace and the model is translation-free).

Training (DiG): ``t`` uniform, drawn antithetically (half the batch at ``t``, half at
``1 - t``, as DiG pairs step ``k`` with ``T-1-k``); loss ``|eps_theta(x_t, sigma) - eps|^2``
over real nodes. DiG's network outputs ``sigma * score = -eps``; we predict ``eps`` (same
objective, sign flipped).

Samplers (all batched over samples, seeded by a ``torch.Generator``, no Python per sample):
  * ``ancestral``: DiG's sampler, ``num_steps`` (500) steps on DiG's grid
    ``t_k = linspace(1, 0, T+1)[:-1]``; each step is SMLD's ancestral update (Song et al.
    2021, eq. 47) and the last one jumps to sigma = 0 (the Tweedie mean).
  * ``heun``: deterministic probability-flow ODE ``dx/dsigma = eps_theta(x, sigma)`` with
    Heun's 2nd-order method on the EDM grid (Karras et al. 2022, rho = 7), ``fast_steps``
    steps (2 * steps - 1 network evaluations).
  * ``edm``: EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on the same grid and
    the same evaluations: before each Heun step the noise is raised from sigma to
    ``sigma (1 + gamma)`` with fresh noise, ``gamma = min(EDM_CHURN / steps, sqrt(2) - 1)``
    (``EDM_CHURN`` = 30; ``S_noise`` = 1, every noise level), so errors of the network are
    partly washed out as in the ancestral sampler, at Heun's step count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .model import DiGModel, centre


def sigma_of_t(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """DiG's geometric VE schedule ``sigma_min^(1-t) sigma_max^t``."""
    return sigma_min ** (1 - t) * sigma_max ** t


def centred_noise(shape, mask_BN: torch.Tensor, generator: torch.Generator | None,
                  dtype=torch.float32) -> torch.Tensor:
    """Standard Gaussian noise ``[B, N, 3]`` with zero mean over the real nodes (0 on padding)."""
    eps = torch.randn(shape, generator=generator, device=mask_BN.device, dtype=dtype)
    return centre(eps, mask_BN.expand(shape[:2]))


def training_sigmas(cfg, B: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Noise levels ``[B]`` of one training batch, drawn antithetically (``cfg.train_sigma``)."""
    if cfg.train_sigma == "lognormal":
        half = torch.randn((B + 1) // 2, generator=generator, device=device)
        z = torch.cat([half, -half])[:B]
        return (cfg.train_log_sigma_mean + cfg.train_log_sigma_std * z).exp().clamp(
            cfg.sigma_min, cfg.sigma_max)
    half = torch.rand((B + 1) // 2, generator=generator, device=device)
    t = torch.cat([half, 1 - half])[:B]
    return sigma_of_t(t, cfg.sigma_min, cfg.sigma_max)


def denoising_loss_sum(model: DiGModel, batch: dict, generator: torch.Generator | None = None):
    """Summed squared noise-prediction error and the number of terms (real coordinates).

    ``batch``: a collated batch of :mod:`ds4sci.data.conformations` (``x [B, N, 3]`` and the
    molecule keys). Loss = sum / count, DiG's objective with antithetic times (weighted per
    sigma by ``(sigma^2 + sigma_data^2)/sigma_data^2`` when ``config.precondition == "edm"``).
    """
    cfg = model.config
    x0 = batch["x"]
    B, N = x0.shape[:2]
    mask = batch["mask"].expand(B, N)
    sigma = training_sigmas(cfg, B, generator, x0.device).to(x0.dtype)
    eps = centred_noise(x0.shape, mask, generator, x0.dtype)
    x_t = centre(x0, mask) + sigma[:, None, None] * eps
    pred = model(x_t, sigma, batch)
    real = mask.unsqueeze(-1).to(pred.dtype)
    sq_B = ((pred.float() - eps.float()) * real).pow(2).sum((1, 2))
    if cfg.precondition == "edm":  # EDM's lambda(sigma) c_out^2 = 1 on F, written for eps
        sq_B = sq_B * (sigma.float().pow(2) + cfg.sigma_data ** 2) / cfg.sigma_data ** 2
    sq = sq_B.sum()
    return sq, real.sum() * 3


def ancestral_sigmas(cfg, steps: int | None = None, device=None) -> torch.Tensor:
    """DiG's grid: ``sigma(t_k)`` for ``t_k = linspace(1, 0, T+1)[:-1]``, then 0."""
    steps = steps or cfg.num_steps
    t = torch.linspace(1, 0, steps + 1, device=device, dtype=torch.float64)[:-1]
    sig = sigma_of_t(t, cfg.sigma_min, cfg.sigma_max)
    return torch.cat([sig, sig.new_zeros(1)])


def edm_sigmas(cfg, steps: int | None = None, rho: float = 7.0, device=None) -> torch.Tensor:
    """Karras et al.'s grid from sigma_max to sigma_min (``steps`` values), then 0."""
    steps = steps or cfg.fast_steps
    i = torch.arange(steps, device=device, dtype=torch.float64) / max(steps - 1, 1)
    lo, hi = cfg.sigma_min ** (1 / rho), cfg.sigma_max ** (1 / rho)
    sig = (hi + i * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ancestral", "heun", "edm")
EDM_CHURN = 30.0  # S_churn of EDM's stochastic sampler (Karras et al. 2022, Algorithm 2)


def _denoiser(model: DiGModel, molecule: dict, compile: bool,
              autocast: torch.dtype | None = None) -> Denoiser:
    cond = model.condition(molecule)  # molecule features once, reused by every step
    device_type = molecule["mask"].device.type

    def eps_fn(x, sigma_scalar):
        sigma = sigma_scalar.expand(x.shape[0]).to(x.dtype)
        if autocast is None:
            return model(x, sigma, molecule, cond)
        # The network in reduced precision; the sampler's state x stays in its own dtype.
        with torch.autocast(device_type, dtype=autocast):
            return model(x, sigma, molecule, cond).to(x.dtype)

    if not compile:
        return eps_fn
    # Every step has the same shapes, so one compiled graph serves all of them; on CUDA
    # "reduce-overhead" replays it as a CUDA graph (one launch per step).
    cuda = device_type == "cuda"
    compiled = torch.compile(eps_fn, dynamic=False, mode="reduce-overhead" if cuda else None)
    if not cuda:
        return compiled

    def replayed(x, sigma_scalar):
        torch.compiler.cudagraph_mark_step_begin()
        # A replay overwrites the previous output; Heun holds two at once, so copy it out.
        return compiled(x, sigma_scalar).clone()

    return replayed


@torch.no_grad()
def sample(model: DiGModel, molecule: dict, num_samples: int, *, sampler: str = "heun",
           steps: int | None = None, seed: int = 0, batch_size: int = 1024,
           compile: bool = False, dtype: torch.dtype = torch.float32,
           autocast: torch.dtype | None = None) -> torch.Tensor:
    """Draw ``num_samples`` conformations ``[S, N, 3]`` of one molecule (batch dim 1).

    ``sampler``: ``"ancestral"`` (DiG, default ``config.num_steps`` steps) or ``"heun"``
    (deterministic, default ``config.fast_steps``). Same seed and batch_size -> same samples.
    ``dtype``: the sampler's state (and the model's parameters' dtype); ``autocast``: run the
    network under ``torch.autocast`` in this dtype (e.g. ``torch.bfloat16`` on GPUs) while
    the state stays in ``dtype``. ``compile``: ``torch.compile`` the fixed-shape step (on
    CUDA as a replayed CUDA graph).
    """
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"sample: autocast={autocast}; expected None, torch.bfloat16 or "
                         "torch.float16")
    mask = molecule["mask"]
    if mask.shape[0] != 1:
        raise ValueError(f"sample: molecule batch dim is {mask.shape[0]}; expected 1 molecule")
    eps_fn = _denoiser(model, molecule, compile, autocast)
    return sample_eps(eps_fn, mask, model.config, num_samples, sampler=sampler, steps=steps,
                      seed=seed, batch_size=batch_size, dtype=dtype)


@torch.no_grad()
def sample_eps(eps_fn: Denoiser, mask: torch.Tensor, cfg, num_samples: int, *,
               sampler: str = "heun", steps: int | None = None, seed: int = 0,
               batch_size: int = 1024, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The samplers on any noise predictor ``eps_fn(x [b, N, 3], sigma []) -> [b, N, 3]``.

    ``mask [1, N]``: real nodes; ``cfg``: anything with ``sigma_min``, ``sigma_max``,
    ``num_steps``, ``fast_steps`` (a :class:`DiGConfig`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: sampler={sampler!r}; expected one of {SAMPLERS}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"sample: num_samples={num_samples}, batch_size={batch_size}; "
                         "expected both >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"sample: steps={steps}; expected >= 1")
    device = mask.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sigmas = (ancestral_sigmas(cfg, steps, device) if sampler == "ancestral"
              else edm_sigmas(cfg, steps, device=device))
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        shape = (n, mask.shape[1], 3)
        x = centred_noise(shape, mask, gen, dtype) * sigmas[0].to(dtype)
        for i in range(len(sigmas) - 1):
            s_cur, s_next = sigmas[i], sigmas[i + 1]
            if sampler == "edm":  # churn: raise the noise to s_hat, then a Heun step from there
                s_hat = s_cur * (1 + min(EDM_CHURN / (len(sigmas) - 1), 2 ** 0.5 - 1))
                noise = centred_noise(shape, mask, gen, dtype)
                x = x + (s_hat ** 2 - s_cur ** 2).sqrt().to(dtype) * noise
                s_cur = s_hat
            eps = eps_fn(x, s_cur.to(dtype))
            if sampler == "ancestral":
                # SMLD ancestral step: mean x - (s^2 - s'^2)/s * eps, variance s'^2 (s^2-s'^2)/s^2
                var = s_cur ** 2 - s_next ** 2
                x = x - (var / s_cur).to(dtype) * eps
                if s_next > 0:
                    noise = centred_noise(shape, mask, gen, dtype)
                    x = x + (s_next * var.sqrt() / s_cur).to(dtype) * noise
            else:
                x_next = x + (s_next - s_cur).to(dtype) * eps
                if s_next > 0:  # Heun correction (EDM Algorithm 1), skipped for the last step
                    eps_next = eps_fn(x_next, s_next.to(dtype))
                    x_next = x + (s_next - s_cur).to(dtype) * 0.5 * (eps + eps_next)
                x = x_next
        out.append(x.float())
    return torch.cat(out)
