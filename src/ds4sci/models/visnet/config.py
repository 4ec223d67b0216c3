"""Typed configuration of ViSNet (Wang et al., Nat. Commun. 2024) and its named presets.

Field names and defaults follow PyTorch Geometric's ``torch_geometric.nn.models.ViSNet`` so a PyG
model's constructor arguments map one to one (see ``interop.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ViSNetConfig:
    lmax: int = 1
    """Highest spherical-harmonic degree l of the vector features (1 or 2)."""
    vecnorm_type: str = "none"
    """Normalisation of vector features: "none" or "max_min"."""
    trainable_vecnorm: bool = False
    """Whether the vector-norm weights are trained (else buffers)."""
    num_heads: int = 8
    """Attention heads in each ViS-MP layer; must divide ``hidden_channels``."""
    num_layers: int = 6
    """ViS-MP layers (the last one does not update edge features)."""
    hidden_channels: int = 128
    """Width F of the scalar, vector and edge features."""
    num_rbf: int = 32
    """Exponential-normal radial basis functions per edge."""
    trainable_rbf: bool = False
    """Whether RBF means and betas are trained (else buffers)."""
    max_z: int = 100
    """Size of the atomic-number embedding table (atomic numbers must be < max_z)."""
    cutoff: float = 5.0
    """Interaction cutoff r_c in Angstrom (cosine cutoff and neighbour list radius)."""
    max_num_neighbors: int = 32
    """PyG's cap on neighbours per atom in its radius graph. Our neighbour lists are exact (no
    cap); this only sizes the static padded neighbour list used for compiled execution."""
    vertex: bool = False
    """Use ViS-MP with vertex (dihedral-like) geometric features (ViS_MP_Vertex)."""
    atomref: tuple[float, ...] | None = None
    """Per-element reference energy (eV) added to each atom's output, indexed by Z; None = zeros."""
    reduce_op: str = "add"
    """Reduction of atomic energies to a molecule energy: "add" (= "sum") or "mean"."""
    mean: float | None = None
    """Shift added to each molecule's energy after reduction (None = 0)."""
    std: float | None = None
    """Scale of the atomic outputs before reduction (None = 1)."""
    derivative: bool = True
    """Whether forward() also returns forces F = -dE/dx."""
    activation_checkpointing: bool = False
    """Recompute each ViS-MP layer during the force backward instead of storing its edge
    activations (not in PyG): peak memory ~ one layer's edge tensors + the carried edge features,
    for large systems; results are identical."""
    edge_chunk_size: int | None = None
    """Process each ViS-MP layer's edges in chunks of this many, recomputing each chunk in the
    force backward (not in PyG): memory ~ one chunk's edge activations, for 100k-atom systems.
    None = all edges at once. Results equal the unchunked model up to summation order."""
    smooth_cutoff: bool = False
    """Scale vector messages by the cosine cutoff phi(r) instead of cutting them at r_c (not in
    PyG): PyG's ViSNet keeps a jump there (the s_proj bias survives m = 0), which breaks NVE
    energy conservation of a trained model whenever a pair crosses r_c; True makes the energy
    continuous (C1) in the positions. False = PyG's equations."""
    elements: tuple[int, ...] | None = field(default=None)
    """Atomic numbers the model was trained on (None = any Z < max_z); inputs with other elements
    are rejected by the MD engine."""

    def __post_init__(self):
        for name in ("num_heads", "num_layers", "hidden_channels", "num_rbf", "max_z",
                     "max_num_neighbors"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViSNetConfig: {name}={getattr(self, name)}; expected >= 1")
        if self.edge_chunk_size is not None and self.edge_chunk_size < 1:
            raise ValueError(f"ViSNetConfig: edge_chunk_size={self.edge_chunk_size}; expected "
                             ">= 1 or None")
        if self.lmax not in (1, 2):
            raise ValueError(f"ViSNetConfig: lmax={self.lmax}; expected 1 or 2")
        if self.vecnorm_type not in ("none", "max_min"):
            raise ValueError(f"ViSNetConfig: vecnorm_type={self.vecnorm_type!r}; "
                             "expected 'none' or 'max_min'")
        if self.hidden_channels % self.num_heads:
            raise ValueError(f"ViSNetConfig: hidden_channels={self.hidden_channels} is not "
                             f"divisible by num_heads={self.num_heads}")
        if self.hidden_channels % 2:
            raise ValueError(f"ViSNetConfig: hidden_channels={self.hidden_channels}; expected even "
                             "(the output head halves it)")
        if not self.cutoff > 0:
            raise ValueError(f"ViSNetConfig: cutoff={self.cutoff}; expected > 0 Angstrom")
        if self.reduce_op not in ("add", "sum", "mean"):
            raise ValueError(f"ViSNetConfig: reduce_op={self.reduce_op!r}; expected 'add', 'sum' "
                             "or 'mean'")
        if self.atomref is not None and len(self.atomref) > self.max_z:
            raise ValueError(f"ViSNetConfig: atomref has {len(self.atomref)} entries; expected "
                             f"<= max_z={self.max_z}")
        if self.elements is not None and any(not 0 < z < self.max_z for z in self.elements):
            raise ValueError(f"ViSNetConfig: elements={self.elements}; expected 0 < Z < max_z="
                             f"{self.max_z}")

    @property
    def num_sh(self) -> int:
        """Spherical-harmonic components per vector feature, (lmax+1)^2 - 1."""
        return (self.lmax + 1) ** 2 - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViSNetConfig:
        data = dict(data)
        for key in ("atomref", "elements"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def replace(self, **changes) -> ViSNetConfig:
        return replace(self, **changes)


PRESETS: dict[str, ViSNetConfig] = {
    # Tests and the default laptop run: seconds per epoch on the embedded alanine-dipeptide set.
    "visnet-tiny": ViSNetConfig(num_heads=4, num_layers=2, hidden_channels=32, num_rbf=16,
                                cutoff=5.0),
    # AI2BMD-like (ViSNet as used for protein units): lmax 2, max-min vector norm, 6 layers, F=128.
    "visnet-small": ViSNetConfig(lmax=2, vecnorm_type="max_min", trainable_vecnorm=True,
                                 num_heads=8, num_layers=6, hidden_channels=128, num_rbf=32,
                                 cutoff=5.0),
}


def preset(name: str) -> ViSNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown ViSNet preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
