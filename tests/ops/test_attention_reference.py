"""The attention references (qformer_attention, cross_attention; backend "torch" and the *_ref functions)
against formulations written here: masks from the table of docs/semantics.md#stage-1-attention-masks by explicit loops,
attention by F.scaled_dot_product_attention or an explicit float64 softmax, dropout masks from the pure-Python
Philox of tests/helpers/philox.py (the four words of a call serve four adjacent keys of a row)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import cross_attention, cross_attention_ref, qformer_attention, qformer_attention_ref
from tests.helpers.philox import philox_words
from tests.helpers.tolerance import assert_close as _assert_close
from tests.helpers.tolerance import assert_within_torch_error as _assert_within_torch_error

F64 = torch.float64
MODES = ("bidirectional", "causal", "unimodal")


# ----------------------------------------------------------------------------------------------
# independent formulations


def spec_allowed(mode: str, nq: int, lq: int, lk: int, kpm, batch: int) -> torch.Tensor:
    """bool [B, Lq, Lk] straight from the table of docs/semantics.md#stage-1-attention-masks. Row r is position
    i = Lk - Lq + r of the sequence; kpm [B, Lk] (true = attend) pads any key, query keys included
    (docs/ops.md#qformer_attention)."""
    keep = [[True] * lk for _ in range(batch)] if kpm is None else (kpm != 0).tolist()
    out = []
    for b in range(batch):
        rows = []
        for r in range(lq):
            i = lk - lq + r
            row = []
            for j in range(lk):
                pad = not keep[b][j]
                if mode == "bidirectional":
                    a = not pad
                elif mode == "causal":
                    a = (j < nq) if i < nq else (j < nq or (nq <= j <= i and not pad))
                elif mode == "unimodal":
                    a = (j < nq) if i < nq else (nq <= j and not pad)
                elif mode == "itc_itg":  # [queries | ITC text | ITG text], SPEC's unimodal and causal rows
                    t = (lk - nq) // 2
                    if i < nq:
                        a = j < nq
                    elif i < nq + t:
                        a = nq <= j < nq + t
                    else:
                        a = j < nq or nq + t <= j <= i
                else:
                    raise AssertionError(mode)
                row.append(a and not pad)
            rows.append(row)
        out.append(rows)
    return torch.tensor(out, dtype=torch.bool).view(batch, lq, lk)


def indep_attention(q, k, v, allowed, scale=None, keep=None, p=0.0):
    """q [B, Lq, H, D], k/v [B, Lk, H, D], allowed [B, Lq, Lk] -> [B, Lq, H, D]; a row with no allowed
    key gives 0. ``keep`` [B, H, Lq, Lk] applies inverted dropout to the probabilities (explicit softmax);
    without it the attention is F.scaled_dot_product_attention."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    has = allowed.any(-1)  # [B, Lq]
    attend = (allowed | ~has[..., None])[:, None]  # an empty row attends everywhere and is zeroed below
    if keep is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attend, scale=scale)
    else:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (qt @ kt.transpose(-1, -2)) * scale
        s = s.masked_fill(~attend, float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        probs = e / e.sum(-1, keepdim=True)
        out = (probs * keep.to(q.dtype) / (1.0 - p)) @ vt
    return (out * has[:, None, :, None].to(out.dtype)).transpose(1, 2)


def attn_dropout_word(seed: int, b: int, h: int, i: int, j: int, heads: int, lq: int, lk: int) -> int:
    """Element (b, h, i, j) is element (row, j) of the [B * H * Lq, Lk] view, row = (b*H + h)*Lq + i: word
    j % 4 of the Philox draw with counter row * ceil(Lk / 4) + j // 4."""
    row = (b * heads + h) * lq + i
    return philox_words(seed, row * ((lk + 3) // 4) + j // 4)[j % 4]


def indep_keep(seed: int, shape, p: float) -> torch.Tensor:
    """Dropout keep-mask [B, H, Lq, Lk] of ``attn_dropout_word``: kept iff (word >> 8) >= round_half_up(p * 2^24)."""
    thr = int((Fraction(p) * 2**24 + Fraction(1, 2)).__floor__())
    b, h, lq, lk = shape
    return torch.tensor([(attn_dropout_word(seed, bb, hh, i, j, h, lq, lk) >> 8) >= thr
                         for bb in range(b) for hh in range(h) for i in range(lq) for j in range(lk)]).view(shape)


def make_kpm(kind: str, batch: int, lk: int, nq: int) -> torch.Tensor | None:
    """none: None; ragged: random text padding (b=0 none, b=1 every text key padded); allpad: ragged and
    b=2 with every key padded, queries included."""
    if kind == "none":
        return None
    kpm = torch.ones(batch, lk, dtype=torch.bool)
    kpm[:, nq:] = torch.rand(batch, lk - nq) > 0.4
    kpm[0] = True
    kpm[1, nq:] = False
    if kind == "allpad":
        kpm[2] = False
    return kpm


def assert_close(a, b, **kw):
    _assert_close(a.detach(), b.detach(), **kw)


def assert_within_torch_error(fast, ref64, lowp, **kw):
    _assert_within_torch_error(fast.detach(), ref64.detach(), lowp.detach(), **kw)


def rand(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


# ----------------------------------------------------------------------------------------------
# qformer_attention


CONFIGS = [  # (Lq, Lk, num_query)
    (13, 13, 5),  # full pass
    (13, 13, 0),  # text only (num_query = 0)
    (13, 13, 13),  # queries only (num_query = Lk)
    (7, 12, 5),  # ITG: rows are the last Lq = T positions of Lk = Q + T
    (3, 12, 10),  # Lq < Lk with the first row still a query row
]


@pytest.mark.parametrize("d", [64, 88])
@pytest.mark.parametrize("pad", ["none", "ragged", "allpad"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"lq{c[0]}-lk{c[1]}-nq{c[2]}")
@pytest.mark.parametrize("mode", MODES)
def test_qformer_attention_matches_spec(mode, cfg, pad, d):
    lq, lk, nq = cfg
    b, h = 3, 2
    q, k, v = rand(b, lq, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    kpm = make_kpm(pad, b, lk, nq)
    allowed = spec_allowed(mode, nq, lq, lk, kpm, b)
    empty = ~allowed.any(-1)  # [B, Lq]
    if pad == "allpad":
        assert empty[2].all()
    want = indep_attention(q, k, v, allowed)
    got_op = qformer_attention(q, k, v, num_query=nq, mode=mode, key_padding_mask=kpm, backend="torch")
    got_ref = qformer_attention_ref(q, k, v, num_query=nq, mode=mode, key_padding_mask=kpm)
    assert got_op.dtype == F64 and got_op.shape == (b, lq, h, d)
    assert_close(got_op, want, name="qformer_attention")
    assert_close(got_ref, want, name="qformer_attention_ref")
    assert (got_op[empty] == 0).all() and (got_ref[empty] == 0).all()

    g = torch.randn_like(want)
    gw = grads(want, (q, k, v), g)
    for label, out in (("op", got_op), ("ref", got_ref)):
        gg = grads(out, (q, k, v), g)
        for name, a, e in zip("qkv", gg, gw):
            assert torch.isfinite(a).all(), f"{label} d{name}"
            assert_close(a, e, name=f"{label} d{name}")
        assert (gg[0][empty] == 0).all(), f"{label}: an empty row got a gradient"


def test_qformer_attention_explicit_scale_and_mask_dtypes():
    b, lq, lk, h, d, nq = 3, 9, 9, 2, 64, 4
    q, k, v = rand(b, lq, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    kpm = make_kpm("ragged", b, lk, nq)
    allowed = spec_allowed("causal", nq, lq, lk, kpm, b)
    want = indep_attention(q, k, v, allowed, scale=0.3)
    for mask in (kpm, kpm.to(torch.int64), kpm.to(torch.uint8), kpm.to(torch.float32)):
        got = qformer_attention(q, k, v, num_query=nq, mode="causal", key_padding_mask=mask, scale=0.3, backend="torch")
        assert_close(got, want, name=f"mask {mask.dtype}")


def test_modes_differ():
    """Guard against a vacuous table: the three masks differ on a full pass with queries and text."""
    masks = [spec_allowed(m, 4, 10, 10, None, 1) for m in MODES]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    q, k, v = rand(1, 10, 2, 64, grad=False), rand(1, 10, 2, 64, grad=False), rand(1, 10, 2, 64, grad=False)
    outs = [qformer_attention(q, k, v, num_query=4, mode=m) for m in MODES]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_itg_pass_equals_text_rows_of_full_causal_pass():
    b, h, d, nq, t = 3, 2, 64, 6, 9
    lk = nq + t
    q, k, v = rand(b, lk, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[:, nq + 1:] = torch.rand(b, t - 1) > 0.3  # [CLS]/[DEC] never padded
    kpm[2, nq + 4:] = False
    full = qformer_attention(q, k, v, num_query=nq, mode="causal", key_padding_mask=kpm, backend="torch")
    itg = qformer_attention(q[:, nq:], k, v, num_query=nq, mode="causal", key_padding_mask=kpm, backend="torch")
    assert_close(itg, full[:, nq:], name="ITG rows")
    # LAVIS' realisation (docs/semantics.md#stage-1-attention-masks): [ones over the Q query keys | lower-triangular
    # over text] x padding
    lavis = torch.cat([torch.ones(t, nq, dtype=torch.bool), torch.tril(torch.ones(t, t, dtype=torch.bool))], dim=1)
    lavis = lavis[None] & kpm[:, None, :]
    assert_close(itg, indep_attention(q[:, nq:], k, v, lavis), name="ITG vs LAVIS mask")
    # with no gradient on the query rows, the full pass and the ITG pass give the same gradients
    g = torch.randn_like(itg)
    d_itg = grads(itg, (q, k, v), g)
    d_full = grads(full, (q, k, v), torch.cat([torch.zeros_like(full[:, :nq]), g], dim=1))
    for name, a, e in zip("qkv", d_itg, d_full):
        assert_close(a, e, name=f"d{name}")


@pytest.mark.parametrize("lq_from", [0, 5])
def test_strided_qkv_views_of_fused_projection(lq_from):
    b, lk, h, d, nq = 2, 11, 3, 64, 5
    fused = rand(b, lk, 3, h, d)
    q, k, v = fused[:, lq_from:, 0], fused[:, :, 1], fused[:, :, 2]
    assert not q.is_contiguous() and q.stride(-1) == 1
    kpm = make_kpm("ragged", b + 1, lk, nq)[1:]
    out = qformer_attention(q, k, v, num_query=nq, mode="unimodal", key_padding_mask=kpm, backend="torch")
    fused2 = fused.detach().clone().requires_grad_()
    qc, kc, vc = (fused2[:, lq_from:, 0].contiguous(), fused2[:, :, 1].contiguous(), fused2[:, :, 2].contiguous())
    want = indep_attention(qc, kc, vc, spec_allowed("unimodal", nq, lk - lq_from, lk, kpm, b))
    assert_close(out, want)
    g = torch.randn_like(out)
    (dfused,) = grads(out, (fused,), g)
    (dwant,) = grads(want, (fused2,), g)
    assert_close(dfused, dwant, name="d fused qkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_qformer_attention_low_precision_within_torch_error(mode, dtype):
    b, lq, lk, h, d, nq = 3, 9, 13, 2, 64, 5
    q64, k64, v64 = rand(b, lq, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    kpm = make_kpm("allpad", b, lk, nq)
    allowed = spec_allowed(mode, nq, lq, lk, kpm, b)
    ref = indep_attention(q64, k64, v64, allowed)
    ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    lowp = indep_attention(ql, kl, vl, allowed)
    qf, kf, vf = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    fast = qformer_attention(qf, kf, vf, num_query=nq, mode=mode, key_padding_mask=kpm, backend="torch")
    assert fast.dtype == dtype
    assert_within_torch_error(fast, ref, lowp, name="out")
    g = torch.randn_like(ref)
    for name, a, e, t in zip("qkv", grads(fast, (qf, kf, vf), g.to(dtype)), grads(ref, (q64, k64, v64), g),
                             grads(lowp, (ql, kl, vl), g.to(dtype))):
        assert_within_torch_error(a, e, t, name=f"d{name}")


# ----------------------------------------------------------------------------------------------
# dropout on the attention probabilities


@pytest.mark.parametrize("lq,lk", [(8, 8), (5, 8), (4, 7), (6, 13)])
def test_qformer_dropout_layout_matches_independent_philox(lq, lk):
    b, h, d, nq, p = 2, 2, 64, 3, 0.3
    seed = int(torch.randint(0, 2**62, ()))
    q, k, v = rand(b, lq, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    kpm = make_kpm("ragged", b, lk, nq)
    allowed = spec_allowed("causal", nq, lq, lk, kpm, b)
    keep = indep_keep(seed, (b, h, lq, lk), p)
    assert 0 < keep.sum() < keep.numel()
    want = indep_attention(q, k, v, allowed, keep=keep, p=p)
    got = qformer_attention(q, k, v, num_query=nq, mode="causal", key_padding_mask=kpm, dropout_p=p, seed=seed,
                            backend="torch")
    ref = qformer_attention_ref(q, k, v, num_query=nq, mode="causal", key_padding_mask=kpm, dropout_p=p,
                                seed=torch.tensor([seed]))
    assert_close(got, want, name="dropout out")
    assert torch.equal(got, ref), "custom op and reference differ under the same seed"
    # the backward regenerates the forward's mask: compare with autograd of the masked formulations
    g = torch.randn_like(want)
    for name, a, e, r in zip("qkv", grads(got, (q, k, v), g), grads(want, (q, k, v), g), grads(ref, (q, k, v), g)):
        assert_close(a, e, name=f"d{name} vs independent")
        assert_close(a, r, name=f"d{name} vs reference autograd")


def _extract_keep(op, p, b, h, l):
    """Recover the dropout keep-mask of one call: q = 0 gives uniform probabilities 1/Lk and v = one-hot
    keys give out[b, i, h, j] = keep[b, h, i, j] / ((1 - p) * Lk)."""
    q = torch.zeros(b, l, h, l, dtype=F64)
    v = torch.eye(l, dtype=F64)[None, :, None, :].expand(b, l, h, l).contiguous()
    out = op(q, torch.randn(b, l, h, l, dtype=F64), v)
    scaled = out * (1.0 - p) * l
    keep = scaled.round()
    assert torch.allclose(scaled, keep, atol=1e-9) and ((keep == 0) | (keep == 1)).all()
    return keep.bool().permute(0, 2, 1, 3)  # [B, H, Lq, Lk]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_qformer_dropout_keep_rate(p):
    b, h, l = 2, 4, 64
    seed = int(torch.randint(0, 2**62, ()))
    keep = _extract_keep(lambda q, k, v: qformer_attention(q, k, v, num_query=0, mode="bidirectional", dropout_p=p,
                                                           seed=seed, backend="torch"), p, b, h, l)
    n = keep.numel()
    kept = int(keep.sum())
    sigma = math.sqrt(n * p * (1 - p))
    # Binomial(n, 1 - p): |kept - n (1 - p)| > 6 sigma has probability < 2e-9
    assert abs(kept - n * (1 - p)) <= 6 * sigma + 1, (kept, n * (1 - p), sigma)
    # and per head (n / H elements each)
    for hh in range(h):
        nh, kh = keep[:, hh].numel(), int(keep[:, hh].sum())
        assert abs(kh - nh * (1 - p)) <= 6 * math.sqrt(nh * p * (1 - p)) + 1
    # the mask is the one of the documented Philox layout, checked on a few elements
    idx = torch.randint(0, n, (40,)).tolist()
    thr = int((Fraction(p) * 2**24 + Fraction(1, 2)).__floor__())
    flat = keep.flatten()
    for o in idx:
        bb, hh, i, j = o // (h * l * l), o // (l * l) % h, o // l % l, o % l
        assert bool(flat[o]) == ((attn_dropout_word(seed, bb, hh, i, j, h, l, l) >> 8) >= thr)


def test_qformer_dropout_seeds():
    b, lq, h, d, p = 2, 10, 2, 64, 0.4
    q, k, v = rand(b, lq, h, d, grad=False), rand(b, lq, h, d, grad=False), rand(b, lq, h, d, grad=False)

    def run(**kw):
        return qformer_attention(q, k, v, num_query=3, mode="unimodal", dropout_p=p, backend="torch", **kw)

    a, a2 = run(seed=11), run(seed=torch.tensor([11]))
    assert torch.equal(a, a2)
    assert not torch.equal(a, run(seed=12)), "different seeds gave the same dropout"
    x, y = run(), run()
    assert not torch.equal(x, y), "two calls without a seed gave the same dropout"
    torch.manual_seed(123)
    x = run()
    torch.manual_seed(123)
    assert torch.equal(x, run()), "torch.manual_seed does not make the unseeded dropout reproducible"
    # dropout_p = 0 ignores the seed
    assert torch.equal(qformer_attention(q, k, v, num_query=3, mode="unimodal", seed=1),
                       qformer_attention(q, k, v, num_query=3, mode="unimodal", seed=2))


# ----------------------------------------------------------------------------------------------
# cross_attention


def indep_cross(q, k, v, kv_index, kpm, keep=None, p=0.0):
    """Explicit gather: row-set n attends over image kv_index[n] (its own padding mask)."""
    n, lq = q.shape[:2]
    lk = k.shape[1]
    outs = []
    for i in range(n):
        m = int(kv_index[i])
        allowed = torch.ones(1, lq, lk, dtype=torch.bool)
        if kpm is not None:
            allowed = allowed & (kpm[m] != 0).view(1, 1, lk)
        outs.append(indep_attention(q[i:i + 1], k[m:m + 1], v[m:m + 1], allowed,
                                    keep=None if keep is None else keep[i:i + 1], p=p))
    return torch.cat(outs)


def indep_cross_grads(q, k, v, kv_index, kpm, g, keep=None, p=0.0):
    """dq, dk, dv: per-row-set gradients of the gathered copies, summed into the images with index_add."""
    dq, dks, dvs = [], [], []
    for i in range(q.shape[0]):
        m = int(kv_index[i])
        qi = q[i:i + 1].detach().requires_grad_()
        ki = k[m:m + 1].detach().clone().requires_grad_()
        vi = v[m:m + 1].detach().clone().requires_grad_()
        out = indep_cross(qi, ki, vi, [0], None if kpm is None else kpm[m:m + 1],
                          keep=None if keep is None else keep[i:i + 1], p=p)
        a, bk, bv = grads(out, (qi, ki, vi), g[i:i + 1])
        dq.append(a), dks.append(bk), dvs.append(bv)
    idx = torch.as_tensor(kv_index, dtype=torch.int64)
    dk = torch.zeros_like(k).index_add_(0, idx, torch.cat(dks))
    dv = torch.zeros_like(v).index_add_(0, idx, torch.cat(dvs))
    return torch.cat(dq), dk, dv


@pytest.mark.parametrize("d", [64, 88])
@pytest.mark.parametrize("pad", ["none", "ragged", "image_all_pad"])
def test_cross_attention_shared_kv(pad, d):
    m, lq, lk, h = 4, 6, 11, 2
    kv_index = torch.tensor([2, 0, 2, 2, 0])  # repeats; images 1 and 3 unused
    n = kv_index.numel()
    q, k, v = rand(n, lq, h, d), rand(m, lk, h, d), rand(m, lk, h, d)
    kpm = None
    if pad != "none":
        kpm = torch.rand(m, lk) > 0.4
        kpm[:, 0] = True
        if pad == "image_all_pad":
            kpm[0] = False  # row-sets 1 and 4 have no key
    want = indep_cross(q, k, v, kv_index, kpm)
    g = torch.randn_like(want)
    dwant = indep_cross_grads(q, k, v, kv_index, kpm, g)
    for idx in (kv_index, kv_index.to(torch.int32)):
        got = cross_attention(q, k, v, kv_index=idx, key_padding_mask=kpm, backend="torch")
        ref = cross_attention_ref(q, k, v, kv_index=kv_index, key_padding_mask=kpm)
        assert got.shape == (n, lq, h, d)
        assert_close(got, want, name="cross_attention")
        assert_close(ref, want, name="cross_attention_ref")
        for label, out in (("op", got), ("ref", ref)):
            dg = grads(out, (q, k, v), g)
            for name, a, e in zip("qkv", dg, dwant):
                assert torch.isfinite(a).all()
                assert_close(a, e, name=f"{label} d{name}")
            assert (dg[1][[1, 3]] == 0).all() and (dg[2][[1, 3]] == 0).all(), "unused images got a gradient"
            if pad == "image_all_pad":
                assert (out[[1, 4]] == 0).all() and (dg[0][[1, 4]] == 0).all()


def test_cross_attention_default_index():
    m, lq, lk, h, d = 3, 5, 17, 2, 64
    q, k, v = rand(m, lq, h, d), rand(m, lk, h, d), rand(m, lk, h, d)
    kpm = torch.rand(m, lk) > 0.3
    kpm[2] = False
    got = cross_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    want = indep_cross(q, k, v, list(range(m)), kpm)
    assert_close(got, want)
    assert (got[2] == 0).all()
    g = torch.randn_like(want)
    for name, a, e in zip("qkv", grads(got, (q, k, v), g), indep_cross_grads(q, k, v, list(range(m)), kpm, g)):
        assert_close(a, e, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_low_precision_within_torch_error(dtype):
    m, lq, lk, h, d = 3, 7, 19, 2, 64
    kv_index = torch.tensor([1, 1, 0, 2])
    q64, k64, v64 = rand(4, lq, h, d), rand(m, lk, h, d), rand(m, lk, h, d)
    kpm = torch.rand(m, lk) > 0.3
    ref = indep_cross(q64, k64, v64, kv_index, kpm)
    ql, kl, vl = (t.detach().to(dtype) for t in (q64, k64, v64))
    lowp = indep_cross(ql, kl, vl, kv_index, kpm)
    fast = cross_attention(ql, kl, vl, kv_index=kv_index, key_padding_mask=kpm, backend="torch")
    assert_within_torch_error(fast, ref, lowp)


def test_cross_attention_dropout():
    m, lq, lk, h, d, p = 3, 4, 6, 2, 64, 0.25
    kv_index = torch.tensor([2, 0, 2, 1])
    n = kv_index.numel()
    seed = int(torch.randint(0, 2**62, ()))
    q, k, v = rand(n, lq, h, d), rand(m, lk, h, d), rand(m, lk, h, d)
    kpm = torch.rand(m, lk) > 0.3
    keep = indep_keep(seed, (n, h, lq, lk), p)  # rows (n*H + h)*Lq + i over the row-sets, Lk = 6: partial groups
    want = indep_cross(q, k, v, kv_index, kpm, keep=keep, p=p)
    got = cross_attention(q, k, v, kv_index=kv_index, key_padding_mask=kpm, dropout_p=p, seed=seed, backend="torch")
    ref = cross_attention_ref(q, k, v, kv_index=kv_index, key_padding_mask=kpm, dropout_p=p, seed=torch.tensor([seed]))
    assert_close(got, want)
    assert torch.equal(got, ref)
    g = torch.randn_like(want)
    dwant = indep_cross_grads(q, k, v, kv_index, kpm, g, keep=keep, p=p)
    for name, a, e, r in zip("qkv", grads(got, (q, k, v), g), dwant, grads(ref, (q, k, v), g)):
        assert_close(a, e, name=f"d{name} vs independent")
        assert_close(a, r, name=f"d{name} vs reference autograd")
    assert not torch.equal(got, cross_attention(q, k, v, kv_index=kv_index, key_padding_mask=kpm, dropout_p=p,
                                                seed=seed + 1))
    x = cross_attention(q, k, v, kv_index=kv_index, dropout_p=p)
    assert not torch.equal(x, cross_attention(q, k, v, kv_index=kv_index, dropout_p=p))


def test_cross_attention_keep_rate():
    p, n, h, l = 0.3, 3, 4, 48
    keep = _extract_keep(lambda q, k, v: cross_attention(q, k, v, dropout_p=p, backend="torch"), p, n, h, l)
    cnt, tot = int(keep.sum()), keep.numel()
    assert abs(cnt - tot * (1 - p)) <= 6 * math.sqrt(tot * p * (1 - p)) + 1


# ----------------------------------------------------------------------------------------------
# itc_itg: ITC's unimodal and ITG's causal masks in one pass over [queries | text | text]


@pytest.mark.parametrize("shape", [(3, 17, 17, 2, 8, 5), (2, 8, 17, 2, 8, 5), (1, 1, 3, 1, 8, 1), (2, 6, 6, 1, 8, 0)],
                         ids=["full", "suffix", "T1", "no_queries"])
def test_itc_itg_mode_matches_spec(shape):
    b, lq, lk, h, d, nq = shape
    q, k, v = (torch.randn(b, n, h, d, dtype=F64) for n in (lq, lk, lk))
    kpm = torch.ones(b, lk, dtype=torch.bool)
    t = (lk - nq) // 2
    if t > 1:
        kpm[0, nq + t - 1] = False  # the last ITC token and its ITG copy are padding
        kpm[0, lk - 1] = False
    out = qformer_attention(q, k, v, num_query=nq, mode="itc_itg", key_padding_mask=kpm, backend="torch")
    want = indep_attention(q, k, v, spec_allowed("itc_itg", nq, lq, lk, kpm, b))
    _assert_close(out, want, F64)


def test_itc_itg_equals_unimodal_and_causal_passes():
    """The packed pass gives the ITC pass' (unimodal) and the ITG pass' (causal over the queries' K/V) rows."""
    b, h, d, nq, t = 2, 2, 8, 4, 5
    qx, kx, vx = (torch.randn(b, nq + 2 * t, h, d, dtype=F64) for _ in range(3))
    tm = torch.ones(b, t, dtype=torch.bool)
    tm[1, 3:] = False
    kpm = torch.cat([torch.ones(b, nq, dtype=torch.bool), tm, tm], 1)
    out = qformer_attention(qx, kx, vx, num_query=nq, mode="itc_itg", key_padding_mask=kpm)
    itc = qformer_attention(qx[:, :nq + t], kx[:, :nq + t], vx[:, :nq + t], num_query=nq, mode="unimodal",
                            key_padding_mask=kpm[:, :nq + t])
    keys = torch.cat([torch.arange(nq), torch.arange(nq + t, nq + 2 * t)])
    itg = qformer_attention(qx[:, nq + t:], kx[:, keys], vx[:, keys], num_query=nq, mode="causal",
                            key_padding_mask=kpm[:, keys])
    _assert_close(out, torch.cat([itc, itg], 1), F64)


def test_itc_itg_needs_two_text_copies():
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(ValueError, match="itc_itg"):
        qformer_attention(q, q, q, num_query=3, mode="itc_itg")
