"""Fused in-batch image-text contrastive loss (BLIP-2 ITC, docs/semantics.md#itc) in Triton.

Forward (4 launches; never a [B, BW, Q] tensor; memory O(B * BW): the fp32 logits that the sampler
needs anyway, a uint8 arg-max query per (row, column), tiny per-row partials):
  1. ``_fwd_i2t``: BJ gathered texts against (BB local images x their Q queries): one MMA
     [BJ, E] x [E, BB*Q] (queries along the accumulator's columns, so the max over them stays inside a
     warp), max over the queries with its arg-max, divide by temp; stores s_i2t and the arg-max, and
     keeps per row an online log-sum-exp (running max m, sum of exp l) plus the sums that the loss and
     d/dtemp need, relative to the running max: sum exp*(m - s), the sums of m - s over the positives and
     over the other columns, and their counts.
  2. ``_fwd_t2i``: the same for BB local texts against BJ gathered images' Q queries ([BB, E] x
     [E, BJ*Q]), reading img_all exactly once when B <= 128.
     Each program walks ``n_steps`` column tiles, so the grid is (row blocks, column chunks) and the
     per-(row, chunk) partials are tiny ([7, chunks, B] fp32).
  3. ``_fwd_rows``: merges the chunks of each row into its max R and log l (lse = R + log l), the row's loss
     log l + sum_j tgt_j (R - s_j) and the row's d loss / d temp = -(E_tgt[R - s] - E_p[R - s]) / temp: every
     sum is of non-negative terms relative to the row's max (lse - sum_j tgt_j s_j would cancel two sums of
     size ~1/temp and lose 4 bits in fp32, more for large logits).
  4. ``_fwd_total``: loss = sum of row losses / (2B); d loss / d temp likewise (saved for backward).

Targets: tgt[b, j] = (1 - ls) * pos[b, j] / npos[b] + ls / BW, so sum_j tgt_j s_j needs only the row sums
above. Backward (2 launches + a cast): d s[b, j] = c * (exp((s - R[b]) - log l[b]) - tgt[b, j]), c = g / (2B temp),
routed to the arg-max query only; d temp = g * (d loss / d temp) from the forward.
  ``_bwd_img``: d img[b, q] = sum_j [a_i2t[b, j] == q] d s_i2t[b, j] txt_all[j]: an MMA of the one-hot
      weight tile [BB*Q, BJ] against txt_all [BJ, E];
  ``_bwd_txt``: d txt[b] = sum_j d s_t2i[b, j] img_all[j, a_t2i[b, j]]: an MMA of the one-hot weight
      tile [BB, BJ*Q] against img_all [BJ*Q, E], split over column chunks (fp32 atomics when split, so
      d text_feats is not bitwise reproducible run to run; everything else is).
For 16-bit features the weight tile is fed to the tensor cores as hi + lo 16-bit halves (two MMAs),
which keeps ~16 mantissa bits of d s; fp32 features use IEEE fp32 dots (no TF32).
Accumulation is fp32 throughout; features may be fp32, fp16 or bf16; Q and E need not be powers of 2.
Tile sizes (``_fwd_cfg``, ``_bwd_cfg``) were chosen from sm_90 compiles (no spills, wgmma) and are
untuned on hardware.

NaN and +-inf give what the reference (torch.max, log_softmax, autograd) gives, never a clean result:
the max over queries is NaN at the first NaN query (tl.max alone drops NaN on the GPU), a row of s with
NaN or +inf gets a NaN lse, loss and d s, -inf entries weigh 0 (also a whole tile of them), tgt = 0
times s = -inf is NaN, and a non-finite scale g / (2B temp) poisons only the arg-max queries (the MMAs
add 0 * inf = NaN exactly where the reference's matrix products do). tests/kernels/test_itc_nonfinite.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._constants import argmax_dtype

_TARGET_PROGRAMS = 256  # enough CTAs to fill an H100 (132 SMs) twice
_MAX_TILE = 128 * 128  # fp32 accumulator elements per program


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kernel, grid, *args, num_warps: int = 4, **constexprs) -> None:
    """Every launch of this module goes through here (tests record the launches to compile them for
    sm_90 on machines without a GPU)."""
    kernel[grid](*args, num_warps=num_warps, **constexprs)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _query_max(z3, q_ok):
    """max over the last axis (the queries) and its arg-max, as torch.max gives them: NaN, at the first NaN
    query, when a query is NaN; else the largest value, ties (+-inf too) to the first query. Padding
    queries (q_ok false) never win. tl.max drops NaN on the GPU (and the interpreter warns on an all-NaN
    slice), so NaN is tracked by a second reduction instead of being reduced."""
    isn = (z3 != z3) & q_ok
    zmax, amax = tl.max(tl.where(q_ok & (z3 == z3), z3, float("-inf")), axis=2, return_indices=True,
                        return_indices_tie_break_left=True)
    nmax, nidx = tl.max(isn.to(tl.int32), axis=2, return_indices=True, return_indices_tie_break_left=True)
    return tl.where(nmax > 0, float("nan"), zmax), tl.where(nmax > 0, nidx, amax)


@triton.jit
def _tile_update(zmax, amax, bb, b_ok, j, j_ok, t, pos, s_out, a_out, BW,
                 m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run):
    """Store one [BB, BJ] tile of s and its arg-max, fold it into the row partials.

    Every sum is kept relative to the row's running reference r (the running max m of the non-NaN entries, 0
    while that is -inf), as non-negative terms: l = sum exp(s - r), w = sum exp(s - r) (r - s), ps / ns = sum of
    (r - s) over the positives / the other columns, np / nn their counts. The loss and d/dtemp are then sums of
    non-negative numbers (lse - sum tgt s would cancel two sums of size ~ max|s| = 1/temp: 4 bits lost in fp32,
    more for large logits). When r grows by d, l and w are rescaled by exp(-d) and w, ps, ns get d times their
    weight or count.

    Non-finite logits give what the reference's log-softmax gives: a NaN or +inf entry makes l NaN (so the
    row's loss and gradient); -inf entries add exp(-inf) = 0 to l and w (0 * inf is taken as 0 there) and
    r - s = +inf to ps / ns, which makes the loss +inf, or NaN where a target of 0 multiplies it, as
    tgt * log_softmax does; a row of nothing but -inf and NaN ends with l = 0 or NaN, hence NaN."""
    s = zmax / t
    msk = b_ok[:, None] & j_ok[None, :]
    off = bb[:, None] * BW + j[None, :]
    tl.store(s_out + off, s, mask=msk)
    tl.store(a_out + off, amax.to(a_out.dtype.element_ty), mask=msk)
    p = tl.load(pos + off, mask=msk, other=0) != 0
    neg = j_ok[None, :] & (p == 0)
    sv = tl.where(j_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_run, tl.max(tl.where(sv == sv, sv, float("-inf")), axis=1))
    r_old = tl.where(m_run == float("-inf"), 0.0, m_run)
    r_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = r_new - r_old
    beta = tl.exp(r_old - r_new)
    ex = tl.exp(sv - r_new[:, None])
    d = r_new[:, None] - s
    w_run = beta * (w_run + tl.where(l_run == 0.0, 0.0, shift * l_run)) + \
        tl.sum(tl.where(ex == 0.0, 0.0, ex * d), axis=1)
    l_run = l_run * beta + tl.sum(ex, axis=1)
    ps_run = ps_run + tl.where(np_run == 0.0, 0.0, shift * np_run) + tl.sum(tl.where(p, d, 0.0), axis=1)
    ns_run = ns_run + tl.where(nn_run == 0.0, 0.0, shift * nn_run) + tl.sum(tl.where(neg, d, 0.0), axis=1)
    np_run = np_run + tl.sum(p.to(tl.float32), axis=1)
    nn_run = nn_run + tl.sum(neg.to(tl.float32), axis=1)
    return m_new, l_run, w_run, ps_run, ns_run, np_run, nn_run


@triton.jit
def _store_partials(part, n_chunks, pid_c, B, bb, b_ok, m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run):
    base = part + pid_c * B + bb
    stride = n_chunks * B
    tl.store(base, m_run, mask=b_ok)
    tl.store(base + stride, l_run, mask=b_ok)
    tl.store(base + 2 * stride, w_run, mask=b_ok)
    tl.store(base + 3 * stride, ps_run, mask=b_ok)
    tl.store(base + 4 * stride, ns_run, mask=b_ok)
    tl.store(base + 5 * stride, np_run, mask=b_ok)
    tl.store(base + 6 * stride, nn_run, mask=b_ok)


@triton.jit
def _fwd_i2t(img, txt_all, temp, pos, s_out, a_out, part, B, BW, Q, E, n_steps, n_chunks,
             BB: tl.constexpr, QP: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    # The MMA tile is transposed, [BJ texts, BB images x QP queries], so that the max over the queries
    # runs along the accumulator's columns (inside a warp) rather than across warps.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = tl.load(temp).to(tl.float32)
    c = tl.arange(0, BB * QP)
    cb = pid_b * BB + c // QP
    cq = c % QP
    col_ok = (cb < B) & (cq < Q)
    bb = pid_b * BB + tl.arange(0, BB)
    b_ok = bb < B
    qq = tl.arange(0, QP)
    ee = tl.arange(0, BE)
    m_run = tl.full((BB,), float("-inf"), tl.float32)
    l_run = tl.zeros((BB,), tl.float32)
    w_run = tl.zeros((BB,), tl.float32)
    ps_run = tl.zeros((BB,), tl.float32)
    ns_run = tl.zeros((BB,), tl.float32)
    np_run = tl.zeros((BB,), tl.float32)
    nn_run = tl.zeros((BB,), tl.float32)
    for step in range(0, n_steps):
        jr = (pid_c * n_steps + step) * BJ + tl.arange(0, BJ)
        acc = tl.zeros((BJ, BB * QP), tl.float32)
        for e0 in range(0, E, BE):
            e = e0 + ee
            e_ok = e < E
            y = tl.load(txt_all + jr[:, None].to(tl.int64) * E + e[None, :], mask=(jr < BW)[:, None] & e_ok[None, :],
                        other=0.0)
            x = tl.load(img + (cb * Q + cq)[:, None] * E + e[None, :], mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc = tl.dot(y, tl.trans(x), acc, input_precision=PREC)
        zmax, amax = _query_max(tl.reshape(acc, (BJ, BB, QP)), (qq < Q)[None, None, :])
        zmax = tl.trans(zmax)
        amax = tl.trans(amax)
        j = (pid_c * n_steps + step) * BJ + tl.arange(0, BJ)
        m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run = _tile_update(
            zmax, amax, bb, b_ok, j, j < BW, t, pos, s_out, a_out, BW,
            m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run)
    _store_partials(part, n_chunks, pid_c, B, bb, b_ok, m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run)


@triton.jit
def _fwd_t2i(txt, img_all, temp, pos, s_out, a_out, part, B, BW, Q, E, n_steps, n_chunks,
             BB: tl.constexpr, QP: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = tl.load(temp).to(tl.float32)
    bb = pid_b * BB + tl.arange(0, BB)
    b_ok = bb < B
    c = tl.arange(0, BJ * QP)
    cj = c // QP
    cq = c % QP
    qq = tl.arange(0, QP)
    ee = tl.arange(0, BE)
    m_run = tl.full((BB,), float("-inf"), tl.float32)
    l_run = tl.zeros((BB,), tl.float32)
    w_run = tl.zeros((BB,), tl.float32)
    ps_run = tl.zeros((BB,), tl.float32)
    ns_run = tl.zeros((BB,), tl.float32)
    np_run = tl.zeros((BB,), tl.float32)
    nn_run = tl.zeros((BB,), tl.float32)
    for step in range(0, n_steps):
        j0 = (pid_c * n_steps + step) * BJ
        jc = j0 + cj
        col_ok = (jc < BW) & (cq < Q)
        acc = tl.zeros((BB, BJ * QP), tl.float32)
        for e0 in range(0, E, BE):
            e = e0 + ee
            e_ok = e < E
            x = tl.load(txt + bb[:, None] * E + e[None, :], mask=b_ok[:, None] & e_ok[None, :], other=0.0)
            y = tl.load(img_all + (jc.to(tl.int64) * Q + cq)[:, None] * E + e[None, :],
                        mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
        zmax, amax = _query_max(tl.reshape(acc, (BB, BJ, QP)), (qq < Q)[None, None, :])
        j = j0 + tl.arange(0, BJ)
        m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run = _tile_update(
            zmax, amax, bb, b_ok, j, j < BW, t, pos, s_out, a_out, BW,
            m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run)
    _store_partials(part, n_chunks, pid_c, B, bb, b_ok, m_run, l_run, w_run, ps_run, ns_run, np_run, nn_run)


@triton.jit
def _fwd_rows(part_i2t, part_t2i, n_chunks_i2t, n_chunks_t2i, temp, stats, rows_out, B, BW, ls,
              RB: tl.constexpr, CB: tl.constexpr):
    """Grid (2 directions, row blocks): merge a row's chunk partials (each relative to its own reference r_c,
    see _tile_update) to the row's reference R (its max, 0 for a row of -inf); write R (stats[d]), log l
    (stats[2 + d]), npos (stats[4]), the row loss (rows_out[d]) and the row's d loss / d temp (rows_out[2 + d]):

        loss = log l + sum_j tgt_j (R - s_j)          (= lse - sum_j tgt_j s_j, as sums of non-negative terms)
        d loss / d temp = -(sum_j tgt_j (R - s_j) - sum_j p_j (R - s_j)) / temp"""
    d = tl.program_id(0)
    rows = tl.program_id(1) * RB + tl.arange(0, RB)
    r_ok = rows < B
    t = tl.load(temp).to(tl.float32)
    if d == 0:
        part = part_i2t
        n_chunks = n_chunks_i2t
    else:
        part = part_t2i
        n_chunks = n_chunks_t2i
    stride = n_chunks * B
    # pass 1: the row max; pass 2: the partials moved to R. 2-D accumulators reduced once after each loop. The
    # chunk maxima are never NaN (_tile_update), and a chunk's NaN or +inf has made its l NaN.
    mm = tl.full((RB, CB), float("-inf"), tl.float32)
    for c0 in range(0, n_chunks, CB):
        cc = c0 + tl.arange(0, CB)
        msk = r_ok[:, None] & (cc < n_chunks)[None, :]
        mm = tl.maximum(mm, tl.load(part + cc[None, :] * B + rows[:, None], mask=msk, other=float("-inf")))
    m_tot = tl.max(mm, axis=1)
    big_r = tl.where(r_ok & (m_tot != float("-inf")), m_tot, 0.0)
    acc_l = tl.zeros((RB, CB), tl.float32)
    acc_w = tl.zeros((RB, CB), tl.float32)
    acc_ps = tl.zeros((RB, CB), tl.float32)
    acc_ns = tl.zeros((RB, CB), tl.float32)
    acc_np = tl.zeros((RB, CB), tl.float32)
    for c0 in range(0, n_chunks, CB):
        cc = c0 + tl.arange(0, CB)
        msk = r_ok[:, None] & (cc < n_chunks)[None, :]
        ptr = part + cc[None, :] * B + rows[:, None]
        m_c = tl.load(ptr, mask=msk, other=float("-inf"))
        r_c = tl.where(m_c == float("-inf"), 0.0, m_c)
        sh = big_r[:, None] - r_c
        beta = tl.where(msk, tl.exp(-sh), 0.0)
        l_c = tl.load(ptr + stride, mask=msk, other=0.0)
        np_c = tl.load(ptr + 5 * stride, mask=msk, other=0.0)
        nn_c = tl.load(ptr + 6 * stride, mask=msk, other=0.0)
        acc_l += beta * l_c
        acc_w += beta * (tl.load(ptr + 2 * stride, mask=msk, other=0.0) + tl.where(l_c == 0.0, 0.0, sh * l_c))
        acc_ps += tl.load(ptr + 3 * stride, mask=msk, other=0.0) + tl.where(np_c == 0.0, 0.0, sh * np_c)
        acc_ns += tl.load(ptr + 4 * stride, mask=msk, other=0.0) + tl.where(nn_c == 0.0, 0.0, sh * nn_c)
        acc_np += np_c
    l_tot = tl.where(r_ok, tl.sum(acc_l, axis=1), 1.0)
    np_tot = tl.sum(acc_np, axis=1)
    # sum_j tgt_j (R - s_j) with tgt = (1 - ls) / npos + ls / BW on the positives and ls / BW elsewhere, as two
    # products: a target of 0 times R - s = +inf (s = -inf) is NaN, as in the reference
    c_neg = ls / BW
    c_pos = (1.0 - ls) / tl.where(r_ok, np_tot, 1.0) + c_neg
    e_tgt = c_pos * tl.sum(acc_ps, axis=1) + c_neg * tl.sum(acc_ns, axis=1)
    log_l = tl.log(l_tot)
    row_loss = log_l + e_tgt
    row_dt = -(e_tgt - tl.sum(acc_w, axis=1) / l_tot) / t
    tl.store(stats + d * B + rows, big_r, mask=r_ok)
    tl.store(stats + (2 + d) * B + rows, log_l, mask=r_ok)
    tl.store(stats + 4 * B + rows, np_tot, mask=r_ok & (d == 0))
    tl.store(rows_out + d * B + rows, row_loss, mask=r_ok)
    tl.store(rows_out + (2 + d) * B + rows, row_dt, mask=r_ok)


@triton.jit
def _fwd_total(rows_out, loss, dtemp_unit, B, RB: tl.constexpr):
    acc_l = tl.zeros((RB,), tl.float32)
    acc_t = tl.zeros((RB,), tl.float32)
    for r0 in range(0, 2 * B, RB):
        rr = r0 + tl.arange(0, RB)
        ok = rr < 2 * B
        acc_l += tl.load(rows_out + rr, mask=ok, other=0.0)
        acc_t += tl.load(rows_out + 2 * B + rr, mask=ok, other=0.0)
    tl.store(loss, tl.sum(acc_l, axis=0) / (2 * B))
    tl.store(dtemp_unit, tl.sum(acc_t, axis=0) / (2 * B))


def _fwd_cfg(b: int, bw: int, q: int, e: int) -> dict:
    qp = _p2(q)
    be = min(64, max(16, _p2(e)))
    # image -> text: rows are (image, query) pairs
    bb_i = max(1, min(_p2(b), 128 // qp))
    while bb_i * qp < 16:
        bb_i *= 2
    bj_i = max(16, min(128, _p2(bw), _MAX_TILE // (bb_i * qp)))
    # text -> image: columns are (image, query) pairs
    bj_t = max(1, min(128 // qp, _p2(bw)))
    while bj_t * qp < 16:
        bj_t *= 2
    bb_t = max(16, min(128, _p2(b), _MAX_TILE // (bj_t * qp)))
    return dict(qp=qp, be=be, bb_i=bb_i, bj_i=bj_i, bb_t=bb_t, bj_t=bj_t)


def _chunks(n_rows_blocks: int, bw: int, bj: int) -> tuple[int, int]:
    """(n_steps per program, n_chunks): column tiles split so that the grid has ~_TARGET_PROGRAMS."""
    n_sub = _cdiv(bw, bj)
    progs = max(1, min(n_sub, _TARGET_PROGRAMS // max(1, n_rows_blocks)))
    n_steps = _cdiv(n_sub, progs)
    return n_steps, _cdiv(n_sub, n_steps)


def itc_loss_fwd(img, txt, img_all, txt_all, temp, pos, label_smoothing):
    """(loss 0-d fp32, s_i2t [B, BW] fp32, s_t2i [B, BW] fp32, a_i2t [B, BW], a_t2i [B, BW],
    row_stats [5, B] fp32 = (R_i2t, R_t2i, log l_i2t, log l_t2i, npos): lse = R + log l, dloss_dtemp 0-d fp32)."""
    b, q, e = img.shape
    bw = img_all.shape[0]
    dev = img.device
    cfg = _fwd_cfg(b, bw, q, e)
    prec = _prec(img.dtype)
    pos_u8 = pos.contiguous().view(torch.uint8)
    temp = temp.reshape(1)
    f32 = torch.float32
    s_i2t = torch.empty((b, bw), dtype=f32, device=dev)
    s_t2i = torch.empty((b, bw), dtype=f32, device=dev)
    a_i2t = torch.empty((b, bw), dtype=argmax_dtype(q), device=dev)
    a_t2i = torch.empty((b, bw), dtype=argmax_dtype(q), device=dev)

    nb_i = _cdiv(b, cfg["bb_i"])
    steps_i, nc_i = _chunks(nb_i, bw, cfg["bj_i"])
    nb_t = _cdiv(b, cfg["bb_t"])
    steps_t, nc_t = _chunks(nb_t, bw, cfg["bj_t"])
    part_i = torch.empty((7, nc_i, b), dtype=f32, device=dev)
    part_t = torch.empty((7, nc_t, b), dtype=f32, device=dev)

    _launch(_fwd_i2t, (nb_i, nc_i), img, txt_all, temp, pos_u8, s_i2t, a_i2t, part_i, b, bw, q, e, steps_i, nc_i,
            BB=cfg["bb_i"], QP=cfg["qp"], BJ=cfg["bj_i"], BE=cfg["be"], PREC=prec,
            num_warps=8 if cfg["bb_i"] * cfg["qp"] * cfg["bj_i"] >= 8192 else 4)
    _launch(_fwd_t2i, (nb_t, nc_t), txt, img_all, temp, pos_u8, s_t2i, a_t2i, part_t, b, bw, q, e, steps_t, nc_t,
            BB=cfg["bb_t"], QP=cfg["qp"], BJ=cfg["bj_t"], BE=cfg["be"], PREC=prec,
            num_warps=8 if cfg["bb_t"] * cfg["qp"] * cfg["bj_t"] >= 8192 else 4)

    stats = torch.empty((5, b), dtype=f32, device=dev)
    rows = torch.empty((4, b), dtype=f32, device=dev)
    rb = min(32, max(2, _p2(b)))
    _launch(_fwd_rows, (2, _cdiv(b, rb)), part_i, part_t, nc_i, nc_t, temp, stats, rows, b, bw, float(label_smoothing),
            RB=rb, CB=min(64, max(2, _p2(max(nc_i, nc_t)))), num_warps=4)
    loss = torch.empty((), dtype=f32, device=dev)
    dtemp_unit = torch.empty((), dtype=f32, device=dev)
    _launch(_fwd_total, (1,), rows, loss, dtemp_unit, b, RB=min(1024, max(2, _p2(2 * b))), num_warps=4)
    return loss, s_i2t, s_t2i, a_i2t, a_t2i, stats, dtemp_unit


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dlogits(s_ptr, a_ptr, pos, off, msk, big_r, log_l, npos, BW, ls, c_bad):
    """d loss / d s without the scale c: softmax - target (0 outside the tile), and the arg-max. The softmax is
    exp((s - R) - log l): s - R first, exact near the row max (exp(s - lse) would carry lse's rounding at the
    size of 1/temp into every weight). ``c_bad`` is 0, or NaN when the scale is not finite: added here, it
    reaches only the entries that get a weight."""
    s = tl.load(s_ptr + off, mask=msk, other=0.0)
    a = tl.load(a_ptr + off, mask=msk, other=0).to(tl.int32)
    p = tl.load(pos + off, mask=msk, other=0) != 0
    tgt = (1.0 - ls) * p.to(tl.float32) / npos[:, None] + ls / BW
    w = tl.where(msk, tl.exp((s - big_r[:, None]) - log_l[:, None]) - tgt + c_bad, 0.0)
    return w, a


@triton.jit
def _grad_scale(grad, temp, B):
    """(c, c_bad): c = g / (2B temp) scales the summed weights, or 1 when it is not finite; c_bad is then NaN
    and goes into the weights (_dlogits), so that, as autograd's scatter of d s / temp gives, a row or
    query that no column routes to keeps exact zeros (a NaN temp or upstream gradient poisons only the
    arg-max queries, not every query of every image)."""
    c = tl.load(grad).to(tl.float32) / (2 * B) / tl.load(temp).to(tl.float32)
    c_bad = c - c  # 0, or NaN for a NaN or infinite c
    return tl.where(c_bad == 0.0, c, 1.0), c_bad


@triton.jit
def _mma_w(w, y, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """acc += w @ y with fp32 w: two 16-bit MMAs (hi + lo halves of w) for 16-bit y, else fp32."""
    if SPLIT:
        hi = w.to(y.dtype)
        lo = (w - hi.to(tl.float32)).to(y.dtype)
        acc = tl.dot(hi, y, acc)
        acc = tl.dot(lo, y, acc)
    else:
        acc = tl.dot(w, y.to(tl.float32), acc, input_precision=PREC)
    return acc


@triton.jit
def _bwd_img(grad, txt_all, temp, pos, s_i2t, a_i2t, stats, dimg, B, BW, Q, E, ls,
             BB: tl.constexpr, QP: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr,
             SPLIT: tl.constexpr, PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    c, c_bad = _grad_scale(grad, temp, B)
    bb = pid_b * BB + tl.arange(0, BB)
    b_ok = bb < B
    big_r = tl.load(stats + bb, mask=b_ok, other=0.0)
    log_l = tl.load(stats + 2 * B + bb, mask=b_ok, other=0.0)
    npos = tl.load(stats + 4 * B + bb, mask=b_ok, other=1.0)
    qq = tl.arange(0, QP)
    e = pid_e * BE + tl.arange(0, BE)
    e_ok = e < E
    acc = tl.zeros((BB * QP, BE), tl.float32)
    for j0 in range(0, BW, BJ):
        j = j0 + tl.arange(0, BJ)
        j_ok = j < BW
        off = bb[:, None] * BW + j[None, :]
        w, a = _dlogits(s_i2t, a_i2t, pos, off, b_ok[:, None] & j_ok[None, :], big_r, log_l, npos, BW, ls, c_bad)
        w3 = tl.where(a[:, None, :] == qq[None, :, None], w[:, None, :], 0.0)
        wt = tl.reshape(w3, (BB * QP, BJ))
        y = tl.load(txt_all + j[:, None].to(tl.int64) * E + e[None, :], mask=j_ok[:, None] & e_ok[None, :], other=0.0)
        acc = _mma_w(wt, y, acc, SPLIT, PREC)
    r = tl.arange(0, BB * QP)
    rb = pid_b * BB + r // QP
    rq = r % QP
    msk = ((rb < B) & (rq < Q))[:, None] & e_ok[None, :]
    tl.store(dimg + (rb * Q + rq)[:, None] * E + e[None, :], (acc * c).to(dimg.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_txt(grad, img_all, temp, pos, s_t2i, a_t2i, stats, dtxt, B, BW, Q, E, ls, n_steps,
             BB: tl.constexpr, QP: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr,
             SPLIT: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_c = tl.program_id(2)
    c, c_bad = _grad_scale(grad, temp, B)
    bb = pid_b * BB + tl.arange(0, BB)
    b_ok = bb < B
    big_r = tl.load(stats + B + bb, mask=b_ok, other=0.0)
    log_l = tl.load(stats + 3 * B + bb, mask=b_ok, other=0.0)
    npos = tl.load(stats + 4 * B + bb, mask=b_ok, other=1.0)
    qq = tl.arange(0, QP)
    cc = tl.arange(0, BJ * QP)
    cj = cc // QP
    cq = cc % QP
    e = pid_e * BE + tl.arange(0, BE)
    e_ok = e < E
    acc = tl.zeros((BB, BE), tl.float32)
    for step in range(0, n_steps):
        j0 = (pid_c * n_steps + step) * BJ
        j = j0 + tl.arange(0, BJ)
        off = bb[:, None] * BW + j[None, :]
        w, a = _dlogits(s_t2i, a_t2i, pos, off, b_ok[:, None] & (j < BW)[None, :], big_r, log_l, npos, BW, ls, c_bad)
        w3 = tl.where(a[:, :, None] == qq[None, None, :], w[:, :, None], 0.0)
        wt = tl.reshape(w3, (BB, BJ * QP))
        jc = j0 + cj
        col_ok = (jc < BW) & (cq < Q)
        y = tl.load(img_all + (jc.to(tl.int64) * Q + cq)[:, None] * E + e[None, :],
                    mask=col_ok[:, None] & e_ok[None, :], other=0.0)
        acc = _mma_w(wt, y, acc, SPLIT, PREC)
    msk = b_ok[:, None] & e_ok[None, :]
    ptr = dtxt + bb[:, None] * E + e[None, :]
    if ATOMIC:
        tl.atomic_add(ptr, acc * c, mask=msk)
    else:
        tl.store(ptr, (acc * c).to(dtxt.dtype.element_ty), mask=msk)


def _bwd_cfg(b: int, bw: int, q: int, e: int) -> dict:
    qp = _p2(q)
    be = min(128, max(16, _p2(e)))
    bb_i = max(1, min(_p2(b), 64 // qp))
    while bb_i * qp < 16:
        bb_i *= 2
    bj_i = max(16, min(64, _p2(bw)))
    bj_t = max(1, min(64 // qp, _p2(bw)))
    while bj_t * qp < 16:
        bj_t *= 2
    bb_t = max(16, min(128, _p2(b)))
    return dict(qp=qp, be=be, bb_i=bb_i, bj_i=bj_i, bb_t=bb_t, bj_t=bj_t)


def itc_loss_bwd(grad_loss, img, txt, img_all, txt_all, temp, pos, s_i2t, s_t2i, a_i2t, a_t2i, row_stats,
                 dtemp_unit, label_smoothing):
    """(d image_feats, d text_feats, d temp) for the forward above."""
    b, q, e = img.shape
    bw = img_all.shape[0]
    dev = img.device
    cfg = _bwd_cfg(b, bw, q, e)
    prec = _prec(img.dtype)
    split = img.dtype != torch.float32
    pos_u8 = pos.contiguous().view(torch.uint8)
    grad = grad_loss.reshape(1).to(torch.float32)
    temp1 = temp.reshape(1)
    ls = float(label_smoothing)
    n_e = _cdiv(e, cfg["be"])

    dimg = torch.empty_like(img)
    nb_i = _cdiv(b, cfg["bb_i"])
    _launch(_bwd_img, (nb_i, n_e), grad, txt_all, temp1, pos_u8, s_i2t, a_i2t, row_stats, dimg, b, bw, q, e, ls,
            BB=cfg["bb_i"], QP=cfg["qp"], BJ=cfg["bj_i"], BE=cfg["be"], SPLIT=split, PREC=prec, num_warps=4)

    nb_t = _cdiv(b, cfg["bb_t"])
    n_sub = _cdiv(bw, cfg["bj_t"])
    progs = max(1, min(n_sub, _TARGET_PROGRAMS // (nb_t * n_e)))
    n_steps = _cdiv(n_sub, progs)
    n_split = _cdiv(n_sub, n_steps)
    atomic = n_split > 1
    dtxt = torch.zeros((b, e), dtype=torch.float32, device=dev) if atomic else torch.empty_like(txt)
    _launch(_bwd_txt, (nb_t, n_e, n_split), grad, img_all, temp1, pos_u8, s_t2i, a_t2i, row_stats, dtxt, b, bw, q, e,
            ls, n_steps, BB=cfg["bb_t"], QP=cfg["qp"], BJ=cfg["bj_t"], BE=cfg["be"], SPLIT=split, PREC=prec,
            ATOMIC=atomic, num_warps=8 if cfg["bb_t"] >= 128 else 4)
    if atomic:
        dtxt = dtxt.to(txt.dtype)
    dtemp = (grad.reshape(()) * dtemp_unit).to(temp.dtype).reshape(temp.shape)
    return dimg, dtxt, dtemp
