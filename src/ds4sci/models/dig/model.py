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
nodes. Optionally (``num_local_chiral``) a local pseudoscalar per atom from its bonded
neighbours, ``det[v_1, v_2, v_3]`` of learned weighted sums of bond vectors, enters the single
track: the handedness at each stereocentre, read directly from the bonds around it (also added to the pair track). The triple
products flip sign under reflection: the model is deliberately *not*
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
from torch.utils.checkpoint import checkpoint

from ...data.conformations import torsion_quadruples
from ...ops.evoformer_attention import evoformer_attention, evoformer_attention_naive
from .config import DiGConfig

MASK_BIAS = -1e9  # finite, as OpenFold: a padded key gets zero weight without -inf arithmetic
MAX_DEGREE = 6  # bond counts above this share one degree embedding (local chirality weights)


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


def _tile(chunked: bool, fn, *args):
    """``fn(*args)`` on one row tile of the pair track. Chunked and under autograd, the tile is
    recomputed in backward (only ``args`` are kept), so its [B, t, N, C_z] intermediates never
    accumulate over the tiles; otherwise a plain call (the unchunked model as written)."""
    if chunked and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class PairBiasedLayer(nn.Module):
    """Pre-LN transformer layer on s with a pair bias from z, then an outer-product update of z.

    The pair track arrives as row tiles ``z_tiles``: a list of ``[B, t, N, C_z]`` (one tile of
    all N rows when ``pair_chunk`` is 0), updated in place (list and, without autograd, the
    tiles) and returned; every op on z is row-local, so tiling is exact.
    """

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

    def _bias_tile(self, z_BtNC):
        return self.pair_bias(self.norm_z(z_BtNC)).permute(0, 3, 1, 2)  # [B, H, t, N]

    def _update_tile(self, z_BtNC, a_BtC, b_BNC):
        # z_ij += W (a_i * b_j): a per-channel outer product of the refined single track
        # (DiG's/Graphormer's way of letting z follow the node features).
        return z_BtNC + self.outer_out(a_BtC.unsqueeze(2) * b_BNC.unsqueeze(1))

    def forward(self, s_BNC, z_tiles: list[torch.Tensor], mask_bias_B11N):
        B, N, C = s_BNC.shape
        H, chunked = self.cfg.num_heads, len(z_tiles) > 1
        x = self.norm_s(s_BNC)
        q_BNHD, k_BNHD, v_BNHD = self.qkv(x).view(B, N, 3, H, C // H).unbind(2)
        bias_BHNN = torch.cat([_tile(chunked, self._bias_tile, z) for z in z_tiles], dim=2)
        o_BNHD = self.attention(q_BNHD, k_BNHD, v_BNHD, [mask_bias_B11N, bias_BHNN])
        o_BNC = o_BNHD.reshape(B, N, C) * torch.sigmoid(self.gate(x))
        s_BNC = s_BNC + self.attn_out(o_BNC)
        s_BNC = s_BNC + self.ffn_out(torch.nn.functional.gelu(self.ffn_in(self.norm_ffn(s_BNC))))
        y = self.norm_outer(s_BNC)
        a_BNC, b_BNC = self.outer_a(y), self.outer_b(y)
        a_tiles = a_BNC.split([z.shape[1] for z in z_tiles], dim=1)
        if chunked and not torch.is_grad_enabled():
            # Sampling: update the tiles in place (they are this forward's own tensors, never
            # the cached z0), so the old and the new z never coexist whole.
            for z, a in zip(z_tiles, a_tiles):
                z += self.outer_out(a.unsqueeze(2) * b_BNC.unsqueeze(1))
            return s_BNC, z_tiles
        for i, a in enumerate(a_tiles):  # replaced in the caller's list one by one: an old
            # tile that backward does not need is freed at once, not after the whole new z
            z_tiles[i] = _tile(chunked, self._update_tile, z_tiles[i], a, b_BNC)
        return s_BNC, z_tiles


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
        K = cfg.num_local_chiral
        # The local frames' neighbour weights are fixed random functions of the atom
        # descriptors (requires_grad False): trained, they collapsed (two of the three weighted
        # bond vectors turned anti-parallel, |chi| at alanine's C-alpha fell from ~0.3 to
        # ~0.03 in 5k steps, and the normals with it), i.e. the network switched the feature off.
        self.local_chiral_atom_embed = nn.Embedding(cfg.atom_vocab_size, C_s) if K else None
        self.local_chiral_degree_embed = nn.Embedding(MAX_DEGREE + 1, C_s) if K else None
        self.local_chiral_weight = nn.Linear(C_s, 3 * K) if K else None
        for module in (self.local_chiral_atom_embed, self.local_chiral_degree_embed,
                       self.local_chiral_weight):
            if module is not None:
                module.requires_grad_(False)
        self.local_chiral_proj = nn.Linear(K, C_s) if K else None
        # chi also enters the pair track directly (z_ij += P chi_i + Q chi_j): the output head
        # reads z, so the weights at CB can depend on the handedness at its C-alpha at once
        # instead of through attention and outer products.
        self.local_chiral_pair_i = nn.Linear(K, C_z) if K else None
        self.local_chiral_pair_j = nn.Linear(K, C_z) if K else None
        self.torsion_proj = nn.Linear(2 * cfg.num_torsion, C_z) if cfg.num_torsion else None
        self.layers = nn.ModuleList(PairBiasedLayer(cfg) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(C_z)
        self.head_hidden = nn.Linear(C_z, C_z)
        self.head_out = nn.Linear(C_z, 1)
        self.local_chiral_head = nn.Linear(C_z, K) if cfg.local_chiral_head else None

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
        if self.single_in is not None:
            s0 = s0 + self.single_in(molecule["single_repr"])
        idx = None
        if self.relpos_embed is not None:
            idx = molecule.get("residue_index")
            if idx is None:
                idx = torch.arange(N, device=types.device).expand_as(types)
        rows = self.row_tiles(N)
        if len(rows) == 1:
            return s0, self._pair_input(molecule, idx, 0, N)
        if torch.is_grad_enabled():
            return s0, torch.cat([self._pair_input(molecule, idx, i0, i1) for i0, i1 in rows], 1)
        # Without autograd, filled in place: only one tile's temporaries besides z0.
        z0 = None
        for i0, i1 in rows:
            tile = self._pair_input(molecule, idx, i0, i1)
            if z0 is None:
                z0 = tile.new_empty(tile.shape[0], N, *tile.shape[2:])
            z0[:, i0:i1] = tile
        return s0, z0

    def row_tiles(self, N: int) -> list[tuple[int, int]]:
        """Row ranges ``[(i0, i1), ...]`` of the pair-track tiles (one if not chunked)."""
        t = self.config.pair_chunk or N
        return [(i0, min(i0 + t, N)) for i0 in range(0, N, t)] or [(0, 0)]

    def _pair_input(self, molecule: dict, idx, i0: int, i1: int) -> torch.Tensor:
        """Molecule-only pair features of rows ``i0:i1``: ``[B, i1-i0, N, C_z]``."""
        cfg = self.config
        z = self.bond_embed(molecule["bonds"][:, i0:i1]) + self.path_embed(
            molecule["path"][:, i0:i1].clamp(max=cfg.max_path_length + 1))
        if self.pair_in is not None:
            z = z + self.pair_in(molecule["pair_repr"][:, i0:i1])
        if self.relpos_embed is not None:
            rel = (idx[:, i0:i1, None] - idx[:, None, :]).clamp(-cfg.relpos_bins, cfg.relpos_bins)
            z = z + self.relpos_embed(rel + cfg.relpos_bins)
        return z

    def local_chirality(self, x_BN3: torch.Tensor, molecule: dict,
                        normals: bool = False):
        """Local pseudoscalars ``chi [B, N, K]`` (K = ``num_local_chiral``) from bonded neighbours
        (and, with ``normals``, the pseudovectors ``n [B, N, K, 3]`` of ``local_chiral_head``).

        ``chi_ki = v_k1 . (v_k2 x v_k3) / (|v_k1| |v_k2| |v_k3| + eps)``, ``v_km,i = sum_a
        A_ia w_km(a) (x_a - x_i)`` over bonded neighbours a (adjacency A). The weights depend
        only on the molecule (a's element, degree and the sum of its neighbours' element
        embeddings, through fixed random embeddings and projection), so the methyl carbon and the carbonyl carbon around alanine's C-alpha get
        different weights and the sign of chi is the handedness there. Rotation/translation
        invariant, flips sign under a mirror; 0 at atoms with fewer than 3 bonds (their v's are
        coplanar) or with alike substituents. Bounded by 1 (Hadamard's inequality).
        ``n_ki = v_k2 x v_k3 / (|v_k2| |v_k3| + eps)``: rotates with x, does not flip under a
        mirror (a pseudovector), norm <= 1.
        """
        K = self.config.num_local_chiral
        B, N = x_BN3.shape[:2]
        adj_1NN = ((molecule["bonds"] > 0) & molecule["mask"].unsqueeze(1)
                   & molecule["mask"].unsqueeze(2)).to(x_BN3.dtype)
        degree = adj_1NN.sum(-1).long().clamp(max=MAX_DEGREE)
        emb = self.local_chiral_atom_embed(molecule["atom_types"]).to(x_BN3.dtype)
        h = emb + self.local_chiral_degree_embed(degree).to(x_BN3.dtype) + adj_1NN @ emb
        w_1N3K = self.local_chiral_weight(h)  # per neighbour a: 3K scalars w_km(a), fixed
        aw_1NN3K = adj_1NN.unsqueeze(-1) * w_1N3K.unsqueeze(1)  # [., i, a, 3K]
        # v_i = sum_a A_ia w(a) x_a - (sum_a A_ia w(a)) x_i: bond vectors, weighted
        v_BN3K3 = (torch.einsum("bian,bad->bind", aw_1NN3K.expand(B, -1, -1, -1), x_BN3)
                   - aw_1NN3K.sum(2).unsqueeze(-1) * x_BN3.unsqueeze(2))
        v1, v2, v3 = v_BN3K3.view(B, N, 3, K, 3).unbind(2)  # each [B, N, K, 3]
        cross_BNK3 = torch.cross(v2, v3, dim=-1)
        n2, n3 = v2.norm(dim=-1), v3.norm(dim=-1)
        chi_BNK = (v1 * cross_BNK3).sum(-1) / (v1.norm(dim=-1) * n2 * n3 + 1e-6)
        if not normals:
            return chi_BNK
        return chi_BNK, cross_BNK3 / (n2 * n3 + 1e-6).unsqueeze(-1)

    def torsion_features(self, x_BN3: torch.Tensor, molecule: dict) -> torch.Tensor:
        """Dihedral harmonics on 1-4 pairs: ``T [B, N, N, 2M]`` (M = ``num_torsion``).

        For every bonded chain i-j-k-l, theta = atan2(|b2| b1 . (b2 x b3), (b1 x b2) . (b2 x b3))
        with b1 = x_j - x_i, b2 = x_k - x_j, b3 = x_l - x_k (IUPAC sign, as mdtraj's), and
        ``T_il += [cos(theta) .. cos(M theta), sin(theta) .. sin(M theta)]``; zero elsewhere. Chains come from
        ``molecule["torsions"]`` (:func:`torsion_quadruples`; derived from the bonds if absent).
        A chain whose atoms are nearly collinear gives a feature near 0 (normalised with an
        eps), not noise.
        """
        M = self.config.num_torsion
        B, N = x_BN3.shape[:2]
        quads = molecule.get("torsions")
        if quads is None:
            quads = torsion_quadruples(molecule["bonds"])
        b, i, j, k, l = quads.to(x_BN3.device).unbind(1)
        if molecule["bonds"].shape[0] == 1 and B > 1:  # one molecule for every sample
            b = torch.arange(B, device=x_BN3.device).repeat_interleave(len(i))
            i, j, k, l = (a.repeat(B) for a in (i, j, k, l))
        flat = x_BN3.reshape(B * N, 3)
        p0, p1, p2, p3 = (flat[b * N + a] for a in (i, j, k, l))
        b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
        n2 = torch.cross(b2, b3, dim=-1)
        cos_ = (torch.cross(b1, b2, dim=-1) * n2).sum(-1)
        sin_ = b2.norm(dim=-1) * (b1 * n2).sum(-1)
        r = (cos_.square() + sin_.square() + 1e-12).sqrt()
        c1, s1 = cos_ / r, sin_ / r
        feats, c, s = [], c1, s1
        for _ in range(M):  # (c + i s)^m by repeated multiplication
            feats += [c, s]
            c, s = c * c1 - s * s1, s * c1 + c * s1
        T = x_BN3.new_zeros(B * N * N, 2 * M)
        T.index_add_(0, b * N * N + i * N + l, torch.stack(feats[0::2] + feats[1::2], dim=-1))
        return T.view(B, N, N, 2 * M)

    def _embed_tile(self, z0_BtNC, dist_BtN, triple_BtNc, chi_i_BtC=None, chi_j_BNC=None,
                    torsion_BtNF=None):
        centres = torch.linspace(0.0, 6.0, self.num_rbf, device=dist_BtN.device,
                                 dtype=dist_BtN.dtype)
        width = centres[1] - centres[0]
        rbf = torch.exp(-((dist_BtN.unsqueeze(-1) - centres) / width).pow(2))
        z = z0_BtNC + self.rbf_proj(rbf)
        if triple_BtNc is not None:
            z = z + self.chiral_proj(triple_BtNc)
        if chi_i_BtC is not None:
            z = z + chi_i_BtC.unsqueeze(2) + chi_j_BNC.unsqueeze(1)
        if torsion_BtNF is not None:
            z = z + self.torsion_proj(torsion_BtNF)
        return z

    def _head_tile(self, z_BtNC):
        """Invariant output weights of one tile: ``w [B, t, N]`` and, with
        ``local_chiral_head``, ``g [B, t, N, K]`` (else None)."""
        hidden = torch.nn.functional.silu(self.head_hidden(self.head_norm(z_BtNC)))
        g = self.local_chiral_head(hidden) if self.local_chiral_head is not None else None
        return self.head_out(hidden).squeeze(-1), g

    def _run_layers(self, first: int, last: int, s_BNC, mask_bias_B11N, *z_tiles):
        z_tiles = list(z_tiles)
        for layer in self.layers[first:last]:
            s_BNC, z_tiles = layer(s_BNC, z_tiles, mask_bias_B11N)
        return (s_BNC, *z_tiles)

    def forward(self, x_BN3: torch.Tensor, sigma_B: torch.Tensor, molecule: dict,
                cond: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted noise ``eps [B, N, 3]`` (zero mean over real nodes) for noisy ``x``.

        ``cond``: the output of :meth:`condition` (computed here when omitted).
        """
        cfg = self.config
        s0, z0 = self.condition(molecule) if cond is None else cond
        B, N = x_BN3.shape[:2]
        rows = self.row_tiles(N)
        chunked = len(rows) > 1
        sizes = [i1 - i0 for i0, i1 in rows]
        mask_BN = molecule["mask"].expand(B, N)
        mask_f = mask_BN.to(x_BN3.dtype)
        c_in_B = (sigma_B.pow(2) + cfg.sigma_data ** 2).rsqrt()
        x_BN3 = centre(x_BN3, mask_BN) * c_in_B[:, None, None]
        diff_BNN3 = x_BN3.unsqueeze(2) - x_BN3.unsqueeze(1)
        dist_BNN = diff_BNN3.pow(2).sum(-1).add(1e-8).sqrt()
        s_BNC = (s0 + self.noise_embed(sigma_B)[:, None, :]).expand(B, N, -1)
        normals_BNK3 = None
        if self.local_chiral_proj is not None:  # scale-free: scaled coordinates will do
            chi_BNK = self.local_chirality(x_BN3, molecule, normals=cfg.local_chiral_head)
            if cfg.local_chiral_head:
                chi_BNK, normals_BNK3 = chi_BNK
            s_BNC = s_BNC + self.local_chiral_proj(chi_BNK)
            chi_i = self.local_chiral_pair_i(chi_BNK).split(sizes, dim=1)
            chi_j_BNC = self.local_chiral_pair_j(chi_BNK)
        else:
            chi_i, chi_j_BNC = [None] * len(rows), None
        triples = [None] * len(rows)
        if self.chiral_weight is not None:
            # m_c = mean_k h_kc x_k: learned centroids (equivariant vectors); the triple
            # product det[x_i, x_j, m_c] is rotation-invariant and changes sign under a mirror.
            h_BNc = self.chiral_weight(s0).expand(B, N, -1) * mask_f.unsqueeze(-1)
            m_Bc3 = torch.einsum("bnc,bnd->bcd", h_BNc, x_BN3) / mask_f.sum(-1).clamp_min(1)[
                :, None, None]
            cross_BNc3 = torch.cross(x_BN3.unsqueeze(2), m_Bc3.unsqueeze(1).expand(-1, N, -1, -1),
                                     dim=-1)
            triples = [torch.einsum("bid,bjcd->bijc", x_t, cross_BNc3)
                       for x_t in x_BN3.split(sizes, dim=1)]
        torsions = [None] * len(rows)
        if self.torsion_proj is not None:
            torsions = self.torsion_features(x_BN3, molecule).split(sizes, dim=1)
        z_tiles = [_tile(chunked, self._embed_tile, z0_t, d_t, tr_t, ci_t, chi_j_BNC, to_t)
                   for z0_t, d_t, tr_t, ci_t, to_t in zip(
                       z0.split(sizes, dim=1), dist_BNN.split(sizes, dim=1), triples, chi_i,
                       torsions)]
        mask_bias_B11N = ((~mask_BN).to(s_BNC.dtype) * MASK_BIAS)[:, None, None, :]
        k = cfg.checkpoint_layers
        if k and torch.is_grad_enabled():
            # Segments of k layers recomputed in backward: only segment inputs are kept.
            for first in range(0, len(self.layers), k):
                s_BNC, *z_tiles = checkpoint(self._run_layers, first, first + k, s_BNC,
                                             mask_bias_B11N, *z_tiles, use_reentrant=False)
        else:
            s_BNC, *z_tiles = self._run_layers(0, len(self.layers), s_BNC, mask_bias_B11N,
                                               *z_tiles)
        w_tiles, g_tiles = zip(*[_tile(chunked, self._head_tile, z) for z in z_tiles])
        w_BNN = torch.cat(w_tiles, dim=1) * mask_f.unsqueeze(1)
        out_BN3 = torch.einsum("bij,bijd->bid", w_BNN / (1 + dist_BNN), diff_BNN3)
        if normals_BNK3 is not None:
            # pseudovector terms: the local normals at atoms j (0 on padding), invariant weights
            g_BNNK = torch.cat(g_tiles, dim=1)
            out_BN3 = out_BN3 + torch.einsum("bijk,bjkd->bid", g_BNNK, normals_BNK3)
        if cfg.precondition == "edm":
            # eps = (x - D)/sigma with D = c_skip x + c_out F (EDM): c_in^2 sigma x - sd c_in F;
            # x_BN3 here is already c_in x (centred).
            c_B11 = c_in_B[:, None, None]
            out_BN3 = c_B11 * sigma_B[:, None, None] * x_BN3 - cfg.sigma_data * c_B11 * out_BN3
        return centre(out_BN3, mask_BN)


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
