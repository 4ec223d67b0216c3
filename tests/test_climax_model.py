"""ClimaX: parity with ClimaX v0.3.1's code path (tests/climax_reference.py) on shared weights,
state-dict round trips, exact long-sequence switches, initial values, interop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds4sci.models.climax import (
    ClimaX,
    ClimaXConfig,
    initial_value,
    interop,
    patchify,
    preset,
    unpatchify,
)
from ds4sci.models.climax.metrics import lat_weighted_mse, lat_weighted_mse_sum
from ds4sci.models.climax.model import init_parameters, pack_inputs, patches_at, patchify_targets, targets_at
from ds4sci.models.climax.reference import (
    ReferenceClimaX,
    climax_lat_weighted_mse,
    np_1d_sincos,
    np_2d_sincos,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

VARS = ("v0", "v1", "v2", "v3")


def tiny(**kw) -> ClimaXConfig:
    base = dict(default_vars=VARS, img_size=(8, 12), patch_size=2, embed_dim=32, depth=2, decoder_depth=2,
                num_heads=4, mlp_ratio=2.0, drop_path=0.0, drop_rate=0.0)
    return ClimaXConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from their init (init has zero biases, a zero query...) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def inputs(b=2, v=3, h=8, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, h, w, generator=g), torch.rand(b, generator=g)


@pytest.mark.parametrize("parallel_patch_embed,attention", [(False, "eager"), (True, "eager"), (False, "sdpa")])
def test_parity_with_climax(parallel_patch_embed, attention):
    cfg = tiny(parallel_patch_embed=parallel_patch_embed)
    ours = ClimaX(cfg, seed=0)
    randomize(ours)
    ref = ReferenceClimaX(**cfg.climax_kwargs(), attention=attention, checkpointing=attention == "sdpa")
    ref.load_state_dict(ours.state_dict())
    ours.eval(), ref.eval()
    x, lt = inputs()
    variables, out_vars = ["v2", "v0", "v3"], ["v1", "v2"]
    lat = np.linspace(-80, 80, 8)
    y = torch.randn(2, 2, 8, 12)
    loss_o, pred_o = ours(x, y, lt, variables, out_vars, [lat_weighted_mse], lat)
    loss_r, pred_r = ref(x, y, lt, variables, out_vars, [climax_lat_weighted_mse], lat)
    assert pred_o.shape == (2, 2, 8, 12)
    assert pred_o.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(pred_o, pred_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_o[0]["loss"], loss_r[0]["loss"], atol=1e-5, rtol=1e-5)
    for v in out_vars:
        torch.testing.assert_close(loss_o[0][v], loss_r[0][v], atol=1e-5, rtol=1e-5)
    s, n = lat_weighted_mse_sum(pred_o, y, lat)
    torch.testing.assert_close(s / n, loss_r[0]["loss"], atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_both_ways():
    cfg = tiny()
    ours = ClimaX(cfg, seed=3)
    ref = ReferenceClimaX(**cfg.climax_kwargs())
    so, sr = ours.state_dict(), ref.state_dict()
    assert {k: tuple(v.shape) for k, v in so.items()} == {k: tuple(v.shape) for k, v in sr.items()}
    randomize(ref, seed=5)
    ours.load_state_dict(ref.state_dict())  # strict
    back = ReferenceClimaX(**cfg.climax_kwargs())
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # ClimaX's own argument style builds the same model
    assert set(ClimaX(list(VARS), img_size=[8, 12], patch_size=2, embed_dim=32, depth=2, num_heads=4,
                      mlp_ratio=2.0).state_dict()) == set(so)


def _loss_and_grads(model, x, lt, dtype=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        pred = model.predict(x, lt, ["v0", "v1", "v2"], ["v0", "v1"])
    loss = pred.float().pow(2).mean()
    loss.backward()
    return pred.float().detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tile", [5, 24])
def test_tiled_aggregation_is_exact_fp32(tile):
    torch.manual_seed(0)
    plain = ClimaX(tiny(), seed=0)
    randomize(plain)
    tiled = ClimaX(tiny(agg_tile=tile), seed=0)
    tiled.load_state_dict(plain.state_dict())
    x, lt = inputs()
    p0, g0 = _loss_and_grads(plain, x, lt)
    p1, g1 = _loss_and_grads(tiled, x, lt)
    torch.testing.assert_close(p1, p0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters())) - 2  # v3 unused
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_tiled_aggregation_bf16_autocast():
    plain = ClimaX(tiny(), seed=0)
    randomize(plain)
    tiled = ClimaX(tiny(agg_tile=4), seed=0)
    tiled.load_state_dict(plain.state_dict())
    x, lt = inputs()
    p32, g32 = _loss_and_grads(plain, x, lt)
    p0, g0 = _loss_and_grads(plain, x, lt, torch.bfloat16)
    p1, g1 = _loss_and_grads(tiled, x, lt, torch.bfloat16)
    # tiling must not add error beyond what bf16 itself makes (STYLE rule: <= 2x plain's error)
    assert (p1 - p0).abs().max() <= 2 * (p0 - p32).abs().max() + 1e-6
    for k in g0:
        assert (g1[k] - g0[k]).abs().max() <= 2 * (g0[k] - g32[k]).abs().max() + 1e-6, k


def test_tiled_aggregation_never_saves_whole_BVLD():
    cfg = tiny(agg_tile=6)
    model = ClimaX(cfg, seed=0)
    x, lt = inputs(v=4)
    b, v, (l, d) = 2, 4, (cfg.num_patches, cfg.embed_dim)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.tokens(x, lt, list(VARS)).sum()
    assert sizes and max(sizes) < b * v * l * d / 2
    sizes.clear()
    plain = ClimaX(tiny(), seed=0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain.tokens(x, lt, list(VARS)).sum()
    assert max(sizes) >= b * v * l * d  # the plain path does save it: the check can fail


def test_checkpointing_and_mlp_chunks_exact():
    cfg = tiny(drop_rate=0.1, drop_path=0.2)
    plain = ClimaX(cfg, seed=0)
    randomize(plain)
    ckpt = ClimaX(cfg.with_(activation_checkpointing=True), seed=0)
    ckpt.load_state_dict(plain.state_dict())
    x, lt = inputs()
    plain.train(), ckpt.train()
    torch.manual_seed(7)
    p0, g0 = _loss_and_grads(plain, x, lt)
    torch.manual_seed(7)
    p1, g1 = _loss_and_grads(ckpt, x, lt)  # checkpoint replays the dropout masks
    assert torch.equal(p0, p1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=0, rtol=0, msg=k)
    # MLP in chunks of tokens (no dropout: chunks draw their own masks)
    base = ClimaX(tiny(), seed=0)
    randomize(base)
    chunked = ClimaX(tiny(mlp_chunk=5, activation_checkpointing=True), seed=0)
    chunked.load_state_dict(base.state_dict())
    q0, h0 = _loss_and_grads(base, x, lt)
    q1, h1 = _loss_and_grads(chunked, x, lt)
    torch.testing.assert_close(q1, q0, atol=1e-6, rtol=1e-6)
    for k in h0:
        torch.testing.assert_close(h1[k], h0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_stages_positions_and_core():
    model = ClimaX(tiny(), seed=0).eval()
    randomize(model)
    x, lt = inputs()
    variables = ["v0", "v1", "v2"]
    whole = model.predict(x, lt, variables, list(VARS))
    tokens = model.tokens(x, lt, variables)
    staged = model.fields(model.project(model.run_blocks(tokens)), list(VARS))
    torch.testing.assert_close(staged, whole)
    positions = torch.tensor([3, 0, 17, 23])
    torch.testing.assert_close(model.tokens(x, lt, variables, positions=positions), tokens[:, positions])
    # the loss of a sequence-parallel trainer: weighted squared error over patches, any shard split
    y = torch.randn(2, 2, 8, 12)
    lat = np.linspace(70, -70, 8)
    w = model.patch_loss_weights(lat, ["v3", "v1"])
    target = patchify_targets(torch.cat([torch.zeros(2, 1, 8, 12), y[:, 1:], torch.zeros(2, 1, 8, 12), y[:, :1]], 1), 2)
    out = model.predict_patches(x, lt, variables)
    total = sum((w[part] * (out[:, part] - target[:, part]) ** 2).sum() for part in torch.arange(24).split(10))
    for part in (positions, torch.arange(24).split(10)[1]):  # a shard's rows alone, equal
        torch.testing.assert_close(model.patch_loss_weights(lat, ["v3", "v1"], part), w[part], rtol=0, atol=0)
    ref = climax_lat_weighted_mse(model.fields(out, ["v3", "v1"]), y, ["v3", "v1"], lat)["loss"]
    torch.testing.assert_close(total / y.numel(), ref)
    calls = []

    def core(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    for blk in model.blocks:
        blk.attn.core = core
    torch.testing.assert_close(model.predict(x, lt, variables, list(VARS)), whole)
    assert calls == [(2, 4, 24, 8)] * 2


def test_patchify_round_trips():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 2)
    assert p.shape == (2, 3, 24, 4)
    # patch 1 (row 0, col 1) of variable 2, values row-major within the patch
    assert torch.equal(p[1, 2, 1], x[1, 2, 0:2, 2:4].reshape(-1))
    t = patchify_targets(x, 2)
    assert t.shape == (2, 24, 12)
    assert torch.equal(unpatchify(t, 3, 8, 12, 2), x)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(t[:, :5], 3, 8, 12, 2)


def test_patches_of_a_shard_and_of_a_row_band():
    """A sequence shard gathers its patches (and targets) straight from the field, or from the
    band of patch rows holding them, equal to patchify-then-index."""
    x = torch.randn(2, 3, 8, 12)
    positions = torch.tensor([5, 6, 7, 8, 9, 0])  # crosses patch rows 0 -> 1 -> 1, then 0
    torch.testing.assert_close(patches_at(x, 2, positions), patchify(x, 2)[:, :, positions], rtol=0, atol=0)
    torch.testing.assert_close(targets_at(x, 2, positions), patchify_targets(x, 2)[:, positions], rtol=0, atol=0)
    band = torch.tensor([7, 8, 13])  # patch rows 1..2: grid rows 2..5
    torch.testing.assert_close(patches_at(x[:, :, 2:6], 2, band, row0=1), patchify(x, 2)[:, :, band], rtol=0, atol=0)
    torch.testing.assert_close(targets_at(x[:, :, 2:6], 2, band, row0=1), patchify_targets(x, 2)[:, band],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the field band of patch rows 1..2"):
        patches_at(x[:, :, 2:6], 2, torch.tensor([19]), row0=1)


def test_initial_values_and_meta_init():
    cfg = tiny(parallel_patch_embed=True)
    model = ClimaX(cfg, seed=11)
    sd = model.state_dict()
    torch.testing.assert_close(sd["pos_embed"][0], torch.from_numpy(np_2d_sincos(32, 4, 6)).float())
    torch.testing.assert_close(sd["var_embed"][0], torch.from_numpy(np_1d_sincos(32, np.arange(4))).float())
    assert torch.equal(sd["var_query"], torch.zeros(1, 1, 32))
    assert torch.equal(sd["blocks.0.norm1.weight"], torch.ones(32)) and torch.equal(sd["norm.bias"], torch.zeros(32))
    assert torch.equal(sd["blocks.1.attn.qkv.bias"], torch.zeros(96))
    assert torch.equal(sd["var_agg.in_proj_bias"], torch.zeros(96))
    assert 0.015 < sd["blocks.0.mlp.fc1.weight"].std() < 0.025
    assert sd["var_agg.in_proj_weight"].abs().max() <= (6 / (32 + 96)) ** 0.5
    assert sd["token_embeds.proj_biases"].abs().max() <= 0.5 and sd["token_embeds.proj_biases"].abs().max() > 0.1
    with torch.device("meta"):
        meta = ClimaX(cfg)
    meta.to_empty(device="cpu")
    init_parameters(meta, 11)
    for k, v in meta.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not list(model.buffers())
    with pytest.raises(KeyError, match="no rule"):
        initial_value(cfg, "mystery", (2,))


def test_presets_and_config_errors():
    big = preset("climax-5.625")
    assert len(big.default_vars) == 48 and big.num_patches == 512
    with torch.device("meta"):
        n = sum(p.numel() for p in ClimaX(big).parameters())
    assert 100e6 < n < 120e6  # "about 108M parameters"
    assert preset("climax-1.40625").num_patches == 2048
    with torch.device("meta"):
        tiny_n = sum(p.numel() for p in ClimaX(preset("climax-tiny")).parameters())
    assert 1e5 < tiny_n < 1e6
    with pytest.raises(ValueError, match="patch_size"):
        ClimaXConfig(img_size=(721, 1440), patch_size=4)
    with pytest.raises(ValueError, match="preset"):
        preset("climax-huge")
    model = ClimaX(tiny(), seed=0)
    with pytest.raises(ValueError, match="not among default_vars"):
        model.predict(torch.zeros(1, 1, 8, 12), torch.zeros(1), ["nope"], ["v0"])
    with pytest.raises(ValueError, match="expected"):
        model.predict(torch.zeros(1, 2, 8, 10), torch.zeros(1), ["v0", "v1"], ["v0"])


def _climax_interpolate(pos, new_grid):
    """ClimaX utils/pos_embed.interpolate_pos_embed (w = 2h assumed)."""
    n, d = pos.shape[-2:]
    h = int((n // 2) ** 0.5)
    tok = pos.reshape(-1, h, 2 * h, d).permute(0, 3, 1, 2)
    out = F.interpolate(tok, size=new_grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(1, 2)


def test_pos_embed_interpolation_and_lightning_checkpoint(tmp_path):
    pos = torch.randn(1, 4 * 8, 16)
    out = interop.interpolate_pos_embed(pos, (6, 12))
    torch.testing.assert_close(out, _climax_interpolate(pos, (6, 12)))
    assert out.shape == (1, 72, 16)
    assert interop.interpolate_pos_embed(pos, (4, 8)) is pos
    with pytest.raises(ValueError, match="old_grid"):
        interop.interpolate_pos_embed(torch.randn(1, 30, 16), (6, 12), old_grid=(4, 8))
    # A "released" checkpoint: 4 variables, grid 8x16 patches; our model: 2 of them, grid 4x6
    src_cfg = tiny(img_size=(16, 32))
    src = ReferenceClimaX(**src_cfg.climax_kwargs())
    randomize(src, seed=2)
    path = tmp_path / "fake.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    ours = ClimaX(tiny(default_vars=("v2", "v0")), seed=0)
    assert interop.load_lightning_checkpoint(ours, path, checkpoint_vars=VARS) == []
    sd = ours.state_dict()
    torch.testing.assert_close(sd["pos_embed"], _climax_interpolate(src.state_dict()["pos_embed"], (4, 6)))
    assert torch.equal(sd["token_embeds.0.proj.weight"], src.state_dict()["token_embeds.2.proj.weight"])
    assert torch.equal(sd["var_embed"][0, 1], src.state_dict()["var_embed"][0, 0])
    # the head's rows follow the variables: predictions of v2 from the reduced head equal the full ones
    src_small = ReferenceClimaX(**tiny().climax_kwargs())
    state = {k: v for k, v in src.state_dict().items() if k != "pos_embed"}
    src_small.load_state_dict({**state, "pos_embed": sd["pos_embed"]})
    x, lt = inputs(v=2)
    _, full = src_small.eval()(x, None, lt, ["v2", "v0"], ["v2", "v0"], None, None)
    _, mine = ours.eval()(x, None, lt, ["v2", "v0"], ["v2", "v0"], None, None)
    torch.testing.assert_close(mine, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError):
        interop.load_lightning_checkpoint(ours, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="not in the checkpoint"):
        interop.load_lightning_checkpoint(ClimaX(tiny(default_vars=("zz",)), seed=0), path, checkpoint_vars=VARS)


def test_crop_pad_rule():
    x = torch.arange(2 * 7 * 10, dtype=torch.float32).reshape(2, 7, 10)
    lat = torch.linspace(90, -90, 7)
    xc, latc = interop.fit_grid(x, lat, 4, "crop")
    assert xc.shape == (2, 4, 8) and torch.equal(xc, x[:, :4, :8]) and torch.equal(latc, lat[:4].double())
    xp, latp = interop.fit_grid(x, lat, 4, "pad")
    assert xp.shape == (2, 8, 12)
    assert torch.equal(xp[:, :7, :10], x)
    assert torch.equal(xp[:, 7, :10], x[:, 6])  # rows: edge (the pole repeated)
    assert torch.equal(xp[:, :7, 10:], x[:, :, :2])  # columns: wrap around the globe
    assert latp[-1] == -90 and latp.shape == (8,)
    assert torch.equal(interop.restore_grid(xp, (7, 10), "pad"), x)
    assert interop.fitted_size(721, 1440, 4) == (720, 1440)
    assert interop.fitted_size(721, 1440, 8, "pad") == (728, 1440)
    with pytest.raises(ValueError, match="mode"):
        interop.fit_grid(x, lat, 4, "stretch")
    with pytest.raises(ValueError, match="lat"):
        interop.fit_grid(x, lat[:5], 4)


def test_pipeline_stages_chain_to_climax_loss():
    model = ClimaX(tiny(depth=3), seed=0)
    randomize(model)
    model.eval()
    x, lt = inputs(b=3)
    variables, out_vars = ["v0", "v1", "v2"], ["v3", "v1"]
    lat = np.linspace(70, -70, 8)
    y = torch.randn(3, 2, 8, 12)
    with pytest.raises(ValueError, match="set_pipeline_task"):
        model.pipeline_stage(range(0, 1), True, False)
    model.set_pipeline_task(variables, out_vars, lat)
    assert model.pipeline_blocks() == 3
    first, last = model.pipeline_stage(range(0, 2), True, False), model.pipeline_stage(range(2, 3), False, True)
    names = {n for st in (first, last) for n, _ in st.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}  # the whole model's names, split
    all_y = torch.zeros(3, 4, 8, 12)
    all_y[:, 3], all_y[:, 1] = y[:, 0], y[:, 1]
    inp, tgt = first.fixed_batch(pack_inputs(x, lt, 2), patchify_targets(all_y, 2), 4, 24)
    assert inp.shape == (4, 24, 3 * 4 + 1) and tgt[3].isnan().all()
    s, n = last.loss_sum(last(first(inp)), tgt)
    _, preds = model(x, y, lt, variables, out_vars, None, lat)
    ref = climax_lat_weighted_mse(preds, y, out_vars, lat)["loss"]
    assert int(n) == y.numel()
    torch.testing.assert_close(s / n, ref, atol=1e-6, rtol=1e-5)
