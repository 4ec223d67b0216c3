"""Conversion between ds4sci's GenSLM and HF ``transformers.GPTNeoXForCausalLM``.

GenSLM's released models are GPT-NeoX checkpoints. Our parameter names are HF's without the
``gpt_neox.`` prefix. transformers >= 5 calls the output layer ``lm_head``, older ones ``embed_out``; both are
read and the installed version's name is written. Old HF versions also stored per-layer buffers (``attention.bias`` causal
mask, ``attention.masked_bias``, ``rotary_emb.inv_freq``) and GenSLM's Lightning checkpoints add
a ``model.`` prefix; all of these are recognised and dropped. ``transformers`` is imported
only here, only when used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import GenSLMConfig
from .model import GenSLM

_DROPPED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(hf_config) -> GenSLMConfig:
    """Our config from a ``GPTNeoXConfig`` (old ``rotary_pct`` or new ``rope_parameters`` style)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_pct = getattr(hf_config, "rotary_pct", None)
    rotary_pct = rotary_pct if rotary_pct is not None else rope.get("partial_rotary_factor", 0.25)
    base = getattr(hf_config, "rotary_emb_base", None) or getattr(hf_config, "rope_theta", None)
    base = base if base is not None else rope.get("rope_theta", 10000.0)
    if getattr(hf_config, "attention_bias", True) is False:
        raise ValueError("from_hf: GPT-NeoX models without attention biases are not supported")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError("from_hf: tied input/output embeddings are not supported (GenSLM unties them)")
    return GenSLMConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, rotary_pct=float(rotary_pct),
        rotary_emb_base=float(base), layer_norm_eps=hf_config.layer_norm_eps,
        hidden_act=hf_config.hidden_act, use_parallel_residual=getattr(hf_config, "use_parallel_residual", True),
        initializer_range=hf_config.initializer_range,
        max_position_embeddings=hf_config.max_position_embeddings,
        bos_token_id=hf_config.bos_token_id if hf_config.bos_token_id is not None else 0,
        eos_token_id=hf_config.eos_token_id if hf_config.eos_token_id is not None else 0,
    )


def config_to_hf(config: GenSLMConfig):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
        rotary_pct=config.rotary_pct, rotary_emb_base=config.rotary_emb_base,
        max_position_embeddings=config.max_position_embeddings, layer_norm_eps=config.layer_norm_eps,
        use_parallel_residual=config.use_parallel_residual, initializer_range=config.initializer_range,
        tie_word_embeddings=False, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        attention_dropout=0.0, hidden_dropout=0.0, architectures=["GPTNeoXForCausalLM"],
    )


def name_from_hf(key: str) -> str | None:
    """Our name for an HF / GenSLM checkpoint key (prefixes stripped), None for stale buffers."""
    key = key.removeprefix("model.")
    if key.endswith(_DROPPED_SUFFIXES) or key.startswith("gpt_neox.rotary_emb"):
        return None
    if key == "lm_head.weight":  # transformers >= 5 name
        return "embed_out.weight"
    return key.removeprefix("gpt_neox.")


def state_dict_from_hf(hf_state: dict) -> dict:
    """HF / GenSLM checkpoint keys -> ours (prefixes stripped, stale buffers dropped)."""
    return {name: value for key, value in hf_state.items() if (name := name_from_hf(key)) is not None}


def hf_weights(path: str | Path):
    """``(weights, config)`` of a saved HF GPT-NeoX directory without building a model: its
    tensors under our names, each read when asked for (``data.weights.LazyTensors``;
    safetensors files, single or sharded, or memory-mapped ``pytorch_model*.bin``; a ``.bin``
    in torch's legacy format is read whole), and our config. Needs ``transformers`` only to
    read ``config.json``."""
    import json

    from transformers import GPTNeoXConfig

    from ...data.weights import safetensors_tensors, torch_file_tensors

    path = Path(path)
    config = config_from_hf(GPTNeoXConfig.from_pretrained(path))
    for stem in ("model.safetensors", "pytorch_model.bin"):
        index = path / f"{stem}.index.json"
        files = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [path / stem] if (path / stem).is_file() else [])
        if files and stem.endswith(".safetensors"):
            return safetensors_tensors(files, name_from_hf), config
        if files:
            return torch_file_tensors(files, name_from_hf), config
    raise FileNotFoundError(f"hf_weights: {path} has config.json but no model.safetensors(.index.json) "
                            f"or pytorch_model.bin(.index.json)")


def state_dict_to_hf(state: dict, head_name: str = "embed_out") -> dict:
    """Ours -> HF keys; ``head_name`` is the output layer's name in that transformers version."""
    return {(f"{head_name}.weight" if k == "embed_out.weight" else f"gpt_neox.{k}"): v for k, v in state.items()}


def from_hf(hf_model_or_path, **config_changes) -> GenSLM:
    """A GenSLM from a ``GPTNeoXForCausalLM`` instance or a saved HF model directory.

    ``config_changes`` set our runtime options (e.g. ``activation_checkpointing="full"``).
    """
    if isinstance(hf_model_or_path, (str, Path)):
        from transformers import GPTNeoXForCausalLM

        path = Path(hf_model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"from_hf: {path} has no config.json; expected a saved HF model directory")
        hf_model_or_path = GPTNeoXForCausalLM.from_pretrained(path)
    config = config_from_hf(hf_model_or_path.config).replace(**config_changes)
    model = GenSLM(config)
    missing, unexpected = model.load_state_dict(state_dict_from_hf(hf_model_or_path.state_dict()), strict=False)
    if missing or unexpected:
        raise ValueError(f"from_hf: weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model.to(next(hf_model_or_path.parameters()).dtype)


def to_hf(model: GenSLM):
    """A ``transformers.GPTNeoXForCausalLM`` with this model's weights."""
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM(config_to_hf(model.config))
    head = "lm_head" if "lm_head.weight" in hf.state_dict() else "embed_out"
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), head), strict=False)
    real_missing = [k for k in missing if not k.endswith(_DROPPED_SUFFIXES)]
    if real_missing or unexpected:
        raise ValueError(f"to_hf: missing {real_missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).dtype).eval()
