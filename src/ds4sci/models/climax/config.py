"""Typed configuration of ClimaX (Nguyen et al. 2023, arXiv:2301.10343) and its named presets.

The first eleven fields are the constructor arguments of ``climax.arch.ClimaX`` (microsoft/ClimaX
v0.3.1) with the same names and defaults; the rest are our long-sequence switches, each exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

LEVELS = (50, 250, 500, 600, 700, 850, 925)
"""Pressure levels (hPa) of ClimaX's published 48-variable set."""

CLIMAX_VARS = (
    "land_sea_mask", "orography", "lattitude",  # sic: ClimaX's spelling, kept for checkpoints
    "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
    *(f"{name}_{level}" for name in ("geopotential", "u_component_of_wind", "v_component_of_wind",
                                     "temperature", "relative_humidity", "specific_humidity")
      for level in LEVELS),
)
"""ClimaX's published ``default_vars`` (48 names, in checkpoint order)."""

SAMPLE_VARS = ("geopotential_500", "geopotential_850", "temperature_500", "temperature_850")
"""Variables of the embedded ERA5 sample (``ds4sci.data.climate``)."""


@dataclass(frozen=True)
class ClimaXConfig:
    default_vars: tuple[str, ...] = SAMPLE_VARS
    """Variables the model knows, in embedding order (V); inputs may use any subset."""
    img_size: tuple[int, int] = (32, 64)
    """Grid (H lat rows, W lon columns) the model runs on; ``patch_size`` must divide both."""
    patch_size: int = 2
    """Side p of a square patch: L = H/p * W/p tokens."""
    embed_dim: int = 1024
    """Token width D."""
    depth: int = 8
    """ViT blocks."""
    decoder_depth: int = 2
    """(Linear + GELU) layers in the prediction head before its last Linear."""
    num_heads: int = 16
    """Heads of the ViT attention and of the variable aggregation; must divide D."""
    mlp_ratio: float = 4.0
    """MLP hidden width / D."""
    drop_path: float = 0.1
    """Stochastic-depth rate of the last block (linearly 0 .. drop_path over blocks)."""
    drop_rate: float = 0.1
    """Dropout after the embeddings, the attention projection and in the MLP."""
    parallel_patch_embed: bool = False
    """Patch-embed weights as one grouped tensor (``ParallelVarPatchEmbed``) instead of a list."""
    agg_tile: int | None = None
    """Patches per tile for tokenisation + variable aggregation (the ``[B, V, L, D]`` tensor then
    exists only one tile at a time, forward and backward); None = all patches at once."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    mlp_chunk: int | None = None
    """Tokens per MLP chunk (the ``[B, L, mlp_ratio*D]`` hidden exists one chunk at a time);
    None = the whole sequence."""

    def __post_init__(self):
        object.__setattr__(self, "default_vars", tuple(self.default_vars))
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        if not self.default_vars or len(set(self.default_vars)) != len(self.default_vars):
            raise ValueError(f"ClimaXConfig: default_vars={self.default_vars!r}; expected distinct names")
        if len(self.img_size) != 2:
            raise ValueError(f"ClimaXConfig: img_size={self.img_size}; expected (H, W)")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClimaXConfig: {name}={getattr(self, name)}; expected >= 1")
        if self.decoder_depth < 0:
            raise ValueError(f"ClimaXConfig: decoder_depth={self.decoder_depth}; expected >= 0")
        for axis, size in zip("HW", self.img_size):
            if size < 1 or size % self.patch_size:
                raise ValueError(f"ClimaXConfig: img_size {axis}={size} is not a positive multiple of "
                                 f"patch_size={self.patch_size} (crop or pad the grid first: "
                                 f"ds4sci.models.climax.interop.fit_grid)")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"ClimaXConfig: embed_dim={self.embed_dim}; expected a multiple of "
                             f"num_heads={self.num_heads} and of 4 (2-D sin-cos position embedding)")
        for name in ("drop_path", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ClimaXConfig: {name}={getattr(self, name)}; expected in [0, 1)")
        for name in ("agg_tile", "mlp_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ClimaXConfig: {name}={getattr(self, name)}; expected None or >= 1")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (lat, lon)."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, the sequence length."""
        return self.grid[0] * self.grid[1]

    def climax_kwargs(self) -> dict:
        """The constructor arguments of ``climax.arch.ClimaX`` (lists, as ClimaX takes them)."""
        kw = {k: v for k, v in asdict(self).items() if k not in ("agg_tile", "activation_checkpointing", "mlp_chunk")}
        kw["default_vars"], kw["img_size"] = list(self.default_vars), list(self.img_size)
        return kw

    def with_(self, **changes) -> ClimaXConfig:
        return replace(self, **changes)


PRESETS: dict[str, ClimaXConfig] = {
    # ~0.3M parameters: the embedded 4-variable 3-degree ERA5 sample (61x120 cropped to 60x120).
    "climax-tiny": ClimaXConfig(default_vars=SAMPLE_VARS, img_size=(60, 120), patch_size=4, embed_dim=64,
                                depth=4, decoder_depth=1, num_heads=4, mlp_ratio=4.0,
                                drop_path=0.0, drop_rate=0.0),
    # The published checkpoints (5.625deg.ckpt / 1.40625deg.ckpt): about 108M parameters.
    "climax-5.625": ClimaXConfig(default_vars=CLIMAX_VARS, img_size=(32, 64), patch_size=2),
    "climax-1.40625": ClimaXConfig(default_vars=CLIMAX_VARS, img_size=(128, 256), patch_size=4),
}


def preset(name: str, **overrides) -> ClimaXConfig:
    """The named preset, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"ClimaX preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
