"""GenSLM generation with a KV cache: equal to recomputing the whole prefix per token (greedy
outputs identical, logits within fp32 rounding), in bf16, in batches, and to HF's cached
generation on the same weights."""

import pytest
import torch

from ds4sci.data.tokenizer import CodonTokenizer
from ds4sci.models.genslm import GenSLM, preset
from ds4sci.models.genslm.inference import KVCache, generate, generate_batch, next_token_logits
from ds4sci.models.genslm.model import causal_attention

# A wider init than GPT-NeoX's 0.02 spreads the logits, so greedy choices are never near-ties.
TINY = preset("genslm-tiny").replace(initializer_range=0.2)
TOKENIZER = CodonTokenizer()
PROMPT = "ATGAAACCCGGGTTTACGTCA"


def _model(seed=0, **changes):
    return GenSLM(TINY.replace(**changes), seed=seed).eval()


def _ids(batch, length, seed=0):
    codons = torch.tensor(sorted(TOKENIZER.codon_ids.values()))
    pick = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    return codons[pick]


@pytest.mark.parametrize("changes", [{}, {"use_parallel_residual": False, "rotary_pct": 0.5},
                                     {"rotary_pct": 1.0, "hidden_act": "gelu"}])
def test_cached_logits_equal_the_whole_prefix_each_step(changes):
    model = _model(**changes)
    ids_BS = _ids(3, 29)
    cache = KVCache(len(model.layers), 29)
    # Prompt of 11, then a chunk of 5 after a prefix (explicit bottom-right mask), then one by one.
    pieces = [(0, 11), (11, 16)] + [(t, t + 1) for t in range(16, 29)]
    for start, end in pieces:
        cached_BV = next_token_logits(model, ids_BS[:, start:end], cache)
        whole_BV = next_token_logits(model, ids_BS[:, :end])
        torch.testing.assert_close(cached_BV, whole_BV, rtol=1e-5, atol=1e-5, msg=f"after {end} tokens")
    assert cache.length == 29
    assert all(layer.attention.core is causal_attention for layer in model.layers)


@pytest.mark.parametrize("changes", [{}, {"use_parallel_residual": False}])
def test_greedy_outputs_identical_with_and_without_cache(changes):
    model = _model(seed=1, **changes)
    cached = generate(model, TOKENIZER, PROMPT, 24, top_k=1)
    plain = generate(model, TOKENIZER, PROMPT, 24, top_k=1, use_cache=False)
    assert cached == plain
    assert cached.startswith(PROMPT) and len(cached) == len(PROMPT) + 3 * 24
    assert len(set(cached[len(PROMPT) + i : len(PROMPT) + i + 3] for i in range(0, 72, 3))) > 3  # not one codon


def test_sampled_outputs_equal_and_independent_of_batching():
    model = _model(seed=2)
    prompts = [PROMPT, "ATGGCC", PROMPT.lower(), "ATGCCC"]  # two lengths: two batches
    seeds = [5, 6, 7, 8]
    batched = generate_batch(model, TOKENIZER, prompts, 12, seeds=seeds)
    alone = [generate(model, TOKENIZER, p, 12, seed=s, use_cache=False) for p, s in zip(prompts, seeds)]
    assert batched == alone
    assert batched[0][len(PROMPT):] != batched[2][len(PROMPT):]  # different seeds, same prompt


def test_bf16_cache_is_as_accurate_as_bf16_without_cache():
    model32 = _model(seed=3)
    model16 = _model(seed=3).to(torch.bfloat16)
    ids_BS = _ids(2, 24, seed=1)
    cache = KVCache(len(model16.layers), 24)
    next_token_logits(model16, ids_BS[:, :8], cache)
    for end in range(9, 25):
        cached = next_token_logits(model16, ids_BS[:, end - 1 : end], cache)
        truth = next_token_logits(model32, ids_BS[:, :end])
        plain = next_token_logits(model16, ids_BS[:, :end])
        scale = truth.abs().max()
        err, err_plain = (cached - truth).abs().max(), (plain - truth).abs().max()
        assert err <= 2 * err_plain + 8e-3 * scale, f"step {end}: {err:.3g} vs plain bf16 {err_plain:.3g}"
    assert model16.layers[0].attention.core is causal_attention
    assert cache.k_BHCD[0].dtype == torch.bfloat16


def test_greedy_equals_hf_generate_with_cache():
    pytest.importorskip("transformers")
    from ds4sci.models.genslm import to_hf

    # HF cannot be told to skip special tokens while sampling: restrict ours to no special
    # tokens by giving them very negative output weights in both models.
    model = _model(seed=4)
    with torch.no_grad():
        special = [i for i in range(TINY.vocab_size) if i not in TOKENIZER.codon_ids.values()]
        model.embed_out.weight[special] = 0
        model.final_layer_norm.bias.zero_()
    hf = to_hf(model)
    prompt_ids = torch.tensor([TOKENIZER.encode(PROMPT)])
    out = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=20,
                      do_sample=False, use_cache=True, pad_token_id=0)
    ours = generate(model, TOKENIZER, PROMPT, 20, top_k=1)
    assert TOKENIZER.decode(out[0].tolist()) == ours


def test_ambiguous_prompt_codon_is_kept_not_dropped():
    model = _model()
    out = generate(model, TOKENIZER, "ATGNNNAAA", 4, top_k=1)
    assert out.startswith("ATGNNNAAA") and len(out) == 9 + 12
    # It reached the model as [UNK] (the token it was trained with for N codons).
    assert out == generate(model, TOKENIZER, "ATGNNNAAA", 4, top_k=1, use_cache=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": -5}, "max_new_tokens=-5"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"top_p": float("nan")}, "top_p=nan"),
    ({"top_k": 0}, "top_k=0"),
])
def test_bad_generation_values(kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(_model(), TOKENIZER, "ATG", args.pop("max_new_tokens"), **args)


def test_cache_refuses_overflow():
    model = _model()
    cache = KVCache(len(model.layers), 4)
    with pytest.raises(ValueError, match="exceed its capacity 4"):
        next_token_logits(model, _ids(1, 5), cache)
    assert model.layers[0].attention.core is causal_attention
