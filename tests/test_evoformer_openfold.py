"""OpenFold weight compatibility: OpenFold's own outputs and gradients (recorded in
tests/data/openfold_evoformer.safetensors by tests/data/make_openfold_fixture.py from an OpenFold
checkout) are reproduced by our modules after ``load_state_dict(openfold_state_dict)``."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ds4sci.models import evoformer

FIXTURE = Path(__file__).parent / "data" / "openfold_evoformer.safetensors"


def _load():
    with safe_open(FIXTURE, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["cases"]), tensors


CASES, TENSORS = _load()


def _case(name):
    prefix = f"{name}/"
    sub = {k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)}
    group = lambda kind: {k[len(kind) + 1:]: v for k, v in sub.items() if k.startswith(kind + "/")}  # noqa: E731
    return group("param"), group("input"), group("output"), group("loss_weight"), group("grad")


def _build(name, backend, dtype):
    meta = CASES[name]
    module = getattr(evoformer, meta["class"])(attention_backend=backend, **meta["kwargs"]).to(dtype)
    params, *_ = _case(name)
    module.load_state_dict(params, strict=True)  # OpenFold's names and shapes, unchanged
    return module.eval()


def _outputs(module, cls, m, z, msa_mask, pair_mask):
    out = module(m, z, msa_mask, pair_mask)
    if cls == "EvoformerStack":
        return dict(zip("mzs", out))
    if cls == "ExtraMSAStack":
        return {"z": out}
    return dict(zip("mz", out))


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_openfold_float64(name, backend):
    _, inputs, expected, weights, grads = _case(name)
    module = _build(name, backend, torch.float64)
    m = inputs["m"].clone().requires_grad_()
    z = inputs["z"].clone().requires_grad_()
    outs = _outputs(module, CASES[name]["class"], m, z, inputs["msa_mask"], inputs["pair_mask"])
    assert outs.keys() == expected.keys()
    for key in outs:
        torch.testing.assert_close(outs[key], expected[key], rtol=1e-9, atol=1e-9, msg=f"output {key}")
    loss = sum((outs[k] * weights[k]).sum() for k in outs)
    params = dict(module.named_parameters())
    got = torch.autograd.grad(loss, [m, z, *params.values()], allow_unused=True)
    got = dict(zip(["input/m", "input/z", *(f"param/{n}" for n in params)], got))
    assert {k for k, g in got.items() if g is not None} == set(grads)
    for key, want in grads.items():
        torch.testing.assert_close(got[key], want, rtol=1e-8, atol=1e-9, msg=f"grad {key}")


@pytest.mark.parametrize("name", ["evoformer_block", "extra_msa_block"])
def test_matches_openfold_float32(name):
    """In fp32 the error against OpenFold's fp64 numbers is no worse than the naive fp32 path's."""
    _, inputs, expected, *_ = _case(name)
    errors = {}
    for backend in ("torch", "naive"):
        module = _build(name, backend, torch.float32)
        outs = _outputs(module, CASES[name]["class"], inputs["m"].float(), inputs["z"].float(),
                        inputs["msa_mask"].float(), inputs["pair_mask"].float())
        errors[backend] = max((outs[k].double() - expected[k]).abs().max().item() for k in outs)
    assert errors["torch"] <= 2 * errors["naive"] + 1e-6, errors
