"""Configuration of the DiG-style conformation diffusion model (Distributional Graphormer).

Presets: ``dig-tiny`` (tests and the default CPU run on alanine dipeptide), ``dig-ala2`` (the
configuration of the committed alanine-dipeptide model, ``benchmarks/results/dig_ala2_cpu_v3``:
wider, torsion features, EDM) and ``dig-protein``
(the protein configuration of DiG, Zheng et al. 2024, Nat. Mach. Intell.: d_model 768,
d_pair 256, 12 layers, 32 heads; conditioning on AlphaFold-style single (384) and pair (128)
representations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DiGConfig:
    """Hyper-parameters of :class:`ds4sci.models.dig.model.DiGModel` and its diffusion."""

    d_model: int = 64
    """Width of the per-node single features s_i."""
    d_pair: int = 32
    """Width of the pair features z_ij."""
    num_layers: int = 3
    """Number of pair-biased transformer layers."""
    num_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    d_ffn: int = 128
    """Hidden width of the per-node feed-forward block."""
    max_atoms: int = 64
    """Largest number of nodes (atoms, or residues for proteins) a molecule may have."""
    atom_vocab_size: int = 16
    """Number of node types (elements for small molecules, amino acids for proteins)."""
    bond_vocab_size: int = 5
    """Number of bond types, index 0 meaning "no bond" (none, single, double, triple, aromatic)."""
    max_path_length: int = 8
    """Graph shortest-path distances are clipped to this (Graphormer's spatial encoding)."""
    num_rbf: int = 32
    """Gaussian radial basis functions expanding pair distances of the scaled coordinates."""
    num_chiral: int = 4
    """Channels of the pseudoscalar (triple-product) pair features that make the model chiral."""
    num_local_chiral: int = 0
    """Channels of the local chirality feature, one pseudoscalar per atom and channel k:
    ``chi_ki = det[v_k1, v_k2, v_k3] / (|v_k1| |v_k2| |v_k3| + eps)`` with
    ``v_km,i = sum_(a bonded to i) w_km(a) (x_a - x_i)`` and ``w`` a learned function of
    neighbour a's element, degree and neighbours' elements (fixed per molecule; a fixed random
    function, not trained: trained, it collapsed to ~0 in 5k steps). Rotation- and
    translation-invariant, permutation-equivariant, in [-1, 1], zero at atoms with < 3 bonds
    and sign-flipping under a mirror: it tells the network the handedness at each stereocentre
    (alanine's C-alpha), added to the single track's input and, as ``P chi_i + Q chi_j``, to
    the pair track's. 0 = off (so checkpoints saved
    before this field existed load unchanged); the dig-tiny preset uses 8."""
    local_chiral_head: bool = False
    """Add pseudovector terms to the output: ``eps_i += sum_(j,k) g_ijk n_jk`` with
    ``n_jk = v_k2,j x v_k3,j / (|v_k2,j| |v_k3,j| + eps)`` (the cross product of the local
    chirality feature's weighted bond vectors at atom j: a unit-bounded normal, which does not
    flip under a mirror) and invariant weights ``g`` from the pair track. A push along the
    N-CA-C normal towards L is then a plain learned weight rather than a function of the sign
    of a pseudoscalar. Needs num_local_chiral > 0; False in checkpoints saved before it."""
    num_torsion: int = 0
    """Harmonics M of the torsion pair feature: for every bonded chain i-j-k-l (the molecule's
    ``"torsions"``, or derived from its bonds), ``cos(m theta), sin(m theta)`` (m = 1..M) of
    its dihedral theta, summed over the chains joining i and l, projected into z_il (zero for
    pairs not three bonds apart). The Ramachandran angles are such dihedrals: the network reads
    them directly instead of inferring them from 1-4 distances, which cannot tell theta from
    -theta. SE(3)-invariant; the sines flip under a mirror (a pseudoscalar, like the chirality
    features). 0 = off (checkpoints saved before this field existed)."""
    d_single_in: int = 0
    """Width of an external single representation to condition on (proteins: 384); 0 = none."""
    d_pair_in: int = 0
    """Width of an external pair representation to condition on (proteins: 128); 0 = none."""
    relpos_bins: int = 0
    """Relative sequence-position buckets for proteins (|i-j| clipped); 0 = no positions."""
    sigma_min: float = 0.01
    """Smallest noise std of the VE schedule, in coordinate units (Angstrom)."""
    sigma_max: float = 10.0
    """Largest noise std of the VE schedule; must exceed the molecule's size."""
    sigma_data: float = 1.5
    """Typical per-coordinate std of the data, for input scaling c_in = 1/sqrt(sigma^2+sd^2)."""
    train_sigma: str = "dig"
    """Noise levels drawn in training: "dig" (DiG: t uniform in [0, 1], antithetic, i.e.
    log sigma uniform between sigma_min and sigma_max) or "lognormal" (EDM, Karras et al. 2022:
    ln sigma ~ N(train_log_sigma_mean, train_log_sigma_std^2), antithetic, clipped to
    [sigma_min, sigma_max]), which spends the steps on the middle noise levels."""
    train_log_sigma_mean: float = -0.5
    """Mean of ln sigma (sigma in coordinate units) for train_sigma = "lognormal"."""
    train_log_sigma_std: float = 1.2
    """Std of ln sigma for train_sigma = "lognormal"."""
    precondition: str = "none"
    """Output parametrisation and loss weight. "none" (DiG): the network's equivariant head is
    eps itself, loss |eps_theta - eps|^2. "edm" (Karras et al. 2022, section 5, written for
    eps): ``eps_theta = c_in^2 sigma x - sigma_data c_in F`` with ``c_in = 1/sqrt(sigma^2 +
    sigma_data^2)``, i.e. the denoiser ``D = c_skip x + c_out F``, and the loss weighted by
    ``(sigma^2 + sigma_data^2)/sigma_data^2`` so that it is |F - F_target|^2 with a unit-scale
    target at every sigma: at high noise the head only corrects ``x/sigma`` instead of
    producing it, and the noise levels where the global shape is decided weigh as much as the
    bond-length ones. Checkpoints saved before this field existed mean "none"."""
    num_steps: int = 500
    """Steps of DiG's ancestral sampler (DiG uses 500)."""
    fast_steps: int = 40
    """Steps of the deterministic Heun (probability-flow ODE) sampler."""
    naive_attention: bool = False
    """Materialise the attention logits (stock PyTorch) instead of ds4sci.evoformer_attention."""
    attention_backend: str = "auto"
    """Backend name passed to ds4sci.evoformer_attention ("auto", "torch", "triton"...)."""
    pair_chunk: int = 0
    """Rows i of the pair track z_ij per tile (0 = whole). Every op on z (input features,
    pair-bias projection, pair update, output head) then runs tile by tile, and under autograd
    each tile is recomputed in backward, so no [B, N, N, C_z] temporary other than z itself
    exists whole. Exact (same values and gradients)."""
    checkpoint_layers: int = 0
    """Activation checkpointing in training: layers per checkpointed segment (0 = off). Only
    each segment's input z is kept, and one segment's layer inputs while it is recomputed:
    with pair_chunk set, about num_layers/k + k copies of z instead of num_layers."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_pair", "num_layers", "num_heads", "d_ffn", "max_atoms",
                     "atom_vocab_size", "bond_vocab_size", "max_path_length", "num_rbf",
                     "num_steps", "fast_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiGConfig.{name} = {value!r}; expected a positive integer")
        for name in ("num_chiral", "num_local_chiral", "num_torsion", "d_single_in", "d_pair_in",
                     "relpos_bins", "pair_chunk", "checkpoint_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DiGConfig.{name} = {value!r}; expected an integer >= 0")
        if self.local_chiral_head and not self.num_local_chiral:
            raise ValueError("DiGConfig.local_chiral_head = True needs num_local_chiral > 0 (its "
                             "bond vectors); got num_local_chiral = 0")
        if self.d_model % self.num_heads:
            raise ValueError(f"DiGConfig.d_model = {self.d_model} is not divisible by "
                             f"num_heads = {self.num_heads}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"DiGConfig sigma_min = {self.sigma_min}, sigma_max = "
                             f"{self.sigma_max}; expected 0 < sigma_min < sigma_max")
        if self.train_sigma not in ("dig", "lognormal"):
            raise ValueError(f"DiGConfig.train_sigma = {self.train_sigma!r}; expected 'dig' or "
                             "'lognormal'")
        if self.precondition not in ("none", "edm"):
            raise ValueError(f"DiGConfig.precondition = {self.precondition!r}; expected 'none' "
                             "or 'edm'")
        if self.train_log_sigma_std <= 0:
            raise ValueError(f"DiGConfig.train_log_sigma_std = {self.train_log_sigma_std}; "
                             "expected > 0")
        if self.sigma_data <= 0:
            raise ValueError(f"DiGConfig.sigma_data = {self.sigma_data}; expected > 0")

    def replace(self, **changes) -> DiGConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DiGConfig] = {
    "dig-tiny": DiGConfig(num_local_chiral=8),
    # The committed alanine-dipeptide model (v3): 4 layers 96/48, torsion and local chirality
    # features, EDM preconditioning and log-normal training noise.
    "dig-ala2": DiGConfig(d_model=96, d_pair=48, num_layers=4, num_heads=6, d_ffn=192,
                          num_local_chiral=8, local_chiral_head=True, num_torsion=3,
                          precondition="edm", train_sigma="lognormal"),
    # DiG's protein model: 768/256/12/32, conditioned on AlphaFold single/pair representations,
    # relative positions in 64 buckets, translations' sigma from 0.1 to 35 Angstrom.
    "dig-protein": DiGConfig(
        d_model=768, d_pair=256, num_layers=12, num_heads=32, d_ffn=1024, max_atoms=2048,
        atom_vocab_size=21, bond_vocab_size=2, max_path_length=1, num_rbf=32, num_chiral=4,
        d_single_in=384, d_pair_in=128, relpos_bins=64, sigma_min=0.1, sigma_max=35.0,
        sigma_data=10.0,
    ),
}


def get_config(name: str, **overrides) -> DiGConfig:
    """A named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"DiG preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
