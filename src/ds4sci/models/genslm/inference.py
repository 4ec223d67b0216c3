"""Inference with a GenSLM: embed sequences, generate sequences (loading a trained one:
``train.tasks.genslm.load_model``)."""

from __future__ import annotations

import numpy as np
import torch

from ...data.tokenizer import CodonTokenizer
from .model import GenSLM


@torch.no_grad()
def embed(model: GenSLM, tokenizer: CodonTokenizer, sequences, max_tokens: int | None = None) -> np.ndarray:
    """Mean of the last hidden state (after the final LayerNorm) over each sequence's tokens.

    GenSLM's inference pipeline averages over real tokens only; sequences here are embedded one
    at a time, so no padding exists to exclude. Returns ``[n, hidden_size]`` float32.
    """
    out = []
    for seq in sequences:
        ids = tokenizer.encode(seq)[:max_tokens]
        if not ids:
            raise ValueError("embed: a sequence has no codons")
        hidden = model.hidden_states(torch.tensor([ids]))
        out.append(hidden[0].float().mean(dim=0).numpy())
    return np.stack(out)


@torch.no_grad()
def generate(model: GenSLM, tokenizer: CodonTokenizer, prompt: str, max_new_tokens: int,
             *, top_k: int | None = 50, top_p: float | None = 0.95, temperature: float = 1.0,
             seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` codon by codon (special tokens are never sampled)."""
    if temperature <= 0:
        raise ValueError(f"generate: temperature={temperature}; expected > 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p}; expected in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k}; expected >= 1 (or None for no top-k)")
    codons = tokenizer.codons(prompt)
    if not codons or len(codons[-1]) != 3:
        raise ValueError(f"generate: prompt {prompt!r} must be whole codons (a multiple of 3 nucleotides)")
    ids = [i for i in tokenizer.encode(prompt) if i != tokenizer.eos_id]
    allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    allowed[list(tokenizer.codon_ids.values())] = True
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        # Only the last position's logits are needed: never build [S, vocab].
        logits = model.embed_out(model.hidden_states(torch.tensor([ids]))[0, -1]).float() / temperature
        logits[~allowed] = float("-inf")
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, int(allowed.sum()))).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if top_p is not None and top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        ids.append(int(torch.multinomial(probs / probs.sum(), 1, generator=gen)))
    return tokenizer.decode(ids)
