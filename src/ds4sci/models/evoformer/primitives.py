"""Building blocks shared by the Evoformer modules: AlphaFold2's initialisers, gated multi-head
attention (Supplement 1.11.3 / OpenFold ``primitives.Attention``) and global attention
(Algorithm 19), with every attention going through ``ds4sci.evoformer_attention``.

Parameter names and shapes follow OpenFold so state dicts load unchanged. The attention backend
is a module attribute set once per model (``set_attention_backend``), never a ``forward`` flag.

Legend: ``*`` batch dims, ``Q``/``K`` query/key positions, ``H`` heads, ``C`` per-head channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from ds4sci.ops.evoformer_attention import evoformer_attention, evoformer_attention_naive

NAIVE = "naive"
"""Attention backend name meaning "materialise the logits with plain torch ops", what stock
OpenFold does; the yardstick for tests and benchmarks. Any other name goes to the op's dispatch."""

# Standard deviation of a unit normal truncated to [-2, 2]: rescales truncated-normal inits so
# their variance is the intended one (AF2 Supplement 1.11.4).
_TRUNC_STD = 0.87962566103423978


def _trunc_normal_(weight: torch.Tensor, scale: float) -> None:
    std = math.sqrt(scale / max(1, weight.shape[1])) / _TRUNC_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class Linear(nn.Linear):
    """``nn.Linear`` with AlphaFold2's initialisers (Supplement 1.11.4).

    ``init``: ``"default"`` LeCun truncated normal; ``"relu"`` He truncated normal; ``"glorot"``
    Glorot uniform; ``"gating"`` weights 0, bias 1 (gates start open); ``"normal"`` normal with
    std 1/sqrt(fan_in); ``"final"`` zeros (residual branches start as identity).
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, init: str = "default"):
        super().__init__(in_dim, out_dim, bias=bias)
        if init not in ("default", "relu", "glorot", "gating", "normal", "final"):
            raise ValueError(f"Linear: init={init!r}; expected one of default, relu, glorot, "
                             "gating, normal, final")
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init = getattr(self, "init", None)
        if init is None:  # called by nn.Linear.__init__ before self.init exists
            return
        with torch.no_grad():
            if self.bias is not None:
                self.bias.fill_(1.0 if init == "gating" else 0.0)
            if init == "default":
                _trunc_normal_(self.weight, 1.0)
            elif init == "relu":
                _trunc_normal_(self.weight, 2.0)
            elif init == "glorot":
                nn.init.xavier_uniform_(self.weight)
            elif init == "normal":
                nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
            else:  # gating, final
                self.weight.zero_()


def mask_bias(mask: torch.Tensor, inf: float, dtype: torch.dtype) -> torch.Tensor:
    """``inf * (mask - 1)``: 0 where ``mask`` is 1 (keep), ``-inf``-like where it is 0."""
    return inf * (mask.to(dtype) - 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: Sequence[torch.Tensor],
           backend: str) -> torch.Tensor:
    """``softmax(q k^T / sqrt(C) + sum(biases)) v`` for ``q [*, Q, H, C]``, ``k, v [*, K, H, C]``,
    biases broadcasting to ``[*, H, Q, K]``; ``backend`` is :data:`NAIVE` or an op backend."""
    if backend == NAIVE:
        return evoformer_attention_naive(q, k, v, biases)
    return evoformer_attention(q, k, v, biases, backend=backend)


class Attention(nn.Module):
    """Gated multi-head attention (AF2 Supplement 1.11.3); OpenFold's ``Attention``.

    ``c_hidden`` is per head (OpenFold's DISCREPANCY note: the supplement calls the total
    ``c``). Queries, keys and values are projected without bias; the output is gated by
    ``sigmoid(linear_g(q_x))`` per head before ``linear_o``.
    """

    def __init__(self, c_q: int, c_k: int, c_v: int, c_hidden: int, no_heads: int,
                 gating: bool = True):
        super().__init__()
        self.c_hidden, self.no_heads, self.gating = c_hidden, no_heads, gating
        self.linear_q = Linear(c_q, c_hidden * no_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_k, c_hidden * no_heads, bias=False, init="glorot")
        self.linear_v = Linear(c_v, c_hidden * no_heads, bias=False, init="glorot")
        self.linear_o = Linear(c_hidden * no_heads, c_q, init="final")
        self.linear_g = Linear(c_q, c_hidden * no_heads, init="gating") if gating else None
        self.attention_backend = "auto"
        """``"auto"``, an op backend name or :data:`NAIVE`; see ``set_attention_backend``."""

    def forward(self, q_x: torch.Tensor, kv_x: torch.Tensor,
                biases: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``q_x [*, Q, C_q]``, ``kv_x [*, K, C_k]``, biases broadcasting to ``[*, H, Q, K]``
        -> ``[*, Q, C_q]``."""
        heads = (self.no_heads, self.c_hidden)
        q = self.linear_q(q_x).unflatten(-1, heads)  # [*, Q, H, C]
        k = self.linear_k(kv_x).unflatten(-1, heads)
        v = self.linear_v(kv_x).unflatten(-1, heads)
        o = attend(q, k, v, biases, self.attention_backend)
        if self.linear_g is not None:
            o = o * torch.sigmoid(self.linear_g(q_x)).unflatten(-1, heads)
        return self.linear_o(o.flatten(-2))


class GlobalAttention(nn.Module):
    """Global gated attention over the sequences of one column (Algorithm 19, extra-MSA stack).

    One query per column (the masked mean of its rows) and single-head keys/values shared by
    all heads; the output is gated per row.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float, eps: float):
        super().__init__()
        self.c_hidden, self.no_heads, self.inf, self.eps = c_hidden, no_heads, inf, eps
        self.linear_q = Linear(c_in, c_hidden * no_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_v = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_g = Linear(c_in, c_hidden * no_heads, init="gating")
        self.linear_o = Linear(c_hidden * no_heads, c_in, init="final")
        self.attention_backend = "auto"

    def forward(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``m [*, N_res, N_seq, C_in]`` (one column per row of the leading dims), ``mask
        [*, N_res, N_seq]`` -> ``[*, N_res, N_seq, C_in]``."""
        mask = mask.to(m.dtype)
        # [*, N_res, C_in]: masked mean over the sequences of each column.
        q_mean = (m * mask.unsqueeze(-1)).sum(dim=-2) / (mask.sum(dim=-1, keepdim=True) + self.eps)
        heads = (self.no_heads, self.c_hidden)
        # Keys and values are shared by all heads, so the H queries of a column are run as H
        # query positions of one head: the same numbers, with K/V neither copied H times nor
        # given H gradients to sum.
        q = self.linear_q(q_mean).unflatten(-1, heads).unsqueeze(-2)  # [*, N_res, H (as L_q), 1, C]
        k = self.linear_k(m).unsqueeze(-2)                             # [*, N_res, N_seq, 1, C]
        v = self.linear_v(m).unsqueeze(-2)
        bias = mask_bias(mask, self.inf, m.dtype)[..., None, None, :]  # [*, N_res, 1, 1, N_seq]
        o = attend(q, k, v, [bias], self.attention_backend).squeeze(-2)  # [*, N_res, H, C]
        g = torch.sigmoid(self.linear_g(m)).unflatten(-1, heads)  # [*, N_res, N_seq, H, C]
        return self.linear_o((o.unsqueeze(-3) * g).flatten(-2))


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Route every attention inside ``module`` through ``backend`` (``"auto"``, an op backend
    such as ``"torch"``/``"triton"``, or :data:`NAIVE`); returns ``module``."""
    if not isinstance(backend, str):
        raise TypeError(f"set_attention_backend: backend={backend!r}; expected a string")
    from ds4sci.ops.evoformer_attention import dispatch

    known = ["auto", NAIVE, *sorted(b.name for b in dispatch.backends())]
    if backend not in known:
        raise ValueError(f"set_attention_backend: backend={backend!r} is unknown; expected one of {known}")
    for sub in module.modules():
        if isinstance(sub, (Attention, GlobalAttention)):
            sub.attention_backend = backend
    return module


def run_piece(fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``; while training, recomputed in backward (checkpointed) so that only the
    piece's inputs stay alive. One piece of a chunked computation."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def check_chunk_size(owner: str, chunk_size) -> None:
    """``chunk_size`` must be a positive int or None (no chunking)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{owner}: chunk_size={chunk_size!r}; expected a positive int (slices per chunk) "
                         f"or None (no chunking)")


def chunked(fn, chunk_size: int | None, dim: int | Sequence[int], sliced: Sequence[torch.Tensor],
            shared: Sequence[torch.Tensor] = (), out_dim: int | None = None) -> torch.Tensor:
    """``fn(*sliced, *shared)`` for a function independent along ``dim``, computed
    ``chunk_size`` slices at a time (each of ``sliced`` cut alike along ``dim``, or along its own
    entry of ``dim`` when that is a sequence; ``shared`` passed whole) and concatenated along
    ``out_dim`` (default: the first tensor's ``dim``): the same numbers with a working set
    bounded by one chunk. While training, each chunk is recomputed in backward
    (:func:`run_piece`), so that bound holds for the saved activations too."""
    check_chunk_size("chunked", chunk_size)
    dims = [dim] * len(sliced) if isinstance(dim, int) else list(dim)
    n = sliced[0].shape[dims[0]]
    if chunk_size is None or n <= chunk_size:
        return fn(*sliced, *shared)
    # torch.split, not one narrow() per chunk: in backward the chunks' gradients are gathered
    # into one tensor once, instead of each chunk zero-filling a full-size gradient.
    cuts = (t.split(chunk_size, d) for t, d in zip(sliced, dims))
    pieces = [run_piece(fn, *args, *shared) for args in zip(*cuts)]
    return torch.cat(pieces, dim=dims[0] if out_dim is None else out_dim)
