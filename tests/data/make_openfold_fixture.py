"""Write ``openfold_evoformer.safetensors``: OpenFold's own outputs and gradients for small
Evoformer/extra-MSA blocks and stacks, the ground truth of ``tests/test_evoformer_openfold.py``.

Not run in CI (OpenFold is not a dependency). To regenerate, with an OpenFold source checkout
(https://github.com/aqlaboratory/openfold; its CUDA extensions are not needed):

    python tests/data/make_openfold_fixture.py --openfold-src /path/to/openfold

Weights are random (OpenFold's zero "final"/"gating" inits would make the outputs trivial),
masks have zeros, everything is float64 in eval mode; the loss for gradients is a fixed random
projection of the outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent

BLOCK = dict(c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=3, c_hidden_mul=6,
             c_hidden_pair_att=4, no_heads_msa=2, no_heads_pair=3, transition_n=2,
             msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-8)
CASES = {
    # name: (OpenFold class, constructor kwargs, batch dims, N_seq, N_res)
    "evoformer_block": ("EvoformerBlock", dict(BLOCK, no_column_attention=False, opm_first=False,
                                               fuse_projection_weights=False), (2,), 5, 7),
    "evoformer_block_multimer": ("EvoformerBlock", dict(BLOCK, no_column_attention=False, opm_first=True,
                                                        fuse_projection_weights=True), (1,), 4, 6),
    "extra_msa_block": ("ExtraMSABlock", dict(BLOCK, opm_first=False, fuse_projection_weights=False,
                                              ckpt=False), (1,), 9, 5),
    "evoformer_stack": ("EvoformerStack", dict(BLOCK, c_s=10, no_blocks=2, blocks_per_ckpt=None,
                                               no_column_attention=False, opm_first=False,
                                               fuse_projection_weights=False), (1,), 3, 6),
    "extra_msa_stack": ("ExtraMSAStack", dict(BLOCK, no_blocks=2, opm_first=False,
                                              fuse_projection_weights=False, ckpt=False), (), 6, 5),
}


def import_openfold(src: Path):
    sys.path.insert(0, str(src))
    # The fused CUDA attention extension is imported at module load but unused on this path.
    sys.modules.setdefault("attn_core_inplace_cuda", types.ModuleType("attn_core_inplace_cuda"))
    import openfold.model.evoformer as evoformer

    return evoformer


def run_case(evoformer, name, spec, gen):
    cls_name, kwargs, batch, n_seq, n_res = spec
    module = getattr(evoformer, cls_name)(**kwargs).double().eval()
    with torch.no_grad():
        for pname, p in module.named_parameters():
            is_norm_scale = "layer_norm" in pname and pname.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + float(is_norm_scale))
    m = torch.randn(*batch, n_seq, n_res, kwargs["c_m"], generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(*batch, n_res, n_res, kwargs["c_z"], generator=gen, dtype=torch.float64, requires_grad=True)
    msa_mask = (torch.rand(*batch, n_seq, n_res, generator=gen) > 0.25).double()
    msa_mask[..., 0, :] = 1.0  # a fully present first row, like a real query sequence
    pair_mask = (torch.rand(*batch, n_res, n_res, generator=gen) > 0.2).double()
    # OpenFold's extra-MSA row attention defaults to its CUDA kernel; its low-memory attention
    # (pure torch, exact up to rounding) is the CPU path there.
    extra = {"use_lma": True} if "ExtraMSA" in cls_name else {}
    out = module(m, z, msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=None, **extra)
    outs = {"m": out[0], "z": out[1], "s": out[2]} if cls_name == "EvoformerStack" else (
        {"z": out} if cls_name == "ExtraMSAStack" else {"m": out[0], "z": out[1]})
    weights = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in outs.items()}
    loss = sum((outs[k] * weights[k]).sum() for k in outs)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, [m, z, *params.values()], allow_unused=True)
    tensors = {"input/m": m.detach(), "input/z": z.detach(), "input/msa_mask": msa_mask,
               "input/pair_mask": pair_mask}
    tensors |= {f"output/{k}": v.detach() for k, v in outs.items()}
    tensors |= {f"loss_weight/{k}": v for k, v in weights.items()}
    tensors |= {f"param/{k}": v.detach() for k, v in module.state_dict().items()}
    names = ["m", "z", *params]
    for n, g in zip(names, grads):
        if g is not None:
            tensors[f"grad/{'input/' if n in ('m', 'z') else 'param/'}{n}"] = g
    return {f"{name}/{k}": v.contiguous() for k, v in tensors.items()}, {"class": cls_name, "kwargs": kwargs}


def _git_head(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openfold-src", type=Path, required=True, help="OpenFold source checkout")
    parser.add_argument("--openfold-commit", default=None, help="recorded in the metadata "
                        "(default: git rev-parse HEAD in --openfold-src)")
    parser.add_argument("--out", type=Path, default=HERE / "openfold_evoformer.safetensors")
    args = parser.parse_args()
    evoformer = import_openfold(args.openfold_src)
    gen = torch.Generator().manual_seed(0)
    tensors, cases = {}, {}
    for name, spec in CASES.items():
        t, meta = run_case(evoformer, name, spec, gen)
        tensors |= t
        cases[name] = meta
    commit = args.openfold_commit or _git_head(args.openfold_src)
    metadata = {"cases": json.dumps(cases), "openfold_commit": commit, "torch": torch.__version__}
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
