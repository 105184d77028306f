"""The check functions of the Triton attention kernels (tests/kernels/test_attention.py, and the mutation tests that
run them against wrong kernels): the public ops and the kernel entry points against the float64 reference, with
the reference in the tested dtype (or PyTorch's own attention in it) as the yardstick."""
from __future__ import annotations

import math

import torch

from blipfast import ops
from blipfast.kernels import attention as kern
from blipfast.ops._attention_ref import attention_fwd_ref
from blipfast.ops.cross_attention import _expand
from blipfast.ops.qformer_attention import allowed_mask
from blipfast.selftest.attention import lowp_attention as _lowp_attention
from tests.helpers.runtime import DEV
from tests.helpers.tolerance import assert_within_torch_error

IDX = [3, 0, 3, 1, 3, 3, 0]  # repeats; images 2 and 4 unused


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def _padding(pattern: str, b: int, lk: int, nq: int):
    """Key padding masks: none; ragged text lengths, at least half of the text kept (so that later key
    blocks matter) except in the last sequence, which has no text at all; ragged with sequence 0 fully
    padded (every row of it has no allowed key, queries included)."""
    if pattern == "none":
        return None
    kpm = torch.ones(b, lk, dtype=torch.bool, device=DEV)
    t = lk - nq
    for i in range(b):
        keep = int(torch.randint(t // 2, t + 1, ()).item()) if i != b - 1 else 0
        kpm[i, nq + keep:] = False
    if pattern == "allpad":
        kpm[0] = False
    return kpm


def _run(fn, inputs, grad_out):
    """(output, grads of inputs) of fn(*inputs) backpropagating grad_out."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check_all(fast, ref64, lowp, names=("out", "dq", "dk", "dv")):
    for f, r, l, n in zip(fast, ref64, lowp, names):
        assert_within_torch_error(f, r, l, name=n)


def _self_case(b, lq, lk, h, d, nq, mode, pattern, dtype=torch.float32, dropout_p=0.0, seed=None, lowp="ref"):
    """Public op with backend="triton" vs the float64 reference (out and the three gradients)."""
    q, k, v = _rand(b, lq, h, d, dtype=dtype), _rand(b, lk, h, d, dtype=dtype), _rand(b, lk, h, d, dtype=dtype)
    kpm = _padding(pattern, b, lk, nq)
    do = _rand(b, lq, h, d)
    scale = 1.0 / math.sqrt(d)
    kw = dict(num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=dropout_p, seed=seed)

    fast = _run(lambda q, k, v: ops.qformer_attention(q, k, v, backend="triton", **kw), (q, k, v), do)
    ref64 = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q.double(), k.double(), v.double()), do)
    if lowp == "ref":
        low = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q, k, v), do)
    else:
        allowed = allowed_mask(nq, mode, lq, lk, q.device, kpm)
        low = _run(lambda q, k, v: _lowp_attention(q, k, v, allowed, scale, dropout_p, seed), (q, k, v), do)
    _check_all([fast[0], *fast[1]], [ref64[0], *ref64[1]], [low[0], *low[1]])
    return fast


def _cross_case(n, m, lq, lk, h, d, kv_index, pattern, dtype=torch.float32, dropout_p=0.0, seed=None,
                lowp="ref", config=None):
    q, k, v = _rand(n, lq, h, d, dtype=dtype), _rand(m, lk, h, d, dtype=dtype), _rand(m, lk, h, d, dtype=dtype)
    kpm = None
    if pattern != "none":
        kpm = torch.rand(m, lk, device=DEV) > 0.3
        if pattern == "allpad":
            kpm[0] = False
    do = _rand(n, lq, h, d)
    scale = 1.0 / math.sqrt(d)
    kw = dict(kv_index=kv_index, key_padding_mask=kpm, dropout_p=dropout_p, seed=seed)
    if config is None:
        fast = _run(lambda q, k, v: ops.cross_attention(q, k, v, backend="triton", **kw), (q, k, v), do)
    else:
        out, lse = kern.cross_attention_fwd(q, k, v, kv_index, kpm, seed, dropout_p, scale, config=config)
        grads = kern.cross_attention_bwd(do.to(dtype), q, k, v, out, lse, kv_index, kpm, seed, dropout_p, scale,
                                         config=config)
        fast = (out, list(grads))
    ref64 = _run(lambda q, k, v: ops.cross_attention_ref(q, k, v, **kw), (q.double(), k.double(), v.double()), do)
    if lowp == "ref":
        low = _run(lambda q, k, v: ops.cross_attention_ref(q, k, v, **kw), (q, k, v), do)
    else:
        def f(q, k, v):
            ke, ve, allowed = _expand(k, v, kv_index, kpm, lq)
            return _lowp_attention(q, ke, ve, allowed.expand(n, -1, -1), scale, dropout_p, seed)
        low = _run(f, (q, k, v), do)
    _check_all([fast[0], *fast[1]], [ref64[0], *ref64[1]], [low[0], *low[1]])
    return fast, (q, k, v, kpm, do)


def _direct_self(b, lq, lk, h, d, nq, mode, pattern, config, dropout_p=0.0):
    """Kernel entry points called directly with a forced configuration, vs the float64 reference."""
    q, k, v = _rand(b, lq, h, d), _rand(b, lk, h, d), _rand(b, lk, h, d)
    kpm = _padding(pattern, b, lk, nq)
    do = _rand(b, lq, h, d)
    scale = 1.0 / math.sqrt(d)
    seed = torch.tensor([987654321987], dtype=torch.int64, device=DEV) if dropout_p > 0 else None
    out, lse = kern.qformer_attention_fwd(q, k, v, kpm, seed, nq, mode, dropout_p, scale, config=config)
    grads = kern.qformer_attention_bwd(do, q, k, v, out, lse, kpm, seed, nq, mode, dropout_p, scale, config=config)
    allowed = allowed_mask(nq, mode, lq, lk, DEV, kpm)
    kw = dict(num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=dropout_p, seed=seed)
    ref64 = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q.double(), k.double(), v.double()), do)
    low = _run(lambda q, k, v: ops.qformer_attention_ref(q, k, v, **kw), (q, k, v), do)
    _check_all([out, *grads], [ref64[0], *ref64[1]], [low[0], *low[1]])
    _, lse64 = attention_fwd_ref(q.double(), k.double(), v.double(), allowed, scale=scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), "lse: empty rows must be -inf, others finite"
    fin = torch.isfinite(lse64)
    assert lse.dtype == torch.float64, "lse: the kernels save it in fp64 (the backward's precision)"
    assert_within_torch_error(lse[fin], lse64[fin], attention_fwd_ref(q, k, v, allowed, scale=scale)[1][fin],
                              dtype=torch.float32, name="lse")
    return out, lse, grads


def _cfg(bm, bn, hpp=1, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, HPP=hpp, num_warps=4, num_stages=1, **kw)
