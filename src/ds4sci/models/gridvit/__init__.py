"""GridViT: a small bidirectional vision transformer that maps a field on a 2-D grid to another
(patch tokens, no vocabulary, no causal mask). The common trainer's second task and the worked
example of adding a model (README, "Adding a model")."""

from .config import PRESETS, GridViTConfig, preset
from .model import GridViT, init_parameters

__all__ = ["PRESETS", "GridViT", "GridViTConfig", "init_parameters", "preset"]
