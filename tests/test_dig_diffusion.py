"""DiG diffusion maths: exact samplers on an analytic density, training, determinism."""


import numpy as np
import pytest
import torch

from ds4sci.models.dig import build_model, denoising_loss_sum, get_config, sample
from ds4sci.models.dig.diffusion import sample_eps

# Two "atoms" with zero centre of mass: the state is the separation r = x1 - x2 in R^3, and
# centred noise of std sigma per atom moves r by sqrt(2) sigma per coordinate.
MU = torch.tensor([[1.5, 0.0, 0.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
S = 0.2  # std of each Gaussian component of r


def exact_eps(x, sigma):
    """The exact noise predictor E[eps | x_t] for the Gaussian-mixture separation density."""
    x = x.double()
    sigma = float(sigma)
    r_t = x[:, 0] - x[:, 1]
    var = S ** 2 + 2 * sigma ** 2
    logp = -((r_t[:, None, :] - MU) ** 2).sum(-1) / (2 * var) + WEIGHTS.log()
    gamma = torch.softmax(logp, dim=-1)  # [b, K]
    post = MU + (S ** 2 / var) * (r_t[:, None, :] - MU)  # [b, K, 3]
    r_hat = (gamma[..., None] * post).sum(1)
    eps1 = (x[:, 0] - r_hat / 2) / sigma
    return torch.stack([eps1, -eps1], dim=1).float()


def mixture_stats(r):
    """Weight of component 0 and per-component mean/std of r along the axis between means."""
    d0 = ((r[:, None, :] - MU.float()) ** 2).sum(-1)
    comp = d0.argmin(1)
    w0 = (comp == 0).float().mean().item()
    std0 = (r[comp == 0] - MU[0].float()).std(0).mean().item()
    mean0 = r[comp == 0].mean(0)
    return w0, std0, mean0


@pytest.mark.parametrize("sampler,steps", [("ancestral", 500), ("heun", 40), ("edm", 40)])
def test_samplers_reproduce_analytic_density_with_exact_score(sampler, steps):
    cfg = get_config("dig-tiny", sigma_min=0.005, sigma_max=10.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    x = sample_eps(exact_eps, mask, cfg, 4000, sampler=sampler, steps=steps, seed=1)
    assert x.shape == (4000, 2, 3)
    assert x.sum(1).abs().max() < 1e-4  # zero centre of mass throughout
    w0, std0, mean0 = mixture_stats(x[:, 0] - x[:, 1])
    # 4000 samples: w0 has std ~0.007; a sampler with a wrong noise/drift factor misses these.
    assert abs(w0 - 0.3) < 0.03, w0
    assert abs(std0 - S) < 0.02, std0
    assert torch.allclose(mean0, MU[0].float(), atol=0.03)


def test_wrong_score_scale_would_fail():
    """The bound above can fail: a score off by a factor 1/2 (double temperature) broadens modes."""
    cfg = get_config("dig-tiny", sigma_min=0.005, sigma_max=10.0)
    mask = torch.ones(1, 2, dtype=torch.bool)

    def too_noisy(x, sigma):  # score scaled by 1/2 ~ sampling at double temperature
        return exact_eps(x, sigma) * 0.5

    x = sample_eps(too_noisy, mask, cfg, 2000, sampler="heun", steps=40, seed=1)
    _, std0, _ = mixture_stats(x[:, 0] - x[:, 1])
    assert not abs(std0 - S) < 0.02


def test_sampler_determinism_and_seed():
    cfg = get_config("dig-tiny", num_layers=1, d_model=16, d_pair=8, num_heads=2, d_ffn=16)
    model = build_model(cfg, seed=0)
    mol = _chain_molecule(5)
    a = sample(model, mol, 6, sampler="ancestral", steps=5, seed=3, batch_size=4)
    b = sample(model, mol, 6, sampler="ancestral", steps=5, seed=3, batch_size=4)
    c = sample(model, mol, 6, sampler="ancestral", steps=5, seed=4, batch_size=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    h1 = sample(model, mol, 3, sampler="heun", steps=4, seed=3)
    h2 = sample(model, mol, 3, sampler="heun", steps=4, seed=3)
    assert torch.equal(h1, h2) and torch.isfinite(h1).all()
    e1 = sample(model, mol, 3, sampler="edm", steps=4, seed=3)
    e2 = sample(model, mol, 3, sampler="edm", steps=4, seed=3)
    assert torch.equal(e1, e2) and not torch.equal(e1, h1)
    with pytest.raises(ValueError, match="sampler='ddpm'"):
        sample(model, mol, 2, sampler="ddpm")
    with pytest.raises(ValueError, match="num_samples=0"):
        sample(model, mol, 0)


def _chain_molecule(n):
    from ds4sci.data.conformations import shortest_paths

    bonds = torch.zeros(n, n, dtype=torch.long)
    idx = torch.arange(n - 1)
    bonds[idx, idx + 1] = bonds[idx + 1, idx] = 1
    return {"atom_types": (torch.arange(n) % 3 + 1)[None], "bonds": bonds[None],
            "path": shortest_paths(bonds)[None], "mask": torch.ones(1, n, dtype=torch.bool)}


def test_trained_tiny_model_matches_radial_double_well():
    """Train the DiG network itself (1 layer, 400 Adam steps: ~15 s on one core) on a 2-atom molecule whose bond length is bimodal.

    Density of the separation r: isotropic, |r| ~ 0.35 N(1.0, 0.1) + 0.65 N(2.2, 0.1). Both
    samplers must reproduce the mode weights and the 1-D Wasserstein distance of |r|.
    """
    torch.manual_seed(0)
    cfg = get_config("dig-tiny", d_model=32, d_pair=16, num_layers=1, num_heads=2, d_ffn=32,
                     sigma_min=0.01, sigma_max=5.0, sigma_data=1.0, num_rbf=16, num_chiral=2)
    model = build_model(cfg, seed=0)
    mol = {"atom_types": torch.tensor([[2, 2]]), "bonds": torch.tensor([[[0, 1], [1, 0]]]),
           "path": torch.tensor([[[0, 1], [1, 0]]]), "mask": torch.ones(1, 2, dtype=torch.bool)}
    gen = torch.Generator().manual_seed(0)

    def draw(n, g):
        mode = torch.rand(n, generator=g) < 0.35
        length = torch.where(mode, 1.0, 2.2) + 0.1 * torch.randn(n, generator=g)
        direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
        r = direction * length[:, None]
        return torch.stack([r / 2, -r / 2], dim=1)

    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=400, pct_start=0.1)
    for step in range(400):
        loss_sum, count = denoising_loss_sum(model, {"x": draw(128, gen), **mol}, gen)
        opt.zero_grad()
        (loss_sum / count).backward()
        opt.step()
        schedule.step()
    ref = (draw(4000, torch.Generator().manual_seed(9))).diff(dim=1).norm(dim=-1).squeeze(1)
    for sampler, steps in (("ancestral", 100), ("heun", 15)):
        x = sample(model, mol, 1000, sampler=sampler, steps=steps, seed=5)
        length = (x[:, 0] - x[:, 1]).norm(dim=-1)
        w1 = _wasserstein_1d(length.numpy(), ref.numpy())
        frac_short = (length < 1.6).float().mean().item()
        assert w1 < 0.1, (sampler, w1)
        assert abs(frac_short - 0.35) < 0.06, (sampler, frac_short)


def _wasserstein_1d(a, b):
    q = np.linspace(0.005, 0.995, 199)
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def test_training_sigma_distributions():
    from ds4sci.models.dig.diffusion import training_sigmas

    gen = torch.Generator().manual_seed(0)
    dig = get_config("dig-tiny")
    log_s = training_sigmas(dig, 20000, gen).log()
    # DiG: ln sigma uniform on [ln sigma_min, ln sigma_max], pairs mirrored about the middle.
    lo, hi = np.log(dig.sigma_min), np.log(dig.sigma_max)
    assert log_s.min() >= lo - 1e-6 and log_s.max() <= hi + 1e-6
    assert abs(log_s.mean().item() - (lo + hi) / 2) < 1e-4  # antithetic: exact mean
    assert abs(log_s.std().item() - (hi - lo) / 12 ** 0.5) < 0.05
    edm = dig.replace(train_sigma="lognormal", train_log_sigma_mean=-0.3, train_log_sigma_std=0.8)
    log_s = training_sigmas(edm, 20001, gen).log()
    assert abs(log_s.median().item() + 0.3) < 0.03
    assert abs(log_s.std().item() - 0.8) < 0.03
    with pytest.raises(ValueError, match="train_sigma = 'uniform'; expected 'dig' or"):
        dig.replace(train_sigma="uniform")


def test_bf16_autocast_network_and_sampler_state():
    """The network under bf16 autocast stays close to fp32; the sampler's state stays fp32."""
    cfg = get_config("dig-tiny", num_layers=2, d_model=32, d_pair=16, num_heads=4, d_ffn=32,
                     num_torsion=2, precondition="edm")
    model = build_model(cfg, seed=0)
    mol = _chain_molecule(6)
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0)) * 1.5
    sigma = torch.tensor([0.05, 0.5, 2.0, 8.0])
    with torch.no_grad():
        ref = model(x, sigma, mol)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, sigma, mol)
    rel = (low.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.03, rel  # bf16 really ran (not bit-equal) and kept ~2 digits
    a = sample(model, mol, 4, sampler="heun", steps=3, seed=2)
    b = sample(model, mol, 4, sampler="heun", steps=3, seed=2, autocast=torch.bfloat16)
    assert b.dtype == torch.float32 and torch.isfinite(b).all() and not torch.equal(a, b)
    with pytest.raises(ValueError, match="autocast=torch.int8"):
        sample(model, mol, 2, autocast=torch.int8)


@pytest.mark.slow
def test_compiled_sampling_step_equals_eager():
    cfg = get_config("dig-tiny", num_layers=1, d_model=16, d_pair=8, num_heads=2, d_ffn=16,
                     num_torsion=1)
    model = build_model(cfg, seed=0)
    mol = _chain_molecule(5)
    eager = sample(model, mol, 3, sampler="heun", steps=3, seed=1)
    compiled = sample(model, mol, 3, sampler="heun", steps=3, seed=1, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
