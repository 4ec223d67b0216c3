"""Inference with a GenSLM: embed sequences, generate sequences with a key/value cache (loading a
trained one: ``train.tasks.genslm.load_model``).

Generation keeps each layer's rotary-rotated keys and values (``KVCache``), so every new codon
costs one token's forward pass attending to the cached prefix, instead of the whole prefix again.
The cache plugs into the model through its attention ``core`` (the hook sequence parallelism
uses), swapped in only for the duration of a cached forward: ``model.py`` and training are
unchanged, and the cached forward runs the very layers (parallel residual, norms, rotary) that
the uncached one does.

Legend: ``B`` batch, ``S`` new tokens, ``C`` cache capacity, ``H`` heads, ``D`` head dim, ``V`` vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...data.tokenizer import CodonTokenizer
from .model import GenSLM, causal_attention


@torch.no_grad()
def embed(model: GenSLM, tokenizer: CodonTokenizer, sequences, max_tokens: int | None = None) -> np.ndarray:
    """Mean of the last hidden state (after the final LayerNorm) over each sequence's tokens.

    GenSLM's inference pipeline averages over real tokens only; sequences here are embedded one
    at a time, so no padding exists to exclude. Returns ``[n, hidden_size]`` float32.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"embed: max_tokens={max_tokens}; expected >= 1 (or None for whole sequences)")
    out = []
    for seq in sequences:
        ids = tokenizer.encode(seq)[:max_tokens]
        if not ids:
            raise ValueError("embed: a sequence has no codons")
        hidden = model.hidden_states(torch.tensor([ids]))
        out.append(hidden[0].float().mean(dim=0).numpy())
    return np.stack(out)


class KVCache:
    """Every layer's keys and values for ``B`` sequences generated together, preallocated for
    ``capacity`` tokens (appending never copies the prefix), in the model's dtype (bf16 models
    keep a bf16 cache). Keys are stored rotated: a token's rotary angle depends on its absolute
    position, fixed when it is written (``length`` is the next token's position)."""

    def __init__(self, num_layers: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"KVCache: capacity={capacity}; expected >= 1")
        self.capacity = capacity
        self.length = 0
        """Tokens cached so far (the same for every sequence of the batch)."""
        self.k_BHCD: list[torch.Tensor | None] = [None] * num_layers
        self.v_BHCD: list[torch.Tensor | None] = [None] * num_layers

    def core(self, layer: int) -> Callable:
        """Attention ``(q, k, v) [B, H, S, D] -> [B, H, S, D]`` for ``layer``: appends ``k``, ``v``
        at positions ``length .. length+S-1`` and attends causally over the whole cache."""

        def attend(q_BHSD, k_BHSD, v_BHSD):
            start, s = self.length, q_BHSD.shape[2]
            end = start + s
            if end > self.capacity:
                raise ValueError(f"KVCache: {end} tokens exceed its capacity {self.capacity}")
            if self.k_BHCD[layer] is None:
                b, h, _, d = k_BHSD.shape
                self.k_BHCD[layer] = k_BHSD.new_empty((b, h, self.capacity, d))
                self.v_BHCD[layer] = v_BHSD.new_empty((b, h, self.capacity, d))
            keys, values = self.k_BHCD[layer], self.v_BHCD[layer]
            keys[:, :, start:end] = k_BHSD
            values[:, :, start:end] = v_BHSD
            keys, values = keys[:, :, :end], values[:, :, :end]
            if start == 0:  # the prompt: plain causal attention
                return F.scaled_dot_product_attention(q_BHSD, keys, values, is_causal=True)
            if s == 1:  # one new token sees every cached one: no mask
                return F.scaled_dot_product_attention(q_BHSD, keys, values)
            # Several new tokens after a prefix: is_causal would align the mask top-left (query 0
            # seeing key 0 only), so the mask is explicit, aligned bottom-right.
            mask_SC = torch.arange(end, device=q_BHSD.device) <= torch.arange(start, end, device=q_BHSD.device)[:, None]
            return F.scaled_dot_product_attention(q_BHSD, keys, values, attn_mask=mask_SC)

        return attend


@contextlib.contextmanager
def _cores(model: GenSLM, cache: KVCache):
    """Each layer's attention core replaced by the cache's for the duration of the block."""
    attentions = [layer.attention for layer in model.layers]
    if any(a.core is not causal_attention for a in attentions):
        raise ValueError("generate: the model's attention was replaced (sequence or tensor parallelism); "
                         "generation with a KV cache runs on a plain single-process GenSLM")
    for i, a in enumerate(attentions):
        a.core = cache.core(i)
    try:
        yield
    finally:
        for a in attentions:
            a.core = causal_attention


@torch.no_grad()
def next_token_logits(model: GenSLM, ids_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """Logits ``[B, V]`` (fp32) for the token after ``ids_BS``.

    Without a cache ``ids_BS`` is the whole sequence so far. With one, it is only the tokens not
    yet cached (the prompt, then each new token), which are appended to it.
    """
    if cache is None:
        hidden_BE = model.hidden_states(ids_BS)[:, -1]
    else:
        with _cores(model, cache):
            hidden_BE = model.hidden_states(ids_BS, position_offset=cache.length)[:, -1]
        cache.length += ids_BS.shape[1]
    # Only the last position's logits are needed: never build [S, vocab].
    return model.embed_out(hidden_BE).float()


def _sample(logits_V: torch.Tensor, allowed_V: torch.Tensor, top_k: int | None, top_p: float | None,
            temperature: float, generator: torch.Generator) -> int:
    logits_V = logits_V.masked_fill(~allowed_V, float("-inf"))
    if top_k == 1:  # greedy: no draw, so the choice depends on the logits alone
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None:
        kth = torch.topk(logits_V, min(top_k, int(allowed_V.sum()))).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    probs = torch.softmax(logits_V, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _check_sampling(max_new_tokens, top_k, top_p, temperature) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected an integer >= 0")
    if not temperature > 0 or temperature == float("inf"):  # also refuses nan
        raise ValueError(f"generate: temperature={temperature}; expected a finite number > 0")
    if top_p is not None and not 0 < top_p <= 1:  # refuses nan too
        raise ValueError(f"generate: top_p={top_p}; expected in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k}; expected >= 1 (1 = greedy; None for no top-k)")


def _prompt_ids(tokenizer: CodonTokenizer, prompt: str) -> tuple[list[str], list[int]]:
    codons = tokenizer.codons(prompt)
    if not codons or len(codons[-1]) != 3:
        raise ValueError(f"generate: prompt {prompt!r} must be whole codons (a multiple of 3 nucleotides)")
    # An ambiguous codon (NNN, ANT, ...) is fed to the model as [UNK], as in training, and kept in
    # the output as written (decoding [UNK] would drop it).
    return codons, [i for i in tokenizer.encode(prompt) if i != tokenizer.eos_id]


@torch.no_grad()
def generate_batch(model: GenSLM, tokenizer: CodonTokenizer, prompts: Sequence[str], max_new_tokens: int,
                   *, top_k: int | None = 50, top_p: float | None = 0.95, temperature: float = 1.0,
                   seeds: Sequence[int] | None = None, use_cache: bool = True,
                   on_token: Callable[[int], None] | None = None) -> list[str]:
    """Continue each prompt by ``max_new_tokens`` codons (special tokens are never sampled).

    Prompts with the same number of codons run as one batch (one forward pass per new token for
    all of them). Sequence ``i`` samples with its own generator seeded ``seeds[i]`` (default
    ``0, 1, ...``), so its result does not depend on what it was batched with. ``top_k=1`` is
    greedy decoding. ``use_cache=False`` recomputes the whole prefix per token (the reference
    the cache is tested against). ``on_token(step)``: called after each new token (timing).
    Returns the prompts (cleaned: upper case, gaps removed) followed by the new codons.
    """
    _check_sampling(max_new_tokens, top_k, top_p, temperature)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts; expected one per prompt")
    parsed = [_prompt_ids(tokenizer, p) for p in prompts]
    device = model.embed_out.weight.device
    allowed_V = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    allowed_V[list(tokenizer.codon_ids.values())] = True
    results: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, (_, ids) in enumerate(parsed):
        by_length.setdefault(len(ids), []).append(i)
    for length, rows in by_length.items():
        gens = [torch.Generator(device=device).manual_seed(seeds[i]) for i in rows]
        ids_BS = torch.tensor([parsed[i][1] for i in rows], device=device)
        cache = KVCache(len(model.layers), length + max_new_tokens) if use_cache else None
        new_BN = ids_BS.new_empty((len(rows), max_new_tokens))
        step_ids = ids_BS
        for step in range(max_new_tokens):
            logits_BV = next_token_logits(model, step_ids, cache)
            for b, gen in enumerate(gens):
                new_BN[b, step] = _sample(logits_BV[b], allowed_V, top_k, top_p, temperature, gen)
            token_B1 = new_BN[:, step : step + 1]
            step_ids = token_B1 if use_cache else torch.cat([step_ids, token_B1], dim=1)
            if on_token is not None:
                on_token(step)
        for b, i in enumerate(rows):
            results[i] = "".join(parsed[i][0]) + tokenizer.decode(new_BN[b].tolist())
    return results


def generate(model: GenSLM, tokenizer: CodonTokenizer, prompt: str, max_new_tokens: int,
             *, top_k: int | None = 50, top_p: float | None = 0.95, temperature: float = 1.0,
             seed: int = 0, use_cache: bool = True) -> str:
    """Sample a continuation of ``prompt`` codon by codon (see :func:`generate_batch`)."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, top_k=top_k, top_p=top_p,
                          temperature=temperature, seeds=[seed], use_cache=use_cache)[0]
