"""Reference Evoformer attention: the plain, fully materialised computation.

This is the truth that every backend, test and benchmark is compared with. It builds the whole
``[*, H, L_q, L_k]`` logits tensor, so it is only for small inputs.

Legend: ``*`` batch-like leading dims (e.g. ``B, N``), ``L_q``/``L_k`` query/key length,
``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import compute_dtype


def evoformer_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: Sequence[torch.Tensor] = (),
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + sum(biases)) v, computed in ``compute_dtype``.

    q: ``[*, L_q, H, D]``; k, v: ``[*, L_k, H, D]``; each bias broadcasts to ``[*, H, L_q, L_k]``.
    Returns ``[*, L_q, H, D]`` in ``compute_dtype``.

    A row whose logits are all ``-inf`` (fully masked with an infinite mask) yields 0, not NaN;
    this is the documented semantics that every backend follows. Finite masks (OpenFold's -1e9)
    go through the softmax like any other value.
    """
    probs = _probabilities(q, k, biases, compute_dtype)
    return (probs @ v.to(compute_dtype).transpose(-2, -3)).transpose(-2, -3)


def _probabilities(q, k, biases, dtype) -> torch.Tensor:
    """Materialised attention probabilities ``[*, H, L_q, L_k]``; fully ``-inf`` rows are 0."""
    scale = q.shape[-1] ** -0.5
    q_HQD, k_HKD = (t.to(dtype).transpose(-2, -3) for t in (q, k))
    logits = (q_HQD * scale) @ k_HKD.transpose(-1, -2)
    for bias in biases:
        logits = logits + bias.to(dtype)
    row_max = logits.amax(dim=-1, keepdim=True)
    fully_masked = row_max == float("-inf")
    # Shift by a finite max so that exp never sees -inf - -inf.
    probs = torch.exp(logits - torch.where(fully_masked, 0.0, row_max))
    return probs / torch.where(fully_masked, 1.0, probs.sum(dim=-1, keepdim=True))


def evoformer_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """What stock OpenFold does, in the inputs' own dtype: materialise logits, add biases, softmax.

    Used as the "plain torch" yardstick: tests allow a backend at most twice this path's error,
    and benchmarks compare against it. Fully masked ``-inf`` rows give NaN here, as in stock torch.
    """
    scale = q.shape[-1] ** -0.5
    logits = (q.transpose(-2, -3) * scale) @ k.transpose(-2, -3).transpose(-1, -2)
    for bias in biases:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return (probs @ v.transpose(-2, -3)).transpose(-2, -3)


def forward(q, k, v, biases, tile_elements=None):
    """Backend entry: materialised forward; ``tile_elements`` is ignored."""
    out = evoformer_attention_reference(q, k, v, biases, compute_dtype=compute_dtype(q.dtype))
    stats_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3], 2)
    stats = torch.zeros(stats_shape, dtype=compute_dtype(q.dtype), device=q.device)  # unused
    return out.to(q.dtype).contiguous(), stats


def backward(grad_out, q, k, v, biases, out, stats, bias_needs_grad, tile_elements=None):
    """Backend entry: the textbook softmax-attention gradients on materialised tensors.

    (Written out rather than through autograd: a custom op's implementation runs below the
    autograd dispatch key, where no graph is recorded.)
    """
    cdt = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    q_HQD, k_HKD, v_HKD, do_HQD = (t.to(cdt).transpose(-2, -3) for t in (q, k, v, grad_out))
    probs = _probabilities(q, k, biases, cdt)
    out_HQD = probs @ v_HKD
    dv = probs.transpose(-1, -2) @ do_HQD
    dprobs = do_HQD @ v_HKD.transpose(-1, -2)
    dlogits = probs * (dprobs - (do_HQD * out_HQD).sum(dim=-1, keepdim=True))
    dq = (dlogits @ k_HKD) * scale
    dk = (dlogits.transpose(-1, -2) @ q_HQD) * scale
    result = [g.transpose(-2, -3).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v))]
    for b, needs in zip(biases, bias_needs_grad):
        result.append(dlogits.sum_to_size(b.shape).to(b.dtype) if needs else b.new_empty(0))
    return result
