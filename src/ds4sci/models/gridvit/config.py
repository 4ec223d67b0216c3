"""Typed configuration of GridViT and its named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class GridViTConfig:
    channels: int = 2
    """Field variables per grid point (input and output alike)."""
    height: int = 16
    """Grid points along y (rows); ``patch_size`` must divide it."""
    width: int = 16
    """Grid points along x (columns); ``patch_size`` must divide it."""
    patch_size: int = 4
    """Side of a square patch: one token per patch."""
    embed_dim: int = 32
    """Token width D."""
    depth: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; must divide ``embed_dim``."""
    mlp_ratio: float = 2.0
    """MLP hidden width / D."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    initializer_range: float = 0.02
    """Std of the normal init of linear weights."""

    def __post_init__(self):
        for name in ("channels", "height", "width", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GridViTConfig: {name}={getattr(self, name)}; expected >= 1")
        for name in ("height", "width"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"GridViTConfig: {name}={getattr(self, name)} is not a multiple of "
                                 f"patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"GridViTConfig: embed_dim={self.embed_dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"GridViTConfig: mlp_ratio={self.mlp_ratio}; expected > 0")

    @property
    def num_patches(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GridViTConfig:
        return cls(**data)

    def replace(self, **changes) -> GridViTConfig:
        return replace(self, **changes)


PRESETS: dict[str, GridViTConfig] = {
    "gridvit-tiny": GridViTConfig(),
    "gridvit-small": GridViTConfig(height=64, width=64, patch_size=4, embed_dim=128, depth=4, num_heads=8),
}


def preset(name: str) -> GridViTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown GridViT preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
