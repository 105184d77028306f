"""Triton kernels of qformer_attention / cross_attention (kernels/attention.py) against the reference.

CPU (CI): the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) on small, awkward shapes;
every output and gradient is held to the tolerance rule (docs/design.md#the-tolerance-rule) against the float64
reference, with the reference run in fp32 as PyTorch's yardstick. Several tests force block configurations so that the
multi-block paths (online softmax, separate dQ kernel, stacked cross-attention row-sets, long row-sets split in row
blocks) run on tiny shapes. On a machine with CUDA the same tests run on the GPU.

GPU (`pytest -m gpu`): real Q-Former shapes in fp16/bf16 with PyTorch's own computation in that dtype as
the yardstick, determinism, no host sync, torch.compile(fullgraph=True) and CUDA-graph capture.
"""
from __future__ import annotations

import math

import pytest
import torch

from blipfast import ops
from blipfast.kernels import attention as kern
from blipfast.kernels._attention_common import _dropout_keep, _dropout_keep_t, build_rowset_tables, chunk_bound
from blipfast.ops._attention_ref import dropout_keep
from blipfast.ops._philox import dropout_threshold, dropout_words_2d, new_seed
from blipfast.ops.qformer_attention import allowed_mask
from tests.helpers.attention import DEV, IDX, _cfg, _cross_case, _direct_self, _padding, _rand, _run, _self_case
from tests.helpers.runtime import ROOT
from tests.helpers.tolerance import assert_within_torch_error

MODES = ("bidirectional", "causal", "unimodal")


# ----------------------------------------------------------------------------------------------
# self-attention


@pytest.mark.parametrize("pattern", ["none", "ragged", "allpad"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(3, 13, 13, 2, 16, 5), (1, 7, 12, 1, 16, 5)], ids=["full", "suffix"])
def test_self_attention_op(shape, mode, pattern):
    b, lq, lk, h, d, nq = shape
    _self_case(b, lq, lk, h, d, nq, mode, pattern)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nq", [0, 9], ids=["text_only", "queries_only"])
def test_self_attention_all_text_or_all_queries(mode, nq):
    _self_case(2, 9, 9, 1, 16, nq, mode, "ragged" if nq == 0 else "none")


@pytest.mark.parametrize("d", [64, 88])
def test_self_attention_head_dims(d):
    _self_case(2, 10, 10, 1, d, 4, "causal", "ragged")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lq", [40, 21], ids=["full", "suffix"])
def test_self_attention_multi_block(mode, lq):
    """Keys over three BLOCK_N tiles: online softmax, the separate dQ kernel, key blocks masked per mode."""
    _direct_self(2, lq, 40, 2, 16, 8, mode, "ragged", _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16))


@pytest.mark.parametrize("mode", MODES)
def test_self_attention_packed_heads_and_row_blocks(mode):
    """Two heads per program and rows split over row blocks, with all keys in one tile (fused backward)."""
    _direct_self(2, 24, 24, 4, 16, 6, mode, "allpad", _cfg(16, 32, hpp=2))


def test_self_attention_strided_views():
    """q/k/v as unbind() of a fused [B, L, 3, H, D] projection: strides are honoured, nothing is copied."""
    b, l, h, d = 2, 11, 2, 16
    qkv = _rand(b, l, 3, h, d)
    kpm = _padding("ragged", b, l, 4)
    do = _rand(b, l, h, d)
    kw = dict(num_query=4, mode="causal", key_padding_mask=kpm, backend="triton")
    strided = _run(lambda x: ops.qformer_attention(*x.unbind(2), **kw), (qkv,), do)
    contig = _run(lambda q, k, v: ops.qformer_attention(q, k, v, **kw), [t.contiguous() for t in qkv.unbind(2)], do)
    assert torch.equal(strided[0], contig[0])
    assert torch.equal(strided[1][0], torch.stack(contig[1], 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_self_attention_half_precision(dtype):
    _self_case(2, 12, 12, 2, 16, 5, "causal", "ragged", dtype=dtype, lowp="lowp")


# ----------------------------------------------------------------------------------------------
# cross-attention


@pytest.mark.parametrize("pattern", ["none", "ragged", "allpad"])
def test_cross_attention_shared_kv(pattern):
    """kv_index with repeats and unused images: dK/dV sum over row-sets, unused images get zeros."""
    kv_index = torch.tensor(IDX, device=DEV)
    (out, (dq, dk, dv)), _ = _cross_case(7, 5, 6, 37, 2, 16, kv_index, pattern)
    assert dk[[2, 4]].abs().max() == 0 and dv[[2, 4]].abs().max() == 0
    if pattern == "allpad":  # image 0 has no key: its row-sets output 0 and get no gradient
        rows = (kv_index == 0).nonzero().flatten()
        assert out[rows].abs().max() == 0 and dq[rows].abs().max() == 0


def test_cross_attention_without_index():
    _cross_case(3, 3, 5, 20, 2, 16, None, "ragged")


@pytest.mark.parametrize("config", [
    _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16),  # 2 row-sets per tile, 3 key blocks, separate dQ kernel
    _cfg(32, 16, DQ_BLOCK_M=32, DQ_BLOCK_N=32),  # 5 row-sets per tile
    _cfg(16, 64, hpp=2),  # all keys in one tile: fused backward, 2 heads per program
], ids=["g2_multiblock", "g5_multiblock", "fused_hpp2"])
def test_cross_attention_tilings(config):
    _cross_case(7, 5, 6, 37, 2, 16, torch.tensor(IDX, device=DEV), "ragged", config=config)


def test_cross_attention_long_rowsets():
    """Lq > BLOCK_M with kv_index: one row-set per tile, split over row blocks."""
    _cross_case(5, 3, 20, 23, 1, 16, torch.tensor([2, 0, 2, 2, 0], device=DEV), "ragged",
                config=_cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16))


def test_cross_attention_default_multiblock_and_head_dim():
    """Default configuration with keys over two 64-wide blocks and head dim 88."""
    _cross_case(4, 2, 8, 70, 1, 88, torch.tensor([1, 1, 0, 1], device=DEV), "ragged")


def test_cross_attention_strided_views():
    n, m, lq, lk, h, d = 4, 2, 5, 19, 2, 16
    qb = _rand(n, lq, h, 2 * d)  # q is a view of it with a padded head stride
    kv = _rand(m, lk, 2, h, d)
    idx = torch.tensor([1, 0, 1, 1], device=DEV)
    do = _rand(n, lq, h, d)
    kw = dict(kv_index=idx, backend="triton")
    strided = _run(lambda qb, kv: ops.cross_attention(qb[..., :d], *kv.unbind(2), **kw), (qb, kv), do)
    contig = _run(lambda q, k, v: ops.cross_attention(q, k, v, **kw),
                  (qb[..., :d].contiguous(), *[t.contiguous() for t in kv.unbind(2)]), do)
    assert torch.equal(strided[0], contig[0])
    assert torch.equal(strided[1][0][..., :d], contig[1][0]) and strided[1][0][..., d:].abs().max() == 0
    assert torch.equal(strided[1][1], torch.stack(contig[1][1:], 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cross_attention_half_precision(dtype):
    _cross_case(5, 3, 8, 29, 2, 16, torch.tensor([2, 0, 2, 2, 0], device=DEV), "ragged", dtype=dtype, lowp="lowp")


@pytest.mark.parametrize("force_torch", [False, True], ids=["triton", "torch"])
def test_rowset_tables(force_torch):
    """The device CSR: PERM is a stable sort by image, IMGTAB its ranges, CHUNKS cover every row-set once."""
    m, g = 9, 3
    kv_index = torch.randint(0, m, (40,), device=DEV)
    kv_index[:5] = 4  # a popular image
    perm, imgtab, chunks, p = build_rowset_tables(kv_index, m, g, force_torch=force_torch)
    want = torch.argsort(kv_index.cpu(), stable=True)
    assert torch.equal(perm.long().cpu(), want)
    counts = torch.bincount(kv_index.cpu(), minlength=m)
    ends = torch.cumsum(counts, 0)
    assert torch.equal(imgtab[:, 1].long().cpu() - imgtab[:, 0].long().cpu(), counts)
    assert torch.equal(imgtab[counts > 0, 1].long().cpu(), ends[counts > 0])
    assert p == chunk_bound(40, m, g) and chunks.shape == (p, g + 2)
    ch = chunks.long().cpu()
    seen = []
    for img, cnt, *ids in ch.tolist():
        assert 0 <= cnt <= g
        seen += ids[:cnt]
        assert all(kv_index[i].item() == img for i in ids[:cnt])
    assert sorted(seen) == list(range(40)) and seen == want.tolist()
    if not force_torch:
        assert all(ids[cnt:] == [0] * (g - cnt) for _, cnt, *ids in ch.tolist() if cnt > 0)
    real = int((ch[:, 1] > 0).sum())
    assert (ch[real:, 1] == 0).all() and real == int(((counts + g - 1) // g).sum())


def test_kernels_compile_for_sm90():
    """The default configurations of the headline shapes compile for sm_90 (Triton's bundled ptxas, no
    GPU needed) within the shared-memory limit: what the interpreter cannot check."""
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    root = str(ROOT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(root, "tests", "gpu", "aot_compile_attention.py"),
                        "--only", "self L=32+32 mode1 p=0.1 bf16,cross Lk=257 p=0.0 bf16"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 kernels compiled for sm_90, 0 failure(s)" in r.stdout, r.stdout[-2000:]


# ----------------------------------------------------------------------------------------------
# dropout


def _onehot_v(groups, lk, h, d):
    """V whose key j is the unit vector e_j: the output row then IS the row of dropped probabilities."""
    v = torch.zeros(groups, lk, h, d, device=DEV)
    v[:, torch.arange(lk), :, torch.arange(lk)] = 1.0
    return v


@pytest.mark.parametrize("lk", [16, 13])
@pytest.mark.parametrize("mode", MODES)
def test_dropout_mask_is_the_reference_mask(mode, lk):
    """The kernel drops exactly the (b, h, i, j) that the Philox rule drops, layout as the reference."""
    b, lq, h, nq, p = 2, 10, 2, 4, 0.3
    q, k, v = _rand(b, lq, h, 16), _rand(b, lk, h, 16), _onehot_v(b, lk, h, 16)
    seed = torch.tensor([2**40 + 12345], dtype=torch.int64, device=DEV)
    out = ops.qformer_attention(q, k, v, num_query=nq, mode=mode, dropout_p=p, seed=seed, backend="triton")
    allowed = allowed_mask(nq, mode, lq, lk, DEV)[:, None]  # [1, 1, Lq, Lk]
    keep = dropout_keep(seed, b, h, lq, lk, p, DEV)
    got = out.permute(0, 2, 1, 3)[..., :lk] != 0  # [B, H, Lq, Lk]
    assert torch.equal(got, keep & allowed)


def test_dropout_mask_cross_attention_and_statistics():
    n, m, lq, lk, h, p = 6, 3, 8, 16, 2, 0.25
    idx = torch.tensor([2, 0, 2, 1, 2, 0], device=DEV)
    q, k, v = _rand(n, lq, h, 16), _rand(m, lk, h, 16), _onehot_v(m, lk, h, 16)
    seed = torch.tensor([-(2**62) + 77], dtype=torch.int64, device=DEV)  # negative seeds follow the same rule
    out = ops.cross_attention(q, k, v, kv_index=idx, dropout_p=p, seed=seed, backend="triton")
    keep = dropout_keep(seed, n, h, lq, lk, p, DEV)
    got = out.permute(0, 2, 1, 3)[..., :lk] != 0
    assert torch.equal(got, keep)
    # kept probabilities are rescaled by 1 / (1 - p): each row of the output sums to (kept mass) / (1 - p)
    def kept_mass(q, k, v):  # no dropout: the probabilities themselves, summed over the kept keys
        ref = ops.cross_attention_ref(q, k, v, kv_index=idx)
        return (ref.permute(0, 2, 1, 3)[..., :lk] * keep).sum(-1) / (1 - p)

    assert_within_torch_error(out.sum(-1).permute(0, 2, 1), kept_mass(q.double(), k.double(), v.double()),
                              kept_mass(q, k, v), name="rescale")
    # statistics over all elements: the keep rate is 1 - p within 5 standard deviations
    total = got.numel()
    rate = got.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / total)


@pytest.mark.parametrize("case", [
    ("self", 2, 13, 13, _cfg(16, 16)),  # all keys in one tile: fused dQ/dK/dV kernel
    ("self", 1, 37, 37, _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16)),  # 3 key blocks, 3 row blocks, dQ kernel
    ("cross", 6, 5, 37, _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16)),  # 3 row-sets stacked per tile, 3 key blocks
    ("cross", 6, 5, 13, _cfg(16, 16)),  # stacked row-sets, one key tile
], ids=["self_fused", "self_multiblock", "cross_stacked_multiblock", "cross_stacked_fused"])
def test_dropout_masks_forward_and_backward_bit_for_bit(case):
    """Forward and backward masks of every kernel against the reference's, bit for bit. q = 0 makes the
    probabilities uniform (1 / Lk, every key allowed), V[j] = e_j makes out[n, i, h, j] = P'[n, h, i, j] and
    dO[n, i, h] = e_(n * Lq + i) makes dV[img(n), j, h, n * Lq + i] = P'[n, h, i, j] (P' the dropped, rescaled
    probabilities): the dkdv kernel's transposed S^T masks, stacked row-sets included."""
    kind, n, lq, lk, cfg = case
    h, p = 2, 0.35
    idx = torch.tensor([2, 0, 2, 1, 2, 0], device=DEV)[:n] if kind == "cross" else None
    m = 3 if kind == "cross" else n
    d = max(lk, n * lq)
    q = torch.zeros(n, lq, h, d, device=DEV)
    k = _rand(m, lk, h, d)
    v = torch.zeros(m, lk, h, d, device=DEV)
    v[:, torch.arange(lk), :, torch.arange(lk)] = 1.0
    do = torch.zeros(n, lq, h, d, device=DEV)
    for r in range(n):
        do[r, torch.arange(lq), :, r * lq + torch.arange(lq)] = 1.0
    seed = torch.tensor([2**45 + 2024], dtype=torch.int64, device=DEV)
    scale = 0.125
    if kind == "self":
        out, lse = kern.qformer_attention_fwd(q, k, v, None, seed, 0, "bidirectional", p, scale, config=cfg)
        _, _, dv = kern.qformer_attention_bwd(do, q, k, v, out, lse, None, seed, 0, "bidirectional", p, scale,
                                              config=cfg)
        img = list(range(n))
    else:
        out, lse = kern.cross_attention_fwd(q, k, v, idx, None, seed, p, scale, config=cfg)
        _, _, dv = kern.cross_attention_bwd(do, q, k, v, out, lse, idx, None, seed, p, scale, config=cfg)
        img = idx.tolist()
    keep = dropout_keep(seed, n, h, lq, lk, p, DEV)  # [N, H, Lq, Lk]
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(out.permute(0, 2, 1, 3)[..., :lk] != 0, keep), "forward mask"
    assert (out[..., lk:] == 0).all()
    want = torch.zeros(m, lk, h, d, dtype=torch.bool, device=DEV)
    for r in range(n):
        want[img[r], :, :, r * lq:(r + 1) * lq] = keep[r].permute(2, 0, 1)  # [Lk, H, Lq]
    assert torch.equal(dv != 0, want), "backward (dV) mask"
    # the kept values are exactly the rescaled uniform probability
    pr = (1.0 / lk) / (1.0 - p)
    assert torch.allclose(dv[want], torch.full_like(dv[want], pr), rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", [
    _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16),
    _cfg(32, 16, DQ_BLOCK_M=32, DQ_BLOCK_N=32),
    _cfg(16, 64, hpp=2),
], ids=["g2_multiblock", "g5_multiblock", "fused_hpp2"])
def test_dropout_cross_attention_tilings(config):
    """Outputs and all gradients with dropout equal the reference's (same seed) on every cross tiling."""
    seed = torch.tensor([-(2**50) + 9], dtype=torch.int64, device=DEV)
    _cross_case(7, 5, 6, 37, 2, 16, torch.tensor(IDX, device=DEV), "ragged", dropout_p=0.25, seed=seed,
                config=config)


_KEEP_KERNEL = None


def _keep_kernel():
    """A kernel that writes _dropout_keep / _dropout_keep_t of a [rows, Lk] view tile by tile."""
    global _KEEP_KERNEL
    if _KEEP_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def keep_kernel(SEED, OUT, OUTT, rows, Lk, threshold, BM: tl.constexpr, BN: tl.constexpr,
                        OFFS64: tl.constexpr):
            seed = tl.load(SEED)
            r = tl.arange(0, BM)
            rowgrp = r.to(tl.int64) * ((Lk + 3) // 4)
            if not OFFS64:
                rowgrp = rowgrp.to(tl.int32)
            for j0 in range(0, Lk, BN):
                j = j0 + tl.arange(0, BN)
                m = (r < rows)[:, None] & (j < Lk)[None, :]
                keep = _dropout_keep(seed, rowgrp, j0, threshold, BN)
                tl.store(OUT + r[:, None] * Lk + j[None, :], keep.to(tl.int8), mask=m)
                keep_t = _dropout_keep_t(seed, rowgrp, j0, threshold, BN)
                tl.store(OUTT + r[None, :] * Lk + j[:, None], keep_t.to(tl.int8), mask=tl.trans(m))

        _KEEP_KERNEL = keep_kernel
    return _KEEP_KERNEL


@pytest.mark.parametrize("rows,lk,bn", [(5, 13, 4), (7, 16, 16), (3, 37, 16), (16, 257, 32), (4, 9, 2), (4, 9, 1)])
def test_dropout_keep_helper_every_tile_width(rows, lk, bn):
    """The kernels' mask helper (interleaved randint4x words for BLOCK_N % 4 == 0, a per-element fallback
    otherwise; transposed variant too) equals the rule of ops/_philox.py, int32 and int64 counters."""
    p = 0.4
    seed = torch.tensor([-(2**62) + 12345], dtype=torch.int64, device=DEV)
    want = (dropout_words_2d(seed, rows, lk, DEV) >> 8) >= dropout_threshold(p)
    for offs64 in (False, True):
        out = torch.zeros(rows, lk, dtype=torch.int8, device=DEV)
        out_t = torch.zeros_like(out)
        _keep_kernel()[(1,)](seed, out, out_t, rows, lk, dropout_threshold(p), BM=16 if rows <= 16 else 32, BN=bn,
                             OFFS64=offs64)
        assert torch.equal(out.bool(), want), offs64
        assert torch.equal(out_t.bool(), want), offs64


@pytest.mark.parametrize("mode", ["causal", "unimodal"])
def test_dropout_forward_backward_consistency(mode):
    """Same seed: forward and all gradients equal the reference's (whose backward regenerates the mask)."""
    seed = torch.tensor([31337], dtype=torch.int64, device=DEV)
    _self_case(2, 9, 14, 2, 16, 4, mode, "ragged", dropout_p=0.2, seed=seed)
    _cross_case(5, 3, 6, 21, 2, 16, torch.tensor([1, 1, 0, 2, 1], device=DEV), "ragged", dropout_p=0.2, seed=seed)


@pytest.mark.parametrize("l,cfg", [(12, _cfg(16, 16)), (37, _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16))],
                         ids=["one_tile", "multiblock"])
def test_dropout_64bit_offsets_give_the_same_mask(l, cfg):
    """Above 2**31 counters the kernels switch to int64 Philox counters; forced here on a small problem
    (forward and backward, with all keys in one tile and over several key blocks)."""
    q, k, v, do = (_rand(2, l, 2, 16) for _ in range(4))
    seed = torch.tensor([5], dtype=torch.int64, device=DEV)
    res = []
    for o in (False, True):
        c = {**cfg, "OFFS64": o}
        out, lse = kern.qformer_attention_fwd(q, k, v, None, seed, 4, "causal", 0.3, 0.25, config=c)
        res.append((out, *kern.qformer_attention_bwd(do, q, k, v, out, lse, None, seed, 4, "causal", 0.3, 0.25,
                                                     config=c)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_dropout_64bit_counter_threshold():
    """The kernels' int32/int64 switch counts Philox counters: rows * ceil(Lk / 4) (not elements)."""
    def geom(lq, lk):
        return kern._Geom(1, 1, 1, lq, lk, 16, 0, 0, 0, False, 0.1, 1.0, torch.float16)

    assert not geom(2**29, 4).offs64  # 2**29 counters (2**31 elements)
    assert not geom(2**29 - 1, 13).offs64  # 4 * (2**29 - 1) counters
    assert geom(2**29, 13).offs64 and geom(2**29, 16).offs64  # 2**31 counters


def test_dropout_multi_block_and_seed_handling():
    _direct_self(2, 20, 36, 2, 16, 6, "causal", "ragged", _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16),
                 dropout_p=0.15)
    q, k, v = _rand(2, 12, 2, 16), _rand(2, 12, 2, 16), _rand(2, 12, 2, 16)
    kw = dict(num_query=4, mode="bidirectional", dropout_p=0.3, backend="triton")
    torch.manual_seed(5)
    a = ops.qformer_attention(q, k, v, **kw)
    torch.manual_seed(5)
    s = new_seed(DEV)  # the seed the op draws from torch's RNG
    b = ops.qformer_attention(q, k, v, seed=s, **kw)
    assert torch.equal(a, b), "a seed drawn from torch's RNG makes the op reproducible"
    c = ops.qformer_attention(q, k, v, seed=s + 1, **kw)
    assert not torch.equal(b, c), "another seed must give another mask"
    with pytest.raises(ValueError, match="seed"):
        kern.qformer_attention_fwd(q, k, v, None, None, 4, "causal", 0.3, 0.25)


# ----------------------------------------------------------------------------------------------
# GPU: real shapes in fp16 / bf16, determinism, no host sync, torch.compile, CUDA graphs

GPU_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def _itm_index(b):
    """ITM pattern: 3B row-sets over B images: [positives, a negative image per text, positives]."""
    neg = (torch.arange(b, device=DEV) + torch.randint(1, b, (b,), device=DEV)) % b
    return torch.cat([torch.arange(b, device=DEV), neg, torch.arange(b, device=DEV)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [32, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_self_attention_real_shapes(dtype, mode, t, p):
    seed = torch.tensor([1234], dtype=torch.int64, device=DEV) if p > 0 else None
    _self_case(24, 32 + t, 32 + t, 12, 64, 32, mode, "ragged", dtype=dtype, dropout_p=p, seed=seed, lowp="lowp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_self_attention_itg_and_head_dim_88(dtype):
    _self_case(24, 32, 64, 12, 64, 32, "causal", "ragged", dtype=dtype, lowp="lowp")  # ITG over cached query K/V
    _self_case(8, 64, 64, 16, 88, 32, "unimodal", "allpad", dtype=dtype, lowp="lowp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("lk", [257, 677])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_cross_attention_real_shapes(dtype, lk, p):
    seed = torch.tensor([99], dtype=torch.int64, device=DEV) if p > 0 else None
    idx = _itm_index(16)
    _cross_case(48, 16, 32, lk, 12, 64, idx, "none", dtype=dtype, dropout_p=p, seed=seed, lowp="lowp")
    _cross_case(16, 16, 32, lk, 12, 64, None, "ragged", dtype=dtype, lowp="lowp")


@pytest.mark.gpu
def test_gpu_fp32_and_tilings():
    _self_case(16, 64, 64, 12, 64, 32, "causal", "ragged")
    _self_case(4, 96, 96, 8, 88, 32, "unimodal", "ragged")
    _self_case(2, 300, 300, 4, 64, 32, "causal", "ragged", dtype=torch.bfloat16, lowp="lowp")  # multi-block
    _cross_case(48, 16, 32, 257, 12, 64, _itm_index(16), "ragged")
    for cfg in (None, _cfg(64, 32), _cfg(32, 64, DQ_BLOCK_M=32, DQ_BLOCK_N=64)):
        _cross_case(30, 7, 32, 257, 4, 64, torch.randint(0, 7, (30,), device=DEV), "ragged",
                    dtype=torch.bfloat16, lowp="lowp", config=cfg)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_sync_free():
    bf = torch.bfloat16
    idx = _itm_index(32)
    q, k, v = _rand(96, 32, 12, 64, dtype=bf), _rand(32, 257, 12, 64, dtype=bf), _rand(32, 257, 12, 64, dtype=bf)
    x = _rand(96, 64, 3, 12, 64, dtype=bf)
    do = _rand(96, 32, 12, 64, dtype=bf)
    kpm = _padding("ragged", 96, 64, 32)

    def cross(seed=None):
        return _run(lambda q, k, v: ops.cross_attention(q, k, v, kv_index=idx, dropout_p=0.1, seed=seed), (q, k, v), do)

    def self_attn():
        return _run(lambda x: ops.qformer_attention(*x.unbind(2), num_query=32, mode="causal", key_padding_mask=kpm,
                                                    dropout_p=0.1), (x,), do.repeat(1, 2, 1, 1))

    cross(), self_attn()  # first calls tune the block sizes (timing syncs); cached afterwards
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cross(), self_attn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    seed0 = torch.zeros(1, dtype=torch.int64, device=DEV)
    a, b = cross(seed0), cross(seed0)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert torch.equal(ga, gb), "dK/dV of shared images must be bitwise reproducible"


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """Compiled and eager run the same deterministic kernels on the same inputs with the same upstream
    gradients (the compiler only adds the views, the contiguous copy and the sum of a's two gradient
    contributions, which eager autograd does too, rounded once to bf16 either way): bit for bit."""
    b, t = 8, 32
    x = _rand(b, 32 + t, 3, 12, 64, dtype=torch.bfloat16)
    img_kv = _rand(4, 257, 2, 12, 64, dtype=torch.bfloat16)
    idx = torch.tensor([0, 1, 2, 3, 1, 1, 0, 2], device=DEV)
    kpm = _padding("ragged", b, 32 + t, 32)
    da, dc = _rand(b, 32 + t, 12, 64, dtype=torch.bfloat16), _rand(b, 32, 12, 64, dtype=torch.bfloat16)

    def f(x, img_kv):
        q, k, v = x.unbind(2)
        a = ops.qformer_attention(q, k, v, num_query=32, mode="causal", key_padding_mask=kpm)
        c = ops.cross_attention(a[:, :32].contiguous(), *img_kv.unbind(2), kv_index=idx)
        return a, c

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, img_kv)]
        a, c = fn(*leaves)
        torch.autograd.backward([a, c], [da, dc])
        return (a.detach(), c.detach(), *[t.grad for t in leaves])

    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for name, c, e in zip(("a", "c", "dx", "d img_kv"), compiled, eager):
        assert torch.equal(c, e), f"{name}: compiled differs from eager by {(c.double() - e.double()).abs().max()}"


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    q, k, v = (_rand(16, 64, 12, 64, dtype=torch.bfloat16) for _ in range(3))
    qc, kc, vc = _rand(24, 32, 12, 64, dtype=torch.bfloat16), *(_rand(8, 257, 12, 64, dtype=torch.bfloat16)
                                                                 for _ in range(2))
    idx = _itm_index(8)
    kpm = _padding("ragged", 16, 64, 32)
    seed = torch.tensor([3], dtype=torch.int64, device=DEV)
    scale = 0.125

    def step():
        o, lse = kern.qformer_attention_fwd(q, k, v, kpm, seed, 32, "causal", 0.1, scale)
        g = kern.qformer_attention_bwd(o, q, k, v, o, lse, kpm, seed, 32, "causal", 0.1, scale)
        oc, lc = kern.cross_attention_fwd(qc, kc, vc, idx, None, seed, 0.1, scale)
        gc = kern.cross_attention_bwd(oc, qc, kc, vc, oc, lc, idx, None, seed, 0.1, scale)
        return (o, *g, oc, *gc)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", ["none", "ragged"])
@pytest.mark.parametrize("shape", [(3, 21, 21, 2, 16, 5), (2, 8, 21, 1, 16, 5)], ids=["full", "suffix"])
def test_self_attention_itc_itg(shape, pattern):
    """ITC + ITG in one pass ([queries | text | text]): the kernels against the float64 reference."""
    b, lq, lk, h, d, nq = shape
    _self_case(b, lq, lk, h, d, nq, "itc_itg", pattern)


def test_self_attention_itc_itg_multi_block_with_dropout():
    _direct_self(2, 37, 37, 2, 16, 5, "itc_itg", "ragged", _cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16), dropout_p=0.2)
