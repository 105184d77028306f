"""The check functions of bias_dropout_add_layernorm (tests/kernels/test_layernorm_epilogue.py,
test_layernorm_nonfinite.py, and the mutation tests that run them against wrong kernels): inputs, the op's outputs
and gradients against the float64 reference, the fused contract of a raw fwd/bwd pair, the dropout rule written out.
EXT is blipfast._C when it is built and loads, else None."""
from __future__ import annotations

from fractions import Fraction

import torch

from blipfast import _ext
from blipfast.ops import bias_dropout_add_layernorm, bias_dropout_add_layernorm_ref
from blipfast.ops import layernorm_epilogue as LE
from blipfast.ops._philox import philox4_u32
from tests.helpers.tolerance import assert_within_torch_error

NAMES = ("x", "bias", "residual", "weight", "ln_bias")
EXT = _ext.extension()


def rule_keep(seed, rows, n, p, device="cpu"):
    """The dropout rule on the [rows, N] view, written out: element (r, c) uses word c % 4 of the Philox draw
    with counter r * ceil(N / 4) + c // 4 and is kept iff (word >> 8) >= round_half_up(p * 2^24)."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(n, device=device)[None, :]
    words = philox4_u32(seed, r * ((n + 3) // 4) + c // 4)  # [rows, N, 4]
    word = words.gather(-1, (c % 4).expand(rows, n)[..., None])[..., 0]
    return (word >> 8) >= int((Fraction(p) * 2**24 + Fraction(1, 2)).__floor__())


def make_inputs(shape, dtype, device="cpu", bias=True, scale=1.0, offset=0.0):
    """x, residual in ``dtype``; bias, weight, ln_bias fp32 (as a model keeps its parameters); dy."""
    n = shape[-1]
    f = dict(device=device, dtype=torch.float32)
    x = (torch.randn(*shape, **f) * scale + offset).to(dtype)
    res = (torch.randn(*shape, **f) * scale + offset).to(dtype)
    b = torch.randn(n, **f) * 0.5 if bias else None
    w = 1.0 + 0.5 * torch.randn(n, **f)
    lb = 0.5 * torch.randn(n, **f)
    dy = torch.randn(*shape, **f).to(dtype)
    return [x, b, res, w, lb], dy


def run(fn, inputs, dy, cast=None, **kw):
    """y and the gradients of every input that is not None, with inputs cast to ``cast`` first."""
    leaves = [None if t is None else (t.to(cast) if cast else t).detach().clone().requires_grad_(True)
              for t in inputs]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    return y.detach(), dict(zip(names, grads))


def check_against_reference(inputs, dy, dtype, backend, p, seed):
    kw = dict(eps=1e-12, dropout_p=p, seed=seed)
    fast_y, fast_g = run(bias_dropout_add_layernorm, inputs, dy, backend=backend, **kw)
    ref_y, ref_g = run(bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float64, **kw)
    low_y, low_g = run(bias_dropout_add_layernorm_ref, inputs, dy, cast=dtype, **kw)
    if not (torch.isfinite(low_y).all() and all(torch.isfinite(g).all() for g in low_g.values())):
        # PyTorch's own half-precision LayerNorm on CPU rounds eps = 1e-12 to 0 and returns NaN for a
        # constant row (N = 1); its yardstick is then the fp32 computation rounded to the dtype
        f32_y, f32_g = run(bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float32, **kw)
        low_y, low_g = f32_y.to(dtype), {k: v.to(dtype) for k, v in f32_g.items()}
    assert fast_y.dtype == dtype
    assert_within_torch_error(fast_y, ref_y, low_y, dtype=dtype, name="y")
    for name in fast_g:
        assert fast_g[name].dtype == inputs[NAMES.index(name)].dtype, name
        assert_within_torch_error(fast_g[name], ref_g[name], low_g[name], dtype=dtype, name=f"d{name}")



def check_raw_op(fwd, bwd, dtype, n, device):
    """The fused contract (y, z, stats = [mean; rstd]; dx, dresidual, dweight, dln_bias, dbias) of ``fwd``/``bwd``
    against the torch implementation in float64, with the torch implementation in ``dtype`` as the yardstick
    (the backward on the forward's own z and stats), and the dropout mask bit for bit (x > 0, residual 0:
    z == 0 exactly where dropped)."""
    rows, p = 67, 0.25
    seed = torch.tensor([2**33 + 5], device=device)
    x = (torch.rand(rows, n, device=device) + 0.5).to(dtype)
    w, lb = torch.randn(n, device=device), torch.randn(n, device=device)
    zeros = torch.zeros_like(x)
    got = fwd(x, None, zeros, w, lb, seed, 1e-5, p)
    keep = rule_keep(seed, rows, n, p, device)
    assert torch.equal(got[1] != 0, keep), "dropout mask"
    want = LE._fwd_torch(x.double(), None, zeros.double(), w.double(), lb.double(), seed, 1e-5, p)
    low = LE._fwd_torch(x, None, zeros, w, lb, seed, 1e-5, p)
    for name, a, r, lo in zip(("y", "z", "stats"), got, want, low):
        assert a.dtype == lo.dtype and a.shape == lo.shape, name
        if name == "stats":  # mean and rstd have their own scales
            for i, stat in enumerate(("mean", "rstd")):
                assert_within_torch_error(a[i], r[i], lo[i], name=stat)
        else:
            assert_within_torch_error(a, r, lo, name=name)
    _, z, stats = got
    dy = torch.randn(rows, n, device=device).to(dtype)
    got = bwd(dy, z, stats, w, seed, p)
    want = LE._bwd_torch(dy.double(), z.double(), stats.double(), w.double(), seed, p)
    low = LE._bwd_torch(dy, z, stats, w, seed, p)
    assert (got[0][~keep] == 0).all(), "dx where the forward dropped"  # the forward's mask, regenerated
    for name, a, r, lo in zip(("dx", "dresidual", "dweight", "dln_bias", "dbias"), got, want, low):
        assert a.dtype == lo.dtype and a.shape == lo.shape, name
        assert_within_torch_error(a, r, lo, name=name)
