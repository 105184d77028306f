"""Backward kernels of Q-Former self- and cross-attention; deterministic (no atomics).

dkdv kernel: one program per (group, HPP heads, key block), working on transposed score tiles S^T =
K Q^T (only loaded tiles get transposed). It owns its dK/dV rows and loops over every row tile that
reads them: the row blocks of its own row-set (self-attention), or the chunks of
row-sets that attend to its image (cross-attention with kv_index, via the device CSR IMGTAB/PERM, loop
bounds read from device memory), so dK/dV of a shared image sum over all its row-sets in a fixed order.
When the group's keys fit one key block (FUSE_DQ: Q-Former self-attention) the same program also owns
complete dQ rows and writes them: the whole backward is one kernel and D_i = rowsum(dO * O) is
computed in the tile.

dq kernel (only when the keys span several blocks): one program per row tile, like the forward; loops
over key blocks, writes dQ and D_i (read afterwards by the dkdv kernel).

Recomputation: P = exp2(((S - hi) - lo) * log2e) with the forward's fp64 lse split into fp32 hi + lo
(_lse_split; -inf for an empty row: every key of it is masked, so P = 0 there and no gradient flows); dS = P * (dP' - D_i) with dP' = dO V^T
times the dropout keep-scale. The dropout mask is regenerated from the forward's Philox rule
(_attention_common._dropout_keep: one tl.randint4x per 4 scores; the transposed S^T tiles of the dkdv
kernel generate it in [rows, keys] orientation and transpose it).

Non-finite input: as the forward (multiplicative dropout, every row and key block visited, a NaN lse
for a row whose allowed scores are all -inf), so NaN lands where the reference's gradients have it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (
    LOG2E,
    NO_SPECIALIZE,
    _allowed,
    _allowed_t,
    _chunk_of_program,
    _chunk_rows,
    _dot,
    _dropout,
    _dropout_keep,
    _dropout_keep_t,
    _dropout_rowgrp,
    _load_kpm,
    _load_tile,
    _lse_split,
    _store_tile,
    _tile_rows,
)


@triton.jit
def _probs_and_dp(q, k, v, do, lse, di, pos, row_ok, j0, j, kpm_j, seed, rowgrp, Lk, NQ, threshold, keep_scale,
                  qk_scale, MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """(P with dropout applied, dS) of one [rows, keys] tile of keys j = j0 + [0, BLOCK_N), both fp32 (dS
    without the softmax scale)."""
    s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
    allowed = _allowed(pos, row_ok, j, Lk, NQ, kpm_j, MODE, HAS_KPM)
    hi, lo = _lse_split(lse)
    p = tl.where(allowed, tl.exp2(((s - hi[:, None]) - lo[:, None]) * LOG2E), 0.0)
    dp = _dot(do, tl.trans(v), DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rowgrp, j0, threshold, BLOCK_N)
        pd = _dropout(p, keep, keep_scale)
        dp = _dropout(dp, keep, keep_scale)
    else:
        pd = p
    ds = p * (dp - di[:, None])
    return pd, ds


@triton.jit
def _dkdv_one_head(Q, K, V, O, DO, LSE, DI, DQ, DK, DV, KPM, PERM, IMGTAB, seed, h, img, img64, j0, kpm_j,
                   sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                   sdqb, sdql, sdqh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh,
                   H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                   MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr,
                   HAS_INDEX: tl.constexpr, G: tl.constexpr, FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    j = j0 + tl.arange(0, BLOCK_N)
    kv_ok = j < Lk
    k = _load_tile(K, img64 * skb + h * skh + j * skl, kv_ok, d, HEAD_DIM, BLOCK_D)
    v = _load_tile(V, img64 * svb + h * svh + j * svl, kv_ok, d, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if G == 1:
        n_mb = tl.cdiv(Lq, BLOCK_M)
    else:
        n_mb = 1
    if HAS_INDEX:
        start = tl.load(IMGTAB + 2 * img)
        end = tl.load(IMGTAB + 2 * img + 1)
        t_lo = start * 0
        t_hi = tl.cdiv(end - start, G) * n_mb
    else:  # every row block, also those the mode masks (0 * Q and 0 * dO keep NaN semantics, as the forward)
        start = img
        end = img + 1
        t_lo = img * 0
        t_hi = t_lo + n_mb
    for t in range(t_lo, t_hi):
        c = t // n_mb
        mb = t - c * n_mb
        first = start + c * G
        n64, i, row_ok = _tile_rows(PERM, first, tl.minimum(end - first, G), mb, Lq, BLOCK_M, G, HAS_INDEX,
                                    False)
        pos = SEQ_OFF + i
        q = _load_tile(Q, n64 * sqb + i * sql + h * sqh, row_ok, d, HEAD_DIM, BLOCK_D)
        do = _load_tile(DO, n64 * sdob + i * sdol + h * sdoh, row_ok, d, HEAD_DIM, BLOCK_D)
        lrow = (n64 * H + h) * Lq + i
        lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)
        if FUSE_DQ:
            o = _load_tile(O, n64 * sob + i * sol + h * soh, row_ok, d, HEAD_DIM, BLOCK_D)
            di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        else:
            di = tl.load(DI + lrow, mask=row_ok, other=0.0)
        # transposed scores S^T = K Q^T [keys, rows]: only loaded tiles are transposed (no register shuffles)
        st = _dot(k, tl.trans(q), DOT_PREC) * qk_scale
        allowed = _allowed_t(pos, row_ok, j, Lk, NQ, kpm_j, MODE, HAS_KPM)
        hi, lo = _lse_split(lse)
        pt = tl.where(allowed, tl.exp2(((st - hi[None, :]) - lo[None, :]) * LOG2E), 0.0)
        dpt = _dot(v, tl.trans(do), DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep_t(seed, _dropout_rowgrp(n64, h, i, H, Lq, Lk, OFFS64), j0, threshold, BLOCK_N)
            pdt = _dropout(pt, keep, keep_scale)
            dpt = _dropout(dpt, keep, keep_scale)
        else:
            pdt = pt
        dv += _dot(pdt.to(do.dtype), do, DOT_PREC)
        dst = (pt * (dpt - di[None, :])).to(q.dtype)
        dk += _dot(dst, q, DOT_PREC)
        if FUSE_DQ:
            dq = _dot(tl.trans(dst), k, DOT_PREC) * sm_scale
            _store_tile(DQ, n64 * sdqb + i * sdql + h * sdqh, row_ok, d, dq, HEAD_DIM, BLOCK_D)
    _store_tile(DK, img64 * sdkb + h * sdkh + j * sdkl, kv_ok, d, dk * sm_scale, HEAD_DIM, BLOCK_D)
    _store_tile(DV, img64 * sdvb + h * sdvh + j * sdvl, kv_ok, d, dv, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dkdv_kernel(Q, K, V, O, DO, LSE, DI, DQ, DK, DV, KPM, SEED, PERM, IMGTAB,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                         sdqb, sdql, sdqh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh, skpb, skpj,
                         H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                         MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         OFFS64: tl.constexpr, HAS_INDEX: tl.constexpr, G: tl.constexpr, HPP: tl.constexpr,
                         FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (groups * H // HPP * key blocks,): key blocks fastest, then heads, then the group, so the
    programs that read one group's row tiles run side by side."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(Lk, BLOCK_N)
    n_hg = H // HPP
    nb = pid % n_nb
    rest = pid // n_nb
    hg = rest % n_hg
    img = rest // n_hg
    img64 = img.to(tl.int64)
    j0 = nb * BLOCK_N
    kpm_j = _load_kpm(KPM, img64, skpb, skpj, j0 + tl.arange(0, BLOCK_N), Lk, HAS_KPM)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    for hh in range(HPP):
        _dkdv_one_head(Q, K, V, O, DO, LSE, DI, DQ, DK, DV, KPM, PERM, IMGTAB, seed, hg * HPP + hh, img, img64,
                       j0, kpm_j, sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                       sdqb, sdql, sdqh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh,
                       H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                       MODE, HAS_KPM, HAS_DROPOUT, OFFS64, HAS_INDEX, G, FUSE_DQ, BLOCK_M, BLOCK_N, BLOCK_D,
                       HEAD_DIM, DOT_PREC)


@triton.jit
def _dq_one_head(Q, K, V, O, DO, LSE, DI, DQ, KPM, seed, h, img64, n64, i, row_ok,
                 sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                 sdqb, sdql, sdqh, skpb, skpj,
                 H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                 MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr,
                 G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    pos = SEQ_OFF + i
    q = _load_tile(Q, n64 * sqb + i * sql + h * sqh, row_ok, d, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO, n64 * sdob + i * sdol + h * sdoh, row_ok, d, HEAD_DIM, BLOCK_D)
    o = _load_tile(O, n64 * sob + i * sol + h * soh, row_ok, d, HEAD_DIM, BLOCK_D)
    di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lrow = (n64 * H + h) * Lq + i
    tl.store(DI + lrow, di, mask=row_ok)
    lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)
    rowgrp = lrow
    if HAS_DROPOUT:
        rowgrp = _dropout_rowgrp(n64, h, i, H, Lq, Lk, OFFS64)
    kbase = img64 * skb + h * skh
    vbase = img64 * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):  # every key block (NaN semantics, see the forward)
        j = start_n + tl.arange(0, BLOCK_N)
        kv_ok = j < Lk
        k = _load_tile(K, kbase + j * skl, kv_ok, d, HEAD_DIM, BLOCK_D)
        v = _load_tile(V, vbase + j * svl, kv_ok, d, HEAD_DIM, BLOCK_D)
        kpm_j = _load_kpm(KPM, img64, skpb, skpj, j, Lk, HAS_KPM)
        pd, ds = _probs_and_dp(q, k, v, do, lse, di, pos, row_ok, start_n, j, kpm_j, seed, rowgrp, Lk, NQ, threshold,
                               keep_scale, qk_scale, MODE, HAS_KPM, HAS_DROPOUT, BLOCK_N, DOT_PREC)
        dq += _dot(ds.to(k.dtype), k, DOT_PREC)
    _store_tile(DQ, n64 * sdqb + i * sdql + h * sdqh, row_ok, d, dq * sm_scale, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dq_kernel(Q, K, V, O, DO, LSE, DI, DQ, KPM, SEED, CHUNKS,
                       sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                       sdqb, sdql, sdqh, skpb, skpj,
                       H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                       MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr,
                       HAS_INDEX: tl.constexpr, G: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Grid as the forward kernel's."""
    hg, img, first, cnt = _chunk_of_program(CHUNKS, H, HPP, G, HAS_INDEX)
    if cnt > 0:
        img64, n64, i, row_ok, seed = _chunk_rows(CHUNKS, SEED, img, first, cnt, Lq, BLOCK_M, G, HAS_INDEX,
                                                  HAS_DROPOUT)
        for hh in range(HPP):
            _dq_one_head(Q, K, V, O, DO, LSE, DI, DQ, KPM, seed, hg * HPP + hh, img64, n64, i, row_ok,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                         sdqb, sdql, sdqh, skpb, skpj,
                         H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale, sm_scale,
                         MODE, HAS_KPM, HAS_DROPOUT, OFFS64, G, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, DOT_PREC)
