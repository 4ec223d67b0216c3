"""Shared helpers for Evoformer attention tests: inputs, fp64 truth, the 2x-plain-torch rule."""

from __future__ import annotations

import torch

from ds4sci.ops.evoformer_attention import evoformer_attention_naive, evoformer_attention_reference

# Error floor per dtype, relative to the largest magnitude of the true value.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_inputs(lead, l_q, l_k, heads, dim, dtype, bias_shapes=(), bias_grads=(), seed=0,
                bias_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, l_q, heads, dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(*lead, l_k, heads, dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(*lead, l_k, heads, dim, generator=gen).to(dtype).requires_grad_()
    biases = []
    for shape, grad in zip(bias_shapes, bias_grads or [False] * len(bias_shapes)):
        b = torch.randn(*shape, generator=gen).to(bias_dtype or dtype)
        biases.append(b.requires_grad_(grad))
    grad_out = torch.randn(*lead, l_q, heads, dim, generator=gen).to(dtype)
    return q, k, v, biases, grad_out


def run_with_grads(fn, q, k, v, biases, grad_out, cast=None):
    """Output and grads of (q, k, v, biases that require grad), optionally on cast leaf copies."""
    leaves = []
    for t in (q, k, v, *biases):
        leaf = t.detach().clone() if cast is None else t.detach().to(cast)
        leaves.append(leaf.requires_grad_(t.requires_grad))
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3:])
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype)) if wanted else ()
    return [out.detach(), *grads]


def truth(q, k, v, biases, grad_out):
    fn = lambda q, k, v, b: evoformer_attention_reference(q, k, v, b, compute_dtype=torch.float64)
    return run_with_grads(fn, q, k, v, biases, grad_out, cast=torch.float64)


def plain_torch(q, k, v, biases, grad_out):
    return run_with_grads(evoformer_attention_naive, q, k, v, biases, grad_out)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(ours, true, plain, dtype, names):
    """Each of ours is within 2x plain torch's error, plus a small per-dtype floor."""
    assert len(ours) == len(true) == len(plain)
    for name, o, t, p in zip(names, ours, true, plain):
        assert o.shape == t.shape, f"{name}: shape {tuple(o.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        scale = max(1.0, t.abs().max().item())
        err, err_plain = max_err(o, t), max_err(p, t)
        bound = 2 * err_plain + FLOOR[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3g} > 2 x plain torch {err_plain:.3g} + floor"
