"""GenSLM: a GPT-NeoX decoder over codon tokens (Zvyagin et al., 2022, "GenSLMs").

Plain PyTorch, no parallelism (see ``parallelize.py`` when it lands). Names follow HF's
``GPTNeoXForCausalLM`` minus its ``gpt_neox.`` prefix, so weights convert by renaming.

Built for very long sequences: no ``[S, S]`` tensor exists anywhere (causal attention through
``scaled_dot_product_attention(is_causal=True)``, which runs flash/memory-efficient kernels on
CPU and GPU), rotary angles are computed for the positions in use (no table sized by a maximum
length), layers can be checkpointed, and the final projection + cross-entropy run in chunks so
the ``[S, vocab]`` fp32 logits never exist at once. Padding is by lengths: sequences are
right-padded, causal attention never looks right, and padded labels are ``-100``.

Legend: ``B`` batch, ``S`` sequence, ``E`` hidden size, ``H`` heads, ``D`` head dim, ``V`` vocab.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...parallel import init as _init
from .config import GenSLMConfig

IGNORE_INDEX = -100


def _activation(name: str):
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_fast", "gelu_new"):
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


class RotaryEmbedding(nn.Module):
    """Rotary angles for the given positions only (GPT-NeoX: halves rotated, ``cat(f, f)``).

    Frequencies are computed in fp32 at each call, not kept as a buffer, so casting the model to
    half precision cannot round them (which would ruin the angles at long positions).
    """

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims, self.base = dims, base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[S]`` (int) -> cos, sin ``[S, dims]`` in fp32."""
        exponents = torch.arange(0, self.dims, 2, dtype=torch.float32, device=positions.device) / self.dims
        inv_freq = 1.0 / (self.base**exponents)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head; the rest pass through."""
    rot = cos.shape[-1]
    if rot == 0:
        return x_BHSD
    x_rot, x_pass = x_BHSD[..., :rot], x_BHSD[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = (x_rot.float() * cos + rotated.float() * sin).to(x_BHSD.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def causal_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """Causal attention of a whole sequence, ``[B, H, S, D]`` in and out (flash/memory-efficient
    SDPA kernels; no mask tensor)."""
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=True)


class Attention(nn.Module):
    def __init__(self, config: GenSLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.core = causal_attention
        """``(q, k, v) [B, H, S, D] -> [B, H, S, D]``; ``parallelize.py`` swaps in sequence-parallel
        attention (Ulysses, ring) here. The model itself never knows."""

    def forward(self, x_BSE, cos, sin, norm=None):
        """``norm``: applied to ``x`` first (the layer's input norm), here rather than by the
        caller so that its output is freed once projected instead of living through attention."""
        b, s, _ = x_BSE.shape
        out_BHSD = run_core(self.core, self._qkv(self.query_key_value(_apply(norm, x_BSE)), cos, sin))
        return self.dense(out_BHSD.transpose(1, 2).reshape(b, s, -1))

    def forward_heads(self, x_BSE, cos, sin, h0: int, h1: int, norm=None):
        """Heads ``h0 .. h1-1`` alone: their share of ``forward`` without the output bias. The
        shares of all head groups plus ``dense.bias`` sum to ``forward`` (to fp32 rounding); each
        holds ``[S, 3 (h1-h0) D]`` projections instead of ``[S, 3E]`` (tiled attention)."""
        b, s, _ = x_BSE.shape
        rows = slice(3 * self.head_dim * h0, 3 * self.head_dim * h1)
        weight, bias = self.query_key_value.weight[rows], self.query_key_value.bias[rows]
        # One expression, so the normed input and the projection output are temporaries, freed as
        # soon as they are consumed (_qkv's results are new tensors).
        out_BHSD = run_core(self.core, self._qkv(F.linear(_apply(norm, x_BSE), weight, bias), cos, sin))
        cols = self.dense.weight[:, self.head_dim * h0 : self.head_dim * h1]
        return F.linear(out_BHSD.transpose(1, 2).reshape(b, s, -1), cols)

    def _qkv(self, qkv_BSX, cos, sin) -> list[torch.Tensor]:
        """``[q, k, v]``, each ``[B, H, S, D]``, rotary applied, from the fused projection output
        ``[B, S, 3 H D]``. All three are new tensors, so once this returns nothing keeps the fused
        projection output alive."""
        b, s, _ = qkv_BSX.shape
        # GPT-NeoX's fused layout: per head, [q | k | v] of head_dim each. The head count is read
        # from the projection's output so a tensor-parallel shard (a subset of heads) runs as is.
        qkv = qkv_BSX.view(b, s, -1, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [B, H, S, D]
        return [apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()]


def _apply(fn, x):
    return x if fn is None else fn(x)


def run_core(core, qkv: list[torch.Tensor]) -> torch.Tensor:
    """``core(q, k, v)`` for ``qkv = [q, k, v]``, taking the list over (it is emptied).

    A core with ``releases_inputs = True`` (Ulysses) is handed the list itself through
    ``call_releasing`` and empties it once q, k and v are sent away: with no other reference
    left, the local shards are freed before attention runs on the gathered ones."""
    if getattr(core, "releases_inputs", False):
        return core.call_releasing(qkv)
    q, k, v = qkv
    qkv.clear()
    return core(q, k, v)


class MLP(nn.Module):
    def __init__(self, config: GenSLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x_BSE):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x_BSE)))


class Layer(nn.Module):
    """One GPT-NeoX layer. In training it decides what its backward keeps:

    - ``activation_checkpointing="full"``: only the layer input. With the parallel residual the
      attention and the MLP are recomputed separately from it (no outer checkpoint, so nothing is
      recomputed twice); with the sequential residual the whole layer is one checkpoint.
    - ``attention_head_chunk``: attention runs in groups of heads, each recomputed from the layer
      input in backward, so one group's projections and attention exist at a time.
    - ``mlp_chunk_size`` / ``"selective"``: the MLP runs in sequence chunks, each recomputed.
    """

    def __init__(self, config: GenSLMConfig):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.checkpointing = config.activation_checkpointing
        self.mlp_chunk_size = config.mlp_chunk_size
        self.head_chunk = config.attention_head_chunk
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x_BSE, cos, sin):
        full = self.checkpointing == "full" and torch.is_grad_enabled()
        if full and not self.parallel:
            # x + attn would be a second saved input of the MLP: recompute the whole layer instead.
            return checkpoint(self._forward, x_BSE, cos, sin, False, use_reentrant=False)
        return self._forward(x_BSE, cos, sin, full)

    def _forward(self, x_BSE, cos, sin, full: bool):
        attn = self._attention(x_BSE, cos, sin, full)
        if self.parallel:
            return x_BSE + attn + self._mlp(x_BSE, full)
        x_BSE = x_BSE + attn
        return x_BSE + self._mlp(x_BSE, full)

    def _attention_block(self, x_BSE, cos, sin):
        return self.attention(x_BSE, cos, sin, norm=self.input_layernorm)

    def _attention_heads(self, x_BSE, cos, sin, h0, h1):
        return self.attention.forward_heads(x_BSE, cos, sin, h0, h1, norm=self.input_layernorm)

    def _head_groups(self) -> list[tuple[int, int]] | None:
        """Head ranges for tiled attention, or None where it does not apply: no
        ``attention_head_chunk``, or attention that is not local (sequence- or tensor-parallel
        attention already splits heads over ranks and wraps the projections)."""
        heads = self.attention.query_key_value.out_features // (3 * self.attention.head_dim)
        if (self.head_chunk is None or self.head_chunk >= heads or self.attention.core is not causal_attention
                or type(self.attention.query_key_value.weight) not in (torch.Tensor, nn.Parameter)):
            return None
        return [(h, min(h + self.head_chunk, heads)) for h in range(0, heads, self.head_chunk)]

    def _attention(self, x_BSE, cos, sin, full: bool):
        groups = self._head_groups() if torch.is_grad_enabled() else None
        if groups is None:
            if full:
                return checkpoint(self._attention_block, x_BSE, cos, sin, use_reentrant=False)
            return self._attention_block(x_BSE, cos, sin)
        out = None
        for h0, h1 in groups:
            share = checkpoint(self._attention_heads, x_BSE, cos, sin, h0, h1, use_reentrant=False)
            # In place: no backward saves these sums, and a new tensor per group would hold three.
            out = share if out is None else out.add_(share)
        return out.add_(self.attention.dense.bias)

    def _mlp_block(self, x):
        return self.mlp(self.post_attention_layernorm(x))

    def _mlp(self, x_BSE, full: bool):
        # The MLP's [S, 4E] activations are the largest per layer. Checkpointing keeps only its
        # input; the tiled MLP also recomputes it one sequence chunk at a time.
        recompute = torch.is_grad_enabled() and (full or self.checkpointing == "selective" or self.mlp_chunk_size)
        if not recompute:
            return self._mlp_block(x_BSE)
        # split, not slicing: one gradient gather in backward instead of a zero-filled [S, E]
        # gradient per chunk.
        outs = [checkpoint(self._mlp_block, piece, use_reentrant=False)
                for piece in x_BSE.split(self.mlp_chunk_size or x_BSE.shape[1], dim=1)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def run_layers(layers, x, cos, sin, config: GenSLMConfig, embed: nn.Embedding | None = None):
    """``layers`` applied in order to ``x`` (token ids ``[B, S]`` when ``embed`` is given, which
    embeds them first; else hidden ``[B, S, E]``).

    Each layer applies its own checkpointing. With full checkpointing and ``checkpoint_num_layers
    = k > 1``, every k layers also form one checkpoint, so backward keeps every k-th layer input
    instead of each (the first segment keeps only the token ids: the embedding is recomputed too)
    and runs each segment's forward once more to rebuild the inputs in between.
    """
    k = config.checkpoint_num_layers
    layers = list(layers)
    if k == 1 or config.activation_checkpointing != "full" or not torch.is_grad_enabled():
        return _segment(x, cos, sin, layers, embed)
    for start in range(0, len(layers), k):
        x = checkpoint(_segment, x, cos, sin, layers[start : start + k], embed if start == 0 else None,
                       use_reentrant=False)
    return x


def _segment(x, cos, sin, layers, embed):
    if embed is not None:
        x = embed(x.long())
    for layer in layers:
        x = layer(x, cos, sin)
    return x


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    """``[B, S, V]``; None when the loss was computed in chunks without them."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over labels != -100."""
    num_tokens: torch.Tensor | None = None
    """How many labels counted in ``loss``."""


class GenSLM(nn.Module):
    """GPT-NeoX causal language model over codons."""

    fsdp_forward_methods = ("hidden_states", "loss_sum")
    """Called instead of ``forward`` by sequence-parallel training (``parallel.fsdp``)."""

    def __init__(self, config: GenSLMConfig, *, seed: int | None = None):
        """Built and initialised (see :meth:`reset_parameters`); under ``torch.device("meta")``
        built without storage or values, for :func:`init_parameters` after sharding."""
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rotary_dims, config.rotary_emb_base)
        if not self.embed_in.weight.is_meta:
            self.reset_parameters(seed)
        elif seed is not None:
            raise ValueError(f"GenSLM: seed={seed} with no values to set (built on the meta device); "
                             f"call init_parameters(model, seed) once the model is made real (to_empty)")

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-NeoX's initialisation, each parameter's value a function of ``seed`` and its name
        only (:func:`init_parameters`). ``seed=None`` draws one from torch's global CPU generator,
        so ``torch.manual_seed(s); GenSLM(config)`` is reproducible."""
        if seed is None:
            seed = int(torch.randint(2**62, (), device="cpu"))
        init_parameters(self, seed)

    def hidden_states(self, input_ids: torch.Tensor, position_offset: int = 0,
                      positions: torch.Tensor | None = None, final_norm: bool = True) -> torch.Tensor:
        """Final-layer-normed hidden states ``[B, S, E]`` (``final_norm=False``: before that norm,
        for ``loss_sum(..., normed=False)``).

        ``position_offset``: position of the first token, for a sequence shard that does not
        start at 0; ``positions`` (``[S]`` int, overrides it): each token's position, for shards
        that are not contiguous (zigzag ring layouts).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"GenSLM: input_ids has shape {tuple(input_ids.shape)}; expected [B, S]")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"GenSLM: input_ids has dtype {input_ids.dtype}; expected an integer dtype")
        if positions is None:
            positions = torch.arange(position_offset, position_offset + input_ids.shape[1],
                                     device=input_ids.device)
        elif positions.shape != input_ids.shape[1:]:
            raise ValueError(f"GenSLM: positions has shape {tuple(positions.shape)}; expected "
                             f"[S] = {tuple(input_ids.shape[1:])}")
        cos, sin = self.rotary(positions)
        x = run_layers(self.layers, input_ids, cos, sin, self.config, embed=self.embed_in)
        return self.final_layer_norm(x) if final_norm else x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_offset: int = 0) -> CausalLMOutput:
        """Logits, or with ``labels`` (``[B, S]``, ``-100`` = ignore) the mean next-token loss.

        With labels and ``config.loss_chunk_size`` set, logits are produced and dropped chunk by
        chunk (recomputed in backward), so ``output.logits`` is None.
        """
        if labels is None:
            return CausalLMOutput(logits=self.embed_out(self.hidden_states(input_ids, position_offset)))
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"GenSLM: labels has shape {tuple(labels.shape)}; expected input_ids' {tuple(input_ids.shape)}"
            )
        # Token t predicts label t+1; the last position predicts nothing.
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        # With chunks, the final norm runs inside each (recomputed) chunk too.
        normed = self.config.loss_chunk_size is None
        hidden = self.hidden_states(input_ids, position_offset, final_norm=normed)
        loss_sum, count, logits = self.loss_sum(hidden, targets, normed=normed)
        return CausalLMOutput(logits=logits, loss=loss_sum / count.clamp_min(1), num_tokens=count)

    def loss_sum(self, hidden_BSE: torch.Tensor, targets_BS: torch.Tensor, normed: bool = True):
        """Summed cross-entropy of ``embed_out(hidden)`` against ``targets`` (already shifted).

        ``normed=False``: ``hidden`` is from ``hidden_states(final_norm=False)`` and the final norm
        is applied here, inside each loss chunk, so its ``[S, E]`` output is never held whole.
        """
        count = (targets_BS != IGNORE_INDEX).sum()
        chunk = self.config.loss_chunk_size
        if chunk is None:
            if not normed:
                hidden_BSE = self.final_layer_norm(hidden_BSE)
            logits = self.embed_out(hidden_BSE)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets_BS.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            return loss, count, logits
        total = hidden_BSE.new_zeros((), dtype=torch.float32)
        # split, not slicing: one gradient gather in backward instead of a zero-filled [S, E]
        # gradient per chunk.
        pieces = zip(hidden_BSE.reshape(-1, hidden_BSE.shape[-1]).split(chunk), targets_BS.reshape(-1).split(chunk))
        for h, t in pieces:
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, h, t, normed, use_reentrant=False)
            else:
                total = total + self._chunk_loss(h, t, normed)
        return total, count, None

    def _chunk_loss(self, hidden, targets, normed: bool = True):
        if not normed:
            hidden = self.final_layer_norm(hidden)
        logits = self.embed_out(hidden).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- the pipeline protocol (parallel.pipeline) -----
    def pipeline_blocks(self) -> int:
        return len(self.layers)

    def pipeline_stage(self, block_ids: range, is_first: bool, is_last: bool) -> GenSLMStage:
        return GenSLMStage(self, block_ids, is_first, is_last)


def _initial_value(std: float, name: str, module: nn.Module, shape, generator):
    """GPT-NeoX's scheme: linear and embedding weights ``N(0, std)``, biases 0, LayerNorm 1."""
    if name.rsplit(".", 1)[-1] == "bias":
        return 0.0
    if isinstance(module, nn.LayerNorm):
        return 1.0
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)
    raise TypeError(f"init_parameters: no initialisation rule for {name} "
                    f"(a parameter of {type(module).__name__})")


def init_parameters(module: nn.Module, seed: int) -> None:
    """Set every parameter of ``module`` to its initial value: linear and embedding weights
    ``N(0, config.initializer_range)``, biases 0, layer-norm weights 1 (GPT-NeoX's scheme).

    ``module``: a ``GenSLM`` or a pipeline ``GenSLMStage`` (parameter names of the whole model),
    plain or sharded (FSDP2, tensor parallel: DTensor parameters), on any device. A weight's
    values come from a CPU generator seeded with ``(seed, its name)``
    (``parallel.init.init_parameters``), so a model built on the meta device, sharded, then
    ``to_empty``-ed and initialised here on each rank holds exactly the weights one process
    would build.
    """
    _init.init_parameters(module, seed, functools.partial(_initial_value, module.config.initializer_range))


load_parameters = _init.load_parameters


class GenSLMStage(nn.Module):
    """Layers ``layer_ids`` of a GenSLM (a pipeline stage, ``parallel.pipeline``); the first stage
    also embeds the tokens, the last also applies the final norm and owns the output head used by
    ``loss_sum``.

    ``forward``: first stage ``input_ids [B, S]``, later stages ``hidden [B, S, E]`` ->
    ``hidden [B, S, E]`` (final-normed on the last stage).
    """

    # The output head's chunked cross-entropy is GenSLM's own, not a copy.
    loss_sum = GenSLM.loss_sum
    _chunk_loss = GenSLM._chunk_loss

    def __init__(self, model: GenSLM, layer_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self.rotary = model.rotary
        if is_first:
            self.embed_in = model.embed_in
        # Keyed by the whole model's layer index so parameter names match the unsplit model.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if is_last:
            self.final_layer_norm = model.final_layer_norm
            self.embed_out = model.embed_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every stage sees the full (unsharded) sequence, so positions are 0..S-1.
        cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device))
        x = run_layers(self.layers.values(), x, cos, sin, self.config,
                       embed=self.embed_in if self.is_first else None)
        return self.final_layer_norm(x) if self.is_last else x

    @staticmethod
    def fixed_batch(input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seq_len: int):
        """``(ids, targets)`` shifted and padded to the fixed ``[batch_size, seq_len]``: token t
        predicts label t+1 (shifted before padding, so the last real token predicts nothing);
        padding rows and columns have every target ignored and causal attention never looks
        right, so they add nothing to loss or gradients."""
        if input_ids.dim() != 2 or labels.shape != input_ids.shape:
            raise ValueError(f"GenSLM pipeline: input_ids {tuple(input_ids.shape)} and labels "
                             f"{tuple(labels.shape)}; expected both [B, S]")
        b, s = input_ids.shape
        targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
        ids = input_ids.new_zeros((batch_size, seq_len))
        padded = targets.new_full((batch_size, seq_len), IGNORE_INDEX)
        ids[:b, :s], padded[:b, :s] = input_ids, targets
        return ids, padded

    @staticmethod
    def count(targets: torch.Tensor) -> torch.Tensor:
        return (targets != IGNORE_INDEX).sum()
