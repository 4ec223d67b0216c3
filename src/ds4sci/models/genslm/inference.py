"""Inference with a trained GenSLM: load, embed sequences, generate sequences."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ...data.tokenizer import CodonTokenizer
from .config import GenSLMConfig
from .model import GenSLM, load_parameters


def load_weights(path: str | Path) -> tuple[Mapping[str, torch.Tensor], GenSLMConfig, str | None]:
    """``(weights, config, vocab)`` of a run directory (its latest checkpoint), a checkpoint
    directory, or a saved HF GPT-NeoX directory. ``weights``: the whole model's tensors under our
    names, each read from storage when asked for (see ``load_parameters``); ``vocab``: the
    tokenizer the run trained with (``data.vocab``), None for HF models (GenSLM's 69 tokens)."""
    from ...train.checkpoint import checkpoint_weights, latest_checkpoint

    path = Path(path)
    if (path / "config.json").is_file():
        from .interop import hf_weights

        weights, config = hf_weights(path)
        vocab = None
    else:
        ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint found")
        weights, state = checkpoint_weights(ckpt)
        config = GenSLMConfig.from_dict(dict(state["config"]["model_config"]))
        vocab = state["config"]["train"]["data"]["vocab"]
    with torch.device("meta"):  # the names the config's model has (no storage)
        expected = {name for name, _ in GenSLM(config).named_parameters()}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: its weights do not fit its own model config: {len(missing)} missing "
                         f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    return weights, config, vocab


def load_model(path: str | Path) -> tuple[GenSLM, CodonTokenizer]:
    """A model (fp32) from a run directory (its latest checkpoint), a checkpoint directory, or a
    saved HF GPT-NeoX directory; with the tokenizer it was trained with (GenSLM's 69 otherwise)."""
    weights, config, vocab = load_weights(path)
    with torch.device("meta"):
        model = GenSLM(config)
    load_parameters(model.to_empty(device="cpu"), weights)
    return model.eval(), CodonTokenizer(vocab) if vocab is not None else CodonTokenizer()


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
