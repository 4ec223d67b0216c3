"""DiG-style score network: a Graphormer with pair-biased attention over a molecule's nodes.

Follows Distributional Graphormer (Zheng et al., "Predicting equilibrium distributions for
molecular systems with deep learning", Nat. Mach. Intell. 2024): per-node single features
``s_i`` and pair features ``z_ij``; every layer's attention adds a per-head bias projected from
``z_ij`` (computed by :func:`ds4sci.evoformer_attention`, logits never materialised), and the
pair features are updated between layers from an outer product of the single features.

Legend: B batch, N nodes (atoms, or residues for proteins), H heads, D head dim,
C_s = d_model, C_z = d_pair.

Symmetry (tested): coordinates enter only through SE(3)-invariant pair features (distances of
the centred, scaled coordinates in a radial basis, and pseudoscalar triple products
``det[x_i, x_j, m_c]`` with learned weighted centroids ``m_c``), and leave through an
equivariant head ``eps_i = sum_j w_ij (x_i - x_j) / (1 + |x_i - x_j|)`` with invariant weights.
So the predicted noise rotates with the input, ignores translations and permutes with the
nodes. The triple products flip sign under reflection: the model is deliberately *not*
reflection-symmetric, because alanine (like every L-amino acid) is chiral and an
E(3)-invariant model would learn the racemic mixture (phi, psi) -> (-phi, -psi).

# DISCREPANCY: DiG's protein model diffuses rigid residue frames (translations + SO(3)
# rotations); here every node is a point (atoms; C-alpha for proteins), diffused in R^3 with
# zero centre of mass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ops.evoformer_attention import evoformer_attention, evoformer_attention_naive
from .config import DiGConfig

MASK_BIAS = -1e9  # finite, as OpenFold: a padded key gets zero weight without -inf arithmetic


def centre(x_BN3: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """Subtract the centre of the real nodes (padding set to 0): zero centre of mass."""
    m = mask_BN.unsqueeze(-1).to(x_BN3.dtype)
    mean = (x_BN3 * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1)
    return (x_BN3 - mean) * m


class NoiseEmbedding(nn.Module):
    """Fourier features of log(sigma) -> MLP (as EDM's c_noise = log(sigma)/4)."""

    def __init__(self, dim: int, num_freqs: int = 16):
        super().__init__()
        # Constants computed where used, not buffers: a model built on the meta device and made
        # real with to_empty would hold garbage in them.
        self.num_freqs = num_freqs
        self.proj_in = nn.Linear(2 * num_freqs, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, sigma_B: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(64), self.num_freqs, device=sigma_B.device))
        angle = (sigma_B.log() / 4).unsqueeze(-1) * freqs.to(sigma_B.dtype)
        feats = torch.cat([angle.sin(), angle.cos()], dim=-1)
        return self.proj_out(torch.nn.functional.silu(self.proj_in(feats)))


class PairBiasedLayer(nn.Module):
    """Pre-LN transformer layer on s with a pair bias from z, then an outer-product update of z."""

    def __init__(self, cfg: DiGConfig):
        super().__init__()
        self.cfg = cfg
        H, C_s, C_z = cfg.num_heads, cfg.d_model, cfg.d_pair
        self.norm_s = nn.LayerNorm(C_s)
        self.qkv = nn.Linear(C_s, 3 * C_s)
        self.gate = nn.Linear(C_s, C_s)
        self.norm_z = nn.LayerNorm(C_z)
        self.pair_bias = nn.Linear(C_z, H, bias=False)
        self.attn_out = nn.Linear(C_s, C_s)
        self.norm_ffn = nn.LayerNorm(C_s)
        self.ffn_in = nn.Linear(C_s, cfg.d_ffn)
        self.ffn_out = nn.Linear(cfg.d_ffn, C_s)
        self.norm_outer = nn.LayerNorm(C_s)
        self.outer_a = nn.Linear(C_s, C_z)
        self.outer_b = nn.Linear(C_s, C_z)
        self.outer_out = nn.Linear(C_z, C_z)

    def attention(self, q, k, v, biases):
        if self.cfg.naive_attention:
            return evoformer_attention_naive(q, k, v, biases)
        return evoformer_attention(q, k, v, biases, backend=self.cfg.attention_backend)

    def forward(self, s_BNC, z_BNNC, mask_bias_B11N):
        B, N, C = s_BNC.shape
        H = self.cfg.num_heads
        x = self.norm_s(s_BNC)
        q_BNHD, k_BNHD, v_BNHD = self.qkv(x).view(B, N, 3, H, C // H).unbind(2)
        bias_BHNN = self.pair_bias(self.norm_z(z_BNNC)).permute(0, 3, 1, 2)
        o_BNHD = self.attention(q_BNHD, k_BNHD, v_BNHD, [mask_bias_B11N, bias_BHNN])
        o_BNC = o_BNHD.reshape(B, N, C) * torch.sigmoid(self.gate(x))
        s_BNC = s_BNC + self.attn_out(o_BNC)
        s_BNC = s_BNC + self.ffn_out(torch.nn.functional.gelu(self.ffn_in(self.norm_ffn(s_BNC))))
        # Pair update from the single track: z_ij += W (a_i * b_j) (a per-channel outer
        # product, DiG's/Graphormer's way of letting z follow the refined node features).
        y = self.norm_outer(s_BNC)
        a_BNC, b_BNC = self.outer_a(y), self.outer_b(y)
        z_BNNC = z_BNNC + self.outer_out(a_BNC.unsqueeze(2) * b_BNC.unsqueeze(1))
        return s_BNC, z_BNNC


class DiGModel(nn.Module):
    """Noise predictor eps_theta(x, sigma | molecule) for VE diffusion of coordinates.

    Molecule inputs (a dict, see :mod:`ds4sci.data.conformations`):
      ``atom_types [B, N]`` long in [0, atom_vocab_size); ``mask [B, N]`` bool (real nodes);
      ``bonds [B, N, N]`` long bond types (0 none); ``path [B, N, N]`` long shortest-path
      lengths (clipped); optional ``single_repr [B, N, d_single_in]``,
      ``pair_repr [B, N, N, d_pair_in]`` (proteins: AlphaFold's), ``residue_index [B, N]``.
    ``B`` may be 1 and broadcast against many samples.
    """

    def __init__(self, config: DiGConfig):
        super().__init__()
        cfg = self.config = config
        C_s, C_z = cfg.d_model, cfg.d_pair
        self.atom_embed = nn.Embedding(cfg.atom_vocab_size, C_s)
        self.bond_embed = nn.Embedding(cfg.bond_vocab_size, C_z)
        self.path_embed = nn.Embedding(cfg.max_path_length + 2, C_z)  # 0..max, max+1 = far
        self.single_in = nn.Linear(cfg.d_single_in, C_s) if cfg.d_single_in else None
        self.pair_in = nn.Linear(cfg.d_pair_in, C_z) if cfg.d_pair_in else None
        self.relpos_embed = (nn.Embedding(2 * cfg.relpos_bins + 1, C_z)
                             if cfg.relpos_bins else None)
        self.noise_embed = NoiseEmbedding(C_s)
        self.num_rbf = cfg.num_rbf  # centres linspace(0, 6, num_rbf) A, computed where used
        self.rbf_proj = nn.Linear(cfg.num_rbf, C_z)
        self.chiral_weight = nn.Linear(C_s, cfg.num_chiral) if cfg.num_chiral else None
        self.chiral_proj = nn.Linear(cfg.num_chiral, C_z) if cfg.num_chiral else None
        self.layers = nn.ModuleList(PairBiasedLayer(cfg) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(C_z)
        self.head_hidden = nn.Linear(C_z, C_z)
        self.head_out = nn.Linear(C_z, 1)

    # ---- conditioning: computed once per molecule, reused by every diffusion step ----
    def condition(self, molecule: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Molecule-only features ``(s0 [B, N, C_s], z0 [B, N, N, C_z])``."""
        cfg = self.config
        types = molecule["atom_types"]
        N = types.shape[-1]
        if N > cfg.max_atoms:
            raise ValueError(f"DiGModel: molecule has {N} nodes; this model's max_atoms is "
                             f"{cfg.max_atoms}")
        if types.numel() and (int(types.min()) < 0 or int(types.max()) >= cfg.atom_vocab_size):
            raise ValueError(f"DiGModel: atom_types in [{int(types.min())}, {int(types.max())}]; "
                             f"expected [0, {cfg.atom_vocab_size})")
        bonds = molecule["bonds"]
        if bonds.numel() and (int(bonds.min()) < 0 or int(bonds.max()) >= cfg.bond_vocab_size):
            raise ValueError(f"DiGModel: bond types in [{int(bonds.min())}, {int(bonds.max())}]; "
                             f"expected [0, {cfg.bond_vocab_size})")
        s0 = self.atom_embed(types)
        z0 = self.bond_embed(bonds) + self.path_embed(
            molecule["path"].clamp(max=cfg.max_path_length + 1))
        if self.single_in is not None:
            s0 = s0 + self.single_in(molecule["single_repr"])
        if self.pair_in is not None:
            z0 = z0 + self.pair_in(molecule["pair_repr"])
        if self.relpos_embed is not None:
            idx = molecule.get("residue_index")
            if idx is None:
                idx = torch.arange(N, device=types.device).expand_as(types)
            rel = (idx.unsqueeze(-1) - idx.unsqueeze(-2)).clamp(-cfg.relpos_bins, cfg.relpos_bins)
            z0 = z0 + self.relpos_embed(rel + cfg.relpos_bins)
        return s0, z0

    def forward(self, x_BN3: torch.Tensor, sigma_B: torch.Tensor, molecule: dict,
                cond: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted noise ``eps [B, N, 3]`` (zero mean over real nodes) for noisy ``x``.

        ``cond``: the output of :meth:`condition` (computed here when omitted).
        """
        cfg = self.config
        s0, z0 = self.condition(molecule) if cond is None else cond
        B, N = x_BN3.shape[:2]
        mask_BN = molecule["mask"].expand(B, N)
        mask_f = mask_BN.to(x_BN3.dtype)
        c_in_B = (sigma_B.pow(2) + cfg.sigma_data ** 2).rsqrt()
        x_BN3 = centre(x_BN3, mask_BN) * c_in_B[:, None, None]
        diff_BNN3 = x_BN3.unsqueeze(2) - x_BN3.unsqueeze(1)
        dist_BNN = diff_BNN3.pow(2).sum(-1).add(1e-8).sqrt()
        centres = torch.linspace(0.0, 6.0, self.num_rbf, device=dist_BNN.device, dtype=dist_BNN.dtype)
        width = centres[1] - centres[0]
        rbf = torch.exp(-((dist_BNN.unsqueeze(-1) - centres) / width).pow(2))
        s_BNC = (s0 + self.noise_embed(sigma_B)[:, None, :]).expand(B, N, -1)
        z_BNNC = z0 + self.rbf_proj(rbf)
        if self.chiral_weight is not None:
            # m_c = mean_k h_kc x_k: learned centroids (equivariant vectors); the triple
            # product det[x_i, x_j, m_c] is rotation-invariant and changes sign under a mirror.
            h_BNc = self.chiral_weight(s0).expand(B, N, -1) * mask_f.unsqueeze(-1)
            m_Bc3 = torch.einsum("bnc,bnd->bcd", h_BNc, x_BN3) / mask_f.sum(-1).clamp_min(1)[
                :, None, None]
            cross_BNc3 = torch.cross(x_BN3.unsqueeze(2), m_Bc3.unsqueeze(1).expand(-1, N, -1, -1),
                                     dim=-1)
            triple_BNNc = torch.einsum("bid,bjcd->bijc", x_BN3, cross_BNc3)
            z_BNNC = z_BNNC + self.chiral_proj(triple_BNNc)
        mask_bias_B11N = ((~mask_BN).to(s_BNC.dtype) * MASK_BIAS)[:, None, None, :]
        for layer in self.layers:
            s_BNC, z_BNNC = layer(s_BNC, z_BNNC, mask_bias_B11N)
        w_BNN = self.head_out(torch.nn.functional.silu(
            self.head_hidden(self.head_norm(z_BNNC)))).squeeze(-1)
        w_BNN = w_BNN * mask_f.unsqueeze(1)
        eps_BN3 = torch.einsum("bij,bijd->bid", w_BNN / (1 + dist_BNN), diff_BNN3)
        return centre(eps_BN3, mask_BN)


def initial_value(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    """Initial value of the parameter called ``name`` (e.g. ``layers.0.qkv.weight``).

    Biases 0, LayerNorm weights 1, embeddings N(0, 1), linear weights N(0, 1/fan_in); the
    residual output projections (``attn_out``, ``ffn_out``, ``outer_out``) are scaled down by
    sqrt(2 * num_layers)-like factor 1/4 so the stack starts close to the identity.
    """
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if leaf == "bias":
        return torch.zeros(shape)
    if module.startswith("norm") or module == "head_norm":
        return torch.ones(shape)
    if module.endswith("_embed"):
        return torch.randn(shape, generator=generator)
    if leaf == "weight" and len(shape) == 2:
        std = shape[1] ** -0.5
        if module in ("attn_out", "ffn_out", "outer_out"):
            std /= 4
        return torch.randn(shape, generator=generator) * std
    raise ValueError(f"initial_value: no rule for parameter {name!r} of shape {shape}")


@torch.no_grad()
def init_parameters(model: DiGModel, seed: int = 0) -> None:
    """Set every parameter to :func:`initial_value` drawn from one generator per name."""
    for name, param in model.named_parameters():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
        param.copy_(initial_value(name, param.shape, gen))


def _stable_hash(text: str) -> int:
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) % (2 ** 31 - 1)
    return value


def build_model(config: DiGConfig, seed: int = 0) -> DiGModel:
    """A :class:`DiGModel` with deterministic initial parameters."""
    model = DiGModel(config)
    init_parameters(model, seed)
    return model
