"""Forward kernel of Q-Former self- and cross-attention (see _attention_common.py for the vocabulary).

One program = one tile of rows (a row block of a self-attention row-set, or G row-sets of the same
image stacked) x HPP heads (a loop: the key-padding mask, the row indices and the Philox row offsets
are computed once and reused by every head). When the group's keys fit one BLOCK_N tile (Q-Former
self-attention: 32 + 64 tokens) the softmax is a single pass with no running-max rescale; otherwise
(cross-attention over 257 / 677 image tokens) an online-softmax loop streams K/V blocks.

Scores are in natural units (qk_scale = the softmax scale; exact for a power-of-two scale, as D = 16 or 64 have),
and the log2 e of exp2 multiplies s - m, after the subtraction: scaling the scores by log2 e first would round
them at their own magnitude, |s| * eps of relative error in every probability. The saved lse is fp64 (see
_row_lse). A row with no allowed key gets out = 0 and lse = -inf, as the reference.

Non-finite input follows PyTorch's semantics (the reference): NaN reaches the output through the
probabilities (never through the row max, which some Triton versions compute NaN-dropping) and the
row sum l, which adds them up before dropout (so a dropped NaN still makes its row NaN, as the
reference's NaN * 0); a row whose allowed scores are all -inf is NaN (softmax of all -inf; told apart
from a row with no allowed key by SCORE_FLOOR); and every key block is visited, also those the mode
hides from a whole tile, because the reference's P @ V multiplies their V by exact zeros (0 * NaN = NaN). Dropout multiplies the normalised probabilities by keep / (1 - p) with the
Philox rule of blipfast.ops._philox on the [rows, Lk] view, row = (n * H + h) * Lq + i: key j uses word
j % 4 of the call with counter row * ceil(Lk / 4) + j // 4, so a key tile (starting at a multiple of
BLOCK_N) costs one tl.randint4x per 4 scores.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (
    LOG2E,
    NO_SPECIALIZE,
    SCORE_FLOOR,
    _allowed,
    _chunk_of_program,
    _chunk_rows,
    _dot,
    _dropout_keep,
    _dropout_rowgrp,
    _load_kpm,
    _load_tile,
    _row_lse,
    _masked_scores,
    _store_tile,
)


@triton.jit
def _fwd_one_head(Q, K, V, O, LSE, KPM, seed, h, img64, n64, i, row_ok, kpm_all,
                  sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, skpb, skpj,
                  H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale,
                  MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr,
                  G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SINGLE_N: tl.constexpr, DOT_PREC: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    pos = SEQ_OFF + i
    q = _load_tile(Q, n64 * sqb + i * sql + h * sqh, row_ok, d, HEAD_DIM, BLOCK_D)
    if HAS_DROPOUT:
        rowgrp = _dropout_rowgrp(n64, h, i, H, Lq, Lk, OFFS64)
    kbase = img64 * skb + h * skh
    vbase = img64 * svb + h * svh
    if SINGLE_N:
        # every key of the group in one tile: exact softmax in one pass
        j = tl.arange(0, BLOCK_N)
        kv_ok = j < Lk
        k = _load_tile(K, kbase + j * skl, kv_ok, d, HEAD_DIM, BLOCK_D)
        v = _load_tile(V, vbase + j * svl, kv_ok, d, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        allowed = _allowed(pos, row_ok, j, Lk, NQ, kpm_all, MODE, HAS_KPM)
        s = _masked_scores(s, allowed)
        m_i = tl.max(s, 1)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        l_i = tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rowgrp, 0, threshold, BLOCK_N)
            p = tl.where(keep, p * keep_scale, 0.0)  # NaN-safe: l_i summed p before dropout
        acc = _dot(p.to(v.dtype), v, DOT_PREC)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # every key block, also those the mode masks for the whole tile: their 0 * V keeps PyTorch's NaN
        # semantics (a NaN or inf anywhere in V makes the output NaN, as the reference's P @ V does)
        for start_n in range(0, Lk, BLOCK_N):
            j = start_n + tl.arange(0, BLOCK_N)
            kv_ok = j < Lk
            k = _load_tile(K, kbase + j * skl, kv_ok, d, HEAD_DIM, BLOCK_D)
            s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
            kpm_j = _load_kpm(KPM, img64, skpb, skpj, j, Lk, HAS_KPM)
            allowed = _allowed(pos, row_ok, j, Lk, NQ, kpm_j, MODE, HAS_KPM)
            s = _masked_scores(s, allowed)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            p = tl.exp2((s - m_safe[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rowgrp, start_n, threshold, BLOCK_N)
                p = tl.where(keep, p * keep_scale, 0.0)
            v = _load_tile(V, vbase + j * svl, kv_ok, d, HEAD_DIM, BLOCK_D)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    empty = l_i == 0.0  # no allowed key: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    lost = m_i == SCORE_FLOOR  # every allowed score -inf: NaN (and a NaN lse: NaN gradients), as the reference
    out = tl.where(lost[:, None], float("nan"), acc / l_safe[:, None])
    _store_tile(O, n64 * sob + i * sol + h * soh, row_ok, d, out, HEAD_DIM, BLOCK_D)
    lse = tl.where(empty, float("-inf"), tl.where(lost, float("nan"), _row_lse(m_safe, l_safe)))
    tl.store(LSE + (n64 * H + h) * Lq + i, lse, mask=row_ok)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_fwd_kernel(Q, K, V, O, LSE, KPM, SEED, CHUNKS,
                    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, skpb, skpj,
                    H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale,
                    MODE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr,
                    HAS_INDEX: tl.constexpr, G: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, SINGLE_N: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Grid (tiles * H // HPP, row blocks): axis 0 is tile-major and head-minor, so the programs that
    read one image's K/V run side by side (its K/V stays in L2); axis 1 splits long row-sets (G == 1)."""
    hg, img, first, cnt = _chunk_of_program(CHUNKS, H, HPP, G, HAS_INDEX)
    if cnt > 0:
        img64, n64, i, row_ok, seed = _chunk_rows(CHUNKS, SEED, img, first, cnt, Lq, BLOCK_M, G, HAS_INDEX,
                                                  HAS_DROPOUT)
        kpm_all = row_ok
        if SINGLE_N:
            kpm_all = _load_kpm(KPM, img64, skpb, skpj, tl.arange(0, BLOCK_N), Lk, HAS_KPM)
        for hh in range(HPP):
            _fwd_one_head(Q, K, V, O, LSE, KPM, seed, hg * HPP + hh, img64, n64, i, row_ok, kpm_all,
                          sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, skpb, skpj,
                          H, Lq, Lk, NQ, SEQ_OFF, threshold, keep_scale, qk_scale,
                          MODE, HAS_KPM, HAS_DROPOUT, OFFS64, G, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, SINGLE_N,
                          DOT_PREC)
