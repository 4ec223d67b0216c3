"""OpenFold-compatible Evoformer stack (AlphaFold2's trunk) on ds4sci's memory-efficient
Evoformer attention."""

from .config import (BlockConfig, EvoformerPreset, EvoformerStackConfig, ExtraMSAStackConfig,
                     PRESETS, preset)
from .dropout import DropoutColumnwise, DropoutRowwise
from .evoformer import EvoformerBlock, EvoformerStack, ExtraMSABlock, ExtraMSAStack, MSABlock, PairStack
from .msa import MSAAttention, MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from .outer_product_mean import OuterProductMean
from .primitives import NAIVE, Attention, GlobalAttention, Linear, set_attention_backend
from .transition import MSATransition, PairTransition
from .triangle import (TriangleAttention, TriangleAttentionEndingNode, TriangleAttentionStartingNode,
                       TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing,
                       TriangleMultiplicativeUpdate)

__all__ = [
    "NAIVE", "PRESETS", "Attention", "BlockConfig", "DropoutColumnwise", "DropoutRowwise",
    "EvoformerBlock", "EvoformerPreset", "EvoformerStack", "EvoformerStackConfig", "ExtraMSABlock",
    "ExtraMSAStack", "ExtraMSAStackConfig", "GlobalAttention", "Linear", "MSAAttention", "MSABlock",
    "MSAColumnAttention", "MSAColumnGlobalAttention", "MSARowAttentionWithPairBias", "MSATransition",
    "OuterProductMean", "PairStack", "PairTransition", "TriangleAttention",
    "TriangleAttentionEndingNode", "TriangleAttentionStartingNode", "TriangleMultiplicationIncoming",
    "TriangleMultiplicationOutgoing", "TriangleMultiplicativeUpdate", "preset", "set_attention_backend",
]
