"""GenSLM model: HF GPT-NeoX parity, memory techniques on vs off, config errors."""

import pytest
import torch

from ds4sci.models.genslm import GenSLM, GenSLMConfig, from_hf, init_parameters, load_parameters, preset, to_hf
from ds4sci.train.tasks.genslm import load_model
from ds4sci.models.genslm.interop import state_dict_from_hf

TINY = preset("genslm-tiny")


def _ids(batch=2, length=37, vocab=69, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act,parallel,rotary_pct", [("gelu_fast", True, 0.25), ("gelu", False, 0.5),
                                                     ("gelu_fast", True, 1.0)])
def test_logits_and_loss_match_hf_gpt_neox(act, parallel, rotary_pct):
    transformers = pytest.importorskip("transformers")
    config = TINY.replace(hidden_act=act, use_parallel_residual=parallel, rotary_pct=rotary_pct)
    ours = GenSLM(config).eval()
    hf = to_hf(ours)
    assert isinstance(hf, transformers.GPTNeoXForCausalLM)
    ids = _ids()
    with torch.no_grad():
        hf_out = hf(ids, labels=ids)
        our_logits = ours(ids).logits
        our_loss = ours(ids, labels=ids).loss
    torch.testing.assert_close(our_logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_loss, hf_out.loss, rtol=1e-5, atol=1e-6)
    back = from_hf(hf)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, a in ours.state_dict().items():
        assert torch.equal(a, back.state_dict()[k]), k


def test_from_hf_directory_round_trip(tmp_path):
    pytest.importorskip("transformers")
    ours = GenSLM(TINY).eval()
    to_hf(ours).save_pretrained(tmp_path)
    loaded = from_hf(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)


def test_genslm_lightning_checkpoint_keys_are_recognised():
    ours = GenSLM(TINY)
    state = {f"model.gpt_neox.{k}" if not k.startswith("embed_out") else f"model.{k}": v
             for k, v in ours.state_dict().items()}
    state["model.gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    state["model.gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["model.gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    assert set(state_dict_from_hf(state)) == set(ours.state_dict())


def _loss_and_grads(config, ids, labels):
    torch.manual_seed(0)
    model = GenSLM(config)
    out = model(ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("change", [
    {"activation_checkpointing": "full"},
    {"activation_checkpointing": "selective"},
    {"loss_chunk_size": 7},
    {"loss_chunk_size": 7, "activation_checkpointing": "full"},
    {"mlp_chunk_size": 9},
    {"mlp_chunk_size": 9, "activation_checkpointing": "full", "loss_chunk_size": 16},
    {"attention_head_chunk": 1},
    {"attention_head_chunk": 3, "activation_checkpointing": "full", "mlp_chunk_size": 9, "loss_chunk_size": 16},
    {"attention_head_chunk": 2, "activation_checkpointing": "selective"},
    {"activation_checkpointing": "full", "checkpoint_num_layers": 2},
    {"activation_checkpointing": "full", "checkpoint_num_layers": 3, "attention_head_chunk": 1,
     "mlp_chunk_size": 9, "loss_chunk_size": 16, "num_hidden_layers": 4},
    {"use_parallel_residual": False, "activation_checkpointing": "full"},
    {"use_parallel_residual": False, "activation_checkpointing": "full", "attention_head_chunk": 2,
     "mlp_chunk_size": 9, "loss_chunk_size": 7},
])
def test_memory_techniques_give_same_loss_and_grads(change):
    ids = _ids(length=41)
    labels = ids.clone()
    labels[1, 30:] = -100  # a padded row
    base = TINY.replace(loss_chunk_size=None, use_parallel_residual=change.get("use_parallel_residual", True),
                        num_hidden_layers=change.get("num_hidden_layers", TINY.num_hidden_layers))
    base_loss, base_grads = _loss_and_grads(base, ids, labels)
    loss, grads = _loss_and_grads(base.replace(**change), ids, labels)
    torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
    for name in base_grads:
        torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_padding_by_length_does_not_change_real_tokens():
    model = GenSLM(TINY).eval()
    ids = _ids(batch=1, length=20)
    padded = torch.cat([ids, torch.full((1, 9), 3)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded).logits[:, :20], model(ids).logits)
        labels = padded.clone()
        labels[:, 20:] = -100
        torch.testing.assert_close(model(padded, labels=labels).loss, model(ids, labels=ids).loss)


def test_no_quadratic_tensor_in_forward_and_backward():
    from memory_helpers import LargestAllocation

    length = 512
    model = GenSLM(TINY.replace(loss_chunk_size=64))
    ids = _ids(batch=1, length=length)
    with LargestAllocation() as mode:
        model(ids, labels=ids).loss.backward()
    # Largest legitimate tensor: the [S, 4E] MLP activation (or the [V, E] weights).
    assert mode.largest <= length * TINY.intermediate_size
    assert mode.largest < length * length


def _peak_live_bytes(config, length):
    from memory_helpers import PeakLiveBytes

    torch.manual_seed(0)
    model = GenSLM(config)
    ids = _ids(batch=1, length=length)
    with PeakLiveBytes() as mode:
        model(ids, labels=ids).loss.backward()
    return mode.peak


def test_tiled_training_keeps_little_more_than_the_layer_inputs():
    """Full checkpointing + tiled attention and MLP + chunked loss: a training step's peak is the
    layers' inputs plus a handful of [S, E] tensors (one layer's backward at a time), far below
    full checkpointing alone, which holds a whole layer's projections and attention."""
    config = TINY.replace(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    length, chunk = 2048, 256
    seq_bytes = length * config.hidden_size * 4  # one [S, E] fp32 tensor
    full = _peak_live_bytes(config.replace(activation_checkpointing="full", loss_chunk_size=chunk), length)
    tiled = _peak_live_bytes(config.replace(activation_checkpointing="full", loss_chunk_size=chunk,
                                            mlp_chunk_size=chunk, attention_head_chunk=1), length)
    assert tiled <= (config.num_hidden_layers + 7) * seq_bytes, tiled / seq_bytes
    assert tiled < 0.6 * full, (tiled / seq_bytes, full / seq_bytes)
    # Segments of two layers keep half the layer inputs (and not the embedding output).
    segments = _peak_live_bytes(config.replace(activation_checkpointing="full", loss_chunk_size=chunk,
                                               mlp_chunk_size=chunk, attention_head_chunk=1,
                                               checkpoint_num_layers=2), length)
    assert segments <= tiled - 0.75 * seq_bytes, (segments / seq_bytes, tiled / seq_bytes)


@pytest.mark.parametrize("bad,match", [
    ({"hidden_size": 66}, "hidden_size=66 is not divisible by num_attention_heads=4"),
    ({"hidden_act": "swish"}, "hidden_act='swish'"),
    ({"activation_checkpointing": "some"}, "activation_checkpointing='some'"),
    ({"rotary_pct": 1.5}, "rotary_pct=1.5"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"loss_chunk_size": 0}, "loss_chunk_size=0"),
    ({"mlp_chunk_size": 0}, "mlp_chunk_size=0"),
    ({"attention_head_chunk": 0}, "attention_head_chunk=0"),
    ({"checkpoint_num_layers": 0, "activation_checkpointing": "full"}, "checkpoint_num_layers=0"),
    ({"checkpoint_num_layers": 2}, "checkpoint_num_layers=2 needs activation_checkpointing='full'"),
    ({"hidden_size": 48, "num_attention_heads": 4, "rotary_pct": 0.25}, "rotary dims .* = 3 is odd"),
])
def test_bad_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**bad)


def test_bad_inputs_and_unknown_fields():
    model = GenSLM(TINY)
    with pytest.raises(ValueError, match=r"input_ids has shape \(5,\); expected \[B, S\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids has dtype torch.float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="unknown fields"):
        GenSLMConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown GenSLM preset"):
        preset("genslm-1t")


def test_half_precision_model_keeps_rotary_angles_exact():
    model = GenSLM(TINY)
    cos32, _ = model.rotary(torch.arange(9000, 9010))
    cos16, _ = model.half().rotary(torch.arange(9000, 9010))
    assert torch.equal(cos32, cos16)


def test_presets_have_genslm_shapes():
    p = preset("genslm-25m")
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.intermediate_size) == (512, 8, 8, 2048)
    model = GenSLM(p)
    assert model.num_parameters() == 25_290_752  # GenSLM's neox_25,290,752.json


@pytest.mark.parametrize("grad", [False, True])
def test_attention_keeps_no_reference_to_what_a_releasing_core_drops(grad):
    """Attention hands q, k, v to its core as the only references (nor is the fused projection
    kept by a view): a core that releases its inputs, as Ulysses does once they are sent, sees
    them freed at once, so they are not alive while it attends."""
    import weakref

    model = GenSLM(TINY)
    seen = []

    class ReleasingCore:
        releases_inputs = True

        def call_releasing(self, qkv):
            refs = [weakref.ref(t) for t in qkv]
            out = torch.zeros_like(qkv[0])
            qkv.clear()
            seen.append([r() is not None for r in refs])
            return out

    model.layers[0].attention.core = ReleasingCore()
    with torch.set_grad_enabled(grad):
        model(_ids())
    assert seen == [[False, False, False]]


def _materialised(module, seed):
    module.to_empty(device="cpu")
    init_parameters(module, seed)
    return dict(module.named_parameters())


def test_initial_weights_are_a_function_of_seed_and_name():
    """A model built on the meta device and filled later, or a pipeline stage of it alone, gets
    exactly the weights of a model built whole: what sharded ranks rely on."""
    from ds4sci.models.genslm.model import GenSLMStage

    config = TINY.replace(num_hidden_layers=3)
    whole = dict(GenSLM(config, seed=3).named_parameters())
    with torch.device("meta"):
        late = GenSLM(config)
    assert late.embed_in.weight.is_meta
    with pytest.raises(ValueError, match="seed=3 with no values to set"), torch.device("meta"):
        GenSLM(config, seed=3)
    late_params = _materialised(late, 3)
    assert late_params.keys() == whole.keys()
    for name, value in late_params.items():
        assert torch.equal(value, whole[name]), name
    with torch.device("meta"):
        stage = GenSLMStage(GenSLM(config), range(1, 3), is_first=False, is_last=True)
    stage_params = _materialised(stage, 3)
    assert "layers.2.mlp.dense_h_to_4h.weight" in stage_params and "embed_in.weight" not in stage_params
    for name, value in stage_params.items():
        assert torch.equal(value, whole[name]), name

    other = dict(GenSLM(config, seed=4).named_parameters())
    for name, value in whole.items():
        if name.endswith("bias"):
            assert not value.any(), name
        elif "layernorm" in name or "layer_norm" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        else:  # a random weight: another seed draws other values; weights differ from each other
            assert not torch.equal(value, other[name]), name
    qkv = whole["layers.0.attention.query_key_value.weight"]
    assert not torch.equal(qkv[:64], whole["layers.1.attention.query_key_value.weight"][:64])
    assert qkv.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    torch.manual_seed(5)
    a = GenSLM(config)
    torch.manual_seed(5)  # no seed given: drawn from torch's global generator
    assert torch.equal(a.embed_out.weight, GenSLM(config).embed_out.weight)


def test_init_parameters_names_a_parameter_it_has_no_rule_for():
    model = GenSLM(TINY, seed=0)
    model.layers[0].attention.gate = torch.nn.Conv1d(2, 2, 1)
    with pytest.raises(TypeError, match=r"layers\.0\.attention\.gate\.weight \(a parameter of Conv1d\)"):
        init_parameters(model, 0)


def _counting(tensors: dict):
    """A LazyTensors over ``tensors`` and the list of names it has read."""
    from ds4sci.data.weights import LazyTensors

    asked = []

    def reader(name):
        asked.append(name)
        return tensors[name]

    return LazyTensors({name: (lambda n=name: reader(n)) for name in tensors}), asked


def test_load_parameters_reads_what_the_module_holds_and_checks_shapes():
    from ds4sci.models.genslm.model import GenSLMStage

    config = TINY.replace(num_hidden_layers=3)
    source = GenSLM(config, seed=1)
    tensors = {k: v.detach().to(torch.float16) for k, v in source.state_dict().items()}
    weights, asked = _counting(tensors)
    with torch.device("meta"):
        stage = GenSLMStage(GenSLM(config), range(1, 2), is_first=False, is_last=False)
    load_parameters(stage.to_empty(device="cpu"), weights)
    assert asked == [name for name, _ in stage.named_parameters()]  # each once, this stage's only
    for name, value in stage.named_parameters():
        assert value.dtype == torch.float32 and torch.equal(value, tensors[name].float()), name
    with pytest.raises(KeyError, match=r"lack 1 of the module's parameters, e.g. \['layers.1.input_layernorm.weight'\]"):
        load_parameters(stage, {k: v for k, v in tensors.items() if k != "layers.1.input_layernorm.weight"})
    bad = dict(tensors, **{"layers.1.mlp.dense_4h_to_h.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"weights\['layers.1.mlp.dense_4h_to_h.bias'\] has shape \(3,\); "
                                         r"expected the parameter's \(64,\)"):
        load_parameters(stage, bad)


@pytest.mark.parametrize("layout", ["safetensors", "sharded safetensors", "pytorch bin", "legacy pytorch bin"])
def test_hf_weights_are_read_lazily_from_every_saved_layout(tmp_path, layout):
    pytest.importorskip("transformers")
    from ds4sci.models.genslm.interop import hf_weights
    from ds4sci.data.weights import LazyTensors

    ours = GenSLM(TINY, seed=2)
    hf = to_hf(ours)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if layout == "sharded safetensors" else {}))
    if "pytorch bin" in layout:  # older transformers' format (new ones write safetensors only)
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=layout == "pytorch bin")  # legacy: not mmap-able
    weights, config = hf_weights(tmp_path)
    assert isinstance(weights, LazyTensors) and config.architecture_changes(TINY) == {}
    if layout == "sharded safetensors":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert set(weights) == set(ours.state_dict())
    for name, value in ours.state_dict().items():
        assert torch.equal(weights[name], value), name
    model, _ = load_model(tmp_path)  # each tensor read once, into a model of the saved config
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
    if layout == "safetensors":
        from safetensors.torch import load_file, save_file

        extra = dict(load_file(tmp_path / "model.safetensors"), **{"gpt_neox.layers.9.mlp.x": torch.zeros(1)})
        save_file(extra, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match=r"do not fit its own model config: 0 missing .*, 1 unexpected "
                                             r"\(e.g. \['layers.9.mlp.x'\]\)"):
            load_model(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="has config.json but no model.safetensors"):
            hf_weights(tmp_path)
