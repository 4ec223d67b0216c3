"""Typed configuration of the GenSLM model (GPT-NeoX over codons) and its named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

_ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "relu")
_CHECKPOINTING = ("none", "full", "selective")
# The fields that decide the weights' shapes and the function they compute (not memory options,
# the init scale or HF bookkeeping).
_ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "rotary_pct", "rotary_emb_base", "layer_norm_eps", "hidden_act",
                 "use_parallel_residual")


@dataclass(frozen=True)
class GenSLMConfig:
    vocab_size: int = 69
    """Token ids; 69 = GenSLM's codon vocabulary (5 special tokens + 64 codons)."""
    hidden_size: int = 512
    """Model width."""
    num_hidden_layers: int = 8
    """Number of transformer layers."""
    num_attention_heads: int = 8
    """Attention heads; must divide ``hidden_size``."""
    intermediate_size: int = 2048
    """MLP hidden width."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get rotary position embedding (GPT-NeoX partial rotary)."""
    rotary_emb_base: float = 10000.0
    """Rotary frequency base."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    hidden_act: str = "gelu_fast"
    """MLP activation: gelu_fast / gelu_new (tanh approximation, GenSLM's), gelu (exact), relu."""
    use_parallel_residual: bool = True
    """GPT-NeoX parallel residual: x + attn(ln1(x)) + mlp(ln2(x))."""
    initializer_range: float = 0.02
    """Std of the normal init of weights."""
    max_position_embeddings: int = 2048
    """Recorded for HF interop only: nothing is sized by it (rotary is computed per position)."""
    bos_token_id: int = 0
    """Id HF configs record as BOS (GenSLM's configs say 0; its tokenizer adds no BOS)."""
    eos_token_id: int = 0
    """Id HF configs record as EOS (GenSLM's configs say 0)."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: none, full (keep only each layer's input) or selective
    (MLP only)."""
    checkpoint_num_layers: int = 1
    """With full checkpointing, layers per checkpoint segment: 1 keeps every layer's input for
    backward; k > 1 keeps every k-th (the first segment only the token ids) and recomputes the
    segment's forward once more in backward (less memory, one more forward pass). GPT-NeoX's
    ``checkpoint-num-layers``."""
    loss_chunk_size: int | None = 4096
    """Tokens per chunk of the fused final projection + cross-entropy; None = whole sequence."""
    mlp_chunk_size: int | None = None
    """Tokens per chunk of the MLP, each chunk recomputed in backward, so the ``[S, 4E]``
    activations exist one chunk at a time (tiled MLP); None = whole sequence."""
    attention_head_chunk: int | None = None
    """Heads per group of tiled attention in training: each group's ``[S, 3 x heads x D]``
    projections and attention are recomputed from the layer input in backward, one group at a
    time; None = all heads at once. Under Ulysses or tensor parallelism (heads already split over
    ranks) layers attend with all their heads at once; under ring and hybrid sequence parallelism
    the ring's backward runs one pass per group of this many heads (``ring.ring_attention``)."""

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"GenSLMConfig: {name}={getattr(self, name)}; expected >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GenSLMConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"GenSLMConfig: rotary_pct={self.rotary_pct}; expected in [0, 1]")
        if self.rotary_dims % 2:
            raise ValueError(
                f"GenSLMConfig: rotary dims int(head_dim {self.head_dim} * rotary_pct {self.rotary_pct}) "
                f"= {self.rotary_dims} is odd; rotary embedding needs an even number"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"GenSLMConfig: hidden_act={self.hidden_act!r}; expected one of {_ACTIVATIONS}")
        if self.activation_checkpointing not in _CHECKPOINTING:
            raise ValueError(
                f"GenSLMConfig: activation_checkpointing={self.activation_checkpointing!r}; "
                f"expected one of {_CHECKPOINTING}"
            )
        if self.checkpoint_num_layers < 1:
            raise ValueError(f"GenSLMConfig: checkpoint_num_layers={self.checkpoint_num_layers}; expected >= 1")
        if self.checkpoint_num_layers > 1 and self.activation_checkpointing != "full":
            raise ValueError(
                f"GenSLMConfig: checkpoint_num_layers={self.checkpoint_num_layers} needs "
                f"activation_checkpointing='full' (got {self.activation_checkpointing!r})")
        for name in ("loss_chunk_size", "mlp_chunk_size", "attention_head_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"GenSLMConfig: {name}={value}; expected >= 1 or None")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture_changes(self, other: "GenSLMConfig") -> dict:
        """``{field: (self's, other's)}`` for the architecture fields that differ: weights of one
        run on the other only if this is empty."""
        return {name: (getattr(self, name), getattr(other, name)) for name in _ARCHITECTURE
                if getattr(self, name) != getattr(other, name)}

    @classmethod
    def from_dict(cls, data: dict) -> "GenSLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GenSLMConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "GenSLMConfig":
        return replace(self, **changes)


PRESETS: dict[str, GenSLMConfig] = {
    # GenSLM's GPT-NeoX shapes, from genslm/architectures/neox/neox_<params>.json.
    "genslm-25m": GenSLMConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               intermediate_size=2048),
    "genslm-250m": GenSLMConfig(hidden_size=1840, num_hidden_layers=12, num_attention_heads=16,
                                intermediate_size=2048),
    "genslm-2.5b": GenSLMConfig(hidden_size=3840, num_hidden_layers=28, num_attention_heads=32,
                                intermediate_size=4096),
    # DISCREPANCY: GenSLM's 25B file says hidden_size 8196 (earlier 8096), neither divisible by
    # its 64 heads, so no model can be built from it; 8192 is the nearest shape that works.
    "genslm-25b": GenSLMConfig(hidden_size=8192, num_hidden_layers=64, num_attention_heads=64,
                               intermediate_size=8000),
    # Small enough for tests and the 2-core default demo.
    "genslm-tiny": GenSLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=256),
}


def preset(name: str) -> GenSLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown GenSLM preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
