"""Sequence parallelism for any transformer: which tokens each rank holds, the attention core
that attends over the whole sharded sequence, and the exact global loss.

A batch ``[B, S, ...]`` is split along dim 1 over the ``sp`` ranks (:func:`shard_sequence`); a
length that does not divide is right-padded, and the real length (``valid_length``) is kept so
that bidirectional attention ignores the padded keys and losses ignore the padded positions.
Each token keeps its global position (:func:`shard_positions`), also in the zigzag layout where a
shard is two separate chunks. The loss is the sum of per-token losses over every rank divided by
the global count, exactly the single-process mean (:func:`global_mean_loss`). Language models
shift their labels on the whole sequence before it is split (``models.genslm.parallelize``).

Attention modules take part through a small protocol: a module with a ``core`` attribute
(``(q, k, v) [B, H, S, D] -> [B, H, S, D]``) and a ``causal`` attribute (default True) gets its
core swapped by :func:`apply_sequence_parallel`; the model code never knows.

What each mode supports (besides q, k, v):

=========  =======================  =========================================================
mode       causal / bidirectional   additive biases
=========  =======================  =========================================================
ulysses    both                     key padding at the sequence end (``valid_length``)
ring       both (bidirectional:     key padding at the sequence end (``valid_length``)
           contiguous layout)
hybrid     both (as ring)           key padding at the sequence end (``valid_length``)
=========  =======================  =========================================================

No other additive attention bias (relative-position or pair biases) is supported by sequence
parallelism; causal attention needs no key padding (a real token never sees later padding).

Usage (what a model's ``parallelize.py`` and its training task do)::

    apply_sequence_parallel(model, "ulysses", sp_group=group)
    x_local, positions, valid = shard_sequence(x_BS, sp_rank, sp_size, "contiguous")
    set_valid_length(model, valid)          # bidirectional models with padding
    loss_sum, count = ...                   # the model's own summed loss on x_local
    loss, mean = global_mean_loss(loss_sum, count, dp_sp_group, grads_averaged_over=dp_sp)
    loss.backward()
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from .ring import LAYOUTS, hybrid_attention, hybrid_attention_releasing, ring_attention, ring_attention_releasing
from .ulysses import head_splits, local_attention, ulysses_attention, ulysses_attention_releasing

MODES = ("ulysses", "ring", "hybrid")


def shard_multiple(sp_size: int, layout: str) -> int:
    """The padded sequence length must be a multiple of this (zigzag: two chunks per rank)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    return sp_size * (2 if layout == "zigzag" else 1)


def shard_positions(seq_len: int, sp_rank: int, sp_size: int, layout: str,
                    ulysses_size: int = 1) -> torch.Tensor:
    """Global positions ``[seq_len / sp_size]`` of the tokens rank ``sp_rank`` holds, in order.

    ``seq_len`` must be a multiple of :func:`shard_multiple`. The ring level (``sp_size /
    ulysses_size`` shards, ``contiguous`` or ``zigzag`` chunk pairs) is split again into
    ``ulysses_size`` contiguous pieces, so the Ulysses all-to-all of a hybrid layout gathers each
    ring shard in order; ``sp_rank = ring_rank * ulysses_size + ulysses_rank`` (``ParallelDims``).
    Pure Ulysses is the contiguous layout with ``ulysses_size`` 1 or ``sp_size`` alike.
    """
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"shard_positions: sp_rank={sp_rank}; expected 0 <= sp_rank < "
                         f"sp_size={sp_size}")
    if ulysses_size < 1 or sp_size % ulysses_size:
        raise ValueError(f"shard_positions: ulysses_size={ulysses_size} does not divide "
                         f"sp_size={sp_size}")
    multiple = shard_multiple(sp_size, layout)
    if seq_len % multiple:
        raise ValueError(f"shard_positions: seq_len={seq_len} is not a multiple of {multiple} "
                         f"(sp_size={sp_size}, layout={layout!r}); pad it (shard_batch does)")
    ring_size = sp_size // ulysses_size
    ring_rank, ulysses_rank = divmod(sp_rank, ulysses_size)
    if layout == "contiguous":
        shard = seq_len // ring_size
        ring_positions = torch.arange(ring_rank * shard, (ring_rank + 1) * shard)
    else:
        chunk = seq_len // (2 * ring_size)
        late = 2 * ring_size - 1 - ring_rank
        ring_positions = torch.cat((torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk),
                                    torch.arange(late * chunk, (late + 1) * chunk)))
    piece = ring_positions.numel() // ulysses_size
    return ring_positions[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def padded_length(seq_len: int, sp_size: int, layout: str = "contiguous") -> int:
    """The smallest length ``>= seq_len`` that ``sp_size`` ranks can share in ``layout``."""
    multiple = shard_multiple(sp_size, layout)
    return seq_len + (-seq_len % multiple)


def shard_sequence(x: torch.Tensor, sp_rank: int, sp_size: int, layout: str = "contiguous",
                   ulysses_size: int = 1, pad_value=0, dim: int = 1):
    """This rank's part of a sequence: ``(x_local, positions [S_local], valid_length)``.

    ``x``: any tensor whose dim ``dim`` is the sequence (``[B, S, ...]``); it is right-padded with
    ``pad_value`` to :func:`padded_length` first. ``positions``: the global positions of the rows
    kept, in order (see :func:`shard_positions` for the layouts); ``valid_length``: ``S``, the
    real length (positions ``>= valid_length`` are padding: :func:`valid_mask`).
    """
    s = x.shape[dim]
    pad = padded_length(s, sp_size, layout) - s
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
    positions = shard_positions(s + pad, sp_rank, sp_size, layout, ulysses_size).to(x.device)
    return x.index_select(dim, positions), positions, s


def valid_mask(positions: torch.Tensor, valid_length: int) -> torch.Tensor:
    """``[S_local]`` bool: which of a shard's rows are real tokens (not end padding)."""
    return positions < valid_length


def gather_sequence(x_local: torch.Tensor, group, positions: torch.Tensor, valid_length: int,
                    dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (forward only; e.g. predictions to write out):
    shards are all-gathered over ``group``, put back in global order and the padding cut off.
    ``positions``: this rank's (every rank passes its own, from :func:`shard_sequence`)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x_local) for _ in range(size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    pos = [torch.empty_like(positions) for _ in range(size)]
    dist.all_gather(pos, positions.contiguous(), group=group)
    whole = torch.cat(parts, dim=dim)
    order = torch.argsort(torch.cat(pos))
    return whole.index_select(dim, order[:valid_length].to(whole.device))


def sequence_parallel_core(mode: str, *, sp_group=None, ulysses_group=None, ring_group=None,
                           layout: str = "zigzag", head_chunk: int | None = None, causal: bool = True):
    """The attention core ``(q, k, v) -> out`` of one mode (:func:`apply_sequence_parallel`)."""
    if mode not in MODES:
        raise ValueError(f"sequence parallelism: mode={mode!r}; expected one of {MODES}")
    if not causal and mode != "ulysses" and layout != "contiguous":
        raise ValueError(f"sequence parallelism: bidirectional attention in mode={mode!r} needs "
                         f"layout='contiguous' (it is balanced as it is); got layout={layout!r}")
    if mode == "hybrid":
        if ulysses_group is None or ring_group is None:
            raise ValueError("sequence parallelism: mode='hybrid' needs ulysses_group and "
                             "ring_group")
        return SequenceParallelCore(hybrid_attention, releasing=hybrid_attention_releasing,
                                    ulysses_group=ulysses_group, ring_group=ring_group, layout=layout,
                                    head_chunk=head_chunk, causal=causal)
    group = sp_group
    if group is None:
        group = ulysses_group if mode == "ulysses" else ring_group
    if group is None:
        raise ValueError(f"sequence parallelism: mode={mode!r} needs sp_group")
    if mode == "ulysses":
        return SequenceParallelCore(_ulysses, releasing=_ulysses_releasing, group=group, causal=causal)
    return SequenceParallelCore(ring_attention, releasing=ring_attention_releasing, group=group, layout=layout,
                                head_chunk=head_chunk, causal=causal)


def _ulysses(q, k, v, group, causal=True, valid_length=None):
    return _ulysses_releasing([q, k, v], group, causal, valid_length)


def _ulysses_releasing(qkv, group, causal=True, valid_length=None):
    core = functools.partial(local_attention, causal=causal, valid_length=valid_length)
    return ulysses_attention_releasing(qkv, group, core=core)


class SequenceParallelCore:
    """``Attention.core`` over a sharded sequence: ``fn(q, k, v, **settings)``.

    ``valid_length``: the real length of the sequences now being attended when their end is
    padding (bidirectional attention; set per batch through :func:`set_valid_length`).

    A class rather than a ``functools.partial`` so that ``copy.deepcopy(model)`` works: process
    groups cannot be copied, and a copy of the model must talk over the same groups anyway.
    """

    def __init__(self, fn, releasing=None, **settings):
        self.fn, self.releasing, self.settings = fn, releasing, settings
        self.valid_length: int | None = None

    @property
    def causal(self) -> bool:
        return self.settings.get("causal", True)

    @property
    def releases_inputs(self) -> bool:
        """Whether ``model.run_core`` may hand over ``[q, k, v]`` to ``call_releasing``."""
        return self.releasing is not None

    def _settings(self) -> dict:
        if self.valid_length is None or self.causal:
            return self.settings
        return {**self.settings, "valid_length": self.valid_length}

    def __call__(self, q, k, v):
        return self.fn(q, k, v, **self._settings())

    def call_releasing(self, qkv: list):
        """``fn`` on ``qkv = [q, k, v]``, emptying the list once they are no longer needed."""
        return self.releasing(qkv, **self._settings())

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        shown = {k: v for k, v in self.settings.items() if not k.endswith("group")}
        return f"SequenceParallelCore({self.fn.__name__}, {shown})"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that take part in sequence parallelism: those with a ``core``."""
    found = [m for m in model.modules() if "core" in vars(m)]
    if not found:
        raise TypeError(f"sequence parallelism: {type(model).__name__} has no attention module with a "
                        "'core' attribute ((q, k, v) [B, H, S, D] -> [B, H, S, D]) to replace")
    return found


def apply_sequence_parallel(model, mode: str, *, sp_group=None, ulysses_group=None,
                            ring_group=None, layout: str = "zigzag", head_chunk: int | None = None):
    """Make every attention module of ``model`` attend over a sequence sharded across ranks.

    ``mode``: ``ulysses`` (``sp_group``; token layout must be ``contiguous``), ``ring``
    (``sp_group``, ``layout`` contiguous or zigzag) or ``hybrid`` (``ulysses_group`` inside
    ``ring_group``, ``layout`` for the ring level). A module whose ``causal`` attribute is False
    attends bidirectionally (ring and hybrid need ``layout='contiguous'`` then). Inputs must be
    sharded with :func:`shard_sequence` using the same layout. ``head_chunk``: heads per ring pass
    of the ring's backward (ring and hybrid; ``ring.ring_attention``). Returns the model.
    """
    if mode == "ulysses":
        layout = "contiguous"
    cores = {}
    for module in attention_modules(model):
        causal = bool(getattr(module, "causal", True))
        if causal not in cores:
            cores[causal] = sequence_parallel_core(
                mode, sp_group=sp_group, ulysses_group=ulysses_group, ring_group=ring_group,
                layout=layout, head_chunk=head_chunk, causal=causal)
        if not isinstance(module.core, SequenceParallelCore):
            module.local_core = module.core
        module.core = cores[causal]
    return model


def sequence_layout(dims, ring_layout: str = "contiguous") -> tuple[str, int]:
    """``(layout, ulysses_size)`` of the token shards under ``dims`` (a ``ParallelDims``): Ulysses
    is contiguous over all sp ranks; ring and hybrid use ``ring_layout`` at the ring level
    (bidirectional models pass ``contiguous``)."""
    if dims.sp_mode == "ulysses":
        return "contiguous", dims.sp
    if dims.sp_mode == "ring":
        return ring_layout, 1
    return ring_layout, dims.ulysses


def apply_sequence_parallel_mesh(model, dims, mesh, ring_layout: str = "contiguous",
                                 head_chunk: int | None = None):
    """:func:`apply_sequence_parallel` with the mode and groups of a layout (``dims``) and its
    ``ParallelMesh``."""
    hybrid = dims.sp_mode == "hybrid"
    return apply_sequence_parallel(
        model, dims.sp_mode, sp_group=mesh.group("sp"),
        ulysses_group=mesh.group("ulysses") if hybrid else None,
        ring_group=mesh.group("ring") if hybrid else None,
        layout=sequence_layout(dims, ring_layout)[0], head_chunk=head_chunk)


def set_valid_length(model, valid_length: int | None) -> None:
    """Tell the sequence-parallel cores of ``model`` the real length of the next batch's
    sequences (None: no padding). Bidirectional attention then ignores the padded keys."""
    for module in attention_modules(model):
        if isinstance(module.core, SequenceParallelCore):
            module.core.valid_length = valid_length


def remove_sequence_parallel(model):
    """Back to plain single-process attention (e.g. for generation after SP training)."""
    for module in attention_modules(model):
        if isinstance(module.core, SequenceParallelCore):
            module.core = module.local_core
    return model


def global_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor, group=None,
                     grads_averaged_over: int = 1):
    """Loss of the whole (sharded) batch: ``(loss, mean)``.

    ``mean`` (detached) = all ranks' summed loss / all ranks' count of counted tokens over
    ``group`` (the dp x sp ranks), the single-process mean. ``loss`` is what to call backward on:
    this rank's sum / the global count, times ``grads_averaged_over`` - the number of ranks
    whose gradients are later averaged (FSDP over dp x sp averages, so pass its size; pass 1 when
    gradients are summed), so the resulting gradient is the single-process one.
    """
    # fp64: token counts stay exact far beyond fp32's 2**24.
    stats = torch.stack((loss_sum.detach().double(), count.double()))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    total, global_count = stats.unbind(0)
    global_count = global_count.clamp_min(1)
    scale = (grads_averaged_over / global_count).to(loss_sum.dtype)
    return loss_sum * scale, (total / global_count).float()


def comm_bytes_per_layer(mode: str, *, batch: int, seq_len: int, num_heads: int, head_dim: int,
                         sp: int, ulysses: int | None = None, dtype: torch.dtype = torch.float32,
                         sp_rank: int = 0) -> dict[str, int]:
    """Bytes one rank sends per attention layer: ``{"forward": ..., "backward": ...}`` (not
    counting an activation-checkpointing recompute, which repeats the forward's).

    ``seq_len`` is the padded length. Ulysses sends, per all-to-all, the heads other ranks own of
    its shard: ``3 (H - H_r) B S/P D`` for q, k, v and ``H_r (P-1) B S/P D`` for the output;
    backward sends ``(H - H_r) B S/P D`` (dOut) and ``3 H_r (P-1) B S/P D`` (dq, dk, dv); with
    even heads ``4 B S E (P-1)/P^2`` each way. Ring sends its K/V shard ``P-1`` hops forward and
    backward, plus ``P`` hops of fp32 dK/dV in backward. Hybrid is Ulysses over ``ulysses``
    ranks, then ring over ``sp / ulysses`` ranks on ``H_r`` heads of a ring shard.
    """
    if mode not in MODES:
        raise ValueError(f"comm_bytes_per_layer: mode={mode!r}; expected one of {MODES}")
    u = {"ulysses": sp, "ring": 1, "hybrid": ulysses}[mode]
    if u is None or u < 1 or sp % u:
        raise ValueError(f"comm_bytes_per_layer: ulysses={ulysses} must divide sp={sp} in hybrid "
                         "mode")
    ring = sp // u
    item = torch.empty((), dtype=dtype).element_size()
    acc = max(item, 4)  # dK/dV travel in fp32 (fp64 for fp64 inputs)
    local = batch * (seq_len // sp) * head_dim  # one head of this rank's shard, in elements
    heads = num_heads
    fwd = bwd = 0
    if u > 1:
        h_r = head_splits(num_heads, u)[sp_rank % u]
        # Backward runs the inverse all-to-alls: dOut out (like q alone), dq/dk/dv back.
        fwd += (3 * (num_heads - h_r) + h_r * (u - 1)) * local * item
        bwd += ((num_heads - h_r) + 3 * h_r * (u - 1)) * local * item
        heads = h_r
    if ring > 1:
        kv = 2 * heads * batch * (seq_len // ring) * head_dim  # a stacked K/V ring shard
        fwd += (ring - 1) * kv * item
        bwd += (ring - 1) * kv * item + ring * kv * acc
    return {"forward": fwd, "backward": bwd}


@contextlib.contextmanager
def count_sent_bytes():
    """Count the bytes this rank sends through the collectives sequence parallelism uses
    (``all_to_all_single``, ``batch_isend_irecv``) while the block runs::

        with count_sent_bytes() as sent:
            loss.backward()
        sent.total   # bytes that left this rank

    To compare with :func:`comm_bytes_per_layer`. Rows an all-to-all keeps on the rank do not
    count. It swaps the two functions in ``torch.distributed`` for the duration: use it in one
    thread, around sequence-parallel code only.
    """
    counter = _Sent()
    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def counting_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                     async_op=False):
        me, size = dist.get_rank(group), dist.get_world_size(group)
        splits = input_split_sizes or [input.shape[0] // size] * size
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        counter.total += sum(n for j, n in enumerate(splits) if j != me) * row
        return a2a(output, input, output_split_sizes, input_split_sizes, group, async_op)

    def counting_batch(p2p_op_list):
        counter.total += sum(op.tensor.numel() * op.tensor.element_size()
                             for op in p2p_op_list if op.op is dist.isend)
        return batch(p2p_op_list)

    dist.all_to_all_single, dist.batch_isend_irecv = counting_a2a, counting_batch
    try:
        yield counter
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


class _Sent:
    total: int = 0
