"""Evoformer attention: exact, memory-efficient attention with broadcast additive biases."""

from . import dispatch, reference, torch_tiled, triton_backend
from .dispatch import Backend
from .op import DS4Sci_EvoformerAttention, evoformer_attention
from .reference import evoformer_attention_naive, evoformer_attention_reference

dispatch.register(
    Backend(
        name="torch",
        priority=10,
        dtypes=dispatch.FLOAT_DTYPES,
        forward=torch_tiled.forward,
        backward=torch_tiled.backward,
        description="tiled pure PyTorch, any device; fp32 tile arithmetic, logits never materialised",
    )
)
dispatch.register(
    Backend(
        name="triton",
        priority=20,
        dtypes=triton_backend.DTYPES,
        forward=triton_backend.forward,
        backward=triton_backend.backward,
        device_types=frozenset({"cuda", "cpu"}),
        auto_device_types=frozenset({"cuda"}),
        max_head_dim=triton_backend.MAX_HEAD_DIM,
        environment_reasons=triton_backend.environment_reasons,
        input_reasons=triton_backend.input_reasons,
        description="Triton kernels for GPUs (CPU: Triton's interpreter, named explicitly, "
                    "TRITON_INTERPRET=1); deterministic fp32 bias gradients",
    )
)
dispatch.register(
    Backend(
        name="reference",
        priority=-1,
        dtypes=dispatch.FLOAT_DTYPES,
        forward=reference.forward,
        backward=reference.backward,
        description="materialised fp32 reference (the truth for tests; O(L^2) memory, never auto)",
    )
)

__all__ = [
    "Backend",
    "DS4Sci_EvoformerAttention",
    "dispatch",
    "evoformer_attention",
    "evoformer_attention_naive",
    "evoformer_attention_reference",
]
