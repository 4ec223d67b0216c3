"""Typed hyper-parameters of the Evoformer blocks and stacks, with OpenFold's names and its
"initial training" / "finetuning" presets (AF2 Supplement Tables 4 and 5; OpenFold
``config.py``). The modules validate their keyword arguments through these dataclasses, so a
typo or an impossible value fails at construction with the argument named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

# OpenFold config keys that tune its own CUDA memory handling; accepted and ignored so its
# config dicts can be passed as they are.
OPENFOLD_ONLY_KEYS = frozenset({"clear_cache_between_blocks", "tune_chunk_size"})


@dataclass
class BlockConfig:
    """One Evoformer / extra-MSA block."""

    c_m: int
    """MSA channels (256 in the main stack, ``c_e`` = 64 in the extra-MSA stack)."""
    c_z: int
    """Pair channels."""
    c_hidden_msa_att: int
    """Per-head channels of MSA row/column attention."""
    c_hidden_opm: int
    """Hidden channels of the outer product mean."""
    c_hidden_mul: int
    """Hidden channels of the triangle multiplicative updates."""
    c_hidden_pair_att: int
    """Per-head channels of triangle attention."""
    no_heads_msa: int
    """Heads of MSA attention."""
    no_heads_pair: int
    """Heads of triangle attention."""
    transition_n: int = 4
    """Hidden-width factor of the MSA and pair transitions."""
    msa_dropout: float = 0.15
    """Row-wise dropout rate after MSA row attention."""
    pair_dropout: float = 0.25
    """Row/column-wise dropout rate after the triangle updates."""
    no_column_attention: bool = False
    """Skip MSA column attention (OpenFold's single-sequence "seqemb" mode)."""
    opm_first: bool = False
    """Outer product mean before MSA attention (AlphaFold-Multimer's order)."""
    fuse_projection_weights: bool = False
    """Fused ``linear_ab_*`` triangle projections (AlphaFold-Multimer weights)."""
    inf: float = 1e9
    """Magnitude of the mask bias."""
    eps: float = 1e-8
    """Epsilon of global attention's masked mean."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{type(self).__name__}: {f.name}={value!r}; expected a positive int")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{type(self).__name__}: {f.name}={value!r}; expected True or False")
        for name in ("msa_dropout", "pair_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{type(self).__name__}: {name}={rate!r}; expected a rate in [0, 1)")
        if not self.inf > 0 or not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: inf={self.inf}, eps={self.eps}; both must be > 0")

    def block_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(BlockConfig)}


@dataclass
class EvoformerStackConfig(BlockConfig):
    """The main Evoformer trunk (Algorithm 6)."""

    c_s: int = 384
    """Channels of the single representation projected from the first MSA row."""
    no_blocks: int = 48
    """Number of blocks."""
    blocks_per_ckpt: int | None = None
    """Blocks per activation checkpoint in training (None: no checkpointing)."""

    def __post_init__(self):
        super().__post_init__()
        if self.blocks_per_ckpt is not None and (not isinstance(self.blocks_per_ckpt, int)
                                                 or self.blocks_per_ckpt < 1):
            raise ValueError(f"EvoformerStackConfig: blocks_per_ckpt={self.blocks_per_ckpt!r}; "
                             "expected None or a positive int")


@dataclass
class ExtraMSAStackConfig(BlockConfig):
    """The extra-MSA stack (Algorithm 18): blocks with global column attention."""

    no_blocks: int = 4
    """Number of blocks."""
    ckpt: bool = False
    """Checkpoint each block's activations in training."""


def parse_kwargs(config_cls, owner: str, kwargs: dict):
    """Build ``config_cls`` from module keyword arguments, dropping OpenFold-only keys and
    naming any unknown one."""
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - known - OPENFOLD_ONLY_KEYS)
    if unknown:
        raise TypeError(f"{owner}: unknown argument(s) {unknown}; expected some of {sorted(known)}")
    return config_cls(**{k: v for k, v in kwargs.items() if k in known})


@dataclass(frozen=True)
class EvoformerPreset:
    """A named OpenFold training configuration: model dims plus the crop sizes it trains at."""

    name: str
    evoformer_stack: EvoformerStackConfig
    extra_msa_stack: ExtraMSAStackConfig
    crop_size: int
    """N_res: residues per training crop."""
    max_msa_clusters: int
    """N_seq: rows of the clustered MSA fed to the Evoformer stack."""
    max_extra_msa: int
    """N_extra: rows fed to the extra-MSA stack."""
    notes: str = field(default="", compare=False)


def _evoformer_stack() -> EvoformerStackConfig:
    return EvoformerStackConfig(c_m=256, c_z=128, c_hidden_msa_att=32, c_hidden_opm=32,
                                c_hidden_mul=128, c_hidden_pair_att=32, no_heads_msa=8,
                                no_heads_pair=4, c_s=384, no_blocks=48, blocks_per_ckpt=1)


def _extra_msa_stack() -> ExtraMSAStackConfig:
    return ExtraMSAStackConfig(c_m=64, c_z=128, c_hidden_msa_att=8, c_hidden_opm=32,
                               c_hidden_mul=128, c_hidden_pair_att=32, no_heads_msa=8,
                               no_heads_pair=4, no_blocks=4, ckpt=True)


PRESETS: dict[str, EvoformerPreset] = {
    "openfold-initial-training": EvoformerPreset(
        "openfold-initial-training", _evoformer_stack(), _extra_msa_stack(),
        crop_size=256, max_msa_clusters=128, max_extra_msa=1024,
        notes="AF2 Supplement Table 4, initial training; OpenFold model_config('initial_training')"),
    "openfold-finetuning": EvoformerPreset(
        "openfold-finetuning", _evoformer_stack(), _extra_msa_stack(),
        crop_size=384, max_msa_clusters=512, max_extra_msa=5120,
        notes="AF2 Supplement Table 4, fine-tuning; OpenFold model_config('finetuning')"),
}


def preset(name: str) -> EvoformerPreset:
    """A fresh copy of a named preset (``openfold-initial-training``, ``openfold-finetuning``)."""
    if name not in PRESETS:
        raise ValueError(f"evoformer preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
