"""ds4sci: DeepSpeed4Science system technologies on plain PyTorch."""

from .ops.evoformer_attention import DS4Sci_EvoformerAttention, evoformer_attention

__version__ = "0.1.0"

__all__ = ["DS4Sci_EvoformerAttention", "__version__", "evoformer_attention"]
