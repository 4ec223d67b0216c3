"""Triton kernels for Evoformer attention: forward, and backward with bias gradients.

FlashAttention-2 (Dao, 2023) with Evoformer's additive biases: each program owns one block of
queries (forward, dQ) or keys (dK/dV) of one (batch row, head), walks the other axis in tiles
and never materialises the ``[*, H, L_q, L_k]`` logits. Biases are read through their own
strides: a broadcast dim has stride 0 and the leading dims go through a per-batch-row offset
table, so a mask ``[B, N, 1, 1, L]`` or pair bias ``[B, 1, H, L, L]`` is never expanded.
Softmax statistics are fp32 and kept as (row max, log denominator), not one logsumexp: with
OpenFold's -1e9 masks, fp32 spacing near -1e9 is 64 and would swallow the denominator.

A bias gradient is the sum of ``dS = P * (dP - delta)`` over the dims where that bias
broadcasts. One program owns one tile of the gradient and loops, in a fixed order, over the
batch rows that share that bias row (and over heads / query or key blocks where it broadcasts
those): deterministic, no atomics, fp32 accumulation. Nothing else uses atomics either.

This module holds only ``@triton.jit`` code; ``triton_backend`` launches it (and loads a second
copy of this file in Triton's interpreter for CPU tensors).

Legend: ``b`` flat batch row (product of the leading dims), ``h`` head, ``BQ``/``BK`` query/key
block, ``DP`` head dim padded to a power of two >= 16 (masked loads, zero padding).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: fp32 products, for fp32 inputs (TF32 would lose ~3 decimal digits) and in the
    # interpreter (whose dot multiplies bf16 bit patterns as integers); exact for fp16/bf16.
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


# Reductions go through ``tl.reduce`` with Triton's own combine functions: compiled, this is
# exactly ``tl.sum``/``tl.max``; in the interpreter it takes numpy's fast path, and unlike
# ``tl.sum``/``tl.max``/``tl.zeros`` (themselves ``@jit`` functions, interpreted only if
# ``TRITON_INTERPRET=1`` was set when triton was first imported) it works in a process that
# imported triton normally.
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _load_rows(X, b, h, r, mr, rd, md, s_b, s_l, s_h, s_d):
    """Tile ``X[b, r, h, :]`` of a ``[Bf, L, H, D]`` tensor, zero outside ``mr x md``."""
    ptrs = X + b * s_b + h * s_h + r[:, None] * s_l + rd[None, :] * s_d
    return tl.load(ptrs, mask=mr[:, None] & md[None, :], other=0.0)


@triton.jit
def _add_bias(s, B, B_off, s_h, s_q, s_k, b, h, rq, rk, mq, mk, KEY_ROW: tl.constexpr):
    base = B + tl.load(B_off + b) + h * s_h  # B_off: this batch row's bias row (0-stride dims fold in)
    if KEY_ROW:  # the bias broadcasts over L_q (a mask): load one row of keys, not a tile
        row = tl.load(base + rk * s_k, mask=mk, other=0.0).to(tl.float32)
        s = s + row[None, :]
    else:
        offsets = rq[:, None] * s_q + rk[None, :] * s_k  # int32 within a bias row
        tile = tl.load(base + offsets, mask=mq[:, None] & mk[None, :], other=0.0)
        s = s + tile.to(tl.float32)
    return s


@triton.jit
def _scores(q, kt, b, h, rq, rk, mq, mk, scale,
            B0, B0_off, b0_h, b0_q, b0_k, B1, B1_off, b1_h, b1_q, b1_k,
            HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, B0_ROW: tl.constexpr, B1_ROW: tl.constexpr,
            IEEE: tl.constexpr):
    """Logits tile ``[BQ, BK]`` in fp32: q k^T / sqrt(D) + biases, -inf beyond L_k."""
    s = _dot(q, tl.trans(kt), IEEE) * scale
    if HAS_B0:
        s = _add_bias(s, B0, B0_off, b0_h, b0_q, b0_k, b, h, rq, rk, mq, mk, B0_ROW)
    if HAS_B1:
        s = _add_bias(s, B1, B1_off, b1_h, b1_q, b1_k, b, h, rq, rk, mq, mk, B1_ROW)
    return tl.where(mk[None, :], s, float("-inf"))


@triton.jit
def _probs(s, Stats, row, Lq, rq, mq):
    """Recomputed probabilities; rows past L_q and fully -inf rows (log denominator +inf) give 0."""
    base = Stats + (row * Lq + rq) * 2
    m = tl.load(base, mask=mq, other=0.0)
    log_denom = tl.load(base + 1, mask=mq, other=0.0)
    # Rows past L_q zeroed by a 2-D select, not by other=inf in the load above: triton 3.2's
    # layout pass rejects that load's select here (inside the dK/dV loop over query blocks).
    return tl.where(mq[:, None], tl.exp((s - m[:, None]) - log_denom[:, None]), 0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, Stats, B0, B0_off, B1, B1_off,
                s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
                s_ob, s_ol, s_oh, s_od, b0_h, b0_q, b0_k, b1_h, b1_q, b1_k,
                H, Lq, Lk, D, scale,
                HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, B0_ROW: tl.constexpr, B1_ROW: tl.constexpr,
                IEEE: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    b = row // H
    h = row % H
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    mq = rq < Lq
    rd = tl.arange(0, DP)
    md = rd < D
    q = _load_rows(Q, b, h, rq, mq, rd, md, s_qb, s_ql, s_qh, s_qd)
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.full([BQ], 0.0, tl.float32)
    acc = tl.full([BQ, DP], 0.0, tl.float32)
    for k0 in range(0, Lk, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < Lk
        kt = _load_rows(K, b, h, rk, mk, rd, md, s_kb, s_kl, s_kh, s_kd)
        vt = _load_rows(V, b, h, rk, mk, rd, md, s_vb, s_vl, s_vh, s_vd)
        s = _scores(q, kt, b, h, rq, rk, mq, mk, scale, B0, B0_off, b0_h, b0_q, b0_k,
                    B1, B1_off, b1_h, b1_q, b1_k, HAS_B0, HAS_B1, B0_ROW, B1_ROW, IEEE)
        m_new = tl.maximum(m_i, _max(s, 1))
        # While every logit seen is -inf, shift by 0 so exp never sees -inf - -inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + _sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m_i = m_new
    empty = l_i == 0.0  # every logit -inf: output 0, log denominator +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b * s_ob + h * s_oh + rq[:, None] * s_ol + rd[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=mq[:, None] & md[None, :])
    base = Stats + (row * Lq + rq) * 2
    tl.store(base, tl.where(m_i == float("-inf"), 0.0, m_i), mask=mq)
    tl.store(base + 1, tl.where(empty, float("inf"), tl.log(tl.where(empty, 1.0, l_i))), mask=mq)


@triton.jit
def _delta_kernel(O, DO, Delta, s_ob, s_ol, s_oh, s_od, s_gb, s_gl, s_gh, s_gd, H, Lq, D,
                  BQ: tl.constexpr, DP: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, ``[Bf, H, L_q]``."""
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    mq = rq < Lq
    rd = tl.arange(0, DP)
    md = rd < D
    o = _load_rows(O, b, h, rq, mq, rd, md, s_ob, s_ol, s_oh, s_od).to(tl.float32)
    do = _load_rows(DO, b, h, rq, mq, rd, md, s_gb, s_gl, s_gh, s_gd).to(tl.float32)
    tl.store(Delta + row * Lq + rq, _sum(o * do, 1), mask=mq)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, Stats, Delta, DK, DV, B0, B0_off, B1, B1_off,
                 s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
                 s_gb, s_gl, s_gh, s_gd, s_db, s_dl, s_dh, s_dd,
                 b0_h, b0_q, b0_k, b1_h, b1_q, b1_k,
                 H, Lq, Lk, D, scale,
                 HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, B0_ROW: tl.constexpr, B1_ROW: tl.constexpr,
                 IEEE: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr):
    """One key block of one (b, h): dV = P^T dO, dK = dS^T Q / sqrt(D), over all query blocks.

    ``DK`` and ``DV`` share the strides ``s_d*``.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mk = rk < Lk
    rd = tl.arange(0, DP)
    md = rd < D
    kt = _load_rows(K, b, h, rk, mk, rd, md, s_kb, s_kl, s_kh, s_kd)
    vt = _load_rows(V, b, h, rk, mk, rd, md, s_vb, s_vl, s_vh, s_vd)
    dk = tl.full([BK, DP], 0.0, tl.float32)
    dv = tl.full([BK, DP], 0.0, tl.float32)
    for q0 in range(0, Lq, BQ):
        rq = q0 + tl.arange(0, BQ)
        mq = rq < Lq
        q = _load_rows(Q, b, h, rq, mq, rd, md, s_qb, s_ql, s_qh, s_qd)
        do = _load_rows(DO, b, h, rq, mq, rd, md, s_gb, s_gl, s_gh, s_gd)
        s = _scores(q, kt, b, h, rq, rk, mq, mk, scale, B0, B0_off, b0_h, b0_q, b0_k,
                    B1, B1_off, b1_h, b1_q, b1_k, HAS_B0, HAS_B1, B0_ROW, B1_ROW, IEEE)
        p = _probs(s, Stats, row, Lq, rq, mq)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        delta = tl.load(Delta + row * Lq + rq, mask=mq, other=0.0)
        ds = p * (_dot(do, tl.trans(vt), IEEE) - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out_ptrs = b * s_db + h * s_dh + rk[:, None] * s_dl + rd[None, :] * s_dd
    mask = mk[:, None] & md[None, :]
    tl.store(DK + out_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_kernel(Q, K, V, DO, Stats, Delta, DQ, B0, B0_off, B1, B1_off,
               s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
               s_gb, s_gl, s_gh, s_gd, s_db, s_dl, s_dh, s_dd,
               b0_h, b0_q, b0_k, b1_h, b1_q, b1_k,
               H, Lq, Lk, D, scale,
               HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, B0_ROW: tl.constexpr, B1_ROW: tl.constexpr,
               IEEE: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr):
    """One query block of one (b, h): dQ = dS K / sqrt(D), over all key blocks."""
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    mq = rq < Lq
    rd = tl.arange(0, DP)
    md = rd < D
    q = _load_rows(Q, b, h, rq, mq, rd, md, s_qb, s_ql, s_qh, s_qd)
    do = _load_rows(DO, b, h, rq, mq, rd, md, s_gb, s_gl, s_gh, s_gd)
    delta = tl.load(Delta + row * Lq + rq, mask=mq, other=0.0)
    dq = tl.full([BQ, DP], 0.0, tl.float32)
    for k0 in range(0, Lk, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < Lk
        kt = _load_rows(K, b, h, rk, mk, rd, md, s_kb, s_kl, s_kh, s_kd)
        vt = _load_rows(V, b, h, rk, mk, rd, md, s_vb, s_vl, s_vh, s_vd)
        s = _scores(q, kt, b, h, rq, rk, mq, mk, scale, B0, B0_off, b0_h, b0_q, b0_k,
                    B1, B1_off, b1_h, b1_q, b1_k, HAS_B0, HAS_B1, B0_ROW, B1_ROW, IEEE)
        p = _probs(s, Stats, row, Lq, rq, mq)
        ds = p * (_dot(do, tl.trans(vt), IEEE) - delta[:, None])
        dq += _dot(ds.to(kt.dtype), kt, IEEE)
    tl.store(DQ + b * s_db + h * s_dh + rq[:, None] * s_dl + rd[None, :] * s_dd,
             (dq * scale).to(DQ.dtype.element_ty), mask=mq[:, None] & md[None, :])


@triton.jit
def _dbias_kernel(Q, K, V, DO, Stats, Delta, G, Members, Group_ptr,
                  B0, B0_off, B1, B1_off,
                  s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
                  s_gb, s_gl, s_gh, s_gd,
                  b0_h, b0_q, b0_k, b1_h, b1_q, b1_k,
                  H, Hb, n_tiles, n_splits, Lq, Lk, D, scale,
                  BCAST_H: tl.constexpr, BCAST_Q: tl.constexpr, BCAST_K: tl.constexpr,
                  HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, B0_ROW: tl.constexpr, B1_ROW: tl.constexpr,
                  IEEE: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr):
    """Gradient of one bias, ``G = [n_splits, n_rows, Hb, L_q or 1, L_k or 1]`` fp32.

    Program (axis 0) = one bias row ``g``, bias head ``hb`` and split; axes 1 and 2 = a query /
    key block unless the bias broadcasts over that axis. It sums dS over its share (split
    ``split`` of ``n_splits``) of the batch rows listed in ``Members[Group_ptr[g]:Group_ptr[g+1]]``
    (those that read bias row g), over all heads if the bias broadcasts over H, and over all
    query (key) blocks if it broadcasts over L_q (L_k). The caller sums the splits (a fixed
    order, so still deterministic); splits give a pair bias, shared by all N rows, enough
    programs to fill the GPU.
    """
    pid = tl.program_id(0)  # split * n_tiles + g * Hb + hb
    split = pid // n_tiles
    g = (pid % n_tiles) // Hb
    hb = pid % Hb
    rd = tl.arange(0, DP)
    md = rd < D
    if BCAST_H:
        h_lo = 0
        h_hi = H
    else:
        h_lo = hb
        h_hi = hb + 1
    if BCAST_Q:
        q_lo = 0
        q_hi = Lq
    else:
        q_lo = tl.program_id(1) * BQ
        q_hi = q_lo + BQ
    if BCAST_K:
        k_lo = 0
        k_hi = Lk
    else:
        k_lo = tl.program_id(2) * BK
        k_hi = k_lo + BK
    acc = tl.full([BQ, BK], 0.0, tl.float32)
    first = tl.load(Group_ptr + g)
    end = tl.load(Group_ptr + g + 1)
    chunk = (end - first + n_splits - 1) // n_splits
    first += split * chunk
    for i in range(first, tl.minimum(end, first + chunk)):
        b = tl.load(Members + i).to(tl.int64)
        for h in range(h_lo, h_hi):
            row = b * H + h
            for q0 in range(q_lo, q_hi, BQ):
                rq = q0 + tl.arange(0, BQ)
                mq = rq < Lq
                q = _load_rows(Q, b, h, rq, mq, rd, md, s_qb, s_ql, s_qh, s_qd)
                do = _load_rows(DO, b, h, rq, mq, rd, md, s_gb, s_gl, s_gh, s_gd)
                delta = tl.load(Delta + row * Lq + rq, mask=mq, other=0.0)
                for k0 in range(k_lo, k_hi, BK):
                    rk = k0 + tl.arange(0, BK)
                    mk = rk < Lk
                    kt = _load_rows(K, b, h, rk, mk, rd, md, s_kb, s_kl, s_kh, s_kd)
                    vt = _load_rows(V, b, h, rk, mk, rd, md, s_vb, s_vl, s_vh, s_vd)
                    s = _scores(q, kt, b, h, rq, rk, mq, mk, scale, B0, B0_off, b0_h, b0_q, b0_k,
                                B1, B1_off, b1_h, b1_q, b1_k, HAS_B0, HAS_B1, B0_ROW, B1_ROW, IEEE)
                    p = _probs(s, Stats, row, Lq, rq, mq)
                    acc += p * (_dot(do, tl.trans(vt), IEEE) - delta[:, None])
    pid64 = pid.to(tl.int64)
    if BCAST_Q:
        if BCAST_K:
            tl.store(G + pid64, _sum(_sum(acc, 1), 0))
        else:
            rk = k_lo + tl.arange(0, BK)
            tl.store(G + pid64 * Lk + rk, _sum(acc, 0), mask=rk < Lk)
    else:
        rq = q_lo + tl.arange(0, BQ)
        if BCAST_K:
            tl.store(G + pid64 * Lq + rq, _sum(acc, 1), mask=rq < Lq)
        else:
            rk = k_lo + tl.arange(0, BK)
            tl.store(G + (pid64 * Lq + rq[:, None]) * Lk + rk[None, :], acc,
                     mask=(rq < Lq)[:, None] & (rk < Lk)[None, :])
