"""Evoformer modules and blocks (issue 4): our attention vs naive attention (values and
gradients, fp32/bf16 against an fp64 truth), chunked vs unchunked inference, checkpointed vs
not, state-dict round trip, masks that do not leak, MSA-row permutation equivariance, awkward
shapes and clear errors. OpenFold parity itself is tests/test_evoformer_openfold.py."""

import dataclasses
import io

import pytest
import torch

from ds4sci.models import evoformer as evo
from evoformer_helpers import FLOOR

SMALL = dict(c_m=12, c_z=6, c_hidden_msa_att=4, c_hidden_opm=3, c_hidden_mul=5, c_hidden_pair_att=4,
             no_heads_msa=2, no_heads_pair=3, transition_n=2)


def randomize(module, seed=0):
    """Random weights everywhere (the AF2 inits zero the final layers, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if ("layer_norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + scale)
    return module


def rep(lead, n_seq, n_res, c_m=SMALL["c_m"], c_z=SMALL["c_z"], dtype=torch.float32, seed=1, masked=True):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(*lead, n_seq, n_res, c_m, generator=gen).to(dtype)
    z = torch.randn(*lead, n_res, n_res, c_z, generator=gen).to(dtype)
    msa_mask = (torch.rand(*lead, n_seq, n_res, generator=gen) > (0.3 if masked else -1)).to(dtype)
    pair_mask = (torch.rand(*lead, n_res, n_res, generator=gen) > (0.3 if masked else -1)).to(dtype)
    return m, z, msa_mask, pair_mask


ATTENTION_MODULES = {
    "msa_row": (lambda: evo.MSARowAttentionWithPairBias(12, 6, 4, 2), lambda mod, m, z, mm, pm: mod(m, z, mm)),
    "msa_col": (lambda: evo.MSAColumnAttention(12, 4, 2), lambda mod, m, z, mm, pm: mod(m, mm)),
    "msa_col_global": (lambda: evo.MSAColumnGlobalAttention(12, 4, 2), lambda mod, m, z, mm, pm: mod(m, mm)),
    "tri_start": (lambda: evo.TriangleAttentionStartingNode(6, 4, 3), lambda mod, m, z, mm, pm: mod(z, pm)),
    "tri_end": (lambda: evo.TriangleAttentionEndingNode(6, 4, 3), lambda mod, m, z, mm, pm: mod(z, pm)),
}


def _run(make, call, backend, dtype, lead, n_seq, n_res):
    module = randomize(make()).to(dtype)
    evo.set_attention_backend(module, backend)
    m, z, mm, pm = (t.to(dtype) for t in rep(lead, n_seq, n_res))
    m.requires_grad_(), z.requires_grad_()
    out = call(module, m, z, mm, pm)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    leaves = [m, z, *module.parameters()]
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [out.detach()] + [g for g in grads if g is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,n_seq,n_res", [((), 1, 1), ((1,), 3, 17), ((2,), 5, 7)])
@pytest.mark.parametrize("name", sorted(ATTENTION_MODULES))
def test_attention_module_vs_naive(name, lead, n_seq, n_res, dtype):
    """Values and every gradient (inputs, weights) within 2x the naive path's error vs fp64."""
    make, call = ATTENTION_MODULES[name]
    truth = _run(make, call, evo.NAIVE, torch.float64, lead, n_seq, n_res)
    ours = _run(make, call, "torch", dtype, lead, n_seq, n_res)
    naive = _run(make, call, evo.NAIVE, dtype, lead, n_seq, n_res)
    assert len(ours) == len(truth) == len(naive)
    for i, (o, n, t) in enumerate(zip(ours, naive, truth)):
        # Some weight gradients are ~0 by symmetry (sums of cancelling O(1) terms): floor at 1.
        scale = max(t.abs().max().item(), 1.0)
        err_o, err_n = (o.double() - t).abs().max().item(), (n.double() - t).abs().max().item()
        assert err_o <= 2 * err_n + FLOOR[dtype] * scale, (i, err_o, err_n, scale)


def _block(kind, backend="torch", seed=0, **overrides):
    cls = evo.EvoformerBlock if kind == "evoformer" else evo.ExtraMSABlock
    return randomize(cls(attention_backend=backend, **{**SMALL, **overrides}), seed)


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
@pytest.mark.parametrize("lead,n_seq,n_res", [((), 1, 1), ((2,), 3, 5), ((1,), 4, 17)])
def test_block_matches_naive_float64(kind, lead, n_seq, n_res):
    results = []
    for backend in ("torch", evo.NAIVE):
        block = _block(kind, backend).double().eval()
        m, z, mm, pm = (t.double() for t in rep(lead, n_seq, n_res))
        m.requires_grad_(), z.requires_grad_()
        m_out, z_out = block(m, z, mm, pm)
        grads = torch.autograd.grad((m_out.sum() + (z_out * z_out).sum()), [m, z, *block.parameters()])
        results.append([m_out, z_out, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_inference_is_identical(chunk):
    m, z, mm, pm = rep((1,), 4, 7)
    modules = {
        "opm": (evo.OuterProductMean(12, 6, 3), lambda mod, c: mod(m, mm, c)),
        "tri_mul_out": (evo.TriangleMultiplicationOutgoing(6, 5), lambda mod, c: mod(z, pm, c)),
        "tri_mul_in": (evo.TriangleMultiplicationIncoming(6, 5), lambda mod, c: mod(z, pm, c)),
        "tri_mul_fused": (evo.TriangleMultiplicationIncoming(6, 5, fuse_projection_weights=True),
                          lambda mod, c: mod(z, pm, c)),
        "msa_transition": (evo.MSATransition(12, 2), lambda mod, c: mod(m, mm, c)),
        "pair_transition": (evo.PairTransition(6, 2), lambda mod, c: mod(z, pm, c)),
        "block": (_block("evoformer"), lambda mod, c: torch.cat([t.flatten() for t in mod(m, z, mm, pm, c)])),
    }
    with torch.no_grad():
        for name, (mod, call) in modules.items():
            mod = randomize(mod).eval()
            whole = call(mod, None)
            # Same arithmetic on smaller matrices: equal up to BLAS blocking (fp32 rounding).
            torch.testing.assert_close(call(mod, chunk), whole, rtol=1e-6,
                                       atol=1e-6 * whole.abs().max().item(), msg=name)


def _stack_grads(stack, seed):
    m, z, mm, pm = rep((1,), 3, 6)
    m.requires_grad_(), z.requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks for both runs
    out = stack(m, z, mm, pm)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * o).sum() for o in outs)
    return [*(o.detach() for o in outs), *torch.autograd.grad(loss, [m, z, *stack.parameters()])]


@pytest.mark.parametrize("kind,variants", [
    ("evoformer", [dict(blocks_per_ckpt=None), dict(blocks_per_ckpt=1), dict(blocks_per_ckpt=2)]),
    ("extra_msa", [dict(ckpt=False), dict(ckpt=True)]),
])
def test_checkpointing_gives_same_gradients(kind, variants):
    """Training mode, dropout on: checkpointed stacks replay the same masks and match exactly."""
    results = []
    for variant in variants:
        if kind == "evoformer":
            stack = evo.EvoformerStack(**SMALL, c_s=5, no_blocks=3, **variant)
        else:
            stack = evo.ExtraMSAStack(**SMALL, no_blocks=2, **variant)
        results.append(_stack_grads(randomize(stack).train(), seed=3))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_checkpointing_saves_memory_in_autograd_graph():
    """blocks_per_ckpt really drops activations: fewer tensors saved for backward."""
    def saved_bytes(blocks_per_ckpt):
        stack = randomize(evo.EvoformerStack(**SMALL, c_s=5, no_blocks=3, blocks_per_ckpt=blocks_per_ckpt))
        m, z, mm, pm = rep((1,), 3, 6)
        m.requires_grad_()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stack(m, z, mm, pm)
        return total

    assert saved_bytes(1) < saved_bytes(None) / 3


def test_state_dict_round_trip():
    a = randomize(evo.EvoformerStack(**SMALL, c_s=5, no_blocks=2), seed=1).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = evo.EvoformerStack(**SMALL, c_s=5, no_blocks=2).eval()
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    m, z, mm, pm = rep((2,), 3, 5)
    for x, y in zip(a(m, z, mm, pm), b(m, z, mm, pm)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_masked_positions_do_not_leak(kind):
    """Changing the MSA at a masked sequence, or m and z at a masked residue, leaves every output
    at the other positions unchanged."""
    block = _block(kind).eval()
    n_seq, n_res, s, r = 5, 6, 2, 4
    m, z, _, _ = rep((1,), n_seq, n_res, masked=False)
    msa_mask = torch.ones(1, n_seq, n_res)
    msa_mask[:, s, :] = 0  # a padding sequence
    msa_mask[:, :, r] = 0  # a padding residue
    pair_mask = torch.ones(1, n_res, n_res)
    pair_mask[:, r, :] = pair_mask[:, :, r] = 0
    m2, z2 = m.clone(), z.clone()
    m2[:, s] += 5 * torch.randn_like(m2[:, s])
    m2[:, :, r] -= 3.0
    z2[:, r] += torch.randn_like(z2[:, r])
    z2[:, :, r] *= -2.0
    with torch.no_grad():
        m_a, z_a = block(m, z, msa_mask, pair_mask)
        m_b, z_b = block(m2, z2, msa_mask, pair_mask)
    keep_seq = [i for i in range(n_seq) if i != s]
    keep_res = [i for i in range(n_res) if i != r]
    assert not torch.allclose(m_a[:, s], m_b[:, s])  # the perturbation is real
    torch.testing.assert_close(m_a[:, keep_seq][:, :, keep_res], m_b[:, keep_seq][:, :, keep_res],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_a[:, keep_res][:, :, keep_res], z_b[:, keep_res][:, :, keep_res],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_msa_row_permutation_equivariance(kind):
    block = _block(kind).double().eval()
    m, z, mm, pm = (t.double() for t in rep((1,), 6, 5))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        m_a, z_a = block(m, z, mm, pm)
        m_b, z_b = block(m[:, perm], z, mm[:, perm], pm)
    torch.testing.assert_close(m_b, m_a[:, perm], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z_b, z_a, rtol=1e-10, atol=1e-10)


def test_rowwise_dropout_shares_mask_along_rows():
    drop = evo.DropoutRowwise(0.5).train()
    out = drop(torch.ones(2, 7, 5, 3))
    assert torch.equal(out, out[:, :1].expand_as(out))  # one mask for every row (dim -3)
    assert set(out.unique().tolist()) <= {0.0, 2.0} and (out == 0).any()
    col = evo.DropoutColumnwise(0.5).train()(torch.ones(2, 7, 5, 3))
    assert torch.equal(col, col[:, :, :1].expand_as(col))
    assert torch.equal(drop.eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_presets():
    ft = evo.preset("openfold-finetuning")
    assert (ft.crop_size, ft.max_msa_clusters, ft.max_extra_msa) == (384, 512, 5120)
    init = evo.preset("openfold-initial-training")
    assert (init.crop_size, init.max_msa_clusters, init.max_extra_msa) == (256, 128, 1024)
    assert ft.evoformer_stack.c_m == 256 and ft.extra_msa_stack.c_m == 64
    assert ft.evoformer_stack.no_blocks == 48 and ft.extra_msa_stack.no_blocks == 4
    one = dataclasses.replace(ft.extra_msa_stack, no_blocks=1)
    stack = evo.ExtraMSAStack.from_config(one)
    assert len(stack.blocks) == 1
    ft.evoformer_stack.no_blocks = 1  # presets hand out copies
    assert evo.preset("openfold-finetuning").evoformer_stack.no_blocks == 48


def test_openfold_only_config_keys_are_accepted():
    evo.EvoformerStack(**SMALL, c_s=5, no_blocks=1, clear_cache_between_blocks=False, tune_chunk_size=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(c_mm=3), r"unknown argument\(s\) \['c_mm'\]"),
    (dict(c_m=0), r"c_m=0; expected a positive int"),
    (dict(no_heads_msa=2.5), r"no_heads_msa=2.5"),
    (dict(msa_dropout=1.5), r"msa_dropout=1.5; expected a rate in \[0, 1\)"),
    (dict(attention_backend="cutlass"), r"backend='cutlass' is unknown"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        evo.EvoformerBlock(**{**SMALL, **kwargs})


def test_shape_errors():
    block = _block("evoformer")
    m, z, mm, pm = rep((1,), 3, 5)
    with pytest.raises(ValueError, match=r"z has shape \(1, 4, 4, 6\); expected .*N_res=5"):
        block(m, z[:, :4, :4], mm, pm)
    with pytest.raises(ValueError, match=r"msa_mask has shape \(1, 3, 4\); expected \(1, 3, 5\)"):
        block(m, z, mm[..., :4], pm)
    with pytest.raises(ValueError, match=r"pair_mask has shape"):
        block(m, z, mm, pm[:, :, :2])
    with pytest.raises(ValueError, match="unknown; expected one of"):
        evo.preset("alphafold3")


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_chunked_training_gives_same_gradients_and_saves_less(kind):
    """chunk_size while training: each chunk is recomputed in backward; same loss and gradients
    as unchunked, fewer bytes saved for backward."""
    block = _block(kind).train()
    results, saved = {}, {}
    for chunk in (None, 2):
        m, z, mm, pm = rep((1,), 5, 6)
        m.requires_grad_(), z.requires_grad_()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        torch.manual_seed(4)  # the same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m_out, z_out = block(m, z, mm, pm, chunk)
        loss = (m_out * m_out).sum() + z_out.sum()
        results[chunk] = [m_out.detach(), z_out.detach(),
                          *torch.autograd.grad(loss, [m, z, *block.parameters()])]
        saved[chunk] = total
    for a, b in zip(results[None], results[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert saved[2] < saved[None] / 2, saved
