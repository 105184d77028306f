"""Pieces shared by the Q-Former attention kernels: row tiles, index-computed masks, Philox dropout,
and the device-side row-set table of shared-K/V cross-attention.

Vocabulary (used by _attention_fwd.py and _attention_bwd.py):
  row-set  one [Lq, H, D] slice of q (a batch element of self-attention, a text of cross-attention);
  group    the K/V that row-sets attend to (self-attention: the row-set's own; cross-attention: an image);
  tile     BLOCK_M rows of one program: either rows [mb*BLOCK_M, ...) of one row-set (G == 1), or G
           whole row-sets of the same image stacked (G = BLOCK_M // Lq > 1), so that one pass over an
           image's K/V serves all of them;
  chunk    (image, count <= G, row-set ids): the row-sets of one cross-attention tile.

Cross-attention tables (built on the device, no host sync, by `build_rowset_tables`):
  PERM   int32 [N]        row-set ids sorted by image (stable: ascending id within an image);
  IMGTAB int32 [M, 2]     (start, end) of each image's row-sets in PERM, (0, 0) for an unused image;
  CHUNKS int32 [P, 2 + G] the tiles, image-major: (image, count, row-set ids...); P = chunk_bound(N, M, G)
                          >= the real number of chunks, spare entries have count 0 (their programs do
                          nothing). The ids sit in the row so that a program's first loads are independent.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# globals read inside @triton.jit code must be constexprs
LOG2E = tl.constexpr(1.4426950408889634)
# the score an ALLOWED key with a -inf score gets (the most negative float32): a row max of -inf then means
# "no allowed key" (output 0, as the reference), a row max of SCORE_FLOOR "every allowed score is -inf"
# (inf in q or k; PyTorch's softmax gives NaN there)
SCORE_FLOOR = tl.constexpr(-3.4028234663852886e38)

# runtime ints that must not become constexprs when equal to 1 (one compiled kernel per shape family)
NO_SPECIALIZE = ["H", "Lq", "Lk", "NQ", "SEQ_OFF", "threshold"]

# the single-program table kernel sorts N keys in registers: above this, torch ops build the tables
CSR_MAX_ROWSETS = 4096


# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _chunk_of_program(CHUNKS, H, HPP: tl.constexpr, G: tl.constexpr, HAS_INDEX: tl.constexpr):
    """(head group, image, first id slot, row-set count) of a program of the row-tile grids (forward and
    dQ): axis 0 is tile-major and head-minor. With an index, tile t is CHUNKS row t = (image, count, G
    row-set ids); without one, tile t is row-set (and image) t."""
    pid = tl.program_id(0)
    n_hg = H // HPP
    t = pid // n_hg
    hg = pid - t * n_hg
    if HAS_INDEX:
        img = tl.load(CHUNKS + (G + 2) * t)
        cnt = tl.load(CHUNKS + (G + 2) * t + 1)
        first = (G + 2) * t + 2  # the ids sit in the chunk's row
    else:
        img = t
        first = t
        cnt = t * 0 + 1
    return hg, img, first, cnt


@triton.jit
def _chunk_rows(CHUNKS, SEED, img, first, cnt, Lq, BLOCK_M: tl.constexpr, G: tl.constexpr,
                HAS_INDEX: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(image int64, row-set ids, row indices, row valid, dropout seed) of a program's row tile."""
    n64, i, row_ok = _tile_rows(CHUNKS, first, cnt, tl.program_id(1), Lq, BLOCK_M, G, HAS_INDEX, True)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return img.to(tl.int64), n64, i, row_ok, seed


@triton.jit
def _tile_rows(IDS, first, cnt, mb, Lq, BLOCK_M: tl.constexpr, G: tl.constexpr, HAS_INDEX: tl.constexpr,
               PADDED: tl.constexpr):
    """(row-set id int64 [BLOCK_M], row index in the row-set [BLOCK_M], row valid [BLOCK_M]) of a tile.

    Without an index ``first`` is the row-set itself (cnt == 1). With one, the tile's row-sets are
    IDS[first + s] for s < cnt; with PADDED (a CHUNKS row: G readable slots) the id load does not wait
    for ``cnt``. Ids of invalid rows are replaced by 0."""
    r = tl.arange(0, BLOCK_M)
    if G == 1:
        s = r * 0
        i = mb * BLOCK_M + r
    else:
        s = r // Lq
        i = r - s * Lq
    ok = (s < cnt) & (i < Lq)
    if HAS_INDEX:
        if PADDED:
            n = tl.load(IDS + first + s, mask=s < G, other=0)
        else:
            n = tl.load(IDS + first + s, mask=ok, other=0)
        n = tl.where(ok, n, 0)
    else:
        n = first + s
    return n.to(tl.int64), i, ok


@triton.jit
def _row_lse(m, l):
    """The saved log-sum-exp of a row, fp64: m (the row max, natural units, rounded at the scores' magnitude but
    exact) + log l (l = sum exp(s - m), in [1, Lk]). fp32 would round lse at |lse|, which costs every probability
    the backward recomputes |lse| * eps of relative error; fp64 keeps m + log l to ~2^-48."""
    return m.to(tl.float64) + tl.log(l).to(tl.float64)


@triton.jit
def _lse_split(lse):
    """The rows' fp64 lse as the fp32 pair (hi, lo), hi + lo = lse: the backward's P = exp2(((S - hi) - lo) * log2 e),
    where S - hi is exact near the row max and log2 e scales the small difference. -inf (no allowed key) gives
    (-inf, 0), NaN gives NaN."""
    hi = lse.to(tl.float32)
    exact = hi == lse  # also +-inf: no inf - inf evaluated
    lo = (tl.where(exact, 0.0, lse) - tl.where(exact, 0.0, hi.to(tl.float64))).to(tl.float32)
    return hi, lo


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PREC "upcast" (bf16 under TRITON_INTERPRET only: the
    interpreter multiplies the uint16 storage of bf16, triton-lang/triton#11584, unsupported upstream)
    computes the same exact products in fp32."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _itc_itg(pos, j, Lk, NQ):
    """MODE 3 (broadcast row positions ``pos`` against keys ``j``): the sequence is [NQ queries | T ITC text |
    T ITG text] with T = (Lk - NQ) // 2; query rows see queries, ITC rows their own text block, ITG rows the
    queries and the ITG text up to themselves."""
    t_end = NQ + (Lk - NQ) // 2
    bp = (pos >= NQ).to(tl.int32) + (pos >= t_end).to(tl.int32)
    bj = (j >= NQ).to(tl.int32) + (j >= t_end).to(tl.int32)
    return ((bp == bj) & ((bp != 2) | (j <= pos))) | ((bp == 2) & (bj == 0))


@triton.jit
def _allowed(pos, row_ok, j, Lk, NQ, kpm_ok, MODE: tl.constexpr, HAS_KPM: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N]: may row at sequence position ``pos`` attend to key ``j``.

    MODE 0 bidirectional (cross-attention too), 1 multimodal causal, 2 unimodal
    (docs/semantics.md#stage-1-attention-masks), 3 ITC + ITG in one pass ([queries | ITC text | ITG text], see
    _itc_itg)."""
    a = row_ok[:, None] & (j < Lk)[None, :]
    if MODE == 1:
        a = a & ((j[None, :] < NQ) | ((pos[:, None] >= NQ) & (j[None, :] <= pos[:, None])))
    if MODE == 2:
        a = a & ((pos[:, None] < NQ) == (j[None, :] < NQ))
    if MODE == 3:
        a = a & _itc_itg(pos[:, None], j[None, :], Lk, NQ)
    if HAS_KPM:
        a = a & kpm_ok[None, :]
    return a


@triton.jit
def _masked_scores(s, allowed):
    """Scores with disallowed keys at -inf and an allowed key's own -inf at SCORE_FLOOR (NaN stays NaN)."""
    return tl.where(allowed, tl.where(s == float("-inf"), SCORE_FLOOR, s), float("-inf"))


@triton.jit
def _dropout(x, keep, keep_scale):
    """x * keep / (1 - p) where kept, x * 0 where dropped: a NaN x stays NaN where it is dropped, as in
    torch's dropout and the reference (a plain select of 0 would hide it)."""
    return tl.where(keep, x * keep_scale, x * 0.0)


@triton.jit
def _load_kpm(KPM, img64, skpb, skpj, j, Lk, HAS_KPM: tl.constexpr):
    if HAS_KPM:
        return tl.load(KPM + img64 * skpb + j * skpj, mask=j < Lk, other=0) != 0
    else:
        return j < Lk


@triton.jit
def _dropout_rowgrp(n64, h, i, H, Lq, Lk, OFFS64: tl.constexpr):
    """Philox counter of the first dropout group of each row: row * ceil(Lk / 4) with row = (n * H + h) * Lq + i
    (the rule of blipfast.ops._philox on the [rows, Lk] view); int32 unless OFFS64."""
    off = ((n64 * H + h) * Lq + i) * ((Lk + 3) // 4)
    if OFFS64:
        return off
    else:
        return off.to(tl.int32)


@triton.jit
def _dropout_keep(seed, rowgrp, j0, threshold, BLOCK_N: tl.constexpr):
    """Keep-mask [rows, BLOCK_N] of keys j0 + [0, BLOCK_N) under the shared Philox rule: key j of a row uses
    word j % 4 of randint4x(seed, rowgrp + j // 4); keep iff (word >> 8) >= threshold.

    Callers pass a j0 that is a multiple of BLOCK_N (key tiles start at multiples of BLOCK_N), so with
    BLOCK_N % 4 == 0 the tile holds BLOCK_N // 4 whole groups: one Philox call per 4 elements, the four
    words interleaved along the keys. Otherwise one call per element, selecting its word (correct for any
    j0). Keys >= Lk get words of groups past the row's end: callers mask them out."""
    if BLOCK_N % 4 == 0:
        g = j0 // 4 + tl.arange(0, BLOCK_N // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, rowgrp[:, None] + g[None, :])
        # interleave(interleave(r0, r2), interleave(r1, r3)) = r0, r1, r2, r3, r0, ... along the keys
        r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    else:
        j = j0 + tl.arange(0, BLOCK_N)
        r0, r1, r2, r3 = tl.randint4x(seed, rowgrp[:, None] + (j // 4)[None, :])
        w = (j % 4)[None, :]
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit
def _dropout_keep_t(seed, rowgrp, j0, threshold, BLOCK_N: tl.constexpr):
    """The same keep-mask transposed: [BLOCK_N keys, rows] (generated in [rows, keys] orientation, where
    the four words of a call are adjacent keys, and transposed)."""
    return tl.trans(_dropout_keep(seed, rowgrp, j0, threshold, BLOCK_N))


@triton.jit
def _allowed_t(pos, row_ok, j, Lk, NQ, kpm_ok, MODE: tl.constexpr, HAS_KPM: tl.constexpr):
    """_allowed transposed: bool [BLOCK_N keys, BLOCK_M rows]."""
    a = row_ok[None, :] & (j < Lk)[:, None]
    if MODE == 1:
        a = a & ((j[:, None] < NQ) | ((pos[None, :] >= NQ) & (j[:, None] <= pos[None, :])))
    if MODE == 2:
        a = a & ((pos[None, :] < NQ) == (j[:, None] < NQ))
    if MODE == 3:
        a = a & _itc_itg(pos[None, :], j[:, None], Lk, NQ)
    if HAS_KPM:
        a = a & kpm_ok[:, None]
    return a


@triton.jit
def _load_tile(BASE, rowoff, ok, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[R, BLOCK_D] tile at BASE + rowoff[r] + d (zeros outside the valid rows and the head dim)."""
    ptr = BASE + rowoff[:, None] + d[None, :]
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptr, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptr, mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(BASE, rowoff, ok, d, val, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptr = BASE + rowoff[:, None] + d[None, :]
    val = val.to(BASE.dtype.element_ty)
    if HEAD_DIM == BLOCK_D:
        tl.store(ptr, val, mask=ok[:, None])
    else:
        tl.store(ptr, val, mask=ok[:, None] & (d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# cross-attention row-set tables


@triton.jit
def _rowset_table_kernel(IDX, N, M, P_BOUND, PERM, SIMG, IMGTAB, CHUNKS, G: tl.constexpr, NB: tl.constexpr):
    """One program: sort (image, id) keys in registers, then derive the CSR and the chunk list."""
    k = tl.arange(0, NB)
    zero = k * 0
    for m0 in range(0, M, NB):
        mm = m0 + k
        tl.store(IMGTAB + 2 * mm, zero, mask=mm < M)
        tl.store(IMGTAB + 2 * mm + 1, zero, mask=mm < M)
    valid = k < N
    raw = tl.load(IDX + k, mask=valid, other=0)  # int64: range-check before narrowing
    # padding and out-of-range indices (the op raises on them; here they must not touch memory) sort last
    # as image M, which is in no table
    img = tl.where(valid & (raw >= 0) & (raw < M), raw, M).to(tl.int32)
    key = tl.sort(img * NB + k)  # unique keys: a stable sort by image
    s_img = key // NB
    tl.store(PERM + k, key - s_img * NB, mask=valid)
    tl.store(SIMG + k, s_img, mask=valid)
    tl.debug_barrier()
    used = valid & (s_img < M)  # sorted position k holds an in-range row-set
    prev = tl.load(SIMG + k - 1, mask=valid & (k > 0), other=-1)
    nxt = tl.load(SIMG + k + 1, mask=(k + 1) < N, other=-1)
    tl.store(IMGTAB + 2 * s_img, k, mask=used & (s_img != prev))
    tl.store(IMGTAB + 2 * s_img + 1, k + 1, mask=used & (s_img != nxt))
    tl.debug_barrier()
    start = tl.load(IMGTAB + 2 * s_img, mask=used, other=0)
    end = tl.load(IMGTAB + 2 * s_img + 1, mask=used, other=0)
    slot = (k - start) % G
    head = used & (slot == 0)
    cid = tl.cumsum(head.to(tl.int32), 0) - 1  # the chunk that holds sorted position k
    total = tl.sum(head.to(tl.int32), 0)
    W = G + 2  # chunk row width (a constexpr: G is one)
    tl.store(CHUNKS + W * cid, s_img, mask=head)
    tl.store(CHUNKS + W * cid + 2 + slot, key - s_img * NB, mask=used)
    cnt = tl.minimum(end - k, G)
    for s in range(1, G):  # zero the unused id slots of partial chunks (kernels read all G slots)
        tl.store(CHUNKS + W * cid + 2 + s, zero, mask=head & (s >= cnt))
    tl.store(CHUNKS + W * cid + 1, cnt, mask=head)
    for p0 in range(0, P_BOUND, NB):
        pp = p0 + k
        spare = (pp >= total) & (pp < P_BOUND)
        tl.store(CHUNKS + W * pp, zero, mask=spare)
        tl.store(CHUNKS + W * pp + 1, zero, mask=spare)


def chunk_bound(n: int, m: int, g: int) -> int:
    """Upper bound of sum over images of ceil(count / g) for n row-sets over m images (host-side)."""
    return (n + (g - 1) * min(m, n)) // g


def _tables_torch(kv_index: torch.Tensor, m: int, g: int, p_bound: int):
    """The same tables with torch ops (large N): no host synchronisation either. Out-of-range indices are
    left out of every table, as in the kernel."""
    dev = kv_index.device
    n = kv_index.numel()
    key = torch.where((kv_index >= 0) & (kv_index < m), kv_index, m)  # out of range: image m, sorts last
    order = torch.argsort(key, stable=True)
    s_img = key.index_select(0, order)
    counts = torch.zeros(m + 1, dtype=torch.int64, device=dev).index_add_(
        0, key, torch.ones(n, dtype=torch.int64, device=dev))
    end = torch.cumsum(counts, 0)
    start = end - counts
    imgtab = torch.stack([torch.where(counts > 0, start, 0), torch.where(counts > 0, end, 0)], 1)[:m]
    k = torch.arange(n, device=dev)
    st = start.index_select(0, s_img)
    en = end.index_select(0, s_img)
    slot = (k - st) % g
    used = s_img < m
    head = used & (slot == 0)
    cid = torch.cumsum(head.to(torch.int64), 0) - 1
    w = g + 2
    flat = torch.zeros((p_bound + 1) * w, dtype=torch.int64, device=dev)
    dump = p_bound * w  # last row: scratch for the writes of non-heads and of out-of-range row-sets
    flat.index_copy_(0, torch.where(used, cid * w, dump) + 2 + slot, order)
    flat.index_copy_(0, torch.where(head, cid * w, dump), s_img)
    flat.index_copy_(0, torch.where(head, cid * w + 1, dump + 1), torch.clamp(en - k, max=g))
    chunks = flat.view(p_bound + 1, w)[:p_bound]
    return order.to(torch.int32), imgtab.to(torch.int32).contiguous(), chunks.to(torch.int32).contiguous()


def _launch_table_kernel(kv_index, m: int, g: int, p_bound: int, perm, simg, imgtab, chunks) -> None:
    """The table kernel into given buffers (PERM, SIMG [N], IMGTAB [M, 2], CHUNKS [>= max(P, 1), 2 + G])."""
    nb = max(16, triton.next_power_of_2(kv_index.numel()))
    _rowset_table_kernel[(1,)](kv_index, kv_index.numel(), m, p_bound, perm, simg, imgtab, chunks, G=g, NB=nb,
                               num_warps=4 if nb <= 1024 else 8)


def build_rowset_tables(kv_index: torch.Tensor, m: int, g: int, force_torch: bool = False):
    """(PERM [N], IMGTAB [M, 2], CHUNKS [P, 2 + G], P) for kv_index int64 [N].

    Values outside [0, M) are tolerated without touching memory out of bounds: such row-sets are in no
    chunk and no image's range (the kernels then neither read nor write their rows); the public op
    rejects them before (a ValueError, or a device assert on CUDA)."""
    n = kv_index.numel()
    p_bound = chunk_bound(n, m, g)
    nb = max(16, triton.next_power_of_2(n))
    if force_torch or n > CSR_MAX_ROWSETS or (m + 1) * nb >= 2**31:
        perm, imgtab, chunks = _tables_torch(kv_index, m, g, p_bound)
        return perm, imgtab, chunks, p_bound
    dev = kv_index.device
    perm = torch.empty(n, dtype=torch.int32, device=dev)
    simg = torch.empty(n, dtype=torch.int32, device=dev)
    imgtab = torch.empty(m, 2, dtype=torch.int32, device=dev)
    chunks = torch.empty(max(p_bound, 1), g + 2, dtype=torch.int32, device=dev)
    _launch_table_kernel(kv_index, m, g, p_bound, perm, simg, imgtab, chunks)
    return perm, imgtab, chunks[:p_bound], p_bound
