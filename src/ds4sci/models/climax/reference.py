"""ClimaX v0.3.1's own code path (microsoft/ClimaX ``src/climax/arch.py`` with timm 0.6's ViT
``Block``/``PatchEmbed`` and ``nn.MultiheadAttention`` aggregation), rebuilt from those equations
so that tests and benchmarks need neither timm nor the internet: the truth the parity tests
compare with, and the "original" contender of ``bench.climax_memory`` (eager attention that
materialises ``[B, h, L, L]``, the whole ``[B, V, L, D]`` tensor; ``attention="sdpa"`` and
``checkpointing=True`` give the original with SDPA and per-block checkpointing). Dropout and
drop-path are left out: parity is checked in eval mode, where they are identities."""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn


def np_1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_2d_sincos(embed_dim, gh, gw):
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), axis=0)
    grid = grid.reshape([2, 1, gh, gw])
    return np.concatenate([np_1d_sincos(embed_dim // 2, grid[0]), np_1d_sincos(embed_dim // 2, grid[1])], axis=1)


class TimmPatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.img_size = tuple(img_size)
        self.num_patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.img_size
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class RefParallelVarPatchEmbed(nn.Module):
    def __init__(self, max_vars, patch_size, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj_weights = nn.Parameter(torch.randn(max_vars, embed_dim, 1, patch_size, patch_size) * 0.02)
        self.proj_biases = nn.Parameter(torch.randn(max_vars, embed_dim) * 0.1)

    def forward(self, x, vars):
        b = x.shape[0]
        weights = self.proj_weights[vars].flatten(0, 1)
        biases = self.proj_biases[vars].flatten(0, 1)
        proj = torch.nn.functional.conv2d(x, weights, biases, groups=len(vars), stride=self.patch_size)
        proj = proj.reshape(b, len(vars), -1, *proj.shape[-2:])
        return proj.flatten(3).transpose(2, 3)


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads, sdpa=False):
        super().__init__()
        self.num_heads, self.sdpa = num_heads, sdpa
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sdpa=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads, sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceClimaX(nn.Module):
    def __init__(self, default_vars, img_size=(32, 64), patch_size=2, embed_dim=1024, depth=8, decoder_depth=2,
                 num_heads=16, mlp_ratio=4.0, drop_path=0.1, drop_rate=0.1, parallel_patch_embed=False,
                 attention="eager", checkpointing=False):
        super().__init__()
        self.checkpointing = checkpointing
        self.img_size, self.patch_size, self.default_vars = list(img_size), patch_size, list(default_vars)
        self.parallel_patch_embed = parallel_patch_embed
        if parallel_patch_embed:
            self.token_embeds = RefParallelVarPatchEmbed(len(default_vars), patch_size, embed_dim)
        else:
            self.token_embeds = nn.ModuleList(TimmPatchEmbed(img_size, patch_size, embed_dim) for _ in default_vars)
        self.num_patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.var_embed = nn.Parameter(torch.zeros(1, len(default_vars), embed_dim))
        self.var_map = {v: i for i, v in enumerate(default_vars)}
        self.var_query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.var_agg = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.lead_time_embed = nn.Linear(1, embed_dim)
        self.blocks = nn.ModuleList(TimmBlock(embed_dim, num_heads, mlp_ratio, attention == "sdpa") for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        head = []
        for _ in range(decoder_depth):
            head += [nn.Linear(embed_dim, embed_dim), nn.GELU()]
        head.append(nn.Linear(embed_dim, len(default_vars) * patch_size**2))
        self.head = nn.Sequential(*head)
        pe = np_2d_sincos(embed_dim, img_size[0] // patch_size, img_size[1] // patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        ve = np_1d_sincos(embed_dim, np.arange(len(default_vars)))
        self.var_embed.data.copy_(torch.from_numpy(ve).float().unsqueeze(0))

    def get_var_ids(self, vars, device):
        return torch.from_numpy(np.array([self.var_map[v] for v in vars])).to(device)

    def unpatchify(self, x):
        p, c = self.patch_size, len(self.default_vars)
        h, w = self.img_size[0] // p, self.img_size[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def aggregate_variables(self, x):
        b, _, l, _ = x.shape
        x = torch.einsum("bvld->blvd", x).flatten(0, 1)
        var_query = self.var_query.repeat_interleave(x.shape[0], dim=0)
        x, _ = self.var_agg(var_query, x, x)
        return x.squeeze().unflatten(dim=0, sizes=(b, l))

    def forward_encoder(self, x, lead_times, variables):
        var_ids = self.get_var_ids(tuple(variables), x.device)
        if self.parallel_patch_embed:
            x = self.token_embeds(x, var_ids)
        else:
            x = torch.stack([self.token_embeds[int(i)](x[:, k:k + 1]) for k, i in enumerate(var_ids)], dim=1)
        x = x + self.var_embed[:, var_ids, :].unsqueeze(2)
        x = self.aggregate_variables(x)
        x = x + self.pos_embed
        x = x + self.lead_time_embed(lead_times.unsqueeze(-1)).unsqueeze(1)
        for blk in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward(self, x, y, lead_times, variables, out_variables, metric, lat):
        preds = self.unpatchify(self.head(self.forward_encoder(x, lead_times, variables)))
        preds = preds[:, self.get_var_ids(tuple(out_variables), preds.device)]
        loss = None if metric is None else [m(preds, y, out_variables, lat) for m in metric]
        return loss, preds


def climax_lat_weighted_mse(pred, y, vars, lat):
    """ClimaX utils/metrics.py ``lat_weighted_mse`` (no mask)."""
    error = (pred - y) ** 2
    w_lat = np.cos(np.deg2rad(lat))
    w_lat = w_lat / w_lat.mean()
    w_lat = torch.from_numpy(w_lat).unsqueeze(0).unsqueeze(-1).to(dtype=error.dtype)
    out = {var: (error[:, i] * w_lat).mean() for i, var in enumerate(vars)}
    out["loss"] = (error * w_lat.unsqueeze(1)).mean(dim=1).mean()
    return out
