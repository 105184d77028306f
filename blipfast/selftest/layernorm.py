"""Self-test cases of the post-LN epilogue ``bias_dropout_add_layernorm`` (the CUDA kernel; docs/selftest.md).

Each case runs the public op on the backend under test with x and the residual in the tested dtype and the
parameters in fp32 (as a model keeps them), and holds y and the gradients of x, bias, residual, weight and the
LayerNorm bias to the tolerance rule against the float64 reference, with the reference in the tested dtype as the
yardstick (fp32 rounded to the dtype where PyTorch's own half-precision LayerNorm is not finite). With dropout the
reference applies the same seeded Philox mask, so a mask that differs fails the rule. The mask case compares the
forward's mask bit for bit with the Philox rule on the [R, N] view (x > 0 and a zero residual: the pre-norm sum
is 0 exactly where an element was dropped) and requires the backward to drop the same elements.

Quick: the BERT width 768, one row of an odd width, a 3-D input with dropout. Full adds many rows, the widths of
the larger models (1024, 1408, 2560, 4096), a width of 1, and rows far from zero (mean 1e3).
"""
from __future__ import annotations

import functools

import torch

from .. import ops
from ..ops._philox import dropout_keep_mask_2d
from .case import FULL, QUICK, Case, equal_count, rule

NAMES = ("x", "bias", "residual", "weight", "ln_bias")


def _run(fn, inputs, dy, cast=None, **kw):
    """[y, grads of the inputs that are not None], every input cast to ``cast`` first."""
    leaves = [None if t is None else (t.to(cast) if cast else t).detach().clone().requires_grad_(True)
              for t in inputs]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    return [y.detach(), *grads]


def _case(inp, backend, dtype, shape, bias, p, offset=0.0):
    n = shape[-1]
    x = (inp.randn(*shape) + offset).to(dtype)
    res = (inp.randn(*shape) + offset).to(dtype)
    inputs = [x, inp.randn(n, scale=0.5) if bias else None, res, 1.0 + 0.5 * inp.randn(n), 0.5 * inp.randn(n)]
    dy = inp.randn(*shape).to(dtype)
    kw = dict(eps=1e-12, dropout_p=p, seed=inp.seed() if p else None)
    fast = _run(ops.bias_dropout_add_layernorm, inputs, dy, backend=backend, **kw)
    ref = _run(ops.bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float64, **kw)
    low = _run(ops.bias_dropout_add_layernorm_ref, inputs, dy, cast=dtype, **kw)
    if not all(bool(torch.isfinite(t).all()) for t in low):
        # PyTorch's own half-precision LayerNorm on a CPU rounds eps = 1e-12 to 0 (NaN for a constant row): its
        # yardstick is then the fp32 computation rounded to the dtype
        low = [t.to(f.dtype) for t, f in zip(_run(ops.bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float32,
                                                  **kw), fast)]
    names = ["y"] + [f"d{name}" for name, t in zip(NAMES, inputs) if t is not None]
    return [rule(name, f, r, lo, dtype) for name, f, r, lo in zip(names, fast, ref, low)]


def _mask_case(inp, backend, dtype, rows=67, n=130, p=0.25):
    """The dropout mask of the forward (z == 0 exactly where dropped) and of the backward (dx == 0 there), through
    the custom ops with the backend named."""
    seed = inp.seed()
    x = (inp.rand(rows, n) + 0.5).to(dtype)
    w, lb = inp.randn(n), inp.randn(n)
    zeros = torch.zeros_like(x)
    y, z, stats = torch.ops.blipfast.bias_dropout_add_layernorm_fwd(x, None, zeros, w, lb, seed, 1e-5, p, backend)
    keep = dropout_keep_mask_2d(seed, rows, n, p, inp.device)
    dy = inp.randn(rows, n).to(dtype)
    dx = torch.ops.blipfast.bias_dropout_add_layernorm_bwd(dy, z, stats, w, seed, p, backend)[0]
    return [equal_count("forward dropout mask", z != 0, keep),
            equal_count("backward dropout mask", dx[~keep], torch.zeros_like(dx[~keep]))]


# (shape, bias, dropout_p, offset, note)
QUICK_SHAPES = [((3, 768), True, 0.0, 0.0, ""), ((1, 33), False, 0.0, 0.0, "one row, no bias"),
                ((2, 5, 768), True, 0.1, 0.0, "dropout")]
FULL_SHAPES = [((4096, 768), True, 0.0, 0.0, ""), ((8, 1024), True, 0.1, 0.0, "dropout"),
               ((16, 1408), True, 0.0, 0.0, ""), ((4, 2560), False, 0.0, 0.0, "no bias"),
               ((4, 4096), True, 0.1, 0.0, "dropout"), ((7, 1), True, 0.0, 0.0, "width 1"),
               ((64, 768), True, 0.0, 1e3, "mean 1e3")]


def layernorm_cases(backend: str, dtype: torch.dtype, level: str) -> list:
    op = "bias_dropout_add_layernorm"
    shapes = [(s, QUICK) for s in QUICK_SHAPES] + ([(s, FULL) for s in FULL_SHAPES] if level == FULL else [])
    out = []
    for (shape, bias, p, offset, note), lvl in shapes:
        label = "x".join(map(str, shape)) + (f" p={p}" if p else "") + (f" ({note})" if note else "")
        run = functools.partial(_case, backend=backend, dtype=dtype, shape=shape, bias=bias, p=p, offset=offset)
        out.append(Case(op, backend, dtype, label, run, lvl))
    out.append(Case(op, backend, dtype, "67x130 p=0.25 (dropout mask)",
                    functools.partial(_mask_case, backend=backend, dtype=dtype)))
    return out


CASES = {("bias_dropout_add_layernorm", "cuda"): layernorm_cases}
