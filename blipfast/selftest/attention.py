"""Self-test cases of the Triton attention kernels: ``qformer_attention`` in its masking modes and ``cross_attention``
with and without ``kv_index`` (docs/selftest.md).

Each case runs the public op on the backend under test, forward and backward, and holds the output and the three
gradients to the tolerance rule against the float64 reference; PyTorch's own attention in the tested dtype (fp16,
bf16: :func:`lowp_attention`, no upcast; fp32: the reference in fp32) is the yardstick. The dropout cases hold the
seeded outputs and gradients to the same rule (a backward that regenerates another mask than its forward's fails
it) and compare the forward mask bit for bit with the Philox rule (docs/ops.md#dropout): with q = 0 the
probabilities are uniform and with V[j] = e_j the output row IS the row of dropped probabilities.

Quick: the modes at B = 1, odd text lengths, rows that are only text, ragged padding with a sequence (an image)
that has no key at all, Lk = 257 image tokens shared by repeated row-sets, dropout. Full adds the autotuning
buckets (Lk 64, 97 -> 128, 257 and 577, 12 heads, 64 row-sets with 4 per image, row-sets longer than a tile,
head dim 88) and, in fp16 and bf16, every candidate tiling the autotuner may pick for three of them (fp32 has
one), through the kernels' ``config=``.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import ops
from ..ops._attention_ref import dropout_keep
from ..ops.cross_attention import _expand
from ..ops.qformer_attention import allowed_mask
from .case import FULL, Case, Inputs, Measure, equal_count, rule

NAMES = ("out", "dq", "dk", "dv")
IDX = (3, 0, 3, 1, 3, 3, 0)  # repeats; images 2 and 4 unused


def lowp_attention(q, k, v, allowed, scale, dropout_p=0.0, seed=None):
    """PyTorch's own attention in the inputs' dtype (no upcast), [B, L, H, D] with a bool mask [B or 1, Lq, Lk]:
    the yardstick of fp16 / bf16 kernels. A row with no allowed key outputs 0."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    allowed = allowed.unsqueeze(1)
    has = allowed.any(-1, keepdim=True)
    s = torch.where(allowed & has, s, torch.full_like(s, float("-inf")))
    p = torch.softmax(torch.where(has, s, torch.zeros_like(s)), dim=-1).masked_fill(~allowed, 0.0)
    if dropout_p > 0:
        keep = dropout_keep(seed, *p.shape, dropout_p, q.device)
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _run(fn, inputs, grad_out):
    """(output, grads of inputs) of fn(*inputs) backpropagating grad_out."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def _measures(fast, ref64, low, dtype):
    return [rule(n, f, r, lo, dtype) for n, f, r, lo in zip(NAMES, fast, ref64, low)]


def _padding(inp: Inputs, pattern: str, b: int, lk: int, nq: int):
    """None; ragged text lengths (at least half the text kept, the last sequence no text at all); ragged with
    sequence 0 fully padded (no row of it has a key, queries included)."""
    if pattern == "none":
        return None
    kpm = torch.ones(b, lk, dtype=torch.bool, device="cpu")
    t = lk - nq
    for i in range(b):
        keep = int(torch.randint(t // 2, t + 1, (), generator=inp.gen, device="cpu")) if i != b - 1 else 0
        kpm[i, nq + keep:] = False
    if pattern == "allpad":
        kpm[0] = False
    return kpm.to(inp.device)


def _self_case(inp, backend, dtype, b, lq, lk, h, d, nq, mode, pattern, p=0.0, config=None):
    q, k, v = (inp.randn(b, n, h, d, dtype=dtype) for n in (lq, lk, lk))
    kpm = _padding(inp, pattern, b, lk, nq)
    do = inp.randn(b, lq, h, d)
    seed = inp.seed() if p else None
    kw = dict(num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=p, seed=seed)
    if config is None:
        fast = _run(lambda q, k, v: ops.qformer_attention(q, k, v, backend=backend, **kw), (q, k, v), do)
    else:
        fast = _direct(q, k, v, do.to(dtype), config, "qformer_attention", kpm, seed, nq, mode, p, d ** -0.5)
    ref64 = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q.double(), k.double(), v.double()), do)
    if dtype == torch.float32:
        low = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q, k, v), do)
    else:
        allowed = allowed_mask(nq, mode, lq, lk, q.device, kpm)
        low = _run(lambda q, k, v: lowp_attention(q, k, v, allowed, d ** -0.5, p, seed), (q, k, v), do)
    return _measures(fast, ref64, low, dtype)


def _cross_case(inp, backend, dtype, n, m, lq, lk, h, d, index, pattern, p=0.0, config=None):
    q, k, v = inp.randn(n, lq, h, d, dtype=dtype), inp.randn(m, lk, h, d, dtype=dtype), inp.randn(m, lk, h, d,
                                                                                                   dtype=dtype)
    kv_index = None if index is None else torch.tensor(index, device=inp.device)
    kpm = None
    if pattern != "none":
        kpm = inp.rand(m, lk) > 0.3
        if pattern == "allpad":
            kpm[0] = False
    do = inp.randn(n, lq, h, d)
    seed = inp.seed() if p else None
    kw = dict(kv_index=kv_index, key_padding_mask=kpm, dropout_p=p, seed=seed)
    if config is None:
        fast = _run(lambda q, k, v: ops.cross_attention(q, k, v, backend=backend, **kw), (q, k, v), do)
    else:
        fast = _direct(q, k, v, do.to(dtype), config, "cross_attention", kv_index, kpm, seed, p, d ** -0.5)
    ref64 = _run(lambda q, k, v: ops.cross_attention_ref(q, k, v, **kw), (q.double(), k.double(), v.double()), do)
    if dtype == torch.float32:
        low = _run(lambda q, k, v: ops.cross_attention_ref(q, k, v, **kw), (q, k, v), do)
    else:
        def lowp(q, k, v):
            ke, ve, allowed = _expand(k, v, kv_index, kpm, lq)
            return lowp_attention(q, ke, ve, allowed.expand(n, -1, -1), d ** -0.5, p, seed)

        low = _run(lowp, (q, k, v), do)
    return _measures(fast, ref64, low, dtype)


def _direct(q, k, v, do, config, name, *args):
    """The kernel entry points with a forced configuration ({"fwd": ..., "bwd": ...}): [out, dq, dk, dv]."""
    from ..kernels import attention as kern

    out, lse = getattr(kern, f"{name}_fwd")(q, k, v, *args, config=config["fwd"])
    return [out, *getattr(kern, f"{name}_bwd")(do, q, k, v, out, lse, *args, config=config["bwd"])]


def _onehot_v(groups, lk, h, d, dtype, device):
    v = torch.zeros(groups, lk, h, d, dtype=dtype, device=device)
    j = torch.arange(lk, device=device)
    v[:, j, :, j] = 1.0
    return v


def _mask_case(inp, backend, dtype, kind):
    """The forward's dropout mask bit for bit: q = 0 (uniform probabilities), V[j] = e_j (out = the dropped
    probabilities), against the Philox rule on the [N * H * Lq, Lk] view; and the keep rate within 5 sigma."""
    n, m, lq, lk, h, p = (2, 2, 10, 13, 2, 0.3) if kind == "self" else (6, 3, 8, 16, 2, 0.25)
    d = 16
    q = torch.zeros(n, lq, h, d, dtype=dtype, device=inp.device)
    k = inp.randn(m, lk, h, d, dtype=dtype)
    v = _onehot_v(m, lk, h, d, dtype, inp.device)
    seed = inp.seed()
    if kind == "self":
        nq = 4
        out = ops.qformer_attention(q, k, v, num_query=nq, mode="causal", dropout_p=p, seed=seed, backend=backend)
        allowed = allowed_mask(nq, "causal", lq, lk, inp.device)[:, None]  # [1, 1, Lq, Lk]
    else:
        index = torch.tensor([2, 0, 2, 1, 2, 0], device=inp.device)
        out = ops.cross_attention(q, k, v, kv_index=index, dropout_p=p, seed=seed, backend=backend)
        allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=inp.device)
    keep = dropout_keep(seed, n, h, lq, lk, p, inp.device) & allowed
    got = out.permute(0, 2, 1, 3)[..., :lk] != 0  # [N, H, Lq, Lk]
    rate = float(keep.sum()) / float(allowed.expand_as(keep).sum())
    sigma = math.sqrt(p * (1 - p) / float(allowed.expand_as(keep).sum()))
    return [equal_count("dropout mask", got, keep),
            Measure("keep rate - (1 - p)", abs(rate - (1 - p)), 5 * sigma, "|rate - (1 - p)| vs 5 sigma")]


def _label(first, lq, lk, h, d, extra=""):
    return f"{first} Lq={lq} Lk={lk} H={h} D={d}" + (f" {extra}" if extra else "")


# (B, Lq, Lk, H, D, num_query, mode, padding, dropout_p, note)
SELF_QUICK = [
    (1, 33, 33, 2, 64, 32, "bidirectional", "none", 0.0, "T=1"),
    (3, 41, 41, 2, 64, 32, "causal", "allpad", 0.0, "T=9, a sequence all padding"),
    (2, 7, 39, 2, 64, 32, "unimodal", "ragged", 0.0, "text rows only"),
    (2, 42, 42, 2, 64, 32, "itc_itg", "ragged", 0.0, "T=5"),
    (2, 41, 41, 2, 64, 32, "causal", "ragged", 0.1, "dropout"),
]
SELF_FULL = [
    *[(4, 97, 97, 12, 64, 32, mode, "ragged", 0.0, "T=65") for mode in ("bidirectional", "causal", "unimodal")],
    (4, 102, 102, 12, 64, 32, "itc_itg", "allpad", 0.0, "T=35"),
    (64, 64, 64, 12, 64, 32, "causal", "ragged", 0.0, "T=32"),
    (2, 257, 257, 2, 64, 0, "bidirectional", "ragged", 0.0, "text only"),
    (2, 40, 40, 2, 88, 8, "causal", "ragged", 0.0, "head dim 88"),
    (3, 97, 97, 4, 64, 32, "causal", "allpad", 0.1, "dropout"),
    (1, 7, 97, 12, 64, 32, "causal", "ragged", 0.2, "dropout, text rows only"),
]
# (N, M, Lq, Lk, H, D, kv_index, padding, dropout_p, note)
CROSS_QUICK = [
    (7, 5, 32, 257, 1, 64, IDX, "allpad", 0.0, "kv_index, an image all padding"),
    (2, 2, 32, 37, 2, 64, None, "ragged", 0.0, "no kv_index"),
]
CROSS_FULL = [
    (64, 16, 32, 257, 12, 64, tuple(i // 4 for i in range(64)), "ragged", 0.0, "kv_index, 4 row-sets per image"),
    (5, 3, 80, 257, 2, 64, (2, 0, 2, 2, 0), "ragged", 0.0, "kv_index, Lq > 64"),
    (8, 8, 32, 577, 2, 64, None, "ragged", 0.0, "no kv_index"),
    (1, 1, 32, 257, 12, 64, None, "none", 0.0, "B=1"),
    (7, 5, 32, 257, 2, 64, IDX, "ragged", 0.1, "kv_index, dropout"),
]
# the shapes whose every candidate tiling --full checks in fp16 and bf16 (one self bucket with keys in one tile, one
# over several key tiles, one stacked cross bucket)
TILED = [("self", SELF_FULL[1]), ("self", SELF_FULL[5]), ("cross", CROSS_FULL[0])]


def _self(backend, dtype, level, s, config=None, tag=""):
    b, lq, lk, h, d, nq, mode, pattern, p, note = s
    extra = f"{mode} {pattern}{f' p={p}' if p else ''} ({note}){tag}"
    run = functools.partial(_self_case, backend=backend, dtype=dtype, b=b, lq=lq, lk=lk, h=h, d=d, nq=nq, mode=mode,
                            pattern=pattern, p=p, config=config)
    return Case("qformer_attention", backend, dtype, _label(f"B={b}", lq, lk, h, d, extra), run, level)


def _cross(backend, dtype, level, s, config=None, tag=""):
    n, m, lq, lk, h, d, index, pattern, p, note = s
    extra = f"{pattern}{f' p={p}' if p else ''} ({note}){tag}"
    run = functools.partial(_cross_case, backend=backend, dtype=dtype, n=n, m=m, lq=lq, lk=lk, h=h, d=d, index=index,
                            pattern=pattern, p=p, config=config)
    return Case("cross_attention", backend, dtype, _label(f"N={n} M={m}", lq, lk, h, d, extra), run, level)


def _tilings(backend, dtype, kind, s):
    """One case per candidate tiling of the autotuner for the bucket of ``s`` (forward and backward candidates
    paired in order, so that each runs at least once)."""
    from ..kernels import attention as kern

    meta = torch.empty(0, device="meta")
    if kind == "self":
        b, lq, lk, h, d, nq, mode, _, p, _ = s
        g = kern._self_geom(meta.new_empty(b, lq, h, d, dtype=dtype), meta.new_empty(b, lk, h, d), nq, mode, p, 1.0)
    else:
        n, m, lq, lk, h, d, index, _, p, _ = s
        g = kern._cross_geom(meta.new_empty(n, lq, h, d, dtype=dtype), meta.new_empty(m, lk, h, d),
                             None if index is None else meta, p, 1.0)
    fwd, bwd = kern._fwd_candidates(g), kern._bwd_candidates(g)
    out = []
    for i in range(max(len(fwd), len(bwd))):
        cfg = {"fwd": fwd[i % len(fwd)], "bwd": bwd[i % len(bwd)]}
        tag = f" tiling {i + 1}/{max(len(fwd), len(bwd))}"
        out.append(KINDS[kind][1](backend, dtype, FULL, s, config=cfg, tag=tag))
    return out


# kind -> (op, case maker, quick shapes, full shapes, the label of the mask case)
KINDS = {"self": ("qformer_attention", _self, SELF_QUICK, SELF_FULL,
                  "B=2 Lq=10 Lk=13 H=2 D=16 causal p=0.3 (dropout mask)"),
         "cross": ("cross_attention", _cross, CROSS_QUICK, CROSS_FULL,
                   "N=6 M=3 Lq=8 Lk=16 H=2 D=16 kv_index p=0.25 (dropout mask)")}


def _cases(kind: str, backend: str, dtype: torch.dtype, level: str) -> list:
    op, make, quick, full, mask_label = KINDS[kind]
    out = [make(backend, dtype, "quick", s) for s in quick]
    out.append(Case(op, backend, dtype, mask_label, functools.partial(_mask_case, backend=backend, dtype=dtype,
                                                                      kind=kind)))
    if level == FULL:
        out += [make(backend, dtype, FULL, s) for s in full]
        if dtype != torch.float32:
            out += [c for k, s in TILED if k == kind for c in _tilings(backend, dtype, kind, s)]
    return out


CASES = {("qformer_attention", "triton"): functools.partial(_cases, "self"),
         ("cross_attention", "triton"): functools.partial(_cases, "cross")}
